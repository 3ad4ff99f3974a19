//! Tiny-guest start-up benchmark on this machine's /dev/kvm: time from process start to the
//! guest's first serial byte, and the VMM's resident memory once the guest is up and idle,
//! for vmon and for QEMU microvm booting the same PVH image.
//!
//! Run: `cargo bench -p vmon --bench tiny_boot [-- RUNS]`. Prints medians and vmon/QEMU
//! ratios; results are recorded in docs/benchmarks.md. Not a test: nothing asserts a time.

mod common;

use std::process::Command;
use std::time::Duration;

use vmon_tinyguest as tg;

fn main() {
    let runs = common::runs_from_args(20);
    let dir = std::env::temp_dir().join(format!("vmon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("tiny-pvh.elf");
    std::fs::write(
        &image,
        tg::elf64_pvh(&tg::pvh_print_then_halt(b"up\n"), tg::DEFAULT_LOAD_ADDR),
    )
    .unwrap();
    let image = image.to_str().unwrap().to_string();

    let vmon = || {
        let mut c = Command::new(common::vmon_bin());
        c.args([
            "run",
            "--kernel",
            &image,
            "--memory",
            "128M",
            "--cmdline",
            "",
        ]);
        c
    };
    let qemu = || {
        let mut c = common::qemu_microvm("128M", "1");
        c.args(["-kernel", &image]);
        c
    };
    println!("tiny guest (PVH ELF, prints then halts), {runs} runs each, medians:");
    common::compare(
        runs,
        b"up\n",
        Duration::from_millis(300),
        &[("vmon", &vmon), ("qemu microvm", &qemu)],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
