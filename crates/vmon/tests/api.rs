//! The management API on a live VM, in the tiny-guest tier (the machine's own /dev/kvm):
//! a guest that counts on its console is paused, resumed, counted, stopped and shut down
//! through `--api-socket`, by raw HTTP, by curl (when installed) and by `vmon ctl`; hostile
//! clients get precise errors and the guest keeps counting.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api_client::{http, parse_response};
use common::{kvm_available, Scratch, VMON};
use vmon_tinyguest as tg;

macro_rules! require_kvm {
    () => {
        if !kvm_available(module_path!()) {
            return;
        }
    };
}

/// A VM running the counting guest, its console lines collected as they arrive.
struct LiveVm {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    socket: PathBuf,
    started: Instant,
    _dir: Scratch,
}

impl LiveVm {
    fn start(name: &str, extra: &[&str]) -> LiveVm {
        let dir = Scratch::new(name);
        let kernel = dir.file(
            "counter",
            &tg::elf64(&tg::count_forever(2000), tg::DEFAULT_LOAD_ADDR),
        );
        let socket = dir.path().join("api.sock");
        let mut child = Command::new(VMON)
            .args(["run", "--memory", "64M", "--kernel"])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&socket)
            .args(extra)
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
        let vm = LiveVm {
            child: Some(child),
            lines,
            socket,
            started: Instant::now(),
            _dir: dir,
        };
        vm.wait_for(|n| n >= 3, "the guest to start counting");
        vm
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn wait_for(&self, what: impl Fn(usize) -> bool, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !what(self.count()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {why}: {} lines after {:?}",
                self.count(),
                self.started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every line is the next number: nothing lost, nothing repeated.
    fn assert_contiguous(&self) {
        let lines = self.lines.lock().unwrap();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l, &i.to_string(), "line {i} of the counter");
        }
    }

    /// Waits for vmon to end; its stdout went to the line collector.
    fn finish(mut self, timeout: Duration) -> Finished {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmon did not end within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        Finished {
            code: status.code().unwrap_or(-1),
            stderr,
        }
    }
}

impl Drop for LiveVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Finished {
    code: i32,
    stderr: String,
}

impl Finished {
    fn code(&self) -> i32 {
        self.code
    }
}

/// One HTTP/1.1 exchange on a fresh connection: status and body.
fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(VMON)
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmon ctl")
}

fn curl_available() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn pause_resume_counters_and_stop_through_the_api() {
    require_kvm!();
    let vm = LiveVm::start("api-cycle", &[]);

    let (status, body) = http(&vm.socket, "GET", "/v1/vm", None);
    assert_eq!(status, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], 1, "{info}");
    assert_eq!(info["memory_mib"], 64, "{info}");

    let exits_before = {
        let (status, body) = http(&vm.socket, "GET", "/v1/counters", None);
        assert_eq!(status, 200, "{body}");
        json(&body)["vcpus"][0]["exits"]["io_out"].as_u64().unwrap()
    };
    assert!(exits_before > 0);

    // Pause: the counter stops advancing and the state says so.
    let (status, body) = http(&vm.socket, "POST", "/v1/vm/pause", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["state"], "paused");
    // Lines already in the pipe may still arrive; after that, nothing.
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = vm.count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.count(),
        paused_at,
        "the guest kept counting while paused"
    );
    let (_, body) = http(&vm.socket, "GET", "/v1/vm", None);
    assert_eq!(json(&body)["state"], "paused");
    // Pausing twice is not an error.
    assert_eq!(http(&vm.socket, "PUT", "/v1/vm/pause", None).0, 200);

    // Resume: it continues with the next number.
    let (status, body) = http(&vm.socket, "POST", "/v1/vm/resume", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["state"], "running");
    vm.wait_for(
        |n| n >= paused_at + 10,
        "the counter to advance after resume",
    );
    vm.assert_contiguous();

    // Counters moved with the guest's console output; Prometheus text has them too.
    let (_, body) = http(&vm.socket, "GET", "/v1/counters", None);
    let counters = json(&body);
    let exits_after = counters["vcpus"][0]["exits"]["io_out"].as_u64().unwrap();
    assert!(
        exits_after > exits_before,
        "{exits_before} -> {exits_after}"
    );
    let (status, metrics) = http(&vm.socket, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("vmon_vcpu_exits_total{vcpu=\"0\",reason=\"io_out\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE vmon_vcpu_exits_total counter"));

    let out = ctl(&vm.socket, &["info"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("running"), "{text}");
    let out = ctl(&vm.socket, &["counters", "--json"]);
    assert!(out.status.success(), "{out:?}");
    json(&String::from_utf8_lossy(&out.stdout));

    if curl_available() {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--unix-socket"])
            .arg(&vm.socket)
            .arg("http://localhost/v1/vm")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(json(&String::from_utf8_lossy(&out.stdout))["vcpus"], 1);
    } else {
        eprintln!("curl is not installed: checked with raw HTTP only");
    }

    // A hard stop ends vmon at once, status 0, one line saying why.
    let (status, body) = http(&vm.socket, "POST", "/v1/vm/stop", None);
    assert_eq!(status, 202, "{body}");
    let socket = vm.socket.clone();
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("VM stopped through the API"),
        "{}",
        out.stderr
    );
    assert!(!socket.exists(), "the API socket outlived vmon");
}

