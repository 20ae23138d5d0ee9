//! The proxy service: the state connections share ([`Shared`]: backends, places, permits, holds) and each
//! listener's ([`ListenerState`]), and in `manager` the worker threads, the set of running listeners, live
//! reload, and drain.
//!
//! A manager task on the lb's main runtime owns the listener set. Connections never run there: they run on
//! the worker runtimes, either one current-thread runtime per core with its own SO_REUSEPORT socket per
//! listener (`per_core`: a connection's two sockets stay on one thread, no cross-thread wakeups), or one
//! multi-thread runtime sharing one socket per listener (`shared`), or one io_uring event loop per core with
//! its own SO_REUSEPORT sockets (`io_uring`, see [`super::uring`]; where the kernel refuses io_uring the
//! proxy falls back to `per_core` and says so). Removing a listener only closes its sockets, once the clients
//! already queued on them are accepted; its established connections are separate tasks (or slots) and run on
//! until they end.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::access::{ConnLog, End};
use super::acl;
use super::clients::{ClientCounts, ClientSlot};
use super::config::{Forwarding, ListenerConfig, ProxyConfig, Timeouts};
use super::health::{Answer, CheckStreaks, Failure, Holds, Verdict, check};
use super::limit::ConnLimit;
use super::metrics::{
    Assigned, BACKEND_BACKUP, BACKEND_CONFIGURED, BACKEND_MAX_CONNECTIONS, BACKEND_WEIGHT, BackendMetrics,
    LISTENER_MAX_CONNECTIONS, ListenerMetrics, Retired,
};
use super::pick::{BackendPicker, PickFor};
use super::queue::{Places, Queue, Ticket, Wait, Waker};
use super::rate::RateGate;

mod manager;

pub use manager::{ProxyHandle, start};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("proxy listener {name:?} cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start proxy worker threads: {0}")]
    Workers(std::io::Error),
}

/// Why a connection gets no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Its connect attempts are used up, or no backend of its type is left to try.
    Exhausted,
    /// It has tried every backend of its type and has attempts left: it may try them again after
    /// `connect_retry_delay_ms` (with its tried list cleared).
    TurnAround,
    /// Every backend left is at its `max_connections`: one may free a place (`queue_timeout_ms`).
    Full,
}

/// What every connection reads; fields that reload live are snapshots.
#[derive(Debug)]
pub struct Shared {
    pub picker: Arc<dyn BackendPicker>,
    pub timeouts: ArcSwap<Timeouts>,
    pub forwarding: Forwarding,
    backends: ArcSwap<HashMap<SocketAddr, Arc<BackendMetrics>>>,
    /// What a type's waiting clients can take, and the clients waiting, in order.
    places: ArcSwap<Places>,
    queue: Arc<Queue>,
    pub permits: Arc<Semaphore>,
    pub tracker: TaskTracker,
    /// The accept loops (tokio) and the closing listeners (io_uring): the drain waits for them too, so a
    /// client queued on a listener when it stops is accepted and served.
    pub listeners: TaskTracker,
    /// Fires when established connections must be abandoned (end of the drain grace period).
    pub stop: CancellationToken,
    /// Backends held out of the picks after failed connects.
    holds: Holds,
    /// Listeners and backends reloads removed, whose series `/metrics` leaves out once unused (read at each
    /// scrape by the pruner [`start`] installs; written by the manager on each reload).
    retired: ArcSwap<Retired>,
}

