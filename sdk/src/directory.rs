//! Keeping the lists fresh: the bootstrap fetch, one long-poll watch task per request type with failover
//! across balancers and jittered re-polls, learning balancers from the lists, and the freshness bookkeeping
//! behind static stability.
//!
//! **Invariant**: a watch task is the only writer of its type's table; it installs a whole new [`Table`]
//! (arc-swap) so pickers never see a half-updated list. With every balancer unreachable the last table
//! stays installed; only its age grows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use xcluster_proto::directory::ServerList;

use crate::builder::Options;
use crate::fetch::{self, Fetched};
use crate::picker::{Clock, Entry, InstanceStats, Stats, Table};
use crate::retry::RetryBudget;

/// Everything a client's handles and background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) opts: Options,
    pub(crate) clock: Clock,
    /// Seeds plus the balancers named by the latest list.
    pub(crate) balancers: ArcSwap<Vec<SocketAddr>>,
    /// The seeds: `opts.balancers`, then what the `host:port` seeds resolved to last.
    seeds: ArcSwap<Vec<SocketAddr>>,
    /// The `host:port` seeds and their last addresses (a name that stops resolving keeps its last ones),
    /// held by the one watch that resolves them again.
    named: tokio::sync::Mutex<Vec<(String, Vec<SocketAddr>)>>,
    /// Clock ms of the last resolution of `named` (0: `build()`'s, as the clock starts there).
    resolved_ms: AtomicU64,
    pub(crate) types: Vec<TypeSlot>,
    /// Feedback per request type (index into `types`) and instance address. Locked only when a list is
    /// installed.
    stats: Mutex<HashMap<(usize, SocketAddr), Arc<Stats>>>,
    /// The client's requests in flight to any instance (shared by every instance's stats).
    in_flight_total: Arc<AtomicU32>,
}

/// One request type's current table and freshness.
#[derive(Debug)]
pub(crate) struct TypeSlot {
    pub(crate) name: String,
    pub(crate) table: ArcSwap<Table>,
    /// Clock ms when a balancer was last known alive for this type.
    pub(crate) last_ok_ms: AtomicU64,
    /// Clock ms when a balancer last answered with a list (a sign of life is not always an answer: a
    /// watch held and then dropped counts as one).
    last_answer_ms: AtomicU64,
    /// How soon after an answer a watch must connect to vouch for the list: the re-poll interval and a
    /// second's grace.
    answer_gap_ms: u64,
    /// The last attempt reached a balancer (it answered).
    pub(crate) reachable: AtomicBool,
    /// A watch is connected and waiting on a balancer right now.
    pub(crate) in_poll: AtomicBool,
    /// Clock ms when that watch connected; it vouches for the list only while the balancer may still be
    /// holding it (`watch_hold`), so a balancer that hangs stops vouching.
    pub(crate) poll_since_ms: AtomicU64,
    /// `Options::watch_hold`.
    hold_ms: u64,
    /// The balancer currently serving this type (for `state()`; not on the hot path).
    pub(crate) balancer: Mutex<Option<SocketAddr>>,
    /// What is left of this type's retry budget.
    pub(crate) retry: RetryBudget,
}

impl TypeSlot {
    /// How long since a balancer last vouched for this list; `None` while one does: a watch it is holding
    /// within the hold asked for, or the last round reached one (and no watch is in flight).
    pub(crate) fn staleness(&self, clock: &Clock) -> Option<Duration> {
        let now = clock.now_ms();
        let vouched = if self.in_poll.load(Ordering::Relaxed) {
            now.saturating_sub(self.poll_since_ms.load(Ordering::Relaxed)) <= self.hold_ms
                && self.poll_vouches()
        } else {
            self.reachable.load(Ordering::Relaxed)
        };
        if vouched {
            return None;
        }
        let age = now.saturating_sub(self.last_ok_ms.load(Ordering::Relaxed));
        Some(Duration::from_millis(age))
    }

    /// A watch connected to a balancer.
    fn polling(&self, clock: &Clock) {
        self.poll_since_ms.store(clock.now_ms(), Ordering::Relaxed);
        self.in_poll.store(true, Ordering::Relaxed);
    }

    /// Whether the watch in flight may vouch for the list: it connected right after an answer (a watch
    /// follows each answer at once, or within the re-poll interval). A connection alone proves nothing: a
    /// balancer that accepts and never answers (stopped, wedged, a kernel still taking handshakes) vouched
    /// for a hold at each connection, so with every balancer hung the list read `Live` most of the time and
    /// `max_staleness` was never enforced.
    fn poll_vouches(&self) -> bool {
        let since = self.poll_since_ms.load(Ordering::Relaxed);
        since.saturating_sub(self.last_answer_ms.load(Ordering::Relaxed)) <= self.answer_gap_ms
    }

