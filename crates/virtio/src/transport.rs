//! The virtio-pci transport (virtio 1.x "modern" interface, section 4.1 of the spec).
//!
//! One 64-bit memory BAR holds every register block, each found by the driver through a
//! vendor-specific PCI capability:
//!
//! ```text
//! BAR0 + 0x0000  common configuration (features, status, queue setup)
//!        0x1000  ISR status (read clears)
//!        0x2000  device-specific configuration
//!        0x3000  queue notify: queue i at 0x3000 + 4 * i (ioeventfd-backed)
//!        0x4000  MSI-X table
//!        0x5000  MSI-X pending-bit array
//! ```
//!
//! Interrupts are MSI-X only: the function has no INTx pin (the root bridge has no `_PRT`
//! to route one). A driver that leaves MSI-X disabled gets the ISR bits but no interrupt,
//! which every virtio 1.x driver we know handles by enabling MSI-X or polling.
//!
//! The transport owns queue configuration until the driver sets DRIVER_OK; then it
//! checks every enabled queue against guest memory and hands them to the device, which
//! serves them on its own thread. A reset (status 0) stops that thread and returns the
//! transport to its initial state. Anything the driver gets wrong (features it was not
//! offered, a queue size that is not a power of two, rings outside RAM) leaves the device
//! inactive with DEVICE_NEEDS_RESET set, as the spec asks.
//!
//! For snapshots ([`persist`]) the transport can also park a running device:
//! [`VirtioPci::quiesce`] stops the device thread between requests and takes its queues
//! back, [`VirtioPci::resume`] hands them out again. A restored transport starts parked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod persist;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmon_devices::bus::{lock, BusDevice};
use vmon_devices::pci::config::{ConfigSpace, PciIds, COMMAND_MEMORY};
use vmon_devices::pci::msix::{self, MsiMessage, MsiVectors, Msix};
use vmon_devices::pci::PciDevice;
use vmon_memory::GuestMemory;

use crate::interrupt::{Interrupt, NO_VECTOR};
use crate::{
    Activation, ActiveQueue, PauseError, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION: u64 = 0x1000;
const COMMON_LEN: u32 = 0x38;
const NOTIFY_MULTIPLIER: u32 = 4;

const VIRTIO_VENDOR: u16 = 0x1AF4;
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// Modern-only devices (no legacy interface) have PCI revision 1.
const MODERN_REVISION: u8 = 1;
const SUBSYSTEM_ID: u16 = 0x1100;

const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// A queue's registers as the driver left them, in virtio-queue's own state type: `ready`
/// is queue_enable, and the indices are where the device stopped when it was last parked
/// (zero before the first activation). `size` holds whatever the driver wrote: it is
/// checked only at DRIVER_OK, so a bad size reads back as written and then needs a reset.
fn fresh_queue(max_size: u16) -> QueueState {
    QueueState {
        max_size,
        size: max_size,
        ..QueueState::default()
    }
}

/// Whether the device is serving its queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Not activated: the driver has not set DRIVER_OK since the last reset.
    Inactive,
    /// The device thread owns the queues.
    Running,
    /// Activated, but the queues are back with the transport: quiesced for a snapshot,
    /// restored and not resumed yet, or needing a reset.
    Parked,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Config(#[from] vmon_devices::pci::config::ConfigError),
}

pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    pci_cfg_cap: usize,
    device: Box<dyn VirtioDevice>,
    msix: Arc<Mutex<Msix>>,
    interrupt: Arc<Interrupt>,
    memory: GuestMemory,
    bar: u64,
    status: u8,
    run: Run,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueState>,
    /// Which queues the device got, in the order it got them (only enabled queues go).
    handed: Vec<usize>,
    notify: Vec<EventFd>,
    warned_bar_moved: bool,
}