impl Shared {
    /// The backend for connect attempt `attempt` (from 0) of a connection of type `ty` (its listener's, or
    /// the one its TLS server name routes to) from `client` on `l`, never one of
    /// `tried` (redispatch), with its metric handles; an attempt after the first is counted as a retry.
    /// Else why there is none. `ticket`: the connection's place in the queue, if it waits for a place; while
    /// others wait ahead of it, it gets none ([`super::queue`]).
    pub fn next_backend(
        &self,
        l: &ListenerState,
        ty: &str,
        client: IpAddr,
        tried: &[SocketAddr],
        attempt: u32,
        ticket: Option<&Ticket>,
    ) -> Result<(SocketAddr, Assigned), NoBackend> {
        let t = self.timeouts.load();
        if attempt >= t.connect_attempts {
            return Err(NoBackend::Exhausted);
        }
        if !self
            .queue
            .may_take(ty, ticket, || self.places.load().free(ty, |a| self.takes(ty, a)))
        {
            return Err(NoBackend::Full);
        }
        // The metric handles of the configured backends, one snapshot for the whole pick.
        let backends = self.backends.load();
        // Read only by `balance = "least_connections"`.
        let open = |a: SocketAddr| backends.get(&a).map_or(0, |b| b.open.load(Ordering::Relaxed));
        let conn = PickFor { client, open: &open };
        let mut addr = match self.pick(ty, tried, &conn) {
            Some(addr) => addr,
            // Unless its health checks have put every one down: the client need not wait for them.
            None if !tried.is_empty() && !self.holds.all_down(tried) => return Err(NoBackend::TurnAround),
            None => return Err(NoBackend::Exhausted),
        };
        // Slow start: a backend back from a hold is taken only at its share; else another is, if any.
        if let Some(share) = self.holds.share(addr, t.slow_start)
            && rand::random::<f64>() >= share
        {
            let mut passed = tried.to_vec();
            passed.push(addr);
            addr = self.pick(ty, &passed, &conn).unwrap_or(addr);
        }
        // A backend at its max_connections is passed over for another; `passed` is built only then.
        let mut passed: Vec<SocketAddr> = Vec::new();
        let assigned = loop {
            // Handles are cached for configured backends; one the directory routes to gets its own.
            let own;
            let bm = match backends.get(&addr) {
                Some(bm) => bm,
                None => {
                    own = Arc::new(BackendMetrics::new(addr, None));
                    &own
                }
            };
            if let Some(a) = Assigned::try_new(bm) {
                break a;
            }
            bm.full.increment(1);
            if passed.is_empty() {
                passed.extend_from_slice(tried);
            }
            passed.push(addr);
            addr = match self.pick(ty, &passed, &conn) {
                Some(next) => next,
                // What is left was left out for having been tried, not for being full: after a pause it may
                // answer. Full, a client whose first connect failed (a backend restarting) while the others
                // were at their max was closed after one attempt, or waited with that backend never tried
                // again.
                None if !tried.is_empty() && !self.holds.all_down(tried) => {
                    return Err(NoBackend::TurnAround);
                }
                None => return Err(NoBackend::Full),
            };
        };
        if attempt > 0 {
            l.metrics.retries.increment(1);
        }
        Ok((addr, assigned))
    }

    /// Whether a pick for `ty` could take `addr` now: the picker gives it a weight (config, run-time weight,
    /// drain) and its health checks have not put it down. Asked only while clients wait.
    fn takes(&self, ty: &str, addr: SocketAddr) -> bool {
        self.picker.takes(ty, addr) && !self.holds.all_down(&[addr])
    }

    /// A connection of type `ty` on `l` found every backend full: whether it may wait to be woken and try again
    /// (`queue_timeout_ms` is on and not yet up). Its first wait is counted and takes a ticket, which
    /// `waker` wakes; the caller then asks once more before it waits, since a place that freed before the
    /// ticket was taken woke nobody ([`Wait::just_joined`]).
    pub fn keep_waiting(
        &self,
        l: &ListenerState,
        ty: &str,
        wait: &mut Wait,
        waker: impl FnOnce() -> Waker,
    ) -> bool {
        let Some(limit) = self.timeouts.load().queue else {
            return false;
        };
        let since = *wait.since.get_or_insert_with(|| {
            l.metrics.queued.increment(1);
            Instant::now()
        });
        if since.elapsed() >= limit {
            return false;
        }
        wait.just_joined = wait.ticket.is_none();
        wait.ticket.get_or_insert_with(|| self.queue.join(ty, waker()));
        true
    }

    /// A backend for `ty` other than `tried`, leaving out those held out unless every one left is; even then
    /// never one its health checks hold down (see [`super::health`]).
    fn pick(&self, ty: &str, tried: &[SocketAddr], conn: &PickFor<'_>) -> Option<SocketAddr> {
        let Some(held) = self.holds.exclude(tried) else {
            return self.picker.pick(ty, tried, conn);
        };
        self.picker
            .pick(ty, &held, conn)
            .or_else(|| match self.holds.exclude_down(tried) {
                Some(down) => self.picker.pick(ty, &down, conn),
                None => self.picker.pick(ty, tried, conn),
            })
    }

