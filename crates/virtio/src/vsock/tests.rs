//! The vsock muxer and connections driven directly: packets go in as the guest's tx
//! buffers would, come out of rx buffers, and the host side is real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::metrics::CounterSet;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnKey, BUF_ALLOC, SHUTDOWN_TIMEOUT};
use super::muxer::{parse_connect, read_line, LineRead, FIRST_LOCAL_PORT, MAX_LINE};
use super::packet::*;
use super::*;
use crate::chain::tests::memory;
use crate::chain::Chain;
use crate::worker::EventLoop;

const CID: u64 = 3;
const TX_HDR: u64 = 0x1000;
const TX_DATA: u64 = 0x1_0000;
const RX_HDR: u64 = 0x4_0000;
const RX_DATA: u64 = 0x5_0000;

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmon-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A muxer with guest memory and an event loop, driven by hand.
struct Rig {
    mem: GuestMemory,
    mux: Muxer,
    ev: EventLoop,
    dir: Scratch,
    rx_room: u32,
}

impl Rig {
    fn new() -> Rig {
        let dir = Scratch::new();
        let backend = VsockBackend::bind(&VsockOptions {
            cid: CID,
            socket: dir.0.join("v.sock"),
        })
        .unwrap();
        let ev = EventLoop::detached().unwrap();
        let mut mux = Muxer::new(backend, CID);
        mux.listen(&ev, 3).unwrap();
        Rig {
            mem: memory(),
            mux,
            ev,
            dir,
            rx_room: 4096,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    fn host_listener(&self, port: u32) -> UnixListener {
        UnixListener::bind(muxer::port_path(&self.socket(), port)).unwrap()
    }

    /// The guest sends `h` (its len set to the payload's) with `payload` after it, in two
    /// buffers as Linux lays them out.
    fn send(&mut self, mut h: Header, payload: &[u8]) {
        h.len = payload.len() as u32;
        self.send_raw(h, payload);
    }

    fn send_raw(&mut self, h: Header, payload: &[u8]) {
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(TX_HDR))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(TX_DATA))
            .unwrap();
        let mut c = Chain::default();
        c.push(&self.mem, TX_HDR, HEADER_LEN as u32, false).unwrap();
        c.push(&self.mem, TX_DATA, payload.len() as u32, false)
            .unwrap();
        self.mux.handle_tx(&self.ev, &self.mem, &c);
    }

    /// The next packet for the guest, given one rx buffer of `rx_room` payload bytes.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut c = Chain::default();
        c.push(&self.mem, RX_HDR, HEADER_LEN as u32, true).unwrap();
        c.push(&self.mem, RX_DATA, self.rx_room, true).unwrap();
        let n = self.mux.fill_rx(&self.ev, &self.mem, &c)?;
        assert!(n as usize >= HEADER_LEN, "packet of {n} bytes");
        let mut raw = [0u8; HEADER_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(RX_HDR)).unwrap();
        let h = Header::parse(&raw).unwrap();
        assert_eq!(h.len as usize, n as usize - HEADER_LEN);
        assert_eq!((h.src_cid, h.dst_cid, h.kind), (HOST_CID, CID, TYPE_STREAM));
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(RX_DATA))
            .unwrap();
        Some((h, data))
    }

    /// Every socket event at once (spurious ones included, which must be harmless).
    fn pump(&mut self) {
        self.mux.accept(&self.ev);
        for t in self.mux.tokens() {
            self.mux.on_event(&self.ev, t);
        }
    }

    /// Pumps and collects packets until the guest gets nothing more.
    fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            self.pump();
            match self.recv() {
                Some(p) => out.push(p),
                None => break,
            }
        }
        out
    }

    /// An established guest-initiated connection: guest port 1234 to host port 5000.
    fn connected(&mut self, guest_buf: u32) -> UnixStream {
        let _ = std::fs::remove_file(muxer::port_path(&self.socket(), 5000));
        let l = self.host_listener(5000);
        self.send(guest(OP_REQUEST, 1234, 5000, guest_buf, 0), &[]);
        let (h, _) = self.recv().expect("RESPONSE");
        assert_eq!(h.op, OP_RESPONSE);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

fn guest(op: u16, src_port: u32, dst_port: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

const KEY: ConnKey = ConnKey {
    host_port: 5000,
    guest_port: 1234,
};

#[test]
fn guest_connects_to_a_host_port_and_bytes_flow_both_ways() {
    let mut r = Rig::new();
    let l = r.host_listener(5000);
    r.send(guest(OP_REQUEST, 1234, 5000, 65536, 0), &[]);
    let (h, _) = r.recv().unwrap();
    assert_eq!(h.op, OP_RESPONSE);
    assert_eq!((h.src_port, h.dst_port), (5000, 1234));
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    assert!(r.recv().is_none());
    let (mut host, _) = l.accept().unwrap();

    r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"hello");
    let mut b = [0u8; 5];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");

    host.write_all(b"world").unwrap();
    assert!(r.recv().is_none(), "nothing before the socket's event");
    r.pump();
    let (h, data) = r.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 5000, 1234));
    assert_eq!(data, b"world");
    assert_eq!(
        h.fwd_cnt, 5,
        "every packet tells the guest what we forwarded"
    );
    assert!(r.drain().is_empty());
}

