//! Entry points for fuzzing: guest memory and queue state built from arbitrary bytes, fed
//! to the same code the device threads run. Used by the cargo-fuzz targets in `fuzz/` and,
//! with pseudo-random inputs, by the unit tests below so they keep compiling and passing
//! on stable.

use std::cell::RefCell;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmon_devices::pci::msix::{MsiMessage, MsiVectors, Msix};
use vmon_memory::GuestMemory;

use crate::block::{ring_for_tests, Disk, DiskOptions, RingForTests};
use crate::interrupt::Interrupt;
use crate::net::{Backend, NetStats, VNET_HDR_LEN};
use crate::rate_limiter::Limits;

/// Guest RAM the fuzzer controls completely: descriptor table, rings and buffers. The
/// rings sit in the first few hundred bytes (queues of up to 16 entries) so short inputs
/// reach every structure.
const RAM: usize = 0x1_0000;
const DESC: u64 = 0x000;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// Where a second queue's rings start (virtio-net's transmit queue), past the first's.
const SECOND_QUEUE: u64 = 0x300;

/// Builds a queue of fuzzer-chosen size over fuzzer-chosen memory. Byte 0 picks the size
/// (a power of two up to 16) and EVENT_IDX; the rest is RAM from address 0.
fn setup(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let (&control, ram) = data.split_first()?;
    let mem = ram_from(ram)?;
    Some((mem, queue(control, 0)?))
}

fn ram_from(bytes: &[u8]) -> Option<GuestMemory> {
    let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).ok()?;
    let n = bytes.len().min(RAM);
    mem.write_slice(&bytes[..n], GuestAddress(0)).ok()?;
    Some(mem)
}

/// A ready queue whose rings start at `base`; `control` picks its size and EVENT_IDX.
fn queue(control: u8, base: u64) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(1 << (control % 5));
    q.try_set_desc_table_address(GuestAddress(base + DESC))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(base + AVAIL))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(base + USED))
        .ok()?;
    q.set_event_idx(control & 0x80 != 0);
    q.set_ready(true);
    Some(q)
}

/// A 64 KiB scratch disk of `fill` bytes, its file already unlinked (the open descriptor
/// keeps it), opened `direct` or through the page cache.
fn scratch_disk(name: &str, fill: u8, direct: bool) -> Disk {
    let path = std::env::temp_dir().join(format!(
        "vmon-fuzz-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, vec![fill; 64 * 1024]).expect("creating the fuzz disk");
    let disk = Disk::open(&DiskOptions {
        path: path.clone(),
        readonly: false,
        serial: Some(format!("fuzz-{name}")),
        direct,
        limits: Limits::default(),
        poll: std::time::Duration::ZERO,
        aio: if direct {
            crate::block::Aio::IoUring
        } else {
            crate::block::Aio::Sync
        },
    })
    .expect("opening the fuzz disk");
    let _ = std::fs::remove_file(&path);
    disk
}

fn disk() -> &'static Mutex<Disk> {
    static DISK: OnceLock<Mutex<Disk>> = OnceLock::new();
    DISK.get_or_init(|| Mutex::new(scratch_disk("disk", 0x5A, false)))
}

/// An O_DIRECT scratch disk with its io_uring (None where the host refuses io_uring): the
/// path `aio=io_uring` takes, with requests in flight and unaligned buffers bounced. One
/// per thread: requests in flight hold raw iovecs, which do not cross threads.
fn with_direct_disk<R>(f: impl FnOnce(&mut Disk, Option<&mut RingForTests>) -> R) -> R {
    thread_local! {
        static DISK: RefCell<Option<(Disk, Option<RingForTests>)>> = const { RefCell::new(None) };
    }
    DISK.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (disk, ring) = cell.get_or_insert_with(|| {
            let disk = scratch_disk("direct", 0xA5, true);
            let ring = ring_for_tests(&disk);
            (disk, ring)
        });
        f(disk, ring.as_mut())
    })
}

