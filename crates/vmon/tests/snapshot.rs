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

/// A small ext4 file system on a loop device, mounted in `dir`, that the test can freeze:
/// writes to a frozen file system wait until it thaws, as on storage that stopped
/// answering. Thawed, unmounted and detached on drop, whatever the test did.
struct FreezableFs {
    mount: PathBuf,
    device: String,
}

impl FreezableFs {
    /// None (having said why) where this host cannot: not root, no loop devices.
    fn new(dir: &Scratch) -> Option<FreezableFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: freezing a file system needs root");
            return None;
        }
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let run = |cmd: &str, args: &[&str]| -> Result<String, String> {
            let out = Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "{cmd} {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let image_s = image.to_str().unwrap();
        let device = match run("losetup", &["--find", "--show", image_s]) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: no loop device for a freezable file system ({e})");
                return None;
            }
        };
        let fs = FreezableFs { mount, device };
        // From here on a failure is the test's: a root host with loop devices has these.
        run("mkfs.ext4", &["-q", "-F", &fs.device]).unwrap();
        run("mount", &[&fs.device, fs.mount.to_str().unwrap()]).unwrap();
        Some(fs)
    }

    fn freeze(&self, frozen: bool) {
        let how = if frozen { "--freeze" } else { "--unfreeze" };
        let st = Command::new("fsfreeze")
            .args([how, self.mount.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "fsfreeze {how} failed");
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        let mount = self.mount.to_str().unwrap();
        let quietly = |cmd: &str, args: &[&str]| {
            let _ = Command::new(cmd).args(args).stderr(Stdio::null()).status();
        };
        quietly("fsfreeze", &["--unfreeze", mount]);
        // Lazily: a VM killed a moment ago may still hold the disk image open. The loop
        // device then goes once the file system is released.
        quietly("umount", &["-l", mount]);
        quietly("losetup", &["-d", &self.device]);
    }
}

/// Waits until vmon's thread named `name` (as the kernel truncates it) sleeps in the
/// kernel uninterruptibly: a disk thread whose write waits for a frozen file system.
fn wait_for_blocked_thread(pid: u32, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            if comm.trim_end() == name && state == Some(Some('D')) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} never blocked on the file system"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VM that a failed assertion must not leave running. Killed, not waited for: it may be
/// stuck on the frozen file system, which thaws after this.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("still running")
    }

    /// Kills the VM and fails the test with `what` and everything it printed.
    fn fail(&mut self, out: &mut Vec<u8>, what: &str) -> ! {
        let mut child = self.0.take().expect("still running");
        let _ = child.kill();
        let (code, err) = finish(child, out);
        panic!(
            "{what}; vmon ended with {code}, its output:\n{}\n{err}",
            String::from_utf8_lossy(out)
        );
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
        }
    }
}