#[test]
fn guest_connect_without_a_host_listener_is_reset() {
    let mut r = Rig::new();
    r.send(guest(OP_REQUEST, 1234, 5001, 65536, 0), &[]);
    let (h, _) = r.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 5001, 1234));
    assert_eq!(r.mux.connection_count(), 0);
    assert!(r.recv().is_none());
}

#[test]
fn packets_for_unknown_connections_are_answered_with_rst() {
    let mut r = Rig::new();
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        r.send(guest(op, 77, 88, 65536, 0), b"x");
        let (h, _) = r.recv().unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 88, 77), "op {op}");
    }
    // Never an RST for an RST.
    r.send(guest(OP_RST, 77, 88, 0, 0), &[]);
    assert!(r.recv().is_none());
}

#[test]
fn malformed_packets_are_dropped_or_reset_never_a_panic() {
    let mut r = Rig::new();
    // Wrong CIDs: dropped silently.
    let mut h = guest(OP_REQUEST, 1, 5000, 0, 0);
    h.dst_cid = 7;
    r.send(h, &[]);
    let mut h = guest(OP_REQUEST, 1, 5000, 0, 0);
    h.src_cid = 4;
    r.send(h, &[]);
    assert!(r.recv().is_none());
    // Not a stream, an unknown op, op 0, a length past the buffers: RST.
    let mut h = guest(OP_REQUEST, 1, 5000, 0, 0);
    h.kind = 2;
    r.send(h, &[]);
    r.send(guest(99, 1, 5000, 0, 0), &[]);
    r.send(guest(0, 1, 5000, 0, 0), &[]);
    let mut h = guest(OP_RW, 1, 5000, 0, 0);
    h.len = 100;
    r.send_raw(h, b"short");
    let mut h = guest(OP_RW, 1, 5000, 0, 0);
    h.len = u32::MAX;
    r.send_raw(h, b"");
    for _ in 0..5 {
        assert_eq!(r.recv().unwrap().0.op, OP_RST);
    }
    assert!(r.recv().is_none());
    // Shorter than a header: dropped.
    let mut c = Chain::default();
    c.push(&r.mem, TX_HDR, 20, false).unwrap();
    r.mux.handle_tx(&r.ev, &r.mem, &c);
    let c = Chain::default();
    r.mux.handle_tx(&r.ev, &r.mem, &c);
    assert!(r.recv().is_none());
    // An rx buffer too small for a header comes back empty.
    let mut c = Chain::default();
    c.push(&r.mem, RX_HDR, 10, true).unwrap();
    assert_eq!(r.mux.fill_rx(&r.ev, &r.mem, &c), Some(0));
}

#[test]
fn a_malformed_packet_on_a_connection_resets_it() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    let mut h = guest(OP_RW, 1234, 5000, 65536, 0);
    h.len = 1000;
    r.send_raw(h, b"only a few");
    let (h, _) = r.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 5000, 1234));
    assert_eq!(r.mux.connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0, "the host socket is closed");
}

