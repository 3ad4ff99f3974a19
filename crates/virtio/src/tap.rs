//! A Linux tap device as the backend of a virtio-net device.
//!
//! [`Tap::open`] opens `/dev/net/tun` and attaches to the tap interface of the given name
//! with `TUNSETIFF` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): every packet read or written
//! starts with a 12-byte `virtio_net_hdr_v1` (vmon always negotiates VIRTIO_F_VERSION_1, so
//! the header has the `num_buffers` field, which the tap ignores on writes and skips or
//! zeroes on reads, depending on the kernel), little-endian. The guest's packets therefore go through the tap without being
//! copied or rewritten, checksum and segmentation offload hints included.
//!
//! An existing tap is used as it is: this is the normal way to run vmon without
//! privileges (`ip tuntap add tap0 mode tap user $USER`, then address it and bring it up).
//! If no interface of that name exists and vmon has CAP_NET_ADMIN, the kernel creates the
//! tap. vmon leaves such a tap as the kernel made it, **down and without addresses**
//! (host network configuration is the administrator's business, as it is for an existing
//! tap), and it is not persistent: it disappears when vmon exits. Bring it up and address it
//! from the host while the VM runs, or better, create it beforehand.
//!
//! The descriptor is non-blocking: the device thread waits in epoll for it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use crate::net::{Backend, VNET_HDR_LEN};

/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "'{0}' is not a valid interface name (1 to 15 bytes, none of them '/', ':' or \
         whitespace)"
    )]
    InvalidName(String),
    #[error("cannot open tap '{name}': {TUN_PATH} is missing (load the tun module: modprobe tun)")]
    NoTunDevice { name: String },
    #[error("cannot open tap '{name}': permission denied opening {TUN_PATH}")]
    TunDenied { name: String },
    #[error(
        "cannot open tap '{name}': permission denied (creating a tap needs CAP_NET_ADMIN; \
         create it with `ip tuntap add {name} mode tap user $USER`)"
    )]
    CreateDenied { name: String },
    #[error(
        "cannot open tap '{name}': permission denied (it belongs to another user or group; \
         recreate it with `ip tuntap add {name} mode tap user $USER`)"
    )]
    AttachDenied { name: String },
    #[error("cannot open tap '{name}': it is in use (by another VM, or given twice with --net)")]
    Busy { name: String },
    #[error(
        "cannot open tap '{name}': an interface of that name exists but is not a \
         single-queue tap (a tun device, a multi-queue tap, or another kind of interface)"
    )]
    NotTap { name: String },
    #[error("cannot open tap '{name}': {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Checks `name` the way the kernel does (`dev_valid_name`).
pub fn check_name(name: &str) -> Result<(), TapError> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(TapError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// An open tap interface with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

impl Tap {
    /// Attaches to the tap interface `name`, creating it if it does not exist (which needs
    /// CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let owned = || name.to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice { name: owned() },
                io::ErrorKind::PermissionDenied => TapError::TunDenied { name: owned() },
                _ => TapError::Io {
                    name: owned(),
                    what: "opening /dev/net/tun",
                    source: e,
                },
            })?;
        let existed = interface_exists(name);

        // SAFETY: ifreq is plain data (a name and a union of integers and pointers) for
        // which all-zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is, on a descriptor we
        // own; the name is NUL-terminated (at most 15 bytes in a zeroed 16-byte array).
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) if existed => {
                    TapError::AttachDenied { name: owned() }
                }
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::CreateDenied { name: owned() },
                Some(libc::EBUSY) => TapError::Busy { name: owned() },
                Some(libc::EINVAL) if existed => TapError::NotTap { name: owned() },
                _ => TapError::Io {
                    name: owned(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&actual).into_owned(),
            created: !existed,
        };
        let io_err = |what| {
            move |source| TapError::Io {
                name: owned(),
                what,
                source,
            }
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        tap.check(unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr_len) })
            .map_err(io_err("TUNSETVNETHDRSZ"))?;
        // virtio 1.x headers are little-endian whatever the host; on x86 this is also the
        // tap's default, but say so explicitly.
        let le: libc::c_int = 1;
        // SAFETY: TUNSETVNETLE reads one int through the pointer, which is valid.
        if let Err(e) = tap.check(unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETLE, &le) }) {
            tracing::debug!(tap = %tap.name, "TUNSETVNETLE: {e}");
        }
        // Until a driver says what it can take, the tap hands us only complete packets.
        tap.set_offload(0).map_err(io_err("TUNSETOFFLOAD"))?;
        if tap.created {
            tracing::info!(
                tap = %tap.name,
                "created tap '{}': it is down and unaddressed, and goes away when vmon exits",
                tap.name
            );
        }
        Ok(tap)
    }

    /// The interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether opening it created the interface.
    pub fn created(&self) -> bool {
        self.created
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, ret: libc::c_int) -> io::Result<()> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Whether an interface of this name exists in our network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string, which `c` is.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

