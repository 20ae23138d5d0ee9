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

impl BreakerState {
    /// Its value in `xcluster_app_degrade_breaker_state`: 0 closed, 0.5 half-open (the trial), 1 open, so
    /// `> 0` reads "not closed" and a breaker whose trials keep failing stays near 1.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 0.5,
            BreakerState::Open => 1.0,
        }
    }
}

/// A circuit breaker over one signal: it opens when the signal crosses its threshold, waits, then lets one
/// sample decide (half-open): below the threshold it closes, above it re-opens.
///
/// The wait backs off, as Envoy's ejection time does: the first opening waits `open_min`, each failed trial
/// doubles the wait up to `open_max`, and a breaker that trips again within `open_max` of closing starts from
/// its last wait doubled. A short store outage (a restart) then costs about a second of refused writes, not
/// the whole `open_max`, while a store that keeps failing is tried at most once per `open_max`.
#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: BreakerState,
    opened_at: Option<Instant>,
    /// The current (or, once closed, the last) wait before a trial.
    wait: Duration,
    closed_at: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed,
            opened_at: None,
            wait: Duration::ZERO,
            closed_at: None,
        }
    }
}

/// How long an open breaker waits: from `min` (capped by `max`), doubled per failed trial up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenWait {
    pub min: Duration,
    pub max: Duration,
}

impl OpenWait {
    fn first(self) -> Duration {
        self.min.min(self.max)
    }

    fn after(self, wait: Duration) -> Duration {
        wait.saturating_mul(2).clamp(self.first(), self.max)
    }
}