#[test]
fn protocol_violations_reset_the_connection() {
    let mut r = Rig::new();
    let _host = r.connected(65536);
    // A second REQUEST on an open connection.
    r.send(guest(OP_REQUEST, 1234, 5000, 65536, 0), &[]);
    assert_eq!(r.recv().unwrap().0.op, OP_RST);
    let _host = r.connected(65536);
    // Data after the guest said it would send no more.
    let mut h = guest(OP_SHUTDOWN, 1234, 5000, 65536, 0);
    h.flags = SHUTDOWN_SEND;
    r.send(h, &[]);
    r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"late");
    assert_eq!(r.recv().unwrap().0.op, OP_RST);
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn the_guest_never_gets_more_than_its_credit() {
    let mut r = Rig::new();
    r.rx_room = 64 * 1024;
    let mut host = r.connected(10_000);
    host.write_all(&vec![7u8; 30_000]).unwrap();
    let got = r.drain();
    let data: usize = got
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 10_000, "exactly the guest's buffer");
    assert_eq!(
        got.last().unwrap().0.op,
        OP_CREDIT_REQUEST,
        "and then a request for more credit, once"
    );
    assert!(r.drain().is_empty(), "nothing until the guest makes room");
    // The guest consumed 4000 bytes.
    r.send(guest(OP_CREDIT_UPDATE, 1234, 5000, 10_000, 4000), &[]);
    let got = r.drain();
    let data: usize = got.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(data, 4000);
    // A bigger buffer, everything consumed: the rest flows.
    r.send(guest(OP_CREDIT_UPDATE, 1234, 5000, 100_000, 14_000), &[]);
    let data: usize = r.drain().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(data, 16_000);
}

#[test]
fn credit_accounting_survives_wrapping_and_nonsense() {
    let mut r = Rig::new();
    r.rx_room = 64 * 1024;
    let mut host = r.connected(1000);
    // A fwd_cnt ahead of what we sent: no credit, not a huge one.
    r.send(guest(OP_CREDIT_UPDATE, 1234, 5000, 1000, 5000), &[]);
    assert_eq!(r.mux.connection(KEY).unwrap().peer_free(), 0);
    host.write_all(b"abc").unwrap();
    let got = r.drain();
    assert!(got.iter().all(|(h, _)| h.op != OP_RW), "{got:?}");
    r.send(guest(OP_CREDIT_UPDATE, 1234, 5000, 1000, 0), &[]);
    assert_eq!(r.mux.connection(KEY).unwrap().peer_free(), 1000);
    let data: Vec<u8> = r.drain().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"abc");
}

#[test]
fn a_guest_overrunning_our_buffer_is_reset_and_memory_stays_bounded() {
    let mut r = Rig::new();
    let host = r.connected(65536);
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        r.send(guest(OP_RW, 1234, 5000, 65536, 0), &chunk);
        sent += chunk.len() as u64;
        match r.mux.connection(KEY) {
            Some(c) => assert!(c.buffered() <= BUF_ALLOC as usize),
            None => break,
        }
        assert!(sent < 64 << 20, "never reset");
    }
    let got = r.drain();
    assert!(got.iter().any(|(h, _)| h.op == OP_RST), "{got:?}");
    drop(host);
}

#[test]
fn a_host_that_reads_slowly_gets_everything_and_the_guest_hears_of_freed_room() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    // The guest fills the buffer we advertised (ignoring the socket buffer absorbing it).
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut total = 0u32;
    let mut freed = 0u32;
    let mut received = Vec::new();
    let want = 4 * BUF_ALLOC;
    while total < want {
        let free = BUF_ALLOC - (total - freed);
        let n = free.min(chunk.len() as u32).min(want - total);
        if n > 0 {
            r.send(guest(OP_RW, 1234, 5000, 65536, 0), &chunk[..n as usize]);
            total += n;
        }
        // The host reads a little; the guest learns of room only through our packets.
        let mut b = vec![0u8; 50_000];
        let got = host.read(&mut b).unwrap();
        received.extend_from_slice(&b[..got]);
        for (h, _) in r.drain() {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            freed = h.fwd_cnt;
        }
        let c = r.mux.connection(KEY).unwrap();
        assert!(c.buffered() <= BUF_ALLOC as usize);
    }
    while received.len() < want as usize {
        let mut b = vec![0u8; 65536];
        let got = host.read(&mut b).unwrap();
        received.extend_from_slice(&b[..got]);
        r.pump();
    }
    assert_eq!(received.len(), want as usize);
    assert!(received.chunks(chunk.len()).all(|c| c == &chunk[..c.len()]));
}

#[test]
fn small_messages_do_not_cause_credit_updates_but_a_request_does() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    for _ in 0..10 {
        r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"ping");
    }
    let mut b = [0u8; 40];
    host.read_exact(&mut b).unwrap();
    assert!(r.drain().is_empty());
    r.send(guest(OP_CREDIT_REQUEST, 1234, 5000, 65536, 0), &[]);
    let got = r.drain();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.fwd_cnt), (OP_CREDIT_UPDATE, 40));
}