/// A guest whose disk write waits on storage that stopped answering (a frozen file
/// system): a snapshot fails within its time limit, saying which disk, rather than hang
/// the API; the VM runs on, the write lands once the storage answers, and a snapshot then
/// succeeds.
#[test]
fn a_snapshot_on_storage_that_stopped_answering_fails_in_time_and_the_vm_runs_on() {
    require_kvm!();
    use tg::virtio::*;
    let dir = Scratch::new("snapshot-frozen");
    let Some(fs) = FreezableFs::new(&dir) else {
        return;
    };
    let disk = fs.mount.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    // The driver: one write of sector 0 from 0x5C bytes, then it waits (polling ISR, one
    // exit per look, so it can wait for hours) for the completion, prints what it saw in
    // ISR and the request's status, and waits until vmon is stopped (for the device to
    // leave LIVE, which it does not; ISR would not do: a resumed device may raise it).
    const DESC: u64 = 0x40_0000;
    const AVAIL: u64 = 0x40_1000;
    const USED: u64 = 0x40_2000;
    const HDR: u64 = 0x41_0000;
    const DATA: u64 = 0x41_1000;
    const STATUS_BYTE: u64 = 0x41_2000;
    let mut s = tg::script::Script::new();
    s.base_from_bar0(0, 1, 0).pci_write16(0, 1, 0, 0x04, 0x0006);
    s.write_rel(1, STATUS, 0)
        .write_rel(1, STATUS, ACK)
        .write_rel(1, STATUS, ACK | DRIVER)
        .write_rel(4, GF_SELECT, 1)
        .write_rel(4, GF, F_VERSION_1 >> 32)
        .write_rel(1, STATUS, ACK | DRIVER | FEATURES_OK)
        .write_rel(2, Q_SELECT, 0)
        .write_rel(2, Q_SIZE, u64::from(QUEUE_MAX));
    for (reg, addr) in [(Q_DESC, DESC), (Q_DRIVER, AVAIL), (Q_DEVICE, USED)] {
        s.write_rel(4, reg, addr).write_rel(4, reg + 4, 0);
    }
    s.write_rel(2, Q_ENABLE, 1).write_rel(1, STATUS, LIVE);
    s.write(8, HDR, u64::from(T_OUT))
        .write(8, HDR + 8, 0)
        .fill(DATA, 512, 0x5C)
        .write(1, STATUS_BYTE, 0xFF);
    for (i, (addr, len, flags, next)) in [
        (HDR, 16, NEXT, 1),
        (DATA, 512, NEXT, 2),
        (STATUS_BYTE, 1, W, 0),
    ]
    .into_iter()
    .enumerate()
    {
        for (at, value) in descriptor(DESC, i as u16, addr, len, flags, next) {
            s.write(8, at, value);
        }
    }
    s.write(2, AVAIL + 4, 0)
        .write(2, AVAIL + 2, 1)
        .write_rel(2, NOTIFY, 0)
        .print("sent\n")
        .wait_ne_rel(1, ISR, 0, u32::MAX)
        .read(1, STATUS_BYTE)
        .wait_ne_rel(1, STATUS, LIVE, u32::MAX);
    let kernel = dir.file("writer", &tg::script_elf(&s));
    let socket = dir.path().join("api.sock");

    fs.freeze(true);
    let mut vm = KillOnDrop(Some(spawn(&[
        "run",
        "--memory",
        "64M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--api-socket",
        socket.to_str().unwrap(),
    ])));
    let mut out = Vec::new();
    // The BAR's address (a value line), then "sent".
    read_lines(vm.child(), &mut out, 2);
    if !out.ends_with(b"\nsent\n") {
        vm.fail(&mut out, "the guest did not start its write");
    }
    wait_socket(&socket, Duration::from_secs(10));
    let pid = vm.child().id();
    wait_for_blocked_thread(pid, "virtio-blk disk");

    let snap = dir.path().join("snap");
    let body = format!(r#"{{"dir": "{}"}}"#, snap.display());
    let asked = Instant::now();
    let (status, answer) = post(&socket, "/v1/vm/snapshot", &body);
    let took = asked.elapsed();
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("disk0: requests still in flight after 5s (the storage is not answering)"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(15), "the refusal took {took:?}");
    assert!(!snap.join("vm.state").exists(), "no snapshot left behind");
    let (_, vm_info) = get(&socket, "/v1/vm");
    assert!(vm_info.contains("\"running\""), "{vm_info}");

    // The storage answers again: the write completes and the guest sees it done.
    fs.freeze(false);
    read_lines(vm.child(), &mut out, 4);
    // After the BAR: what the wait saw in ISR (the queue's bit), and the request's status.
    if tg::script::parse_values(&String::from_utf8_lossy(&out))[1..] != [1, S_OK] {
        vm.fail(
            &mut out,
            "the write did not complete once the storage answered",
        );
    }
    let (status, answer) = post(&socket, "/v1/vm/snapshot", &body);
    assert_eq!(status, 200, "{answer}");
    assert!(snap.join("vm.state").is_file());
    assert_eq!(post(&socket, "/v1/vm/stop", "").0, 202);
    let (code, err) = finish(vm.0.take().unwrap(), &mut out);
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written[..512].iter().all(|&b| b == 0x5C),
        "the write landed"
    );
    assert!(written[512..].iter().all(|&b| b == 0));
}
