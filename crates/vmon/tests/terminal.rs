//! With a terminal on stdin, vmon switches it to raw mode while the guest runs and restores
//! it on every way out: guest exit, crash, signal, and errors before the guest starts.

mod common;

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{first_line, kvm_available, spawn_vmon, Scratch};
use vmon_tinyguest as tg;

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the provided integers.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_lflag == b.c_lflag
        && a.c_cflag == b.c_cflag
}

/// Runs vmon with a pty as stdin; `during` is called once the guest has printed its first
/// line, with the child's pid, the pty's slave (vmon's stdin) and master (the keyboard).
/// Returns the exit code and the terminal settings before and after.
fn run_on_pty(
    args: &[&str],
    mut during: impl FnMut(u32, &OwnedFd, &OwnedFd),
) -> (i32, libc::termios, libc::termios) {
    let (master, slave) = openpty();
    let before = termios(&slave);
    let mut child = spawn_vmon(args, Stdio::from(slave.try_clone().unwrap()));
    first_line(&mut child);
    during(child.id(), &slave, &master);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmon did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    (status.code().unwrap_or(-1), before, termios(&slave))
}

#[test]
fn raw_while_running_restored_after_a_signal() {
    if !kvm_available("raw_while_running_restored_after_a_signal") {
        return;
    }
    let dir = Scratch::new("pty-signal");
    let kernel = dir.file(
        "g",
        &tg::elf64(&tg::print_then_spin(b"up\n"), tg::DEFAULT_LOAD_ADDR),
    );
    let mut raw_seen = false;
    let (code, before, after) = run_on_pty(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        |pid, slave, _| {
            let now = termios(slave);
            raw_seen = now.c_lflag & libc::ICANON == 0 && now.c_lflag & libc::ECHO == 0;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        },
    );
    assert!(
        raw_seen,
        "the terminal was not in raw mode while the guest ran"
    );
    assert_eq!(code, 143);
    assert!(same(&before, &after), "terminal not restored after SIGTERM");
}

#[test]
fn restored_after_guest_exit_and_crash() {
    if !kvm_available("restored_after_guest_exit_and_crash") {
        return;
    }
    let dir = Scratch::new("pty-exit");
    for (image, expected) in [
        (
            tg::elf64(
                &tg::serial_print_then_exit(b"bye\n", 3),
                tg::DEFAULT_LOAD_ADDR,
            ),
            3,
        ),
        (tg::elf64(&tg::triple_fault(), tg::DEFAULT_LOAD_ADDR), 76),
    ] {
        let kernel = dir.file("g", &image);
        let (code, before, after) = run_on_pty(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                "64M",
            ],
            |_, _, _| {},
        );
        assert_eq!(code, expected);
        assert!(
            same(&before, &after),
            "terminal not restored (exit {expected})"
        );
    }
}

#[test]
fn untouched_by_errors_before_the_guest_starts() {
    let (code, before, after) = run_on_pty(&["run", "--kernel", "/nonexistent"], |_, _, _| {});
    assert_eq!(code, 66);
    assert!(same(&before, &after));
}

#[test]
fn console_escape_quits() {
    if !kvm_available("console_escape_quits") {
        return;
    }
    let dir = Scratch::new("pty-escape");
    let kernel = dir.file(
        "g",
        &tg::elf64(&tg::print_then_spin(b"up\n"), tg::DEFAULT_LOAD_ADDR),
    );
    let kernel = kernel.to_str().unwrap();
    let (code, before, after) = run_on_pty(
        &["run", "--kernel", kernel, "--memory", "64M"],
        |_, _, master| {
            // Ctrl-A x, typed on the terminal.
            // SAFETY: writing two bytes from a valid buffer to the pty master.
            let n = unsafe { libc::write(master.as_raw_fd(), b"\x01x".as_ptr().cast(), 2) };
            assert_eq!(n, 2);
        },
    );
    assert_eq!(code, 130);
    assert!(same(&before, &after));
}
