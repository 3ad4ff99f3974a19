//! Argument parsing and the mapping from outcomes and errors to one line and an exit status.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use vmon_hypervisor::Hypervisor;
use vmon_memory::MemSize;
use vmon_vmm::config::{DiskOptions, NetOptions, VsockOptions};
use vmon_vmm::{exit_codes, Machine, VmConfig, VmmError};

use crate::base64;
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
    Run(RunArgs),
    /// Build the default guest kit if needed and print its directory
    Kit {
        /// Rebuild even if a complete kit exists
        #[arg(long)]
        rebuild: bool,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel image: bzImage or ELF vmlinux (default: the default guest's kernel)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (default: the default guest's initramfs when --kernel is not given)
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console and vmon's reboot/panic conventions)
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory: 512M, 2G, 1024 (MiB)
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    memory: MemSize,
    /// CPU options: nested=on exposes VMX/SVM to the guest
    #[arg(long = "cpu", value_name = "OPTS", value_parser = parse_cpu_options)]
    cpu: Option<CpuOptions>,
    /// A virtio-blk disk: path=FILE[,readonly=on][,serial=ID][,direct=on]; repeat for more
    /// (the guest sees vda, vdb, ... in order)
    #[arg(long = "disk", value_name = "SPEC", value_parser = vmon_vmm::config::parse_disk)]
    disks: Vec<DiskOptions>,
    /// A virtio-net device on a host tap: tap=NAME[,mac=MAC]; repeat for more (eth0, eth1,
    /// ...). The tap must exist (`ip tuntap add NAME mode tap user $USER`) unless vmon may
    /// create it (CAP_NET_ADMIN); without mac= the guest gets a random 02:xx:... address
    #[arg(long = "net", value_name = "SPEC", value_parser = vmon_vmm::config::parse_net)]
    nets: Vec<NetOptions>,
    /// Add a virtio-rng device fed from the host's getrandom
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: cid=N,socket=PATH. Guest connections to host port P go to the
    /// Unix socket PATH_P; host programs connect to PATH and write "CONNECT P\n"
    #[arg(long = "vsock", value_name = "SPEC", value_parser = vmon_vmm::config::parse_vsock)]
    vsock: Option<VsockOptions>,
    /// Command to run in the guest; its stdout becomes vmon's and its status vmon's
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct CpuOptions {
    nested: bool,
}

fn parse_cpu_options(text: &str) -> Result<CpuOptions, String> {
    let mut opts = CpuOptions::default();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some(("nested", "on")) => opts.nested = true,
            Some(("nested", "off")) => opts.nested = false,
            Some(("nested", v)) => return Err(format!("nested={v}: use on or off")),
            _ => {
                return Err(format!(
                    "unknown CPU option '{item}' (known: nested=on|off)"
                ))
            }
        }
    }
    Ok(opts)
}

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0      the guest powered off or rebooted (or CMD succeeded)
  1-255  with `run -- CMD`: CMD's exit status
  64     bad command line or value      65  kernel/initrd is not a valid image
  66     kernel/initrd/disk unreadable  69  KVM is missing or unusable
  70     unexpected KVM exit (VMM fault) 71 the host refused memory, threads, a tap
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

fn init_logging(level: Option<&str>) -> Result<(), String> {
    let text = level
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    let level: tracing::Level = text
        .trim()
        .parse()
        .map_err(|_| format!("--log-level {text}: use error, warn, info, debug or trace"))?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    Ok(())
}

fn fail(message: impl std::fmt::Display, code: i32) -> i32 {
    vmon_vmm::terminal::restore();
    eprintln!("vmon: {message}");
    code
}

pub fn main() -> i32 {
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
    if let Err(e) = init_logging(cli.log_level.as_deref()) {
        return fail(e, exit_codes::USAGE);
    }
    match cli.command {
        Command::Kit { rebuild } => match kit::ensure(rebuild) {
            Ok(kit) => {
                println!("{}", kit.dir.display());
                exit_codes::OK
            }
            Err(e) => fail(e, exit_codes::NO_INPUT),
        },
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> i32 {
    let (kernel, initrd) =
        match (args.kernel, args.initrd) {
            (Some(kernel), initrd) => (kernel, initrd),
            // On a PVM host the stock kernel would run for a minute in KVM's instruction
            // emulator and then fail; say so at once instead.
            (None, _) if Hypervisor::is_pvm() => return fail(
                "KVM is not usable for the default guest: this host's /dev/kvm is PVM (kvm_pvm), \
                 on which a stock Linux kernel cannot boot; use a host with VT-x/AMD-V, or the \
                 lab (scripts/lab.sh)",
                exit_codes::KVM_UNAVAILABLE,
            ),
            (None, initrd) => match kit::ensure(false) {
                Ok(kit) => (kit.kernel, Some(initrd.unwrap_or(kit.initrd))),
                Err(e) => return fail(e, exit_codes::NO_INPUT),
            },
        };
    let config = VmConfig {
        cmdline: guest_cmdline(
            args.cmdline.as_deref(),
            &args.command,
            HostTerminal::probe(),
        ),
        initrd,
        cpus: args.cpus,
        memory: args.memory,
        nested: args.cpu.unwrap_or_default().nested,
        console_input: true,
        disks: args.disks,
        nets: args.nets,
        rng: args.rng,
        vsock: args.vsock,
        ..VmConfig::new(kernel)
    };
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

fn report(e: VmmError) -> i32 {
    let code = e.exit_code();
    fail(e, code)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cpu_options() {
        assert!(parse_cpu_options("nested=on").unwrap().nested);
        assert!(!parse_cpu_options("nested=off").unwrap().nested);
        assert!(parse_cpu_options("nested=maybe").is_err());
        assert!(parse_cpu_options("turbo=on").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