#[test]
fn half_close_each_way_then_the_connection_ends() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    // The guest is done sending: the host reads EOF, and can still answer.
    r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"question");
    let mut h = guest(OP_SHUTDOWN, 1234, 5000, 65536, 0);
    h.flags = SHUTDOWN_SEND;
    r.send(h, &[]);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"question");
    host.write_all(b"answer").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let got = r.drain();
    let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_RW, OP_SHUTDOWN, OP_RST], "{got:?}");
    assert_eq!(got[0].1, b"answer");
    assert_eq!(got[1].0.flags, SHUTDOWN_SEND);
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn guest_close_flushes_what_it_sent_then_resets() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"last words");
    let mut h = guest(OP_SHUTDOWN, 1234, 5000, 65536, 0);
    h.flags = SHUTDOWN_BOTH;
    r.send(h, &[]);
    assert_eq!(r.recv().unwrap().0.op, OP_RST);
    assert_eq!(r.mux.connection_count(), 0);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
}

#[test]
fn guest_close_with_a_host_that_does_not_read_times_out() {
    let mut r = Rig::new();
    let _host = r.connected(65536);
    let chunk = vec![0u8; 64 * 1024];
    while r.mux.connection(KEY).unwrap().buffered() == 0 {
        r.send(guest(OP_RW, 1234, 5000, 65536, 0), &chunk);
    }
    let mut h = guest(OP_SHUTDOWN, 1234, 5000, 65536, 0);
    h.flags = SHUTDOWN_BOTH;
    r.send(h, &[]);
    assert!(r.drain().is_empty());
    assert!(r.mux.has_deadlines());
    r.mux.tick(&r.ev, Instant::now());
    assert_eq!(r.mux.connection_count(), 1);
    r.mux.tick(
        &r.ev,
        Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_secs(1),
    );
    assert_eq!(r.mux.connection_count(), 0);
    assert_eq!(r.recv().unwrap().0.op, OP_RST);
}

#[test]
fn guest_rst_closes_the_host_socket() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    r.send(guest(OP_RST, 1234, 5000, 0, 0), &[]);
    assert_eq!(r.mux.connection_count(), 0);
    assert!(r.drain().is_empty(), "no RST for an RST");
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
}

#[test]
fn a_host_that_goes_away_resets_the_guest() {
    let mut r = Rig::new();
    let host = r.connected(65536);
    drop(host);
    // The guest finds out by reading (EOF, then its data cannot be delivered) ...
    let got = r.drain();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    r.send(guest(OP_RW, 1234, 5000, 65536, 0), b"anyone?");
    assert_eq!(r.recv().unwrap().0.op, OP_RST);
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn without_rx_buffers_nothing_is_read_and_the_socket_is_not_watched() {
    let mut r = Rig::new();
    let mut host = r.connected(65536);
    host.write_all(b"data").unwrap();
    r.pump();
    assert!(r.mux.has_rx_work());
    let c = r.mux.connection(KEY).unwrap();
    assert_eq!(
        c.watched, None,
        "readable and unread: not watched, so no wakeups"
    );
    let (h, d) = r.recv().unwrap();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"data"[..]));
    assert!(r.recv().is_none());
    let c = r.mux.connection(KEY).unwrap();
    assert_eq!(c.watched, Some(EventSet::IN), "drained: watched again");
}

