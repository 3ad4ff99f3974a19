//! Argument parsing and the mapping from outcomes and errors to one line and an exit status.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use vmon_hypervisor::Hypervisor;
use vmon_memory::MemSize;
use vmon_vmm::config;
use vmon_vmm::config_file::{CpuSpec, DiskSpec, NetSpec, VmSpec, VsockSpec};
use vmon_vmm::{exit_codes, Machine, VmmError};

use crate::base64;
use crate::ctl::{self, CtlArgs};
use crate::kit;

/// Kernel parameters for every guest vmon boots by default: reboot through the i8042 (which
/// vmon sees); a panic reboots at once and marks itself with the BIOS warm-reset flag so vmon
/// can tell a panic from a reboot; no PS/2 mouse port; only errors on the console.
const BASE_CMDLINE: &str = "reboot=k,panic_warm panic=-1 i8042.noaux quiet";

#[derive(Parser, Debug)]
#[command(name = "vmon", version, about = "Run virtual machines on KVM", long_about = None)]
#[command(after_help = EXIT_STATUS_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level: error, warn, info, debug or trace (default: warn, or $RUST_LOG)
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM; with `-- CMD`, run CMD in the default guest and exit with its status
    Run(Box<RunArgs>),
    /// Build the default guest kit if needed and print its directory
    Kit {
        /// Rebuild even if a complete kit exists
        #[arg(long)]
        rebuild: bool,
    },
    /// Operate a running VM through its API socket
    Ctl(CtlArgs),
    /// Continue a VM from a snapshot (`vmon ctl snapshot DIR`) in this new process
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The snapshot directory
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Serve the management API on this Unix socket (the snapshot's own is not reused)
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write vmon's log here instead of stderr
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Back disk N (0 = vda) with FILE instead of the snapshot's path, e.g. a copy per
    /// clone; it must have the size the disk had. Repeatable
    #[arg(long = "disk-path", value_name = "N=FILE", value_parser = parse_index_value)]
    disk_paths: Vec<(usize, String)>,
    /// Attach network device N (0 = eth0) to tap NAME instead of the snapshot's. Repeatable
    #[arg(long = "tap", value_name = "N=NAME", value_parser = parse_index_value)]
    taps: Vec<(usize, String)>,
    /// Serve the vsock device's host side on this Unix socket instead of the snapshot's
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
}

/// `N=VALUE` for the per-device restore options.
fn parse_index_value(text: &str) -> Result<(usize, String), String> {
    let (n, value) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}': use N=VALUE, e.g. 0=/srv/clone1.img"))?;
    let n = n
        .parse()
        .map_err(|_| format!("'{n}' is not a device number (0, 1, ...)"))?;
    if value.is_empty() {
        return Err(format!("'{text}': the value is empty"));
    }
    Ok((n, value.to_string()))
}

