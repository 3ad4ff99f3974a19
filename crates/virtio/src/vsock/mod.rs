//! virtio-vsock (device 19) with a Unix-socket host side, as Firecracker does it: the
//! future guest-agent channel.
//!
//! - The guest connects to host port P: vmon connects to the Unix socket `PATH_P`; if
//!   nothing listens there the guest gets an RST (connection refused).
//! - A host program connects to the Unix socket `PATH` and writes `CONNECT P\n`: vmon
//!   opens a stream to guest port P from a fresh host port and, when the guest accepts,
//!   answers `OK <host port>\n`; from then on the socket carries the stream. If the guest
//!   refuses (or does not answer in time) the socket is closed.
//!
//! Queues: rx (0, packets for the guest), tx (1, packets from the guest) and event (2,
//! for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET). Only stream sockets are offered (no
//! VIRTIO_VSOCK_F_SEQPACKET).
//!
//! Snapshots: tx packets are handled as they are taken and rx buffers are filled (or put
//! back) at once, so a paused device has nothing in flight. A pause within one process
//! keeps every connection (the muxer waits with the device, and its sockets keep
//! buffering). A restored device has new sockets, and host connections cannot follow the
//! VM into another process: the device then posts a TRANSPORT_RESET event, on which the
//! driver resets every socket and reads the CID again; new connections work as before.
//!
//! Everything runs on the device's thread: the queue eventfds, the listening socket and
//! every connection's socket (all nonblocking) share its event loop. [`packet`] holds the
//! header format, [`connection`] one stream's state and credit accounting, [`muxer`] the
//! set of connections and the order of packets to the guest.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::timerfd::TimerFd;
use vmon_memory::GuestMemory;

use crate::chain::{self, QueueBroken};
use crate::interrupt::Interrupt;
use crate::metrics::{CounterSet, DeviceMetrics};
use crate::worker::{EventLoop, Parked, Wake, Worker};
use crate::{
    device_id, ActivateError, Activation, ActiveQueue, DeviceState, DeviceStateError, PauseError,
    VirtioDevice, COMMON_FEATURES,
};
use muxer::Muxer;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
const LISTENER_TOKEN: u64 = 3;
const TIMER_TOKEN: u64 = 4;
/// How often timeouts are checked while any are pending.
const TICK: Duration = Duration::from_millis(500);
/// The longest `sun_path` (108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// The largest guest CID: 2^32 - 1 is VMADDR_CID_ANY.
pub const MAX_CID: u64 = u32::MAX as u64 - 1;
/// `struct virtio_vsock_event`'s id for "every connection is gone".
const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockOptions {
    /// The guest's context ID (3 and up; 0-2 are reserved).
    pub cid: u64,
    /// The Unix socket host programs connect to; guest connections to port P go to
    /// `PATH_P`.
    pub socket: PathBuf,
}

