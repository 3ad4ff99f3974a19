//! Guest RAM to a file and back, for snapshot, restore and clone.
//!
//! The file is guest RAM and nothing else: the regions back to back in guest-physical order,
//! so the byte of region `i` at offset `o` is at file offset `o` plus the lengths of the
//! regions before it (for a 4 GiB guest: 0..3 GiB of low RAM, then the 1 GiB above the MMIO
//! hole at file offset 3 GiB). There is no header because the file is mapped as it is: a
//! header would have to be a whole page to keep the regions page-aligned, and everything it
//! could say (size, version, checksum) belongs in the state file that comes with it.
//!
//! Saving writes only what the guest has touched. Untouched guest pages are not resident in
//! the anonymous mapping, so `mincore` tells them apart without reading them, and pages that
//! are all zero need not be written either: both stay holes in a sparse file and read back
//! as zeros. Saving therefore costs time in proportion to touched memory, plus a residency
//! scan of one byte per 4 KiB page (about 1 ms for 4 GiB).
//!
//! Restoring maps the file `MAP_PRIVATE` and reads nothing: pages come in from the page cache
//! when the guest touches them, are shared by every VM mapping the same file, and are copied
//! only when one of them writes. Restore time is two `mmap` calls whatever the size.
//!
//! A memory file is never changed once written, because restored VMs map it: saving always
//! writes a new file and renames it over the old name, so a VM (or several clones) still
//! mapping the old file keeps its own memory. Truncating or rewriting a memory file in place
//! while a VM maps it would change or remove pages under the guest (`SIGBUS` past the end).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::mmap::FromRangesError;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use crate::layout::{MemoryLayout, PAGE_SIZE};
use crate::GuestMemory;
use vmon_state::file::{parent_dir, TempPath};

const PAGE: usize = PAGE_SIZE as usize;
/// Pages whose residency is looked up at once: 1 GiB of guest memory, 256 KiB of flags, so
/// the flags of a huge guest never need a huge buffer.
const WINDOW_PAGES: usize = 1 << 18;
/// Guest memory copied out at a time to drop zero pages before writing the rest.
const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("memory file {} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    #[error("memory file {} is {file_size} bytes; this VM has {ram_size} bytes of RAM", path.display())]
    SizeMismatch {
        path: PathBuf,
        file_size: u64,
        ram_size: u64,
    },
    #[error("cannot open memory file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot map memory file {}: {source}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: FromRangesError,
    },
    #[error("cannot save guest memory to {}: {step}: {source}", path.display())]
    Save {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("saving guest memory to {} was cancelled", path.display())]
    Cancelled { path: PathBuf },
}

/// What a save did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySaveStats {
    /// Guest RAM the file covers: its size, holes included.
    pub file_size: u64,
    /// Bytes actually written: the touched pages that were not all zero.
    pub bytes_written: u64,
    /// Pages read because they might hold data: resident (or swapped out) in this process,
    /// or data in the file the memory was restored from.
    pub pages_resident: u64,
    /// Wall time of the whole save, `fsync` and `rename` included.
    pub elapsed: Duration,
    /// Part of `elapsed` spent waiting for the disk (`fsync` of the file and the directory).
    pub sync: Duration,
}

/// Writes guest RAM to a new sparse file at `path`, replacing any file there atomically.
///
/// The caller pauses the guest and every device that writes guest memory first: pages that
/// change during the save are saved in some state between the old and the new. The file is
/// readable by its owner only, since guest memory holds the guest's secrets.
pub fn save_guest_memory(
    mem: &GuestMemory,
    path: &Path,
) -> Result<MemorySaveStats, MemoryFileError> {
    save_guest_memory_unless(mem, path, &AtomicBool::new(false))
}

