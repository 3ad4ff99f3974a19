//! Linux tier, virtio-net: the stock Debian guest talks TCP, both ways, with the host
//! through a tap. The tap lives in a network namespace of its own (10.0.2.1/24), vmon runs
//! in that namespace, and the host side of every connection is this test process, which
//! enters the namespace from one of its threads. Needs root (namespaces, taps) and the
//! `ip` command; runs in the lab on PVM hosts (see linux_guest.rs and scripts/test.sh).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{field, linux_tier, pattern, wait_with_timeout, VMON};

/// Boot (8-25 s in the lab) and about 35 s of transfers under nested TCG; less than the
/// 180 s scripts/test.sh gives a lab session, so a hang fails here with vmon's output.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
const HOST: &str = "10.0.2.1";
const GUEST: &str = "10.0.2.2";
const GUEST_MAC: &str = "02:00:0a:00:02:02";
const TAP: &str = "vmtap0";
/// Guest to host: `seq 1 UPLOAD_LINES` (about 4.5 MiB).
const UPLOAD_LINES: u32 = 600_000;
/// Host to guest (and echoed back).
const DOWNLOAD_LEN: usize = 4 << 20;
const MESSAGE: &[u8] = b"hello from the host, connecting to the guest\n";

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a tap at 10.0.2.1/24, removed (tap included) when dropped,
/// also when the test fails.
struct Namespace(String);

impl Namespace {
    fn create() -> Namespace {
        let ns = Namespace(format!("vmon-net-{}", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.0, "tuntap", "add", TAP, "mode", "tap"]);
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{HOST}/24"),
            "dev",
            TAP,
        ]);
        ip(&["-n", &ns.0, "link", "set", TAP, "up"]);
        ns
    }

    /// A statistics counter of the tap (which outlives vmon: `ip tuntap add` makes it
    /// persistent).
    fn tap_counter(&self, name: &str) -> u64 {
        let path = format!("/sys/class/net/{TAP}/statistics/{name}");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat", &path])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{path}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Moves the calling thread into network namespace `name`: sockets it creates from then
/// on, and threads it spawns, belong there.
fn enter_namespace(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open the netns");
    // SAFETY: setns on a namespace descriptor we hold; it changes only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["-n", &self.0, "link", "del", TAP]);
        quiet(&["netns", "del", &self.0]);
    }
}

/// Whether this host can run the test; in the lab it must.
fn can_make_namespaces(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip_ok = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if root && ip_ok && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    let why = format!("{test}: needs root, the ip command and /dev/net/tun");
    if std::env::var("VMON_IN_LAB").as_deref() == Ok("1") {
        panic!("{why}, which the lab has");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// Accepts one connection, giving up once `done` is set (vmon has exited).
fn accept(listener: &TcpListener, done: &AtomicBool) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if done.load(Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A server that reads one connection to its end.
fn receive_one(listener: TcpListener, done: Arc<AtomicBool>) -> JoinHandle<Option<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut s = accept(&listener, &done)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).ok()?;
        Some(got)
    })
}

/// A server that sends `data` on one connection and closes it.
fn send_one(listener: TcpListener, done: Arc<AtomicBool>, data: Vec<u8>) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        let Some(mut s) = accept(&listener, &done) else {
            return false;
        };
        s.write_all(&data).is_ok() && s.shutdown(Shutdown::Write).is_ok()
    })
}

/// Connects to the guest's listener (retrying until it is up), sends MESSAGE and reads
/// until the guest closes.
fn connect_to_guest(done: &AtomicBool) -> Result<(), String> {
    let addr: SocketAddr = format!("{GUEST}:5003").parse().unwrap();
    let mut last = String::new();
    while !done.load(Ordering::Acquire) {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.write_all(MESSAGE).map_err(|e| format!("write: {e}"))?;
                s.shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).map_err(|e| format!("read: {e}"))?;
                return Ok(());
            }
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Err(format!("never connected to the guest: {last}"))
}

