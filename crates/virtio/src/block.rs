//! virtio-blk backed by a raw image file (or host block device).
//!
//! Requests are served on the device's thread, straight between the file and guest memory
//! with no copy in between. What can be done at once is done at once with `pread`/`pwrite`
//! (`preadv`/`pwritev` when a request spans several buffers): a read the page cache holds
//! (tried with `RWF_NOWAIT`), a buffered write, and everything on tmpfs. What may wait for
//! the storage (a read the page cache cannot answer, O_DIRECT I/O, a flush) goes to the
//! disk's io_uring ([`crate::uring`]), so that many requests are in flight at once, and
//! the thread returns those chains when their completions come back (`aio=sync` keeps the
//! old one-at-a-time way). FLUSH is `fdatasync`, so what the guest flushed survives a host
//! crash. DISCARD and unmapping WRITE_ZEROES punch holes in the file. A read-only disk is
//! opened read-only: writes fail with an I/O error to the guest and the file cannot
//! change. Images are locked (shared for read-only, exclusive otherwise) so two VMs cannot
//! write the same file by mistake.
//!
//! Snapshots: the thread looks at a stop request only between passes over the queue, and
//! before it stops it waits for every request in flight and publishes it in the used ring.
//! So a paused device has nothing in flight. The disk itself is wiring: the restorer opens
//! it again, and [`BlockState`] only checks that it still shows the guest the same
//! capacity, read-only flag and serial.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};
use vmon_memory::GuestMemory;

use crate::chain::{self, Chain, Popped, Taken};
use crate::metrics::{CounterSet, DeviceMetrics};
use crate::rate_limiter::{Limits, RateLimiter};
use crate::uring::Uring;
use crate::worker::{AdaptivePoll, EventLoop, Parked, Wake, Worker};
use crate::{
    device_id, ActivateError, Activation, DeviceState, DeviceStateError, PauseError, VirtioDevice,
    COMMON_FEATURES,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Buffers per request Linux may use besides the header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest discard or write-zeroes range per segment, in sectors (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const SERIAL_LEN: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
const IOV_MAX: usize = 1024;
const QUEUE_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;
const COMPLETION_TOKEN: u64 = 2;

const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;

const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
const WRITE_ZEROES_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// Up to 20 bytes the guest reads as the disk's serial (`/sys/block/vdX/serial`).
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Bytes and requests per second the guest may use.
    pub limits: Limits,
    /// Longest the device thread spins for the driver's next request before it sleeps
    /// (the window adapts below this; see [`AdaptivePoll`]). Zero never spins.
    pub poll: Duration,
    /// How requests reach the file.
    pub aio: Aio,
}

/// How a disk's requests reach its file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// Requests that may wait for the storage (reads the page cache cannot answer at once,
    /// O_DIRECT reads and writes, flushes) go through io_uring, many in flight at a time;
    /// the rest are served at once on the disk's thread. Falls back to `Sync`, with a
    /// warning, where the host refuses io_uring.
    #[default]
    IoUring,
    /// One request at a time on the disk's thread, with `pread`/`pwrite`.
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk '{path}': {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk '{path}' is in use by another process (it is locked)")]
    Locked { path: PathBuf },
    #[error("disk '{path}' is empty: an image needs at least one 512-byte sector")]
    Empty { path: PathBuf },
    #[error("disk serial '{0}' is longer than 20 bytes")]
    SerialTooLong(String),
}

/// Indices into [`BLOCK_COUNTERS`].
mod counter {
    pub const READS: usize = 0;
    pub const READ_BYTES: usize = 1;
    pub const WRITES: usize = 2;
    pub const WRITE_BYTES: usize = 3;
    pub const FLUSHES: usize = 4;
    pub const DISCARDS: usize = 5;
    pub const OTHER_REQUESTS: usize = 6;
    pub const ERRORS: usize = 7;
    pub const BAD_CHAINS: usize = 8;
    pub const THROTTLED: usize = 9;
}
/// Requests by kind, payload bytes, requests answered with an error status, malformed
/// chains, and times the rate limiter held the queue back.
static BLOCK_COUNTERS: [&str; 10] = [
    "read_requests",
    "read_bytes",
    "write_requests",
    "write_bytes",
    "flush_requests",
    "discard_requests",
    "other_requests",
    "errors",
    "bad_chains",
    "throttled",
];

/// An open image and what the guest may do with it.
pub struct Disk {
    file: File,
    counters: Arc<CounterSet>,
    limits: Limits,
    poll: Duration,
    aio: Aio,
    sectors: u64,
    readonly: bool,
    direct: bool,
    serial: [u8; SERIAL_LEN],
}

impl Disk {
    pub fn open(opts: &DiskOptions) -> Result<Disk, DiskError> {
        let open_err = |source| DiskError::Open {
            path: opts.path.clone(),
            source,
        };
        let mut serial = [0u8; SERIAL_LEN];
        if let Some(s) = &opts.serial {
            if s.len() > SERIAL_LEN {
                return Err(DiskError::SerialTooLong(s.clone()));
            }
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.readonly)
            .custom_flags(flags)
            .open(&opts.path)
            .map_err(open_err)?;
        let lock = if opts.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked {
                    path: opts.path.clone(),
                }
            } else {
                open_err(e)
            });
        }
        let bytes = size_of_file(&file, &opts.path).map_err(open_err)?;
        if bytes < SECTOR_SIZE {
            return Err(DiskError::Empty {
                path: opts.path.clone(),
            });
        }
        if bytes % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %opts.path.display(),
                bytes,
                "disk size is not a multiple of 512; the last partial sector is not visible"
            );
        }
        Ok(Disk {
            file,
            counters: CounterSet::new(&BLOCK_COUNTERS),
            limits: opts.limits,
            poll: opts.poll,
            aio: opts.aio,
            sectors: bytes / SECTOR_SIZE,
            readonly: opts.readonly,
            direct: opts.direct,
            serial,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// A writable disk of `sectors` on `file` as it is, with O_DIRECT's path (every
    /// transfer goes to the ring): on a pipe, storage that answers only when the test says.
    #[cfg(test)]
    pub(crate) fn on_file_for_tests(file: File, sectors: u64) -> Disk {
        Disk {
            file,
            counters: CounterSet::new(&BLOCK_COUNTERS),
            limits: Limits::default(),
            poll: Duration::ZERO,
            aio: Aio::default(),
            sectors,
            readonly: false,
            direct: true,
            serial: [0; SERIAL_LEN],
        }
    }
}

fn size_of_file(file: &File, path: &Path) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        return io::Seek::seek(&mut f, io::SeekFrom::End(0));
    }
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    Ok(meta.len())
}

/// What the guest sees of a disk besides its contents: checked against the reopened disk
/// on restore, since a driver keeps using the capacity and flags it read at probe time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub sectors: u64,
    pub read_only: bool,
    /// The serial as the guest reads it: up to 20 bytes, NUL-padded.
    pub serial: Vec<u8>,
}

pub struct Block {
    disk: Option<Disk>,
    counters: Arc<CounterSet>,
    config: [u8; 60],
    features: u64,
    serial: [u8; SERIAL_LEN],
    worker: Option<Worker<Parked<Disk>>>,
    name: String,
}