impl VsockOptions {
    pub fn validate(&self) -> Result<(), VsockError> {
        if !(3..=MAX_CID).contains(&self.cid) {
            return Err(VsockError::BadCid(self.cid));
        }
        let len = self.socket.as_os_str().len();
        if len == 0 {
            return Err(VsockError::EmptyPath);
        }
        if len > MAX_SOCKET_PATH || self.socket.as_os_str().as_bytes().contains(&0) {
            return Err(VsockError::PathTooLong {
                path: self.socket.clone(),
                len,
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cid={0}: a guest CID is between 3 and 4294967294 (0-2 are reserved)")]
    BadCid(u64),
    #[error("socket= needs a path")]
    EmptyPath,
    #[error("socket={}: {len} bytes is longer than a Unix socket path can be ({MAX_SOCKET_PATH})", path.display())]
    PathTooLong { path: PathBuf, len: usize },
    #[error("socket={}: another process is listening there", path.display())]
    InUse { path: PathBuf },
    #[error("socket={}: exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("socket={}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The listening socket, bound when the VM is built (so a bad path fails before KVM is
/// opened) and kept across device resets.
pub struct VsockBackend {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, to remove it only if it is ours.
    inode: Option<(u64, u64)>,
}

impl VsockBackend {
    /// Binds `PATH`, replacing a stale socket file left by a process that is gone.
    pub fn bind(opts: &VsockOptions) -> Result<VsockBackend, VsockError> {
        opts.validate()?;
        let path = &opts.socket;
        let bind_err = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => return Err(VsockError::InUse { path: path.clone() }),
                Err(_) => match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                },
            },
            Ok(_) => return Err(VsockError::NotASocket { path: path.clone() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let inode = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(VsockBackend {
            listener,
            path: path.clone(),
            inode,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Indices into [`VSOCK_COUNTERS`].
mod counter {
    pub const TX_PACKETS: usize = 0;
    pub const TX_BYTES: usize = 1;
    pub const RX_PACKETS: usize = 2;
    pub const RX_BYTES: usize = 3;
    pub const BAD_CHAINS: usize = 4;
}
/// Packets from the guest (tx) and to it (rx), whole packets including the 44-byte
/// header, and chains too malformed to carry a packet.
static VSOCK_COUNTERS: [&str; 5] = [
    "tx_packets",
    "tx_bytes",
    "rx_packets",
    "rx_bytes",
    "bad_chains",
];

/// What the guest sees of the device: its CID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
}

/// What the device thread hands back when it stops.
struct Held {
    mux: Muxer,
    /// A TRANSPORT_RESET still waits for an event buffer.
    reset_owed: bool,
}

pub struct Vsock {
    cid: u64,
    counters: Arc<CounterSet>,
    backend: Option<VsockBackend>,
    /// The connections of a paused device, waiting for it to resume.
    parked: Option<Held>,
    worker: Option<Worker<Parked<Held>>>,
}

impl Vsock {
    pub fn new(cid: u64, backend: VsockBackend) -> Self {
        Vsock {
            cid,
            counters: CounterSet::new(&VSOCK_COUNTERS),
            backend: Some(backend),
            parked: None,
            worker: None,
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        device_id::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Activation {
            memory,
            features,
            queues,
            interrupt,
            resumed,
        } = a;
        let [rx, tx, event]: [ActiveQueue; 3] =
            queues
                .try_into()
                .map_err(|q: Vec<ActiveQueue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 3,
                })?;
        let q = Queues { rx, tx, event };
        let cid = self.cid;
        // Resuming within this process continues the paused connections. Resuming
        // without them means a restore: the driver's sockets refer to connections this
        // process never had, and it must be told.
        let held = match (self.parked.take(), resumed) {
            (Some(held), true) => held,
            (parked, resumed) => {
                if let Some(old) = parked {
                    self.backend = Some(old.mux.into_backend());
                }
                let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
                Held {
                    mux: Muxer::new(backend, cid),
                    reset_owed: resumed,
                }
            }
        };
        let ctx = Context {
            memory,
            interrupt,
            counters: self.counters.clone(),
        };
        tracing::debug!(cid, features, resumed, "virtio-vsock: activated");
        let worker = Worker::spawn_device(
            "virtio-vsock".into(),
            ctx.interrupt.clone(),
            move |mut events| {
                let mut held = held;
                let mut q = q;
                let ended = serve(&mut held, &mut q, &ctx, &mut events);
                if let Ended::Broken = ended {
                    // Keep the listening socket until the transport stops us, so a reset can
                    // reuse it; connections end now.
                    held.mux = Muxer::new(held.mux.into_backend(), cid);
                    events.idle_until_stop();
                }
                Parked {
                    backend: held,
                    queues: vec![q.rx.queue, q.tx.queue, q.event.queue],
                }
            },
        );
        match worker {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => Err(ActivateError::Thread(e)),
        }
    }

    fn metrics(&self) -> Arc<dyn DeviceMetrics> {
        self.counters.clone()
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.parked = w.stop().map(|p| p.backend);
            if self.parked.is_none() {
                tracing::error!("virtio-vsock thread died; the device is gone");
            }
        }
        if let Some(held) = self.parked.take() {
            self.backend = Some(held.mux.into_backend());
        }
    }

    fn pause(&mut self, _within: Duration) -> Result<Vec<Queue>, PauseError> {
        let Some(w) = self.worker.take() else {
            return Ok(Vec::new());
        };
        let parked = w.stop().ok_or(PauseError::ThreadDied)?;
        self.parked = Some(parked.backend);
        Ok(parked.queues)
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Vsock(VsockState { cid: self.cid })
    }

    /// The saved CID wins over the configured one: the guest bound its sockets to it.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Vsock(s) = state else {
            return Err(DeviceStateError::wrong_kind(state, "vsock"));
        };
        if !(3..=MAX_CID).contains(&s.cid) {
            return Err(DeviceStateError::Invalid(
                VsockError::BadCid(s.cid).to_string(),
            ));
        }
        self.cid = s.cid;
        Ok(())
    }
}

/// A timer that ticks while something waits for a timeout.
struct Ticker {
    timer: TimerFd,
    armed: bool,
}

impl Ticker {
    fn new() -> io::Result<Self> {
        let timer = TimerFd::new()?;
        // SAFETY: fcntl on a descriptor we own; no memory is involved.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ticker {
            timer,
            armed: false,
        })
    }

    fn set(&mut self, on: bool) {
        if on == self.armed {
            return;
        }
        let r = if on {
            self.timer.reset(TICK, Some(TICK))
        } else {
            self.timer.clear()
        };
        match r {
            Ok(()) => self.armed = on,
            Err(e) => tracing::warn!("virtio-vsock timer: {e}"),
        }
    }

    fn drain(&mut self) {
        let mut b = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `b`; the timer is nonblocking.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }
}

struct Queues {
    rx: ActiveQueue,
    tx: ActiveQueue,
    event: ActiveQueue,
}

/// What the device thread shares with the transport.
struct Context {
    memory: GuestMemory,
    interrupt: Arc<Interrupt>,
    counters: Arc<CounterSet>,
}

/// Why [`serve`] returned.
enum Ended {
    /// The transport stopped the thread, between two passes over the queues.
    Stopped,
    /// The device could not go on; the driver was told it needs a reset.
    Broken,
}

/// The device thread's loop: until the transport stops it, or a queue breaks (then the
/// driver is told the device needs a reset). While a reset is owed, the first event
/// buffer the driver posts says every connection is gone.
fn serve(held: &mut Held, q: &mut Queues, ctx: &Context, events: &mut EventLoop) -> Ended {
    let Held { mux, reset_owed } = held;
    let watched = Ticker::new().and_then(|ticker| {
        events.add(q.rx.notify.as_raw_fd(), RX_TOKEN, false)?;
        events.add(q.tx.notify.as_raw_fd(), TX_TOKEN, false)?;
        events.add(q.event.notify.as_raw_fd(), EVENT_TOKEN, false)?;
        mux.attach(events, LISTENER_TOKEN)?;
        events.add(ticker.timer.as_raw_fd(), TIMER_TOKEN, false)?;
        Ok(ticker)
    });
    let mut ticker = match watched {
        Ok(t) => t,
        Err(e) => {
            ctx.interrupt
                .fail_device(&format!("virtio-vsock: watching the queues: {e}"));
            return Ended::Broken;
        }
    };
    let mem = &ctx.memory;
    let counters = &ctx.counters;
    let Queues { rx, tx, event } = q;
    // Look at every queue at once: a resumed device may have missed notifications.
    let mut tokens = vec![TX_TOKEN];
    loop {
        let mut tx_kicked = false;
        for &t in &tokens {
            match t {
                RX_TOKEN => {
                    let _ = rx.notify.read();
                }
                TX_TOKEN => {
                    let _ = tx.notify.read();
                    tx_kicked = true;
                }
                EVENT_TOKEN => {
                    // The driver posted event buffers; they matter only with a reset owed.
                    let _ = event.notify.read();
                }
                LISTENER_TOKEN => mux.accept(events),
                TIMER_TOKEN => {
                    ticker.drain();
                    mux.tick(events, Instant::now());
                }
                t => mux.on_event(events, t),
            }
        }
        let served = (|| -> Result<(), QueueBroken> {
            // The reset goes before anything else, so no packet of this process reaches
            // the driver as if it belonged to a connection it had before.
            if *reset_owed {
                if let Some(notify) = post_transport_reset(&mut event.queue, mem)? {
                    *reset_owed = false;
                    if notify {
                        ctx.interrupt.signal_queue(EVENT);
                    }
                }
            }
            if tx_kicked
                && chain::serve_all(&mut tx.queue, mem, |p| {
                    match p.chain {
                        Ok(c) => {
                            counters.add(counter::TX_PACKETS, 1);
                            counters.add(counter::TX_BYTES, c.readable_len());
                            mux.handle_tx(events, mem, &c)
                        }
                        Err(e) => {
                            counters.add(counter::BAD_CHAINS, 1);
                            tracing::debug!("virtio-vsock: bad tx chain: {e}")
                        }
                    }
                    0
                })?
            {
                ctx.interrupt.signal_queue(TX);
            }
            if fill_rx(&mut rx.queue, mem, mux, events, counters)? {
                ctx.interrupt.signal_queue(RX);
            }
            Ok(())
        })();
        if let Err(e) = served {
            ctx.interrupt.fail_device(&e.to_string());
            return Ended::Broken;
        }
        ticker.set(mux.has_deadlines());
        match events.wait() {
            Wake::Stop => return Ended::Stopped,
            Wake::Ready(t) => tokens = t,
        }
    }
}

/// Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the driver's next event buffer. Returns
/// None when it has posted none (the event waits for one), else whether the driver wants
/// an interrupt. A buffer too small for the event goes back empty, which the driver
/// ignores.
fn post_transport_reset(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<bool>, QueueBroken> {
    loop {
        let Some(p) = chain::pop(queue, mem)? else {
            if queue
                .enable_notification(mem)
                .map_err(|_| QueueBroken::UsedRing)?
            {
                continue; // one came meanwhile
            }
            return Ok(None);
        };
        let id = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match p.chain {
            Ok(c) if c.writable_len() >= id.len() as u64 => c.write_at(mem, 0, &id).is_ok(),
            Ok(_) => false,
            Err(e) => {
                tracing::debug!("virtio-vsock: bad event chain: {e}");
                false
            }
        };
        let len = if written { id.len() as u32 } else { 0 };
        chain::complete(queue, mem, p.head, len)?;
        if written {
            tracing::debug!("virtio-vsock: told the driver its connections are gone");
            return queue
                .needs_notification(mem)
                .map(Some)
                .map_err(|_| QueueBroken::UsedRing);
        }
    }
}

/// Gives the guest what is waiting for it, as long as it has rx buffers. Says whether the
/// driver wants an interrupt.
fn fill_rx(
    queue: &mut Queue,
    mem: &GuestMemory,
    mux: &mut Muxer,
    events: &EventLoop,
    counters: &CounterSet,
) -> Result<bool, QueueBroken> {
    let mut used = false;
    while mux.has_rx_work() {
        let Some(p) = chain::pop(queue, mem)? else {
            // Out of buffers: ask to be notified of new ones, unless some came meanwhile.
            if queue
                .enable_notification(mem)
                .map_err(|_| QueueBroken::UsedRing)?
            {
                continue;
            }
            break;
        };
        let written = match p.chain {
            Ok(c) => mux.fill_rx(events, mem, &c),
            Err(e) => {
                counters.add(counter::BAD_CHAINS, 1);
                tracing::debug!("virtio-vsock: bad rx chain: {e}");
                Some(0)
            }
        };
        match written {
            Some(len) => {
                if len > 0 {
                    counters.add(counter::RX_PACKETS, 1);
                    counters.add(counter::RX_BYTES, u64::from(len));
                }
                chain::complete(queue, mem, p.head, len)?;
                used = true;
            }
            None => {
                chain::unpop(queue);
                break;
            }
        }
    }
    Ok(used
        && queue
            .needs_notification(mem)
            .map_err(|_| QueueBroken::UsedRing)?)
}

#[cfg(test)]
mod tests;
