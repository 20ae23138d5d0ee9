//! The published, immutable view of the directory: one [`PickView`] per request type, and each type's
//! server-list JSON rendered at most once per snapshot. Built whole from the table after every change
//! (and every housekeeping tick) and swapped in atomically. The status page is built on demand from the
//! table instead: it is read rarely, so the per-report rebuild stays small.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use xcluster_proto::directory::{InstanceState, InstanceStatus, ServerEntry, ServerList};

use super::pick::PickView;
use super::table::{Table, TypeList};
use super::weights::{self, Params};
use super::{QueryError, Settings};
use xcluster_runtime::telemetry::{Exposition, Kind};

use crate::metrics;

/// Everything a reader needs, immutable.
#[derive(Debug)]
pub struct Snapshot {
    /// Version of the whole table: a hash of every type's served version.
    pub version: u64,
    /// The latest lists, for picks here (`/v1/pick`, the L4 proxy) and the status page.
    pub types: BTreeMap<String, PickView>,
    /// What clients are shown of each type (`/v1/servers`, watches): see [`Served`].
    served: BTreeMap<String, Arc<Served>>,
    /// When the snapshot was built (directory clock, ms): report ages in a rendered list are as of then.
    pub built_ms: u64,
    /// [`Table::withheld`] as of `built_ms`.
    pub withheld: Vec<std::net::SocketAddr>,
    /// [`Table::backend_weights`]: the proxy's fixed picker rebuilds itself when their version moves.
    pub backend_weights: Arc<crate::proxy::WeightOverrides>,
    /// No report applied yet since start ([`Table::heard`]): the lists say so (`ServerList::warming`).
    pub warming: bool,
    bodies: BTreeMap<String, OnceLock<Bytes>>,
}

/// What a type's list shows clients: the weights and version published last. A newer list replaces it only
/// when it differs in a way that matters ([`Served::outdated_by`]): weights move a little with every report,
/// and each new version would wake every client's watch for a change no pick would notice.
#[derive(Debug)]
pub struct Served {
    pub version: u64,
    panic: bool,
    warming: bool,
    /// (row key, state, weight), in the list's order.
    rows: Vec<(u64, InstanceState, u32)>,
}

impl Served {
    fn of(list: &TypeList) -> Self {
        Served {
            version: list.version,
            panic: list.panic,
            warming: list.warming,
            rows: list.rows.iter().map(|r| (r.key, r.state, r.weight)).collect(),
        }
    }

    /// Whether `list` differs from what is shown: in its instances, their states, the panic or warming flag, or in a
    /// weight that moved by more than `min_change` of the larger of its two values (to or from 0 always).
    fn outdated_by(&self, list: &TypeList, min_change: f64) -> bool {
        self.panic != list.panic
            || self.warming != list.warming
            || self.rows.len() != list.rows.len()
            || (self.rows.iter().zip(&list.rows)).any(|(&(key, state, weight), r)| {
                key != r.key || state != r.state || moved(weight, r.weight, min_change)
            })
    }

    /// The weight shown for row `i` of a list this one is not outdated by (`fresh` if out of step).
    fn weight(&self, i: usize, key: u64, fresh: u32) -> u32 {
        match self.rows.get(i) {
            Some(&(k, _, w)) if k == key => w,
            _ => fresh,
        }
    }
}

/// Whether a weight moved from `old` to `new` by more than `min_change` of the larger.
fn moved(old: u32, new: u32, min_change: f64) -> bool {
    if old == new {
        return false;
    }
    if old == 0 || new == 0 {
        return true;
    }
    f64::from(old.abs_diff(new)) > min_change * f64::from(old.max(new))
}

impl Snapshot {
    /// Builds the snapshot of `table` at `now_ms`; each type keeps `prev`'s served list unless the new one
    /// outdates it (see [`Served`]).
    pub fn build(table: &Table, now_ms: u64, p: &Params, prev: Option<&Snapshot>) -> Self {
        let lists = table.publish(now_ms, p);
        let mut version = 0;
        let mut types = BTreeMap::new();
        let mut served = BTreeMap::new();
        for (name, list) in lists {
            let shown = match prev.and_then(|s| s.served.get(&name)) {
                Some(old) if !old.outdated_by(&list, p.publish_min_change) => old.clone(),
                _ => Arc::new(Served::of(&list)),
            };
            version = weights::fnv1a(
                &shown.version.to_le_bytes(),
                weights::fnv1a(name.as_bytes(), version),
            );
            let cost = p.types.get(&name).map_or(1000, weights::TypeProfile::cost_milli);
            served.insert(name.clone(), shown);
            types.insert(name, PickView::new(list, cost));
        }
        let version = version & weights::VERSION_BITS;
        let bodies = types.keys().map(|k| (k.clone(), OnceLock::new())).collect();
        Snapshot {
            version,
            types,
            served,
            built_ms: now_ms,
            withheld: table.withheld(now_ms, p),
            backend_weights: table.backend_weights.clone(),
            warming: !table.heard,
            bodies,
        }
    }

