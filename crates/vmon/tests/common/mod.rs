//! Shared helpers for vmon's integration tests: gating on KVM, running the binary with a
//! deadline, and scratch files.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub mod api_client;
pub mod guest_tools;

pub const VMON: &str = env!("CARGO_BIN_EXE_vmon");

/// The binary [`spawn_vmon`] and [`run_vmon`] run: `VMON_BIN` (scripts/test.sh points it at
/// the static release build for a second pass of the tiny guests) or the one cargo built.
pub fn vmon_bin() -> String {
    std::env::var("VMON_BIN").unwrap_or_else(|_| VMON.to_string())
}

/// Whether a Linux-tier test (stock Debian kernel) can run here. In the lab, or wherever
/// `VMON_LINUX_TIER=1`, it must; on a PVM host it skips (scripts/test.sh runs it in the lab).
pub fn linux_tier(test: &str) -> bool {
    if std::env::var("VMON_LINUX_TIER").as_deref() == Ok("1") {
        assert!(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            "{test}: VMON_LINUX_TIER=1 but /dev/kvm cannot be opened"
        );
        return true;
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "SKIPPED {test}: this host's KVM is PVM, where a stock kernel cannot boot; \
             scripts/test.sh runs the Linux tier inside the lab (scripts/lab.sh)"
        );
        return false;
    }
    kvm_available(test)
}

/// Whether tests that need /dev/kvm can run. With VMON_REQUIRE_KVM=1 (set by .ci/run
/// wherever /dev/kvm exists) a missing or unusable KVM fails the test instead of skipping it.
pub fn kvm_available(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match usable {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("VMON_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: VMON_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED {test}: /dev/kvm cannot be opened ({e}); set up KVM to run it");
            false
        }
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Asserts the failure was reported as one `vmon: ...` line, without panic or backtrace.
    pub fn assert_one_line_error(&self, code: i32, needle: &str) {
        assert_eq!(self.code(), code, "exit status; stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one line on stderr, got: {:?}",
            self.stderr
        );
        assert!(lines[0].starts_with("vmon: "), "{:?}", lines[0]);
        assert!(
            lines[0].contains(needle),
            "{:?} does not mention {needle:?}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{}", self.stderr);
    }
}

/// Starts vmon with `args` and `stdin`; its stdout and stderr are pipes.
pub fn spawn_vmon(args: &[&str], stdin: Stdio) -> Child {
    Command::new(vmon_bin())
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmon")
}

/// Reads the first line the guest prints: once it is there, the guest is running.
pub fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let _ = std::io::BufRead::read_line(&mut stdout, &mut line);
    line
}

/// Runs vmon with `args`, stdin from /dev/null, killing it after `timeout`.
pub fn run_vmon(args: &[&str], timeout: Duration) -> Output {
    run_vmon_env(args, &[], timeout)
}

pub fn run_vmon_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = Command::new(vmon_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let child = cmd.spawn().expect("spawn vmon");
    wait_with_timeout(child, timeout, start)
}

pub fn wait_with_timeout(mut child: Child, timeout: Duration, start: Instant) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let pid = child.id();
            let _ = child.kill();
            // A process stuck inside the kernel cannot be killed; do not wait for it forever
            // (nor for its pipes): report where its threads are and fail this test only.
            let kill_deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < kill_deadline {
                if child.try_wait().unwrap().is_some() {
                    let out = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
                    let err = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
                    panic!("vmon timed out after {timeout:?}; stdout: {out}\nstderr: {err}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!(
                "vmon timed out after {timeout:?} and could not be killed; its threads:\n{}",
                thread_report(pid)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    Output {
        status,
        stdout: String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned(),
        elapsed,
    }
}

/// Name, state and kernel stack of every thread of `pid` (the stacks need root).
fn thread_report(pid: u32) -> String {
    let mut report = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("?");
        report.push_str(&format!(
            "- {} ({}) state {state}\n{}",
            read("comm").trim(),
            path.display(),
            read("stack")
        ));
    }
    report
}

/// A scratch directory removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// A scratch directory in memory (/dev/shm) when there is one: disk images there are
    /// fast and support hole punching, unlike the lab's /tmp (the host's, over 9p, sync).
    pub fn in_memory(name: &str) -> Scratch {
        let shm = Path::new("/dev/shm");
        let writable = shm.is_dir()
            && std::fs::write(shm.join(format!(".vmon-probe-{}", std::process::id())), b"").is_ok();
        let _ = std::fs::remove_file(shm.join(format!(".vmon-probe-{}", std::process::id())));
        if writable {
            Self::new_in(shm, name)
        } else {
            Self::new(name)
        }
    }

    fn new_in(base: &Path, name: &str) -> Scratch {
        let dir = base.join(format!(
            "vmon-test-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs vmon with a deadline and logs the whole run (arguments, status, time, both
/// streams) to the test's stderr, which the harness shows when the test fails.
pub fn run_guest(args: &[&str], timeout: Duration) -> Output {
    let out = run_vmon(args, timeout);
    eprintln!(
        "vmon {args:?} -> {} in {:.2?}\nstdout:\n{}\nstderr:\n{}",
        out.code(),
        out.elapsed,
        out.stdout,
        out.stderr
    );
    out
}

/// The value of a `key=value` line a guest printed.
pub fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in guest output:\n{stdout}"))
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
