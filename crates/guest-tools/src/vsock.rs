//! AF_VSOCK stream sockets: an echo server for one connection, and a stdin/stdout client.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{exact, number};

/// VMADDR_CID_ANY: accept on every CID of this guest.
const CID_ANY: u32 = libc::VMADDR_CID_ANY;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: creates a socket; no memory is involved.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown on a socket we own; no memory is involved.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

/// Copies `from` to `to` until EOF; returns the bytes copied.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

/// `vsock-listen PORT`: accepts one connection, echoes it, half-closes, and reports.
pub fn listen_cmd(args: &[String]) -> Result<(), String> {
    let [port] = exact::<1>(args, "PORT")?;
    let port: u32 = number("port", port)?;
    let s = socket().map_err(|e| format!("socket: {e}"))?;
    let a = address(CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
    let r = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    check(r, &format!("bind to port {port}"))?;
    // SAFETY: listen on a socket we own.
    check(unsafe { libc::listen(s.as_raw_fd(), 1) }, "listen")?;
    println!("vsock-listen: listening on port {port}");
    let c = loop {
        // SAFETY: accept without asking for the peer address.
        let fd = unsafe {
            libc::accept4(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor nobody else owns.
            break File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("accept: {e}"));
        }
    };
    drop(s);
    let mut reader = c.try_clone().map_err(|e| format!("dup: {e}"))?;
    let mut writer = c;
    let n = copy(&mut reader, &mut writer).map_err(|e| format!("echo: {e}"))?;
    shutdown_write(&writer);
    println!("vsock-listen: echoed {n} bytes");
    Ok(())
}

/// `vsock-connect CID PORT`: stdin to the socket (half-closing at EOF), the socket to
/// stdout, until the peer closes.
pub fn connect_cmd(args: &[String]) -> Result<(), String> {
    let [cid, port] = exact::<2>(args, "CID PORT")?;
    let (cid, port): (u32, u32) = (number("CID", cid)?, number("port", port)?);
    let s = socket().map_err(|e| format!("socket: {e}"))?;
    let a = address(cid, port);
    loop {
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        let r = unsafe {
            libc::connect(
                s.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("connect to {cid}:{port}: {e}"));
        }
    }
    let sock = File::from(s);
    let mut to_sock = sock.try_clone().map_err(|e| format!("dup: {e}"))?;
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let n = copy(&mut io::stdin().lock(), &mut to_sock);
        shutdown_write(&to_sock);
        n
    });
    let mut from_sock = sock;
    let received = copy(&mut from_sock, &mut io::stdout().lock());
    // The peer is done; stdin may still be open (then the sender thread is abandoned).
    if sender.is_finished() {
        if let Ok(Err(e)) = sender.join() {
            return Err(format!("sending: {e}"));
        }
    }
    received.map(|_| ()).map_err(|e| format!("receiving: {e}"))
}