impl Block {
    pub fn new(disk: Disk, name: String) -> Self {
        let mut features = COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if disk.readonly {
            features |= F_RO;
        } else {
            features |= F_DISCARD | F_WRITE_ZEROES;
        }
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        // Holes are punched in 4 KiB blocks on most filesystems.
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        Block {
            counters: disk.counters.clone(),
            serial: disk.serial,
            disk: Some(disk),
            config: c,
            features,
            worker: None,
            name,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        device_id::BLOCK
    }

    fn pci_class(&self) -> u32 {
        0x01_8000 // mass storage, other
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: a.queues.len(),
                want: 1,
            });
        }
        let mut disk = self.disk.take().ok_or(ActivateError::BackendLost)?;
        let mut limiter = if disk.limits.is_unlimited() {
            None
        } else {
            match RateLimiter::new(disk.limits) {
                Ok(l) => Some(l),
                Err(e) => {
                    self.disk = Some(disk);
                    return Err(ActivateError::Thread(e));
                }
            }
        };
        let mut q = a.queues.remove(0);
        let poll_max = disk.poll;
        let name = self.name.clone();
        let thread = format!("virtio-blk {}", self.name);
        let worker = Worker::spawn_device(thread, a.interrupt.clone(), move |mut events| {
            let mem = &a.memory;
            let notify = q.notify.as_raw_fd();
            let mut in_flight = InFlight::new(&disk, &name);
            let watched = events
                .add(notify, QUEUE_TOKEN, false)
                .and_then(|()| match &limiter {
                    Some(l) => events.add(l.as_raw_fd(), LIMITER_TOKEN, false),
                    None => Ok(()),
                })
                .and_then(|()| match &in_flight {
                    Some(f) => events.add(f.uring.completion_fd(), COMPLETION_TOKEN, false),
                    None => Ok(()),
                });
            let mut used = Vec::new();
            if let Err(e) = watched {
                a.interrupt.fail_device(&format!("watching the queue: {e}"));
            } else {
                let mut tokens = vec![QUEUE_TOKEN];
                let mut poll = AdaptivePoll::new(poll_max);
                loop {
                    if tokens.contains(&LIMITER_TOKEN) {
                        if let Some(l) = &mut limiter {
                            l.timer_fired();
                        }
                    }
                    if let Some(f) = &mut in_flight {
                        if tokens.contains(&COMPLETION_TOKEN) {
                            f.reap(&disk, mem, &mut used);
                            match give_back(&mut q.queue, mem, &mut used) {
                                Ok(true) => a.interrupt.signal_queue(0),
                                Ok(false) => {}
                                Err(e) => {
                                    a.interrupt.fail_device(&e.to_string());
                                    break;
                                }
                            }
                        }
                    }
                    let _ = q.notify.read();
                    let served = chain::serve_some(&mut q.queue, mem, |p| {
                        if !admit(&mut limiter, request_bytes(&p), &disk.counters) {
                            return Taken::Declined;
                        }
                        match &mut in_flight {
                            Some(f) => f.take(&mut disk, mem, p),
                            None => Taken::Used(handle(&mut disk, mem, p)),
                        }
                    });
                    let submitted = match &mut in_flight {
                        Some(f) => f.uring.submit(),
                        None => Ok(()),
                    };
                    if let Some(f) = &mut in_flight {
                        if let Some(why) = f.broken.take() {
                            let why = match f.settle(&disk, mem, &mut q.queue) {
                                Ok(_) => why,
                                Err(e) => format!("{why}; {e}"),
                            };
                            a.interrupt.fail_device(&why);
                            break;
                        }
                    }
                    let stalled = match (served, submitted) {
                        (Ok(s), Ok(())) => {
                            if s.notify {
                                a.interrupt.signal_queue(0);
                            }
                            s.stalled
                        }
                        (Err(e), _) => {
                            // What was taken before the ring broke still reaches the
                            // driver, as served chains do; then NEEDS_RESET: serve nothing
                            // more until the driver resets us.
                            if let Some(f) = &mut in_flight {
                                if let Err(e) = f.settle(&disk, mem, &mut q.queue) {
                                    tracing::error!("virtio-blk {name}: {e}");
                                }
                            }
                            a.interrupt.fail_device(&e.to_string());
                            break;
                        }
                        (_, Err(e)) => {
                            a.interrupt
                                .fail_device(&format!("submitting to io_uring: {e}"));
                            break;
                        }
                    };
                    // A throttled queue waits for its timer, not for the driver. With
                    // requests in flight their completions wake the thread, so it sleeps.
                    let idle_since = Instant::now();
                    let busy = in_flight.as_ref().is_some_and(|f| f.count > 0);
                    let more = !stalled
                        && !busy
                        && !poll.window().is_zero()
                        && chain::spin_for_more(&mut q.queue, mem, |ready| poll.spin(ready));
                    let wake = if more {
                        events.ready_now()
                    } else {
                        let wake = events.wait();
                        if !busy {
                            poll.slept(idle_since.elapsed());
                        }
                        wake
                    };
                    match wake {
                        // Stopping here, between passes, with what was in flight finished
                        // and in the used ring, leaves nothing in flight. A pause that
                        // gave up waiting for the storage withdraws its request: then
                        // what finished meanwhile is returned and serving goes on.
                        Wake::Stop => {
                            let drained = match &mut in_flight {
                                Some(f) => f.drain_for_stop(&disk, mem, &mut used, &events),
                                None => Ok(true),
                            };
                            let given_back = give_back(&mut q.queue, mem, &mut used);
                            match (drained, given_back) {
                                (Ok(drained), Ok(signal)) => {
                                    if signal {
                                        a.interrupt.signal_queue(0);
                                    }
                                    if drained && events.confirm_stop() {
                                        return Parked {
                                            backend: disk,
                                            queues: vec![q.queue],
                                        };
                                    }
                                    tokens = Vec::new();
                                }
                                // Requests the driver offered were not all returned: a
                                // snapshot must not pass for complete.
                                (Err(e), _) => {
                                    a.interrupt.fail_device(&e);
                                    break;
                                }
                                (_, Err(e)) => {
                                    a.interrupt.fail_device(&e.to_string());
                                    break;
                                }
                            }
                        }
                        Wake::Ready(t) => tokens = t,
                    }
                }
            }
            // Broken: nothing more reaches the rings, but nothing may stay in flight
            // either once the transport takes the queue back.
            if let Some(f) = &mut in_flight {
                if let Err(e) = f.drain(&disk, mem, &mut used) {
                    tracing::error!("virtio-blk {name}: {e}");
                }
            }
            // Keep the disk until the transport stops us, so a reset can reuse it.
            events.idle_until_stop();
            Parked {
                backend: disk,
                queues: vec![q.queue],
            }
        })
        .map_err(ActivateError::Thread);
        match worker {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn metrics(&self) -> Arc<dyn DeviceMetrics> {
        self.counters.clone()
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.disk = w.stop().map(|p| p.backend);
            if self.disk.is_none() {
                tracing::error!(disk = %self.name, "virtio-blk thread died; the disk is gone");
            }
        }
    }

    fn pause(&mut self, within: Duration) -> Result<Vec<Queue>, PauseError> {
        let Some(w) = self.worker.take() else {
            return Ok(Vec::new());
        };
        match w.try_stop(within) {
            Ok(parked) => {
                let parked = parked.ok_or(PauseError::ThreadDied)?;
                self.disk = Some(parked.backend);
                Ok(parked.queues)
            }
            Err(w) => {
                self.worker = Some(w);
                Err(PauseError::Busy {
                    device: self.name.clone(),
                    after: within,
                })
            }
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            sectors: self.sectors(),
            read_only: self.features & F_RO != 0,
            serial: self.serial.to_vec(),
        })
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Block(s) = state else {
            return Err(DeviceStateError::wrong_kind(state, "block"));
        };
        if s.serial.len() > SERIAL_LEN {
            return Err(DeviceStateError::Invalid(format!(
                "a disk serial of {} bytes (at most {SERIAL_LEN})",
                s.serial.len()
            )));
        }
        let mismatch =
            |what: String| Err(DeviceStateError::Mismatch(format!("{}: {what}", self.name)));
        if s.sectors != self.sectors() {
            return mismatch(format!(
                "the guest saw {} sectors, the disk now has {}",
                s.sectors,
                self.sectors()
            ));
        }
        if s.read_only != (self.features & F_RO != 0) {
            return mismatch(format!(
                "the guest saw a {} disk, it is now opened {}",
                if s.read_only { "read-only" } else { "writable" },
                if s.read_only { "writable" } else { "read-only" }
            ));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..s.serial.len()].copy_from_slice(&s.serial);
        if serial != self.serial {
            return mismatch("the disk serial changed".into());
        }
        Ok(())
    }
}

