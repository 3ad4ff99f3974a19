//! The thread an active device runs on.
//!
//! One thread per device rather than one shared event loop: a block device's reads and
//! writes are synchronous system calls, and on a shared loop a slow disk would hold up
//! every other device's queues. Each thread waits in epoll on its queues' eventfds, its
//! backend's descriptors and a stop eventfd.
//!
//! Stopping comes in two kinds. [`Worker::stop`] (a reset, the VM's end) waits for the
//! thread however long it takes. [`Worker::try_stop`] (a pause for a snapshot) waits a
//! bounded time and then withdraws its request: a disk whose storage stopped answering
//! must fail the snapshot, not hang the VMM's API with it. A thread busy elsewhere when
//! the request came finds it withdrawn in [`EventLoop::wait`], which forgets it; a thread
//! that took the request finds out in [`EventLoop::confirm_stop`] (or, while it waits for
//! its requests in flight, [`EventLoop::stop_withdrawn`]). Either way it goes on serving.

use std::any::Any;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::Interrupt;

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

/// Where a stop request stands, shared by a [`Worker`] and its thread's [`EventLoop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopState {
    /// No request.
    Running,
    /// Asked to stop.
    Requested,
    /// The asker gave up waiting; the thread clears the request when it next looks.
    Withdrawn,
    /// The thread has committed to stopping (or has ended): too late to withdraw.
    Stopping,
}

struct StopShared {
    state: Mutex<StopState>,
    changed: Condvar,
    /// Readable while a request, or a withdrawn one not yet cleared, is pending.
    stop: EventFd,
    /// Readable once a request is withdrawn: for a thread that waits on something other
    /// than its event loop (a disk draining its requests in flight).
    withdrawn: EventFd,
}

impl StopShared {
    fn new() -> io::Result<Self> {
        Ok(StopShared {
            state: Mutex::new(StopState::Running),
            changed: Condvar::new(),
            stop: EventFd::new(EFD_NONBLOCK)?,
            withdrawn: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, StopState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(&self) {
        let mut state = self.lock();
        // A thread that has ended (or committed to it) stays so: a request now would
        // leave `try_stop` waiting for a thread that is gone.
        if *state != StopState::Stopping {
            *state = StopState::Requested;
        }
        drop(state);
        let _ = self.stop.write(1);
    }

    /// The thread's side of a withdrawn request: forget it and go on.
    fn clear(&self, state: &mut StopState) {
        let _ = self.stop.read();
        let _ = self.withdrawn.read();
        *state = StopState::Running;
    }
}

/// Marks the thread [`StopState::Stopping`] when its body returns or panics, so that a
/// [`Worker::try_stop`] waiting for it wakes up.
struct Ended(Arc<StopShared>);

impl Drop for Ended {
    fn drop(&mut self) {
        *self.0.lock() = StopState::Stopping;
        self.0.changed.notify_all();
    }
}

/// A running device thread; it hands back its backend `B` when stopped.
pub struct Worker<B> {
    shared: Arc<StopShared>,
    /// Joins to None if the body panicked.
    handle: Option<JoinHandle<Option<B>>>,
}

impl<B: Send + 'static> Worker<B> {
    /// Starts `body` on a thread named `name`. `body` gets an [`EventLoop`] already watching
    /// the stop eventfd and returns its backend when the loop says to stop.
    ///
    /// A panic in `body` (a vmon bug a guest may have reached) ends this thread alone:
    /// `on_panic` hears what it said (a device's thread tells its driver, see
    /// [`Self::spawn_device`]), and the worker then stops as one whose thread died. The VMM
    /// and its other devices go on.
    pub fn spawn(
        name: String,
        on_panic: impl FnOnce(&str) + Send + 'static,
        body: impl FnOnce(EventLoop) -> B + Send + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(StopShared::new()?);
        let events = EventLoop::new(shared.clone())?;
        let ended = Ended(shared.clone());
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Dropped last: a `try_stop` waiting on the thread wakes after `on_panic` ran.
            let _ended = ended;
            match panic::catch_unwind(AssertUnwindSafe(|| body(events))) {
                Ok(backend) => Some(backend),
                Err(payload) => {
                    on_panic(panic_message(payload.as_ref()));
                    None
                }
            }
        })?;
        Ok(Worker {
            shared,
            handle: Some(handle),
        })
    }

    /// [`Self::spawn`] for a virtio device's thread: should it panic, the device needs a
    /// reset (DEVICE_NEEDS_RESET and a configuration interrupt), so the driver hears that
    /// it failed instead of waiting on it for ever.
    pub fn spawn_device(
        name: String,
        interrupt: Arc<Interrupt>,
        body: impl FnOnce(EventLoop) -> B + Send + 'static,
    ) -> io::Result<Self> {
        let device = name.clone();
        let on_panic = move |why: &str| {
            interrupt.fail_device(&format!(
                "{device}: its thread panicked (a vmon bug): {why}"
            ))
        };
        Self::spawn(name, on_panic, body)
    }

