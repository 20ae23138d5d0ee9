//! How the proxy chooses a backend: the [`BackendPicker`] trait and the static weighted picker over the
//! backends listed in `[proxy]`.
//!
//! The trait is the seam between the proxy and the load-aware directory: the directory implements it with
//! its live weights, and the proxy never needs to know which one it talks to. `pick` runs once per connect
//! attempt, so implementations read a snapshot (arc-swap) and take no lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::config::{BackendConfig, Balance, ProxyConfig};

/// How many connections a backend has established now, for the pickers that weigh them.
pub type OpenCount<'a> = &'a dyn Fn(SocketAddr) -> u64;

/// Chooses backends for the proxy.
pub trait BackendPicker: Send + Sync + std::fmt::Debug {
    /// A backend for a connection of `request_type`, never one of `exclude` (those already failed for this
    /// connection). `open` tells how many connections a backend has established now; it is read only by a
    /// picker that weighs them (`balance = "least_connections"`). `None` when no backend is left.
    fn pick(&self, request_type: &str, exclude: &[SocketAddr], open: OpenCount<'_>) -> Option<SocketAddr>;

    /// The proxy could not connect to `addr` (refused or timed out). A live picker may avoid it at once.
    fn report_failure(&self, _addr: SocketAddr) {}

    /// Called with the new `[proxy]` section after each successful reload. The static picker rebuilds its
    /// table from it; a directory-backed picker may ignore it.
    fn on_config(&self, _cfg: &ProxyConfig) {}
}

/// The backends of one request type, with their weights: the backups are picked only when no other is left.
#[derive(Debug, Default)]
struct Tiers {
    primary: Vec<(SocketAddr, u32)>,
    backup: Vec<(SocketAddr, u32)>,
}

impl Tiers {
    fn push(&mut self, b: &BackendConfig) {
        let tier = if b.backup {
            &mut self.backup
        } else {
            &mut self.primary
        };
        tier.push((b.addr, b.weight));
    }

    fn is_empty(&self) -> bool {
        self.primary.is_empty() && self.backup.is_empty()
    }

    /// What `pick` finds among the primaries, or else among the backups.
    fn first(&self, pick: impl Fn(&[(SocketAddr, u32)]) -> Option<SocketAddr>) -> Option<SocketAddr> {
        pick(&self.primary).or_else(|| pick(&self.backup))
    }
}

/// The backend of `list` minus `exclude` (and those at weight 0) with the fewest open connections for its
/// weight, counting the one about to be made (`(open + 1) / weight`, as HAProxy's `leastconn`); ties go to
/// the first from index `start` on, so that a random `start` spreads them.
fn least(
    list: &[(SocketAddr, u32)],
    exclude: &[SocketAddr],
    open: OpenCount<'_>,
    start: usize,
) -> Option<SocketAddr> {
    let n = list.len();
    let mut best: Option<(SocketAddr, u128, u128)> = None;
    for i in 0..n {
        let (a, w) = list[(start + i) % n];
        if w == 0 || exclude.contains(&a) {
            continue;
        }
        let (load, w) = (u128::from(open(a)) + 1, u128::from(w));
        // load / w < best_load / best_w, without division.
        if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
            best = Some((a, load, w));
        }
    }
    best.map(|(a, ..)| a)
}

/// Backends with their weights, per request type.
#[derive(Debug)]
struct Table {
    balance: Balance,
    by_type: HashMap<String, Tiers>,
    /// Backends that serve every type (no `request_types`), for types no backend names.
    any: Tiers,
}

impl Table {
    fn build(cfg: &ProxyConfig) -> Self {
        let mut t = Table {
            balance: cfg.balance,
            by_type: HashMap::new(),
            any: Tiers::default(),
        };
        for b in cfg.backends.iter().filter(|b| b.request_types.is_empty()) {
            t.any.push(b);
        }
        let mut types: Vec<&str> = cfg.listeners.iter().map(|l| l.request_type.as_str()).collect();
        types.extend(
            cfg.backends
                .iter()
                .flat_map(|b| b.request_types.iter().map(String::as_str)),
        );
        for ty in types {
            let mut tiers = Tiers::default();
            for b in cfg
                .backends
                .iter()
                .filter(|b| b.request_types.is_empty() || b.request_types.iter().any(|t| t == ty))
            {
                tiers.push(b);
            }
            t.by_type.insert(ty.to_string(), tiers);
        }
        t
    }
}

/// Weighted random choice over the backends of `[proxy]`, rebuilt whole on reload.
#[derive(Debug)]
pub struct StaticPicker {
    table: ArcSwap<Table>,
}

impl StaticPicker {
    pub fn new(cfg: &ProxyConfig) -> Self {
        Self {
            table: ArcSwap::from_pointee(Table::build(cfg)),
        }
    }

    /// Whether `[proxy]` lists any backend for `request_type` (then they route it, not the directory).
    pub fn serves(&self, request_type: &str) -> bool {
        let t = self.table.load();
        !t.by_type.get(request_type).unwrap_or(&t.any).is_empty()
    }
}

