//! One virtio-pci device driven by the script-runner tiny guest (`vmon_tinyguest::script`)
//! under vmon or under QEMU microvm, so a benchmark measures both VMMs' device paths with
//! the same driver on this machine's /dev/kvm.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmon_tinyguest::script::Script;
use vmon_tinyguest::virtio::*;

/// PCI slot of the device: vmon's first device, and where QEMU puts the first `-device`.
pub const SLOT: u8 = 1;
/// QEMU microvm with `pcie=on`: configuration space is ECAM only (no 0xCF8 ports), and
/// nothing assigns BARs before the kernel does, so the driver places the device's BAR 4 (the
/// modern virtio registers, 16 KiB) at the bottom of the 32-bit MMIO window itself.
const QEMU_ECAM: u64 = 0xE000_0000;
const QEMU_BAR: u64 = 0xC000_0000;
/// Guest RAM for both VMMs.
pub const GUEST_MEMORY: &str = "256M";

/// The VMMs measured, each booting the same driver script.
#[derive(Clone, Copy, PartialEq)]
pub enum Vmm {
    Vmon,
    /// QEMU microvm with a PCIe bus (`pcie=on`).
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Vmon => "vmon",
            Vmm::Qemu => "qemu microvm",
        }
    }

    /// vmon, and QEMU when it is installed.
    pub fn available() -> Vec<Vmm> {
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !qemu {
            println!("(no qemu-system-x86_64: vmon alone)");
        }
        [Vmm::Vmon]
            .into_iter()
            .chain(qemu.then_some(Vmm::Qemu))
            .collect()
    }

    /// Script ops that point the base register at the device's virtio registers and turn
    /// on memory decoding and bus mastering.
    pub fn find_device(self, s: &mut Script) {
        match self {
            Vmm::Vmon => {
                s.base_from_bar0(0, SLOT, 0);
                s.pci_write16(0, SLOT, 0, 0x04, 0x0006);
            }
            Vmm::Qemu => {
                let cfg = QEMU_ECAM + (u64::from(SLOT) << 15);
                s.write(4, cfg + 0x20, QEMU_BAR) // BAR 4, low half
                    .write(4, cfg + 0x24, 0) // BAR 5: its high half
                    .write(2, cfg + 0x04, 0x0006)
                    .set_base(QEMU_BAR);
            }
        }
    }

    pub fn kernel(self, script: &Script) -> Vec<u8> {
        match self {
            Vmm::Vmon => vmon_tinyguest::script_elf(script),
            Vmm::Qemu => vmon_tinyguest::script_pvh_elf(script),
        }
    }

    /// The VMM booting `kernel`, without devices.
    pub fn command(self, kernel: &str) -> Command {
        match self {
            Vmm::Vmon => {
                let mut c = Command::new(super::vmon_bin());
                c.args(["run", "--kernel", kernel, "--memory", GUEST_MEMORY]);
                c
            }
            Vmm::Qemu => {
                let mut c = super::qemu_microvm(GUEST_MEMORY, "1");
                c.args(["-machine", "pcie=on", "-kernel", kernel]);
                c
            }
        }
    }
}

/// Device initialisation up to FEATURES_OK, accepting VERSION_1 alone.
pub fn negotiate(s: &mut Script) {
    s.write_rel(1, STATUS, 0)
        .write_rel(1, STATUS, ACK)
        .write_rel(1, STATUS, ACK | DRIVER);
    for word in 0..2u64 {
        s.write_rel(4, GF_SELECT, word).write_rel(
            4,
            GF,
            (F_VERSION_1 >> (32 * word)) & 0xFFFF_FFFF,
        );
    }
    s.write_rel(1, STATUS, ACK | DRIVER | FEATURES_OK);
}

/// Queue `index` with [`QUEUE_MAX`] entries on the given rings, enabled.
pub fn setup_queue(s: &mut Script, index: u16, (desc, avail, used): (u64, u64, u64)) {
    s.write_rel(2, Q_SELECT, u64::from(index))
        .write_rel(2, Q_SIZE, u64::from(QUEUE_MAX));
    for (reg, addr) in [(Q_DESC, desc), (Q_DRIVER, avail), (Q_DEVICE, used)] {
        s.write_rel(4, reg, addr).write_rel(4, reg + 4, 0);
    }
    s.write_rel(2, Q_ENABLE, 1);
}

/// Runs `cmd`, a VMM booting a driver script that prints `go`, later `end`, then
/// `expected` value lines. Returns the time from `go` to `end` as the host saw the lines
/// arrive, and the values. QEMU has no exit port, so the guest spins once done and QEMU is
/// stopped once the values are in; vmon must exit 0.
pub fn run_script(
    vmm: Vmm,
    mut cmd: Command,
    expected: usize,
) -> Result<(Duration, Vec<u64>), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.name()))?;
    let (mut go, mut elapsed) = (None, None);
    let mut values = Vec::new();
    let mut trouble = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let now = Instant::now();
        let Ok(line) = line else { break };
        match line.as_str() {
            "go" => go = Some(now),
            "end" => elapsed = go.map(|g| now - g),
            v if v.len() == 16 && elapsed.is_some() => {
                values.push(u64::from_str_radix(v, 16).unwrap_or(u64::MAX));
                if values.len() == expected && vmm == Vmm::Qemu {
                    let _ = child.kill();
                }
            }
            v if v.len() == 16 => {} // what the script read before `go` (vmon's BAR 0)
            other => {
                trouble = Some(format!("guest said: {other}"));
                let _ = child.kill();
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    if let Some(trouble) = trouble {
        return Err(format!("{trouble} ({})", stderr.trim()));
    }
    if vmm == Vmm::Vmon && !status.success() {
        return Err(format!("vmon: {status}: {}", stderr.trim()));
    }
    let elapsed = elapsed.ok_or("no go/end lines")?;
    if values.len() != expected {
        return Err(format!("unexpected guest values {values:x?}"));
    }
    Ok((elapsed, values))
}
