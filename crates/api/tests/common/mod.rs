//! Shared by the integration tests: a temporary directory, a mock VM, and a raw client
//! that can misbehave in ways the real one never would.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmon_api::model::{Counters, DeviceCounters, VcpuCounters, VmInfo, VmState};
use vmon_api::router::{ApiError, Router, VmApi};
use vmon_api::server::{ApiServer, Limits, ServerHandle};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmon-api-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct MockVm {
    pub state: Mutex<VmState>,
    pub calls: Mutex<Vec<String>>,
    /// Devices in the counters: many make large responses.
    pub devices: usize,
}

impl MockVm {
    pub fn new(devices: usize) -> MockVm {
        MockVm {
            state: Mutex::new(VmState::Running),
            calls: Mutex::new(Vec::new()),
            devices,
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn log(&self, s: impl Into<String>) {
        self.calls.lock().unwrap().push(s.into());
    }
}

impl VmApi for MockVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: *self.state.lock().unwrap(),
            uptime_s: 3.25,
            vcpus: 2,
            memory_mib: 512,
            pid: std::process::id(),
            config: serde_json::json!({"kernel": "/boot/vmlinuz", "cpus": 2}),
        }
    }
    fn pause(&self) -> Result<VmState, ApiError> {
        self.log("pause");
        let mut s = self.state.lock().unwrap();
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
        self.log("resume");
        let mut s = self.state.lock().unwrap();
        if *s == VmState::Paused {
            *s = VmState::Running;
        }
        Ok(*s)
    }
    fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError> {
        self.log(format!("shutdown {}", timeout.as_secs()));
        let mut s = self.state.lock().unwrap();
        if *s == VmState::Stopped {
            return Err(ApiError::conflict("the VM is stopping".into()));
        }
        *s = VmState::ShuttingDown;
        Ok(timeout)
    }
    fn stop(&self) -> Result<(), ApiError> {
        self.log("stop");
        *self.state.lock().unwrap() = VmState::Stopped;
        Ok(())
    }
    fn counters(&self) -> Counters {
        Counters {
            uptime_s: 3.25,
            vcpus: (0..2)
                .map(|i| VcpuCounters {
                    index: i,
                    cpu_time_s: 0.5,
                    exits: [("io_out".to_string(), 10), ("hlt".to_string(), 2)].into(),
                })
                .collect(),
            devices: (0..self.devices)
                .map(|i| DeviceCounters {
                    name: format!("disk{i}"),
                    kind: "block".into(),
                    counters: [
                        ("read_bytes".to_string(), 4096 * i as u64),
                        ("write_bytes".to_string(), 512),
                        ("requests".to_string(), 3),
                    ]
                    .into(),
                })
                .collect(),
            api: [("2xx".to_string(), 1)].into(),
        }
    }
}

/// A server for one test: its directory, socket, handle and mock VM.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub vm: Arc<MockVm>,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl TestServer {
    pub fn start(limits: Limits) -> TestServer {
        TestServer::with_vm(limits, MockVm::new(2))
    }

    pub fn with_vm(limits: Limits, vm: MockVm) -> TestServer {
        let dir = TempDir::new();
        let socket = dir.join("api.sock");
        let vm = Arc::new(vm);
        let handle = ApiServer::bind(&socket)
            .unwrap()
            .with_limits(limits)
            .spawn(Arc::new(Router::new(vm.clone())))
            .unwrap();
        TestServer {
            handle: Some(handle),
            vm,
            socket,
            dir,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn connect(&self) -> Conn {
        Conn::new(&self.socket)
    }

    /// One request on a fresh connection with the real client.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let r = vmon_api::client::request(
            &self.socket,
            method,
            path,
            body.map(str::as_bytes),
            Duration::from_secs(10),
        )
        .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (r.status, v)
    }
}

/// Limits with short times, for tests that wait for them.
pub fn quick_limits() -> Limits {
    Limits {
        request_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        linger: Duration::from_millis(100),
        ..Limits::default()
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_string()
    }
}

/// A raw connection: writes what it is told, parses responses one at a time.
pub struct Conn {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(path: &Path) -> Conn {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next response; `head`: it answers a HEAD request, so has no body.
    pub fn response(&mut self, head: bool) -> Option<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let status = r.code.unwrap();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                let len = if head { 0 } else { len };
                if self.buf.len() >= n + len {
                    let body = self.buf[n..n + len].to_vec();
                    self.buf.drain(..n + len);
                    return Some(Resp {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a response: {e}"),
            }
        }
    }

    /// Whether the server has closed: end of file (or a reset) with nothing more sent.
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => self.buf.is_empty(),
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Waits up to `limit` for `cond`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
