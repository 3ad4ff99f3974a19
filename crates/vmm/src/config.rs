//! What a VM is made of, independent of how the user said it (flags now, files later).

use std::path::PathBuf;

use vmon_memory::MemSize;
pub use vmon_virtio::block::DiskOptions;

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
        }
    }
}

/// Parses `path=FILE[,readonly=on][,serial=ID][,direct=on]`; a bare `FILE` is allowed.
pub fn parse_disk(spec: &str) -> Result<DiskOptions, String> {
    let mut disk = DiskOptions {
        path: PathBuf::new(),
        readonly: false,
        serial: None,
        direct: false,
    };
    for (i, item) in spec.split(',').enumerate() {
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
                     serial=ID, direct=on|off)"
                ))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("a disk needs path=FILE".into());
    }
    Ok(disk)
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
    }
}
