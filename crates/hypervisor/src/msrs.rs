//! Model-specific registers a 64-bit guest expects in a defined state at entry.

use kvm_bindings::kvm_msr_entry;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1A0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2FF;
pub const MSR_STAR: u32 = 0xC000_0081;
pub const MSR_LSTAR: u32 = 0xC000_0082;
pub const MSR_CSTAR: u32 = 0xC000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xC000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without this Linux maps all RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// MSR values at the first instruction, for every vCPU.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The LAPIC timer's deadline in TSC-deadline mode.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;

/// MSRs captured in a vCPU's saved state besides those above.
pub fn saved_msr_indices() -> Vec<u32> {
    let mut indices: Vec<u32> = boot_msrs().iter().map(|e| e.index).collect();
    indices.extend([
        0x4B56_4D00, // MSR_KVM_WALL_CLOCK_NEW
        0x4B56_4D01, // MSR_KVM_SYSTEM_TIME_NEW
        0x4B56_4D02, // MSR_KVM_ASYNC_PF_EN
        0x4B56_4D03, // MSR_KVM_STEAL_TIME
        0x4B56_4D04, // MSR_KVM_PV_EOI_EN
        MSR_IA32_TSC_DEADLINE,
        0xC000_0103, // MSR_TSC_AUX
        0x1B,        // MSR_IA32_APICBASE
    ]);
    indices
}
