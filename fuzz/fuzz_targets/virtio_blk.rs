#![no_main]
//! See vmon_virtio::fuzzing::virtio_blk: the bytes become guest memory and queue state (or a
//! packet), fed to the code the device thread runs.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmon_virtio::fuzzing::virtio_blk(data));
