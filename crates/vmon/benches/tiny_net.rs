//! virtio-net transmit on this machine's own /dev/kvm: vmon against QEMU microvm with the
//! same guest.
//!
//! The guest is the script-runner tiny guest (`vmon_tinyguest::script`) acting as a driver
//! with no network stack: it keeps 64 Ethernet frames of 1514 bytes on the transmit queue,
//! notifies once per batch and waits for the used index, so what is timed is the VMM's
//! transmit path (the ioeventfd wake-up, chain validation, one write per frame to the tap,
//! the used-ring update). Each VMM gets its own tap in a network namespace the benchmark
//! creates; frames go to a MAC address nobody has, so the host kernel drops each as soon
//! as it is received and the tap's receive counter is the check that every frame arrived.
//!
//! Timing is taken on the host from the guest's serial output (`go` after a warm-up batch,
//! `end` after the last). Needs root (namespaces, taps).
//!
//! Run: `cargo bench -p vmon --bench tiny_net [-- ROUNDS]`. Results are in
//! docs/benchmarks.md. Not a test: nothing asserts a figure.

mod common;

use std::process::Command;
use std::time::Duration;

use common::tiny_virtio::{self, Vmm};
use vmon_tinyguest::script::Script;
use vmon_tinyguest::virtio::*;

const FRAME: u64 = 1514;
/// Frames per notify: a quarter of the queue.
const BATCH: u16 = 64;
const BATCHES: usize = 2000;
const POLLS: u32 = u32::MAX;

// Guest-physical layout: receive rings (empty), transmit rings, the frames.
const RX_RINGS: (u64, u64, u64) = (0x40_0000, 0x40_1000, 0x40_2000);
const TX_RINGS: (u64, u64, u64) = (0x41_0000, 0x41_1000, 0x41_2000);
const FRAMES: u64 = 0x100_0000;
/// Queue 1 (transmit) notifies at NOTIFY + 4: both VMMs use a notify multiplier of 4 and
/// the queue index as its notify offset.
const TX_NOTIFY: u64 = NOTIFY + 4;

fn guest_script(vmm: Vmm) -> Script {
    let mut s = Script::new();
    vmm.find_device(&mut s);
    tiny_virtio::negotiate(&mut s);
    tiny_virtio::setup_queue(&mut s, 0, RX_RINGS);
    tiny_virtio::setup_queue(&mut s, 1, TX_RINGS);
    s.write_rel(1, STATUS, LIVE);

    // Each frame: a zero virtio-net header (no offloads), then destination
    // 02:00:00:00:00:99 (no one), source 02:00:00:00:00:01, an experimental ethertype and
    // zeros. One descriptor per frame; chain i is descriptor i.
    let len = (VNET_HDR + FRAME) as u32;
    for i in 0..BATCH {
        let at = FRAMES + u64::from(i) * 2048;
        s.write(2, at + VNET_HDR, 0x0002) // 02:00
            .write(4, at + VNET_HDR + 2, 0x9900_0000) // 00:00:00:99
            .write(2, at + VNET_HDR + 6, 0x0002)
            .write(4, at + VNET_HDR + 8, 0x0100_0000)
            .write(2, at + VNET_HDR + 12, 0xB588); // 0x88B5, big-endian
        for (addr, value) in descriptor(TX_RINGS.0, i, at, len, 0, 0) {
            s.write(8, addr, value);
        }
    }
    for slot in 0..QUEUE_MAX {
        s.write(
            2,
            TX_RINGS.1 + 4 + 2 * u64::from(slot),
            u64::from(slot % BATCH),
        );
    }
    let mut avail: u16 = 0;
    for k in 0..=BATCHES {
        if k == 1 {
            s.print("go\n");
        }
        avail = avail.wrapping_add(BATCH);
        s.write(2, TX_RINGS.1 + 2, u64::from(avail))
            .write_rel(2, TX_NOTIFY, 0)
            .wait_eq(2, TX_RINGS.2 + 2, u64::from(avail), POLLS);
    }
    s.print("end\n");
    s.read_rel(1, STATUS);
    s
}

