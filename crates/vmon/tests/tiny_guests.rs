//! The tiny-guest tier: small purpose-built guests (assembled by vmon-tinyguest) run on the
//! machine's own /dev/kvm and check the exit paths, the devices and the boot protocols in
//! milliseconds. They need KVM but not VT-x/AMD-V: they run on PVM hosts too.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{first_line, kvm_available, run_vmon, spawn_vmon, Output, Scratch};
use vmon_tinyguest as tg;

const T: Duration = Duration::from_secs(60);

/// Boots `image` with extra `args` and returns what vmon did.
fn boot(name: &str, image: &[u8], args: &[&str]) -> Output {
    let dir = Scratch::new(name);
    let kernel = dir.file("guest", image);
    let mut all = vec!["run", "--kernel", kernel.to_str().unwrap()];
    if !args.contains(&"--memory") {
        all.extend_from_slice(&["--memory", "64M"]);
    }
    all.extend_from_slice(args);
    run_vmon(&all, T)
}

/// Boots 64-bit `code` wrapped in an ELF image.
fn boot_elf(name: &str, code: Vec<u8>, args: &[&str]) -> Output {
    boot(name, &tg::elf64(&code, tg::DEFAULT_LOAD_ADDR), args)
}

macro_rules! require_kvm {
    () => {
        if !kvm_available(module_path!()) {
            return;
        }
    };
}

#[test]
fn serial_output_reaches_stdout_and_exit_status_is_passed_through() {
    require_kvm!();
    for status in [0u8, 7, 255] {
        let out = boot(
            "hello",
            &tg::elf64(
                &tg::serial_print_then_exit(b"hello from the guest\n", status),
                tg::DEFAULT_LOAD_ADDR,
            ),
            &[],
        );
        assert_eq!(out.stdout, "hello from the guest\n");
        assert_eq!(out.code(), i32::from(status), "stderr: {}", out.stderr);
        assert_eq!(out.stderr, "");
    }
}

