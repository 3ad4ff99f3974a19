//! The thread an active device runs on.
//!
//! One thread per device rather than one shared event loop: a block device's reads and
//! writes are synchronous system calls, and on a shared loop a slow disk would hold up
//! every other device's queues. Each thread waits in epoll on its queues' eventfds, its
//! backend's descriptors and a stop eventfd.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a device thread hands back when it stops: its backend, and its queues as it left
/// them. Device loops look at the stop request only between passes over their queues, and
/// every pass completes (or puts back) each chain it takes, so the queues' indices are
/// final: a snapshot taken now loses nothing in flight and repeats nothing.
pub struct Parked<B> {
    pub backend: B,
    pub queues: Vec<Queue>,
}

/// The token reserved for the stop eventfd.
const STOP: u64 = u64::MAX;

/// A running device thread; it hands back its backend `B` when stopped.
pub struct Worker<B> {
    stop: EventFd,
    handle: Option<JoinHandle<B>>,
}

impl<B: Send + 'static> Worker<B> {
    /// Starts `body` on a thread named `name`. `body` gets an [`EventLoop`] already watching
    /// the stop eventfd and returns its backend when the loop says to stop.
    pub fn spawn(
        name: String,
        body: impl FnOnce(EventLoop) -> B + Send + 'static,
    ) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let events = EventLoop::new(stop.try_clone()?)?;
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || body(events))?;
        Ok(Worker {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and returns its backend (None if the thread panicked).
    pub fn stop(mut self) -> Option<B> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<B> {
        let handle = self.handle.take()?;
        let _ = self.stop.write(1);
        handle.join().ok()
    }
}

impl<B> Drop for Worker<B> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = handle.join();
        }
    }
}

/// epoll over the device's descriptors, with `u64` tokens chosen by the device.
pub struct EventLoop {
    epoll: Epoll,
    _stop: EventFd,
    ready: Vec<EpollEvent>,
}

/// What [`EventLoop::wait`] found.
pub enum Wake {
    Stop,
    Ready(Vec<u64>),
}

impl EventLoop {
    pub(crate) fn new(stop: EventFd) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(EventLoop {
            epoll,
            _stop: stop,
            ready: vec![EpollEvent::default(); 32],
        })
    }

    /// Watches `fd` for readability (and writability if `writable`) under `token`.
    pub fn add(&self, fd: RawFd, token: u64, writable: bool) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(set(writable), token),
        )
    }

    /// Changes what `fd` is watched for; `None` stops watching it for now.
    pub fn modify(&self, fd: RawFd, token: u64, events: Option<bool>) -> io::Result<()> {
        let set = events.map_or(EventSet::empty(), set);
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, token))
    }

    /// Changes what `fd` is watched for, readability and writability independently (e.g.
    /// writability only, while the device has nowhere to put what it would read).
    pub fn modify_events(
        &self,
        fd: RawFd,
        token: u64,
        readable: bool,
        writable: bool,
    ) -> io::Result<()> {
        let mut set = EventSet::empty();
        if readable {
            set |= EventSet::IN;
        }
        if writable {
            set |= EventSet::OUT;
        }
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// For a device that cannot go on (a broken queue): forgets every descriptor but the
    /// stop eventfd and sleeps until the transport stops the thread. A fresh epoll rather
    /// than removing registrations one by one, so nothing the device forgot to remove
    /// (a fired timerfd, a readable eventfd or socket) can keep waking it.
    pub fn idle_until_stop(&mut self) {
        let fresh = Epoll::new().and_then(|epoll| {
            epoll.ctl(
                ControlOperation::Add,
                self._stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )?;
            Ok(epoll)
        });
        match fresh {
            Ok(epoll) => self.epoll = epoll,
            Err(e) => tracing::error!("device event loop: cannot go idle: {e}"),
        }
        while !matches!(self.wait(), Wake::Stop) {}
    }

    /// Blocks until something is ready. The stop request wins over everything else.
    pub fn wait(&mut self) -> Wake {
        self.wait_for(-1)
    }

    /// What is ready now, without blocking: for a thread that found more work by polling
    /// and must still see a stop request or a timer.
    pub fn ready_now(&mut self) -> Wake {
        self.wait_for(0)
    }

    fn wait_for(&mut self, timeout_ms: i32) -> Wake {
        loop {
            match self.epoll.wait(timeout_ms, &mut self.ready) {
                Ok(n) => {
                    let tokens: Vec<u64> = self.ready[..n].iter().map(|e| e.data()).collect();
                    if tokens.contains(&STOP) {
                        return Wake::Stop;
                    }
                    return Wake::Ready(tokens);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("device event loop failed: {e}");
                    return Wake::Stop;
                }
            }
        }
    }
}

