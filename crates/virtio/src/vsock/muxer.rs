//! The host side of the device: every connection, the listening socket and its clients
//! still saying which guest port they want, and the order in which packets go to the
//! guest.
//!
//! Packets from the guest (tx queue) are handled at once: nothing the guest sends waits
//! for an rx buffer except the few control replies it causes. Packets for the guest wait
//! for rx buffers: RSTs first (`resets`, bounded), then the connections in `ready` in
//! turn. A connection is in `ready` only while it has something to send, and its socket's
//! readability is not watched while it is known readable, so a guest that posts no rx
//! buffers (or gives no credit) leaves the thread asleep instead of spinning.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmon_memory::GuestMemory;

use super::connection::{put_header, ConnKey, Connection, Verdict};
use super::packet::*;
use super::VsockBackend;
use crate::chain::Chain;
use crate::worker::EventLoop;

/// Event-loop tokens from here up belong to connections and clients (token = base + id).
pub const CONN_TOKEN_BASE: u64 = 16;
/// Connections at most; a guest REQUEST beyond this is refused with an RST.
pub const MAX_CONNECTIONS: usize = 256;
/// Host clients that have not yet said which port they want, at most.
pub const MAX_CLIENTS: usize = 64;
/// RSTs waiting for rx buffers, at most; a guest that sends garbage and posts no buffers
/// loses the answers beyond this.
pub const MAX_PENDING_RESETS: usize = 1024;
/// `CONNECT <port>\n`: 8 + 10 digits + CR LF fit easily.
pub const MAX_LINE: usize = 32;
/// How long a host client has to send its CONNECT line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Host ports for host-initiated connections are taken from here up.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host client that connected to the listening socket and has not finished its line.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    backend: VsockBackend,
    conns: HashMap<u64, Connection>,
    by_key: HashMap<ConnKey, u64>,
    clients: HashMap<u64, Client>,
    ready: VecDeque<u64>,
    resets: VecDeque<Header>,
    next_id: u64,
    next_port: u32,
    /// Accepting failed (out of descriptors?): the listener is out of the loop until the
    /// next tick, so it does not wake the thread over and over.
    listener_paused: bool,
    listener_token: u64,
}

impl Muxer {
    pub fn new(backend: VsockBackend, guest_cid: u64) -> Self {
        Muxer {
            guest_cid,
            backend,
            conns: HashMap::new(),
            by_key: HashMap::new(),
            clients: HashMap::new(),
            ready: VecDeque::new(),
            resets: VecDeque::new(),
            next_id: 0,
            next_port: FIRST_LOCAL_PORT,
            listener_paused: false,
            listener_token: 0,
        }
    }

    /// Drops every connection and client and returns the listening socket.
    pub fn into_backend(self) -> VsockBackend {
        self.backend
    }

    /// Starts watching the listening socket under `token`.
    pub fn listen(&mut self, ev: &EventLoop, token: u64) -> io::Result<()> {
        self.listener_token = token;
        ev.add(self.backend.listener.as_raw_fd(), token, false)
    }

