//! Linux tier, virtio-blk and virtio-rng: the stock Debian guest reads, writes and boots
//! from disks vmon serves from host files, and the host checks the files afterwards.
//! Runs in the lab on PVM hosts (see linux_guest.rs and scripts/test.sh).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{linux_tier, pattern, run_guest, Output, Scratch};

fn guest(args: &[&str]) -> Output {
    run_guest(args, BOOT_TIMEOUT)
}

/// Below the lab's 180 s per-test cap (scripts/test.sh), so a hung guest is reported with its output.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// A guest with one disk (`--disk` value `disk`) that runs `script` under `sh -c`.
fn sh_with_disk(disk: &str, script: &str) -> Output {
    guest(&["run", "--disk", disk, "--", "sh", "-c", script])
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

#[test]
fn guest_reads_a_random_disk_exactly() {
    if !linux_tier("guest_reads_a_random_disk_exactly") {
        return;
    }
    let scratch = Scratch::in_memory("blk-read");
    let img = scratch.file("random.img", &pattern(64 * MIB, 0x5eed));
    let want = sha256(&img);
    let disk = disk_arg(&img, ",serial=vmon-test-01");
    let out = sh_with_disk(
        &disk,
        "sha256sum /dev/vda; cat /sys/block/vda/size /sys/block/vda/ro /sys/block/vda/serial; echo",
    );
    assert_eq!(out.code(), 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], format!("{want}  /dev/vda"));
    assert_eq!(lines[1], (64 * MIB / 512).to_string(), "sectors");
    assert_eq!(lines[2], "0", "read-write disk");
    assert_eq!(lines[3], "vmon-test-01", "serial from GET_ID");
}

/// A disk opened with O_DIRECT (`direct=on`) is served through io_uring: many requests in
/// flight, finished in whatever order the host completes them. The guest reads all of it
/// (its readahead keeps several requests queued) and with four direct readers at once, then
/// copies its first 4 MiB to 16 MiB with direct I/O and syncs; the host checks the file.
#[test]
fn a_direct_disk_served_through_io_uring_reads_and_writes_exactly() {
    if !linux_tier("a_direct_disk_served_through_io_uring_reads_and_writes_exactly") {
        return;
    }
    // Not in memory: the lab kernel's tmpfs refuses O_DIRECT; its /tmp (9p) takes it.
    let scratch = Scratch::new("blk-direct");
    let data = pattern(32 * MIB, 0xd1ec);
    let img = scratch.file("direct.img", &data);
    let disk = disk_arg(&img, ",direct=on");
    let out = sh_with_disk(
        &disk,
        "sha256sum /dev/vda; \
         for i in 0 1 2 3; do \
           dd if=/dev/vda of=/dev/null bs=4k count=2048 skip=$((i * 2048)) iflag=direct 2>/dev/null & \
         done; wait; \
         dd if=/dev/vda of=/dev/vda bs=1M count=4 seek=16 iflag=direct oflag=direct conv=notrunc \
           2>/dev/null && sync && echo copied",
    );
    assert_eq!(out.code(), 0);
    assert!(
        !out.stderr.contains("io_uring unavailable"),
        "the disk fell back to synchronous I/O"
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("{}  /dev/vda", sha256(&scratch.file("want", &data)))
    );
    assert_eq!(lines.last(), Some(&"copied"));
    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len(), data.len(), "the image keeps its size");
    assert!(
        file[..16 * MIB] == data[..16 * MIB],
        "before the copy: untouched"
    );
    assert!(
        file[16 * MIB..20 * MIB] == data[..4 * MIB],
        "the copy landed"
    );
    assert!(
        file[20 * MIB..] == data[20 * MIB..],
        "after the copy: untouched"
    );
}

