//! virtio-net over a packet backend (a [`crate::tap::Tap`] in vmon).
//!
//! Two queues, receive (0) and transmit (1); no control queue, no multiqueue. The
//! configuration space holds the MAC address and the link status. Every packet on either
//! queue starts with the 12-byte `virtio_net_hdr_v1`, which is also the tap's header format
//! (`IFF_VNET_HDR`, header size 12), so packets move between guest memory and the tap with
//! one `readv`/`writev` each and no copy:
//!
//! - **TX**: the readable buffers of a chain (header, then the frame) are written to the
//!   tap in one call; a tap write is one packet. If the tap says EAGAIN the chain stays on
//!   the queue and the device waits for the tap to become writable.
//! - **RX**: when the tap is readable and the driver has posted a buffer, the tap reads one
//!   packet straight into the chain's writable buffers; the device then sets `num_buffers`
//!   to 1 (the tap does not fill in those two bytes). Without posted buffers the device stops
//!   watching the tap for reading until the driver notifies the receive queue: packets wait
//!   in the tap's own queue (which drops when full, as a NIC would), never in a busy loop.
//!   A packet larger than the posted chain is dropped and the chain returned with length 0;
//!   the driver counts it as a length error. To tell, the read goes on past the chain's
//!   buffers into a 64 KiB host scratch buffer: anything landing there means the packet
//!   did not fit (kernels differ in what a tap read returns for a packet cut short, so the
//!   returned length alone cannot say). This only happens when the host sends frames
//!   bigger than the driver expects (e.g. a larger MTU on the tap).
//!
//! Offloads: the device offers checksum offload and TSO both ways. What the driver can
//! *receive* (the `GUEST_*` features it accepts) becomes the tap's `TUNSETOFFLOAD` flags,
//! so the host kernel only hands over partial-checksum or GSO packets the driver asked
//! for. What the driver *sends* needs nothing: a tap with virtio headers accepts GSO and
//! partial-checksum packets whatever its offload flags.
//!
//! MRG_RXBUF is offered. With it Linux posts small receive buffers (a page or so each)
//! and a packet may span several: the device reads a packet into the first buffer and, for
//! what does not fit, the overflow buffer; copies that into as many further buffers as it
//! needs; sets `num_buffers` and returns the buffers together
//! (`chain::complete_together`), since Linux drops a packet whose buffers are not all in
//! the used ring when it looks. Without MRG_RXBUF Linux posts "big packet" chains of
//! 64 KiB and more when it accepts TSO, so that GSO packets fit, and receives every packet,
//! however small, into one of them.
//!
//! Interrupts are raised once per batch of chains, when the driver wants one (EVENT_IDX is
//! honoured through virtio-queue). A malformed chain fails only that packet (length 0); a
//! broken queue sets DEVICE_NEEDS_RESET. If the tap goes away under the VM (`ip link del`),
//! the device reports the link down, drops what the guest sends and stops watching the tap.
//!
//! Snapshots: every chain taken off either queue is completed or put back before the
//! thread looks at its events again, and a stop request is seen only there, so a paused
//! device has nothing in flight. [`NetState`] keeps the MAC address and link status; the
//! tap is wiring. Rate limiters start full after a pause.

use std::fmt;
use std::io;
use std::os::unix::io::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::metrics::DeviceMetrics;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vmon_memory::GuestMemory;

use crate::chain::{self, Chain, ChainError, Popped, QueueBroken};
use crate::interrupt::Interrupt;
use crate::rate_limiter::{Limits, RateLimiter};
use crate::worker::{EventLoop, Parked, Wake, Worker};
use crate::{
    device_id, ActivateError, Activation, ActiveQueue, DeviceState, DeviceStateError, PauseError,
    VirtioDevice, COMMON_FEATURES,
};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): the header of every packet.
pub const VNET_HDR_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: u64 = 10;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_TX_LIMIT: u64 = 3;
const TOKEN_RX_LIMIT: u64 = 4;
/// Packets served per queue before the thread looks at its other events again.
const BATCH: usize = 256;
/// More buffers than one readv/writev takes: such a chain is refused.
const IOV_MAX: usize = 1024;
/// Host buffer a receive continues into past the driver's buffers, to see whether the
/// packet fitted: larger than any packet a tap hands over (GSO packets are under 64 KiB).
const OVERFLOW_LEN: usize = 64 * 1024;
/// [`VNET_HDR_LEN`] as a byte count of guest buffers.
const HDR: u64 = VNET_HDR_LEN as u64;
const CONFIG_LEN: usize = 8;

const fn bit(n: u32) -> u64 {
    1 << n
}
pub const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
pub const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
pub const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
pub const F_GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
pub const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
pub const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
pub const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
const S_LINK_UP: u16 = vn::VIRTIO_NET_S_LINK_UP as u16;

/// Feature bits the device offers.
pub const FEATURES: u64 = COMMON_FEATURES
    | F_MAC
    | F_STATUS
    | F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF;

/// The tap offload flags (`TUN_F_*`) for what a driver with `features` can receive:
/// partial checksums with GUEST_CSUM, and on top of that the GSO kinds it accepted.
pub fn offload_flags(features: u64) -> u32 {
    if features & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if features & F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if features & F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    if features & F_GUEST_ECN != 0 && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if features & F_GUEST_UFO != 0 {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address: 02:xx:xx:xx:xx:xx.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        let mut done = 0;
        while done < b.len() {
            // SAFETY: the pointer and length describe the unfilled tail of `b`.
            let n = unsafe { libc::getrandom(b[done..].as_mut_ptr().cast(), b.len() - done, 0) };
            if n > 0 {
                done += n as usize;
            }
        }
        b[0] = 0x02;
        MacAddr(b)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six two-digit hex bytes separated by ':'; multicast and all-zero addresses are
    /// refused (a NIC cannot have them).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("mac={s}: use six hex bytes like 02:00:00:00:00:01");
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(b);
        if mac.is_multicast() {
            return Err(format!(
                "mac={s}: a multicast address (the first byte is odd) cannot be a NIC's address"
            ));
        }
        if b == [0; 6] {
            return Err(format!("mac={s}: the all-zero address is not valid"));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A network device as configured: the tap to attach to and the guest's MAC address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    pub tap: String,
    /// None: a random locally administered address.
    pub mac: Option<MacAddr>,
    /// Applied to each direction separately: what the guest sends, and what it receives.
    pub limits: Limits,
}

/// Where a virtio-net device's packets go. Every packet starts with a
/// `virtio_net_hdr_v1` ([`VNET_HDR_LEN`] bytes).
pub trait Backend: AsRawFd + Send {
    /// Reads one packet into `iov` and returns its length, or (if it did not fit, and the
    /// rest is lost) at least the room the buffers had. EAGAIN when there is none.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes for the duration of the call.
    unsafe fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Writes one packet gathered from `iov`. EAGAIN when the backend cannot take it now;
    /// the descriptor then polls writable when it can.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads for the duration of the call.
    unsafe fn send(&self, iov: &[libc::iovec]) -> io::Result<usize>;

    /// Sets which offloaded packets (`TUN_F_*`) the backend may hand to [`Backend::recv`].
    fn set_offload(&self, flags: u32) -> io::Result<()>;

    /// How to name the backend in messages.
    fn describe(&self) -> String;
}

/// Per-device packet counters, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Packets and frame bytes (headers excluded) delivered to the guest.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Packets from the backend that did not fit the buffer the driver posted.
    pub rx_dropped: AtomicU64,
    /// Malformed receive chains and backend read errors.
    pub rx_errors: AtomicU64,
    /// Packets and frame bytes (headers excluded) the backend accepted from the guest.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Well-formed packets the backend refused (or could not take: it went away).
    pub tx_dropped: AtomicU64,
    /// Malformed transmit chains (bad descriptors, shorter than the header).
    pub tx_errors: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_errors: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_errors: get(&self.rx_errors),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
        }
    }
}

