//! The routes: what each method and path does to the VM, through the [`VmApi`] trait the
//! VMM implements. Everything here runs on the API thread, one request at a time.
//!
//! Routes are versioned under `/v1` so a later, incompatible API can live next to this one;
//! `/metrics` stays unversioned because that is where Prometheus looks by default.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::http::{Request, Response};
use crate::model::{
    self, ActionResponse, Counters, ShutdownRequest, SnapshotRequest, VmInfo, VmState,
};
use crate::server::{self, Handler, Later};

/// The VM as the API sees it. Calls arrive on the API thread and may block it briefly
/// (pausing waits for the vCPUs), never indefinitely; except `snapshot`, which runs on a
/// thread of its own while the API thread goes on answering the other calls.
pub trait VmApi: Send + Sync {
    fn info(&self) -> VmInfo;
    /// Returns the state reached (normally `paused`).
    fn pause(&self) -> Result<VmState, ApiError>;
    fn resume(&self) -> Result<VmState, ApiError>;
    /// Asks the guest to power off and gives it `timeout` before the VM is stopped. Returns
    /// once the request is made, not when the guest is gone, with the time the guest really
    /// has left (an earlier, shorter deadline stands).
    fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError>;
    /// Stops the VM without asking the guest. Returns once the request is made.
    fn stop(&self) -> Result<(), ApiError>;
    fn counters(&self) -> Counters;
    /// Claims the VM for a snapshot, on the API thread, before [`Self::snapshot`] runs
    /// elsewhere: from here until `snapshot` returns, actions that would change the VM under
    /// it (and a second snapshot) are refused. Claiming on the API thread, where requests
    /// are handled one at a time, leaves no window for a pause to slip in between.
    fn begin_snapshot(&self) -> Result<(), ApiError> {
        Ok(())
    }
    /// Writes the VM's whole state to `request.dir`; the answer describes what was written.
    /// Called after a successful [`Self::begin_snapshot`].
    fn snapshot(&self, request: &SnapshotRequest) -> Result<serde_json::Value, ApiError> {
        let _ = request;
        Err(ApiError::new(501, "this VM cannot be snapshotted".into()))
    }
}

/// A refused or failed API call: the HTTP status to answer with and a message for a human,
/// e.g. 409 "the VM is shutting down" or 500 "vCPUs did not pause within 2 s".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    /// An error with `status`; anything outside 400..=599 becomes 500 when answered.
    pub fn new(status: u16, message: String) -> ApiError {
        ApiError { status, message }
    }
    /// 400: the request itself is wrong.
    pub fn bad_request(message: String) -> ApiError {
        ApiError::new(400, message)
    }
    /// 409: the request is fine but the VM's state does not allow it.
    pub fn conflict(message: String) -> ApiError {
        ApiError::new(409, message)
    }
    /// 500: the VMM failed to do what it should have been able to.
    pub fn internal(message: String) -> ApiError {
        ApiError::new(500, message)
    }
    /// 503: try again later.
    pub fn unavailable(message: String) -> ApiError {
        ApiError::new(503, message)
    }

    fn response(&self) -> Response {
        let status = if (400..=599).contains(&self.status) {
            self.status
        } else {
            500
        };
        Response::error(status, &self.message)
    }
}

/// The API's version, in the index and the route prefix.
pub const API_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Index,
    Vm,
    Pause,
    Resume,
    Shutdown,
    Stop,
    Snapshot,
    Counters,
    Metrics,
}

const GET: &[&str] = &["GET", "HEAD"];
const ACTION: &[&str] = &["POST", "PUT"];

/// Path, route and the methods it takes; the index lists the same table.
const ROUTES: &[(&str, Route, &[&str])] = &[
    ("/", Route::Index, GET),
    ("/v1", Route::Index, GET),
    ("/v1/vm", Route::Vm, GET),
    ("/v1/vm/pause", Route::Pause, ACTION),
    ("/v1/vm/resume", Route::Resume, ACTION),
    ("/v1/vm/shutdown", Route::Shutdown, ACTION),
    ("/v1/vm/stop", Route::Stop, ACTION),
    ("/v1/vm/snapshot", Route::Snapshot, ACTION),
    ("/v1/counters", Route::Counters, GET),
    ("/v1/metrics", Route::Metrics, GET),
    ("/metrics", Route::Metrics, GET),
];

/// The [`Handler`] that serves the API of one VM.
pub struct Router<A: VmApi + ?Sized> {
    vm: Arc<A>,
}

