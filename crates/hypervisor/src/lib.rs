//! The hypervisor layer: everything that talks to `/dev/kvm`.
//!
//! - [`kvm`]: open KVM, check the API version and every capability vmon relies on, and turn
//!   "KVM is missing/unusable" into a sentence that says how to fix it.
//! - [`vm`]: the VM file descriptor with its in-kernel irqchip, PIT and memory slots.
//! - [`irq`]: GSI routing for device MSI-X vectors, and irqfds to raise them.
//! - [`cpuid`]: the CPU profile: what the guest's CPUID says (topology, hidden VMX/SVM).
//! - [`vcpu`]: one vCPU: boot configuration, running, fault diagnosis, saved state.

pub mod cpuid;
pub mod irq;
pub mod kvm;
pub mod msrs;
pub mod vcpu;
pub mod vm;

pub use cpuid::CpuProfile;
pub use irq::{GsiRouting, MsiVectorGroup};
pub use kvm::{Hypervisor, HypervisorError};
pub use vcpu::{Vcpu, VcpuError, VcpuState};
pub use vm::{vm_state, Vm, VmError, VmState};
