//! The weight formula: pure functions from an instance's reported load and a request type's cost profile to
//! an integer weight, plus damping, slow start and the panic threshold. No clock and no I/O: every input is
//! an argument, so two balancers fed the same reports compute the same integers. ARCHITECTURE.md ("lb")
//! gives the formula and the reason for each term.

use std::collections::BTreeMap;
use std::time::Duration;

use xcluster_proto::directory::MAX_WEIGHT;
use xcluster_proto::stats::TypeStats;

/// How much of each resource a request type uses (relative shares) and what one request costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypeProfile {
    pub cpu: f64,
    pub mem: f64,
    pub queue: f64,
    /// Relative cost of one request; each pick adds it to the instance's predicted load.
    pub cost: f64,
}

impl TypeProfile {
    /// The cost in thousandths, the unit of the predicted-load counters.
    pub fn cost_milli(&self) -> u64 {
        (self.cost * 1000.0).round().max(1.0) as u64
    }
}

/// The tunables of the directory (validated config).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub types: BTreeMap<String, TypeProfile>,
    pub report_ttl: Duration,
    pub forget_after: Duration,
    pub list_ttl: Duration,
    pub watch_timeout: Duration,
    pub panic_threshold: f64,
    pub slow_start: Duration,
    pub slow_start_min: f64,
    pub damping: f64,
    pub max_step: f64,
    pub error_penalty: f64,
    pub full_weight_cores: f64,
    /// An instance whose service time for a type is within this factor of the type's reference keeps its
    /// whole weight; beyond it the weight scales down with the ratio. 0 turns the term off.
    pub service_tolerance: f64,
    /// A list is shown to clients anew only when a weight moved by more than this fraction (or an instance or
    /// state changed); 0 shows every change.
    pub publish_min_change: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            types: BTreeMap::from([(
                "default".to_string(),
                TypeProfile {
                    cpu: 0.4,
                    mem: 0.1,
                    queue: 0.5,
                    cost: 1.0,
                },
            )]),
            report_ttl: Duration::from_secs(2),
            forget_after: Duration::from_secs(60),
            list_ttl: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(30),
            panic_threshold: 0.5,
            slow_start: Duration::from_secs(10),
            slow_start_min: 0.1,
            damping: 0.5,
            max_step: 0.25,
            error_penalty: 2.0,
            full_weight_cores: 8.0,
            service_tolerance: 1.25,
            publish_min_change: 0.1,
        }
    }
}

/// One instance's figures from its latest report: the inputs of its weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Host CPU utilisation, 0..=1.
    pub cpu: f64,
    /// Host memory utilisation, 0..=1.
    pub mem: f64,
    /// In flight + queued over capacity, 0..=1 (clamped; with the capacity unknown, 0 when nothing is held
    /// and 1 when something is).
    pub queue: f64,
    /// Server-side error rate of the instance, 0..=1.
    pub error_rate: f64,
    /// Error rate per request type, when the instance reports it.
    pub type_errors: BTreeMap<String, f64>,
    /// The host's cores divided by the instances the agent reports on it.
    pub cores_per_instance: f64,
    /// The instance's last window per request type that it served any requests of, as reported (its rate
    /// and mean service time are what [`smooth_service`] uses).
    pub service: BTreeMap<String, TypeStats>,
}

impl Load {
    /// Extracts the figures that matter from a report.
    pub fn from_report(
        host: &xcluster_proto::report::HostLoad,
        i: &xcluster_proto::report::InstanceLoad,
        n: usize,
    ) -> Self {
        let held = f64::from(i.in_flight) + f64::from(i.queued);
        let queue = if i.capacity == 0 {
            // Unknown capacity: idle if nothing is held, else judged full rather than idle, so an instance
            // that reports a backlog but no capacity is not handed an idle one's share.
            if held > 0.0 { 1.0 } else { 0.0 }
        } else {
            (held / f64::from(i.capacity)).clamp(0.0, 1.0)
        };
        Load {
            cpu: host.cpu.clamp(0.0, 1.0),
            mem: host.mem.clamp(0.0, 1.0),
            queue,
            error_rate: i.error_rate.clamp(0.0, 1.0),
            type_errors: i
                .types
                .iter()
                .map(|(k, t)| (k.clone(), t.error_rate.clamp(0.0, 1.0)))
                .collect(),
            cores_per_instance: f64::from(host.cores) / n.max(1) as f64,
            service: i
                .types
                .iter()
                .filter(|(_, t)| t.rate > 0.0 && t.service_ms > 0.0)
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect(),
        }
    }
}

