//! I/O benchmark: virtio-blk throughput and IOPS inside the stock Debian guest, for vmon and
//! QEMU (q35, virtio-blk-pci, its default cache=writeback with thread-pool AIO) on the same
//! image file, against the same file read on the host; and guest-to-host TCP throughput over
//! a tap for both (QEMU's virtio-net-pci without vhost, its default). The guest runs the
//! static `vmon-guest` helper (crates/guest-tools) for every figure; the host baseline runs
//! the same binary on the image file.
//! Needs hardware virtualisation: on PVM hosts run it inside the lab (scripts/bench-io.sh).
//!
//! Run: `VMON_KIT=$(vmon kit) cargo bench -p vmon --bench linux_io [-- ROUNDS]`. `VMON_BIN`
//! measures another vmon binary, `VMON_DISK_OPTIONS` adds to its `--disk` (`,poll_us=0`).

mod common;
#[allow(dead_code)]
#[path = "../tests/common/guest_tools.rs"]
mod guest_tools;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

/// The build's own vmon, which the shared guest-tools helper runs (`vmon kit`); the VMs run
/// `common::vmon_bin()`.
pub const VMON: &str = env!("CARGO_BIN_EXE_vmon");
const IMAGE_MIB: usize = 1024;
const READ_MIB: usize = 768;
const WRITE_MIB: usize = 256;
const RAND_SECONDS: &str = "4";
const NET_MIB: usize = 512;
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn base64(text: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .expect("base64");
    String::from_utf8(out.stdout).unwrap()
}

/// More `--disk` options for vmon from `VMON_DISK_OPTIONS` (say `,poll_us=0`), to compare
/// settings within one lab session.
fn disk_options() -> String {
    std::env::var("VMON_DISK_OPTIONS").unwrap_or_default()
}

/// `NAME VALUE UNIT` lines from vmon-guest.
fn figures(output: &str, into: &mut BTreeMap<String, Vec<f64>>) {
    for line in output.lines() {
        let mut w = line.split_whitespace();
        if let (Some(name), Some(value), Some(_unit)) = (w.next(), w.next(), w.next()) {
            if let Ok(v) = value.parse::<f64>() {
                if matches!(name, "seq-read" | "seq-write" | "rand-read-4k" | "tcp-send") {
                    into.entry(name.to_string()).or_default().push(v);
                }
            }
        }
    }
}

