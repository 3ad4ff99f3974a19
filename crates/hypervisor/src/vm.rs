//! The VM: in-kernel interrupt controllers and timer, and guest memory registered as slots.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vmon_state::Persist;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmon_memory::layout::KVM_TSS_ADDRESS;
use vmon_memory::GuestMemory as VmonGuestMemory;

use crate::irq::GsiRouting;
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
    #[error("saved VM state is invalid: {0}")]
    BadState(String),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Largest memory slot we register: KVM allows up to 2^31 - 1 pages per slot.
const MAX_SLOT_SIZE: u64 = 1 << 42;

pub struct Vm {
    fd: Arc<VmFd>,
    routing: Arc<GsiRouting>,
    /// Every MSR a vCPU's saved state must hold: ours and all KVM can save.
    saved_msrs: Arc<[u32]>,
}

impl Vm {
    /// Creates a VM, maps `memory` into it, and adds the in-kernel PIC/IOAPIC/LAPIC and PIT.
    ///
    /// Memory goes in first: once the irqchip exists, every memory-slot change waits for
    /// KVM's interrupt-routing grace period, which made registering guest RAM cost 6-10 ms
    /// on our PVM hosts against 0.15 ms before it.
    pub fn create(hv: &Hypervisor, memory: &VmonGuestMemory) -> Result<Self, VmError> {
        let fd = hv.kvm().create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
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
                unsafe { fd.set_user_memory_region(mapping) }
                    .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
                offset += size;
                slot += 1;
            }
        }
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
        let fd = Arc::new(fd);
        Ok(Vm {
            routing: Arc::new(GsiRouting::new(fd.clone())),
            saved_msrs: crate::msrs::saved_msr_indices(hv.msr_indices()).into(),
            fd,
        })
    }

    /// The VM's interrupt routing, shared by every device that allocates MSI vectors.
    pub fn gsi_routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM descriptor for components that outlive a borrow (the SCI line, VM control).
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    pub fn create_vcpu(&self, index: u32) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, index, self.saved_msrs.clone()))
    }
}

/// The VM-wide state KVM keeps in the kernel: the two PICs, the IOAPIC (pins, redirection
/// table), the PIT's channels, and kvmclock. Per-vCPU state (LAPIC included) is
/// [`crate::vcpu::VcpuState`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// [`Persist::save`] for whoever holds only the VM descriptor (the VMM's control block).
pub fn vm_state(fd: &VmFd) -> Result<VmState, VmError> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
    })
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saved with the vCPUs stopped, so the interrupt controllers and the clock agree with them.
/// The wiring is a freshly created [`Vm`] (irqchip and PIT already present) to load it into.
impl Persist for Vm {
    type State = VmState;
    type Wiring = Vm;
    type Error = VmError;

    fn save(&self) -> Result<VmState, VmError> {
        vm_state(&self.fd)
    }

    fn restore(vm: Vm, state: &VmState) -> Result<Vm, VmError> {
        // A chip id that does not match its slot would load one chip's registers into
        // another; refuse instead.
        for (chip, want) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != want {
                return Err(VmError::BadState(format!(
                    "interrupt controller {} saved as chip {}",
                    want, chip.chip_id
                )));
            }
            vm.fd.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        vm.fd.set_pit2(&state.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        // Only the clock value: KVM_CLOCK_REALTIME would advance it by the time the snapshot
        // spent on disk, and the guest would see its monotonic clock jump.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        Ok(vm)
    }
}
