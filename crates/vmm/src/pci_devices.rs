//! Puts virtio devices on the PCI bus: a BAR from the MMIO hole, MSI-X vectors routed
//! through KVM, and an ioeventfd per queue notify register.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vmon_devices::pci::msix::{MsiMessage, MsiVectors};
use vmon_devices::pci::PciConfigIo;
use vmon_devices::Bus;
use vmon_hypervisor::{MsiVectorGroup, Vm};
use vmon_memory::layout::{IOAPIC_ADDRESS, MMIO_HOLE_START};
use vmon_memory::GuestMemory;
use vmon_state::Persist;
use vmon_virtio::transport::persist::{VirtioPciState, VirtioPciWiring};
use vmon_virtio::transport::{VirtioPci, BAR_SIZE};
use vmon_virtio::VirtioDevice;

use crate::exit::VmmError;

/// MSI-X vectors delivered by KVM: a GSI route and an irqfd per vector.
struct KvmMsi(MsiVectorGroup);

impl MsiVectors for KvmMsi {
    fn route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
        self.0.route(vector, message.address, message.data)
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.0.trigger(vector)
    }
}

/// Hands out BAR addresses from the 32-bit MMIO hole, below the IOAPIC.
pub(crate) struct PciSpace {
    allocator: AddressAllocator,
}

impl PciSpace {
    pub fn new() -> Result<Self, VmmError> {
        let allocator = AddressAllocator::new(MMIO_HOLE_START, IOAPIC_ADDRESS - MMIO_HOLE_START)
            .map_err(|e| VmmError::Devices(format!("PCI address space: {e}")))?;
        Ok(PciSpace { allocator })
    }

    /// Wraps `device` in a virtio-pci function and wires it to `vm`, `mmio` and `pci`.
    ///
    /// With `saved`, the function takes that state (a restore): it must land at the BAR it
    /// had, which it does when devices are attached in the same order as before. It comes
    /// back paused; the caller resumes it once the vCPUs and irqchip are restored.
    pub fn attach(
        &mut self,
        vm: &Vm,
        memory: &GuestMemory,
        pci: &mut PciConfigIo,
        mmio: &mut Bus,
        device: Box<dyn VirtioDevice>,
        saved: Option<&VirtioPciState>,
    ) -> Result<Arc<Mutex<VirtioPci>>, VmmError> {
        let devices =
            |what: &str, e: &dyn std::fmt::Display| VmmError::Devices(format!("{what}: {e}"));
        let bar = self
            .allocator
            .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
            .map_err(|e| devices("no room for a PCI BAR in the MMIO hole", &e))?
            .start();
        let vectors = vm
            .gsi_routing()
            .msi_vectors(device.queue_max_sizes().len() as u16 + 1)
            .map_err(|e| devices("allocating MSI-X vectors", &e))?;
        let vectors = Box::new(KvmMsi(vectors));
        let function = match saved {
            None => VirtioPci::new(device, memory.clone(), bar, vectors)
                .map_err(|e| devices("virtio-pci", &e))?,
            Some(state) => {
                let wiring = VirtioPciWiring {
                    device,
                    memory: memory.clone(),
                    vectors,
                };
                let f = VirtioPci::restore(wiring, state)
                    .map_err(|e| VmmError::Snapshot(format!("restoring a virtio device: {e}")))?;
                if f.bar() != bar {
                    return Err(VmmError::Snapshot(format!(
                        "a virtio device's BAR was at {:#x}, now {bar:#x}: the devices differ",
                        f.bar()
                    )));
                }
                // MSI routes are written lazily: the first time a restored vector fires.
                f
            }
        };
        for (addr, event) in function.notify_addresses() {
            vm.fd()
                .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| devices("KVM_IOEVENTFD for a queue notify register", &e))?;
        }
        let function = Arc::new(Mutex::new(function));
        mmio.insert(function.clone(), bar, BAR_SIZE)
            .map_err(|e| devices("placing a BAR", &e))?;
        pci.add_device(function.clone())
            .map_err(|e| devices("adding a PCI device", &e))?;
        Ok(function)
    }
}