#[derive(Args, Debug)]
struct RunArgs {
    /// VM configuration file (JSON, or TOML by extension); flags given as well override its
    /// values, and a repeatable flag (--disk, --net) replaces the file's whole list
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel image: bzImage or ELF vmlinux (default: the default guest's kernel)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (default: the default guest's initramfs when --kernel is not given)
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console and vmon's reboot/panic conventions)
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1]
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory: 512M, 2G, 1024 (MiB) [default: 512M]
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// Back guest RAM with transparent huge pages where the host allows (fewer nested page
    /// faults and TLB misses; memory is then allocated 2 MiB at a time) [default: on]
    #[arg(long, value_name = "on|off", value_parser = config::parse_on_off)]
    huge_pages: Option<bool>,
    /// CPU options: nested=on exposes VMX/SVM to the guest
    #[arg(long = "cpu", value_name = "OPTS", value_parser = config::parse_cpu_spec)]
    cpu: Option<CpuSpec>,
    /// A virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,direct=on][,poll_us=N]
    /// [,aio=io_uring|sync] plus rate limits (bps=RATE, bps_burst=BYTES, iops=N,
    /// iops_burst=N); repeat for more (the guest sees vda, vdb, ... in order). poll_us: the
    /// longest spin for the next request before the device sleeps (default 32, 0 never
    /// spins). aio: requests that wait for the storage go through io_uring, many at once
    /// (default), or one at a time (sync)
    #[arg(long = "disk", value_name = "SPEC", value_parser = config::parse_disk_spec)]
    disks: Vec<DiskSpec>,
    /// A virtio-net device on a host tap: tap=NAME[,mac=MAC] plus rate limits; repeat for
    /// more (eth0, eth1, ...). The tap must exist (`ip tuntap add NAME mode tap user $USER`)
    /// unless vmon may create it (CAP_NET_ADMIN); without mac= the guest gets a random
    /// 02:xx:... address
    #[arg(long = "net", value_name = "SPEC", value_parser = config::parse_net_spec)]
    nets: Vec<NetSpec>,
    /// Add a virtio-rng device fed from the host's getrandom
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: cid=N,socket=PATH. Guest connections to host port P go to the
    /// Unix socket PATH_P; host programs connect to PATH and write "CONNECT P\n"
    #[arg(long = "vsock", value_name = "SPEC", value_parser = config::parse_vsock_spec)]
    vsock: Option<VsockSpec>,
    /// Serve the management API (HTTP/1.1, JSON) on this Unix socket; see `vmon ctl`
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write vmon's log here instead of stderr (the guest's output never goes to the log)
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Append the counters (as `vmon ctl counters --json` shows them) to this file as JSON
    /// lines
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// Seconds between --metrics-file records, 1-86400 [default: 10]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    metrics_interval: Option<u64>,
    /// Command to run in the guest; its stdout becomes vmon's and its status vmon's
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

impl RunArgs {
    /// The flags as a spec, to lay over the configuration file's.
    fn to_spec(&self, log_level: Option<&str>) -> VmSpec {
        VmSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus,
            memory: self.memory,
            huge_pages: self.huge_pages,
            cpu: self.cpu,
            disks: (!self.disks.is_empty()).then(|| self.disks.clone()),
            nets: (!self.nets.is_empty()).then(|| self.nets.clone()),
            vsock: self.vsock.clone(),
            rng: self.rng.then_some(true),
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            api_socket: self.api_socket.clone(),
            log_level: log_level.map(str::to_string),
            log_file: self.log_file.clone(),
            metrics_file: self.metrics_file.clone(),
            metrics_interval_s: self.metrics_interval,
            ..VmSpec::default()
        }
    }
}

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0      the guest powered off or rebooted (or CMD succeeded)
  1-255  with `run -- CMD`: CMD's exit status
  64     bad command line or value      65  kernel/initrd is not a valid image
  66     kernel/initrd/disk unreadable  69  KVM is missing or unusable
  70     unexpected KVM exit (VMM fault) 71 the host refused memory, threads, a tap
  75     `vmon ctl shutdown` timed out: the guest ignored the power button and was stopped
  76     the guest crashed (triple fault or kernel panic)
  128+N  stopped by signal N (Ctrl-A x on the console counts as SIGINT)";

/// Quotes `arg` for /bin/sh: the guest runs the command line through a shell.
fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// What the guest's init should know about the host's terminal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HostTerminal {
    /// stdout is a terminal: keep the guest tty's echo and \n -> \r\n translation.
    tty: bool,
    /// Columns and rows, so full-screen programs in the guest fit.
    size: Option<(u16, u16)>,
}

impl HostTerminal {
    fn probe() -> Self {
        let tty = std::io::stdout().is_terminal();
        // SAFETY: winsize is plain data that TIOCGWINSZ fills in; a failed ioctl leaves it
        // zeroed, which we discard below.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer to a winsize.
        let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
        let size = (tty && ok && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row));
        HostTerminal { tty, size }
    }

    /// The `vmon.tty` / `vmon.winsize` keys of the guest init's contract (docs/guest-kit.md).
    fn init_keys(&self) -> String {
        let mut keys = format!(" vmon.tty={}", u8::from(self.tty));
        if let Some((cols, rows)) = self.size {
            keys.push_str(&format!(" vmon.winsize={cols}x{rows}"));
        }
        keys
    }
}

