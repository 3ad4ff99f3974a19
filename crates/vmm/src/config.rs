//! What a VM is made of, independent of how the user said it. The flags' `key=value,...`
//! syntax is parsed here into the same specs a configuration file holds
//! ([`crate::config_file`]), so both obey one set of rules.

use std::path::PathBuf;

pub use crate::config_file::{CpuSpec, DiskSpec, NetSpec, VsockSpec};
use vmon_memory::{Backing, MemSize};
pub use vmon_virtio::block::{Aio, DiskOptions};
pub use vmon_virtio::net::{MacAddr, NetOptions};
use vmon_virtio::rate_limiter::parse_rate;
pub use vmon_virtio::vsock::VsockOptions;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory: MemSize,
    /// Huge pages or 4 KiB pages for guest RAM.
    pub memory_backing: Backing,
    /// Expose VMX/SVM to the guest.
    pub nested: bool,
    /// Forward the host's stdin to COM1 (off for tests and detached VMs).
    pub console_input: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskOptions>,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
    /// virtio-net devices, each on a host tap, in the order the guest sees them (eth0, ...).
    pub nets: Vec<NetOptions>,
    /// A virtio-vsock device with its Unix-socket host side.
    pub vsock: Option<VsockOptions>,
    /// Serve the management API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// Append the counters as JSON lines to this file every `metrics_interval`.
    pub metrics_file: Option<PathBuf>,
    pub metrics_interval: std::time::Duration,
    /// The configuration as the user gave it, shown by the API's VM info.
    pub spec: serde_json::Value,
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemSize::from_mib(256),
            memory_backing: Backing::default(),
            nested: false,
            console_input: true,
            disks: Vec::new(),
            rng: false,
            nets: Vec::new(),
            vsock: None,
            api_socket: None,
            metrics_file: None,
            metrics_interval: std::time::Duration::from_secs(10),
            spec: serde_json::Value::Null,
        }
    }
}

/// The rate-limit keys devices share: `bps=RATE[,bps_burst=BYTES][,iops=N][,iops_burst=N]`.
pub const LIMIT_KEYS: &str = "bps=RATE, bps_burst=BYTES, iops=N, iops_burst=N";

