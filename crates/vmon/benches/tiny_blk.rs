//! virtio-blk throughput on this machine's own /dev/kvm, against reading and writing the
//! backing file directly on the host.
//!
//! The guest is the script runner (`vmon_tinyguest::script`): a driver with no block layer,
//! no interrupts and no data copies of its own. It keeps `depth` requests in flight (one
//! notify per batch, then polls the used index), so what is timed is vmon's device path:
//! the ioeventfd wake-up, descriptor-chain validation, `preadv`/`pwritev` straight between
//! the file and guest memory, and the used-ring update. The host baseline runs the same
//! requests (same sizes, offsets and batch) with `pread`/`pwrite` on the same file from
//! this process. Both sides hit the page cache: the image lives in `/dev/shm`, so neither
//! measures a disk.
//!
//! Timing is taken on the host from the guest's serial output: the script prints `go`
//! after one warm-up batch (which faults in the guest's buffers) and `end` once the last
//! batch is used; each line is flushed as it is written.
//!
//! Run: `cargo bench -p vmon --bench tiny_blk [-- ROUNDS] [NAME...]` (ROUNDS: repetitions
//! of every workload, default 5; medians printed; NAMEs pick workloads whose name contains
//! one of them). `VMON_DISK_OPTIONS=,poll_us=32` adds to vmon's `--disk`.
//!
//! `VMON_BENCH_DIR=DIR` puts the image in DIR instead of /dev/shm, and
//! `VMON_BENCH_DIRECT=1` has both VMMs open it with O_DIRECT (vmon `direct=on`, QEMU
//! `cache=none`): with DIR on a real disk, that measures the storage, where what counts is
//! how many requests a VMM keeps in flight. The host baseline then reads the file with
//! O_DIRECT too, keeping as many requests in flight as the guest does (io_uring): what the
//! storage itself gives at that depth.
//!
//! Results are in docs/benchmarks.md. Not a test: nothing asserts a figure.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::tiny_virtio::{self, Vmm};
use vmon_tinyguest::script::Script;
use vmon_tinyguest::virtio::*;

/// The disk image: big enough that sequential passes are not one buffer's worth.
const DISK_BYTES: u64 = 512 << 20;
/// Polls of a status byte before the script gives up (a spin of some seconds): a request
/// that failed never reads OK, and ends the run this way.
const POLLS: u32 = u32::MAX;

// Guest-physical layout of the driver.
const DESC: u64 = 0x40_0000;
const AVAIL: u64 = 0x40_1000;
const USED: u64 = 0x40_2000;
const HEADERS: u64 = 0x41_0000;
const STATUSES: u64 = 0x42_0000;
const DATA: u64 = 0x100_0000;

/// The VMM with the disk attached: for QEMU, virtio-blk-pci behind an iothread (QEMU's
/// recommended set-up for disk performance), `cache=writeback,aio=threads` (its defaults).
fn command(vmm: Vmm, kernel: &str, disk: &str) -> Command {
    let mut c = vmm.command(kernel);
    match vmm {
        Vmm::Vmon => c.args([
            "--disk",
            &format!(
                "path={disk}{}{}",
                if direct() { ",direct=on" } else { "" },
                vmon_disk_options()
            ),
        ]),
        Vmm::Qemu => c
            .args(["-object", "iothread,id=io0"])
            .args([
                "-drive",
                &format!(
                    "file={disk},if=none,id=d0,format=raw,cache={},aio=threads",
                    if direct() { "none" } else { "writeback" }
                ),
            ])
            .args([
                "-device",
                "virtio-blk-pci,drive=d0,disable-legacy=on,iothread=io0",
            ]),
    };
    c
}

/// `VMON_BENCH_DIRECT=1`: the image opened with O_DIRECT, by the VMMs and the host.
fn direct() -> bool {
    std::env::var("VMON_BENCH_DIRECT").is_ok_and(|v| v == "1")
}