#[test]
fn guest_and_host_talk_tcp_through_a_tap() {
    let test = "guest_and_host_talk_tcp_through_a_tap";
    if !linux_tier(test) || !can_make_namespaces(test) {
        return;
    }
    let ns = Namespace::create();
    let done = Arc::new(AtomicBool::new(false));
    let download = pattern(DOWNLOAD_LEN, 0x7e7);

    // The host side, inside the namespace: three servers and a client.
    let host = {
        let ns_name = ns.0.clone();
        let done = done.clone();
        let download = download.clone();
        std::thread::spawn(move || {
            enter_namespace(&ns_name);
            let bind = |port: u16| TcpListener::bind((HOST, port)).expect("bind");
            let upload = receive_one(bind(5001), done.clone());
            let sent = send_one(bind(5002), done.clone(), download);
            let echo = receive_one(bind(5004), done.clone());
            let client = connect_to_guest(&done);
            (
                upload.join().unwrap(),
                sent.join().unwrap(),
                echo.join().unwrap(),
                client,
            )
        })
    };

    // ash runs background jobs with stdin from /dev/null, so the guest's listener closes
    // its sending half at once and ends when the host closes.
    let script = format!(
        "ip link set eth0 up && ip addr add {GUEST}/24 dev eth0 || exit 10
         echo mac=$(cat /sys/class/net/eth0/address)
         echo features=$(cat /sys/class/net/eth0/device/features)
         nc -l -p 5003 > /tmp/in &
         seq 1 {UPLOAD_LINES} > /tmp/up
         nc {HOST} 5001 < /tmp/up || exit 11
         nc {HOST} 5002 < /dev/null > /tmp/down || exit 12
         echo down_len=$(wc -c < /tmp/down)
         nc {HOST} 5004 < /tmp/down || exit 13
         wait
         echo in=$(cat /tmp/in)
         echo operstate=$(cat /sys/class/net/eth0/operstate)
         echo rx_errors=$(cat /sys/class/net/eth0/statistics/rx_errors)
         echo rx_length_errors=$(cat /sys/class/net/eth0/statistics/rx_length_errors)"
    );
    let net = format!("tap={TAP},mac={GUEST_MAC}");
    let start = Instant::now();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, VMON, "run", "--net", &net, "--"])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmon in the namespace");
    let out = wait_with_timeout(child, RUN_TIMEOUT, start);
    done.store(true, Ordering::Release);
    let (upload, sent, echo, client) = host.join().unwrap();
    eprintln!(
        "vmon -> {} in {:.2?}\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.elapsed,
        out.stdout,
        out.stderr
    );

    assert_eq!(out.code(), 0, "the guest script failed");
    assert_eq!(
        field(&out.stdout, "mac"),
        GUEST_MAC,
        "MAC from config space"
    );
    assert_eq!(field(&out.stdout, "operstate"), "up", "link status");
    // One character per feature bit: checksum offload and TSO both ways, MAC and status,
    // mergeable receive buffers (so the download below arrives spread over small buffers,
    // and `rx_length_errors` would count a packet whose buffers were not all there).
    let features = field(&out.stdout, "features").as_bytes();
    for (bit, want) in [
        (0, b'1'),  // CSUM
        (1, b'1'),  // GUEST_CSUM
        (5, b'1'),  // MAC
        (7, b'1'),  // GUEST_TSO4
        (11, b'1'), // HOST_TSO4
        (15, b'1'), // MRG_RXBUF
        (16, b'1'), // STATUS
        (32, b'1'), // VERSION_1
    ] {
        assert_eq!(features.get(bit), Some(&want), "feature bit {bit}");
    }
    let want_up: String = (1..=UPLOAD_LINES).map(|i| format!("{i}\n")).collect();
    let upload = upload.expect("the guest never uploaded");
    assert!(
        upload == want_up.as_bytes(),
        "guest to host: {} bytes, want {}",
        upload.len(),
        want_up.len()
    );
    assert!(sent, "the host could not send its data");
    assert_eq!(
        field(&out.stdout, "down_len"),
        DOWNLOAD_LEN.to_string(),
        "host to guest length"
    );
    let echo = echo.expect("the guest never echoed the download");
    assert!(
        echo == download,
        "host to guest and back: {} bytes, first difference at {:?}",
        echo.len(),
        echo.iter().zip(&download).position(|(a, b)| a != b)
    );
    client.expect("host to guest connection");
    assert_eq!(
        field(&out.stdout, "in"),
        std::str::from_utf8(MESSAGE).unwrap().trim_end()
    );
    assert_eq!(field(&out.stdout, "rx_errors"), "0");
    assert_eq!(field(&out.stdout, "rx_length_errors"), "0");
    // TSO both ways: the tap counts a GSO packet as one, so each direction moved more
    // bytes than that many 1514-byte frames could hold (ACKs and ARP only add packets).
    for (dir, what) in [("tx", "host to guest"), ("rx", "guest to host")] {
        let bytes = ns.tap_counter(&format!("{dir}_bytes"));
        let packets = ns.tap_counter(&format!("{dir}_packets"));
        eprintln!("tap {dir}: {bytes} bytes in {packets} packets");
        assert!(
            packets * 1514 < bytes,
            "{what}: {bytes} bytes in {packets} packets, no segmentation offload"
        );
    }
}

#[test]
fn an_interface_that_is_not_a_tap_fails_with_one_line() {
    let test = "an_interface_that_is_not_a_tap_fails_with_one_line";
    if !linux_tier(test) || !can_make_namespaces(test) {
        return;
    }
    // Inside a fresh namespace, as root, an unknown name is created: to see an error,
    // name an interface that exists and is not a tap.
    let ns = Namespace::create();
    let start = Instant::now();
    let child = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, VMON, "run", "--net", "tap=lo", "--", "true",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(60), start);
    out.assert_one_line_error(64, "is not a single-queue tap");
}
