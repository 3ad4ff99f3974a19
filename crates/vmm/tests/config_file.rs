//! Configuration files through the public API: loading JSON and TOML, the errors' wording,
//! relative paths, the flag overlay, validation and the conversion into a `VmConfig`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vmon_memory::{Backing, MemSize};
use vmon_virtio::rate_limiter::Limit;
use vmon_vmm::config::{
    parse_cpu_spec, parse_disk_spec, parse_net_spec, parse_vsock_spec, MacAddr,
};
use vmon_vmm::config_file::{
    CpuSpec, DiskSpec, NetSpec, SpecErrorKind, VmSpec, VsockSpec, DEFAULT_MEMORY,
};
use vmon_vmm::exit_codes;

/// A scratch directory, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmon-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const FULL_JSON: &str = r#"{
  "kernel": "/boot/vmlinuz",
  "initrd": "/boot/initrd.img",
  "cmdline": "console=ttyS0 root=/dev/vda",
  "cpus": 2,
  "memory": "1G",
  "huge_pages": false,
  "cpu": { "nested": true },
  "disks": [
    { "path": "/images/root.img", "serial": "root", "direct": true, "bps": "10M", "bps_burst": 20971520 },
    { "path": "/images/data.img", "readonly": true, "iops": 500, "iops_burst": "1K" }
  ],
  "nets": [ { "tap": "tap0", "mac": "02:00:00:00:00:01", "bps": "1G" } ],
  "vsock": { "cid": 3, "socket": "/run/vm.sock" },
  "rng": true,
  "command": ["uname", "-a"],
  "api_socket": "/run/vm.api",
  "log_level": "debug",
  "log_file": "/var/log/vm.log",
  "metrics_file": "/var/log/vm.metrics",
  "metrics_interval_s": 30
}"#;

const FULL_TOML: &str = r#"
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
cmdline = "console=ttyS0 root=/dev/vda"
cpus = 2
memory = 1024
huge_pages = false
command = ["uname", "-a"]
rng = true
api_socket = "/run/vm.api"
log_level = "debug"
log_file = "/var/log/vm.log"
metrics_file = "/var/log/vm.metrics"
metrics_interval_s = 30

[cpu]
nested = true

[[disks]]
path = "/images/root.img"
serial = "root"
direct = true
bps = "10M"
bps_burst = "20M"

[[disks]]
path = "/images/data.img"
readonly = true
iops = 500
iops_burst = 1024

[[nets]]
tap = "tap0"
mac = "02:00:00:00:00:01"
bps = 1073741824

[vsock]
cid = 3
socket = "/run/vm.sock"
"#;

fn full() -> VmSpec {
    VmSpec {
        kernel: Some("/boot/vmlinuz".into()),
        initrd: Some("/boot/initrd.img".into()),
        cmdline: Some("console=ttyS0 root=/dev/vda".into()),
        cpus: Some(2),
        memory: Some(MemSize::from_mib(1024)),
        huge_pages: Some(false),
        cpu: Some(CpuSpec { nested: true }),
        disks: Some(vec![
            DiskSpec {
                path: "/images/root.img".into(),
                serial: Some("root".into()),
                direct: true,
                bps: Some(10 << 20),
                bps_burst: Some(20 << 20),
                ..DiskSpec::default()
            },
            DiskSpec {
                path: "/images/data.img".into(),
                readonly: true,
                iops: Some(500),
                iops_burst: Some(1024),
                ..DiskSpec::default()
            },
        ]),
        nets: Some(vec![NetSpec {
            tap: "tap0".into(),
            mac: Some("02:00:00:00:00:01".into()),
            bps: Some(1 << 30),
            ..NetSpec::default()
        }]),
        vsock: Some(VsockSpec {
            cid: 3,
            socket: "/run/vm.sock".into(),
        }),
        rng: Some(true),
        command: Some(vec!["uname".into(), "-a".into()]),
        api_socket: Some("/run/vm.api".into()),
        log_level: Some("debug".into()),
        log_file: Some("/var/log/vm.log".into()),
        metrics_file: Some("/var/log/vm.metrics".into()),
        metrics_interval_s: Some(30),
        ..VmSpec::default()
    }
}