/// Runs `cmd` to completion, or kills it after `RUN_TIMEOUT` (a hung guest must not hang
/// the benchmark); logs what it printed to stderr as it goes.
fn run(cmd: &mut Command, what: &str) -> String {
    let started = std::time::Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(what);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let figures: Vec<&str> = out
        .lines()
        .filter(|l| l.split_whitespace().count() >= 3)
        .collect();
    eprintln!(
        "linux_io: {what}: {} in {:.1?}: {}",
        match status {
            Some(st) if st.success() => "ok".to_string(),
            Some(st) => format!("exit {st}"),
            None => "TIMED OUT".to_string(),
        },
        started.elapsed(),
        figures.join(" | ")
    );
    if !status.is_some_and(|s| s.success()) {
        eprintln!(
            "stdout:\n{out}\nstderr (tail):\n{}",
            err.lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    out
}

fn sh(script: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .status()
        .is_ok_and(|s| s.success())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds = common::runs_from_args(3);
    let kit = guest_tools::kit_dir();
    let kernel = kit.join("vmlinux");
    let initrd = guest_tools::initrd_with_guest_tools();
    let tool = guest_tools::guest_tool();
    let dir = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let image = dir.join(format!("vmon-bench-{}.img", std::process::id()));
    assert!(sh(&format!(
        "head -c {}M /dev/urandom > {}",
        IMAGE_MIB,
        image.display()
    )));
    let image_s = image.display().to_string();

    // Network: a namespace with one tap per VMM, each its own subnet (with one subnet the
    // host's replies would all leave through the first tap): vmon 10.0.9.0/24 on tapv,
    // QEMU 10.0.10.0/24 on tapq; the host end is .1, the guest .2.
    let ns = format!("vmonbench{}", std::process::id());
    let net = sh(&format!(
        "ip netns add {ns} && ip -n {ns} link set lo up && \
         for t in tapv:9 tapq:10; do ip -n {ns} tuntap add ${{t%:*}} mode tap && \
         ip -n {ns} addr add 10.0.${{t#*:}}.1/24 dev ${{t%:*}} && \
         ip -n {ns} link set ${{t%:*}} up; done"
    ));
    if !net {
        eprintln!(
            "linux_io: no network namespace/tap (needs root and the tun module); skipping TCP"
        );
    }

    let guest_cmd = |with_net: bool, subnet: u8| {
        let mut c = format!(
            "vmon-guest seq-read /dev/vda {READ_MIB}; \
             vmon-guest rand-read /dev/vda {RAND_SECONDS}; \
             vmon-guest seq-write /dev/vda {WRITE_MIB}"
        );
        if with_net {
            c.push_str(&format!(
                "; ip link set eth0 up && ip addr add 10.0.{subnet}.2/24 dev eth0 && \
                 vmon-guest tcp-send 10.0.{subnet}.1:5201 {NET_MIB}"
            ));
        }
        c
    };
    let cmdline = |with_net: bool, subnet: u8| {
        format!(
            "console=ttyS1 reboot=k,panic_warm panic=-1 i8042.noaux quiet vmon.cmd={} vmon.tty=0",
            base64(&guest_cmd(with_net, subnet))
        )
    };
    let in_ns = |cmd: &str| -> Command {
        if net {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns, cmd]);
            c
        } else {
            Command::new(cmd)
        }
    };
    // The host end of the TCP test: vmon-guest tcp-recv in the namespace.
    let receiver = || {
        net.then(|| {
            let mut c = in_ns(tool.to_str().unwrap());
            c.args(["tcp-recv", "5201"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c.spawn().expect("tcp-recv")
        })
    };

    let mut host = BTreeMap::new();
    for _ in 0..rounds {
        let mut c = Command::new(&tool);
        c.args(["seq-read", &image_s, &READ_MIB.to_string()]);
        figures(&run(&mut c, "host seq-read"), &mut host);
        let mut c = Command::new(&tool);
        c.args(["rand-read", &image_s, RAND_SECONDS]);
        figures(&run(&mut c, "host rand-read"), &mut host);
    }

    let mut results: Vec<(&str, BTreeMap<String, Vec<f64>>)> =
        vec![("vmon", BTreeMap::new()), ("qemu q35", BTreeMap::new())];
    for round in 0..rounds {
        // Who goes first alternates (vmon, QEMU, QEMU, vmon, ...): a guest's run can leave
        // the lab in a state the next one pays for (memory to compact into huge pages,
        // a busier or idler CPU), and a fixed order would charge it to one VMM.
        let mut order: Vec<&mut (&str, BTreeMap<String, Vec<f64>>)> = results.iter_mut().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (name, into) in order {
            let append = cmdline(net, if *name == "vmon" { 9 } else { 10 });
            let mut cmd = if *name == "vmon" {
                let mut c = in_ns(&common::vmon_bin());
                c.args(["run", "--kernel"])
                    .arg(&kernel)
                    .arg("--initrd")
                    .arg(&initrd)
                    .args(["--cpus", "2", "--memory", "1G", "--cmdline", &append])
                    .arg("--disk")
                    .arg(format!("path={image_s}{}", disk_options()));
                if net {
                    c.args(["--net", "tap=tapv"]);
                }
                c
            } else {
                let mut c = in_ns("qemu-system-x86_64");
                c.args(["-M", "q35", "-enable-kvm", "-cpu", common::QEMU_CPU])
                    .args(["-smp", "2", "-m", "1G", "-nodefaults", "-no-user-config"])
                    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
                    .args(["-chardev", "null,id=com2"])
                    .args(["-device", "isa-serial,chardev=com2,iobase=0x2f8,irq=3"])
                    .arg("-kernel")
                    .arg(&kernel)
                    .arg("-initrd")
                    .arg(&initrd)
                    .args(["-append", &append])
                    .args(["-device", "virtio-blk-pci,drive=d0"])
                    .arg("-drive")
                    .arg(format!(
                        "if=none,id=d0,file={image_s},format=raw,cache=writeback,aio=threads"
                    ));
                if net {
                    c.args([
                        "-netdev",
                        "tap,id=n0,ifname=tapq,script=no,downscript=no",
                        "-device",
                        "virtio-net-pci,netdev=n0",
                    ]);
                }
                c
            };
            let recv = receiver();
            let out = run(&mut cmd, name);
            if let Some(mut r) = recv {
                let _ = r.kill();
                let _ = r.wait();
            }
            figures(&out, into);
        }
    }
    if net {
        sh(&format!("ip netns del {ns}"));
    }
    let _ = std::fs::remove_file(&image);

    println!(
        "virtio-blk on a {IMAGE_MIB} MiB image in {} (host page cache), 2 vCPUs, 1 GiB, \
         {rounds} rounds, medians:",
        dir.display()
    );
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "", "seq read", "seq write", "4K rand rd", "TCP g->h", ""
    );
    let fmt = |m: &BTreeMap<String, Vec<f64>>, k: &str| {
        m.get(k)
            .filter(|v| !v.is_empty())
            .map_or(f64::NAN, |v| median(v))
    };
    println!(
        "{:<14} {:>9.0} MB/s {:>12} {:>7.0} IOPS {:>12}",
        "host file",
        fmt(&host, "seq-read"),
        "-",
        fmt(&host, "rand-read-4k"),
        "-"
    );
    for (name, m) in &results {
        println!(
            "{:<14} {:>9.0} MB/s {:>7.0} MB/s {:>7.0} IOPS {:>7.0} MB/s",
            name,
            fmt(m, "seq-read"),
            fmt(m, "seq-write"),
            fmt(m, "rand-read-4k"),
            fmt(m, "tcp-send")
        );
    }
    let (v, q) = (&results[0].1, &results[1].1);
    println!(
        "vmon / qemu:   seq read {:.2}x, seq write {:.2}x, 4K rand read {:.2}x, TCP {:.2}x",
        fmt(v, "seq-read") / fmt(q, "seq-read"),
        fmt(v, "seq-write") / fmt(q, "seq-write"),
        fmt(v, "rand-read-4k") / fmt(q, "rand-read-4k"),
        fmt(v, "tcp-send") / fmt(q, "tcp-send"),
    );
    println!(
        "vmon / host file: seq read {:.2}x, 4K rand read {:.2}x",
        fmt(v, "seq-read") / fmt(&host, "seq-read"),
        fmt(v, "rand-read-4k") / fmt(&host, "rand-read-4k"),
    );
}
