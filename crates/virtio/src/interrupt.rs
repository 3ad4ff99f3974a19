//! How a device tells the driver something happened: the ISR status bits plus the MSI-X
//! vector the driver chose for that queue (or for configuration changes).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vmon_devices::bus::lock;
use vmon_devices::pci::msix::Msix;

/// "No vector": the driver does not want interrupts for this source.
pub const NO_VECTOR: u16 = 0xFFFF;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// The values [`Interrupt::restore`] puts back.
pub(crate) struct SavedInterrupt {
    pub isr: u8,
    pub generation: u8,
    pub needs_reset: bool,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

pub struct Interrupt {
    msix: Arc<Mutex<Msix>>,
    isr: AtomicU8,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    needs_reset: AtomicBool,
    /// The common configuration's config_generation: bumped with every configuration-change
    /// interrupt, so a driver reading a multi-byte field across a change reads it again.
    generation: AtomicU8,
}

impl Interrupt {
    pub fn new(msix: Arc<Mutex<Msix>>, queues: usize) -> Self {
        Interrupt {
            msix,
            isr: AtomicU8::new(0),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            needs_reset: AtomicBool::new(false),
            generation: AtomicU8::new(0),
        }
    }

    /// The driver should look at queue `index`'s used ring.
    pub fn signal_queue(&self, index: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        if let Some(v) = self.queue_vectors.get(index) {
            self.raise(v.load(Ordering::Acquire));
        }
    }

    /// The device configuration (or status) changed.
    pub fn signal_config(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.raise(self.config_vector.load(Ordering::Acquire));
    }

    /// The device hit a state it cannot continue from without a reset (a broken queue):
    /// DEVICE_NEEDS_RESET becomes visible in the status and the driver hears about it.
    pub fn fail_device(&self, why: &str) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            tracing::warn!("virtio device needs reset: {why}");
            self.signal_config();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    fn raise(&self, vector: u16) {
        if vector != NO_VECTOR {
            lock(&self.msix).notify(vector);
        }
    }

    pub(crate) fn config_generation(&self) -> u8 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    pub(crate) fn set_queue_vector(&self, index: usize, vector: u16) {
        if let Some(v) = self.queue_vectors.get(index) {
            v.store(vector, Ordering::Release);
        }
    }

    pub(crate) fn queue_vector(&self, index: usize) -> u16 {
        self.queue_vectors
            .get(index)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// The ISR bits without clearing them (a read by the driver clears them).
    pub(crate) fn peek_isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Puts back saved values without raising anything: whatever the guest had been told
    /// is already in its memory and interrupt controller.
    pub(crate) fn restore(&self, saved: &SavedInterrupt) {
        self.isr
            .store(saved.isr & (ISR_QUEUE | ISR_CONFIG), Ordering::Release);
        self.generation.store(saved.generation, Ordering::Release);
        self.needs_reset.store(saved.needs_reset, Ordering::Release);
        self.config_vector
            .store(saved.config_vector, Ordering::Release);
        for (v, &saved) in self.queue_vectors.iter().zip(&saved.queue_vectors) {
            v.store(saved, Ordering::Release);
        }
    }

    pub(crate) fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }
}
