//! The API's wire types (JSON through serde) and the Prometheus rendering of the counters.
//!
//! These types are the contract with clients: field names and enum spellings here are what
//! scripts depend on, so they change only by adding.

use std::collections::BTreeMap;
use std::fmt::{self, Write};

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

/// Orderly-shutdown timeout when the request names none.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
/// Longest orderly-shutdown timeout a request may ask for.
pub const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;
/// The `Content-Type` of Prometheus' text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    Paused,
    /// The guest was asked to power off and has not yet.
    ShuttingDown,
    Stopped,
}

impl VmState {
    /// The wire spelling, e.g. for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /v1/vm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub uptime_s: f64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The VMM's process id.
    pub pid: u32,
    /// The configuration the VM was started with, as the VMM chooses to show it.
    pub config: serde_json::Value,
}

/// The optional body of `POST /v1/vm/shutdown`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds the guest gets to power off before the VM is stopped; 0 to
    /// [`MAX_SHUTDOWN_TIMEOUT_S`], default [`DEFAULT_SHUTDOWN_TIMEOUT_S`].
    #[serde(
        default,
        deserialize_with = "timeout_s",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_s: Option<u64>,
}

impl ShutdownRequest {
    pub fn timeout_s(&self) -> u64 {
        self.timeout_s.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_S)
    }
}

/// serde_json's messages for a wrong type or value name what was expected but not the
/// field; saying the field in `expecting` puts it in the message ("invalid type: string
/// "5", expected timeout_s: whole seconds from 0 to 3600 at line 1 column 17").
fn timeout_s<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Seconds;
    impl<'de> Visitor<'de> for Seconds {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "timeout_s: whole seconds from 0 to {MAX_SHUTDOWN_TIMEOUT_S}"
            )
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_u64(self)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            if v > MAX_SHUTDOWN_TIMEOUT_S {
                return Err(E::invalid_value(Unexpected::Unsigned(v), &self));
            }
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }
    }
    d.deserialize_option(Seconds)
}

/// The body of `POST /v1/vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot into (created if missing), on the VMM's host.
    pub dir: std::path::PathBuf,
    /// Stop the VM once the snapshot is written, instead of resuming it.
    #[serde(default)]
    pub stop: bool,
}

