//! Transaction degrade: the levels, the circuit breakers that choose one automatically, and the manual
//! override. Degrade relaxes synchrony and freshness only; every level runs the same conditional stock
//! decrement in the same transaction as the order and outbox rows, so the invariants hold at all of them.
//!
//! - `sync`: one transaction per order, weak dependencies (points, notifications) written in it.
//! - `queued`: orders go through an in-process queue and are committed in groups (one fsync per group, still
//!   before any answer leaves); weak dependencies are deferred to the durable outbox.
//! - `shed`: as `queued`, and the admission limit is halved (tighter rate limit).
//! - `read_only`: browsing and reads only; customers' writes get a retryable 503. The `admin` type's calls
//!   (token-checked, few) still pass, or the operator could not lift the level by hand.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A degrade level, from the most synchronous to the most restricted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Sync,
    Queued,
    Shed,
    ReadOnly,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "sync" => Some(Level::Sync),
            "queued" => Some(Level::Queued),
            "shed" => Some(Level::Shed),
            "read_only" => Some(Level::ReadOnly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Sync => "sync",
            Level::Queued => "queued",
            Level::Shed => "shed",
            Level::ReadOnly => "read_only",
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Sync,
            1 => Level::Queued,
            2 => Level::Shed,
            _ => Level::ReadOnly,
        }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A circuit breaker over one signal: it opens when the signal crosses its threshold, stays open for
/// `open_for`, then lets one sample decide (half-open): below the threshold it closes, above it re-opens.
#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: BreakerState,
    opened_at: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed,
            opened_at: None,
        }
    }
}

impl Breaker {
    /// Feeds one sample; `tripped` says whether the signal is over its threshold now.
    pub fn observe(&mut self, tripped: bool, now: Instant, open_for: Duration) -> BreakerState {
        self.state = match self.state {
            BreakerState::Closed if tripped => {
                self.opened_at = Some(now);
                BreakerState::Open
            }
            BreakerState::Closed => BreakerState::Closed,
            BreakerState::Open => {
                let since = self.opened_at.map(|t| now.duration_since(t)).unwrap_or_default();
                if since >= open_for {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
            BreakerState::HalfOpen if tripped => {
                self.opened_at = Some(now);
                BreakerState::Open
            }
            BreakerState::HalfOpen => {
                self.opened_at = None;
                BreakerState::Closed
            }
        };
        self.state
    }

    fn is_open(&self) -> bool {
        self.state != BreakerState::Closed
    }
}

/// The breakers that pick the automatic level.
#[derive(Debug, Default)]
pub struct Breakers {
    pub latency: Breaker,
    pub errors: Breaker,
    pub queue: Breaker,
}

/// One sample of the signals the breakers watch.
#[derive(Debug, Clone, Copy)]
pub struct Signals {
    pub store_latency: Duration,
    pub error_ratio: f64,
    pub queue_depth: u64,
}

/// Thresholds (from config).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub latency: Duration,
    pub error_ratio: f64,
    pub queue_depth: u64,
    pub open_for: Duration,
}

impl Breakers {
    /// Feeds a sample and returns the level the breakers ask for: slow store → queued (group commits
    /// absorb it); a deep outbox as well → shed; a failing store → read-only.
    pub fn observe(&mut self, s: Signals, t: Thresholds, now: Instant) -> Level {
        self.latency.observe(s.store_latency > t.latency, now, t.open_for);
        self.errors
            .observe(s.error_ratio > t.error_ratio, now, t.open_for);
        self.queue.observe(s.queue_depth > t.queue_depth, now, t.open_for);
        if self.errors.is_open() {
            Level::ReadOnly
        } else if self.queue.is_open() {
            Level::Shed
        } else if self.latency.is_open() {
            Level::Queued
        } else {
            Level::Sync
        }
    }
}

/// The live degrade state: the manual override (set through the API or config) and the automatic level.
#[derive(Debug)]
pub struct Degrade {
    level: std::sync::atomic::AtomicU8,
    manual: Mutex<Option<Level>>,
    auto: std::sync::atomic::AtomicU8,
    pub breakers: Mutex<Breakers>,
}

impl Degrade {
    pub fn new(manual: Option<Level>) -> Self {
        let level = manual.unwrap_or(Level::Sync);
        Self {
            level: std::sync::atomic::AtomicU8::new(level.as_u8()),
            manual: Mutex::new(manual),
            auto: std::sync::atomic::AtomicU8::new(Level::Sync.as_u8()),
            breakers: Mutex::new(Breakers::default()),
        }
    }

