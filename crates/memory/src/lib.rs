//! Guest-physical memory for vmon: how big it is, where RAM and holes sit in the guest's
//! physical address space, and the host mappings that back it.
//!
//! Guest RAM is anonymous, private, `MAP_NORESERVE` host memory (vm-memory's default for
//! anonymous regions): nothing is allocated until the guest touches a page, so a 4 GiB guest
//! that uses 40 MiB costs 40 MiB (rounded up to huge pages where [`ram`] uses them). A
//! restored guest's RAM is instead a private mapping of its snapshot's memory file
//! ([`file`]), just as lazy.

#![deny(unsafe_code)]

// mincore, madvise and lseek(SEEK_DATA) have no safe wrapper; each unsafe block says why it
// is sound.
#[allow(unsafe_code)]
pub mod file;
pub mod host;
pub mod layout;
// madvise, and the address-space reservation that aligns guest RAM, have no safe wrapper.
#[allow(unsafe_code)]
pub mod ram;
pub mod size;

pub use file::{
    restore_guest_memory, save_guest_memory, save_guest_memory_unless, MemoryFileError,
    MemorySaveStats,
};
pub use host::HostMemory;
pub use layout::{E820Entry, E820Kind, MemoryLayout};
pub use ram::Backing;
pub use size::{MemSize, SizeError};

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest memory type used across vmon.
pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("mmap of {size} failed: {source}")]
    Map {
        size: MemSize,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps host memory for every RAM range of `layout`.
pub fn create_guest_memory(
    layout: &MemoryLayout,
    backing: Backing,
) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_ranges()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    ram::map_anonymous(&ranges, backing).map_err(|source| MemoryError::Map {
        size: layout.total(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn guest_memory_spans_the_hole() {
        let layout = MemoryLayout::new(MemSize::from_mib(4608)).unwrap();
        let mem = create_guest_memory(&layout, Backing::TransparentHuge).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(0xBFFF_FFFF)));
        assert!(!mem.address_in_range(GuestAddress(0xC000_0000)));
        assert!(mem.address_in_range(GuestAddress(0x1_0000_0000)));
        assert!(mem.address_in_range(GuestAddress(0x1_5FFF_FFFF)));
        assert!(!mem.address_in_range(GuestAddress(0x1_6000_0000)));
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1_0000_0000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1_0000_0000)).unwrap(),
            0xdead_beef
        );
    }
}