    /// A connect to `addr` failed or timed out: it is counted, told to the picker, held out of the picks for
    /// a while ([`Holds`]) and left out of the connection's next attempts.
    pub fn connect_failed(&self, addr: SocketAddr, bm: &BackendMetrics, tried: &mut Vec<SocketAddr>) {
        bm.connect_failures.increment(1);
        self.hold_out(addr, bm, Failure::Connect, "a connect failed", false);
        self.picker.report_failure(addr);
        tried.push(addr);
    }

    /// Holds `addr` out of the picks after a failed connect (a client's, `how`) or failed checks; `why` is
    /// for the log. `went_down`: its checks put it down just now, which is logged even when clients' failed
    /// connects hold it out already (as HAProxy logs a server going DOWN), so the log says the checks agree.
    fn hold_out(&self, addr: SocketAddr, bm: &BackendMetrics, how: Failure, why: &str, went_down: bool) {
        bm.failing.set(1.0);
        let (hold, fails) = self.holds.failed(addr, how);
        // Once per outage: with every backend down, each connection still tries one, and each check fails.
        if fails == 1 {
            warn!(backend = %addr, why, ?hold, "backend held out of the picks");
        } else if went_down {
            warn!(backend = %addr, why, ?hold, "backend down by its health checks");
        }
    }

    /// Checks every configured backend (but those with `check = false`) once, all at the same time, each with the connect timeout, and acts
    /// on each result as its streak says ([`CheckStreaks`]): a backend down is held out until an interval
    /// past the time the next check could have ended; one back up, or a pass while up, ends its hold.
    async fn check_all(&self, interval: Duration, streaks: &mut CheckStreaks) {
        let t = self.timeouts.load_full();
        let backends = self.backends.load_full();
        streaks.retain(|a| t.checks.iter().any(|(c, _)| c == a));
        // Those of the config the checks were read from that have their handles: a backend a reload has
        // just added may not yet, and is checked next time.
        let checks = t.checks.iter().filter_map(|(addr, how)| {
            let (addr, bm, connect) = (*addr, backends.get(addr)?, t.connect);
            Some(async move {
                let checked = check(how.target, how.proxy_header, &how.probe);
                let checked = tokio::time::timeout(connect, checked)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                (addr, bm, checked)
            })
        });
        // Until the next round's result, with an interval to spare: the next round ends up to `interval` +
        // `connect` from now plus its own processing, so a hold of exactly that ran out a few milliseconds
        // before each renewal whenever a check timed out (a hung app that still accepts), and a client's
        // connect in that gap ended the hold: the backend flipped in and out of the picks every round.
        let until_next = interval * 2 + t.connect;
        for (addr, bm, checked) in futures_util::future::join_all(checks).await {
            let was_down = streaks.is_down(addr);
            let verdict = streaks.record(addr, checked.is_ok(), t.check_fall, t.check_rise);
            if let Err(e) = &checked {
                bm.check_failures.increment(1);
                debug!(backend = %addr, error = %e, ?verdict, "health check failed");
            }
            match (verdict, checked) {
                (Verdict::Up, _) => self.answered(addr, bm, Answer::Checks),
                (Verdict::Down, Err(e)) => {
                    let why = format!("its health checks failed: {e}");
                    self.hold_out(addr, bm, Failure::Checks(until_next), &why, !was_down);
                    if !was_down {
                        bm.went_down();
                    }
                }
                (Verdict::Rising, _) if !self.holds.keep(addr, until_next) => {
                    // A client's connect ended the hold meanwhile (its checks had stopped renewing it): it answers.
                    streaks.up(addr);
                }
                _ => {}
            }
        }
    }

    /// `addr` answered (`by`): ends its hold, unless its checks put it down and `by` is a client's connect.
    fn answered(&self, addr: SocketAddr, bm: &BackendMetrics, by: Answer) {
        let slow_start = || self.timeouts.load().slow_start;
        if self.holds.succeeded(addr, by, slow_start) {
            let what = match by {
                Answer::Connect => "a connect",
                Answer::Checks => "its health checks",
            };
            bm.failing.set(0.0);
            let slow_start_ms = slow_start().map(|d| d.as_millis());
            info!(backend = %addr, ?slow_start_ms, "backend answers {what} again; back in the picks");
        }
    }

    /// A connect to `addr`, begun at `started`, succeeded: it is counted, and ends the backend's hold, unless
    /// its health checks hold it down.
    pub fn connected(&self, addr: SocketAddr, bm: &BackendMetrics, started: Instant) {
        bm.connected(started);
        self.answered(addr, bm, Answer::Connect);
    }