/// [`save_guest_memory`] that gives up, with [`MemoryFileError::Cancelled`] and its
/// temporary file removed, once `cancel` is set: checked between chunks of 1 MiB, so a
/// VMM that must exit does not first write gigabytes nobody will read.
pub fn save_guest_memory_unless(
    mem: &GuestMemory,
    path: &Path,
    cancel: &AtomicBool,
) -> Result<MemorySaveStats, MemoryFileError> {
    let start = Instant::now();
    let fail = |step: &'static str| {
        move |source: io::Error| MemoryFileError::Save {
            path: path.to_owned(),
            step,
            source,
        }
    };
    let file_size: u64 = mem.iter().map(|r| r.len()).sum();
    let temp = TempPath::new(path).map_err(fail("create a temporary file"))?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp.path())
        .map_err(fail("create a temporary file"))?;
    // One hole the size of guest RAM; only pages with data are written into it.
    file.set_len(file_size)
        .map_err(fail("size the file (ftruncate)"))?;

    let mut saver = Saver {
        file: &file,
        buf: vec![0u8; COPY_CHUNK],
        bytes_written: 0,
        pages_resident: 0,
        cancel,
    };
    let mut base = 0u64;
    for region in mem.iter() {
        saver.save_region(region, base).map_err(|(step, e)| {
            if step == CANCELLED {
                MemoryFileError::Cancelled {
                    path: path.to_owned(),
                }
            } else {
                fail(step)(e)
            }
        })?;
        base += region.len();
    }
    let (bytes_written, pages_resident) = (saver.bytes_written, saver.pages_resident);

    let sync_start = Instant::now();
    file.sync_all().map_err(fail("fsync"))?;
    let mut sync = sync_start.elapsed();
    drop(file);
    std::fs::rename(temp.path(), path).map_err(fail("rename into place"))?;
    temp.keep();
    // The rename is durable only once the directory is on disk too.
    let sync_start = Instant::now();
    File::open(parent_dir(path))
        .and_then(|dir| dir.sync_all())
        .map_err(fail("fsync the directory"))?;
    sync += sync_start.elapsed();
    Ok(MemorySaveStats {
        file_size,
        bytes_written,
        pages_resident,
        elapsed: start.elapsed(),
        sync,
    })
}