#[test]
fn metrics_file_gets_json_lines() {
    require_kvm!();
    let dir = Scratch::new("api-metrics-file");
    let file = dir.path().join("m.jsonl");
    let vm = LiveVm::start(
        "api-metrics-file-vm",
        &[
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-interval",
            "1",
        ],
    );
    std::thread::sleep(Duration::from_millis(2600));
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/stop", None).0, 202);
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let text = std::fs::read_to_string(&file).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert!(records.len() >= 2, "{text}");
    let first = records[0]["vcpus"][0]["exits"]["io_out"].as_u64().unwrap();
    let last = records[records.len() - 1]["vcpus"][0]["exits"]["io_out"]
        .as_u64()
        .unwrap();
    assert!(last > first, "{text}");
}

#[test]
fn a_guest_that_ignores_the_power_button_is_stopped_after_the_timeout() {
    require_kvm!();
    let vm = LiveVm::start("api-shutdown-timeout", &[]);
    let t0 = Instant::now();
    let (status, body) = http(
        &vm.socket,
        "POST",
        "/v1/vm/shutdown",
        Some(r#"{"timeout_s": 1}"#),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(json(&body)["state"], "shutting-down");
    let (_, body) = http(&vm.socket, "GET", "/v1/vm", None);
    assert_eq!(json(&body)["state"], "shutting-down");
    // Not pausable or resumable while shutting down.
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/pause", None).0, 409);
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/resume", None).0, 409);
    // A second request cannot push the deadline out, and the answer says so.
    let (status, body) = http(
        &vm.socket,
        "POST",
        "/v1/vm/shutdown",
        Some(r#"{"timeout_s": 60}"#),
    );
    assert_eq!(status, 202, "{body}");
    assert!(json(&body)["timeout_s"].as_u64().unwrap() <= 1, "{body}");
    let out = vm.finish(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(out.code(), 75, "{}", out.stderr);
    assert!(
        out.stderr.contains("did not power off within 1 s"),
        "{}",
        out.stderr
    );
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn hostile_clients_get_errors_and_the_guest_keeps_running() {
    require_kvm!();
    let vm = LiveVm::start("api-hostile", &[]);
    let s = &vm.socket;
    // Idle clients that never send a byte, held open through the whole test.
    let idle: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(s).unwrap()).collect();

    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("GET", "/v1/nope", None, 404),
        ("DELETE", "/v1/vm", None, 405),
        ("GET", "/v1/vm/pause", None, 405),
        ("POST", "/v1/vm/shutdown", Some("{not json"), 400),
        (
            "POST",
            "/v1/vm/shutdown",
            Some(r#"{"timeout_s": "soon"}"#),
            400,
        ),
        (
            "POST",
            "/v1/vm/shutdown",
            Some(r#"{"timeout_s": 5, "x": 1}"#),
            400,
        ),
        (
            "POST",
            "/v1/vm/shutdown",
            Some(r#"{"timeout_s": 999999}"#),
            400,
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, text) = http(s, method, path, *body);
        assert_eq!(status, *want, "{method} {path} {body:?}: {text}");
        assert!(json(&text)["error"].is_string(), "{text}");
    }
    let (_, text) = http(
        s,
        "POST",
        "/v1/vm/shutdown",
        Some(r#"{"timeout_s": "soon"}"#),
    );
    assert!(
        text.contains("timeout_s"),
        "the error names the field: {text}"
    );

    // An oversized body is refused from its Content-Length, unread.
    let mut big = UnixStream::connect(s).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    big.write_all(b"POST /v1/vm/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = big.read_to_string(&mut resp);
    assert_eq!(parse_response(&resp).0, 413, "{resp}");

    // Garbage instead of HTTP.
    let mut junk = UnixStream::connect(s).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    junk.write_all(b"\x00\x01\x02 hello\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = junk.read_to_string(&mut resp);
    assert_eq!(parse_response(&resp).0, 400, "{resp}");

    // Many clients at once: every one gets an answer (a 200, or 503 past the limit).
    let before = vm.count();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let s = s.to_path_buf();
            std::thread::spawn(move || http(&s, "GET", "/v1/vm", None).0)
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|&c| c == 200 || c == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");

    // Through all of it the guest counted on and was never paused.
    vm.wait_for(|n| n > before + 20, "the guest to keep counting");
    drop(idle);
    let (status, body) = http(s, "GET", "/v1/vm", None);
    assert_eq!(status, 200);
    assert_eq!(json(&body)["state"], "running");
    vm.assert_contiguous();
}

#[test]
fn ctl_reports_a_missing_socket_in_one_line() {
    let dir = Scratch::new("api-ctl-missing");
    let out = ctl(&dir.path().join("nope.sock"), &["info"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vmon: "), "{err}");
    assert!(err.contains("nope.sock"), "{err}");
}

#[test]
fn a_spinning_guest_is_kicked_out_to_pause() {
    require_kvm!();
    // `jmp $` never exits to vmon on its own: only the kick signal can stop it.
    let dir = Scratch::new("api-spin");
    let kernel = dir.file(
        "spin",
        &tg::elf64(&tg::print_then_spin(b"spinning\n"), tg::DEFAULT_LOAD_ADDR),
    );
    let socket = dir.path().join("api.sock");
    let mut child = Command::new(VMON)
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "spinning\n");
    // Let the vCPU get past its last console write and into the loop.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (status, body) = http(&socket, "POST", "/v1/vm/pause", None);
    let took = t0.elapsed();
    assert_eq!(status, 200, "{body}");
    eprintln!("pause of a spinning vCPU took {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (_, body) = http(&socket, "GET", "/v1/counters", None);
    let c = json(&body);
    assert!(
        c["vcpus"][0]["exits"]["interrupted"].as_u64().unwrap() >= 1,
        "{c}"
    );
    assert_eq!(http(&socket, "POST", "/v1/vm/resume", None).0, 200);
    let (_, body) = http(&socket, "GET", "/v1/vm", None);
    assert_eq!(json(&body)["state"], "running");
    // Stopping a paused VM works as well.
    assert_eq!(http(&socket, "POST", "/v1/vm/pause", None).0, 200);
    assert_eq!(http(&socket, "POST", "/v1/vm/stop", None).0, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmon did not stop");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_log_goes_to_the_log_file_and_the_guest_output_does_not() {
    require_kvm!();
    let dir = Scratch::new("api-log-file");
    let log = dir.path().join("vmon.log");
    let vm = LiveVm::start(
        "api-log-file-vm",
        &["--log-level", "info", "--log-file", log.to_str().unwrap()],
    );
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/pause", None).0, 200);
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/resume", None).0, 200);
    assert_eq!(http(&vm.socket, "POST", "/v1/vm/stop", None).0, 202);
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.code(), 0);
    // stderr has only vmon's one-line outcome; the log lines are in the file.
    assert_eq!(out.stderr, "vmon: VM stopped through the API\n");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("VM paused"), "{text}");
    assert!(text.contains("VM resumed"), "{text}");
    // The guest's console (one number per line) never reaches the log.
    assert!(
        !text.lines().any(|l| l.trim().parse::<u64>().is_ok()),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour codes in a file: {text}");
}

#[test]
fn metrics_options_that_would_hang_or_spin_are_refused() {
    let dir = Scratch::new("api-metrics-bad");
    let kernel = dir.file("g", &tg::elf64(&tg::exit_with(0), tg::DEFAULT_LOAD_ADDR));
    let k = kernel.to_str().unwrap();
    let m = dir.path().join("m.jsonl");
    let out = common::run_vmon(
        &[
            "run",
            "--kernel",
            k,
            "--metrics-file",
            m.to_str().unwrap(),
            "--metrics-interval",
            "0",
        ],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(64, "--metrics-interval");
    // A FIFO nobody reads would block the main loop: refused at once, not hung on.
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = common::run_vmon(
        &[
            "run",
            "--kernel",
            k,
            "--metrics-file",
            fifo.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_ne!(out.code(), 0);
    assert!(out.stderr.contains("not a regular file"), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}