/// How long a device thread spins looking for more work before it sleeps in epoll.
///
/// Sleeping costs a request that arrives just after it a thread wake-up: tens of
/// microseconds on a virtualised host, more than the request itself. Spinning costs a CPU.
/// So the window adapts, as QEMU's event loop does for its iothreads: it grows (from
/// [`Self::FIRST`], doubling, up to the maximum) whenever the thread slept and the next
/// work came within the maximum, which a longer spin would have caught; it halves, down to
/// nothing, whenever the thread waited longer than the maximum. An idle device or one with
/// sparse requests therefore never spins; a device serving back-to-back requests spins at
/// most the maximum between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptivePoll {
    window: Duration,
    max: Duration,
}

impl AdaptivePoll {
    /// The first window after a short sleep.
    pub const FIRST: Duration = Duration::from_micros(4);

    /// A window that adapts up to `max`; a zero `max` never spins.
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            window: Duration::ZERO,
            max,
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Calls `ready` until it says true or the window has passed; whether it said true.
    ///
    /// Between rounds of looks it yields the CPU: where other threads (a guest's vCPUs,
    /// other VMs) are waiting for this CPU they run at once instead of after the spin,
    /// and where none are, `sched_yield` returns straight away.
    pub fn spin(&self, mut ready: impl FnMut() -> bool) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            // Reading the clock costs more than a look at the ring: look a few times per read.
            for _ in 0..16 {
                if ready() {
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= self.window {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Adapts the window after the thread slept: `idle` is how long it went without work,
    /// spinning and sleeping.
    pub fn slept(&mut self, idle: Duration) {
        if idle > self.max {
            self.window /= 2;
            if self.window < Self::FIRST {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max {
            self.window = (self.window * 2).max(Self::FIRST).min(self.max);
        }
    }
}

fn set(writable: bool) -> EventSet {
    if writable {
        EventSet::IN | EventSet::OUT
    } else {
        EventSet::IN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_cpu_time() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn the_poll_window_grows_with_short_waits_and_shrinks_with_long_ones() {
        let us = Duration::from_micros;
        let mut p = AdaptivePoll::new(us(32));
        assert_eq!(p.window(), Duration::ZERO);
        assert!(!p.spin(|| true), "a zero window does not even look");
        p.slept(us(10));
        assert_eq!(p.window(), us(4));
        for want in [8, 16, 32, 32] {
            p.slept(us(20));
            assert_eq!(p.window(), us(want));
        }
        for want in [16, 8, 4, 0, 0] {
            p.slept(us(33));
            assert_eq!(p.window(), us(want));
        }
        let mut never = AdaptivePoll::new(Duration::ZERO);
        never.slept(Duration::ZERO);
        assert_eq!(never.window(), Duration::ZERO);
    }

    #[test]
    fn spinning_stops_at_work_or_at_the_window() {
        let mut p = AdaptivePoll::new(Duration::from_millis(2));
        for _ in 0..10 {
            p.slept(Duration::from_micros(1));
        }
        assert_eq!(p.window(), Duration::from_millis(2));
        let mut looks = 0;
        assert!(p.spin(|| {
            looks += 1;
            looks == 3
        }));
        assert_eq!(looks, 3);
        let start = Instant::now();
        assert!(!p.spin(|| false));
        let spun = start.elapsed();
        assert!(spun >= Duration::from_millis(2), "spun {spun:?}");
    }

    #[test]
    fn idling_ignores_descriptors_left_readable() {
        let noisy = EventFd::new(EFD_NONBLOCK).unwrap();
        let noisy2 = noisy.try_clone().unwrap();
        noisy.write(1).unwrap();
        let w = Worker::spawn("idle".into(), move |mut events| {
            events.add(noisy2.as_raw_fd(), 1, false).unwrap();
            let before = thread_cpu_time();
            events.idle_until_stop();
            thread_cpu_time() - before
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let spent = w.stop().unwrap();
        // A thread woken by the readable eventfd in a loop would burn the whole 200 ms.
        assert!(
            spent < std::time::Duration::from_millis(50),
            "idle thread used {spent:?}"
        );
    }

    #[test]
    fn worker_sees_its_events_and_returns_its_backend_on_stop() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick2 = kick.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Worker::spawn("test".into(), move |mut events| {
            events.add(kick2.as_raw_fd(), 7, false).unwrap();
            let mut seen = 0;
            loop {
                match events.wait() {
                    Wake::Stop => return seen,
                    Wake::Ready(t) => {
                        assert_eq!(t, vec![7]);
                        let _ = kick2.read();
                        seen += 1;
                        tx.send(()).unwrap();
                    }
                }
            }
        })
        .unwrap();
        kick.write(1).unwrap();
        rx.recv().unwrap();
        kick.write(1).unwrap();
        rx.recv().unwrap();
        assert_eq!(w.stop(), Some(2));
    }
}
