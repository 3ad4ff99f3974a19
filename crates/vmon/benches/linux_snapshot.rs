//! Snapshot and restore of the stock Debian guest with all its memory in use: how long a
//! snapshot pauses the guest and what it writes, and how long `vmon restore` takes until the
//! guest answers on its console, for 256 MiB and 4 GiB guests; then the host memory of 10
//! clones of the 256 MiB snapshot against 10 guests booted independently.
//!
//! The guest runs `vmon-guest hold-memory available`: it writes to every page of all the
//! memory the kernel has free (all but 48 MiB), prints `holding N MiB`, and answers each
//! console line with `answer: LINE`. Restore latency is from spawning `vmon restore` (with
//! `ping` already in its stdin) to `answer: ping` on its stdout.
//!
//! Needs hardware virtualisation: on PVM hosts run it inside the lab with enough memory for
//! a 4 GiB guest and its 4 GiB snapshot (scripts/bench-snapshot.sh). Snapshots go to
//! /dev/shm (`VMON_BENCH_DIR` to change). Prints medians; not a test: nothing asserts a figure.
//!
//! Run: `VMON_KIT=$(vmon kit) cargo bench -p vmon --bench linux_snapshot [-- RUNS]`.

#[path = "../tests/common/api_client.rs"]
mod api_client;
mod common;
#[path = "../tests/common/guest_tools.rs"]
mod guest_tools;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const VMON: &str = env!("CARGO_BIN_EXE_vmon");
/// How long one guest may take to fill its memory, or to answer, before the run is abandoned.
const PATIENCE: Duration = Duration::from_secs(600);

/// A vmon process whose stdout is read on a thread and searched as it arrives.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Vm {
    fn spawn(args: &[&str], input: &[u8]) -> Vm {
        let mut child = Command::new(VMON)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vmon");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        // Keep stdin open (the guest would see EOF); it is dropped with the thread below.
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let _keep_open = stdin;
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Vm { child, lines }
    }

    /// Waits for a line starting with `prefix`; returns it.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line starting with {prefix:?} from vmon"),
            }
        }
    }

    fn end(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot_args(memory: &str, socket: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into()];
    args.extend(guest_tools::guest_args());
    args.extend(["--memory".into(), memory.into()]);
    if let Some(s) = socket {
        args.extend(["--api-socket".into(), s.display().to_string()]);
    }
    args.extend(["--".into(), "vmon-guest".into(), "hold-memory".into()]);
    args.push("available".into());
    args
}

/// Boots a guest that fills its memory, snapshots it with --stop into `snap`; returns (MiB
/// the guest holds, paused ms, bytes written).
fn take_snapshot(memory: &str, dir: &Path, snap: &Path) -> (u64, f64, u64) {
    let socket = dir.join("boot.sock");
    let _ = std::fs::remove_file(&socket);
    let args = boot_args(memory, Some(&socket));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::spawn(&args, b"");
    let holding = vm.wait_line("holding ");
    let held = holding
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    api_client::wait_socket(&socket, PATIENCE);
    let (_, answer) = api_client::post(
        &socket,
        "/v1/vm/snapshot",
        &format!(r#"{{"dir": "{}", "stop": true}}"#, snap.display()),
    );
    let _ = vm.child.wait();
    let v: serde_json::Value = serde_json::from_str(&answer).expect(&answer);
    (
        held,
        v["paused_ms"].as_f64().unwrap(),
        v["memory_bytes_written"].as_u64().unwrap(),
    )
}

/// From spawning `vmon restore` to the guest's answer to a console line.
fn restore_latency(snap: &Path) -> Duration {
    let t0 = Instant::now();
    let mut vm = Vm::spawn(&["restore", snap.to_str().unwrap()], b"ping\n");
    vm.wait_line("answer: ping");
    let took = t0.elapsed();
    vm.end();
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let runs = common::runs_from_args(3);
    let base = std::env::var_os("VMON_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let dir = base.join(format!("vmon-bench-linux-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("snapshot/restore, stock Debian guest holding all its memory, {runs} restores each:");
    for memory in ["256M", "4G"] {
        let snap = dir.join(format!("snap-{memory}"));
        let (held, paused, written) = take_snapshot(memory, &dir, &snap);
        let restores: Vec<f64> = (0..runs)
            .map(|_| restore_latency(&snap).as_secs_f64() * 1000.0)
            .collect();
        println!(
            "  {memory:>4} guest, {held:4} MiB held: snapshot pauses the guest {paused:8.1} ms \
             ({} MiB written); restore until the guest answers: median {:7.1} ms \
             (each: {})",
            written >> 20,
            median(restores.clone()),
            restores
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if memory != "256M" {
            let _ = std::fs::remove_dir_all(&snap);
        }
    }

    // Ten clones of the 256 MiB snapshot against ten guests booted the same way.
    let snap = dir.join("snap-256M");
    let mut clones: Vec<Vm> = (0..10)
        .map(|_| Vm::spawn(&["restore", snap.to_str().unwrap()], b"ping\n"))
        .collect();
    for c in &mut clones {
        c.wait_line("answer: ping");
    }
    let clone_mem: Vec<(u64, u64)> = clones
        .iter()
        .map(|c| common::rss_pss(c.child.id()))
        .collect();
    clones.into_iter().for_each(Vm::end);
    let args = boot_args("256M", None);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut booted: Vec<Vm> = (0..10).map(|_| Vm::spawn(&args, b"")).collect();
    for b in &mut booted {
        b.wait_line("holding ");
    }
    let boot_mem: Vec<(u64, u64)> = booted
        .iter()
        .map(|c| common::rss_pss(c.child.id()))
        .collect();
    booted.into_iter().for_each(Vm::end);
    common::print_clone_memory(
        "10 x 256 MiB Debian guests holding their memory",
        &clone_mem,
        &boot_mem,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
