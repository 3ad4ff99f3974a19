#![no_main]
//! See vmon_state::fuzzing::state_file: the bytes as a whole state file, then as the payload
//! of an intact container (untouched, cut short or with one byte flipped), through the decoder
//! `read_state` runs, typed and untyped.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmon_state::fuzzing::state_file(data));