/// Answer to pause, resume, shutdown and stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResponse {
    /// The VM's state after the action, or where it is heading (`shutting-down`,
    /// `stopping`).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// `GET /v1/counters`, and the source of `GET /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub uptime_s: f64,
    pub vcpus: Vec<VcpuCounters>,
    pub devices: Vec<DeviceCounters>,
    /// API requests answered, by status class ("2xx", "4xx", ...).
    pub api: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuCounters {
    pub index: u32,
    /// CPU time the vCPU thread consumed (guest and host side).
    pub cpu_time_s: f64,
    /// Exits to userspace, by reason.
    pub exits: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceCounters {
    /// e.g. "disk0".
    pub name: String,
    /// e.g. "block", "net".
    pub kind: String,
    pub counters: BTreeMap<String, u64>,
}

/// The counters in Prometheus' text exposition format 0.0.4: one `# HELP` and `# TYPE` per
/// family and the family's samples together, as the format requires. Device counters become
/// one family per counter name (`vmon_device_<name>_total`) labelled by device, so that the
/// same counter of two disks can be summed.
pub fn render_prometheus(c: &Counters, state: VmState) -> String {
    let mut out = String::with_capacity(1024);
    family(
        &mut out,
        "vmon_vm_uptime_seconds",
        "gauge",
        "Seconds since the VM was started.",
    );
    sample(&mut out, "vmon_vm_uptime_seconds", &[], &float(c.uptime_s));
    family(
        &mut out,
        "vmon_vm_paused",
        "gauge",
        "Whether the VM is paused (1) or not (0).",
    );
    let paused = if state == VmState::Paused { "1" } else { "0" };
    sample(&mut out, "vmon_vm_paused", &[], paused);

    if !c.vcpus.is_empty() {
        family(
            &mut out,
            "vmon_vcpu_cpu_seconds_total",
            "counter",
            "CPU time consumed by each vCPU thread.",
        );
        for v in &c.vcpus {
            let index = v.index.to_string();
            sample(
                &mut out,
                "vmon_vcpu_cpu_seconds_total",
                &[("vcpu", &index)],
                &float(v.cpu_time_s),
            );
        }
    }
    if c.vcpus.iter().any(|v| !v.exits.is_empty()) {
        family(
            &mut out,
            "vmon_vcpu_exits_total",
            "counter",
            "VM exits handled by vmon, by vCPU and reason.",
        );
        for v in &c.vcpus {
            let index = v.index.to_string();
            for (reason, n) in &v.exits {
                sample(
                    &mut out,
                    "vmon_vcpu_exits_total",
                    &[("vcpu", &index), ("reason", reason)],
                    &n.to_string(),
                );
            }
        }
    }

    // Family name -> (device, kind) -> value. Raw names that sanitise to the same family
    // (`rx-bytes`, `rx_bytes`) are added up rather than emitted as duplicate series.
    let mut families: BTreeMap<String, BTreeMap<(&str, &str), u64>> = BTreeMap::new();
    for d in &c.devices {
        for (name, &n) in &d.counters {
            let family = format!("vmon_device_{}_total", metric_stem(name));
            let v = families
                .entry(family)
                .or_default()
                .entry((&d.name, &d.kind))
                .or_default();
            *v = v.saturating_add(n);
        }
    }
    for (name, samples) in &families {
        let stem = &name["vmon_device_".len()..name.len() - "_total".len()];
        family(
            &mut out,
            name,
            "counter",
            &format!("Device counter {stem}, by device."),
        );
        for ((device, kind), n) in samples {
            sample(
                &mut out,
                name,
                &[("device", device), ("kind", kind)],
                &n.to_string(),
            );
        }
    }

    if !c.api.is_empty() {
        family(
            &mut out,
            "vmon_api_requests_total",
            "counter",
            "Management API requests answered, by status class.",
        );
        for (class, n) in &c.api {
            sample(
                &mut out,
                "vmon_api_requests_total",
                &[("class", class)],
                &n.to_string(),
            );
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape(help, false));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v, true));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// Label values escape backslash, double quote and newline; HELP text only the first and
/// the last.
fn escape(s: &str, quote: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A counter name as the middle of a metric name: `[a-zA-Z0-9_]` only, without a `_total`
/// the family name adds anyway.
fn metric_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if let Some(stripped) = s.strip_suffix("_total") {
        s.truncate(stripped.len());
    }
    if s.is_empty() {
        s.push_str("unnamed");
    }
    s
}

/// Prometheus spells the special values its own way; Rust's `Display` never uses an
/// exponent, which the format accepts.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Counters {
        Counters {
            uptime_s: 12.5,
            vcpus: vec![
                VcpuCounters {
                    index: 0,
                    cpu_time_s: 1.25,
                    exits: [("io_out".to_string(), 10), ("hlt".to_string(), 3)].into(),
                },
                VcpuCounters {
                    index: 1,
                    cpu_time_s: 0.0,
                    exits: [("io_out".to_string(), 1)].into(),
                },
            ],
            devices: vec![
                DeviceCounters {
                    name: "disk0".into(),
                    kind: "block".into(),
                    counters: [
                        ("read_bytes".to_string(), 4096),
                        ("requests_total".to_string(), 2),
                    ]
                    .into(),
                },
                DeviceCounters {
                    name: "we\"ird\\dev\nice".into(),
                    kind: "net".into(),
                    counters: [
                        ("rx-bytes".to_string(), 5),
                        ("rx_bytes".to_string(), 6),
                        ("read_bytes".to_string(), 1),
                    ]
                    .into(),
                },
            ],
            api: [("2xx".to_string(), 3), ("4xx".to_string(), 1)].into(),
        }
    }

    #[test]
    fn prometheus_exact_output() {
        let expected = r#"# HELP vmon_vm_uptime_seconds Seconds since the VM was started.
# TYPE vmon_vm_uptime_seconds gauge
vmon_vm_uptime_seconds 12.5
# HELP vmon_vm_paused Whether the VM is paused (1) or not (0).
# TYPE vmon_vm_paused gauge
vmon_vm_paused 1
# HELP vmon_vcpu_cpu_seconds_total CPU time consumed by each vCPU thread.
# TYPE vmon_vcpu_cpu_seconds_total counter
vmon_vcpu_cpu_seconds_total{vcpu="0"} 1.25
vmon_vcpu_cpu_seconds_total{vcpu="1"} 0
# HELP vmon_vcpu_exits_total VM exits handled by vmon, by vCPU and reason.
# TYPE vmon_vcpu_exits_total counter
vmon_vcpu_exits_total{vcpu="0",reason="hlt"} 3
vmon_vcpu_exits_total{vcpu="0",reason="io_out"} 10
vmon_vcpu_exits_total{vcpu="1",reason="io_out"} 1
# HELP vmon_device_read_bytes_total Device counter read_bytes, by device.
# TYPE vmon_device_read_bytes_total counter
vmon_device_read_bytes_total{device="disk0",kind="block"} 4096
vmon_device_read_bytes_total{device="we\"ird\\dev\nice",kind="net"} 1
# HELP vmon_device_requests_total Device counter requests, by device.
# TYPE vmon_device_requests_total counter
vmon_device_requests_total{device="disk0",kind="block"} 2
# HELP vmon_device_rx_bytes_total Device counter rx_bytes, by device.
# TYPE vmon_device_rx_bytes_total counter
vmon_device_rx_bytes_total{device="we\"ird\\dev\nice",kind="net"} 11
# HELP vmon_api_requests_total Management API requests answered, by status class.
# TYPE vmon_api_requests_total counter
vmon_api_requests_total{class="2xx"} 3
vmon_api_requests_total{class="4xx"} 1
"#;
        assert_eq!(render_prometheus(&counters(), VmState::Paused), expected);
    }

    #[test]
    fn prometheus_minimal_and_special_values() {
        let c = Counters {
            uptime_s: f64::NAN,
            ..Counters::default()
        };
        assert_eq!(
            render_prometheus(&c, VmState::Running),
            "# HELP vmon_vm_uptime_seconds Seconds since the VM was started.\n\
             # TYPE vmon_vm_uptime_seconds gauge\n\
             vmon_vm_uptime_seconds NaN\n\
             # HELP vmon_vm_paused Whether the VM is paused (1) or not (0).\n\
             # TYPE vmon_vm_paused gauge\n\
             vmon_vm_paused 0\n"
        );
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(1e-7), "0.0000001");
    }

    #[test]
    fn metric_names_are_sanitised() {
        assert_eq!(metric_stem("rx-bytes"), "rx_bytes");
        assert_eq!(metric_stem("wr.ops total"), "wr_ops");
        assert_eq!(metric_stem("a_total_b"), "a_total_b");
        assert_eq!(metric_stem("ops_total"), "ops");
        assert_eq!(metric_stem("_total"), "unnamed");
        assert_eq!(metric_stem(""), "unnamed");
        assert_eq!(metric_stem("größe"), "gr__e");
        // Every family and sample line is well-formed, whatever the names.
        let c = Counters {
            devices: vec![DeviceCounters {
                name: "\n".into(),
                kind: "\"".into(),
                counters: [("{}\n# x".to_string(), 1)].into(),
            }],
            ..Counters::default()
        };
        let text = render_prometheus(&c, VmState::Running);
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                assert!(rest.starts_with("HELP vmon_") || rest.starts_with("TYPE vmon_"));
            } else {
                let name: String = line
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(name.starts_with("vmon_"), "{line}");
            }
        }
        assert!(text.contains("vmon_device______x_total{device=\"\\n\",kind=\"\\\"\"} 1\n"));
    }

    #[test]
    fn vm_state_spelling() {
        for (s, text) in [
            (VmState::Running, "running"),
            (VmState::Paused, "paused"),
            (VmState::ShuttingDown, "shutting-down"),
            (VmState::Stopped, "stopped"),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{text}\""));
            assert_eq!(s.as_str(), text);
            assert_eq!(s.to_string(), text);
            assert_eq!(
                serde_json::from_str::<VmState>(&format!("\"{text}\"")).unwrap(),
                s
            );
        }
    }

    fn shutdown(json: &str) -> Result<ShutdownRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn shutdown_request_validation() {
        assert_eq!(
            shutdown("{}").unwrap().timeout_s(),
            DEFAULT_SHUTDOWN_TIMEOUT_S
        );
        assert_eq!(shutdown(r#"{"timeout_s":null}"#).unwrap().timeout_s(), 30);
        assert_eq!(shutdown(r#"{"timeout_s":0}"#).unwrap().timeout_s(), 0);
        assert_eq!(shutdown(r#"{"timeout_s":3600}"#).unwrap().timeout_s(), 3600);
        for (json, fragment) in [
            (
                r#"{"timeout_s":3601}"#,
                "invalid value: integer `3601`, expected timeout_s",
            ),
            (
                r#"{"timeout_s":-1}"#,
                "invalid value: integer `-1`, expected timeout_s",
            ),
            (
                r#"{"timeout_s":"5"}"#,
                "invalid type: string \"5\", expected timeout_s",
            ),
            (
                r#"{"timeout_s":1.5}"#,
                "invalid type: floating point `1.5`, expected timeout_s",
            ),
            (
                r#"{"timeout":5}"#,
                "unknown field `timeout`, expected `timeout_s`",
            ),
            (
                r#"{"timeout_s":1,"timeout_s":2}"#,
                "duplicate field `timeout_s`",
            ),
            (
                r#"{"timeout_s":1"#,
                "EOF while parsing an object at line 1 column 14",
            ),
        ] {
            let e = shutdown(json).unwrap_err();
            assert!(e.contains(fragment), "{json}: {e}");
        }
        assert_eq!(
            serde_json::to_string(&ShutdownRequest { timeout_s: Some(5) }).unwrap(),
            r#"{"timeout_s":5}"#
        );
    }

    #[test]
    fn counters_json_round_trip() {
        let c = counters();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.starts_with(r#"{"uptime_s":12.5,"vcpus":[{"index":0,"cpu_time_s":1.25,"exits":{"hlt":3,"io_out":10}}"#), "{json}");
        assert_eq!(serde_json::from_str::<Counters>(&json).unwrap(), c);
    }
}