fn client(r: &Rig) -> UnixStream {
    let s = UnixStream::connect(r.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[test]
fn host_client_connects_to_a_guest_port() {
    let mut r = Rig::new();
    let mut c = client(&r);
    c.write_all(b"CONNECT 6000\n").unwrap();
    let got = r.drain();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(
        (req.op, req.dst_port, req.src_port),
        (OP_REQUEST, 6000, FIRST_LOCAL_PORT)
    );
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    r.send(guest(OP_RESPONSE, 6000, req.src_port, 65536, 0), &[]);
    let mut line = [0u8; 14];
    c.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
    c.write_all(b"to guest").unwrap();
    let got = r.drain();
    assert_eq!(
        (got[0].0.op, got[0].1.as_slice()),
        (OP_RW, &b"to guest"[..])
    );
    r.send(guest(OP_RW, 6000, req.src_port, 65536, 0), b"to host");
    let mut b = [0u8; 7];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to host");
    // A second client gets another host port.
    let mut c2 = client(&r);
    c2.write_all(b"CONNECT 6000\r\n").unwrap();
    let got = r.drain();
    assert_eq!(got[0].0.src_port, FIRST_LOCAL_PORT + 1);
}

#[test]
fn host_client_refused_by_the_guest_is_closed() {
    let mut r = Rig::new();
    let mut c = client(&r);
    c.write_all(b"CONNECT 6001\n").unwrap();
    let req = r.drain()[0].0;
    r.send(guest(OP_RST, 6001, req.src_port, 0, 0), &[]);
    let mut b = Vec::new();
    c.read_to_end(&mut b).unwrap();
    assert!(b.is_empty());
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn host_client_unanswered_by_the_guest_times_out() {
    let mut r = Rig::new();
    let mut c = client(&r);
    c.write_all(b"CONNECT 6002\n").unwrap();
    let req = r.drain()[0].0;
    assert!(r.mux.has_deadlines());
    r.mux.tick(&r.ev, Instant::now() + Duration::from_secs(60));
    let (h, _) = r.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, req.src_port, 6002));
    let mut b = Vec::new();
    c.read_to_end(&mut b).unwrap();
    assert!(b.is_empty());
    assert!(!r.mux.has_deadlines());
}

#[test]
fn host_clients_with_bad_or_endless_lines_are_closed() {
    let mut r = Rig::new();
    for line in [
        &b"CONNECT\n"[..],
        b"CONNECT 12x\n",
        b"connect 5\n",
        b"CONNECT 99999999999\n",
        b"CONNECT  5\n",
        &[b'A'; 200],
    ] {
        let mut c = client(&r);
        c.write_all(line).unwrap();
        assert!(r.drain().is_empty(), "{line:?}");
        let mut b = Vec::new();
        // The endless line may be cut off with unread bytes: a reset is fine too.
        let _ = c.read_to_end(&mut b);
        assert!(b.is_empty(), "{line:?}");
    }
    // A client that says nothing is dropped after a while.
    let mut c = client(&r);
    c.write_all(b"CONN").unwrap();
    r.drain();
    assert!(r.mux.has_deadlines());
    r.mux.tick(&r.ev, Instant::now() + Duration::from_secs(60));
    let mut b = Vec::new();
    c.read_to_end(&mut b).unwrap();
    assert!(!r.mux.has_deadlines());
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 5000"), Some(5000));
    assert_eq!(parse_connect(b"CONNECT 5000\r"), Some(5000));
    assert_eq!(parse_connect(b"CONNECT 0"), Some(0));
    assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
    assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
    assert_eq!(parse_connect(b"CONNECT +5"), None);
    assert_eq!(parse_connect(b"CONNECT -5"), None);
    assert_eq!(parse_connect(b"CONNECT "), None);
    assert_eq!(parse_connect(b"CONNECT 5 6"), None);
    assert_eq!(parse_connect(b"CONNECT\t5"), None);
    assert_eq!(parse_connect(b""), None);
    assert_eq!(parse_connect(b"OK 5"), None);

    let mut line = Vec::new();
    let mut input: &[u8] = b"CONNECT 7\nrest";
    assert_eq!(read_line(&mut input, &mut line), LineRead::Line);
    assert_eq!(line, b"CONNECT 7");
    assert_eq!(input, b"rest", "nothing after the newline is consumed");
    let mut line = Vec::new();
    let long = vec![b'9'; 10 * MAX_LINE];
    assert_eq!(read_line(&mut &long[..], &mut line), LineRead::Failed);
    assert_eq!(line.len(), MAX_LINE, "bounded");
    let mut line = Vec::new();
    assert_eq!(
        read_line(&mut &b"CONN"[..], &mut line),
        LineRead::Failed,
        "EOF"
    );
}

#[test]
fn listening_socket_replaces_stale_files_but_not_live_sockets_or_other_files() {
    let dir = Scratch::new();
    let path = dir.0.join("s");
    let opts = VsockOptions {
        cid: 3,
        socket: path.clone(),
    };
    // A stale socket (its listener is gone).
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let b = VsockBackend::bind(&opts).unwrap();
    // A live one.
    assert!(matches!(
        VsockBackend::bind(&opts),
        Err(VsockError::InUse { .. })
    ));
    drop(b);
    assert!(!path.exists(), "removed when the device goes");
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        VsockBackend::bind(&opts),
        Err(VsockError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    let missing = VsockOptions {
        cid: 3,
        socket: dir.0.join("no/such/dir"),
    };
    assert!(matches!(
        VsockBackend::bind(&missing),
        Err(VsockError::Bind { .. })
    ));
}

#[test]
fn options_are_validated() {
    let ok = |cid, p: &str| {
        VsockOptions {
            cid,
            socket: PathBuf::from(p),
        }
        .validate()
    };
    assert!(ok(3, "/tmp/v").is_ok());
    assert!(ok(MAX_CID, "/tmp/v").is_ok());
    assert!(matches!(ok(2, "/tmp/v"), Err(VsockError::BadCid(2))));
    assert!(matches!(ok(0, "/tmp/v"), Err(VsockError::BadCid(0))));
    assert!(ok(u64::from(u32::MAX), "/tmp/v").is_err());
    assert!(ok(1 << 40, "/tmp/v").is_err());
    assert!(matches!(ok(3, ""), Err(VsockError::EmptyPath)));
    assert!(ok(3, &"a".repeat(MAX_SOCKET_PATH)).is_ok());
    assert!(matches!(
        ok(3, &"a".repeat(MAX_SOCKET_PATH + 1)),
        Err(VsockError::PathTooLong { .. })
    ));
}

#[test]
fn device_shows_its_cid_and_three_queues() {
    let dir = Scratch::new();
    let backend = VsockBackend::bind(&VsockOptions {
        cid: 0x1_0000_0042,
        socket: dir.0.join("d"),
    });
    // Out of range for validation, so build with a valid one and check the layout.
    assert!(backend.is_err());
    let backend = VsockBackend::bind(&VsockOptions {
        cid: 0xABCD_0042,
        socket: dir.0.join("d"),
    })
    .unwrap();
    let d = Vsock::new(0xABCD_0042, backend);
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes().len(), 3);
    assert_eq!(d.features(), crate::COMMON_FEATURES);
    let mut b = [0xFFu8; 12];
    d.read_config(0, &mut b);
    assert_eq!(b, [0x42, 0, 0xCD, 0xAB, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0u8; 2];
    d.read_config(2, &mut b);
    assert_eq!(b, [0xCD, 0xAB]);
}

#[test]
fn rx_queue_is_used_only_while_there_is_something_to_send() {
    use crate::chain::tests::{desc, F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    let mut r = Rig::new();
    for port in 0..3 {
        r.send(guest(OP_RW, port, 9, 65536, 0), b"?");
    }
    let mem = r.mem.clone();
    let vq = MockSplitQueue::new(&mem, 16);
    let buf = |i: u64| desc(0x8_0000 + i * 0x2000, 4096 + HEADER_LEN as u32, F_WRITE, 0);
    vq.add_desc_chains(&[buf(0), buf(1)], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let used = |vq: &MockSplitQueue<GuestMemory>| u16::from_le(vq.used().idx().load());
    super::fill_rx(
        &mut q,
        &r.mem,
        &mut r.mux,
        &r.ev,
        &CounterSet::new(&super::VSOCK_COUNTERS),
    )
    .unwrap();
    assert_eq!(used(&vq), 2, "both buffers carry an RST");
    assert!(r.mux.has_rx_work(), "one RST still waits for a buffer");
    vq.add_desc_chains(&[buf(2), buf(3)], 2).unwrap();
    super::fill_rx(
        &mut q,
        &r.mem,
        &mut r.mux,
        &r.ev,
        &CounterSet::new(&super::VSOCK_COUNTERS),
    )
    .unwrap();
    assert_eq!(used(&vq), 3, "the last RST; the other buffer stays with us");
    assert!(!r.mux.has_rx_work());
    super::fill_rx(
        &mut q,
        &r.mem,
        &mut r.mux,
        &r.ev,
        &CounterSet::new(&super::VSOCK_COUNTERS),
    )
    .unwrap();
    assert_eq!(used(&vq), 3);
    // The buffer left over carries the next packet.
    r.send(guest(OP_RW, 5, 9, 65536, 0), b"?");
    super::fill_rx(
        &mut q,
        &r.mem,
        &mut r.mux,
        &r.ev,
        &CounterSet::new(&super::VSOCK_COUNTERS),
    )
    .unwrap();
    assert_eq!(used(&vq), 4);
    let mut raw = [0u8; HEADER_LEN];
    r.mem
        .read_slice(&mut raw, GuestAddress(0x8_0000 + 3 * 0x2000))
        .unwrap();
    let h = Header::parse(&raw).unwrap();
    assert_eq!((h.op, h.dst_port), (OP_RST, 5));
}
