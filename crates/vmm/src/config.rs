//! What a VM is made of, independent of how the user said it (flags now, files later).

use std::path::PathBuf;

use vmon_memory::MemSize;
pub use vmon_virtio::block::DiskOptions;
pub use vmon_virtio::net::{MacAddr, NetOptions};
use vmon_virtio::rate_limiter::{parse_rate, Limit, Limits};
pub use vmon_virtio::vsock::VsockOptions;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory: MemSize,
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
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory: MemSize::from_mib(256),
            nested: false,
            console_input: true,
            disks: Vec::new(),
            rng: false,
            nets: Vec::new(),
            vsock: None,
        }
    }
}

/// The rate-limit keys devices share: `bps=RATE[,bps_burst=BYTES][,iops=N][,iops_burst=N]`.
pub const LIMIT_KEYS: &str = "bps=RATE, bps_burst=BYTES, iops=N, iops_burst=N";

/// Collects rate-limit options while a device spec is parsed.
#[derive(Default)]
pub struct LimitSpec {
    bps: Option<u64>,
    bps_burst: Option<u64>,
    iops: Option<u64>,
    iops_burst: Option<u64>,
}

impl LimitSpec {
    /// Takes `key=value` if it is a rate-limit option; returns false for other keys.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let slot = match key {
            "bps" => &mut self.bps,
            "bps_burst" => &mut self.bps_burst,
            "iops" => &mut self.iops,
            "iops_burst" => &mut self.iops_burst,
            _ => return Ok(false),
        };
        *slot = Some(parse_rate(value).map_err(|e| format!("{key}: {e}"))?);
        Ok(true)
    }

    pub fn finish(self) -> Result<Limits, String> {
        let bucket = |rate: Option<u64>, burst: Option<u64>, name: &str| match (rate, burst) {
            (Some(rate), burst) => Ok(Some(Limit {
                rate,
                burst: burst.unwrap_or(rate),
            })),
            (None, Some(_)) => Err(format!("{name}_burst needs {name}")),
            (None, None) => Ok(None),
        };
        Ok(Limits {
            bytes: bucket(self.bps, self.bps_burst, "bps")?,
            ops: bucket(self.iops, self.iops_burst, "iops")?,
        })
    }
}

/// Parses `path=FILE[,readonly=on][,serial=ID][,direct=on]` plus [`LIMIT_KEYS`]; a bare
/// `FILE` is allowed.
pub fn parse_disk(spec: &str) -> Result<DiskOptions, String> {
    let mut disk = DiskOptions {
        path: PathBuf::new(),
        readonly: false,
        serial: None,
        direct: false,
        limits: Limits::default(),
    };
    let mut limits = LimitSpec::default();
    for (i, item) in spec.split(',').enumerate() {
        if let Some((k, v)) = item.split_once('=') {
            if limits.take(k, v)? {
                continue;
            }
        }
        match item.split_once('=') {
            Some(("path", p)) if !p.is_empty() => disk.path = PathBuf::from(p),
            Some(("readonly", v)) => disk.readonly = on_off("readonly", v)?,
            Some(("direct", v)) => disk.direct = on_off("direct", v)?,
            Some(("serial", s)) => {
                if s.len() > 20 {
                    return Err(format!("serial={s}: at most 20 bytes"));
                }
                disk.serial = Some(s.to_string());
            }
            None if i == 0 && !item.is_empty() => disk.path = PathBuf::from(item),
            _ => {
                return Err(format!(
                    "unknown disk option '{item}' (known: path=FILE, readonly=on|off, \
                     serial=ID, direct=on|off, {LIMIT_KEYS})"
                ))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("a disk needs path=FILE".into());
    }
    disk.limits = limits.finish()?;
    Ok(disk)
}

/// Parses `cid=N,socket=PATH`: the guest's CID (3 to 2^32 - 2) and the host's Unix socket.
pub fn parse_vsock(spec: &str) -> Result<VsockOptions, String> {
    let (mut cid, mut socket) = (None, None);
    for item in spec.split(',') {
        match item.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("cid={v}: not a number"))?,
                )
            }
            Some(("socket", p)) => socket = Some(std::path::PathBuf::from(p)),
            _ => {
                return Err(format!(
                    "unknown vsock option '{item}' (known: cid=N, socket=PATH)"
                ))
            }
        }
    }
    let (Some(cid), Some(socket)) = (cid, socket) else {
        return Err("a vsock device needs cid=N and socket=PATH".into());
    };
    let opts = VsockOptions { cid, socket };
    opts.validate().map_err(|e| e.to_string())?;
    Ok(opts)
}

/// Parses `tap=NAME[,mac=MAC]` plus [`LIMIT_KEYS`] (each direction limited separately); a
/// bare `NAME` is allowed. Without a MAC the device gets a
/// random locally administered one.
pub fn parse_net(spec: &str) -> Result<NetOptions, String> {
    let mut net = NetOptions {
        tap: String::new(),
        mac: None,
        limits: Limits::default(),
    };
    let mut limits = LimitSpec::default();
    for (i, item) in spec.split(',').enumerate() {
        if let Some((k, v)) = item.split_once('=') {
            if limits.take(k, v)? {
                continue;
            }
        }
        match item.split_once('=') {
            Some(("tap", name)) => net.tap = name.to_string(),
            Some(("mac", mac)) => net.mac = Some(mac.parse::<MacAddr>()?),
            None if i == 0 && !item.is_empty() => net.tap = item.to_string(),
            _ => {
                return Err(format!(
                    "unknown network option '{item}' (known: tap=NAME, mac=MAC, {LIMIT_KEYS})"
                ))
            }
        }
    }
    if net.tap.is_empty() {
        return Err("a network device needs tap=NAME".into());
    }
    vmon_virtio::tap::check_name(&net.tap).map_err(|e| format!("tap={}: {e}", net.tap))?;
    net.limits = limits.finish()?;
    Ok(net)
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        v => Err(format!("{key}={v}: use on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
