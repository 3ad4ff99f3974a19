//! What the management API costs in memory: the resident set of an idle tiny-guest VM
//! without `--api-socket`, with it (API thread waiting), and after the API has served a
//! burst of requests (sequential and 32 concurrent clients, every route).
//!
//! Run: `cargo bench -p vmon --bench api_rss [-- RUNS]`. Prints medians; results are in
//! docs/benchmarks.md. Not a test: nothing asserts a figure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmon_tinyguest as tg;

const VMON: &str = env!("CARGO_BIN_EXE_vmon");
const ROUTES: [&str; 3] = ["/v1/vm", "/v1/counters", "/metrics"];

fn get(socket: &Path, path: &str) -> usize {
    let mut s = UnixStream::connect(socket).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    resp.len()
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (idle RSS, RSS after the burst) in KiB; the second is None without the API.
fn one_run(image: &Path, socket: Option<&Path>) -> (u64, Option<u64>) {
    let mut cmd = Command::new(VMON);
    cmd.args(["run", "--memory", "128M", "--cmdline", "", "--kernel"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(s) = socket {
        cmd.arg("--api-socket").arg(s);
    }
    let mut child = cmd.spawn().expect("spawn vmon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let idle = common::status_kib(child.id(), "VmRSS:");
    let after = socket.map(|s| {
        wait_for_socket(s);
        for i in 0..300 {
            get(s, ROUTES[i % ROUTES.len()]);
        }
        let clients: Vec<_> = (0..32)
            .map(|i| {
                let s = s.to_path_buf();
                std::thread::spawn(move || get(&s, ROUTES[i % ROUTES.len()]))
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        common::status_kib(child.id(), "VmRSS:")
    });
    let _ = child.kill();
    let _ = child.wait();
    (idle, after)
}

fn main() {
    let runs = common::runs_from_args(10);
    let dir = std::env::temp_dir().join(format!("vmon-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("tiny-pvh.elf");
    std::fs::write(
        &image,
        tg::elf64_pvh(&tg::pvh_print_then_halt(b"up\n"), tg::DEFAULT_LOAD_ADDR),
    )
    .unwrap();
    let socket = dir.join("api.sock");
    let (mut without, mut with, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        without.push(one_run(&image, None).0);
        let (idle, burst) = one_run(&image, Some(&socket));
        with.push(idle);
        after.push(burst.unwrap());
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (a, b, c) = (
        common::median(without),
        common::median(with),
        common::median(after),
    );
    println!("idle tiny-guest VM, 128 MiB, {runs} runs each, median VmRSS:");
    println!("  without --api-socket        {:6.2} MiB", mib(a));
    println!(
        "  with the API, idle          {:6.2} MiB  (+{} KiB)",
        mib(b),
        b as i64 - a as i64
    );
    println!(
        "  after 332 API requests      {:6.2} MiB  (+{} KiB)",
        mib(c),
        c as i64 - a as i64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