/// More `--disk` options for vmon from `VMON_DISK_OPTIONS`: `,poll_us=32` gives vmon the
/// polling QEMU's iothread does by default.
fn vmon_disk_options() -> String {
    std::env::var("VMON_DISK_OPTIONS").unwrap_or_default()
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    /// Bytes per request.
    size: u64,
    /// Requests in flight at most: one chain each (divides the queue size).
    depth: u16,
    /// Requests per notify: `depth` or half of it. With half, the driver fills one half of
    /// its chains while the device works through the other, as a real driver keeps a queue
    /// busy.
    batch: u16,
    /// Batches timed.
    batches: usize,
    random: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq read 1 MiB x32",
        write: false,
        size: 1 << 20,
        depth: 32,
        batch: 16,
        batches: 96, // three passes over the image
        random: false,
    },
    Workload {
        name: "rand read 4 KiB x64",
        write: false,
        size: 4096,
        depth: 64,
        batch: 32,
        batches: 400, // the script (61 bytes a request) must fit below 2 MiB
        random: true,
    },
    Workload {
        name: "rand read 4 KiB x1",
        write: false,
        size: 4096,
        depth: 1,
        batch: 1,
        batches: 8000,
        random: true,
    },
    Workload {
        name: "seq write 1 MiB x32",
        write: true,
        size: 1 << 20,
        depth: 32,
        batch: 16,
        batches: 48,
        random: false,
    },
];

impl Workload {
    /// The byte offset of every request: warm-up batch first, then the timed ones.
    fn offsets(&self) -> Vec<Vec<u64>> {
        let per_batch = usize::from(self.batch);
        let slots = DISK_BYTES / self.size;
        // xorshift64*: the same offsets for the guest and the host.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = 0u64;
        (0..=self.batches)
            .map(|_| {
                (0..per_batch)
                    .map(|_| {
                        let slot = if self.random {
                            state ^= state >> 12;
                            state ^= state << 25;
                            state ^= state >> 27;
                            state.wrapping_mul(0x2545_F491_4F6C_DD1D) % slots
                        } else {
                            let s = next % slots;
                            next += 1;
                            s
                        };
                        slot * self.size
                    })
                    .collect()
            })
            .collect()
    }

    fn bytes_timed(&self) -> u64 {
        self.requests_timed() * self.size
    }

    fn requests_timed(&self) -> u64 {
        self.batches as u64 * u64::from(self.batch)
    }

    /// Batch `k` uses chains (and buffers) `first..first + batch`.
    fn first_chain(&self, k: usize) -> u16 {
        (k % usize::from(self.depth / self.batch)) as u16 * self.batch
    }
}

/// The driver script: set the device up, lay out `depth` three-descriptor chains, then
/// submit the batches.
fn guest_script(vmm: Vmm, w: &Workload) -> Script {
    let mut s = Script::new();
    vmm.find_device(&mut s);
    tiny_virtio::negotiate(&mut s);
    tiny_virtio::setup_queue(&mut s, 0, (DESC, AVAIL, USED));
    s.write_rel(1, STATUS, LIVE);

    let kind = if w.write { T_OUT } else { T_IN };
    let data_flags = if w.write { 0 } else { W };
    for r in 0..w.depth {
        let head = 3 * r;
        let hdr = HEADERS + 16 * u64::from(r);
        let data = DATA + u64::from(r) * w.size;
        let status = STATUSES + u64::from(r);
        s.write(8, hdr, u64::from(kind)).write(1, status, 0xFF);
        for (i, (addr, len, flags)) in [
            (hdr, 16, NEXT),
            (data, w.size as u32, NEXT | data_flags),
            (status, 1, W),
        ]
        .into_iter()
        .enumerate()
        {
            let next = if flags & NEXT != 0 {
                head + i as u16 + 1
            } else {
                0
            };
            for (at, value) in descriptor(DESC, head + i as u16, addr, len, flags, next) {
                s.write(8, at, value);
            }
        }
    }
    // Buffers hold data, as an application's would: a write from never-touched guest memory
    // would copy the host's shared zero page, which is always in cache.
    s.fill(DATA, u64::from(w.depth) * w.size, 0xA5);
    // Every available-ring slot names the chain it will always carry.
    for slot in 0..QUEUE_MAX {
        s.write(
            2,
            AVAIL + 4 + 2 * u64::from(slot),
            u64::from(3 * (slot % w.depth)),
        );
    }

    // A chain is free again once the device has written its status byte (0xFF until then),
    // whatever order the device completes requests in.
    let wait_chains = |s: &mut Script, first: u16| {
        for r in first..first + w.batch {
            s.wait_eq(1, STATUSES + u64::from(r), S_OK, POLLS);
        }
    };
    let groups = usize::from(w.depth / w.batch);
    let batches = w.offsets();
    let mut avail: u16 = 0;
    for (k, offsets) in batches.iter().enumerate() {
        if k == 1 {
            // The warm-up batch has faulted the buffers in: start the clock.
            wait_chains(&mut s, w.first_chain(0));
            s.print("go\n");
        } else if k >= groups {
            wait_chains(&mut s, w.first_chain(k));
        }
        let first = w.first_chain(k);
        for (r, offset) in (first..).zip(offsets) {
            s.write(8, HEADERS + 16 * u64::from(r) + 8, offset / SECTOR as u64)
                .write(1, STATUSES + u64::from(r), 0xFF);
        }
        avail = avail.wrapping_add(w.batch);
        s.write(2, AVAIL + 2, u64::from(avail))
            .write_rel(2, NOTIFY, 0);
    }
    for k in batches.len().saturating_sub(groups).max(1)..batches.len() {
        wait_chains(&mut s, w.first_chain(k));
    }
    s.print("end\n");
    // What the host checks: the device is still live (no NEEDS_RESET, FEATURES_OK kept),
    // it returned every request on the used ring, and (for reads) each buffer of the last
    // batch holds the file's bytes at both ends.
    s.read_rel(1, STATUS).read(2, USED + 2);
    let first = u64::from(w.first_chain(batches.len() - 1));
    for r in first..first + u64::from(w.batch) {
        s.read(8, DATA + r * w.size)
            .read(8, DATA + (r + 1) * w.size - 8);
    }
    s
}

