//! The server over real Unix sockets: routes, protocol edge cases, and clients that are
//! slow, silent, greedy or many.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{quick_limits, wait_for, Conn, MockVm, TempDir, TestServer};
use vmon_api::http::Response;
use vmon_api::server::{ApiServer, Limits, ServerError};
use vmon_api::VmState;

#[test]
fn socket_is_private_and_removed_on_shutdown() {
    let mut s = TestServer::start(Limits::default());
    let meta = std::fs::symlink_metadata(&s.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(s.handle().path(), Some(s.socket.as_path()));
    s.handle.take().unwrap().shutdown();
    assert!(!s.socket.exists());

    // Dropping the handle does the same.
    let mut s = TestServer::start(Limits::default());
    drop(s.handle.take());
    assert!(!s.socket.exists());
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::bind(&path).unwrap();
    let handle = server
        .spawn(Arc::new(|_: &vmon_api::Request| Response::text(200, "ok")))
        .unwrap();
    let r = vmon_api::client::request(&path, "GET", "/", None, Duration::from_secs(5)).unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, b"ok".as_slice()));
    handle.shutdown();
}

#[test]
fn socket_in_use_is_not_taken_over() {
    let s = TestServer::start(Limits::default());
    let e = ApiServer::bind(&s.socket).unwrap_err();
    assert!(matches!(e, ServerError::InUse(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "API socket {} is in use by another process",
            s.socket.display()
        )
    );
    // The probe did not disturb the server.
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
}

#[test]
fn other_files_are_not_touched() {
    let dir = TempDir::new();
    let path = dir.join("notes.txt");
    std::fs::write(&path, "keep me").unwrap();
    let e = ApiServer::bind(&path).unwrap_err();
    assert!(matches!(e, ServerError::NotASocket(_)), "{e:?}");
    assert!(e.to_string().ends_with("exists and is not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");

    let long = dir.join(&"x".repeat(120));
    assert!(matches!(
        ApiServer::bind(&long),
        Err(ServerError::PathTooLong(_))
    ));
    let missing = dir.join("no/such/dir/api.sock");
    let e = ApiServer::bind(&missing).unwrap_err();
    assert!(e.to_string().starts_with("cannot create API socket"), "{e}");
}

#[test]
fn routes() {
    let s = TestServer::start(Limits::default());
    let (status, v) = s.request("GET", "/v1/vm", None);
    assert_eq!(status, 200);
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["config"]["cpus"], 2);

    assert_eq!(
        s.request("POST", "/v1/vm/pause", None),
        (200, serde_json::json!({"state": "paused"}))
    );
    assert_eq!(s.request("GET", "/v1/vm", None).1["state"], "paused");
    assert_eq!(
        s.request("PUT", "/v1/vm/resume", None),
        (200, serde_json::json!({"state": "running"}))
    );
    assert_eq!(
        s.request("POST", "/v1/vm/shutdown", Some(r#"{"timeout_s": 7}"#)),
        (
            202,
            serde_json::json!({"state": "shutting-down", "timeout_s": 7})
        )
    );
    let (status, v) = s.request("POST", "/v1/vm/pause", None);
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("cannot pause: the VM is shutting-down"))
    );
    assert_eq!(
        s.request("POST", "/v1/vm/stop", None),
        (202, serde_json::json!({"state": "stopping"}))
    );
    assert_eq!(
        s.vm.calls(),
        ["pause", "resume", "shutdown 7", "pause", "stop"]
    );

    let (status, v) = s.request("GET", "/v1/counters", None);
    assert_eq!(status, 200);
    assert_eq!(v["devices"][1]["name"], "disk1");
    let r = vmon_api::client::request(&s.socket, "GET", "/metrics", None, Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type.as_deref(), Some("text/plain; version=0.0.4"));
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("\nvmon_device_read_bytes_total{device=\"disk1\",kind=\"block\"} 4096\n"));
    assert!(text.contains("\nvmon_vm_paused 0\n"));
    let (status, v) = s.request("GET", "/", None);
    assert_eq!((status, v["api_version"].as_u64()), (200, Some(1)));
}

