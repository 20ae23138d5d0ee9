//! The proxy's backend choice in a running balancer. Backends listed in `[proxy]` for a request type route
//! it (fixed routing, like HAProxy `server` lines: useful without agents, and for benchmarks); a type with
//! none listed is routed by the directory's live weights, the same ones `/v1/pick` uses, so the L4 proxy
//! and SDK clients share one view of the load. A fixed backend that agents also report is left out while
//! the directory withholds it (drained, or reported not ready).

use std::net::SocketAddr;

use crate::directory::Directory;
use crate::proxy::config::ProxyConfig;
use crate::proxy::{BackendPicker, PickFor, StaticPicker};

#[derive(Debug)]
pub(crate) struct LivePicker {
    fixed: StaticPicker,
    dir: Directory,
}

impl LivePicker {
    pub(crate) fn new(cfg: &ProxyConfig, dir: Directory) -> Self {
        Self {
            fixed: StaticPicker::new(cfg),
            dir,
        }
    }

    /// The request types of `cfg`'s listeners that the directory routes.
    pub(crate) fn directory_types(&self, cfg: &ProxyConfig) -> Vec<String> {
        let mut types: Vec<String> = (cfg.listeners.iter())
            .flat_map(|l| l.types())
            .filter(|ty| !self.fixed.serves(ty))
            .map(str::to_owned)
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    }
}

impl LivePicker {
    /// Runs `f` on the directory's snapshot, with the fixed table rebuilt first if the run-time weights
    /// changed since it was built.
    fn with_weights<R>(&self, f: impl FnOnce(&crate::directory::snapshot::Snapshot) -> R) -> R {
        self.dir.with_snapshot(|snap| {
            if snap.backend_weights.version != self.fixed.weights_version() {
                self.fixed.set_weights(&snap.backend_weights);
            }
            f(snap)
        })
    }
}

impl BackendPicker for LivePicker {
    fn pick(&self, request_type: &str, exclude: &[SocketAddr], conn: &PickFor<'_>) -> Option<SocketAddr> {
        if self.fixed.serves(request_type) {
            // A fixed backend that an agent reports follows its drain and readiness as the directory does,
            // so `xcluster ctl drain` and an app's `deregister_ms` reach it within a report, not after
            // `check_fall` health checks. The weights set at run time live in the directory too, so that
            // peers share them; the fixed table is rebuilt the first pick after they change.
            self.with_weights(|snap| {
                let out = &snap.withheld;
                if out.is_empty() {
                    return self.fixed.pick(request_type, exclude, conn);
                }
                let mut leave_out = Vec::with_capacity(exclude.len() + out.len());
                leave_out.extend_from_slice(exclude);
                leave_out.extend_from_slice(out);
                self.fixed.pick(request_type, &leave_out, conn)
            })
        } else {
            self.dir.pick(request_type, exclude)
        }
    }

    fn takes(&self, request_type: &str, addr: SocketAddr) -> bool {
        if !self.fixed.serves(request_type) {
            return true;
        }
        self.with_weights(|snap| !snap.withheld.contains(&addr) && self.fixed.takes(request_type, addr))
    }

    fn routes_to(&self, addr: SocketAddr) -> bool {
        self.dir.lists(addr)
    }

    fn on_config(&self, cfg: &ProxyConfig) {
        self.fixed.on_config(cfg);
    }
}
