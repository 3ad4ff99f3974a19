//! Building a machine from a [`VmConfig`] and running it.

use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmon_boot::acpi::PmRegisters;
use vmon_boot::mptable::{self, CpuSignature};
use vmon_boot::BootSpec;
use vmon_devices::bus::lock;
use vmon_devices::legacy::exit_port::{ExitPort, EXIT_PORT};
use vmon_devices::legacy::i8042::I8042;
use vmon_devices::legacy::power::{self, IrqLine, PmControl, PmWiring};
use vmon_devices::legacy::rtc::Rtc;
use vmon_devices::legacy::serial::{Output, SerialPort};
use vmon_devices::legacy::{self, COM1, COM2, UART_PORTS};
use vmon_devices::pci::{self, PciConfigIo};
use vmon_devices::{Bus, BusDevice, GuestStop, StopSignal};
use vmon_hypervisor::{CpuProfile, Hypervisor, Vcpu, Vm};
use vmon_memory::{create_guest_memory, GuestMemory, HostMemory, MemoryLayout};

use vmon_virtio::block::{Block, Disk};
use vmon_virtio::net::{MacAddr, Net};
use vmon_virtio::rng::Rng;
use vmon_virtio::tap::Tap;
use vmon_virtio::vsock::{Vsock, VsockBackend};
use vmon_virtio::VirtioDevice;

use vmon_api::router::Router;
use vmon_api::server::ApiServer;

use crate::config::VmConfig;
use crate::control::{ControlParts, DeviceEntry, HostRequest, VmControl};
use crate::exit::{VmOutcome, VmmError};
use crate::pci_devices::PciSpace;
use crate::signals::{self, StopSignals};
use crate::snapshot::{MachineSnapshot, SnapshotSources};
use crate::terminal::RawTerminal;
use crate::vcpu_loop::{self, OutcomeSlot, VcpuContext};
use vmon_state::Persist;

/// ISA IRQ of the i8042 keyboard port.
const I8042_IRQ: u32 = 1;
/// Linux records a warm reboot (which `reboot=panic_warm` requests on panic) by writing this
/// magic at physical 0x472, the BIOS data area's reset flag, just before it resets.
const RESET_FLAG_ADDRESS: u64 = 0x472;
const RESET_FLAG_WARM: u16 = 0x1234;
/// How long vCPU threads get to leave KVM_RUN before we stop waiting for them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Console escape: Ctrl-A, then x quits (as in QEMU); Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;

/// The SCI: a level-triggered line on the in-kernel IOAPIC/PIC.
struct KvmIrqLine {
    vm: Arc<kvm_ioctls::VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            tracing::warn!(gsi = self.gsi, "KVM_IRQ_LINE: {e}");
        }
    }
}

pub struct Machine {
    // Field order is drop order: vCPUs and the VM go before the memory they map.
    vcpus: Vec<Vcpu>,
    control: Arc<VmControl>,
    vm: Vm,
    _hypervisor: Hypervisor,
    memory: GuestMemory,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    console: Arc<Mutex<SerialPort>>,
    stop: Arc<StopSignal>,
    console_input: bool,
    /// Bound before the guest starts (so a bad path fails early), served once it runs.
    api: Option<ApiServer>,
    metrics_file: Option<MetricsFile>,
}

fn host(what: &'static str) -> impl FnOnce(io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

/// How a machine gets its first state: a fresh boot, or a snapshot.
enum Start<'a> {
    Boot,
    Restore {
        snapshot: &'a MachineSnapshot,
        memory: GuestMemory,
    },
}