/// The guest command line for a run: the user's, or vmon's default; in command mode the
/// console moves to COM2 (vmon's stderr) so COM1 carries only the command's output. The
/// default guest's init also learns about the host terminal, so an interactive shell echoes
/// and wraps lines as the terminal expects.
fn guest_cmdline(user: Option<&str>, command: &[String], terminal: HostTerminal) -> String {
    let mut cmdline = match user {
        Some(user) => user.to_string(),
        None if command.is_empty() => {
            format!("console=ttyS0 {BASE_CMDLINE}{}", terminal.init_keys())
        }
        None => format!("console=ttyS1 {BASE_CMDLINE}"),
    };
    if !command.is_empty() {
        let script: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
        cmdline.push_str(&format!(
            " vmon.cmd={}{}",
            base64::encode(script.join(" ").as_bytes()),
            terminal.init_keys()
        ));
    }
    cmdline
}

fn parse_level(level: Option<&str>) -> Result<tracing::Level, String> {
    let text = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    text.trim()
        .parse()
        .map_err(|_| format!("--log-level {text}: use error, warn, info, debug or trace"))
}

/// Sends the log to stderr, or appends it to `file`. The guest's serial output is written
/// to stdout/stderr directly and never passes through here.
fn init_logging(level: tracing::Level, file: Option<&std::path::Path>) -> Result<(), String> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false);
    match file {
        None => builder.with_writer(std::io::stderr).init(),
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .init()
        }
    }
    Ok(())
}

pub(crate) fn fail(message: impl std::fmt::Display, code: i32) -> i32 {
    vmon_vmm::terminal::restore();
    eprintln!("vmon: {message}");
    code
}

/// A panic is a vmon bug. Where one is contained (a vCPU thread ends the VM with a fault, a
/// device thread fails its device and the VM runs on), the user reads one line saying so
/// instead of Rust's report with its advice about backtraces. With RUST_BACKTRACE set, whoever
/// is debugging gets the full report.
fn install_panic_hook() {
    let full_report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            return full_report(info);
        }
        let thread = std::thread::current();
        let at = info.location().map(|l| (l.file(), l.line()));
        // Not eprintln!: a write error (stderr a pipe nobody reads any more) would panic
        // inside the hook, and a panic there aborts the whole process.
        let line = panic_line(thread.name(), at, info.payload());
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }));
}

/// The one line a panic prints: where, in which thread, and what it said.
fn panic_line(
    thread: Option<&str>,
    at: Option<(&str, u32)>,
    payload: &(dyn std::any::Any + Send),
) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let at = at
        .map(|(file, line)| format!(" at {file}:{line}"))
        .unwrap_or_default();
    format!(
        "vmon: internal error: thread '{}' panicked{at}: {what} (a bug; please report it)",
        thread.unwrap_or("unnamed")
    )
}

pub fn main() -> i32 {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return exit_codes::OK;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return fail(format!("{first} (see 'vmon --help')"), exit_codes::USAGE);
        }
    };
    let level = match parse_level(cli.log_level.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e, exit_codes::USAGE),
    };
    match cli.command {
        // `run` may take its log settings from a configuration file.
        Command::Run(args) => run(*args, cli.log_level.as_deref()),
        Command::Restore(args) => {
            if let Err(e) = init_logging(level, args.log_file.as_deref()) {
                return fail(e, exit_codes::NO_INPUT);
            }
            restore(args)
        }
        Command::Ctl(args) => {
            let _ = init_logging(level, None);
            ctl::run(args)
        }
        Command::Kit { rebuild } => {
            let _ = init_logging(level, None);
            match kit::ensure(rebuild) {
                Ok(kit) => {
                    println!("{}", kit.dir.display());
                    exit_codes::OK
                }
                Err(e) => fail(e, exit_codes::NO_INPUT),
            }
        }
    }
}

