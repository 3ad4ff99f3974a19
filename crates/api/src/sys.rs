//! The few libc calls std does not offer: sends that can neither block nor raise SIGPIPE,
//! non-blocking receives without switching the socket's mode, `poll`, and a listening socket
//! whose file gets its permissions before anyone can connect to it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Sends without raising SIGPIPE on a closed peer (the VMM's signal setup is not ours to
/// rely on). With `nonblocking`, a full socket buffer is `WouldBlock` instead of a wait.
pub(crate) fn send(fd: &impl AsRawFd, buf: &[u8], nonblocking: bool) -> io::Result<usize> {
    let mut flags = libc::MSG_NOSIGNAL;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call;
        // the kernel only reads it.
        let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives what is there without waiting, whatever the socket's blocking mode.
pub(crate) fn recv_nonblocking(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `poll(2)`; an interrupted call reports no events rather than an error, and the caller's
/// loop recomputes its deadlines anyway.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs,
    // which the kernel writes `revents` into.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        return Ok(0);
    }
    Err(e)
}

pub(crate) fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Longest path a `sockaddr_un` holds, without the terminating NUL.
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// A non-blocking, close-on-exec listening socket at `path` with mode 0600.
///
/// std's `UnixListener::bind` cannot set the mode before the file appears, and a `chmod`
/// afterwards leaves a window in which the umask's permissions apply. Linux gives the file
/// the mode of the socket's inode (less the umask), so `fchmod` before `bind` closes that
/// window; the `chmod` after covers kernels that ignore it.
pub(crate) fn bind_listener(path: &Path, backlog: i32) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_SOCKET_PATH || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: sockaddr_un is plain data for which all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `fd` is a valid descriptor; fchmod only changes its inode's mode.
    // Failure is tolerated: the chmod below still applies the mode.
    let _ = unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` does not exceed its size (the
    // path length was checked above).
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let listener = UnixListener::from(fd);
    if let Err(e) =
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
    {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: `listener` owns a valid, bound socket descriptor.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}
