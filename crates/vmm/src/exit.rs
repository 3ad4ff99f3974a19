//! How a VM ends, how vmon fails, and the exit status each maps to.

use vmon_boot::BootError;
use vmon_hypervisor::{HypervisorError, VcpuError, VmError};
use vmon_memory::layout::LayoutError;
use vmon_memory::MemoryError;

/// vmon's documented exit statuses (see docs/exit-codes.md). With `vmon run -- CMD`, the
/// command's own status (0-255) is passed through and may coincide with these.
pub mod exit_codes {
    /// The guest powered off or rebooted, or CMD succeeded.
    pub const OK: i32 = 0;
    /// Bad command line: unknown flag, invalid value (e.g. `--cpus 0`, `--memory 1K`).
    pub const USAGE: i32 = 64;
    /// A kernel or initrd file that is not what it should be (not bzImage/ELF, truncated).
    pub const BAD_IMAGE: i32 = 65;
    /// A kernel or initrd file that does not exist or cannot be read.
    pub const NO_INPUT: i32 = 66;
    /// KVM is missing or unusable on this host.
    pub const KVM_UNAVAILABLE: i32 = 69;
    /// The VMM hit a KVM exit it cannot handle (internal error, failed entry).
    pub const VMM_FAULT: i32 = 70;
    /// The host refused resources: memory that cannot be mapped, threads, descriptors.
    pub const HOST_RESOURCES: i32 = 71;
    /// An orderly shutdown timed out: the guest did not power off in time and was stopped.
    pub const SHUTDOWN_TIMED_OUT: i32 = 75;
    /// The guest crashed: triple fault or kernel panic.
    pub const GUEST_CRASHED: i32 = 76;
    /// vmon was stopped by a signal or the console escape: 128 + signal number.
    pub const SIGNAL_BASE: i32 = 128;
}

/// Why a VM that started has ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reported an exit status through the exit port.
    ExitStatus(u8),
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (vmon does not restart it).
    Reboot,
    /// The guest kernel panicked (seen as a reboot flagged "warm" by `reboot=panic_warm`).
    Panic,
    /// Triple fault: KVM reported a guest shutdown.
    TripleFault(String),
    /// KVM could not continue the guest; `String` is the one-line diagnosis.
    Fault(String),
    /// The host stopped the VM: a signal, or Ctrl-A x on the console.
    Stopped { signal: i32 },
    /// An API client asked for a hard stop.
    StoppedByApi,
    /// The power button was pressed and the guest did not power off within this time.
    ShutdownTimedOut(std::time::Duration),
}

impl VmOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            VmOutcome::ExitStatus(status) => i32::from(*status),
            VmOutcome::PowerOff | VmOutcome::Reboot => exit_codes::OK,
            VmOutcome::Panic | VmOutcome::TripleFault(_) => exit_codes::GUEST_CRASHED,
            VmOutcome::Fault(_) => exit_codes::VMM_FAULT,
            VmOutcome::Stopped { signal } => exit_codes::SIGNAL_BASE + signal,
            VmOutcome::StoppedByApi => exit_codes::OK,
            VmOutcome::ShutdownTimedOut(_) => exit_codes::SHUTDOWN_TIMED_OUT,
        }
    }

    /// The line to print on stderr, if the outcome deserves one.
    pub fn message(&self) -> Option<String> {
        match self {
            VmOutcome::ExitStatus(_) | VmOutcome::PowerOff | VmOutcome::Reboot => None,
            VmOutcome::Panic => Some("guest crashed: kernel panic".into()),
            VmOutcome::TripleFault(at) => Some(format!("guest crashed: triple fault ({at})")),
            VmOutcome::Fault(what) => Some(format!("VM stopped: {what}")),
            VmOutcome::StoppedByApi => Some("VM stopped through the API".into()),
            VmOutcome::ShutdownTimedOut(t) => Some(format!(
                "the guest did not power off within {} s of the power button; stopped it",
                t.as_secs_f64()
            )),
            VmOutcome::Stopped { signal } => Some(format!(
                "VM stopped by {}",
                match *signal {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGHUP => "SIGHUP",
                    _ => "a signal",
                }
            )),
        }
    }
}