    /// Registers everything with a new event loop: the listening socket under `token`,
    /// then every client and connection as it needs. A muxer kept across a device pause
    /// lost its registrations with the old thread's loop. A connection that cannot be
    /// watched is reset; a client, closed.
    pub fn attach(&mut self, ev: &EventLoop, token: u64) -> io::Result<()> {
        self.listener_paused = false;
        self.listen(ev, token)?;
        let clients: Vec<u64> = self.clients.keys().copied().collect();
        for id in clients {
            let watched = self
                .clients
                .get(&id)
                .map(|c| ev.add(c.stream.as_raw_fd(), CONN_TOKEN_BASE + id, false));
            if let Some(Err(e)) = watched {
                tracing::warn!("virtio-vsock: watching a host client: {e}");
                self.clients.remove(&id);
            }
        }
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for id in conns {
            if let Some(c) = self.conns.get_mut(&id) {
                c.watched = None;
            }
            self.settle(ev, id, Verdict::Keep);
        }
        Ok(())
    }

    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Whether anything waits for a timeout (the thread then needs its timer).
    pub fn has_deadlines(&self) -> bool {
        self.listener_paused
            || !self.clients.is_empty()
            || self.conns.values().any(|c| c.deadline.is_some())
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn queue_reset(&mut self, h: Header) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(h);
        } else {
            tracing::debug!("virtio-vsock: too many RSTs waiting for rx buffers; dropping one");
        }
    }

    /// One packet from the guest's tx queue.
    pub fn handle_tx(&mut self, ev: &EventLoop, mem: &GuestMemory, chain: &Chain) {
        let mut raw = [0u8; HEADER_LEN];
        if chain.readable_len() < HEADER_LEN as u64 || chain.read_at(mem, 0, &mut raw).is_err() {
            tracing::debug!("virtio-vsock: tx packet shorter than its header; dropped");
            return;
        }
        let Some(h) = Header::parse(&raw) else { return };
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                src = h.src_cid,
                dst = h.dst_cid,
                "virtio-vsock: tx packet with wrong CIDs; dropped"
            );
            return;
        }
        tracing::trace!(
            op = op_name(h.op),
            src = h.src_port,
            dst = h.dst_port,
            len = h.len,
            flags = h.flags,
            buf_alloc = h.buf_alloc,
            fwd_cnt = h.fwd_cnt,
            "virtio-vsock: from the guest"
        );
        let key = ConnKey {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        let id = self.by_key.get(&key).copied();
        let payload = chain.readable_len() - HEADER_LEN as u64;
        let malformed = if h.kind != TYPE_STREAM {
            Some("not a stream packet")
        } else if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
            Some("unknown op")
        } else if u64::from(h.len) > payload {
            Some("len larger than its buffers")
        } else {
            None
        };
        if let Some(why) = malformed {
            tracing::debug!(
                op = h.op,
                len = h.len,
                "virtio-vsock: {why}; answered with RST"
            );
            match id {
                Some(id) => self.settle(ev, id, Verdict::Reset),
                None if h.op != OP_RST => self.queue_reset(h.reset_reply()),
                None => {}
            }
            return;
        }
        match id {
            Some(id) => {
                let now = Instant::now();
                let verdict = match self.conns.get_mut(&id) {
                    Some(c) => c.on_packet(&h, mem, chain, now),
                    None => return,
                };
                self.settle(ev, id, verdict);
            }
            None if h.op == OP_REQUEST => self.guest_connects(ev, &h, key),
            None if h.op == OP_RST => {}
            None => self.queue_reset(h.reset_reply()),
        }
    }

    /// The guest connects to host port `key.host_port`: reach `PATH_<port>`.
    fn guest_connects(&mut self, ev: &EventLoop, h: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("virtio-vsock: too many connections; refusing one");
            self.queue_reset(h.reset_reply());
            return;
        }
        let path = port_path(&self.backend.path, key.host_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let id = self.new_id();
                let conn = Connection::accepted(stream, key, self.guest_cid, h);
                self.conns.insert(id, conn);
                self.by_key.insert(key, id);
                self.settle(ev, id, Verdict::Keep);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), "virtio-vsock: guest connect refused: {e}");
                self.queue_reset(h.reset_reply());
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Applies what happened to connection `id`: keep it (and watch and queue it as it now
    /// needs), or drop it, with an RST to the guest for `Reset`.
    fn settle(&mut self, ev: &EventLoop, id: u64, verdict: Verdict) {
        let verdict = match (verdict, self.conns.get_mut(&id)) {
            (_, None) => return,
            (Verdict::Keep, Some(c)) => match watch(ev, c, CONN_TOKEN_BASE + id) {
                Ok(()) => {
                    if c.has_rx_work() && !c.in_ready {
                        c.in_ready = true;
                        self.ready.push_back(id);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("virtio-vsock: watching a connection: {e}");
                    Verdict::Reset
                }
            },
            (v, Some(_)) => v,
        };
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        if c.in_ready {
            // Otherwise a guest that posts no rx buffers grows `ready` with every
            // connection it opens and closes.
            self.ready.retain(|&r| r != id);
        }
        self.by_key.remove(&c.key);
        if c.watched.is_some() {
            let _ = ev.remove(c.fd());
        }
        if verdict == Verdict::Reset {
            self.queue_reset(c.reset_header());
        }
        tracing::debug!(
            host_port = c.key.host_port,
            guest_port = c.key.guest_port,
            ?verdict,
            "virtio-vsock: connection closed"
        );
    }

    /// Fills one guest rx buffer with the next packet for the guest. Returns the bytes
    /// written, or None if nothing could go in it (the caller puts it back).
    pub fn fill_rx(&mut self, ev: &EventLoop, mem: &GuestMemory, chain: &Chain) -> Option<u32> {
        if chain.writable_len() < HEADER_LEN as u64 {
            tracing::debug!("virtio-vsock: rx buffer shorter than a header; returned empty");
            return Some(0);
        }
        if let Some(h) = self.resets.pop_front() {
            return Some(if put_header(mem, chain, &h) {
                HEADER_LEN as u32
            } else {
                0
            });
        }
        let now = Instant::now();
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            c.in_ready = false;
            let (written, verdict) = c.fill_rx(mem, chain, now);
            self.settle(ev, id, verdict);
            if written.is_some() {
                return written;
            }
        }
        None
    }

    /// A connection's or client's socket is ready.
    pub fn on_event(&mut self, ev: &EventLoop, token: u64) {
        let Some(id) = token.checked_sub(CONN_TOKEN_BASE) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&id) {
            let verdict = c.on_socket_event(Instant::now());
            self.settle(ev, id, verdict);
        } else if self.clients.contains_key(&id) {
            self.client_readable(ev, id);
        }
    }

    /// Accepts every pending host client on the listening socket.
    pub fn accept(&mut self, ev: &EventLoop) {
        loop {
            let stream = match self.backend.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: try again on the next tick.
                    tracing::warn!("virtio-vsock: accepting a host connection: {e}");
                    if ev.remove(self.backend.listener.as_raw_fd()).is_ok() {
                        self.listener_paused = true;
                    }
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS || self.conns.len() >= MAX_CONNECTIONS {
                tracing::debug!("virtio-vsock: too many host connections; closing a new one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.new_id();
            if ev
                .add(stream.as_raw_fd(), CONN_TOKEN_BASE + id, false)
                .is_err()
            {
                continue;
            }
            self.clients.insert(
                id,
                Client {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + LINE_TIMEOUT,
                },
            );
        }
    }

    /// Reads a client's CONNECT line, a byte at a time so nothing after it is consumed.
    fn client_readable(&mut self, ev: &EventLoop, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let outcome = read_line(&mut client.stream, &mut client.line);
        let port = match outcome {
            LineRead::Incomplete => return,
            LineRead::Line => parse_connect(&client.line),
            LineRead::Failed => None,
        };
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        let _ = ev.remove(client.stream.as_raw_fd());
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("virtio-vsock: connection limit reached; host client closed");
            return;
        }
        let Some(guest_port) = port else {
            tracing::debug!(
                line = %String::from_utf8_lossy(&client.line).escape_debug(),
                "virtio-vsock: bad CONNECT line from a host client; closed"
            );
            return;
        };
        let key = ConnKey {
            host_port: self.local_port(guest_port),
            guest_port,
        };
        let conn = Connection::connecting(client.stream, key, self.guest_cid, Instant::now());
        self.conns.insert(id, conn);
        self.by_key.insert(key, id);
        self.settle(ev, id, Verdict::Keep);
    }

    /// A host port not used with `guest_port` yet.
    fn local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => FIRST_LOCAL_PORT,
            };
            let key = ConnKey {
                host_port: port,
                guest_port,
            };
            if !self.by_key.contains_key(&key) {
                return port;
            }
        }
    }

    /// Ends what waited too long: clients without a line, unanswered REQUESTs, closing
    /// connections whose host side does not take their last bytes.
    pub fn tick(&mut self, ev: &EventLoop, now: Instant) {
        if self.listener_paused {
            let fd = self.backend.listener.as_raw_fd();
            self.listener_paused = ev.add(fd, self.listener_token, false).is_err();
        }
        let late_clients: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late_clients {
            if let Some(c) = self.clients.remove(&id) {
                let _ = ev.remove(c.stream.as_raw_fd());
            }
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            tracing::debug!("virtio-vsock: connection timed out");
            self.settle(ev, id, Verdict::Reset);
        }
    }

    #[cfg(test)]
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(self.by_key.get(&key)?)
    }

    #[cfg(test)]
    pub fn tokens(&self) -> Vec<u64> {
        self.conns
            .keys()
            .chain(self.clients.keys())
            .map(|id| CONN_TOKEN_BASE + id)
            .collect()
    }
}