impl DeviceMetrics for NetCounters {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let s = NetCounters::snapshot(self);
        vec![
            ("rx_packets", s.rx_packets),
            ("rx_bytes", s.rx_bytes),
            ("rx_dropped", s.rx_dropped),
            ("rx_errors", s.rx_errors),
            ("tx_packets", s.tx_packets),
            ("tx_bytes", s.tx_bytes),
            ("tx_dropped", s.tx_dropped),
            ("tx_errors", s.tx_errors),
        ]
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// What the guest sees of a network device besides its packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// In the usual notation, `02:00:00:00:00:01`.
    pub mac: String,
    pub link_up: bool,
}

/// The backend as a stopped device thread leaves it.
struct Held {
    backend: Box<dyn Backend>,
    /// It failed for good (see [`PacketIo::gone`]).
    gone: bool,
}

pub struct Net {
    backend: Option<Box<dyn Backend>>,
    /// The backend in `backend` already failed for good while the device ran on it.
    backend_gone: bool,
    mac: MacAddr,
    link_up: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
    worker: Option<Worker<Parked<Held>>>,
    name: String,
    limits: Limits,
}

impl Net {
    /// Rate-limits each direction (guest to host, host to guest) to `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    pub fn new(backend: Box<dyn Backend>, mac: MacAddr, name: String) -> Self {
        Net {
            backend: Some(backend),
            backend_gone: false,
            mac,
            link_up: Arc::new(AtomicBool::new(true)),
            counters: Arc::default(),
            worker: None,
            name,
            limits: Limits::default(),
        }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The device's packet counters; they keep counting across resets.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.mac.0);
        let status = if self.link_up.load(Ordering::Acquire) {
            S_LINK_UP
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        device_id::NET
    }

    fn pci_class(&self) -> u32 {
        0x02_0000 // network, Ethernet
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let [rx, tx]: [ActiveQueue; 2] =
            a.queues
                .try_into()
                .map_err(|q: Vec<ActiveQueue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 2,
                })?;
        let limiter = |limits: Limits| {
            if limits.is_unlimited() {
                Ok(None)
            } else {
                RateLimiter::new(limits).map(Some)
            }
        };
        let tx_limiter = limiter(self.limits).map_err(ActivateError::Thread)?;
        let rx_limiter = limiter(self.limits).map_err(ActivateError::Thread)?;
        let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
        let offload = offload_flags(a.features);
        if let Err(e) = backend.set_offload(offload) {
            // Keep the tap from handing over packets the driver cannot take.
            tracing::warn!(
                "virtio-net {}: {}: offloads {offload:#x}: {e}",
                self.name,
                backend.describe()
            );
            if let Err(e) = backend.set_offload(0) {
                tracing::warn!("virtio-net {}: turning offloads off: {e}", self.name);
            }
        }
        // A fresh activation tries the backend again with the link up. A resumed one keeps
        // what the guest was told, unless the backend is new (a restore) and the link was
        // down: then the driver hears the link came back.
        let gone = a.resumed && self.backend_gone;
        let link_came_back = a.resumed && !gone && !self.link_up.load(Ordering::Acquire);
        if !a.resumed || link_came_back {
            self.link_up.store(true, Ordering::Release);
        }
        if link_came_back {
            a.interrupt.signal_config();
        }
        let rx_signalled_at = rx.queue.next_used();
        let runner = Runner {
            rx_signalled_at,
            rx,
            tx,
            io: PacketIo {
                backend,
                memory: a.memory,
                counters: self.counters.clone(),
                guest_csum: a.features & F_GUEST_CSUM != 0,
                merged: a.features & F_MRG_RXBUF != 0,
                gone,
                overflow: vec![0; OVERFLOW_LEN],
            },
            interrupt: a.interrupt,
            link_up: self.link_up.clone(),
            rx_paused: false,
            tx_blocked: false,
            watching: None,
            name: self.name.clone(),
            tx_limiter,
            rx_limiter,
            rx_throttled: false,
        };
        let thread = format!("virtio-net {}", self.name);
        let worker = Worker::spawn_device(thread, runner.interrupt.clone(), move |events| {
            runner.run(events)
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn metrics(&self) -> Arc<dyn DeviceMetrics> {
        self.counters.clone()
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.park(w.stop());
            if self.backend.is_none() {
                tracing::error!(net = %self.name, "virtio-net thread died; the tap is gone");
            }
        }
    }

    fn pause(&mut self, _within: std::time::Duration) -> Result<Vec<Queue>, PauseError> {
        let Some(w) = self.worker.take() else {
            return Ok(Vec::new());
        };
        self.park(w.stop()).ok_or(PauseError::ThreadDied)
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Net(NetState {
            mac: self.mac.to_string(),
            link_up: self.link_up.load(Ordering::Acquire),
        })
    }

    /// The saved MAC address wins over the one the device was built with: the guest's
    /// stack (and its peers' ARP caches) know it, and a VM configured without one had a
    /// random address that only the state remembers.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Net(s) = state else {
            return Err(DeviceStateError::wrong_kind(state, "net"));
        };
        self.mac = s.mac.parse().map_err(DeviceStateError::Invalid)?;
        self.link_up.store(s.link_up, Ordering::Release);
        Ok(())
    }
}

impl Net {
    /// Takes back what a stopped thread returned; its queues, if it returned any.
    fn park(&mut self, parked: Option<Parked<Held>>) -> Option<Vec<Queue>> {
        let p = parked?;
        self.backend = Some(p.backend.backend);
        self.backend_gone = p.backend.gone;
        Some(p.queues)
    }
}

/// What moves packets between chains and the backend.
struct PacketIo {
    backend: Box<dyn Backend>,
    memory: GuestMemory,
    counters: Arc<NetCounters>,
    /// The driver accepted GUEST_CSUM; otherwise header flags must read zero.
    guest_csum: bool,
    /// The driver accepted MRG_RXBUF: a packet may span several receive chains.
    merged: bool,
    /// The backend failed for good (the tap was deleted).
    gone: bool,
    /// Receives continue here past the driver's buffers (see [`OVERFLOW_LEN`]).
    overflow: Vec<u8>,
}

enum Sent {
    /// The chain is done with (sent, dropped or refused).
    Done,
    /// The backend cannot take it now: keep it on the queue.
    WouldBlock,
}

enum Received {
    /// A packet of this many bytes (header included) is in the chain.
    Packet(u32),
    /// The chain is returned empty: malformed, or the packet did not fit.
    Dropped,
    /// Nothing to read (or no backend any more): keep the chain on the queue.
    Nothing,
}

