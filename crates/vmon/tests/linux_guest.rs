//! The Linux tier: boot the stock Debian kernel with the default guest kit and check, from
//! inside the guest, what it sees. Needs hardware virtualisation (VT-x/AMD-V): on a PVM host
//! a stock kernel cannot boot, so `scripts/test.sh` runs these inside the lab VM
//! (`scripts/lab.sh`), where it sets VMON_LINUX_TIER=1 and they cannot skip.

mod common;

use std::time::Duration;

use common::{field, linux_tier, run_guest, run_vmon};

fn guest(args: &[&str]) -> common::Output {
    run_guest(args, BOOT_TIMEOUT)
}

/// A stock-kernel boot in the lab (nested AMD-V under TCG) takes 8-25 s; leave headroom.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

const REPORT: &str = "echo cpus=$(nproc); \
     echo memtotal_kib=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo); \
     echo virt_flags=$(grep -cwE 'vmx|svm' /proc/cpuinfo); \
     echo year=$(date -u +%Y); \
     echo model=$(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo | head -n 1); \
     echo e820_ram=$(dmesg | grep -c 'BIOS-e820: .*usable')";

/// The host CPU's model name, as Linux prints it (the guest should print the same), with
/// runs of spaces collapsed as the guest's unquoted `echo` does.
fn host_model() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let line = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .expect("a model name in the host's /proc/cpuinfo");
    let name = line.split_once(':').unwrap().1;
    name.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn host_year() -> String {
    String::from_utf8(
        std::process::Command::new("date")
            .args(["-u", "+%Y"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string()
}

#[test]
fn one_vcpu_256m() {
    if !linux_tier("one_vcpu_256m") {
        return;
    }
    let out = guest(&[
        "run", "--cpus", "1", "--memory", "256M", "--", "sh", "-c", REPORT,
    ]);
    assert_eq!(out.code(), 0);
    assert_eq!(field(&out.stdout, "cpus"), "1");
    let kib: u64 = field(&out.stdout, "memtotal_kib").parse().unwrap();
    // MemTotal is RAM minus what the kernel reserves for itself (its image, page tables).
    assert!(
        (180 * 1024..256 * 1024).contains(&kib),
        "MemTotal {kib} KiB for 256 MiB"
    );
    assert_eq!(
        field(&out.stdout, "virt_flags"),
        "0",
        "VMX/SVM must be hidden by default"
    );
    assert_eq!(field(&out.stdout, "year"), host_year());
    assert_eq!(field(&out.stdout, "model"), host_model());
    assert_eq!(field(&out.stdout, "e820_ram"), "2");
}

#[test]
fn four_vcpus_4608m_split_around_the_hole_and_exit_status_7() {
    if !linux_tier("four_vcpus_4608m") {
        return;
    }
    let script = format!("{REPORT}; exit 7");
    let out = guest(&[
        "run", "--cpus", "4", "--memory", "4608M", "--", "sh", "-c", &script,
    ]);
    assert_eq!(out.code(), 7);
    assert_eq!(field(&out.stdout, "cpus"), "4");
    let kib: u64 = field(&out.stdout, "memtotal_kib").parse().unwrap();
    assert!(
        (4200 * 1024..4608 * 1024).contains(&kib),
        "MemTotal {kib} KiB for 4608 MiB"
    );
    // Low RAM, and RAM above 4 GiB: the guest sees both sides of the MMIO hole.
    assert_eq!(field(&out.stdout, "e820_ram"), "3");
    assert_eq!(field(&out.stdout, "virt_flags"), "0");
}

#[test]
fn command_stdout_is_exactly_vmons_stdout() {
    if !linux_tier("command_stdout_is_exactly_vmons_stdout") {
        return;
    }
    let out = guest(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; seq 1 2000 | tail -n 1",
    ]);
    assert_eq!(out.code(), 0);
    assert_eq!(out.stdout, "out\n2000\n");
    assert!(
        out.stderr.contains("err\n"),
        "guest stderr goes to vmon's stderr"
    );
}

/// The default guest kit's directory: $VMON_KIT, or what `vmon kit` builds.
fn kit_dir() -> String {
    std::env::var("VMON_KIT").unwrap_or_else(|_| {
        let out = run_vmon(&["kit"], BOOT_TIMEOUT);
        assert_eq!(out.code(), 0, "vmon kit: {}", out.stderr);
        out.stdout.trim().to_string()
    })
}

#[test]
fn bzimage_boots_through_the_64bit_protocol() {
    if !linux_tier("bzimage_boots_through_the_64bit_protocol") {
        return;
    }
    // The default guest boots the kit's uncompressed vmlinux (PVH entry); this boots the
    // compressed bzImage it came from, through the Linux 64-bit boot protocol.
    let kit = kit_dir();
    let kernel = format!("{kit}/vmlinuz");
    let initrd = format!("{kit}/initramfs.cpio.gz");
    let out = guest(&[
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cpus",
        "2",
        "--",
        "sh",
        "-c",
        "echo cpus=$(nproc); echo boot=$(dmesg | grep -c 'Booting paravirtualized kernel')",
    ]);
    assert_eq!(out.code(), 0);
    assert_eq!(field(&out.stdout, "cpus"), "2");
}

#[test]
fn default_guest_boots_the_uncompressed_kernel_via_pvh() {
    if !linux_tier("default_guest_boots_the_uncompressed_kernel_via_pvh") {
        return;
    }
    if !std::path::Path::new(&format!("{}/vmlinux", kit_dir())).is_file() {
        eprintln!("SKIPPED: this kit has no uncompressed vmlinux");
        return;
    }
    // Loaded from the ELF file, the kernel sits at its link address (16 MiB); a bzImage
    // would have decompressed itself to a randomised (KASLR) address.
    let out = guest(&["run", "--", "sh", "-c", "grep 'Kernel code' /proc/iomem"]);
    assert_eq!(out.code(), 0);
    assert!(
        out.stdout.trim_start().starts_with("01000000-"),
        "{}",
        out.stdout
    );
}

#[test]
fn guest_reboot_ends_vmon() {
    if !linux_tier("guest_reboot_ends_vmon") {
        return;
    }
    let out = guest(&["run", "--", "reboot", "-f"]);
    assert_eq!(out.code(), 0);
}

#[test]
fn guest_power_off_ends_vmon() {
    if !linux_tier("guest_power_off_ends_vmon") {
        return;
    }
    // Through ACPI: Linux writes S5 to the FADT's sleep control register.
    let out = guest(&["run", "--", "poweroff", "-f"]);
    assert_eq!(out.code(), 0);
    assert_eq!(out.stdout, "");
}

#[test]
fn guest_panic_is_a_crash() {
    if !linux_tier("guest_panic_is_a_crash") {
        return;
    }
    let out = guest(&["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(out.code(), 76);
    assert!(
        out.stderr.contains("vmon: guest crashed: kernel panic"),
        "{}",
        out.stderr
    );
}

#[test]
fn nested_on_exposes_virtualisation() {
    if !linux_tier("nested_on_exposes_virtualisation") {
        return;
    }
    let out = guest(&[
        "run",
        "--cpu",
        "nested=on",
        "--",
        "grep",
        "-cwE",
        "vmx|svm",
        "/proc/cpuinfo",
    ]);
    assert_eq!(
        out.code(),
        0,
        "the host CPU offers VMX/SVM to vmon, so the guest must see it"
    );
    assert_ne!(out.stdout.trim(), "0");
}
