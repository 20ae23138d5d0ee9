//! The proxy service: worker threads, the set of running listeners, live reload, and drain.
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
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::access::{ConnLog, End};
use super::acl;
use super::clients::{ClientCounts, ClientSlot};
use super::config::{Forwarding, ListenerConfig, ProxyConfig, RuntimeMode, Timeouts};
use super::handover;
use super::health::{CheckStreaks, Failure, Holds, Verdict, check};
use super::limit::ConnLimit;
use super::listener::Close;
use super::metrics::{
    Assigned, BACKEND_BACKUP, BACKEND_CONFIGURED, BACKEND_MAX_CONNECTIONS, BACKEND_WEIGHT,
    BUFFER_WAITS_TOTAL, BackendMetrics, LISTENER_BIND_FAILURES_TOTAL, LISTENER_MAX_CONNECTIONS,
    LISTENER_UNBOUND, ListenerMetrics, RECEIVE_PAUSES_TOTAL, Retired, SPLICED_BYTES_TOTAL, WORKERS,
};
use super::pick::{BackendPicker, PickFor};
use super::queue::{Places, Queue, Ticket, Wait, Waker};
use super::rate::RateGate;

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
        if !self.queue.may_take(ty, ticket, || self.places.load().free(ty)) {
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
            addr = self.pick(ty, &passed, &conn).ok_or(NoBackend::Full)?;
        };
        if attempt > 0 {
            l.metrics.retries.increment(1);
        }
        Ok((addr, assigned))
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

    /// A backend for `ty` other than `tried`, leaving out those held out unless every one left is.
    fn pick(&self, ty: &str, tried: &[SocketAddr], conn: &PickFor<'_>) -> Option<SocketAddr> {
        match self.holds.exclude(tried) {
            Some(held) => self
                .picker
                .pick(ty, &held, conn)
                .or_else(|| self.picker.pick(ty, tried, conn)),
            None => self.picker.pick(ty, tried, conn),
        }
    }

    /// A connect to `addr` failed or timed out: it is counted, told to the picker, held out of the picks for
    /// a while ([`Holds`]) and left out of the connection's next attempts.
    pub fn connect_failed(&self, addr: SocketAddr, bm: &BackendMetrics, tried: &mut Vec<SocketAddr>) {
        bm.connect_failures.increment(1);
        self.hold_out(addr, bm, Failure::Connect, "a connect failed");
        self.picker.report_failure(addr);
        tried.push(addr);
    }

    /// Holds `addr` out of the picks after a failed connect (a client's, `how`) or failed checks; `why` is
    /// for the log.
    fn hold_out(&self, addr: SocketAddr, bm: &BackendMetrics, how: Failure, why: &str) {
        bm.failing.set(1.0);
        let (hold, fails) = self.holds.failed(addr, how);
        // Once per outage: with every backend down, each connection still tries one, and each check fails.
        if fails == 1 {
            warn!(backend = %addr, why, ?hold, "backend held out of the picks");
        }
    }

    /// Checks every configured backend (but those with `check = false`) once, all at the same time, each with the connect timeout, and acts
    /// on each result as its streak says ([`CheckStreaks`]): a backend down is held out at least until the
    /// next check could have ended; one back up, or a pass while up, ends its hold.
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
        let until_next = interval + t.connect;
        for (addr, bm, checked) in futures_util::future::join_all(checks).await {
            let was_down = streaks.is_down(addr);
            let verdict = streaks.record(addr, checked.is_ok(), t.check_fall, t.check_rise);
            if let Err(e) = &checked {
                bm.check_failures.increment(1);
                debug!(backend = %addr, error = %e, ?verdict, "health check failed");
            }
            match (verdict, checked) {
                (Verdict::Up, _) => self.answered(addr, bm, "its health checks"),
                (Verdict::Down, Err(e)) => {
                    let why = format!("its health checks failed: {e}");
                    self.hold_out(addr, bm, Failure::Checks(until_next), &why);
                    if !was_down {
                        bm.went_down();
                    }
                }
                (Verdict::Rising, _) if !self.holds.keep(addr, until_next) => {
                    // A client's connect ended the hold meanwhile: it answers.
                    streaks.up(addr);
                }
                _ => {}
            }
        }
    }

    /// `addr` accepted a connect (`what`): ends its hold.
    fn answered(&self, addr: SocketAddr, bm: &BackendMetrics, what: &str) {
        let slow_start = || self.timeouts.load().slow_start;
        if self.holds.succeeded(addr, slow_start) {
            bm.failing.set(0.0);
            let slow_start_ms = slow_start().map(|d| d.as_millis());
            info!(backend = %addr, ?slow_start_ms, "backend answers {what} again; back in the picks");
        }
    }

    /// A connect to `addr`, begun at `started`, succeeded: it is counted, and ends the backend's hold.
    pub fn connected(&self, addr: SocketAddr, bm: &BackendMetrics, started: Instant) {
        bm.connected(started);
        self.answered(addr, bm, "a connect");
    }

    /// Takes `cfg`'s backends: their metric handles (kept for those already known) and their places.
    fn set_backends(&self, cfg: &ProxyConfig) {
        let old = self.backends.load();
        let map = backend_handles(cfg, &old, &self.queue);
        let mut retired = Retired::clone(&self.retired.load());
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
/// backend in `old` keeps its handles, so its count of open connections stays true across a reload. An
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

/// A worker thread: a tokio runtime, or an io_uring event loop.
enum Engine {
    Tokio {
        handle: tokio::runtime::Handle,
        finish: CancellationToken,
    },
    Uring(super::uring::Remote),
}

struct Worker {
    engine: Engine,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Ends the thread; connections still open on it are closed.
    fn finish(&self) {
        match &self.engine {
            Engine::Tokio { finish, .. } => finish.cancel(),
            Engine::Uring(r) => r.send(super::uring::Msg::Finish),
        }
    }
}

fn spawn_worker(name: String, mut builder: tokio::runtime::Builder) -> std::io::Result<Worker> {
    let rt = builder.enable_all().build()?;
    let handle = rt.handle().clone();
    let finish = CancellationToken::new();
    let f = finish.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        rt.block_on(f.cancelled());
        rt.shutdown_timeout(Duration::from_millis(100));
    })?;
    Ok(Worker {
        engine: Engine::Tokio { handle, finish },
        thread,
    })
}

