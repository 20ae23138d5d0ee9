//! Picking an instance for one request type: power-of-two-choices over the published weights. Two different
//! instances are drawn by weighted random; the second wins only when its local cost is clearly lower (below
//! [`SWITCH_RATIO`] of the first's), otherwise the first draw stands. The cost combines the SDK's own fast
//! feedback — requests in flight, a latency EWMA and a decaying error rate — so a client reacts to a slow or
//! failing instance before the next load report does, and randomisation keeps many clients reading the same
//! table from herding onto one instance.
//!
//! Why this shape:
//! - **Two different instances.** If both draws could land on the same one, a slow instance would still take
//!   (its share)² of the requests with no comparison made: a ninth of them among three equal weights, and
//!   those set the tail.
//! - **The first draw stands unless the second is clearly better.** When the local signals do not tell two
//!   instances apart, the split is the published weights' (the balancers see every client's load; one client
//!   sees only its own). Comparing cost per weight instead would send everything to the heaviest instance
//!   whenever a client is lightly loaded, and every such client at once.
//!
//! **Invariant**: a [`Table`] is immutable once built and swapped whole; feedback lives in [`Stats`] (atomics
//! only), one per request type and instance, shared across table versions, so a new list keeps what the
//! client learned. Picking takes no lock.
//!
//! What is per type and what is per instance follows what each signal means:
//! - **Latency and errors are per type**: request types cost very different amounts, and an instance slow at
//!   orders may be fine for browsing; a mixed average would hide it.
//! - **Requests in flight are per instance** (every type's): they share the instance's workers, so a browse
//!   request sent where three slow orders are running waits behind them. Counting only browse requests
//!   there would miss exactly the queue that makes the tail (HAProxy's `leastconn` counts the same way).
//!   What counts against an instance is its *excess*: requests in flight beyond its weight's share of all
//!   this client's requests in flight. Raw counts would split a 9:1 table evenly for a client with two
//!   requests at a time (the heavy one nearly always has one more), against the weights.
//!   The excess counts by its square root: a queue is a weaker signal than a measured latency, since most of
//!   what is in flight may be waiting elsewhere (an order for the store's write lock, not the workers). Taken
//!   whole, three requests in flight at a fast instance outweighed a peer measured twice as slow, and in
//!   `scripts/bench/balance` 1–1.8% of orders went to the slow instance, enough to set the order p99; with
//!   the root, 0.3–0.8%.
//! - **An ejection is per instance**: a refused connection is the instance's fault, whatever the type.
//!
//! Latency is compared with [`LATENCY_FLOOR_US`] added to each side: under a millisecond, differences are
//! noise (a cold connection, a page fault), and a client must not abandon an instance over them. The EWMA
//! moves a quarter of the way to each sample, a sample counting for at most [`OUTLIER_CLIP`] times the
//! estimate, so one stalled answer does not send an instance's share swinging for seconds while a steadily
//! slower instance shows within a few answers. (Taking slower samples whole, a "peak" EWMA, had the best
//! tail in `scripts/bench/balance`, but one slow answer left an instance unpicked — so unmeasured — until
//! its estimate faded, and a client making a few quick requests in a row would leave an instance out.) An
//! instance not measured yet is compared on its queue alone, so a new instance gets its weight's share
//! until its first answers say what it is worth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use xcluster_proto::directory::InstanceState;

/// Added to both latencies compared, in microseconds.
const LATENCY_FLOOR_US: f64 = 1_000.0;
/// A latency sample counts for at most this many times the current estimate.
const OUTLIER_CLIP: u64 = 4;
/// EWMA smoothing: the newest sample's share, in 1/16ths.
const EWMA_NEW_SIXTEENTHS: u64 = 4;
/// Error-rate scale: 1_000 means every recent request failed.
const ERR_SCALE: u32 = 1_000;
/// The second candidate wins when its cost is below this share of the first's.
const SWITCH_RATIO: f64 = 0.8;
/// What the client learned about an instance fades by half per this many milliseconds without a new sample,
/// when the balancers have cut the instance's weight for the type (to half of an even share or less).
/// The half-life sets how often an avoided instance is tried again, and those tries land in the tail: with
/// one second, a 1.5× slower instance fades back into contention about 0.3 s after each try — over 1% of
/// a type at 200 requests a second — and the SDK's order p99 came out at round robin's in
/// `scripts/bench/balance`. Four seconds stretch that to about 1.2 s.
const FADE_HALF_LIFE_MS: f64 = 4_000.0;
/// The half-life when the balancers give the instance a full share (90% of an even one or more), between
/// the two in proportion. Their figures come from every client's requests: if they see nothing wrong, what
/// made this client avoid the instance was most likely a passing queue behind another type's requests, and
/// with the long half-life that kept a healthy instance out of a type for seconds while the others crowded
/// onto it (browse at 0% of one instance for 4 s in `scripts/bench/balance`, its orders at 50%).
const FADE_SHORT_HALF_LIFE_MS: f64 = 1_000.0;
/// Relative shares (the instance's weight over the mean weight of the table) bounding the interpolation.
const FULL_SHARE: f64 = 0.9;
const CUT_SHARE: f64 = 0.5;