/// Runs the workload in a vmon guest; the time from `go` to `end`.
/// Runs the workload in a guest of `vmm`; the time from `go` to `end`.
fn run_guest(vmm: Vmm, w: &Workload, kernel: &str, disk: &str) -> Result<Duration, String> {
    // After `end`: STATUS, the used index, both ends of every buffer of the last batch.
    let expected = 2 + 2 * usize::from(w.batch);
    let (elapsed, values) = tiny_virtio::run_script(vmm, command(vmm, kernel, disk), expected)?;
    if values[0] != LIVE {
        return Err(format!("device status {:#x} at the end", values[0]));
    }
    let requests = (w.requests_timed() + u64::from(w.batch)) & 0xFFFF;
    if values[1] != requests {
        return Err(format!(
            "used index {} after {requests} requests",
            values[1]
        ));
    }
    if !w.write {
        let last_batch = w.offsets().pop().unwrap();
        for (r, &offset) in last_batch.iter().enumerate() {
            let want = [offset, offset + w.size - 8].map(|o| u64::from_le_bytes(pattern_at(o)));
            let got = [values[2 + 2 * r], values[3 + 2 * r]];
            if got != want {
                return Err(format!(
                    "buffer {r} holds {got:x?} at its ends, the file {want:x?}"
                ));
            }
        }
    }
    Ok(elapsed)
}

/// The same requests from this process, on the same file: one at a time through the page
/// cache, or with O_DIRECT as many in flight as the guest keeps.
fn run_host(w: &Workload, path: &std::path::Path) -> Duration {
    if direct() {
        return run_host_in_flight(w, path);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buffer = vec![0x5Au8; (u64::from(w.depth) * w.size) as usize];
    let batches = w.offsets();
    let mut start = Instant::now();
    for (k, offsets) in batches.iter().enumerate() {
        if k == 1 {
            start = Instant::now();
        }
        let first = usize::from(w.first_chain(k));
        let chunks = buffer.chunks_mut(w.size as usize).skip(first);
        for (chunk, &offset) in chunks.zip(offsets) {
            if w.write {
                file.write_all_at(chunk, offset).unwrap();
            } else {
                file.read_exact_at(chunk, offset).unwrap();
            }
        }
    }
    start.elapsed()
}

/// [`run_host`] with O_DIRECT: a batch is submitted at once, and a buffer is reused only
/// once its request is done, as the guest's driver does.
fn run_host_in_flight(w: &Workload, path: &std::path::Path) -> Duration {
    use io_uring::{opcode, types, IoUring};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let fd = types::Fd(file.as_raw_fd());
    let mut ring = IoUring::new(256).unwrap();
    let depth = usize::from(w.depth);
    let mut storage = vec![0x5Au8; depth * w.size as usize + 4096];
    let align = storage.as_ptr().align_offset(4096);
    let buffers = &mut storage[align..];
    let mut busy = vec![false; depth];
    let mut in_flight = 0;
    let reap = |ring: &mut IoUring, busy: &mut Vec<bool>, in_flight: &mut usize| {
        ring.submit_and_wait(1).unwrap();
        for c in ring.completion() {
            assert_eq!(c.result(), w.size as i32, "a host request failed");
            busy[c.user_data() as usize] = false;
            *in_flight -= 1;
        }
    };
    let batches = w.offsets();
    let mut start = Instant::now();
    for (k, offsets) in batches.iter().enumerate() {
        if k == 1 {
            // The warm-up batch done, as the guest waits for it before `go`.
            while in_flight > 0 {
                reap(&mut ring, &mut busy, &mut in_flight);
            }
            start = Instant::now();
        }
        let first = usize::from(w.first_chain(k));
        for (slot, &offset) in (first..).zip(offsets) {
            while busy[slot] {
                reap(&mut ring, &mut busy, &mut in_flight);
            }
            let buf = buffers[slot * w.size as usize..].as_mut_ptr();
            let entry = if w.write {
                opcode::Write::new(fd, buf, w.size as u32)
                    .offset(offset)
                    .build()
            } else {
                opcode::Read::new(fd, buf, w.size as u32)
                    .offset(offset)
                    .build()
            };
            // SAFETY: the buffer is `buffers`, alive until every request is reaped below,
            // and not handed out again before its request completes.
            unsafe {
                ring.submission()
                    .push(&entry.user_data(slot as u64))
                    .unwrap()
            };
            busy[slot] = true;
            in_flight += 1;
        }
        ring.submit().unwrap();
    }
    while in_flight > 0 {
        reap(&mut ring, &mut busy, &mut in_flight);
    }
    start.elapsed()
}

/// The image's first 8 bytes at `offset` (8-aligned).
fn pattern_at(offset: u64) -> [u8; 8] {
    (offset / 8)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17)
        .to_le_bytes()
}