/// Splits `key=value,...` and hands each pair to `take`, which says whether it knew the key.
/// A first item without `=` is the value of `bare_key` (`--disk FILE`, `--net TAP`).
fn for_each_option(
    text: &str,
    bare_key: Option<&str>,
    device: &str,
    known: &str,
    mut take: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<(), String> {
    for (i, item) in text.split(',').enumerate() {
        let (key, value) = match (item.split_once('='), bare_key) {
            (Some(pair), _) => pair,
            (None, Some(bare)) if i == 0 && !item.is_empty() => (bare, item),
            // No key matches "": reported as unknown below.
            (None, _) => ("", item),
        };
        if !take(key, value)? {
            return Err(format!("unknown {device} option '{item}' (known: {known})"));
        }
    }
    Ok(())
}

/// Stores a rate-limit key's value in its slot, if `key` is one.
fn take_rate(slot: Option<&mut Option<u64>>, key: &str, value: &str) -> Result<bool, String> {
    let Some(slot) = slot else {
        return Ok(false);
    };
    *slot = Some(parse_rate(value).map_err(|e| format!("{key}: {e}"))?);
    Ok(true)
}

/// Parses `path=FILE[,readonly=on][,serial=ID][,direct=on][,poll_us=N][,aio=io_uring|sync]` plus
/// [`LIMIT_KEYS`] into the spec a configuration file's `disks` entry gives; a bare `FILE`
/// is allowed. Checks the same rules as the file, except the file system's.
pub fn parse_disk_spec(text: &str) -> Result<DiskSpec, String> {
    let mut disk = DiskSpec::default();
    let known =
        format!("path=FILE, readonly=on|off, serial=ID, direct=on|off, poll_us=N, aio=io_uring|sync, {LIMIT_KEYS}");
    for_each_option(text, Some("path"), "disk", &known, |key, value| {
        match key {
            "path" => disk.path = PathBuf::from(value),
            "readonly" => disk.readonly = on_off(key, value)?,
            "direct" => disk.direct = on_off(key, value)?,
            "poll_us" => {
                disk.poll_us = Some(
                    value
                        .parse()
                        .map_err(|_| format!("poll_us={value}: not a number of microseconds"))?,
                )
            }
            "serial" => disk.serial = Some(value.to_string()),
            "aio" => disk.aio = Some(value.to_string()),
            _ => return take_rate(disk.rate_mut(key), key, value),
        }
        Ok(true)
    })?;
    if disk.path.as_os_str().is_empty() {
        return Err("a disk needs path=FILE".into());
    }
    disk.check().map_err(|e| e.to_string())?;
    Ok(disk)
}

/// [`parse_disk_spec`], then the device's options.
pub fn parse_disk(text: &str) -> Result<DiskOptions, String> {
    parse_disk_spec(text)?
        .to_options()
        .map_err(|e| e.to_string())
}

/// Parses `cid=N,socket=PATH`: the guest's CID (3 to 2^32 - 2) and the host's Unix socket.
pub fn parse_vsock_spec(text: &str) -> Result<VsockSpec, String> {
    let (mut cid, mut socket) = (None, None);
    for_each_option(text, None, "vsock", "cid=N, socket=PATH", |key, value| {
        match key {
            "cid" => {
                cid = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| format!("cid={value}: not a number"))?,
                )
            }
            "socket" => socket = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let (Some(cid), Some(socket)) = (cid, socket) else {
        return Err("a vsock device needs cid=N and socket=PATH".into());
    };
    let vsock = VsockSpec { cid, socket };
    vsock.check().map_err(|e| e.to_string())?;
    Ok(vsock)
}

/// [`parse_vsock_spec`], then the device's options.
pub fn parse_vsock(text: &str) -> Result<VsockOptions, String> {
    parse_vsock_spec(text)?
        .to_options()
        .map_err(|e| e.to_string())
}

/// Parses `tap=NAME[,mac=MAC]` plus [`LIMIT_KEYS`] (each direction limited separately); a
/// bare `NAME` is allowed. Without a MAC the device gets a random locally administered one.
pub fn parse_net_spec(text: &str) -> Result<NetSpec, String> {
    let mut net = NetSpec::default();
    let known = format!("tap=NAME, mac=MAC, {LIMIT_KEYS}");
    for_each_option(text, Some("tap"), "network", &known, |key, value| {
        match key {
            "tap" => net.tap = value.to_string(),
            "mac" => net.mac = Some(value.to_string()),
            _ => return take_rate(net.rate_mut(key), key, value),
        }
        Ok(true)
    })?;
    if net.tap.is_empty() {
        return Err("a network device needs tap=NAME".into());
    }
    net.check().map_err(|e| e.to_string())?;
    Ok(net)
}

/// [`parse_net_spec`], then the device's options.
pub fn parse_net(text: &str) -> Result<NetOptions, String> {
    parse_net_spec(text)?
        .to_options()
        .map_err(|e| e.to_string())
}

/// Parses `--cpu` options: `nested=on|off`.
pub fn parse_cpu_spec(text: &str) -> Result<CpuSpec, String> {
    let mut cpu = CpuSpec::default();
    for_each_option(text, None, "CPU", "nested=on|off", |key, value| {
        match (key, value) {
            // `--cpu nested=on,` is fine.
            ("", "") => {}
            ("nested", v) => cpu.nested = on_off(key, v)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(cpu)
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    parse_on_off(value).map_err(|e| format!("{key}={value}: {e}"))
}

/// `on` or `off`, as flags and device options spell a boolean (a flag's value parser).
pub fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("use on or off".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmon_virtio::rate_limiter::Limit;

    #[test]
    fn net_specs() {
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:0A").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 0x0a])));
        let n = parse_net("vmtap1").unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("vmtap1", None));
        assert!(parse_net("mac=02:00:00:00:00:01")
            .unwrap_err()
            .contains("tap=NAME"));
        assert!(parse_net("").is_err());
        assert!(parse_net("tap=").is_err());
        assert!(parse_net("tap=a/b")
            .unwrap_err()
            .contains("not a valid interface name"));
        assert!(parse_net("tap=0123456789abcdef").is_err());
        assert!(parse_net("tap=t,mac=01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_net("tap=t,mac=02:00:00:00:01")
            .unwrap_err()
            .contains("six hex"));
        assert!(parse_net("tap=t,model=e1000")
            .unwrap_err()
            .contains("unknown"));
    }

    #[test]
    fn disk_specs() {
        let d = parse_disk("path=/tmp/a.img,readonly=on,serial=abc,direct=on").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.readonly && d.direct);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        let d = parse_disk("/tmp/b.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/b.img"));
        assert!(!d.readonly && !d.direct && d.serial.is_none());
        assert!(parse_disk("readonly=on").unwrap_err().contains("path=FILE"));
        assert!(parse_disk("path=").is_err());
        assert!(parse_disk("path=a,readonly=yes")
            .unwrap_err()
            .contains("on or off"));
        assert!(parse_disk("path=a,cache=none")
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_disk("path=a,serial=123456789012345678901").is_err());
        assert!(parse_disk("").is_err());
        let d = parse_disk("path=a,bps=10M,iops=500,iops_burst=50").unwrap();
        assert_eq!(d.limits.bytes, Some(Limit::per_second(10 << 20)));
        assert_eq!(
            d.limits.ops,
            Some(Limit {
                rate: 500,
                burst: 50
            })
        );
        assert!(parse_disk("path=a,bps_burst=1M")
            .unwrap_err()
            .contains("needs bps"));
        assert!(parse_disk("path=a,iops=0").is_err());
        assert!(parse_disk("path=a,bps=lots").is_err());
        // The device's spin before sleeping: 32 µs unless told, 0 never.
        use std::time::Duration;
        assert_eq!(
            parse_disk("path=a").unwrap().poll,
            Duration::from_micros(32)
        );
        assert_eq!(parse_disk("path=a,poll_us=0").unwrap().poll, Duration::ZERO);
        assert_eq!(
            parse_disk("path=a,poll_us=1000").unwrap().poll,
            Duration::from_millis(1)
        );
        assert!(parse_disk("path=a,poll_us=1001")
            .unwrap_err()
            .contains("more than 1000"));
        assert!(parse_disk("path=a,poll_us=-1")
            .unwrap_err()
            .contains("not a number"));
    }

    #[test]
    fn vsock_specs() {
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        let v = parse_vsock("socket=/tmp/v.sock,cid=4294967294").unwrap();
        assert_eq!(v.cid, 4_294_967_294);
        assert!(parse_vsock("cid=2,socket=/tmp/v")
            .unwrap_err()
            .contains("3"));
        assert!(parse_vsock("cid=4294967295,socket=/tmp/v").is_err());
        assert!(parse_vsock("cid=x,socket=/tmp/v")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_vsock("cid=3").unwrap_err().contains("socket=PATH"));
        assert!(parse_vsock("socket=/tmp/v").is_err());
        assert!(parse_vsock("cid=3,socket=").is_err());
        assert!(parse_vsock(&format!("cid=3,socket=/{}", "a".repeat(200)))
            .unwrap_err()
            .contains("longer"));
        assert!(parse_vsock("cid=3,socket=/tmp/v,port=1")
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_vsock("").is_err());
    }
}