#[test]
fn bzimage_entry_sees_zero_page_cmdline_and_e820() {
    require_kvm!();
    let image = tg::bzimage(&tg::bzimage_check_boot_params());
    let out = boot(
        "bzimage",
        &image,
        &["--cmdline", "console=ttyS0 vmon.test=42"],
    );
    assert_eq!(
        out.code(),
        0,
        "stdout: {} stderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("hdrs ok"), "{}", out.stdout);
    assert!(
        out.stdout.contains("cmdline=console=ttyS0 vmon.test=42\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("e820=04"), "{}", out.stdout);
}

#[test]
fn large_guest_gets_ram_above_the_mmio_hole() {
    require_kvm!();
    let image = tg::bzimage(&tg::bzimage_check_boot_params());
    let out = boot("bzimage-big", &image, &["--memory", "4608M"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert!(out.stdout.contains("e820=05"), "{}", out.stdout);
}

#[test]
fn pvh_entry_gets_start_info_in_ebx() {
    require_kvm!();
    let image = tg::elf64_pvh(&tg::pvh_hello(), tg::DEFAULT_LOAD_ADDR);
    let out = boot("pvh", &image, &[]);
    assert_eq!(out.stdout, "pvh ok\n", "stderr: {}", out.stderr);
    assert_eq!(out.code(), 0);
}

#[test]
fn i8042_reset_ends_the_vm_as_a_reboot() {
    require_kvm!();
    let out = boot_elf("reset", tg::i8042_reset(), &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stderr, "");
}

#[test]
fn acpi_power_off_ends_the_vm_with_status_zero() {
    require_kvm!();
    let out = boot_elf("poweroff", tg::acpi_poweroff(), &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stderr, "");
}

#[test]
fn reset_with_the_warm_flag_is_reported_as_a_panic() {
    require_kvm!();
    let out = boot_elf("panic", tg::warm_reset(), &[]);
    out.assert_one_line_error(76, "guest crashed: kernel panic");
}

#[test]
fn triple_fault_is_a_guest_crash_with_a_diagnosis() {
    require_kvm!();
    let out = boot_elf("triple", tg::triple_fault(), &[]);
    out.assert_one_line_error(76, "guest crashed: triple fault");
    // The diagnosis names the vCPU, RIP and the bytes of the faulting instruction (ud2).
    assert!(out.stderr.contains("vCPU 0 at RIP 0x"), "{}", out.stderr);
    assert!(out.stderr.contains("0f 0b"), "{}", out.stderr);
}

#[test]
fn an_instruction_kvm_cannot_run_ends_with_a_diagnosis() {
    require_kvm!();
    let out = boot_elf("int3", tg::int3_without_idt(), &[]);
    eprintln!("{}", out.stderr);
    match out.code() {
        // PVM: the emulator gives up on int3.
        70 => {
            out.assert_one_line_error(70, "KVM internal error, suberror");
            assert!(
                out.stderr.contains("instruction bytes: cc"),
                "{}",
                out.stderr
            );
            assert!(out.stderr.contains("at RIP 0x"), "{}", out.stderr);
        }
        // VT-x/AMD-V: #BP with no IDT escalates to a triple fault.
        76 => out.assert_one_line_error(76, "guest crashed: triple fault"),
        other => panic!("unexpected exit {other}: {}", out.stderr),
    }
}

#[test]
fn legacy_ports_answer_as_a_pc_would() {
    require_kvm!();
    let out = boot_elf("ports", tg::port_probe(), &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    // The RTC reports the host's current year in BCD.
    let year: u64 = String::from_utf8(
        Command::new("date")
            .args(["-u", "+%Y"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let bcd = |v: u64| format!("{:x}", ((v / 10) << 4) | (v % 10));
    let lines: Vec<&str> = out.stdout.lines().collect();
    let value = |label: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{label}=")))
            .unwrap_or_else(|| panic!("no {label} in {lines:?}"))
            .to_string()
    };
    assert_eq!(value("0071[09]"), format!("{:0>2}", bcd(year % 100)));
    assert_eq!(value("0071[32]"), bcd(year / 100));
    assert_eq!(value("0080"), "ff", "POST port reads as an empty bus");
    assert_eq!(value("03e8"), "ff", "absent COM3 reads all-ones");
    assert_eq!(value("03fd"), "60", "COM1 is an idle 16550: THRE and TEMT");
}

#[test]
fn wild_accesses_do_not_hurt_the_vmm() {
    require_kvm!();
    let out = boot_elf("wild", tg::wild_accesses(), &[]);
    assert_eq!(out.code(), 0, "stdout {} stderr {}", out.stdout, out.stderr);
    assert!(out.stdout.ends_with("alive\n"), "{}", out.stdout);
}

#[test]
fn smp_guest_brings_up_every_vcpu() {
    require_kvm!();
    for cpus in [1u8, 2, 4, 32] {
        let image = tg::elf64(&tg::smp_hello(cpus), tg::DEFAULT_LOAD_ADDR);
        let n = cpus.to_string();
        let out = boot("smp", &image, &["--cpus", &n]);
        assert_eq!(
            out.code(),
            0,
            "{cpus} vCPUs: stdout {} stderr {}",
            out.stdout,
            out.stderr
        );
        assert_eq!(out.stdout, format!("cpus={cpus}\n"));
    }
}

#[test]
fn console_input_reaches_the_guest() {
    require_kvm!();
    let dir = Scratch::new("echo");
    let input = "typed into the console, longer than the UART's 64-byte receive FIFO so the backlog is exercised\n";
    let kernel = dir.file(
        "guest",
        &tg::elf64(&tg::serial_echo(input.len() as u32), tg::DEFAULT_LOAD_ADDR),
    );
    let kernel = kernel.to_str().unwrap();
    let mut child = spawn_vmon(
        &["run", "--kernel", kernel, "--memory", "64M"],
        Stdio::piped(),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = common::wait_with_timeout(child, T, Instant::now());
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout, format!("ready\n{input}"));
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly() {
    require_kvm!();
    for (signal, code, name) in [
        (libc::SIGTERM, 143, "SIGTERM"),
        (libc::SIGINT, 130, "SIGINT"),
    ] {
        let dir = Scratch::new("sigterm");
        let kernel = dir.file(
            "guest",
            &tg::elf64(&tg::print_then_spin(b"spinning\n"), tg::DEFAULT_LOAD_ADDR),
        );
        let kernel = kernel.to_str().unwrap();
        let args = ["run", "--kernel", kernel, "--memory", "64M", "--cpus", "2"];
        let mut child = spawn_vmon(&args, Stdio::null());
        let line = first_line(&mut child);
        assert_eq!(line, "spinning\n");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
        let start = Instant::now();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(code), "{stderr}");
        assert_eq!(stderr, format!("vmon: VM stopped by {name}\n"));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stopping took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn kvm_run_entering_the_wrong_bzimage_entry_would_be_caught() {
    require_kvm!();
    // The tiny bzImage exits 0xEE if entered at the 32-bit entry instead of the 64-bit one.
    let out = boot("bzentry", &tg::bzimage(&tg::exit_with(0)), &[]);
    assert_ne!(out.code(), i32::from(tg::BZIMAGE_WRONG_ENTRY_STATUS));
    assert_eq!(out.code(), 0);
}
