//! Entry points for fuzzing: guest memory and queue state built from arbitrary bytes, fed
//! to the same code the device threads run. Used by the cargo-fuzz targets in `fuzz/` and,
//! with pseudo-random inputs, by the unit tests below so they keep compiling and passing
//! on stable.

use std::sync::{Mutex, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmon_memory::GuestMemory;

use crate::block::{Disk, DiskOptions};
use crate::rate_limiter::Limits;

/// Guest RAM the fuzzer controls completely: descriptor table, rings and buffers. The
/// rings sit in the first few hundred bytes (queues of up to 16 entries) so short inputs
/// reach every structure.
const RAM: usize = 0x1_0000;
const DESC: u64 = 0x000;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// Builds a queue of fuzzer-chosen size over fuzzer-chosen memory. Byte 0 picks the size
/// (a power of two up to 16) and EVENT_IDX; the rest is RAM from address 0.
fn setup(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let (&control, ram) = data.split_first()?;
    let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).ok()?;
    let n = ram.len().min(RAM);
    mem.write_slice(&ram[..n], GuestAddress(0)).ok()?;
    let mut q = Queue::new(256).ok()?;
    q.set_size(1 << (control % 5));
    q.try_set_desc_table_address(GuestAddress(DESC)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).ok()?;
    q.try_set_used_ring_address(GuestAddress(USED)).ok()?;
    q.set_event_idx(control & 0x80 != 0);
    q.set_ready(true);
    Some((mem, q))
}

fn disk() -> &'static Mutex<Disk> {
    static DISK: OnceLock<Mutex<Disk>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("vmon-fuzz-disk-{}", std::process::id()));
        std::fs::write(&path, vec![0x5A; 64 * 1024]).expect("creating the fuzz disk");
        let disk = Disk::open(&DiskOptions {
            path: path.clone(),
            readonly: false,
            serial: Some("fuzz".into()),
            direct: false,
            limits: Limits::default(),
        })
        .expect("opening the fuzz disk");
        // The open descriptor keeps the file; the name can go.
        let _ = std::fs::remove_file(&path);
        Mutex::new(disk)
    })
}

/// virtio-blk: every chain the fuzzer's rings offer, through validation and the request
/// handler, against a small scratch disk.
pub fn virtio_blk(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let mut disk = crate::bus_lock(disk());
    let _ = crate::block::serve_queue(&mut disk, &mut q, &mem);
}

/// virtio-rng: chain validation and the fill path.
pub fn virtio_rng(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    let _ = crate::rng::serve(&mut q, &mem);
}

/// vsock packet headers: parse, and serialise what parsed.
pub fn vsock_header(data: &[u8]) {
    if let Some(h) = crate::vsock::packet::Header::parse(data) {
        let bytes = h.to_bytes();
        assert_eq!(crate::vsock::packet::Header::parse(&bytes), Some(h));
        let _ = h.reset_reply();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few thousand pseudo-random memories with plausible rings: a smoke run of the fuzz
    /// targets on stable, so they cannot rot. The real fuzzing is `cargo fuzz` (fuzz/).
    #[test]
    fn fuzz_entry_points_survive_random_inputs() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let mut data = vec![0u8; 0x400 + (round % 7) * 0x100];
            for b in data.iter_mut() {
                *b = next() as u8;
            }
            // Keep the rings mostly sane so requests get past the first checks: small
            // avail index, heads in range, descriptors pointing into RAM.
            let size = 1usize << (data[0] % 5);
            data[1 + AVAIL as usize + 2] = (next() % 4) as u8;
            data[1 + AVAIL as usize + 3] = 0;
            for i in 0..size.min(64) {
                let d = 1 + DESC as usize + 16 * i;
                let addr = 0x300 + (next() % 0xF000);
                data[d..d + 8].copy_from_slice(&addr.to_le_bytes());
                data[d + 8..d + 12].copy_from_slice(&((next() % 2048) as u32).to_le_bytes());
                data[d + 14..d + 16]
                    .copy_from_slice(&((next() % size as u64) as u16).to_le_bytes());
                let h = 1 + AVAIL as usize + 4 + 2 * i;
                if h + 2 <= data.len() {
                    data[h..h + 2].copy_from_slice(&((next() % size as u64) as u16).to_le_bytes());
                }
            }
            virtio_blk(&data);
            virtio_rng(&data);
            vsock_header(&data[1..]);
        }
    }
}
