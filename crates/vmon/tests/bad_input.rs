//! Every kind of bad input gets one clear line and a documented non-zero exit status: no
//! panic, no backtrace.

mod common;

use std::time::Duration;

use common::{kvm_available, run_vmon, Scratch};

const T: Duration = Duration::from_secs(30);

/// A bzImage whose header claims `paragraphs` 16-byte units of protected-mode kernel after
/// four setup sectors, in a 4 KiB file.
fn bzimage_claiming(paragraphs: u32) -> Vec<u8> {
    let mut image = vec![0u8; 4096];
    image[0x1F1] = 4; // setup sectors
    image[0x1F4..0x1F8].copy_from_slice(&paragraphs.to_le_bytes());
    image[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    image[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    image
}

/// A header that promises 1 MiB of kernel in a 4 KiB file.
fn truncated_bzimage() -> Vec<u8> {
    bzimage_claiming(0x10000)
}

/// A header consistent with its file: passes the checks made before KVM is opened.
fn plausible_bzimage() -> Vec<u8> {
    bzimage_claiming(16)
}

#[test]
fn missing_kernel_file() {
    let out = run_vmon(&["run", "--kernel", "/nonexistent/vmlinuz"], T);
    out.assert_one_line_error(66, "cannot read kernel '/nonexistent/vmlinuz'");
}

#[test]
fn kernel_that_is_not_bzimage_or_elf() {
    let dir = Scratch::new("notkernel");
    let path = dir.file("x", b"#!/bin/sh\necho this is not a kernel\n");
    let out = run_vmon(&["run", "--kernel", path.to_str().unwrap()], T);
    out.assert_one_line_error(65, "not a bzImage or ELF");
    assert!(out
        .stderr
        .contains(&format!("cannot load kernel '{}'", path.display())));
}

#[test]
fn empty_kernel_file() {
    let dir = Scratch::new("emptykernel");
    let path = dir.file("empty", b"");
    let out = run_vmon(&["run", "--kernel", path.to_str().unwrap()], T);
    out.assert_one_line_error(65, "not a bzImage or ELF");
}

#[test]
fn truncated_bzimage_kernel() {
    let dir = Scratch::new("truncated");
    let path = dir.file("bzImage", &truncated_bzimage());
    let out = run_vmon(&["run", "--kernel", path.to_str().unwrap()], T);
    out.assert_one_line_error(65, "truncated bzImage");
}

#[test]
fn kernel_is_a_directory() {
    let dir = Scratch::new("kerneldir");
    let out = run_vmon(&["run", "--kernel", dir.path().to_str().unwrap()], T);
    out.assert_one_line_error(65, "not a regular file");
}

#[test]
fn missing_initrd() {
    let dir = Scratch::new("noinitrd");
    let kernel = dir.file("bzImage", &plausible_bzimage());
    let out = run_vmon(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd.img",
        ],
        T,
    );
    out.assert_one_line_error(66, "cannot read initrd '/nonexistent/initrd.img'");
}

#[test]
fn zero_cpus() {
    let out = run_vmon(&["run", "--kernel", "/nonexistent", "--cpus", "0"], T);
    out.assert_one_line_error(64, "--cpus 0");
}

#[test]
fn too_many_cpus() {
    if !kvm_available("too_many_cpus") {
        return;
    }
    let dir = Scratch::new("cpus");
    let kernel = dir.file("k", &plausible_bzimage());
    let out = run_vmon(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "100000",
        ],
        T,
    );
    out.assert_one_line_error(64, "--cpus 100000");
}

#[test]
fn negative_or_garbage_cpus() {
    let out = run_vmon(&["run", "--cpus", "-3"], T);
    out.assert_one_line_error(64, "'-3'");
    let out = run_vmon(&["run", "--cpus", "many"], T);
    out.assert_one_line_error(64, "--cpus");
}

#[test]
fn memory_too_small() {
    let out = run_vmon(&["run", "--kernel", "/nonexistent", "--memory", "1K"], T);
    out.assert_one_line_error(64, "--memory 1 KiB is too small");
}

#[test]
fn memory_garbage() {
    let out = run_vmon(&["run", "--memory", "lots"], T);
    out.assert_one_line_error(64, "--memory");
}

#[test]
fn memory_larger_than_the_host_can_map() {
    if !kvm_available("memory_larger_than_the_host_can_map") {
        return;
    }
    let dir = Scratch::new("hugemem");
    let kernel = dir.file("k", &plausible_bzimage());
    let out = run_vmon(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "1000T",
        ],
        T,
    );
    out.assert_one_line_error(64, "--memory 1000 TiB is more than this host can map");
}

#[test]
fn unknown_flag() {
    let out = run_vmon(&["run", "--frobnicate"], T);
    out.assert_one_line_error(64, "'--frobnicate'");
}

#[test]
fn unknown_subcommand() {
    let out = run_vmon(&["launch"], T);
    out.assert_one_line_error(64, "'launch'");
}

#[test]
fn bad_cpu_option() {
    let out = run_vmon(&["run", "--cpu", "nested=maybe"], T);
    out.assert_one_line_error(64, "nested=maybe");
}

#[test]
fn kvm_missing_is_explained() {
    let dir = Scratch::new("nokvm");
    let kernel = dir.file("k", &plausible_bzimage());
    let out = common::run_vmon_env(
        &["run", "--kernel", kernel.to_str().unwrap()],
        &[("VMON_KVM_DEVICE", "/nonexistent/kvm")],
        T,
    );
    out.assert_one_line_error(69, "KVM is not available");
    assert!(out.stderr.contains("modprobe kvm_intel"), "{}", out.stderr);
}

#[test]
fn help_is_not_an_error() {
    let out = run_vmon(&["run", "--help"], T);
    assert_eq!(out.code(), 0);
    assert!(out.stdout.contains("--memory"));
}

#[test]
fn default_guest_on_a_pvm_host_is_refused_at_once() {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIPPED: not a PVM host; there the default guest boots");
        return;
    }
    let out = run_vmon(&["run", "--", "true"], T);
    out.assert_one_line_error(69, "this host's /dev/kvm is PVM");
    assert!(
        out.elapsed < Duration::from_secs(5),
        "took {:?}",
        out.elapsed
    );
}