    /// Stops the thread, however long that takes, and returns its backend (None if the
    /// thread panicked).
    pub fn stop(mut self) -> Option<B> {
        self.stop_and_join()
    }

    /// Asks the thread to stop and waits at most `within` for it to commit to stopping.
    /// If it has not by then (a disk waiting for storage that does not answer), the
    /// request is withdrawn and the worker comes back (`Err`), still running. `Ok(None)`: the
    /// thread panicked. Only for a body that, on [`Wake::Stop`], calls
    /// [`EventLoop::confirm_stop`] before it returns: one that returns at once could end
    /// after the request was withdrawn, and the worker would come back without a thread.
    pub fn try_stop(mut self, within: Duration) -> Result<Option<B>, Self> {
        let started = Instant::now();
        self.shared.request();
        let mut state = self.shared.lock();
        loop {
            if *state == StopState::Stopping {
                drop(state);
                return Ok(self.handle.take().and_then(|h| h.join().ok().flatten()));
            }
            let left = within.saturating_sub(started.elapsed());
            if left.is_zero() {
                *state = StopState::Withdrawn;
                let _ = self.shared.withdrawn.write(1);
                drop(state);
                return Err(self);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stop_and_join(&mut self) -> Option<B> {
        let handle = self.handle.take()?;
        self.shared.request();
        handle.join().ok().flatten()
    }
}

impl<B> Drop for Worker<B> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.shared.request();
            let _ = handle.join();
        }
    }
}

/// What a panic said: its message when it had one (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// epoll over the device's descriptors, with `u64` tokens chosen by the device.
pub struct EventLoop {
    epoll: Epoll,
    shared: Arc<StopShared>,
    ready: Vec<EpollEvent>,
}

/// What [`EventLoop::wait`] found.
pub enum Wake {
    Stop,
    Ready(Vec<u64>),
}

impl EventLoop {
    fn new(shared: Arc<StopShared>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(EventLoop {
            epoll,
            shared,
            ready: vec![EpollEvent::default(); 32],
        })
    }

    /// An event loop with no thread behind it (nothing can ask it to stop), for tests that
    /// drive a device's loop body by hand.
    #[cfg(test)]
    pub(crate) fn detached() -> io::Result<Self> {
        EventLoop::new(Arc::new(StopShared::new()?))
    }

    /// After [`Wake::Stop`], once the device has finished what it had in flight: whether
    /// to stop now. False if the request was withdrawn meanwhile ([`Worker::try_stop`] gave
    /// up): the request is then forgotten and the device goes on serving.
    pub fn confirm_stop(&self) -> bool {
        let mut state = self.shared.lock();
        if *state == StopState::Withdrawn {
            self.shared.clear(&mut state);
            return false;
        }
        *state = StopState::Stopping;
        self.shared.changed.notify_all();
        true
    }

    /// Whether the pending stop request was withdrawn: a device draining its requests in
    /// flight for a stop can give up and go back to serving.
    pub fn stop_withdrawn(&self) -> bool {
        let state = self.shared.lock();
        if *state != StopState::Withdrawn {
            // Woken by an old withdrawal that a new request replaced: keep waiting.
            let _ = self.shared.withdrawn.read();
        }
        *state == StopState::Withdrawn
    }

