//! Opening KVM and checking that it can run a vmon guest.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::PathBuf;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// The only KVM API version there has ever been; anything else is not KVM.
const KVM_API_VERSION: i32 = 12;

/// Capabilities without which vmon cannot run a guest, with what each is for.
const REQUIRED_CAPABILITIES: &[(Cap, &str)] = &[
    (Cap::UserMemory, "guest memory from host mappings"),
    (Cap::SetTssAddr, "the real-mode TSS"),
    (Cap::Irqchip, "the in-kernel interrupt controllers"),
    (Cap::Pit2, "the in-kernel timer"),
    (Cap::Irqfd, "device interrupts through eventfds"),
    (Cap::Ioeventfd, "device notifications through eventfds"),
    (Cap::ExtCpuid, "the guest CPU profile"),
    (Cap::MpState, "SMP bring-up"),
    (Cap::ImmediateExit, "stopping vCPUs promptly"),
    (Cap::AdjustClock, "the guest clock"),
];

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("KVM is not available: {path} does not exist; enable VT-x/AMD-V in the firmware and load the module (modprobe kvm_intel or modprobe kvm_amd)")]
    Missing { path: PathBuf },
    #[error("KVM is not usable: permission denied on {path}; add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    PermissionDenied { path: PathBuf },
    #[error("KVM is not usable: cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "KVM is not usable: {path} is not KVM (API version {version}, expected {KVM_API_VERSION})"
    )]
    ApiVersion { path: PathBuf, version: i32 },
    #[error("KVM is not usable: it lacks {name} ({purpose}); vmon needs a Linux 5.x or newer host kernel")]
    MissingCapability { name: String, purpose: &'static str },
    #[error("KVM is not usable: {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An open, checked `/dev/kvm`.
pub struct Hypervisor {
    kvm: Kvm,
    /// Asked for on first use: a restored VM takes its CPUID from the snapshot, and the
    /// query costs a restore more than a millisecond on some hosts.
    supported_cpuid: std::sync::OnceLock<CpuId>,
    /// MSRs this KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`), which a vCPU's
    /// saved state covers.
    msr_indices: std::sync::Arc<[u32]>,
    max_vcpus: usize,
    tsc_deadline: bool,
    xcrs: bool,
}

/// Where vmon looks for KVM: `/dev/kvm`, or `$VMON_KVM_DEVICE` (tests point it elsewhere to
/// exercise the "KVM missing" path).
pub fn device_path() -> PathBuf {
    std::env::var_os("VMON_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

impl Hypervisor {
    pub fn open() -> Result<Self, HypervisorError> {
        let path = device_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.kind() {
                ErrorKind::NotFound => HypervisorError::Missing { path: path.clone() },
                ErrorKind::PermissionDenied => {
                    HypervisorError::PermissionDenied { path: path.clone() }
                }
                _ => HypervisorError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        // SAFETY: `into_raw_fd` hands over sole ownership of a descriptor we just opened;
        // `Kvm` becomes its only owner and closes it.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(HypervisorError::ApiVersion { path, version });
        }
        for (cap, purpose) in REQUIRED_CAPABILITIES {
            if !kvm.check_extension(*cap) {
                return Err(HypervisorError::MissingCapability {
                    name: format!("KVM_CAP_{cap:?}"),
                    purpose,
                });
            }
        }
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|source| HypervisorError::Ioctl {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .into();
        Ok(Hypervisor {
            msr_indices,
            max_vcpus: kvm.get_max_vcpus(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            xcrs: kvm.check_extension(Cap::Xcrs),
            supported_cpuid: std::sync::OnceLock::new(),
            kvm,
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The CPUID entries KVM can offer a guest (`KVM_GET_SUPPORTED_CPUID`).
    pub fn supported_cpuid(&self) -> Result<&CpuId, HypervisorError> {
        if let Some(c) = self.supported_cpuid.get() {
            return Ok(c);
        }
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| HypervisorError::Ioctl {
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid))
    }

    /// The MSRs KVM reports it can save and restore.
    pub fn msr_indices(&self) -> &std::sync::Arc<[u32]> {
        &self.msr_indices
    }

    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    pub fn has_tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    pub fn has_xcrs(&self) -> bool {
        self.xcrs
    }

    /// Guest physical address width from CPUID 0x80000008 (36 if the leaf is missing, the
    /// architectural minimum).
    pub fn guest_phys_bits(&self) -> Result<u8, HypervisorError> {
        Ok(self
            .supported_cpuid()?
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map(|e| (e.eax & 0xFF) as u8)
            .filter(|&bits| bits >= 32)
            .unwrap_or(36))
    }

    /// The host CPU's physical address width, from CPUID 0x80000008 executed here (36 if
    /// the leaf is missing). A restore checks its memory against this instead of asking KVM
    /// for its supported CPUID, which costs more than the rest of the restore's KVM set-up
    /// and is otherwise unused there (the guest's CPUID comes from the snapshot).
    pub fn host_phys_bits() -> u8 {
        use std::arch::x86_64::__cpuid;
        let max_extended = __cpuid(0x8000_0000).eax;
        if max_extended < 0x8000_0008 {
            return 36;
        }
        let bits = (__cpuid(0x8000_0008).eax & 0xFF) as u8;
        if bits >= 32 {
            bits
        } else {
            36
        }
    }

    /// True on a PVM host (`kvm_pvm`), where ring-0 guest code is emulated and a stock Linux
    /// kernel cannot boot.
    pub fn is_pvm() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_phys_bits_agree_with_the_kernel() {
        let bits = Hypervisor::host_phys_bits();
        assert!((32..=52).contains(&bits), "{bits}");
        // The kernel prints the same leaf as "address sizes: N bits physical" (less any bits
        // memory encryption reserves, so ours may be larger, never smaller).
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let kernel: u8 = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("address sizes\t: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("address sizes in /proc/cpuinfo");
        assert!(bits >= kernel, "CPUID says {bits}, the kernel {kernel}");
    }
}
