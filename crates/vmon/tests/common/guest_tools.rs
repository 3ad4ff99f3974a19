//! The guest helper `vmon-guest` (crates/guest-tools) inside the default guest: built once,
//! statically, and appended to the kit's initramfs as `/bin/vmon-guest`.
//!
//! The tool is built with its own target directory (`<target>/guest-tools`), so the
//! static build never trades places with an ordinary `cargo build --release`. In the lab
//! the tree is read-only: build it on the host first (scripts/test.sh does), or point
//! `VMON_GUEST_TOOL` at a static binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The directory of the default guest kit: `$VMON_KIT`, or what `vmon kit` prints.
pub fn kit_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VMON_KIT") {
        return PathBuf::from(dir);
    }
    let out = Command::new(super::VMON)
        .arg("kit")
        .stderr(Stdio::inherit())
        .output()
        .expect("run vmon kit");
    assert!(out.status.success(), "vmon kit failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Cargo's target directory for this test binary (`<target>/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary inside a target directory")
        .to_path_buf()
}

/// The static `vmon-guest` binary, built on first use outside the lab.
pub fn guest_tool() -> PathBuf {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        if let Ok(p) = std::env::var("VMON_GUEST_TOOL") {
            return PathBuf::from(p);
        }
        let dir = target_dir().join("guest-tools");
        let bin = dir.join("release/vmon-guest");
        if std::env::var("VMON_IN_LAB").as_deref() == Ok("1") {
            assert!(
                bin.is_file(),
                "{} is missing and the lab cannot build it; build it on the host first:\n  \
                 cargo rustc -p vmon-guest-tools --release --bin vmon-guest --target-dir {} \
                 -- -C target-feature=+crt-static",
                bin.display(),
                dir.display()
            );
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let status = Command::new(cargo)
            .current_dir(&workspace)
            .args(["rustc", "-q", "-p", "vmon-guest-tools", "--release"])
            .args(["--bin", "vmon-guest", "--target-dir"])
            .arg(&dir)
            .args(["--", "-C", "target-feature=+crt-static"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "building vmon-guest failed");
        bin
    })
    .clone()
}

/// An initrd: the kit's initramfs with `/bin/vmon-guest` added (a second, uncompressed
/// newc archive after the gzip'd one; the kernel unpacks both). Kept in /tmp under a
/// name derived from its inputs, so reruns reuse it.
pub fn initrd_with_guest_tools() -> PathBuf {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD
        .get_or_init(|| {
            let base = std::fs::read(kit_dir().join("initramfs.cpio.gz")).expect("kit initramfs");
            let tool_path = guest_tool();
            let tool = std::fs::read(&tool_path).expect("read vmon-guest");
            let stage =
                std::env::temp_dir().join(format!("vmon-guest-stage-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&stage);
            std::fs::create_dir_all(stage.join("bin")).unwrap();
            let staged = stage.join("bin/vmon-guest");
            std::fs::write(&staged, &tool).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
            // The archive records the time: the tool's own keeps the image identical on reruns.
            let mtime = std::fs::metadata(&tool_path)
                .and_then(|m| m.modified())
                .unwrap();
            std::fs::File::options()
                .write(true)
                .open(&staged)
                .and_then(|f| f.set_modified(mtime))
                .unwrap();
            let mut cpio = Command::new("cpio")
                .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
                .current_dir(&stage)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("run cpio (Debian package cpio)");
            cpio.stdin
                .take()
                .unwrap()
                .write_all(b"bin/vmon-guest\n")
                .unwrap();
            let out = cpio.wait_with_output().unwrap();
            let _ = std::fs::remove_dir_all(&stage);
            assert!(out.status.success(), "cpio failed");

            let mut image = base;
            // An uncompressed archive must start 4-byte aligned; zeros in between are skipped.
            image.resize(image.len().next_multiple_of(4), 0);
            image.extend_from_slice(&out.stdout);
            let path =
                std::env::temp_dir().join(format!("vmon-guest-initrd-{:016x}.img", fnv(&image)));
            if !path.is_file() {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                std::fs::write(&tmp, &image).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            path
        })
        .clone()
}

/// `--kernel` and `--initrd` arguments for the default guest with `vmon-guest` in it.
pub fn guest_args() -> Vec<String> {
    let kit = kit_dir();
    let vmlinux = kit.join("vmlinux");
    let kernel = if vmlinux.is_file() {
        vmlinux
    } else {
        kit.join("vmlinuz")
    };
    vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd_with_guest_tools().display().to_string(),
    ]
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
