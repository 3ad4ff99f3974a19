//! HTTP/1.1 for a management socket: just enough of the protocol for `curl` and our own
//! client, with every size decided before anything is buffered.
//!
//! The parser is stateless: it looks at a connection's buffered bytes and says whether they
//! hold a complete request yet. Re-parsing a head after each read costs little (heads are at
//! most a few KiB and must arrive within seconds) and keeps one source of truth, which is
//! also what makes chunked and one-shot input provably equivalent under the fuzzer.
//!
//! Deliberately unsupported: `Transfer-Encoding` (no client of this API needs chunked
//! uploads, and request smuggling lives in the combinations of it with Content-Length),
//! HTTP/2 and upgrades.

use std::fmt;

use serde::Serialize;

/// Headers beyond this many are answered with 431; real clients send fewer than ten.
const MAX_HEADERS: usize = 32;

/// The media type of JSON bodies.
pub const JSON: &str = "application/json";
/// The media type of plain text bodies.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// One parsed request. Header names keep the client's spelling; look them up with
/// [`Request::header`], which ignores case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string, always starting with `/` (or `*`).
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Whether the connection stays open after the response, per the version's default and
    /// the `Connection` header.
    pub keep_alive: bool,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response as the handler builds it; the server adds framing (`Content-Length`,
/// `Connection`) when it serialises it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Headers besides the framing ones, e.g. `Allow` on a 405.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `value` as JSON. Serialising our own types cannot fail in practice; if it does, the
    /// client gets a 500 instead of a half-written body.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: JSON,
                headers: Vec::new(),
                body,
            },
            Err(e) => Response::error(500, format_args!("cannot serialise the response: {e}")),
        }
    }

    /// `{"error": "<message>"}` with `status`.
    pub fn error(status: u16, message: impl fmt::Display) -> Response {
        #[derive(Serialize)]
        struct ErrorBody {
            error: String,
        }
        let body = ErrorBody {
            error: message.to_string(),
        };
        Response {
            status,
            content_type: JSON,
            headers: Vec::new(),
            // A struct with one string field always serialises.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }

    /// A plain text body.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: TEXT,
            headers: Vec::new(),
            body: body.into().into_bytes(),
        }
    }

    pub fn with_content_type(mut self, content_type: &'static str) -> Response {
        self.content_type = content_type;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Appends the serialised response to `out`. `head_only` answers a HEAD request (the
    /// same headers, no body); `connection` is what the server decided about the
    /// connection's future.
    pub fn write_to(&self, out: &mut Vec<u8>, head_only: bool, connection: Connection) {
        use std::io::Write;
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        // 1xx, 204 and 304 carry no body and no Content-Length.
        let bodyless = self.status < 200 || self.status == 204 || self.status == 304;
        if !bodyless {
            let _ = write!(
                out,
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            );
        }
        for (name, value) in &self.headers {
            // Header values are ours, but a stray CR or LF would split the response.
            let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            let _ = write!(out, "{name}: {value}\r\n");
        }
        match connection {
            Connection::Close => out.extend_from_slice(b"Connection: close\r\n"),
            Connection::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
            Connection::Default => {}
        }
        out.extend_from_slice(b"\r\n");
        if !bodyless && !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

/// What a response's `Connection` header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Nothing: HTTP/1.1's default, the connection stays open.
    Default,
    /// `Connection: close`: this is the last response.
    Close,
    /// `Connection: keep-alive`: an HTTP/1.0 client asked to keep the connection.
    KeepAlive,
}

/// The interim response that tells a client waiting on `Expect: 100-continue` to send the
/// body (curl waits a second for it before sending anyway).
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// A request the parser refuses: the status to answer with, and why. The connection closes
/// after the answer, since where the next request would start is unknown.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// What the bytes buffered so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `expect_continue`: the head is complete and asks for
    /// `100 Continue` before the client sends the body.
    NeedMore {
        expect_continue: bool,
    },
    /// A request, which took the first `consumed` bytes.
    Complete {
        request: Request,
        consumed: usize,
    },
    Error(HttpError),
}

/// Parses the request at the start of `buf`. A head longer than `max_head` is refused with
/// 431 and a body longer than `max_body` with 413, both as soon as that is known (the 413
/// from `Content-Length` alone, before any of the body is read).
pub fn parse_request(buf: &[u8], max_head: usize, max_body: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // The head is looked for only where it may be, so that the verdict on an over-long head
    // (431) does not depend on how much of what follows has arrived.
    let window = &buf[..buf.len().min(max_head.saturating_add(1))];
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head {
                return Parsed::Error(too_large_head(max_head));
            }
            return Parsed::NeedMore {
                expect_continue: false,
            };
        }
        // httparse says "version" as soon as a byte where the version should be is wrong,
        // also for a space in the path. Whether it is really another version (505) or
        // garbage (400) is decided on the whole request line, so the answer does not
        // depend on how much of it had arrived.
        Err(httparse::Error::Version) => {
            return match request_line(window) {
                None if buf.len() > max_head => Parsed::Error(too_large_head(max_head)),
                None => Parsed::NeedMore {
                    expect_continue: false,
                },
                Some(line) if names_other_version(line) => Parsed::Error(HttpError::new(
                    505,
                    "only HTTP/1.0 and HTTP/1.1 are supported",
                )),
                Some(_) => Parsed::Error(HttpError::new(400, "malformed request line")),
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(HttpError::new(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ))
        }
        Err(e) => return Parsed::Error(HttpError::new(400, format!("malformed request: {e}"))),
    };
    if head_len > max_head {
        return Parsed::Error(too_large_head(max_head));
    }
    // httparse fills these in on a complete parse.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(HttpError::new(400, "malformed request line"));
    };

    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for h in req.headers.iter() {
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Parsed::Error(HttpError::new(400, "duplicate Content-Length"));
            }
            match parse_content_length(value) {
                Some(n) => content_length = Some(n),
                None => return Parsed::Error(HttpError::new(400, "invalid Content-Length")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Error(HttpError::new(
                501,
                "Transfer-Encoding is not supported; send a Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                // HTTP/1.0 clients do not know 1xx responses (RFC 9110, 10.1.1).
                expect_continue = version == 1;
            } else {
                return Parsed::Error(HttpError::new(
                    417,
                    "only Expect: 100-continue is supported",
                ));
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > max_body as u64 {
        return Parsed::Error(HttpError::new(
            413,
            format!("request body of {body_len} bytes exceeds the limit of {max_body} bytes"),
        ));
    }
    // Cannot overflow: both terms are bounded by the limits.
    let consumed = head_len + body_len as usize;
    if buf.len() < consumed {
        return Parsed::NeedMore {
            expect_continue: expect_continue && body_len > 0,
        };
    }

    let (path, query) = match split_target(target) {
        Ok(pq) => pq,
        Err(e) => return Parsed::Error(e),
    };
    let keep_alive = if version == 1 {
        !close
    } else {
        keep_alive_token && !close
    };
    let request = Request {
        method: method.to_string(),
        path,
        query,
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(trim(h.value)).into_owned(),
                )
            })
            .collect(),
        body: buf[head_len..consumed].to_vec(),
        version,
        keep_alive,
    };
    Parsed::Complete { request, consumed }
}

