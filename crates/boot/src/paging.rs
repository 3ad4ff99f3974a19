//! Identity page tables for the 64-bit entry: the first 1 GiB mapped with 2 MiB pages.
//!
//! That covers everything the boot protocol asks a 64-bit entry to find mapped: the kernel
//! image at 1 MiB, the zero page, command line and stack. Linux replaces these tables in its
//! first instructions.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{PDPT_START, PD_START, PML4_START};

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE_PAGE: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;

/// Writes the tables and returns the value for CR3.
pub fn write_identity_tables(mem: &impl GuestMemory) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PD_START | PRESENT_WRITABLE, GuestAddress(PDPT_START))?;
    for i in 0..512u64 {
        let entry = (i * TWO_MIB) | PRESENT_WRITABLE | HUGE_PAGE;
        mem.write_obj(entry, GuestAddress(PD_START + i * 8))?;
    }
    Ok(PML4_START)
}

/// Translates an address through the boot tables, as the guest MMU would.
/// Used by tests and by fault diagnosis when KVM cannot translate for us.
pub fn translate(mem: &impl GuestMemory, cr3: u64, virt: u64) -> Option<u64> {
    let mask = 0x000F_FFFF_FFFF_F000u64;
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    let pml4e = read((cr3 & mask) + ((virt >> 39) & 0x1FF) * 8)?;
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = read((pml4e & mask) + ((virt >> 30) & 0x1FF) * 8)?;
    if pdpte & 1 == 0 {
        return None;
    }
    if pdpte & HUGE_PAGE != 0 {
        return Some((pdpte & 0x000F_FFFF_C000_0000) | (virt & 0x3FFF_FFFF));
    }
    let pde = read((pdpte & mask) + ((virt >> 21) & 0x1FF) * 8)?;
    if pde & 1 == 0 {
        return None;
    }
    if pde & HUGE_PAGE != 0 {
        return Some((pde & 0x000F_FFFF_FFE0_0000) | (virt & 0x1F_FFFF));
    }
    let pte = read((pde & mask) + ((virt >> 12) & 0x1FF) * 8)?;
    (pte & 1 != 0).then_some((pte & mask) | (virt & 0xFFF))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn identity_maps_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for addr in [0, 0x1000, 0x10_0000, 0x123_4567, 0x3FFF_FFFF] {
            assert_eq!(translate(&mem, cr3, addr), Some(addr));
        }
        assert_eq!(translate(&mem, cr3, 0x4000_0000), None);
    }
}