/// Starts the workers; returns them with the runtime they run (`io_uring` falls back to `per_core`).
fn spawn_workers(cfg: &ProxyConfig, shared: &Arc<Shared>) -> std::io::Result<(Vec<Worker>, RuntimeMode)> {
    if cfg.runtime == RuntimeMode::IoUring {
        let mut workers = Vec::new();
        for i in 0..cfg.workers {
            match super::uring::spawn(i, shared.clone(), cfg.io_uring_buffers) {
                Ok((remote, thread)) => workers.push(Worker {
                    engine: Engine::Uring(remote),
                    thread,
                }),
                Err(e) => {
                    warn!(error = %e, "io_uring is not available here; the proxy runs the per_core runtime");
                    for w in &workers {
                        w.finish();
                    }
                    let mode = RuntimeMode::PerCore;
                    return Ok((spawn_tokio_workers(cfg.workers, mode)?, mode));
                }
            }
        }
        return Ok((workers, RuntimeMode::IoUring));
    }
    Ok((spawn_tokio_workers(cfg.workers, cfg.runtime)?, cfg.runtime))
}

fn spawn_tokio_workers(workers: usize, mode: RuntimeMode) -> std::io::Result<Vec<Worker>> {
    match mode {
        RuntimeMode::PerCore | RuntimeMode::IoUring => (0..workers)
            .map(|i| {
                spawn_worker(
                    format!("lb-proxy-{i}"),
                    tokio::runtime::Builder::new_current_thread(),
                )
            })
            .collect(),
        RuntimeMode::Shared => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers).thread_name("lb-proxy");
            Ok(vec![spawn_worker("lb-proxy-main".into(), b)?])
        }
    }
}

struct Running {
    id: u64,
    /// Fixed for its life: a change of address is a new listener. The rest of its settings are in `state`.
    listen: SocketAddr,
    state: LiveListener,
    /// `Some` once it closes (the tokio accept loops watch it).
    close: watch::Sender<Option<Close>>,
    /// Its sockets' inodes, to tell them from another process's on the same address.
    inodes: Vec<u64>,
}