/// Maps the memory file at `path` as the guest RAM of `layout`, copy-on-write: the guest
/// reads the file's pages (shared with every other VM mapping it) and its writes go to
/// private copies; the file is never changed. Nothing is read here, so the time taken does
/// not depend on the size of guest memory.
pub fn restore_guest_memory(
    layout: &MemoryLayout,
    path: &Path,
) -> Result<GuestMemory, MemoryFileError> {
    // Read-only: a private mapping needs no write access to the file, and without it no bug
    // here can change a snapshot that clones share. O_NONBLOCK keeps a FIFO from blocking
    // the open before the regular-file check refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => MemoryFileError::Missing {
                path: path.to_owned(),
            },
            _ => MemoryFileError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| MemoryFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(MemoryFileError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let ram_size = layout.total().bytes();
    if meta.len() != ram_size {
        return Err(MemoryFileError::SizeMismatch {
            path: path.to_owned(),
            file_size: meta.len(),
            ram_size,
        });
    }

    let map_error = |source: FromRangesError| MemoryFileError::Map {
        path: path.to_owned(),
        source,
    };
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (guest_addr, len) in layout.ram_ranges() {
        let size =
            usize::try_from(len).map_err(|_| map_error(FromRangesError::InvalidGuestRegion))?;
        // The same flags as anonymous guest RAM (create_guest_memory) except that pages come
        // from the file: MAP_PRIVATE for copy-on-write, MAP_NORESERVE so a large guest is not
        // charged its full size against the host's commit limit up front.
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(Arc::clone(&file), offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_error(e.into()))?;
        advise_random(&mapping);
        let region = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
            .ok_or_else(|| map_error(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
        offset += len;
    }
    GuestMemory::from_regions(regions).map_err(|e| map_error(e.into()))
}

/// Turns off read-ahead for a restored mapping: a page fault then reads the one page the guest
/// touched instead of the block device's whole read-ahead window (8 MiB on the machine this
/// was measured on; the host decides). Guests touch memory scattered, and the first touch of
/// a page that is a hole in the file (memory the guest had never used) would otherwise
/// zero-fill the whole window. Measured there (`cargo bench -p vmon-memory --bench
/// memory_file`, and pages 4 MiB apart by hand): first writes to never-used pages 5–12 µs
/// each instead of 0.1–5 ms; reading 1% of a 4 GiB snapshot with a cold page cache 70 µs per
/// page instead of 430–770. The cost: a guest that reads most of its memory in order from a
/// cold page cache pays about 70 µs per page instead of 2–8. With the file in the page
/// cache, as for clones of a fresh snapshot, it makes no difference.
fn advise_random(mapping: &MmapRegion) {
    // SAFETY: the range is exactly the mapping `mapping` owns and keeps alive; MADV_RANDOM
    // changes only read-ahead, never contents. Failure leaves default read-ahead, which is
    // slower but correct, so it is ignored.
    unsafe {
        libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_RANDOM);
    }
}

/// Starts reading `region[offset..offset + len]` into the page cache; `offset` is
/// page-aligned.
fn prefetch(region: &GuestRegionMmap<()>, offset: usize, len: usize) {
    debug_assert!(offset.is_multiple_of(PAGE) && offset + len <= region.len() as usize);
    // SAFETY: the range lies inside the live mapping `region` borrows (callers pass
    // page-aligned offsets within its length); MADV_WILLNEED only starts reads into the page
    // cache and never changes contents. Failure only costs speed.
    unsafe {
        libc::madvise(region.as_ptr().add(offset).cast(), len, libc::MADV_WILLNEED);
    }
}

/// Copies the pages of guest memory that hold data into the file.
struct Saver<'a> {
    file: &'a File,
    buf: Vec<u8>,
    bytes_written: u64,
    pages_resident: u64,
    cancel: &'a AtomicBool,
}

/// The "step" a cancelled save stops at.
const CANCELLED: &str = "cancelled";

