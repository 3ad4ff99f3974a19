//! One stream connection between a guest port and a host Unix socket: its state, the
//! credit accounting in both directions, and moving bytes between the socket and the
//! guest's buffers.
//!
//! Guest → host: RW payloads are written to the socket at once, straight from guest
//! memory; what the socket does not take waits in `to_host`, which the guest's credit
//! bounds to [`BUF_ALLOC`] (a guest sending more than we advertised is reset). `fwd_cnt`
//! counts bytes handed to the socket, and the guest hears about it (CREDIT_UPDATE) when
//! the room it believes it has runs low.
//!
//! Host → guest: nothing is buffered here. When the socket is readable and the guest has
//! both an rx buffer and credit, the socket is read straight into that buffer, never more
//! than the guest's free space (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`).

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmon_memory::GuestMemory;

use super::packet::*;
use crate::chain::Chain;

/// The receive buffer we advertise per connection: the most guest data we ever hold for a
/// host socket that does not read.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Once the room the guest believes it has falls below this, tell it what we freed.
pub const CREDIT_THRESHOLD: u32 = 64 * 1024;
/// The largest payload we put in one rx buffer.
pub const MAX_RX_PAYLOAD: u64 = 64 * 1024;
/// How long the guest has to answer our REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection the guest closed may take to hand its last bytes to the host.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Release buffer memory above this once the buffer drains.
const KEEP_CAPACITY: usize = 64 * 1024;

/// A connection's address: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub host_port: u32,
    pub guest_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// We sent (or owe) the guest a REQUEST and wait for its RESPONSE.
    Connecting,
    Established,
}

/// What should happen to a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Drop it and tell the guest with an RST.
    Reset,
    /// Drop it silently (the guest already knows: it sent or was just sent an RST).
    Close,
}

pub struct Connection {
    pub stream: UnixStream,
    pub key: ConnKey,
    guest_cid: u64,
    pub state: State,
    /// Host-initiated: write `OK <host port>\n` to the socket once the guest accepts.
    reply_ok: bool,
    // Control packets owed to the guest.
    owe_request: bool,
    owe_response: bool,
    owe_credit_update: bool,
    owe_shutdown: bool,
    /// We asked the guest for credit and have not heard since.
    credit_requested: bool,
    // Host → guest.
    /// The socket may have data (or EOF) we have not read; its readability is not watched.
    readable: bool,
    host_eof: bool,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    // Guest → host.
    to_host: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    host_write_shut: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    pub deadline: Option<Instant>,
    /// What the event loop watches the socket for now (None: not in the loop).
    pub watched: Option<EventSet>,
    /// Listed in the muxer's queue of connections with something for the guest.
    pub in_ready: bool,
}

impl Connection {
    /// The guest connected to a host port and we reached the socket: owe it a RESPONSE.
    pub fn accepted(stream: UnixStream, key: ConnKey, guest_cid: u64, request: &Header) -> Self {
        let mut c = Connection::new(stream, key, guest_cid, State::Established);
        c.owe_response = true;
        c.update_peer_credit(request);
        c
    }

