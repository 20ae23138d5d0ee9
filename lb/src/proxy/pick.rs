//! How the proxy chooses a backend: the [`BackendPicker`] trait and the static weighted picker over the
//! backends listed in `[proxy]`.
//!
//! The trait is the seam between the proxy and the load-aware directory: the directory implements it with
//! its live weights, and the proxy never needs to know which one it talks to. `pick` runs once per connect
//! attempt, so implementations read a snapshot (arc-swap) and take no lock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use xcluster_proto::directory::WeightSet;

use super::acl::mapped;
use super::config::{BackendConfig, Balance, ProxyConfig};

/// How many connections a backend has now (connecting or established), for the pickers that weigh them.
pub type OpenCount<'a> = &'a dyn Fn(SocketAddr) -> u64;

/// The connection a backend is picked for: what the balance modes that look past the weights read.
#[derive(Clone, Copy)]
pub struct PickFor<'a> {
    /// The client's address (`balance = "source"`).
    pub client: IpAddr,
    /// How many connections a backend has now (`balance = "least_connections"`).
    pub open: OpenCount<'a>,
}

impl std::fmt::Debug for PickFor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickFor")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Chooses backends for the proxy.
pub trait BackendPicker: Send + Sync + std::fmt::Debug {
    /// A backend for a connection of `request_type`, never one of `exclude` (those already failed for this
    /// connection, or held out). `conn` is read only by a picker that weighs more than the weights. `None`
    /// when no backend is left.
    fn pick(&self, request_type: &str, exclude: &[SocketAddr], conn: &PickFor<'_>) -> Option<SocketAddr>;

    /// The proxy could not connect to `addr` (refused or timed out). A live picker may avoid it at once.
    fn report_failure(&self, _addr: SocketAddr) {}

    /// Whether it may pick `addr` whatever the config says: a directory-backed picker's instances. Read at
    /// each scrape of `/metrics` (a backend a reload removed keeps its series while this holds), never per
    /// connection.
    fn routes_to(&self, _addr: SocketAddr) -> bool {
        false
    }

    /// Whether a pick for `request_type` could return `addr` now: it is among the type's backends with a weight
    /// above 0 and not withheld (drained). The queue counts only such backends' places ([`super::queue`]).
    fn takes(&self, _request_type: &str, _addr: SocketAddr) -> bool {
        true
    }

    /// Called with the new `[proxy]` section after each successful reload. The static picker rebuilds its
    /// table from it; a directory-backed picker may ignore it.
    fn on_config(&self, _cfg: &ProxyConfig) {}
}

/// The backends of one request type, with their weights: the backups are picked only when no other is left.
#[derive(Debug)]
struct Tiers {
    primary: Vec<(SocketAddr, u32)>,
    backup: Vec<(SocketAddr, u32)>,
    /// Picks made so far (`balance = "round_robin"`); shared by every worker, so their connections take
    /// turns together.
    turns: AtomicU64,
    /// How one of them is chosen: `[proxy] balance`, or the type's own.
    balance: Balance,
}

impl Tiers {
    fn new(balance: Balance) -> Self {
        Self {
            primary: Vec::new(),
            backup: Vec::new(),
            turns: AtomicU64::new(0),
            balance,
        }
    }

    fn push(&mut self, b: &BackendConfig, set: &WeightOverrides) {
        let tier = if b.backup {
            &mut self.backup
        } else {
            &mut self.primary
        };
        tier.push((b.addr, set.weight_of(b)));
    }

    fn is_empty(&self) -> bool {
        self.primary.is_empty() && self.backup.is_empty()
    }