#[test]
fn what_the_guest_syncs_is_in_the_file_when_vmon_exits() {
    if !linux_tier("what_the_guest_syncs_is_in_the_file_when_vmon_exits") {
        return;
    }
    let scratch = Scratch::in_memory("blk-write");
    let img = scratch.file("zero.img", &vec![0u8; 32 * MIB]);
    let data = pattern(8 * MIB, 0xdada);
    let src = scratch.file("src.img", &data);
    // The guest copies a read-only second disk into the first at 4 MiB, through its page
    // cache, and syncs (a FLUSH); the init then ends the VM at once via the exit port.
    // Both devices poll between requests (`poll_us`), with Linux's EVENT_IDX driver
    // skipping its notifies meanwhile: a notify lost there would hang this copy.
    let dst_disk = disk_arg(&img, ",poll_us=50");
    let src_disk = disk_arg(&src, ",readonly=on,poll_us=50");
    let out = guest(&[
        "run",
        "--disk",
        &dst_disk,
        "--disk",
        &src_disk,
        "--",
        "sh",
        "-c",
        "dd if=/dev/vdb of=/dev/vda bs=1M seek=4 conv=notrunc 2>/dev/null && sync && echo synced",
    ]);
    assert_eq!(out.code(), 0);
    assert_eq!(out.stdout.trim(), "synced");
    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len(), 32 * MIB, "the image keeps its size");
    assert!(
        file[..4 * MIB].iter().all(|&b| b == 0),
        "before the write: untouched"
    );
    assert!(
        file[4 * MIB..12 * MIB] == data[..],
        "the written range holds the data"
    );
    assert!(
        file[12 * MIB..].iter().all(|&b| b == 0),
        "after the write: untouched"
    );
}

#[test]
fn a_read_only_disk_refuses_writes_and_stays_identical() {
    if !linux_tier("a_read_only_disk_refuses_writes_and_stays_identical") {
        return;
    }
    let scratch = Scratch::in_memory("blk-ro");
    let img = scratch.file("ro.img", &pattern(4 * MIB, 0x0e0e));
    let before = sha256(&img);
    let disk = disk_arg(&img, ",readonly=on");
    // The kernel sees the RO feature and refuses writes itself; blockdev --setrw cannot
    // lift that, so the write below reaches vmon only if the device misreports itself.
    let out = sh_with_disk(
        &disk,
        "cat /sys/block/vda/ro;          blockdev --setrw /dev/vda 2>/dev/null;          if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null;          then echo write-accepted; else echo write-refused; fi;          sync; sha256sum /dev/vda",
    );
    assert_eq!(out.code(), 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "1");
    assert_eq!(lines[1], "write-refused");
    assert_eq!(lines[2], format!("{before}  /dev/vda"));
    assert_eq!(sha256(&img), before, "the file is byte-identical");
}

#[test]
fn discard_punches_holes_in_the_image() {
    if !linux_tier("discard_punches_holes_in_the_image") {
        return;
    }
    let scratch = Scratch::in_memory("blk-discard");
    let img = scratch.file("full.img", &pattern(16 * MIB, 0xd15c));
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    assert!(allocated(&img) >= 16 * MIB as u64);
    let disk = disk_arg(&img, "");
    let out = sh_with_disk(
        &disk,
        "cat /sys/block/vda/queue/discard_max_bytes;          blkdiscard -o 4194304 -l 8388608 /dev/vda && echo discarded;          dd if=/dev/vda bs=1M skip=4 count=8 2>/dev/null | tr -d '\\000' | wc -c",
    );
    assert_eq!(out.code(), 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_ne!(lines[0], "0", "the guest sees discard support");
    assert_eq!(lines[1], "discarded");
    assert_eq!(lines[2].trim(), "0", "discarded range reads back as zeroes");
    let file = std::fs::read(&img).unwrap();
    assert_eq!(file.len(), 16 * MIB);
    assert!(file[4 * MIB..12 * MIB].iter().all(|&b| b == 0));
    assert_eq!(file[..4 * MIB], pattern(16 * MIB, 0xd15c)[..4 * MIB]);
    assert!(
        allocated(&img) <= 8 * MIB as u64 + 64 * 1024,
        "8 MiB of holes: {} bytes still allocated",
        allocated(&img)
    );
}

/// The kit's initramfs, unpacked, with a marker: the guest's root filesystem on a disk.
fn ext4_root(scratch: &Scratch) -> std::path::PathBuf {
    let kit = std::env::var("VMON_KIT").unwrap_or_else(|_| {
        let out = Command::new(common::VMON).arg("kit").output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    });
    let tree = scratch.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let unpack = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "zcat '{kit}/initramfs.cpio.gz' | (cd '{}' && cpio -idm --quiet)",
            tree.display()
        ))
        .status()
        .unwrap();
    assert!(unpack.success(), "unpacking the kit initramfs");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/vmon-root-marker"), "root-from-disk\n").unwrap();
    // The kit's /sbin/init is busybox's link to /bin/busybox (absolute): replace the link,
    // never write through it.
    let sbin_init = tree.join("sbin/init");
    std::fs::create_dir_all(tree.join("sbin")).unwrap();
    let _ = std::fs::remove_file(&sbin_init);
    std::fs::copy(tree.join("init"), &sbin_init).unwrap();
    let img = scratch.path().join("root.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "vmonroot", "-d"])
        .arg(&tree)
        .arg(&img)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(mkfs.success());
    img
}

