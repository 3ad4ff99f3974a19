//! Entry point for fuzzing: arbitrary bytes, cut into arbitrary chunks, through the same
//! per-connection protocol code the server runs (parser, router over a mock VM, response
//! serialisation, pipelining and back-pressure), minus only the socket. Used by the
//! cargo-fuzz target `api_request` in `fuzz/` and, with pseudo-random inputs, by the unit
//! test below so it keeps compiling and passing on stable.
//!
//! Beyond "does not panic", it checks what a client relies on:
//! - the output is a well-formed sequence of responses, one per request, in order, nothing
//!   after a `Connection: close`;
//! - how the input is chunked (and how slowly the client reads) changes nothing;
//! - buffered input never exceeds one maximal request;
//! - a request answered later (`/later`, `/later-dropped`: [`Handler::start`]) holds the
//!   requests behind it until its answer comes, whenever that is, and a dropped reply is a
//!   500.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::{Request, Response};
use crate::model::{Counters, DeviceCounters, VcpuCounters, VmInfo, VmState};
use crate::router::{ApiError, Router, VmApi};
use crate::server::{later, Handler, Later, Limits, Reply, ServerStats, Session};

/// A VM that only keeps its state; enough for every route and error path.
struct MockVm {
    state: Mutex<VmState>,
}

impl MockVm {
    fn state(&self) -> std::sync::MutexGuard<'_, VmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VmApi for MockVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: *self.state(),
            uptime_s: 1.0,
            vcpus: 1,
            memory_mib: 64,
            pid: 1,
            config: serde_json::Value::Null,
        }
    }
    fn pause(&self) -> Result<VmState, ApiError> {
        let mut s = self.state();
        match *s {
            VmState::Running | VmState::Paused => {
                *s = VmState::Paused;
                Ok(*s)
            }
            other => Err(ApiError::conflict(format!(
                "cannot pause: the VM is {other}"
            ))),
        }
    }
    fn resume(&self) -> Result<VmState, ApiError> {
        let mut s = self.state();
        if *s == VmState::Paused {
            *s = VmState::Running;
        }
        Ok(*s)
    }
    fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError> {
        let mut s = self.state();
        if *s == VmState::Stopped {
            return Err(ApiError::conflict("the VM is stopping".into()));
        }
        if timeout.is_zero() {
            *s = VmState::Stopped;
        } else {
            *s = VmState::ShuttingDown;
        }
        Ok(timeout)
    }
    fn stop(&self) -> Result<(), ApiError> {
        *self.state() = VmState::Stopped;
        Ok(())
    }
    fn counters(&self) -> Counters {
        Counters {
            uptime_s: 1.0,
            vcpus: vec![VcpuCounters {
                index: 0,
                cpu_time_s: 0.5,
                exits: [("io_out".to_string(), 3)].into(),
            }],
            devices: vec![DeviceCounters {
                name: "d\"0\\\n".into(),
                kind: "block".into(),
                counters: [("rx-bytes".to_string(), 1), ("rx_bytes".to_string(), 2)].into(),
            }],
            api: [("2xx".to_string(), 1)].into(),
        }
    }
}

/// The router, noting the method of every request that reaches it (the framing check needs
/// to know which responses answer HEAD and so have no body), and answering `/later` and
/// `/later-dropped` later: their replies wait in `replies` until the conversation delivers
/// them (a dropped one answers 500).
struct Recorder {
    router: Router<MockVm>,
    methods: Mutex<Vec<String>>,
    replies: Mutex<Vec<(Reply, Option<Response>)>>,
}

impl Handler for Recorder {
    fn handle(&self, request: &Request) -> Response {
        if let Ok(mut m) = self.methods.lock() {
            m.push(request.method.clone());
        }
        self.router.handle(request)
    }

    fn start(&self, request: &Request) -> Option<Later> {
        let response = match request.path.as_str() {
            "/later" => Some(Response::text(200, format!("later {}", request.method))),
            "/later-dropped" => None,
            _ => return None,
        };
        let (later, reply) = later().ok()?;
        if let Ok(mut m) = self.methods.lock() {
            m.push(request.method.clone());
        }
        if let Ok(mut r) = self.replies.lock() {
            r.push((reply, response));
        }
        Some(later)
    }
}