impl VirtioPci {
    /// Wraps `device` as a PCI function whose BAR0 is at `bar` (size [`BAR_SIZE`]).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        bar: u64,
        vectors: Box<dyn MsiVectors>,
    ) -> Result<Self, TransportError> {
        let msix = Msix::new(msix_vectors_for(device.as_ref()), vectors);
        Self::build(device, memory, bar, msix)
    }

    fn build(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemory,
        bar: u64,
        msix: Msix,
    ) -> Result<Self, TransportError> {
        let queues: Vec<QueueState> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| fresh_queue(m))
            .collect();
        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + device.device_type(),
            revision: MODERN_REVISION,
            class: device.pci_class(),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: SUBSYSTEM_ID,
        });
        config.add_bar64(0, bar, BAR_SIZE)?;
        let msix_cap = config.add_capability(
            msix::CAP_ID_MSIX,
            &msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32),
            &Msix::capability_writable(),
        )?;
        for (kind, offset, len) in [
            (CFG_COMMON, COMMON, COMMON_LEN),
            (CFG_ISR, ISR, 1),
            (CFG_DEVICE, DEVICE_CONFIG, REGION as u32),
        ] {
            config.add_capability(CAP_VENDOR, &virtio_cap(kind, offset as u32, len, 0), &[])?;
        }
        let notify_len = (queues.len() as u32 * NOTIFY_MULTIPLIER).max(4);
        // notify_off_multiplier follows the 16-byte virtio_pci_cap (14 bytes of body).
        let mut notify_cap = virtio_cap(CFG_NOTIFY, NOTIFY as u32, notify_len, 4)[..14].to_vec();
        notify_cap.extend_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify_cap, &[])?;
        // The PCI configuration access capability (struct virtio_pci_cfg_cap: a 16-byte
        // virtio_pci_cap and 4 data bytes): bar, offset and length are writable, and the
        // data window after them reaches into the BAR.
        let mut writable = [0u8; 18];
        writable[2] = 0xFF; // bar
        writable[6..14].fill(0xFF); // offset, length
        writable[14..18].fill(0xFF); // data
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR, &virtio_cap(CFG_PCI, 0, 0, 4), &writable)?;
        let notify = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(Interrupt::new(msix.clone(), queues.len()));
        Ok(VirtioPci {
            config,
            msix_cap,
            pci_cfg_cap,
            device,
            msix,
            interrupt,
            memory,
            bar,
            status: 0,
            run: Run::Inactive,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            handed: Vec::new(),
            notify,
            warned_bar_moved: false,
        })
    }

    /// Where the VMM placed BAR0 (its size is [`BAR_SIZE`]).
    pub fn bar(&self) -> u64 {
        self.bar
    }

    /// The MSI messages of every vector the guest has unmasked, for a restorer that routes
    /// them before the guest runs. Routes are also made on demand by the first interrupt
    /// on a vector, so this is an optimisation, not a requirement.
    pub fn msix_routes(&self) -> Vec<(u16, MsiMessage)> {
        lock(&self.msix).routes()
    }

    /// Whether the device thread is running (the driver set DRIVER_OK, and the device is
    /// neither quiesced nor waiting for a reset).
    pub fn is_running(&self) -> bool {
        self.run == Run::Running
    }

    /// Stops the device thread at a request boundary and takes its queues back, with
    /// their indices final: every chain the device took from an available ring is in the
    /// used ring. Guest-visible state is untouched, the backend stays with the device, and
    /// [`VirtioPci::resume`] continues. Call with the vCPUs paused, so the driver adds
    /// nothing meanwhile. Does nothing unless the device is running. A device whose thread
    /// died is marked DEVICE_NEEDS_RESET (its queues are lost) and stays parked. A device
    /// whose requests in flight do not finish `within` (a disk on storage that stopped
    /// answering) goes on running, and the error says so.
    pub fn quiesce(&mut self, within: Duration) -> Result<(), PauseError> {
        if self.run != Run::Running {
            return Ok(());
        }
        let queues = match self.device.pause(within) {
            Ok(q) => q,
            Err(e @ PauseError::Busy { .. }) => return Err(e),
            Err(e @ PauseError::ThreadDied) => {
                self.run = Run::Parked;
                self.interrupt.fail_device(&e.to_string());
                return Ok(());
            }
        };
        self.run = Run::Parked;
        if queues.len() != self.handed.len() {
            self.interrupt.fail_device(&format!(
                "the device returned {} queues, it had {}",
                queues.len(),
                self.handed.len()
            ));
            return Ok(());
        }
        for (&i, q) in self.handed.iter().zip(&queues) {
            if let Some(slot) = self.queues.get_mut(i) {
                *slot = q.state();
            }
        }
        Ok(())
    }

    /// Starts a parked device again: after [`VirtioPci::quiesce`], or after a restore once
    /// the VMM has put back everything interrupts depend on (vCPU and interrupt-controller
    /// state, MSI routes, ioeventfds). The device looks at every queue at once, since a
    /// notification may have been lost while it was stopped, and each queue whose used
    /// ring went further than the driver said it had seen gets one interrupt, in case the
    /// one raised before the snapshot was lost. Does nothing unless the device is parked
    /// and healthy; a queue that does not hold up against guest memory sets
    /// DEVICE_NEEDS_RESET instead.
    pub fn resume(&mut self) {
        if self.run != Run::Parked || self.interrupt.needs_reset() {
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut wake = Vec::new();
        for &i in &self.handed {
            let Some(state) = self.queues.get(i) else {
                continue;
            };
            match check_resumed_queue(state, event_idx, &self.memory) {
                Ok(signal) => {
                    if signal {
                        wake.push(i);
                    }
                }
                Err(why) => {
                    self.interrupt.fail_device(&format!("queue {i}: {why}"));
                    return;
                }
            }
        }
        if self.start(true) {
            for i in wake {
                self.interrupt.signal_queue(i);
            }
        }
    }

    /// Guest-physical addresses of the queue notify registers with the eventfd each should
    /// signal, for the VMM to register as ioeventfds.
    pub fn notify_addresses(&self) -> Vec<(u64, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    self.bar + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    e,
                )
            })
            .collect()
    }

    pub fn device_status(&self) -> u8 {
        let needs_reset = if self.interrupt.needs_reset() {
            status::NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let qsel = usize::from(self.queue_select);
        let (value, field_len): (u64, u64) = match offset {
            0x00 => (u64::from(self.device_feature_select), 4),
            0x04 => {
                let f = self.device_features();
                let word = match self.device_feature_select {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                };
                (u64::from(word), 4)
            }
            0x08 => (u64::from(self.driver_feature_select), 4),
            0x0C => {
                let word = match self.driver_feature_select {
                    0 => self.driver_features as u32,
                    1 => (self.driver_features >> 32) as u32,
                    _ => 0,
                };
                (u64::from(word), 4)
            }
            0x10 => (u64::from(self.interrupt.config_vector()), 2),
            0x12 => (self.queues.len() as u64, 2),
            0x14 => (u64::from(self.device_status()), 1),
            0x15 => (u64::from(self.interrupt.config_generation()), 1),
            0x16 => (u64::from(self.queue_select), 2),
            0x18 => (q.map_or(0, |q| u64::from(q.size)), 2),
            0x1A => (
                if q.is_some() {
                    u64::from(self.interrupt.queue_vector(qsel))
                } else {
                    u64::from(NO_VECTOR)
                },
                2,
            ),
            0x1C => (q.map_or(0, |q| u64::from(q.ready)), 2),
            0x1E => (q.map_or(0, |_| qsel as u64), 2),
            0x20 | 0x24 => (
                q.map_or(0, |q| q.desc_table) >> ((offset - 0x20) * 8),
                8 - (offset - 0x20),
            ),
            0x28 | 0x2C => (
                q.map_or(0, |q| q.avail_ring) >> ((offset - 0x28) * 8),
                8 - (offset - 0x28),
            ),
            0x30 | 0x34 => (
                q.map_or(0, |q| q.used_ring) >> ((offset - 0x30) * 8),
                8 - (offset - 0x30),
            ),
            _ => (0, 8),
        };
        if data.len() as u64 > field_len {
            tracing::debug!(
                offset,
                len = data.len(),
                "common config read wider than its field"
            );
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(raw);
        let queue_config_locked = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0C, 4) => {
                if self.status & status::FEATURES_OK != 0 {
                    return; // features are fixed once accepted
                }
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | value,
                    1 => self.driver_features = (self.driver_features & 0xFFFF_FFFF) | value << 32,
                    _ => {}
                }
            }
            (0x10, 2) => {
                let v = self.checked_vector(value as u16);
                self.interrupt.set_config_vector(v);
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x1A, 2) => {
                let v = self.checked_vector(value as u16);
                if usize::from(self.queue_select) < self.queues.len() {
                    self.interrupt
                        .set_queue_vector(usize::from(self.queue_select), v);
                }
            }
            _ if queue_config_locked => {
                tracing::debug!(offset, "queue configuration write after DRIVER_OK ignored");
            }
            (0x18, 2) => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                    // Checked when the driver sets DRIVER_OK: a bad size then needs a reset.
                    q.size = value as u16;
                }
            }
            (0x1C, 2) => {
                if let Some(q) = self.selected_queue() {
                    // Only enabling is defined; disabling takes a device reset.
                    if value == 1 {
                        q.ready = true;
                    }
                }
            }
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                let Some(q) = self.selected_queue().filter(|q| !q.ready) else {
                    return;
                };
                let field = match offset & !7 {
                    0x20 => &mut q.desc_table,
                    0x28 => &mut q.avail_ring,
                    _ => &mut q.used_ring,
                };
                if data.len() == 8 {
                    *field = value;
                } else if offset.is_multiple_of(8) {
                    *field = (*field & !0xFFFF_FFFF) | value;
                } else {
                    *field = (*field & 0xFFFF_FFFF) | value << 32;
                }
            }
            _ => tracing::debug!(offset, len = data.len(), "ignored common config write"),
        }
    }

    /// A vector the table does not have reads back as NO_VECTOR, telling the driver so.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector != NO_VECTOR && vector >= lock(&self.msix).count() {
            NO_VECTOR
        } else {
            vector
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set, never the driver's.
        let value = value & !status::NEEDS_RESET;
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::debug!(
                    accepted = self.driver_features,
                    offered,
                    "driver accepted features we did not offer, or no VERSION_1"
                );
                // FEATURES_OK stays clear: the driver reads it back and gives up.
                self.status |= value & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        self.status |= value;
        if new & status::DRIVER_OK != 0 && self.run == Run::Inactive {
            if self.status & status::FEATURES_OK == 0 {
                self.interrupt.fail_device("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.handed.clear();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready {
                q.event_idx_enabled = event_idx;
                q.next_avail = 0;
                q.next_used = 0;
                self.handed.push(i);
            }
        }
        self.start(false);
    }

    /// Hands the queues in `handed` to the device and starts it; false (and
    /// DEVICE_NEEDS_RESET) if a queue or the device refuses.
    fn start(&mut self, resumed: bool) -> bool {
        let mut active = Vec::with_capacity(self.handed.len());
        for &i in &self.handed {
            let Some(c) = self.queues.get(i) else {
                continue;
            };
            let queue = match build_queue(c, &self.memory) {
                Ok(q) => q,
                Err(why) => {
                    self.interrupt.fail_device(&format!("queue {i}: {why}"));
                    return false;
                }
            };
            let notify = match self.notify.get(i).map(EventFd::try_clone) {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    self.interrupt
                        .fail_device(&format!("queue {i} eventfd: {e}"));
                    return false;
                }
                None => {
                    self.interrupt
                        .fail_device(&format!("queue {i}: no eventfd"));
                    return false;
                }
            };
            active.push(ActiveQueue { queue, notify });
        }
        let activation = Activation {
            memory: self.memory.clone(),
            features: self.driver_features,
            queues: active,
            interrupt: self.interrupt.clone(),
            resumed,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.run = Run::Running;
                true
            }
            Err(e) => {
                self.interrupt
                    .fail_device(&format!("activation failed: {e}"));
                false
            }
        }
    }

    fn reset(&mut self) {
        if self.run != Run::Inactive {
            self.device.reset();
            self.run = Run::Inactive;
        }
        self.handed.clear();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = fresh_queue(q.max_size);
        }
        for e in &self.notify {
            let _ = e.read();
        }
        self.interrupt.reset();
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + REGION => self.read_common(o, data),
            o if o < ISR + REGION => {
                data.fill(0);
                if o == ISR {
                    data[0] = self.interrupt.take_isr();
                }
            }
            o if o < DEVICE_CONFIG + REGION => self.device.read_config(o - DEVICE_CONFIG, data),
            o if o < NOTIFY + REGION => data.fill(0),
            o if o < MSIX_TABLE + REGION => lock(&self.msix).read_table(o - MSIX_TABLE, data),
            o if o < MSIX_PBA + REGION => lock(&self.msix).read_pba(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + REGION => self.write_common(o, data),
            o if o < ISR + REGION => {}
            o if o < DEVICE_CONFIG + REGION => {
                self.device.write_config(o - DEVICE_CONFIG, data);
            }
            o if o < NOTIFY + REGION => {
                // Normally KVM's ioeventfd catches these before they reach us.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.notify.get(q) {
                    let _ = e.write(1);
                }
            }
            o if o < MSIX_TABLE + REGION => lock(&self.msix).write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }

    /// The window of the PCI configuration access capability: bar, offset and length
    /// select what the 4-byte data field reads or writes.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let mut b = [0u8; 12];
        self.config.read(self.pci_cfg_cap + 4, &mut b);
        let bar = b[0];
        let offset = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && u64::from(offset) + len as u64 <= BAR_SIZE)
            .then_some((u64::from(offset), len))
    }
}