/// The running proxy. `shutdown()` stops accepting; `drained()` waits until established connections end
/// (or the stop token given to [`start`] fires) and the worker threads are gone.
#[derive(Debug)]
pub struct ProxyHandle {
    drain: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting on every listener; established connections carry on.
    pub fn shutdown(&self) {
        self.drain.cancel();
    }

    /// Waits for the drain to complete. Call after [`ProxyHandle::shutdown`] or after the drain token fired.
    pub async fn drained(self) {
        let _ = self.task.await;
    }
}

struct Manager {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    running: Vec<Running>,
    /// Listeners of the config whose address was taken when a reload added them: retried every
    /// [`BIND_RETRY`] until they bind or a reload drops them.
    unbound: Vec<ListenerConfig>,
    next_id: u64,
    backlog: i32,
    keepalive: Option<Duration>,
    started: ProxyConfig,
    /// The listeners of the config applied last, as [`super::metrics::LISTENER_INFO`] shows them.
    listed: Vec<ListenerConfig>,
    /// `shutdown.grace_ms`: how long a closing listener may wait for permits to serve its queue.
    grace: Duration,
}

/// The config's `[proxy]` and its `shutdown.grace_ms`, marked seen.
fn proxy_and_grace(config: &mut watch::Receiver<Arc<crate::Config>>) -> (ProxyConfig, Duration) {
    let c = config.borrow_and_update();
    (c.proxy.clone(), c.shutdown.grace)
}

/// Starts the workers and the listeners of the current config, and follows config reloads.
/// `drain` stops accepting; `stop` abandons established connections.
pub fn start(
    mut config: watch::Receiver<Arc<crate::Config>>,
    picker: Arc<dyn BackendPicker>,
    drain: &CancellationToken,
    stop: CancellationToken,
) -> Result<ProxyHandle, Error> {
    let (cfg, grace) = proxy_and_grace(&mut config);
    let shared = Arc::new(Shared {
        picker,
        timeouts: ArcSwap::from_pointee(cfg.timeouts.clone()),
        forwarding: cfg.forwarding,
        backends: ArcSwap::default(),
        places: ArcSwap::default(),
        queue: Arc::default(),
        permits: Arc::new(Semaphore::new(cfg.max_connections)),
        tracker: TaskTracker::new(),
        listeners: TaskTracker::new(),
        stop,
        holds: Holds::default(),
        retired: ArcSwap::default(),
    });
    prune_retired(&shared);
    let (workers, runtime) = spawn_workers(&cfg, &shared).map_err(Error::Workers)?;
    metrics::gauge!(WORKERS, "runtime" => runtime.name()).set(cfg.workers as f64);
    if runtime == RuntimeMode::IoUring {
        // At 0 from the start, so an alert on their rate has a series before the first event.
        for name in [BUFFER_WAITS_TOTAL, RECEIVE_PAUSES_TOTAL, SPLICED_BYTES_TOTAL] {
            metrics::counter!(name).increment(0);
        }
    }
    let mut m = Manager {
        shared,
        workers,
        running: Vec::new(),
        unbound: Vec::new(),
        next_id: 0,
        backlog: cfg.backlog,
        keepalive: cfg.keepalive,
        started: cfg.clone(),
        listed: cfg.listeners.clone(),
        grace,
    };
    m.apply_live(&cfg);
    super::metrics::publish_listeners(&[], &cfg.listeners);
    for l in &cfg.listeners {
        if let Err(source) = m.add_listener(l) {
            m.finish_now();
            return Err(Error::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            });
        }
    }
    info!(
        listeners = cfg.listeners.len(),
        workers = cfg.workers,
        runtime = %runtime.name(),
        forwarding = %cfg.forwarding.name(),
        "proxy started"
    );
    let drain = drain.child_token();
    tokio::spawn(check_backends(m.shared.clone(), drain.clone()));
    let d = drain.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = d.cancelled() => break,
                r = config.changed() => {
                    if r.is_err() {
                        d.cancelled().await;
                        break;
                    }
                    let (new, grace) = proxy_and_grace(&mut config);
                    m.grace = grace;
                    m.reload(&new);
                }
                () = tokio::time::sleep(BIND_RETRY), if !m.unbound.is_empty() => m.retry_unbound(),
            }
        }
        m.drain().await;
    });
    Ok(ProxyHandle { drain, task })
}