impl Recorder {
    /// Answers (or drops) every reply still waiting.
    fn deliver(&self) {
        let replies = std::mem::take(&mut *self.replies.lock().unwrap_or_else(|p| p.into_inner()));
        for (reply, response) in replies {
            if let Some(r) = response {
                reply.send(r);
            }
        }
    }
}

/// xorshift64*: deterministic chunking from the input's first bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One simulated connection: the client sends `input` in chunks whose sizes `rng` picks
/// (all at once without one) and reads its responses now and then (always, without one).
/// Returns everything the server sent and the methods the handler saw.
fn converse(input: &[u8], limits: &Limits, mut rng: Option<Rng>) -> (Vec<u8>, Vec<String>) {
    let recorder = Recorder {
        router: Router::new(Arc::new(MockVm {
            state: Mutex::new(VmState::Running),
        })),
        methods: Mutex::new(Vec::new()),
        replies: Mutex::new(Vec::new()),
    };
    let stats = ServerStats::default();
    let mut session = Session::default();
    let mut received = Vec::new();
    let mut rest = input;
    let bound = limits.max_head + limits.max_body;
    while !rest.is_empty() && !session.is_closing() {
        let room = session.input_room(limits);
        if room == 0 {
            // Nothing more can be read until the client reads (and any work answering
            // later is done): it does.
            recorder.deliver();
            received.extend_from_slice(session.pending_output());
            session.consume_output(usize::MAX);
            session.process(&recorder, &stats, limits);
            assert!(
                session.input_room(limits) > 0 || session.is_closing(),
                "a full input buffer must lead to an answer"
            );
            continue;
        }
        let want = match rng.as_mut() {
            Some(r) => 1 + r.below(64),
            None => rest.len(),
        };
        let n = want.min(room).min(rest.len());
        session.push_input(&rest[..n], limits);
        rest = &rest[n..];
        session.process(&recorder, &stats, limits);
        // Work answering later finishes now or some steps on.
        if rng.as_mut().is_none_or(|r| r.below(2) == 0) {
            recorder.deliver();
            session.process(&recorder, &stats, limits);
        }
        assert!(session.input_room(limits) <= bound);
        let reads = rng.as_mut().is_none_or(|r| r.below(4) != 0);
        if reads {
            // A partial read, like a socket buffer taking part of the output.
            let pending = session.pending_output();
            let take = match rng.as_mut() {
                Some(r) => r.below(pending.len() + 1),
                None => pending.len(),
            };
            received.extend_from_slice(&pending[..take]);
            session.consume_output(take);
        }
    }
    session.end_of_input();
    // The client reads whatever is left; requests that waited for it to read are answered
    // as it does.
    loop {
        recorder.deliver();
        session.process(&recorder, &stats, limits);
        let pending = session.pending_output();
        if pending.is_empty() {
            break;
        }
        received.extend_from_slice(pending);
        session.consume_output(usize::MAX);
    }
    assert!(
        session.is_closing(),
        "the end of input must close the session"
    );
    let methods = recorder
        .methods
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    (received, methods)
}

/// Splits the server's output into final responses (status, body), checking the framing.
fn responses(mut out: &[u8], methods: &[String]) -> Vec<(u16, Vec<u8>)> {
    let mut found = Vec::new();
    let mut closed = false;
    while !out.is_empty() {
        assert!(!closed, "output after Connection: close");
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "malformed response head: {other:?} in {:?}",
                String::from_utf8_lossy(out)
            ),
        };
        let status = r.code.unwrap_or(0);
        assert!((100..600).contains(&status));
        let mut length = None;
        for h in r.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok());
            }
            if h.name.eq_ignore_ascii_case("connection") && h.value == b"close" {
                closed = true;
            }
        }
        out = &out[head..];
        if status < 200 {
            assert_eq!(status, 100);
            continue;
        }
        let length = length.expect("a final response without Content-Length");
        let head_only = methods.get(found.len()).is_some_and(|m| m == "HEAD");
        let body_len = if head_only { 0 } else { length };
        assert!(out.len() >= body_len, "truncated body");
        found.push((status, out[..body_len].to_vec()));
        out = &out[body_len..];
    }
    // One response per request the handler saw, plus possibly the server's own final error.
    assert!(
        found.len() == methods.len() || found.len() == methods.len() + 1,
        "{} responses for {} requests",
        found.len(),
        methods.len()
    );
    if found.len() > methods.len() {
        assert!(closed, "a server error must close the connection");
    }
    found
}

