//! The API server: one thread, non-blocking sockets and `poll(2)`.
//!
//! One thread because the API is for a human or an orchestrator, not for throughput, and a
//! thread per connection would let clients decide how many threads the VMM has. The price is
//! that nothing on this thread may wait for a client, so every socket operation is
//! non-blocking and every way a client can hold resources is bounded ([`Limits`]):
//!
//! - connections: at most `max_connections`; further ones get a 503 and are closed at once;
//! - memory: a connection buffers at most one request (head and body limits), and bytes
//!   beyond its first `max_head` come from a pool shared by all connections
//!   (`max_pooled_input`), so 32 clients sending large bodies at once cannot add up to
//!   32 maximal requests; while a client is not reading, at most about
//!   `max_queued_output` of responses wait for it. Buffers are released when they empty
//!   and when the connection closes;
//! - time: a request must be complete within `request_timeout` of its first byte (or of the
//!   connection, for the first request), an idle connection lasts `idle_timeout`, and
//!   output must be taken within `write_timeout`.
//!
//! The handler runs on this thread, synchronously, one request at a time, so it sees
//! requests in the order they complete and needs no locking against itself.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{self, Connection, Parsed, Request, Response};
use crate::sys;

/// Pending connections the kernel queues before we accept them.
const BACKLOG: i32 = 64;
/// The API thread's stack: parsing and JSON need little, and its pages cost only if used.
const STACK_SIZE: usize = 256 * 1024;
/// One read's worth of bytes, shared by every connection.
const SCRATCH_SIZE: usize = 16 * 1024;
/// Buffers bigger than this are released rather than kept for the connection's next use.
const KEEP_CAPACITY: usize = 4096;
/// Connections accepted per wakeup, so a flood of connects cannot starve the others.
const ACCEPT_BATCH: usize = 64;
/// How long to stop accepting after the process ran out of descriptors, which would
/// otherwise leave the listener readable and the thread spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping server still waits to send responses answered later.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Every bound the server enforces. The defaults suit production; tests shorten the times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request line and headers, in bytes (431 beyond).
    pub max_head: usize,
    /// Request body, in bytes (413 beyond, decided from `Content-Length`).
    pub max_body: usize,
    /// From the first byte of a request (or from connecting, for the first one) until it
    /// must be complete (408 and close after).
    pub request_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// Output the client leaves unread for this long gets the connection dropped.
    pub write_timeout: Duration,
    /// No further pipelined request is answered while this many bytes of responses wait
    /// for the client to read them.
    pub max_queued_output: usize,
    /// Request bytes buffered beyond each connection's first `max_head`, across all
    /// connections. A connection that would need more waits (its request timeout still
    /// running) until others finish.
    pub max_pooled_input: usize,
    /// After the last response of a closing connection, input is read and discarded for up
    /// to this long so the client sees the response rather than a reset.
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 32,
            max_head: 8 * 1024,
            max_body: 64 * 1024,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(5),
            max_queued_output: 8 * 1024,
            max_pooled_input: 128 * 1024,
            linger: Duration::from_millis(500),
        }
    }
}

/// What serves requests: called on the API thread, one request at a time.
pub trait Handler: Send + Sync {
    fn handle(&self, request: &Request) -> Response;

    /// A request whose work takes long (a snapshot writing gigabytes) is answered later:
    /// this starts the work elsewhere and returns where its response will arrive. The
    /// server goes on serving other connections; this one answers nothing else until the
    /// response arrives, however long that takes. `None` (the default): [`Self::handle`]
    /// answers it now.
    fn start(&self, request: &Request) -> Option<Later> {
        let _ = request;
        None
    }
}

/// A response that arrives later (see [`Handler::start`]). The server does not poll for
/// it: it waits on a socket that reaches end-of-file when the [`Reply`] is gone, answered
/// or not.
pub struct Later {
    response: mpsc::Receiver<Response>,
    ready: UnixStream,
}