impl Block {
    fn sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[0..8]);
        u64::from_le_bytes(b)
    }
}

/// Returns the chains finished in flight to the driver; says whether it wants an
/// interrupt for them.
fn give_back(
    queue: &mut Queue,
    mem: &GuestMemory,
    used: &mut Vec<(u16, u32)>,
) -> Result<bool, chain::QueueBroken> {
    if used.is_empty() {
        return Ok(false);
    }
    let since = queue.next_used();
    let published = chain::complete_together(queue, mem, used);
    used.clear();
    published?;
    chain::wants_interrupt(queue, mem, since)
}

/// What a request costs against a byte limit: the data it moves, header and status aside.
/// Whether the rate limiter (if any) lets a request of `bytes` through now. `throttled`
/// counts holds, not refusals: while the queue is held every wake-up (a completion, a
/// driver notification) asks again and is refused again until the limiter's timer fires.
fn admit(limiter: &mut Option<RateLimiter>, bytes: u64, counters: &CounterSet) -> bool {
    let Some(l) = limiter else { return true };
    let held = l.is_blocked();
    if l.consume(bytes) {
        return true;
    }
    if !held {
        counters.add(counter::THROTTLED, 1);
    }
    false
}

fn request_bytes(p: &Popped) -> u64 {
    p.chain.as_ref().map_or(0, |c| {
        c.readable_len().saturating_sub(HEADER_LEN) + c.writable_len().saturating_sub(1)
    })
}

/// Serves every request on `queue` at once, on the calling thread: what the device thread
/// does per wake-up, without rate limits. For the fuzz target and tests.
#[doc(hidden)]
pub fn serve_queue(
    disk: &mut Disk,
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemory,
) -> Result<bool, chain::QueueBroken> {
    chain::serve_all(queue, mem, |p| handle(disk, mem, p))
}

/// The device thread's io_uring state, for [`serve_queue_in_flight`].
#[doc(hidden)]
pub struct RingForTests(InFlight);

/// A ring for `disk`, or `None` where the host refuses io_uring.
#[doc(hidden)]
pub fn ring_for_tests(disk: &Disk) -> Option<RingForTests> {
    InFlight::new(disk, "test").map(RingForTests)
}

/// [`serve_queue`] the way the device thread serves with `aio=io_uring`: requests that may
/// wait start on the ring, then everything in flight is finished and returned. For the fuzz
/// target and tests.
#[doc(hidden)]
pub fn serve_queue_in_flight(
    disk: &mut Disk,
    ring: &mut RingForTests,
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemory,
) -> Result<bool, chain::QueueBroken> {
    let f = &mut ring.0;
    let served = chain::serve_some(queue, mem, |p| f.take(disk, mem, p));
    f.broken = None;
    let given_back = f.settle(disk, mem, queue).unwrap_or_else(|e| {
        tracing::debug!("virtio-blk: {e}");
        false
    });
    Ok(served?.notify | given_back)
}

/// Serves one request and returns the number of bytes written into its buffers.
fn handle(disk: &mut Disk, mem: &GuestMemory, p: Popped) -> u32 {
    let Some((chain, status_at)) = usable(disk, p.chain) else {
        return 0;
    };
    let (kind, plan) = plan(disk, mem, &chain, status_at);
    let (status, data_written) = match plan {
        Plan::Done(status, n) => (status, n),
        Plan::Transfer(mut t) => (run_transfer(disk, mem, &chain, &mut t), t.written()),
        // SAFETY: fdatasync on a descriptor we own; no memory is involved.
        Plan::Flush => match unsafe { libc::fdatasync(disk.file.as_raw_fd()) } {
            0 => (S_OK, 0),
            _ => (S_IOERR, 0),
        },
    };
    finish(disk, mem, &chain, status_at, kind, status, data_written)
}

/// The chain and the offset of its status byte, or `None` for a chain the device cannot
/// even answer (malformed, or without a status byte), which goes back with nothing written.
fn usable(disk: &Disk, chain: Result<Chain, chain::ChainError>) -> Option<(Chain, u64)> {
    let chain = match chain {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("virtio-blk: bad descriptor chain: {e}");
            disk.counters.add(counter::BAD_CHAINS, 1);
            return None;
        }
    };
    // The status byte is the last writable byte; without one we cannot even say no.
    let Some(status_at) = chain.writable_len().checked_sub(1) else {
        tracing::debug!("virtio-blk: request without a status byte");
        disk.counters.add(counter::BAD_CHAINS, 1);
        return None;
    };
    Some((chain, status_at))
}

/// Counts a finished request, writes its status and returns the bytes written into its
/// buffers (what the used ring reports).
fn finish(
    disk: &Disk,
    mem: &GuestMemory,
    chain: &Chain,
    status_at: u64,
    kind: Option<u32>,
    status: u8,
    data_written: u32,
) -> u32 {
    let c = &disk.counters;
    if let Some(kind) = kind {
        match kind {
            T_IN => c.add(counter::READS, 1),
            T_OUT => c.add(counter::WRITES, 1),
            T_FLUSH => c.add(counter::FLUSHES, 1),
            T_DISCARD | T_WRITE_ZEROES => c.add(counter::DISCARDS, 1),
            _ => c.add(counter::OTHER_REQUESTS, 1),
        }
        if status == S_OK {
            match kind {
                T_IN => c.add(counter::READ_BYTES, u64::from(data_written)),
                T_OUT => c.add(
                    counter::WRITE_BYTES,
                    chain.readable_len().saturating_sub(HEADER_LEN),
                ),
                _ => {}
            }
        }
    }
    if status != S_OK {
        c.add(counter::ERRORS, 1);
    }
    if chain.write_byte_at(mem, status_at, status).is_err() {
        return 0;
    }
    data_written + 1
}

