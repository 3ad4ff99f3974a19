//! The guest's CPU profile: KVM's supported CPUID, filtered so the guest sees
//!
//! - a hypervisor (CPUID.1:ECX[31]) and KVM's paravirtual leaves (kvmclock, PV EOI, ...);
//! - its own topology: one socket, N cores, one thread per core, APIC ID = vCPU index,
//!   consistent across leaves 0x1, 0x4, 0xB/0x1F (Intel) and 0x80000008/0x8000001E (AMD);
//! - no VMX/SVM unless nested virtualisation is asked for (`--cpu nested=on`);
//! - no architectural PMU (leaf 0xA), whose MSRs nested and PVM hosts emulate poorly;
//! - the TSC-deadline timer when KVM's in-kernel LAPIC provides it;
//! - the host's processor brand string (leaves 0x80000002-4), which KVM reports empty: a
//!   guest without it shows its CPU as a bare family/model pair (`model name : 17/01`).
//!
//! The profile works on plain CPUID entries so it is unit-tested without KVM.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_PMU: u32 = 0xA;
const LEAF_TOPOLOGY: u32 = 0xB;
const LEAF_TOPOLOGY_V2: u32 = 0x1F;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_BRAND: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_SVM: u32 = 0x8000_000A;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001E;

const ECX_VMX: u32 = 1 << 5;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT_ECX_SVM: u32 = 1 << 2;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// What the guest CPU looks like; the same for every vCPU but the APIC ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuProfile {
    pub vcpus: u32,
    /// Expose VMX/SVM so the guest can run its own VMs.
    pub nested: bool,
    pub tsc_deadline: bool,
    /// The processor brand string, as the registers (EAX, EBX, ECX, EDX) of leaves
    /// 0x80000002-4 in turn; [`host_brand`] reads the host's.
    pub brand: Option<Brand>,
}

/// A processor brand string: 48 bytes of ASCII as CPUID returns them, four registers
/// per leaf.
pub type Brand = [u32; 12];

/// The host CPU's brand string, if its CPUID has one.
pub fn host_brand() -> Option<Brand> {
    use std::arch::x86_64::__cpuid;
    if __cpuid(LEAF_EXT_MAX).eax < *LEAF_BRAND.end() {
        return None;
    }
    let mut brand = [0; 12];
    for (regs, leaf) in brand.chunks_mut(4).zip(LEAF_BRAND) {
        let r = __cpuid(leaf);
        regs.copy_from_slice(&[r.eax, r.ebx, r.ecx, r.edx]);
    }
    brand.iter().any(|&r| r != 0).then_some(brand)
}

/// Bits needed to number `count` things (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