/// Where work started by [`Handler::start`] sends its response, from any thread. Dropping
/// it unsent answers the client 500.
pub struct Reply {
    // Dropped in this order: the response is in the channel before the server wakes.
    answer: mpsc::Sender<Response>,
    _wake: UnixStream,
}

impl Reply {
    pub fn send(self, response: Response) {
        let _ = self.answer.send(response);
    }
}

/// A [`Later`] for [`Handler::start`] to return, and the [`Reply`] that answers it.
pub fn later() -> io::Result<(Later, Reply)> {
    let (ready, wake) = UnixStream::pair()?;
    let (answer, response) = mpsc::channel();
    Ok((
        Later { response, ready },
        Reply {
            answer,
            _wake: wake,
        },
    ))
}

impl std::fmt::Debug for Later {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Later")
    }
}

impl<F: Fn(&Request) -> Response + Send + Sync> Handler for F {
    fn handle(&self, request: &Request) -> Response {
        self(request)
    }
}

/// Counters of the server's work, readable from any thread while it runs.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Final responses by status class: index 0 for 1xx … 4 for 5xx.
    by_class: [AtomicU64; 5],
    accepted: AtomicU64,
    rejected: AtomicU64,
    timed_out: AtomicU64,
    active: AtomicUsize,
}

impl ServerStats {
    fn record(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses sent with a status in `class`xx (1 to 5), including the server's own
    /// errors (400, 408, 413, 431, 503 …).
    pub fn requests(&self, class: u16) -> u64 {
        match class {
            1..=5 => self.by_class[usize::from(class) - 1].load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Responses by class, keyed "2xx" … "5xx", as [`crate::model::Counters::api`] wants.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        (2..=5)
            .map(|c| (format!("{c}xx"), self.requests(c)))
            .collect()
    }

    /// Connections accepted and served (not counting rejected ones).
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections answered 503 because `max_connections` were open.
    pub fn connections_rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Connections ended by a request, idle or write timeout.
    pub fn timeouts(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Connections open right now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket path {} is too long (at most {} bytes)", .0.display(), sys::MAX_SOCKET_PATH)]
    PathTooLong(PathBuf),
    #[error("API socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    #[error("API socket path {} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot {op} API socket {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
}

/// The socket file we created; removed when dropped, unless something else has replaced
/// it since (a second vmon that took over a path we no longer listen on).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A bound, listening API socket, not yet served.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    socket: SocketFile,
    limits: Limits,
    stats: Arc<ServerStats>,
}

impl ApiServer {
    /// Creates the socket at `path` with mode 0600. A socket left behind by a process that
    /// is gone is replaced; one something listens on, or a file that is not a socket, is
    /// an error.
    pub fn bind(path: &Path) -> Result<ApiServer, ServerError> {
        use std::os::unix::ffi::OsStrExt;
        if path.as_os_str().as_bytes().len() > sys::MAX_SOCKET_PATH {
            return Err(ServerError::PathTooLong(path.into()));
        }
        let io_err = |op, source| ServerError::Io {
            op,
            path: path.into(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.into())),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    tracing::info!("replacing stale API socket {}", path.display());
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("replace stale", e)),
                    }
                }
                Err(e) => return Err(io_err("check existing", e)),
            },
            Ok(_) => return Err(ServerError::NotASocket(path.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", e)),
        }
        let listener = match sys::bind_listener(path, BACKLOG) {
            Ok(l) => l,
            // Someone else bound it between our check and our bind.
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                return Err(ServerError::InUse(path.into()))
            }
            Err(e) => return Err(io_err("create", e)),
        };
        let m = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(io_err("inspect", e));
            }
        };
        Ok(ApiServer {
            listener,
            socket: SocketFile {
                path: path.into(),
                dev: m.dev(),
                ino: m.ino(),
            },
            limits: Limits::default(),
            stats: Arc::default(),
        })
    }

    pub fn with_limits(mut self, limits: Limits) -> ApiServer {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    /// The server's counters, e.g. for the handler to report.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Starts the thread ("api") that serves `handler` until the handle is shut down or
    /// dropped.
    pub fn spawn(self, handler: Arc<dyn Handler>) -> Result<ServerHandle, ServerError> {
        let (wake, wake_rx) = UnixStream::pair().map_err(ServerError::Spawn)?;
        let ApiServer {
            listener,
            socket,
            limits,
            stats,
        } = self;
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                EventLoop::new(listener, wake_rx, handler, limits, thread_stats).run();
            })
            .map_err(ServerError::Spawn)?;
        Ok(ServerHandle {
            thread: Some(thread),
            wake: Some(wake),
            socket: Some(socket),
            stats,
        })
    }
}

