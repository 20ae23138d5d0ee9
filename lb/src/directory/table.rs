//! The server table: what the balancer knows about each instance (latest load, damped weights, readiness
//! ramp, drain flag) and each agent's last sequence number, and how it turns into the published per-type
//! lists. Pure: the caller passes `now_ms` (a monotonic clock) so expiry is testable without sleeping.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use xcluster_proto::directory::{InstanceState, MAX_WEIGHT, WeightSet};
use xcluster_proto::report::{LoadReport, ReportError};

use super::weights::{self, Load, Params};
use crate::proxy::WeightOverrides;

/// One instance as the table remembers it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// [`identity`] of id and address.
    pub key: u64,
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub agent: String,
    pub ready: bool,
    pub load: Load,
    /// Balancer clock (ms) when its latest report arrived.
    pub received_ms: u64,
    /// Agent clock (ms) of its latest report.
    pub report_ts_ms: u64,
    /// Agent clock (ms) at which it last became ready (new, recovered, or ready again); `None` when not ready.
    pub ready_since_ms: Option<u64>,
    /// Damped weight per request type.
    pub damped: BTreeMap<String, u32>,
    /// Smoothed service time (ms) per request type ([`weights::smooth_service`]).
    pub service: BTreeMap<String, weights::Served>,
    /// Predicted load from this balancer's own picks since the latest report, in thousandths of a cost unit.
    pub predicted: Arc<AtomicU64>,
}

/// What room a report finds in a full table ([`Table::room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Instances it lists that the table does not hold yet.
    pub new: usize,
    /// How many of them fit under `max_instances`.
    pub fits: usize,
}

/// The mutable state behind the directory. Only the ingest path and the housekeeping tick write it.
#[derive(Debug, Default)]
pub struct Table {
    pub instances: BTreeMap<Arc<str>, Instance>,
    /// Per agent id: the process that reports as it, its last sequence number and when.
    pub last_seq: BTreeMap<String, Seen>,
    pub drained: std::collections::BTreeSet<String>,
    /// The weights set at run time, by instance id or proxy backend address (`xcluster ctl weight`).
    pub weights: BTreeMap<String, WeightSet>,
    /// Those of `weights` set on proxy backends, for the proxy's fixed picker; rebuilt at each change.
    pub backend_weights: Arc<WeightOverrides>,
    /// When an operator's call last changed `drained` or `weights` (Unix ms; 0: never), or that of the
    /// state restored from the state file or a peer: the newest state wins at start (`peers::take_drains`).
    pub state_changed_unix_ms: u64,
    /// The WARN line of an instance id two agents claim, at most every 10 s.
    pub clash_warned: xcluster_runtime::telemetry::Throttle,
    /// The WARN line of an agent that reports less often than the TTL, at most every 10 s.
    pub rare_warned: xcluster_runtime::telemetry::Throttle,
    /// The WARN line of a report whose new instances do not all fit the table, at most every 10 s.
    pub full_warned: xcluster_runtime::telemetry::Throttle,
    /// Whether any report has been applied since this balancer started: until then its lists are empty
    /// for want of reports, not of instances (`ServerList::warming`).
    pub heard: bool,
}

/// What the balancer last accepted from an agent id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub seq: u64,
    /// When (balancer clock, ms).
    pub at_ms: u64,
    /// The reporting process (`LoadReport::boot`).
    pub boot: u64,
    /// Its interval: the gap between its last two accepted reports, falling by at most a quarter a report
    /// (see `apply`); 0 (unknown) after its first.
    pub gap_ms: u64,
}

/// One published row of a type's list.
#[derive(Debug, Clone)]
pub struct Row {
    /// Stable hash of the id and address (see [`identity`]), so versions hash 13 bytes per row.
    pub key: u64,
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: InstanceState,
    pub received_ms: u64,
    pub predicted: Arc<AtomicU64>,
}