fn write_image(path: &std::path::Path) {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::create(path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for base in (0..DISK_BYTES).step_by(chunk.len()) {
        for (i, word) in chunk.chunks_mut(8).enumerate() {
            word.copy_from_slice(&pattern_at(base + 8 * i as u64));
        }
        file.write_all_at(&chunk, base).unwrap();
    }
    // On disk and out of the page cache, so O_DIRECT reads find the storage.
    file.sync_all().unwrap();
    // SAFETY: advice on a descriptor we own; no memory is involved.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn main() {
    let rounds = common::runs_from_args(5);
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("tiny_blk: no /dev/kvm here; nothing measured");
        return;
    }
    let base = std::env::var("VMON_BENCH_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = std::path::PathBuf::from(format!("{base}/vmon-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    write_image(&disk);
    let disk_str = disk.to_str().unwrap().to_string();

    let vmms = Vmm::available();
    println!(
        "virtio-blk, tiny guest on /dev/kvm, {} MiB image in {base}{}, {rounds} rounds, medians:",
        DISK_BYTES >> 20,
        if direct() { ", O_DIRECT" } else { "" }
    );
    // Reads first: the write workload overwrites the image.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<usize>().is_err() && !a.starts_with('-'))
        .collect();
    for w in WORKLOADS
        .iter()
        .filter(|w| only.is_empty() || only.iter().any(|o| w.name.contains(o.as_str())))
    {
        let figure = |t: Duration| {
            if w.size >= 1 << 20 {
                w.bytes_timed() as f64 / t.as_secs_f64() / 1e6
            } else {
                w.requests_timed() as f64 / t.as_secs_f64()
            }
        };
        let unit = if w.size >= 1 << 20 { "MB/s" } else { "IOPS" };
        let mut kernels = Vec::new();
        for vmm in &vmms {
            let kernel = dir.join(format!("guest-{}.elf", kernels.len()));
            std::fs::write(&kernel, vmm.kernel(&guest_script(*vmm, w))).unwrap();
            kernels.push(kernel.to_str().unwrap().to_string());
        }
        let mut host = Vec::new();
        let mut guests: Vec<Vec<Duration>> = vmms.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            // Interleaved, so drift in the machine hits all alike. The host gets the better
            // of two tries: a baseline that is too low would flatter the guests.
            host.push(run_host(w, &disk).min(run_host(w, &disk)));
            for (i, vmm) in vmms.iter().enumerate() {
                match run_guest(*vmm, w, &kernels[i], &disk_str) {
                    Ok(t) => guests[i].push(t),
                    Err(e) => println!("  {} under {}: run failed: {e}", w.name, vmm.name()),
                }
            }
        }
        let host = figure(common::median(host));
        let mut line = format!("  {:<20} host file {host:>8.0} {unit}", w.name);
        let mut results = Vec::new();
        for (vmm, times) in vmms.iter().zip(guests) {
            if times.is_empty() {
                line += &format!("   {} failed", vmm.name());
                results.push(None);
                continue;
            }
            let f = figure(common::median(times));
            line += &format!("   {} {f:>8.0} ({:.2} of host)", vmm.name(), f / host);
            results.push(Some(f));
        }
        if let [Some(v), Some(q)] = results[..] {
            line += &format!("   vmon/qemu {:.2}", v / q);
        }
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