/// What a request still needs from the file once its header has been checked.
enum Plan {
    /// Nothing: it is finished (or refused), with this status and data bytes written.
    Done(u8, u32),
    Transfer(Transfer),
    Flush,
}

/// A read or write between the file and the request's buffers, as far as it has got.
struct Transfer {
    write: bool,
    /// Where in the file what is left starts.
    offset: u64,
    /// The whole payload, and what is left of it.
    len: u64,
    left: u64,
    /// The guest buffers of what is left.
    iov: chain::IoVecs,
}

impl Transfer {
    fn dir(&self) -> Direction {
        if self.write {
            Direction::Write
        } else {
            Direction::Read
        }
    }

    /// Data bytes written into the guest's buffers once it is done.
    fn written(&self) -> u32 {
        if self.write {
            0
        } else {
            self.len as u32
        }
    }

    /// Drops the first `n` bytes, done.
    fn advance(&mut self, n: u64) {
        self.offset += n;
        self.left -= n;
        advance_iovecs(&mut self.iov, n as usize);
    }
}

/// Drops the first `n` bytes from `iov`.
fn advance_iovecs(iov: &mut chain::IoVecs, mut n: usize) {
    let whole = iov.iter().take_while(|v| {
        let take = n >= v.iov_len;
        if take {
            n -= v.iov_len;
        }
        take
    });
    let whole = whole.count();
    iov.drain(..whole);
    if let Some(v) = iov.first_mut() {
        v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
        v.iov_len -= n;
    }
}

/// Reads and checks the request's header: its type (`None` if the header is unreadable)
/// and what is left to do.
fn plan(disk: &Disk, mem: &GuestMemory, chain: &Chain, status_at: u64) -> (Option<u32>, Plan) {
    let mut header = [0u8; HEADER_LEN as usize];
    if chain.read_at(mem, 0, &mut header).is_err() {
        return (None, Plan::Done(S_IOERR, 0));
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let out_len = chain.readable_len() - HEADER_LEN;
    // Each request moves its payload one way. A payload buffer facing the other way (a
    // read into device-readable memory, a write from device-writable memory) is a broken
    // request: serving what is left of it would report success for data never moved.
    let misdirected = match kind {
        T_IN | T_GET_ID => out_len != 0,
        T_OUT | T_DISCARD | T_WRITE_ZEROES => status_at != 0,
        _ => false,
    };
    if misdirected {
        tracing::debug!(kind, "virtio-blk: payload buffer in the wrong direction");
        return (Some(kind), Plan::Done(S_IOERR, 0));
    }
    let transfer = |write: bool, len: u64| -> Plan {
        let iov = byte_range(disk, sector, len).and_then(|offset| {
            let iov = if write {
                chain.readable_iovecs(mem, HEADER_LEN, len)
            } else {
                chain.writable_iovecs(mem, 0, len)
            };
            iov.map(|iov| (offset, iov)).map_err(|_| S_IOERR)
        });
        match iov {
            Ok((offset, iov)) => Plan::Transfer(Transfer {
                write,
                offset,
                len,
                left: len,
                iov,
            }),
            Err(status) => Plan::Done(status, 0),
        }
    };
    let done = |r: Result<u32, u8>| match r {
        Ok(n) => Plan::Done(S_OK, n),
        Err(status) => Plan::Done(status, 0),
    };
    let plan = match kind {
        T_IN => transfer(false, status_at),
        T_OUT if disk.readonly => Plan::Done(S_IOERR, 0),
        T_OUT => transfer(true, out_len),
        T_FLUSH if disk.readonly => Plan::Done(S_OK, 0),
        T_FLUSH => Plan::Flush,
        T_GET_ID => {
            let n = status_at.min(SERIAL_LEN as u64) as usize;
            done(
                chain
                    .write_at(mem, 0, &disk.serial[..n])
                    .map(|_| n as u32)
                    .map_err(|_| S_IOERR),
            )
        }
        T_DISCARD | T_WRITE_ZEROES if disk.readonly => Plan::Done(S_IOERR, 0),
        T_DISCARD | T_WRITE_ZEROES => done(discard(disk, mem, chain, kind, out_len).map(|_| 0)),
        _ => Plan::Done(S_UNSUPP, 0),
    };
    (Some(kind), plan)
}

/// The byte offset of `sectors` sectors at `sector`, if they lie inside the disk.
fn byte_range(disk: &Disk, sector: u64, bytes: u64) -> Result<u64, u8> {
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(S_IOERR);
    }
    match sector.checked_add(bytes / SECTOR_SIZE) {
        Some(end) if end <= disk.sectors => Ok(sector * SECTOR_SIZE),
        _ => Err(S_IOERR),
    }
}

/// Does what is left of `t` on the calling thread; returns the request's status.
fn run_transfer(disk: &Disk, mem: &GuestMemory, chain: &Chain, t: &mut Transfer) -> u8 {
    let dir = t.dir();
    match transfer(&disk.file, &mut t.iov, t.offset, dir) {
        Ok(()) => S_OK,
        Err(e) if disk.direct && e.raw_os_error() == Some(libc::EINVAL) => {
            // The host's O_DIRECT alignment rules refuse the guest's buffers: go through
            // an aligned buffer, from the start of the request.
            let bounced = if t.write {
                bounce_write(disk, mem, chain, t.offset + t.left - t.len, t.len)
            } else {
                bounce_read(disk, mem, chain, t.offset + t.left - t.len, t.len)
            };
            bounced.map_or_else(|status| status, |()| S_OK)
        }
        Err(e) => {
            tracing::debug!("virtio-blk: {} at {}: {e}", dir.name(), t.offset);
            S_IOERR
        }
    }
}

/// Requests started through io_uring and not finished yet, by the head of their chain
/// (which the driver cannot offer again until the device returns it).
struct InFlight {
    uring: Uring,
    slots: Box<[Option<Started>]>,
    count: usize,
    /// The file answers page-cache hits at once under `RWF_NOWAIT`. Some file systems
    /// refuse the flag (EOPNOTSUPP): then every buffered read goes to the ring, except on
    /// tmpfs and ramfs, whose reads never wait for a device and are served in place.
    nowait_reads: bool,
    in_memory: bool,
    /// Why the driver broke the queue while requests were in flight (a chain offered
    /// again before it was returned): the device drains and then needs a reset.
    broken: Option<String>,
}

/// How often a request the kernel completed with EAGAIN or EINTR is tried again before the
/// guest gets an I/O error.
const RETRIES: u8 = 8;

struct Started {
    chain: Chain,
    status_at: u64,
    kind: u32,
    work: Option<Transfer>,
    retries: u8,
}

impl Started {
    /// Queues what is left of the request on the ring, tagged with its head.
    fn push(&self, uring: &mut Uring, head: u16) -> io::Result<()> {
        match &self.work {
            // SAFETY: the iovecs live in this slot and point into guest RAM, which stays
            // mapped while the device runs; the slot is emptied only once the completion is
            // reaped, and the device thread waits for every completion before it stops.
            Some(t) => unsafe { uring.push_transfer(t.write, &t.iov, t.offset, u64::from(head)) },
            None => uring.push_fdatasync(u64::from(head)),
        }
    }
}