#[test]
fn bad_requests_are_explained() {
    let s = TestServer::start(Limits::default());
    for (body, message) in [
        ("{\"timeout_s\": 5", "invalid request body: EOF while parsing an object at line 1 column 15"),
        ("{\"timeout_s\": \"5\"}", "invalid request body: invalid type: string \"5\", expected timeout_s: whole seconds from 0 to 3600 at line 1 column 17"),
        ("{\"timeout_s\": 4000}", "invalid request body: invalid value: integer `4000`, expected timeout_s: whole seconds from 0 to 3600 at line 1 column 18"),
        ("{\"timeout_s\": 5, \"force\": true}", "invalid request body: unknown field `force`, expected `timeout_s` at line 1 column 24"),
    ] {
        let (status, v) = s.request("POST", "/v1/vm/shutdown", Some(body));
        assert_eq!((status, v["error"].as_str().unwrap()), (400, message), "{body}");
    }
    let (status, v) = s.request("GET", "/v1/vms", None);
    assert_eq!(
        (status, v["error"].as_str().unwrap()),
        (404, "no such route: /v1/vms")
    );
    let (status, v) = s.request("POST", "/v1/vm/resume", Some("{}"));
    assert_eq!(
        (status, v["error"].as_str().unwrap()),
        (400, "POST /v1/vm/resume takes no request body")
    );

    let mut c = s.connect();
    c.send(b"DELETE /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("GET, HEAD"));
    assert_eq!(
        r.error(),
        "DELETE is not allowed on /v1/vm; use GET or HEAD"
    );
    // A 405 is an answer like any other: the connection stays usable.
    c.send(b"GET /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().status, 200);
    assert!(
        s.vm.calls().is_empty(),
        "nothing reached the VM: {:?}",
        s.vm.calls()
    );
}

/// Protocol errors are answered and the connection closed, since where the next request
/// would start is unknown.
#[test]
fn protocol_errors() {
    let s = TestServer::start(Limits::default());
    let mut big_head = b"GET /v1/vm HTTP/1.1\r\nX-Filler: ".to_vec();
    big_head.resize(9000, b'a');
    for (request, status) in [
        (b"GET /v1/vm HTTP/2.0\r\n\r\n".to_vec(), 505),
        (
            b"POST /v1/vm/stop HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (
            b"POST /v1/vm/stop HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
                .to_vec(),
            400,
        ),
        (
            b"POST /v1/vm/stop HTTP/1.1\r\nContent-Length: lots\r\n\r\n".to_vec(),
            400,
        ),
        (b"GET /v1/vm HTTP/1.1\r\nNo Colon\r\n\r\n".to_vec(), 400),
        (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
            400,
        ),
        (big_head, 431),
    ] {
        let mut c = s.connect();
        c.send(&request);
        let r = c.response(false).unwrap();
        assert_eq!(
            r.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&request[..40.min(request.len())])
        );
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(!r.error().is_empty());
        assert!(c.closed());
    }
    assert!(s.vm.calls().is_empty());
}

#[test]
fn huge_body_is_refused_unread() {
    let s = TestServer::start(Limits::default());
    let mut c = s.connect();
    c.send(b"POST /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 10485760\r\n\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        r.error(),
        "request body of 10485760 bytes exceeds the limit of 65536 bytes"
    );
    // The server does not take the 10 MiB: sending them fails part-way.
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    let result = (|| {
        for _ in 0..10 {
            c.stream.write_all(&chunk)?;
            sent += chunk.len();
        }
        Ok::<(), std::io::Error>(())
    })();
    assert!(result.is_err(), "the server read all 10 MiB");
    assert!(sent < 2 << 20, "{sent} bytes went through");
    assert!(s.vm.calls().is_empty());
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
}

#[test]
fn silent_client_does_not_hold_up_others() {
    let s = TestServer::start(quick_limits());
    let start = Instant::now();
    let mut silent = s.connect();
    // Others are served while it sits there.
    for _ in 0..3 {
        assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
    }
    let r = silent.response(false).unwrap();
    let waited = start.elapsed();
    assert_eq!(r.status, 408);
    assert_eq!(r.error(), "the request was not received within 300 ms");
    assert!(silent.closed());
    assert!(waited >= Duration::from_millis(280), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(s.handle().stats().timeouts() >= 1);
}

#[test]
fn slowloris_is_cut_off() {
    let s = TestServer::start(quick_limits());
    let mut c = s.connect();
    let request = b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow\r\n\r\n";
    let start = Instant::now();
    let mut sent = 0;
    for &b in request.iter() {
        if c.stream.write_all(&[b]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    assert!(sent < request.len(), "the whole slow request was accepted");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(c.closed());
    assert!(s.vm.calls().is_empty());
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let s = TestServer::start(quick_limits());
    let mut c = s.connect();
    c.send(b"GET /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().status, 200);
    let start = Instant::now();
    // Closed without a word: a 408 here could cross a request the client is sending.
    assert!(c.closed());
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(wait_for(Duration::from_secs(2), || s
        .handle()
        .stats()
        .active_connections()
        == 0));
}

#[test]
fn keep_alive_pipelining_and_close() {
    let s = TestServer::start(Limits::default());
    let mut c = s.connect();
    c.send(b"GET /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(c.response(false).unwrap().json()["state"], "running");
    // Pipelined: answered in order, the second sees the first's effect.
    c.send(
        b"POST /v1/vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n\
          GET /v1/vm HTTP/1.1\r\n\r\n\
          HEAD /v1/vm HTTP/1.1\r\n\r\n\
          PUT /v1/vm/resume HTTP/1.1\r\n\r\n\
          GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n\
          GET /v1/vm HTTP/1.1\r\n\r\n",
    );
    assert_eq!(c.response(false).unwrap().json()["state"], "paused");
    assert_eq!(c.response(false).unwrap().json()["state"], "paused");
    let head = c.response(true).unwrap();
    assert_eq!(head.status, 200);
    assert!(
        head.header("Content-Length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 10
    );
    assert_eq!(c.response(false).unwrap().json()["state"], "running");
    let last = c.response(false).unwrap();
    assert_eq!(last.status, 404);
    assert_eq!(last.header("Connection"), Some("close"));
    // The request after `Connection: close` is not answered.
    assert!(c.closed());
    assert_eq!(s.vm.calls(), ["pause", "resume"]);
}

#[test]
fn http_1_0() {
    let s = TestServer::start(Limits::default());
    let mut c = s.connect();
    c.send(b"GET /v1/vm HTTP/1.0\r\n\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.closed());

    let mut c = s.connect();
    c.send(b"GET /v1/vm HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response(false).unwrap();
    assert_eq!(r.header("Connection"), Some("keep-alive"));
    c.send(b"GET /v1/vm HTTP/1.0\r\n\r\n");
    assert_eq!(c.response(false).unwrap().status, 200);
    assert!(c.closed());
}

#[test]
fn half_closed_client_gets_all_its_answers() {
    let s = TestServer::with_vm(Limits::default(), MockVm::new(300));
    let mut c = s.connect();
    let mut requests = Vec::new();
    for _ in 0..20 {
        requests.extend_from_slice(b"GET /v1/counters HTTP/1.1\r\n\r\n");
    }
    c.send(&requests);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..20 {
        let r = c
            .response(false)
            .unwrap_or_else(|| panic!("response {i} missing"));
        assert_eq!(r.status, 200);
    }
    assert!(c.closed());
}

#[test]
fn expect_100_continue() {
    let s = TestServer::start(Limits::default());
    let mut c = s.connect();
    c.send(b"POST /v1/vm/shutdown HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n");
    let interim = c.response(false).unwrap();
    assert_eq!(interim.status, 100);
    c.send(b"{\"timeout_s\":9}");
    let r = c.response(false).unwrap();
    assert_eq!((r.status, r.json()["timeout_s"].as_u64()), (202, Some(9)));
}

#[test]
fn connection_limit() {
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let s = TestServer::start(limits);
    let held: Vec<Conn> = (0..4).map(|_| s.connect()).collect();
    assert!(wait_for(Duration::from_secs(2), || s
        .handle()
        .stats()
        .active_connections()
        == 4));
    let start = Instant::now();
    let r = vmon_api::client::request(&s.socket, "GET", "/v1/vm", None, Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.error_message().as_deref(),
        Some("too many API connections (at most 4); try again")
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(s.handle().stats().connections_rejected(), 1);
    drop(held);
    assert!(wait_for(Duration::from_secs(2), || s
        .handle()
        .stats()
        .active_connections()
        == 0));
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
}

#[test]
fn a_hundred_clients_at_once() {
    let s = TestServer::start(Limits::default());
    let barrier = Arc::new(Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let socket = s.socket.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                // Keep the connection a moment so that many are open together.
                let mut c = Conn::new(&socket);
                std::thread::sleep(Duration::from_millis(50));
                let _ = c.stream.write_all(b"GET /v1/vm HTTP/1.1\r\n\r\n");
                c.response(false).map(|r| r.status)
            })
        })
        .collect();
    let statuses: Vec<Option<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = statuses.iter().filter(|s| **s == Some(200)).count();
    let busy = statuses.iter().filter(|s| **s == Some(503)).count();
    assert_eq!(ok + busy, 100, "{statuses:?}");
    assert!(ok >= 32, "{ok} served");
    let stats = s.handle().stats();
    assert_eq!(stats.connections_rejected() as usize, busy);
    assert_eq!(stats.requests(2) as usize, ok);
    assert_eq!(stats.requests(5) as usize, busy);
    // Still responsive, and every connection is gone.
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
    assert!(wait_for(Duration::from_secs(2), || stats
        .active_connections()
        == 0));
}

#[test]
fn client_that_never_reads() {
    // Each counters response is about 100 KiB.
    let s = TestServer::with_vm(quick_limits(), MockVm::new(1000));
    let mut greedy = s.connect();
    let mut requests = Vec::new();
    for _ in 0..100 {
        requests.extend_from_slice(b"GET /v1/counters HTTP/1.1\r\n\r\n");
    }
    greedy.send(&requests);
    // The server is stuck on this client's output, not on the client: others get through.
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    // And the greedy client is dropped after the write timeout, having been sent only a
    // fraction of the 10 MB it asked for.
    let stats = s.handle().stats();
    assert!(wait_for(Duration::from_secs(3), || stats.timeouts() >= 1));
    assert!(wait_for(Duration::from_secs(2), || stats
        .active_connections()
        == 0));
    let mut answered = 0;
    while greedy.response(false).is_some() {
        answered += 1;
    }
    assert!(answered < 20, "{answered} responses");
}

#[test]
fn handler_panic_is_a_500() {
    let dir = TempDir::new();
    let path = dir.join("api.sock");
    let handle = ApiServer::bind(&path)
        .unwrap()
        .spawn(Arc::new(|r: &vmon_api::Request| {
            if r.path == "/boom" {
                panic!("test panic (expected)");
            }
            Response::text(200, "fine")
        }))
        .unwrap();
    let r = vmon_api::client::request(&path, "GET", "/boom", None, Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 500);
    let r = vmon_api::client::request(&path, "GET", "/", None, Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
    handle.shutdown();
}

#[test]
fn shutdown_is_prompt_with_clients_connected() {
    let mut s = TestServer::start(Limits::default());
    let mut idle = s.connect();
    idle.send(b"GET /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(idle.response(false).unwrap().status, 200);
    let mut partial = s.connect();
    partial.send(b"GET /v1/v");
    let start = Instant::now();
    s.handle.take().unwrap().shutdown();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(idle.closed());
    assert!(partial.closed());
    let e =
        vmon_api::client::request(&s.socket, "GET", "/", None, Duration::from_secs(1)).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("No such file or directory (is the VM running?)"),
        "{e}"
    );
}

#[test]
fn client_timeout_reads_well() {
    let dir = TempDir::new();
    let path = dir.join("api.sock");
    let handle = ApiServer::bind(&path)
        .unwrap()
        .spawn(Arc::new(|_: &vmon_api::Request| {
            std::thread::sleep(Duration::from_millis(500));
            Response::text(200, "late")
        }))
        .unwrap();
    let e =
        vmon_api::client::request(&path, "GET", "/", None, Duration::from_millis(100)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("no response from {} within 0.1 s", path.display())
    );
    handle.shutdown();

    // Something that is not an API server.
    let listener = UnixListener::bind(dir.join("other.sock")).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH\r\n").unwrap();
    });
    let e = vmon_api::client::request(
        &dir.join("other.sock"),
        "GET",
        "/",
        None,
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("invalid response from"), "{e}");
    t.join().unwrap();
}

#[test]
fn stats_count_by_class() {
    let s = TestServer::start(Limits::default());
    s.request("GET", "/v1/vm", None);
    s.request("GET", "/v1/vm", None);
    s.request("GET", "/nope", None);
    s.request("POST", "/v1/vm/shutdown", Some("{"));
    let snap = s.handle().stats().snapshot();
    assert_eq!(
        snap,
        [("2xx", 2), ("3xx", 0), ("4xx", 2), ("5xx", 0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    );
}

#[test]
fn curl_talks_to_it() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: curl is not installed");
        return;
    }
    let s = TestServer::start(Limits::default());
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--unix-socket"])
            .arg(&s.socket)
            .args(args)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = curl(&["http://localhost/v1/vm"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out} {err}"));
    assert_eq!(v["state"], "running");

    let (out, _) = curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"timeout_s": 5}"#,
        "http://localhost/v1/vm/shutdown",
    ]);
    assert_eq!(out, r#"{"state":"shutting-down","timeout_s":5}"#);
    assert_eq!(*s.vm.state.lock().unwrap(), VmState::ShuttingDown);

    let (out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "DELETE",
        "http://localhost/v1/vm",
    ]);
    assert_eq!(out, "405");
    let (out, _) = curl(&["http://localhost/metrics"]);
    assert!(out.starts_with("# HELP vmon_vm_uptime_seconds"), "{out}");
    // Several URLs on one connection (curl reuses it).
    let (out, err) = curl(&["http://localhost/v1/vm", "http://localhost/v1/counters"]);
    assert!(
        out.contains("\"memory_mib\":512") && out.contains("\"devices\""),
        "{out} {err}"
    );

    // A body over the limit: curl asks with Expect: 100-continue and gets the 413 before
    // sending it.
    let big = s.dir.join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    let data = format!("@{}", big.display());
    let (out, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &data,
        "http://localhost/v1/vm/shutdown",
    ]);
    assert_eq!(out, "413", "{err}");
}

#[test]
fn nothing_blocks_on_a_full_socket_buffer() {
    // Many clients that each ask for a large response and read it slowly; the server must
    // keep serving a well-behaved client promptly throughout.
    let s = TestServer::with_vm(Limits::default(), MockVm::new(1000));
    let slow: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut c = UnixStream::connect(&s.socket).unwrap();
            // More than a socket buffer holds.
            c.write_all(&b"GET /v1/counters HTTP/1.1\r\n\r\n".repeat(5))
                .unwrap();
            c
        })
        .collect();
    for _ in 0..5 {
        let start = Instant::now();
        assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
    drop(slow);
}

#[test]
fn large_bodies_share_a_bounded_pool() {
    let limits = Limits {
        max_pooled_input: 16 * 1024,
        ..Limits::default()
    };
    let s = TestServer::start(limits);
    // A takes its own 8 KiB and the whole pool, then stalls.
    let mut a = s.connect();
    a.send(b"POST /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 60000\r\n\r\n");
    a.send(&[b' '; 40000]);
    std::thread::sleep(Duration::from_millis(100));
    // Small requests need no pool and go through.
    assert_eq!(s.request("GET", "/v1/vm", None).0, 200);
    // B's body does not fit in its own allowance: it waits for the pool.
    let mut b = s.connect();
    b.send(b"POST /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 20000\r\n\r\n");
    let mut body = br#"{"timeout_s": 3}"#.to_vec();
    body.resize(20000, b' ');
    b.send(&body);
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.vm.calls().is_empty());
    // A hangs up: it is reaped at once (not at its request timeout), and B gets the pool.
    let start = Instant::now();
    drop(a);
    let r = b.response(false).unwrap();
    assert_eq!(r.status, 202);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.vm.calls(), ["shutdown 3"]);
}