/// One vector per queue plus one for configuration changes.
fn msix_vectors_for(device: &dyn VirtioDevice) -> u16 {
    u16::try_from(device.queue_max_sizes().len())
        .unwrap_or(u16::MAX)
        .saturating_add(1)
}

/// The queue the registers describe, checked against guest memory.
fn build_queue(c: &QueueState, mem: &GuestMemory) -> Result<Queue, String> {
    if c.size == 0 || c.size > c.max_size || !c.size.is_power_of_two() {
        return Err(format!(
            "size {} (must be a power of two up to {})",
            c.size, c.max_size
        ));
    }
    let q = Queue::try_from(QueueState { ready: true, ..*c }).map_err(|e| {
        format!(
            "rings at {:#x}/{:#x}/{:#x}: {e}",
            c.desc_table, c.avail_ring, c.used_ring
        )
    })?;
    if !q.is_valid(mem) {
        return Err(format!(
            "rings at {:#x}/{:#x}/{:#x} are not inside guest RAM",
            c.desc_table, c.avail_ring, c.used_ring
        ));
    }
    Ok(q)
}

/// Checks a queue a parked device is about to continue on against guest memory, and says
/// whether the driver should get an interrupt for it.
///
/// The device parks only with every chain it took also used, so the indices must agree
/// with each other and with the rings: nothing in flight, the used index in memory where
/// the device left it, and no more chains offered than the queue holds. With EVENT_IDX the
/// driver's used_event says how far it has looked: it wants an interrupt if the device
/// went past that. Without it there is no telling, and a spurious interrupt costs the
/// driver one look at the used ring.
fn check_resumed_queue(c: &QueueState, event_idx: bool, mem: &GuestMemory) -> Result<bool, String> {
    let q = build_queue(c, mem)?;
    if c.next_avail != c.next_used {
        return Err(format!(
            "{} chains in flight (next_avail {}, next_used {}); a parked device has none",
            c.next_avail.wrapping_sub(c.next_used),
            c.next_avail,
            c.next_used
        ));
    }
    if c.event_idx_enabled != event_idx {
        return Err("EVENT_IDX differs from the negotiated features".into());
    }
    let ring_u16 = |addr: u64| -> Result<u16, String> {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map(u16::from_le)
            .map_err(|e| format!("reading {addr:#x}: {e}"))
    };
    let used_idx = ring_u16(c.used_ring.saturating_add(2))?;
    if used_idx != c.next_used {
        return Err(format!(
            "the used ring's index is {used_idx}, the device left it at {}",
            c.next_used
        ));
    }
    let avail_idx = ring_u16(c.avail_ring.saturating_add(2))?;
    if avail_idx.wrapping_sub(c.next_avail) > q.size() {
        return Err(format!(
            "the available index {avail_idx} is more than {} past the device's {}",
            q.size(),
            c.next_avail
        ));
    }
    if !event_idx {
        return Ok(true);
    }
    // used_event follows the available ring's entries.
    let used_event = ring_u16(
        c.avail_ring
            .saturating_add(4)
            .saturating_add(2 * u64::from(q.size())),
    )?;
    Ok(used_event != c.next_used)
}