fn run(args: RunArgs, log_level: Option<&str>) -> i32 {
    let flags = args.to_spec(log_level);
    let mut spec = match &args.config {
        Some(path) => match VmSpec::load(path) {
            Ok(file) => file.overlay(flags),
            Err(e) => return fail(&e, e.exit_code()),
        },
        None => flags,
    };
    // A file's values are checked up front so the message can name the file and the field
    // (`vm.json: disks[1].path: no such file`). Flags alone keep the machine's own checks,
    // whose messages name the flag and what this host allows (`--cpus 300: this host
    // supports at most 254 vCPUs per VM`).
    if args.config.is_some() {
        if let Err(e) = spec.validate() {
            return fail(&e, e.exit_code());
        }
    }
    let level = match parse_level(spec.log_level.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e, exit_codes::USAGE),
    };
    if let Err(e) = init_logging(level, spec.log_file.as_deref()) {
        return fail(e, exit_codes::NO_INPUT);
    }
    if spec.kernel.is_none() {
        // On a PVM host the stock kernel would run for a minute in KVM's instruction
        // emulator and then fail; say so at once instead.
        if Hypervisor::is_pvm() {
            return fail(
                "KVM is not usable for the default guest: this host's /dev/kvm is PVM (kvm_pvm), \
                 on which a stock Linux kernel cannot boot; use a host with VT-x/AMD-V, or the \
                 lab (scripts/lab.sh)",
                exit_codes::KVM_UNAVAILABLE,
            );
        }
        match kit::ensure(false) {
            Ok(kit) => {
                spec.kernel = Some(kit.kernel);
                spec.initrd = Some(spec.initrd.take().unwrap_or(kit.initrd));
            }
            Err(e) => return fail(e, exit_codes::NO_INPUT),
        }
    }
    let mut config = match spec.to_vm_config() {
        Ok(c) => c,
        Err(e) => return fail(&e, e.exit_code()),
    };
    let command = spec.command.clone().unwrap_or_default();
    config.cmdline = guest_cmdline(spec.cmdline.as_deref(), &command, HostTerminal::probe());
    config.console_input = true;
    let outcome = Machine::new(&config).and_then(Machine::run);
    match outcome {
        Ok(outcome) => {
            if let Some(message) = outcome.message() {
                eprintln!("vmon: {message}");
            }
            outcome.exit_code()
        }
        Err(e) => report(e),
    }
}