impl PacketIo {
    fn send(&mut self, chain: Result<Chain, ChainError>) -> Sent {
        let c = &self.counters;
        let chain = match chain {
            Ok(chain) if chain.readable_len() >= VNET_HDR_LEN as u64 => chain,
            Ok(_) => {
                tracing::debug!("virtio-net: transmit chain shorter than the header");
                bump(&c.tx_errors, 1);
                return Sent::Done;
            }
            Err(e) => {
                tracing::debug!("virtio-net: bad transmit chain: {e}");
                bump(&c.tx_errors, 1);
                return Sent::Done;
            }
        };
        let len = chain.readable_len();
        let iov = match chain.readable_iovecs(&self.memory, 0, len) {
            Ok(iov) if iov.len() <= IOV_MAX => iov,
            _ => {
                bump(&c.tx_errors, 1);
                return Sent::Done;
            }
        };
        if self.gone {
            bump(&c.tx_dropped, 1);
            return Sent::Done;
        }
        // SAFETY: the iovecs come from `Chain::readable_iovecs`: vm-memory checked each
        // against guest RAM, which stays mapped while this thread holds `memory`. The guest
        // changing the bytes meanwhile only changes the packet.
        match unsafe { self.backend.send(&iov) } {
            Ok(_) => {
                bump(&c.tx_packets, 1);
                bump(&c.tx_bytes, len - VNET_HDR_LEN as u64);
                Sent::Done
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::WouldBlock,
            Err(e) => {
                gone_if_ebadfd(&mut self.gone, &e);
                tracing::debug!(
                    "virtio-net: {} refused a packet: {e}",
                    self.backend.describe()
                );
                bump(&c.tx_dropped, 1);
                Sent::Done
            }
        }
    }

    fn recv(&mut self, chain: Result<Chain, ChainError>) -> Received {
        let c = &self.counters;
        if self.gone {
            return Received::Nothing;
        }
        let chain = match chain {
            Ok(chain) if chain.writable_len() >= VNET_HDR_LEN as u64 => chain,
            Ok(_) => {
                tracing::debug!("virtio-net: receive chain shorter than the header");
                bump(&c.rx_errors, 1);
                return Received::Dropped;
            }
            Err(e) => {
                tracing::debug!("virtio-net: bad receive chain: {e}");
                bump(&c.rx_errors, 1);
                return Received::Dropped;
            }
        };
        let room = chain.writable_len();
        let n = match self.read_packet(&chain) {
            TapRead::Read(n) => n,
            TapRead::Nothing => return Received::Nothing,
            TapRead::Failed => return Received::Dropped,
        };
        let c = &self.counters;
        if n > room {
            tracing::debug!("virtio-net: dropped a {n}-byte packet: the driver posted {room}");
            bump(&c.rx_dropped, 1);
            return Received::Dropped;
        }
        if n < VNET_HDR_LEN as u64 {
            bump(&c.rx_errors, 1);
            return Received::Dropped;
        }
        // One buffer per packet (no MRG_RXBUF); without GUEST_CSUM, flags must be zero
        // (the tap may have said DATA_VALID).
        let mut written = chain.write_at(&self.memory, NUM_BUFFERS_OFFSET, &1u16.to_le_bytes());
        if !self.guest_csum && written.is_ok() {
            written = chain.write_at(&self.memory, 0, &[0]);
        }
        if written.is_err() {
            bump(&c.rx_errors, 1);
            return Received::Dropped;
        }
        bump(&c.rx_packets, 1);
        bump(&c.rx_bytes, n - VNET_HDR_LEN as u64);
        Received::Packet(n as u32)
    }
}

impl PacketIo {
    /// Reads one packet into `chain`'s buffers and, past them, the overflow buffer: for
    /// MRG_RXBUF, `chain` is the first buffer and [`Self::spill`] copies the overflow into
    /// further ones. Most packets (ACKs, anything up to a buffer's size) need only the
    /// first; a GSO packet pays one extra copy of what spills. Taking every buffer a 64 KiB
    /// packet might need before each read would instead take (and put back) dozens of
    /// chains for every small packet. Without MRG_RXBUF, bytes in the overflow buffer mean
    /// the packet did not fit.
    fn read_packet(&mut self, chain: &Chain) -> TapRead {
        let c = &self.counters;
        if self.gone {
            return TapRead::Nothing;
        }
        let mut iov = match chain.writable_iovecs(&self.memory, 0, chain.writable_len()) {
            Ok(iov) if iov.len() < IOV_MAX => iov,
            _ => {
                bump(&c.rx_errors, 1);
                return TapRead::Failed;
            }
        };
        iov.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        // SAFETY: all but the last iovec come from `Chain::writable_iovecs`: vm-memory
        // checked each against guest RAM, which stays mapped while this thread holds
        // `memory`; the last is `overflow`, which we own and do not touch meanwhile.
        match unsafe { self.backend.recv(&iov) } {
            Ok(n) => TapRead::Read(n as u64),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => TapRead::Nothing,
            Err(e) if gone_if_ebadfd(&mut self.gone, &e) => TapRead::Nothing,
            Err(e) => {
                tracing::debug!("virtio-net: reading {}: {e}", self.backend.describe());
                bump(&c.rx_errors, 1);
                TapRead::Failed
            }
        }
    }

    /// [`Self::read_packet`] for MRG_RXBUF: a packet shorter than a header fails.
    fn read_merged(&mut self, first: &Chain) -> TapRead {
        match self.read_packet(first) {
            TapRead::Read(n) if n < VNET_HDR_LEN as u64 => {
                bump(&self.counters.rx_errors, 1);
                TapRead::Failed
            }
            other => other,
        }
    }

    /// Copies the first `bytes` of the overflow buffer into `extra`, in order; returns how
    /// many bytes each took. The caller gathered room for all of them.
    fn spill(&self, extra: &[(u16, Chain)], bytes: u64) -> Result<Vec<u32>, ChainError> {
        let mut lens = Vec::with_capacity(extra.len());
        let mut done = 0;
        for (_, chain) in extra {
            if done == bytes {
                break;
            }
            let take = (bytes - done).min(chain.writable_len());
            let from = done as usize..(done + take) as usize;
            chain.write_at(&self.memory, 0, &self.overflow[from])?;
            lens.push(take as u32);
            done += take;
        }
        Ok(lens)
    }

    /// Completes the header of a merged packet of `n` bytes over `count` buffers.
    fn finish_merged(&self, first: &Chain, count: u16, n: u64) -> Result<(), ChainError> {
        first.write_at(&self.memory, NUM_BUFFERS_OFFSET, &count.to_le_bytes())?;
        if !self.guest_csum {
            first.write_at(&self.memory, 0, &[0])?;
        }
        bump(&self.counters.rx_packets, 1);
        bump(&self.counters.rx_bytes, n - VNET_HDR_LEN as u64);
        Ok(())
    }
}

/// What reading a packet from the backend did.
enum TapRead {
    /// A packet of this many bytes: the chain's worth in it, the rest in overflow.
    Read(u64),
    /// Nothing to read (or no backend any more): the chain stays on the queue.
    Nothing,
    /// Reading failed (or, merged, gave less than a header): the chain is returned empty,
    /// so a lasting error uses up buffers rather than spinning.
    Failed,
}

/// A tap whose interface was deleted answers EBADFD from then on.
fn gone_if_ebadfd(gone: &mut bool, e: &io::Error) -> bool {
    if e.raw_os_error() == Some(libc::EBADFD) {
        *gone = true;
    }
    *gone
}

/// The device thread's state.
struct Runner {
    /// The receive queue's used index when the last interrupt decision was made (see
    /// `chain::wants_interrupt`).
    rx_signalled_at: u16,
    rx: ActiveQueue,
    tx: ActiveQueue,
    io: PacketIo,
    interrupt: Arc<Interrupt>,
    link_up: Arc<AtomicBool>,
    /// No receive buffers: the backend is not watched for reading until the driver
    /// notifies the receive queue.
    rx_paused: bool,
    /// The backend said EAGAIN to a packet: it is watched for writability.
    tx_blocked: bool,
    /// What the backend's descriptor is registered for (readable, writable); None when
    /// it is not registered at all (so its errors cannot wake the thread either).
    watching: Option<(bool, bool)>,
    name: String,
    /// Limits on what the guest sends and what it receives; each has a timerfd that
    /// wakes the thread when tokens are back.
    tx_limiter: Option<RateLimiter>,
    rx_limiter: Option<RateLimiter>,
    /// Receiving waits for the receive limiter: the backend is not watched for reading.
    rx_throttled: bool,
}

impl Runner {
    fn parked(self) -> Parked<Held> {
        Parked {
            backend: Held {
                backend: self.io.backend,
                gone: self.io.gone,
            },
            queues: vec![self.rx.queue, self.tx.queue],
        }
    }

    fn run(mut self, mut events: EventLoop) -> Parked<Held> {
        let watched = events
            .add(self.rx.notify.as_raw_fd(), TOKEN_RX, false)
            .and_then(|()| events.add(self.tx.notify.as_raw_fd(), TOKEN_TX, false))
            .and_then(|()| match &self.tx_limiter {
                Some(l) => events.add(l.as_raw_fd(), TOKEN_TX_LIMIT, false),
                None => Ok(()),
            })
            .and_then(|()| match &self.rx_limiter {
                Some(l) => events.add(l.as_raw_fd(), TOKEN_RX_LIMIT, false),
                None => Ok(()),
            })
            .and_then(|()| self.watch_backend(&events));
        match watched {
            Err(e) => self.interrupt.fail_device(&format!(
                "virtio-net {}: watching the queues: {e}",
                self.name
            )),
            Ok(()) => {
                // Serve whatever the driver queued before we started.
                let mut tokens = vec![TOKEN_TX, TOKEN_RX];
                loop {
                    if let Err(e) = self.serve(&events, &tokens) {
                        self.interrupt.fail_device(&e.to_string());
                        break;
                    }
                    match events.wait() {
                        // Between passes: every chain taken is completed or put back.
                        Wake::Stop => return self.parked(),
                        Wake::Ready(t) => tokens = t,
                    }
                }
            }
        }
        // Broken: stop watching everything, but keep the backend until the transport
        // stops us, so a reset can reuse it.
        events.idle_until_stop();
        self.parked()
    }