type StepError = (&'static str, io::Error);

impl Saver<'_> {
    fn save_region(
        &mut self,
        region: &GuestRegionMmap<()>,
        file_base: u64,
    ) -> Result<(), StepError> {
        let len = region.len() as usize;
        let pages = len.div_ceil(PAGE);
        let mut flags = vec![0u8; pages.min(WINDOW_PAGES)];
        for first in (0..pages).step_by(WINDOW_PAGES) {
            let count = (pages - first).min(WINDOW_PAGES);
            let flags = &mut flags[..count];
            let offset = first * PAGE;
            let bytes = (len - offset).min(count * PAGE);
            pages_with_data(region, offset, bytes, flags)?;
            let mut page = 0;
            while page < count {
                if flags[page] == 0 {
                    page += 1;
                    continue;
                }
                let run = flags[page..].iter().take_while(|&&f| f != 0).count();
                self.pages_resident += run as u64;
                let start = offset + page * PAGE;
                let end = (start + run * PAGE).min(len);
                self.copy_run(region, file_base, start, end)?;
                page += run;
            }
        }
        Ok(())
    }

    /// Writes the pages of `region[start..end]` that are not all zero.
    fn copy_run(
        &mut self,
        region: &GuestRegionMmap<()>,
        file_base: u64,
        start: usize,
        end: usize,
    ) -> Result<(), StepError> {
        let file_backed = region.file_offset().is_some();
        let mut at = start;
        while at < end {
            if self.cancel.load(Ordering::Relaxed) {
                return Err((CANCELLED, io::Error::from(io::ErrorKind::Interrupted)));
            }
            let n = (end - at).min(COPY_CHUNK);
            if file_backed {
                // Restored memory is read a page per fault (advise_random); ask for this chunk
                // and the next in large reads instead, or a cold snapshot is read 4 KiB at a
                // time.
                let ahead = (end - at).min(2 * COPY_CHUNK);
                prefetch(region, at, ahead);
            }
            let buf = &mut self.buf[..n];
            let slice = region
                .get_slice(MemoryRegionAddress(at as u64), n)
                .map_err(|e| ("read guest memory", io::Error::other(e)))?;
            slice.copy_to(buf);
            // Runs of non-zero pages, each written with one pwrite.
            let mut i = 0;
            while i < n {
                let page_end = |i: usize| (i + PAGE).min(n);
                if is_zero(&buf[i..page_end(i)]) {
                    i = page_end(i);
                    continue;
                }
                let mut j = page_end(i);
                while j < n && !is_zero(&buf[j..page_end(j)]) {
                    j = page_end(j);
                }
                self.file
                    .write_all_at(&buf[i..j], file_base + (at + i) as u64)
                    .map_err(|e| ("write", e))?;
                self.bytes_written += (j - i) as u64;
                i = j;
            }
            at += n;
        }
        Ok(())
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    // OR-folding fixed blocks compiles to vector instructions; a byte-wise search with an
    // early exit does not, and most resident pages of an idle guest are not zero anyway.
    let mut blocks = bytes.chunks_exact(64);
    blocks
        .by_ref()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Sets `flags[i]` for every page of `region[offset..offset + bytes]` that may hold data and
/// clears it for pages that certainly read as zero. Errs on the side of reading: a page
/// flagged for nothing costs a copy and a zero check, a page missed is lost guest memory.
fn pages_with_data(
    region: &GuestRegionMmap<()>,
    offset: usize,
    bytes: usize,
    flags: &mut [u8],
) -> Result<(), StepError> {
    let addr = region.as_ptr() as usize + offset;
    // Swapped-out pages are not resident, so mincore misses them. The process's swap count
    // is read before and after: a page swapped out or back in around the mincore call shows
    // in one of the two readings.
    let swap_before = swap_in_use();
    mincore(addr, bytes, flags).map_err(|e| ("mincore", e))?;
    let swap_after = swap_in_use();
    for f in flags.iter_mut() {
        // Only bit 0 means resident; the others are reserved.
        *f &= 1;
    }
    match (swap_before, swap_after) {
        (Some(false), Some(false)) => {}
        (Some(_), Some(_)) => {
            if mark_present_or_swapped(addr, flags).is_err() {
                flags.fill(1);
            }
        }
        // Without /proc there is no telling: read everything, zero pages are still skipped.
        _ => flags.fill(1),
    }
    // Restored memory: pages the guest has not touched since live only in the file it was
    // restored from, not in this process.
    if let Some(source) = region.file_offset() {
        if mark_file_data(source.file(), source.start() + offset as u64, flags).is_err() {
            flags.fill(1);
        }
    }
    Ok(())
}

fn mincore(addr: usize, len: usize, flags: &mut [u8]) -> io::Result<()> {
    debug_assert!(flags.len() >= len.div_ceil(PAGE));
    if len == 0 {
        return Ok(());
    }
    // SAFETY: `addr..addr + len` lies inside one live guest memory mapping (the caller takes
    // it from a region it borrows) and `addr` is page-aligned since mappings and offsets are;
    // `flags` has a byte for each of its pages. mincore only reads page tables and writes
    // those bytes.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, flags.as_mut_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this process has any page in swap, from /proc/self/status; `None` if unknown.
fn swap_in_use() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_swap_kib(&status).map(|kib| kib > 0)
}

fn vm_swap_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmSwap:")?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Flags pages of the mapping at `addr` that /proc/self/pagemap reports present or swapped.
fn mark_present_or_swapped(addr: usize, flags: &mut [u8]) -> io::Result<()> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; flags.len() * 8];
    pagemap.read_exact_at(&mut entries, (addr / PAGE * 8) as u64)?;
    for (flag, entry) in flags.iter_mut().zip(entries.chunks_exact(8)) {
        let mut e = [0u8; 8];
        e.copy_from_slice(entry);
        if u64::from_ne_bytes(e) & (PRESENT | SWAPPED) != 0 {
            *flag = 1;
        }
    }
    Ok(())
}