/// The published list of one type.
#[derive(Debug, Clone)]
pub struct TypeList {
    pub version: u64,
    pub rows: Vec<Row>,
    /// Whether the panic threshold forced equal weights.
    pub panic: bool,
    /// No report applied since the balancer started ([`Table::heard`]): part of the version, so a watch
    /// on the list wakes when the first report makes an empty list mean "no instance" (the SDK keeps its
    /// entries through a warming one only). Out of it, a type the first report had no instance of kept
    /// its version, and every client watching it held the warming list, and its dead entries, until some
    /// other change.
    pub warming: bool,
}

impl Table {
    /// Checks that `seq` is above the last one from `agent` (and that the agent fits), without changing state.
    /// A report from another process under the agent's id (`boot`) is a restart once the last one has been
    /// silent for two of its report intervals (at most `report_ttl`): its successor takes over, its instances
    /// still fresh, so nothing slow-starts. While the last one goes on reporting, the other is a second agent
    /// under its id and is refused (`Conflict`): before, the later-started one won every sequence check and
    /// its report dropped the first one's instances, which then lost every check for `forget_after`.
    pub fn check_seq(
        &self,
        report: &LoadReport,
        max_agents: usize,
        now_ms: u64,
        p: &Params,
    ) -> Result<(), ReportError> {
        match self.last_seq.get(&report.agent) {
            Some(s) if s.boot != report.boot && s.boot != 0 && report.boot != 0 => {
                let silent_ms = now_ms.saturating_sub(s.at_ms);
                let ttl = p.report_ttl.as_millis() as u64;
                let interval = if s.gap_ms == 0 { ttl } else { s.gap_ms };
                if silent_ms < interval.saturating_mul(2).min(ttl) {
                    return Err(ReportError::Conflict {
                        agent: report.agent.clone(),
                        boot: report.boot,
                        live_boot: s.boot,
                        silent_ms,
                    });
                }
                // A restart's sequence numbers start above its predecessor's (both from the wall clock in
                // µs), so one not above the last is an earlier process's report played again. Taken, it
                // brought back an old load, and made the real agent's next reports a conflict.
                if report.seq <= s.seq {
                    return Err(ReportError::Replay {
                        agent: report.agent.clone(),
                        seq: report.seq,
                        last: s.seq,
                    });
                }
                Ok(())
            }
            Some(s) if report.seq <= s.seq => Err(ReportError::Replay {
                agent: report.agent.clone(),
                seq: report.seq,
                last: s.seq,
            }),
            None if self.last_seq.len() >= max_agents => Err(ReportError::Malformed(format!(
                "more than {max_agents} agents; agent {:?} refused",
                report.agent
            ))),
            _ => Ok(()),
        }
    }

    /// How many of the instances `report` would add (ids the table does not hold yet) fit under
    /// `max_instances`: those it holds already are only updated, and those of its agent it no longer lists
    /// leave (as `apply` drops them), so an agent whose instances were renamed (a deploy) still fits a full
    /// table: counting only the new ids locked it out until its old ones were forgotten.
    pub fn room(&self, report: &LoadReport, max_instances: usize) -> Room {
        let new = report
            .instances
            .iter()
            .filter(|i| !self.instances.contains_key(i.id.as_str()))
            .count();
        let listed: std::collections::BTreeSet<&str> =
            report.instances.iter().map(|i| i.id.as_str()).collect();
        let leaving = (self.instances.values())
            .filter(|i| i.agent == report.agent && !listed.contains(&*i.id))
            .count();
        let free = max_instances.saturating_sub(self.instances.len() - leaving);
        Room {
            new,
            fits: new.min(free),
        }
    }

    /// Applies an accepted report: updates each instance's load, damped weights and readiness ramp, and
    /// drops instances the agent no longer reports.
    pub fn apply(&mut self, report: &LoadReport, now_ms: u64, p: &Params) {
        self.apply_within(report, now_ms, p, usize::MAX);
    }

