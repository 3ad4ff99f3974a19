//! Snapshot and restore with tiny guests on this machine's /dev/kvm: a guest counting on its
//! console is snapshotted, stopped, and continued by a new vmon process without a gap or a
//! repeat; restoring the same snapshot again rolls it back to the same moment; bad
//! snapshots are refused in one line.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::api_client::{get, post, wait_socket};
use common::{kvm_available, Scratch, VMON};
use vmon_tinyguest as tg;

macro_rules! require_kvm {
    () => {
        if !kvm_available(module_path!()) {
            return;
        }
    };
}

/// Reads the child's stdout until it has `n` complete lines (or it exits).
fn read_lines(child: &mut Child, buf: &mut Vec<u8>, n: usize) {
    let out = child.stdout.as_mut().unwrap();
    let mut chunk = [0u8; 4096];
    while buf.iter().filter(|&&b| b == b'\n').count() < n {
        let got = out.read(&mut chunk).unwrap();
        if got == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

fn finish(mut child: Child, buf: &mut Vec<u8>) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmon did not end");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.stdout.take().unwrap().read_to_end(buf).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
}

fn spawn(args: &[&str]) -> Child {
    Command::new(VMON)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Boots the counting guest (64 MiB) in `dir` with an API socket there, plus `extra` flags.
fn boot_counter(dir: &Scratch, extra: &[&str]) -> (Child, PathBuf) {
    let kernel = dir.file(
        "counter",
        &tg::elf64(&tg::count_forever(2000), tg::DEFAULT_LOAD_ADDR),
    );
    let socket = dir.path().join("api.sock");
    let mut args = vec![
        "run",
        "--memory",
        "64M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (spawn(&args), socket)
}

/// Every line of `text` is the next number after `first`.
fn assert_counts_from(text: &str, first: u64) -> u64 {
    let mut next = first;
    for line in text.lines() {
        assert_eq!(line, next.to_string(), "in:\n{text}");
        next += 1;
    }
    next
}

#[test]
fn a_counting_guest_continues_in_a_new_process_and_rolls_back() {
    require_kvm!();
    let dir = Scratch::new("snapshot-cycle");
    let (mut vm, socket) = boot_counter(&dir, &[]);
    let snap = dir.path().join("snap");
    let mut before = Vec::new();
    read_lines(&mut vm, &mut before, 20);
    wait_socket(&socket, Duration::from_secs(10));
    // A first snapshot that lets the VM run on; the second, into the same directory,
    // replaces it.
    let body = format!(r#"{{"dir": "{}", "stop": false}}"#, snap.display());
    let (status, answer) = post(&socket, "/v1/vm/snapshot", &body);
    assert_eq!(status, 200, "{answer}");
    read_lines(&mut vm, &mut before, 30);
    let body = format!(r#"{{"dir": "{}", "stop": true}}"#, snap.display());
    let (status, answer) = post(&socket, "/v1/vm/snapshot", &body);
    assert_eq!(status, 200, "{answer}");
    let (code, err) = finish(vm, &mut before);
    assert_eq!(code, 0, "{err}");
    assert!(snap.join("vm.state").is_file());
    let memory_files: Vec<_> = std::fs::read_dir(&snap)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("memory-"))
        .collect();
    assert_eq!(memory_files.len(), 1, "one memory file next to the state");

    // The original's output ends mid-count (maybe mid-line); the restored process goes on
    // from exactly there.
    let restored_at = |name: &str| {
        let sock = dir.path().join(name);
        let mut r = spawn(&[
            "restore",
            snap.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ]);
        let mut after = Vec::new();
        read_lines(&mut r, &mut after, 20);
        wait_socket(&sock, Duration::from_secs(10));
        assert_eq!(post(&sock, "/v1/vm/stop", "").0, 202);
        let (code, err) = finish(r, &mut after);
        assert_eq!(code, 0, "{err}");
        after
    };
    let first = restored_at("r1.sock");
    let mut joined = before.clone();
    joined.extend_from_slice(&first);
    let text = String::from_utf8(joined).unwrap();
    let end = assert_counts_from(&text, 0);
    assert!(end >= 40, "{text}");

    // Restoring again returns to the same moment: the same continuation.
    let second = restored_at("r2.sock");
    let common = first.len().min(second.len());
    assert_eq!(first[..common], second[..common], "rollback diverged");
}

#[test]
fn bad_snapshots_are_refused_in_one_line() {
    let dir = Scratch::new("snapshot-bad");
    let missing = dir.path().join("nothing-here");
    let out = common::run_vmon(
        &["restore", missing.to_str().unwrap()],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(66, "cannot restore");
    // A state file that is not one.
    let fake = dir.path().join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("vm.state"), b"{\"not\": \"a snapshot\"}").unwrap();
    let out = common::run_vmon(
        &["restore", fake.to_str().unwrap()],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(66, "cannot restore");
}

#[test]
fn a_corrupted_or_truncated_snapshot_is_refused_before_anything_runs() {
    require_kvm!();
    let dir = Scratch::new("snapshot-corrupt");
    let (mut vm, socket) = boot_counter(&dir, &[]);
    let snap = dir.path().join("snap");
    let mut out = Vec::new();
    read_lines(&mut vm, &mut out, 3);
    wait_socket(&socket, Duration::from_secs(10));
    let body = format!(r#"{{"dir": "{}", "stop": true}}"#, snap.display());
    assert_eq!(post(&socket, "/v1/vm/snapshot", &body).0, 200);
    finish(vm, &mut out);

    let state = snap.join("vm.state");
    let good = std::fs::read(&state).unwrap();
    // A flipped byte in the payload.
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 0x20;
    std::fs::write(&state, &bad).unwrap();
    let out = common::run_vmon(
        &["restore", snap.to_str().unwrap()],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(66, "corrupted");
    assert!(out.stdout.is_empty(), "nothing ran: {}", out.stdout);
    // Truncated.
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    let out = common::run_vmon(
        &["restore", snap.to_str().unwrap()],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(66, "truncated");
    // A memory file that lost its tail.
    std::fs::write(&state, &good).unwrap();
    let memory = std::fs::read_dir(&snap)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("memory-"))
        .unwrap()
        .path();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    f.set_len(32 << 20).unwrap();
    let out = common::run_vmon(
        &["restore", snap.to_str().unwrap()],
        Duration::from_secs(20),
    );
    out.assert_one_line_error(66, "bytes");
    assert!(out.stdout.is_empty(), "nothing ran: {}", out.stdout);
}

#[test]
fn clones_get_their_own_disks_and_do_not_collide() {
    require_kvm!();
    let dir = Scratch::new("snapshot-clones");
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let disk_arg = format!("path={}", disk.display());
    let (mut vm, socket) = boot_counter(&dir, &["--disk", &disk_arg]);
    let snap = dir.path().join("snap");
    let mut out = Vec::new();
    read_lines(&mut vm, &mut out, 3);
    wait_socket(&socket, Duration::from_secs(10));
    // The original keeps running (and keeps its disk locked).
    let body = format!(r#"{{"dir": "{}"}}"#, snap.display());
    assert_eq!(post(&socket, "/v1/vm/snapshot", &body).0, 200);

    // A clone on the same disk would be a second writer: refused.
    let same = common::run_vmon(
        &["restore", snap.to_str().unwrap()],
        Duration::from_secs(20),
    );
    same.assert_one_line_error(same.code(), "cannot restore");
    assert!(
        same.stderr.contains("lock") || same.stderr.contains("in use"),
        "{}",
        same.stderr
    );

    // Three clones, each with its own copy of the disk, run side by side.
    let clones: Vec<Child> = (0..3)
        .map(|i| {
            let copy = dir.file(&format!("clone{i}.img"), &vec![0u8; 1 << 20]);
            let arg = format!("0={}", copy.display());
            spawn(&["restore", snap.to_str().unwrap(), "--disk-path", &arg])
        })
        .collect();
    for mut c in clones {
        let mut lines = Vec::new();
        read_lines(&mut c, &mut lines, 3);
        assert!(
            lines.iter().filter(|&&b| b == b'\n').count() >= 3,
            "a clone did not run: {}",
            String::from_utf8_lossy(&lines)
        );
        let _ = c.kill();
        let _ = c.wait();
    }
    // A copy of the wrong size does not fit the guest's disk.
    let small = dir.file("small.img", &vec![0u8; 4096]);
    let arg = format!("0={}", small.display());
    let out = common::run_vmon(
        &["restore", snap.to_str().unwrap(), "--disk-path", &arg],
        Duration::from_secs(20),
    );
    assert_ne!(out.code(), 0);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert_eq!(post(&socket, "/v1/vm/stop", "").0, 202);
    finish(vm, &mut out.stdout.into_bytes());
}

/// A snapshot is written on a thread of its own: while it writes 256 MiB, other clients
/// still get answers (`info` says paused), and actions that would change the VM under it
/// (resume, a second snapshot) are refused with 409. Afterwards the VM runs on.
#[test]
fn the_api_answers_while_a_snapshot_is_written() {
    require_kvm!();
    let dir = Scratch::new("snapshot-api-busy");
    let kernel = dir.file(
        "touch",
        &tg::elf64(
            &tg::touch_then_count(2 << 20, 256 << 20, 2000),
            tg::DEFAULT_LOAD_ADDR,
        ),
    );
    let socket = dir.path().join("api.sock");
    let mut vm = spawn(&[
        "run",
        "--memory",
        "256M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    let mut out = Vec::new();
    read_lines(&mut vm, &mut out, 2);
    assert!(String::from_utf8_lossy(&out).starts_with("touched\n"));
    wait_socket(&socket, Duration::from_secs(10));

    let snap = dir.path().join("snap");
    let body = format!(r#"{{"dir": "{}"}}"#, snap.display());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (socket, done) = (socket.clone(), done.clone());
        std::thread::spawn(move || {
            let answer = post(&socket, "/v1/vm/snapshot", &body);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            answer
        })
    };
    // Answers that arrived while the snapshot was still being written. The probes start
    // once `info` shows the VM paused (the writer's request may not be in yet); one that
    // lands just after the snapshot ended may be answered differently, so what is required
    // is that some were refused for the snapshot, and none otherwise.
    // The second snapshot's directory cannot be created (its parent is a file): should it
    // land after the first ended, it fails without writing anything outside the scratch.
    let blocker = dir.file("not-a-dir", b"x");
    let impossible = format!(r#"{{"dir": "{}"}}"#, blocker.join("snap").display());
    let (mut infos, mut refusals) = (0, 0);
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        let (status, info) = get(&socket, "/v1/vm");
        assert_eq!(status, 200, "{info}");
        if !info.contains(r#""state":"paused""#) {
            continue;
        }
        infos += 1;
        let (resumed, why) = post(&socket, "/v1/vm/resume", "");
        let (again, why_again) = post(&socket, "/v1/vm/snapshot", &impossible);
        if resumed == 409 && again == 409 {
            assert!(why.contains("snapshot"), "{why}");
            assert!(why_again.contains("already being written"), "{why_again}");
            refusals += 1;
        }
    }
    let (status, report) = writer.join().unwrap();
    assert_eq!(status, 200, "{report}");
    assert!(
        infos > 0,
        "no answer while the snapshot was written: {report}"
    );
    assert!(
        refusals > 0,
        "resume and snapshot were never refused during the snapshot"
    );
    // The snapshot resumed the VM: it counts on.
    let (status, info) = get(&socket, "/v1/vm");
    assert_eq!(status, 200);
    assert!(info.contains(r#""state":"running""#), "{info}");
    let before = out.len();
    read_lines(&mut vm, &mut out, 4);
    assert!(out.len() > before);
    let _ = vm.kill();
    let _ = vm.wait();
}

/// vmon told to stop (SIGTERM) while a snapshot is being written does not finish it, and
/// leaves nothing half-written: the directory gets neither a state file nor an orphaned
/// memory file.
#[test]
fn a_snapshot_cut_short_by_sigterm_leaves_no_files() {
    require_kvm!();
    let dir = Scratch::new("snapshot-sigterm");
    let kernel = dir.file(
        "touch",
        &tg::elf64(
            &tg::touch_then_count(2 << 20, 512 << 20, 2000),
            tg::DEFAULT_LOAD_ADDR,
        ),
    );
    let socket = dir.path().join("api.sock");
    let mut vm = spawn(&[
        "run",
        "--memory",
        "512M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    let mut out = Vec::new();
    read_lines(&mut vm, &mut out, 1);
    assert!(String::from_utf8_lossy(&out).starts_with("touched\n"));
    wait_socket(&socket, Duration::from_secs(10));

    let snap = dir.path().join("snap");
    let body = format!(r#"{{"dir": "{}"}}"#, snap.display());
    let writer = {
        let socket = socket.clone();
        std::thread::spawn(move || post(&socket, "/v1/vm/snapshot", &body))
    };
    let memory_files = |snap: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(snap)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.trim_start_matches('.').starts_with("memory-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // SIGTERM as soon as the memory file is being written (512 MiB take some 400 ms), under
    // its temporary name.
    let deadline = Instant::now() + Duration::from_secs(20);
    while memory_files(&snap).is_empty() {
        assert!(Instant::now() < deadline, "the snapshot never started");
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: signalling our own child, which has not been reaped.
    unsafe { libc::kill(vm.id() as i32, libc::SIGTERM) };
    let (_, stderr) = finish(vm, &mut out);
    let (status, answer) = writer.join().unwrap();
    assert_eq!(status, 503, "{answer}\n{stderr}");
    assert!(answer.contains("vmon is exiting"), "{answer}");
    assert!(
        stderr.contains("a snapshot was still being written; removed its memory file"),
        "{stderr}"
    );
    assert!(!snap.join("vm.state").exists(), "a state file was written");
    assert_eq!(memory_files(&snap), Vec::<String>::new(), "{stderr}");
}