/// Flags the pages whose file range `start..` holds data (not a hole) in `file`.
fn mark_file_data(file: &File, start: u64, flags: &mut [u8]) -> io::Result<()> {
    let end = start + (flags.len() * PAGE) as u64;
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let first = ((data - start) / PAGE_SIZE) as usize;
        let last = ((hole - start).div_ceil(PAGE_SIZE) as usize).min(flags.len());
        flags[first..last].fill(1);
        pos = hole.max(data + 1);
    }
    Ok(())
}

/// `lseek` for SEEK_DATA/SEEK_HOLE: `None` when there is no more data (ENXIO). File systems
/// without hole support report the whole file as data, which only costs reading.
fn seek(file: &File, from: u64, whence: i32) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(io::Error::other)?;
    // SAFETY: lseek on a descriptor this File owns; it moves the file position, which nothing
    // that shares the descriptor relies on (mappings and positioned I/O ignore it).
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
    use crate::size::MemSize;
    use crate::{create_guest_memory, Backing};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    struct TestDir(PathBuf);

    impl TestDir {
        fn new(name: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "vmon-memfile-{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn layout(mib: u64) -> MemoryLayout {
        MemoryLayout::new(MemSize::from_mib(mib)).unwrap()
    }

    /// Where guest address `gpa` lives in the memory file.
    fn file_offset(layout: &MemoryLayout, gpa: u64) -> u64 {
        let mut base = 0;
        for (start, len) in layout.ram_ranges() {
            if (start..start + len).contains(&gpa) {
                return base + gpa - start;
            }
            base += len;
        }
        panic!("{gpa:#x} is not RAM");
    }

    /// Guest addresses to write: page edges, a value straddling two pages, and for guests
    /// over 3 GiB both sides of the MMIO hole.
    fn marks(layout: &MemoryLayout) -> Vec<(u64, u64)> {
        let end = layout.end();
        let mut v = vec![
            (0, 0x1111_1111_1111_1111),
            (0x1000 + 7, 0x2222_2222_2222_2222),
            (0x5000 - 4, 0x3333_3333_3333_3333), // straddles pages 4 and 5
            (MIB, 0x4444_4444_4444_4444),
            (layout.low_end() / 2 + 0x123, 0x5555_5555_5555_5555),
            (layout.low_end() - 8, 0x6666_6666_6666_6666),
        ];
        if end != layout.low_end() {
            v.push((end - 8, 0x7777_7777_7777_7777));
        }
        if end > MMIO_HOLE_END {
            assert_eq!(layout.low_end(), MMIO_HOLE_START);
            v.push((MMIO_HOLE_END, 0x8888_8888_8888_8888));
            v.push((MMIO_HOLE_END + 0x10_0008, 0x9999_9999_9999_9999));
        }
        v
    }

    /// Distinct pages the marks touch.
    fn marked_pages(marks: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
        marks
            .iter()
            .flat_map(|&(a, _)| [a / PAGE_SIZE, (a + 7) / PAGE_SIZE])
            .collect()
    }

    fn pread(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    /// Pages that must read as zero: the neighbours of written pages and a spread of others.
    fn zero_pages(layout: &MemoryLayout, marked: &std::collections::BTreeSet<u64>) -> Vec<u64> {
        let mut v = Vec::new();
        for (start, len) in layout.ram_ranges() {
            let (first, last) = (start / PAGE_SIZE, (start + len) / PAGE_SIZE);
            v.extend((first..last).step_by(1021));
            v.push(last - 1);
        }
        v.extend(
            marked
                .iter()
                .flat_map(|&p| p.checked_sub(1).into_iter().chain([p + 1])),
        );
        v.retain(|p| !marked.contains(p));
        v.into_iter()
            .filter(|&p| {
                layout
                    .ram_ranges()
                    .any(|(s, l)| (s..s + l).contains(&(p * PAGE_SIZE)))
            })
            .collect()
    }

    fn assert_zero_page(mem: &GuestMemory, page: u64) {
        let mut buf = [0u8; PAGE];
        mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))
            .unwrap();
        assert!(is_zero(&buf), "page {page:#x} is not zero");
    }

    fn save_and_restore(mib: u64) {
        let dir = TestDir::new("round-trip");
        let path = dir.path("memory");
        let layout = layout(mib);
        let mem = create_guest_memory(&layout, Backing::default()).unwrap();
        let marks = marks(&layout);
        for &(addr, value) in &marks {
            mem.write_obj(value, GuestAddress(addr)).unwrap();
        }
        // A page the guest touched but left zero: resident, yet written as a hole.
        mem.write_obj(0u64, GuestAddress(2 * MIB)).unwrap();
        let marked = marked_pages(&marks);

        let stats = save_guest_memory(&mem, &path).unwrap();
        println!("{mib} MiB guest: {stats:?}");
        assert_eq!(stats.file_size, layout.total().bytes());
        assert_eq!(stats.bytes_written, marked.len() as u64 * PAGE_SIZE);
        // The marked pages and the zero page at least.
        assert!(stats.pages_resident > marked.len() as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), layout.total().bytes());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Sparse: storage for the written pages (and file-system slack), not for all of RAM.
        assert!(
            meta.blocks() * 512 <= stats.bytes_written + 256 * 1024,
            "{} bytes allocated for {} written",
            meta.blocks() * 512,
            stats.bytes_written
        );
        for &(addr, value) in &marks {
            let bytes = pread(&path, file_offset(&layout, addr), 8);
            assert_eq!(bytes, value.to_le_bytes(), "file at guest {addr:#x}");
        }

        let start = Instant::now();
        let restored = restore_guest_memory(&layout, &path).unwrap();
        println!("{mib} MiB guest: restored in {:?}", start.elapsed());
        assert_eq!(restored.num_regions(), layout.ram_ranges().count());
        for &(addr, value) in &marks {
            assert_eq!(
                restored.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                value,
                "guest {addr:#x}"
            );
        }
        for page in zero_pages(&layout, &marked) {
            assert_zero_page(&restored, page);
        }

        // Copy-on-write: the guest's writes stay in this process.
        let before = std::fs::metadata(&path).unwrap();
        let hole_page = 3 * MIB;
        for &(addr, _) in marks.iter().chain([(hole_page, 0)].iter()) {
            restored
                .write_obj(0xabcd_ef01_2345_6789u64, GuestAddress(addr))
                .unwrap();
        }
        for &(addr, value) in &marks {
            let bytes = pread(&path, file_offset(&layout, addr), 8);
            assert_eq!(bytes, value.to_le_bytes(), "file changed at {addr:#x}");
        }
        assert_eq!(pread(&path, hole_page, 8), [0; 8]);
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (after.blocks(), after.mtime(), after.mtime_nsec()),
            (before.blocks(), before.mtime(), before.mtime_nsec())
        );
    }

    #[test]
    fn save_and_restore_256_mib() {
        save_and_restore(256);
    }

    #[test]
    fn save_and_restore_4_gib_across_the_mmio_hole() {
        save_and_restore(4096);
    }

    #[test]
    fn clones_do_not_see_each_other_s_writes() {
        let dir = TestDir::new("clones");
        let path = dir.path("memory");
        let layout = layout(64);
        let mem = create_guest_memory(&layout, Backing::default()).unwrap();
        mem.write_obj(1u64, GuestAddress(MIB)).unwrap();
        save_guest_memory(&mem, &path).unwrap();
        let a = restore_guest_memory(&layout, &path).unwrap();
        let b = restore_guest_memory(&layout, &path).unwrap();
        a.write_obj(2u64, GuestAddress(MIB)).unwrap();
        b.write_obj(3u64, GuestAddress(2 * MIB)).unwrap();
        assert_eq!(a.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 2);
        assert_eq!(b.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 1);
        assert_eq!(a.read_obj::<u64>(GuestAddress(2 * MIB)).unwrap(), 0);
        assert_eq!(b.read_obj::<u64>(GuestAddress(2 * MIB)).unwrap(), 3);
        let c = restore_guest_memory(&layout, &path).unwrap();
        assert_eq!(c.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 1);
        assert_eq!(c.read_obj::<u64>(GuestAddress(2 * MIB)).unwrap(), 0);
    }

    #[test]
    fn a_cancelled_save_stops_and_leaves_no_file() {
        let dir = TestDir::new("cancelled");
        let path = dir.path("memory");
        let layout = layout(64);
        let mem = create_guest_memory(&layout, Backing::default()).unwrap();
        mem.write_obj(1u64, GuestAddress(MIB)).unwrap();
        let cancel = AtomicBool::new(true);
        let e = save_guest_memory_unless(&mem, &path, &cancel).unwrap_err();
        assert!(matches!(e, MemoryFileError::Cancelled { .. }), "{e}");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn size_mismatch_is_refused_with_both_sizes() {
        let dir = TestDir::new("mismatch");
        let path = dir.path("memory");
        let small = layout(256);
        save_guest_memory(
            &create_guest_memory(&small, Backing::default()).unwrap(),
            &path,
        )
        .unwrap();
        let e = restore_guest_memory(&layout(4096), &path).unwrap_err();
        assert!(matches!(e, MemoryFileError::SizeMismatch { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "memory file {} is 268435456 bytes; this VM has 4294967296 bytes of RAM",
                path.display()
            )
        );
        // One byte short: the file was cut off.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(256 * MIB - 1).unwrap();
        let e = restore_guest_memory(&small, &path).unwrap_err();
        assert!(matches!(e, MemoryFileError::SizeMismatch { .. }), "{e}");
    }

    #[test]
    fn missing_and_odd_files_are_refused() {
        let dir = TestDir::new("missing");
        let path = dir.path("memory");
        let e = restore_guest_memory(&layout(64), &path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("memory file {} does not exist", path.display())
        );
        let e = restore_guest_memory(&layout(64), &dir.0).unwrap_err();
        assert!(matches!(e, MemoryFileError::NotRegularFile { .. }), "{e}");
        let fifo = dir.path("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = restore_guest_memory(&layout(64), &fifo).unwrap_err();
        assert!(matches!(e, MemoryFileError::NotRegularFile { .. }), "{e}");
        // Saving into a directory that does not exist names the file and the step.
        let mem = create_guest_memory(&layout(64), Backing::default()).unwrap();
        let e = save_guest_memory(&mem, &dir.path("nope/memory")).unwrap_err();
        assert!(e.to_string().contains("nope/memory"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    /// A restored guest's untouched pages live only in the file it came from; saving it
    /// again must carry them over even when they are not in this process or the page cache.
    #[test]
    fn resaving_restored_memory_keeps_pages_only_in_the_old_file() {
        let dir = TestDir::new("resave");
        let first = dir.path("first");
        let layout = layout(64);
        let mem = create_guest_memory(&layout, Backing::default()).unwrap();
        mem.write_obj(0x1111u64, GuestAddress(MIB)).unwrap();
        save_guest_memory(&mem, &first).unwrap();
        drop(mem);
        // Push the file's pages out of the page cache so residency alone would miss them.
        let file = File::open(&first).unwrap();
        // SAFETY: posix_fadvise on a descriptor owned by `file`; it only drops clean cached
        // pages.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);

        let restored = restore_guest_memory(&layout, &first).unwrap();
        let region = restored.iter().next().unwrap();
        let mut flags = [0u8; 1];
        mincore(region.as_ptr() as usize + MIB as usize, PAGE, &mut flags).unwrap();
        println!("page resident before the resave: {}", flags[0] & 1);
        restored
            .write_obj(0x2222u64, GuestAddress(2 * MIB))
            .unwrap();

        let second = dir.path("second");
        let stats = save_guest_memory(&restored, &second).unwrap();
        assert_eq!(stats.bytes_written, 2 * PAGE_SIZE);
        let again = restore_guest_memory(&layout, &second).unwrap();
        assert_eq!(again.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0x1111);
        assert_eq!(
            again.read_obj::<u64>(GuestAddress(2 * MIB)).unwrap(),
            0x2222
        );
    }

    /// Saving over the file a running guest was restored from replaces it; the guest keeps
    /// its memory (the old file), and the new file has the guest's current memory.
    #[test]
    fn saving_over_the_mapped_file_leaves_the_running_guest_alone() {
        let dir = TestDir::new("overwrite");
        let path = dir.path("memory");
        let layout = layout(64);
        let mem = create_guest_memory(&layout, Backing::default()).unwrap();
        mem.write_obj(1u64, GuestAddress(MIB)).unwrap();
        mem.write_obj(5u64, GuestAddress(3 * MIB)).unwrap();
        save_guest_memory(&mem, &path).unwrap();
        let running = restore_guest_memory(&layout, &path).unwrap();
        running.write_obj(2u64, GuestAddress(MIB)).unwrap();
        save_guest_memory(&running, &path).unwrap();
        assert_eq!(running.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 2);
        assert_eq!(running.read_obj::<u64>(GuestAddress(3 * MIB)).unwrap(), 5);
        let next = restore_guest_memory(&layout, &path).unwrap();
        assert_eq!(next.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 2);
        assert_eq!(next.read_obj::<u64>(GuestAddress(3 * MIB)).unwrap(), 5);
        let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
    }

    #[test]
    fn regions_of_any_length_are_saved_back_to_back() {
        let dir = TestDir::new("odd");
        let path = dir.path("memory");
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 5000),
            (GuestAddress(0x10_0000), 3 * PAGE),
        ])
        .unwrap();
        mem.write_obj(0xaau8, GuestAddress(4999)).unwrap();
        mem.write_obj(0xbbu8, GuestAddress(0x10_0000)).unwrap();
        let stats = save_guest_memory(&mem, &path).unwrap();
        assert_eq!(stats.file_size, 5000 + 3 * PAGE_SIZE);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), stats.file_size);
        assert_eq!(pread(&path, 4999, 2), [0xaa, 0xbb]);
    }

    #[test]
    fn pagemap_marks_present_pages() {
        // The swap path cannot be forced without swap; its pagemap reading can be checked on
        // present pages, which it must flag too.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        mem.write_obj(1u8, GuestAddress(3 * PAGE_SIZE)).unwrap();
        let region = mem.iter().next().unwrap();
        let mut flags = [0u8; 16];
        mark_present_or_swapped(region.as_ptr() as usize, &mut flags).unwrap();
        let mut expected = [0u8; 16];
        expected[3] = 1;
        assert_eq!(flags, expected);
    }

    #[test]
    fn reads_vm_swap() {
        let status = "Name:\tvmon\nVmRSS:\t  1000 kB\nVmSwap:\t     12 kB\nThreads:\t1\n";
        assert_eq!(vm_swap_kib(status), Some(12));
        assert_eq!(vm_swap_kib("VmRSS: 1 kB\n"), None);
        assert!(swap_in_use().is_some());
    }

    #[test]
    fn zero_check() {
        let mut page = vec![0u8; PAGE + 3];
        assert!(is_zero(&page));
        for at in [0, 63, 64, PAGE - 1, PAGE + 2] {
            page[at] = 1;
            assert!(!is_zero(&page), "{at}");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
    }
}