impl InFlight {
    /// A ring for `disk`, or `None` (with the reason logged) to serve it synchronously.
    fn new(disk: &Disk, name: &str) -> Option<InFlight> {
        if disk.aio == Aio::Sync {
            return None;
        }
        match Uring::new(disk.file.as_raw_fd(), u32::from(QUEUE_SIZE)) {
            Ok(uring) => Some(InFlight {
                uring,
                slots: (0..QUEUE_SIZE).map(|_| None).collect(),
                count: 0,
                nowait_reads: true,
                in_memory: in_memory(&disk.file),
                broken: None,
            }),
            Err(e) => {
                tracing::warn!(
                    "virtio-blk {name}: io_uring unavailable ({e}); serving one request at a time"
                );
                None
            }
        }
    }

    /// Serves a request, or starts it and leaves it in flight.
    fn take(&mut self, disk: &mut Disk, mem: &GuestMemory, p: Popped) -> Taken {
        let head = p.head;
        let Some((chain, status_at)) = usable(disk, p.chain) else {
            return Taken::Used(0);
        };
        if self.slots[usize::from(head)].is_some() {
            // The driver offered a chain that is still in flight: its ring is broken. Leave
            // the request in flight alone; the device stops serving, drains and needs a
            // reset.
            disk.counters.add(counter::BAD_CHAINS, 1);
            self.broken = Some(format!(
                "descriptor head {head} offered again while the device still holds it"
            ));
            return Taken::Declined;
        }
        let (kind, plan) = plan(disk, mem, &chain, status_at);
        let work = match plan {
            Plan::Done(status, n) => {
                return Taken::Used(finish(disk, mem, &chain, status_at, kind, status, n))
            }
            Plan::Flush => None,
            Plan::Transfer(mut t) => {
                if !self.must_wait(disk, &mut t) {
                    let status = run_transfer(disk, mem, &chain, &mut t);
                    let n = t.written();
                    return Taken::Used(finish(disk, mem, &chain, status_at, kind, status, n));
                }
                Some(t)
            }
        };
        let slot = self.slots[usize::from(head)].insert(Started {
            chain,
            status_at,
            kind: kind.unwrap_or(T_FLUSH),
            work,
            retries: 0,
        });
        match slot.push(&mut self.uring, head) {
            Ok(()) => {
                self.count += 1;
                Taken::Pending
            }
            Err(e) => {
                tracing::warn!("virtio-blk: io_uring refused a request: {e}");
                let s = self.slots[usize::from(head)].take().expect("just filled");
                Taken::Used(finish(disk, mem, &s.chain, s.status_at, kind, S_IOERR, 0))
            }
        }
    }