/// The request line, once it is complete: the first line after any empty ones (which
/// httparse skips too), without its line ending.
fn request_line(buf: &[u8]) -> Option<&[u8]> {
    let mut rest = buf;
    loop {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let line = &rest[..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.is_empty() {
            return Some(line);
        }
        rest = &rest[end + 1..];
    }
}

/// Whether the request line is well-formed but for its version: `METHOD TARGET HTTP/d.d`.
fn names_other_version(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.nth(2);
    parts.next().is_none()
        && version.is_some_and(|v| {
            matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
                if major.is_ascii_digit() && minor.is_ascii_digit())
        })
}

fn too_large_head(max_head: usize) -> HttpError {
    HttpError::new(
        431,
        format!("request line and headers exceed {max_head} bytes"),
    )
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if first.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = v {
        if last.is_ascii_whitespace() {
            v = rest;
        } else {
            break;
        }
    }
    v
}

/// Digits only: no sign, no list ("5, 5"), nothing that overflows.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Origin form (`/path?query`), absolute form (`http://host/path`, which servers must
/// accept) and `*`.
fn split_target(target: &str) -> Result<(String, Option<String>), HttpError> {
    let mut rest = target;
    for scheme in ["http://", "https://"] {
        // Compared as bytes: the target may hold UTF-8 that a str slice would cut in half.
        let prefix = rest.as_bytes().get(..scheme.len());
        if let (true, Some(after)) = (
            prefix.is_some_and(|p| p.eq_ignore_ascii_case(scheme.as_bytes())),
            rest.get(scheme.len()..),
        ) {
            rest = match after.find(['/', '?']) {
                Some(i) if after.as_bytes()[i] == b'/' => &after[i..],
                Some(i) => return Ok(("/".to_string(), Some(after[i + 1..].to_string()))),
                None => "/",
            };
            break;
        }
    }
    if !rest.starts_with('/') && rest != "*" {
        return Err(HttpError::new(400, "the request target must be a path"));
    }
    Ok(match rest.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (rest.to_string(), None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: usize = 8192;
    const BODY: usize = 65536;

    fn parse(buf: &[u8]) -> Parsed {
        parse_request(buf, HEAD, BODY)
    }

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Parsed::Complete { request, consumed } => (request, consumed),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn status(buf: &[u8]) -> u16 {
        match parse(buf) {
            Parsed::Error(e) => e.status,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let buf = b"GET /v1/vm?x=1&y HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        let (r, n) = complete(buf);
        assert_eq!(n, buf.len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/v1/vm");
        assert_eq!(r.query.as_deref(), Some("x=1&y"));
        assert_eq!(r.header("HOST"), Some("localhost"));
        assert_eq!(r.version, 1);
        assert!(r.keep_alive);
        assert!(r.body.is_empty());
    }

    #[test]
    fn every_prefix_needs_more() {
        let buf =
            b"POST /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"timeout_s\": 5}\n";
        for i in 0..buf.len() {
            assert_eq!(
                parse(&buf[..i]),
                Parsed::NeedMore {
                    expect_continue: false
                },
                "prefix of {i} bytes"
            );
        }
        let (r, n) = complete(buf);
        assert_eq!(n, buf.len());
        assert_eq!(r.body, b"{\"timeout_s\": 5}\n");
    }

    #[test]
    fn pipelined_requests_consume_one_at_a_time() {
        let one = b"GET /a HTTP/1.1\r\n\r\n".as_slice();
        let two = b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi".as_slice();
        let buf = [one, two, b"GET /c HT".as_slice()].concat();
        let (r, n) = complete(&buf);
        assert_eq!((r.path.as_str(), n), ("/a", one.len()));
        let (r, m) = complete(&buf[n..]);
        assert_eq!(
            (r.path.as_str(), r.body.as_slice(), m),
            ("/b", b"hi".as_slice(), two.len())
        );
        assert!(matches!(parse(&buf[n + m..]), Parsed::NeedMore { .. }));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let (r, _) = complete(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/");
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |buf: &[u8]| complete(buf).0.keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nconnection: Upgrade, CLOSE\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-length: 1\r\n\r\n"),
            400
        );
        // Refused from the header alone: none of the body has arrived.
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            413
        );
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 65536\r\n\r\n"),
            Parsed::NeedMore { .. }
        ));
        let (r, _) = complete(b"POST / HTTP/1.1\r\nContent-Length:  3 \r\n\r\nabc");
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn transfer_encoding_is_refused() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            501
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
    }

    #[test]
    fn versions() {
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.2\r\n\r\n"), 505);
        assert_eq!(complete(b"GET / HTTP/1.0\r\n\r\n").0.version, 0);
        assert_eq!(status(b"GET / HTTP/1.x\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/11.1\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0 x\r\n"), 400);
        // Undecided until the line is complete, so chunking cannot change the answer.
        assert_eq!(
            parse(b"GET / HTTP/2"),
            Parsed::NeedMore {
                expect_continue: false
            }
        );
        assert_eq!(status(b"GET / HTTP/2.0\n"), 505);
    }

    #[test]
    fn head_limit() {
        let mut buf = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        buf.resize(HEAD + 1, b'a');
        assert_eq!(status(&buf), 431);
        buf.truncate(HEAD);
        assert!(matches!(parse(&buf), Parsed::NeedMore { .. }));
        // A complete head just over the limit is refused too.
        buf.truncate(HEAD - 3);
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&buf), 431);
        let many: String = (0..40).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn malformed_heads() {
        assert_eq!(status(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a b HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"G\x01T / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET foo HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400);
    }

    #[test]
    fn expect_continue() {
        let head =
            b"POST /v1/vm/shutdown HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(head),
            Parsed::NeedMore {
                expect_continue: true
            }
        );
        let (r, _) = complete(&[head.as_slice(), b"{}"].concat());
        assert_eq!(r.body, b"{}");
        // Nothing to wait for without a body, and HTTP/1.0 does not know 100.
        assert!(matches!(
            parse(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"),
            Parsed::Complete { .. }
        ));
        assert_eq!(
            parse(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"),
            Parsed::NeedMore {
                expect_continue: false
            }
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
    }

    #[test]
    fn absolute_form_targets() {
        assert_eq!(
            complete(b"GET http://localhost/v1/vm?a HTTP/1.1\r\n\r\n")
                .0
                .path,
            "/v1/vm"
        );
        assert_eq!(
            complete(b"GET HTTP://localhost HTTP/1.1\r\n\r\n").0.path,
            "/"
        );
        let (r, _) = complete(b"GET http://localhost?q HTTP/1.1\r\n\r\n");
        assert_eq!((r.path.as_str(), r.query.as_deref()), ("/", Some("q")));
        assert_eq!(complete(b"OPTIONS * HTTP/1.1\r\n\r\n").0.path, "*");
        // Found by the fuzzer: a multi-byte character where the scheme would end.
        let (r, _) = complete("GET /v1/vmЍesume HTTP/1.1\r\n\r\n".as_bytes());
        assert_eq!(r.path, "/v1/vmЍesume");
        assert_eq!(status("GET httpЍ HTTP/1.1\r\n\r\n".as_bytes()), 400);
    }

    fn serialise(r: &Response, head_only: bool, c: Connection) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out, head_only, c);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn response_serialisation() {
        let r = Response::error(405, "no \"way\"").with_header("Allow", "GET, HEAD");
        assert_eq!(
            serialise(&r, false, Connection::Default),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\n\
             Content-Length: 22\r\nAllow: GET, HEAD\r\n\r\n{\"error\":\"no \\\"way\\\"\"}"
        );
        assert_eq!(
            serialise(&Response::text(200, "hi\n"), true, Connection::Close),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            serialise(&Response::json(202, &[1, 2]), false, Connection::KeepAlive),
            "HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n\
             Content-Length: 5\r\nConnection: keep-alive\r\n\r\n[1,2]"
        );
        let injected = Response::text(200, "").with_header("X", "a\r\nSet-Cookie: b");
        assert!(serialise(&injected, false, Connection::Default).contains("X: aSet-Cookie: b\r\n"));
    }

    #[test]
    fn reason_phrases_cover_every_class() {
        assert_eq!(reason_phrase(418), "Client Error");
        assert_eq!(reason_phrase(599), "Server Error");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
    }
}
