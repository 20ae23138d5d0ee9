//! Picking an instance for one request type: power-of-two-choices over the published weights, where each of
//! the two candidates is drawn by weighted random and the one with the lower local cost wins. The cost
//! combines the SDK's own fast feedback — requests in flight, a latency EWMA and a decaying error rate — so a
//! client reacts to a slow or failing instance before the next load report does, and randomisation keeps
//! many clients reading the same table from herding onto one instance.
//!
//! **Invariant**: a [`Table`] is immutable once built and swapped whole; feedback lives in [`Stats`] (atomics
//! only), one per request type and instance, shared across table versions, so a new list keeps what the
//! client learned. Latency and in-flight counts are per type because request types cost very different
//! amounts: an instance slow at orders may be fine for browsing, and a mixed average would hide it. An
//! ejection is per instance (a refused connection is the instance's fault, whatever the type). Picking takes
//! no lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use xcluster_proto::directory::InstanceState;

/// Latency assumed for an instance the client has not measured yet, in microseconds.
const UNKNOWN_LATENCY_US: u64 = 1_000;
/// EWMA smoothing: the newest sample's share, in 1/16ths.
const EWMA_NEW_SIXTEENTHS: u64 = 4;
/// Error-rate scale: 1_000 means every recent request failed.
const ERR_SCALE: u32 = 1_000;

/// A monotonic millisecond clock shared by a client's tasks (atomics store times as u64).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The client's live feedback about one instance for one request type, updated with relaxed atomics: a lost
/// update costs a little precision, never correctness.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) in_flight: AtomicU32,
    /// Latency EWMA in microseconds; 0 until the first sample.
    pub(crate) ewma_us: AtomicU64,
    /// Decaying error rate, 0..=ERR_SCALE.
    pub(crate) err_rate: AtomicU32,
    /// Until when (Clock ms) the instance is ejected; 0 when not. Shared by every type's stats of the instance.
    pub(crate) ejected_until_ms: Arc<AtomicU64>,
}

impl Stats {
    /// Stats for one more request type of an instance whose ejection clock is `ejection`.
    pub(crate) fn sharing_ejection(ejection: Arc<AtomicU64>) -> Self {
        Self {
            ejected_until_ms: ejection,
            ..Self::default()
        }
    }

    pub(crate) fn record_success(&self, latency: Duration) {
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old.saturating_mul(16 - EWMA_NEW_SIXTEENTHS) + sample.saturating_mul(EWMA_NEW_SIXTEENTHS)) / 16
        };
        self.ewma_us.store(new, Ordering::Relaxed);
        let e = self.err_rate.load(Ordering::Relaxed);
        self.err_rate.store(e - e / 8, Ordering::Relaxed);
    }

    pub(crate) fn record_error(&self) {
        let e = self.err_rate.load(Ordering::Relaxed);
        self.err_rate
            .store((e - e / 8 + ERR_SCALE / 8).min(ERR_SCALE), Ordering::Relaxed);
    }

    pub(crate) fn eject(&self, clock: &Clock, period: Duration) {
        let until = clock
            .now_ms()
            .saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.record_error();
    }

    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// The local cost of sending one more request here, per unit of published weight. Lower is better.
    fn cost(&self, weight: u32) -> f64 {
        let in_flight = f64::from(self.in_flight.load(Ordering::Relaxed)) + 1.0;
        let lat = match self.ewma_us.load(Ordering::Relaxed) {
            0 => UNKNOWN_LATENCY_US,
            v => v,
        } as f64;
        // Errors count as load: a fast-failing instance must not look attractive.
        let err = 1.0 + 4.0 * f64::from(self.err_rate.load(Ordering::Relaxed)) / f64::from(ERR_SCALE);
        in_flight * lat * err / f64::from(weight.max(1))
    }
}

/// One pickable entry of a table.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: Arc<str>,
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) state: InstanceState,
    pub(crate) stats: Arc<Stats>,
}