/// virtio-blk: every chain the fuzzer's rings offer, through validation and the request
/// handler, against a small scratch disk. Bit 6 of the control byte picks the O_DIRECT disk
/// served through io_uring instead of the page-cache one served in place.
pub fn virtio_blk(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else {
        return;
    };
    if data[0] & 0x40 != 0 {
        let served = with_direct_disk(|disk, ring| {
            ring.map(|ring| crate::block::serve_queue_in_flight(disk, ring, &mut q, &mem))
        });
        if served.is_some() {
            return;
        }
    }
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

/// Packets a fuzz input hands to virtio-net's receive path: from runts to more than any
/// tap delivers (the backend is host-side, but its lengths are still checked, not trusted).
const PACKET_LENS: [usize; 8] = [
    0,
    5,
    VNET_HDR_LEN,
    60,
    1514,
    4096 + VNET_HDR_LEN,
    65_547,
    70_000,
];

/// A backend that swallows what the device sends and, on receive, hands over its packets
/// one per read, as a tap does: the bytes that fit, and the packet's whole length.
struct PacketSource {
    packets: RefCell<Vec<Vec<u8>>>,
    /// Only for the [`Backend`] bound: the device registers it with an event loop, which
    /// [`crate::net::serve_once`] does not run.
    fd: RawFd,
}

impl AsRawFd for PacketSource {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl Backend for PacketSource {
    // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
    unsafe fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut packets = self.packets.borrow_mut();
        if packets.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let packet = packets.remove(0);
        let mut rest = &packet[..];
        for v in iov {
            let n = rest.len().min(v.iov_len);
            // SAFETY: the caller guarantees each iovec is valid for writes of iov_len
            // bytes; `n` is no more, and `rest` is our own buffer, not overlapping it.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), v.iov_base.cast(), n) };
            rest = &rest[n..];
        }
        Ok(packet.len())
    }

    // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
    unsafe fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut sum = 0u8;
        let mut len = 0;
        for v in iov {
            // SAFETY: the caller guarantees each iovec is valid for reads of iov_len bytes.
            let bytes = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            // Touch every byte, as a tap's copy would.
            sum = bytes.iter().fold(sum, |a, &b| a.wrapping_add(b));
            len += v.iov_len;
        }
        std::hint::black_box(sum);
        Ok(len)
    }

    fn set_offload(&self, _: u32) -> io::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "fuzz packets".into()
    }
}

/// MSI vectors that go nowhere: devices signal, nobody listens (fuzzing and unit tests).
pub(crate) struct NoMsi;

impl MsiVectors for NoMsi {
    fn route(&self, _: u16, _: MsiMessage) -> io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> io::Result<()> {
        Ok(())
    }
}