    /// Takes `cfg`'s backends: their metric handles (kept for those already known) and their places.
    fn set_backends(&self, cfg: &ProxyConfig) {
        let old = self.backends.load();
        let mut retired = Retired::clone(&self.retired.load());
        // One a reload removed and this one adds back takes its handles again: the connections it still has
        // count against its max_connections and for least_connections.
        let mut known: HashMap<SocketAddr, Arc<BackendMetrics>> = (retired.backends.values())
            .map(|(a, bm)| (*a, bm.clone()))
            .collect();
        known.extend(old.iter().map(|(a, bm)| (*a, bm.clone())));
        let map = backend_handles(cfg, &known, &self.queue);
        retired.backends.retain(|_, (addr, _)| !map.contains_key(addr));
        for (gone, bm) in old.iter().filter(|(a, _)| !map.contains_key(a)) {
            metrics::gauge!(BACKEND_CONFIGURED, "backend" => gone.to_string()).set(0.0);
            retired.backends.insert(gone.to_string(), (*gone, bm.clone()));
        }
        self.retired.store(Arc::new(retired));
        self.places
            .store(Arc::new(Places::new(cfg, |b| map[&b.addr].clone())));
        self.backends.store(Arc::new(map));
        // A limit raised, or a backend added, may have made room for those waiting.
        self.queue.freed();
    }
}

#[cfg(test)]
impl Shared {
    pub fn for_tests(cfg: &ProxyConfig) -> Self {
        let shared = Self {
            picker: Arc::new(super::pick::StaticPicker::new(cfg)),
            timeouts: ArcSwap::from_pointee(cfg.timeouts.clone()),
            forwarding: cfg.forwarding,
            backends: ArcSwap::default(),
            places: ArcSwap::default(),
            queue: Arc::default(),
            permits: Arc::new(Semaphore::new(1)),
            tracker: TaskTracker::new(),
            listeners: TaskTracker::new(),
            stop: CancellationToken::new(),
            holds: Holds::default(),
            retired: ArcSwap::default(),
        };
        shared.set_backends(cfg);
        shared
    }
}

/// The metric handles of `cfg`'s backends, their `backup`, `weight` and `max_connections` gauges set. A
/// backend in `old` (configured, or removed by an earlier reload) keeps its handles, so its count of open
/// connections stays true across reloads. An
/// address in several entries (pools of different types) has one set: its highest weight (0 only when
/// drained in every pool), and `backup` only when it is one in every pool.
fn backend_handles(
    cfg: &ProxyConfig,
    old: &HashMap<SocketAddr, Arc<BackendMetrics>>,
    queue: &Arc<Queue>,
) -> HashMap<SocketAddr, Arc<BackendMetrics>> {
    let mut map = HashMap::with_capacity(cfg.backends.len());
    for (i, b) in cfg.backends.iter().enumerate() {
        if map.contains_key(&b.addr) {
            continue;
        }
        let pools = || cfg.backends[i..].iter().filter(|o| o.addr == b.addr);
        let weight = pools().map(|o| o.weight).max().unwrap_or(b.weight);
        let backup = pools().all(|o| o.backup);
        let name = b.addr.to_string();
        metrics::gauge!(BACKEND_BACKUP, "backend" => name.clone()).set(f64::from(u8::from(backup)));
        metrics::gauge!(BACKEND_MAX_CONNECTIONS, "backend" => name.clone()).set(f64::from(b.max_connections));
        metrics::gauge!(BACKEND_CONFIGURED, "backend" => name.clone()).set(1.0);
        metrics::gauge!(BACKEND_WEIGHT, "backend" => name).set(f64::from(weight));
        let bm = (old.get(&b.addr).cloned())
            .unwrap_or_else(|| Arc::new(BackendMetrics::new(b.addr, Some(queue.clone()))));
        bm.max.store(u64::from(b.max_connections), Ordering::Relaxed);
        bm.close_on_down.store(b.close_on_down, Ordering::Relaxed);
        map.insert(b.addr, bm);
    }
    map
}

