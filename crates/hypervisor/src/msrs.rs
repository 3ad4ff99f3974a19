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

/// MTRRs: KVM does not list them as MSRs to save, but the guest programs them and reads
/// them back: the fixed ranges, 8 variable pairs (KVM's count) and the default type.
const MTRR_MSRS: [u32; 28] = [
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26A,
    0x26B,
    0x26C,
    0x26D,
    0x26E,
    0x26F,
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20A,
    0x20B,
    0x20C,
    0x20D,
    0x20E,
    0x20F,
    MSR_MTRR_DEF_TYPE,
];

/// MSRs that a vCPU's saved state holds: those we set at boot, the MTRRs, the APIC base and
/// the TSC deadline, then every MSR `kvm_list` (KVM's `KVM_GET_MSR_INDEX_LIST`) names that
/// is not already there.
///
/// KVM's list is the authority: it names the paravirtual MSRs the guest enables at run time
/// (kvmclock, async page faults and their interrupt vector, steal time, PV EOI, poll
/// control), PAT, SPEC_CTRL, the PMU, and whatever a newer KVM adds. A hand-kept list goes
/// stale: ours once lacked `MSR_KVM_ASYNC_PF_INT`, so a restored guest had async page
/// faults enabled with KVM's "page ready" vector 0, which the LAPIC never delivers.
pub fn saved_msr_indices(kvm_list: &[u32]) -> Vec<u32> {
    let ours = boot_msrs().into_iter().map(|e| e.index);
    let ours = ours
        .chain(MTRR_MSRS)
        .chain([MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE]);
    let mut indices: Vec<u32> = Vec::new();
    for index in ours.chain(kvm_list.iter().copied()) {
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    indices
}

/// The local APIC's base address and enable bits.
pub const MSR_IA32_APICBASE: u32 = 0x1B;

/// MSRs a restore must not lose: without them a running guest breaks at once (its clock,
/// timer, system calls, per-CPU base, memory types, or KVM's paravirtual interfaces it has
/// enabled). If the new host's KVM refuses one of these, the restore fails. Any other
/// saved MSR that KVM refuses (a feature the new host lacks, say a PMU or speculation
/// control MSR) is left out with a warning and the restore goes on, since a guest that
/// probed the feature at boot copes with it reading as reset.
pub fn must_restore(index: u32) -> bool {
    const PAT: u32 = 0x277;
    const TSC_AUX: u32 = 0xC000_0103;
    // kvmclock (both generations), async page faults and their vector, steal time, PV EOI.
    const KVM_PARAVIRT: [u32; 9] = [
        0x11,
        0x12,
        0x4B56_4D00,
        0x4B56_4D01,
        0x4B56_4D02,
        0x4B56_4D03,
        0x4B56_4D04,
        0x4B56_4D06,
        0x4B56_4D07,
    ];
    matches!(
        index,
        MSR_IA32_TSC
            | MSR_IA32_TSC_DEADLINE
            | MSR_IA32_APICBASE
            | MSR_IA32_SYSENTER_CS
            | MSR_IA32_SYSENTER_ESP
            | MSR_IA32_SYSENTER_EIP
            | MSR_STAR
            | MSR_LSTAR
            | MSR_CSTAR
            | MSR_SYSCALL_MASK
            | MSR_KERNEL_GS_BASE
            | MSR_MTRR_DEF_TYPE
            | PAT
            | TSC_AUX
    ) || KVM_PARAVIRT.contains(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_keeps_what_a_running_guest_depends_on() {
        for index in [MSR_IA32_TSC, MSR_LSTAR, 0x277, 0x4B56_4D01, 0x4B56_4D06] {
            assert!(must_restore(index), "{index:#x}");
        }
        // SPEC_CTRL, a PMU counter, an MTRR range: left out if the new host refuses them.
        for index in [0x48, 0xC001_0004, 0x200] {
            assert!(!must_restore(index), "{index:#x}");
        }
    }

    #[test]
    fn the_saved_list_holds_ours_and_kvms_once_each() {
        const ASYNC_PF_INT: u32 = 0x4B56_4D06;
        let kvm = [MSR_IA32_TSC, ASYNC_PF_INT, 0x277, MSR_IA32_TSC];
        let list = saved_msr_indices(&kvm);
        for index in [
            MSR_IA32_TSC,
            ASYNC_PF_INT,
            0x277,
            MSR_IA32_APICBASE,
            0x20F,
            0x250,
        ] {
            assert_eq!(
                list.iter().filter(|&&i| i == index).count(),
                1,
                "{index:#x}"
            );
        }
        assert!(list.contains(&MSR_IA32_TSC_DEADLINE));
        assert_eq!(list.len(), boot_msrs().len() + MTRR_MSRS.len() - 1 + 2 + 2);
    }
}
