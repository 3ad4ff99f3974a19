//! A minimal blocking client for `vmon ctl`: one request per connection, a deadline on the
//! whole exchange, and errors phrased for the person at the terminal.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;

/// Responses larger than this are refused rather than buffered; the API's largest (the
/// counters of a VM with many devices) is far smaller.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
const MAX_HEAD: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The message of an API error body (`{"error": "..."}`), if that is what this is.
    pub fn error_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(v.get("error")?.as_str()?.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("cannot connect to {}: {reason}{hint}", path.display())]
    Connect {
        path: PathBuf,
        reason: String,
        hint: &'static str,
    },
    #[error("no response from {} within {} s", path.display(), timeout.as_secs_f64())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("talking to {}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("invalid response from {}: {reason}", path.display())]
    BadResponse { path: PathBuf, reason: String },
}

/// Sends one request to the API at `socket` and returns its response, whatever the status;
/// errors are only for when no well-formed response arrived within `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ClientError::InvalidRequest(
            "the method must be letters only",
        ));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(
            "the path must start with / and contain no spaces or control characters",
        ));
    }
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => " (is the VM running?)",
            _ => "",
        };
        ClientError::Connect {
            path: socket.into(),
            reason: describe(&e),
            hint,
        }
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: socket.into(),
            timeout,
        },
        _ => ClientError::Io {
            path: socket.into(),
            reason: describe(&e),
        },
    };

    let mut message =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    let body = body.unwrap_or_default();
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        message.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    message.push_str("\r\n");
    let mut out = message.into_bytes();
    out.extend_from_slice(body);
    let mut written = 0;
    while written < out.len() {
        stream
            .set_write_timeout(Some(remaining(deadline)))
            .map_err(io_err)?;
        match sys::send(&stream, &out[written..], false) {
            Ok(n) => written += n,
            // The server may answer and close early (an error about the head); its answer
            // is worth more than the write error.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => break,
            Err(e) => return Err(io_err(e)),
        }
    }

    let bad = |reason: String| ClientError::BadResponse {
        path: socket.into(),
        reason,
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    loop {
        // Parse what we have: a complete response ends the exchange.
        if let Some(r) = parse_response(&buf, eof).map_err(bad)? {
            return Ok(r);
        }
        if eof {
            return Err(bad(
                "the connection closed before the response was complete".into(),
            ));
        }
        stream
            .set_read_timeout(Some(remaining(deadline)))
            .map_err(io_err)?;
        match (&stream).read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => {
                if buf.len() + n > MAX_RESPONSE {
                    return Err(bad(format!("the response exceeds {MAX_RESPONSE} bytes")));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // After a complete request, a reset only means the server closed without
            // reading everything; what it sent is still in `buf`.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => eof = true,
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// A timeout of zero means "no timeout" to the socket options, so keep a millisecond.
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// The first final response in `buf`, skipping interim (1xx) ones. `eof`: nothing more will
/// arrive, so a response without Content-Length ends here.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<ClientResponse>, String> {
    let mut start = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        let head_len = match r.parse(&buf[start..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if buf.len() - start > MAX_HEAD {
                    return Err(format!("response head longer than {MAX_HEAD} bytes"));
                }
                return Ok(None);
            }
            Err(e) => return Err(e.to_string()),
        };
        let status = r.code.unwrap_or(0);
        if (100..200).contains(&status) {
            start += head_len;
            continue;
        }
        let mut length = None;
        let mut content_type = None;
        for h in r.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or("invalid Content-Length")?;
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("content-type") {
                content_type = Some(String::from_utf8_lossy(h.value).into_owned());
            }
        }
        let body_start = start + head_len;
        let available = buf.len() - body_start;
        let body = match length {
            Some(n) if available >= n => &buf[body_start..body_start + n],
            Some(n) if n > MAX_RESPONSE => {
                return Err(format!("the response exceeds {MAX_RESPONSE} bytes"))
            }
            None if eof => &buf[body_start..],
            _ => return Ok(None),
        };
        return Ok(Some(ClientResponse {
            status,
            content_type,
            body: body.to_vec(),
        }));
    }
}

/// An I/O error for one line of output: the OS's words without "(os error 2)".
fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let full = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        for i in 0..full.len() {
            assert_eq!(parse_response(&full[..i], false), Ok(None), "{i}");
        }
        let r = parse_response(full, false).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.body, b"{}");
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\nuntil eof", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"until eof");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        assert!(parse_response(b"garbage\r\n\r\n", false).is_err());
        let e = ClientResponse {
            status: 409,
            content_type: None,
            body: br#"{"error":"the VM is stopping"}"#.to_vec(),
        };
        assert_eq!(e.error_message().as_deref(), Some("the VM is stopping"));
        assert!(!e.is_success());
    }

    #[test]
    fn connect_errors_read_well() {
        let path =
            std::env::temp_dir().join(format!("vmon-api-missing-{}.sock", std::process::id()));
        let e = request(&path, "GET", "/v1/vm", None, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot connect to {}: No such file or directory (is the VM running?)",
                path.display()
            )
        );
        assert!(matches!(
            request(&path, "GET", "v1", None, Duration::from_secs(1)),
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            request(&path, "GE T", "/", None, Duration::from_secs(1)),
            Err(ClientError::InvalidRequest(_))
        ));
    }
}