/// Brings the loop's watch of a connection's socket in line with what it needs.
fn watch(ev: &EventLoop, c: &mut Connection, token: u64) -> io::Result<()> {
    let want = c.interest();
    if want == c.watched {
        return Ok(());
    }
    match want {
        Some(events) => {
            let (r, w) = (
                events.contains(EventSet::IN),
                events.contains(EventSet::OUT),
            );
            if c.watched.is_none() {
                ev.add(c.fd(), token, w)?;
            }
            if !r || c.watched.is_some() {
                ev.modify_events(c.fd(), token, r, w)?;
            }
        }
        None => ev.remove(c.fd())?,
    }
    c.watched = want;
    Ok(())
}

/// `PATH_<port>`: where the guest's connections to host port `port` go.
pub fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to a Unix stream socket without waiting: a listener whose backlog is full
/// refuses (EAGAIN) instead of holding up the device thread.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: creates a socket; no memory is involved.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
        let r = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(stream);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// No newline yet; more may come.
    Incomplete,
    /// `line` holds a whole line, without its newline.
    Line,
    /// EOF, an error, or a line longer than [`MAX_LINE`].
    Failed,
}

/// Reads from `r` one byte at a time into `line` until a newline, never more than
/// [`MAX_LINE`] bytes in all.
pub fn read_line(r: &mut impl Read, line: &mut Vec<u8>) -> LineRead {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) => return LineRead::Failed,
            Ok(_) if b[0] == b'\n' => return LineRead::Line,
            Ok(_) => {
                if line.len() >= MAX_LINE {
                    return LineRead::Failed;
                }
                line.push(b[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Incomplete,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return LineRead::Failed,
        }
    }
}

/// `CONNECT <port>` (an optional CR before the newline): the guest port, in decimal.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}
