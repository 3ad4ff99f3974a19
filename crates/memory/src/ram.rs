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
//! offering the kernel a hole of exactly its size there ([`Hole`]).
//!
//! The cost is memory: a huge page is allocated whole on the first touch, so a guest that
//! touches scattered pages holds more host memory than with 4 KiB pages, and the kernel's
//! khugepaged may later collapse partly touched ranges into huge pages too; where memory is
//! fragmented, a first touch may also wait for the kernel to compact it (the `defrag`
//! setting). `huge_pages=off` keeps 4 KiB pages for hosts that overcommit memory tightly.

use std::io;
use std::ptr::null_mut;

use vm_memory::mmap::FromRangesError;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::layout::PAGE_SIZE;
use crate::GuestMemory;

/// The x86 huge page: the size of one transparent huge page and of one large nested-page
/// mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// 4 KiB pages: memory is allocated page by page as the guest touches it (advised
    /// `MADV_NOHUGEPAGE`, so a host whose THP mode is `always` keeps to them too).
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
        let memory = GuestMemory::from_ranges(ranges)?;
        for region in memory.iter() {
            // A host whose THP mode is `always` would use huge pages unasked.
            advise(
                region.as_ptr() as usize,
                region.len() as usize,
                Advice::SmallPages,
            );
        }
        return Ok(memory);
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for &(guest_addr, len) in ranges {
        debug_assert!(len % PAGE_SIZE as usize == 0, "{len:#x} is not whole pages");
        let offset = guest_addr.0 as usize % HUGE_PAGE;
        let agrees = |m: &MmapRegion| m.as_ptr() as usize % HUGE_PAGE == offset;
        let mut mapping = map_in_hole(len, offset)?;
        // Another thread may have taken the hole first: try again a few times, keeping what
        // we have if the address space or the commit limit says no.
        for _ in 0..3 {
            if agrees(&mapping) {
                break;
            }
            match map_in_hole(len, offset) {
                Ok(m) => mapping = m,
                Err(_) => break,
            }
        }
        let host = mapping.as_ptr() as usize;
        // The first 2 MiB of guest-physical memory hold the boot structures, firmware
        // tables and the real-mode bits: small, scattered and rarely hot. 4 KiB pages there
        // keep a small guest small (a tiny guest lives entirely below 2 MiB).
        let small = ((HUGE_PAGE as u64).saturating_sub(guest_addr.0) as usize).min(len);
        advise(host, small, Advice::SmallPages);
        if agrees(&mapping) {
            advise(host + small, len - small, Advice::HugePages);
        } else {
            // The kernel places mappings bottom-up, say: huge pages here could not be mapped
            // into the guest whole, so do not pay for them.
            tracing::warn!(
                "guest RAM at {:#x} could not be mapped on a 2 MiB boundary: 4 KiB pages",
                guest_addr.0
            );
            advise(host + small, len - small, Advice::SmallPages);
        }
        regions.push(
            GuestRegionMmap::new(mapping, guest_addr).ok_or(FromRangesError::InvalidGuestRegion)?,
        );
    }
    GuestMemory::from_regions(regions).map_err(FromRangesError::from)
}

/// Maps `len` bytes of anonymous memory, placed (unless another thread interferes) at
/// `offset` past a 2 MiB boundary.
fn map_in_hole(len: usize, offset: usize) -> Result<MmapRegion, FromRangesError> {
    let _hole = Hole::reserve(len, offset);
    Ok(MmapRegion::new(len)?)
}

#[derive(Clone, Copy, Debug)]
enum Advice {
    HugePages,
    SmallPages,
}

fn advise(addr: usize, len: usize, advice: Advice) {
    if len == 0 {
        return;
    }
    let flag = match advice {
        Advice::HugePages => libc::MADV_HUGEPAGE,
        Advice::SmallPages => libc::MADV_NOHUGEPAGE,
    };
    // SAFETY: [addr, addr + len) is part of a private anonymous mapping this process just
    // made; the advice only changes how later faults in it are served, never its contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, flag) };
    if r != 0 {
        // EINVAL where the kernel has no THP: 4 KiB pages whatever the advice.
        tracing::debug!(
            "madvise({advice:?}) on guest RAM: {}",
            io::Error::last_os_error()
        );
    }
}

/// A hole of a given size at a given offset past a 2 MiB boundary, fenced by reserved
/// (inaccessible, unbacked) address space on both sides, so that the next mapping of exactly
/// that size lands in it: the kernel's top-down search takes the highest gap that fits, and
/// this one is made from the highest gap that fitted a little more. The fences are unmapped
/// on drop.
struct Hole {
    fences: [(usize, usize); 2],
}

impl Hole {
    /// None if even the reservation fails (the mapping that follows will then fail too, or
    /// land anywhere).
    fn reserve(len: usize, offset: usize) -> Option<Hole> {
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
        // In [start, start + 2 MiB), so the hole and its length fit in the reservation.
        let hole = start + (offset + HUGE_PAGE - start % HUGE_PAGE) % HUGE_PAGE;
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
        Some(Hole { fences })
    }
}

impl Drop for Hole {
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
    use vm_memory::Bytes;

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
        // Linux 6.7 and later align mappings of whole 2 MiB multiples themselves; the last
        // range, off a boundary and of an odd length, is placed by the hole alone.
        let ranges = [
            (GuestAddress(0), 64 << 20),
            (GuestAddress(0x1_0000_0000), 6 << 20),
            (GuestAddress(0x2_0010_0000), (4 << 20) + 4096),
        ];
        for _ in 0..8 {
            let mem = map_anonymous(&ranges, Backing::TransparentHuge).unwrap();
            for (addr, (guest, _)) in host_addrs(&mem).into_iter().zip(ranges) {
                assert_eq!(
                    addr % HUGE_PAGE,
                    guest.0 as usize % HUGE_PAGE,
                    "guest {guest:?} at host {addr:#x}"
                );
            }
            mem.write_obj(0x1234u32, GuestAddress(0x1_0000_0000 + (6 << 20) - 4))
                .unwrap();
            assert_eq!(mem.num_regions(), 3);
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
        if thp.is_empty() || thp.contains("[never]") {
            // madvise refuses both advices; every page is 4 KiB anyway.
            eprintln!("skipped: this host has transparent huge pages off");
            return;
        }
        let huge = map_anonymous(&[(GuestAddress(0), 8 << 20)], Backing::TransparentHuge).unwrap();
        let start = host_addrs(&huge)[0];
        // Unadvised (and logged) when the mapping could not be aligned: say so first.
        assert_eq!(start % HUGE_PAGE, 0, "mapped at {start:#x}");
        let flags = vma_flags(start + HUGE_PAGE);
        assert!(flags.contains(" hg"), "above 2 MiB: {flags}");
        let flags = vma_flags(start);
        assert!(flags.contains(" nh"), "below 2 MiB: {flags}");
        let small = map_anonymous(&[(GuestAddress(0), 8 << 20)], Backing::SmallPages).unwrap();
        for at in [0, 4 << 20] {
            let flags = vma_flags(host_addrs(&small)[0] + at);
            assert!(flags.contains(" nh") && !flags.contains(" hg"), "{flags}");
        }
    }
}
