//! A listener's `max_connection_rate` (HAProxy's `rate-limit sessions`): new connections it accepts per
//! second, across every worker of the balancer. Past the rate, accepts wait and clients wait in the kernel's
//! queue, as past `max_connections`: none is refused, the backends just see the herd at a rate they can
//! take (a flash sale's first second).
//!
//! The gate is the generic cell rate algorithm on one atomic: the time the next accept is due, moved on by
//! one interval per accept, and an accept may come up to [`BURST`] early. So after a quiet spell a
//! listener takes at most `1 + rate × BURST` at once, and over any span `t` at most that plus `rate × t`.
//! An accept that takes a turn and then finds no client (another worker took it) wastes the turn: the gate
//! errs below the rate, never above it. Like `limit`, it outlives in-place changes of its listener, and a
//! reload sets the rate live.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How early an accept may come: the burst a quiet listener takes at once is a tenth of a second's worth.
pub const BURST: Duration = Duration::from_millis(100);

/// One listener's accept rate.
#[derive(Debug)]
pub struct RateGate {
    /// Nanoseconds between two accepts at the rate; 0: no limit.
    interval: AtomicU64,
    /// When the next accept is due, in nanoseconds after `epoch`.
    due: AtomicU64,
    epoch: Instant,
}

impl Default for RateGate {
    fn default() -> Self {
        Self {
            interval: AtomicU64::new(0),
            due: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl RateGate {
    /// Sets the rate in accepts per second; 0: no limit.
    pub fn set_rate(&self, per_second: u32) {
        let interval = match per_second {
            0 => 0,
            n => 1_000_000_000 / u64::from(n),
        };
        self.interval.store(interval, Ordering::Relaxed);
    }

    /// Takes a turn to accept: `Ok` now, or how long until one may be free.
    pub fn try_take(&self) -> Result<(), Duration> {
        let interval = self.interval.load(Ordering::Relaxed);
        if interval == 0 {
            return Ok(());
        }
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let burst = u64::try_from(BURST.as_nanos()).unwrap_or(u64::MAX);
        let mut due = self.due.load(Ordering::Relaxed);
        loop {
            let start = due.max(now);
            let early = start - now;
            if early > burst {
                return Err(Duration::from_nanos(early - burst));
            }
            match (self.due).compare_exchange_weak(
                due,
                start + interval,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(d) => due = d,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_rate_every_accept_passes() {
        let g = RateGate::default();
        assert!((0..10_000).all(|_| g.try_take().is_ok()));
    }

    /// A fresh gate at 100/s lets the burst through (11: one, and 100 ms worth early), then asks for a
    /// wait of at most one interval; the total over the test's own span stays within the bound.
    #[test]
    fn a_burst_then_the_rate() {
        let g = RateGate::default();
        g.set_rate(100);
        let start = Instant::now();
        let burst = (0..1000).take_while(|_| g.try_take().is_ok()).count();
        let bound = 1 + 10 + (start.elapsed().as_secs_f64() * 100.0).ceil() as usize;
        assert!((11..=bound).contains(&burst), "{burst} at once, bound {bound}");
        let wait = g.try_take().unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
    }

    /// Over many takes spread in time, the count never passes the burst plus the rate times the span.
    #[test]
    fn no_span_takes_more_than_the_rate_allows() {
        let g = RateGate::default();
        g.set_rate(2000);
        let start = Instant::now();
        let (mut taken, mut tries) = (0usize, 0usize);
        // At least 1,000 tries as well as 200 ms: a thread preempted for the whole span would otherwise try too
        // few times to take the burst.
        while start.elapsed() < Duration::from_millis(200) || tries < 1000 {
            tries += 1;
            if g.try_take().is_ok() {
                taken += 1;
            }
            std::hint::spin_loop();
        }
        let bound = 1 + 200 + (start.elapsed().as_secs_f64() * 2000.0).ceil() as usize;
        assert!(taken <= bound, "{taken} > {bound}");
        // And it is not stuck: a fresh gate's first 201 tries take the burst, whenever they run.
        assert!(taken >= 201, "{taken}");
    }

    #[test]
    fn a_reload_may_lift_or_set_the_rate() {
        let g = RateGate::default();
        g.set_rate(1);
        assert!(g.try_take().is_ok());
        assert!(g.try_take().is_err());
        g.set_rate(0);
        assert!(g.try_take().is_ok());
    }
}
