//! A minimal HTTP client for vmon's API socket, as tests and benchmarks drive it: one
//! request per connection, the whole answer read to EOF. (`vmon_api::client` is the real
//! client; tests speak raw HTTP so they see exactly what goes over the socket.)

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest a test waits for an answer: a snapshot of a large guest in the lab takes a while.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends one request (a JSON body if given) and returns the status and the body.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    parse_response(&resp)
}

pub fn get(socket: &Path, path: &str) -> (u16, String) {
    http(socket, "GET", path, None)
}

pub fn post(socket: &Path, path: &str, body: &str) -> (u16, String) {
    http(socket, "POST", path, Some(body))
}

/// The status and body of a raw HTTP response.
pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// Waits until something accepts connections on `socket`.
pub fn wait_socket(socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
