//! One vCPU: boot configuration, fault diagnosis and its saved state.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmon_boot::{BootCpuState, Segment};
use vmon_state::Persist;

use crate::cpuid::CpuProfile;
use crate::msrs;

/// LAPIC register offsets and delivery modes used to wire LINT0/LINT1 as virtual wire.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_EXTINT: u32 = 0x7;
const APIC_DELIVERY_NMI: u32 = 0x4;
/// x87 control word and MXCSR after FNINIT / reset.
const FPU_CONTROL_WORD: u16 = 0x37F;
const MXCSR_DEFAULT: u32 = 0x1F80;
/// Where a vCPU starts after reset: CS base 0xFFFF0000, IP 0xFFF0.
const RESET_CS_BASE: u64 = 0xFFFF_0000;
const RESET_RIP: u64 = 0xFFF0;
/// MSRs per KVM_GET_MSRS/KVM_SET_MSRS: KVM refuses 256 or more in one call (E2BIG), and
/// hosts with a PMU and Hyper-V emulation list more than that.
const MSRS_PER_IOCTL: usize = 200;
/// Longest x86 instruction.
const MAX_INSTRUCTION_LEN: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Ioctl {
        index: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted {set} of {wanted} MSRs; MSR {msr:#x} was refused")]
    MsrRefused {
        index: u32,
        set: usize,
        wanted: usize,
        msr: u32,
    },
}

pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    /// The MSRs [`Persist::save`] reads (see [`msrs::saved_msr_indices`]).
    saved_msrs: std::sync::Arc<[u32]>,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, index: u32, saved_msrs: std::sync::Arc<[u32]>) -> Self {
        Vcpu {
            fd,
            index,
            saved_msrs,
        }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Finishes an I/O or MMIO exit KVM is still completing, without running guest code.
    ///
    /// KVM finishes an `in` (or MMIO read) on the *next* `KVM_RUN`, copying what userspace
    /// put in the run area into the guest's registers; state saved before that would keep
    /// RIP past the instruction but lose its result. `KVM_RUN` with `immediate_exit` set
    /// completes the pending work and returns `EINTR` before entering the guest.
    pub fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Ok(()) => Ok(()),
            Err(source) => Err(VcpuError::Ioctl {
                index: self.index,
                what: "KVM_RUN (completing a pending exit)",
                source,
            }),
        }
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Ioctl {
            index,
            what,
            source,
        }
    }

    /// Loads the CPU profile, boot MSRs, LAPIC wiring and FPU state; the boot vCPU also gets
    /// `boot` (registers at the kernel's entry). Other vCPUs wait for INIT/SIPI in KVM.
    pub fn configure(
        &self,
        profile: &CpuProfile,
        supported: &CpuId,
        boot: Option<&BootCpuState>,
    ) -> Result<(), VcpuError> {
        let mut entries = supported.as_slice().to_vec();
        profile.apply(&mut entries, self.index);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::Ioctl {
            index: self.index,
            what: "building the CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        self.set_msrs(&msrs::boot_msrs())?;
        self.wire_lapic()?;
        let fpu = kvm_fpu {
            fcw: FPU_CONTROL_WORD,
            mxcsr: MXCSR_DEFAULT,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.ioctl("KVM_SET_FPU"))?;
        if let Some(boot) = boot {
            self.set_boot_registers(boot)?;
        }
        Ok(())
    }

    /// Sets every MSR in `entries`; any refusal is an error.
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        self.set_msrs_allowing(entries, |_| false).map(|_| ())
    }

    /// Sets the MSRs in `entries`. `KVM_SET_MSRS` stops at the first MSR it refuses: if
    /// `may_skip` allows that one, it is left out and setting goes on after it; otherwise
    /// it is an error. Returns the MSRs left out.
    fn set_msrs_allowing(
        &self,
        entries: &[kvm_msr_entry],
        may_skip: impl Fn(u32) -> bool,
    ) -> Result<Vec<u32>, VcpuError> {
        let mut skipped = Vec::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSRS_PER_IOCTL)];
            let msrs = Msrs::from_entries(batch).map_err(|_| VcpuError::Ioctl {
                index: self.index,
                what: "building the MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let set = self
                .fd
                .set_msrs(&msrs)
                .map_err(self.ioctl("KVM_SET_MSRS"))?;
            if set == batch.len() {
                rest = &rest[set..];
                continue;
            }
            let refused = batch[set].index;
            if !may_skip(refused) {
                return Err(VcpuError::MsrRefused {
                    index: self.index,
                    set: entries.len() - rest.len() + set,
                    wanted: entries.len(),
                    msr: refused,
                });
            }
            skipped.push(refused);
            rest = &rest[set + 1..];
        }
        Ok(skipped)
    }

    /// Reads every MSR in `indices` that KVM will read for this vCPU. `KVM_GET_MSRS` stops
    /// at the first MSR it refuses (one whose feature this host or the guest's CPUID lacks,
    /// say); that one is left out and the read goes on after it, so one refusal cannot
    /// silently drop the MSRs behind it.
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut read = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let wanted: Vec<kvm_msr_entry> = rest[..rest.len().min(MSRS_PER_IOCTL)]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut buf = Msrs::from_entries(&wanted).map_err(|_| VcpuError::Ioctl {
                index: self.index,
                what: "building the MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let n = self
                .fd
                .get_msrs(&mut buf)
                .map_err(self.ioctl("KVM_GET_MSRS"))?;
            read.extend_from_slice(&buf.as_slice()[..n]);
            if n < wanted.len() {
                tracing::debug!("vCPU {}: KVM does not read MSR {:#x}", self.index, rest[n]);
                rest = &rest[n + 1..];
            } else {
                rest = &rest[n..];
            }
        }
        Ok(read)
    }

    /// LINT0 receives the PIC's ExtINT and LINT1 NMIs ("virtual wire" mode), as the MP
    /// table promises and as firmware would leave it.
    fn wire_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
        set_lvt_delivery(&mut lapic, APIC_LVT_LINT0, APIC_DELIVERY_EXTINT);
        set_lvt_delivery(&mut lapic, APIC_LVT_LINT1, APIC_DELIVERY_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl("KVM_SET_LAPIC"))
    }

    fn set_boot_registers(&self, boot: &BootCpuState) -> Result<(), VcpuError> {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: boot.rip,
            rsp: boot.rsp,
            rbp: boot.rsp,
            rsi: boot.rsi,
            rbx: boot.rbx,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl("KVM_SET_REGS"))?;

        let mut sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        let data = kvm_segment_from(&boot.data);
        sregs.cs = kvm_segment_from(&boot.code);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment_from(&boot.tss);
        sregs.gdt.base = boot.gdt_base;
        sregs.gdt.limit = boot.gdt_limit;
        sregs.idt.base = boot.idt_base;
        sregs.idt.limit = boot.idt_limit;
        sregs.cr0 = boot.cr0;
        sregs.cr3 = boot.cr3;
        sregs.cr4 = boot.cr4;
        sregs.efer = boot.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))
    }

    /// One line describing where the guest was when something went wrong: RIP, CS and the
    /// instruction bytes there (read through KVM's translation of RIP, so it works whatever
    /// paging mode the guest is in).
    pub fn describe_fault<M: GuestMemory>(&self, mem: &M) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return "registers unavailable".into();
        };
        let cs_base = self.fd.get_sregs().map(|s| s.cs.base).unwrap_or(0);
        // On AMD, KVM answers a shutdown by resetting the vCPU: what is left is the reset
        // vector, not the faulting instruction.
        if cs_base == RESET_CS_BASE && regs.rip == RESET_RIP {
            return format!(
                "vCPU {}: state lost, KVM reset the vCPU after the fault",
                self.index
            );
        }
        let linear = cs_base.wrapping_add(regs.rip);
        let bytes = self
            .fd
            .translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| {
                let mut buf = [0u8; MAX_INSTRUCTION_LEN];
                let n = (0..MAX_INSTRUCTION_LEN)
                    .take_while(|&i| {
                        mem.read_slice(&mut buf[i..=i], GuestAddress(t.physical_address + i as u64))
                            .is_ok()
                    })
                    .count();
                buf[..n]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unreadable".into());
        format!(
            "vCPU {} at RIP {:#x} (RSP {:#x}), instruction bytes: {}",
            self.index, regs.rip, regs.rsp, bytes
        )
    }
}

