//! What the API adds to the VMM's resident memory, with every connection slot in use. A
//! test binary of its own, so no other test's allocations land in the measurement.

mod common;

use std::time::Duration;

use common::{wait_for, TestServer};
use vmon_api::server::Limits;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn api_adds_well_under_a_mebibyte() {
    // Warm the client side (its buffers and code pages are not the server's cost).
    {
        let s = TestServer::start(Limits::default());
        let mut c = s.connect();
        c.send(b"GET /v1/counters HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n");
        c.response(false).unwrap();
        c.response(false).unwrap();
    }
    let before = rss_kib();
    let s = TestServer::start(Limits::default());
    let mut conns = Vec::new();
    for _ in 0..32 {
        let mut c = s.connect();
        c.send(b"GET /v1/counters HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(c.response(false).unwrap().status, 200);
        assert_eq!(c.response(false).unwrap().status, 200);
        // Then each starts a maximal request and sends most of its body: the worst a client
        // can make the server buffer for it.
        c.send(b"POST /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 65536\r\n\r\n");
        c.send(&[b' '; 65000]);
        conns.push(c);
    }
    assert!(wait_for(Duration::from_secs(2), || s
        .handle()
        .stats()
        .active_connections()
        == 32));
    // Let the server read what it is willing to.
    std::thread::sleep(Duration::from_millis(200));
    let during = rss_kib();
    drop(conns);
    let added = during.saturating_sub(before);
    println!("RSS before {before} KiB, with 32 busy connections {during} KiB: +{added} KiB");
    assert!(added < 1024, "the API added {added} KiB");
}
