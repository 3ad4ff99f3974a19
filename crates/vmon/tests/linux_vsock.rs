//! Linux tier: virtio-vsock between a stock guest kernel and Unix sockets on the host, in
//! both directions, with payloads large enough (300 KB) to run the credit flow many
//! times over. The guest side is `vmon-guest` (crates/guest-tools), added to the kit's
//! initramfs. Needs VT-x/AMD-V: on a PVM host scripts/test.sh runs these in the lab.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::guest_tools::guest_args;
use common::{field, linux_tier, run_vmon, spawn_vmon};

/// A boot in the lab takes 8-25 s; leave room for the transfers under emulation, inside
/// the 180 s scripts/test.sh gives each lab session.
const TIMEOUT: Duration = Duration::from_secs(150);
const BIG: usize = 300_000;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Echoes every connection on `listener` until EOF; counts the bytes.
fn echo_server(listener: UnixListener, total: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let total = total.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A scratch directory where Unix sockets can be created: in the lab /tmp is the host's
/// over 9p, which cannot hold sockets (ENXIO), while /dev/shm and /run are the lab's own
/// tmpfs.
struct SocketDir(std::path::PathBuf);

impl SocketDir {
    fn new(name: &str) -> SocketDir {
        for base in [std::env::temp_dir(), "/dev/shm".into(), "/run".into()] {
            let dir = base.join(format!("vmon-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            if std::fs::create_dir_all(&dir).is_err() {
                continue;
            }
            if UnixListener::bind(dir.join("probe")).is_ok() {
                let _ = std::fs::remove_file(dir.join("probe"));
                return SocketDir(dir);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("no directory here can hold Unix sockets");
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn guest_connects_to_host_unix_sockets() {
    if !linux_tier("guest_connects_to_host_unix_sockets") {
        return;
    }
    let dir = SocketDir::new("vsock-g2h");
    let socket = dir.path().join("v.sock");
    let echoed = Arc::new(AtomicU64::new(0));
    echo_server(
        UnixListener::bind(dir.path().join("v.sock_5000")).unwrap(),
        echoed.clone(),
    );
    let script = format!(
        "echo hello-from-guest | vmon-guest vsock-connect 2 5000; echo small=$?; \
         head -c {BIG} /dev/urandom > /tmp/big; \
         vmon-guest vsock-connect 2 5000 < /tmp/big > /tmp/back; echo big=$?; \
         cmp /tmp/big /tmp/back && echo same=yes; \
         wc -c < /tmp/back | sed 's/^/back=/'; \
         vmon-guest vsock-connect 2 5001 < /dev/null; echo refused=$?"
    );
    let mut args = vec!["run".to_string()];
    args.extend(guest_args());
    args.extend([
        "--vsock".into(),
        format!("cid=3,socket={}", socket.display()),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script,
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_vmon(&args, TIMEOUT);
    eprintln!(
        "vmon -> {} in {:.2?}\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.elapsed,
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code(), 0);
    assert!(
        out.stdout.lines().any(|l| l == "hello-from-guest"),
        "the echo came back"
    );
    assert_eq!(field(&out.stdout, "small"), "0");
    assert_eq!(field(&out.stdout, "big"), "0");
    assert_eq!(field(&out.stdout, "back").trim(), BIG.to_string());
    assert_eq!(field(&out.stdout, "same"), "yes");
    assert_eq!(
        field(&out.stdout, "refused"),
        "1",
        "no listener at PATH_5001: the guest's connect fails"
    );
    assert_eq!(echoed.load(Ordering::Relaxed), 17 + BIG as u64);
    assert!(!socket.exists(), "vmon removes its listening socket");
}

/// Reads vmon's stdout lines into a channel (and keeps them), stderr into a string.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    start: Instant,
}

impl Running {
    fn new(args: &[&str]) -> Running {
        let start = Instant::now();
        let mut child = spawn_vmon(args, Stdio::null());
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            child,
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
            start,
        }
    }

    fn wait_for_line(&mut self, want: &str) {
        let deadline = self.start + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(want) => return,
                Ok(_) => {}
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("no '{want}' from the guest; {}", self.report());
                }
            }
        }
    }

    /// Waits for vmon to end; returns its status and stdout.
    fn finish(mut self) -> (i32, String) {
        let deadline = self.start + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("vmon did not finish; {}", self.report());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = self.outputs();
        eprintln!(
            "vmon -> {:?} in {:.2?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            status.code(),
            self.start.elapsed()
        );
        (status.code().unwrap_or(-1), stdout)
    }

    fn outputs(&mut self) -> (String, String) {
        let join =
            |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }

    fn report(&mut self) -> String {
        let (stdout, stderr) = self.outputs();
        format!("stdout:\n{stdout}\nstderr:\n{stderr}")
    }
}

fn connect(socket: &std::path::Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    // The reply line, a byte at a time so nothing after it is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

#[test]
fn host_connects_to_a_guest_port() {
    if !linux_tier("host_connects_to_a_guest_port") {
        return;
    }
    let dir = SocketDir::new("vsock-h2g");
    let socket = dir.path().join("v.sock");
    let mut args = vec!["run".to_string()];
    args.extend(guest_args());
    args.extend([
        "--vsock".into(),
        format!("cid=3,socket={}", socket.display()),
        "--".into(),
        "vmon-guest".into(),
        "vsock-listen".into(),
        "6000".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Running::new(&args);
    vm.wait_for_line("listening on port 6000");

    // Nobody listens on 6001: the guest refuses and the client is closed without a reply.
    let (mut refused, reply) = connect(&socket, 6001);
    assert_eq!(reply, "", "no OK for a refused connection");
    let mut rest = Vec::new();
    assert_eq!(refused.read_to_end(&mut rest).unwrap(), 0);

    let (mut s, reply) = connect(&socket, 6000);
    let port: u32 = reply
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("reply {reply:?}"));
    assert!(port >= 1 << 30, "a host port from the local range: {port}");
    let data = payload(BIG);
    let mut writer = s.try_clone().unwrap();
    let sent = data.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");

    let (code, stdout) = vm.finish();
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&format!("vsock-listen: echoed {BIG} bytes")),
        "{stdout}"
    );
}
