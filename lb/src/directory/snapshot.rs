//! The published, immutable view of the directory: one [`PickView`] per request type plus what the status
//! page shows. Built whole from the table after every change and swapped in atomically.

use std::collections::BTreeMap;

use xcluster_proto::directory::{InstanceState, InstanceStatus, ServerEntry, ServerList};

use super::pick::PickView;
use super::table::Table;
use super::weights::{self, Params};
use super::{QueryError, Settings};
use crate::metrics;

/// One instance as the status page shows it (the report age is computed when asked).
#[derive(Debug, Clone)]
pub struct StatusRow {
    pub status: InstanceStatus,
    pub received_ms: u64,
}

/// Everything a reader needs, immutable.
#[derive(Debug)]
pub struct Snapshot {
    /// Version of the whole table: a hash of every type's version.
    pub version: u64,
    pub types: BTreeMap<String, PickView>,
    pub instances: Vec<StatusRow>,
}

impl Snapshot {
    /// Builds the snapshot of `table` at `now_ms`.
    pub fn build(table: &Table, now_ms: u64, p: &Params) -> Self {
        let lists = table.publish(now_ms, p);
        let mut version = 0;
        let mut types = BTreeMap::new();
        for (name, list) in lists {
            version = weights::fnv1a(
                &list.version.to_le_bytes(),
                weights::fnv1a(name.as_bytes(), version),
            );
            let cost = p.types.get(&name).map_or(1000, weights::TypeProfile::cost_milli);
            types.insert(name, PickView::new(list, cost));
        }
        // Rows and instances are both in id order: walk them with one cursor per type (linear, not n²).
        let mut cursors = vec![0usize; types.len()];
        let instances = table
            .instances
            .values()
            .map(|i| {
                let mut weights = BTreeMap::new();
                let mut state = None;
                for ((name, view), cur) in types.iter().zip(cursors.iter_mut()) {
                    let rows = &view.list.rows;
                    while *cur < rows.len() && *rows[*cur].id < *i.id {
                        *cur += 1;
                    }
                    if let Some(r) = rows.get(*cur).filter(|r| r.id == i.id) {
                        weights.insert(name.clone(), r.weight);
                        state = Some(r.state);
                    }
                }
                // Not in any list: stale (and not in panic mode).
                let state = state.or(Some(InstanceState::Down));
                StatusRow {
                    status: InstanceStatus {
                        id: i.id.to_string(),
                        addr: i.addr.to_string(),
                        state,
                        report_age_ms: 0,
                        cpu: i.load.cpu,
                        mem: i.load.mem,
                        queue: i.load.queue,
                        weights,
                    },
                    received_ms: i.received_ms,
                }
            })
            .collect();
        Snapshot {
            version,
            types,
            instances,
        }
    }

    /// The client-facing list of `ty`.
    pub fn server_list(&self, ty: &str, now_ms: u64, s: &Settings) -> Result<ServerList, QueryError> {
        let view = self.types.get(ty).ok_or_else(|| unknown(ty, self))?;
        Ok(ServerList {
            request_type: ty.to_string(),
            version: view.list.version,
            ttl_ms: s.params.list_ttl.as_millis() as u64,
            servers: view
                .list
                .rows
                .iter()
                .map(|r| ServerEntry {
                    id: r.id.to_string(),
                    addr: r.addr.to_string(),
                    weight: r.weight,
                    state: r.state,
                    report_age_ms: now_ms.saturating_sub(r.received_ms),
                })
                .collect(),
            balancers: s.balancers.clone(),
        })
    }

    /// The status rows with their current report ages.
    pub fn instance_status(&self, now_ms: u64) -> Vec<InstanceStatus> {
        self.instances
            .iter()
            .map(|r| InstanceStatus {
                report_age_ms: now_ms.saturating_sub(r.received_ms),
                ..r.status.clone()
            })
            .collect()
    }

    /// Sets the per-instance gauges (weight per type, report age) and the per-type panic gauge.
    pub fn export_metrics(&self, now_ms: u64) {
        for r in &self.instances {
            let id = r.status.id.clone();
            let age = now_ms.saturating_sub(r.received_ms) as f64 / 1000.0;
            ::metrics::gauge!(metrics::INSTANCE_REPORT_AGE_SECONDS, "instance" => id.clone()).set(age);
            for (ty, w) in &r.status.weights {
                ::metrics::gauge!(metrics::INSTANCE_WEIGHT, "instance" => id.clone(), "type" => ty.clone())
                    .set(f64::from(*w));
            }
        }
        for (ty, view) in &self.types {
            ::metrics::gauge!(metrics::PANIC, "type" => ty.clone()).set(if view.list.panic {
                1.0
            } else {
                0.0
            });
        }
        ::metrics::gauge!(metrics::INSTANCES).set(self.instances.len() as f64);
    }
}

/// The error for a type the balancer is not configured with.
pub fn unknown(ty: &str, snap: &Snapshot) -> QueryError {
    QueryError::UnknownType {
        name: ty.chars().take(64).collect(),
        known: snap.types.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}