    fn serve(&mut self, events: &EventLoop, tokens: &[u64]) -> Result<(), QueueBroken> {
        let mut tx = false;
        let mut rx = false;
        for &t in tokens {
            match t {
                TOKEN_TX => {
                    let _ = self.tx.notify.read();
                    tx = true;
                }
                TOKEN_RX => {
                    let _ = self.rx.notify.read();
                    // New buffers, perhaps: look again.
                    self.rx_paused = false;
                    rx = true;
                }
                TOKEN_BACKEND => {
                    tx |= self.tx_blocked;
                    rx |= !self.rx_paused;
                }
                TOKEN_TX_LIMIT => {
                    if let Some(l) = &mut self.tx_limiter {
                        l.timer_fired();
                    }
                    tx = true;
                }
                TOKEN_RX_LIMIT => {
                    if let Some(l) = &mut self.rx_limiter {
                        l.timer_fired();
                    }
                    self.rx_throttled = false;
                    rx = true;
                }
                _ => {}
            }
        }
        if tx {
            self.transmit()?;
        }
        if rx && !self.rx_paused && !self.rx_throttled {
            self.receive()?;
        }
        if self.io.gone && self.link_up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                "virtio-net {}: {} went away; the guest's link is down",
                self.name,
                self.io.backend.describe()
            );
            self.interrupt.signal_config();
        }
        if let Err(e) = self.watch_backend(events) {
            tracing::error!("virtio-net {}: watching the backend: {e}", self.name);
        }
        Ok(())
    }

    /// Registers the backend for what the device is waiting for, and nothing else.
    fn watch_backend(&mut self, events: &EventLoop) -> io::Result<()> {
        let want = (
            !self.rx_paused && !self.rx_throttled && !self.io.gone,
            self.tx_blocked && !self.io.gone,
        );
        let fd = self.io.backend.as_raw_fd();
        match (self.watching, want) {
            (current, want) if current == Some(want) => return Ok(()),
            (None, (false, false)) => return Ok(()),
            (Some(_), (false, false)) => {
                events.remove(fd)?;
                self.watching = None;
                return Ok(());
            }
            (None, _) => {
                events.add(fd, TOKEN_BACKEND, false)?;
                self.watching = Some((true, false));
            }
            _ => {}
        }
        if self.watching != Some(want) {
            events.modify_events(fd, TOKEN_BACKEND, want.0, want.1)?;
            self.watching = Some(want);
        }
        Ok(())
    }

    /// Sends what the driver queued, until the queue is empty, the backend is full or a
    /// batch is done (then the thread kicks itself to continue after its other events).
    ///
    /// A pass that sent anything leaves the driver's notifications off and kicks the
    /// thread to look again once its other events are handled (the tap's reply to what was
    /// just sent, typically). A driver in the middle of a burst then queues its next
    /// packets without notifying each time: a notification is a VM exit on every
    /// hypervisor, and re-arming after every pass had vmon's guests in the nested lab
    /// notify 5x as often as QEMU's for the same bytes (docs/benchmarks.md). Only a pass
    /// that finds nothing re-arms them. QEMU's transmit bottom half works the same way.
    fn transmit(&mut self) -> Result<(), QueueBroken> {
        self.tx_blocked = false;
        let q = &mut self.tx.queue;
        let mem = &self.io.memory.clone();
        let mut used = false;
        let mut served = 0;
        'serve: loop {
            q.disable_notification(mem)
                .map_err(|_| QueueBroken::UsedRing)?;
            while let Some(Popped { head, chain }) = chain::pop(q, mem)? {
                if let Some(l) = &mut self.tx_limiter {
                    let bytes = chain
                        .as_ref()
                        .map_or(0, |c| c.readable_len().saturating_sub(VNET_HDR_LEN as u64));
                    if !l.consume(bytes) {
                        // Notifications stay off: the limiter's timer wakes us.
                        chain::unpop(q);
                        break 'serve;
                    }
                }
                if let Sent::WouldBlock = self.io.send(chain) {
                    chain::unpop(q);
                    self.tx_blocked = true;
                    break 'serve;
                }
                chain::complete(q, mem, head, 0)?;
                used = true;
                served += 1;
                if served == BATCH {
                    break;
                }
            }
            if served > 0 {
                // Look again after the other events, notifications still off.
                let _ = self.tx.notify.write(1);
                break;
            }
            if !q
                .enable_notification(mem)
                .map_err(|_| QueueBroken::UsedRing)?
            {
                break;
            }
        }
        self.signal(TX, used)
    }

    /// Fills posted buffers from the backend until it has nothing more, the driver has
    /// posted nothing more (then the receive queue's notifications are re-armed and the
    /// backend left alone), or a batch is done (the backend, still readable, wakes us).
    fn receive(&mut self) -> Result<(), QueueBroken> {
        if self.io.merged {
            return self.receive_merged();
        }
        let q = &mut self.rx.queue;
        let mem = &self.io.memory.clone();
        let mut used = false;
        let mut served = 0;
        q.disable_notification(mem)
            .map_err(|_| QueueBroken::UsedRing)?;
        while served < BATCH {
            // A packet's size is known only once read: wait for an operation's worth of
            // tokens (and no byte debt) here, charge its bytes afterwards.
            if let Some(l) = &mut self.rx_limiter {
                if !l.consume(0) {
                    self.rx_throttled = true;
                    break;
                }
            }
            let Some(Popped { head, chain }) = chain::pop(q, mem)? else {
                if q.enable_notification(mem)
                    .map_err(|_| QueueBroken::UsedRing)?
                {
                    continue; // the driver posted more meanwhile
                }
                self.rx_paused = true;
                break;
            };
            let len = match self.io.recv(chain) {
                Received::Nothing => {
                    chain::unpop(q);
                    break;
                }
                Received::Dropped => 0,
                Received::Packet(len) => {
                    if let Some(l) = &mut self.rx_limiter {
                        l.charge(u64::from(len).saturating_sub(VNET_HDR_LEN as u64));
                    }
                    len
                }
            };
            chain::complete(q, mem, head, len)?;
            used = true;
            served += 1;
        }
        self.signal(RX, used)
    }

    /// Like [`Self::receive`], for MRG_RXBUF: each packet takes as many chains as it needs.
    fn receive_merged(&mut self) -> Result<(), QueueBroken> {
        let mem = &self.io.memory.clone();
        let mut used = false;
        let mut served = 0;
        let mut extra: Vec<(u16, Chain)> = Vec::new();
        self.rx
            .queue
            .disable_notification(mem)
            .map_err(|_| QueueBroken::UsedRing)?;
        while served < BATCH {
            if let Some(l) = &mut self.rx_limiter {
                if !l.consume(0) {
                    self.rx_throttled = true;
                    break;
                }
            }
            let q = &mut self.rx.queue;
            // Every merged buffer must hold a header; one that does not is returned empty.
            let first = loop {
                match chain::pop(q, mem)? {
                    None => break None,
                    Some(Popped { head, chain: Ok(c) }) if c.writable_len() >= HDR => {
                        break Some((head, c))
                    }
                    Some(Popped { head, .. }) => {
                        bump(&self.io.counters.rx_errors, 1);
                        chain::complete(q, mem, head, 0)?;
                        used = true;
                    }
                }
            };
            let Some((head, first)) = first else {
                if q.enable_notification(mem)
                    .map_err(|_| QueueBroken::UsedRing)?
                {
                    continue; // the driver posted more meanwhile
                }
                self.rx_paused = true;
                break;
            };
            let n = match self.io.read_merged(&first) {
                TapRead::Nothing => {
                    chain::unpop(q);
                    break;
                }
                TapRead::Failed => {
                    chain::complete(q, mem, head, 0)?;
                    used = true;
                    continue;
                }
                TapRead::Read(n) => n,
            };
            let in_first = n.min(first.writable_len());
            let spilled = n - in_first;
            if spilled > self.io.overflow.len() as u64 {
                // The backend reported more than the buffers held: the packet was cut
                // short. Drop it; keep the buffer.
                tracing::debug!("virtio-net: dropped a {n}-byte packet: larger than a read");
                bump(&self.io.counters.rx_dropped, 1);
                chain::unpop(q);
                continue;
            }
            let mut done = vec![(head, in_first as u32)];
            if spilled > 0 {
                // More buffers for the rest. They are put back by count if they do not
                // suffice, so a malformed one here waits to be first in line.
                extra.clear();
                let mut room = 0;
                while room < spilled {
                    match chain::pop(q, mem)? {
                        Some(Popped { head, chain: Ok(c) }) if c.writable_len() >= HDR => {
                            room += c.writable_len();
                            extra.push((head, c));
                        }
                        Some(_) => {
                            chain::unpop(q);
                            break;
                        }
                        None => break,
                    }
                }
                let lens = if room < spilled {
                    tracing::debug!(
                        "virtio-net: dropped a {n}-byte packet: the driver posted less"
                    );
                    bump(&self.io.counters.rx_dropped, 1);
                    None
                } else {
                    self.io.spill(&extra, spilled).ok()
                };
                let Some(lens) = lens else {
                    // The packet is lost; the buffers are not.
                    chain::unpop_n(q, extra.len() + 1);
                    continue;
                };
                done.extend(extra.iter().map(|&(head, _)| head).zip(lens));
            }
            if self.io.finish_merged(&first, done.len() as u16, n).is_err() {
                bump(&self.io.counters.rx_errors, 1);
                chain::unpop_n(q, done.len());
                continue;
            }
            chain::complete_together(q, mem, &done)?;
            if let Some(l) = &mut self.rx_limiter {
                l.charge(n.saturating_sub(HDR));
            }
            used = true;
            served += 1;
        }
        self.signal(RX, used)
    }

    fn signal(&mut self, index: usize, used: bool) -> Result<(), QueueBroken> {
        let mem = &self.io.memory;
        let wanted = if !used {
            false
        } else if index == RX {
            // Receive chains may be returned together (MRG_RXBUF), which virtio-queue's
            // own decision does not count: decide from the used index.
            let q = &self.rx.queue;
            let since = std::mem::replace(&mut self.rx_signalled_at, q.next_used());
            chain::wants_interrupt(q, mem, since)?
        } else {
            self.tx
                .queue
                .needs_notification(mem)
                .map_err(|_| QueueBroken::UsedRing)?
        };
        if wanted {
            self.interrupt.signal_queue(index);
        }
        Ok(())
    }
}