/// How full the resources that `t` uses are on this instance, 0..=1: the profile-weighted mean utilisation.
pub fn utilisation(t: &TypeProfile, load: &Load) -> f64 {
    let total = t.cpu + t.mem + t.queue;
    if total <= 0.0 {
        return 0.0;
    }
    ((t.cpu * load.cpu + t.mem * load.mem + t.queue * load.queue) / total).clamp(0.0, 1.0)
}

/// The undamped weight of an instance for type `name`: spare capacity for that type, less an error penalty,
/// scaled by the instance's share of its host. Never below 1 for a live instance, so that when every
/// instance is saturated the traffic still spreads evenly instead of stopping.
pub fn target(name: &str, t: &TypeProfile, load: &Load, p: &Params) -> u32 {
    let err = load.type_errors.get(name).copied().unwrap_or(load.error_rate);
    let headroom = (1.0 - utilisation(t, load) - p.error_penalty * err).clamp(0.0, 1.0);
    let size = (load.cores_per_instance / p.full_weight_cores).clamp(0.0, 1.0);
    let w = (f64::from(MAX_WEIGHT) * headroom * size).round();
    (w as u32).clamp(1, MAX_WEIGHT)
}

/// Moves the published weight toward `target`: an EWMA step of factor `damping`, bounded by `max_step` of
/// the full scale, and at least 1 so that it always converges exactly.
pub fn damp(prev: Option<u32>, target: u32, p: &Params) -> u32 {
    let Some(prev) = prev else { return target };
    let delta = i64::from(target) - i64::from(prev);
    if delta == 0 {
        return prev;
    }
    let bound = (p.max_step * f64::from(MAX_WEIGHT)).round().max(1.0) as i64;
    let mut step = (p.damping * delta as f64).round() as i64;
    if step == 0 {
        step = delta.signum();
    }
    let step = step.clamp(-bound, bound);
    (i64::from(prev) + step).clamp(0, i64::from(MAX_WEIGHT)) as u32
}

/// Service time added to the tolerated one, so sub-millisecond types are not told apart by scheduling noise.
const SERVICE_SLACK_MS: f64 = 0.5;
/// The least fraction of its weight the service-time term leaves an instance: it still gets some requests,
/// so its service time stays measured and a recovery is seen.
const SPEED_FLOOR: f64 = 0.05;

/// How long a request's service time keeps counting toward an instance's figure: its weight fades by
/// `e^(−Δt/τ)` (by the agent's clock, since an agent may send the same one-second window several times).
const SERVICE_TAU_MS: f64 = 1_500.0;
/// A reported service time counts for at most this multiple of the smoothed one. One window with a stall (a
/// second of 300 ms answers was seen on a loaded 2-core host, and with a clip of 4 it cut a healthy
/// instance's weight to a third) then moves the figure by about half, mostly within the tolerance; a slowness
/// that lasts still reaches its level, growing about 1.5× a second.
const SERVICE_CLIP: f64 = 2.0;
/// The most of one window a report counts: the app's window is a second long.
const SERVICE_WINDOW_MS: u64 = 1_000;
/// A type without a request for this long (agent clock) forgets its smoothed figure, so an instance that
/// lost all its traffic for being slow is not held to that figure forever: it gets its whole weight back,
/// and is measured again.
const SERVICE_FORGET_MS: u64 = 10_000;

/// An instance's smoothed service time for one type: the mean over its recent requests, each counting less
/// as it ages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Served {
    pub ms: f64,
    /// How many requests the figure stands for, faded by age (`SERVICE_TAU_MS`).
    pub samples: f64,
    /// Agent time since the last window with a request of the type.
    pub unsampled_ms: u64,
}

impl Served {
    /// The figure to judge the instance by against the type's `reference`: by as much as it is slower,
    /// fading toward the reference as the time since its last request of the type grows (by the same
    /// `SERVICE_TAU_MS` as its requests' weight). A figure nothing has refreshed for seconds says little
    /// about now: the instance drifts back toward its whole weight, to be measured again, rather than being
    /// held to an old figure and then given everything back at once. While even a trickle of requests
    /// comes (as to a slow instance whose weight is cut), the figure holds.
    pub fn credible_ms(&self, reference: Option<f64>) -> f64 {
        match reference {
            Some(r) if self.ms > r => {
                r + (self.ms - r) * (-(self.unsampled_ms as f64) / SERVICE_TAU_MS).exp()
            }
            _ => self.ms,
        }
    }
}