    /// A host client asked for a guest port: owe the guest a REQUEST.
    pub fn connecting(stream: UnixStream, key: ConnKey, guest_cid: u64, now: Instant) -> Self {
        let mut c = Connection::new(stream, key, guest_cid, State::Connecting);
        c.owe_request = true;
        c.reply_ok = true;
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State) -> Self {
        Connection {
            stream,
            key,
            guest_cid,
            state,
            reply_ok: false,
            owe_request: false,
            owe_response: false,
            owe_credit_update: false,
            owe_shutdown: false,
            credit_requested: false,
            readable: false,
            host_eof: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            host_write_shut: false,
            peer_shutdown: 0,
            deadline: None,
            watched: None,
            in_ready: false,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Bytes we may still send the guest on this connection.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// The room the guest may use now: what we advertised less what we still hold.
    pub fn our_free(&self) -> u32 {
        BUF_ALLOC - self.to_host.len() as u32
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
    }

    /// Whether reading the socket for the guest makes sense at all.
    fn may_read(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Something to put in the guest's next rx buffer.
    pub fn has_rx_work(&self) -> bool {
        self.owe_request
            || self.owe_response
            || self.owe_credit_update
            || self.owe_shutdown
            || (self.may_read()
                && self.readable
                && (self.peer_free() > 0 || !self.credit_requested))
    }

    /// What the socket should be watched for: readable while we wait for host data we can
    /// pass on, writable only while guest data waits for it.
    pub fn interest(&self) -> Option<EventSet> {
        let mut e = EventSet::empty();
        if self.may_read() && !self.readable {
            e |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            e |= EventSet::OUT;
        }
        (!e.is_empty()).then_some(e)
    }

    /// The socket showed an event: `watched` says what we were waiting for.
    pub fn on_socket_event(&mut self, now: Instant) -> Verdict {
        let watched = self.watched.unwrap_or(EventSet::empty());
        if watched.contains(EventSet::IN) {
            self.readable = true;
        }
        if watched.contains(EventSet::OUT) {
            if let Verdict::Reset = self.flush() {
                return Verdict::Reset;
            }
        }
        self.check_finished(now)
    }

    /// A header for a packet of ours; every packet tells the guest our credit.
    fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owe_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The RST that ends this connection.
    pub fn reset_header(&self) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }

    /// A packet from the guest for this connection (its header already checked: right
    /// CIDs, stream type, a known op, a payload no longer than the buffers).
    pub fn on_packet(
        &mut self,
        h: &Header,
        mem: &GuestMemory,
        chain: &Chain,
        now: Instant,
    ) -> Verdict {
        if h.op == OP_RST {
            return Verdict::Close;
        }
        self.update_peer_credit(h);
        let verdict = match h.op {
            OP_RESPONSE if self.state == State::Connecting => self.established(),
            OP_RW => self.guest_data(h, mem, chain),
            OP_CREDIT_UPDATE => Verdict::Keep,
            OP_CREDIT_REQUEST => {
                self.owe_credit_update = true;
                Verdict::Keep
            }
            OP_SHUTDOWN => {
                self.peer_shutdown |= h.flags & SHUTDOWN_BOTH;
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    // It will send nothing more: room is no news to it.
                    self.owe_credit_update = false;
                }
                self.after_forward();
                Verdict::Keep
            }
            // A second REQUEST, a RESPONSE we did not ask for, anything while connecting.
            _ => {
                tracing::debug!(
                    op = op_name(h.op),
                    state = ?self.state,
                    "virtio-vsock: unexpected packet; resetting the connection"
                );
                Verdict::Reset
            }
        };
        match verdict {
            Verdict::Keep => self.check_finished(now),
            v => v,
        }
    }

    /// The guest accepted our REQUEST: tell the host client which port it got.
    fn established(&mut self) -> Verdict {
        self.state = State::Established;
        self.deadline = None;
        if self.reply_ok {
            self.reply_ok = false;
            let line = format!("OK {}\n", self.key.host_port);
            let iov = [libc::iovec {
                iov_base: line.as_ptr() as *mut libc::c_void,
                iov_len: line.len(),
            }];
            // A fresh socket's buffer always has room for one short line; anything less
            // means the client is gone.
            match send_iov(self.fd(), &iov) {
                Ok(n) if n == line.len() => {}
                _ => return Verdict::Reset,
            }
        }
        Verdict::Keep
    }

    fn guest_data(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain) -> Verdict {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Reset;
        }
        let len = h.len;
        if len == 0 {
            return Verdict::Keep;
        }
        if len > self.our_free() {
            tracing::debug!(
                len,
                free = self.our_free(),
                "virtio-vsock: the guest sent more than its credit; resetting the connection"
            );
            return Verdict::Reset;
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        let mut sent = 0usize;
        if self.to_host.is_empty() {
            let Ok(iov) = chain.readable_iovecs(mem, HEADER_LEN as u64, u64::from(len)) else {
                return Verdict::Reset;
            };
            match send_iov(self.fd(), &iov) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!("virtio-vsock: writing to the host socket: {e}");
                    return Verdict::Reset;
                }
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(sent as u32);
        }
        let rest = len as usize - sent;
        if rest > 0 {
            let mut buf = vec![0u8; rest];
            if chain
                .read_at(mem, (HEADER_LEN + sent) as u64, &mut buf)
                .is_err()
            {
                return Verdict::Reset;
            }
            self.to_host.extend(buf);
        }
        self.after_forward();
        Verdict::Keep
    }

