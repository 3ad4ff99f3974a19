//! A machine's whole state as one value: what `vmon ctl snapshot` writes and `vmon
//! restore` reads back. Every part is the `Persist` state of its component (vCPUs, the
//! in-kernel irqchip/PIT/clock, each device): there is no second serialisation path.
//!
//! A snapshot directory holds two files: [`STATE_FILE`] (this value, in vmon-state's
//! versioned, checksummed container) and [`MEMORY_FILE`] (guest RAM, sparse, mapped
//! copy-on-write on restore).

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
pub const MEMORY_FILE: &str = "memory";
/// The container kind of [`STATE_FILE`], so a memory file or another vmon file given in its
/// place is refused by name.
pub const STATE_KIND: &str = "vmon-machine";

/// Everything but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The VM's configuration (docs/config.md schema) as it was started.
    pub config: serde_json::Value,
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

impl MachineSnapshot {
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