/// Installs the pruner that leaves the series of the listeners and backends reloads removed out of
/// `/metrics` once nothing uses them ([`super::metrics::hide_retired`]). It holds `shared` weakly: a proxy
/// gone hides nothing.
fn prune_retired(shared: &Arc<Shared>) {
    let shared = Arc::downgrade(shared);
    let prune = move |text: &str| {
        let shared = shared.upgrade()?;
        let retired = shared.retired.load();
        super::metrics::hide_retired(text, &retired, |addr| shared.picker.routes_to(addr))
    };
    xcluster_runtime::telemetry::set_pruner("lb_proxy", Arc::new(prune));
}

/// How often a listener whose address was taken tries to bind it again. An address is usually taken for a
/// moment (the balancer it replaces is still draining it), so the listener starts serving soon after, without
/// another reload.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Active health checks of the configured backends, every `check_interval_ms` (read again each round, so a
/// reload can change it or turn checks on or off), until the drain.
async fn check_backends(shared: Arc<Shared>, drain: CancellationToken) {
    /// How often a disabled check looks whether a reload turned it on.
    const OFF_POLL: Duration = Duration::from_secs(1);
    let mut streaks = CheckStreaks::default();
    loop {
        let interval = shared.timeouts.load().check_interval;
        tokio::select! {
            () = drain.cancelled() => return,
            () = tokio::time::sleep(interval.unwrap_or(OFF_POLL)) => {}
        }
        shared.holds.forget_stale();
        if let Some(interval) = interval {
            tokio::select! {
                () = drain.cancelled() => return,
                () = shared.check_all(interval, &mut streaks) => {}
            }
        }
    }
}

impl Manager {
    /// Applies what reloads without touching listeners: timeouts, backends and weights.
    fn apply_live(&mut self, cfg: &ProxyConfig) {
        self.shared.timeouts.store(Arc::new(cfg.timeouts.clone()));
        self.shared.set_backends(cfg);
        self.shared.picker.on_config(cfg);
    }

    /// Binds `cfg` on every worker and starts its accept loops.
    fn add_listener(&mut self, cfg: &ListenerConfig) -> std::io::Result<()> {
        let sockets = self
            .workers
            .iter()
            .map(|_| super::listener::bind(cfg, self.backlog, self.keepalive))
            .collect::<std::io::Result<Vec<_>>>()?;
        let inodes: Vec<u64> = sockets.iter().filter_map(|s| handover::inode(s).ok()).collect();
        handover::advise(cfg.listen, &inodes, &cfg.name);
        let state: LiveListener = Arc::new(ArcSwap::new(ListenerState::new(cfg, None)));
        let (close, _) = watch::channel(None);
        let id = self.next_id;
        self.next_id += 1;
        for (w, socket) in self.workers.iter().zip(sockets) {
            match &w.engine {
                Engine::Tokio { handle, .. } => {
                    let fut = super::listener::accept_loop(
                        socket,
                        state.clone(),
                        self.shared.clone(),
                        close.subscribe(),
                    );
                    handle.spawn(self.shared.listeners.track_future(fut));
                }
                Engine::Uring(r) => r.send(super::uring::Msg::Add {
                    id,
                    socket,
                    state: state.clone(),
                }),
            }
        }
        self.running.push(Running {
            id,
            listen: cfg.listen,
            state,
            close,
            inodes,
        });
        Ok(())
    }