/// The running server. Shutting it down (or dropping it) stops and joins the thread, closes
/// every connection and removes the socket file.
#[derive(Debug)]
pub struct ServerHandle {
    thread: Option<JoinHandle<()>>,
    /// Closing this wakes the thread, which takes end-of-file as the order to stop.
    wake: Option<UnixStream>,
    socket: Option<SocketFile>,
    stats: Arc<ServerStats>,
}

impl ServerHandle {
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    pub fn path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.path.as_path())
    }

    /// Stops the server. A request being handled finishes first.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.wake = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the API thread panicked");
            }
        }
        self.socket = None;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The protocol state of one connection, without the socket: bytes in, bytes out. The
/// fuzzer drives exactly this.
#[derive(Debug, Default)]
pub(crate) struct Session {
    input: Vec<u8>,
    output: Vec<u8>,
    /// How much of `output` has been sent.
    sent: usize,
    continue_sent: bool,
    /// The client will send nothing more: requests already here are still answered, a
    /// partial one is dropped.
    input_ended: bool,
    /// The last response is queued (it said `Connection: close`); nothing more is read or
    /// answered.
    closing: bool,
    /// A request answered later ([`Handler::start`]); requests behind it wait.
    awaiting: Option<Awaiting>,
    /// The server is stopping: an awaited answer still goes out, nothing after it is
    /// started.
    draining: bool,
}

/// A request whose response comes from elsewhere, and how to frame it when it does.
#[derive(Debug)]
struct Awaiting {
    response: Later,
    head_only: bool,
    connection: Connection,
    keep_alive: bool,
}

impl Session {
    /// How many more bytes may be read now: none while closing or while the client is
    /// behind on reading responses, else up to one maximal request.
    pub(crate) fn input_room(&self, limits: &Limits) -> usize {
        if self.closing || self.pending_output().len() >= limits.max_queued_output {
            return 0;
        }
        (limits.max_head + limits.max_body).saturating_sub(self.input.len())
    }

    pub(crate) fn push_input(&mut self, bytes: &[u8], limits: &Limits) {
        // Grow by doubling, but never past one maximal request.
        let needed = self.input.len() + bytes.len();
        if needed > self.input.capacity() {
            let target = needed
                .max(self.input.capacity() * 2)
                .min(limits.max_head + limits.max_body)
                .max(needed);
            self.input.reserve_exact(target - self.input.len());
        }
        self.input.extend_from_slice(bytes);
    }

    pub(crate) fn input_len(&self) -> usize {
        self.input.len()
    }

    pub(crate) fn has_input(&self) -> bool {
        !self.input.is_empty()
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing
    }

    /// Waiting for the response of a request answered later.
    pub(crate) fn is_awaiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// What to poll for the awaited response: readable once it is in (or never will be).
    pub(crate) fn awaiting_fd(&self) -> Option<std::os::fd::RawFd> {
        self.awaiting.as_ref().map(|a| a.response.ready.as_raw_fd())
    }