    /// Whether a transfer can wait on the storage, and so goes to the ring. A buffered read
    /// the page cache holds is done here at once (`RWF_NOWAIT`; part of it, perhaps, the
    /// rest then goes to the ring); a buffered write lands in the page cache, so it is done
    /// here too.
    fn must_wait(&mut self, disk: &Disk, t: &mut Transfer) -> bool {
        if t.left == 0 || t.iov.len() > IOV_MAX {
            // Nothing to move, or more buffers than one readv takes (served in pieces).
            return false;
        }
        if disk.direct {
            return true;
        }
        if t.write {
            return false;
        }
        if !self.nowait_reads {
            return !self.in_memory;
        }
        // SAFETY: the iovecs point into guest RAM, mapped while the device runs.
        let n = unsafe {
            libc::preadv2(
                disk.file.as_raw_fd(),
                t.iov.as_ptr(),
                t.iov.len() as i32,
                t.offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match n {
            n if n > 0 => {
                t.advance(n as u64);
                t.left > 0
            }
            0 => false, // the end of the file: the synchronous path reports it
            _ => match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => true,
                Some(libc::EOPNOTSUPP) => {
                    self.nowait_reads = false;
                    !self.in_memory
                }
                _ => false, // the synchronous path retries and reports it
            },
        }
    }

    /// Finishes what the ring has completed; returns the chains to give back.
    fn reap(&mut self, disk: &Disk, mem: &GuestMemory, used: &mut Vec<(u16, u32)>) {
        let slots = &mut self.slots;
        let count = &mut self.count;
        let mut resubmit = Vec::new();
        self.uring.reap(|tag, result| {
            let head = tag as u16;
            let Some(s) = slots.get_mut(usize::from(head)).and_then(|s| s.as_mut()) else {
                return;
            };
            let what = s.work.as_ref().map_or("flush", |t| t.dir().name());
            let status = match (&mut s.work, result) {
                (None, 0) => S_OK,
                (Some(t), n) if n > 0 => {
                    t.advance(n as u64);
                    if t.left > 0 {
                        // A short transfer: the rest goes back to the ring.
                        resubmit.push(head);
                        return;
                    }
                    S_OK
                }
                // The kernel does not retry every transient failure itself (a request it
                // could not issue without blocking, a spurious EAGAIN from a driver).
                (_, e) if (e == -libc::EAGAIN || e == -libc::EINTR) && s.retries < RETRIES => {
                    s.retries += 1;
                    resubmit.push(head);
                    return;
                }
                (Some(t), e) if disk.direct && e == -libc::EINVAL => {
                    run_transfer(disk, mem, &s.chain, t)
                }
                (Some(t), 0) => {
                    tracing::debug!("virtio-blk: {what} at {}: end of the file", t.offset);
                    S_IOERR
                }
                (_, e) => {
                    let e = io::Error::from_raw_os_error(-e);
                    tracing::debug!("virtio-blk: {what} failed: {e}");
                    S_IOERR
                }
            };
            let s = slots[usize::from(head)].take().expect("checked above");
            *count -= 1;
            let n = s.work.as_ref().map_or(0, Transfer::written);
            let written = finish(disk, mem, &s.chain, s.status_at, Some(s.kind), status, n);
            used.push((head, written));
        });
        for head in resubmit {
            let s = self.slots[usize::from(head)].as_ref().expect("in flight");
            if s.push(&mut self.uring, head).is_err() {
                let s = self.slots[usize::from(head)].take().expect("in flight");
                self.count -= 1;
                let written = finish(disk, mem, &s.chain, s.status_at, Some(s.kind), S_IOERR, 0);
                used.push((head, written));
            }
        }
    }

    /// Waits for everything in flight and returns it to the driver: whether the driver
    /// wants an interrupt for it, or why the device needs a reset.
    fn settle(
        &mut self,
        disk: &Disk,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<bool, String> {
        let mut used = Vec::new();
        let drained = self.drain(disk, mem, &mut used);
        let given_back = give_back(queue, mem, &mut used).map_err(|e| e.to_string());
        drained?;
        given_back
    }

    /// [`Self::drain`] for a stop request: whether everything finished, or (false) the
    /// request was withdrawn first, leaving the rest in flight.
    fn drain_for_stop(
        &mut self,
        disk: &Disk,
        mem: &GuestMemory,
        used: &mut Vec<(u16, u32)>,
        events: &EventLoop,
    ) -> Result<bool, String> {
        while self.count > 0 {
            if events.stop_withdrawn() {
                return Ok(false);
            }
            if let Err(e) = self.uring.wait_or(events.withdrawn_fd()) {
                return Err(format!(
                    "waiting for {} requests in flight: {e}",
                    self.count
                ));
            }
            self.reap(disk, mem, used);
        }
        Ok(true)
    }

    /// Waits for everything in flight and finishes it.
    fn drain(
        &mut self,
        disk: &Disk,
        mem: &GuestMemory,
        used: &mut Vec<(u16, u32)>,
    ) -> Result<(), String> {
        while self.count > 0 {
            if let Err(e) = self.uring.wait() {
                // The kernel still holds these requests; the driver must not think them
                // done, so the device reports that it needs a reset.
                return Err(format!(
                    "waiting for {} requests in flight: {e}",
                    self.count
                ));
            }
            self.reap(disk, mem, used);
        }
        Ok(())
    }
}

impl Drop for InFlight {
    /// Every way out of the device loop drains the ring first, so as a rule nothing is in
    /// flight by now. A panic unwinding through the loop skips that: the kernel would still
    /// hold requests whose buffers are guest memory (and this struct's iovecs), and write
    /// there after the device has failed, after the driver's reset, or while a snapshot
    /// saves the memory. So wait for them here, as a stop does, finishing none toward the
    /// driver: the device needs a reset by then.
    fn drop(&mut self) {
        while self.count > 0 {
            if let Err(e) = self.uring.wait() {
                tracing::error!("virtio-blk: {} requests left in flight: {e}", self.count);
                return;
            }
            let (slots, count) = (&mut self.slots, &mut self.count);
            self.uring.reap(|tag, _| {
                if let Some(slot) = slots.get_mut(tag as usize) {
                    if slot.take().is_some() {
                        *count -= 1;
                    }
                }
            });
        }
    }
}

/// Whether `file` lives in memory (tmpfs, ramfs), where a read never waits for a device.
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct we pass, on a descriptor we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), fs.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled the struct.
    let fs = unsafe { fs.assume_init() };
    // f_type is i64 here and a narrower type on some other architectures.
    #[allow(clippy::unnecessary_cast)]
    let kind = fs.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// Moves every byte the iovecs describe, resuming after short transfers (which consume
/// `iov`).
fn transfer(
    file: &File,
    iov: &mut [libc::iovec],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let batch = &iov[start..iov.len().min(start + IOV_MAX)];
        // SAFETY: every iovec points into guest RAM, checked by vm-memory when the chain
        // was built and mapped for as long as the device thread holds its GuestMemory.
        // The kernel reads or writes exactly those ranges; the guest racing us on the same
        // bytes only changes the data, never memory safety.
        let n = unsafe { transfer_once(file.as_raw_fd(), batch, offset as libc::off_t, dir) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of disk file",
            ));
        }
        offset += n as u64;
        let mut left = n as usize;
        while left > 0 && start < iov.len() {
            let v = &mut iov[start];
            if left >= v.iov_len {
                left -= v.iov_len;
                start += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(left).cast();
                v.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// One system call over `iov`. A single buffer (a 4 KiB read into one page, the common
/// case) goes through `pread`/`pwrite`: the vectored calls copy and check the iovec array
/// on every call, which measured ~10% of a cached 4 KiB read
/// (`cargo bench -p vmon-virtio --bench blk_request_path`).
///
/// # Safety
/// Every iovec must describe memory the kernel may read (writes) or write (reads).
unsafe fn transfer_once(
    fd: RawFd,
    iov: &[libc::iovec],
    offset: libc::off_t,
    dir: Direction,
) -> isize {
    // SAFETY: the caller vouches for the iovecs; a single one is passed as a plain buffer.
    unsafe {
        match (dir, iov) {
            (Direction::Read, [one]) => libc::pread(fd, one.iov_base, one.iov_len, offset),
            (Direction::Write, [one]) => libc::pwrite(fd, one.iov_base, one.iov_len, offset),
            (Direction::Read, _) => libc::preadv(fd, iov.as_ptr(), iov.len() as i32, offset),
            (Direction::Write, _) => libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset),
        }
    }
}

/// Largest piece of a bounced O_DIRECT transfer: the host buffer stays small however large
/// the guest's request (a chain may describe up to 4 GiB).
const BOUNCE_CHUNK: u64 = 1 << 20;

/// An O_DIRECT transfer through an aligned buffer, for guest buffers the host's direct
/// I/O alignment rules refuse.
fn bounce_read(
    disk: &Disk,
    mem: &GuestMemory,
    chain: &Chain,
    offset: u64,
    len: u64,
) -> Result<(), u8> {
    let mut buf = AlignedBuf::new(len.min(BOUNCE_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(BOUNCE_CHUNK) as usize;
        let mut v = buf.iovec();
        v.iov_len = n;
        transfer(&disk.file, &mut [v], offset + done, Direction::Read).map_err(|_| S_IOERR)?;
        chain
            .write_at(mem, done, &buf.as_slice()[..n])
            .map_err(|_| S_IOERR)?;
        done += n as u64;
    }
    Ok(())
}

fn bounce_write(
    disk: &Disk,
    mem: &GuestMemory,
    chain: &Chain,
    offset: u64,
    len: u64,
) -> Result<(), u8> {
    let mut buf = AlignedBuf::new(len.min(BOUNCE_CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(BOUNCE_CHUNK) as usize;
        chain
            .read_at(mem, HEADER_LEN + done, &mut buf.as_mut_slice()[..n])
            .map_err(|_| S_IOERR)?;
        let mut v = buf.iovec();
        v.iov_len = n;
        transfer(&disk.file, &mut [v], offset + done, Direction::Write).map_err(|_| S_IOERR)?;
        done += n as u64;
    }
    Ok(())
}

/// A page-aligned heap buffer.
struct AlignedBuf {
    data: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let data = vec![0u8; len + 4096];
        let start = data.as_ptr().align_offset(4096);
        AlignedBuf { data, start, len }
    }
    fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }
    fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.as_mut_slice().as_mut_ptr().cast(),
            iov_len: self.len,
        }
    }
}