/// Resumes a call interrupted by a signal.
fn retry(mut f: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = f();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Backend for Tap {
    // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
    unsafe fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees every iovec is valid for writes; the count fits an
        // int (callers pass at most IOV_MAX entries). A tap read returns one packet; for one
        // cut short, Linux 6.1 returns its full length, recent kernels what was copied.
        retry(|| unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }

    // SAFETY: an unsafe fn: callers guarantee the iovecs' memory (Backend's contract).
    unsafe fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees every iovec is valid for reads. A tap write takes
        // exactly one packet.
        retry(|| unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is involved.
        self.check(unsafe {
            libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
        })
    }

    fn describe(&self) -> String {
        format!("tap '{}'", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_like_the_kernel_does() {
        for ok in ["tap0", "vmon-net.1", "a", "x23456789012345", "tap%d"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "tab\t",
            "x234567890123456",
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.to_string().contains("not a valid interface name"), "{e}");
        }
    }

    use crate::net::{offload_flags, FEATURES};
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    /// A tap of our own, or None (and a SKIPPED line) where this host cannot make one.
    fn own_tap(test: &str) -> Option<Tap> {
        let name = format!("vmt{}", std::process::id() % 1_000_000_000);
        match Tap::open(&name) {
            Ok(tap) => Some(tap),
            Err(
                e @ (TapError::CreateDenied { .. }
                | TapError::NoTunDevice { .. }
                | TapError::TunDenied { .. }),
            ) => {
                eprintln!("SKIPPED {test}: {e}");
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    fn ifindex(name: &str) -> i32 {
        let c = CString::new(name).unwrap();
        // SAFETY: a NUL-terminated string.
        unsafe { libc::if_nametoindex(c.as_ptr()) as i32 }
    }

    /// A raw packet socket on interface `index`: what it sends, the tap reads; what the
    /// tap writes, it receives.
    fn packet_socket(index: i32) -> std::fs::File {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(proto),
            )
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index;
        // SAFETY: the address points to a sockaddr_ll of the length given.
        let r = unsafe {
            libc::bind(
                fd,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
        std::fs::File::from(owned)
    }

    const ETHERTYPE: [u8; 2] = [0x88, 0xB5]; // local experimental

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xFF; 6]; // broadcast
        f.extend([0x02, 0, 0, 0, 0, 0x42]);
        f.extend(ETHERTYPE);
        f.extend(payload);
        f
    }

    /// Polls `read` until it yields a frame of our ethertype (the host may send IPv6
    /// chatter on a fresh link too); returns what `read` said about it.
    fn read_ours(
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
        buf: &mut [u8],
        ethertype_at: usize,
    ) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match read(buf) {
                Ok(n) if buf[ethertype_at..ethertype_at + 2] == ETHERTYPE => return n,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("read: {e}"),
            }
            assert!(Instant::now() < deadline, "our frame never arrived");
        }
    }

    #[test]
    fn a_real_tap_carries_packets_with_virtio_headers() {
        let Some(tap) = own_tap("a_real_tap_carries_packets_with_virtio_headers") else {
            return;
        };
        assert!(tap.created());
        let name = tap.name().to_string();
        assert!(matches!(Tap::open(&name), Err(TapError::Busy { .. })));
        // Offloads: what the device maps from its features is accepted; GSO without
        // checksum offload is not (which is why offload_flags never asks for it).
        tap.set_offload(offload_flags(FEATURES)).unwrap();
        assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());
        tap.set_offload(0).unwrap();
        match std::process::Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status()
        {
            Ok(s) if s.success() => {}
            other => {
                eprintln!("SKIPPED the packet part: `ip link set {name} up`: {other:?}");
                return;
            }
        }
        let mut sock = packet_socket(ifindex(&name));

        // Guest to host: header then frame, one writev.
        let out = frame(b"from the guest");
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: out.as_ptr().cast_mut().cast(),
                iov_len: out.len(),
            },
        ];
        // SAFETY: both iovecs describe live buffers.
        let n = unsafe { tap.send(&iov) }.unwrap();
        assert_eq!(n, VNET_HDR_LEN + out.len());
        let mut buf = [0u8; 2048];
        let n = read_ours(|b| sock.read(b), &mut buf, 12);
        assert_eq!(&buf[..n], &out[..]);

        // Host to guest: the tap prepends a header (num_buffers is the device's to set:
        // older kernels skip those two bytes, newer ones zero them).
        let into = frame(&[7u8; 200]);
        sock.write_all(&into).unwrap();
        let mut got = [0xEEu8; 2048];
        let recv = |b: &mut [u8]| {
            let iov = [libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }];
            // SAFETY: the iovec describes `b`.
            unsafe { tap.recv(&iov) }
        };
        let n = read_ours(recv, &mut got, VNET_HDR_LEN + 12);
        assert_eq!(n, VNET_HDR_LEN + into.len());
        assert_eq!(&got[..10], &[0u8; 10], "no offload: flags and GSO clear");
        assert_eq!(&got[VNET_HDR_LEN..n], &into[..]);

        // Too small a buffer: the packet is cut short (and consumed); the length returned
        // is the full one or what fitted, depending on the kernel.
        sock.write_all(&into).unwrap();
        let mut small = [0u8; VNET_HDR_LEN + 64];
        let n = read_ours(recv, &mut small, VNET_HDR_LEN + 12);
        assert!(n == small.len() || n == VNET_HDR_LEN + into.len(), "{n}");
        assert_eq!(&small[VNET_HDR_LEN..], &into[..64]);

        // Deleted under us, the tap answers EBADFD (how the device knows it is gone).
        drop(sock);
        std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status()
            .unwrap();
        // SAFETY: both iovecs describe live buffers.
        let e = unsafe { tap.send(&iov) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADFD), "{e}");
        let e = recv(&mut got).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADFD), "{e}");
    }

    #[test]
    fn permission_errors_say_how_to_fix_them() {
        let e = TapError::CreateDenied {
            name: "tap0".into(),
        };
        assert_eq!(
            e.to_string(),
            "cannot open tap 'tap0': permission denied (creating a tap needs CAP_NET_ADMIN; \
             create it with `ip tuntap add tap0 mode tap user $USER`)"
        );
        let e = TapError::NoTunDevice {
            name: "tap0".into(),
        };
        assert!(e.to_string().contains("/dev/net/tun is missing"), "{e}");
    }
}