fn restore(args: RestoreArgs) -> i32 {
    use vmon_vmm::snapshot::{MachineSnapshot, STATE_FILE, STATE_KIND};
    let snapshot: MachineSnapshot =
        match vmon_state::file::read_state(&args.dir.join(STATE_FILE), STATE_KIND) {
            Ok(s) => s,
            Err(e) => return fail(format!("cannot restore: {e}"), exit_codes::NO_INPUT),
        };
    let mut spec: VmSpec = match serde_json::from_value(snapshot.config.clone()) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                format!("cannot restore: the snapshot's configuration is invalid: {e}"),
                exit_codes::USAGE,
            )
        }
    };
    // Host-side identity belongs to this process, not the one that was snapshotted; a clone
    // can be given its own disks, taps and vsock socket so clones do not collide. What the
    // guest sees (disk size and serial, MAC, CID) stays as saved.
    spec.api_socket = args.api_socket;
    spec.metrics_file = None;
    for (n, path) in &args.disk_paths {
        match spec.disks.as_mut().and_then(|d| d.get_mut(*n)) {
            Some(d) => d.path = PathBuf::from(path),
            None => {
                return fail(
                    format!("--disk-path {n}=...: the snapshot has no disk {n}"),
                    exit_codes::USAGE,
                )
            }
        }
    }
    for (n, tap) in &args.taps {
        match spec.nets.as_mut().and_then(|d| d.get_mut(*n)) {
            Some(d) => d.tap = tap.clone(),
            None => {
                return fail(
                    format!("--tap {n}=...: the snapshot has no network device {n}"),
                    exit_codes::USAGE,
                )
            }
        }
    }
    if let Some(socket) = args.vsock_socket {
        match spec.vsock.as_mut() {
            Some(v) => v.socket = socket,
            None => {
                return fail(
                    "--vsock-socket: the snapshot has no vsock device",
                    exit_codes::USAGE,
                )
            }
        }
    }
    // Not `validate`: the kernel and initrd named there are not needed (the guest is in
    // memory) and may be gone; disks and sockets are checked as they are opened.
    let mut config = match spec.to_vm_config() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot restore: {e}"), e.exit_code()),
    };
    config.console_input = true;
    let layout = match vmon_memory::MemoryLayout::new(config.memory) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot restore: {e}"), exit_codes::USAGE),
    };
    let memory_path = match snapshot.memory_path(&args.dir) {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot restore: {e}"), exit_codes::USAGE),
    };
    let memory = match vmon_memory::restore_guest_memory(&layout, &memory_path) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot restore: {e}"), exit_codes::NO_INPUT),
    };
    let outcome = Machine::restore(&config, &snapshot, memory).and_then(Machine::run);
    match outcome {
        Ok(outcome) => {
            if let Some(message) = outcome.message() {
                eprintln!("vmon: {message}");
            }
            outcome.exit_code()
        }
        Err(e) => {
            let code = e.exit_code();
            fail(format!("cannot restore: {e}"), code)
        }
    }
}

fn report(e: VmmError) -> i32 {
    let code = e.exit_code();
    fail(e, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_reads_as_one_line_naming_the_thread() {
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("chain {} bad", 3));
        assert_eq!(
            panic_line(
                Some("virtio-blk disk0"),
                Some(("crates/virtio/src/block.rs", 42)),
                formatted.as_ref()
            ),
            "vmon: internal error: thread 'virtio-blk disk0' panicked at \
             crates/virtio/src/block.rs:42: chain 3 bad (a bug; please report it)"
        );
        let literal: Box<dyn std::any::Any + Send> = Box::new("plain");
        let opaque: Box<dyn std::any::Any + Send> = Box::new(7u8);
        assert_eq!(
            panic_line(None, None, literal.as_ref()),
            "vmon: internal error: thread 'unnamed' panicked: plain (a bug; please report it)"
        );
        assert!(panic_line(None, None, opaque.as_ref()).contains(": (no message) ("));
    }

    #[test]
    fn quoting_survives_the_shell() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("-a"), "-a");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn command_mode_moves_the_console_and_encodes_the_command() {
        let cmd = vec!["sh".to_string(), "-c".to_string(), "exit 7".to_string()];
        let line = guest_cmdline(None, &cmd, HostTerminal::default());
        assert!(line.starts_with("console=ttyS1 "), "{line}");
        let encoded = base64::encode(b"sh -c 'exit 7'");
        assert!(
            line.ends_with(&format!(" vmon.cmd={encoded} vmon.tty=0")),
            "{line}"
        );
        let tty = HostTerminal {
            tty: true,
            size: Some((120, 40)),
        };
        let interactive = guest_cmdline(None, &[], tty);
        assert!(interactive.starts_with("console=ttyS0 "), "{interactive}");
        assert!(
            interactive.ends_with(" vmon.tty=1 vmon.winsize=120x40"),
            "{interactive}"
        );
        let piped = guest_cmdline(None, &[], HostTerminal::default());
        assert!(piped.ends_with(" vmon.tty=0"), "{piped}");
        let cmd_on_tty = guest_cmdline(None, &cmd, tty);
        assert!(
            cmd_on_tty.ends_with(" vmon.tty=1 vmon.winsize=120x40"),
            "{cmd_on_tty}"
        );
        assert_eq!(
            guest_cmdline(Some("root=/dev/vda"), &[], tty),
            "root=/dev/vda"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
