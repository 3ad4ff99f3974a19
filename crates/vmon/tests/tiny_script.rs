//! The script-runner tiny guest (`vmon_tinyguest::script`): a byte-code interpreter that
//! drives PCI config space, RAM and MMIO from a script built in the test. These tests check
//! the runner itself against vmon's devices; device tests build on it.

mod common;

use std::time::Duration;

use common::{kvm_available, run_vmon, Output, Scratch};
use vmon_tinyguest::script::{
    parse_values, value_line, Script, SCRIPT_BAD_ADDR_STATUS, SCRIPT_BAD_OP_STATUS,
    SCRIPT_FREE_RAM, SCRIPT_TIMEOUT_STATUS,
};

const T: Duration = Duration::from_secs(60);

macro_rules! require_kvm {
    () => {
        if !kvm_available(module_path!()) {
            return;
        }
    };
}

/// Runs `script` in a 64 MiB guest.
fn run_script(name: &str, script: &Script) -> Output {
    run_image(name, &vmon_tinyguest::script_elf(script))
}

fn run_image(name: &str, image: &[u8]) -> Output {
    let dir = Scratch::new(name);
    let kernel = dir.file("guest", image);
    run_vmon(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        T,
    )
}

/// The expected output: `Ok(value)` as a value line, `Err(text)` verbatim.
fn expect(lines: &[std::result::Result<u64, &str>]) -> String {
    lines
        .iter()
        .map(|l| match l {
            Ok(v) => value_line(*v),
            Err(text) => text.to_string(),
        })
        .collect()
}

#[test]
fn script_drives_pci_config_ram_and_mmio() {
    require_kvm!();
    const RAM: u64 = SCRIPT_FREE_RAM; // 0x200000
    const MMIO: u64 = 0xD000_0000; // in the hole, claimed by nothing
    let mut s = Script::new();
    s.print("pci\n")
        .pci_read32(0, 0, 0, 0) // host bridge vendor/device
        .pci_read16(0, 0, 0, 2) // device ID alone, through port 0xCFE
        .pci_read8(0, 0, 0, 0x0B) // base class, through port 0xCFF
        .pci_read32(0, 0x1F, 0, 0) // absent function
        .base_from_bar0(0, 0, 0) // the host bridge has no BARs
        .print("ram\n")
        .write(8, RAM, 0)
        .write(1, RAM, 0xA5)
        .read(1, RAM)
        .read(8, RAM) // only the byte was written
        .write(2, RAM + 0x10, 0xBEEF)
        .read(2, RAM + 0x10)
        .write(4, RAM + 0x20, 0xDEAD_BEEF)
        .read(4, RAM + 0x20)
        .write(8, RAM + 0x28, 0x0123_4567_89AB_CDEF)
        .read(8, RAM + 0x28)
        .read(1, RAM + 0x2F)
        .write(8, RAM + 0xFFC, 0x1122_3344_5566_7788) // straddles a page
        .read(4, RAM + 0x1000)
        .read(8, RAM + 0xFFC)
        .set_base(RAM)
        .read_rel(4, 0x20)
        .write_rel(2, 0x22, 0x5A5A)
        .read(4, RAM + 0x20)
        .print("mmio\n")
        .read(1, MMIO)
        .read(2, MMIO)
        .read(4, MMIO)
        .read(8, MMIO)
        .write(4, MMIO, 0x1234_5678) // ignored
        .read(4, MMIO)
        .print("wait\n")
        .wait_ne(4, RAM + 0x20, 0x5A5A_BEEF, 5) // nothing changes it: times out
        .wait_ne(4, RAM + 0x20, 0, 5) // differs at once
        .wait_eq(4, RAM + 0x20, 0x5A5A_BEEF, 1) // equal at once, prints nothing
        .print("fill\n")
        .fill(RAM + 0x2000, 0x20, 0x5A)
        .read(8, RAM + 0x2000)
        .read(8, RAM + 0x2018)
        .read(1, RAM + 0x2020) // just past the fill
        .write_bytes(RAM + 0x3000, b"hello, guest!")
        .read(8, RAM + 0x3000)
        .read(8, RAM + 0x3008);
    let out = run_script("script-basic", &s);
    assert_eq!(out.code(), 0, "stdout {} stderr {}", out.stdout, out.stderr);
    assert_eq!(out.stderr, "");
    let expected = expect(&[
        Err("pci\n"),
        Ok(0x0008_1b36),
        Ok(0x0008),
        Ok(0x06),
        Ok(0xffff_ffff),
        Ok(0),
        Err("ram\n"),
        Ok(0xa5),
        Ok(0xa5),
        Ok(0xbeef),
        Ok(0xdead_beef),
        Ok(0x0123_4567_89ab_cdef),
        Ok(0x01),
        Ok(0x1122_3344),
        Ok(0x1122_3344_5566_7788),
        Ok(0xdead_beef),
        Ok(0x5a5a_beef),
        Err("mmio\n"),
        Ok(0xff),
        Ok(0xffff),
        Ok(0xffff_ffff),
        Ok(u64::MAX),
        Ok(0xffff_ffff),
        Err("wait\n"),
        Ok(0x5a5a_beef),
        Ok(0x5a5a_beef),
        Err("fill\n"),
        Ok(0x5a5a_5a5a_5a5a_5a5a),
        Ok(0x5a5a_5a5a_5a5a_5a5a),
        Ok(0),
        Ok(u64::from_le_bytes(*b"hello, g")),
        Ok(u64::from_le_bytes(*b"uest!\0\0\0")),
    ]);
    assert_eq!(out.stdout, expected);
    assert_eq!(parse_values(&out.stdout).len(), s.value_count());
}