    /// [`Self::apply`], adding at most `room` instances the table does not hold yet ([`Self::room`]), the
    /// first the report lists: those it holds are updated all the same. A report that would overfill the
    /// table was refused whole, so none of its agent's instances was updated, and one more instance on a
    /// host took the whole host out of the lists, for as long as the table stayed full.
    pub fn apply_within(&mut self, report: &LoadReport, now_ms: u64, p: &Params, mut room: usize) {
        self.heard = true;
        let ttl = p.report_ttl.as_millis() as u64;
        let (gap_ms, rare) = match self.last_seq.get(&report.agent) {
            Some(s) if s.boot == report.boot => {
                let gap = now_ms.saturating_sub(s.at_ms);
                // The interval kept falls by a quarter a report at most: an agent's early report on a jump
                // in load comes 50 ms after the one before, and taken as the interval it shrank the window
                // in which another process under the agent's id is a conflict (`check_seq`) to 100 ms. A
                // second agent under the id that reported then took over for good.
                let interval = match s.gap_ms {
                    0 => gap,
                    kept => gap.max(kept - kept / 4),
                };
                // Two gaps in a row: an interval, not one report lost or delayed.
                (interval, gap > ttl && s.gap_ms > ttl)
            }
            _ => (0, false),
        };
        // An agent whose interval_ms is above report_ttl_ms (set on different hosts, so no config check can
        // see it) had its instances leave the lists between reports and slow-start again at each one, for
        // ever at a fraction of their weight, with nothing said anywhere.
        if rare && self.rare_warned.due(now_ms, 10_000) {
            tracing::warn!(
                agent = %report.agent,
                gap_ms,
                report_ttl_ms = ttl,
                "an agent reports less often than [directory] report_ttl_ms: its instances leave the lists \
                 between its reports and slow-start again at each one; set its interval_ms well below \
                 report_ttl_ms (logged at most every 10 s)"
            );
        }
        self.last_seq.insert(
            report.agent.clone(),
            Seen {
                seq: report.seq,
                at_ms: now_ms,
                boot: report.boot,
                gap_ms,
            },
        );
        let reported: std::collections::BTreeSet<&str> =
            report.instances.iter().map(|i| i.id.as_str()).collect();
        self.instances
            .retain(|id, inst| inst.agent != report.agent || reported.contains(&**id));
        let n = report.instances.len();
        for i in &report.instances {
            let Ok(addr) = i.addr.parse::<SocketAddr>() else {
                continue;
            };
            if !self.instances.contains_key(i.id.as_str()) {
                match room.checked_sub(1) {
                    Some(left) => room = left,
                    None => continue,
                }
            }
            let id: Arc<str> = Arc::from(i.id.as_str());
            // Another agent reports this id, freshly: its claim stands (the id names one instance; taking
            // turns made the address flap with every report).
            if let Some(owner) = self.instances.get(&id)
                && owner.agent != report.agent
                && now_ms.saturating_sub(owner.received_ms) <= ttl
            {
                if self.clash_warned.due(now_ms, 10_000) {
                    tracing::warn!(
                        instance = %id,
                        agent = %report.agent,
                        owner = %owner.agent,
                        "two agents report the same instance id; the first one's report is kept (logged at most every 10 s)"
                    );
                }
                continue;
            }
            let mut load = Load::from_report(&report.host, i, n);
            // Only the types this balancer weighs keep a service time: the smoothed figures carry a name
            // until it goes unreported for a while by the agent's clock, so a report of fresh names each
            // time (32 an instance) piled them up without bound.
            load.service.retain(|name, _| p.types.contains_key(name));
            let prev = self.instances.remove(&id);
            // Recovered: its previous report is older than the TTL by the agent's own clock, so every
            // balancer decides the same from the same reports.
            let fresh_before = prev
                .as_ref()
                .is_some_and(|p| report.timestamp_ms.saturating_sub(p.report_ts_ms) <= ttl);
            let ready_since_ms = match (&prev, i.ready) {
                (_, false) => None,
                (Some(p), true) if fresh_before && p.ready => p.ready_since_ms.or(Some(report.timestamp_ms)),
                _ => Some(report.timestamp_ms),
            };
            let before = prev.as_ref().filter(|_| fresh_before);
            let service = weights::smooth_service(
                before.map(|p| &p.service),
                &load.service,
                before.map_or(0, |p| report.timestamp_ms.saturating_sub(p.report_ts_ms)),
            );
            let mut damped = BTreeMap::new();
            for (name, profile) in &p.types {
                let target = weights::target(name, profile, &load, p);
                let last = before.and_then(|p| p.damped.get(name).copied());
                damped.insert(name.clone(), weights::damp(last, target, p));
            }
            let predicted = prev.map(|p| p.predicted).unwrap_or_default();
            // The report already includes the effect of our earlier picks: start predicting afresh.
            predicted.store(0, Ordering::Relaxed);
            self.instances.insert(
                id.clone(),
                Instance {
                    key: identity(&id, &i.addr),
                    id,
                    addr,
                    agent: report.agent.clone(),
                    ready: i.ready,
                    load,
                    received_ms: now_ms,
                    report_ts_ms: report.timestamp_ms,
                    ready_since_ms,
                    damped,
                    service,
                    predicted,
                },
            );
        }
    }

