//! Saving and restoring a virtio-pci function: its registers, its queues, MSI-X, its
//! configuration space and its device's own state, as one [`VirtioPciState`].
//!
//! A state is untrusted input. What cannot be true of a function vmon built (another
//! device type, other queue sizes, vectors past the table, bits set that no register
//! holds) is refused with an error. What is only wrong against guest memory (a queue size
//! that is not a power of two, rings outside RAM, indices that do not agree with the
//! rings) is the guest's own doing as far as the device can tell: the function restores,
//! and [`VirtioPci::resume`] sets DEVICE_NEEDS_RESET as a real device would.
//!
//! The VMM's part, in order. Saving: pause the vCPUs, [`VirtioPci::quiesce`] every
//! function, then `save` them (with the rest of the machine and guest memory), then
//! [`VirtioPci::resume`] if the VM goes on. Restoring: restore guest memory, build each
//! device around new backends, allocate its MSI vectors and `restore` the function; place
//! BAR0 at [`VirtioPci::bar`] (in the same PCI slot as before) and register the
//! ioeventfds of [`VirtioPci::notify_addresses`]; optionally route
//! [`VirtioPci::msix_routes`]; restore vCPUs and interrupt controllers; then
//! [`VirtioPci::resume`] every function and let the vCPUs run.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;
use vmon_devices::pci::config::{ConfigError, ConfigSpaceState};
use vmon_devices::pci::msix::{self, MsiVectors, Msix, MsixState, MsixStateError};
use vmon_memory::GuestMemory;
use vmon_state::Persist;

use super::{msix_vectors_for, status, Run, TransportError, VirtioPci};
use crate::interrupt::{SavedInterrupt, NO_VECTOR};
use crate::{DeviceState, DeviceStateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// One queue: its registers and where the device stopped, in the terms of virtio-queue's
/// `QueueState` (which is not serialisable itself), plus its MSI-X vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    /// queue_enable.
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub msix_vector: u16,
}

impl QueueSnapshot {
    fn new(q: &QueueState, msix_vector: u16) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            msix_vector,
        }
    }

    fn queue_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}

/// Everything the guest can observe of a virtio-pci function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u16,
    /// Where BAR0 was placed; the restored function is placed there again, since the
    /// guest's driver has it mapped.
    pub bar: u64,
    /// What the device offered, VERSION_1 included: a device rebuilt around a different
    /// backend (a read-only disk where there was a writable one) would offer something
    /// else, and the driver has already accepted.
    pub device_features: u64,
    /// The device status register, without DEVICE_NEEDS_RESET (that is `needs_reset`).
    pub status: u8,
    pub needs_reset: bool,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueSnapshot>,
    pub config_msix_vector: u16,
    pub isr: u8,
    pub config_generation: u8,
    pub config_space: ConfigSpaceState,
    pub msix: MsixState,
    pub device: DeviceState,
}

/// What a restored function is built around: a device freshly made from its
/// configuration and new backend, guest memory (already holding the saved contents), and
/// the new hypervisor's MSI vectors (one per queue plus one, as for
/// [`VirtioPci::new`]).
pub struct VirtioPciWiring {
    pub device: Box<dyn VirtioDevice>,
    pub memory: GuestMemory,
    pub vectors: Box<dyn MsiVectors>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    #[error("the device is running: quiesce it before saving")]
    NotQuiesced,
    #[error("the state is a type {saved} device's, the device is type {device}")]
    DeviceType { saved: u16, device: u16 },
    #[error("the device offers features {device:#x}, the saved one offered {saved:#x}")]
    Features { saved: u64, device: u64 },
    #[error("the state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("queue {index}: the state's maximum size is {saved}, the device's {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("the state has {saved} MSI-X vectors, the function has {want}")]
    VectorCount { saved: usize, want: u16 },
    #[error("{what} uses MSI-X vector {vector}, past the table of {count}")]
    Vector {
        what: String,
        vector: u16,
        count: u16,
    },
    #[error("MSI-X Message Control in configuration space says enable={config_enabled} mask={config_masked}, the table enable={table_enabled} mask={table_masked}")]
    MsixControl {
        config_enabled: bool,
        config_masked: bool,
        table_enabled: bool,
        table_masked: bool,
    },
    #[error("the state is invalid: {0}")]
    Invalid(String),
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixStateError),
    #[error("PCI configuration space: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceStateError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ISR_BITS: u8 = 0b11;

impl Persist for VirtioPci {
    type State = VirtioPciState;
    type Wiring = VirtioPciWiring;
    type Error = VirtioStateError;