    /// A sign of life short of an answer.
    fn touch(&self, clock: &Clock) {
        self.last_ok_ms.store(clock.now_ms(), Ordering::Relaxed);
    }

    /// A balancer answered with a list.
    fn answered(&self, clock: &Clock) {
        let now = clock.now_ms();
        self.last_ok_ms.store(now, Ordering::Relaxed);
        self.last_answer_ms.store(now, Ordering::Relaxed);
    }
}

impl Shared {
    pub(crate) fn new(mut opts: Options) -> Self {
        let types = opts
            .request_types
            .iter()
            .map(|t| TypeSlot {
                name: t.clone(),
                table: ArcSwap::from_pointee(Table::new(0, Vec::new())),
                last_ok_ms: AtomicU64::new(0),
                last_answer_ms: AtomicU64::new(0),
                answer_gap_ms: u64::try_from(
                    opts.repoll_interval
                        .saturating_add(Duration::from_secs(1))
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                reachable: AtomicBool::new(false),
                in_poll: AtomicBool::new(false),
                poll_since_ms: AtomicU64::new(0),
                hold_ms: u64::try_from(opts.watch_hold().as_millis()).unwrap_or(u64::MAX),
                balancer: Mutex::new(None),
                retry: RetryBudget::new(opts.retry_max_tokens, opts.retry_token_ratio),
            })
            .collect();
        let seeds = seeds_of(&opts.balancers, &opts.named);
        Self {
            balancers: ArcSwap::from_pointee(seeds.clone()),
            seeds: ArcSwap::from_pointee(seeds),
            named: tokio::sync::Mutex::new(std::mem::take(&mut opts.named)),
            resolved_ms: AtomicU64::new(0),
            opts,
            clock: Clock::new(),
            types,
            stats: Mutex::new(HashMap::new()),
            in_flight_total: Arc::default(),
        }
    }

    /// Installs a validated list as the type's new table and learns the balancers it names.
    fn install(&self, idx: usize, list: &ServerList, from: SocketAddr) {
        let slot = &self.types[idx];
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            // Two ids at one address (a misconfigured host) are one instance: the first is kept. Both would
            // share its stats and count its weight twice, and a pick could weigh it against itself.
            let mut seen = std::collections::HashSet::with_capacity(list.servers.len());
            let entries = list
                .servers
                .iter()
                .filter_map(|s| {
                    // `ServerList::decode` validated every address already.
                    let addr: SocketAddr = s.addr.parse().ok()?;
                    if !seen.insert(addr) {
                        return None;
                    }
                    Some(Entry {
                        id: Arc::from(s.id.as_str()),
                        addr,
                        weight: s.weight,
                        state: s.state,
                        stats: stats_for(&mut stats, idx, addr, &self.in_flight_total),
                    })
                })
                .collect();
            let mut table = Table::new(list.version, entries);
            let current = slot.table.load();
            // A balancer that has heard no report since it started (or one of a build before that says so)
            // lists nothing for want of reports. Replacing a usable table with that would fail every pick
            // until its first report; keep the entries (static stability) under the new version, so the
            // watch follows the balancer's versions. An empty list from a balancer that has heard its agents
            // is the truth: every instance of the type is gone, and picks say `NoInstance` rather than
            // trying the dead addresses as if the table were live.
            if table.all.is_empty() && current.has_healthy() && list.warming != Some(false) {
                debug!(request_type = %slot.name, balancer = %from, "empty server list; keeping the last entries");
                table = Table::new(list.version, current.all.clone());
            }
            drop(current);
            table.publish_shares();
            let old = slot.table.swap(Arc::new(table));
            drop(old);
            // Forget feedback about instances that no table names any more.
            stats.retain(|_, s| Arc::strong_count(s) > 1);
        }
        *slot.balancer.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
        let mut learned = self.seeds.load().to_vec();
        // Only addresses a client can connect to: a balancer listening on every address with no `advertise`
        // named itself `0.0.0.0:7000`, and a client failing over to that connected to its own host. (Such a
        // balancer config is refused now; an older or confused balancer may still send one.)
        let named = (list.balancers.iter())
            .filter_map(|b| b.parse::<SocketAddr>().ok())
            .filter(|b| xcluster_proto::report::usable_addr(*b));
        extend_new(&mut learned, named);
        if **self.balancers.load() != learned {
            info!(balancers = ?learned, "learned balancers from the server list");
            self.balancers.store(Arc::new(learned));
        }
    }