impl CpuProfile {
    /// Rewrites KVM's supported CPUID into what vCPU `index` reports.
    pub fn apply(&self, entries: &mut Vec<kvm_cpuid_entry2>, index: u32) {
        let vendor = vendor(entries);
        let apic_id = index;
        let n = self.vcpus.max(1);
        let core_bits = id_bits(n);
        for e in entries.iter_mut() {
            match e.function {
                LEAF_FEATURES => {
                    let logical = n.next_power_of_two().min(255);
                    e.ebx = (e.ebx & 0x0000_FFFF) | (logical << 16) | ((apic_id & 0xFF) << 24);
                    e.ecx |= ECX_HYPERVISOR;
                    if !self.nested {
                        e.ecx &= !ECX_VMX;
                    }
                    if self.tsc_deadline {
                        e.ecx |= ECX_TSC_DEADLINE;
                    }
                    if n > 1 {
                        e.edx |= EDX_HTT;
                    } else {
                        e.edx &= !EDX_HTT;
                    }
                }
                // Subleaves with cache type 0 mark the end of the list and stay as they are.
                LEAF_CACHE_INTEL if vendor == Vendor::Intel && e.eax & 0x1F != 0 => {
                    let level = (e.eax >> 5) & 0x7;
                    // L1/L2 are private to a core; L3 is shared by the package.
                    let sharing = if level >= 3 {
                        n.next_power_of_two() - 1
                    } else {
                        0
                    };
                    let cores = (n.next_power_of_two() - 1).min(63);
                    e.eax = (e.eax & 0x3FFF) | (sharing.min(0xFFF) << 14) | (cores << 26);
                }
                LEAF_PMU => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                    let level = e.index;
                    let (shift, count, kind) = match level {
                        0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                        1 => (core_bits, n, TOPOLOGY_LEVEL_CORE),
                        _ => (0, 0, 0),
                    };
                    e.eax = shift;
                    e.ebx = count;
                    e.ecx = (kind << 8) | (level & 0xFF);
                    e.edx = apic_id;
                }
                LEAF_EXT_FEATURES => {
                    if !self.nested {
                        e.ecx &= !EXT_ECX_SVM;
                    }
                    if vendor == Vendor::Amd {
                        if n > 1 {
                            e.ecx |= EXT_ECX_CMP_LEGACY;
                        } else {
                            e.ecx &= !EXT_ECX_CMP_LEGACY;
                        }
                    }
                }
                LEAF_EXT_ADDRESS_SIZES if vendor == Vendor::Amd => {
                    e.ecx = (e.ecx & !0xF0FF) | (core_bits << 12) | (n - 1);
                }
                LEAF_SVM if !self.nested => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                f if LEAF_BRAND.contains(&f) => {
                    if let Some(brand) = &self.brand {
                        let i = 4 * (f - LEAF_BRAND.start()) as usize;
                        [e.eax, e.ebx, e.ecx, e.edx] =
                            [brand[i], brand[i + 1], brand[i + 2], brand[i + 3]];
                    }
                }
                LEAF_AMD_TOPOLOGY => {
                    e.eax = apic_id;
                    e.ebx = index & 0xFF; // compute unit = core, one thread each
                    e.ecx = 0; // node 0, one node per package
                    e.edx = 0;
                }
                _ => {}
            }
        }
        // Leaf 0xB has a subleaf per level; make sure the core level exists even when KVM
        // reported only the SMT level.
        if entries.iter().any(|e| e.function == LEAF_TOPOLOGY)
            && !entries
                .iter()
                .any(|e| e.function == LEAF_TOPOLOGY && e.index == 1)
        {
            entries.push(kvm_cpuid_entry2 {
                function: LEAF_TOPOLOGY,
                index: 1,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: core_bits,
                ebx: n,
                ecx: (TOPOLOGY_LEVEL_CORE << 8) | 1,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_leaf(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        leaf(0, 0, [0x20, word(0), word(8), word(4)])
    }

    fn host(vendor: &[u8; 12]) -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(vendor),
            leaf(1, 0, [0x800F12, 0x0010_0800, ECX_VMX | 1, 0x178B_FBFF]),
            leaf(4, 0, [0x121, 0, 0, 0]),
            leaf(4, 3, [0x163, 0, 0, 0]),
            leaf(0xA, 0, [0x0703_0401, 1, 2, 3]),
            leaf(0xB, 0, [1, 2, 0x100, 9]),
            leaf(0xB, 1, [4, 16, 0x201, 9]),
            leaf(0x8000_0001, 0, [0, 0, EXT_ECX_SVM | 1, 0]),
            // KVM reports the brand string's leaves, empty.
            leaf(0x8000_0002, 0, [0; 4]),
            leaf(0x8000_0003, 0, [0; 4]),
            leaf(0x8000_0004, 0, [0; 4]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x700F, 0]),
            leaf(0x8000_000A, 0, [1, 0x8000, 0, 0x1BFBFF]),
            leaf(0x8000_001E, 0, [7, 0x103, 0, 0]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    const PROFILE4: CpuProfile = CpuProfile {
        vcpus: 4,
        nested: false,
        tsc_deadline: true,
        brand: None,
    };

    #[test]
    fn vendor_is_read_from_leaf_zero() {
        assert_eq!(vendor(&host(b"GenuineIntel")), Vendor::Intel);
        assert_eq!(vendor(&host(b"AuthenticAMD")), Vendor::Amd);
        assert_eq!(vendor(&host(b"SomethingNew")), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let mut e = host(b"GenuineIntel");
        PROFILE4.apply(&mut e, 3);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xFF, 4);
        assert_eq!(l1.ebx & 0xFFFF, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & ECX_VMX, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = host(b"GenuineIntel");
        CpuProfile {
            vcpus: 1,
            ..PROFILE4
        }
        .apply(&mut e, 0);
        assert_eq!(find(&e, 1, 0).edx & EDX_HTT, 0);
        assert_eq!((find(&e, 1, 0).ebx >> 16) & 0xFF, 1);
    }

    #[test]
    fn svm_and_vmx_hidden_unless_nested() {
        let mut e = host(b"AuthenticAMD");
        PROFILE4.apply(&mut e, 0);
        assert_eq!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
        assert_eq!(find(&e, 0x8000_000A, 0).edx, 0);
        let mut e = host(b"AuthenticAMD");
        CpuProfile {
            nested: true,
            ..PROFILE4
        }
        .apply(&mut e, 0);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
        assert_ne!(find(&e, 1, 0).ecx & ECX_VMX, 0);
        assert_eq!(find(&e, 0x8000_000A, 0).edx, 0x1BFBFF);
    }

    #[test]
    fn extended_topology_describes_n_cores() {
        let mut e = host(b"GenuineIntel");
        PROFILE4.apply(&mut e, 2);
        let smt = find(&e, 0xB, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&e, 0xB, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
    }

    #[test]
    fn non_power_of_two_counts_round_the_id_width_up() {
        let mut e = host(b"GenuineIntel");
        CpuProfile {
            vcpus: 5,
            ..PROFILE4
        }
        .apply(&mut e, 4);
        assert_eq!(find(&e, 0xB, 1).eax, 3);
        assert_eq!(find(&e, 0xB, 1).ebx, 5);
        assert_eq!((find(&e, 1, 0).ebx >> 16) & 0xFF, 8);
    }

    #[test]
    fn intel_cache_leaf_counts_cores() {
        let mut e = host(b"GenuineIntel");
        PROFILE4.apply(&mut e, 0);
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xFFF, 0, "L1 private");
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xFFF, 3, "L3 shared by 4");
    }

    #[test]
    fn amd_leaves_count_cores() {
        let mut e = host(b"AuthenticAMD");
        PROFILE4.apply(&mut e, 1);
        let sizes = find(&e, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xFF, 3);
        assert_eq!((sizes.ecx >> 12) & 0xF, 2);
        assert_ne!(find(&e, 0x8000_0001, 0).ecx & EXT_ECX_CMP_LEGACY, 0);
        let topo = find(&e, 0x8000_001E, 0);
        assert_eq!((topo.eax, topo.ebx, topo.ecx), (1, 1, 0));
    }

    #[test]
    fn pmu_is_hidden() {
        let mut e = host(b"GenuineIntel");
        PROFILE4.apply(&mut e, 0);
        let pmu = find(&e, 0xA, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }

    #[test]
    fn missing_core_level_is_added() {
        let mut e = host(b"GenuineIntel");
        e.retain(|l| !(l.function == 0xB && l.index == 1));
        PROFILE4.apply(&mut e, 1);
        let core = find(&e, 0xB, 1);
        assert_eq!((core.ebx, core.edx), (4, 1));
    }

    #[test]
    fn brand_string_fills_the_empty_leaves() {
        let text = *b"Intel(R) Xeon(R) Processor\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let mut brand = [0u32; 12];
        for (r, bytes) in brand.iter_mut().zip(text.chunks(4)) {
            *r = u32::from_le_bytes(bytes.try_into().unwrap());
        }
        let mut e = host(b"GenuineIntel");
        PROFILE4.apply(&mut e, 0);
        assert_eq!(
            find(&e, 0x8000_0002, 0).eax,
            0,
            "no brand: left as KVM has it"
        );
        CpuProfile {
            brand: Some(brand),
            ..PROFILE4
        }
        .apply(&mut e, 0);
        let mut read = Vec::new();
        for f in LEAF_BRAND {
            let l = find(&e, f, 0);
            for r in [l.eax, l.ebx, l.ecx, l.edx] {
                read.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert_eq!(read, text);
    }

    #[test]
    fn host_brand_is_ascii_when_present() {
        if let Some(brand) = host_brand() {
            let bytes: Vec<u8> = brand.iter().flat_map(|r| r.to_le_bytes()).collect();
            let text = bytes.split(|&b| b == 0).next().unwrap();
            assert!(!text.is_empty() && text.is_ascii(), "{bytes:?}");
        }
    }
}
