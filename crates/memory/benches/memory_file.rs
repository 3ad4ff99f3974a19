//! Guest-memory snapshot benchmark: how long `save_guest_memory` takes and how fast
//! `restore_guest_memory` hands back memory, for guests that touched 1% or all of their RAM.
//!
//! Run: `cargo bench -p vmon-memory --bench memory_file [-- --big] [-- --dir DIR]`. `--big`
//! adds a 4 GiB guest that touched everything (8 GiB of host memory and 4 GiB of disk for a
//! minute). Files go to DIR (default: the temporary directory), which should be on the disk
//! snapshots would use: on tmpfs the fsync is free and the numbers flatter.
//!
//! Not a test: nothing asserts a time. Per scenario it prints
//! - save: wall time (fsync included), bytes written, pages scanned;
//! - restore: median and worst of 20 `restore_guest_memory` calls (open, fstat, mmap);
//! - first touch: reading one word from every touched page right after a restore, with the
//!   file in the page cache (a clone of a recent snapshot) and after dropping it from the
//!   cache (a restore on a cold host), each as restored (MADV_RANDOM: one page per fault) and
//!   with the kernel's default read-ahead put back (MADV_NORMAL);
//! - first write to untouched memory: one write in each of 1000 pages that are holes in the
//!   file, as restored and with default read-ahead;
//! - sharing: two clones that read all touched pages, and what that costs the process.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmon_memory::{
    create_guest_memory, restore_guest_memory, save_guest_memory, Backing, GuestMemory, MemSize,
    MemoryLayout,
};

const PAGE: u64 = 4096;

struct Scenario {
    mib: u64,
    /// One page in `every` is touched, spread evenly over RAM.
    every: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let big = args.iter().any(|a| a == "--big");
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("vmon-bench-memfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let mut scenarios = vec![
        Scenario {
            mib: 256,
            every: 100,
        },
        Scenario {
            mib: 4096,
            every: 100,
        },
        Scenario { mib: 256, every: 1 },
    ];
    if big {
        scenarios.push(Scenario {
            mib: 4096,
            every: 1,
        });
    }
    println!("files in {}", dir.display());
    for s in &scenarios {
        run(s, &dir.join(format!("memory-{}M-{}", s.mib, s.every)));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Guest addresses of the touched pages.
fn touched(layout: &MemoryLayout, every: u64) -> Vec<u64> {
    layout
        .ram_ranges()
        .flat_map(|(start, len)| (start..start + len).step_by((PAGE * every) as usize))
        .collect()
}

fn run(s: &Scenario, path: &Path) {
    let layout = MemoryLayout::new(MemSize::from_mib(s.mib)).unwrap();
    let pages = touched(&layout, s.every);
    let label = format!(
        "{} MiB, {}% touched",
        s.mib,
        if s.every == 1 { 100 } else { 100 / s.every }
    );

    // A page of incompressible, non-zero bytes, different per page. On 4 KiB pages, so that
    // "touched" is exactly the pages written: with huge pages one write makes 2 MiB resident,
    // and saving scans (but does not write) the rest of it.
    let mem = create_guest_memory(&layout, Backing::SmallPages).unwrap();
    let mut page = vec![0u8; PAGE as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for &addr in &pages {
        for chunk in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&(x | 1).to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(addr)).unwrap();
    }

    let stats = save_guest_memory(&mem, path).unwrap();
    drop(mem);
    println!(
        "{label}: save {:.1} ms ({:.1} ms of it fsync), {} MiB written, {} pages scanned",
        ms(stats.elapsed),
        ms(stats.sync),
        stats.bytes_written >> 20,
        stats.pages_resident
    );

    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let m = restore_guest_memory(&layout, path).unwrap();
            let t = start.elapsed();
            drop(m);
            t
        })
        .collect();
    times.sort();
    println!(
        "{label}: restore median {:.0} µs, worst {:.0} µs",
        us(times[times.len() / 2]),
        us(times[times.len() - 1])
    );

    for cold in [false, true] {
        for random in [false, true] {
            if cold {
                drop_cache(path);
            }
            let m = restore_guest_memory(&layout, path).unwrap();
            if !random {
                advise(&m, libc::MADV_NORMAL);
            }
            let start = Instant::now();
            let sum = read_pages(&m, &pages);
            let t = start.elapsed();
            println!(
                "{label}: first touch of {} pages, {} cache, {}: {:.1} ms ({:.1} µs/page){}",
                pages.len(),
                if cold { "cold" } else { "warm" },
                if random {
                    "MADV_RANDOM"
                } else {
                    "default read-ahead"
                },
                ms(t),
                us(t) / pages.len() as f64,
                if sum == 0 { " (all zero?)" } else { "" }
            );
        }
    }

    if s.every > 1 {
        // Pages between touched ones are holes: memory the guest never used before the snapshot.
        let holes: Vec<u64> = pages.iter().take(1000).map(|a| a + PAGE).collect();
        for random in [true, false] {
            drop_cache(path);
            let m = restore_guest_memory(&layout, path).unwrap();
            if !random {
                advise(&m, libc::MADV_NORMAL);
            }
            let start = Instant::now();
            for &a in &holes {
                m.write_obj(1u64, GuestAddress(a)).unwrap();
            }
            let t = start.elapsed();
            println!(
                "{label}: first write to {} untouched pages, {}: {:.1} ms ({:.1} µs/page)",
                holes.len(),
                if random {
                    "MADV_RANDOM"
                } else {
                    "default read-ahead"
                },
                ms(t),
                us(t) / holes.len() as f64
            );
        }
    }

    if s.every == 1 {
        // Snapshotting a restored guest that has not touched its memory yet: every page is
        // read through the mapping from a cold page cache.
        drop_cache(path);
        let m = restore_guest_memory(&layout, path).unwrap();
        let again = path.with_extension("again");
        let stats = save_guest_memory(&m, &again).unwrap();
        println!(
            "{label}: save of the restored guest, cold cache: {:.1} ms ({:.1} ms of it fsync)",
            ms(stats.elapsed),
            ms(stats.sync)
        );
        let _ = std::fs::remove_file(&again);
    }

    if s.mib <= 256 {
        let before = rollup();
        let a = restore_guest_memory(&layout, path).unwrap();
        let b = restore_guest_memory(&layout, path).unwrap();
        read_all(&a, &layout);
        read_all(&b, &layout);
        let after = rollup();
        println!(
            "{label}: two clones reading all RAM: process Rss +{} MiB, Pss +{} MiB (pages shared)",
            (after.0 - before.0) >> 10,
            (after.1 - before.1) >> 10
        );
    }
    let _ = std::fs::remove_file(path);
}

fn read_pages(mem: &GuestMemory, pages: &[u64]) -> u64 {
    pages.iter().fold(0u64, |acc, &a| {
        acc ^ mem.read_obj::<u64>(GuestAddress(a + 8)).unwrap()
    })
}

fn read_all(mem: &GuestMemory, layout: &MemoryLayout) {
    for (start, len) in layout.ram_ranges() {
        for a in (start..start + len).step_by(PAGE as usize) {
            let _ = mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        }
    }
}

fn drop_cache(path: &Path) {
    let file = File::open(path).unwrap();
    // SAFETY: fadvise on a descriptor `file` owns; it only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

fn advise(mem: &GuestMemory, advice: i32) {
    for region in mem.iter() {
        // SAFETY: the range is exactly one live mapping owned by `mem`; the advice used here
        // only changes read-ahead.
        let r = unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, advice) };
        assert_eq!(r, 0);
    }
}

/// (Rss, Pss) of this process in KiB.
fn rollup() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
