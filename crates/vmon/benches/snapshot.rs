//! Snapshot and restore with a tiny guest on this machine's /dev/kvm: how long a snapshot
//! pauses the guest and what it writes, how long `vmon restore` takes until the guest
//! prints again, for 256 MiB and 4 GiB guests; and the host memory of 10 clones restored
//! from one snapshot against 10 VMs booted independently.
//!
//! The guest writes one byte to every page of its RAM below 1 GiB (the tiny guest's
//! identity map ends there: all of a 256 MiB guest, a quarter of a 4 GiB one), then counts
//! on its console.
//!
//! Run: `cargo bench -p vmon --bench snapshot [-- RUNS]`. Prints medians; results are in
//! docs/benchmarks.md. Not a test: nothing asserts a figure.

#[path = "../tests/common/api_client.rs"]
mod api_client;
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmon_tinyguest as tg;

const MIB: u64 = 1 << 20;

fn spawn(args: &[&str]) -> Child {
    Command::new(common::vmon_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmon")
}

/// Reads stdout until `needle` has appeared `times` times in total.
fn wait_for(child: &mut Child, needle: &[u8], times: usize) {
    let out = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 4096];
    while seen.windows(needle.len()).filter(|w| *w == needle).count() < times {
        let n = out.read(&mut b).unwrap();
        assert!(n > 0, "vmon ended early");
        seen.extend_from_slice(&b[..n]);
    }
}

struct Guest {
    kernel: PathBuf,
    memory: String,
}

/// Boots the guest, waits until it has touched its memory and printed, snapshots it with
/// --stop; returns (paused ms, memory bytes written).
fn take_snapshot(g: &Guest, dir: &Path) -> (f64, u64) {
    let socket = dir.join("boot.sock");
    let _ = std::fs::remove_file(&socket);
    let mut vm = spawn(&[
        "run",
        "--memory",
        &g.memory,
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    wait_for(&mut vm, b"touched\n", 1);
    api_client::wait_socket(&socket, Duration::from_secs(30));
    let snap = dir.join("snap");
    let (_, answer) = api_client::post(
        &socket,
        "/v1/vm/snapshot",
        &format!(r#"{{"dir": "{}", "stop": true}}"#, snap.display()),
    );
    let _ = vm.wait();
    let v: serde_json::Value = serde_json::from_str(&answer).expect(&answer);
    (
        v["paused_ms"].as_f64().unwrap(),
        v["memory_bytes_written"].as_u64().unwrap(),
    )
}

/// Time from spawning `vmon restore` to the guest's next console line.
fn restore_latency(dir: &Path) -> Duration {
    let snap = dir.join("snap");
    let t0 = Instant::now();
    let mut vm = spawn(&["restore", snap.to_str().unwrap()]);
    wait_for(&mut vm, b"\n", 1);
    let took = t0.elapsed();
    let _ = vm.kill();
    let _ = vm.wait();
    took
}

/// Time to start and finish `vmon --version`: what any `vmon` command pays before its own
/// work (exec, dynamic loading, Rust start-up), so restore's own share can be told apart.
fn process_start() -> Duration {
    let t0 = Instant::now();
    let status = Command::new(common::vmon_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .expect("run vmon --version");
    assert!(status.success());
    t0.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let runs = common::runs_from_args(5);
    let dir = std::env::temp_dir().join(format!("vmon-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!("snapshot/restore, tiny guest, {runs} runs each, medians:");
    let start: Vec<f64> = (0..20)
        .map(|_| process_start().as_secs_f64() * 1000.0)
        .collect();
    println!(
        "  process start (`vmon --version`, start to exit): {:.2} ms",
        median(start)
    );
    for (label, mib) in [("256 MiB", 256u64), ("4 GiB", 4096)] {
        let touch_end = (mib * MIB).min(1 << 30);
        let kernel = dir.join(format!("touch-{mib}.elf"));
        std::fs::write(
            &kernel,
            tg::elf64(
                &tg::touch_then_count(2 * MIB, touch_end, 50),
                tg::DEFAULT_LOAD_ADDR,
            ),
        )
        .unwrap();
        let g = Guest {
            kernel,
            memory: format!("{mib}M"),
        };
        let (mut paused, mut written, mut restore) = (Vec::new(), 0, Vec::new());
        for _ in 0..runs {
            let (p, w) = take_snapshot(&g, &dir);
            paused.push(p);
            written = w;
            restore.push(restore_latency(&dir).as_secs_f64() * 1000.0);
        }
        println!(
            "  {label:8} touched {:4} MiB: snapshot pauses the guest {:8.1} ms ({} MiB written); \
             restore to the next console line {:6.2} ms",
            (touch_end - 2 * MIB) / MIB,
            median(paused),
            written / MIB,
            median(restore)
        );
    }

    // Ten clones of the 256 MiB snapshot (all memory touched) against ten fresh VMs.
    let kernel = dir.join("touch-256.elf");
    let g = Guest {
        kernel: kernel.clone(),
        memory: "256M".into(),
    };
    take_snapshot(&g, &dir);
    let snap = dir.join("snap");
    let mut clones: Vec<Child> = (0..10)
        .map(|_| spawn(&["restore", snap.to_str().unwrap()]))
        .collect();
    for c in &mut clones {
        wait_for(c, b"\n", 3);
    }
    let clone_mem: Vec<(u64, u64)> = clones.iter().map(|c| common::rss_pss(c.id())).collect();
    for c in &mut clones {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut fresh: Vec<Child> = (0..10)
        .map(|_| {
            spawn(&[
                "run",
                "--memory",
                "256M",
                "--kernel",
                kernel.to_str().unwrap(),
            ])
        })
        .collect();
    for c in &mut fresh {
        wait_for(c, b"touched\n", 1);
    }
    let fresh_mem: Vec<(u64, u64)> = fresh.iter().map(|c| common::rss_pss(c.id())).collect();
    for c in &mut fresh {
        let _ = c.kill();
        let _ = c.wait();
    }
    common::print_clone_memory(
        "10 x 256 MiB guests with all memory touched",
        &clone_mem,
        &fresh_mem,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