fn discard(disk: &Disk, mem: &GuestMemory, chain: &Chain, kind: u32, len: u64) -> Result<(), u8> {
    if len == 0
        || !len.is_multiple_of(SEGMENT_LEN)
        || len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEGMENTS)
    {
        return Err(S_IOERR);
    }
    for i in 0..len / SEGMENT_LEN {
        let mut seg = [0u8; SEGMENT_LEN as usize];
        chain
            .read_at(mem, HEADER_LEN + i * SEGMENT_LEN, &mut seg)
            .map_err(|_| S_IOERR)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
        let count = u32::from_le_bytes(seg[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
        if count > MAX_DISCARD_SECTORS {
            return Err(S_IOERR);
        }
        let allowed = if kind == T_WRITE_ZEROES {
            WRITE_ZEROES_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(S_UNSUPP);
        }
        let bytes = u64::from(count) * SECTOR_SIZE;
        let offset = byte_range(disk, sector, bytes)?;
        let mode = if kind == T_WRITE_ZEROES && flags & WRITE_ZEROES_UNMAP == 0 {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on a descriptor we own; no memory is involved.
        let r = unsafe {
            libc::fallocate(
                disk.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                bytes as libc::off_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if kind == T_DISCARD {
                // Discard is a hint: a filesystem without hole punching just keeps the data.
                tracing::debug!("virtio-blk: discard not supported by the file: {e}");
                continue;
            }
            write_zeroes_slowly(disk, offset, bytes).map_err(|_| S_IOERR)?;
        }
    }
    Ok(())
}

fn write_zeroes_slowly(disk: &Disk, mut offset: u64, bytes: u64) -> io::Result<()> {
    let mut zeroes = AlignedBuf::new(1 << 20);
    let end = offset + bytes;
    while offset < end {
        let n = (end - offset).min(1 << 20) as usize;
        let mut v = zeroes.iovec();
        v.iov_len = n;
        transfer(&disk.file, &mut [v], offset, Direction::Write)?;
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::memory;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;

    #[test]
    fn throttled_counts_each_hold_once() {
        use crate::rate_limiter::Limit;
        let counters = CounterSet::new(&BLOCK_COUNTERS);
        let limits = Limits {
            bytes: None,
            // One request at once, the next a millisecond later.
            ops: Some(Limit {
                rate: 1000,
                burst: 1,
            }),
        };
        let mut limiter = Some(RateLimiter::new(limits).unwrap());
        assert!(
            admit(&mut limiter, 512, &counters),
            "the burst lets one through"
        );
        for _ in 0..5 {
            // Each wake-up while held asks again.
            assert!(!admit(&mut limiter, 512, &counters));
        }
        assert_eq!(counters.get(counter::THROTTLED), 1);
        // The timer ends the hold; a refusal after it is a new hold.
        limiter.as_mut().unwrap().timer_fired();
        let again = admit(&mut limiter, 512, &counters);
        let holds = if again { 1 } else { 2 };
        assert_eq!(counters.get(counter::THROTTLED), holds);
        let mut none = None;
        assert!(admit(&mut none, 1 << 30, &counters));
    }

    /// A disk of 8 sectors, each filled with its own number, in a file deleted on drop.
    struct TestDisk {
        disk: Disk,
        path: PathBuf,
    }

    impl Drop for TestDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn disk(name: &str, readonly: bool) -> TestDisk {
        let path =
            std::env::temp_dir().join(format!("vmon-virtio-blk-{name}-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..8u8).flat_map(|s| [s; SECTOR_SIZE as usize]).collect();
        std::fs::write(&path, bytes).unwrap();
        let disk = Disk::open(&DiskOptions {
            path: path.clone(),
            readonly,
            serial: None,
            direct: false,
            limits: Limits::default(),
            poll: std::time::Duration::ZERO,
            aio: Default::default(),
        })
        .unwrap();
        TestDisk { disk, path }
    }

    /// Runs a request of `kind` at sector 1 whose payload is `data` (address, length,
    /// device-writable) and returns the status byte and the used length.
    fn request(d: &mut TestDisk, kind: u32, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mem = memory();
        let popped = write_request(&mem, kind, data);
        let len = handle(&mut d.disk, &mem, popped);
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    /// The same through io_uring: the status, the used length, whether it was left in
    /// flight, and the first 512 bytes at DATA afterwards (None where this host refuses
    /// io_uring).
    fn request_in_flight(
        d: &mut TestDisk,
        kind: u32,
        data: &[(u64, u32, bool)],
    ) -> Option<(u8, u32, bool, [u8; 512])> {
        let mem = memory();
        let mut f = InFlight::new(&d.disk, "test")?;
        let popped = write_request(&mem, kind, data);
        let (len, pending) = match f.take(&mut d.disk, &mem, popped) {
            Taken::Used(len) => (len, false),
            Taken::Pending => {
                let used = drained(&mut f, d, &mem);
                assert_eq!(used.len(), 1);
                assert_eq!(used[0].0, 7);
                (used[0].1, true)
            }
            Taken::Declined => unreachable!(),
        };
        assert_eq!(f.count, 0);
        let mut at_data = [0u8; 512];
        mem.read_slice(&mut at_data, GuestAddress(DATA)).unwrap();
        Some((
            mem.read_obj(GuestAddress(STATUS)).unwrap(),
            len,
            pending,
            at_data,
        ))
    }

    fn write_request(mem: &GuestMemory, kind: u32, data: &[(u64, u32, bool)]) -> Popped {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&1u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        mem.write_slice(&[0xEE; 512], GuestAddress(DATA)).unwrap();
        mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
        let mut chain = Chain::default();
        chain.push(mem, HDR, 16, false).unwrap();
        for &(addr, len, writable) in data {
            chain.push(mem, addr, len, writable).unwrap();
        }
        chain.push(mem, STATUS, 1, true).unwrap();
        Popped {
            head: 7,
            chain: Ok(chain),
        }
    }

    /// What the ring returns once everything in flight is done: (head, used length) each.
    fn drained(f: &mut InFlight, d: &TestDisk, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let mut used = Vec::new();
        f.drain(&d.disk, mem, &mut used).unwrap();
        used
    }

    /// A ring for `d`, or None (saying so) where this host refuses io_uring.
    fn ring_or_skip(d: &TestDisk) -> Option<InFlight> {
        let f = InFlight::new(&d.disk, "test");
        if f.is_none() {
            eprintln!("skipped: this host refuses io_uring");
        }
        f
    }

    fn sector_1(d: &TestDisk) -> [u8; 512] {
        use std::os::unix::fs::FileExt;
        let mut back = [0u8; 512];
        d.disk.file.read_exact_at(&mut back, 512).unwrap();
        back
    }

    fn open_direct(path: &Path) -> Disk {
        Disk::open(&DiskOptions {
            path: path.to_path_buf(),
            readonly: false,
            serial: None,
            direct: true,
            limits: Limits::default(),
            poll: std::time::Duration::ZERO,
            aio: Aio::IoUring,
        })
        .unwrap()
    }

    #[test]
    fn requests_through_io_uring_end_as_served_ones() {
        let mut d = disk("uring", false);
        let Some(r) = request_in_flight(&mut d, T_IN, &[(DATA, 512, true)]) else {
            eprintln!("skipped: this host refuses io_uring");
            return;
        };
        // Freshly written, so in the page cache: served at once.
        assert_eq!(r, (S_OK, 513, false, [1u8; 512]));
        let status = |r: Option<(u8, u32, bool, [u8; 512])>| r.map(|(s, n, p, _)| (s, n, p));
        assert_eq!(
            status(request_in_flight(&mut d, T_FLUSH, &[])),
            Some((S_OK, 1, true))
        );
        assert_eq!(
            status(request_in_flight(&mut d, T_GET_ID, &[(DATA, 20, true)])),
            Some((S_OK, 21, false))
        );
        assert_eq!(
            status(request_in_flight(&mut d, T_IN, &[(DATA, 512, false)])),
            Some((S_IOERR, 1, false))
        );
        // Past the end of the disk: refused before any I/O.
        let mem = memory();
        let mut f = InFlight::new(&d.disk, "test").unwrap();
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&T_IN.to_le_bytes());
        header[8..16].copy_from_slice(&8u64.to_le_bytes());
        let mut popped = write_request(&mem, T_IN, &[(DATA, 512, true)]);
        mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        popped.head = 3;
        assert_eq!(f.take(&mut d.disk, &mem, popped), Taken::Used(1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        drop(f);

        // O_DIRECT: reads and writes go to the ring and land in the file. (The image is
        // locked while open: let go of it first.)
        d.disk.file = std::fs::File::open("/dev/null").unwrap();
        d.disk = open_direct(&d.path);
        let r = request_in_flight(&mut d, T_IN, &[(DATA, 512, true)]).unwrap();
        assert_eq!(r, (S_OK, 513, true, [1u8; 512]));
        let r = request_in_flight(&mut d, T_OUT, &[(DATA, 512, false)]).unwrap();
        assert_eq!(status(Some(r)), Some((S_OK, 1, true)));
        assert_eq!(sector_1(&d), [0xEE; 512]);
        // A read of nothing succeeds without the ring, as it does synchronously.
        assert_eq!(
            status(request_in_flight(&mut d, T_IN, &[])),
            Some((S_OK, 1, false))
        );
        assert_eq!(request(&mut d, T_IN, &[]), (S_OK, 1));
    }

    #[test]
    fn tmpfs_is_in_memory_and_procfs_is_not() {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let path = shm.join(format!("vmon-in-memory-{}", std::process::id()));
            let f = File::create(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(in_memory(&f), "/dev/shm is tmpfs");
        }
        let proc_file = File::open("/proc/self/status").unwrap();
        assert!(!in_memory(&proc_file), "procfs is not tmpfs");
    }

    #[test]
    fn a_read_the_page_cache_cannot_answer_goes_to_the_ring() {
        let mut d = disk("uncached", false);
        let mem = memory();
        let Some(mut f) = ring_or_skip(&d) else {
            return;
        };
        let fd = d.disk.file.as_raw_fd();
        // SAFETY: plain calls on a descriptor we own; no memory is involved.
        unsafe {
            assert_eq!(libc::fdatasync(fd), 0);
            assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED), 0);
        }
        if f.in_memory {
            eprintln!("skipped: reads from tmpfs never wait for a device");
            return;
        }
        let popped = write_request(&mem, T_IN, &[(DATA, 512, true)]);
        assert_eq!(f.take(&mut d.disk, &mem, popped), Taken::Pending);
        assert_eq!(f.count, 1);
        assert_eq!(drained(&mut f, &d, &mem), vec![(7, 513)]);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [1u8; 512]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    }

    #[test]
    fn a_ring_dropped_with_requests_in_flight_waits_for_them() {
        // What a panic unwinding through the device loop leaves behind: a read the kernel
        // still holds. The "storage" is a pipe, so the read waits until the test writes.
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into an array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nothing else.
        let (storage, mut answer) = unsafe {
            use std::os::unix::io::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let mut disk = Disk::on_file_for_tests(storage, 8);
        let mem = memory();
        let Some(mut f) = InFlight::new(&disk, "test") else {
            eprintln!("skipped: this host refuses io_uring");
            return;
        };
        let popped = write_request(&mem, T_IN, &[(DATA, 512, true)]);
        assert_eq!(f.take(&mut disk, &mem, popped), Taken::Pending);
        f.uring.submit().unwrap();

        let delay = Duration::from_millis(300);
        let storage_answers = std::thread::spawn(move || {
            std::thread::sleep(delay);
            std::io::Write::write_all(&mut answer, &[3u8; 512]).unwrap();
        });
        let started = std::time::Instant::now();
        drop(f);
        let waited = started.elapsed();
        storage_answers.join().unwrap();
        assert!(
            waited >= delay - Duration::from_millis(50),
            "dropped after {waited:?}"
        );
        // The read landed before the drop returned: nothing writes guest memory after it.
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, [3u8; 512]);
        // Finishing it toward the driver is a reset's business, not the drop's.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xFF);
    }

    #[test]
    fn a_chain_offered_again_while_in_flight_breaks_the_queue_and_is_left_alone() {
        let mut d = disk("twice", false);
        let mem = memory();
        let Some(mut f) = ring_or_skip(&d) else {
            return;
        };
        let flush = write_request(&mem, T_FLUSH, &[]);
        assert_eq!(f.take(&mut d.disk, &mem, flush), Taken::Pending);
        let again = write_request(&mem, T_OUT, &[(DATA, 512, false)]);
        assert_eq!(f.take(&mut d.disk, &mem, again), Taken::Declined);
        assert!(f
            .broken
            .as_deref()
            .unwrap()
            .contains("head 7 offered again"));
        assert_eq!(sector_1(&d), [1u8; 512]);
        // The request in flight still finishes and is returned once.
        assert_eq!(drained(&mut f, &d, &mem), vec![(7, 1)]);
    }

    #[test]
    fn reads_and_writes_in_the_right_direction_work() {
        let mut d = disk("ok", false);
        assert_eq!(request(&mut d, T_IN, &[(DATA, 512, true)]), (S_OK, 513));
        assert_eq!(request(&mut d, T_OUT, &[(DATA, 512, false)]), (S_OK, 1));
        assert_eq!(request(&mut d, T_GET_ID, &[(DATA, 20, true)]), (S_OK, 21));
        assert_eq!(request(&mut d, T_FLUSH, &[]), (S_OK, 1));
    }

    #[test]
    fn payloads_facing_the_wrong_way_fail() {
        let mut d = disk("misdirected", false);
        // A read into memory the device may only read: nothing could be read.
        assert_eq!(request(&mut d, T_IN, &[(DATA, 512, false)]), (S_IOERR, 1));
        assert_eq!(
            request(&mut d, T_IN, &[(DATA, 512, false), (DATA + 512, 512, true)]),
            (S_IOERR, 1)
        );
        assert_eq!(
            request(&mut d, T_GET_ID, &[(DATA, 20, false)]),
            (S_IOERR, 1)
        );
        // A write from memory the device may only write: nothing would be written.
        assert_eq!(request(&mut d, T_OUT, &[(DATA, 512, true)]), (S_IOERR, 1));
        assert_eq!(
            request(&mut d, T_DISCARD, &[(DATA, 16, true)]),
            (S_IOERR, 1)
        );
        assert_eq!(
            request(&mut d, T_WRITE_ZEROES, &[(DATA, 16, true)]),
            (S_IOERR, 1)
        );
        // The disk is untouched: sector 1 still holds ones.
        let mut back = [0u8; 512];
        use std::os::unix::fs::FileExt;
        d.disk.file.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(back, [1u8; 512]);
        // Unknown types stay unsupported whatever their buffers.
        assert_eq!(request(&mut d, 0xFF, &[(DATA, 512, false)]), (S_UNSUPP, 1));
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mut d = disk("ro", true);
        assert_eq!(request(&mut d, T_OUT, &[(DATA, 512, false)]), (S_IOERR, 1));
        assert_eq!(request(&mut d, T_IN, &[(DATA, 512, true)]), (S_OK, 513));
    }
}
