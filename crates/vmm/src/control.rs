//! Operating a running VM from outside: pause, resume, orderly shutdown, hard stop, and the
//! counters the management API reports.
//!
//! [`VmControl`] is shared (an `Arc`) by the main loop, the vCPU threads and the API thread.
//! Nothing in it blocks a vCPU or device thread on the API: vCPUs only check one atomic flag
//! per exit, and park on a condition variable only when a pause was asked for.
//!
//! Pause: the flag is raised, every vCPU thread is kicked out of `KVM_RUN` with the kick
//! signal (repeatedly, since a kick that lands just before `KVM_RUN` is entered is lost), and
//! each parks before re-entering the guest. Guest time: kvmclock is read when the last vCPU
//! has parked and written back on resume (as QEMU does), so the guest's monotonic clock does
//! not jump over the pause and its watchdogs stay quiet; each parked vCPU also tells KVM the
//! guest was paused by the host (`KVM_KVMCLOCK_CTRL`), which silences soft-lockup reports.
//! The guest's wall clock lags by the pause, as after a laptop suspend, until NTP or
//! `hwclock --hctosys` fixes it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmon_api::model::{Counters, DeviceCounters, VcpuCounters, VmInfo, VmState};
use vmon_api::router::{ApiError, VmApi};
use vmon_devices::bus::lock;
use vmon_devices::legacy::power::PmControl;
use vmon_hypervisor::{Vcpu, VcpuState};
use vmon_state::Persist;
use vmon_virtio::metrics::DeviceMetrics;

use crate::signals;
use crate::snapshot::{
    new_memory_file_name, MachineSnapshot, SnapshotSources, MEMORY_FILE_PREFIX, STATE_FILE,
    STATE_KIND,
};

/// What a snapshot wrote and how long the guest was paused for it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotReport {
    pub dir: std::path::PathBuf,
    pub memory_bytes_written: u64,
    pub state_bytes: u64,
    pub paused_ms: f64,
    pub stopped: bool,
}

/// How long `pause` waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a snapshot waits for each device to finish the requests it has in flight.
/// Longer than any request takes on working storage; storage that has stopped answering
/// (a lost network volume) fails the snapshot after it instead of hanging the API.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a vCPU that has not parked yet is kicked again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);
/// Longest orderly-shutdown timeout the API accepts.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why the vCPU loop returned to userspace; the names are the API's and Prometheus' labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    IrqWindow,
    /// `KVM_RUN` interrupted by a signal (kicks for pause and stop).
    Interrupted,
    SystemEvent,
    Shutdown,
    InternalError,
    FailEntry,
    Other,
}

const EXIT_REASONS: [(ExitReason, &str); 12] = [
    (ExitReason::IoIn, "io_in"),
    (ExitReason::IoOut, "io_out"),
    (ExitReason::MmioRead, "mmio_read"),
    (ExitReason::MmioWrite, "mmio_write"),
    (ExitReason::Hlt, "hlt"),
    (ExitReason::IrqWindow, "irq_window"),
    (ExitReason::Interrupted, "interrupted"),
    (ExitReason::SystemEvent, "system_event"),
    (ExitReason::Shutdown, "shutdown"),
    (ExitReason::InternalError, "internal_error"),
    (ExitReason::FailEntry, "fail_entry"),
    (ExitReason::Other, "other"),
];

/// One vCPU thread's counters: written by that thread only, read by the API thread.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// The thread's kernel id, for its CPU time in /proc; 0 until the thread starts.
    tid: AtomicI32,
    exits: [AtomicU64; EXIT_REASONS.len()],
}