/// One listener as its accept loops and connections see it.
#[derive(Debug)]
pub struct ListenerState {
    pub cfg: ListenerConfig,
    pub metrics: ListenerMetrics,
    /// Open connections per client, for `max_connections_per_client`; kept across in-place changes.
    pub clients: Arc<ClientCounts>,
    /// Open connections against the listener's own `max_connections`; kept across in-place changes.
    pub limit: Arc<ConnLimit>,
    /// Its `max_connection_rate`; kept across in-place changes.
    pub rate: Arc<RateGate>,
}

/// Whether a connection just accepted may go on.
pub enum Admit {
    /// Yes; counted against its client while the slot lives, when the listener has a per-client limit.
    Open(Option<Box<ClientSlot>>),
    /// No, for the reason given: the listener's `allow`/`deny` keep its client out (`End::Denied`), or that
    /// client holds `max_connections_per_client` already (`End::ClientLimit`). It is counted; the caller
    /// closes the socket.
    Rejected(End),
}

impl ListenerState {
    /// The state of a listener configured as `cfg`: new, or changed in place from `before`, whose counts
    /// of open connections it keeps.
    pub fn new(cfg: &ListenerConfig, before: Option<&ListenerState>) -> Arc<Self> {
        let limit = before.map_or_else(Arc::default, |b| b.limit.clone());
        limit.set_max(cfg.max_connections);
        let rate = before.map_or_else(Arc::default, |b| b.rate.clone());
        rate.set_rate(cfg.max_connection_rate);
        metrics::gauge!(LISTENER_MAX_CONNECTIONS, "listener" => cfg.name.clone())
            .set(f64::from(cfg.max_connections));
        Arc::new(Self {
            cfg: cfg.clone(),
            metrics: ListenerMetrics::new(&cfg.name),
            clients: before.map_or_else(Arc::default, |b| b.clients.clone()),
            limit,
            rate,
        })
    }

    /// Admits a connection from `peer` just accepted on this listener (see [`Admit`]), and logs a refusal.
    /// With `accept_proxy` its client is not known yet: it is admitted once its header names it
    /// (`Active::header_read`).
    pub fn admit(&self, peer: SocketAddr) -> Admit {
        let admit = if !self.cfg.accept_proxy {
            self.admit_client(peer)
        } else if self.cfg.proxy_from.is_empty() || acl::any_covers(&self.cfg.proxy_from, peer.ip()) {
            return Admit::Open(None);
        } else {
            // Its header would name whatever client it liked.
            self.metrics.denied.increment(1);
            debug!(listener = %self.cfg.name, %peer, "peer not in accept_proxy_from; closed");
            Admit::Rejected(End::Denied)
        };
        if let Admit::Rejected(end) = &admit
            && self.cfg.log_connections
        {
            let mut log = ConnLog::new(peer);
            log.ended(*end);
            log.write(&self.cfg.name);
        }
        admit
    }

    /// Admits a connection from client `peer` by the listener's `allow`/`deny`, its
    /// `max_connection_rate_per_client` and its `max_connections_per_client` (counting it against the last
    /// two); a refusal is counted (`denied` or `rejected`).
    pub fn admit_client(&self, peer: SocketAddr) -> Admit {
        if !self.cfg.acl.admits(peer.ip()) {
            self.metrics.denied.increment(1);
            debug!(listener = %self.cfg.name, %peer, "client denied by the listener's allow/deny; closed");
            return Admit::Rejected(End::Denied);
        }
        if let Some(rate) = self.cfg.connection_rate
            && !self.clients.within_rate(peer.ip(), rate)
        {
            self.metrics.rejected.increment(1);
            debug!(listener = %self.cfg.name, %peer, ?rate, "client over its connection rate; closed");
            return Admit::Rejected(End::ClientRate);
        }
        let Some(limit) = self.cfg.max_connections_per_client else {
            return Admit::Open(None);
        };
        match self.clients.admit(peer.ip(), limit) {
            Some(slot) => Admit::Open(Some(Box::new(slot))),
            None => {
                self.metrics.rejected.increment(1);
                debug!(listener = %self.cfg.name, %peer, limit, "client at its connection limit; closed");
                Admit::Rejected(End::ClientLimit)
            }
        }
    }
}

/// A listener's state as its accept loops read it, once per accept: a reload that changes a listener but
/// not its address swaps it here, on the same sockets, so no connection waiting in their queues is lost.
/// Connections keep the state they were accepted with.
pub type LiveListener = Arc<ArcSwap<ListenerState>>;

#[cfg(test)]
mod tests;
