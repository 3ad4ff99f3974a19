//! Linux tier, snapshot and restore: the stock Debian guest counts on its console and writes
//! each number to its own block of a virtio disk; it is snapshotted and stopped, then a new
//! vmon process restores it and it goes on counting: no number lost or repeated on the
//! console, and the disk holds every number in order.
//! Runs in the lab on PVM hosts (see linux_guest.rs and scripts/test.sh).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api_client::{post, wait_socket};
use common::{linux_tier, Scratch, VMON};

struct Vmon {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Vmon {
    fn spawn(args: &[&str]) -> Vmon {
        let mut child = Command::new(VMON)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut b) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&b[..n]);
            }
        });
        Vmon { child, out }
    }

    fn lines(&self) -> usize {
        self.out
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn wait_lines(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.lines() < n {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("vmon ended ({s}) early: {:?}", self.text());
            }
            assert!(Instant::now() < deadline, "no {n} lines: {:?}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Snapshots the VM through its API socket into `snap` with `stop`, and waits for this
    /// process to end (exit 0); returns what the guest printed.
    fn snapshot_and_stop(self, socket: &Path, snap: &Path) -> Vec<u8> {
        wait_socket(socket, Duration::from_secs(60));
        let t0 = Instant::now();
        let (status, body) = post(
            socket,
            "/v1/vm/snapshot",
            &format!(r#"{{"dir": "{}", "stop": true}}"#, snap.display()),
        );
        eprintln!("snapshot took {:?}: {body}", t0.elapsed());
        assert_eq!(status, 200, "{body}");
        let (code, err, out) = self.end();
        assert_eq!(code, 0, "{err}");
        out
    }

    fn end(mut self) -> (i32, String, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "vmon did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        std::thread::sleep(Duration::from_millis(200));
        let out = self.out.lock().unwrap().clone();
        eprintln!("vmon -> {status}\nstderr:\n{err}");
        (status.code().unwrap_or(-1), err, out)
    }
}

/// A test that fails midway must not leave a guest running (in the lab, ten of them would
/// starve every later test).
impl Drop for Vmon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_debian_guest_with_a_disk_continues_in_a_new_process() {
    if !linux_tier("a_debian_guest_with_a_disk_continues_in_a_new_process") {
        return;
    }
    let dir = Scratch::in_memory("linux-snapshot");
    let img = dir.file("count.img", &vec![0u8; 4 << 20]);
    let disk = format!("path={}", img.display());
    let s1 = dir.path().join("a.sock");
    let s2 = dir.path().join("b.sock");
    let snap = dir.path().join("snap");
    // Each number goes to the console and, synchronously (O_DIRECT), to block N of the disk.
    let script = "i=0; while true; do \
        printf '%-511s\\n' $i | dd of=/dev/vda bs=512 seek=$i oflag=direct conv=notrunc 2>/dev/null; \
        echo $i; i=$((i+1)); sleep 0.1; done";
    let mut vm = Vmon::spawn(&[
        "run",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--disk",
        &disk,
        "--api-socket",
        s1.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    vm.wait_lines(10);
    let before = vm.snapshot_and_stop(&s1, &snap);

    let t1 = Instant::now();
    let mut restored = Vmon::spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--api-socket",
        s2.to_str().unwrap(),
    ]);
    restored.wait_lines(1);
    eprintln!("restore to the first console line: {:?}", t1.elapsed());
    restored.wait_lines(10);
    wait_socket(&s2, Duration::from_secs(60));
    assert_eq!(post(&s2, "/v1/vm/stop", "").0, 202);
    let (code, err, after) = restored.end();
    assert_eq!(code, 0, "{err}");

    let mut all = before;
    all.extend_from_slice(&after);
    let text = String::from_utf8_lossy(&all).into_owned();
    let mut last = None;
    for (i, line) in text.lines().enumerate() {
        assert_eq!(line, i.to_string(), "console across the restore:\n{text}");
        last = Some(i);
    }
    let last = last.unwrap();
    assert!(last >= 19, "{text}");
    // Every number the guest printed is on the disk, in its block (it writes before it
    // prints; the number after the last printed one may or may not have reached the disk).
    let disk = std::fs::read(&img).unwrap();
    for n in 0..=last {
        let block = &disk[n * 512..n * 512 + 512];
        let got = String::from_utf8_lossy(block);
        assert_eq!(
            got.trim_end_matches(['\0', ' ', '\n']),
            n.to_string(),
            "block {n}"
        );
    }
}

/// The issue's own cycle: a guest process counts in memory and appends each number to a
/// file on an ext4 filesystem on its virtio disk (synced each time), and prints it. It is
/// snapshotted and stopped mid-count; a new vmon process restores it, the count goes on to
/// 40, the guest unmounts the filesystem and exits. The console holds 0..=39 without a gap
/// or repeat across the two processes, and so does the file (read on the host with
/// debugfs), and the filesystem is clean.
#[test]
fn a_guest_appending_to_a_file_on_ext4_continues_in_a_new_process() {
    if !linux_tier("a_guest_appending_to_a_file_on_ext4_continues_in_a_new_process") {
        return;
    }
    let dir = Scratch::in_memory("linux-snapshot-ext4");
    let img = dir.path().join("data.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(mkfs.success());
    let disk = format!("path={}", img.display());
    let s1 = dir.path().join("a.sock");
    let snap = dir.path().join("snap");
    let script = "mkdir -p /data && mount -t ext4 /dev/vda /data || exit 3; i=0; \
        while [ $i -lt 40 ]; do echo $i >> /data/count; sync; echo $i; i=$((i+1)); \
        sleep 0.1; done; umount /data || exit 4";
    let mut vm = Vmon::spawn(&[
        "run",
        "--memory",
        "512M",
        "--disk",
        &disk,
        "--api-socket",
        s1.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    vm.wait_lines(10);
    let before = vm.snapshot_and_stop(&s1, &snap);
    let printed_before = String::from_utf8_lossy(&before).lines().count();
    assert!(printed_before < 40, "the count ended before the snapshot");

    let restored = Vmon::spawn(&["restore", snap.to_str().unwrap()]);
    // The guest ends the count itself, unmounts and exits 0.
    let (code, err, after) = restored.end();
    assert_eq!(code, 0, "the restored guest's script failed: {err}");
    let mut all = before;
    all.extend_from_slice(&after);
    let console = String::from_utf8_lossy(&all).into_owned();
    let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    assert_eq!(
        console.lines().collect::<Vec<_>>(),
        expected,
        "console across the restore"
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /count"])
        .arg(&img)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs (e2fsprogs)");
    let file = String::from_utf8_lossy(&cat.stdout).into_owned();
    assert_eq!(
        file.lines().collect::<Vec<_>>(),
        expected,
        "the file across the restore"
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// After a restore the old host connections are gone (the device tells the guest with a
/// TRANSPORT_RESET), and a connection made through the clone's new vsock socket reaches
/// the guest's listener and echoes.
#[test]
fn a_vsock_connection_after_restore_works() {
    if !linux_tier("a_vsock_connection_after_restore_works") {
        return;
    }
    let dir = Scratch::in_memory("linux-snapshot-vsock");
    let s1 = dir.path().join("a.sock");
    let s2 = dir.path().join("b.sock");
    let v1 = dir.path().join("v1.sock");
    let v2 = dir.path().join("v2.sock");
    let snap = dir.path().join("snap");
    let mut args: Vec<String> = vec!["run".into(), "--cpus".into(), "2".into()];
    args.extend(common::guest_tools::guest_args());
    args.extend([
        "--vsock".into(),
        format!("cid=3,socket={}", v1.display()),
        "--api-socket".into(),
        s1.display().to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "echo listening; while true; do vmon-guest vsock-listen 6000; echo served=$?; done".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vmon::spawn(&args);
    vm.wait_lines(1);
    // Let the listener get to accept().
    std::thread::sleep(Duration::from_secs(2));
    vm.snapshot_and_stop(&s1, &snap);

    let mut restored = Vmon::spawn(&[
        "restore",
        snap.to_str().unwrap(),
        "--api-socket",
        s2.to_str().unwrap(),
        "--vsock-socket",
        v2.to_str().unwrap(),
    ]);
    wait_socket(&s2, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !v2.exists() {
        assert!(
            Instant::now() < deadline,
            "no vsock socket at {}",
            v2.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn = UnixStream::connect(&v2).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    conn.write_all(b"CONNECT 6000\n").unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        assert_eq!(conn.read(&mut byte).unwrap(), 1, "vsock closed: {reply:?}");
        reply.push(byte[0]);
    }
    assert!(
        reply.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    conn.write_all(b"after-restore\n").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = String::new();
    conn.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "after-restore\n");
    // vmon-guest reports what it echoed, then the loop prints its status.
    restored.wait_lines(2);
    assert!(restored.text().contains("served=0"), "{}", restored.text());
    assert_eq!(post(&s2, "/v1/vm/stop", "").0, 202);
    let (code, err, _) = restored.end();
    assert_eq!(code, 0, "{err}");
}

/// Ten clones of one snapshot run at once, each on its own copy of the disk, and each
/// reports its own identity: the guest reads the first block of its disk (O_DIRECT, so from
/// the device, not a cache the snapshot carried) once a second and prints it.
#[test]
fn ten_clones_run_at_once_with_their_own_identity() {
    if !linux_tier("ten_clones_run_at_once_with_their_own_identity") {
        return;
    }
    const CLONES: usize = 10;
    let dir = Scratch::in_memory("linux-snapshot-clones");
    let block = |text: &str| {
        let mut b = text.as_bytes().to_vec();
        b.resize(1 << 20, b' ');
        b
    };
    let img = dir.file("original.img", &block("identity=original"));
    let disk = format!("path={},readonly=on", img.display());
    let s1 = dir.path().join("a.sock");
    let snap = dir.path().join("snap");
    let script = "while true; do \
        dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | cut -c1-20 | head -1; \
        sleep 1; done";
    let mut vm = Vmon::spawn(&[
        "run",
        "--memory",
        "256M",
        "--disk",
        &disk,
        "--api-socket",
        s1.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    vm.wait_lines(2);
    let out = vm.snapshot_and_stop(&s1, &snap);
    assert!(String::from_utf8_lossy(&out).contains("identity=original"));

    let mut clones: Vec<(String, Vmon)> = (0..CLONES)
        .map(|i| {
            let id = format!("identity=clone-{i:02}");
            let copy = dir.file(&format!("clone{i}.img"), &block(&id));
            let arg = format!("0={}", copy.display());
            let v = Vmon::spawn(&["restore", snap.to_str().unwrap(), "--disk-path", &arg]);
            (id, v)
        })
        .collect();
    for (id, v) in &mut clones {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !v.text().contains(id.as_str()) {
            if let Some(s) = v.child.try_wait().unwrap() {
                panic!("clone {id} ended ({s}): {}", v.text());
            }
            assert!(Instant::now() < deadline, "{id} never showed: {}", v.text());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !v.text().contains("identity=original"),
            "{id}: {}",
            v.text()
        );
    }
    // All ten were running at the same time.
    for (id, v) in &mut clones {
        if let Some(status) = v.child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = v.child.stderr.take().unwrap().read_to_string(&mut err);
            panic!(
                "{id} had ended ({status}); stderr: {err}; stdout: {}",
                v.text()
            );
        }
    }
    for (_, mut v) in clones {
        let _ = v.child.kill();
        let _ = v.child.wait();
    }
}
