//! Host signals: SIGINT/SIGTERM/SIGHUP arrive on a signalfd read by the main loop, and a
//! real-time signal kicks vCPU threads out of `KVM_RUN`.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals that stop a VM cleanly.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: `set` is valid and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// A signalfd for [`STOP_SIGNALS`]. Creating it blocks those signals in the calling thread,
/// and threads spawned afterwards inherit the mask, so only the signalfd sees them.
pub struct StopSignals {
    fd: OwnedFd,
}

impl StopSignals {
    pub fn new() -> io::Result<Self> {
        let set = sigset(&STOP_SIGNALS);
        // SAFETY: valid set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new descriptor for a valid set.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        Ok(StopSignals {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next pending stop signal, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n as usize == size).then_some(info.ssi_signo as i32)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        let set = sigset(&STOP_SIGNALS);
        // SAFETY: valid set. Pending signals stay queued and are delivered with their
        // default action once unblocked, which is what a second Ctrl-C should do.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

/// The signal used to interrupt `KVM_RUN` on a vCPU thread.
pub fn vcpu_kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a no-op handler for the kick signal: its only job is to make `KVM_RUN` return
/// EINTR (the default action would kill the process).
pub fn install_vcpu_kick_handler() -> io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(vcpu_kick_signal(), ignore_kick)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}
