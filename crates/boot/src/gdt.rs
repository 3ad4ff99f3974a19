//! The boot GDT and the segment registers derived from it.
//!
//! Loading a segment register from the GDT is something the CPU does; we set the hidden
//! parts (base, limit, attributes) directly through KVM, so they must agree with the table
//! the guest can read back. [`Segment::from_descriptor`] derives one from the other.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::GDT_START;

/// A segment register's visible selector and hidden descriptor cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
}

/// Access/flags words (the descriptor's bits 40..56, as the manuals print them).
pub const CODE64: u16 = 0xA09B; // present, ring 0, code exec/read accessed, L=1, G=1
pub const CODE32: u16 = 0xC09B; // present, ring 0, code exec/read accessed, D=1, G=1
pub const DATA: u16 = 0xC093; // present, ring 0, data read/write accessed, D/B=1, G=1
pub const TSS: u16 = 0x808B; // present, 64-bit busy TSS, G=1

/// Encodes a GDT descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xFF00_0000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
}

impl Segment {
    /// The hidden state the CPU would load for `descriptor` at GDT index `index`.
    pub fn from_descriptor(index: u16, descriptor: u64) -> Self {
        let bits = |shift: u32, width: u32| ((descriptor >> shift) & ((1 << width) - 1)) as u8;
        let raw_limit = ((descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000)) as u32;
        let g = bits(55, 1);
        Segment {
            base: ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 32) & 0xFF00_0000),
            // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
            limit: if g == 1 {
                (raw_limit << 12) | 0xFFF
            } else {
                raw_limit
            },
            selector: index * 8,
            type_: bits(40, 4),
            s: bits(44, 1),
            dpl: bits(45, 2),
            present: bits(47, 1),
            avl: bits(52, 1),
            l: bits(53, 1),
            db: bits(54, 1),
            g,
        }
    }
}

/// The boot GDT: null, code, data, TSS.
pub struct BootGdt {
    pub entries: [u64; 4],
}

impl BootGdt {
    pub const CODE_INDEX: u16 = 1;
    pub const DATA_INDEX: u16 = 2;
    pub const TSS_INDEX: u16 = 3;

    pub fn long_mode() -> Self {
        Self::with_code(CODE64)
    }

    pub fn protected_mode() -> Self {
        Self::with_code(CODE32)
    }

    fn with_code(code: u16) -> Self {
        BootGdt {
            entries: [
                0,
                descriptor(code, 0, 0xF_FFFF),
                descriptor(DATA, 0, 0xF_FFFF),
                descriptor(TSS, 0, 0xF_FFFF),
            ],
        }
    }

    pub fn limit(&self) -> u16 {
        (self.entries.len() * 8 - 1) as u16
    }

    pub fn segment(&self, index: u16) -> Segment {
        Segment::from_descriptor(index, self.entries[usize::from(index)])
    }

    pub fn write(&self, mem: &impl GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
        for (i, entry) in self.entries.iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_manuals() {
        assert_eq!(descriptor(CODE64, 0, 0xF_FFFF), 0x00AF_9B00_0000_FFFF);
        assert_eq!(descriptor(DATA, 0, 0xF_FFFF), 0x00CF_9300_0000_FFFF);
        assert_eq!(descriptor(TSS, 0, 0xF_FFFF), 0x008F_8B00_0000_FFFF);
        assert_eq!(
            descriptor(DATA, 0x1234_5678, 0xA_BCDE),
            0x12CA_9334_5678_BCDE
        );
    }

    #[test]
    fn decodes_code64() {
        let s = BootGdt::long_mode().segment(BootGdt::CODE_INDEX);
        assert_eq!(
            s,
            Segment {
                base: 0,
                limit: 0xFFFF_FFFF,
                selector: 0x08,
                type_: 0xB,
                present: 1,
                dpl: 0,
                db: 0,
                s: 1,
                l: 1,
                g: 1,
                avl: 0,
            }
        );
    }

    #[test]
    fn decodes_data_and_tss() {
        let gdt = BootGdt::protected_mode();
        let data = gdt.segment(BootGdt::DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.s, data.l),
            (0x10, 3, 1, 1, 0)
        );
        let code = gdt.segment(BootGdt::CODE_INDEX);
        assert_eq!((code.db, code.l), (1, 0));
        let tss = gdt.segment(BootGdt::TSS_INDEX);
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.present),
            (0x18, 0xB, 0, 1)
        );
        assert_eq!(gdt.limit(), 31);
    }

    #[test]
    fn base_round_trips() {
        let s = Segment::from_descriptor(5, descriptor(DATA, 0xDEAD_BEEF, 0x1_2345));
        assert_eq!(s.base, 0xDEAD_BEEF);
        assert_eq!(s.limit, 0x1234_5FFF);
        assert_eq!(s.selector, 40);
    }
}
