//! A machine's whole state as one value: what `vmon ctl snapshot` writes and `vmon
//! restore` reads back. Every part is the `Persist` state of its component (vCPUs, the
//! in-kernel irqchip/PIT/clock, each device): there is no second serialisation path.
//!
//! A snapshot directory holds two files: [`STATE_FILE`] (this value, in vmon-state's
//! versioned, checksummed container) and `memory-<id>` (guest RAM, sparse, mapped
//! copy-on-write on restore). The state file names its memory file, and a new snapshot
//! into the same directory writes a memory file under a new name before the state file
//! that points at it: a crash in between leaves the old pair intact, never a state file
//! next to someone else's memory.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmon_devices::legacy::i8042::{I8042State, I8042};
use vmon_devices::legacy::power::{PmControl, PmState};
use vmon_devices::legacy::rtc::{Rtc, RtcState};
use vmon_devices::legacy::serial::{SerialPort, SerialPortState};
use vmon_devices::pci::{PciConfigIo, PciConfigState};
use vmon_hypervisor::{VcpuState, VmState};
use vmon_memory::GuestMemory;
use vmon_virtio::transport::persist::VirtioPciState;
use vmon_virtio::transport::VirtioPci;

use crate::config::VmConfig;
use crate::exit::VmmError;

pub const STATE_FILE: &str = "vm.state";
/// Memory files are `memory-<16 hex digits>`.
pub const MEMORY_FILE_PREFIX: &str = "memory-";
/// The container kind of [`STATE_FILE`], so a memory file or another vmon file given in its
/// place is refused by name.
pub const STATE_KIND: &str = "vmon-machine";

/// Everything but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The VM's configuration (docs/config.md schema) as it was started.
    pub config: serde_json::Value,
    /// The memory file in the same directory that belongs to this state.
    pub memory_file: String,
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub com1: SerialPortState,
    pub com2: SerialPortState,
    pub i8042: I8042State,
    pub rtc: RtcState,
    pub pm: PmState,
    pub pci: PciConfigState,
    /// The virtio-pci functions in PCI slot order (the order of the configuration's disks,
    /// nets, vsock, rng).
    pub virtio: Vec<VirtioPciState>,
}

/// A fresh memory file name: unique per snapshot (time and process), so it never replaces
/// the file an existing state file points at.
pub fn new_memory_file_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{MEMORY_FILE_PREFIX}{:016x}",
        nanos ^ (u64::from(std::process::id()) << 48)
    )
}

impl MachineSnapshot {
    /// The memory file's path in `dir`; refuses a name that would leave the directory.
    pub fn memory_path(&self, dir: &std::path::Path) -> Result<std::path::PathBuf, VmmError> {
        let name = &self.memory_file;
        let hex = name.strip_prefix(MEMORY_FILE_PREFIX).unwrap_or("");
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VmmError::Snapshot(format!(
                "the state file names an invalid memory file '{}'",
                name.escape_debug()
            )));
        }
        Ok(dir.join(name))
    }

    /// Whether a machine configured as `config` can take this state.
    pub fn check_fits(&self, config: &VmConfig) -> Result<(), VmmError> {
        if self.vcpus.len() != config.cpus as usize {
            return Err(VmmError::Snapshot(format!(
                "the snapshot has {} vCPUs, the VM {}",
                self.vcpus.len(),
                config.cpus
            )));
        }
        if self.memory_bytes != config.memory.bytes() {
            return Err(VmmError::Snapshot(format!(
                "the snapshot has {} bytes of RAM, the VM {}",
                self.memory_bytes,
                config.memory.bytes()
            )));
        }
        Ok(())
    }
}

/// The live components a snapshot is taken from (shared with the buses they sit on).
pub struct SnapshotSources {
    pub com1: Arc<Mutex<SerialPort>>,
    pub com2: Arc<Mutex<SerialPort>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub pm: Arc<Mutex<PmControl>>,
    pub pci: Arc<Mutex<PciConfigIo>>,
    pub memory: GuestMemory,
    pub virtio: Vec<Arc<Mutex<VirtioPci>>>,
}