impl VcpuStats {
    pub fn count(&self, reason: ExitReason) {
        self.exits[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Called on the vCPU thread when it ends, so its id (which the kernel may reuse) is
    /// not read any more.
    pub fn clear_thread(&self) {
        self.tid.store(0, Ordering::Relaxed);
    }

    /// Called on the vCPU thread when it starts.
    pub fn set_current_thread(&self) {
        // The system call, not glibc's wrapper: Rust's standard library refers to `gettid`
        // weakly, and a static link (scripts/build-release.sh) then leaves the symbol null,
        // so calling the wrapper jumped to address 0 on every vCPU thread.
        // SAFETY: gettid takes no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
        self.tid.store(tid, Ordering::Relaxed);
    }

    fn exits(&self) -> BTreeMap<String, u64> {
        EXIT_REASONS
            .iter()
            .map(|(r, name)| {
                (
                    (*name).to_string(),
                    self.exits[*r as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// User plus system CPU time of the thread, in seconds (0 if it is gone).
    fn cpu_time_s(&self) -> f64 {
        let tid = self.tid.load(Ordering::Relaxed);
        if tid == 0 {
            return 0.0;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
            return 0.0;
        };
        thread_cpu_seconds(&stat, clock_ticks_per_second()).unwrap_or(0.0)
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime (fields 14 and 15) of a /proc/.../stat line, in seconds. The command name
/// (field 2) may hold spaces and parentheses, so fields are counted after its last ')'.
fn thread_cpu_seconds(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second)
}

/// Reads the API server's own counters (requests by status class, ...).
pub type ApiStats = Arc<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>;

/// A device as the counters report it.
pub struct DeviceEntry {
    pub name: String,
    pub kind: &'static str,
    pub metrics: Arc<dyn DeviceMetrics>,
}

/// Where the vCPUs wait while the VM is paused.
#[derive(Default)]
struct PauseGate {
    /// Fast-path copy of `inner.requested`, checked on every exit.
    requested: AtomicBool,
    inner: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    requested: bool,
    parked: usize,
    /// Bumped to ask every parked vCPU for its state: a vCPU belongs to its thread, so the
    /// thread saves itself (KVM_GET_* on a stopped vCPU) and leaves the result here.
    save_generation: u64,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// What the host asked the main loop to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRequest {
    /// Stop at once.
    Stop,
    /// The power button was pressed; stop at this instant if the guest has not powered off.
    ShutdownBy {
        deadline: Instant,
        timeout: Duration,
    },
}

struct RunState {
    state: VmState,
    paused_clock: Option<kvm_clock_data>,
    request: Option<HostRequest>,
}

pub struct VmControl {
    sources: SnapshotSources,
    vm: Arc<VmFd>,
    started: Instant,
    vcpu_stats: Vec<Arc<VcpuStats>>,
    devices: Vec<DeviceEntry>,
    gate: PauseGate,
    /// Serialises pause, resume and shutdown, so `run` itself is only ever held briefly
    /// (the main loop reads it).
    ops: Mutex<()>,
    run: Mutex<RunState>,
    /// Wakes the main loop when `request` changes.
    wake: EventFd,
    /// pthread ids of the vCPU threads, for kicks; set once they run.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    power: Arc<Mutex<PmControl>>,
    /// Whether the vCPUs are still meant to run (false once the VM is ending).
    running: Arc<AtomicBool>,
    /// The VM's configuration as the API shows it.
    config: serde_json::Value,
    memory_mib: u64,
    /// Set by the API thread so the counters can include it.
    api_stats: Mutex<Option<ApiStats>>,
    /// A snapshot is being written (on a thread of its own, so the API keeps answering):
    /// actions that would change the VM's state under it are refused meanwhile.
    snapshotting: AtomicBool,
    /// The memory file of the snapshot being written, so that vmon exiting in the middle
    /// (a signal) removes it rather than leave an unreferenced file of guest RAM behind.
    snapshot_files: Mutex<SnapshotFiles>,
    /// Set with [`SnapshotFiles::abandoned`]: stops the memory writer at its next chunk.
    snapshot_cancel: AtomicBool,
}

#[derive(Default)]
struct SnapshotFiles {
    /// Written but not yet named by a state file.
    memory: Option<std::path::PathBuf>,
    /// vmon is exiting: no state file may be written any more.
    abandoned: bool,
}

/// Removes a memory file that no state file names: the file itself, or the temporary file
/// it is written under until complete (`.<name>.tmp-<pid>-<n>`, see vmon-state).
fn remove_memory_file(path: &Path) {
    let _ = std::fs::remove_file(path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let temp_prefix = format!(".{}.tmp-", name.to_string_lossy());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&temp_prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Clears [`VmControl::snapshotting`] however the snapshot ends.
struct SnapshotInProgress<'a>(&'a AtomicBool);

impl Drop for SnapshotInProgress<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub struct ControlParts {
    pub snapshot: SnapshotSources,
    pub vm: Arc<VmFd>,
    pub vcpus: usize,
    pub devices: Vec<DeviceEntry>,
    pub power: Arc<Mutex<PmControl>>,
    pub config: serde_json::Value,
    pub memory_mib: u64,
}

impl VmControl {
    pub fn new(parts: ControlParts) -> std::io::Result<Self> {
        Ok(VmControl {
            sources: parts.snapshot,
            vm: parts.vm,
            started: Instant::now(),
            vcpu_stats: (0..parts.vcpus).map(|_| Arc::default()).collect(),
            devices: parts.devices,
            gate: PauseGate::default(),
            ops: Mutex::new(()),
            run: Mutex::new(RunState {
                state: VmState::Running,
                paused_clock: None,
                request: None,
            }),
            wake: EventFd::new(EFD_NONBLOCK)?,
            vcpu_threads: Mutex::new(Vec::new()),
            power: parts.power,
            running: Arc::new(AtomicBool::new(true)),
            config: parts.config,
            memory_mib: parts.memory_mib,
            api_stats: Mutex::new(None),
            snapshotting: AtomicBool::new(false),
            snapshot_files: Mutex::new(SnapshotFiles::default()),
            snapshot_cancel: AtomicBool::new(false),
        })
    }

    pub fn vcpu_stats(&self, index: usize) -> Arc<VcpuStats> {
        self.vcpu_stats[index].clone()
    }

    pub fn running(&self) -> &Arc<AtomicBool> {
        &self.running
    }

    pub fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        *lock(&self.vcpu_threads) = threads;
    }

    pub fn set_api_stats(&self, stats: ApiStats) {
        *lock(&self.api_stats) = Some(stats);
    }

    /// The main loop waits on this for host requests.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn request(&self) -> Option<HostRequest> {
        let _ = self.wake.read();
        lock(&self.run).request
    }

    pub fn state(&self) -> VmState {
        lock(&self.run).state
    }

    /// The VM is ending: vCPUs must not park any more, and parked ones must leave.
    pub fn end(&self) {
        self.running.store(false, Ordering::Release);
        lock(&self.run).state = VmState::Stopped;
        // From here on the threads may be joined: forget their ids, so a pause still
        // kicking never signals a thread that is gone (kick_vcpus holds this lock).
        lock(&self.vcpu_threads).clear();
        let _g = lock(&self.gate.inner);
        self.gate.changed.notify_all();
    }

    /// Called by each vCPU thread before it enters the guest: parks while a pause is asked.
    /// Returns whether the vCPU may still run (false once the VM is ending).
    #[must_use]
    pub fn wait_if_paused(&self, vcpu: &mut Vcpu) -> bool {
        if !self.gate.requested.load(Ordering::Acquire) {
            return self.running.load(Ordering::Acquire);
        }
        let mut g = lock(&self.gate.inner);
        if !g.requested {
            return self.running.load(Ordering::Acquire);
        }
        // Before reporting parked: a pause is where snapshots are taken, and the state must
        // include the result of the exit this thread just handled.
        if let Err(e) = vcpu.complete_pending_exit() {
            tracing::warn!("vCPU {}: {e}", vcpu.index());
        }
        g.parked += 1;
        self.gate.changed.notify_all();
        // Tells the guest (through kvmclock's PVCLOCK_GUEST_STOPPED) that the host stopped
        // it, so its soft-lockup watchdog does not blame itself. Fails harmlessly when the
        // guest does not use kvmclock.
        let _ = vcpu.fd().kvmclock_ctrl();
        let mut seen = g.save_generation;
        while g.requested && self.running.load(Ordering::Acquire) {
            if g.save_generation != seen {
                seen = g.save_generation;
                let state = vcpu.save().map_err(|e| e.to_string());
                if let Some(slot) = g.saved.get_mut(vcpu.index() as usize) {
                    *slot = Some(state);
                }
                self.gate.changed.notify_all();
                continue;
            }
            g = self.gate.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
        self.gate.changed.notify_all();
        self.running.load(Ordering::Acquire)
    }

    /// Writes the whole machine to `dir` (created if missing): pauses it if it runs, saves
    /// every vCPU, the in-kernel irqchip/PIT/clock, every device and guest memory, then
    /// resumes it, or stops it when `stop_after`.
    ///
    /// The API claims the VM first ([`VmApi::begin_snapshot`]); a snapshot not claimed
    /// that way claims it here.
    pub fn snapshot(&self, dir: &Path, stop_after: bool) -> Result<SnapshotReport, ApiError> {
        self.snapshotting.store(true, Ordering::Release);
        let _in_progress = SnapshotInProgress(&self.snapshotting);
        let started = Instant::now();
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::bad_request(format!("cannot create {}: {e}", dir.display())))?;
        let was_running = match self.state() {
            VmState::Running => {
                self.pause()?;
                true
            }
            VmState::Paused => false,
            other => {
                return Err(ApiError::conflict(format!(
                    "cannot snapshot: the VM is {}",
                    other.as_str()
                )))
            }
        };
        // Device threads stop between requests, so every request taken from a ring is
        // completed (or put back) and the rings' indices are final. Storage that does not
        // finish what the guest asked of it in time fails the snapshot rather than hang
        // it; the devices stopped so far start again below.
        let quiesced = self
            .sources
            .virtio
            .iter()
            .try_for_each(|f| lock(f).quiesce(QUIESCE_TIMEOUT))
            .map_err(|e| ApiError::unavailable(format!("cannot snapshot now: {e}")));
        let result = quiesced.and_then(|()| self.write_snapshot(dir));
        if !(stop_after && result.is_ok()) {
            for f in &self.sources.virtio {
                lock(f).resume();
            }
        }
        let paused_for = started.elapsed();
        // vmon may have been told to exit meanwhile (a signal): then the VM is no longer
        // paused, there is nothing to resume, and a snapshot that completed still stands.
        let ended = self.state() != VmState::Paused;
        if stop_after && result.is_ok() && !ended {
            self.stop()?;
        } else if was_running && !ended {
            self.resume()?;
        }
        let (memory_bytes_written, state_bytes) = result?;
        Ok(SnapshotReport {
            dir: dir.to_path_buf(),
            memory_bytes_written,
            state_bytes,
            paused_ms: paused_for.as_secs_f64() * 1000.0,
            stopped: stop_after || ended,
        })
    }

    fn write_snapshot(&self, dir: &Path) -> Result<(u64, u64), ApiError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            ApiError::internal(format!("snapshot: {what}: {e}"))
        };
        let vcpus = self.save_vcpus()?;
        let vm = vmon_hypervisor::vm_state(&self.vm).map_err(|e| fail("VM state", &e))?;
        let s = &self.sources;
        let memory_file = new_memory_file_name();
        let snapshot = MachineSnapshot {
            config: self.config.clone(),
            memory_file: memory_file.clone(),
            memory_bytes: self.memory_mib << 20,
            vm,
            vcpus,
            com1: lock(&s.com1).save().map_err(|e| fail("COM1", &e))?,
            com2: lock(&s.com2).save().map_err(|e| fail("COM2", &e))?,
            i8042: lock(&s.i8042).save().map_err(|e| fail("i8042", &e))?,
            rtc: lock(&s.rtc).save().map_err(|e| fail("RTC", &e))?,
            pm: lock(&s.pm).save().map_err(|e| fail("ACPI PM", &e))?,
            pci: match lock(&s.pci).save() {
                Ok(p) => p,
                Err(never) => match never {},
            },
            virtio: s
                .virtio
                .iter()
                .map(|f| lock(f).save())
                .collect::<Result<_, _>>()
                .map_err(|e| fail("virtio device", &e))?,
        };
        let memory_path = dir.join(&memory_file);
        {
            let mut files = lock(&self.snapshot_files);
            if files.abandoned {
                return Err(ApiError::unavailable("vmon is exiting".into()));
            }
            files.memory = Some(memory_path.clone());
        }
        let forget = |files: &mut SnapshotFiles| {
            if let Some(path) = files.memory.take() {
                remove_memory_file(&path);
            }
        };
        let memory =
            vmon_memory::save_guest_memory_unless(&s.memory, &memory_path, &self.snapshot_cancel)
                .map_err(|e| {
                let mut files = lock(&self.snapshot_files);
                if files.abandoned {
                    // The exit removed the file under the writer's feet: that is the news.
                    return ApiError::unavailable("snapshot abandoned: vmon is exiting".into());
                }
                forget(&mut files);
                fail("guest memory", &e)
            })?;
        // The state file last: a directory with a state file has its complete memory file.
        // It is written under the lock, so an exit either waits for it or comes first (and
        // has removed the memory file already).
        let state_path = dir.join(STATE_FILE);
        {
            let mut files = lock(&self.snapshot_files);
            if files.abandoned {
                return Err(ApiError::unavailable(
                    "snapshot abandoned: vmon is exiting".into(),
                ));
            }
            if let Err(e) = vmon_state::file::write_state(&state_path, STATE_KIND, &snapshot) {
                forget(&mut files);
                return Err(fail("state file", &e));
            }
            files.memory = None;
        }
        // Memory files of earlier snapshots into this directory are now unreferenced, and
        // so are the temporary files of any that never finished (vmon killed meanwhile). A
        // restored VM still mapping one keeps its pages (the inode lives on).
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let memory = name.strip_prefix('.').unwrap_or(&name);
                if memory.starts_with(MEMORY_FILE_PREFIX) && name != memory_file.as_str() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let state_bytes = std::fs::metadata(&state_path).map_or(0, |m| m.len());
        Ok((memory.bytes_written, state_bytes))
    }

    /// Called as vmon exits: a snapshot still being written will not be finished, so its
    /// memory file is removed (the directory keeps whatever complete snapshot it had).
    /// Returns the removed file.
    pub fn abandon_snapshot(&self) -> Option<std::path::PathBuf> {
        let mut files = lock(&self.snapshot_files);
        files.abandoned = true;
        self.snapshot_cancel.store(true, Ordering::Relaxed);
        let path = files.memory.take()?;
        remove_memory_file(&path);
        Some(path)
    }

    /// Every vCPU's state, from a paused VM (each parked vCPU thread saves its own).
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, ApiError> {
        if self.state() != VmState::Paused {
            return Err(ApiError::conflict("the VM must be paused".into()));
        }
        let n = self.vcpu_stats.len();
        let mut g = lock(&self.gate.inner);
        g.saved = (0..n).map(|_| None).collect();
        g.save_generation += 1;
        self.gate.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while g.saved.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.running.load(Ordering::Acquire) {
                return Err(ApiError::internal(
                    "the vCPUs did not report their state".into(),
                ));
            }
            g = self
                .gate
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::take(&mut g.saved)
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(ApiError::internal(format!("saving vCPU {i}: {e}"))),
                None => Err(ApiError::internal(format!("vCPU {i} did not report"))),
            })
            .collect()
    }

    fn kick_vcpus(&self) {
        for &t in lock(&self.vcpu_threads).iter() {
            // SAFETY: the ids belong to live vCPU threads: `end` empties this list, under
            // the lock held here, before any of them is joined; the kick signal's handler
            // does nothing.
            unsafe { libc::pthread_kill(t, signals::vcpu_kick_signal()) };
        }
    }

    pub fn pause(&self) -> Result<VmState, ApiError> {
        let _op = lock(&self.ops);
        match self.state() {
            VmState::Paused => return Ok(VmState::Paused),
            VmState::Running => {}
            other => {
                return Err(ApiError::conflict(format!(
                    "cannot pause: the VM is {}",
                    other.as_str()
                )))
            }
        }
        if lock(&self.vcpu_threads).is_empty() {
            return Err(ApiError::conflict(
                "cannot pause: the vCPUs are not running".into(),
            ));
        }
        let stopping = || ApiError::conflict("cannot pause: the VM is stopping".into());
        let vcpus = self.vcpu_stats.len();
        {
            let mut g = lock(&self.gate.inner);
            g.requested = true;
            self.gate.requested.store(true, Ordering::Release);
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            while g.parked < vcpus {
                let ending = !self.running.load(Ordering::Acquire);
                if Instant::now() >= deadline || ending {
                    g.requested = false;
                    self.gate.requested.store(false, Ordering::Release);
                    self.gate.changed.notify_all();
                    if ending {
                        return Err(stopping());
                    }
                    return Err(ApiError::internal(format!(
                        "{} of {vcpus} vCPUs did not stop within {} s",
                        vcpus - g.parked,
                        PAUSE_TIMEOUT.as_secs()
                    )));
                }
                drop(g);
                self.kick_vcpus();
                g = lock(&self.gate.inner);
                if g.parked < vcpus {
                    g = self
                        .gate
                        .changed
                        .wait_timeout(g, KICK_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        let clock = match self.vm.get_clock() {
            Ok(clock) => Some(clock),
            Err(e) => {
                tracing::warn!("pause: cannot read kvmclock ({e}); the guest clock will jump");
                None
            }
        };
        let mut run = lock(&self.run);
        if run.state != VmState::Running {
            // The VM ended (or was told to stop) while the vCPUs were parking.
            drop(run);
            let mut g = lock(&self.gate.inner);
            g.requested = false;
            self.gate.requested.store(false, Ordering::Release);
            self.gate.changed.notify_all();
            return Err(stopping());
        }
        run.paused_clock = clock;
        run.state = VmState::Paused;
        tracing::info!("VM paused");
        Ok(VmState::Paused)
    }

    pub fn resume(&self) -> Result<VmState, ApiError> {
        let _op = lock(&self.ops);
        let mut run = lock(&self.run);
        match run.state {
            VmState::Paused => {}
            VmState::Running => return Ok(VmState::Running),
            other => {
                return Err(ApiError::conflict(format!(
                    "cannot resume: the VM is {}",
                    other.as_str()
                )))
            }
        }
        self.resume_locked(&mut run);
        Ok(run.state)
    }

    fn resume_locked(&self, run: &mut RunState) {
        if let Some(clock) = run.paused_clock.take() {
            // Only the clock value: with KVM_CLOCK_REALTIME set, KVM would add the time
            // spent paused, which is the jump we want to hide.
            let restored = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            if let Err(e) = self.vm.set_clock(&restored) {
                tracing::warn!("resume: cannot restore kvmclock ({e}); the guest clock jumps");
            }
        }
        {
            let mut g = lock(&self.gate.inner);
            g.requested = false;
            self.gate.requested.store(false, Ordering::Release);
            self.gate.changed.notify_all();
        }
        run.state = VmState::Running;
        tracing::info!("VM resumed");
    }

    /// Presses the power button and gives the guest `timeout` to power off; returns the time
    /// it really has (an earlier, shorter deadline stands).
    pub fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError> {
        if timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(ApiError::bad_request(format!(
                "timeout_s: at most {}",
                MAX_SHUTDOWN_TIMEOUT.as_secs()
            )));
        }
        let _op = lock(&self.ops);
        let mut run = lock(&self.run);
        match run.state {
            VmState::Stopped => return Err(ApiError::conflict("the VM is stopping".into())),
            // A paused guest cannot hear the button.
            VmState::Paused => self.resume_locked(&mut run),
            _ => {}
        }
        run.state = VmState::ShuttingDown;
        let deadline = Instant::now() + timeout;
        // A second request may only bring the deadline closer.
        run.request = match run.request {
            Some(HostRequest::Stop) => Some(HostRequest::Stop),
            Some(HostRequest::ShutdownBy { deadline: d, .. }) if d <= deadline => run.request,
            _ => Some(HostRequest::ShutdownBy { deadline, timeout }),
        };
        lock(&self.power).press_power_button();
        tracing::info!(timeout_s = timeout.as_secs_f64(), "power button pressed");
        let _ = self.wake.write(1);
        Ok(match run.request {
            Some(HostRequest::ShutdownBy { deadline: d, .. }) => {
                d.saturating_duration_since(Instant::now())
            }
            _ => Duration::ZERO,
        })
    }

    pub fn stop(&self) -> Result<(), ApiError> {
        let mut run = lock(&self.run);
        run.request = Some(HostRequest::Stop);
        // Parked vCPUs stay parked until `end` releases them to exit; the clock no longer
        // matters.
        run.paused_clock = None;
        run.state = VmState::Stopped;
        let _ = self.wake.write(1);
        Ok(())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn counters(&self) -> Counters {
        Counters {
            uptime_s: self.uptime().as_secs_f64(),
            vcpus: self
                .vcpu_stats
                .iter()
                .enumerate()
                .map(|(i, s)| VcpuCounters {
                    index: i as u32,
                    cpu_time_s: s.cpu_time_s(),
                    exits: s.exits(),
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceCounters {
                    name: d.name.clone(),
                    kind: d.kind.to_string(),
                    counters: d
                        .metrics
                        .snapshot()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                })
                .collect(),
            api: lock(&self.api_stats)
                .as_ref()
                .map(|f| f())
                .unwrap_or_default(),
        }
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.state(),
            uptime_s: self.uptime().as_secs_f64(),
            vcpus: self.vcpu_stats.len() as u32,
            memory_mib: self.memory_mib,
            pid: std::process::id(),
            config: self.config.clone(),
        }
    }
}

impl VmControl {
    /// Pause, resume, shutdown and stop wait while a snapshot is written: they would
    /// change the VM's state under it.
    fn refuse_during_snapshot(&self, what: &str) -> Result<(), ApiError> {
        if self.snapshotting.load(Ordering::Acquire) {
            return Err(ApiError::conflict(format!(
                "cannot {what}: a snapshot is being written; try again when it is done"
            )));
        }
        Ok(())
    }
}

/// The API's view of the VM is exactly this control block.
impl VmApi for VmControl {
    fn info(&self) -> VmInfo {
        VmControl::info(self)
    }
    fn pause(&self) -> Result<VmState, ApiError> {
        self.refuse_during_snapshot("pause")?;
        VmControl::pause(self)
    }
    fn resume(&self) -> Result<VmState, ApiError> {
        self.refuse_during_snapshot("resume")?;
        VmControl::resume(self)
    }
    fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError> {
        self.refuse_during_snapshot("shut down")?;
        VmControl::shutdown(self, timeout)
    }
    fn stop(&self) -> Result<(), ApiError> {
        self.refuse_during_snapshot("stop")?;
        VmControl::stop(self)
    }
    fn counters(&self) -> Counters {
        VmControl::counters(self)
    }
    fn begin_snapshot(&self) -> Result<(), ApiError> {
        if self.snapshotting.swap(true, Ordering::AcqRel) {
            return Err(ApiError::conflict(
                "a snapshot is already being written".into(),
            ));
        }
        Ok(())
    }
    fn snapshot(
        &self,
        request: &vmon_api::model::SnapshotRequest,
    ) -> Result<serde_json::Value, ApiError> {
        let report = VmControl::snapshot(self, &request.dir, request.stop)?;
        serde_json::to_value(report).map_err(|e| ApiError::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_survives_odd_thread_names() {
        let stat = "4242 (vcpu 0) (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(thread_cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(thread_cpu_seconds("garbage", 100.0), None);
        assert_eq!(thread_cpu_seconds("1 (x) S 1", 100.0), None);
    }

    #[test]
    fn exit_reason_names_line_up_with_their_indices() {
        for (i, (reason, _)) in EXIT_REASONS.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        let s = VcpuStats::default();
        s.count(ExitReason::IoOut);
        s.count(ExitReason::IoOut);
        s.count(ExitReason::Hlt);
        let exits = s.exits();
        assert_eq!(exits["io_out"], 2);
        assert_eq!(exits["hlt"], 1);
        assert_eq!(exits["mmio_read"], 0);
    }
}