/// An immutable snapshot of one request type's list, ready for picking.
#[derive(Debug)]
pub(crate) struct Table {
    pub(crate) version: u64,
    /// Every entry of the list (for state reports).
    pub(crate) all: Vec<Entry>,
    /// Indices into `all` of pickable entries (Up or SlowStart, weight > 0) and their cumulative weights.
    /// When there is none, every entry that is not drained, at equal weight (panic mode).
    pickable: Vec<usize>,
    cumulative: Vec<u64>,
    /// No entry was Up or SlowStart with a weight, so `pickable` is the panic set.
    panic: bool,
}

impl Table {
    pub(crate) fn new(version: u64, all: Vec<Entry>) -> Self {
        let mut pickable = Vec::new();
        let mut cumulative = Vec::new();
        let mut sum = 0u64;
        for (i, e) in all.iter().enumerate() {
            if e.weight > 0 && matches!(e.state, InstanceState::Up | InstanceState::SlowStart) {
                sum += u64::from(e.weight);
                pickable.push(i);
                cumulative.push(sum);
            }
        }
        // Panic mode (as Envoy's): when nothing is Up, the signals are more likely wrong than every instance
        // — a balancer that just restarted marks all instances Down until the first readiness reports. A
        // request to an instance that turns out dead fails over; refusing every request would be certain loss.
        let panic = pickable.is_empty();
        if panic {
            for (i, e) in all.iter().enumerate() {
                if e.state != InstanceState::Drained {
                    sum += 1;
                    pickable.push(i);
                    cumulative.push(sum);
                }
            }
        }
        Self {
            version,
            all,
            pickable,
            cumulative,
            panic,
        }
    }

    /// Whether some entry is Up or SlowStart with a weight (not only the panic set).
    pub(crate) fn has_healthy(&self) -> bool {
        !self.panic && !self.pickable.is_empty()
    }

    /// The weight an entry is picked by: its published weight, or 1 for all in panic mode.
    fn weight_of(&self, e: &Entry) -> u32 {
        if self.panic { 1 } else { e.weight }
    }

    /// Picks an entry not in `exclude`, preferring instances that are not ejected. When every candidate is
    /// ejected it still picks among them (an ejection is a guess; refusing all traffic would be worse).
    pub(crate) fn pick(&self, now_ms: u64, exclude: &[SocketAddr]) -> Option<&Entry> {
        let total = *self.cumulative.last()?;
        let mut rng = rand::rng();
        let usable = |e: &Entry| !exclude.contains(&e.addr) && !e.stats.is_ejected(now_ms);
        // Fast path: a few weighted draws for each of the two choices.
        let draw = |rng: &mut rand::rngs::ThreadRng| -> Option<&Entry> {
            for _ in 0..4 {
                let x = rng.random_range(0..total);
                let i = self.cumulative.partition_point(|c| *c <= x);
                let e = &self.all[*self.pickable.get(i)?];
                if usable(e) {
                    return Some(e);
                }
            }
            None
        };
        let a = draw(&mut rng);
        let b = draw(&mut rng);
        match (a, b) {
            (Some(a), Some(b)) => Some(
                if b.stats.cost(self.weight_of(b)) < a.stats.cost(self.weight_of(a)) {
                    b
                } else {
                    a
                },
            ),
            (Some(x), None) | (None, Some(x)) => Some(x),
            (None, None) => self.pick_slow(now_ms, exclude, &mut rng),
        }
    }