impl Machine {
    /// Creates the VM, loads the guest and wires the devices; nothing runs yet.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        Self::build(config, Start::Boot)
    }

    /// Rebuilds a machine from a snapshot: `memory` is the snapshot's guest RAM (mapped
    /// copy-on-write), every vCPU and device gets its saved state, nothing is loaded or
    /// booted. Nothing runs yet.
    pub fn restore(
        config: &VmConfig,
        snapshot: &MachineSnapshot,
        memory: GuestMemory,
    ) -> Result<Self, VmmError> {
        Self::build(config, Start::Restore { snapshot, memory })
    }

    fn build(config: &VmConfig, start: Start) -> Result<Self, VmmError> {
        // Everything that can be judged from the configuration alone is, before KVM is
        // opened or memory mapped: a typo gets its own message, not a KVM error.
        if config.cpus == 0 {
            return Err(VmmError::NoCpus(0));
        }
        let layout = MemoryLayout::new(config.memory)?;
        if let Some(host) = HostMemory::read() {
            if config.memory > host.limit() {
                return Err(VmmError::MoreThanHost {
                    size: config.memory,
                    ram: host.ram,
                    swap: host.swap,
                });
            }
        }
        if let Start::Boot = start {
            vmon_boot::kernel::check(&config.kernel)?;
            if let Some(initrd) = &config.initrd {
                vmon_boot::initrd::check(initrd)?;
            }
        }
        let disks = config
            .disks
            .iter()
            .map(Disk::open)
            .collect::<Result<Vec<_>, _>>()?;
        let taps = config
            .nets
            .iter()
            .map(|n| Tap::open(&n.tap))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock = config
            .vsock
            .as_ref()
            .map(|v| VsockBackend::bind(v).map(|b| (v.cid, b)))
            .transpose()?;
        let hypervisor = Hypervisor::open()?;
        let max_cpus = (hypervisor.max_vcpus() as u32).min(mptable::MAX_CPUS);
        if config.cpus > max_cpus {
            return Err(VmmError::TooManyCpus {
                requested: config.cpus,
                max: max_cpus,
            });
        }
        // A restored guest keeps the layout it was built with, on a host that could back it.
        match start {
            Start::Boot => layout.check_physical_limit(hypervisor.guest_phys_bits()?)?,
            Start::Restore { .. } => layout.check_physical_limit(Hypervisor::host_phys_bits())?,
        }
        let (memory, saved) = match start {
            Start::Boot => (
                create_guest_memory(&layout, config.memory_backing).map_err(VmmError::MapMemory)?,
                None,
            ),
            Start::Restore { snapshot, memory } => {
                snapshot.check_fits(config)?;
                (memory, Some(snapshot))
            }
        };
        let vm = Vm::create(&hypervisor, &memory)?;

        // A restored guest has its kernel, tables and everything else in its memory already,
        // and its CPUID in the snapshot.
        let supported = match saved {
            Some(_) => None,
            None => Some(hypervisor.supported_cpuid()?),
        };
        let leaf1 = supported.and_then(|s| s.as_slice().iter().find(|e| e.function == 1));
        let boot = match supported {
            None => None,
            Some(_) => Some(vmon_boot::prepare(
                &memory,
                &layout,
                &BootSpec {
                    kernel: &config.kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &config.cmdline,
                    cpus: config.cpus,
                    cpu_signature: CpuSignature {
                        signature: leaf1.map_or(0, |e| e.eax),
                        features: leaf1.map_or(0, |e| e.edx),
                    },
                    pm: PmRegisters {
                        pm1a_event_port: power::PM_PORTS.0,
                        pm1a_control_port: power::PM_PORTS.0 + power::PM1A_CONTROL_OFFSET,
                        sci_irq: power::SCI_IRQ,
                        s5_type: power::S5_SLEEP_TYPE,
                    },
                },
            )?),
        };

        let stop = Arc::new(StopSignal::new().map_err(host("creating an eventfd"))?);
        let irq = |gsi: u32| -> Result<EventFd, VmmError> {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(host("creating an eventfd"))?;
            vm.fd()
                .register_irqfd(&evt, gsi)
                .map_err(|e| VmmError::Devices(format!("KVM_IRQFD for IRQ {gsi}: {e}")))?;
            Ok(evt)
        };
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            VmmError::Snapshot(format!("restoring the {what}: {e}"))
        };
        let uart = |gsi: u32, out: Output, state| -> Result<SerialPort, VmmError> {
            Ok(match state {
                None => SerialPort::new(irq(gsi)?, out),
                Some(s) => SerialPort::restore((irq(gsi)?, out), s).map_err(|e| bad("UART", &e))?,
            })
        };
        let console = Arc::new(Mutex::new(uart(
            COM1.1,
            Box::new(io::stdout()),
            saved.map(|s| &s.com1),
        )?));
        // COM2 carries the guest's stderr (and, in command mode, its kernel log) to ours.
        let com2 = Arc::new(Mutex::new(uart(
            COM2.1,
            Box::new(io::stderr()),
            saved.map(|s| &s.com2),
        )?));
        let i8042 = match saved {
            None => I8042::new(stop.clone(), Some(irq(I8042_IRQ)?)),
            Some(s) => I8042::restore((stop.clone(), Some(irq(I8042_IRQ)?)), &s.i8042)
                .map_err(|e| bad("i8042", &e))?,
        };
        let i8042 = Arc::new(Mutex::new(i8042));
        let rtc = match saved {
            None => Rtc::default(),
            Some(s) => Rtc::restore((), &s.rtc).map_err(|e| bad("RTC", &e))?,
        };
        let rtc = Arc::new(Mutex::new(rtc));

        let mut pio = Bus::new();
        let mut add = |dev: Arc<Mutex<dyn BusDevice>>, port: u16, len: u64| {
            pio.insert(dev, u64::from(port), len)
                .map_err(|e| VmmError::Devices(e.to_string()))
        };
        add(console.clone(), COM1.0, UART_PORTS)?;
        add(com2.clone(), COM2.0, UART_PORTS)?;
        // One device spans 0x60..=0x64 so the data and command ports share state.
        add(i8042.clone(), legacy::I8042_DATA, 5)?;
        add(rtc.clone(), legacy::RTC_PORT, 2)?;
        add(
            Arc::new(Mutex::new(ExitPort::new(stop.clone()))),
            EXIT_PORT,
            1,
        )?;
        let pm_wiring = PmWiring {
            stop: stop.clone(),
            sci: Box::new(KvmIrqLine {
                vm: vm.shared_fd(),
                gsi: u32::from(power::SCI_IRQ),
            }),
        };
        let power = match saved {
            None => PmControl::new(pm_wiring),
            Some(s) => PmControl::restore(pm_wiring, &s.pm).map_err(|e| bad("ACPI PM", &e))?,
        };
        let power = Arc::new(Mutex::new(power));
        add(power.clone(), power::PM_PORTS.0, power::PM_PORTS.1)?;
        let mut pci_root = match saved {
            None => PciConfigIo::new(),
            Some(s) => match PciConfigIo::restore((), &s.pci) {
                Ok(p) => p,
                Err(never) => match never {},
            },
        };
        let mut mmio = Bus::new();
        let mut pci_space = PciSpace::new()?;
        let mut virtio: Vec<(String, &'static str, Box<dyn VirtioDevice>)> = Vec::new();
        for (i, disk) in disks.into_iter().enumerate() {
            let name = format!("disk{i}");
            virtio.push((name.clone(), "block", Box::new(Block::new(disk, name))));
        }
        for (i, (tap, opts)) in taps.into_iter().zip(&config.nets).enumerate() {
            let mac = opts.mac.unwrap_or_else(MacAddr::random);
            tracing::info!("net{i}: tap '{}', guest MAC {mac}", tap.name());
            let name = format!("net{i}");
            let net = Net::new(Box::new(tap), mac, name.clone()).with_limits(opts.limits);
            virtio.push((name, "net", Box::new(net)));
        }
        if let Some((cid, backend)) = vsock {
            virtio.push(("vsock".into(), "vsock", Box::new(Vsock::new(cid, backend))));
        }
        if config.rng {
            virtio.push(("rng".into(), "rng", Box::new(Rng::new())));
        }
        if let Some(s) = saved {
            if s.virtio.len() != virtio.len() {
                return Err(VmmError::Snapshot(format!(
                    "the snapshot has {} virtio devices, the configuration {}",
                    s.virtio.len(),
                    virtio.len()
                )));
            }
        }
        let mut device_entries = Vec::with_capacity(virtio.len());
        let mut functions = Vec::with_capacity(virtio.len());
        for (i, (name, kind, device)) in virtio.into_iter().enumerate() {
            device_entries.push(DeviceEntry {
                name,
                kind,
                metrics: device.metrics(),
            });
            let state = saved.map(|s| &s.virtio[i]);
            functions.push(pci_space.attach(
                &vm,
                &memory,
                &mut pci_root,
                &mut mmio,
                device,
                state,
            )?);
        }
        let pci_root = Arc::new(Mutex::new(pci_root));
        add(
            pci_root.clone(),
            pci::CONFIG_ADDRESS_PORT,
            pci::CONFIG_PORTS,
        )?;

        let profile = CpuProfile {
            vcpus: config.cpus,
            nested: config.nested,
            tsc_deadline: hypervisor.has_tsc_deadline(),
            brand: vmon_hypervisor::cpuid::host_brand(),
        };
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for index in 0..config.cpus {
            let vcpu = vm.create_vcpu(index)?;
            let vcpu = match (saved, supported) {
                (Some(s), _) => Vcpu::restore(vcpu, &s.vcpus[index as usize])?,
                (None, supported) => {
                    let boot = if index == 0 { boot.as_ref() } else { None };
                    let supported = supported.expect("a boot asks KVM for its CPUID");
                    vcpu.configure(&profile, supported, boot)?;
                    vcpu
                }
            };
            vcpus.push(vcpu);
        }
        // The VM-wide state last: kvmclock is set once every vCPU exists.
        let vm = match saved {
            Some(s) => Vm::restore(vm, &s.vm)?,
            None => vm,
        };
        // Restored virtio functions start once the interrupt controllers hold their state,
        // so an interrupt a device raises on resume is not overwritten.
        if saved.is_some() {
            for f in &functions {
                lock(f).resume();
            }
        }

        let api = config
            .api_socket
            .as_deref()
            .map(ApiServer::bind)
            .transpose()
            .map_err(VmmError::Api)?;
        let metrics_file = config
            .metrics_file
            .as_deref()
            .map(|p| MetricsFile::open(p, config.metrics_interval))
            .transpose()?;
        let control = VmControl::new(ControlParts {
            vm: vm.shared_fd(),
            vcpus: vcpus.len(),
            devices: device_entries,
            power: power.clone(),
            config: config.spec.clone(),
            memory_mib: config.memory.bytes() >> 20,
            snapshot: SnapshotSources {
                com1: console.clone(),
                com2,
                i8042,
                rtc,
                pm: power,
                pci: pci_root,
                memory: memory.clone(),
                virtio: functions,
            },
        })
        .map_err(host("creating an eventfd"))?;

        Ok(Machine {
            vcpus,
            control: Arc::new(control),
            vm,
            _hypervisor: hypervisor,
            memory,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            console,
            stop,
            console_input: config.console_input,
            api,
            metrics_file,
        })
    }

    /// The handle the management API and embedders operate the VM through.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Runs the guest until it stops or the host stops it.
    pub fn run(mut self) -> Result<VmOutcome, VmmError> {
        let host_signals = StopSignals::new().map_err(host("setting up signal handling"))?;
        signals::install_vcpu_kick_handler().map_err(host("setting up signal handling"))?;
        let running = self.control.running().clone();
        let outcome = Arc::new(OutcomeSlot::new().map_err(host("creating an eventfd"))?);

        // Raw mode before the first guest instruction, so no early keystroke is cooked.
        let terminal = if self.console_input {
            RawTerminal::enter()
        } else {
            None
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                memory: self.memory.clone(),
                running: running.clone(),
                outcome: outcome.clone(),
                control: self.control.clone(),
                stats: self.control.vcpu_stats(vcpu.index() as usize),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || vcpu_loop::run(vcpu, ctx));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    stop_vcpus(&self.control, threads);
                    return Err(VmmError::Host {
                        what: "starting a vCPU thread",
                        source: e,
                    });
                }
            }
        }
        self.control
            .set_vcpu_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        let api = match self.api.take() {
            Some(server) => {
                let stats = server.stats();
                self.control
                    .set_api_stats(Arc::new(move || stats.snapshot()));
                match server.spawn(Arc::new(Router::new(self.control.clone()))) {
                    Ok(handle) => Some(handle),
                    Err(e) => {
                        stop_vcpus(&self.control, threads);
                        return Err(VmmError::Api(e));
                    }
                }
            }
            None => None,
        };

        let result = self.main_loop(&host_signals, &outcome, terminal.is_some());
        // A snapshot still being written will not be finished: vmon is to stop now. Its
        // client is told so while the API server shuts down.
        if let Some(file) = self.control.abandon_snapshot() {
            tracing::warn!(
                "a snapshot was still being written; removed its memory file {}",
                file.display()
            );
        }
        stop_vcpus(&self.control, threads);
        drop(api);
        drop(terminal);
        let _ = &self.vm;
        result
    }

    fn main_loop(
        &self,
        host_signals: &StopSignals,
        outcome: &OutcomeSlot,
        raw_console: bool,
    ) -> Result<VmOutcome, VmmError> {
        let mut stdin_open = self.console_input;
        let mut escape_pending = false;
        let mut buf = [0u8; 4096];
        let mut shutdown_by: Option<(Instant, Duration)> = None;
        let mut next_metrics = self
            .metrics_file
            .as_ref()
            .map(|m| Instant::now() + m.interval);
        loop {
            let now = Instant::now();
            if let Some((deadline, timeout)) = shutdown_by {
                if now >= deadline {
                    return Ok(VmOutcome::ShutdownTimedOut(timeout));
                }
            }
            if let (Some(at), Some(m)) = (next_metrics, &self.metrics_file) {
                if now >= at {
                    m.write(&self.control);
                    // Keep the cadence, but after a long stall start afresh from now
                    // rather than writing a burst of catch-up records.
                    let next = at + m.interval;
                    next_metrics = Some(if next <= now { now + m.interval } else { next });
                }
            }
            let wake_at = [shutdown_by.map(|(d, _)| d), next_metrics]
                .into_iter()
                .flatten()
                .min();
            let timeout_ms = wake_at.map_or(-1, |at| {
                let left = at.saturating_duration_since(Instant::now());
                // Round up so we do not wake a moment early and spin.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            let mut fds = vec![
                pollfd(host_signals.raw_fd()),
                pollfd(self.stop.eventfd().as_raw_fd()),
                pollfd(outcome.eventfd().as_raw_fd()),
                pollfd(self.control.wake_fd().as_raw_fd()),
            ];
            if stdin_open {
                fds.push(pollfd(libc::STDIN_FILENO));
            }
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VmmError::Host {
                    what: "waiting for events",
                    source: err,
                });
            }
            if fds[0].revents != 0 {
                if let Some(signal) = host_signals.read() {
                    return Ok(VmOutcome::Stopped { signal });
                }
            }
            if fds[1].revents != 0 {
                let _ = self.stop.eventfd().read();
                match self.stop.pending() {
                    Some(GuestStop::ExitStatus(status)) => {
                        return Ok(VmOutcome::ExitStatus(status))
                    }
                    Some(GuestStop::Reboot) => return Ok(self.classify_reboot()),
                    Some(GuestStop::PowerOff) => return Ok(VmOutcome::PowerOff),
                    None => {}
                }
            }
            if fds[2].revents != 0 {
                let _ = outcome.eventfd().read();
                if let Some(o) = outcome.take() {
                    return Ok(o);
                }
            }
            if fds[3].revents != 0 {
                match self.control.request() {
                    Some(HostRequest::Stop) => return Ok(VmOutcome::StoppedByApi),
                    Some(HostRequest::ShutdownBy { deadline, timeout }) => {
                        shutdown_by = Some((deadline, timeout));
                    }
                    None => {}
                }
            }
            if stdin_open && fds[4].revents != 0 {
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) => stdin_open = false,
                    Ok(n) => {
                        let mut input = Vec::with_capacity(n);
                        for &b in &buf[..n] {
                            if raw_console && escape_pending {
                                escape_pending = false;
                                match b {
                                    b'x' | b'X' => {
                                        return Ok(VmOutcome::Stopped {
                                            signal: libc::SIGINT,
                                        })
                                    }
                                    ESCAPE => input.push(ESCAPE),
                                    other => input.extend([ESCAPE, other]),
                                }
                            } else if raw_console && b == ESCAPE {
                                escape_pending = true;
                            } else {
                                input.push(b);
                            }
                        }
                        lock(&self.console).queue_input(&input);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => stdin_open = false,
                }
            }
        }
    }

    /// A reboot after `reboot=panic_warm` set the BIOS warm-reset flag is a kernel panic.
    fn classify_reboot(&self) -> VmOutcome {
        match self
            .memory
            .read_obj::<u16>(GuestAddress(RESET_FLAG_ADDRESS))
        {
            Ok(RESET_FLAG_WARM) => VmOutcome::Panic,
            _ => VmOutcome::Reboot,
        }
    }
}