    /// Resolves the `host:port` seeds again, at most every [`RERESOLVE_MS`] and by one watch at a time; a
    /// watch calls it when no balancer answered. Every balancer may have come back on new addresses (hosts
    /// replaced, a cluster moved), which only the names can tell: the lists the client learned from named
    /// the old ones. A name that does not resolve keeps its last addresses. Returns whether the seeds changed.
    async fn reresolve(&self) -> bool {
        // Another type's watch is resolving them: its result serves this one too.
        let Ok(mut named) = self.named.try_lock() else {
            return false;
        };
        let since = self
            .clock
            .now_ms()
            .saturating_sub(self.resolved_ms.load(Ordering::Relaxed));
        if named.is_empty() || since < RERESOLVE_MS {
            return false;
        }
        for (name, addrs) in named.iter_mut() {
            match crate::resolve::resolve(name, self.opts.balancer_timeout).await {
                Ok(found) => *addrs = found,
                Err(e) => debug!(balancer = %name, error = %e, "cannot resolve the balancer's name again"),
            }
        }
        self.resolved_ms.store(self.clock.now_ms(), Ordering::Relaxed);
        let seeds = seeds_of(&self.opts.balancers, &named);
        let old = self.seeds.swap(Arc::new(seeds.clone()));
        if *old == seeds {
            return false;
        }
        // The new seeds first, then the balancers learned from lists that were not seeds.
        let mut next = seeds;
        extend_new(
            &mut next,
            self.balancers.load().iter().copied().filter(|b| !old.contains(b)),
        );
        info!(balancers = ?next, "the balancers' names resolved to new addresses");
        self.balancers.store(Arc::new(next));
        true
    }

    /// The order to try balancers in: the preferred one first.
    fn order(&self, preferred: Option<SocketAddr>) -> Vec<SocketAddr> {
        let all = self.balancers.load();
        let mut out = Vec::with_capacity(all.len());
        out.extend(preferred);
        out.extend(all.iter().copied().filter(|b| Some(*b) != preferred));
        out
    }

    /// Fetches the first list of every type from any balancer; returns the balancer that served each.
    /// The first list of every type; else the type, what each balancer said, and whether every one of them
    /// answered that it does not know the type (a client asking for a type the balancers are not set up for,
    /// not a balancer failing).
    pub(crate) async fn bootstrap(&self) -> Result<Vec<SocketAddr>, (String, String, bool)> {
        let mut served_by = Vec::with_capacity(self.types.len());
        // Start at a random seed so many clients spread over the balancers.
        let seeds = self.balancers.load();
        let start = seeds
            .get(rand::rng().random_range(0..seeds.len().max(1)))
            .copied();
        for (idx, slot) in self.types.iter().enumerate() {
            let mut said: Vec<String> = Vec::new();
            let mut unknown = 0;
            let mut ok = None;
            for b in self.order(served_by.last().copied().or(start)) {
                let r = fetch::server_list(
                    b,
                    &slot.name,
                    None,
                    self.opts.connect_timeout,
                    self.opts.balancer_timeout,
                    || {},
                )
                .await;
                match r.and_then(|f| check_type(f, &slot.name)) {
                    Ok(Some(list)) => {
                        self.install(idx, &list, b);
                        ok = Some(b);
                        break;
                    }
                    Ok(None) => said.push(format!("{b}: 304 without a watch")),
                    Err(e) => {
                        debug!(balancer = %b, request_type = %slot.name, error = %e, "bootstrap fetch failed");
                        unknown += usize::from(e.starts_with("status 404") && e.contains("unknown_type"));
                        said.push(format!("{b}: {e}"));
                    }
                }
            }
            let Some(b) = ok else {
                let not_served = unknown > 0 && unknown == said.len();
                if said.is_empty() {
                    said.push("no balancer configured".into());
                }
                return Err((slot.name.clone(), said.join("; "), not_served));
            };
            slot.answered(&self.clock);
            slot.reachable.store(true, Ordering::Relaxed);
            served_by.push(b);
        }
        Ok(served_by)
    }
}

/// Rejects a list for another request type (a confused or malicious balancer).
pub(crate) fn check_type(f: Fetched, want: &str) -> Result<Option<ServerList>, String> {
    match f {
        Fetched::List(l) if l.request_type == want => Ok(Some(l)),
        Fetched::List(l) => Err(format!(
            "list is for type {:?}, asked for {want:?}",
            l.request_type
        )),
        Fetched::Unchanged => Ok(None),
    }
}

