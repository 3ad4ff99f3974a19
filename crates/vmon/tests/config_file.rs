//! `vmon run --config`: a VM described by a file, flags laid over it, and files that are
//! wrong get one line naming the file and the field. Tiny guests on this machine's /dev/kvm.

mod common;

use std::time::Duration;

use common::{kvm_available, run_vmon, Scratch};
use vmon_tinyguest as tg;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_json_file_boots_the_guest_and_flags_override_it() {
    if !kvm_available(module_path!()) {
        return;
    }
    let dir = Scratch::new("config-json");
    dir.file(
        "guest.elf",
        &tg::elf64(
            &tg::serial_print_then_exit(b"from the file\n", 9),
            tg::DEFAULT_LOAD_ADDR,
        ),
    );
    // Relative paths resolve against the file's directory, not the working directory.
    let cfg = dir.file(
        "vm.json",
        br#"{ "kernel": "guest.elf", "memory": "64M", "cpus": 1 }"#,
    );
    let out = run_vmon(&["run", "--config", cfg.to_str().unwrap()], T);
    assert_eq!(out.code(), 9, "{}", out.stderr);
    assert_eq!(out.stdout, "from the file\n");

    // A flag wins over the file: 16 MiB is below the minimum, so the flag was used.
    let out = run_vmon(
        &["run", "--config", cfg.to_str().unwrap(), "--memory", "16M"],
        T,
    );
    out.assert_one_line_error(64, "memory");
}

#[test]
fn a_toml_file_works_too() {
    if !kvm_available(module_path!()) {
        return;
    }
    let dir = Scratch::new("config-toml");
    dir.file(
        "guest.elf",
        &tg::elf64(
            &tg::serial_print_then_exit(b"toml\n", 0),
            tg::DEFAULT_LOAD_ADDR,
        ),
    );
    let cfg = dir.file("vm.toml", b"kernel = \"guest.elf\"\nmemory = 64\n");
    let out = run_vmon(&["run", "--config", cfg.to_str().unwrap()], T);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    assert_eq!(out.stdout, "toml\n");
}

#[test]
fn bad_files_are_refused_naming_the_field() {
    let dir = Scratch::new("config-bad");
    let kernel = dir.file(
        "guest.elf",
        &tg::elf64(&tg::exit_with(0), tg::DEFAULT_LOAD_ADDR),
    );
    let k = kernel.to_str().unwrap();
    let cases: Vec<(&str, String, i32, &str)> = vec![
        (
            "missing-disk.json",
            format!(r#"{{"kernel": "{k}", "disks": [{{"path": "{k}"}}, {{"path": "nope.img"}}]}}"#),
            66,
            "disks[1].path: no such file",
        ),
        (
            "unknown.json",
            format!(r#"{{"kernel": "{k}", "disks": [{{"pth": "x"}}]}}"#),
            64,
            "disks[0].pth: unknown field",
        ),
        (
            "type.json",
            format!(r#"{{"kernel": "{k}", "cpus": "two"}}"#),
            64,
            "cpus: invalid type",
        ),
        ("syntax.json", "{\"kernel\": ".to_string(), 64, "line 1"),
        (
            "range.toml",
            format!("kernel = \"{k}\"\ncpus = 0\n"),
            64,
            "cpus:",
        ),
    ];
    for (name, text, code, needle) in cases {
        let cfg = dir.file(name, text.as_bytes());
        let out = run_vmon(&["run", "--config", cfg.to_str().unwrap()], T);
        out.assert_one_line_error(code, needle);
        assert!(out.stderr.contains(name), "{name}: {}", out.stderr);
    }
    let out = run_vmon(&["run", "--config", "/nonexistent/vm.json"], T);
    out.assert_one_line_error(66, "/nonexistent/vm.json");
}