fn swap_text(swap: vmon_memory::MemSize) -> String {
    match swap.bytes() {
        0 => "no swap".into(),
        _ => format!("{} of swap", swap.approx()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Kvm(#[from] HypervisorError),
    #[error("--memory {0}")]
    Layout(#[from] LayoutError),
    #[error("--memory {size} is more than this host can map: it has {} of RAM and {}", ram.approx(), swap_text(*swap))]
    MoreThanHost {
        size: vmon_memory::MemSize,
        ram: vmon_memory::MemSize,
        swap: vmon_memory::MemSize,
    },
    #[error("--memory: more than this host can map ({0})")]
    MapMemory(#[source] MemoryError),
    #[error("{0}")]
    Boot(#[from] BootError),
    #[error("--cpus {0}: a VM needs at least 1 vCPU")]
    NoCpus(u32),
    #[error("--cpus {requested}: this host supports at most {max} vCPUs per VM")]
    TooManyCpus { requested: u32, max: u32 },
    #[error("cannot create the VM: {0}")]
    Vm(#[from] VmError),
    #[error("cannot set up the vCPUs: {0}")]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up the devices: {0}")]
    Devices(String),
    #[error("--disk: {0}")]
    Disk(#[from] vmon_virtio::block::DiskError),
    #[error("--net: {0}")]
    Net(#[from] vmon_virtio::tap::TapError),
    #[error("--vsock {0}")]
    Vsock(#[from] vmon_virtio::vsock::VsockError),
    #[error("{0}")]
    Api(#[source] vmon_api::server::ServerError),
    #[error("--metrics-file {}: {source}", path.display())]
    MetricsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Snapshot(String),
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    pub fn exit_code(&self) -> i32 {
        use exit_codes::*;
        match self {
            VmmError::Kvm(_) => KVM_UNAVAILABLE,
            VmmError::Layout(_)
            | VmmError::MoreThanHost { .. }
            | VmmError::NoCpus(_)
            | VmmError::TooManyCpus { .. } => USAGE,
            VmmError::MapMemory(_) | VmmError::Host { .. } => HOST_RESOURCES,
            VmmError::Boot(e) => match e {
                BootError::Read { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound
                        || source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    NO_INPUT
                }
                BootError::Read { .. }
                | BootError::BadKernel { .. }
                | BootError::BadInitrd { .. } => BAD_IMAGE,
                BootError::CmdlineTooLong { .. }
                | BootError::CmdlineNul
                | BootError::TooManyCpus(_) => USAGE,
                BootError::GuestMemory(_) => USAGE,
            },
            VmmError::Vm(_) | VmmError::Vcpu(_) | VmmError::Devices(_) => VMM_FAULT,
            VmmError::Api(e) => {
                use vmon_api::server::ServerError;
                match e {
                    ServerError::PathTooLong(_)
                    | ServerError::InUse(_)
                    | ServerError::NotASocket(_) => USAGE,
                    ServerError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound
                            || source.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        NO_INPUT
                    }
                    _ => HOST_RESOURCES,
                }
            }
            VmmError::MetricsFile { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound
                    || source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                NO_INPUT
            }
            VmmError::MetricsFile { .. } => HOST_RESOURCES,
            VmmError::Snapshot(_) => USAGE,
            VmmError::Disk(e) => match e {
                vmon_virtio::block::DiskError::Open { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound
                        || source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    NO_INPUT
                }
                vmon_virtio::block::DiskError::SerialTooLong(_) => USAGE,
                _ => NO_INPUT,
            },
            // A tap the host will not give us is a refused resource; naming something
            // that cannot be a tap is the user's mistake.
            VmmError::Net(e) => match e {
                vmon_virtio::tap::TapError::InvalidName(_)
                | vmon_virtio::tap::TapError::NotTap { .. } => USAGE,
                _ => HOST_RESOURCES,
            },
            VmmError::Vsock(e) => match e {
                vmon_virtio::vsock::VsockError::Bind { source, .. } => match source.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => NO_INPUT,
                    _ => HOST_RESOURCES,
                },
                _ => USAGE,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_documented_codes() {
        assert_eq!(VmOutcome::ExitStatus(7).exit_code(), 7);
        assert_eq!(VmOutcome::ExitStatus(0).exit_code(), 0);
        assert_eq!(VmOutcome::Reboot.exit_code(), 0);
        assert_eq!(VmOutcome::Panic.exit_code(), 76);
        assert_eq!(VmOutcome::TripleFault(String::new()).exit_code(), 76);
        assert_eq!(VmOutcome::Fault(String::new()).exit_code(), 70);
        assert_eq!(
            VmOutcome::Stopped {
                signal: libc::SIGTERM
            }
            .exit_code(),
            143
        );
        assert_eq!(VmOutcome::Reboot.message(), None);
        assert_eq!(
            VmOutcome::Stopped {
                signal: libc::SIGINT
            }
            .message()
            .unwrap(),
            "VM stopped by SIGINT"
        );
    }

    #[test]
    fn tap_failures_are_refused_host_resources() {
        use vmon_virtio::tap::TapError;
        let denied = VmmError::Net(TapError::CreateDenied {
            name: "tap0".into(),
        });
        assert_eq!(denied.exit_code(), exit_codes::HOST_RESOURCES);
        assert!(denied
            .to_string()
            .starts_with("--net: cannot open tap 'tap0': permission denied"));
        let busy = VmmError::Net(TapError::Busy {
            name: "tap0".into(),
        });
        assert_eq!(busy.exit_code(), 71);
        let not_tap = VmmError::Net(TapError::NotTap { name: "lo".into() });
        assert_eq!(not_tap.exit_code(), exit_codes::USAGE);
    }

    #[test]
    fn missing_files_and_bad_images_are_told_apart() {
        let missing = VmmError::Boot(BootError::Read {
            what: "kernel",
            path: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(missing.exit_code(), exit_codes::NO_INPUT);
        assert_eq!(
            missing.to_string(),
            "cannot read kernel '/nope': entity not found"
        );
        let bad = VmmError::Boot(BootError::BadKernel {
            path: "/x".into(),
            reason: "not a bzImage or ELF".into(),
        });
        assert_eq!(bad.exit_code(), exit_codes::BAD_IMAGE);
        assert_eq!(
            bad.to_string(),
            "cannot load kernel '/x': not a bzImage or ELF"
        );
    }

    #[test]
    fn vsock_errors() {
        use vmon_virtio::vsock::VsockError;
        let bind = |kind| {
            VmmError::Vsock(VsockError::Bind {
                path: "/d/v.sock".into(),
                source: std::io::Error::from(kind),
            })
        };
        let missing_dir = bind(std::io::ErrorKind::NotFound);
        assert_eq!(missing_dir.exit_code(), exit_codes::NO_INPUT);
        assert_eq!(
            missing_dir.to_string(),
            "--vsock socket=/d/v.sock: entity not found"
        );
        assert_eq!(
            bind(std::io::ErrorKind::OutOfMemory).exit_code(),
            exit_codes::HOST_RESOURCES
        );
        let in_use = VmmError::Vsock(VsockError::InUse { path: "/v".into() });
        assert_eq!(in_use.exit_code(), exit_codes::USAGE);
        assert_eq!(
            VmmError::Vsock(VsockError::BadCid(2)).exit_code(),
            exit_codes::USAGE
        );
    }
}