/// An answer that took at least this long was held by the balancer (a long poll), not given at once.
const HELD: Duration = Duration::from_millis(500);

fn jitter(lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    rand::rng().random_range(lo..=hi)
}

/// The watch task of one request type: long-polls the preferred balancer, fails over to the others in
/// order, and backs off (jittered, capped) while none answers. Ends when `cancel` fires.
pub(crate) async fn watch_loop(
    shared: Arc<Shared>,
    idx: usize,
    first: SocketAddr,
    cancel: CancellationToken,
) {
    let slot = &shared.types[idx];
    let opts = &shared.opts;
    let _unvouched = Unvouched(slot);
    let mut preferred = Some(first);
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        let version = slot.table.load().version;
        // None: no balancer answered. Some(changed, waited): an answer, and whether the server held it.
        let mut outcome: Option<(bool, bool)> = None;
        for b in shared.order(preferred) {
            let started = Instant::now();
            // The balancer holds the poll at most `wait`; one that has not answered `balancer_timeout` after
            // that has hung (a host that stopped without closing its sockets): the next one is asked.
            let wait = opts.watch_hold();
            let fetch = fetch::server_list(
                b,
                &slot.name,
                Some((version, wait)),
                opts.connect_timeout,
                // Saturating: `Duration::MAX` ("forever") in both would panic the watch task and leave the
                // client silently following nothing.
                wait.saturating_add(opts.balancer_timeout),
                || slot.polling(&shared.clock),
            );
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = fetch => r,
            };
            let held = started.elapsed();
            let waited = held >= HELD;
            let r = r.and_then(|f| check_type(f, &slot.name));
            let polled = slot.in_poll.swap(false, Ordering::Relaxed);
            if polled && slot.poll_vouches() && r.is_err() && waited && held <= wait {
                // A watch it held and then dropped (a balancer stopping mid-hold): it was alive, holding
                // the list as current, until now. One still silent past the hold it was asked for was
                // not; and one that fails at once (an error status, a list of another type, garbage)
                // vouches for nothing: counting its answer as a sign of life kept the list's age under
                // the backoff's 2 s, so with every balancer broken that way the list never expired. Only
                // a watch that followed an answer counts: a proxy in front of dead balancers that accepts
                // and closes a second later would otherwise keep the list young for ever.
                slot.touch(&shared.clock);
            }
            match r {
                Ok(list) => {
                    let changed = list.as_ref().is_some_and(|l| l.version != version);
                    if let Some(list) = &list {
                        shared.install(idx, list, b);
                        if changed {
                            debug!(request_type = %slot.name, version = list.version, balancer = %b, "server list changed");
                        }
                    }
                    slot.answered(&shared.clock);
                    slot.reachable.store(true, Ordering::Relaxed);
                    if warned {
                        info!(request_type = %slot.name, balancer = %b, "a balancer answers again");
                        warned = false;
                    }
                    preferred = Some(b);
                    outcome = Some((changed, waited));
                    break;
                }
                Err(e) => {
                    // Until another answers, nothing vouches for the list between attempts either.
                    slot.reachable.store(false, Ordering::Relaxed);
                    debug!(request_type = %slot.name, balancer = %b, error = %e, "watch failed; trying the next balancer");
                }
            }
        }
        let delay = match outcome {
            // Changed, or the server held the poll: watch again at once, with a little jitter against herds.
            Some((true, _)) | Some((false, true)) => jitter(Duration::ZERO, Duration::from_millis(20)),
            // An immediate unchanged answer (no long poll on that balancer): re-poll on the interval.
            Some((false, false)) => jitter(opts.repoll_interval / 2, opts.repoll_interval),
            None => {
                slot.reachable.store(false, Ordering::Relaxed);
                if !warned {
                    warn!(request_type = %slot.name, "no balancer reachable; serving from the last server list");
                    warned = true;
                }
                let reresolved = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = shared.reresolve() => r,
                };
                if reresolved {
                    // New addresses to try: at once, not after the backoff.
                    Duration::ZERO
                } else {
                    let d = jitter(backoff / 2, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    d
                }
            }
        };
        if outcome.is_some() {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Once the watch ends (`Client::shutdown`, or the last clone dropped), nothing vouches for its list: it ages
/// from the last answer and expires after `max_staleness`, as `shutdown` says. Cancelled between answers
/// (in the sleep before the next watch, where a balancer that answers at once leaves it most of the time),
/// the answer before kept vouching, and the list read `Live` for good.
struct Unvouched<'a>(&'a TypeSlot);