/// When the balancers give an instance at least this many times the lowest share of a type's weight they gave
/// it since this client last measured it, the client drops its measurement (see [`Stats::published`]).
const SUPERSEDE_RATIO: f64 = 1.5;
/// Relative shares are kept in parts per this many.
const SHARE_SCALE: f64 = 1_000_000.0;

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

/// What the client knows about one instance whatever the request type: shared by the instance's [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct InstanceStats {
    /// This client's requests of every type in flight there.
    pub(crate) in_flight: AtomicU32,
    /// This client's requests in flight anywhere: one counter shared by all its instances.
    pub(crate) total_in_flight: Arc<AtomicU32>,
    /// Until when (Clock ms) the instance is ejected; 0 when not.
    pub(crate) ejected_until_ms: AtomicU64,
}

impl InstanceStats {
    /// One more request of this client in flight here.
    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.total_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request counted by [`InstanceStats::start`] has ended.
    pub(crate) fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.total_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's live feedback about one instance for one request type, updated with relaxed atomics: a lost
/// update costs a little precision, never correctness.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Latency EWMA in microseconds; 0 until the first sample.
    pub(crate) ewma_us: AtomicU64,
    /// Decaying error rate, 0..=ERR_SCALE.
    pub(crate) err_rate: AtomicU32,
    /// When (Clock ms) the last sample came.
    stamp_ms: AtomicU64,
    /// The instance's relative share of the type's published weight (its weight over the table's mean, in
    /// parts per `SHARE_SCALE`; 0 before any table) in the latest table, and the lowest since the last
    /// sample (0 before any sample).
    published_share: AtomicU32,
    low_share: AtomicU32,
    /// Shared by every type's stats of the instance.
    pub(crate) instance: Arc<InstanceStats>,
}

impl Stats {
    /// Stats for one more request type of `instance`.
    pub(crate) fn of_instance(instance: Arc<InstanceStats>) -> Self {
        Self {
            instance,
            ..Self::default()
        }
    }

    /// How much of what was learned still holds at `now_ms`: 1 right after a sample, halving every
    /// [`FADE_HALF_LIFE_MS`] after. Without it an instance avoided for being slow would never be sampled
    /// again, and would stay avoided after it recovered; faded, it looks cheap after a few seconds, gets a
    /// request, and that request's latency says whether it is still slow.
    fn fade(&self, now_ms: u64) -> f64 {
        let idle = now_ms.saturating_sub(self.stamp_ms.load(Ordering::Relaxed));
        (-(idle as f64) / self.half_life_ms()).exp2()
    }

    /// [`FADE_HALF_LIFE_MS`], or shorter as far as the balancers give the instance a full share (see
    /// [`FADE_SHORT_HALF_LIFE_MS`]); the long one before any table says.
    fn half_life_ms(&self) -> f64 {
        let rel = f64::from(self.published_share.load(Ordering::Relaxed)) / SHARE_SCALE;
        if rel <= 0.0 {
            return FADE_HALF_LIFE_MS;
        }
        let full = ((rel - CUT_SHARE) / (FULL_SHARE - CUT_SHARE)).clamp(0.0, 1.0);
        FADE_HALF_LIFE_MS + (FADE_SHORT_HALF_LIFE_MS - FADE_HALF_LIFE_MS) * full
    }

