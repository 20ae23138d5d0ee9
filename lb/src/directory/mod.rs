//! The load-aware directory: ingests signed agent reports into the server table and publishes, per request
//! type, a weighted server list that clients read (`/v1/servers`, `/v1/pick`) and the L4 proxy picks from.
//!
//! Writes (reports, drains, the expiry tick) take the table's mutex and publish a whole new [`Snapshot`]
//! through an `ArcSwap`; reads (lists, picks, status) only load the snapshot, so the hot path takes no
//! lock. Watchers wait on a `watch` channel that carries the snapshot's version.
//!
//! The L4 proxy calls [`Directory::pick`]: `directory.pick("browse", &[tried_addr])` returns an address
//! drawn by weight (power of two choices over predicted load), or `None` when no instance may be picked.

pub mod api;
pub mod ingest;
pub mod peers;
pub mod pick;
pub mod snapshot;
pub mod state;
pub mod table;
pub mod weights;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xcluster_proto::directory::{LbStatus, Pick, ServerList, WeightSet};

use pick::PickView;
pub use snapshot::Snapshot;
use table::Table;
use weights::Params;

use crate::config::Config;

/// Why a directory query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("unknown request type {name:?} (known: {known})")]
    UnknownType { name: String, known: String },
    #[error("no instance of type {0:?} can take a request now")]
    NoInstance(String),
}

/// The settings the directory reads on every report or query; replaced whole on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    pub params: Params,
    pub keys: ingest::ReportKeys,
    pub skew_ms: u64,
    pub max_agents: usize,
    /// Instances in the table at most, over every agent (`[reports] max_instances`).
    pub max_instances: usize,
    pub balancers: Vec<String>,
    pub admin_token: String,
    /// Watches held at once; beyond it a watch is answered at once. A quarter of `[http] max_connections`
    /// (at least 4) stays for reports, other queries, `/readyz` and `/metrics`: long polls held every
    /// connection, and agents' reports were refused with 503.
    pub max_watches: usize,
    /// The addresses of `[[proxy.backends]]`: each may be drained by its address, as an instance by its id.
    pub proxy_backends: BTreeSet<SocketAddr>,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            params: c.params.clone(),
            keys: c.keys.clone(),
            skew_ms: c.skew.as_millis() as u64,
            max_agents: c.max_agents,
            max_instances: c.max_instances,
            balancers: c.balancers.iter().map(ToString::to_string).collect(),
            admin_token: c.admin_token.clone(),
            max_watches: max_watches(c.http.max_connections),
            proxy_backends: c.proxy.backends.iter().map(|b| b.addr).collect(),
        }
    }
}

/// `Settings::max_watches` for `max_connections`.
pub fn max_watches(max_connections: usize) -> usize {
    max_connections.saturating_sub((max_connections / 4).max(4))
}

/// A watch held by this balancer, counted while it waits.
struct WatchSlot<'a>(&'a AtomicUsize);

impl Drop for WatchSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reports accepted and rejected by reason, for `/v1/status` (the Prometheus counters mirror them).
#[derive(Debug, Default)]
pub struct ReportCounts {
    pub accepted: AtomicU64,
    pub rejected: [AtomicU64; ingest::REASONS.len()],
    /// Each reason's WARN line, at most every `WARN_EVERY_MS`.
    pub warned: [xcluster_runtime::telemetry::Throttle; ingest::REASONS.len()],
}

/// The directory. Cheap to clone; every clone shares the same table.
#[derive(Debug, Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Mutex<Table>,
    snapshot: ArcSwap<Snapshot>,
    settings: ArcSwap<Settings>,
    changed: watch::Sender<u64>,
    counts: ReportCounts,
    clock: Instant,
    closing: CancellationToken,
    /// When the last snapshot rebuild ended (directory clock, ms), and whether the table changed since.
    last_publish_ms: AtomicU64,
    /// How long after it reports share the next rebuild: [`COALESCE_MS`], or the last rebuild's own time
    /// if longer.
    window_ms: AtomicU64,
    dirty: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
    /// Watches held now (`Settings::max_watches`).
    watching: AtomicUsize,
    /// `[directory] state_file`, when set: written on every drain or weight change.
    state_file: std::sync::OnceLock<Arc<state::StateFile>>,
    /// The balancer is starting: its API answers its peers, but it has not taken their drains and weights
    /// yet ([`Directory::set_starting`]).
    starting: std::sync::atomic::AtomicBool,
}