fn json_err(text: &str) -> String {
    VmSpec::from_json_str(text).unwrap_err().to_string()
}

fn invalid(spec: &VmSpec) -> String {
    spec.validate().unwrap_err().to_string()
}

#[test]
fn json_and_toml_describe_the_same_vm() {
    assert_eq!(VmSpec::from_json_str(FULL_JSON).unwrap(), full());
    assert_eq!(VmSpec::from_toml_str(FULL_TOML).unwrap(), full());
}

#[test]
fn everything_is_optional() {
    assert_eq!(VmSpec::from_json_str("{}").unwrap(), VmSpec::default());
    assert_eq!(VmSpec::from_toml_str("").unwrap(), VmSpec::default());
    // JSON's null is "not given", like leaving the key out.
    assert_eq!(
        VmSpec::from_json_str(r#"{"kernel": null, "disks": null}"#).unwrap(),
        VmSpec::default()
    );
    VmSpec::default().validate().unwrap();
}

#[test]
fn sizes_and_rates_take_numbers_or_strings() {
    let spec = VmSpec::from_json_str(r#"{"memory": 1536}"#).unwrap();
    assert_eq!(spec.memory, Some(MemSize::from_mib(1536)));
    let spec = VmSpec::from_json_str(r#"{"memory": "1.5G"}"#).unwrap();
    assert_eq!(spec.memory, Some(MemSize::from_mib(1536)));
    let a = VmSpec::from_json_str(r#"{"disks": [{"path": "a", "bps": "64K"}]}"#).unwrap();
    let b = VmSpec::from_json_str(r#"{"disks": [{"path": "a", "bps": 65536}]}"#).unwrap();
    assert_eq!(a, b);
    assert!(json_err(r#"{"memory": -5}"#).starts_with("memory: "));
    assert!(json_err(r#"{"disks": [{"path": "a", "bps": 1.5}]}"#)
        .starts_with("disks[0].bps: invalid type: floating point"));
    assert!(json_err(r#"{"disks": [{"path": "a", "iops": 0}]}"#)
        .starts_with("disks[0].iops: a rate must be above 0"));
    assert!(VmSpec::from_toml_str("[[nets]]\ntap = \"t\"\nbps = -1\n")
        .unwrap_err()
        .to_string()
        .starts_with("nets[0].bps: invalid value: integer `-1`"));
}

#[test]
fn parse_errors_name_the_field_and_the_position() {
    let text = "{\n  \"disks\": [\n    {\"path\": \"/a\"},\n    {\"path\": \"/b\", \"readonly\": \"yes\"}\n  ]\n}";
    let e = VmSpec::from_json_str(text).unwrap_err();
    assert_eq!(e.kind, SpecErrorKind::Parse);
    assert_eq!(e.field, "disks[1].readonly");
    assert_eq!(e.position.map(|p| p.0), Some(4));
    assert_eq!(
        e.to_string(),
        "disks[1].readonly: invalid type: string \"yes\", expected a boolean (line 4, column 36)"
    );
    let e = VmSpec::from_toml_str(
        "[[disks]]\npath = \"/a\"\n\n[[disks]]\npath = \"/b\"\nreadonly = \"yes\"\n",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "disks[1].readonly: invalid type: string \"yes\", expected a boolean (line 6, column 12)"
    );
    // Syntax errors name the document, or the last field the parser knew.
    assert_eq!(
        json_err("{\"cpus\": 1,}"),
        "trailing comma (line 1, column 12)"
    );
    assert!(json_err("{} {}").starts_with("trailing characters"));
    let e = VmSpec::from_toml_str("[disks\n").unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid table header; expected `.`, `]` (line 1, column 7)"
    );
    assert!(VmSpec::from_toml_str("cpus = 1\ncpus = 2\n")
        .unwrap_err()
        .to_string()
        .contains("duplicate key"));
    assert!(json_err(r#"{"vsock": {"cid": 3}}"#).starts_with("vsock: missing field `socket`"));
    assert!(json_err(r#"{"cpus": "two"}"#).starts_with("cpus: invalid type: string"));
}

#[test]
fn unknown_fields_are_rejected() {
    assert!(
        json_err(r#"{"disks": [{"pth": "x"}]}"#).starts_with("disks[0].pth: unknown field `pth`")
    );
    assert!(json_err(r#"{"cpu": {"nested": true, "turbo": 1}}"#)
        .starts_with("cpu.turbo: unknown field"));
    assert!(json_err(r#"{"nets": [{"tap": "t", "model": "e1000"}]}"#)
        .starts_with("nets[0].model: unknown field"));
    assert!(
        json_err(r#"{"vsock": {"cid": 3, "socket": "s", "port": 1}}"#)
            .starts_with("vsock.port: unknown field")
    );
    // Not even the spec's bookkeeping field is a key.
    assert!(json_err(r#"{"origin": "x"}"#).starts_with("origin: unknown field"));
    let e = VmSpec::from_toml_str("memroy = \"1G\"\n").unwrap_err();
    assert!(
        e.to_string().starts_with("memroy: unknown field `memroy`"),
        "{e}"
    );
    assert_eq!(e.position, Some((1, 1)));
}

#[test]
fn load_picks_the_format_and_prefixes_errors_with_the_file() {
    let dir = Scratch::new();
    for (name, text) in [
        ("vm.json", FULL_JSON),
        ("vm.toml", FULL_TOML),
        ("vm.conf", FULL_JSON),
        ("vm", FULL_TOML),
        ("vm.JSON", FULL_JSON),
    ] {
        let path = dir.file(name, text);
        assert_eq!(VmSpec::load(&path).unwrap(), full(), "{name}");
    }
    // A .toml file is TOML even if it looks like JSON.
    let path = dir.file("odd.toml", "{}");
    assert!(VmSpec::load(&path).is_err());

    let path = dir.file(
        "bad.json",
        r#"{"disks": [{"path": "/a"}, {"path": "/b", "readonly": "yes"}]}"#,
    );
    let e = VmSpec::load(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: disks[1].readonly: invalid type: string \"yes\", expected a boolean (line 1, column 59)",
            path.display()
        )
    );
    assert_eq!(e.exit_code(), exit_codes::USAGE);
}

#[test]
fn unreadable_files_say_why() {
    let dir = Scratch::new();
    let missing = dir.0.join("nope.json");
    let e = VmSpec::load(&missing).unwrap_err();
    assert_eq!(e.kind, SpecErrorKind::Read);
    assert_eq!(
        e.to_string(),
        format!("{}: no such file", missing.display())
    );
    assert_eq!(e.exit_code(), exit_codes::NO_INPUT);
    let e = VmSpec::load(&dir.0).unwrap_err().to_string();
    assert!(
        e.ends_with(": is a directory, not a configuration file"),
        "{e}"
    );
    let binary = dir.0.join("binary.json");
    std::fs::write(&binary, [0xff, 0xfe, b'{']).unwrap();
    assert!(VmSpec::load(&binary)
        .unwrap_err()
        .to_string()
        .contains("not UTF-8"));
    let big = dir.file("big.toml", &"#".repeat((1 << 20) + 1));
    assert!(VmSpec::load(&big)
        .unwrap_err()
        .to_string()
        .contains("larger than 1 MiB"));
}

#[test]
fn relative_paths_are_relative_to_the_file() {
    let dir = Scratch::new();
    let path = dir.file(
        "vms/a/vm.toml",
        r#"
kernel = "vmlinux"
initrd = "../initrd.img"
api_socket = "api.sock"
log_file = "logs/vm.log"
metrics_file = "/abs/metrics"
cmdline = "root=relative"
command = ["cat", "relative"]
[[disks]]
path = "disk.img"
[[disks]]
path = "/dev/null"
[vsock]
cid = 3
socket = "v.sock"
"#,
    );
    let base = dir.0.join("vms/a");
    let spec = VmSpec::load(&path).unwrap();
    assert_eq!(spec.kernel, Some(base.join("vmlinux")));
    assert_eq!(spec.initrd, Some(base.join("../initrd.img")));
    assert_eq!(spec.api_socket, Some(base.join("api.sock")));
    assert_eq!(spec.log_file, Some(base.join("logs/vm.log")));
    assert_eq!(spec.metrics_file, Some(PathBuf::from("/abs/metrics")));
    let disks = spec.disks.as_ref().unwrap();
    assert_eq!(disks[0].path, base.join("disk.img"));
    assert_eq!(disks[1].path, PathBuf::from("/dev/null"));
    assert_eq!(spec.vsock.as_ref().unwrap().socket, base.join("v.sock"));
    // Not paths on this host.
    assert_eq!(spec.cmdline.as_deref(), Some("root=relative"));
    assert_eq!(
        spec.command,
        Some(vec!["cat".to_string(), "relative".to_string()])
    );
}

#[test]
fn flags_override_the_file_and_lists_are_replaced_whole() {
    let file = full();
    let flags = VmSpec {
        cpus: Some(4),
        disks: Some(vec![parse_disk_spec("path=/other.img").unwrap()]),
        command: Some(vec![]),
        ..VmSpec::default()
    };
    let spec = file.clone().overlay(flags);
    assert_eq!(spec.cpus, Some(4));
    assert_eq!(spec.disks.as_ref().unwrap().len(), 1);
    assert_eq!(
        spec.disks.as_ref().unwrap()[0].path,
        PathBuf::from("/other.img")
    );
    assert_eq!(spec.command, Some(vec![]));
    // What the flags leave out stays as the file says.
    assert_eq!(spec.memory, file.memory);
    assert_eq!(spec.nets, file.nets);
    assert_eq!(spec.kernel, file.kernel);
    assert_eq!(file.clone().overlay(VmSpec::default()), file);
    assert_eq!(VmSpec::default().overlay(file.clone()), file);
}

#[test]
fn errors_name_the_file_only_for_what_came_from_it() {
    let dir = Scratch::new();
    let path = dir.file(
        "vm.json",
        r#"{"cpus": 0, "disks": [{"path": "missing.img"}]}"#,
    );
    let loaded = VmSpec::load(&path).unwrap();
    assert_eq!(
        invalid(&loaded),
        format!("{}: cpus: must be at least 1", path.display())
    );
    // Overridden by a flag: no file to blame.
    let flags = VmSpec {
        cpus: Some(300),
        ..VmSpec::default()
    };
    assert_eq!(
        invalid(&loaded.clone().overlay(flags)),
        "cpus: 300 is more than 255"
    );
    let flags = VmSpec {
        cpus: Some(2),
        ..VmSpec::default()
    };
    assert_eq!(
        invalid(&loaded.clone().overlay(flags)),
        format!("{}: disks[0].path: no such file", path.display())
    );
    let flags = VmSpec {
        cpus: Some(2),
        disks: Some(vec![parse_disk_spec(&format!(
            "{}/gone.img",
            dir.0.display()
        ))
        .unwrap()]),
        ..VmSpec::default()
    };
    assert_eq!(
        invalid(&loaded.overlay(flags)),
        "disks[0].path: no such file"
    );
}

#[test]
fn validation_rules() {
    let dir = Scratch::new();
    let img = dir.file("a.img", "");
    let img2 = dir.file("b.img", "");
    let with = |json: &str| VmSpec::from_json_str(json).unwrap();
    let disk = |path: &Path| format!(r#"{{"path": "{}"}}"#, path.display());

    assert_eq!(invalid(&with(r#"{"cpus": 0}"#)), "cpus: must be at least 1");
    assert_eq!(
        invalid(&with(r#"{"cpus": 256}"#)),
        "cpus: 256 is more than 255"
    );
    with(r#"{"cpus": 255}"#).validate().unwrap();
    assert_eq!(
        invalid(&with(r#"{"memory": 0}"#)),
        "memory: must be above 0"
    );
    assert_eq!(
        invalid(&with(r#"{"memory": "16M"}"#)),
        "memory: 16 MiB is too small: a guest needs at least 32 MiB"
    );

    let e = with(r#"{"kernel": "/nonexistent/vmlinux"}"#)
        .validate()
        .unwrap_err();
    assert_eq!(e.to_string(), "kernel: no such file");
    assert_eq!(e.kind, SpecErrorKind::Missing);
    assert_eq!(e.exit_code(), exit_codes::NO_INPUT);
    let kernel_dir = format!(r#"{{"kernel": "{}"}}"#, dir.0.display());
    assert_eq!(
        invalid(&with(&kernel_dir)),
        "kernel: is a directory, not a file"
    );
    assert_eq!(
        invalid(&with(r#"{"initrd": "/nonexistent"}"#)),
        "initrd: no such file"
    );
    let ok = format!(
        r#"{{"kernel": "{}", "initrd": "{}"}}"#,
        img.display(),
        img2.display()
    );
    with(&ok).validate().unwrap();

    let two = format!(
        r#"{{"disks": [{}, {{"path": "/nonexistent.img"}}]}}"#,
        disk(&img)
    );
    assert_eq!(invalid(&with(&two)), "disks[1].path: no such file");
    let dir_disk = format!(r#"{{"disks": [{}]}}"#, disk(&dir.0));
    assert_eq!(
        invalid(&with(&dir_disk)),
        "disks[0].path: is a directory, not a disk image"
    );
    // The same image twice, even spelt differently, would be written by two devices.
    let dotted = dir.0.join(".").join("a.img");
    let dup = format!(
        r#"{{"disks": [{}, {}, {}]}}"#,
        disk(&img),
        disk(&img2),
        disk(&dotted)
    );
    assert_eq!(
        invalid(&with(&dup)),
        "disks[2].path: the same file as disks[0]"
    );
    let fine = format!(r#"{{"disks": [{}, {}]}}"#, disk(&img), disk(&img2));
    with(&fine).validate().unwrap();
    let serial = format!(
        r#"{{"disks": [{{"path": "{}", "serial": "123456789012345678901"}}]}}"#,
        img.display()
    );
    assert!(
        invalid(&with(&serial)).starts_with("disks[0].serial: '123456789012345678901' is 21 bytes")
    );
    let burst = format!(
        r#"{{"disks": [{{"path": "{}", "bps_burst": "1M"}}]}}"#,
        img.display()
    );
    assert_eq!(invalid(&with(&burst)), "disks[0].bps_burst: needs bps");
    assert_eq!(
        invalid(&with(r#"{"nets": [{"tap": "t", "iops_burst": 3}]}"#)),
        "nets[0].iops_burst: needs iops"
    );

    assert_eq!(
        invalid(&with(
            r#"{"nets": [{"tap": "t", "mac": "02:00:00:00:01"}]}"#
        )),
        "nets[0].mac: '02:00:00:00:01': use six hex bytes like 02:00:00:00:00:01"
    );
    assert!(invalid(&with(
        r#"{"nets": [{"tap": "t", "mac": "01:00:5e:00:00:01"}]}"#
    ))
    .contains("multicast"));
    assert_eq!(
        invalid(&with(r#"{"nets": [{"tap": "0123456789abcdef"}]}"#)),
        "nets[0].tap: '0123456789abcdef' is 16 bytes; an interface name is at most 15"
    );
    assert!(invalid(&with(r#"{"nets": [{"tap": "a/b"}]}"#))
        .starts_with("nets[0].tap: 'a/b' is not a valid interface name"));
    assert!(
        invalid(&with(r#"{"nets": [{"tap": ""}]}"#)).starts_with("nets[0].tap: '' is not a valid")
    );
    assert_eq!(
        invalid(&with(
            r#"{"nets": [{"tap": "t0"}, {"tap": "t1"}, {"tap": "t0"}]}"#
        )),
        "nets[2].tap: 't0' is already nets[0]'s tap"
    );

    assert_eq!(
        invalid(&with(r#"{"vsock": {"cid": 2, "socket": "/tmp/v"}}"#)),
        "vsock.cid: 2 is reserved: a guest CID is between 3 and 4294967294"
    );
    assert!(invalid(&with(
        r#"{"vsock": {"cid": 4294967295, "socket": "/tmp/v"}}"#
    ))
    .starts_with("vsock.cid:"));
    assert_eq!(
        invalid(&with(r#"{"vsock": {"cid": 3, "socket": ""}}"#)),
        "vsock.socket: empty"
    );
    assert_eq!(
        invalid(&with(
            r#"{"vsock": {"cid": 3, "socket": "/nonexistent/dir/v.sock"}}"#
        )),
        "vsock.socket: directory /nonexistent/dir does not exist"
    );

    assert_eq!(
        invalid(&with(r#"{"log_level": "verbose"}"#)),
        "log_level: 'verbose' is not one of error, warn, info, debug, trace"
    );
    with(r#"{"log_level": "WARN"}"#).validate().unwrap();
    assert_eq!(
        invalid(&with(r#"{"log_file": "/nonexistent/vm.log"}"#)),
        "log_file: directory /nonexistent does not exist"
    );
    let log_dir = format!(r#"{{"metrics_file": "{}"}}"#, dir.0.display());
    assert_eq!(invalid(&with(&log_dir)), "metrics_file: is a directory");
    assert_eq!(
        invalid(&with(r#"{"metrics_interval_s": 0}"#)),
        "metrics_interval_s: must be at least 1"
    );
    assert_eq!(
        invalid(&with(r#"{"metrics_interval_s": 86401}"#)),
        "metrics_interval_s: 86401 is more than 86400 (a day)"
    );
    with(r#"{"metrics_interval_s": 86400}"#).validate().unwrap();
    let long = format!(r#"{{"api_socket": "/tmp/{}"}}"#, "s".repeat(120));
    assert!(invalid(&with(&long)).starts_with("api_socket: 125 bytes is longer"));
    assert_eq!(
        invalid(&with(r#"{"cmdline": "a\u0000b"}"#)),
        "cmdline: contains a NUL byte"
    );
}

#[test]
fn a_spec_becomes_a_vm_config() {
    let dir = Scratch::new();
    let spec = full();
    let config = spec.to_vm_config().unwrap();
    assert_eq!(config.kernel, PathBuf::from("/boot/vmlinuz"));
    assert_eq!(config.initrd, Some(PathBuf::from("/boot/initrd.img")));
    assert_eq!(config.cmdline, "console=ttyS0 root=/dev/vda");
    assert_eq!(
        (config.cpus, config.memory, config.nested),
        (2, MemSize::from_mib(1024), true)
    );
    assert_eq!(config.memory_backing, Backing::SmallPages);
    assert!(config.rng);
    assert_eq!(config.disks.len(), 2);
    assert_eq!(
        config.disks[0].limits.bytes,
        Some(Limit {
            rate: 10 << 20,
            burst: 20 << 20
        })
    );
    assert_eq!(config.disks[0].serial.as_deref(), Some("root"));
    assert!(config.disks[0].direct && !config.disks[0].readonly);
    assert_eq!(
        config.disks[1].limits.ops,
        Some(Limit {
            rate: 500,
            burst: 1024
        })
    );
    assert!(config.disks[1].readonly);
    assert_eq!(config.nets[0].mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
    assert_eq!(
        config.nets[0].limits.bytes,
        Some(Limit::per_second(1 << 30))
    );
    assert_eq!(config.vsock.as_ref().unwrap().cid, 3);
    assert_eq!(config.api_socket, Some(PathBuf::from("/run/vm.api")));
    assert_eq!(config.metrics_interval, Duration::from_secs(30));
    assert_eq!(config.spec["cpus"], 2);

    // The defaults for what a spec leaves out.
    let bare = VmSpec {
        kernel: Some(dir.0.join("k")),
        ..VmSpec::default()
    };
    let config = bare.to_vm_config().unwrap();
    assert_eq!((config.cpus, config.memory), (1, DEFAULT_MEMORY));
    assert_eq!(config.memory_backing, Backing::TransparentHuge);
    assert!(config.disks.is_empty() && config.nets.is_empty() && config.vsock.is_none());
    assert!(!config.rng && !config.nested && config.console_input);
    assert_eq!(config.metrics_interval, Duration::from_secs(10));
    assert_eq!(config.cmdline, "");

    assert_eq!(
        VmSpec::default().to_vm_config().unwrap_err().to_string(),
        "kernel: not given"
    );
    let bad = VmSpec {
        nets: Some(vec![NetSpec {
            tap: "t".into(),
            mac: Some("zz".into()),
            ..NetSpec::default()
        }]),
        ..bare
    };
    assert!(bad
        .to_vm_config()
        .unwrap_err()
        .to_string()
        .starts_with("nets[0].mac: 'zz'"));
}

#[test]
fn flags_and_files_make_the_same_specs() {
    let file = VmSpec::from_json_str(
        r#"{"disks": [{"path": "/a.img", "readonly": true, "serial": "s1", "direct": true,
                       "bps": "10M", "bps_burst": "20M", "iops": 100, "iops_burst": 10}],
            "nets": [{"tap": "tap0", "mac": "02:00:00:00:00:0a", "bps": "1M", "iops": 5}],
            "vsock": {"cid": 42, "socket": "/tmp/v.sock"},
            "cpu": {"nested": true}}"#,
    )
    .unwrap();
    let disk = parse_disk_spec(
        "path=/a.img,readonly=on,serial=s1,direct=on,bps=10M,bps_burst=20M,iops=100,iops_burst=10",
    )
    .unwrap();
    assert_eq!(file.disks.unwrap(), vec![disk]);
    let net = parse_net_spec("tap=tap0,mac=02:00:00:00:00:0a,bps=1M,iops=5").unwrap();
    assert_eq!(file.nets.unwrap(), vec![net]);
    assert_eq!(
        file.vsock.unwrap(),
        parse_vsock_spec("cid=42,socket=/tmp/v.sock").unwrap()
    );
    assert_eq!(file.cpu.unwrap(), parse_cpu_spec("nested=on").unwrap());
    assert_eq!(
        parse_disk_spec("/b.img").unwrap().path,
        PathBuf::from("/b.img")
    );
    assert_eq!(parse_net_spec("tap1").unwrap().tap, "tap1");
    assert!(!parse_cpu_spec("nested=off").unwrap().nested);
    assert!(parse_cpu_spec("nested=maybe")
        .unwrap_err()
        .contains("on or off"));
    assert!(parse_cpu_spec("turbo=on")
        .unwrap_err()
        .contains("unknown CPU option"));
    // The flag's checks are the file's.
    assert_eq!(
        parse_disk_spec("path=a,bps_burst=1M").unwrap_err(),
        "bps_burst: needs bps"
    );
    assert_eq!(
        parse_net_spec("tap=t,mac=zz").unwrap_err(),
        "mac: 'zz': use six hex bytes like 02:00:00:00:00:01"
    );
}

#[test]
fn round_trip_through_a_file() {
    let dir = Scratch::new();
    let spec = full();
    let json = serde_json::to_string_pretty(&spec).unwrap();
    let path = dir.file("written.json", &json);
    assert_eq!(VmSpec::load(&path).unwrap(), spec);
    // Sizes go out as strings the parser reads back; rates as numbers.
    assert!(json.contains(r#""memory": "1G""#), "{json}");
    assert!(json.contains(r#""bps": 10485760"#), "{json}");
    // Defaults are left out, so a written spec says only what was set.
    assert_eq!(serde_json::to_string(&VmSpec::default()).unwrap(), "{}");

    // A loaded spec's paths are resolved, so writing it elsewhere keeps its meaning.
    let rel = dir.file(
        "sub/vm.toml",
        "kernel = \"k\"\n[[disks]]\npath = \"d.img\"\n",
    );
    let loaded = VmSpec::load(&rel).unwrap();
    let moved = dir.file(
        "elsewhere/vm.json",
        &serde_json::to_string(&loaded).unwrap(),
    );
    assert_eq!(VmSpec::load(&moved).unwrap(), loaded);
}

/// The examples in docs/config.md are the same VM in both formats, and valid schema.
#[test]
fn the_documented_examples_parse_and_agree() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md"))
            .unwrap();
    let block = |lang: &str| {
        let start = doc.find(&format!("```{lang}\n")).unwrap() + lang.len() + 4;
        let len = doc[start..].find("```").unwrap();
        doc[start..start + len].to_string()
    };
    let json = VmSpec::from_json_str(&block("json")).unwrap();
    let toml = VmSpec::from_toml_str(&block("toml")).unwrap();
    assert_eq!(json, toml);
    assert_eq!(json.disks.as_ref().map(Vec::len), Some(2));
}