/// Smooths an instance's service times across its reports, `elapsed_ms` after the previous one (`prev`,
/// `None` for the first). Each report adds the requests of its window since the previous report, and moves
/// the figure by their share of all the requests it stands for. Weighting by requests rather than by time
/// is what lets an instance that gets few requests show a change as fast as a busy one: an instance that
/// was slow, and so got a trickle of requests, has a figure that stands for only a few of them, and its
/// first fast answers after it recovers outweigh them. (A figure moved only by windows of at least 5
/// requests a second, and held otherwise, kept such an instance at its slow weight until it was forgotten
/// 5 s later; and while it was still slow that forgetting gave it its whole weight back every few seconds.)
/// A type the report has no requests of keeps its figure, fading, for at most `SERVICE_FORGET_MS`.
pub fn smooth_service(
    prev: Option<&BTreeMap<String, Served>>,
    sample: &BTreeMap<String, TypeStats>,
    elapsed_ms: u64,
) -> BTreeMap<String, Served> {
    let keep = (-(elapsed_ms as f64) / SERVICE_TAU_MS).exp();
    let mut out = prev.cloned().unwrap_or_default();
    out.retain(|name, s| {
        if !sample.contains_key(name) {
            s.unsampled_ms = s.unsampled_ms.saturating_add(elapsed_ms);
            s.samples *= keep;
        }
        s.unsampled_ms <= SERVICE_FORGET_MS
    });
    for (name, w) in sample {
        let served = match out.get(name) {
            None => Served {
                ms: w.service_ms,
                samples: w.rate * SERVICE_WINDOW_MS as f64 / 1000.0,
                unsampled_ms: 0,
            },
            Some(old) => {
                // The window's requests since the previous report, not the whole window again.
                let new = w.rate * elapsed_ms.min(SERVICE_WINDOW_MS) as f64 / 1000.0;
                let kept = old.samples * keep;
                let total = kept + new;
                let ms = if total > 0.0 {
                    (old.ms * kept + w.service_ms.min(old.ms * SERVICE_CLIP) * new) / total
                } else {
                    old.ms
                };
                Served {
                    ms,
                    samples: total,
                    unsampled_ms: 0,
                }
            }
        };
        out.insert(name.clone(), served);
    }
    out
}

/// A type's reference service time: the lower median over the instances that have one (a half that is
/// slow cannot drag it up). `None` with fewer than two, since one instance has nothing to be compared with.
pub fn reference_service(mut times: Vec<f64>) -> Option<f64> {
    if times.len() < 2 {
        return None;
    }
    times.sort_by(f64::total_cmp);
    Some(times[(times.len() - 1) / 2])
}

/// The fraction of its weight an instance keeps for its service time: all of it within `service_tolerance`
/// of the reference (plus a small slack), else the ratio, so an instance four times slower at a type gets
/// about a third of the weight for it.
pub fn speed(own: Option<f64>, reference: Option<f64>, p: &Params) -> f64 {
    match (own, reference) {
        (Some(own), Some(r)) if p.service_tolerance > 0.0 && own > 0.0 => {
            ((p.service_tolerance * r + SERVICE_SLACK_MS) / own).clamp(SPEED_FLOOR, 1.0)
        }
        _ => 1.0,
    }
}

/// The slow-start factor after `elapsed` of readiness: `None` once the ramp is over, else a linear ramp
/// from `slow_start_min` to 1.
pub fn slow_start(elapsed: Duration, p: &Params) -> Option<f64> {
    if p.slow_start.is_zero() || elapsed >= p.slow_start {
        return None;
    }
    let frac = elapsed.as_secs_f64() / p.slow_start.as_secs_f64();
    Some(p.slow_start_min + (1.0 - p.slow_start_min) * frac)
}

/// Applies a slow-start factor to a weight (never below 1).
pub fn ramp(weight: u32, factor: Option<f64>) -> u32 {
    factor.map_or(weight, |f| scale(weight, f))
}

/// A weight times a factor, rounded, never below 1.
pub fn scale(weight: u32, f: f64) -> u32 {
    ((f64::from(weight) * f).round() as u32).clamp(1, MAX_WEIGHT)
}

/// Whether too few instances are usable: fewer than `threshold` of the known ones are fresh and ready.
pub fn panic(usable: usize, known: usize, threshold: f64) -> bool {
    known > 0 && (usable as f64) < threshold * known as f64
}

/// The weight every known instance gets in panic mode.
pub const PANIC_WEIGHT: u32 = MAX_WEIGHT / 2;

/// FNV-1a, 64 bits: a stable hash (the same in every build and process) for table versions.
/// Versions are hashes cut to 53 bits, so that a JSON reader holding numbers as doubles (the dashboard's
/// JavaScript) reads them exactly: a full 64-bit hash showed there rounded, as a version nothing else had.
pub const VERSION_BITS: u64 = (1 << 53) - 1;

pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = if seed == 0 { 0xcbf2_9ce4_8422_2325 } else { seed };
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
#[path = "weights_tests.rs"]
mod tests;
