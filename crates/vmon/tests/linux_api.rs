//! Linux tier, the management API: the stock Debian guest is driven through
//! `--api-socket` with curl (a real HTTP client) and `vmon ctl`: info, pause (the guest's
//! counter stops and its clock does not jump), resume, counters that move with guest disk
//! I/O, an orderly shutdown the guest obeys (ACPI power button), and a hard stop.
//! Runs in the lab on PVM hosts (see linux_guest.rs and scripts/test.sh).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{linux_tier, Scratch, VMON};

const BOOT: Duration = Duration::from_secs(120);

/// A guest running `script`, its stdout lines collected as they arrive.
struct Guest {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    socket: PathBuf,
}

impl Guest {
    fn start(dir: &Scratch, args: &[&str], script: &str) -> Guest {
        let socket = dir.path().join("api.sock");
        let mut child = Command::new(VMON)
            .args(["run", "--cpus", "2", "--memory", "1G", "--api-socket"])
            .arg(&socket)
            .args(args)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmon");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Guest {
            child,
            lines,
            socket,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_lines(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.lines().len() < n {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vmon ended ({status}) before {n} lines: {:?}", self.lines());
            }
            assert!(
                Instant::now() < deadline,
                "no {n} lines within {timeout:?}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_end(mut self, timeout: Duration) -> (i32, String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("vmon did not end within {timeout:?}: {:?}", self.lines());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        eprintln!("vmon -> {status}\nstderr:\n{err}");
        std::thread::sleep(Duration::from_millis(100));
        (status.code().unwrap_or(-1), err, self.lines())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl against the API socket: status and body.
fn curl(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-X", method, "--unix-socket"])
        .arg(socket)
        .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = cmd
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl is needed for the Linux-tier API test (apt-get install curl)");
    assert!(out.status.success(), "curl {method} {path}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn disk_reads(socket: &Path) -> u64 {
    let (status, body) = curl(socket, "GET", "/v1/counters", None);
    assert_eq!(status, 200, "{body}");
    let c = json(&body);
    let disk = c["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "disk0")
        .unwrap_or_else(|| panic!("no disk0 in {c}"))
        .clone();
    assert_eq!(disk["kind"], "block");
    disk["counters"]["read_requests"].as_u64().unwrap()
}

/// "N UPTIME" lines: the counter and the guest's own uptime in seconds.
fn parse(line: &str) -> (u64, f64) {
    let mut f = line.split_whitespace();
    let n = f.next().and_then(|x| x.parse().ok());
    let up = f.next().and_then(|x| x.parse().ok());
    match (n, up) {
        (Some(n), Some(up)) => (n, up),
        _ => panic!("unexpected guest line {line:?}"),
    }
}

#[test]
fn debian_guest_through_the_api() {
    if !linux_tier("debian_guest_through_the_api") {
        return;
    }
    let dir = Scratch::in_memory("linux-api");
    let img = dir.file("disk.img", &common::pattern(16 << 20, 0xa11));
    let disk = format!("path={}", img.display());
    // Each line: a counter and the guest's uptime; each iteration reads one 4 KiB block of
    // the disk with O_DIRECT, so the disk's counters move with the loop.
    let script = "i=0; while true; do \
        dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((i % 4096)) iflag=direct 2>/dev/null; \
        echo \"$i $(cut -d' ' -f1 /proc/uptime)\"; i=$((i+1)); sleep 0.2; done";
    let mut g = Guest::start(&dir, &["--disk", &disk], script);
    g.wait_lines(5, BOOT);

    let (status, body) = curl(&g.socket, "GET", "/v1/vm", None);
    assert_eq!(status, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], 2, "{info}");
    assert_eq!(info["memory_mib"], 1024, "{info}");

    let reads_before = disk_reads(&g.socket);

    // Pause for 3 s: no line arrives, and the guest's clock skips the pause.
    let (status, body) = curl(&g.socket, "POST", "/v1/vm/pause", None);
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(300));
    let at_pause = g.lines().len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(g.lines().len(), at_pause, "the guest ran while paused");
    let out = Command::new(VMON)
        .args(["ctl", "--api-socket"])
        .arg(&g.socket)
        .arg("info")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("paused"),
        "{out:?}"
    );

    let (status, _) = curl(&g.socket, "POST", "/v1/vm/resume", None);
    assert_eq!(status, 200);
    g.wait_lines(at_pause + 5, Duration::from_secs(60));
    let lines = g.lines();
    let parsed: Vec<(u64, f64)> = lines.iter().map(|l| parse(l)).collect();
    for (i, (n, _)) in parsed.iter().enumerate() {
        assert_eq!(*n, i as u64, "counter lines: {lines:?}");
    }
    // Across the pause the guest's uptime advanced by about one loop, not by 3 s more.
    let gap = parsed[at_pause].1 - parsed[at_pause - 1].1;
    let usual = parsed[1..at_pause]
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .fold(0.0f64, f64::max);
    eprintln!("uptime step across the pause {gap:.2} s, largest before it {usual:.2} s");
    assert!(
        gap < usual + 1.5,
        "the guest clock jumped {gap:.2} s across a 3 s pause (steps before: up to {usual:.2} s)"
    );

    // The disk's counters moved with the guest's reads.
    let reads_after = disk_reads(&g.socket);
    assert!(
        reads_after >= reads_before + 4,
        "read_requests {reads_before} -> {reads_after}"
    );
    let (status, metrics) = curl(&g.socket, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("vmon_device_read_requests_total{device=\"disk0\",kind=\"block\"}"),
        "{metrics}"
    );

    // Orderly shutdown: the guest hears the power button and powers itself off.
    let t0 = Instant::now();
    let (status, body) = curl(
        &g.socket,
        "POST",
        "/v1/vm/shutdown",
        Some(r#"{"timeout_s": 60}"#),
    );
    assert_eq!(status, 202, "{body}");
    let (code, stderr, _) = g.wait_end(Duration::from_secs(90));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("vmon-init: power button pressed: powering off"),
        "{stderr}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());

    // A hard stop needs nothing from the guest.
    let dir2 = Scratch::in_memory("linux-api-stop");
    let mut g = Guest::start(
        &dir2,
        &[],
        "i=0; while true; do echo \"$i 0\"; i=$((i+1)); sleep 0.2; done",
    );
    g.wait_lines(3, BOOT);
    let out = Command::new(VMON)
        .args(["ctl", "--api-socket"])
        .arg(&g.socket)
        .arg("stop")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, stderr, _) = g.wait_end(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("VM stopped through the API"), "{stderr}");
}
