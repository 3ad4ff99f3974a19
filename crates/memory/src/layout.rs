//! The guest-physical address map of an x86-64 vmon guest.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_FC00   RAM (real-mode area: GDT, zero page, boot page tables, cmdline)
//! 0x0009_FC00 .. 0x000A_0000   reserved: EBDA, holds the MP table
//! 0x000A_0000 .. 0x000E_0000   legacy VGA/option-ROM hole (not RAM)
//! 0x000E_0000 .. 0x0010_0000   reserved: BIOS area, holds the ACPI tables and MP table
//! 0x0010_0000 .. low_end       RAM (kernel at 1 MiB, initrd at the top)
//! 0xC000_0000 .. 0x1_0000_0000 32-bit MMIO hole: IOAPIC, LAPIC, later PCI BARs
//! 0x1_0000_0000 .. high_end    RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

use crate::size::MemSize;

pub const PAGE_SIZE: u64 = 4096;
/// Smallest guest we run: below this a stock kernel and initramfs do not fit.
pub const MIN_MEMORY: MemSize = MemSize::from_mib(32);

pub const EBDA_START: u64 = 0x9_FC00;
pub const VGA_HOLE_START: u64 = 0xA_0000;
pub const BIOS_START: u64 = 0xE_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDRESS: u64 = 0xFEC0_0000;
pub const LAPIC_ADDRESS: u64 = 0xFEE0_0000;
/// KVM needs three pages for the TSS of real-mode emulation on Intel; placed at the top of
/// the MMIO hole where no device lives (the same spot QEMU and Firecracker use).
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{0} is too small: a guest needs at least {MIN_MEMORY}")]
    TooSmall(MemSize),
    #[error("{0} is not a whole number of 4 KiB pages")]
    NotPageAligned(MemSize),
    #[error(
        "{size} is more than this host can map: guest-physical addresses end at {phys_bits} bits"
    )]
    BeyondPhysicalLimit { size: MemSize, phys_bits: u8 },
}

/// Where a guest of a given size has its RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    total: MemSize,
    low_end: u64,
    high_size: u64,
}

impl MemoryLayout {
    pub fn new(total: MemSize) -> Result<Self, LayoutError> {
        if total < MIN_MEMORY {
            return Err(LayoutError::TooSmall(total));
        }
        if !total.bytes().is_multiple_of(PAGE_SIZE) {
            return Err(LayoutError::NotPageAligned(total));
        }
        let low_end = total.bytes().min(MMIO_HOLE_START);
        Ok(Self {
            total,
            low_end,
            high_size: total.bytes() - low_end,
        })
    }

    /// Refuses layouts whose RAM the guest could not address with `phys_bits` bits.
    pub fn check_physical_limit(&self, phys_bits: u8) -> Result<(), LayoutError> {
        let limit = 1u128 << phys_bits;
        if u128::from(self.end()) > limit {
            return Err(LayoutError::BeyondPhysicalLimit {
                size: self.total,
                phys_bits,
            });
        }
        Ok(())
    }

    pub fn total(&self) -> MemSize {
        self.total
    }

    /// End of RAM below the MMIO hole (exclusive).
    pub fn low_end(&self) -> u64 {
        self.low_end
    }

    /// End of all guest RAM (exclusive), above the hole when there is high memory.
    pub fn end(&self) -> u64 {
        if self.high_size == 0 {
            self.low_end
        } else {
            MMIO_HOLE_END + self.high_size
        }
    }

    /// Host-backed ranges as (guest address, length).
    pub fn ram_ranges(&self) -> impl Iterator<Item = (u64, u64)> {
        let high = (self.high_size > 0).then_some((MMIO_HOLE_END, self.high_size));
        std::iter::once((0, self.low_end)).chain(high)
    }

    /// The e820 map handed to the guest: RAM minus the legacy holes.
    pub fn e820(&self) -> Vec<E820Entry> {
        let entry = |addr, end: u64, kind| E820Entry {
            addr,
            size: end - addr,
            kind,
        };
        let mut map = vec![
            entry(0, EBDA_START, E820Kind::Ram),
            entry(EBDA_START, VGA_HOLE_START, E820Kind::Reserved),
            entry(BIOS_START, HIGH_MEMORY_START, E820Kind::Reserved),
            entry(HIGH_MEMORY_START, self.low_end, E820Kind::Ram),
        ];
        if self.high_size > 0 {
            map.push(entry(MMIO_HOLE_END, self.end(), E820Kind::Ram));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_no_high_memory() {
        let layout = MemoryLayout::new(MemSize::from_mib(256)).unwrap();
        let map = layout.e820();
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x10_0000,
                size: 255 * MIB,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(layout.end(), 256 * MIB);
        // The 384 KiB of legacy holes are not RAM.
        assert_eq!(
            ram_total(&map),
            256 * MIB - (HIGH_MEMORY_START - EBDA_START)
        );
        assert_eq!(
            layout.ram_ranges().collect::<Vec<_>>(),
            vec![(0, 256 * MIB)]
        );
    }

    #[test]
    fn large_guest_splits_around_the_mmio_hole() {
        let layout = MemoryLayout::new(MemSize::from_mib(4608)).unwrap();
        let map = layout.e820();
        assert_eq!(map.len(), 5);
        assert_eq!(map[3].addr + map[3].size, MMIO_HOLE_START);
        assert_eq!(
            map[4],
            E820Entry {
                addr: 1 << 32,
                size: 1536 * MIB,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(
            layout.ram_ranges().collect::<Vec<_>>(),
            vec![(0, 3072 * MIB), (1 << 32, 1536 * MIB)]
        );
        assert_eq!(layout.end(), (1 << 32) + 1536 * MIB);
    }

    #[test]
    fn exactly_three_gib_fills_low_memory() {
        let layout = MemoryLayout::new(MemSize::from_mib(3072)).unwrap();
        assert_eq!(layout.low_end(), MMIO_HOLE_START);
        assert_eq!(layout.e820().len(), 4);
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mib in [32, 100, 3071, 3072, 3073, 65536] {
            let map = MemoryLayout::new(MemSize::from_mib(mib)).unwrap().e820();
            for pair in map.windows(2) {
                assert!(
                    pair[0].addr + pair[0].size <= pair[1].addr,
                    "{mib}: {pair:?}"
                );
            }
            for e in &map {
                let overlaps_hole = e.addr < MMIO_HOLE_END && e.addr + e.size > MMIO_HOLE_START;
                assert!(!(e.kind == E820Kind::Ram && overlaps_hole), "{mib}: {e:?}");
            }
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            MemoryLayout::new(MemSize::from_bytes(1024)),
            Err(LayoutError::TooSmall(MemSize::from_bytes(1024)))
        );
        assert_eq!(
            MemoryLayout::new(MemSize::from_bytes(64 * MIB + 1)),
            Err(LayoutError::NotPageAligned(MemSize::from_bytes(
                64 * MIB + 1
            )))
        );
        let huge = MemoryLayout::new(MemSize::from_bytes(1 << 40)).unwrap();
        assert!(huge.check_physical_limit(40).is_err());
        assert!(huge.check_physical_limit(48).is_ok());
    }
}