/// One transmit pass and two receive passes over `tx` and `rx` (the second finds what the
/// first put back), as the device thread runs them after notifications, without the thread
/// or its event loop: the fuzzer's way in ([`crate::fuzzing::virtio_net`]).
pub(crate) fn serve_once(
    memory: GuestMemory,
    features: u64,
    queues: [Queue; 2],
    backend: Box<dyn Backend>,
    interrupt: Arc<Interrupt>,
) -> Result<NetStats, QueueBroken> {
    let Some(mut runner) = detached_runner(memory, features, queues, backend, interrupt) else {
        return Ok(NetStats::default());
    };
    runner.transmit()?;
    runner.receive()?;
    runner.rx_paused = false;
    runner.receive()?;
    Ok(runner.io.counters.snapshot())
}

/// A device thread's state without the thread: its passes are called directly.
fn detached_runner(
    memory: GuestMemory,
    features: u64,
    [rx, tx]: [Queue; 2],
    backend: Box<dyn Backend>,
    interrupt: Arc<Interrupt>,
) -> Option<Runner> {
    let notify = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK);
    let (Ok(rx_notify), Ok(tx_notify)) = (notify(), notify()) else {
        return None;
    };
    let counters = Arc::new(NetCounters::default());
    Some(Runner {
        rx_signalled_at: rx.next_used(),
        rx: ActiveQueue {
            queue: rx,
            notify: rx_notify,
        },
        tx: ActiveQueue {
            queue: tx,
            notify: tx_notify,
        },
        io: PacketIo {
            backend,
            memory,
            counters,
            guest_csum: features & F_GUEST_CSUM != 0,
            merged: features & F_MRG_RXBUF != 0,
            gone: false,
            overflow: vec![0; OVERFLOW_LEN],
        },
        interrupt,
        link_up: Arc::new(AtomicBool::new(true)),
        rx_paused: false,
        tx_blocked: false,
        watching: None,
        name: "fuzz".into(),
        tx_limiter: None,
        rx_limiter: None,
        rx_throttled: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::{desc, memory, F_NEXT, F_WRITE};
    use crate::fuzzing::NoMsi;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmon_devices::pci::msix::Msix;

    #[test]
    fn config_space_is_the_mac_then_the_link_status() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let (dev_end, _peer) = UnixDatagram::pair().unwrap();
        let net = Net::new(Box::new(Pair::new(dev_end)), mac, "net0".into());
        let mut c = [0xAAu8; 12];
        net.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 0, 0, 0, 0]);
        let mut s = [0u8; 2];
        net.read_config(6, &mut s);
        assert_eq!(u16::from_le_bytes(s), S_LINK_UP);
        net.link_up.store(false, Ordering::Release);
        net.read_config(6, &mut s);
        assert_eq!(s, [0, 0]);
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.pci_class(), 0x02_0000);
        assert_eq!(net.queue_max_sizes().len(), 2);
    }

    #[test]
    fn offered_features() {
        let f = Net::new(
            Box::new(Pair::new(UnixDatagram::pair().unwrap().0)),
            MacAddr::random(),
            "n".into(),
        )
        .features();
        for bit in [0, 1, 5, 7, 8, 9, 11, 12, 13, 15, 16, 28, 29, 32] {
            assert!(f & (1 << bit) != 0, "feature bit {bit} should be offered");
        }
        // No UFO, control queue or multiqueue.
        for bit in [10, 14, 17, 22] {
            assert!(
                f & (1 << bit) == 0,
                "feature bit {bit} should not be offered"
            );
        }
    }

    #[test]
    fn only_offloads_the_guest_can_receive_reach_the_tap() {
        use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
        assert_eq!(offload_flags(0), 0);
        // Host-side offloads say nothing about what the guest can receive.
        assert_eq!(offload_flags(F_CSUM | F_HOST_TSO4 | F_HOST_TSO6), 0);
        // GSO without GUEST_CSUM is meaningless (and TUNSETOFFLOAD refuses it).
        assert_eq!(offload_flags(F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN), 0);
        assert_eq!(offload_flags(F_GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            offload_flags(F_GUEST_CSUM | F_GUEST_TSO4),
            TUN_F_CSUM | TUN_F_TSO4
        );
        assert_eq!(
            offload_flags(FEATURES),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        // ECN only qualifies TSO.
        assert_eq!(offload_flags(F_GUEST_CSUM | F_GUEST_ECN), TUN_F_CSUM);
        assert_eq!(
            offload_flags(F_GUEST_CSUM | F_GUEST_UFO),
            TUN_F_CSUM | TUN_F_UFO
        );
    }

    #[test]
    fn mac_addresses() {
        let m: MacAddr = "02:AB:cd:00:00:01".parse().unwrap();
        assert_eq!(m.0, [2, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(m.to_string(), "02:ab:cd:00:00:01");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "2:0:0:0:0:1",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
        ] {
            assert!(
                bad.parse::<MacAddr>().unwrap_err().contains("six hex"),
                "{bad}"
            );
        }
        let e = "01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err();
        assert!(e.contains("multicast"), "{e}");
        assert!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>().is_err());
        assert!("00:00:00:00:00:00"
            .parse::<MacAddr>()
            .unwrap_err()
            .contains("all-zero"));
        for _ in 0..32 {
            let r = MacAddr::random();
            assert_eq!(r.0[0], 0x02, "locally administered unicast: {r}");
            assert_eq!(r.to_string().parse::<MacAddr>().unwrap(), r);
        }
        assert_ne!(MacAddr::random(), MacAddr::random());
    }

    /// One end of a datagram socket pair standing in for a tap: message boundaries are
    /// kept, and a read too small for a packet returns what fitted (as recent kernels'
    /// taps do).
    struct Pair {
        sock: UnixDatagram,
        offload: Arc<AtomicU32>,
    }

    impl Pair {
        fn new(sock: UnixDatagram) -> Self {
            sock.set_nonblocking(true).unwrap();
            Pair {
                sock,
                offload: Arc::new(AtomicU32::new(u32::MAX)),
            }
        }
    }

    impl AsRawFd for Pair {
        fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
            self.sock.as_raw_fd()
        }
    }

    impl Backend for Pair {
        // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
        unsafe fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
            // SAFETY: msghdr is plain data; all-zeroes is valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len();
            // SAFETY: the caller guarantees the iovecs are writable.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }

        // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
        unsafe fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
            // SAFETY: the caller guarantees the iovecs are readable.
            let n = unsafe { libc::writev(self.sock.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }

        fn set_offload(&self, flags: u32) -> io::Result<()> {
            self.offload.store(flags, Ordering::Relaxed);
            Ok(())
        }

        fn describe(&self) -> String {
            "socket pair".into()
        }
    }

    /// The driver's side of one queue in test memory.
    struct DriverQueue {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl DriverQueue {
        /// The rings of a `size`-entry queue from `base` on (laid out here: MockSplitQueue
        /// makes the used ring overlap the available ring of a 256-entry queue).
        fn new(base: u64, size: u16) -> (Self, Queue) {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
            let mut q = Queue::new(size).unwrap();
            q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            q.set_ready(true);
            let d = DriverQueue {
                desc,
                avail,
                used,
                size,
                next_desc: 0,
                avail_idx: 0,
            };
            (d, q)
        }

        /// Offers one chain of (address, length, device-writable) buffers.
        fn offer(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) {
            let head = self.next_desc;
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let index = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let mut flags = if writable { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                mem.write_obj(
                    desc(addr, len, flags, self.next_desc),
                    GuestAddress(self.desc + 16 * u64::from(index)),
                )
                .unwrap();
            }
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// (descriptor head, length) of used element `i`.
        fn used(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % self.size);
            (
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        /// Waits until the device has used `n` chains in all.
        fn wait_used(&self, mem: &GuestMemory, n: u16) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.used_idx(mem) != n {
                assert!(
                    Instant::now() < deadline,
                    "the device used {} chains, not {n}",
                    self.used_idx(mem)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    struct Harness {
        mem: GuestMemory,
        net: Net,
        rx: DriverQueue,
        tx: DriverQueue,
        rx_kick: EventFd,
        tx_kick: EventFd,
        peer: UnixDatagram,
        interrupt: Arc<Interrupt>,
        offload: Arc<AtomicU32>,
    }

    const QSIZE: u16 = 256;

    impl Harness {
        fn start(features: u64) -> Harness {
            let mem = memory();
            let (rx, rxq) = DriverQueue::new(0, QSIZE);
            let (tx, txq) = DriverQueue::new(0x8000, QSIZE);
            let (dev_end, peer) = UnixDatagram::pair().unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let pair = Pair::new(dev_end);
            let offload = pair.offload.clone();
            let mut net = Net::new(
                Box::new(pair),
                "02:00:00:00:00:01".parse().unwrap(),
                "test".into(),
            );
            let msix = Arc::new(Mutex::new(Msix::new(3, Box::new(NoMsi))));
            let interrupt = Arc::new(Interrupt::new(msix, 2));
            let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
            net.activate(Activation {
                memory: mem.clone(),
                features,
                queues: vec![
                    ActiveQueue {
                        queue: rxq,
                        notify: rx_kick.try_clone().unwrap(),
                    },
                    ActiveQueue {
                        queue: txq,
                        notify: tx_kick.try_clone().unwrap(),
                    },
                ],
                interrupt: interrupt.clone(),
                resumed: false,
            })
            .unwrap();
            Harness {
                mem,
                net,
                rx,
                tx,
                rx_kick,
                tx_kick,
                peer,
                interrupt,
                offload,
            }
        }

        /// Posts `count` receive chains of one `len`-byte buffer each, at [`rx_buffer`]
        /// `0..count`, and notifies the receive queue.
        fn post_rx_buffers(&mut self, count: u64, len: u32) {
            for i in 0..count {
                self.rx.offer(&self.mem, &[(rx_buffer(i), len, true)]);
            }
            self.rx_kick.write(1).unwrap();
        }

        fn stats(&self) -> NetStats {
            self.net.counters().snapshot()
        }

        /// Waits until the counters satisfy `ok`.
        fn wait_stats(&self, ok: impl Fn(&NetStats) -> bool) -> NetStats {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = self.stats();
                if ok(&s) {
                    return s;
                }
                assert!(Instant::now() < deadline, "counters: {s:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// A header (with `num_buffers` garbage, as the tap leaves it) and a frame.
    /// Where [`Harness::post_rx_buffers`] puts receive buffer `i`: a page each, above the
    /// rings (test memory is 1 MiB; the rings sit below 0x1_0000).
    fn rx_buffer(i: u64) -> u64 {
        0x2_0000 + i * 0x1000
    }

    fn packet(seq: u32, frame_len: usize) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p[0] = 2; // DATA_VALID
        p[10] = 0xEE;
        p[11] = 0xEE;
        p.extend((0..frame_len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8));
        p
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn transmit_writes_header_and_frame_as_one_packet() {
        let mut h = Harness::start(FEATURES);
        assert_eq!(
            h.offload.load(Ordering::Relaxed),
            offload_flags(FEATURES),
            "offloads set from the negotiated features"
        );
        let p = packet(1, 1000);
        // Header and the first bytes of the frame in one buffer, the rest in another.
        h.mem
            .write_slice(&p[..100], GuestAddress(0x2_0000))
            .unwrap();
        h.mem
            .write_slice(&p[100..], GuestAddress(0x3_0000))
            .unwrap();
        h.tx.offer(&h.mem, &[(0x2_0000, 100, false), (0x3_0000, 912, false)]);
        // A chain too short for a header fails on its own.
        h.tx.offer(&h.mem, &[(0x2_0000, 11, false)]);
        h.tx_kick.write(1).unwrap();
        let mut got = vec![0u8; 4096];
        let n = h.peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &p[..]);
        h.tx.wait_used(&h.mem, 2);
        assert_eq!(h.tx.used(&h.mem, 0), (0, 0));
        assert_eq!(h.tx.used(&h.mem, 1), (2, 0));
        let s = h.wait_stats(|s| s.tx_errors == 1);
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 1000));
        assert!(h.interrupt.take_isr() & 1 != 0, "a queue interrupt");
        h.net.reset();
    }

    #[test]
    fn transmit_rearms_notifications_only_after_a_pass_that_found_nothing() {
        let mem = memory();
        let (_rxd, rxq) = DriverQueue::new(0, QSIZE);
        let (mut txd, mut txq) = DriverQueue::new(0x8000, QSIZE);
        txq.set_event_idx(true);
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let msix = Arc::new(Mutex::new(Msix::new(3, Box::new(NoMsi))));
        let interrupt = Arc::new(Interrupt::new(msix, 2));
        let mut runner = detached_runner(
            mem.clone(),
            FEATURES,
            [rxq, txq],
            Box::new(Pair::new(ours)),
            interrupt,
        )
        .unwrap();
        // avail_event: where the device asks to be notified next (VIRTIO_F_EVENT_IDX).
        let avail_event = txd.used + 4 + 8 * u64::from(QSIZE);
        let read_event = || mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap();
        let p = packet(7, 200);
        mem.write_slice(&p, GuestAddress(0x3_0000)).unwrap();
        for _ in 0..2 {
            txd.offer(&mem, &[(0x3_0000, p.len() as u32, false)]);
        }
        runner.transmit().unwrap();
        assert_eq!(txd.used_idx(&mem), 2);
        assert_eq!(
            read_event(),
            0,
            "notifications stay off after a pass that sent"
        );
        assert!(
            runner.tx.notify.read().is_ok(),
            "the thread looks again by itself"
        );
        // The driver goes on without notifying; the next look finds its packet.
        txd.offer(&mem, &[(0x3_0000, p.len() as u32, false)]);
        runner.transmit().unwrap();
        assert_eq!(txd.used_idx(&mem), 3);
        assert!(runner.tx.notify.read().is_ok());
        // A pass that finds nothing re-arms: the driver's next packet notifies.
        runner.transmit().unwrap();
        assert_eq!(read_event(), 3, "asks to hear of the fourth packet");
        assert!(runner.tx.notify.read().is_err(), "and sleeps until it does");
        let mut got = [0u8; 512];
        for _ in 0..3 {
            assert_eq!(peer.recv(&mut got).unwrap(), p.len());
        }
    }

    #[test]
    fn receive_fills_posted_buffers_and_waits_for_more() {
        // No GUEST_CSUM: the header's flags must reach the driver as zero.
        let mut h = Harness::start(COMMON_FEATURES | F_MAC);
        assert_eq!(h.offload.load(Ordering::Relaxed), 0);
        // Packets arrive before any buffer is posted: they wait in the backend.
        for seq in 0..3 {
            h.peer.send(&packet(seq, 60 + seq as usize)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.rx.used_idx(&h.mem), 0);
        // Two buffers split across descriptors, then a notification.
        for i in 0..2u64 {
            let base = 0x2_0000 + i * 0x1000;
            h.rx.offer(&h.mem, &[(base, 20, true), (base + 0x800, 1500, true)]);
        }
        h.rx_kick.write(1).unwrap();
        h.rx.wait_used(&h.mem, 2);
        for seq in 0..2u16 {
            let (head, len) = h.rx.used(&h.mem, seq);
            assert_eq!((head, len), (u32::from(seq) * 2, 72 + u32::from(seq)));
            let base = 0x2_0000 + u64::from(seq) * 0x1000;
            let mut got = read_guest(&h.mem, base, 20);
            got.extend(read_guest(&h.mem, base + 0x800, len as usize - 20));
            let mut want = packet(u32::from(seq), 60 + usize::from(seq));
            want[0] = 0;
            want[10..12].copy_from_slice(&1u16.to_le_bytes());
            assert_eq!(got, want);
        }
        // The third packet waits for a third buffer, which a notification announces.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(h.rx.used_idx(&h.mem), 2);
        h.rx.offer(&h.mem, &[(0x4_0000, 2048, true)]);
        h.rx_kick.write(1).unwrap();
        h.rx.wait_used(&h.mem, 3);
        assert_eq!(h.rx.used(&h.mem, 2).1, 74);
        assert_eq!(read_guest(&h.mem, 0x4_000C, 62), packet(2, 62)[12..]);
        let s = h.stats();
        assert_eq!(
            (s.rx_packets, s.rx_bytes, s.rx_dropped),
            (3, 60 + 61 + 62, 0)
        );
        h.net.reset();
    }

    #[test]
    fn receive_drops_packets_larger_than_the_buffer() {
        let mut h = Harness::start(FEATURES & !F_MRG_RXBUF);
        h.rx.offer(&h.mem, &[(0x2_0000, 100, true)]);
        h.rx.offer(&h.mem, &[(0x3_0000, 8, true)]); // shorter than a header
        h.rx.offer(&h.mem, &[(0x4_0000, 62, true)]); // exactly the next packet
        h.rx_kick.write(1).unwrap();
        h.peer.send(&packet(0, 200)).unwrap();
        h.peer.send(&packet(1, 50)).unwrap();
        h.rx.wait_used(&h.mem, 3);
        assert_eq!(h.rx.used(&h.mem, 0), (0, 0), "too big: dropped");
        assert_eq!(h.rx.used(&h.mem, 1), (1, 0), "malformed: returned empty");
        assert_eq!(
            h.rx.used(&h.mem, 2),
            (2, 62),
            "a packet filling the chain fits"
        );
        let mut want = packet(1, 50);
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            read_guest(&h.mem, 0x4_0000, 62),
            want,
            "GUEST_CSUM: flags kept"
        );
        let s = h.stats();
        assert_eq!((s.rx_packets, s.rx_dropped, s.rx_errors), (1, 1, 1));
        h.net.reset();
    }

    /// MRG_RXBUF: a packet spans as many small buffers as it needs, `num_buffers` says how
    /// many, they reach the used ring together, and the buffers it did not need serve the
    /// next packet.
    #[test]
    fn merged_receive_spreads_a_packet_over_buffers() {
        let mut h = Harness::start(FEATURES);
        h.post_rx_buffers(10, 512);
        let big = packet(7, 1300 - VNET_HDR_LEN); // 1300 bytes: three buffers
        let small = packet(8, 100); // one buffer
        h.peer.send(&big).unwrap();
        h.peer.send(&small).unwrap();
        h.rx.wait_used(&h.mem, 4);
        assert_eq!(h.rx.used(&h.mem, 0), (0, 512));
        assert_eq!(h.rx.used(&h.mem, 1), (1, 512));
        assert_eq!(h.rx.used(&h.mem, 2), (2, 276));
        assert_eq!(h.rx.used(&h.mem, 3), (3, (VNET_HDR_LEN + 100) as u32));
        let mut got = Vec::new();
        for (i, len) in [(0, 512), (1, 512), (2, 276)] {
            got.extend(read_guest(&h.mem, rx_buffer(i), len));
        }
        let mut want = big.clone();
        want[10..12].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(got, want, "the packet across three buffers, num_buffers 3");
        let mut want = small.clone();
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(read_guest(&h.mem, rx_buffer(3), want.len()), want);
        let s = h.wait_stats(|s| s.rx_packets == 2);
        assert_eq!((s.rx_dropped, s.rx_errors), (0, 0));
        h.net.reset();
    }

    /// MRG_RXBUF: a GSO-sized packet over page-sized buffers, as Linux posts them.
    #[test]
    fn merged_receive_takes_a_64_kib_packet_over_pages() {
        let mut h = Harness::start(FEATURES);
        h.post_rx_buffers(20, 4096);
        let p = packet(3, 65_000);
        h.peer.send(&p).unwrap();
        let buffers = p.len().div_ceil(4096) as u16; // 16
        h.rx.wait_used(&h.mem, buffers);
        let mut got = Vec::new();
        for i in 0..buffers {
            let (head, len) = h.rx.used(&h.mem, i);
            assert_eq!(head, u32::from(i));
            got.extend(read_guest(&h.mem, rx_buffer(u64::from(i)), len as usize));
        }
        let mut want = p.clone();
        want[10..12].copy_from_slice(&buffers.to_le_bytes());
        assert!(got == want, "{} bytes back of {}", got.len(), want.len());
        h.net.reset();
    }

    /// MRG_RXBUF: a packet larger than all the buffers posted is dropped and the buffers
    /// stay posted; a buffer too small for a header is returned empty.
    #[test]
    fn merged_receive_drops_what_does_not_fit_and_keeps_the_buffers() {
        let mut h = Harness::start(FEATURES);
        h.rx.offer(&h.mem, &[(0x2_0000, 8, true)]); // shorter than a header
        h.rx.offer(&h.mem, &[(0x3_0000, 100, true)]);
        h.rx.offer(&h.mem, &[(0x4_0000, 100, true)]);
        h.rx_kick.write(1).unwrap();
        h.peer.send(&packet(0, 500)).unwrap(); // 512 bytes: more than 200
        h.peer.send(&packet(1, 150)).unwrap(); // 162: two buffers
        h.rx.wait_used(&h.mem, 3);
        assert_eq!(h.rx.used(&h.mem, 0), (0, 0), "malformed: returned empty");
        assert_eq!(h.rx.used(&h.mem, 1), (1, 100));
        assert_eq!(h.rx.used(&h.mem, 2), (2, 62));
        let mut got = read_guest(&h.mem, 0x3_0000, 100);
        got.extend(read_guest(&h.mem, 0x4_0000, 62));
        let mut want = packet(1, 150);
        want[10..12].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(got, want);
        let s = h.wait_stats(|s| s.rx_packets == 1);
        assert_eq!((s.rx_dropped, s.rx_errors), (1, 1));
        h.net.reset();
    }

    /// The interrupt rule for chains returned together: with EVENT_IDX, only when the
    /// driver's `used_event` lies in what was returned since the last decision; without it,
    /// unless the driver set NO_INTERRUPT.
    #[test]
    fn merged_chains_interrupt_as_the_driver_asked() {
        let mem = memory();
        let (d, mut q) = DriverQueue::new(0, 8);
        let used_event = GuestAddress(d.avail + 4 + 2 * 8);
        q.set_event_idx(true);
        chain::complete_together(&mut q, &mem, &[(0, 10), (1, 20), (2, 30)]).unwrap();
        assert_eq!(d.used_idx(&mem), 3);
        assert_eq!(d.used(&mem, 1), (1, 20));
        // The driver wants an interrupt once the used index passes 1: it did (0 -> 3).
        mem.write_obj(1u16, used_event).unwrap();
        assert!(chain::wants_interrupt(&q, &mem, 0).unwrap());
        // It asks at 5; 3 -> 4 is not there yet, 4 -> 6 is.
        mem.write_obj(5u16, used_event).unwrap();
        chain::complete_together(&mut q, &mem, &[(3, 1)]).unwrap();
        assert!(!chain::wants_interrupt(&q, &mem, 3).unwrap());
        chain::complete_together(&mut q, &mem, &[(4, 1), (5, 1)]).unwrap();
        assert!(chain::wants_interrupt(&q, &mem, 4).unwrap());
        // Wrapping around the ring and the index space.
        q.set_next_used(u16::MAX - 1);
        mem.write_obj(0u16, used_event).unwrap();
        chain::complete_together(&mut q, &mem, &[(6, 1), (7, 1), (0, 1)]).unwrap();
        assert_eq!(d.used_idx(&mem), 1);
        assert!(chain::wants_interrupt(&q, &mem, u16::MAX - 1).unwrap());
        // A head outside the queue breaks it.
        assert!(chain::complete_together(&mut q, &mem, &[(8, 1)]).is_err());
        // Without EVENT_IDX: the avail ring's NO_INTERRUPT flag decides.
        q.set_event_idx(false);
        mem.write_obj(1u16, GuestAddress(d.avail)).unwrap();
        assert!(!chain::wants_interrupt(&q, &mem, 0).unwrap());
        mem.write_obj(0u16, GuestAddress(d.avail)).unwrap();
        assert!(chain::wants_interrupt(&q, &mem, 0).unwrap());
    }

    #[test]
    fn transmit_waits_while_the_backend_is_full() {
        let mut h = Harness::start(FEATURES);
        let frame = 1500;
        let n = QSIZE;
        for i in 0..n {
            let at = 0x1_0000 + u64::from(i) * 0x800;
            h.mem
                .write_slice(&packet(u32::from(i), frame), GuestAddress(at))
                .unwrap();
            h.tx.offer(&h.mem, &[(at, (VNET_HDR_LEN + frame) as u32, false)]);
        }
        h.tx_kick.write(1).unwrap();
        // 256 packets of 1.5 KB are more than a socket buffer holds: the device must stop
        // at EAGAIN and resume when the peer reads, losing and reordering nothing.
        let s = h.wait_stats(|s| s.tx_packets > 0);
        assert!(
            s.tx_packets < u64::from(n),
            "the backend never filled up: {s:?}"
        );
        let mut buf = vec![0u8; 4096];
        for i in 0..n {
            let len = h.peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], &packet(u32::from(i), frame)[..], "packet {i}");
        }
        h.tx.wait_used(&h.mem, n);
        let s = h.stats();
        assert_eq!(
            (s.tx_packets, s.tx_dropped, s.tx_errors),
            (u64::from(n), 0, 0)
        );
        h.net.reset();
    }

    #[test]
    fn reset_returns_the_backend_for_the_next_activation() {
        let mut h = Harness::start(FEATURES);
        h.net.reset();
        assert!(h.net.backend.is_some());
        h.net.reset(); // nothing running: nothing to do
        assert!(h.net.backend.is_some());
    }

    #[test]
    fn pause_hands_back_the_queues_and_resume_continues() {
        let mut h = Harness::start(FEATURES);
        let p = packet(1, 100);
        h.mem.write_slice(&p, GuestAddress(0x2_0000)).unwrap();
        h.tx.offer(&h.mem, &[(0x2_0000, p.len() as u32, false)]);
        h.tx_kick.write(1).unwrap();
        h.tx.wait_used(&h.mem, 1);
        let queues = h.net.pause(std::time::Duration::ZERO).unwrap();
        assert_eq!(queues.len(), 2);
        assert_eq!((queues[TX].next_avail(), queues[TX].next_used()), (1, 1));
        assert!(
            h.net.pause(std::time::Duration::ZERO).unwrap().is_empty(),
            "nothing left running"
        );
        // Offered while the device was paused, without a notification.
        h.tx.offer(&h.mem, &[(0x2_0000, p.len() as u32, false)]);
        let queues = queues
            .into_iter()
            .zip([&h.rx_kick, &h.tx_kick])
            .map(|(queue, kick)| ActiveQueue {
                queue,
                notify: kick.try_clone().unwrap(),
            })
            .collect();
        h.net
            .activate(Activation {
                memory: h.mem.clone(),
                features: FEATURES,
                queues,
                interrupt: h.interrupt.clone(),
                resumed: true,
            })
            .unwrap();
        h.tx.wait_used(&h.mem, 2);
        let mut got = vec![0u8; 4096];
        for _ in 0..2 {
            let n = h.peer.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &p[..]);
        }
        h.net.reset();
        assert!(h.net.backend.is_some());
    }

    #[test]
    fn state_keeps_the_mac_and_a_new_backend_brings_the_link_back() {
        let (dev_end, _peer) = UnixDatagram::pair().unwrap();
        let mut net = Net::new(Box::new(Pair::new(dev_end)), MacAddr::random(), "n".into());
        let saved = DeviceState::Net(NetState {
            mac: "52:54:00:12:34:56".into(),
            link_up: false,
        });
        net.restore_state(&saved).unwrap();
        assert_eq!(net.save_state(), saved);
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0]);
        for bad in ["52:54:00:12:34", "01:00:5e:00:00:01"] {
            let s = DeviceState::Net(NetState {
                mac: bad.into(),
                link_up: true,
            });
            assert!(matches!(
                net.restore_state(&s),
                Err(DeviceStateError::Invalid(_))
            ));
        }
        assert!(matches!(
            net.restore_state(&DeviceState::Stateless),
            Err(DeviceStateError::WrongKind { .. })
        ));
        // Resumed on the new backend: the link the guest last saw down is up again, and
        // the driver hears of it.
        let mem = memory();
        let (_, rxq) = DriverQueue::new(0, QSIZE);
        let (_, txq) = DriverQueue::new(0x8000, QSIZE);
        let msix = Arc::new(Mutex::new(Msix::new(3, Box::new(NoMsi))));
        let interrupt = Arc::new(Interrupt::new(msix, 2));
        let queues = [rxq, txq]
            .into_iter()
            .map(|queue| ActiveQueue {
                queue,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        net.activate(Activation {
            memory: mem,
            features: FEATURES,
            queues,
            interrupt: interrupt.clone(),
            resumed: true,
        })
        .unwrap();
        assert_eq!(interrupt.take_isr() & 2, 2, "a configuration interrupt");
        net.read_config(6, &mut c[..2]);
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), S_LINK_UP);
        net.reset();
    }

    #[test]
    fn a_broken_queue_fails_the_device() {
        let h = Harness::start(FEATURES);
        // An available index that jumps past the queue size.
        h.mem
            .write_obj(QSIZE + 5, GuestAddress(h.tx.avail + 2))
            .unwrap();
        h.tx_kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.interrupt.needs_reset() {
            assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET not set");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut net = h.net;
        net.reset();
        assert!(net.backend.is_some(), "the backend survives a broken queue");
    }
}
