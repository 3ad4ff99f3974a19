#![no_main]
//! See vmon_virtio::fuzzing::virtio_net: the bytes become guest memory, the two queues'
//! state and the packets waiting on the backend, fed to the device thread's transmit and
//! receive passes (MRG_RXBUF or not).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmon_virtio::fuzzing::virtio_net(data);
});
