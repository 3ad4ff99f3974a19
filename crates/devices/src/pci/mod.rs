//! PCI bus 0: configuration mechanism #1 (ports 0xCF8–0xCFF), a host bridge at 00:00.0
//! and device functions in slots 1–31.
//!
//! Linux probes the mechanism at boot and, finding a host bridge, uses configuration type 1;
//! the ACPI DSDT declares the root bridge so it scans the bus. Slots without a device, and
//! functions other than 0, read as absent (all-ones). A device's BARs are placed by the VMM
//! before boot, like firmware would; the guest may size them but the VMM does not move them.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmon_state::Persist;

use crate::bus::{lock, BusDevice};

/// A function's configuration space, as the root complex sees it.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at byte `offset` (< 256).
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (< 256).
    fn write_config(&mut self, offset: usize, data: &[u8]);
}

pub const SLOTS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full: all {} device slots are in use", SLOTS - 1)]
    BusFull,
}

pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// 0xCF8..0xCFC is the address register, 0xCFC..0xD00 the data window.
pub const CONFIG_PORTS: u64 = 8;

const ENABLE_BIT: u32 = 1 << 31;
/// Red Hat's generic PCIe host bridge ID (as QEMU uses): any ID works, Linux keys on class.
const HOST_BRIDGE_VENDOR: u16 = 0x1B36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE_HOST: u32 = 0x0600;

pub struct PciConfigIo {
    address: u32,
    /// Slot 0 is the host bridge, answered here; the rest hold devices.
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciConfigIo {
    fn default() -> Self {
        PciConfigIo {
            address: 0,
            slots: (0..SLOTS).map(|_| None).collect(),
        }
    }
}

impl PciConfigIo {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` in the lowest free slot and returns the slot number.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = (1..SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(PciError::BusFull)?;
        self.slots[slot] = Some(device);
        Ok(slot as u8)
    }

    /// The slot selected by the address register, if it holds function 0 of a device
    /// on bus 0 (`Some(None)` is the host bridge).
    fn selected(&self) -> Option<Option<&Arc<Mutex<dyn PciDevice>>>> {
        if self.address & ENABLE_BIT == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xFF;
        let device = (self.address >> 11) & 0x1F;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 || function != 0 {
            return None;
        }
        match device {
            0 => Some(None),
            d => self.slots[d as usize].as_ref().map(Some),
        }
    }

    /// The host bridge's 32-bit register at `reg` (dword aligned).
    fn host_bridge_dword(reg: u32) -> u32 {
        match reg {
            0x00 => u32::from(HOST_BRIDGE_VENDOR) | (u32::from(HOST_BRIDGE_DEVICE) << 16),
            0x08 => CLASS_BRIDGE_HOST << 16, // class code, subclass, prog-if 0, revision 0
            _ => 0,
        }
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let value = self.address >> (offset * 8);
            for (i, b) in data.iter_mut().enumerate() {
                *b = value.checked_shr(8 * i as u32).unwrap_or(0xFF) as u8;
            }
            return;
        }
        let reg = (self.address & 0xFC) as usize + (offset as usize - 4);
        // An access may not run past the end of the data window's dword.
        if offset as usize - 4 + data.len() > 4 {
            data.fill(0xFF);
            return;
        }
        match self.selected() {
            Some(Some(device)) => lock(device).read_config(reg, data),
            Some(None) => {
                let value = Self::host_bridge_dword(reg as u32 & !3) >> ((reg % 4) * 8);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (value >> (8 * i)) as u8;
                }
            }
            None => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a full dword write sets the address register; byte writes to 0xCF8..0xCFB are
        // other chipset registers (0xCF9 is a reset control on PIIX) that we do not have.
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !0x3;
            return;
        }
        if offset < 4 || offset as usize - 4 + data.len() > 4 {
            return;
        }
        let reg = (self.address & 0xFC) as usize + (offset as usize - 4);
        // The host bridge has no writable registers.
        if let Some(Some(device)) = self.selected() {
            lock(device).write_config(reg, data);
        }
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
            ..Default::default()
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

    struct Scratch([u8; 256]);

    impl PciDevice for Scratch {
        fn read_config(&mut self, offset: usize, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset..offset + data.len()]);
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.0[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn devices_fill_slots_and_see_their_offsets() {
        let mut io = PciConfigIo::new();
        let dev = Arc::new(Mutex::new(Scratch([0; 256])));
        assert_eq!(io.add_device(dev.clone()).unwrap(), 1);
        select(&mut io, 0, 1, 0, 0x40);
        io.write(6, &[0xAB, 0xCD]);
        assert_eq!(&dev.lock().unwrap().0[0x42..0x44], &[0xAB, 0xCD]);
        assert_eq!(read32(&mut io, 4), 0xCDAB_0000);
        // Function 1 of the same slot, and another bus, are absent.
        select(&mut io, 0, 1, 1, 0x40);
        assert_eq!(read32(&mut io, 4), 0xFFFF_FFFF);
        io.write(4, &[1, 2, 3, 4]);
        select(&mut io, 1, 1, 0, 0x40);
        io.write(4, &[1, 2, 3, 4]);
        assert_eq!(&dev.lock().unwrap().0[0x40..0x44], &[0, 0, 0xAB, 0xCD]);
        // A word access running past the data window is refused.
        select(&mut io, 0, 1, 0, 0x40);
        let mut w = [0u8; 2];
        io.read(7, &mut w);
        assert_eq!(w, [0xFF; 2]);
        io.write(7, &[9, 9]);
        assert_eq!(&dev.lock().unwrap().0[0x43..0x45], &[0xCD, 0]);
    }

    #[test]
    fn the_bus_fills_up() {
        let mut io = PciConfigIo::new();
        for slot in 1..SLOTS {
            let s = io.add_device(Arc::new(Mutex::new(Scratch([0; 256]))));
            assert_eq!(s, Ok(slot as u8));
        }
        assert_eq!(
            io.add_device(Arc::new(Mutex::new(Scratch([0; 256])))),
            Err(PciError::BusFull)
        );
    }
}
