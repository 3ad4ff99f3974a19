//! Anonymous guest RAM, optionally backed by transparent huge pages.
//!
//! Every page the guest touches for the first time costs a nested page fault: KVM maps one
//! host page into the guest's nested page table. With 4 KiB pages that is a fault per 4 KiB,
//! for the whole life of a guest whose kernel keeps handing out fresh pages (socket buffers,
//! page cache); with a 2 MiB huge page it is one fault per 2 MiB, and the guest's TLB misses
//! walk one level less. In the lab, whose nested exits are emulated, vmon's guest sending
//! TCP took 9,000 of these faults per 512 MiB against QEMU's 13 (QEMU backs RAM with huge
//! pages); see docs/benchmarks.md.
//!
//! KVM maps a huge page into the guest only when the host backs that range with one and the
//! guest-physical and host addresses agree modulo 2 MiB. Guest RAM starts at 2 MiB-aligned
//! guest addresses, so the host mapping must start on a 2 MiB boundary too, which `mmap`
//! does not promise (Linux aligns large anonymous mappings only from 6.7 on). The mapping is
//! still made by vm-memory, which owns and unmaps it; it is steered onto a boundary by
//! offering the kernel a hole of exactly its size there ([`AlignedHole`]).
//!
//! The cost is memory: a huge page is allocated whole on the first touch, so a guest that
//! touches scattered pages holds more host memory than with 4 KiB pages. `huge_pages=off`
//! keeps 4 KiB pages for hosts that overcommit memory tightly.

use std::io;
use std::ptr::null_mut;

use vm_memory::mmap::FromRangesError;
use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::GuestMemory;

/// The x86 huge page: the size of one transparent huge page and of one large nested-page
/// mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// 4 KiB pages: memory is allocated page by page as the guest touches it.
    SmallPages,
    /// Transparent huge pages where the host allows them (`madvise` or `always` in
    /// /sys/kernel/mm/transparent_hugepage/enabled); 4 KiB pages elsewhere.
    #[default]
    TransparentHuge,
}

/// Maps anonymous RAM for each `(guest address, length)` range.
pub fn map_anonymous(
    ranges: &[(GuestAddress, usize)],
    backing: Backing,
) -> Result<GuestMemory, FromRangesError> {
    if backing == Backing::SmallPages {
        return GuestMemory::from_ranges(ranges);
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for &(guest_addr, len) in ranges {
        let agrees =
            |m: &MmapRegion| m.as_ptr() as usize % HUGE_PAGE == guest_addr.0 as usize % HUGE_PAGE;
        let mut mapping = map_in_aligned_hole(len)?;
        if !agrees(&mapping) {
            // Another thread took the hole first: once more.
            mapping = map_in_aligned_hole(len)?;
        }
        let host = mapping.as_ptr() as usize;
        if agrees(&mapping) {
            // The first 2 MiB of guest-physical memory hold the boot structures, firmware
            // tables and the real-mode bits: small, scattered and rarely hot. 4 KiB pages
            // there keep a small guest small (a tiny guest lives entirely below 2 MiB).
            let skip = (HUGE_PAGE as u64).saturating_sub(guest_addr.0) as usize;
            if len > skip {
                advise_huge_pages(host + skip, len - skip);
            }
        } else {
            // The kernel places mappings bottom-up, say: huge pages here could not be mapped
            // into the guest whole, so do not pay for them.
            tracing::debug!(
                "guest RAM at {:#x} mapped at {host:#x}: 4 KiB pages",
                guest_addr.0
            );
        }
        regions.push(
            GuestRegionMmap::new(mapping, guest_addr).ok_or(FromRangesError::InvalidGuestRegion)?,
        );
    }
    GuestMemory::from_regions(regions).map_err(FromRangesError::from)
}

fn map_in_aligned_hole(len: usize) -> Result<MmapRegion, FromRangesError> {
    let _hole = AlignedHole::reserve(len);
    Ok(MmapRegion::new(len)?)
}

fn advise_huge_pages(addr: usize, len: usize) {
    // SAFETY: [addr, addr + len) is a private anonymous mapping this process just made;
    // MADV_HUGEPAGE only changes how later faults in it are served, never its contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        // EINVAL where the kernel has no THP: 4 KiB pages, as without the advice.
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            io::Error::last_os_error()
        );
    }
}