    /// Weighted random among the usable entries, computed afresh (many are excluded or ejected).
    fn pick_slow(
        &self,
        now_ms: u64,
        exclude: &[SocketAddr],
        rng: &mut rand::rngs::ThreadRng,
    ) -> Option<&Entry> {
        let candidates: Vec<&Entry> = self
            .pickable
            .iter()
            .map(|i| &self.all[*i])
            .filter(|e| !exclude.contains(&e.addr))
            .collect();
        let live: Vec<&Entry> = candidates
            .iter()
            .copied()
            .filter(|e| !e.stats.is_ejected(now_ms))
            .collect();
        let pool = if live.is_empty() { candidates } else { live };
        let total: u64 = pool.iter().map(|e| u64::from(self.weight_of(e))).sum();
        if total == 0 {
            return None;
        }
        let mut x = rng.random_range(0..total);
        for e in pool {
            let w = u64::from(self.weight_of(e));
            if x < w {
                return Some(e);
            }
            x -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, weight: u32, state: InstanceState) -> Entry {
        Entry {
            id: Arc::from(format!("i{port}")),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            state,
            stats: Arc::new(Stats::default()),
        }
    }

    fn counts(t: &Table, n: usize, exclude: &[SocketAddr]) -> std::collections::HashMap<u16, usize> {
        let mut m = std::collections::HashMap::new();
        for _ in 0..n {
            if let Some(e) = t.pick(0, exclude) {
                *m.entry(e.addr.port()).or_default() += 1;
            }
        }
        m
    }

    #[test]
    fn follows_weights_and_skips_unpickable() {
        let t = Table::new(
            1,
            vec![
                entry(1, 900, InstanceState::Up),
                entry(2, 100, InstanceState::SlowStart),
                entry(3, 5000, InstanceState::Down),
                entry(4, 5000, InstanceState::Drained),
                entry(5, 0, InstanceState::Up),
            ],
        );
        let c = counts(&t, 10_000, &[]);
        assert_eq!(c.keys().filter(|p| **p > 2).count(), 0, "{c:?}");
        let (a, b) = (c[&1] as f64, c[&2] as f64);
        // p2c over weights sharpens the split; the heavy instance must dominate, the light one still gets some.
        assert!(a > 5.0 * b && b > 0.0, "{c:?}");
    }

    #[test]
    fn with_nothing_up_every_instance_but_drained_ones_is_used() {
        let t = Table::new(
            1,
            vec![
                entry(1, 0, InstanceState::Down),
                entry(2, 700, InstanceState::Down),
                entry(3, 100, InstanceState::Drained),
            ],
        );
        assert!(!t.has_healthy());
        let c = counts(&t, 4000, &[]);
        assert_eq!(c.get(&3), None, "{c:?}");
        // Equal weights in panic mode: the published (stale) weights mean nothing.
        assert!(c[&1] > 1000 && c[&2] > 1000, "{c:?}");
        assert!(
            Table::new(1, vec![entry(1, 5, InstanceState::Drained)])
                .pick(0, &[])
                .is_none()
        );
        let up = Table::new(1, vec![entry(1, 5, InstanceState::Up)]);
        assert!(up.has_healthy());
    }

    #[test]
    fn ejected_and_excluded_instances_are_avoided() {
        let t = Table::new(
            1,
            vec![entry(1, 100, InstanceState::Up), entry(2, 100, InstanceState::Up)],
        );
        t.all[1].stats.ejected_until_ms.store(10, Ordering::Relaxed);
        assert_eq!(counts(&t, 1000, &[]).get(&2), None);
        // Once the ejection has passed it is picked again.
        let later = (0..1000)
            .filter_map(|_| t.pick(11, &[]))
            .filter(|e| e.addr.port() == 2)
            .count();
        assert!(later > 0);
        let a1 = t.all[0].addr;
        // Everything else excluded: an ejected instance is still better than nothing.
        assert_eq!(t.pick(0, &[a1]).map(|e| e.addr.port()), Some(2));
        assert!(t.pick(0, &[a1, t.all[1].addr]).is_none());
        assert!(Table::new(1, vec![]).pick(0, &[]).is_none());
    }

    #[test]
    fn local_feedback_shifts_load_away_from_slow_and_failing_instances() {
        let t = Table::new(
            1,
            vec![entry(1, 100, InstanceState::Up), entry(2, 100, InstanceState::Up)],
        );
        for _ in 0..20 {
            t.all[0].stats.record_success(Duration::from_millis(40));
            t.all[1].stats.record_success(Duration::from_millis(1));
        }
        let c = counts(&t, 4000, &[]);
        assert!(c[&2] > 2 * c[&1], "{c:?}");
        for _ in 0..20 {
            t.all[1].stats.record_success(Duration::from_millis(40));
            t.all[1].stats.record_error();
        }
        let c = counts(&t, 4000, &[]);
        assert!(c[&1] > 2 * c[&2], "{c:?}");
    }
}