#[test]
fn boots_with_its_root_filesystem_on_an_ext4_disk() {
    if !linux_tier("boots_with_its_root_filesystem_on_an_ext4_disk") {
        return;
    }
    let scratch = Scratch::in_memory("blk-root");
    let img = ext4_root(&scratch);
    let disk = disk_arg(&img, "");
    let out = guest(&[
        "run",
        "--disk",
        &disk,
        "--cmdline",
        "console=ttyS1 reboot=k,panic_warm panic=-1 i8042.noaux quiet root=/dev/vda rw",
        "--",
        "sh",
        "-c",
        "cat /etc/vmon-root-marker; awk '$2 == \"/\" {print $1, $3}' /proc/mounts | tail -n 1; \
         echo written-from-guest >/etc/from-guest; sync",
    ]);
    assert_eq!(out.code(), 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "root-from-disk");
    assert_eq!(lines[1], "/dev/vda ext4");
    // The file the guest wrote is in the image: read it back with debugfs.
    let cat = Command::new("debugfs")
        .args(["-R", "cat /etc/from-guest"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "written-from-guest\n");
}

#[test]
fn hwrng_gives_bytes() {
    if !linux_tier("hwrng_gives_bytes") {
        return;
    }
    let out = guest(&[
        "run",
        "--rng",
        "--",
        "sh",
        "-c",
        "cat /sys/class/misc/hw_random/rng_current; \
         head -c 65536 /dev/hwrng | wc -c; \
         head -c 4096 /dev/hwrng | gzip -c | wc -c",
    ]);
    assert_eq!(out.code(), 0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "virtio_rng.0");
    assert_eq!(lines[1].trim(), "65536");
    let compressed: usize = lines[2].trim().parse().unwrap();
    assert!(
        compressed > 4000,
        "random bytes do not compress: {compressed}"
    );
}

#[test]
fn a_rate_limited_disk_is_held_to_its_limit() {
    if !linux_tier("a_rate_limited_disk_is_held_to_its_limit") {
        return;
    }
    let scratch = Scratch::in_memory("blk-limit");
    let img = scratch.file("limited.img", &pattern(8 * MIB, 0x1e1e));
    // 2 MiB/s with a 2 MiB burst: reading 6 MiB cannot take less than 2 s, however fast
    // the host is. (Only the lower bound is a property of the limiter.)
    let disk = disk_arg(&img, ",bps=2M");
    let out = sh_with_disk(
        &disk,
        "read a _ </proc/uptime; \
         dd if=/dev/vda of=/dev/null bs=64k count=96 iflag=direct 2>/dev/null; \
         read b _ </proc/uptime; \
         echo $a $b",
    );
    assert_eq!(out.code(), 0);
    let t: Vec<f64> = out
        .stdout
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let seconds = t[1] - t[0];
    eprintln!("6 MiB at bps=2M took {seconds:.2} s in the guest");
    assert!(
        seconds >= 1.8,
        "6 MiB at 2 MiB/s (2 MiB burst) took {seconds} s"
    );
}