impl<A: VmApi + ?Sized> Router<A> {
    pub fn new(vm: Arc<A>) -> Router<A> {
        Router { vm }
    }

    fn route(&self, req: &Request, route: Route) -> Response {
        // Only shutdown takes a body; elsewhere a body is a client mistake worth reporting
        // rather than silently ignoring (it may be options the client thinks we honour).
        if route != Route::Shutdown && route != Route::Snapshot && !is_blank(&req.body) {
            return Response::error(
                400,
                format!("{} {} takes no request body", req.method, req.path),
            );
        }
        match route {
            Route::Index => Response::json(200, &index()),
            Route::Vm => Response::json(200, &self.vm.info()),
            Route::Pause => action(self.vm.pause(), 200),
            Route::Resume => action(self.vm.resume(), 200),
            Route::Shutdown => {
                let body = if is_blank(&req.body) {
                    ShutdownRequest::default()
                } else if req.body.trim_ascii_start().first() != Some(&b'{') {
                    // serde would take `[5]` for `{"timeout_s": 5}`.
                    return Response::error(400, "invalid request body: expected a JSON object");
                } else {
                    match serde_json::from_slice::<ShutdownRequest>(&req.body) {
                        Ok(b) => b,
                        Err(e) => {
                            return Response::error(400, format!("invalid request body: {e}"))
                        }
                    }
                };
                match self.vm.shutdown(Duration::from_secs(body.timeout_s())) {
                    Ok(left) => Response::json(
                        202,
                        &ActionResponse {
                            state: VmState::ShuttingDown.as_str().into(),
                            timeout_s: Some(left.as_secs_f64().ceil() as u64),
                        },
                    ),
                    Err(e) => e.response(),
                }
            }
            Route::Stop => match self.vm.stop() {
                Ok(()) => Response::json(
                    202,
                    &ActionResponse {
                        state: "stopping".into(),
                        timeout_s: None,
                    },
                ),
                Err(e) => e.response(),
            },
            Route::Snapshot => match snapshot_request(req) {
                Ok(body) => match self.vm.begin_snapshot() {
                    Ok(()) => snapshot_response(self.vm.snapshot(&body)),
                    Err(e) => e.response(),
                },
                Err(refusal) => refusal,
            },
            Route::Counters => Response::json(200, &self.vm.counters()),
            Route::Metrics => {
                // The state first: a VM paused between the two reads shows paused with
                // counters from just before, which is the less surprising order.
                let state = self.vm.info().state;
                let text = model::render_prometheus(&self.vm.counters(), state);
                Response::text(200, text).with_content_type(model::PROMETHEUS_CONTENT_TYPE)
            }
        }
    }
}

impl<A: VmApi + ?Sized + 'static> Handler for Router<A> {
    /// A snapshot is written on a thread of its own: it pauses the guest for as long as
    /// writing its memory takes (seconds for gigabytes), and meanwhile other clients must
    /// still get `info`, counters and metrics (the VM control refuses conflicting actions).
    fn start(&self, req: &Request) -> Option<Later> {
        let path = req.path.strip_suffix('/').unwrap_or(&req.path);
        if path != "/v1/vm/snapshot" || !ACTION.contains(&req.method.as_str()) {
            return None;
        }
        // A bad body, or a VM that cannot be snapshotted now, is answered at once by `handle`.
        let body = snapshot_request(req).ok()?;
        let (later, reply) = server::later().ok()?;
        self.vm.begin_snapshot().ok()?;
        let vm = self.vm.clone();
        let request = body.clone();
        // If the thread cannot start, its reply is dropped with it: the snapshot is then
        // taken the old way, on the API thread, and answered through a fresh pair.
        let spawned = std::thread::Builder::new()
            .name("vmon-snapshot".into())
            .spawn(move || reply.send(snapshot_response(vm.snapshot(&request))));
        if spawned.is_err() {
            let (later, reply) = server::later().ok()?;
            reply.send(snapshot_response(self.vm.snapshot(&body)));
            return Some(later);
        }
        Some(later)
    }

    fn handle(&self, req: &Request) -> Response {
        // One trailing slash is forgiven: `/v1/vm/` is plainly `/v1/vm`.
        let path = match req.path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => req.path.as_str(),
        };
        let Some(&(_, route, methods)) = ROUTES.iter().find(|(p, _, _)| *p == path) else {
            return Response::error(404, format!("no such route: {}", req.path));
        };
        if !methods.contains(&req.method.as_str()) {
            let allow = methods.join(", ");
            return Response::error(
                405,
                format!(
                    "{} is not allowed on {}; use {}",
                    req.method,
                    path,
                    methods.join(" or ")
                ),
            )
            .with_header("Allow", allow);
        }
        self.route(req, route)
    }
}