#[test]
fn script_exit_status_is_passed_through_and_ends_the_script() {
    require_kvm!();
    let mut s = Script::new();
    s.print("before\n").exit(7).print("after\n");
    let out = run_script("script-exit", &s);
    assert_eq!(out.code(), 7, "stderr {}", out.stderr);
    assert_eq!(out.stdout, "before\n");
}

#[test]
fn unknown_opcode_is_reported_with_its_own_status() {
    require_kvm!();
    let mut s = Script::new();
    s.read(1, SCRIPT_FREE_RAM)
        .raw(&[0xEE])
        .print("not reached\n");
    let out = run_script("script-bad-op", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_BAD_OP_STATUS),
        "stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    // The read op is 11 bytes long, so the bad one is at offset 0xb.
    assert_eq!(
        out.stdout,
        format!("{}script: bad op ee at 0000000b\n", value_line(0))
    );
}

#[test]
fn malformed_ops_are_refused_before_any_access() {
    require_kvm!();
    // A read of 3 bytes: a valid opcode with a bad size.
    let mut s = Script::new();
    s.raw(&[0x02, 3, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]);
    let out = run_script("script-bad-size", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_BAD_OP_STATUS),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "script: bad op 02 at 00000000\n");

    // Bad flags on a write: refused, and the ops after it do not run.
    let mut s = Script::new();
    s.print("x\n")
        .raw(&[0x01, 4, 0x02, 0, 0, 0x20, 0, 0, 0, 0, 0])
        .raw(&[1, 0, 0, 0, 0, 0, 0, 0]);
    let out = run_script("script-bad-flags", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_BAD_OP_STATUS),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "x\nscript: bad op 01 at 00000005\n");

    // A print of 255 bytes with only the final exit op after it.
    let mut s = Script::new();
    s.raw(&[0x07, 0xFF, 0x00]);
    let out = run_script("script-bad-end", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_BAD_OP_STATUS),
        "{}",
        out.stderr
    );
    assert_eq!(out.stdout, "script: ran off the end at 00000000\n");
}

#[test]
fn accesses_beyond_4_gib_are_refused() {
    require_kvm!();
    let mut s = Script::new();
    s.set_base(0xC000_0000)
        .read_rel(8, 0x3FFF_FFF8) // the last qword below 4 GiB: fine
        .read_rel(8, 0x3FFF_FFFC); // would cross 4 GiB
    let out = run_script("script-bad-addr", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_BAD_ADDR_STATUS),
        "stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout,
        format!(
            "{}script: bad address 00000000fffffffc at 00000014\n",
            value_line(u64::MAX)
        )
    );
}