    fn reload(&mut self, new: &ProxyConfig) {
        let pending = self.started.restart_pending(new);
        if !pending.is_empty() {
            // Named: the list of every such key, logged whatever changed, left the operator to guess.
            warn!(
                keys = %pending.join(", "),
                "proxy: changed keys that need a restart; the running values stay until then"
            );
        }
        self.apply_live(new);
        super::metrics::publish_listeners(&self.listed, &new.listeners);
        let mut retired = Retired::clone(&self.shared.retired.load());
        let configured = |name: &str| new.listeners.iter().any(|l| l.name == name);
        retired.listeners.retain(|name, _| !configured(name));
        for l in self.listed.iter().filter(|l| !configured(&l.name)) {
            retired.listeners.entry(l.name.clone()).or_default();
        }
        for sockets in retired.listeners.values_mut() {
            sockets.retain(|s| s.strong_count() > 0);
        }
        self.listed = new.listeners.clone();
        // By address: a listener whose address is still listed keeps its sockets and, if changed, takes its new
        // settings in place; one whose address is gone stops. Their connections are not touched.
        for r in std::mem::take(&mut self.running) {
            let Some(l) = new.listeners.iter().find(|l| l.listen == r.listen) else {
                let state = r.state.load();
                info!(listener = %state.cfg.name, addr = %r.listen, "proxy listener removed");
                if let Some(sockets) = retired.listeners.get_mut(&state.cfg.name) {
                    // Renamed in place earlier, a socket's name is its state's, not the one it was added with.
                    let open: Arc<dyn std::any::Any + Send + Sync> = r.state.clone();
                    sockets.push(Arc::downgrade(&open));
                }
                self.stop_listener(&r);
                continue;
            };
            let old = r.state.load_full();
            if old.cfg != *l {
                info!(listener = %l.name, addr = %l.listen, "proxy listener changed in place");
                r.state.store(ListenerState::new(l, Some(&old)));
            }
            self.running.push(r);
        }
        self.shared.retired.store(Arc::new(retired));
        let mut unbound = Vec::new();
        for l in &new.listeners {
            if self.running.iter().any(|r| r.listen == l.listen) {
                continue;
            }
            match self.add_listener(l) {
                Ok(()) => info!(listener = %l.name, addr = %l.listen, "proxy listener added"),
                Err(e) => {
                    metrics::counter!(LISTENER_BIND_FAILURES_TOTAL, "listener" => l.name.clone())
                        .increment(1);
                    metrics::gauge!(LISTENER_UNBOUND, "listener" => l.name.clone()).set(1.0);
                    error!(
                        listener = %l.name, addr = %l.listen, error = %e,
                        "cannot bind proxy listener; retrying every second"
                    );
                    unbound.push(l.clone());
                }
            }
        }
        for dropped in (self.unbound.iter()).filter(|o| !unbound.iter().any(|n| n.name == o.name)) {
            metrics::gauge!(LISTENER_UNBOUND, "listener" => dropped.name.clone()).set(0.0);
        }
        self.unbound = unbound;
    }

    /// Tries again to bind the listeners whose address was taken.
    fn retry_unbound(&mut self) {
        for l in std::mem::take(&mut self.unbound) {
            match self.add_listener(&l) {
                Ok(()) => {
                    metrics::gauge!(LISTENER_UNBOUND, "listener" => l.name.clone()).set(0.0);
                    info!(listener = %l.name, addr = %l.listen, "proxy listener bound at last");
                }
                Err(e) => {
                    debug!(listener = %l.name, addr = %l.listen, error = %e, "proxy listener still cannot bind");
                    self.unbound.push(l);
                }
            }
        }
    }

    /// Closes `r`'s sockets on every worker: at once where another process takes over their clients
    /// ([`super::handover`]), else once the clients queued on them are accepted (see
    /// [`xcluster_runtime::net::Closing`]).
    fn stop_listener(&self, r: &Running) {
        let how = Close {
            give_up: Instant::now() + self.grace,
            hand_over: handover::possible(r.listen, &r.inodes),
        };
        if how.hand_over {
            let name = &r.state.load().cfg.name;
            let msg = "proxy listener closing: another process takes over its clients";
            info!(listener = %name, addr = %r.listen, "{msg}");
        }
        r.close.send_replace(Some(how));
        for w in &self.workers {
            if let Engine::Uring(remote) = &w.engine {
                remote.send(super::uring::Msg::Remove {
                    id: r.id,
                    how,
                    closing: self.shared.listeners.token(),
                });
            }
        }
    }