/// virtio_net_hdr_v1.
const VNET_HDR: u64 = 12;

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success())
}

fn tap_rx_packets(ns: &str, tap: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{tap}/statistics/rx_packets"))
        .output()
        .ok();
    out.and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// One run: the time from `go` to `end`, and the frames the tap received meanwhile and
/// before (the warm-up batch included).
fn run(vmm: Vmm, kernel: &str, ns: &str, tap: &str) -> Result<(Duration, u64), String> {
    let before = tap_rx_packets(ns, tap);
    let mut cmd = vmm.command(kernel);
    match vmm {
        Vmm::Vmon => cmd.args(["--net", &format!("tap={tap}")]),
        Vmm::Qemu => cmd.args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on",
        ]),
    };
    // The same command, inside the namespace.
    let mut in_ns = Command::new("ip");
    in_ns
        .args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let (elapsed, values) = tiny_virtio::run_script(vmm, in_ns, 1)?;
    if values[0] != LIVE {
        return Err(format!("device status {:#x} at the end", values[0]));
    }
    Ok((elapsed, tap_rx_packets(ns, tap) - before))
}

fn main() {
    let rounds = common::runs_from_args(5);
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("tiny_net: no /dev/kvm here; nothing measured");
        return;
    }
    let ns = format!("vmonnet{}", std::process::id());
    let taps = ["tapv", "tapq"];
    let made = sh(&format!("ip netns add {ns}"))
        && taps.iter().all(|t| {
            sh(&format!(
                "ip -n {ns} tuntap add {t} mode tap && ip -n {ns} link set {t} up"
            ))
        });
    if !made {
        println!(
            "tiny_net: cannot create a network namespace with taps (needs root); nothing measured"
        );
        sh(&format!("ip netns del {ns} 2>/dev/null"));
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmon-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmms = Vmm::available();
    let kernels: Vec<String> = vmms
        .iter()
        .enumerate()
        .map(|(i, vmm)| {
            let path = dir.join(format!("guest-{i}.elf"));
            std::fs::write(&path, vmm.kernel(&guest_script(*vmm))).unwrap();
            path.to_str().unwrap().to_string()
        })
        .collect();
    let frames = u64::from(BATCH) * BATCHES as u64;
    println!(
        "virtio-net transmit, tiny guest on /dev/kvm, {frames} frames of {FRAME} bytes, \
         {BATCH} per notify, {rounds} rounds, medians:"
    );
    let mut results: Vec<Vec<Duration>> = vmms.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, vmm) in vmms.iter().enumerate() {
            match run(*vmm, &kernels[i], &ns, taps[i]) {
                Ok((t, seen)) if seen == frames + u64::from(BATCH) => results[i].push(t),
                Ok((_, seen)) => println!(
                    "  {}: the tap received {seen} frames, not {}",
                    vmm.name(),
                    frames + u64::from(BATCH)
                ),
                Err(e) => println!("  {}: run failed: {e}", vmm.name()),
            }
        }
    }
    let mut rates = Vec::new();
    for (vmm, times) in vmms.iter().zip(results) {
        if times.is_empty() {
            rates.push(None);
            continue;
        }
        let t = common::median(times).as_secs_f64();
        let pps = frames as f64 / t;
        println!(
            "  {:<13} {:>9.0} frames/s   {:>6.2} Gbit/s of frames",
            vmm.name(),
            pps,
            pps * FRAME as f64 * 8.0 / 1e9
        );
        rates.push(Some(pps));
    }
    if let [Some(v), Some(q)] = rates[..] {
        println!("  vmon / qemu: {:.2}x", v / q);
    }
    sh(&format!("ip netns del {ns}"));
    let _ = std::fs::remove_dir_all(&dir);
}
