//! What vmon's virtio-blk adds to each request, apart from the read itself.
//!
//! The tiny-guest benchmark (`cargo bench -p vmon --bench tiny_blk`) times whole requests
//! through a guest and its notify exits. This one takes the guest away: a queue of 64
//! three-descriptor read requests (header, 4 KiB, status) is laid out in guest memory
//! on this thread, and `serve_queue` serves them as the device thread would, over and over,
//! against a 256 MiB image in /dev/shm at random offsets. The same reads are then done with
//! `pread` straight into the same guest buffers. The difference per request is the device's
//! own work: taking the chain off the ring, checking it, the header, the status byte and
//! the used ring.
//!
//! Run: `cargo bench -p vmon-virtio --bench blk_request_path [-- ROUNDS]`. Prints figures;
//! asserts only that every request was served with an OK status.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID as T_GET_ID, VIRTIO_BLK_T_IN as T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmon_virtio::block::{serve_queue, Aio, Disk, DiskOptions};
use vmon_virtio::rate_limiter::Limits;

const QUEUE_SIZE: u16 = 256;
const DEPTH: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1_0000;
const USED: u64 = 0x2_0000;
const HEADERS: u64 = 0x3_0000;
const STATUSES: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const IMAGE_BYTES: u64 = 256 << 20;
const BATCHES: usize = 4000;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// The driver's side of a batch: each request header's type and sector, status bytes
/// reset, the chains offered on the available ring.
fn offer(mem: &GuestMemoryMmap, kind: u32, batch: &[u64], avail_idx: &mut u16) {
    for (r, &sector) in batch.iter().enumerate() {
        let r = r as u64;
        mem.write_obj(kind, GuestAddress(HEADERS + 16 * r)).unwrap();
        mem.write_obj(sector, GuestAddress(HEADERS + 16 * r + 8))
            .unwrap();
        mem.write_obj(0xFFu8, GuestAddress(STATUSES + r)).unwrap();
        let slot = u64::from(avail_idx.wrapping_add(r as u16) % QUEUE_SIZE);
        mem.write_obj(3 * r as u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
    }
    *avail_idx = avail_idx.wrapping_add(DEPTH);
    mem.write_obj(*avail_idx, GuestAddress(AVAIL + 2)).unwrap();
}

/// Runs `batch` over `sectors` a queue's worth at a time; nanoseconds per request.
fn per_request(sectors: &[u64], mut batch: impl FnMut(&[u64])) -> f64 {
    let start = Instant::now();
    for b in sectors.chunks(usize::from(DEPTH)) {
        batch(b);
    }
    start.elapsed().as_nanos() as f64 / sectors.len() as f64
}

/// Every request of the batch ended with an OK status.
fn check(mem: &GuestMemoryMmap) {
    for r in 0..u64::from(DEPTH) {
        let status: u8 = mem.read_obj(GuestAddress(STATUSES + r)).unwrap();
        assert_eq!(status, 0, "request {r} failed");
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let path =
        std::path::Path::new("/dev/shm").join(format!("vmon-blk-path-{}.img", std::process::id()));
    let image: Vec<u8> = (0..IMAGE_BYTES)
        .map(|i| (i / 4096) as u8 ^ i as u8)
        .collect();
    std::fs::write(&path, &image).expect("write the image in /dev/shm");
    drop(image);
    let mut disk = Disk::open(&DiskOptions {
        path: path.clone(),
        readonly: true,
        serial: None,
        direct: false,
        limits: Limits::default(),
        poll: std::time::Duration::ZERO,
        // The bench times the synchronous request path (serve_queue) either way.
        aio: Aio::Sync,
    })
    .expect("open the image");
    let file = std::fs::File::open(&path).unwrap();
    let _ = std::fs::remove_file(&path);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    for r in 0..u64::from(DEPTH) {
        let head = 3 * r;
        let hdr = HEADERS + 16 * r;
        let descs = [
            (hdr, 16u32, F_NEXT, head + 1),
            (DATA + r * 4096, 4096, F_NEXT | F_WRITE, head + 2),
            (STATUSES + r, 1, F_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next as u16));
            mem.write_obj(d, GuestAddress(DESC + 16 * (head + i as u64)))
                .unwrap();
        }
    }
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);

    // xorshift64*: random 4 KiB-aligned offsets, the same for both sides.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let sectors: Vec<u64> = (0..BATCHES * usize::from(DEPTH))
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) % (IMAGE_BYTES / 4096)) * 8
        })
        .collect();
    let buffers: Vec<*mut u8> = (0..u64::from(DEPTH))
        .map(|r| mem.get_host_address(GuestAddress(DATA + r * 4096)).unwrap())
        .collect();

    let mut avail_idx = 0u16;
    let (mut device_ns, mut queue_ns, mut driver_ns, mut pread_ns) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        device_ns.push(per_request(&sectors, |batch| {
            offer(&mem, T_IN, batch, &mut avail_idx);
            serve_queue(&mut disk, &mut queue, &mem).expect("queue stays usable");
            check(&mem);
        }));
        // Requests that need no system call (the disk's ID, 20 bytes) on the same chains:
        // the device's queue work alone.
        queue_ns.push(per_request(&sectors, |batch| {
            offer(&mem, T_GET_ID, batch, &mut avail_idx);
            serve_queue(&mut disk, &mut queue, &mem).expect("queue stays usable");
            check(&mem);
        }));
        // The driver's side alone, to take out of the GET_ID figure.
        driver_ns.push(per_request(&sectors, |batch| {
            offer(&mem, T_GET_ID, batch, &mut avail_idx.clone());
            for r in 0..u64::from(DEPTH) {
                mem.write_obj(0u8, GuestAddress(STATUSES + r)).unwrap();
            }
            check(&mem);
        }));
        // The same driver-side work (headers, status bytes, ring entries) around each
        // batch, so that the difference is the device's alone.
        pread_ns.push(per_request(&sectors, |batch| {
            offer(&mem, T_IN, batch, &mut avail_idx.clone());
            for (r, &sector) in batch.iter().enumerate() {
                // SAFETY: each buffer is 4 KiB of the guest memory mapped above, which
                // nothing else touches meanwhile.
                let buf = unsafe { std::slice::from_raw_parts_mut(buffers[r], 4096) };
                file.read_exact_at(buf, sector * 512).unwrap();
                mem.write_obj(0u8, GuestAddress(STATUSES + r as u64))
                    .unwrap();
            }
            check(&mem);
        }));
    }
    device_ns.sort_by(f64::total_cmp);
    pread_ns.sort_by(f64::total_cmp);
    queue_ns.sort_by(f64::total_cmp);
    driver_ns.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[rounds / 2];
    let (d, p) = (median(&device_ns), median(&pread_ns));
    let (q, w) = (median(&queue_ns), median(&driver_ns));
    println!(
        "virtio-blk request path, 4 KiB random reads, {DEPTH} per pass, {rounds} rounds of {} requests, medians:",
        sectors.len()
    );
    println!(
        "  served by the device {d:.0} ns/request   pread alone {p:.0} ns/request   device's own work {:.0} ns ({:.2} of pread's rate)",
        d - p,
        p / d
    );
    println!(
        "  GET_ID requests on the same chains (no system call): {q:.0} ns/request, of which the driver's side {w:.0}: the device's queue work {:.0} ns",
        q - w
    );
}