impl Breaker {
    /// Feeds one sample; `tripped` says whether the signal is over its threshold now.
    pub fn observe(&mut self, tripped: bool, now: Instant, open: OpenWait) -> BreakerState {
        self.state = match self.state {
            BreakerState::Closed if tripped => {
                // Flapping (tripping again soon after closing) backs off as a failed trial does.
                let soon = self.closed_at.is_some_and(|t| now.duration_since(t) < open.max);
                self.wait = if soon { open.after(self.wait) } else { open.first() };
                self.opened_at = Some(now);
                BreakerState::Open
            }
            BreakerState::Closed => BreakerState::Closed,
            BreakerState::Open => {
                let since = self.opened_at.map(|t| now.duration_since(t)).unwrap_or_default();
                // A wait shortened by a reload applies at once.
                if since >= self.wait.min(open.max) {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
            BreakerState::HalfOpen if tripped => {
                self.wait = open.after(self.wait);
                self.opened_at = Some(now);
                BreakerState::Open
            }
            BreakerState::HalfOpen => {
                self.opened_at = None;
                self.closed_at = Some(now);
                BreakerState::Closed
            }
        };
        self.state
    }

    /// The wait of the current opening (zero while it has never opened).
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Whether its level holds. Half-open lifts it for the trial sample: the trial is the traffic itself,
    /// as a circuit breaker's half-open call is, so a store that is back takes orders a sample sooner (one
    /// that is not answers the trial's writes with the same retryable 503 read-only would have).
    fn is_open(&self) -> bool {
        self.state == BreakerState::Open
    }
}

/// The breakers that pick the automatic level.
#[derive(Debug, Default)]
pub struct Breakers {
    pub latency: Breaker,
    pub errors: Breaker,
    pub queue: Breaker,
}

/// The breakers' names, as logs, `/admin/degrade` and the `breaker` label of the metrics give them.
pub const BREAKER_NAMES: [&str; 3] = ["latency", "errors", "queue"];

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
    pub open: OpenWait,
}

impl Breakers {
    /// Feeds a sample and returns the level the breakers ask for: slow store → queued (group commits
    /// absorb it); a deep outbox as well → shed; a failing store → read-only.
    pub fn observe(&mut self, s: Signals, t: Thresholds, now: Instant) -> Level {
        let [latency, errors, queue] = BREAKER_NAMES;
        let breakers = [
            (latency, &mut self.latency, s.store_latency > t.latency),
            (errors, &mut self.errors, s.error_ratio > t.error_ratio),
            (queue, &mut self.queue, s.queue_depth > t.queue_depth),
        ];
        for (name, breaker, tripped) in breakers {
            let before = breaker.state;
            let after = breaker.observe(tripped, now, t.open);
            if before == BreakerState::Closed && after == BreakerState::Open {
                ::metrics::counter!(crate::metrics::DEGRADE_BREAKER_TRIPS_TOTAL, "breaker" => name)
                    .increment(1);
            }
            if after != before {
                // The operator's record of why the level moved (the level's own change is logged too).
                tracing::info!(
                    breaker = name,
                    from = ?before,
                    to = ?after,
                    wait_ms = breaker.wait.as_millis() as u64,
                    "degrade breaker changed"
                );
            }
        }
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

    /// Each breaker's state, named as in [`BREAKER_NAMES`].
    pub fn states(&self) -> [(&'static str, BreakerState); 3] {
        let [latency, errors, queue] = BREAKER_NAMES;
        [
            (latency, self.latency.state),
            (errors, self.errors.state),
            (queue, self.queue.state),
        ]
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
        let d = Self {
            level: std::sync::atomic::AtomicU8::new(level.as_u8()),
            manual: Mutex::new(manual),
            auto: std::sync::atomic::AtomicU8::new(Level::Sync.as_u8()),
            breakers: Mutex::new(Breakers::default()),
        };
        d.publish();
        d
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

    /// Feeds the breakers a sample (from the once-a-second sampler), taken at `now`.
    pub fn sample(&self, s: Signals, t: Thresholds, now: Instant) -> Level {
        let auto = self
            .breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(s, t, now);
        self.auto
            .store(auto.as_u8(), std::sync::atomic::Ordering::Relaxed);
        self.publish();
        auto
    }

    /// Each breaker's state (for the metrics; the sampler reads it once a second, off the request path).
    pub fn breaker_states(&self) -> [(&'static str, BreakerState); 3] {
        self.breakers.lock().unwrap_or_else(|e| e.into_inner()).states()
    }

    pub fn auto_level(&self) -> Level {
        Level::from_u8(self.auto.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Takes the level the override or the breakers say, and shows it and the override on `/metrics` (here,
    /// so no path that changes either can leave the gauges behind).
    fn publish(&self) {
        // Under the override's lock until the level is stored: a sample's publish that read no override
        // could store its level after the override's own, and writes were taken for up to a second after
        // `POST /admin/degrade` had answered `read_only`.
        let held = self.manual.lock().unwrap_or_else(|e| e.into_inner());
        let manual = *held;
        let level = manual.unwrap_or_else(|| self.auto_level());
        metrics::gauge!(crate::metrics::DEGRADE_LEVEL).set(f64::from(level.as_u8()));
        let by_hand = manual.map_or(-1.0, |l| f64::from(l.as_u8()));
        metrics::gauge!(crate::metrics::DEGRADE_MANUAL_LEVEL).set(by_hand);
        let old = self
            .level
            .swap(level.as_u8(), std::sync::atomic::Ordering::Relaxed);
        drop(held);
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
        open: OpenWait {
            min: Duration::from_secs(5),
            max: Duration::from_secs(5),
        },
    };

    fn sig(ms: u64, err: f64, depth: u64) -> Signals {
        Signals {
            store_latency: Duration::from_millis(ms),
            error_ratio: err,
            queue_depth: depth,
        }
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn breaker_cycles_closed_open_half_open() {
        let mut b = Breaker::default();
        let t0 = Instant::now();
        let open = T.open;
        assert_eq!(b.observe(false, t0, open), BreakerState::Closed);
        assert_eq!(b.observe(true, t0, open), BreakerState::Open);
        // Recovered signal does not close an open breaker before its time.
        assert_eq!(b.observe(false, at(t0, 1), open), BreakerState::Open);
        assert_eq!(b.observe(false, at(t0, 6), open), BreakerState::HalfOpen);
        // A bad trial re-opens.
        assert_eq!(b.observe(true, at(t0, 7), open), BreakerState::Open);
        assert_eq!(b.observe(false, at(t0, 13), open), BreakerState::HalfOpen);
        assert_eq!(b.observe(false, at(t0, 14), open), BreakerState::Closed);
    }

    /// Waits of `min_secs` doubling up to `max_secs`.
    fn waits(min_secs: u64, max_secs: u64) -> OpenWait {
        OpenWait {
            min: Duration::from_secs(min_secs),
            max: Duration::from_secs(max_secs),
        }
    }

    /// Checks the wait of each opening: tries a trial a second early (still open) and on time (half-open).
    fn open_then_trial(b: &mut Breaker, now: Instant, open: OpenWait, wait_secs: u64) -> Instant {
        assert_eq!(b.wait(), Duration::from_secs(wait_secs));
        assert_eq!(b.observe(false, at(now, wait_secs - 1), open), BreakerState::Open);
        assert_eq!(b.observe(false, at(now, wait_secs), open), BreakerState::HalfOpen);
        at(now, wait_secs)
    }

    #[test]
    fn the_wait_starts_short_and_doubles_per_failed_trial_up_to_the_max() {
        let open = waits(2, 10);
        let mut b = Breaker::default();
        let t0 = Instant::now();
        assert_eq!(b.observe(true, t0, open), BreakerState::Open);
        let mut now = open_then_trial(&mut b, t0, open, 2);
        for wait in [4, 8, 10, 10] {
            assert_eq!(b.observe(true, now, open), BreakerState::Open, "a failed trial");
            now = open_then_trial(&mut b, now, open, wait);
        }
        // A good trial closes; tripping again soon after starts from the last wait, doubled (capped).
        assert_eq!(b.observe(false, at(now, 1), open), BreakerState::Closed);
        assert_eq!(b.observe(true, at(now, 2), open), BreakerState::Open);
        now = open_then_trial(&mut b, at(now, 2), open, 10);
        // Closed for longer than the max: a new outage starts from the short wait again.
        assert_eq!(b.observe(false, at(now, 1), open), BreakerState::Closed);
        assert_eq!(b.observe(true, at(now, 12), open), BreakerState::Open);
        open_then_trial(&mut b, at(now, 12), open, 2);
    }

    #[test]
    fn a_min_above_the_max_waits_the_max_and_a_shorter_max_applies_at_once() {
        let (long, short) = (waits(30, 60), waits(30, 3));
        let mut b = Breaker::default();
        let t0 = Instant::now();
        assert_eq!(b.observe(true, t0, long), BreakerState::Open);
        assert_eq!(b.observe(false, at(t0, 3), long), BreakerState::Open);
        // A reload lowered the max under the running wait.
        assert_eq!(b.observe(false, at(t0, 3), short), BreakerState::HalfOpen);
        let mut b = Breaker::default();
        assert_eq!(b.observe(true, t0, short), BreakerState::Open);
        open_then_trial(&mut b, t0, short, 3);
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

    /// A half-open breaker lifts its level for the trial sample, whose traffic decides.
    #[test]
    fn the_trial_runs_at_the_level_below() {
        let t0 = Instant::now();
        let mut b = Breakers::default();
        assert_eq!(b.observe(sig(1, 0.5, 0), T, t0), Level::ReadOnly);
        assert_eq!(
            b.observe(sig(1, 0.0, 0), T, at(t0, 5)),
            Level::Sync,
            "the trial takes writes"
        );
        assert_eq!(b.errors.state, BreakerState::HalfOpen);
        assert_eq!(
            b.observe(sig(1, 0.5, 0), T, at(t0, 6)),
            Level::ReadOnly,
            "a failed trial"
        );
        assert_eq!(b.observe(sig(1, 0.0, 0), T, at(t0, 11)), Level::Sync);
        assert_eq!(b.observe(sig(1, 0.0, 0), T, at(t0, 12)), Level::Sync);
        assert_eq!(b.errors.state, BreakerState::Closed);
    }

    /// The metric reads each breaker by its name, and "not closed" as a value above 0.
    #[test]
    fn breaker_states_are_named_and_valued_for_the_metric() {
        let t0 = Instant::now();
        let d = Degrade::new(None);
        let gauges = |d: &Degrade| d.breaker_states().map(|(name, s)| (name, s.gauge()));
        assert_eq!(gauges(&d), [("latency", 0.0), ("errors", 0.0), ("queue", 0.0)]);
        d.sample(sig(80, 0.5, 0), T, t0);
        assert_eq!(gauges(&d), [("latency", 1.0), ("errors", 1.0), ("queue", 0.0)]);
        d.sample(sig(1, 0.0, 0), T, at(t0, 5));
        assert_eq!(gauges(&d), [("latency", 0.5), ("errors", 0.5), ("queue", 0.0)]);
    }

    #[test]
    fn manual_override_wins() {
        let d = Degrade::new(None);
        assert_eq!(d.level(), Level::Sync);
        d.set_manual(Some(Level::ReadOnly));
        d.sample(sig(1, 0.0, 0), T, Instant::now());
        assert_eq!(d.level(), Level::ReadOnly);
        d.set_manual(None);
        assert_eq!(d.level(), Level::Sync);
        for l in [Level::Sync, Level::Queued, Level::Shed, Level::ReadOnly] {
            assert_eq!(Level::parse(l.as_str()), Some(l));
            assert_eq!(Level::from_u8(l.as_u8()), l);
        }
    }
}