    /// Forgets instances not heard from for `forget_after`. Returns whether anything was removed.
    pub fn expire(&mut self, now_ms: u64, p: &Params) -> bool {
        let forget = p.forget_after.as_millis() as u64;
        let before = self.instances.len();
        self.instances
            .retain(|_, i| now_ms.saturating_sub(i.received_ms) <= forget);
        // Agents silent as long are forgotten too, so agent ids that come and go do not fill `max_agents`.
        // Safe against replay: config validation keeps `forget_after` at least twice the timestamp skew (a
        // report stamped the skew ahead is taken until the skew after its stamp), so any report of that agent
        // old enough to be a replay is refused for its timestamp.
        self.last_seq
            .retain(|_, s| now_ms.saturating_sub(s.at_ms) <= forget);
        before != self.instances.len()
    }

    /// Whether an instance's latest report is within the TTL.
    pub fn is_fresh(i: &Instance, now_ms: u64, p: &Params) -> bool {
        now_ms.saturating_sub(i.received_ms) <= p.report_ttl.as_millis() as u64
    }

    /// The addresses that must get no new connection, whatever routes them: of instances drained, or
    /// reported not ready by a fresh report, and those drained by address (`[[proxy.backends]]`). Sorted.
    /// The proxy's fixed backends at these addresses honour them too (`live_picker`).
    pub fn withheld(&self, now_ms: u64, p: &Params) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = (self.instances.values())
            .filter(|i| self.drained.contains(&*i.id) || (!i.ready && Self::is_fresh(i, now_ms, p)))
            .map(|i| i.addr)
            .chain(self.drained.iter().filter_map(|id| id.parse().ok()))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Sets (or, with `100%`, clears) the run-time weight of `id`, and rebuilds the proxy backends' share
    /// of them when `id` is an address. The caller has checked that `id` may carry `set`.
    pub fn set_weight(&mut self, id: String, set: WeightSet) {
        // The ids `rebuild_backend_weights` keeps: an instance's weight leaves the pickers' tables alone.
        let backend = id.parse::<SocketAddr>().is_ok();
        if set.is_neutral() {
            self.weights.remove(&id);
        } else {
            self.weights.insert(id, set);
        }
        if backend {
            self.rebuild_backend_weights();
        }
    }

    /// Rebuilds [`Table::backend_weights`] from `weights`, under a new version.
    pub fn rebuild_backend_weights(&mut self) {
        self.backend_weights = Arc::new(WeightOverrides {
            version: self.backend_weights.version + 1,
            by_addr: (self.weights.iter())
                .filter_map(|(id, w)| Some((id.parse().ok()?, *w)))
                .collect(),
        });
    }

    /// Whether an instance carries its own weight: not drained, ready, and its latest report within the TTL.
    fn is_usable(&self, i: &Instance, now_ms: u64, p: &Params) -> bool {
        !self.drained.contains(&*i.id) && i.ready && Self::is_fresh(i, now_ms, p)
    }