/// A hole of a given size at a 2 MiB boundary, fenced by reserved (inaccessible, unbacked)
/// address space on both sides, so that the next mapping of exactly that size lands in it:
/// the kernel's top-down search takes the highest gap that fits, and this one is made from
/// the highest gap that fitted a little more. The fences are unmapped on drop.
struct AlignedHole {
    fences: [(usize, usize); 2],
}

impl AlignedHole {
    /// None if even the reservation fails (the mapping that follows will then fail too, or
    /// land anywhere).
    fn reserve(len: usize) -> Option<AlignedHole> {
        let total = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a new inaccessible mapping at an address the kernel chooses; it overlaps
        // nothing that exists.
        let base = unsafe {
            libc::mmap(
                null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let start = base as usize;
        let hole = start.next_multiple_of(HUGE_PAGE);
        let fences = [
            (start, hole - start),
            (hole + len, start + total - hole - len),
        ];
        // SAFETY: [hole, hole + len) lies inside the reservation just made, which nothing
        // else refers to.
        if unsafe { libc::munmap(hole as *mut libc::c_void, len) } != 0 {
            // SAFETY: the whole reservation, which nothing else refers to.
            unsafe { libc::munmap(base, total) };
            return None;
        }
        Some(AlignedHole { fences })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (addr, len) in self.fences {
            if len > 0 {
                // SAFETY: a fence is what is left of this hole's own reservation; nothing else
                // maps into it while it is reserved.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _, GuestMemoryRegion as _};

    fn host_addrs(mem: &GuestMemory) -> Vec<usize> {
        mem.iter()
            .map(|r| {
                r.get_host_address(vm_memory::MemoryRegionAddress(0))
                    .unwrap() as usize
            })
            .collect()
    }

    #[test]
    fn huge_page_backed_ram_starts_on_a_huge_page_boundary() {
        let ranges = [
            (GuestAddress(0), 64 << 20),
            (GuestAddress(0x1_0000_0000), 6 << 20),
        ];
        for _ in 0..8 {
            let mem = map_anonymous(&ranges, Backing::TransparentHuge).unwrap();
            for addr in host_addrs(&mem) {
                assert_eq!(addr % HUGE_PAGE, 0, "host address {addr:#x}");
            }
            mem.write_obj(0x1234u32, GuestAddress(0x1_0000_0000 + (6 << 20) - 4))
                .unwrap();
            assert_eq!(mem.num_regions(), 2);
        }
    }

    /// The VmFlags line of the mapping that holds `addr`.
    fn vma_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            if (start..end).contains(&addr) {
                return lines
                    .find(|l| l.starts_with("VmFlags:"))
                    .expect("its flags are listed")
                    .to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn the_advice_reaches_the_mapping() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let huge = map_anonymous(&[(GuestAddress(0), 8 << 20)], Backing::TransparentHuge).unwrap();
        let start = host_addrs(&huge)[0];
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("this host has THP off; the advice is refused and ignored");
        } else {
            let flags = vma_flags(start + HUGE_PAGE);
            assert!(flags.contains(" hg"), "above 2 MiB: {flags}");
        }
        let flags = vma_flags(start);
        assert!(!flags.contains(" hg"), "below 2 MiB: {flags}");
        let small = map_anonymous(&[(GuestAddress(0), 8 << 20)], Backing::SmallPages).unwrap();
        let flags = vma_flags(host_addrs(&small)[0]);
        assert!(!flags.contains(" hg"), "{flags}");
    }
}
