//! Shared by the boot benchmarks: start a VMM, time its first output, read its memory.

#![allow(dead_code)]

pub mod tiny_virtio;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sample {
    /// From spawning the VMM to `marker` appearing on its stdout.
    pub first_output: Duration,
    /// Resident set once the guest is up and idle.
    pub rss_kib: u64,
    /// Peak resident set (VmHWM) at that point.
    pub peak_rss_kib: u64,
}

pub fn status_kib(pid: u32, field: &str) -> u64 {
    kib_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        field,
    )
}

/// The value of a `Name:   1234 kB` line in a /proc file, 0 if there is none.
fn kib_field(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Runs `cmd` until `marker` appears on its stdout, lets it idle for `settle`, reads its
/// memory and kills it. None (with the reason on stderr) if the marker never came.
pub fn measure(mut cmd: Command, marker: &[u8], settle: Duration) -> Option<Sample> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    // A guest that never prints the marker (the lab hangs some) must not stall the run.
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() > deadline {
                    // SAFETY: signalling our own child, which has not been reaped yet.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let found = loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(marker.len()).any(|w| w == marker) {
                    break true;
                }
            }
        }
    };
    let first_output = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();
    std::thread::sleep(settle);
    let rss_kib = status_kib(child.id(), "VmRSS:");
    let peak_rss_kib = status_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    if !found {
        let mut err = String::new();
        let _ = child.stderr.take()?.read_to_string(&mut err);
        eprintln!("  failed: {}", err.trim());
    }
    let _ = child.wait();
    found.then_some(Sample {
        first_output,
        rss_kib,
        peak_rss_kib,
    })
}

pub fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// Runs each named command `runs` times (interleaved, so drift hits both alike) and prints
/// the medians and the first/second ratio.
pub fn compare(
    runs: usize,
    marker: &[u8],
    settle: Duration,
    vmms: &[(&str, &dyn Fn() -> Command)],
) -> Vec<Option<(Duration, u64, u64)>> {
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, (_, make)) in vmms.iter().enumerate() {
            if let Some(s) = measure(make(), marker, settle) {
                samples[i].push(s);
            }
        }
    }
    let mut out = Vec::new();
    for ((name, _), s) in vmms.iter().zip(samples) {
        if s.is_empty() {
            println!("  {name:<13} did not start");
            out.push(None);
            continue;
        }
        let n = s.len();
        let t = median(s.iter().map(|s| s.first_output).collect());
        let rss = median(s.iter().map(|s| s.rss_kib).collect());
        let peak = median(s.iter().map(|s| s.peak_rss_kib).collect());
        println!(
            "  {name:<13} first output {:>9.2} ms   RSS {:>7.2} MiB   peak RSS {:>7.2} MiB   ({n} of {runs} runs)",
            t.as_secs_f64() * 1e3,
            rss as f64 / 1024.0,
            peak as f64 / 1024.0,
        );
        out.push(Some((t, rss, peak)));
    }
    if let [Some((vt, vr, vp)), Some((qt, qr, qp))] = out[..] {
        println!(
            "  {} / {}: first output {:.2}x   RSS {:.2}x   peak RSS {:.2}x",
            vmms[0].0,
            vmms[1].0,
            vt.as_secs_f64() / qt.as_secs_f64(),
            vr as f64 / qr as f64,
            vp as f64 / qp as f64
        );
    }
    out
}

/// `-cpu host`, minus ARCH_CAPABILITIES: on PVM hosts KVM reports the MSR but refuses QEMU's
/// write to it, and QEMU aborts (an assertion in kvm_buf_set_msrs). Harmless elsewhere.
pub const QEMU_CPU: &str = "host,-arch-capabilities";

/// QEMU microvm with KVM and nothing but a serial console on stdio, as our peer.
pub fn qemu_microvm(memory: &str, cpus: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        QEMU_CPU,
        "-smp",
        cpus,
        "-m",
        memory,
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
    ])
    .args(["-serial", "stdio"]);
    c
}

/// The vmon binary to measure: `VMON_BIN` (say, the static release build of
/// `scripts/build-release.sh`) or the one cargo built for this benchmark.
pub fn vmon_bin() -> String {
    std::env::var("VMON_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vmon").to_string())
}

pub fn runs_from_args(default: usize) -> usize {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(default)
}

/// (RSS, PSS) of a process in KiB, from /proc/PID/smaps_rollup: PSS divides each shared
/// page among the processes that map it, so it shows what clones really cost together.
pub fn rss_pss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    (kib_field(&text, "Rss:"), kib_field(&text, "Pss:"))
}

/// Prints the host memory of clones against independently booted VMs: each a list of
/// (RSS, PSS) in KiB per VMM process, summed, in MiB, and their ratios.
pub fn print_clone_memory(title: &str, clones: &[(u64, u64)], boots: &[(u64, u64)]) {
    let sum = |v: &[(u64, u64)]| -> (f64, f64) {
        (
            v.iter().map(|x| x.0).sum::<u64>() as f64 / 1024.0,
            v.iter().map(|x| x.1).sum::<u64>() as f64 / 1024.0,
        )
    };
    let (crss, cpss) = sum(clones);
    let (brss, bpss) = sum(boots);
    println!("  {title}, host memory of the VMMs (MiB):");
    println!(
        "    {} clones of one snapshot: RSS {crss:8.1}  PSS {cpss:8.1}",
        clones.len()
    );
    println!(
        "    {} independent boots:      RSS {brss:8.1}  PSS {bpss:8.1}",
        boots.len()
    );
    println!(
        "    clones / independent:      RSS {:.2}x  PSS {:.2}x",
        crss / brss,
        cpss / bpss
    );
}
