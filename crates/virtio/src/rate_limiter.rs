//! I/O limits: token buckets for bytes and operations per second, so one VM's disk or
//! network traffic cannot starve its neighbours.
//!
//! Each bucket holds up to `burst` tokens and refills at `rate` per second. A request
//! takes one operation token and as many byte tokens as it moves. When a bucket is short,
//! the device leaves the request on its queue and arms a timerfd for the moment enough
//! tokens will have accumulated; the device thread sleeps in epoll until then, so a
//! throttled device costs no CPU. A request larger than a whole bucket is let through
//! when the bucket is full and leaves it in debt, so big requests are slowed, never
//! stuck.

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// Rate and burst for one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Tokens added per second (> 0).
    pub rate: u64,
    /// Bucket size; tokens available at once (defaults to one second's worth).
    pub burst: u64,
}

impl Limit {
    pub fn per_second(rate: u64) -> Self {
        Limit { rate, burst: rate }
    }
}

/// The limits of one device; either may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub bytes: Option<Limit>,
    pub ops: Option<Limit>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }
}

#[derive(Debug)]
struct Bucket {
    limit: Limit,
    /// May go negative after an oversized request.
    tokens: i128,
    last: Instant,
}

impl Bucket {
    fn new(limit: Limit, now: Instant) -> Self {
        Bucket {
            limit,
            tokens: i128::from(limit.burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = elapsed.as_nanos() as i128 * i128::from(self.limit.rate) / 1_000_000_000;
        if add > 0 {
            self.tokens = (self.tokens + add).min(i128::from(self.limit.burst));
            // Advance by the time those tokens represent, keeping the remainder.
            let used = Duration::from_nanos(
                (add * 1_000_000_000 / i128::from(self.limit.rate)).min(u64::MAX as i128) as u64,
            );
            self.last += used;
            if self.tokens == i128::from(self.limit.burst) {
                self.last = now;
            }
        }
    }

    /// How long until `n` tokens may be taken (zero: now).
    fn wait_for(&self, n: u64) -> Duration {
        let need = i128::from(n.min(self.limit.burst));
        if self.tokens >= need {
            return Duration::ZERO;
        }
        let missing = need - self.tokens;
        let rate = i128::from(self.limit.rate);
        let nanos = (missing * 1_000_000_000 + rate - 1) / rate;
        Duration::from_nanos(nanos.min(u64::MAX as i128) as u64)
    }

    fn take(&mut self, n: u64) {
        self.tokens -= i128::from(n);
    }
}

/// What a device consults before each request.
pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    pub fn new(limits: Limits) -> std::io::Result<Self> {
        let now = Instant::now();
        for l in [limits.bytes, limits.ops].into_iter().flatten() {
            if l.rate == 0 || l.burst == 0 {
                return Err(std::io::Error::other(
                    "a rate limit needs a rate and burst above 0",
                ));
            }
        }
        Ok(RateLimiter {
            bytes: limits.bytes.map(|l| Bucket::new(l, now)),
            ops: limits.ops.map(|l| Bucket::new(l, now)),
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Takes one operation and `bytes` bytes if both buckets allow it now. If not, takes
    /// nothing, arms the timer for when they will, and returns false; the device should
    /// stop taking requests until [`RateLimiter::timer_fired`].
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.bytes {
            b.refill(now);
            wait = wait.max(b.wait_for(bytes));
        }
        if let Some(o) = &mut self.ops {
            o.refill(now);
            wait = wait.max(o.wait_for(1));
        }
        if wait > Duration::ZERO {
            self.blocked = true;
            // At least a millisecond: waking for microseconds of tokens wastes CPU.
            let wait = wait.max(Duration::from_millis(1));
            if let Err(e) = self.timer.reset(wait, None) {
                tracing::warn!("arming the rate-limit timer failed: {e}; not limiting");
                self.blocked = false;
                return true;
            }
            return false;
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(o) = &mut self.ops {
            o.take(1);
        }
        true
    }

    /// Takes `bytes` after the fact (the size of a received packet is known only once it
    /// has been read); the bucket may go into debt, which later requests wait out.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
    }

    /// Call when the timer fd is readable: the device may try again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

/// Parses a rate like `10M` (bytes: K/M/G are powers of 1024), `5000` or `2k` (ops: plain
/// numbers, k = 1000 is not used; K is 1024 for both for one rule).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a rate (e.g. 500, 64K, 10M, 1G)"))?;
    match n.checked_mul(mult) {
        Some(0) => Err(format!("'{text}': a rate must be above 0")),
        Some(v) => Ok(v),
        None => Err(format!("'{text}' is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(bytes: Option<Limit>, ops: Option<Limit>) -> RateLimiter {
        RateLimiter::new(Limits { bytes, ops }).unwrap()
    }

    #[test]
    fn burst_then_throttle_then_refill() {
        let mut l = limiter(
            Some(Limit {
                rate: 1000,
                burst: 1000,
            }),
            None,
        );
        let t0 = Instant::now();
        assert!(l.consume_at(600, t0));
        assert!(l.consume_at(400, t0));
        assert!(!l.consume_at(100, t0), "bucket empty");
        assert!(l.is_blocked());
        assert!(
            !l.consume_at(100, t0 + Duration::from_secs(5)),
            "blocked until the timer"
        );
        l.blocked = false;
        assert!(
            !l.consume_at(100, t0 + Duration::from_millis(50)),
            "only 50 tokens back"
        );
        l.blocked = false;
        assert!(l.consume_at(100, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn long_run_rate_matches_the_limit() {
        // 10 MiB/s with a 1 MiB burst, 64 KiB requests over 10 simulated seconds.
        let mut l = limiter(
            Some(Limit {
                rate: 10 << 20,
                burst: 1 << 20,
            }),
            None,
        );
        let t0 = Instant::now();
        let mut now = t0;
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(10) {
            if l.consume_at(64 << 10, now) {
                moved += 64 << 10;
            } else {
                l.blocked = false;
                now += Duration::from_micros(500);
            }
        }
        let rate = moved as f64 / 10.0 / f64::from(1 << 20);
        assert!((9.9..=10.2).contains(&rate), "{rate} MiB/s");
    }

    #[test]
    fn oversized_requests_pass_when_full_and_leave_debt() {
        let mut l = limiter(
            Some(Limit {
                rate: 100,
                burst: 100,
            }),
            None,
        );
        let t0 = Instant::now();
        assert!(
            l.consume_at(1000, t0),
            "full bucket lets a big request through"
        );
        l.blocked = false;
        assert!(
            !l.consume_at(1, t0 + Duration::from_secs(5)),
            "still paying off 900"
        );
        l.blocked = false;
        assert!(l.consume_at(1, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn ops_and_bytes_both_apply() {
        let mut l = limiter(
            Some(Limit::per_second(1 << 30)),
            Some(Limit { rate: 10, burst: 2 }),
        );
        let t0 = Instant::now();
        assert!(l.consume_at(1, t0));
        assert!(l.consume_at(1, t0));
        assert!(!l.consume_at(1, t0));
        l.blocked = false;
        assert!(l.consume_at(1, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn the_timer_fires_when_tokens_are_back() {
        let mut l = limiter(
            None,
            Some(Limit {
                rate: 100,
                burst: 1,
            }),
        );
        assert!(l.consume(0));
        let start = Instant::now();
        assert!(!l.consume(0));
        let mut fds = [libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
        l.timer_fired();
        assert!(start.elapsed() >= Duration::from_millis(5));
        assert!(l.consume(0));
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(RateLimiter::new(Limits {
            bytes: Some(Limit { rate: 0, burst: 1 }),
            ops: None
        })
        .is_err());
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("500"), Ok(500));
        assert_eq!(parse_rate("64K"), Ok(64 << 10));
        assert_eq!(parse_rate("10M"), Ok(10 << 20));
        assert_eq!(parse_rate("1g"), Ok(1 << 30));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("").is_err());
        assert!(parse_rate("99999999999G").is_err());
    }
}