    /// The effective level (an atomic read: this is on every request's path).
    pub fn level(&self) -> Level {
        Level::from_u8(self.level.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn manual(&self) -> Option<Level> {
        *self.manual.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or clears, with `None`) the manual override.
    pub fn set_manual(&self, level: Option<Level>) {
        *self.manual.lock().unwrap_or_else(|e| e.into_inner()) = level;
        self.publish();
    }

    /// Feeds the breakers a sample (from the once-a-second sampler).
    pub fn sample(&self, s: Signals, t: Thresholds) -> Level {
        let auto = self
            .breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(s, t, Instant::now());
        self.auto
            .store(auto.as_u8(), std::sync::atomic::Ordering::Relaxed);
        self.publish();
        auto
    }

    pub fn auto_level(&self) -> Level {
        Level::from_u8(self.auto.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn publish(&self) {
        let level = self.manual().unwrap_or_else(|| self.auto_level());
        let old = self
            .level
            .swap(level.as_u8(), std::sync::atomic::Ordering::Relaxed);
        if old != level.as_u8() {
            tracing::info!(
                from = Level::from_u8(old).as_str(),
                to = level.as_str(),
                "degrade level changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        latency: Duration::from_millis(50),
        error_ratio: 0.2,
        queue_depth: 100,
        open_for: Duration::from_secs(5),
    };

    fn sig(ms: u64, err: f64, depth: u64) -> Signals {
        Signals {
            store_latency: Duration::from_millis(ms),
            error_ratio: err,
            queue_depth: depth,
        }
    }

    #[test]
    fn breaker_cycles_closed_open_half_open() {
        let mut b = Breaker::default();
        let t0 = Instant::now();
        let open = Duration::from_secs(5);
        assert_eq!(b.observe(false, t0, open), BreakerState::Closed);
        assert_eq!(b.observe(true, t0, open), BreakerState::Open);
        // Recovered signal does not close an open breaker before its time.
        assert_eq!(
            b.observe(false, t0 + Duration::from_secs(1), open),
            BreakerState::Open
        );
        assert_eq!(
            b.observe(false, t0 + Duration::from_secs(6), open),
            BreakerState::HalfOpen
        );
        // A bad trial re-opens.
        assert_eq!(
            b.observe(true, t0 + Duration::from_secs(7), open),
            BreakerState::Open
        );
        assert_eq!(
            b.observe(false, t0 + Duration::from_secs(13), open),
            BreakerState::HalfOpen
        );
        assert_eq!(
            b.observe(false, t0 + Duration::from_secs(14), open),
            BreakerState::Closed
        );
    }

    #[test]
    fn levels_follow_breakers() {
        let now = Instant::now();
        let mut b = Breakers::default();
        assert_eq!(b.observe(sig(1, 0.0, 0), T, now), Level::Sync);
        assert_eq!(b.observe(sig(80, 0.0, 0), T, now), Level::Queued);
        assert_eq!(b.observe(sig(80, 0.0, 500), T, now), Level::Shed);
        assert_eq!(b.observe(sig(80, 0.5, 500), T, now), Level::ReadOnly);
    }

    #[test]
    fn manual_override_wins() {
        let d = Degrade::new(None);
        assert_eq!(d.level(), Level::Sync);
        d.set_manual(Some(Level::ReadOnly));
        d.sample(sig(1, 0.0, 0), T);
        assert_eq!(d.level(), Level::ReadOnly);
        d.set_manual(None);
        assert_eq!(d.level(), Level::Sync);
        for l in [Level::Sync, Level::Queued, Level::Shed, Level::ReadOnly] {
            assert_eq!(Level::parse(l.as_str()), Some(l));
            assert_eq!(Level::from_u8(l.as_u8()), l);
        }
    }
}