fn set_lvt_delivery(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

fn kvm_segment_from(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: u8::from(s.present == 0),
        padding: 0,
    }
}

/// The x87/SSE state when KVM offers no XSAVE (kvm_fpu has no serde support of its own).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (dst, src) in f.fpr.iter_mut().zip(&self.fpr) {
            *dst = *src;
        }
        for (dst, src) in f.xmm.iter_mut().zip(&self.xmm) {
            *dst = *src;
        }
        f
    }
}

/// Everything KVM holds for one vCPU. The CPUID table is included so a restored vCPU reports
/// exactly what the guest saw before, whatever the new host's defaults.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Wiring = Vcpu;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.ioctl("KVM_GET_CPUID2"))?;
        let msrs = self.get_msrs(&self.saved_msrs)?;
        Ok(VcpuState {
            index: self.index,
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: self.fd.get_regs().map_err(self.ioctl("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&self.fd.get_fpu().map_err(self.ioctl("KVM_GET_FPU"))?),
            xsave: self.fd.get_xsave().ok(),
            xcrs: self.fd.get_xcrs().ok(),
            lapic: self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.ioctl("KVM_GET_MP_STATE"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.ioctl("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Applies `state` to a freshly created vCPU. Order matters: CPUID before MSRs (KVM
    /// validates MSRs against CPUID), sregs before the LAPIC, the TSC deadline after the
    /// LAPIC, events last.
    fn restore(vcpu: Vcpu, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Ioctl {
            index: vcpu.index,
            what: "building the CPUID table",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vcpu.fd
            .set_cpuid2(&cpuid)
            .map_err(vcpu.ioctl("KVM_SET_CPUID2"))?;
        vcpu.fd
            .set_sregs(&state.sregs)
            .map_err(vcpu.ioctl("KVM_SET_SREGS"))?;
        vcpu.fd
            .set_regs(&state.regs)
            .map_err(vcpu.ioctl("KVM_SET_REGS"))?;
        match &state.xsave {
            // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU with the same CPUID, so
            // its size matches what KVM_SET_XSAVE reads.
            Some(xsave) => {
                unsafe { vcpu.fd.set_xsave(xsave) }.map_err(vcpu.ioctl("KVM_SET_XSAVE"))?
            }
            None => vcpu
                .fd
                .set_fpu(&state.fpu.to_kvm())
                .map_err(vcpu.ioctl("KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &state.xcrs {
            vcpu.fd.set_xcrs(xcrs).map_err(vcpu.ioctl("KVM_SET_XCRS"))?;
        }
        // The TSC-deadline MSR only arms the LAPIC timer when the LAPIC is already in
        // TSC-deadline mode, and counts against the guest TSC: so it goes in after the
        // other MSRs (the TSC among them) and after the LAPIC. Set earlier it is dropped,
        // and a restored Linux guest waits forever for its next timer tick.
        let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = state
            .msrs
            .iter()
            .partition(|m| m.index == msrs::MSR_IA32_TSC_DEADLINE);
        // A snapshot taken on another host may hold MSRs this KVM does not know.
        let skipped = vcpu.set_msrs_allowing(&others, |index| !msrs::must_restore(index))?;
        if !skipped.is_empty() {
            tracing::warn!(
                "vCPU {}: this host's KVM refused saved MSRs {:x?}; they start from reset",
                vcpu.index,
                skipped
            );
        }
        vcpu.fd
            .set_lapic(&state.lapic)
            .map_err(vcpu.ioctl("KVM_SET_LAPIC"))?;
        vcpu.set_msrs(&deadline)?;
        vcpu.fd
            .set_mp_state(state.mp_state)
            .map_err(vcpu.ioctl("KVM_SET_MP_STATE"))?;
        vcpu.fd
            .set_vcpu_events(&state.events)
            .map_err(vcpu.ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(vcpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode_is_replaced() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, vector 0x31, fixed delivery.
        for (i, b) in 0x0001_0031u32.to_le_bytes().iter().enumerate() {
            lapic.regs[APIC_LVT_LINT0 + i] = *b as _;
        }
        set_lvt_delivery(&mut lapic, APIC_LVT_LINT0, APIC_DELIVERY_EXTINT);
        let v = u32::from_le_bytes(std::array::from_fn(|i| {
            lapic.regs[APIC_LVT_LINT0 + i] as u8
        }));
        assert_eq!(v, 0x0001_0731);
    }

    #[test]
    fn fpu_state_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            last_ip: 42,
            ..Default::default()
        };
        f.xmm[3][7] = 9;
        f.fpr[1][0] = 5;
        let saved = FpuState::from(&f);
        let back = saved.to_kvm();
        assert_eq!(back.xmm[3][7], 9);
        assert_eq!(back.fpr[1][0], 5);
        assert_eq!((back.fcw, back.mxcsr, back.last_ip), (0x37F, 0x1F80, 42));
    }

    #[test]
    fn segments_convert_with_unusable_for_null() {
        let code = vmon_boot::gdt::BootGdt::long_mode().segment(1);
        let k = kvm_segment_from(&code);
        assert_eq!(
            (k.selector, k.l, k.unusable, k.limit),
            (8, 1, 0, 0xFFFF_FFFF)
        );
        assert_eq!(kvm_segment_from(&Segment::default()).unusable, 1);
    }
}