    /// The server is stopping: answer what is awaited, start nothing new.
    pub(crate) fn drain(&mut self) {
        self.draining = true;
    }

    pub(crate) fn pending_output(&self) -> &[u8] {
        self.output.get(self.sent..).unwrap_or_default()
    }

    pub(crate) fn consume_output(&mut self, n: usize) {
        self.sent = self.sent.saturating_add(n).min(self.output.len());
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
            if self.output.capacity() > KEEP_CAPACITY {
                self.output = Vec::new();
            }
        }
    }

    /// Answers the complete requests buffered, in order, until the input runs out, the
    /// connection is closing or output backs up. Returns how many final responses it
    /// queued.
    pub(crate) fn process(
        &mut self,
        handler: &dyn Handler,
        stats: &ServerStats,
        limits: &Limits,
    ) -> usize {
        let mut answered = 0;
        while !self.closing && self.pending_output().len() < limits.max_queued_output {
            if let Some(a) = &self.awaiting {
                let response = match a.response.response.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        Response::error(500, "the operation ended without an answer")
                    }
                };
                let (head_only, connection, keep_alive) = (a.head_only, a.connection, a.keep_alive);
                self.awaiting = None;
                self.queue(&response, head_only, connection, stats);
                self.closing = !keep_alive || self.draining;
                answered += 1;
                continue;
            }
            if self.draining {
                self.closing = true;
                break;
            }
            match http::parse_request(&self.input, limits.max_head, limits.max_body) {
                Parsed::NeedMore { .. } if self.input_ended => {
                    self.closing = true;
                    self.input = Vec::new();
                    break;
                }
                Parsed::NeedMore { expect_continue } => {
                    if expect_continue && !self.continue_sent {
                        self.output.extend_from_slice(http::CONTINUE);
                        self.continue_sent = true;
                    }
                    break;
                }
                Parsed::Complete { request, consumed } => {
                    self.input.drain(..consumed);
                    self.continue_sent = false;
                    let connection = if !request.keep_alive {
                        Connection::Close
                    } else if request.version == 0 {
                        Connection::KeepAlive
                    } else {
                        Connection::Default
                    };
                    // A panicking handler must not take the API thread down with it.
                    match catch_unwind(AssertUnwindSafe(|| handler.start(&request))) {
                        Ok(Some(response)) => {
                            self.awaiting = Some(Awaiting {
                                response,
                                head_only: request.method == "HEAD",
                                connection,
                                keep_alive: request.keep_alive,
                            });
                            continue;
                        }
                        Ok(None) => {}
                        Err(_) => {
                            let response = Response::error(500, "internal error");
                            self.queue(&response, request.method == "HEAD", connection, stats);
                            self.closing = !request.keep_alive;
                            answered += 1;
                            continue;
                        }
                    }
                    let response = catch_unwind(AssertUnwindSafe(|| handler.handle(&request)))
                        .unwrap_or_else(|_| Response::error(500, "internal error"));
                    self.queue(&response, request.method == "HEAD", connection, stats);
                    self.closing = !request.keep_alive;
                    answered += 1;
                }
                Parsed::Error(e) => {
                    self.fail(e.status, &e.message, stats);
                    answered += 1;
                }
            }
        }
        if self.input.is_empty() && self.input.capacity() > KEEP_CAPACITY {
            self.input = Vec::new();
        }
        answered
    }

    /// Queues a final error response and closes: after a refused request, where the next
    /// one would start is unknown.
    pub(crate) fn fail(&mut self, status: u16, message: &str, stats: &ServerStats) {
        self.queue(
            &Response::error(status, message),
            false,
            Connection::Close,
            stats,
        );
        self.closing = true;
        self.input = Vec::new();
    }

    /// The client will send nothing more. What is complete is still answered (by
    /// `process`, as output drains); then the connection closes.
    pub(crate) fn end_of_input(&mut self) {
        self.input_ended = true;
    }

    fn queue(&mut self, r: &Response, head_only: bool, c: Connection, stats: &ServerStats) {
        r.write_to(&mut self.output, head_only, c);
        stats.record(r.status);
    }
}

