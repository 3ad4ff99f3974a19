//! virtio 1.x devices on a PCI transport.
//!
//! - [`transport`]: the virtio-pci function: PCI configuration space with the virtio
//!   capabilities and MSI-X, and the BAR holding the common configuration, ISR, device
//!   configuration and notification registers. A guest's queue notification is a write
//!   to the notify area, which KVM turns into an eventfd signal (ioeventfd) without
//!   leaving the kernel.
//! - [`chain`]: validation of descriptor chains taken from guest memory: every buffer
//!   inside guest RAM, chains terminated, readable before writable.
//! - [`worker`]: each active device runs its queues on its own thread, woken by the
//!   queue eventfds and its backend's file descriptors through epoll.
//! - Devices: [`block`] (requests in flight through [`uring`] where the host allows it),
//!   [`net`] (over a [`tap`]), [`rng`], [`vsock`].
//!
//! Snapshots: [`transport::VirtioPci`] implements `vmon_state::Persist`. The transport
//! first quiesces its device (the device thread stops between requests and hands back its
//! queues with their indices final), then saves its registers, the queues, MSI-X and the
//! device's own guest-visible state ([`DeviceState`]). Backends (disk files, taps, sockets)
//! are wiring: the restorer opens them again and the device continues on them.
//!
//! Guest memory is untrusted: every access goes through vm-memory's bounds checks, and a
//! request the device cannot make sense of fails that request (an error status to the
//! guest) or, when the queue itself is broken, sets DEVICE_NEEDS_RESET. Nothing a guest
//! writes can make the VMM panic or touch host memory outside guest RAM.

pub mod block;
pub mod chain;
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod metrics;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod tap;
pub mod transport;
pub mod uring;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;
use vmon_memory::GuestMemory;

pub use interrupt::Interrupt;

/// Feature bits every vmon device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Device IDs from the virtio specification (section 5).
pub mod device_id {
    pub const NET: u16 = 1;
    pub const BLOCK: u16 = 2;
    pub const RNG: u16 = 4;
    pub const VSOCK: u16 = 19;
}

/// A queue handed to a device when the driver sets DRIVER_OK.
pub struct ActiveQueue {
    pub queue: Queue,
    /// Signalled (through KVM's ioeventfd) when the driver notifies this queue.
    pub notify: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub memory: GuestMemory,
    /// Features both sides agreed on.
    pub features: u64,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<Interrupt>,
    /// The queues continue where a pause (or a snapshot) left them rather than starting
    /// fresh at the driver's DRIVER_OK: the device keeps its guest-visible state and looks
    /// at its queues at once, since a notification may have been lost meanwhile.
    pub resumed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("the device's backend is unavailable (a previous activation failed, or its thread panicked)")]
    BackendLost,
    #[error("starting the device thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    /// The device thread panicked: its queues and backend are gone.
    #[error("the device thread died; its queues and backend are lost")]
    ThreadDied,
    /// Requests in flight did not finish within the time given (storage that stopped
    /// answering); the device goes on running as if never asked.
    #[error("{device}: requests still in flight after {after:?} (the storage is not answering)")]
    Busy {
        device: String,
        after: std::time::Duration,
    },
}

/// A device's own guest-visible state, beyond what the transport holds. Backends are not
/// in it: they are wiring, opened again by whoever restores the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceState {
    Block(block::BlockState),
    Net(net::NetState),
    Vsock(vsock::VsockState),
    /// A device with nothing of its own to keep (virtio-rng).
    Stateless,
}

impl DeviceState {
    fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Vsock(_) => "vsock",
            DeviceState::Stateless => "stateless",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    #[error("the saved state is a {saved} device's, this device is {device}")]
    WrongKind {
        saved: &'static str,
        device: &'static str,
    },
    /// The backend the restorer supplied shows the guest something else than before.
    #[error("the new backend does not match the saved device: {0}")]
    Mismatch(String),
    #[error("the saved device state is invalid: {0}")]
    Invalid(String),
}

impl DeviceStateError {
    pub(crate) fn wrong_kind(saved: &DeviceState, device: &'static str) -> Self {
        DeviceStateError::WrongKind {
            saved: saved.kind(),
            device,
        }
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// PCI class code (class, subclass, prog-if) the function shows.
    fn pci_class(&self) -> u32 {
        0xFF_0000
    }
    /// The largest size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration; most devices have nothing writable.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "write to read-only device config");
    }
    /// Starts serving the queues (the driver set DRIVER_OK).
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving the queues and drops in-flight state (the driver reset the device).
    /// Also ends a paused device, giving its backend back for the next activation.
    fn reset(&mut self);
    /// Stops the device thread between requests, with nothing taken from an available
    /// ring that is not also in the used ring, and hands back the queues in the order
    /// [`VirtioDevice::activate`] got them. Guest-visible state and the backend stay, so an
    /// activation with [`Activation::resumed`] continues, and a reset still works. Does
    /// nothing (and returns no queues) when the device is not running.
    ///
    /// A device whose requests wait on a backend (a disk's storage) gives them `within`
    /// to finish; if they do not, it goes on running and says so with
    /// [`PauseError::Busy`]. The others stop at once.
    fn pause(&mut self, within: std::time::Duration) -> Result<Vec<Queue>, PauseError>;
    /// The device's guest-visible state (configuration space and the like).
    fn save_state(&self) -> DeviceState;
    /// Applies a saved state to a device freshly built around new wiring, before it is
    /// activated. Refuses states of another kind of device and backends that would show
    /// the guest something different.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError>;
    /// The device's counters, shared with the management API; they outlive resets.
    fn metrics(&self) -> Arc<dyn metrics::DeviceMetrics>;
}

/// Copies `src` (a device's configuration structure) into `data` at `offset`; bytes past
/// the end of `src` read as zero.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Locks a mutex even if a thread panicked holding it (the data is still usable here).
pub(crate) fn bus_lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