impl Drop for Unvouched<'_> {
    fn drop(&mut self) {
        self.0.reachable.store(false, Ordering::Relaxed);
        self.0.in_poll.store(false, Ordering::Relaxed);
    }
}

/// How often, at most, the balancers' `host:port` names are resolved again while none answers. gRPC's DNS
/// resolver waits 30 s; a client here serves from a list that ages meanwhile, so it asks sooner, and a
/// name's lookup is one query to a caching resolver.
const RERESOLVE_MS: u64 = 5_000;

/// The seeds: the `ip:port` ones, then the addresses of the `host:port` ones, each once.
fn seeds_of(fixed: &[SocketAddr], named: &[(String, Vec<SocketAddr>)]) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(fixed.len() + named.len());
    extend_new(
        &mut out,
        fixed
            .iter()
            .chain(named.iter().flat_map(|(_, addrs)| addrs))
            .copied(),
    );
    out
}

/// Appends each of `more` that `list` does not hold yet, in order (a few balancers: a scan is cheapest).
pub(crate) fn extend_new(list: &mut Vec<SocketAddr>, more: impl IntoIterator<Item = SocketAddr>) {
    for a in more {
        if !list.contains(&a) {
            list.push(a);
        }
    }
}

/// The feedback of request type `idx` at `addr`, created on first use; a new one shares the instance-wide
/// part (in-flight count, ejection) with the instance's other types, and a new instance counts into the
/// client's `total` in flight.
fn stats_for(
    stats: &mut HashMap<(usize, SocketAddr), Arc<Stats>>,
    idx: usize,
    addr: SocketAddr,
    total: &Arc<AtomicU32>,
) -> Arc<Stats> {
    if let Some(s) = stats.get(&(idx, addr)) {
        return s.clone();
    }
    let instance = stats
        .iter()
        .find(|((_, a), _)| *a == addr)
        .map(|(_, s)| s.instance.clone())
        .unwrap_or_else(|| {
            Arc::new(InstanceStats {
                total_in_flight: total.clone(),
                ..InstanceStats::default()
            })
        });
    let s = Arc::new(Stats::of_instance(instance));
    stats.insert((idx, addr), s.clone());
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// Two ids at one address are one instance: the first is kept, so its weight counts once.
    #[test]
    fn a_list_naming_one_address_twice_installs_it_once() {
        let mut opts = crate::ClientBuilder::default().opts;
        opts.request_types = vec!["t".into()];
        let shared = Shared::new(opts);
        let list: ServerList = serde_json::from_str(
            r#"{"request_type":"t","version":3,"ttl_ms":1,"balancers":[],"servers":[
                {"id":"h/a","addr":"127.0.0.1:7101","weight":5,"state":"up","report_age_ms":0},
                {"id":"h/b","addr":"127.0.0.1:7101","weight":9,"state":"up","report_age_ms":0},
                {"id":"h/c","addr":"127.0.0.1:7102","weight":1,"state":"up","report_age_ms":0}]}"#,
        )
        .unwrap();
        shared.install(0, &list, "127.0.0.1:9".parse().unwrap());
        let table = shared.types[0].table.load();
        let got: Vec<(&str, u32)> = table.all.iter().map(|e| (&*e.id, e.weight)).collect();
        assert_eq!(got, [("h/a", 5), ("h/c", 1)]);
    }

    #[test]
    fn latency_is_per_type_in_flight_and_ejection_per_instance() {
        let mut m = HashMap::new();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let total = Arc::new(AtomicU32::new(0));
        let order = stats_for(&mut m, 0, a, &total);
        let browse = stats_for(&mut m, 1, a, &total);
        assert!(!Arc::ptr_eq(&order, &browse));
        assert!(
            Arc::ptr_eq(&stats_for(&mut m, 0, a, &total), &order),
            "kept across lists"
        );
        // A slow order says nothing about browsing on the same instance...
        order.record_success(Duration::from_millis(40), 0);
        assert_eq!(browse.ewma_us.load(Ordering::Relaxed), 0);
        // ...but a refused connection takes the instance out for every type, and an order in flight is
        // queued work a browse request there waits behind.
        order.eject(&Clock::new(), Duration::from_secs(5));
        assert!(browse.is_ejected(0));
        order.instance.in_flight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(browse.instance.in_flight.load(Ordering::Relaxed), 1);
        let other = stats_for(&mut m, 0, "127.0.0.1:2".parse().unwrap(), &total);
        assert!(
            Arc::ptr_eq(&other.instance.total_in_flight, &total),
            "one client-wide count"
        );
        assert!(!other.is_ejected(0));
    }
}