    pub(crate) fn record_success(&self, latency: Duration, now_ms: u64) {
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        let fade = self.fade(now_ms);
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            // The stored estimate is not faded (only its use in `cost` is); instead a sample after a quiet
            // spell counts for more: for as much of the old estimate as has faded, at least a quarter.
            let sample = sample.min(old.saturating_mul(OUTLIER_CLIP)) as f64;
            let weight = (1.0 - fade).max(EWMA_NEW_SIXTEENTHS as f64 / 16.0);
            let old = old as f64;
            (old + (sample - old) * weight).max(1.0) as u64
        };
        self.ewma_us.store(new, Ordering::Relaxed);
        let e = (f64::from(self.err_rate.load(Ordering::Relaxed)) * fade) as u32;
        self.err_rate.store(e - e / 8, Ordering::Relaxed);
        self.sampled(now_ms);
    }

    /// A sample came at `now_ms`, while the latest table was current.
    fn sampled(&self, now_ms: u64) {
        self.stamp_ms.store(now_ms, Ordering::Relaxed);
        let share = self.published_share.load(Ordering::Relaxed);
        self.low_share.store(share, Ordering::Relaxed);
    }

    /// Notes the instance's relative `share` of the type's weight (its weight over the table's mean) in a
    /// newly installed table. When that is at least [`SUPERSEDE_RATIO`] times the lowest it has been since
    /// this client last measured the instance, the balancers' view (from every client's requests, reported
    /// a moment ago) is newer than the client's, and the latency measured is dropped: the instance is
    /// compared on its queue alone until its next answer says what it is worth. (The lowest, not the share
    /// at the sample: a client's last sample may come just before the balancers cut the instance further,
    /// and the rise back from there is the news.)
    /// This is how a client notices that an instance it has been avoiding recovered. On its own it would
    /// try the instance again only as its estimate fades (seconds: see [`FADE_HALF_LIFE_MS`]), and then
    /// believe the answer only in part; meanwhile that type's share stays away from the instance while the
    /// others' crowd onto it. If the instance is still slow, the cost is the one answer that says so.
    pub(crate) fn published(&self, share: f64) {
        let now = (share.clamp(0.0, 4_000.0) * SHARE_SCALE).round() as u32;
        self.published_share.store(now, Ordering::Relaxed);
        let low = self.low_share.load(Ordering::Relaxed);
        if low == 0 {
            return;
        }
        if f64::from(now) >= SUPERSEDE_RATIO * f64::from(low) {
            self.ewma_us.store(0, Ordering::Relaxed);
            self.low_share.store(now, Ordering::Relaxed);
        } else if now < low {
            self.low_share.store(now, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_error(&self, now_ms: u64) {
        let e = (f64::from(self.err_rate.load(Ordering::Relaxed)) * self.fade(now_ms)) as u32;
        self.err_rate
            .store((e - e / 8 + ERR_SCALE / 8).min(ERR_SCALE), Ordering::Relaxed);
        self.sampled(now_ms);
    }

    pub(crate) fn eject(&self, clock: &Clock, period: Duration) {
        let now = clock.now_ms();
        let until = now.saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        self.instance.ejected_until_ms.store(until, Ordering::Relaxed);
        self.record_error(now);
    }

    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        self.instance.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// What sending one more request here at `now_ms` would cost, where the instance's published weight is
    /// `share` of the table's. Compared with [`Cost::below`].
    fn cost(&self, now_ms: u64, share: f64) -> Cost {
        let mine = f64::from(self.instance.in_flight.load(Ordering::Relaxed));
        let all = f64::from(self.instance.total_in_flight.load(Ordering::Relaxed));
        // The square root: see "Requests in flight" in the module docs.
        let queue = (1.0 + (mine - all * share).max(0.0)).sqrt();
        let fade = self.fade(now_ms);
        // Errors count as load: a fast-failing instance must not look attractive.
        let err = 1.0 + 4.0 * f64::from(self.err_rate.load(Ordering::Relaxed)) * fade / f64::from(ERR_SCALE);
        let latency_us = match self.ewma_us.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v as f64 * fade + LATENCY_FLOOR_US),
        };
        Cost {
            load: queue * err,
            latency_us,
        }
    }
}

/// An instance's local cost: its excess queue and errors, and its expected latency when measured.
#[derive(Debug, Clone, Copy)]
struct Cost {
    load: f64,
    latency_us: Option<f64>,
}