#[test]
fn the_runner_maps_all_of_the_low_4_gib() {
    require_kvm!();
    const TOP_OF_RAM: u64 = (64 << 20) - 8;
    let mut s = Script::new();
    s.write(8, TOP_OF_RAM, 0x0F1E_2D3C_4B5A_6978)
        .read(8, TOP_OF_RAM)
        .read(4, 0x4000_0000) // beyond RAM, past the boot contract's first GiB
        .read(4, 0xBFFF_FFFC) // the last dword below the hole
        .read(4, 0xFEE0_0030); // LAPIC version register, near the top
    let out = run_script("script-map", &s);
    assert_eq!(out.code(), 0, "stdout {} stderr {}", out.stdout, out.stderr);
    let v = parse_values(&out.stdout);
    assert_eq!(v[..3], [0x0F1E_2D3C_4B5A_6978, 0xffff_ffff, 0xffff_ffff]);
    // KVM's in-kernel LAPIC reports version 0x14.
    assert_eq!(v[3] & 0xFF, 0x14, "LAPIC version {:#x}", v[3]);
    assert_eq!(v.len(), 4);
}

#[test]
fn waits_return_when_the_value_changes_or_arrives() {
    require_kvm!();
    const LAPIC: u64 = 0xFEE0_0000;
    let mut s = Script::new();
    s.write(4, LAPIC + 0xF0, 0x1FF) // SVR: software enable
        .write(4, LAPIC + 0x3E0, 0xB) // timer divide by 1
        .write(4, LAPIC + 0x320, 0x1_0000) // LVT timer: masked, one-shot
        .write(4, LAPIC + 0x380, 0xFFFF_FFFF) // initial count: starts the timer
        .wait_ne(4, LAPIC + 0x390, 0xFFFF_FFFF, 10_000) // current count runs down
        .wait_ne(4, LAPIC + 0x380, 0xFFFF_FFFF, 3) // the initial count stays
        .write(4, LAPIC + 0x380, 0x1_0000) // a short one-shot count
        .wait_eq(4, LAPIC + 0x390, 0, u32::MAX) // runs down to 0
        .read(4, LAPIC + 0x390);
    let out = run_script("script-wait", &s);
    assert_eq!(out.code(), 0, "stdout {} stderr {}", out.stdout, out.stderr);
    let v = parse_values(&out.stdout);
    assert_eq!(v.len(), 3, "{}", out.stdout);
    assert!(v[0] < 0xFFFF_FFFF, "current count {:#x}", v[0]);
    assert_eq!(v[1], 0xFFFF_FFFF);
    assert_eq!(v[2], 0, "wait_eq returned before the count reached 0");
}

#[test]
fn a_wait_eq_whose_value_never_comes_ends_the_script() {
    require_kvm!();
    let mut s = Script::new();
    s.write(4, SCRIPT_FREE_RAM, 7)
        .wait_eq(4, SCRIPT_FREE_RAM, 8, 50)
        .print("after\n");
    let out = run_script("script-wait-eq-timeout", &s);
    assert_eq!(
        out.code(),
        i32::from(SCRIPT_TIMEOUT_STATUS),
        "stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout,
        "script: timed out at 00000013, read 0000000000000007\n"
    );
}

#[test]
fn the_runner_also_runs_from_the_bzimage_entry() {
    require_kvm!();
    let mut s = Script::new();
    s.write(4, SCRIPT_FREE_RAM, 0xCAFE_F00D)
        .read(4, SCRIPT_FREE_RAM)
        .read(2, 0xD000_0000)
        .pci_read32(0, 0, 0, 0)
        .exit(5);
    let out = run_image(
        "script-bzimage",
        &vmon_tinyguest::bzimage(&vmon_tinyguest::script_runner(&s)),
    );
    assert_eq!(out.code(), 5, "stdout {} stderr {}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        expect(&[Ok(0xcafe_f00d), Ok(0xffff), Ok(0x0008_1b36)])
    );
}

#[test]
fn the_runner_also_runs_from_a_pvh_entry() {
    require_kvm!();
    let mut s = Script::new();
    s.write(4, SCRIPT_FREE_RAM, 0xCAFE_F00D)
        .read(4, SCRIPT_FREE_RAM)
        .read(8, 0x4000_0000) // above the trampoline's 1 GiB map: the runner's own tables
        .pci_read32(0, 0, 0, 0)
        .exit(6);
    let out = run_image("script-pvh", &vmon_tinyguest::script_pvh_elf(&s));
    assert_eq!(out.code(), 6, "stdout {} stderr {}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        expect(&[Ok(0xcafe_f00d), Ok(u64::MAX), Ok(0x0008_1b36)])
    );
}