/// The body of a snapshot request, or the 400 that refuses it.
fn snapshot_request(req: &Request) -> Result<SnapshotRequest, Response> {
    if req.body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Response::error(
            400,
            "a snapshot needs a JSON object body: {\"dir\": \"/path\"}",
        ));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))
}

fn snapshot_response(result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(report) => Response::json(200, &report),
        Err(e) => e.response(),
    }
}

fn action(result: Result<VmState, ApiError>, status: u16) -> Response {
    match result {
        Ok(state) => Response::json(
            status,
            &ActionResponse {
                state: state.as_str().into(),
                timeout_s: None,
            },
        ),
        Err(e) => e.response(),
    }
}

/// Whitespace is as good as nothing (some clients send a newline with `-d ''`).
fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

#[derive(Serialize)]
struct Index {
    api_version: u32,
    routes: Vec<String>,
}

fn index() -> Index {
    let mut routes = Vec::new();
    for (path, route, methods) in ROUTES {
        if *route == Route::Index {
            continue;
        }
        // HEAD goes without saying.
        let methods: Vec<&str> = methods.iter().copied().filter(|m| *m != "HEAD").collect();
        routes.push(format!("{} {path}", methods.join("|")));
    }
    Index {
        api_version: API_VERSION,
        routes,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::{DeviceCounters, VcpuCounters};

    #[derive(Default)]
    struct Mock {
        calls: Mutex<Vec<String>>,
        fail: Option<ApiError>,
    }

    impl Mock {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn result(&self) -> Result<(), ApiError> {
            self.fail.clone().map_or(Ok(()), Err)
        }
    }

    impl VmApi for Mock {
        fn info(&self) -> VmInfo {
            VmInfo {
                state: VmState::Running,
                uptime_s: 1.5,
                vcpus: 2,
                memory_mib: 256,
                pid: 42,
                config: serde_json::json!({"kernel": "/k"}),
            }
        }
        fn pause(&self) -> Result<VmState, ApiError> {
            self.log("pause".into());
            self.result().map(|()| VmState::Paused)
        }
        fn resume(&self) -> Result<VmState, ApiError> {
            self.log("resume".into());
            self.result().map(|()| VmState::Running)
        }
        fn shutdown(&self, timeout: Duration) -> Result<Duration, ApiError> {
            self.log(format!("shutdown {}", timeout.as_secs()));
            self.result().map(|()| timeout)
        }
        fn stop(&self) -> Result<(), ApiError> {
            self.log("stop".into());
            self.result()
        }
        fn counters(&self) -> Counters {
            Counters {
                uptime_s: 1.5,
                vcpus: vec![VcpuCounters {
                    index: 0,
                    cpu_time_s: 0.5,
                    exits: [("hlt".to_string(), 7)].into(),
                }],
                devices: vec![DeviceCounters {
                    name: "disk0".into(),
                    kind: "block".into(),
                    counters: [("read_bytes".to_string(), 512)].into(),
                }],
                api: [("2xx".to_string(), 1)].into(),
            }
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            version: 1,
            keep_alive: true,
        }
    }

    fn call(mock: &Arc<Mock>, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let r = Router::new(mock.clone()).handle(&req(method, path, body));
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (r.status, v)
    }

    fn error(v: &serde_json::Value) -> &str {
        v["error"].as_str().unwrap()
    }

    #[test]
    fn info_and_counters() {
        let m = Arc::new(Mock::default());
        let (s, v) = call(&m, "GET", "/v1/vm", "");
        assert_eq!(s, 200);
        assert_eq!(v["state"], "running");
        assert_eq!(v["memory_mib"], 256);
        assert_eq!(v["config"]["kernel"], "/k");
        let (s, v) = call(&m, "GET", "/v1/counters/", "");
        assert_eq!(s, 200);
        assert_eq!(v["vcpus"][0]["exits"]["hlt"], 7);
        let (s, v) = call(&m, "GET", "/", "");
        assert_eq!(s, 200);
        assert_eq!(v["api_version"], 1);
        assert!(v["routes"]
            .as_array()
            .unwrap()
            .contains(&"POST|PUT /v1/vm/shutdown".into()));
        assert_eq!(call(&m, "HEAD", "/v1", "").0, 200);
    }

    #[test]
    fn metrics() {
        let m = Arc::new(Mock::default());
        for path in ["/metrics", "/v1/metrics"] {
            let r = Router::new(m.clone()).handle(&req("GET", path, ""));
            assert_eq!(r.status, 200);
            assert_eq!(r.content_type, "text/plain; version=0.0.4");
            let text = String::from_utf8(r.body).unwrap();
            assert!(text.contains("\nvmon_vcpu_exits_total{vcpu=\"0\",reason=\"hlt\"} 7\n"));
        }
    }

    #[test]
    fn actions() {
        let m = Arc::new(Mock::default());
        assert_eq!(
            call(&m, "POST", "/v1/vm/pause", ""),
            (200, serde_json::json!({"state": "paused"}))
        );
        assert_eq!(
            call(&m, "PUT", "/v1/vm/resume", "\n"),
            (200, serde_json::json!({"state": "running"}))
        );
        assert_eq!(
            call(&m, "POST", "/v1/vm/shutdown", ""),
            (
                202,
                serde_json::json!({"state": "shutting-down", "timeout_s": 30})
            )
        );
        assert_eq!(
            call(&m, "PUT", "/v1/vm/shutdown", r#" {"timeout_s": 0} "#),
            (
                202,
                serde_json::json!({"state": "shutting-down", "timeout_s": 0})
            )
        );
        assert_eq!(
            call(&m, "POST", "/v1/vm/stop", ""),
            (202, serde_json::json!({"state": "stopping"}))
        );
        assert_eq!(
            *m.calls.lock().unwrap(),
            ["pause", "resume", "shutdown 30", "shutdown 0", "stop"]
        );
    }

    #[test]
    fn vm_errors_keep_their_status() {
        let m = Arc::new(Mock {
            fail: Some(ApiError::conflict("the VM is shutting down".into())),
            ..Mock::default()
        });
        let (s, v) = call(&m, "POST", "/v1/vm/pause", "");
        assert_eq!((s, error(&v)), (409, "the VM is shutting down"));
        let m = Arc::new(Mock {
            fail: Some(ApiError::new(200, "not really an error".into())),
            ..Mock::default()
        });
        assert_eq!(call(&m, "POST", "/v1/vm/stop", "").0, 500);
    }

    #[test]
    fn bad_bodies() {
        let m = Arc::new(Mock::default());
        for (body, fragment) in [
            ("{", "EOF while parsing an object at line 1 column 1"),
            ("{\"timeout_s\": 5,\n}", "trailing comma at line 2 column 1"),
            (
                r#"{"timeout_s": "soon"}"#,
                "expected timeout_s: whole seconds",
            ),
            (
                r#"{"timeout_s": 3601}"#,
                "invalid value: integer `3601`, expected timeout_s",
            ),
            (r#"{"force": true}"#, "unknown field `force`"),
            ("[]", "expected a JSON object"),
            ("5", "expected a JSON object"),
        ] {
            let (s, v) = call(&m, "POST", "/v1/vm/shutdown", body);
            assert_eq!(s, 400, "{body}");
            assert!(error(&v).contains(fragment), "{body}: {}", error(&v));
        }
        let (s, v) = call(&m, "POST", "/v1/vm/pause", "{}");
        assert_eq!(
            (s, error(&v)),
            (400, "POST /v1/vm/pause takes no request body")
        );
        assert!(m.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn unknown_routes_and_methods() {
        let m = Arc::new(Mock::default());
        let (s, v) = call(&m, "GET", "/v1/nope", "");
        assert_eq!((s, error(&v)), (404, "no such route: /v1/nope"));
        assert_eq!(call(&m, "GET", "/v2/vm", "").0, 404);
        assert_eq!(call(&m, "GET", "*", "").0, 404);
        assert_eq!(call(&m, "GET", "/v1//", "").0, 404);
        let r = Router::new(m.clone()).handle(&req("DELETE", "/v1/vm", ""));
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, [("Allow", "GET, HEAD".to_string())]);
        let r = Router::new(m.clone()).handle(&req("GET", "/v1/vm/pause", ""));
        assert_eq!(r.status, 405);
        assert_eq!(r.headers, [("Allow", "POST, PUT".to_string())]);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            error(&v),
            "GET is not allowed on /v1/vm/pause; use POST or PUT"
        );
        // Methods are case-sensitive.
        assert_eq!(call(&m, "post", "/v1/vm/pause", "").0, 405);
        assert!(m.calls.lock().unwrap().is_empty());
    }
}