/// Per-wakeup context shared by every connection.
struct Ctx<'a> {
    handler: &'a dyn Handler,
    stats: &'a ServerStats,
    limits: &'a Limits,
    scratch: &'a mut [u8],
    /// What is left of `Limits::max_pooled_input`.
    pool_free: usize,
}

struct Conn {
    stream: UnixStream,
    session: Session,
    /// When the request in progress must be complete: set on connecting and on the first
    /// byte of each later request; `None` while idle.
    request_deadline: Option<Instant>,
    idle_since: Instant,
    /// When the client must have taken the pending output.
    write_deadline: Option<Instant>,
    /// Set once the last response is out and our side is shut: input is discarded until
    /// the client closes or this passes.
    linger_until: Option<Instant>,
    discarded: usize,
    peer_eof: bool,
    dead: bool,
}

impl Conn {
    fn new(stream: UnixStream, now: Instant, limits: &Limits) -> Conn {
        Conn {
            stream,
            session: Session::default(),
            request_deadline: Some(now + limits.request_timeout),
            idle_since: now,
            write_deadline: None,
            linger_until: None,
            discarded: 0,
            peer_eof: false,
            dead: false,
        }
    }

    /// Input bytes held beyond the connection's own allowance, i.e. from the pool.
    fn pooled(&self, limits: &Limits) -> usize {
        self.session.input_len().saturating_sub(limits.max_head)
    }

    /// How much may be read now: what the session accepts, within the connection's own
    /// allowance plus what the pool has left.
    fn readable_bytes(&self, limits: &Limits, pool_free: usize) -> usize {
        let own = limits.max_head.saturating_sub(self.session.input_len());
        self.session.input_room(limits).min(own + pool_free)
    }

    fn interest(&self, limits: &Limits, pool_free: usize) -> i16 {
        if self.linger_until.is_some() {
            return libc::POLLIN;
        }
        let mut events = 0;
        if !self.peer_eof && self.readable_bytes(limits, pool_free) > 0 {
            events |= libc::POLLIN;
        }
        if !self.session.pending_output().is_empty() {
            events |= libc::POLLOUT;
        }
        events
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.dead {
            return None;
        }
        if self.session.is_awaiting() {
            // No request timeout while the work runs; its answer wakes the poll.
            return None;
        }
        if let Some(t) = self.linger_until {
            return Some(t);
        }
        if let Some(t) = self.write_deadline {
            return Some(t);
        }
        if self.session.is_closing() {
            return None;
        }
        Some(
            self.request_deadline
                .unwrap_or(self.idle_since + limits.idle_timeout),
        )
    }