    /// Refuses a running device: its queues' indices live on the device thread until
    /// [`VirtioPci::quiesce`] takes them back.
    fn save(&self) -> Result<VirtioPciState, VirtioStateError> {
        if self.run == Run::Running {
            return Err(VirtioStateError::NotQuiesced);
        }
        let msix = vmon_devices::bus::lock(&self.msix).save()?;
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            bar: self.bar,
            device_features: self.device_features(),
            status: self.status,
            needs_reset: self.interrupt.needs_reset(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueSnapshot::new(q, self.interrupt.queue_vector(i)))
                .collect(),
            config_msix_vector: self.interrupt.config_vector(),
            isr: self.interrupt.peek_isr(),
            config_generation: self.interrupt.config_generation(),
            config_space: self.config.save_state(),
            msix,
            device: self.device.save_state(),
        })
    }

    /// Builds the function parked: nothing runs, nothing is routed and no interrupt is
    /// raised until [`VirtioPci::resume`], so the VMM can first put the rest of the
    /// machine back.
    fn restore(wiring: VirtioPciWiring, s: &VirtioPciState) -> Result<Self, VirtioStateError> {
        let VirtioPciWiring {
            mut device,
            memory,
            vectors,
        } = wiring;
        check_fits(device.as_ref(), s)?;
        device.restore_state(&s.device)?;
        let msix = Msix::restore(vectors, &s.msix)?;
        let mut f = VirtioPci::build(device, memory, s.bar, msix)?;
        f.config.restore_state(&s.config_space)?;
        let mut control = [0u8; 2];
        f.config
            .read(f.msix_cap + msix::CAP_CONTROL_OFFSET, &mut control);
        let control = u16::from_le_bytes(control);
        let (config_enabled, config_masked) = (
            control & CONTROL_ENABLE != 0,
            control & CONTROL_FUNCTION_MASK != 0,
        );
        if (config_enabled, config_masked) != (s.msix.enabled, s.msix.function_masked) {
            return Err(VirtioStateError::MsixControl {
                config_enabled,
                config_masked,
                table_enabled: s.msix.enabled,
                table_masked: s.msix.function_masked,
            });
        }
        f.status = s.status;
        f.device_feature_select = s.device_feature_select;
        f.driver_feature_select = s.driver_feature_select;
        f.driver_features = s.driver_features;
        f.queue_select = s.queue_select;
        f.queues = s.queues.iter().map(QueueSnapshot::queue_state).collect();
        f.interrupt.restore(&SavedInterrupt {
            isr: s.isr,
            generation: s.config_generation,
            needs_reset: s.needs_reset,
            config_vector: s.config_msix_vector,
            queue_vectors: s.queues.iter().map(|q| q.msix_vector).collect(),
        });
        if s.status & status::DRIVER_OK != 0 {
            // DRIVER_OK hands the device exactly the enabled queues, and nothing can
            // enable another afterwards.
            f.handed = (0..f.queues.len()).filter(|&i| f.queues[i].ready).collect();
            f.run = Run::Parked;
        }
        Ok(f)
    }
}

/// Refuses a state that no function built around `device` could have had.
fn check_fits(device: &dyn VirtioDevice, s: &VirtioPciState) -> Result<(), VirtioStateError> {
    let device_type = device.device_type();
    if s.device_type != device_type {
        return Err(VirtioStateError::DeviceType {
            saved: s.device_type,
            device: device_type,
        });
    }
    let offered = device.features() | VIRTIO_F_VERSION_1;
    if s.device_features != offered {
        return Err(VirtioStateError::Features {
            saved: s.device_features,
            device: offered,
        });
    }
    let maxes = device.queue_max_sizes();
    if s.queues.len() != maxes.len() {
        return Err(VirtioStateError::QueueCount {
            saved: s.queues.len(),
            device: maxes.len(),
        });
    }
    for (index, (q, &max)) in s.queues.iter().zip(maxes).enumerate() {
        if q.max_size != max {
            return Err(VirtioStateError::QueueMaxSize {
                index,
                saved: q.max_size,
                device: max,
            });
        }
    }
    let count = msix_vectors_for(device);
    if s.msix.entries.len() != usize::from(count) {
        return Err(VirtioStateError::VectorCount {
            saved: s.msix.entries.len(),
            want: count,
        });
    }
    // The vector registers only ever hold a vector of the table or NO_VECTOR.
    let vectors = std::iter::once(("the configuration vector".to_string(), s.config_msix_vector))
        .chain(
            s.queues
                .iter()
                .enumerate()
                .map(|(i, q)| (format!("queue {i}"), q.msix_vector)),
        );
    for (what, vector) in vectors {
        if vector != NO_VECTOR && vector >= count {
            return Err(VirtioStateError::Vector {
                what,
                vector,
                count,
            });
        }
    }
    let invalid = |why: &str| Err(VirtioStateError::Invalid(why.into()));
    if s.isr & !ISR_BITS != 0 {
        return invalid("ISR bits other than queue and configuration");
    }
    if s.status & status::NEEDS_RESET != 0 {
        return invalid("DEVICE_NEEDS_RESET in the status register (it is saved apart)");
    }
    if s.status & status::FEATURES_OK != 0
        && (s.driver_features & !offered != 0 || s.driver_features & VIRTIO_F_VERSION_1 == 0)
    {
        return invalid("FEATURES_OK with features the device did not offer, or without VERSION_1");
    }
    // The transport refuses DRIVER_OK without FEATURES_OK by failing the device.
    if s.status & status::DRIVER_OK != 0 && s.status & status::FEATURES_OK == 0 && !s.needs_reset {
        return invalid("DRIVER_OK without FEATURES_OK");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
