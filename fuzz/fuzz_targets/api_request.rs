#![no_main]
//! See vmon_api::fuzzing::api_request: the bytes are what a client sends on one connection,
//! cut into chunks, through the parser, the router over a mock VM and the serialiser.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmon_api::fuzzing::api_request(data));