    fn check_timers(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        if self.dead {
            return;
        }
        if let Some(t) = self.linger_until {
            self.dead = now >= t;
            return;
        }
        if self.session.is_awaiting() {
            // No request timeout while the work runs; its answer may be in.
            self.advance(now, ctx);
            return;
        }
        if let Some(t) = self.write_deadline {
            if now >= t {
                tracing::debug!("API client did not read its responses; dropping it");
                ctx.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                self.dead = true;
            }
            return;
        }
        if self.session.is_closing() {
            return;
        }
        match self.request_deadline {
            Some(t) if now >= t => {
                ctx.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "the request was not received within {} ms",
                    ctx.limits.request_timeout.as_millis()
                );
                self.session.fail(408, &message, ctx.stats);
                self.advance(now, ctx);
            }
            Some(_) => {}
            None => {
                if now >= self.idle_since + ctx.limits.idle_timeout {
                    ctx.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    self.dead = true;
                }
            }
        }
    }

    fn service(&mut self, now: Instant, revents: i16, ctx: &mut Ctx<'_>) {
        let readable = revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if self.linger_until.is_some() {
            if readable {
                self.discard_input(ctx);
            }
            return;
        }
        if readable {
            self.read(now, ctx);
        }
        if !self.dead {
            self.advance(now, ctx);
        }
        // A hang-up is reported whatever we ask for: a connection that has nothing to send
        // and may not read (it waits for the input pool) would make poll spin until its
        // request timeout. Its client is gone, so it can go too.
        let hung_up = revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if hung_up && !self.dead && self.interest(ctx.limits, ctx.pool_free) == 0 {
            self.dead = true;
        }
    }

    fn read(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        while !self.peer_eof {
            let room = self
                .readable_bytes(ctx.limits, ctx.pool_free)
                .min(ctx.scratch.len());
            if room == 0 {
                return;
            }
            match sys::recv_nonblocking(&self.stream, &mut ctx.scratch[..room]) {
                Ok(0) => self.peer_eof = true,
                Ok(n) => {
                    if self.request_deadline.is_none() {
                        self.request_deadline = Some(now + ctx.limits.request_timeout);
                    }
                    let pooled = self.pooled(ctx.limits);
                    self.session.push_input(&ctx.scratch[..n], ctx.limits);
                    let taken = self.pooled(ctx.limits) - pooled;
                    ctx.pool_free = ctx.pool_free.saturating_sub(taken);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }

    /// Answers what can be answered, sends what can be sent, and moves the connection on:
    /// back to idle, on to the next pipelined request, or towards closing.
    fn advance(&mut self, now: Instant, ctx: &mut Ctx<'_>) {
        if self.peer_eof {
            self.session.end_of_input();
        }
        loop {
            let answered = self.session.process(ctx.handler, ctx.stats, ctx.limits);
            // Stopped because the client is behind on reading, not for lack of input.
            let stalled = !self.session.is_closing()
                && self.session.pending_output().len() >= ctx.limits.max_queued_output;
            if answered > 0 {
                if self.session.has_input() {
                    // The next request's first bytes are here already.
                    self.request_deadline = Some(now + ctx.limits.request_timeout);
                } else {
                    self.request_deadline = None;
                    self.idle_since = now;
                }
            }
            self.flush(now, ctx.limits);
            if self.dead {
                return;
            }
            // Output that had backed up is gone: pipelined requests may be waiting (or,
            // after the client's end of input, the decision to close).
            if !(stalled && self.session.pending_output().is_empty()) {
                break;
            }
        }
        if self.session.is_closing() && self.session.pending_output().is_empty() {
            self.session = Session::default();
            if self.peer_eof {
                self.dead = true;
            } else {
                // The client may still be sending (a body we refused): keep reading for a
                // moment so that our close does not turn into a reset that eats the
                // response.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.linger_until = Some(now + ctx.limits.linger);
            }
        }
    }

    fn flush(&mut self, now: Instant, limits: &Limits) {
        while !self.session.pending_output().is_empty() {
            match sys::send(&self.stream, self.session.pending_output(), true) {
                Ok(n) => self.session.consume_output(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        if self.session.pending_output().is_empty() {
            if self.write_deadline.take().is_some() && self.session.has_input() {
                // The rest of a pipelined request waited on the client's reading, not
                // the other way round: its time starts now.
                self.request_deadline = Some(now + limits.request_timeout);
            }
        } else if self.write_deadline.is_none() {
            self.write_deadline = Some(now + limits.write_timeout);
        }
    }

    fn discard_input(&mut self, ctx: &mut Ctx<'_>) {
        // Enough to swallow a refused request; a client that keeps sending is cut off.
        let budget = ctx.limits.max_head + ctx.limits.max_body;
        loop {
            match sys::recv_nonblocking(&self.stream, ctx.scratch) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.discarded += n;
                    if self.discarded > budget {
                        self.dead = true;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }
}

struct EventLoop {
    listener: UnixListener,
    wake: UnixStream,
    handler: Arc<dyn Handler>,
    limits: Limits,
    stats: Arc<ServerStats>,
    conns: Vec<Conn>,
    fds: Vec<libc::pollfd>,
    scratch: Vec<u8>,
    accept_paused_until: Option<Instant>,
    /// Connections answered 503, kept a moment so their answer is read: closing a Unix
    /// socket with unread input resets it, and the client would see ECONNRESET instead of
    /// the 503. Bounded; past the bound they are closed at once.
    rejected: Vec<(UnixStream, Instant)>,
    /// Connections awaiting an answer, in the order their wake-up sockets are in `fds`.
    awaited: Vec<usize>,
}

/// How many 503'd connections may linger at once.
const MAX_LINGERING_REJECTS: usize = 64;

impl EventLoop {
    fn new(
        listener: UnixListener,
        wake: UnixStream,
        handler: Arc<dyn Handler>,
        limits: Limits,
        stats: Arc<ServerStats>,
    ) -> EventLoop {
        EventLoop {
            listener,
            wake,
            handler,
            stats,
            conns: Vec::with_capacity(limits.max_connections),
            fds: Vec::with_capacity(limits.max_connections + 2),
            scratch: vec![0; SCRATCH_SIZE],
            accept_paused_until: None,
            rejected: Vec::new(),
            awaited: Vec::new(),
            limits,
        }
    }

    fn run(mut self) {
        loop {
            let now = Instant::now();
            self.for_each_conn(|c, _, ctx| c.check_timers(now, ctx));
            self.reap();
            self.rejected.retain(|(_, until)| now < *until);
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
            }

            self.fds.clear();
            self.fds
                .push(sys::pollfd(self.wake.as_raw_fd(), libc::POLLIN));
            let accepting = if self.accept_paused_until.is_none() {
                libc::POLLIN
            } else {
                0
            };
            self.fds
                .push(sys::pollfd(self.listener.as_raw_fd(), accepting));
            let pool_free = self.pool_free();
            for c in &self.conns {
                let events = c.interest(&self.limits, pool_free);
                self.fds.push(sys::pollfd(c.stream.as_raw_fd(), events));
            }
            for (s, _) in &self.rejected {
                self.fds.push(sys::pollfd(s.as_raw_fd(), libc::POLLIN));
            }
            // Then the answers awaited, each with the index of its connection. Not while
            // the client is behind on reading: the answer could not be queued, and its
            // socket, readable for good once answered, would spin the loop.
            self.awaited.clear();
            let room = self.limits.max_queued_output;
            for (i, c) in self.conns.iter().enumerate() {
                let can_queue = !c.dead && c.session.pending_output().len() < room;
                if let Some(fd) = c.session.awaiting_fd().filter(|_| can_queue) {
                    self.fds.push(sys::pollfd(fd, libc::POLLIN));
                    self.awaited.push(i);
                }
            }
            let deadline = self
                .conns
                .iter()
                .filter_map(|c| c.deadline(&self.limits))
                .chain(self.accept_paused_until)
                .chain(self.rejected.iter().map(|(_, t)| *t))
                .min();
            let timeout = deadline.map_or(-1, |d| {
                // Rounded up: waking a little early would only loop back here.
                let us = d.saturating_duration_since(now).as_micros();
                i32::try_from(us.div_ceil(1000)).unwrap_or(i32::MAX)
            });
            if let Err(e) = sys::poll(&mut self.fds, timeout) {
                tracing::error!("API server: poll failed: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            if self.fds[0].revents != 0 {
                self.finish_awaiting();
                return;
            }

            let now = Instant::now();
            let fds = std::mem::take(&mut self.fds);
            let answers_at = 2 + self.conns.len() + self.rejected.len();
            let awaited = std::mem::take(&mut self.awaited);
            self.for_each_conn(|c, i, ctx| {
                let revents = fds[2 + i].revents;
                if revents != 0 {
                    c.service(now, revents, ctx);
                }
            });
            self.for_each_conn(|c, i, ctx| {
                let answered = awaited
                    .iter()
                    .position(|&a| a == i)
                    .is_some_and(|k| fds[answers_at + k].revents != 0);
                if answered {
                    c.advance(now, ctx);
                }
            });
            self.awaited = awaited;
            self.fds = fds;
            // Drain what 503'd clients still send; drop them at EOF or error.
            let polled = &self.fds[2 + self.conns.len()..answers_at];
            let mut keep = Vec::with_capacity(self.rejected.len());
            for ((s, until), p) in self.rejected.drain(..).zip(polled) {
                let open = p.revents == 0
                    || match sys::recv_nonblocking(&s, &mut self.scratch) {
                        Ok(n) => n > 0,
                        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    };
                if open {
                    keep.push((s, until));
                }
            }
            self.rejected = keep;
            self.reap();
            if self.fds[1].revents & libc::POLLIN != 0 {
                self.accept(now);
            }
        }
    }

    /// On the way out: a response answered later that is in, or arrives within
    /// [`SHUTDOWN_GRACE`], still goes to its client. A snapshot with `stop` ends the VM
    /// (and so this server) just as its answer is sent.
    fn finish_awaiting(&mut self) {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        for c in &mut self.conns {
            c.session.drain();
        }
        loop {
            let now = Instant::now();
            let busy = |c: &Conn| {
                !c.dead && (c.session.is_awaiting() || !c.session.pending_output().is_empty())
            };
            let mut waiting = false;
            self.for_each_conn(|c, _, ctx| {
                if busy(c) {
                    c.advance(now, ctx);
                    waiting |= busy(c);
                }
            });
            if !waiting || now >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Calls `f` on each connection (with its index) and the context they share.
    fn for_each_conn(&mut self, mut f: impl FnMut(&mut Conn, usize, &mut Ctx<'_>)) {
        let pool_free = self.pool_free();
        let mut ctx = Ctx {
            handler: &*self.handler,
            stats: &self.stats,
            limits: &self.limits,
            scratch: &mut self.scratch,
            pool_free,
        };
        for (i, c) in self.conns.iter_mut().enumerate() {
            f(c, i, &mut ctx);
        }
    }

    fn pool_free(&self) -> usize {
        let used: usize = self.conns.iter().map(|c| c.pooled(&self.limits)).sum();
        self.limits.max_pooled_input.saturating_sub(used)
    }

    fn reap(&mut self) {
        self.conns.retain(|c| !c.dead);
        if self.conns.capacity() > self.limits.max_connections.max(4) * 2 {
            self.conns.shrink_to(self.limits.max_connections);
        }
        self.stats.active.store(self.conns.len(), Ordering::Relaxed);
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= self.limits.max_connections {
                        self.reject(stream);
                    } else {
                        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                        self.conns.push(Conn::new(stream, now, &self.limits));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!("API server: accept failed: {e}");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    break;
                }
            }
        }
        self.stats.active.store(self.conns.len(), Ordering::Relaxed);
    }

    /// Tells a connection over the limit so, without waiting for anything.
    fn reject(&mut self, stream: UnixStream) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        // Swallow a request that is already here, so that closing does not reset the
        // connection before the client has read the answer.
        let _ = sys::recv_nonblocking(&stream, &mut self.scratch);
        let mut out = Vec::new();
        let response = Response::error(
            503,
            format!(
                "too many API connections (at most {}); try again",
                self.limits.max_connections
            ),
        );
        response.write_to(&mut out, false, Connection::Close);
        self.stats.record(503);
        let _ = sys::send(&stream, &out, true);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if self.rejected.len() < MAX_LINGERING_REJECTS {
            self.rejected
                .push((stream, Instant::now() + self.limits.linger));
        }
    }
}