    /// Builds the published list of every configured type.
    pub fn publish(&self, now_ms: u64, p: &Params) -> BTreeMap<String, TypeList> {
        let known = self
            .instances
            .values()
            .filter(|i| !self.drained.contains(&*i.id))
            .count();
        let usable = self
            .instances
            .values()
            .filter(|i| self.is_usable(i, now_ms, p))
            .count();
        let panic = weights::panic(usable, known, p.panic_threshold);
        p.types
            .keys()
            .map(|name| (name.clone(), self.publish_type(name, now_ms, p, panic)))
            .collect()
    }

    /// The type's reference service time among the usable instances, computed at publish time so that it
    /// depends on the latest reports only, not on the order they arrived in.
    fn reference_service(&self, name: &str, now_ms: u64, p: &Params) -> Option<f64> {
        weights::reference_service(
            self.instances
                .values()
                .filter(|i| self.is_usable(i, now_ms, p))
                .filter_map(|i| i.service.get(name).map(|s| s.ms))
                .collect(),
        )
    }

    fn publish_type(&self, name: &str, now_ms: u64, p: &Params, panic: bool) -> TypeList {
        // In panic mode every weight is the panic weight: nothing to compare.
        let reference = if panic {
            None
        } else {
            self.reference_service(name, now_ms, p)
        };
        let mut rows = Vec::with_capacity(self.instances.len());
        for i in self.instances.values() {
            let fresh = Self::is_fresh(i, now_ms, p);
            let drained = self.drained.contains(&*i.id);
            // Stale instances leave the list, unless panic mode spreads traffic over every known one.
            let listed = fresh || (panic && !drained);
            if !listed {
                continue;
            }
            let (state, weight) = if drained {
                (InstanceState::Drained, 0)
            } else if !i.ready || !fresh {
                (InstanceState::Down, if panic { weights::PANIC_WEIGHT } else { 0 })
            } else if panic {
                (InstanceState::Up, weights::PANIC_WEIGHT)
            } else {
                let speed = weights::speed(
                    i.service.get(name).map(|s| s.credible_ms(reference)),
                    reference,
                    p,
                );
                let damped = weights::scale(i.damped.get(name).copied().unwrap_or(1), speed);
                let elapsed = i
                    .report_ts_ms
                    .saturating_sub(i.ready_since_ms.unwrap_or(i.report_ts_ms));
                match weights::slow_start(Duration::from_millis(elapsed), p) {
                    None => (InstanceState::Up, damped),
                    f => (InstanceState::SlowStart, weights::ramp(damped, f)),
                }
            };
            // An operator's share (a canary at 10%) scales whatever weight the load gives it. None gives a
            // weight to an instance the load gives none (not ready): an absolute weight, restored from a
            // peer or the state file under an instance's id, listed one that had said it was not ready
            // with weight 7, and clients sent it requests.
            let weight = match self.weights.get(&*i.id) {
                Some(set) if !drained && weight > 0 => set.apply(weight).min(MAX_WEIGHT),
                _ => weight,
            };
            rows.push(Row {
                key: i.key,
                id: i.id.clone(),
                addr: i.addr,
                weight,
                state,
                received_ms: i.received_ms,
                predicted: i.predicted.clone(),
            });
        }
        let warming = !self.heard;
        TypeList {
            version: version_of(name, &rows, warming),
            rows,
            panic,
            warming,
        }
    }
}

/// A stable hash of an instance's id and address (as reported), the identity part of its version entry.
pub fn identity(id: &str, addr: &str) -> u64 {
    weights::fnv1a(
        addr.as_bytes(),
        weights::fnv1a(&[0], weights::fnv1a(id.as_bytes(), 0)),
    )
}

/// The version of a type's list: a stable hash of its canonical content (rows are in id order) and of
/// whether its balancer is warming.
pub fn version_of(name: &str, rows: &[Row], warming: bool) -> u64 {
    let mut h = weights::fnv1a(name.as_bytes(), 0);
    if warming {
        h = weights::fnv1a(b"warming", h);
    }
    for r in rows {
        h = weights::fnv1a(&r.key.to_le_bytes(), h);
        h = weights::fnv1a(&r.weight.to_le_bytes(), h);
        h = weights::fnv1a(&[r.state as u8], h);
    }
    h & weights::VERSION_BITS
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