    /// Stops accepting, waits for established connections (until `stop`), then ends the workers.
    async fn drain(mut self) {
        for r in std::mem::take(&mut self.running) {
            self.stop_listener(&r);
        }
        let (tracker, listeners) = (self.shared.tracker.clone(), self.shared.listeners.clone());
        tracker.close();
        listeners.close();
        let active = tracker.len();
        if self.shared.stop.is_cancelled() {
            // SIGINT: no grace to wait out, so neither "draining" nor "grace period over" (both were logged,
            // 6 µs apart). Ending the workers below closes what is left.
            if active > 0 {
                info!(
                    connections = active,
                    "proxy stopping: closing proxied connections"
                );
            }
        } else {
            if active > 0 {
                info!(connections = active, "proxy draining established connections");
            }
            tokio::select! {
                // The listeners first: until they are closed they may still accept queued clients.
                _ = async { listeners.wait().await; tracker.wait().await } => {}
                _ = self.shared.stop.cancelled() => {
                    // Ending the workers below closes what is left.
                    warn!(connections = tracker.len(), "grace period over: closing proxied connections");
                }
            }
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in &workers {
                w.finish();
            }
            for w in workers {
                let _ = w.thread.join();
            }
        })
        .await;
        info!("proxy drained");
    }

    /// Ends the workers without waiting (start-up failed).
    fn finish_now(&mut self) {
        for r in std::mem::take(&mut self.running) {
            self.stop_listener(&r);
        }
        for w in &self.workers {
            w.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// With `balance = "least_connections"`, a connection counts on its backend from the pick, while it
    /// connects: picks made before any connect completes (a burst of accepts) alternate between two equal
    /// backends instead of all taking the one that looked idle, and a backend whose connections end is
    /// preferred again.
    #[test]
    fn least_connections_counts_connections_from_the_pick() {
        let cfg = ProxyConfig::for_tests(
            r#"
            balance = "least_connections"
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            [[backends]]
            addr = "127.0.0.1:2"
            "#,
        );
        let shared = Shared::for_tests(&cfg);
        let l = ListenerState::new(&cfg.listeners[0], None);
        let client = IpAddr::from([127, 0, 0, 1]);
        // Ten connections still connecting: none has completed, all hold their assignment.
        let connecting: Vec<(SocketAddr, Assigned)> = (0..10)
            .map(|_| {
                shared
                    .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
                    .unwrap()
            })
            .collect();
        let on_1 = connecting.iter().filter(|(a, _)| a.port() == 1).count();
        assert_eq!(on_1, 5, "10 picks in a burst went {on_1} to 10 - {on_1}");
        // Backend 1's connections end: the next five go to it.
        let kept: Vec<_> = connecting.into_iter().filter(|(a, _)| a.port() == 2).collect();
        let later: Vec<(SocketAddr, Assigned)> = (0..5)
            .map(|_| {
                shared
                    .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
                    .unwrap()
            })
            .collect();
        assert!(later.iter().all(|(a, _)| a.port() == 1));
        drop((kept, later));
    }

    /// A backend at its `max_connections` is passed over; with every backend full there is no pick, and a
    /// connection that ends frees its place.
    #[test]
    fn a_backend_at_max_connections_is_passed_over() {
        let cfg = ProxyConfig::for_tests(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            max_connections = 2
            [[backends]]
            addr = "127.0.0.1:2"
            weight = 1
            max_connections = 3
            "#,
        );
        let shared = Shared::for_tests(&cfg);
        let l = ListenerState::new(&cfg.listeners[0], None);
        let client = IpAddr::from([127, 0, 0, 1]);
        let mut open: Vec<(SocketAddr, Assigned)> = (0..5)
            .map(|_| {
                shared
                    .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
                    .unwrap()
            })
            .collect();
        let on_1 = open.iter().filter(|(a, _)| a.port() == 1).count();
        assert_eq!(on_1, 2, "{open:?}");
        assert_eq!(
            shared
                .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
                .err(),
            Some(NoBackend::Full)
        );
        let both: Vec<SocketAddr> = open.iter().map(|(a, _)| *a).collect();
        assert_eq!(
            shared
                .next_backend(&l, &l.cfg.request_type, client, &both, 0, None)
                .err(),
            Some(NoBackend::TurnAround)
        );
        let on_2 = open.iter().position(|(a, _)| a.port() == 2).unwrap();
        open.swap_remove(on_2);
        let (addr, _held) = shared
            .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
            .unwrap();
        assert_eq!(addr.port(), 2);
    }

    /// A connection that has tried every backend tries them again after a pause while it has attempts
    /// left, unless health checks have put them all down; then, or with no attempt left, it is closed.
    #[test]
    fn every_backend_tried_turns_around_unless_checks_put_them_down() {
        let cfg = ProxyConfig::for_tests(
            r#"
            connect_attempts = 3
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            "#,
        );
        let shared = Shared::for_tests(&cfg);
        let l = ListenerState::new(&cfg.listeners[0], None);
        let client = IpAddr::from([127, 0, 0, 1]);
        let (only, bm) = shared
            .next_backend(&l, &l.cfg.request_type, client, &[], 0, None)
            .unwrap();
        let mut tried = Vec::new();
        shared.connect_failed(only, &bm, &mut tried);
        assert_eq!(
            shared
                .next_backend(&l, &l.cfg.request_type, client, &tried, 1, None)
                .err(),
            Some(NoBackend::TurnAround)
        );
        // After the pause, with `tried` cleared, the held backend is tried again: it is all there is.
        let (again, _) = shared
            .next_backend(&l, &l.cfg.request_type, client, &[], 1, None)
            .unwrap();
        assert_eq!(again, only);
        assert_eq!(
            shared
                .next_backend(&l, &l.cfg.request_type, client, &tried, 3, None)
                .err(),
            Some(NoBackend::Exhausted),
            "no attempt left"
        );
        shared.hold_out(only, &bm, Failure::Checks(Duration::from_secs(3)), "test");
        assert_eq!(
            shared
                .next_backend(&l, &l.cfg.request_type, client, &tried, 1, None)
                .err(),
            Some(NoBackend::Exhausted),
            "down by its checks: not worth a wait"
        );
    }

    /// A type's places are those of its capped backends with a weight; one without a cap, or no configured
    /// backend, gives it places without end.
    #[test]
    fn places_count_only_capped_backends_with_a_weight() {
        let cfg = ProxyConfig::for_tests(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            request_types = ["web"]
            max_connections = 2
            [[backends]]
            addr = "127.0.0.1:2"
            request_types = ["web"]
            max_connections = 3
            [[backends]]
            addr = "127.0.0.1:3"
            request_types = ["web"]
            weight = 0
            [[backends]]
            addr = "127.0.0.1:4"
            request_types = ["api"]
            "#,
        );
        let shared = Shared::for_tests(&cfg);
        let free = |ty: &str| shared.places.load().free(ty);
        assert_eq!(free("web"), 5);
        let second = cfg.backends[1].addr;
        shared.backends.load()[&second].open.store(3, Ordering::Relaxed);
        assert_eq!(free("web"), 2);
        assert_eq!(free("api"), usize::MAX, "a backend without a cap");
        assert_eq!(free("routed"), usize::MAX, "no configured backend");
    }

    /// A place that frees goes to the client that has waited longest, not to a later one nor a newcomer.
    #[test]
    fn a_freed_place_goes_to_the_client_that_waited_longest() {
        let cfg = ProxyConfig::for_tests(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            [[backends]]
            addr = "127.0.0.1:1"
            max_connections = 1
            "#,
        );
        let shared = Shared::for_tests(&cfg);
        let l = ListenerState::new(&cfg.listeners[0], None);
        let client = IpAddr::from([127, 0, 0, 1]);
        let ask =
            |ticket: Option<&Ticket>| shared.next_backend(&l, &l.cfg.request_type, client, &[], 0, ticket);
        let held = ask(None).unwrap();
        assert_eq!(ask(None).err(), Some(NoBackend::Full));
        let bells: [Arc<tokio::sync::Notify>; 2] = [Arc::default(), Arc::default()];
        let rung = |i: usize| futures_util::FutureExt::now_or_never(bells[i].notified()).is_some();
        let first = shared
            .queue
            .join(&l.cfg.request_type, Waker::Task(bells[0].clone()));
        let second = shared
            .queue
            .join(&l.cfg.request_type, Waker::Task(bells[1].clone()));
        assert_eq!((rung(0), rung(1)), (false, false));
        // The end of the connection holding the place rings the oldest waiter, and only it.
        drop(held);
        assert_eq!((rung(0), rung(1)), (true, false));
        assert_eq!(ask(Some(&second)).err(), Some(NoBackend::Full));
        assert_eq!(ask(None).err(), Some(NoBackend::Full));
        let served = ask(Some(&first)).unwrap();
        // Served, the first leaves the queue and rings the next, in case a second place is free.
        drop(first);
        assert_eq!((rung(0), rung(1)), (false, true));
        assert_eq!(
            ask(Some(&second)).err(),
            Some(NoBackend::Full),
            "no place is free"
        );
        drop(served);
        let _served = ask(Some(&second)).unwrap();
    }
}
