//! The default guest: a stock Debian kernel and a busybox initramfs, built on first use by
//! `scripts/guest-kit.sh` (embedded here so an installed `vmon` needs no source tree) into
//! the cache directory, and reused afterwards.

use std::path::PathBuf;
use std::process::{Command, Stdio};

const SCRIPT: &str = include_str!("../../../scripts/guest-kit.sh");

pub struct Kit {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Kit {
    fn at(dir: PathBuf) -> Result<Kit, String> {
        // The uncompressed vmlinux (booted through its PVH entry) when the kit has one: it
        // spares the guest decompressing itself, a third of a stock boot in the lab. The
        // bzImage it came from is the fallback.
        let vmlinux = dir.join("vmlinux");
        let kit = Kit {
            kernel: if vmlinux.is_file() {
                vmlinux
            } else {
                dir.join("vmlinuz")
            },
            initrd: dir.join("initramfs.cpio.gz"),
            dir,
        };
        if kit.kernel.is_file() && kit.initrd.is_file() {
            Ok(kit)
        } else {
            Err(format!(
                "the default guest kit in '{}' is incomplete; rebuild it with 'vmon kit --rebuild'",
                kit.dir.display()
            ))
        }
    }
}

/// Returns the default guest kit, building it first if needed. `$VMON_KIT` names a kit
/// directory to use instead.
pub fn ensure(rebuild: bool) -> Result<Kit, String> {
    if let Some(dir) = std::env::var_os("VMON_KIT") {
        return Kit::at(PathBuf::from(dir));
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-s").arg("--");
    if rebuild {
        cmd.arg("--force");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot build the default guest kit: cannot run bash: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin was piped");
        stdin
            .write_all(SCRIPT.as_bytes())
            .map_err(|e| format!("cannot build the default guest kit: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("cannot build the default guest kit: {e}"))?;
    if !output.status.success() {
        return Err("cannot build the default guest kit (see the messages above); pass --kernel and --initrd to boot your own".into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .last()
        .filter(|l| !l.is_empty())
        .ok_or("the guest kit script printed no directory")?;
    Kit::at(PathBuf::from(dir))
}