/// The body of a `virtio_pci_cap` after its ID and next bytes.
fn virtio_cap(kind: u8, offset: u32, length: u32, extra: u8) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0] = 16 + extra; // cap_len, including the ID and next bytes
    b[1] = kind;
    b[2] = 0; // BAR 0
    b[6..10].copy_from_slice(&offset.to_le_bytes());
    b[10..14].copy_from_slice(&length.to_le_bytes());
    b
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.run != Run::Inactive {
            self.device.reset();
        }
    }
}

impl PciDevice for VirtioPci {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset >= window && offset < window + 4 {
            if let Some((at, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(at, &mut buf[..len]);
                self.config.set_bytes(window, &buf);
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let msix_control = self.msix_cap + msix::CAP_CONTROL_OFFSET;
        if offset <= msix_control + 1 && offset + data.len() > msix_control {
            let mut c = [0u8; 2];
            self.config.read(msix_control, &mut c);
            lock(&self.msix).set_control(u16::from_le_bytes(c));
        }
        let window = self.pci_cfg_cap + 16;
        if offset >= window && offset < window + 4 {
            if let Some((at, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(window, &mut buf);
                self.bar_write(at, &buf[..len]);
            }
        }
        // The guest may size the BAR (all-ones, then restore) but not move it: firmware
        // placement is final in vmon. Complain when decoding is on at another address.
        let decoding = self.config.command() & COMMAND_MEMORY != 0;
        let programmed = self.config.programmed_bar(0);
        if decoding && programmed != self.bar && !self.warned_bar_moved {
            self.warned_bar_moved = true;
            tracing::warn!(
                placed = format_args!("{:#x}", self.bar),
                programmed = format_args!("{programmed:#x}"),
                "guest moved a virtio BAR; the device stays where vmon placed it"
            );
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::memory;
    use crate::ActivateError;
    use vmon_devices::pci::msix::MsiMessage;

    struct NoVectors;

    impl MsiVectors for NoVectors {
        fn route(&self, _: u16, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
        fn trigger(&self, _: u16) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A device with one queue that accepts activation and does nothing.
    struct Idle;

    impl VirtioDevice for Idle {
        fn device_type(&self) -> u16 {
            crate::device_id::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            match a.queues.len() {
                1 => Ok(()),
                got => Err(ActivateError::QueueCount { got, want: 1 }),
            }
        }
        fn reset(&mut self) {}
        fn pause(&mut self, _: std::time::Duration) -> Result<Vec<Queue>, crate::PauseError> {
            Ok(Vec::new())
        }
        fn save_state(&self) -> crate::DeviceState {
            crate::DeviceState::Stateless
        }
        fn restore_state(&mut self, _: &crate::DeviceState) -> Result<(), crate::DeviceStateError> {
            Ok(())
        }
        fn metrics(&self) -> std::sync::Arc<dyn crate::metrics::DeviceMetrics> {
            crate::metrics::CounterSet::new(&[])
        }
    }

    fn function() -> VirtioPci {
        VirtioPci::new(Box::new(Idle), memory(), 0xC000_0000, Box::new(NoVectors)).unwrap()
    }

    fn cfg_byte(f: &mut VirtioPci, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        f.read_config(offset, &mut b);
        b[0]
    }

    fn status(f: &mut VirtioPci) -> u8 {
        let mut b = [0u8; 1];
        f.read(COMMON + 0x14, &mut b);
        b[0]
    }

    fn write32(f: &mut VirtioPci, offset: u64, value: u32) {
        f.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn virtio_capabilities_have_their_structure_lengths() {
        let mut f = function();
        let mut at = usize::from(cfg_byte(&mut f, 0x34));
        let mut seen = Vec::new();
        while at != 0 {
            if cfg_byte(&mut f, at) == CAP_VENDOR {
                seen.push((cfg_byte(&mut f, at + 3), cfg_byte(&mut f, at + 2)));
            }
            at = usize::from(cfg_byte(&mut f, at + 1));
        }
        // virtio_pci_cap is 16 bytes; the notify and PCI-access capabilities add 4.
        assert_eq!(
            seen,
            [
                (CFG_COMMON, 16),
                (CFG_ISR, 16),
                (CFG_DEVICE, 16),
                (CFG_NOTIFY, 20),
                (CFG_PCI, 20)
            ]
        );
    }

    #[test]
    fn the_driver_cannot_set_needs_reset() {
        let mut f = function();
        f.write(COMMON + 0x14, &[status::ACKNOWLEDGE | status::NEEDS_RESET]);
        assert_eq!(status(&mut f), status::ACKNOWLEDGE);
        // Nor on the way through a refused FEATURES_OK (no VERSION_1 accepted).
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::NEEDS_RESET;
        f.write(COMMON + 0x14, &[s]);
        assert_eq!(status(&mut f), status::ACKNOWLEDGE | status::DRIVER);
        // An honest driver gets FEATURES_OK; NEEDS_RESET appears only when the device fails.
        write32(&mut f, COMMON + 0x08, 1);
        write32(&mut f, COMMON + 0x0C, 1);
        f.write(COMMON + 0x14, &[s]);
        assert_eq!(
            status(&mut f),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        // DRIVER_OK with no queue enabled is the device's failure.
        f.write(COMMON + 0x14, &[s | status::DRIVER_OK]);
        assert_eq!(
            status(&mut f),
            status::ACKNOWLEDGE
                | status::DRIVER
                | status::FEATURES_OK
                | status::DRIVER_OK
                | status::NEEDS_RESET
        );
        f.write(COMMON + 0x14, &[0]);
        assert_eq!(status(&mut f), 0);
    }

    #[test]
    fn notify_multiplier_is_where_drivers_read_it() {
        // struct virtio_pci_notify_cap: notify_off_multiplier at byte 16. Were it read as
        // 0, every queue's notification would land on queue 0's eventfd.
        let mut f = function();
        let mut at = usize::from(cfg_byte(&mut f, 0x34));
        while at != 0 {
            if cfg_byte(&mut f, at) == CAP_VENDOR && cfg_byte(&mut f, at + 3) == CFG_NOTIFY {
                let mut m = [0u8; 4];
                f.read_config(at + 16, &mut m);
                assert_eq!(u32::from_le_bytes(m), NOTIFY_MULTIPLIER);
                return;
            }
            at = usize::from(cfg_byte(&mut f, at + 1));
        }
        panic!("no notify capability");
    }
}