/// How an id given to a drain or a weight names a server ([`Directory::named`]).
struct Named {
    /// As kept.
    id: String,
    /// An instance the table has.
    instance: bool,
    /// A `[[proxy.backends]]` entry's address.
    backend: bool,
}

impl Named {
    /// A server this balancer has now (an instance or a backend), or else `kept` (in its drains or weights,
    /// which may be cleared once the server is gone).
    fn known_or(&self, kept: bool) -> bool {
        self.instance || self.backend || kept
    }
}

/// Why a run-time weight was refused.
#[derive(Debug, thiserror::Error)]
pub enum SetWeightError {
    #[error("no such instance or proxy backend")]
    Unknown,
    #[error(
        "instance {0:?} has the weight its load gives it: set a share of it (`50%`); a weight of its own \
         (`7`) is for [[proxy.backends]] entries"
    )]
    InstanceAbsolute(String),
}

/// Most drained ids a balancer takes from its peers (a peer's answer is outside input).
pub const MAX_DRAINED: usize = 10_000;

/// Whether `id` may name a server in a drain or a weight: an instance id, or a proxy backend's address,
/// which may be IPv6 (`[::1]:8001`, whose brackets no id holds). The API and the state file check the same.
pub fn valid_server_id(id: &str) -> bool {
    xcluster_proto::report::valid_id(id) || id.parse::<SocketAddr>().is_ok()
}

/// Marks the table's run-time state changed by an operator now: later than any change before, even if the
/// clock stepped back, so this balancer's latest call is its newest state.
fn touched(table: &mut Table) {
    table.state_changed_unix_ms = state::unix_ms().max(table.state_changed_unix_ms.saturating_add(1));
}

/// Longest wait for a read or write of `[directory] state_file`: past it the balancer goes on without it
/// (starting from its peers' state, or answering a drain call with the change in memory).
pub const STATE_FILE_WITHIN: Duration = Duration::from_secs(10);

/// Reports closer together than this share one snapshot rebuild: a rebuild costs O(instances × types), so
/// a busy balancer rebuilds at most 200 times a second, and a watcher waits at most this much longer. A
/// rebuild that takes longer (a full table of many types) widens the window to its own time, counted from
/// its end: counted from its start, a rebuild of 5 ms or more left no window, every report rebuilt again
/// under the table's lock, and report handlers, blocked on it, held the runtime's threads from watches and
/// `/readyz`.
const COALESCE_MS: u64 = 5;

impl Directory {
    /// An empty directory with the given settings.
    pub fn new(settings: Settings) -> Self {
        let snapshot = Snapshot::build(&Table::default(), 0, &settings.params, None);
        let (changed, _) = watch::channel(snapshot.version);
        // Every counter shows in /metrics from the start, at 0, so a dashboard can tell "none" from "unknown".
        ::metrics::counter!(crate::metrics::REPORTS_ACCEPTED_TOTAL).increment(0);
        for reason in ingest::REASONS {
            ::metrics::counter!(crate::metrics::REPORTS_REJECTED_TOTAL, "reason" => reason).increment(0);
        }
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::default()),
                snapshot: ArcSwap::from_pointee(snapshot),
                settings: ArcSwap::from_pointee(settings),
                changed,
                counts: ReportCounts::default(),
                clock: Instant::now(),
                closing: CancellationToken::new(),
                last_publish_ms: AtomicU64::new(0),
                window_ms: AtomicU64::new(COALESCE_MS),
                dirty: std::sync::atomic::AtomicBool::new(false),
                wake: tokio::sync::Notify::new(),
                watching: AtomicUsize::new(0),
                state_file: std::sync::OnceLock::new(),
                starting: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Applies reloaded settings (types, tunables, key, peers, token) and republishes.
    pub fn reconfigure(&self, settings: Settings) {
        self.inner.settings.store(Arc::new(settings));
        self.republish();
    }

