//! A type-0 PCI configuration space: the 256-byte header every conventional PCI function
//! has, with per-bit write masks, 64-bit memory BARs and a capability list.
//!
//! Guests write whole dwords, words or bytes at any offset; each written bit lands only
//! where the mask says the register is writable, so read-only fields (IDs, capability
//! bodies) cannot be changed and BAR sizing works by construction: writing all-ones to a
//! BAR reads back the size mask.

use serde::{Deserialize, Serialize};

pub const CONFIG_SPACE_SIZE: usize = 256;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

const COMMAND: usize = 0x04;
const STATUS_CAP_LIST: u32 = 1 << 20;
const BAR0: usize = 0x10;
const SUBSYSTEM: usize = 0x2C;
const CAP_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3C;
/// Capabilities start after the standard header.
const FIRST_CAP: usize = 0x40;

/// Command register bits the guest may set: memory decode, bus master, INTx disable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_WRITABLE: u32 = 0x0406;

const BAR_MEM_64: u32 = 0b100;

/// The identity fields of a function's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface, as the 24 bits at offset 0x09.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment { addr: u64, size: u64 },
    #[error("BAR {0} is out of range or already in use")]
    BarIndex(usize),
    #[error("no room left in configuration space for a {0}-byte capability")]
    NoRoom(usize),
    #[error("saved configuration space has {0} dwords, not {DWORDS}")]
    StateLength(usize),
    #[error(
        "saved configuration space differs at {offset:#x} in bits the guest cannot write \
         ({saved:#010x}, this function has {actual:#010x}): it is another device's"
    )]
    StateMismatch {
        offset: usize,
        saved: u32,
        actual: u32,
    },
}

/// The registers of a configuration space. Its layout (IDs, BARs, capabilities, which bits
/// are writable) is not state: the device that builds the space decides it, and a saved
/// state only fits a space with the same layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    pub regs: Vec<u32>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bar {
    /// Where the VMM put it; the guest can probe the size but we keep the address.
    addr: u64,
    size: u64,
}

pub struct ConfigSpace {
    regs: [u32; DWORDS],
    writable: [u32; DWORDS],
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    pub fn new(ids: PciIds) -> Self {
        let mut regs = [0u32; DWORDS];
        let mut writable = [0u32; DWORDS];
        regs[0] = u32::from(ids.vendor) | u32::from(ids.device) << 16;
        regs[COMMAND / 4] = 0;
        writable[COMMAND / 4] = COMMAND_WRITABLE;
        regs[2] = u32::from(ids.revision) | (ids.class & 0xFF_FFFF) << 8;
        regs[SUBSYSTEM / 4] = u32::from(ids.subsystem_vendor) | u32::from(ids.subsystem) << 16;
        // Interrupt line is a scratch byte for the OS; pin 0: this function has no INTx.
        writable[INTERRUPT_LINE / 4] = 0xFF;
        ConfigSpace {
            regs,
            writable,
            bars: [None; 6],
            next_cap: FIRST_CAP,
            last_cap: None,
        }
    }

