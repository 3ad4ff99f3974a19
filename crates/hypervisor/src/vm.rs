//! The VM: in-kernel interrupt controllers and timer, and guest memory registered as slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmon_memory::layout::KVM_TSS_ADDRESS;
use vmon_memory::GuestMemory as VmonGuestMemory;

use crate::kvm::Hypervisor;
use crate::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Largest memory slot we register: KVM allows up to 2^31 - 1 pages per slot.
const MAX_SLOT_SIZE: u64 = 1 << 42;

pub struct Vm {
    fd: VmFd,
}

impl Vm {
    /// Creates a VM with the in-kernel PIC/IOAPIC/LAPIC and PIT; guest memory is added with
    /// [`Vm::register_memory`].
    pub fn create(hv: &Hypervisor) -> Result<Self, VmError> {
        let fd = hv.kvm().create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        // The dummy speaker port (0x61) is answered in the kernel, so the guest's PIT
        // calibration through port 0x61 never reaches userspace.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Vm { fd })
    }

    /// Maps `memory` into the VM as memory slots.
    ///
    /// Registering a slot is the slowest step of VM creation (milliseconds: KVM waits for an
    /// SRCU grace period and, on shadow-paging hosts, sets up per-page bookkeeping), and it
    /// does not depend on the vCPUs or on the guest image, so the machine runs it on another
    /// thread while it loads the kernel and configures the vCPUs.
    pub fn register_memory(&self, memory: &VmonGuestMemory) -> Result<(), VmError> {
        let mut slot = 0u32;
        for region in memory.iter() {
            // KVM caps a memory slot just below 8 TiB; larger regions take several slots.
            let mut offset = 0;
            while offset < region.len() {
                let size = (region.len() - offset).min(MAX_SLOT_SIZE);
                let mapping = kvm_userspace_memory_region {
                    slot,
                    flags: 0,
                    guest_phys_addr: region.start_addr().0 + offset,
                    memory_size: size,
                    userspace_addr: region.as_ptr() as u64 + offset,
                };
                // SAFETY: the host range lies inside `memory`'s mmap, which outlives the VM:
                // the machine owns both and drops the VM (and its vCPUs) first.
                unsafe { self.fd.set_user_memory_region(mapping) }
                    .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
                offset += size;
                slot += 1;
            }
        }
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn create_vcpu(&self, index: u32) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, index))
    }
}