    /// The version clients are shown for `ty` (see [`Served`]).
    pub fn served_version(&self, ty: &str) -> Result<u64, QueryError> {
        let served = self.served.get(ty).ok_or_else(|| unknown(ty, self))?;
        Ok(served.version)
    }

    /// The client-facing list of `ty`, with report ages as of `now_ms`: the latest rows with the served
    /// weights and version.
    pub fn server_list(&self, ty: &str, now_ms: u64, s: &Settings) -> Result<ServerList, QueryError> {
        let view = self.types.get(ty).ok_or_else(|| unknown(ty, self))?;
        let served = self.served.get(ty).ok_or_else(|| unknown(ty, self))?;
        Ok(ServerList {
            request_type: ty.to_string(),
            version: served.version,
            ttl_ms: s.params.list_ttl.as_millis() as u64,
            servers: (view.list.rows.iter().enumerate())
                .map(|(i, r)| ServerEntry {
                    id: r.id.to_string(),
                    addr: r.addr.to_string(),
                    weight: served.weight(i, r.key, r.weight),
                    state: r.state,
                    report_age_ms: now_ms.saturating_sub(r.received_ms),
                })
                .collect(),
            balancers: s.balancers.clone(),
            warming: Some(self.warming),
        })
    }

    /// The list of `ty` as JSON, rendered once per snapshot (ages as of the snapshot, which the
    /// housekeeping tick rebuilds every 100 ms), with its version.
    pub fn server_list_json(&self, ty: &str, s: &Settings) -> Result<(u64, Bytes), QueryError> {
        let version = self.served_version(ty)?;
        let cell = self.bodies.get(ty).ok_or_else(|| unknown(ty, self))?;
        let body = cell.get_or_init(|| {
            let list = self.server_list(ty, self.built_ms, s);
            list.ok()
                .and_then(|l| serde_json::to_vec(&l).ok())
                .map(Bytes::from)
                .unwrap_or_default()
        });
        Ok((version, body.clone()))
    }
}

/// The status rows of every known instance (report ages as of `now_ms`).
pub fn instance_status(table: &Table, snap: &Snapshot, now_ms: u64) -> Vec<InstanceStatus> {
    // Rows and instances are both in id order: walk them with one cursor per type (linear, not n²).
    let mut cursors = vec![0usize; snap.types.len()];
    table
        .instances
        .values()
        .map(|i| {
            let mut weights = BTreeMap::new();
            let mut state = None;
            for ((name, view), cur) in snap.types.iter().zip(cursors.iter_mut()) {
                let rows = &view.list.rows;
                while *cur < rows.len() && *rows[*cur].id < *i.id {
                    *cur += 1;
                }
                if let Some(r) = rows.get(*cur).filter(|r| r.id == i.id) {
                    weights.insert(name.clone(), r.weight);
                    state = Some(r.state);
                }
            }
            InstanceStatus {
                id: i.id.to_string(),
                addr: i.addr.to_string(),
                // Not in any list: stale (and not in panic mode).
                state: state.or(Some(InstanceState::Down)),
                report_age_ms: now_ms.saturating_sub(i.received_ms),
                cpu: i.load.cpu,
                mem: i.load.mem,
                queue: i.load.queue,
                weights,
                service_ms: i.service.iter().map(|(k, s)| (k.clone(), s.ms)).collect(),
                weight_set: table.weights.get(&*i.id).map(ToString::to_string),
            }
        })
        .collect()
}

/// Writes the per-instance series (weight per type, report age), the per-type panic flag and the number of
/// instances, for the directory's metrics collector (see `Directory::collect_metrics`).
pub fn write_metrics(status: &[InstanceStatus], snap: &Snapshot, out: &mut Exposition) {
    out.family(metrics::INSTANCES, Kind::Gauge);
    out.sample(metrics::INSTANCES, &[], status.len() as f64);
    out.family(metrics::INSTANCE_REPORT_AGE_SECONDS, Kind::Gauge);
    for s in status {
        let age = s.report_age_ms as f64 / 1000.0;
        out.sample(
            metrics::INSTANCE_REPORT_AGE_SECONDS,
            &[("instance_id", &s.id)],
            age,
        );
    }
    out.family(metrics::INSTANCE_WEIGHT, Kind::Gauge);
    for s in status {
        for (ty, w) in &s.weights {
            let labels = [("instance_id", s.id.as_str()), ("type", ty.as_str())];
            out.sample(metrics::INSTANCE_WEIGHT, &labels, f64::from(*w));
        }
    }
    out.family(metrics::PANIC, Kind::Gauge);
    for (ty, view) in &snap.types {
        out.sample(
            metrics::PANIC,
            &[("type", ty)],
            if view.list.panic { 1.0 } else { 0.0 },
        );
    }
}

/// The error for a type the balancer is not configured with.
pub fn unknown(ty: &str, snap: &Snapshot) -> QueryError {
    QueryError::UnknownType {
        name: ty.chars().take(64).collect(),
        known: snap.types.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}