/// Weighted random over `list` minus `exclude`; `roll` maps a total weight to a value in `0..total`.
fn weighted(
    list: &[(SocketAddr, u32)],
    exclude: &[SocketAddr],
    roll: impl FnOnce(u64) -> u64,
) -> Option<SocketAddr> {
    let usable = |(a, w): &&(SocketAddr, u32)| *w > 0 && !exclude.contains(a);
    let total: u64 = list.iter().filter(usable).map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = roll(total);
    for (a, w) in list.iter().filter(usable) {
        let w = u64::from(*w);
        if r < w {
            return Some(*a);
        }
        r -= w;
    }
    None
}

impl BackendPicker for StaticPicker {
    fn pick(&self, request_type: &str, exclude: &[SocketAddr], open: OpenCount<'_>) -> Option<SocketAddr> {
        let t = self.table.load();
        let tiers = t.by_type.get(request_type).unwrap_or(&t.any);
        match t.balance {
            Balance::Random => {
                tiers.first(|list| weighted(list, exclude, |total| rand::random_range(0..total)))
            }
            Balance::LeastConnections => {
                let start = rand::random::<u32>() as usize;
                tiers.first(|list| least(list, exclude, open, start))
            }
        }
    }

    fn on_config(&self, cfg: &ProxyConfig) {
        self.table.store(Arc::new(Table::build(cfg)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proxy::config::ProxySection;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn weighted_follows_weights_and_skips_excluded() {
        let list = [(addr(1), 1), (addr(2), 3), (addr(3), 0)];
        assert_eq!(weighted(&list, &[], |_| 0), Some(addr(1)));
        assert_eq!(weighted(&list, &[], |_| 1), Some(addr(2)));
        assert_eq!(weighted(&list, &[], |_| 3), Some(addr(2)));
        assert_eq!(weighted(&list, &[addr(1)], |t| t - 1), Some(addr(2)));
        assert_eq!(weighted(&list, &[addr(1), addr(2)], |_| 0), None);
    }

    /// No connections open anywhere.
    fn none(_: SocketAddr) -> u64 {
        0
    }

    /// A static picker over the `[proxy]` section `toml`.
    fn picker(toml: &str) -> StaticPicker {
        let raw: ProxySection = toml::from_str(toml).unwrap();
        StaticPicker::new(&raw.validate(&mut xcluster_runtime::Validator::new()))
    }

    #[test]
    fn picks_by_request_type() {
        let p = picker(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            request_type = "browse"
            [[backends]]
            addr = "127.0.0.1:1"
            request_types = ["order"]
            [[backends]]
            addr = "127.0.0.1:2"
            "#,
        );
        for _ in 0..50 {
            assert_eq!(p.pick("browse", &[], &none), Some(addr(2)));
            assert_eq!(p.pick("unknown", &[], &none), Some(addr(2)));
        }
        assert_eq!(p.pick("order", &[addr(1)], &none), Some(addr(2)));
        assert_eq!(p.pick("order", &[addr(1), addr(2)], &none), None);
    }

    #[test]
    fn least_connections_takes_the_fewest_open_for_the_weight() {
        let list = [(addr(1), 1), (addr(2), 2), (addr(3), 0)];
        let open = |a: SocketAddr| match a.port() {
            1 => 1,
            2 => 3,
            _ => 0,
        };
        // (1 + 1) / 1 against (3 + 1) / 2: a tie, to the first from `start` on.
        assert_eq!(least(&list, &[], &open, 0), Some(addr(1)));
        assert_eq!(least(&list, &[], &open, 1), Some(addr(2)));
        assert_eq!(least(&list, &[], &open, 2), Some(addr(1)));
        // Weight 0 takes nothing, however idle.
        let open = |a: SocketAddr| if a.port() == 1 { 5 } else { 0 };
        assert_eq!(least(&list, &[], &open, 0), Some(addr(2)));
        assert_eq!(least(&list, &[addr(2)], &open, 0), Some(addr(1)));
        assert_eq!(least(&list, &[addr(1), addr(2)], &open, 0), None);
        // The tiers hold: a backup is not taken while a primary is left, however busy.
        let p = picker(
            r#"
            balance = "least_connections"
            [[backends]]
            addr = "127.0.0.1:1"
            [[backends]]
            addr = "127.0.0.1:2"
            backup = true
            "#,
        );
        let busy = |a: SocketAddr| if a.port() == 1 { 1000 } else { 0 };
        assert_eq!(p.pick("default", &[], &busy), Some(addr(1)));
        assert_eq!(p.pick("default", &[addr(1)], &busy), Some(addr(2)));
    }

    #[test]
    fn backups_take_connections_only_when_no_other_backend_is_left() {
        let p = picker(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            [[backends]]
            addr = "127.0.0.1:2"
            weight = 0
            [[backends]]
            addr = "127.0.0.1:3"
            backup = true
            [[backends]]
            addr = "127.0.0.1:4"
            backup = true
            request_types = ["order"]
            "#,
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            assert_eq!(p.pick("default", &[], &none), Some(addr(1)));
            seen.insert(p.pick("order", &[addr(1)], &none).unwrap());
        }
        // With the one usable primary gone (tried, or held out), both backups of `order` share the load.
        assert_eq!(seen, [addr(3), addr(4)].into_iter().collect());
        assert_eq!(p.pick("default", &[addr(1)], &none), Some(addr(3)));
        assert_eq!(p.pick("default", &[addr(1), addr(3)], &none), None);
        assert!(p.serves("order"));
    }
}
