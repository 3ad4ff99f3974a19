//! virtio-rng: fills the driver's buffers with bytes from the host's `getrandom(2)`.
//!
//! Each request is filled and completed before the next is taken, and the thread stops
//! only between passes, so a paused device has nothing in flight and no state of its own.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::Queue;

use crate::chain::{self, QueueBroken};
use crate::metrics::{CounterSet, DeviceMetrics};
use crate::worker::{EventLoop, Parked, Wake, Worker};
use crate::{
    device_id, ActivateError, Activation, DeviceState, DeviceStateError, PauseError, VirtioDevice,
    COMMON_FEATURES,
};

const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most: a driver offering a huge buffer gets a full 64 KiB,
/// not an unbounded loop in the device thread.
const MAX_REQUEST: usize = 64 * 1024;

/// Requests served, random bytes handed out, malformed chains.
static RNG_COUNTERS: [&str; 3] = ["requests", "bytes", "bad_chains"];

pub struct Rng {
    worker: Option<Worker<Parked<()>>>,
    counters: Arc<CounterSet>,
}

impl Default for Rng {
    fn default() -> Self {
        Rng {
            worker: None,
            counters: CounterSet::new(&RNG_COUNTERS),
        }
    }
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        device_id::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                got: a.queues.len(),
                want: 1,
            });
        }
        let mut q = a.queues.remove(0);
        let counters = self.counters.clone();
        let worker = Worker::spawn_device(
            "virtio-rng".into(),
            a.interrupt.clone(),
            move |mut events: EventLoop| {
                let run = |events: &mut EventLoop, q: &mut crate::ActiveQueue| {
                    if let Err(e) = events.add(q.notify.as_raw_fd(), 0, false) {
                        a.interrupt.fail_device(&format!("watching the queue: {e}"));
                        return;
                    }
                    loop {
                        let _ = q.notify.read();
                        match serve_counted(&mut q.queue, &a.memory, &counters) {
                            Ok(true) => a.interrupt.signal_queue(0),
                            Ok(false) => {}
                            Err(e) => {
                                a.interrupt.fail_device(&e.to_string());
                                return;
                            }
                        }
                        if let Wake::Stop = events.wait() {
                            return;
                        }
                    }
                };
                run(&mut events, &mut q);
                Parked {
                    backend: (),
                    queues: vec![q.queue],
                }
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn metrics(&self) -> Arc<dyn DeviceMetrics> {
        self.counters.clone()
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self, _within: std::time::Duration) -> Result<Vec<Queue>, PauseError> {
        let Some(w) = self.worker.take() else {
            return Ok(Vec::new());
        };
        w.stop().map(|p| p.queues).ok_or(PauseError::ThreadDied)
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Stateless
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        match state {
            DeviceState::Stateless => Ok(()),
            other => Err(DeviceStateError::wrong_kind(other, "rng")),
        }
    }
}

/// Serves every request on `queue` at once, on the calling thread. Also the fuzz target's
/// entry point.
#[doc(hidden)]
pub fn serve(
    queue: &mut virtio_queue::Queue,
    mem: &vmon_memory::GuestMemory,
) -> Result<bool, QueueBroken> {
    serve_counted(queue, mem, &CounterSet::new(&RNG_COUNTERS))
}

fn serve_counted(
    queue: &mut virtio_queue::Queue,
    mem: &vmon_memory::GuestMemory,
    counters: &CounterSet,
) -> Result<bool, QueueBroken> {
    let mut buf = vec![0u8; MAX_REQUEST];
    chain::serve_all(queue, mem, |p| match p.chain {
        Ok(c) => {
            let n = (c.writable_len() as usize).min(MAX_REQUEST);
            fill_random(&mut buf[..n]);
            counters.add(0, 1);
            c.write_at(mem, 0, &buf[..n]).map_or(0, |_| {
                counters.add(1, n as u64);
                n as u32
            })
        }
        Err(e) => {
            counters.add(2, 1);
            tracing::debug!("virtio-rng: bad request: {e}");
            0
        }
    })
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            // getrandom only fails on EINTR once the pool is initialised; retry.
            continue;
        }
        done += n as usize;
    }
}
