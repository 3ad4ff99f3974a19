//! `vmon ctl`: operate a running VM through its API socket. Human-readable by default,
//! the API's own JSON with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use vmon_api::client::{self, ClientResponse};
use vmon_api::model::{Counters, VmInfo};
use vmon_vmm::exit_codes;

/// How long `ctl` waits for an answer. Pausing waits up to 2 s for the vCPUs.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ctl snapshot` waits: writing the memory of a large guest to a slow disk takes
/// minutes (64 GiB at 100 MB/s: 11 minutes).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);
/// `vmon ctl`: the API answered with an error status.
pub const API_REFUSED: i32 = 1;
/// `vmon ctl`: nothing accepts connections at that socket.
pub const API_UNREACHABLE: i32 = 69;
/// `vmon ctl`: connected, but no well-formed answer came in time.
pub const API_NO_ANSWER: i32 = 70;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket (`vmon run --api-socket PATH`)
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Print the API's JSON instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// State, uptime, vCPUs, memory and process of the VM
    Info,
    /// Stop running guest code (the guest clock does not jump on resume)
    Pause,
    /// Continue a paused VM
    Resume,
    /// Press the ACPI power button; stop the VM if the guest has not powered off in time
    Shutdown {
        /// Seconds the guest gets to power off (0-3600)
        #[arg(long, default_value_t = vmon_api::model::DEFAULT_SHUTDOWN_TIMEOUT_S, value_name = "SECS")]
        timeout: u64,
    },
    /// Stop the VM at once
    Stop,
    /// vCPU exits and time, device requests, bytes and errors
    Counters,
    /// The counters in Prometheus text format (what `GET /metrics` serves)
    Metrics,
    /// Pause the VM, write its whole state to DIR, then resume it (or stop it)
    Snapshot {
        /// Directory for the snapshot (created if missing)
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Stop the VM once the snapshot is written
        #[arg(long)]
        stop: bool,
    },
}

pub fn run(args: CtlArgs) -> i32 {
    let (method, path, body) = match &args.action {
        Action::Info => ("GET", "/v1/vm", None),
        Action::Pause => ("POST", "/v1/vm/pause", None),
        Action::Resume => ("POST", "/v1/vm/resume", None),
        Action::Shutdown { timeout } => (
            "POST",
            "/v1/vm/shutdown",
            Some(format!(r#"{{"timeout_s":{timeout}}}"#)),
        ),
        Action::Stop => ("POST", "/v1/vm/stop", None),
        Action::Counters => ("GET", "/v1/counters", None),
        Action::Metrics => ("GET", "/metrics", None),
        Action::Snapshot { dir, stop } => {
            // The VMM may have another working directory: send an absolute path.
            let dir = match std::path::absolute(dir) {
                Ok(d) => d,
                Err(e) => {
                    return crate::cli::fail(
                        format!("snapshot directory {}: {e}", dir.display()),
                        exit_codes::USAGE,
                    )
                }
            };
            let body = serde_json::json!({ "dir": dir, "stop": stop });
            ("POST", "/v1/vm/snapshot", Some(body.to_string()))
        }
    };
    let response = match client::request(
        &args.api_socket,
        method,
        path,
        body.as_deref().map(str::as_bytes),
        match args.action {
            Action::Snapshot { .. } => SNAPSHOT_TIMEOUT,
            _ => TIMEOUT,
        },
    ) {
        Ok(r) => r,
        Err(e @ client::ClientError::Connect { .. }) => {
            return crate::cli::fail(e, API_UNREACHABLE)
        }
        Err(e) => return crate::cli::fail(e, API_NO_ANSWER),
    };
    if !response.is_success() {
        // One line, whatever the body was.
        let message = response.error_message().unwrap_or_else(|| {
            let body = String::from_utf8_lossy(&response.body);
            body.trim().lines().next().unwrap_or("").to_string()
        });
        let message = message.replace(['\n', '\r'], " ");
        return crate::cli::fail(format!("{message} (HTTP {})", response.status), API_REFUSED);
    }
    let text = if args.json || matches!(args.action, Action::Metrics) {
        String::from_utf8_lossy(&response.body).into_owned()
    } else {
        match human(&args.action, &response) {
            Ok(t) => t,
            Err(e) => {
                return crate::cli::fail(
                    format!("unexpected answer from the API: {e}"),
                    exit_codes::VMM_FAULT,
                )
            }
        }
    };
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    exit_codes::OK
}

fn human(action: &Action, r: &ClientResponse) -> Result<String, serde_json::Error> {
    Ok(match action {
        Action::Info => info_text(&serde_json::from_slice(&r.body)?),
        Action::Counters => counters_text(&serde_json::from_slice(&r.body)?),
        Action::Snapshot { .. } => {
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            format!(
                "snapshot in {}: {} bytes of memory written, guest paused {:.1} ms{}\n",
                v["dir"].as_str().unwrap_or("?"),
                v["memory_bytes_written"].as_u64().unwrap_or(0),
                v["paused_ms"].as_f64().unwrap_or(0.0),
                if v["stopped"].as_bool() == Some(true) {
                    "; VM stopped"
                } else {
                    ""
                }
            )
        }
        Action::Shutdown { .. } => {
            // The VM's answer, not our request: an earlier, shorter deadline stands.
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            match v["timeout_s"].as_u64() {
                Some(t) => format!("shutting down: the guest has {t} s to power off\n"),
                None => "shutting down\n".to_string(),
            }
        }
        _ => {
            let v: serde_json::Value = serde_json::from_slice(&r.body)?;
            format!("{}\n", v["state"].as_str().unwrap_or("ok"))
        }
    })
}

fn info_text(i: &VmInfo) -> String {
    format!(
        "state   {}\nuptime  {:.1} s\nvcpus   {}\nmemory  {} MiB\npid     {}\n",
        i.state, i.uptime_s, i.vcpus, i.memory_mib, i.pid
    )
}

/// One line per vCPU and per device; counters that are still zero are left out.
fn counters_text(c: &Counters) -> String {
    let mut out = format!("uptime {:.1} s\n", c.uptime_s);
    let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
        let parts: Vec<String> = m
            .iter()
            .filter(|(_, &v)| v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    };
    for v in &c.vcpus {
        let _ = writeln!(
            out,
            "vcpu{:<3} cpu {:.2} s  exits: {}",
            v.index,
            v.cpu_time_s,
            nonzero(&v.exits)
        );
    }
    for d in &c.devices {
        let _ = writeln!(out, "{} ({}): {}", d.name, d.kind, nonzero(&d.counters));
    }
    if !c.api.is_empty() {
        let _ = writeln!(out, "api: {}", nonzero(&c.api));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_text_skips_zeros() {
        let c = Counters {
            uptime_s: 2.0,
            vcpus: vec![vmon_api::model::VcpuCounters {
                index: 0,
                cpu_time_s: 0.5,
                exits: [("io_out".to_string(), 7), ("hlt".to_string(), 0)]
                    .into_iter()
                    .collect(),
            }],
            devices: vec![vmon_api::model::DeviceCounters {
                name: "disk0".into(),
                kind: "block".into(),
                counters: Default::default(),
            }],
            api: Default::default(),
        };
        let t = counters_text(&c);
        assert_eq!(
            t,
            "uptime 2.0 s\nvcpu0   cpu 0.50 s  exits: io_out=7\ndisk0 (block): -\n"
        );
    }
}