    /// Writes buffered guest data to the socket until it is empty or the socket is full.
    pub fn flush(&mut self) -> Verdict {
        while !self.to_host.is_empty() {
            let (a, b) = self.to_host.as_slices();
            let iov = [
                libc::iovec {
                    iov_base: a.as_ptr() as *mut libc::c_void,
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                },
            ];
            match send_iov(self.fd(), &iov) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("virtio-vsock: writing to the host socket: {e}");
                    return Verdict::Reset;
                }
            }
        }
        if self.to_host.is_empty() && self.to_host.capacity() > KEEP_CAPACITY {
            self.to_host = VecDeque::new();
        }
        self.after_forward();
        Verdict::Keep
    }

    /// After guest data moved on: pass on a half-close once everything is out, and tell
    /// the guest about freed room when it may be running out.
    fn after_forward(&mut self) {
        if self.to_host.is_empty()
            && self.peer_shutdown & SHUTDOWN_SEND != 0
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        let believed_used = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let believed_free = BUF_ALLOC.saturating_sub(believed_used);
        if self.fwd_cnt != self.last_fwd_cnt_sent
            && believed_free < CREDIT_THRESHOLD
            && self.peer_shutdown & SHUTDOWN_SEND == 0
        {
            self.owe_credit_update = true;
        }
    }

    /// Ends a connection both sides are done with, or gives a closing one a deadline.
    pub fn check_finished(&mut self, now: Instant) -> Verdict {
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed its socket and waits for our RST; hand the host what it
            // sent first, for a while.
            if self.to_host.is_empty() {
                return Verdict::Reset;
            }
            if self.deadline.is_none() {
                self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            }
        } else if self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.host_write_shut
            && self.host_eof
            && !self.owe_shutdown
        {
            // Both directions have ended and both sides know it.
            return Verdict::Reset;
        }
        Verdict::Keep
    }

    /// Fills the guest's rx buffer `chain` (at least a header long) with the next packet
    /// this connection has for it. Returns the bytes written, if any.
    pub fn fill_rx(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        now: Instant,
    ) -> (Option<u32>, Verdict) {
        if self.owe_request {
            self.owe_request = false;
            return self.control(mem, chain, OP_REQUEST, 0);
        }
        if self.owe_response {
            self.owe_response = false;
            return self.control(mem, chain, OP_RESPONSE, 0);
        }
        if self.may_read() && self.readable {
            let free = self.peer_free();
            if free == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return self.control(mem, chain, OP_CREDIT_REQUEST, 0);
                }
            } else {
                let room = chain.writable_len() - HEADER_LEN as u64;
                let max = room.min(u64::from(free)).min(MAX_RX_PAYLOAD);
                if max > 0 {
                    match self.read_into(mem, chain, max) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.readable = false;
                            self.owe_shutdown = true;
                        }
                        Ok(n) => {
                            self.tx_cnt = self.tx_cnt.wrapping_add(n);
                            let h = self.header(OP_RW, 0, n);
                            return match put_header(mem, chain, &h) {
                                true => (Some(HEADER_LEN as u32 + n), Verdict::Keep),
                                false => (Some(0), Verdict::Reset),
                            };
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                        Err(e) => {
                            tracing::debug!("virtio-vsock: reading the host socket: {e}");
                            let h = self.reset_header();
                            let len = if put_header(mem, chain, &h) {
                                HEADER_LEN as u32
                            } else {
                                0
                            };
                            return (Some(len), Verdict::Close);
                        }
                    }
                }
            }
        }
        if self.owe_shutdown {
            self.owe_shutdown = false;
            let (len, _) = self.control(mem, chain, OP_SHUTDOWN, SHUTDOWN_SEND);
            return (len, self.check_finished(now));
        }
        if self.owe_credit_update {
            return self.control(mem, chain, OP_CREDIT_UPDATE, 0);
        }
        (None, Verdict::Keep)
    }

    fn control(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        op: u16,
        flags: u32,
    ) -> (Option<u32>, Verdict) {
        let h = self.header(op, flags, 0);
        match put_header(mem, chain, &h) {
            true => (Some(HEADER_LEN as u32), Verdict::Keep),
            false => (Some(0), Verdict::Reset),
        }
    }

    /// Reads at most `max` bytes from the socket into the chain after the header.
    fn read_into(&mut self, mem: &GuestMemory, chain: &Chain, max: u64) -> io::Result<u32> {
        let mut iov = chain
            .writable_iovecs(mem, HEADER_LEN as u64, max)
            .map_err(io::Error::other)?;
        iov.truncate(IOV_MAX);
        loop {
            // SAFETY: every iovec points into guest RAM, checked by vm-memory when the chain
            // was built and mapped for as long as the device holds its GuestMemory; the
            // kernel writes at most their lengths. A guest racing us on those bytes only
            // changes data.
            let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
            if n >= 0 {
                return Ok(n as u32);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

const IOV_MAX: usize = 1024;

/// Writes a packet header at the start of an rx buffer; false if it cannot be written.
pub fn put_header(mem: &GuestMemory, chain: &Chain, h: &Header) -> bool {
    tracing::trace!(
        op = op_name(h.op),
        src = h.src_port,
        dst = h.dst_port,
        len = h.len,
        flags = h.flags,
        fwd_cnt = h.fwd_cnt,
        "virtio-vsock: to the guest"
    );
    chain.write_at(mem, 0, &h.to_bytes()).is_ok()
}

/// Writes what the iovecs describe to a socket without blocking and without SIGPIPE.
pub fn send_iov(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let iov = &iov[..iov.len().min(IOV_MAX)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: the iovecs describe memory that stays valid during the call (guest RAM,
        // checked by vm-memory, or our own buffers); the kernel only reads it.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