    /// Declares `index`/`index + 1` as one 64-bit non-prefetchable memory BAR at `addr`.
    pub fn add_bar64(&mut self, index: usize, addr: u64, size: u64) -> Result<(), ConfigError> {
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BarSize(size));
        }
        if addr & (size - 1) != 0 {
            return Err(ConfigError::BarAlignment { addr, size });
        }
        if index >= 5 || self.bars[index].is_some() || self.bars[index + 1].is_some() {
            return Err(ConfigError::BarIndex(index));
        }
        let lo = BAR0 / 4 + index;
        self.regs[lo] = (addr as u32 & !0xF) | BAR_MEM_64;
        self.regs[lo + 1] = (addr >> 32) as u32;
        let mask = !(size - 1);
        self.writable[lo] = mask as u32 & !0xF;
        self.writable[lo + 1] = (mask >> 32) as u32;
        self.bars[index] = Some(Bar { addr, size });
        self.bars[index + 1] = Some(Bar::default());
        Ok(())
    }

    /// The address and size the VMM gave BAR `index`.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .filter(|b| b.size != 0)
            .map(|b| (b.addr, b.size))
    }

    /// The address the guest last programmed into 64-bit BAR `index`.
    pub fn programmed_bar(&self, index: usize) -> u64 {
        let lo = BAR0 / 4 + index;
        u64::from(self.regs[lo] & !0xF) | u64::from(self.regs[lo + 1]) << 32
    }

    /// Appends a capability with `body` following its ID and next-pointer bytes, and
    /// returns the capability's offset. Bits of `writable_body` (same length as `body`, or
    /// shorter) become guest-writable.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable_body: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let at = self.next_cap;
        if at + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom(len));
        }
        self.set_byte(at, id);
        self.set_byte(at + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(at + 2 + i, *b);
        }
        for (i, m) in writable_body.iter().take(body.len()).enumerate() {
            let off = at + 2 + i;
            let shift = (off % 4) * 8;
            self.writable[off / 4] |= u32::from(*m) << shift;
        }
        match self.last_cap {
            None => {
                self.set_byte(CAP_POINTER, at as u8);
                self.regs[COMMAND / 4] |= STATUS_CAP_LIST;
            }
            Some(prev) => self.set_byte(prev + 1, at as u8),
        }
        self.last_cap = Some(at);
        // Capabilities are dword aligned.
        self.next_cap = (at + len + 3) & !3;
        Ok(at)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xFF << shift)) | u32::from(value) << shift;
    }

    /// Sets bytes of the space directly (the device's own view, ignoring write masks).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if offset + i < CONFIG_SPACE_SIZE {
                self.set_byte(offset + i, *b);
            }
        }
    }

    /// Reads `data.len()` bytes at `offset`; bytes beyond the space read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i;
            *b = if off < CONFIG_SPACE_SIZE {
                (self.regs[off / 4] >> ((off % 4) * 8)) as u8
            } else {
                0xFF
            };
        }
    }

    pub fn read_u32(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// A guest write: only bits the mask allows change; writes beyond the space vanish.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset + i;
            if off >= CONFIG_SPACE_SIZE {
                return;
            }
            let shift = (off % 4) * 8;
            let mask = (self.writable[off / 4] >> shift) as u8;
            let old = (self.regs[off / 4] >> shift) as u8;
            self.set_byte(off, (old & !mask) | (b & mask));
        }
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND / 4] as u16
    }

    pub fn save_state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.to_vec(),
        }
    }

    /// Loads saved registers into a space built with the same layout. Only guest-writable
    /// bits may differ from the fresh space; anything else means the state belongs to a
    /// different device (or was tampered with), and nothing is changed.
    pub fn restore_state(&mut self, state: &ConfigSpaceState) -> Result<(), ConfigError> {
        let saved: &[u32; DWORDS] = state
            .regs
            .as_slice()
            .try_into()
            .map_err(|_| ConfigError::StateLength(state.regs.len()))?;
        for (i, (&s, &a)) in saved.iter().zip(&self.regs).enumerate() {
            if (s ^ a) & !self.writable[i] != 0 {
                return Err(ConfigError::StateMismatch {
                    offset: i * 4,
                    saved: s,
                    actual: a,
                });
            }
        }
        self.regs = *saved;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1AF4,
            device: 0x1042,
            revision: 1,
            class: 0x01_8000,
            subsystem_vendor: 0x1AF4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn header_fields_are_where_the_spec_puts_them() {
        let cs = ConfigSpace::new(ids());
        assert_eq!(cs.read_u32(0), 0x1042_1AF4);
        assert_eq!(cs.read_u32(8), 0x0180_0001);
        assert_eq!(cs.read_u32(0x2C), 0x0040_1AF4);
        assert_eq!(cs.read_u32(0x3C) >> 8 & 0xFF, 0, "no interrupt pin");
    }

    #[test]
    fn ids_and_reserved_fields_are_read_only() {
        let mut cs = ConfigSpace::new(ids());
        cs.write(0, &[0xFF; 4]);
        cs.write(8, &[0xFF; 4]);
        cs.write(0x2C, &[0; 4]);
        assert_eq!(cs.read_u32(0), 0x1042_1AF4);
        assert_eq!(cs.read_u32(8), 0x0180_0001);
        assert_eq!(cs.read_u32(0x2C), 0x0040_1AF4);
        cs.write(4, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(cs.command(), 0x0406);
        cs.write(0x3C, &[11, 7]);
        assert_eq!(cs.read_u32(0x3C) & 0xFFFF, 11);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_restores() {
        let mut cs = ConfigSpace::new(ids());
        cs.add_bar64(0, 0xC000_8000, 0x8000).unwrap();
        assert_eq!(cs.read_u32(0x10), 0xC000_8004);
        assert_eq!(cs.read_u32(0x14), 0);
        cs.write(0x10, &[0xFF; 4]);
        cs.write(0x14, &[0xFF; 4]);
        assert_eq!(cs.read_u32(0x10), 0xFFFF_8004);
        assert_eq!(cs.read_u32(0x14), 0xFFFF_FFFF);
        cs.write(0x10, &0xC000_8000u32.to_le_bytes());
        cs.write(0x14, &0u32.to_le_bytes());
        assert_eq!(cs.programmed_bar(0), 0xC000_8000);
        assert_eq!(cs.bar(0), Some((0xC000_8000, 0x8000)));
        assert_eq!(cs.bar(1), None);
        // Unused BARs are hard-wired to zero.
        cs.write(0x18, &[0xFF; 4]);
        assert_eq!(cs.read_u32(0x18), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut cs = ConfigSpace::new(ids());
        assert_eq!(
            cs.add_bar64(0, 0xC000_0000, 0x3000),
            Err(ConfigError::BarSize(0x3000))
        );
        assert!(matches!(
            cs.add_bar64(0, 0xC000_1000, 0x8000),
            Err(ConfigError::BarAlignment { .. })
        ));
        assert_eq!(
            cs.add_bar64(5, 0xC000_0000, 0x1000),
            Err(ConfigError::BarIndex(5))
        );
        cs.add_bar64(0, 0xC000_0000, 0x1000).unwrap();
        assert_eq!(
            cs.add_bar64(1, 0xC000_0000, 0x1000),
            Err(ConfigError::BarIndex(1))
        );
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut cs = ConfigSpace::new(ids());
        let a = cs
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[])
            .unwrap();
        let b = cs.add_capability(0x09, &[0xAA; 5], &[0, 0xFF]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4C);
        assert_ne!(cs.read_u32(4) & STATUS_CAP_LIST, 0);
        let mut p = [0u8; 1];
        cs.read(0x34, &mut p);
        assert_eq!(p[0] as usize, a);
        let mut hdr = [0u8; 2];
        cs.read(a, &mut hdr);
        assert_eq!(hdr, [0x11, b as u8]);
        cs.read(b, &mut hdr);
        assert_eq!(hdr, [0x09, 0]);
        cs.write(b + 2, &[0x55, 0x55]);
        let mut body = [0u8; 2];
        cs.read(b + 2, &mut body);
        assert_eq!(body, [0xAA, 0x55], "only the masked byte is writable");
    }

    #[test]
    fn capability_space_runs_out_cleanly() {
        let mut cs = ConfigSpace::new(ids());
        while cs.add_capability(0x09, &[0; 14], &[]).is_ok() {}
        assert!(matches!(
            cs.add_capability(0x09, &[0; 14], &[]),
            Err(ConfigError::NoRoom(16))
        ));
    }

    #[test]
    fn state_fits_only_a_space_of_the_same_layout() {
        let mut cs = ConfigSpace::new(ids());
        cs.add_bar64(0, 0xC000_0000, 0x1000).unwrap();
        cs.write(4, &0x0006u32.to_le_bytes());
        cs.write(0x10, &[0xFF; 4]);
        let state = cs.save_state();
        let mut fresh = ConfigSpace::new(ids());
        fresh.add_bar64(0, 0xC000_0000, 0x1000).unwrap();
        fresh.restore_state(&state).unwrap();
        assert_eq!(fresh.command(), 6);
        assert_eq!(
            fresh.read_u32(0x10),
            0xFFFF_F004,
            "a BAR mid-sizing stays so"
        );
        let mut other = ConfigSpace::new(PciIds {
            device: 0x1041,
            ..ids()
        });
        other.add_bar64(0, 0xC000_0000, 0x1000).unwrap();
        assert!(matches!(
            other.restore_state(&state),
            Err(ConfigError::StateMismatch { offset: 0, .. })
        ));
        assert_eq!(other.read_u32(0), 0x1041_1AF4, "unchanged after a refusal");
        let short = ConfigSpaceState { regs: vec![0; 3] };
        assert_eq!(
            other.restore_state(&short),
            Err(ConfigError::StateLength(3))
        );
    }

    #[test]
    fn accesses_past_the_end_are_harmless() {
        let mut cs = ConfigSpace::new(ids());
        cs.write(254, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        cs.read(254, &mut b);
        assert_eq!(b, [0, 0, 0xFF, 0xFF]);
        cs.read(4096, &mut b);
        assert_eq!(b, [0xFF; 4]);
    }
}
