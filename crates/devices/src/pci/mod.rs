//! PCI configuration mechanism #1 (ports 0xCF8–0xCFF) with a host bridge at 00:00.0.
//!
//! This is the root of the PCI bus: Linux probes it at boot and, finding a host bridge,
//! uses configuration type 1 instead of declaring PCI unusable. Functions other than the
//! host bridge read as absent (all-ones). Devices will be added behind it.

use serde::{Deserialize, Serialize};
use vmon_state::Persist;

use crate::bus::BusDevice;

pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// 0xCF8..0xCFC is the address register, 0xCFC..0xD00 the data window.
pub const CONFIG_PORTS: u64 = 8;

const ENABLE_BIT: u32 = 1 << 31;
/// Red Hat's generic PCIe host bridge ID (as QEMU uses): any ID works, Linux keys on class.
const HOST_BRIDGE_VENDOR: u16 = 0x1B36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE_HOST: u32 = 0x0600;

#[derive(Default)]
pub struct PciConfigIo {
    address: u32,
}

impl PciConfigIo {
    pub fn new() -> Self {
        Self::default()
    }

    /// The 32-bit config register at `reg` (dword aligned) of bus/device/function `bdf`.
    fn config_dword(bdf: u32, reg: u32) -> u32 {
        if bdf != 0 {
            return 0xFFFF_FFFF;
        }
        match reg {
            0x00 => u32::from(HOST_BRIDGE_VENDOR) | (u32::from(HOST_BRIDGE_DEVICE) << 16),
            0x08 => CLASS_BRIDGE_HOST << 16, // class code, subclass, prog-if 0, revision 0
            _ => 0,
        }
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => self.address >> (offset * 8),
            4..=7 if self.address & ENABLE_BIT != 0 => {
                let bdf = (self.address >> 8) & 0xFFFF;
                let reg = self.address & 0xFC;
                Self::config_dword(bdf, reg) >> ((offset - 4) * 8)
            }
            _ => 0xFFFF_FFFF,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0xFF) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a full dword write sets the address register; byte writes to 0xCF8..0xCFB are
        // other chipset registers (0xCF9 is a reset control on PIIX) that we do not have.
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !0x3;
        }
        // Writes to the host bridge's config space are accepted and ignored: it has no
        // writable registers.
    }
}

/// The configuration address register: which function and register the data window shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = PciConfigState;
    type Wiring = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PciConfigState, Self::Error> {
        Ok(PciConfigState {
            address: self.address,
        })
    }

    fn restore(_: (), state: &PciConfigState) -> Result<Self, Self::Error> {
        Ok(PciConfigIo {
            address: state.address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(dev: &mut PciConfigIo, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn select(dev: &mut PciConfigIo, bus: u32, device: u32, function: u32, reg: u32) {
        let addr = ENABLE_BIT | (bus << 16) | (device << 11) | (function << 8) | reg;
        dev.write(0, &addr.to_le_bytes());
    }

    #[test]
    fn address_register_reads_back_like_linux_probes_it() {
        let mut dev = PciConfigIo::new();
        dev.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read32(&mut dev, 0), 0x8000_0000);
    }

    #[test]
    fn host_bridge_at_zero_and_nothing_else() {
        let mut dev = PciConfigIo::new();
        select(&mut dev, 0, 0, 0, 0);
        assert_eq!(read32(&mut dev, 4), 0x0008_1B36);
        select(&mut dev, 0, 0, 0, 8);
        assert_eq!(read32(&mut dev, 4) >> 16, 0x0600);
        let mut word = [0u8; 2];
        dev.read(6, &mut word);
        assert_eq!(
            u16::from_le_bytes(word),
            0x0600,
            "16-bit read of the class code"
        );
        select(&mut dev, 0, 1, 0, 0);
        assert_eq!(read32(&mut dev, 4), 0xFFFF_FFFF);
        select(&mut dev, 3, 0, 0, 0);
        assert_eq!(read32(&mut dev, 4), 0xFFFF_FFFF);
    }

    #[test]
    fn state_round_trips() {
        let mut dev = PciConfigIo::new();
        select(&mut dev, 0, 0, 0, 8);
        let mut back = PciConfigIo::restore((), &dev.save().unwrap()).unwrap();
        assert_eq!(read32(&mut back, 4) >> 16, 0x0600);
    }

    #[test]
    fn disabled_or_partial_accesses_are_harmless() {
        let mut dev = PciConfigIo::new();
        dev.write(0, &0u32.to_le_bytes());
        assert_eq!(read32(&mut dev, 4), 0xFFFF_FFFF);
        dev.write(1, &[0xFF]); // 0xCF9: not a reset here
        dev.write(0, &[0x80, 0, 0]);
        dev.write(4, &[1, 2, 3, 4]);
        let mut wide = [0u8; 8];
        dev.read(4, &mut wide);
        assert_eq!(wide, [0xFF; 8]);
    }
}