/// The fuzz target: byte 0 picks the chunking and the limits, the rest is what a client
/// sends on one connection.
pub fn api_request(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    // Small limits half the time, so 413, 431 and back-pressure are reachable with short
    // inputs.
    let limits = if control & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_head: 200,
            max_body: 64,
            max_queued_output: 256,
            ..Limits::default()
        }
    };
    let (whole, whole_methods) = converse(input, &limits, None);
    let (chunked, chunked_methods) = converse(
        input,
        &limits,
        Some(Rng(u64::from(control) | 0x9E37_79B9_0000_0000)),
    );
    let a = responses(&whole, &whole_methods);
    let b = responses(&chunked, &chunked_methods);
    assert_eq!(whole_methods, chunked_methods);
    assert_eq!(a, b, "chunking changed the responses");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of plausible requests, so random inputs reach past the request line.
    const PIECES: &[&[u8]] = &[
        b"GET /v1/vm HTTP/1.1\r\n",
        b"HEAD /v1/counters HTTP/1.1\r\n",
        b"GET /metrics HTTP/1.0\r\n",
        b"POST /v1/vm/pause HTTP/1.1\r\n",
        b"PUT /v1/vm/resume HTTP/1.1\r\n",
        b"POST /v1/vm/shutdown HTTP/1.1\r\n",
        b"POST /v1/vm/stop HTTP/1.1\r\n",
        b"DELETE /v1/vm HTTP/1.1\r\n",
        b"GET /nope?x=1 HTTP/1.1\r\n",
        b"GET /later HTTP/1.1\r\n",
        b"HEAD /later HTTP/1.1\r\n",
        b"POST /later-dropped HTTP/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"Host: localhost\r\n",
        b"Connection: close\r\n",
        b"Connection: keep-alive\r\n",
        b"Expect: 100-continue\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Content-Length: 0\r\n",
        b"Content-Length: 15\r\n",
        b"Content-Length: 99999\r\n",
        b"Content-Length: x\r\n",
        b"\r\n",
        b"\r\n",
        b"\r\n",
        b"{\"timeout_s\":5}",
        b"{\"timeout_s\":\"x\"}",
        b"{\"bogus\":1}",
        b"{",
        b" ",
        b"\n",
        b"\0",
    ];

    fn random_input(rng: &mut Rng) -> Vec<u8> {
        let mut v = vec![rng.next() as u8];
        for _ in 0..rng.below(40) {
            if rng.below(8) == 0 {
                for _ in 0..rng.below(16) {
                    v.push(rng.next() as u8);
                }
            } else {
                v.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
        }
        if rng.below(16) == 0 {
            // Long heads and bodies for the limits.
            v.resize(v.len() + rng.below(10_000), b'a');
        }
        v
    }

    #[test]
    fn random_inputs() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let input = random_input(&mut rng);
            if std::panic::catch_unwind(|| api_request(&input)).is_err() {
                panic!("failing input: {:?}", String::from_utf8_lossy(&input));
            }
        }
    }

    #[test]
    fn known_inputs() {
        api_request(b"");
        api_request(b"\x00");
        api_request(b"\x01GET /v1/vm HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        api_request(b"\x02POST /v1/vm/shutdown HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n{\"timeout_s\":5}");
        api_request(b"\x03HEAD /v1/vm HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n");
        // Found by the fuzzer: a bad version byte was 505 or 400 depending on chunking.
        api_request(b"\x01POST /v1/vm/shutdown HTTP/\x01POS1T /v");
        // Found by the fuzzer: a panic slicing a UTF-8 target at the scheme's length.
        api_request("\x02POST /v1/vmЍesume HTTP/1.1\r\n\r\n".as_bytes());
    }

    #[test]
    fn the_checks_can_fail() {
        // A response missing for a request the handler saw is caught.
        let out = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let r = std::panic::catch_unwind(|| responses(out, &["GET".into(), "GET".into()]));
        assert!(r.is_err());
        // So is output after a close.
        let out = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let r = std::panic::catch_unwind(|| responses(out, &["GET".into(), "GET".into()]));
        assert!(r.is_err());
    }
}