    /// The current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner.settings.load_full()
    }

    /// The current published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// Calls `f` with the current snapshot without cloning its `Arc`: the proxy asks once per connection
    /// (for the addresses it withholds and the backends' run-time weights).
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.inner.snapshot.load())
    }

    /// Milliseconds on the directory's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.elapsed().as_millis() as u64
    }

    /// Marks the start: from before the API serves (its peers, starting beside it, ask it for its state) until
    /// the peers' drains and weights are taken. Meanwhile a drain or a weight call is refused (503
    /// `starting`): taken, it made this balancer's state the newest, and the peers' earlier drains were not
    /// taken at all, so instances drained on every balancer got this one's clients again.
    pub fn set_starting(&self, on: bool) {
        self.inner.starting.store(on, Ordering::Relaxed);
    }

    pub fn starting(&self) -> bool {
        self.inner.starting.load(Ordering::Relaxed)
    }

    /// Ends every pending watch (the balancer is draining).
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    fn counts(&self) -> &ReportCounts {
        &self.inner.counts
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-written in a way that matters more
        // than losing the directory: keep serving.
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the snapshot from the table; wakes watchers when the content changed.
    fn publish_locked(&self, table: &Table) {
        let settings = self.inner.settings.load();
        let now = self.now_ms();
        self.inner.dirty.store(false, Ordering::Relaxed);
        let started = Instant::now();
        let snap = Snapshot::build(table, now, &settings.params, Some(&self.inner.snapshot.load()));
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner
            .window_ms
            .store(took.max(COALESCE_MS), Ordering::Relaxed);
        // 0 means "never after a report", so the first report always publishes at once.
        (self.inner.last_publish_ms).store(self.now_ms().max(1), Ordering::Relaxed);
        let version = snap.version;
        self.inner.snapshot.store(Arc::new(snap));
        self.inner.changed.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
    }

    /// After a report changed the table: rebuild now, unless a rebuild ended within its window
    /// ([`COALESCE_MS`]); then the publisher task rebuilds once that window ends (with every report that
    /// arrived meanwhile).
    fn after_report(&self, table: &Table) {
        let last = self.inner.last_publish_ms.load(Ordering::Relaxed);
        let window = self.inner.window_ms.load(Ordering::Relaxed);
        if last == 0 || self.now_ms().saturating_sub(last) >= window {
            self.publish_locked(table);
        } else {
            self.inner.dirty.store(true, Ordering::Relaxed);
            self.inner.wake.notify_one();
        }
    }

    /// Rebuilds coalesced changes at the end of their window, until `cancel` fires.
    async fn run_publisher(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.inner.wake.notified() => {}
            }
            let due = (self.inner.last_publish_ms.load(Ordering::Relaxed))
                .saturating_add(self.inner.window_ms.load(Ordering::Relaxed));
            let wait = due.saturating_sub(self.now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let table = self.table();
            if self.inner.dirty.load(Ordering::Relaxed) {
                self.publish_locked(&table);
            }
        }
    }

    fn republish(&self) {
        let table = self.table();
        self.publish_locked(&table);
    }

    /// Housekeeping: forgets long-gone instances and republishes so stale ones leave the lists.
    pub fn tick(&self) {
        // (Also publishes any coalesced report change, should the publisher be behind.)
        let settings = self.inner.settings.load();
        let mut table = self.table();
        table.expire(self.now_ms(), &settings.params);
        self.publish_locked(&table);
    }

    /// The server list of type `ty`.
    pub fn servers(&self, ty: &str) -> Result<ServerList, QueryError> {
        let snap = self.snapshot();
        let settings = self.settings();
        snap.server_list(ty, self.now_ms(), &settings)
    }

    /// The server list of type `ty` as JSON (rendered once per snapshot), with its version.
    pub fn servers_json(&self, ty: &str) -> Result<(u64, bytes::Bytes), QueryError> {
        self.snapshot().server_list_json(ty, &self.settings())
    }

    /// Long poll: the list of `ty` (as JSON) as soon as its version differs from `version`, or after
    /// `timeout`, or when the directory closes.
    pub async fn watch(
        &self,
        ty: &str,
        version: u64,
        timeout: Duration,
    ) -> Result<(u64, bytes::Bytes), QueryError> {
        let mut rx = self.inner.changed.subscribe();
        let max = self.settings().max_watches;
        let held = self.inner.watching.fetch_add(1, Ordering::Relaxed) < max;
        let _slot = WatchSlot(&self.inner.watching);
        // Past `max_watches` the poll is answered now: the client asks again after its repoll interval.
        let timeout = if held {
            timeout
        } else {
            ::metrics::counter!(crate::metrics::WATCHES_UNHELD_TOTAL).increment(1);
            Duration::ZERO
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let list = self.servers_json(ty)?;
            if list.0 != version {
                return Ok(list);
            }
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => match r {
                    Ok(Ok(())) => continue,
                    _ => return Ok(list),
                },
                _ = self.inner.closing.cancelled() => return Ok(list),
            }
        }
    }

    /// Waits until every type in `types` has an instance to pick, for at most `within` or until the directory
    /// closes; whether they all have one.
    pub async fn until_routable(&self, types: &[String], within: Duration) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let snap = self.snapshot();
            if types
                .iter()
                .all(|ty| snap.types.get(ty).is_some_and(PickView::can_pick))
            {
                return true;
            }
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => if !matches!(r, Ok(Ok(()))) {
                    return false;
                },
                _ = self.inner.closing.cancelled() => return false,
            }
        }
    }

    /// Whether an instance at `addr` is in the latest list of some type (so the L4 proxy may pick it).
    pub fn lists(&self, addr: SocketAddr) -> bool {
        (self.snapshot().types.values()).any(|v| v.list.rows.iter().any(|r| r.addr == addr))
    }

    /// Picks one instance for a request of type `ty`, avoiding `exclude` (addresses already tried).
    /// `None` when the type is unknown or no instance may be picked. This is the L4 proxy's entry point.
    pub fn pick(&self, ty: &str, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        let snap = self.snapshot();
        let row = snap.types.get(ty)?.pick(exclude, &mut rand::rng())?;
        Some(row.addr)
    }

    /// `GET /v1/pick`: one instance, with the list version it came from.
    pub fn pick_answer(&self, ty: &str) -> Result<Pick, QueryError> {
        let snap = self.snapshot();
        let view = snap.types.get(ty).ok_or_else(|| snapshot::unknown(ty, &snap))?;
        let row = view
            .pick(&[], &mut rand::rng())
            .ok_or_else(|| QueryError::NoInstance(ty.to_string()))?;
        Ok(Pick {
            request_type: ty.to_string(),
            version: snap.served_version(ty)?,
            id: row.id.to_string(),
            addr: row.addr.to_string(),
        })
    }

    /// The id of an instance the table has at `addr`.
    pub fn instance_at(&self, addr: SocketAddr) -> Option<String> {
        (self.table().instances.values())
            .find(|i| i.addr == addr)
            .map(|i| i.id.to_string())
    }

    /// The ids of the instances in the table, in order.
    pub fn instance_ids(&self) -> Vec<String> {
        self.table().instances.keys().map(ToString::to_string).collect()
    }

    /// How `id` names a server in `table`: an instance's id, or else a `[[proxy.backends]]` entry's address
    /// kept as Rust writes a `SocketAddr` (so `127.0.0.1:08001` and `127.0.0.1:8001` are one backend, and
    /// the kept id is its `backend` label).
    fn named(&self, table: &Table, id: &str) -> Named {
        let instance = table.instances.contains_key(id);
        let addr = (id.parse::<SocketAddr>().ok()).filter(|_| !instance);
        Named {
            id: addr.map_or_else(|| id.to_string(), |a| a.to_string()),
            instance,
            backend: addr.is_some_and(|a| self.inner.settings.load().proxy_backends.contains(&a)),
        }
    }

    /// The entry of `kept` (the drains' or the run-time weights' ids) to drop before one more is kept, when
    /// it holds [`MAX_DRAINED`] already: the first by name of a server this balancer does not have now. A
    /// drain outlives its server's absence (it is meant for its return), but long-gone servers' entries
    /// must not crowd out current ones: the set grew past what a restart restores (the state file's and the
    /// peers' first `MAX_DRAINED` by name), and a current drain could be the one left out. `None` when it
    /// has room, or names only servers here (bounded, then, by the table and `[[proxy.backends]]`).
    fn long_gone<'a>(
        &self,
        table: &Table,
        mut kept: impl ExactSizeIterator<Item = &'a String>,
    ) -> Option<String> {
        if kept.len() < MAX_DRAINED {
            return None;
        }
        kept.find(|id| {
            let n = self.named(table, id);
            !n.instance && !n.backend
        })
        .cloned()
    }

    /// Drains (`on = true`) or undrains an instance, or a `[[proxy.backends]]` entry by its address (HAProxy's
    /// `set server state drain`): what is drained gets no new connection, on this balancer until undrained,
    /// and on one that restarts (it takes the drains of its peers). Returns the id as kept, `None` if unknown.
    pub fn set_drained(&self, id: &str, on: bool) -> Option<String> {
        let mut table = self.table();
        let named = self.named(&table, id);
        // Undrained even once no longer known: a backend a reload removed, or a drain taken from a peer.
        if !named.known_or(!on && table.drained.contains(&named.id)) {
            return None;
        }
        let id = named.id;
        if on {
            if !table.drained.contains(&id)
                && let Some(gone) = self.long_gone(&table, table.drained.iter())
            {
                table.drained.remove(&gone);
                tracing::warn!(
                    dropped = gone,
                    kept = MAX_DRAINED,
                    "drains full: the drain of a server this balancer no longer has was dropped"
                );
            }
            table.drained.insert(id.clone());
        } else {
            table.drained.remove(&id);
        }
        touched(&mut table);
        self.publish_locked(&table);
        Some(id)
    }

    /// Sets the run-time weight of an instance (a share of its load-driven weight) or of a
    /// `[[proxy.backends]]` entry by its address (HAProxy's `set server weight`), on this balancer until set
    /// back to `100%`, and on one that restarts (it takes its peers'). Returns the id as kept.
    pub fn set_weight(&self, id: &str, set: WeightSet) -> Result<String, SetWeightError> {
        let mut table = self.table();
        let named = self.named(&table, id);
        // Cleared even once no longer known, as an undrain.
        if !named.known_or(set.is_neutral() && table.weights.contains_key(&named.id)) {
            return Err(SetWeightError::Unknown);
        }
        let id = named.id;
        if named.instance && matches!(set, WeightSet::Absolute(_)) {
            return Err(SetWeightError::InstanceAbsolute(id));
        }
        if !set.is_neutral()
            && !table.weights.contains_key(&id)
            && let Some(gone) = self.long_gone(&table, table.weights.keys())
        {
            table.set_weight(gone.clone(), WeightSet::Percent(100));
            tracing::warn!(
                dropped = gone,
                kept = MAX_DRAINED,
                "run-time weights full: the weight of a server this balancer no longer has was dropped"
            );
        }
        table.set_weight(id.clone(), set);
        touched(&mut table);
        self.publish_locked(&table);
        Ok(id)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> LbStatus {
        let settings = self.settings();
        // The table locked first: every publish happens under its lock, so the snapshot is the one of this
        // table (a drain published between the two showed the server drained with its row still up).
        let table = self.table();
        let snap = self.snapshot();
        let instances = snapshot::instance_status(&table, &snap, self.now_ms());
        let drained = table.drained.iter().cloned().collect();
        let weights = (table.weights.iter())
            .map(|(id, w)| (id.clone(), w.to_string()))
            .collect();
        let state_changed_unix_ms = table.state_changed_unix_ms;
        drop(table);
        let counts = &self.inner.counts;
        LbStatus {
            balancer: settings.balancers.first().cloned().unwrap_or_default(),
            version: snap.version,
            types: snap.types.keys().cloned().collect(),
            instances,
            reports_accepted: counts.accepted.load(Ordering::Relaxed),
            reports_rejected: ingest::REASONS
                .iter()
                .zip(&counts.rejected)
                .map(|(r, c)| (r.to_string(), c.load(Ordering::Relaxed)))
                .collect(),
            // Filled in by the API, which has the metrics registry.
            proxy: Default::default(),
            drained,
            weights,
            state_changed_unix_ms,
        }
    }

    /// Drains `ids` whether or not they are reported yet: the drains a starting balancer takes from its
    /// peers. Ids the API would refuse ([`valid_server_id`]) are skipped, and at most [`MAX_DRAINED`] are
    /// kept. Returns how many were new.
    pub fn restore_drained(&self, ids: impl IntoIterator<Item = String>) -> usize {
        let mut table = self.table();
        let before = table.drained.len();
        for id in ids {
            if table.drained.len() >= MAX_DRAINED {
                break;
            }
            if valid_server_id(&id) {
                // As the API keeps it (an address in Rust's spelling): kept as written, `[2001:DB8::1]:80`
                // still withheld its backend, but no undrain, under any spelling, could take it off.
                let id = self.named(&table, &id).id;
                table.drained.insert(id);
            }
        }
        let added = table.drained.len() - before;
        if added > 0 {
            self.publish_locked(&table);
        }
        added
    }

    /// Sets the run-time weights `set` (id → `50%` or `7`, as a peer's status lists them) of the ids that
    /// have none here: those a starting balancer takes from its peers. Entries that do not parse, of ids the
    /// API would refuse, or beyond [`MAX_DRAINED`], are skipped. Returns how many were new.
    pub fn restore_weights(&self, set: impl IntoIterator<Item = (String, String)>) -> usize {
        let parsed = set
            .into_iter()
            .filter_map(|(id, w)| Some((id, w.parse::<WeightSet>().ok()?)));
        self.restore_weight_sets(parsed)
    }

    /// [`Directory::restore_weights`], of weights already parsed (the state file's).
    fn restore_weight_sets(&self, set: impl IntoIterator<Item = (String, WeightSet)>) -> usize {
        let mut table = self.table();
        let before = table.weights.len();
        for (id, w) in set {
            if table.weights.len() >= MAX_DRAINED {
                break;
            }
            if valid_server_id(&id) && !w.is_neutral() {
                let id = self.named(&table, &id).id;
                table.weights.entry(id).or_insert(w);
            }
        }
        let added = table.weights.len() - before;
        if added > 0 {
            table.rebuild_backend_weights();
            self.publish_locked(&table);
        }
        added
    }

    /// Writes the run-time state to `path` at every change from now on ([`Directory::save_state`]).
    /// Only the first call counts: the file is set at start (`directory.state_file` needs a restart).
    pub fn keep_state_in(&self, path: std::path::PathBuf) {
        ::metrics::counter!(crate::metrics::STATE_WRITE_ERRORS_TOTAL).increment(0);
        let _ = self.inner.state_file.set(Arc::new(state::StateFile::new(path)));
    }

    /// The drains and run-time weights, and when they last changed: what the state file holds.
    pub fn runtime_state(&self) -> state::RuntimeState {
        let table = self.table();
        state::RuntimeState {
            changed_unix_ms: table.state_changed_unix_ms,
            drained: table.drained.clone(),
            weights: table.weights.clone(),
        }
    }

    /// When the run-time state last changed (Unix ms; 0: never).
    pub fn state_changed_unix_ms(&self) -> u64 {
        self.table().state_changed_unix_ms
    }

    /// Adds the drains and weights of `from` (the state file's, or a peer's) as [`Directory::restore_drained`]
    /// and [`Directory::restore_weights`] do, ids not known yet included, and takes its change time if it
    /// is later. Returns how many drains and weights were new.
    pub fn restore_state(&self, from: &state::RuntimeState) -> (usize, usize) {
        let drains = self.restore_drained(from.drained.iter().cloned());
        let weights = self.restore_weight_sets(from.weights.iter().map(|(id, w)| (id.clone(), *w)));
        let mut table = self.table();
        table.state_changed_unix_ms = table.state_changed_unix_ms.max(from.changed_unix_ms);
        (drains, weights)
    }

    /// Forgets every drain and run-time weight: a starting balancer's, from its state file, when its peers
    /// answer with a newer state, which replaces it.
    pub fn clear_runtime_state(&self) {
        let mut table = self.table();
        table.drained.clear();
        table.weights.clear();
        table.state_changed_unix_ms = 0;
        table.rebuild_backend_weights();
        self.publish_locked(&table);
    }

    /// Writes the run-time state to the state file, if there is one, and waits until it is on disk: the
    /// API answers a drain or weight call after this, so a call that was answered survives a `kill -9`.
    /// The write runs on a blocking thread (it fsyncs). A failure is logged and counted; the change
    /// stays in memory (and reaches the file with the next write that succeeds).
    pub async fn save_state(&self) {
        let Some(file) = self.inner.state_file.get().cloned() else {
            return;
        };
        let dir = self.clone();
        let written = tokio::task::spawn_blocking(move || file.save(|| dir.runtime_state()));
        let error = match tokio::time::timeout(STATE_FILE_WITHIN, written).await {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => format!("the write task failed: {e}"),
            // Storage that stopped answering (a hard NFS mount) held every drain call, each on a blocking
            // thread, for ever: the call is answered, the write left to finish if it ever does.
            Err(_) => format!(
                "the write did not finish within {} s",
                STATE_FILE_WITHIN.as_secs()
            ),
        };
        ::metrics::counter!(crate::metrics::STATE_WRITE_ERRORS_TOTAL).increment(1);
        tracing::warn!(
            %error,
            // Also written at start, before any change: the warning then comes before the first drain.
            "cannot write the state file: the drains and run-time weights hold in memory, but a restart of \
             every balancer would lose them"
        );
    }

    /// Installs the collector that writes the table's per-instance and per-type series at each scrape, so an
    /// instance the table forgot, or a type a reload removed, leaves `/metrics` with it.
    pub fn collect_metrics(&self) {
        let dir = self.clone();
        let collect = move |out: &mut xcluster_runtime::telemetry::Exposition| {
            // The table locked first, as in `status`.
            let table = dir.table();
            let snap = dir.snapshot();
            let status = snapshot::instance_status(&table, &snap, dir.now_ms());
            drop(table);
            snapshot::write_metrics(&status, &snap, out);
        };
        xcluster_runtime::telemetry::set_collector("lb_directory", Arc::new(collect));
    }

    /// Runs the housekeeping tick (expiry every 100 ms) until `cancel` fires.
    /// Also runs the publisher of coalesced report changes: a directory fed reports needs this running.
    pub async fn run_housekeeping(self, cancel: CancellationToken) {
        tokio::spawn(self.clone().run_publisher(cancel.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.tick();
        }
    }
}
