//! virtio-blk backed by a raw image file (or host block device).
//!
//! Requests are served synchronously on the device's thread, straight between the file
//! and guest memory with `pread`/`pwrite` (`preadv`/`pwritev` when a request spans several
//! buffers), no copy in between. FLUSH is `fdatasync`, so what the guest flushed survives
//! a host crash. DISCARD and unmapping WRITE_ZEROES punch holes in the file. A read-only
//! disk is opened read-only: writes fail with an I/O error to the guest and the file
//! cannot change. Images are locked (shared for read-only, exclusive otherwise) so two VMs
//! cannot write the same file by mistake.
//!
//! Snapshots: requests are served one at a time on the device thread, each finished before
//! the next is taken; a pass publishes everything it served in the used ring before it
//! ends, and the thread looks at a stop request only between passes over the queue. So a
//! paused device has nothing in flight. The disk itself is wiring: the restorer opens it
//! again, and [`BlockState`] only checks that it still shows the guest the same capacity,
//! read-only flag and serial.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmon_memory::GuestMemory;

use crate::chain::{self, Chain, Popped};
use crate::metrics::{CounterSet, DeviceMetrics};
use crate::rate_limiter::{Limits, RateLimiter};
use crate::worker::{AdaptivePoll, Parked, Wake, Worker};
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
const SERIAL_LEN: usize = 20;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
const IOV_MAX: usize = 1024;
const QUEUE_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const WRITE_ZEROES_UNMAP: u32 = 1;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

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
            sectors: bytes / SECTOR_SIZE,
            readonly: opts.readonly,
            direct: opts.direct,
            serial,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
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
        let worker = Worker::spawn(format!("virtio-blk {}", self.name), move |mut events| {
            let notify = q.notify.as_raw_fd();
            let watched = events
                .add(notify, QUEUE_TOKEN, false)
                .and_then(|()| match &limiter {
                    Some(l) => events.add(l.as_raw_fd(), LIMITER_TOKEN, false),
                    None => Ok(()),
                });
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
                    let _ = q.notify.read();
                    let served = chain::serve_some(&mut q.queue, &a.memory, |p| {
                        if let Some(l) = &mut limiter {
                            if !l.consume(request_bytes(&p)) {
                                disk.counters.add(counter::THROTTLED, 1);
                                return None;
                            }
                        }
                        Some(handle(&mut disk, &a.memory, p))
                    });
                    let stalled = match served {
                        Ok(s) => {
                            if s.notify {
                                a.interrupt.signal_queue(0);
                            }
                            s.stalled
                        }
                        Err(e) => {
                            // NEEDS_RESET: serve nothing more until the driver resets us.
                            a.interrupt.fail_device(&e.to_string());
                            break;
                        }
                    };
                    // A throttled queue waits for its timer, not for the driver.
                    let idle_since = Instant::now();
                    let more = !stalled
                        && !poll.window().is_zero()
                        && chain::spin_for_more(&mut q.queue, &a.memory, |ready| poll.spin(ready));
                    let wake = if more {
                        events.ready_now()
                    } else {
                        let wake = events.wait();
                        poll.slept(idle_since.elapsed());
                        wake
                    };
                    match wake {
                        // Stopping here, between passes, leaves nothing in flight.
                        Wake::Stop => {
                            return Parked {
                                backend: disk,
                                queues: vec![q.queue],
                            }
                        }
                        Wake::Ready(t) => tokens = t,
                    }
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

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        let Some(w) = self.worker.take() else {
            return Ok(Vec::new());
        };
        let parked = w.stop().ok_or(PauseError::ThreadDied)?;
        self.disk = Some(parked.backend);
        Ok(parked.queues)
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

/// What a request costs against a byte limit: the data it moves, header and status aside.
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

/// Serves one request and returns the number of bytes written into its buffers.
fn handle(disk: &mut Disk, mem: &GuestMemory, p: Popped) -> u32 {
    let chain = match p.chain {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("virtio-blk: bad descriptor chain: {e}");
            disk.counters.add(counter::BAD_CHAINS, 1);
            return 0;
        }
    };
    // The status byte is the last writable byte; without one we cannot even say no.
    let Some(status_at) = chain.writable_len().checked_sub(1) else {
        tracing::debug!("virtio-blk: request without a status byte");
        disk.counters.add(counter::BAD_CHAINS, 1);
        return 0;
    };
    let (status, data_written) = execute(disk, mem, &chain, status_at);
    if status != S_OK {
        disk.counters.add(counter::ERRORS, 1);
    }
    if chain.write_byte_at(mem, status_at, status).is_err() {
        return 0;
    }
    data_written + 1
}

/// Runs the request; returns its status and how many data bytes went to the guest.
fn execute(disk: &mut Disk, mem: &GuestMemory, chain: &Chain, status_at: u64) -> (u8, u32) {
    let mut header = [0u8; HEADER_LEN as usize];
    if chain.read_at(mem, 0, &mut header).is_err() {
        return (S_IOERR, 0);
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
        return (S_IOERR, 0);
    }
    let result = match kind {
        T_IN => read(disk, mem, chain, sector, status_at).map(|n| n as u32),
        T_OUT if disk.readonly => Err(S_IOERR),
        T_OUT => write(disk, mem, chain, sector, out_len).map(|_| 0),
        T_FLUSH if disk.readonly => Ok(0),
        // SAFETY: fdatasync on a descriptor we own; no memory is involved.
        T_FLUSH => match unsafe { libc::fdatasync(disk.file.as_raw_fd()) } {
            0 => Ok(0),
            _ => Err(S_IOERR),
        },
        T_GET_ID => {
            let n = status_at.min(SERIAL_LEN as u64) as usize;
            chain
                .write_at(mem, 0, &disk.serial[..n])
                .map(|_| n as u32)
                .map_err(|_| S_IOERR)
        }
        T_DISCARD | T_WRITE_ZEROES if disk.readonly => Err(S_IOERR),
        T_DISCARD | T_WRITE_ZEROES => discard(disk, mem, chain, kind, out_len).map(|_| 0),
        _ => Err(S_UNSUPP),
    };
    let c = &disk.counters;
    match kind {
        T_IN => c.add(counter::READS, 1),
        T_OUT => c.add(counter::WRITES, 1),
        T_FLUSH => c.add(counter::FLUSHES, 1),
        T_DISCARD | T_WRITE_ZEROES => c.add(counter::DISCARDS, 1),
        _ => c.add(counter::OTHER_REQUESTS, 1),
    }
    match result {
        Ok(n) => {
            match kind {
                T_IN => c.add(counter::READ_BYTES, u64::from(n)),
                T_OUT => c.add(counter::WRITE_BYTES, out_len),
                _ => {}
            }
            (S_OK, n)
        }
        Err(status) => (status, 0),
    }
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

fn read(disk: &Disk, mem: &GuestMemory, chain: &Chain, sector: u64, len: u64) -> Result<u64, u8> {
    let offset = byte_range(disk, sector, len)?;
    let mut iov = chain.writable_iovecs(mem, 0, len).map_err(|_| S_IOERR)?;
    match transfer(&disk.file, &mut iov, offset, Direction::Read) {
        Ok(()) => Ok(len),
        Err(e) if disk.direct && e.raw_os_error() == Some(libc::EINVAL) => {
            bounce_read(disk, mem, chain, offset, len).map(|_| len)
        }
        Err(e) => {
            tracing::debug!("virtio-blk: read at {offset}: {e}");
            Err(S_IOERR)
        }
    }
}

fn write(disk: &Disk, mem: &GuestMemory, chain: &Chain, sector: u64, len: u64) -> Result<(), u8> {
    let offset = byte_range(disk, sector, len)?;
    let mut iov = chain
        .readable_iovecs(mem, HEADER_LEN, len)
        .map_err(|_| S_IOERR)?;
    match transfer(&disk.file, &mut iov, offset, Direction::Write) {
        Ok(()) => Ok(()),
        Err(e) if disk.direct && e.raw_os_error() == Some(libc::EINVAL) => {
            bounce_write(disk, mem, chain, offset, len)
        }
        Err(e) => {
            tracing::debug!("virtio-blk: write at {offset}: {e}");
            Err(S_IOERR)
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
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
        })
        .unwrap();
        TestDisk { disk, path }
    }

    /// Runs a request of `kind` at sector 1 whose payload is `data` (address, length,
    /// device-writable) and returns the status byte and the used length.
    fn request(d: &mut TestDisk, kind: u32, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mem = memory();
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&1u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        mem.write_slice(&[0xEE; 512], GuestAddress(DATA)).unwrap();
        mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
        let mut chain = Chain::default();
        chain.push(&mem, HDR, 16, false).unwrap();
        for &(addr, len, writable) in data {
            chain.push(&mem, addr, len, writable).unwrap();
        }
        chain.push(&mem, STATUS, 1, true).unwrap();
        let len = handle(
            &mut d.disk,
            &mem,
            Popped {
                head: 0,
                chain: Ok(chain),
            },
        );
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
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