const MAX_METRICS_INTERVAL: Duration = Duration::from_secs(86_400);

/// `--metrics-file`: the counters as one JSON object per line, every `interval`.
pub struct MetricsFile {
    file: Mutex<std::fs::File>,
    interval: Duration,
}

impl MetricsFile {
    fn open(path: &std::path::Path, interval: Duration) -> Result<Self, VmmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| VmmError::MetricsFile {
            path: path.to_path_buf(),
            source,
        };
        if interval.is_zero() || interval > MAX_METRICS_INTERVAL {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the interval must be 1 s to 1 day",
            )));
        }
        // Records are written from the main loop, which must never block: a FIFO or a
        // device whose reader stalls would take signals and API stops down with it. Only a
        // regular file will do (O_NONBLOCK so even opening a FIFO cannot hang).
        let not_regular = || {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ))
        };
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(not_regular());
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(err)?;
        if !file.metadata().map_err(err)?.is_file() {
            return Err(not_regular());
        }
        Ok(MetricsFile {
            file: Mutex::new(file),
            interval,
        })
    }

    fn write(&self, control: &VmControl) {
        let mut line = match serde_json::to_vec(&control.counters()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                return;
            }
        };
        line.push(b'\n');
        // One write per line, so a reader never sees half a record.
        if let Err(e) = std::io::Write::write_all(&mut *lock(&self.file), &line) {
            tracing::warn!("metrics file: {e}");
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Tells every vCPU thread to stop (waking paused ones) and kicks it out of KVM_RUN until
/// it has.
fn stop_vcpus(control: &VmControl, threads: Vec<JoinHandle<()>>) {
    control.end();
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    let mut left = threads;
    while !left.is_empty() && Instant::now() < deadline {
        for t in &left {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined, so
            // it is still valid; the kick signal has a no-op handler.
            unsafe { libc::pthread_kill(t.as_pthread_t(), signals::vcpu_kick_signal()) };
        }
        let (done, waiting): (Vec<_>, Vec<_>) = left.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        left = waiting;
        if !left.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    if !left.is_empty() {
        tracing::warn!(threads = left.len(), "vCPU threads did not stop in time");
    }
}