    /// What `pick` finds among the primaries, or else among the backups.
    fn first(&self, pick: impl Fn(&[(SocketAddr, u32)]) -> Option<SocketAddr>) -> Option<SocketAddr> {
        pick(&self.primary).or_else(|| pick(&self.backup))
    }
}

/// Which of `total` weight units pick number `turn` lands on, for `balance = "round_robin"`: `turn` times a
/// step near `total / φ` that shares no factor with `total`, modulo `total`. Every `total` turns in a row
/// cover each unit once, so each backend gets exactly its weight per cycle, and the golden-ratio step spreads
/// a backend's units across the cycle (Fibonacci hashing), so weights 100 and 100 alternate rather than give
/// 100 connections in a row to each. Lock-free: one shared counter.
fn turn_unit(turn: u64, total: u64) -> u64 {
    let mut step = ((total as f64 * 0.618_033_988_75) as u64).max(1);
    while gcd(step, total) != 1 {
        step += 1;
    }
    ((u128::from(turn) * u128::from(step)) % u128::from(total)) as u64
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
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

/// The backend of `list` minus `exclude` (and those at weight 0) that ranks first for `client`, by weighted
/// rendezvous hashing: each backend draws a number from a hash of the pair, and the highest `weight / -ln(u)`
/// wins, so each backend gets a share of the clients in proportion to its weight, a client keeps its backend
/// as long as it is usable, and a backend that goes (or comes back) moves only its own clients. The hash is
/// fixed, so every balancer sends a client to the same backend.
fn source(list: &[(SocketAddr, u32)], exclude: &[SocketAddr], client: IpAddr) -> Option<SocketAddr> {
    let mut best: Option<(SocketAddr, f64)> = None;
    for &(a, w) in list {
        if w == 0 || exclude.contains(&a) {
            continue;
        }
        // A uniform draw in (0, 1) from the hash's top 53 bits.
        let u = ((affinity(client, a) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(w) / -u.ln();
        if best.is_none_or(|(_, b)| score > b) {
            best = Some((a, score));
        }
    }
    best.map(|(a, _)| a)
}

/// A hash of a client address and a backend address that is the same on every balancer and build (an IPv4
/// client as its IPv6-mapped form, so a dual-stack listener sees one client once).
fn affinity(client: IpAddr, backend: SocketAddr) -> u64 {
    let (c, b) = (mapped(client), mapped(backend.ip()));
    [c >> 64, c, b >> 64, b, u128::from(backend.port())]
        .into_iter()
        .fold(0x9e37_79b9_7f4a_7c15, |h, word| mix(h ^ word as u64))
}

/// SplitMix64's finaliser: every input bit moves about half the output bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weights set at run time on `[[proxy.backends]]` entries, by address (`xcluster ctl weight`): each
/// replaces or scales that address's configured `weight` in every pool it is in, until set back to `100%`
/// or the balancer restarts without a peer to take them from.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WeightOverrides {
    /// Changes with each set, so a picker rebuilds its table only when they changed.
    pub version: u64,
    pub by_addr: HashMap<SocketAddr, WeightSet>,
}

impl WeightOverrides {
    /// The weight `b` is picked by: its configured one unless set otherwise.
    pub fn weight_of(&self, b: &BackendConfig) -> u32 {
        self.by_addr.get(&b.addr).map_or(b.weight, |w| w.apply(b.weight))
    }
}

/// Backends with their weights, per request type.
#[derive(Debug)]
struct Table {
    by_type: HashMap<String, Tiers>,
    /// Backends that serve every type (no `request_types`), for types no backend names.
    any: Tiers,
}

impl Table {
    fn build(cfg: &ProxyConfig, set: &WeightOverrides) -> Self {
        let mut t = Table {
            by_type: HashMap::new(),
            any: Tiers::new(cfg.balance),
        };
        for b in cfg.backends.iter().filter(|b| b.request_types.is_empty()) {
            t.any.push(b, set);
        }
        let mut types: Vec<&str> = cfg.listeners.iter().flat_map(|l| l.types()).collect();
        types.extend(
            cfg.backends
                .iter()
                .flat_map(|b| b.request_types.iter().map(String::as_str)),
        );
        for ty in types {
            let mut tiers = Tiers::new(cfg.balance_for(ty));
            for b in cfg.backends.iter().filter(|b| b.serves(ty)) {
                tiers.push(b, set);
            }
            t.by_type.insert(ty.to_string(), tiers);
        }
        t
    }
}

/// Weighted random choice over the backends of `[proxy]`, rebuilt whole on reload and when the weights set
/// at run time change.
#[derive(Debug)]
pub struct StaticPicker {
    table: ArcSwap<Table>,
    /// What the table is built from, so a change of either rebuilds it with the other. Written under
    /// `rebuild` only, so a slower rebuild cannot store an older table over a newer one.
    cfg: ArcSwap<ProxyConfig>,
    set: ArcSwap<WeightOverrides>,
    rebuild: Mutex<()>,
    /// `set`'s version, read by every pick of a directory-backed balancer without an `ArcSwap` load.
    version: AtomicU64,
}

impl StaticPicker {
    pub fn new(cfg: &ProxyConfig) -> Self {
        let set = WeightOverrides::default();
        Self {
            table: ArcSwap::from_pointee(Table::build(cfg, &set)),
            cfg: ArcSwap::from_pointee(cfg.clone()),
            set: ArcSwap::from_pointee(set),
            rebuild: Mutex::new(()),
            version: AtomicU64::new(0),
        }
    }

    /// The version of the run-time weights the table is built with.
    pub fn weights_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Rebuilds the table with the run-time weights `set`, unless it is built with them or newer ones
    /// already (a worker may read an older snapshot than another one just did).
    pub fn set_weights(&self, set: &Arc<WeightOverrides>) {
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        if set.version <= self.set.load().version {
            return;
        }
        self.set.store(set.clone());
        self.table.store(Arc::new(Table::build(&self.cfg.load(), set)));
        self.version.store(set.version, Ordering::Release);
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

/// Pick number `turn` of `balance = "round_robin"` over `list` minus `exclude`: the weights divided by their
/// greatest common divisor first, so equal weights (100 and 100, the default) alternate strictly and 100 to
/// 50 gives 2 to 1 in every 3 picks, as HAProxy's and nginx's round robin do, not only over a whole round of
/// the undivided weights.
fn in_turn(list: &[(SocketAddr, u32)], exclude: &[SocketAddr], turn: u64) -> Option<SocketAddr> {
    let usable = |(a, w): &&(SocketAddr, u32)| *w > 0 && !exclude.contains(a);
    let (total, unit) = (list.iter().filter(usable)).fold((0, 0), |(t, g), (_, w)| {
        (t + u64::from(*w), gcd(g, u64::from(*w)))
    });
    if total == 0 {
        return None;
    }
    weighted(list, exclude, |_| turn_unit(turn, total / unit) * unit)
}

impl BackendPicker for StaticPicker {
    fn takes(&self, request_type: &str, addr: SocketAddr) -> bool {
        let t = self.table.load();
        let tiers = t.by_type.get(request_type).unwrap_or(&t.any);
        (tiers.primary.iter().chain(&tiers.backup)).any(|(a, w)| *a == addr && *w > 0)
    }

    fn pick(&self, request_type: &str, exclude: &[SocketAddr], conn: &PickFor<'_>) -> Option<SocketAddr> {
        let t = self.table.load();
        let tiers = t.by_type.get(request_type).unwrap_or(&t.any);
        match tiers.balance {
            Balance::Random => {
                tiers.first(|list| weighted(list, exclude, |total| rand::random_range(0..total)))
            }
            Balance::RoundRobin => {
                let turn = tiers.turns.fetch_add(1, Ordering::Relaxed);
                tiers.first(|list| in_turn(list, exclude, turn))
            }
            Balance::LeastConnections => {
                let start = rand::random::<u32>() as usize;
                tiers.first(|list| least(list, exclude, conn.open, start))
            }
            Balance::Source => tiers.first(|list| source(list, exclude, conn.client)),
        }
    }

    fn on_config(&self, cfg: &ProxyConfig) {
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        self.cfg.store(Arc::new(cfg.clone()));
        self.table.store(Arc::new(Table::build(cfg, &self.set.load())));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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

    #[test]
    fn a_round_of_turns_covers_every_unit_once() {
        for total in 1..=300u64 {
            let mut seen: Vec<u64> = (0..total).map(|t| turn_unit(t + 7 * total, total)).collect();
            seen.sort_unstable();
            assert!(seen.iter().copied().eq(0..total), "total {total}: {seen:?}");
        }
    }

    #[test]
    fn run_time_weights_rebuild_the_table_and_survive_a_reload() {
        let cfg = |w2: u32| {
            ProxyConfig::for_tests(&format!(
                "balance = \"round_robin\"\n[[listeners]]\nlisten = \"127.0.0.1:7100\"\n\
                 [[backends]]\naddr = \"127.0.0.1:1\"\n[[backends]]\naddr = \"127.0.0.1:2\"\nweight = {w2}\n"
            ))
        };
        let p = StaticPicker::new(&cfg(100));
        let conn = PickFor {
            client: IpAddr::from([127, 0, 0, 1]),
            open: &none,
        };
        let on_2 = |p: &StaticPicker| {
            (0..100)
                .filter(|_| p.pick("browse", &[], &conn).unwrap().port() == 2)
                .count()
        };
        assert_eq!(on_2(&p), 50);
        let set = |version, w: &str| {
            Arc::new(WeightOverrides {
                version,
                by_addr: [(addr(2), w.parse().unwrap())].into(),
            })
        };
        // A quarter of its weight: 25 to 100, 20 picks in 100.
        p.set_weights(&set(1, "25%"));
        assert_eq!(p.weights_version(), 1);
        assert_eq!(on_2(&p), 20);
        // An older version read late changes nothing.
        p.set_weights(&set(0, "0"));
        assert_eq!(on_2(&p), 20);
        // A reload keeps the run-time weight, applied to the new configured one: 25% of 300 is 75 to 100.
        p.on_config(&cfg(300));
        let got = on_2(&p);
        assert!((42..=43).contains(&got), "{got}");
        // A weight of its own replaces the configured one; 0 takes it out.
        p.set_weights(&set(2, "0"));
        assert_eq!(on_2(&p), 0);
    }

    #[test]
    fn round_robin_takes_turns_by_weight_and_interleaves() {
        let picker = |weights: &[u32]| {
            let backends: String = weights
                .iter()
                .enumerate()
                .map(|(i, w)| format!("[[backends]]\naddr = \"127.0.0.1:{}\"\nweight = {w}\n", i + 1))
                .collect();
            StaticPicker::new(&ProxyConfig::for_tests(&format!(
                "balance = \"round_robin\"\n[[listeners]]\nlisten = \"127.0.0.1:7100\"\n{backends}"
            )))
        };
        let conn = PickFor {
            client: IpAddr::from([127, 0, 0, 1]),
            open: &none,
        };
        let ports = |p: &StaticPicker, n: usize| -> Vec<u16> {
            (0..n)
                .map(|_| p.pick("browse", &[], &conn).unwrap().port())
                .collect()
        };
        assert_eq!(ports(&picker(&[1, 1]), 6), [1, 2, 1, 2, 1, 2]);
        let got = ports(&picker(&[1, 2, 3]), 600);
        let count = |port: u16| got.iter().filter(|p| **p == port).count();
        assert_eq!((count(1), count(2), count(3)), (100, 200, 300));
        // Equal weights alternate strictly, whatever they are, and 2 to 1 holds in every 3 picks.
        assert_eq!(ports(&picker(&[100, 100]), 6), [1, 2, 1, 2, 1, 2]);
        let got = ports(&picker(&[100, 50]), 9);
        assert!(
            got.chunks(3).all(|c| c.iter().filter(|p| **p == 1).count() == 2),
            "{got:?}"
        );
        // Large weights with no common divisor still interleave, rather than 101 in a row.
        let got = ports(&picker(&[101, 100]), 402);
        let longest = got.chunk_by(|a, b| a == b).map(<[u16]>::len).max();
        assert!(longest <= Some(2), "a run of {longest:?}: {got:?}");
        // A tried backend is passed over.
        let p = picker(&[1, 1]);
        assert!((0..4).all(|_| p.pick("browse", &[addr(1)], &conn) == Some(addr(2))));
    }

    /// No connections open anywhere.
    fn none(_: SocketAddr) -> u64 {
        0
    }

    /// A connection from localhost, with no connections open anywhere.
    const ANY: PickFor<'static> = PickFor {
        client: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        open: &none,
    };

    /// A static picker over the `[proxy]` section `toml`.
    fn picker(toml: &str) -> StaticPicker {
        StaticPicker::new(&ProxyConfig::for_tests(toml))
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
            assert_eq!(p.pick("browse", &[], &ANY), Some(addr(2)));
            assert_eq!(p.pick("unknown", &[], &ANY), Some(addr(2)));
        }
        assert_eq!(p.pick("order", &[addr(1)], &ANY), Some(addr(2)));
        assert_eq!(p.pick("order", &[addr(1), addr(2)], &ANY), None);
    }

    /// Each type is picked for by its own balance: round robin for one, least connections for the other,
    /// over the same two backends.
    #[test]
    fn a_type_with_its_own_balance_is_picked_for_by_it() {
        let p = picker(
            r#"
            balance = "round_robin"
            [balance_by_type]
            ws = "least_connections"
            [[backends]]
            addr = "127.0.0.1:1"
            request_types = ["web", "ws"]
            [[backends]]
            addr = "127.0.0.1:2"
            request_types = ["web", "ws"]
            "#,
        );
        let busy_first = |a: SocketAddr| if a.port() == 1 { 5 } else { 0 };
        let conn = PickFor {
            client: IpAddr::from([127, 0, 0, 1]),
            open: &busy_first,
        };
        let web: Vec<u16> = (0..4)
            .map(|_| p.pick("web", &[], &conn).unwrap().port())
            .collect();
        assert_eq!(web, [1, 2, 1, 2], "round robin ignores the open counts");
        assert!((0..4).all(|_| p.pick("ws", &[], &conn) == Some(addr(2))));
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
        let conn = PickFor { open: &busy, ..ANY };
        assert_eq!(p.pick("default", &[], &conn), Some(addr(1)));
        assert_eq!(p.pick("default", &[addr(1)], &conn), Some(addr(2)));
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
            assert_eq!(p.pick("default", &[], &ANY), Some(addr(1)));
            seen.insert(p.pick("order", &[addr(1)], &ANY).unwrap());
        }
        // With the one usable primary gone (tried, or held out), both backups of `order` share the load.
        assert_eq!(seen, [addr(3), addr(4)].into_iter().collect());
        assert_eq!(p.pick("default", &[addr(1)], &ANY), Some(addr(3)));
        assert_eq!(p.pick("default", &[addr(1), addr(3)], &ANY), None);
        assert!(p.serves("order"));
    }

    /// Client `i` of a /16.
    fn client(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | i))
    }

    #[test]
    fn source_keeps_each_client_on_one_backend_in_proportion_to_the_weights() {
        let list = [(addr(1), 100), (addr(2), 300), (addr(3), 0)];
        let n = 8000;
        let mut on_2 = 0;
        for i in 0..n {
            let b = source(&list, &[], client(i)).unwrap();
            assert_eq!(source(&list, &[], client(i)), Some(b), "client {i} moved");
            assert_ne!(b, addr(3), "weight 0 takes nobody");
            on_2 += u32::from(b == addr(2));
        }
        // A fixed hash, so a fixed count; 300 of 400 expects 6,000 (a standard deviation is 39).
        let share = f64::from(on_2) / f64::from(n);
        assert!(
            (0.72..0.78).contains(&share),
            "{on_2} of {n} on the weight-300 backend"
        );
        // The same client in its IPv6-mapped form (a dual-stack listener) is the same client.
        let v4 = std::net::Ipv4Addr::new(10, 0, 0, 7);
        assert_eq!(
            source(&list, &[], IpAddr::V4(v4)),
            source(&list, &[], IpAddr::V6(v4.to_ipv6_mapped()))
        );
    }

    #[test]
    fn source_moves_only_the_clients_of_a_backend_that_goes() {
        let all = [(addr(1), 100), (addr(2), 100), (addr(3), 100)];
        let (mut moved, mut kept) = (0, 0);
        for i in 0..3000 {
            let before = source(&all, &[], client(i)).unwrap();
            // Backend 2 held out (or tried and failed): its clients go elsewhere, the rest stay.
            let during = source(&all, &[addr(2)], client(i)).unwrap();
            // Backend 2 removed from the config: the same.
            let without = source(&[all[0], all[2]], &[], client(i)).unwrap();
            assert_eq!(during, without);
            if before == addr(2) {
                assert_ne!(during, addr(2));
                moved += 1;
            } else {
                assert_eq!(during, before, "client {i} moved though its backend stayed");
                kept += 1;
            }
        }
        assert!(moved > 800 && kept > 1600, "moved {moved}, kept {kept}");
        assert_eq!(source(&all, &[addr(1), addr(2), addr(3)], client(0)), None);
    }

    #[test]
    fn source_keeps_the_tiers() {
        let p = picker(
            r#"
            balance = "source"
            [[backends]]
            addr = "127.0.0.1:1"
            [[backends]]
            addr = "127.0.0.1:2"
            [[backends]]
            addr = "127.0.0.1:3"
            backup = true
            "#,
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            let conn = PickFor {
                client: client(i),
                ..ANY
            };
            let b = p.pick("default", &[], &conn).unwrap();
            assert_eq!(p.pick("default", &[], &conn), Some(b));
            seen.insert(b);
            assert_eq!(p.pick("default", &[addr(1), addr(2)], &conn), Some(addr(3)));
        }
        assert_eq!(seen, [addr(1), addr(2)].into_iter().collect());
    }
}