impl Cost {
    /// Whether this is clearly cheaper than `other`: below `ratio` of it. Latency takes part only when both
    /// were measured.
    fn below(self, other: Cost, ratio: f64) -> bool {
        let (mine, theirs) = match (self.latency_us, other.latency_us) {
            (Some(a), Some(b)) => (a, b),
            _ => (1.0, 1.0),
        };
        self.load * mine < ratio * other.load * theirs
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
    /// Indices into `all` of pickable entries (a weight above 0, not drained) and their cumulative weights.
    pickable: Vec<usize>,
    cumulative: Vec<u64>,
}

impl Table {
    pub(crate) fn new(version: u64, all: Vec<Entry>) -> Self {
        let mut pickable = Vec::new();
        let mut cumulative = Vec::new();
        let mut sum = 0u64;
        for (i, e) in all.iter().enumerate() {
            // The weight decides, as it does for the balancer's own picks (`/v1/pick`, the L4 proxy): an
            // entry listed Down with a weight is the balancer's panic mode spreading traffic over every known
            // instance, which a client picking only Up ones turned back onto the few it distrusts.
            if e.weight > 0 && e.state != InstanceState::Drained {
                sum += u64::from(e.weight);
                pickable.push(i);
                cumulative.push(sum);
            }
        }
        // A list with no weight at all is picked from by nobody: the balancers' own panic mode already gives
        // every known instance a weight when too few are usable, so such a list is an operator's choice (0% on
        // every instance, or `panic_threshold = 0` with all of them down), which the L4 proxy and `/v1/pick`
        // follow too. A panic mode of the client's own sent traffic there that no balancer would.
        Self {
            version,
            all,
            pickable,
            cumulative,
        }
    }

    /// Tells each pickable entry's feedback its relative share of the table's weight ([`Stats::published`]);
    /// called once when the table is installed.
    pub(crate) fn publish_shares(&self) {
        let Some(&total) = self.cumulative.last() else {
            return;
        };
        let n = self.pickable.len() as f64;
        for &i in &self.pickable {
            let e = &self.all[i];
            e.stats.published(Self::share(e, total) * n);
        }
    }

    /// Whether some entry has a weight.
    pub(crate) fn has_healthy(&self) -> bool {
        !self.pickable.is_empty()
    }

    /// The entry's share of the table's weight (`total`, the sum over pickable entries).
    fn share(e: &Entry, total: u64) -> f64 {
        f64::from(e.weight) / total.max(1) as f64
    }

    /// Picks an entry not in `exclude`, preferring instances that are not ejected. When every candidate is
    /// ejected it still picks among them (an ejection is a guess; refusing all traffic would be worse).
    pub(crate) fn pick(&self, now_ms: u64, exclude: &[SocketAddr]) -> Option<&Entry> {
        let total = *self.cumulative.last()?;
        let mut rng = rand::rng();
        let usable = |e: &Entry| !exclude.contains(&e.addr) && !e.stats.is_ejected(now_ms);
        // Fast path: a few weighted draws for each of the two choices. The second is drawn from the weights
        // without the first's span (`skip`: the first's position in `pickable`), so it is always another entry.
        let draw = |rng: &mut rand::rngs::ThreadRng, skip: Option<usize>| -> Option<(usize, &Entry)> {
            let (lo, hi) = match skip {
                Some(j) => (
                    j.checked_sub(1).map_or(0, |p| self.cumulative[p]),
                    self.cumulative[j],
                ),
                None => (0, 0),
            };
            let span = total - (hi - lo);
            if span == 0 {
                return None;
            }
            for _ in 0..4 {
                let mut x = rng.random_range(0..span);
                if x >= lo {
                    x += hi - lo;
                }
                let i = self.cumulative.partition_point(|c| *c <= x);
                let e = &self.all[*self.pickable.get(i)?];
                if usable(e) {
                    return Some((i, e));
                }
            }
            None
        };
        let Some((i, a)) = draw(&mut rng, None) else {
            return self.pick_slow(now_ms, exclude, &mut rng);
        };
        // No other usable instance came up: no comparison to make.
        Some(match draw(&mut rng, Some(i)).map(|(_, b)| b) {
            Some(b)
                if b.stats
                    .cost(now_ms, Self::share(b, total))
                    .below(a.stats.cost(now_ms, Self::share(a, total)), SWITCH_RATIO) =>
            {
                b
            }
            _ => a,
        })
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
        let total: u64 = pool.iter().map(|e| u64::from(e.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut x = rng.random_range(0..total);
        for e in pool {
            let w = u64::from(e.weight);
            if x < w {
                return Some(e);
            }
            x -= w;
        }
        None
    }
}

#[cfg(test)]
#[path = "picker_tests.rs"]
mod tests;
