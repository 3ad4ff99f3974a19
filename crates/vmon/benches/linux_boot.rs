//! Stock-kernel boot benchmark: time from process start to the guest's first userspace line,
//! and the VMM's resident memory, for vmon and QEMU microvm (`-enable-kvm -cpu host`) booting
//! the same Debian kernel and initramfs (the default guest kit) with the same command line.
//! Needs hardware virtualisation: on PVM hosts run it inside the lab (scripts/bench-boot.sh).
//!
//! Run: `VMON_KIT=$(vmon kit) cargo bench -p vmon --bench linux_boot [-- RUNS]`. `VMON_BIN`
//! measures another vmon binary.

mod common;

use std::process::Command;
use std::time::Duration;

const MARKER: &[u8] = b"userspace-up\n";

fn main() {
    let runs = common::runs_from_args(5);
    let Ok(kit) = std::env::var("VMON_KIT") else {
        eprintln!("linux_boot: set VMON_KIT to the default guest kit's directory (vmon kit)");
        std::process::exit(2);
    };
    let initrd = format!("{kit}/initramfs.cpio.gz");
    // The same command line for both: vmon's default for
    // `vmon run -- sh -c 'echo userspace-up; sleep 60'`: the first line of userspace is the
    // marker, and the guest stays up while its VMM's memory is read.
    let cmdline = format!(
        "console=ttyS1 reboot=k,panic_warm panic=-1 i8042.noaux quiet vmon.cmd={} vmon.tty=0",
        "ZWNobyB1c2Vyc3BhY2UtdXA7IHNsZWVwIDYw" // base64 of "echo userspace-up; sleep 60"
    );
    // Both kernel files of the kit, each booted by both VMMs: the uncompressed vmlinux (PVH
    // entry, vmon's default) and the bzImage it came from.
    for file in ["vmlinux", "vmlinuz"] {
        let kernel = format!("{kit}/{file}");
        if !std::path::Path::new(&kernel).is_file() {
            continue;
        }
        let vmon = || {
            let mut c = Command::new(common::vmon_bin());
            c.args([
                "run",
                "--kernel",
                &kernel,
                "--initrd",
                &initrd,
                "--cmdline",
                &cmdline,
                "--cpus",
                "2",
                "--memory",
                "1G",
            ]);
            c
        };
        let qemu = || {
            let mut c = common::qemu_microvm("1G", "2");
            // A second UART at COM2, as vmon has: the kit's init sends stderr and the kernel
            // log there in command mode.
            c.args(["-chardev", "null,id=com2"])
                .args(["-device", "isa-serial,chardev=com2,iobase=0x2f8,irq=3"])
                .args(["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);
            c
        };
        println!("stock Debian kernel ({file}) + kit initramfs, 2 vCPUs, 1 GiB, {runs} runs each, medians:");
        common::compare(
            runs,
            MARKER,
            Duration::from_millis(500),
            &[("vmon", &vmon), ("qemu microvm", &qemu)],
        );
    }
}