/// A handler whose `/slow` requests are answered later, by whoever holds the sender the
/// test gets through `pending`; everything else is answered at once.
struct Deferring {
    pending: std::sync::Mutex<std::sync::mpsc::Sender<vmon_api::Reply>>,
}

impl vmon_api::server::Handler for Deferring {
    fn handle(&self, request: &vmon_api::Request) -> Response {
        Response::text(200, format!("now {}", request.path))
    }

    fn start(&self, request: &vmon_api::Request) -> Option<vmon_api::Later> {
        if request.path != "/slow" {
            return None;
        }
        let (later, reply) = vmon_api::later().unwrap();
        self.pending.lock().unwrap().send(reply).unwrap();
        Some(later)
    }
}

/// Reads from `stream` into `seen` until `needle` is in it; returns all of `seen`.
fn read_until(stream: &mut UnixStream, seen: &mut Vec<u8>, needle: &str) -> String {
    use std::io::Read;
    let mut b = [0u8; 1024];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let n = stream.read(&mut b).unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {:?}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(seen).into_owned()
}

#[test]
fn a_request_answered_later_holds_only_its_own_connection() {
    let dir = TempDir::new();
    let path = dir.join("api.sock");
    let (tx, pending) = std::sync::mpsc::channel();
    let handler = Arc::new(Deferring {
        pending: std::sync::Mutex::new(tx),
    });
    let handle = ApiServer::bind(&path).unwrap().spawn(handler).unwrap();

    // A slow request with a fast one pipelined behind it on the same connection.
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = pending.recv_timeout(Duration::from_secs(5)).unwrap();

    // Meanwhile, other connections are answered, well past the request timeout.
    let limits = Limits::default();
    let until = Instant::now() + limits.request_timeout + Duration::from_millis(500);
    while Instant::now() < until {
        let r =
            vmon_api::client::request(&path, "GET", "/fast", None, Duration::from_secs(5)).unwrap();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, b"now /fast".as_slice())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The slow connection has had nothing yet: not a 408, not the pipelined answer.
    slow.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let early = std::io::Read::read(&mut slow, &mut b);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{early:?}"
    );
    slow.set_nonblocking(false).unwrap();

    answer.send(Response::text(200, "later"));
    let mut seen = Vec::new();
    let text = read_until(&mut slow, &mut seen, "now /after");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let later = text.find("later").expect("the later answer");
    assert!(
        later < text.find("now /after").unwrap(),
        "out of order: {text}"
    );

    // A handler that drops its sender gets its client a 500, not a hang.
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop(pending.recv_timeout(Duration::from_secs(5)).unwrap());
    let text = read_until(&mut slow, &mut seen, "without an answer");
    assert!(text.contains("HTTP/1.1 500"), "{text}");

    // A server told to stop still sends an answer that arrives just after, but starts
    // nothing pipelined behind it: the connection then closes.
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /behind HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = pending.recv_timeout(Duration::from_secs(5)).unwrap();
    let stopper = std::thread::spawn(move || handle.shutdown());
    std::thread::sleep(Duration::from_millis(50));
    answer.send(Response::text(200, "last"));
    read_until(&mut slow, &mut seen, "last");
    stopper.join().unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut slow, &mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("behind"), "answered after shutdown: {rest}");
}