    /// Becomes readable when a stop request is withdrawn (see [`Self::stop_withdrawn`]).
    pub fn withdrawn_fd(&self) -> RawFd {
        self.shared.withdrawn.as_raw_fd()
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
                self.shared.stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )?;
            Ok(epoll)
        });
        match fresh {
            Ok(epoll) => self.epoll = epoll,
            Err(e) => tracing::error!("device event loop: cannot go idle: {e}"),
        }
        while !(matches!(self.wait(), Wake::Stop) && self.confirm_stop()) {}
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
                    let mut tokens: Vec<u64> = self.ready[..n].iter().map(|e| e.data()).collect();
                    if tokens.contains(&STOP) {
                        let mut state = self.shared.lock();
                        if *state != StopState::Withdrawn {
                            return Wake::Stop;
                        }
                        // A request given up on before this thread saw it.
                        self.shared.clear(&mut state);
                        tokens.retain(|&t| t != STOP);
                        if tokens.is_empty() && timeout_ms != 0 {
                            continue;
                        }
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
        let w = Worker::spawn(
            "idle".into(),
            |_| {},
            move |mut events| {
                events.add(noisy2.as_raw_fd(), 1, false).unwrap();
                let before = thread_cpu_time();
                events.idle_until_stop();
                thread_cpu_time() - before
            },
        )
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
        let w = Worker::spawn(
            "test".into(),
            |_| {},
            move |mut events| {
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
            },
        )
        .unwrap();
        kick.write(1).unwrap();
        rx.recv().unwrap();
        kick.write(1).unwrap();
        rx.recv().unwrap();
        assert_eq!(w.stop(), Some(2));
    }

    /// A worker counting kicks on an eventfd; `on_stop` runs when it sees a stop request,
    /// before it confirms it, and `before_loop` before it first waits.
    fn counter(
        before_loop: std::sync::mpsc::Receiver<()>,
        on_stop: std::sync::mpsc::Receiver<()>,
    ) -> (Worker<u32>, EventFd, std::sync::mpsc::Receiver<u32>) {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick2 = kick.try_clone().unwrap();
        let (served_tx, served) = std::sync::mpsc::channel();
        let w = Worker::spawn(
            "counter".into(),
            |_| {},
            move |mut events| {
                events.add(kick2.as_raw_fd(), 7, false).unwrap();
                let _ = before_loop.recv();
                let mut count = 0;
                loop {
                    match events.wait() {
                        Wake::Stop => {
                            let _ = on_stop.recv();
                            if events.confirm_stop() {
                                return count;
                            }
                        }
                        Wake::Ready(t) => {
                            assert_eq!(t, vec![7]);
                            let _ = kick2.read();
                            count += 1;
                            served_tx.send(count).unwrap();
                        }
                    }
                }
            },
        )
        .unwrap();
        (w, kick, served)
    }

    #[test]
    fn a_stop_given_up_on_leaves_the_thread_serving() {
        let (start, before_loop) = std::sync::mpsc::channel();
        let (release, on_stop) = std::sync::mpsc::channel();
        let (w, kick, served) = counter(before_loop, on_stop);
        start.send(()).unwrap();
        // The thread takes the request but cannot finish what it has in flight.
        let asked = Instant::now();
        let Err(w) = w.try_stop(Duration::from_millis(100)) else {
            panic!("stopped without finishing");
        };
        let waited = asked.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        // It finishes after the asker gave up: it goes on serving.
        release.send(()).unwrap();
        kick.write(1).unwrap();
        assert_eq!(served.recv_timeout(Duration::from_secs(5)), Ok(1));
        // A later request it can finish in time stops it.
        release.send(()).unwrap();
        assert_eq!(w.try_stop(Duration::from_secs(5)).ok(), Some(Some(1)));
    }

    #[test]
    fn a_stop_withdrawn_before_the_thread_saw_it_is_forgotten() {
        let (start, before_loop) = std::sync::mpsc::channel();
        let (release, on_stop) = std::sync::mpsc::channel();
        let (w, kick, served) = counter(before_loop, on_stop);
        // The thread is busy outside its loop (a long synchronous write) the whole time.
        let Err(w) = w.try_stop(Duration::from_millis(50)) else {
            panic!("stopped while busy");
        };
        start.send(()).unwrap();
        kick.write(1).unwrap();
        assert_eq!(served.recv_timeout(Duration::from_secs(5)), Ok(1));
        // Stopping for good still works after a withdrawn request.
        release.send(()).unwrap();
        assert_eq!(w.stop(), Some(1));
    }

    #[test]
    fn a_thread_that_already_ended_is_not_taken_for_a_busy_one() {
        // A body that ends on its own, as a device loop does when its epoll fails.
        let w = Worker::spawn("ended".into(), |_| {}, |_events| 7u32).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        assert_eq!(w.try_stop(Duration::from_secs(5)).ok(), Some(Some(7)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_panic_ends_the_thread_alone_and_is_reported() {
        let (told, heard) = std::sync::mpsc::channel();
        let (kick, kicked) = std::sync::mpsc::channel::<u32>();
        let w = Worker::spawn(
            "doomed".into(),
            move |why| told.send(why.to_string()).unwrap(),
            move |_events| -> u32 {
                let n = kicked.recv().unwrap();
                panic!("descriptor {n} points nowhere");
            },
        )
        .unwrap();
        kick.send(7).unwrap();
        let why = heard.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(why, "descriptor 7 points nowhere");
        // A snapshot's pause finds the thread gone at once, neither busy nor hung.
        let started = Instant::now();
        assert!(matches!(w.try_stop(Duration::from_secs(5)), Ok(None)));
        assert!(started.elapsed() < Duration::from_secs(1));

        // `stop` (a reset) too, and a literal message comes through as well.
        let (told, heard) = std::sync::mpsc::channel();
        let w = Worker::spawn(
            "doomed".into(),
            move |why| told.send(why.to_string()).unwrap(),
            |_events| -> u32 { panic!("plain") },
        )
        .unwrap();
        assert_eq!(heard.recv_timeout(Duration::from_secs(5)).unwrap(), "plain");
        assert_eq!(w.stop(), None);
    }
}
