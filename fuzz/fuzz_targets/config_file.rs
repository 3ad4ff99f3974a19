#![no_main]
//! See vmon_vmm::config_file::fuzzing::config_file: the bytes as a JSON and a TOML VM
//! configuration and as the flags' `key=value` syntax, through parsing, validation, the
//! conversion into a VmConfig and a JSON round trip.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmon_vmm::config_file::fuzzing::config_file(data));