/// virtio-net: a transmit pass and receive passes (merged or not, per the input) over
/// fuzzer-chosen rings and buffers, with fuzzer-chosen packets waiting to be received.
/// Byte 0 is the receive queue's size and EVENT_IDX, byte 1 the transmit queue's, byte 2
/// the features (0x01 MRG_RXBUF, 0x02 GUEST_CSUM) and how many packets wait (bits 2..4),
/// bytes 3..7 their sizes ([`PACKET_LENS`]); the rest is RAM from address 0, the receive
/// queue's rings first, the transmit queue's from [`SECOND_QUEUE`].
/// Returns the device's counters, or None when the input was too short or its queues broke.
pub fn virtio_net(data: &[u8]) -> Option<NetStats> {
    let (&[rx_control, tx_control, mix], rest) = data.split_first_chunk::<3>()?;
    let (sizes, ram) = rest.split_first_chunk::<4>()?;
    let mem = ram_from(ram)?;
    let rx = queue(rx_control, 0)?;
    let tx = queue(tx_control, SECOND_QUEUE)?;
    let features = crate::net::F_MRG_RXBUF * u64::from(mix & 1)
        + crate::net::F_GUEST_CSUM * u64::from(mix >> 1 & 1);
    let count = usize::from(mix >> 2 & 7).min(sizes.len());
    let packets = sizes[..count]
        .iter()
        .map(|&s| {
            let len = PACKET_LENS[usize::from(s) % PACKET_LENS.len()];
            (0..len).map(|i| (i as u8).wrapping_mul(s | 1)).collect()
        })
        .collect();
    let backend = PacketSource {
        packets: RefCell::new(packets),
        fd: std::io::stdin().as_raw_fd(),
    };
    let msix = Arc::new(Mutex::new(Msix::new(3, Box::new(NoMsi))));
    let interrupt = Arc::new(Interrupt::new(msix, 2));
    crate::net::serve_once(mem, features, [rx, tx], Box::new(backend), interrupt).ok()
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

    /// A xorshift generator: the same pseudo-random inputs every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Makes the rings of a `size`-entry queue at `base` in `ram` mostly sane, so requests
    /// get past the first checks: small avail index, heads in range, descriptors pointing
    /// into RAM; with `write`, every descriptor is device-writable (or none is) and only
    /// the NEXT flag is left to chance.
    fn plausible_rings(
        ram: &mut [u8],
        base: usize,
        size: usize,
        write: Option<bool>,
        rng: &mut Rng,
    ) {
        let avail = base + AVAIL as usize;
        ram[avail + 2] = (rng.next() % 4) as u8;
        ram[avail + 3] = 0;
        for i in 0..size {
            let d = base + DESC as usize + 16 * i;
            let addr = 0x600 + (rng.next() % 0xF000);
            ram[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            ram[d + 8..d + 12].copy_from_slice(&((rng.next() % 2048) as u32).to_le_bytes());
            if let Some(write) = write {
                let flags = (rng.next() & 1) as u16 | u16::from(write) << 1;
                ram[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
            }
            ram[d + 14..d + 16].copy_from_slice(&((rng.next() % size as u64) as u16).to_le_bytes());
            let h = avail + 4 + 2 * i;
            ram[h..h + 2].copy_from_slice(&((rng.next() % size as u64) as u16).to_le_bytes());
        }
    }

    /// A virtio_net input: `mix` (features and packet count), packet size indexes, and
    /// receive chains of one device-writable buffer each; nothing to transmit.
    fn net_input(mix: u8, sizes: [u8; 4], rx_buffers: &[(u64, u32)]) -> Vec<u8> {
        let mut data = vec![4, 4, mix];
        data.extend(sizes);
        let mut ram = vec![0u8; 0x300 + AVAIL as usize + 4];
        for (i, &(addr, len)) in rx_buffers.iter().enumerate() {
            let d = DESC as usize + 16 * i;
            ram[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            ram[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
            ram[d + 12] = 2; // device-writable, no next
            let slot = AVAIL as usize + 4 + 2 * i;
            ram[slot] = i as u8;
        }
        ram[AVAIL as usize + 2] = rx_buffers.len() as u8;
        data.extend(ram);
        data
    }

    /// Found by the virtio_net fuzz target: a backend read that reports more bytes than
    /// the buffers and the overflow buffer held (a tap reports a cut-short packet's whole
    /// length) must drop the packet, not index past the overflow buffer.
    #[test]
    fn a_packet_longer_than_a_read_is_dropped_not_spilled() {
        let too_long = PACKET_LENS.iter().position(|&l| l == 70_000).unwrap() as u8;
        let fits = PACKET_LENS.iter().position(|&l| l == 1514).unwrap() as u8;
        // MRG_RXBUF; two packets: 70,000 bytes, then 1,514. A 12-byte first buffer, then
        // three (overlapping) 32 KiB ones: room enough to spill 70,000 bytes into.
        let big = (0x1000, 0x8000);
        let data = net_input(
            1 | 2 << 2,
            [too_long, fits, 0, 0],
            &[(0x800, 12), big, big, big],
        );
        let stats = virtio_net(&data).expect("the queues stay usable");
        assert_eq!(stats.rx_dropped, 1, "{stats:?}");
        // The next packet lands in the buffers the dropped one did not use up: 12 bytes in
        // the first, the rest in the next.
        assert_eq!(
            (stats.rx_packets, stats.rx_bytes),
            (1, 1514 - 12),
            "{stats:?}"
        );
    }

    /// A few thousand pseudo-random memories with plausible rings: a smoke run of the fuzz
    /// targets on stable, so they cannot rot. The real fuzzing is `cargo fuzz` (fuzz/).
    #[test]
    fn fuzz_entry_points_survive_random_inputs() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut net = NetStats::default();
        for round in 0..2000 {
            let mut data = vec![0u8; 0x800 + (round % 7) * 0x100];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            let size = 1usize << (data[0] % 5);
            plausible_rings(&mut data[1..], 0, size, None, &mut rng);
            virtio_blk(&data);
            virtio_rng(&data);
            vsock_header(&data[1..]);

            // virtio-net: 7 control bytes (the block queue's descriptors above overlap
            // them: draw them again), then two queues' rings.
            for b in &mut data[1..7] {
                *b = rng.next() as u8;
            }
            let tx_size = 1usize << (data[1] % 5);
            plausible_rings(&mut data[7..], 0, size, Some(true), &mut rng);
            plausible_rings(
                &mut data[7..],
                SECOND_QUEUE as usize,
                tx_size,
                Some(false),
                &mut rng,
            );
            // Plenty of packets, and half of the time MRG_RXBUF.
            data[2] |= 0x1C;
            if let Some(s) = virtio_net(&data) {
                net.rx_packets += s.rx_packets;
                net.rx_dropped += s.rx_dropped;
                net.tx_packets += s.tx_packets;
                net.tx_errors += s.tx_errors;
            }
        }
        // The inputs reached the packet paths, both ways, well-formed and not.
        assert!(net.rx_packets > 100 && net.rx_dropped > 100, "{net:?}");
        assert!(net.tx_packets > 100 && net.tx_errors > 100, "{net:?}");
    }
}
