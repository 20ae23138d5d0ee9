//! Metric names of the L4 proxy, and the handles each listener and backend keeps so the hot path never looks
//! a metric up by name. Labels are bounded: listener names and backend addresses come from config (or from
//! the directory's bounded instance list).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use metrics::{Counter, Gauge, Histogram};
use xcluster_proto::directory::{ProxyBackendStatus, ProxyListenerStatus, ProxyStatus};
use xcluster_runtime::telemetry::Hide;

use super::access::Side;
use super::config::ListenerConfig;
use super::queue::Queue;

xcluster_runtime::metric_names! {
    /// Connections accepted, by `listener`.
    pub const ACCEPTED_TOTAL: &str = "xcluster_lb_proxy_connections_accepted_total";
    /// Connections open now, by `listener`: accepted and not yet closed (waiting, connecting or established).
    pub const ACTIVE: &str = "xcluster_lb_proxy_connections_active";
    /// Connections closed because no backend could be reached.
    pub const FAILED_TOTAL: &str = "xcluster_lb_proxy_connections_failed_total";
    /// Connections closed as soon as accepted: their client held `max_connections_per_client` already, or was
    /// over its `max_connection_rate_per_client`.
    pub const REJECTED_TOTAL: &str = "xcluster_lb_proxy_connections_rejected_total";
    /// Connections closed before any backend was tried, on listeners with `accept_proxy`: no valid PROXY header
    /// within the connect timeout.
    pub const HEADER_ERRORS_TOTAL: &str = "xcluster_lb_proxy_header_errors_total";
    /// Connections on a listener with `sni` by where their TLS hello sent them: `to="routed"`, the type its
    /// server name maps to; `to="default"`, the listener's own type (no hello, no name, or a name not listed);
    /// `to="refused"`, closed instead, on listeners with `sni_only`.
    pub const SNI_TOTAL: &str = "xcluster_lb_proxy_sni_total";
    /// Connections closed as soon as accepted: the listener's `allow`/`deny` keep their client out.
    pub const DENIED_TOTAL: &str = "xcluster_lb_proxy_connections_denied_total";
    /// Accepts that failed (out of descriptors or memory, or aborted by the client); the loop backs off and goes on.
    pub const ACCEPT_ERRORS_TOTAL: &str = "xcluster_lb_proxy_accept_errors_total";
    /// Times a listener's accept waited for its `max_connection_rate` (its clients waited in its queue).
    pub const RATE_WAITS_TOTAL: &str = "xcluster_lb_proxy_rate_waits_total";
    /// Connections closed for being idle longer than their `idle_timeout_ms` (or half-closed past `fin_timeout_ms`).
    pub const IDLE_TIMEOUTS_TOTAL: &str = "xcluster_lb_proxy_idle_timeouts_total";
    /// A listener's own `max_connections` (0: only the proxy-wide limit), set on each (re)load.
    pub const LISTENER_MAX_CONNECTIONS: &str = "xcluster_lb_proxy_listener_max_connections";
    /// Established connections ended by a socket error, most often a reset, by the `side` it came from:
    /// `client` or `backend` (HAProxy's `cli_abrt` and `srv_abrt`).
    pub const CONNECTION_ERRORS_TOTAL: &str = "xcluster_lb_proxy_connection_errors_total";
    /// Connect attempts beyond the first (redispatch to another backend).
    pub const RETRIES_TOTAL: &str = "xcluster_lb_proxy_retries_total";
    /// Connections that waited for a place because every backend was at its `max_connections`.
    pub const QUEUED_TOTAL: &str = "xcluster_lb_proxy_connections_queued_total";
    /// Connections whose client left while they waited for a place (reset, or closed without sending a byte;
    /// HAProxy's `CQ`): closed without a connect.
    pub const ABANDONED_TOTAL: &str = "xcluster_lb_proxy_connections_abandoned_total";
    /// Connections waiting for a place now, by `request_type` (HAProxy's `qcur`, which is per backend pool).
    pub const WAITING: &str = "xcluster_lb_proxy_connections_waiting";
    /// Bytes by `direction`: `up` is client to backend, `down` backend to client.
    pub const LISTENER_BYTES_TOTAL: &str = "xcluster_lb_proxy_listener_bytes_total";
    /// Connects to a backend that succeeded, by `backend`.
    pub const BACKEND_CONNECTS_TOTAL: &str = "xcluster_lb_proxy_backend_connects_total";
    /// Connects to a backend that failed (refused, unreachable or timed out), by `backend`.
    pub const BACKEND_CONNECT_FAILURES_TOTAL: &str = "xcluster_lb_proxy_backend_connect_failures_total";
    /// Connections open now to a backend, by `backend`.
    pub const BACKEND_ACTIVE: &str = "xcluster_lb_proxy_backend_connections_active";
    /// Bytes to and from a backend by `direction`: `up` is client to backend, `down` backend to client.
    pub const BACKEND_BYTES_TOTAL: &str = "xcluster_lb_proxy_backend_bytes_total";
    /// 1 from a failed connect to the backend until the next one that succeeds (it is held out of the picks
    /// meanwhile, see `health`), else 0.
    pub const BACKEND_FAILING: &str = "xcluster_lb_proxy_backend_failing";
    /// 1 for a backend configured as a `backup`, 0 for the others; set for every configured backend on each
    /// (re)load, so `/v1/status` lists them all before any connection.
    pub const BACKEND_BACKUP: &str = "xcluster_lb_proxy_backend_backup";
    /// Active health checks of a backend that failed (HAProxy's `chkfail`).
    pub const BACKEND_CHECK_FAILURES_TOTAL: &str = "xcluster_lb_proxy_backend_check_failures_total";
    /// Established connections closed because health checks put their backend down (`close_on_down`).
    pub const BACKEND_CLOSED_ON_DOWN_TOTAL: &str = "xcluster_lb_proxy_backend_closed_on_down_total";
    /// A configured backend's `max_connections` (0: no cap), set on each (re)load.
    pub const BACKEND_MAX_CONNECTIONS: &str = "xcluster_lb_proxy_backend_max_connections";
    /// 1 for each backend of the config, 0 once a reload removed it; `/v1/status` leaves removed ones out. A
    /// backend the directory routes to has none (and is listed while its counters exist).
    pub const BACKEND_CONFIGURED: &str = "xcluster_lb_proxy_backend_configured";
    /// A configured backend's `weight` (0: drained), set on each (re)load.
    pub const BACKEND_WEIGHT: &str = "xcluster_lb_proxy_backend_weight";
    /// Picks that passed a backend over because it had `max_connections` open.
    pub const BACKEND_FULL_TOTAL: &str = "xcluster_lb_proxy_backend_full_total";
    /// Time to connect to a backend, seconds, by `backend`.
    pub const BACKEND_CONNECT_SECONDS: &str = "xcluster_lb_proxy_backend_connect_seconds";
    /// Worker threads, labelled with the `runtime` they run (after any fallback from `io_uring`).
    pub const WORKERS: &str = "xcluster_lb_proxy_workers";
    /// Receives of the io_uring runtime that found every provided buffer in use and waited for one.
    pub const BUFFER_WAITS_TOTAL: &str = "xcluster_lb_proxy_buffer_waits_total";
    /// Receives of the io_uring runtime paused because their direction's destination is not keeping up.
    pub const RECEIVE_PAUSES_TOTAL: &str = "xcluster_lb_proxy_receive_pauses_total";
    /// Bytes the io_uring runtime's bulk streams spliced (socket → pipe → socket, never through the process).
    pub const SPLICED_BYTES_TOTAL: &str = "xcluster_lb_proxy_spliced_bytes_total";
    /// Provided buffers of the io_uring runtime holding bytes received and not yet sent on, over all workers.
    pub const BUFFERS_HELD: &str = "xcluster_lb_proxy_buffers_held";
    /// Times a listener a reload added could not bind its address (it is retried every second).
    pub const LISTENER_BIND_FAILURES_TOTAL: &str = "xcluster_lb_proxy_listener_bind_failures_total";
    /// 1 while a listener a reload added cannot bind its address (retried every second), else 0.
    pub const LISTENER_UNBOUND: &str = "xcluster_lb_proxy_listener_unbound";
    /// 1 for each listener of the config, labelled with its `addr`, its request `type` and `types`, every type its
    /// connections may take (its own and its `sni`'s, sorted, comma-separated); 0 once a reload removed it
    /// (Prometheus's info idiom). `/v1/status` takes a listener's address from it, sums the queues of its `types`
    /// and leaves removed ones out.
    pub const LISTENER_INFO: &str = "xcluster_lb_proxy_listener_info";
}

/// Sets [`LISTENER_INFO`]: 0 for each listener of `old` that `new` no longer has (same name, address and
/// types), 1 for each of `new`.
pub fn publish_listeners(old: &[ListenerConfig], new: &[ListenerConfig]) {
    let types = |l: &ListenerConfig| {
        l.types()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(",")
    };
    let info = |l: &ListenerConfig| {
        metrics::gauge!(
            LISTENER_INFO,
            "listener" => l.name.clone(),
            "addr" => l.listen.to_string(),
            "type" => l.request_type.clone(),
            "types" => types(l)
        )
    };
    let same = |a: &ListenerConfig, b: &ListenerConfig| {
        a.name == b.name && a.listen == b.listen && a.request_type == b.request_type && types(a) == types(b)
    };
    for gone in old.iter().filter(|o| !new.iter().any(|n| same(o, n))) {
        info(gone).set(0.0);
    }
    for l in new {
        info(l).set(1.0);
        // Its types' queues show 0 before anyone waits (the value of one in use is left as it is).
        for ty in l.types() {
            metrics::gauge!(WAITING, "request_type" => ty.to_owned()).increment(0.0);
        }
    }
}

/// Listeners and backends a reload removed from the config. The facade cannot remove their series, and the
/// hot path keeps its lock-free handles to them, so [`hide_retired`] leaves the series out of each scrape
/// instead, once nothing uses them any more. One that a reload adds again leaves this set, and its counters
/// carry on from their old values (still monotonic, as Prometheus wants), as does its count of open
/// connections (its `max_connections`).
#[derive(Debug, Default, Clone)]
pub struct Retired {
    /// Names of the listeners no longer configured, each with the sockets a reload closed under that name:
    /// each is open (and may still accept the clients queued on it, [`super::listener::Close`]) while its
    /// handle upgrades, so a series hidden once its listener is idle does not come back with a late client.
    pub listeners: BTreeMap<String, Vec<OpenSockets>>,
    /// The backends no longer configured, by their `backend` label, with their address and handles (whose
    /// `open` counts the connections still assigned to them, connecting or established).
    pub backends: BTreeMap<String, (SocketAddr, Arc<BackendMetrics>)>,
}

/// A listener's sockets on the workers: its accept loops (or io_uring's listener entries) hold the strong side
/// until they have closed.
pub type OpenSockets = Weak<dyn Any + Send + Sync>;

/// What a scrape leaves out of the recorder's `text` (see [`xcluster_runtime::telemetry::Pruner`]): every
/// series of a retired listener whose sockets are closed and whose connections have all ended (its [`ACTIVE`]
/// in `text` is 0, as HAProxy drops a removed frontend's stats once its last connection ends), and of a retired backend that no
/// connection holds (`open` and its [`BACKEND_ACTIVE`] are 0) and that the directory does not route to
/// (`routed`: the same address may be an instance an agent reports, and its connections share the series).
/// `None` when nothing is hidden. Runs at each scrape, never per connection.
pub fn hide_retired(text: &str, retired: &Retired, routed: impl Fn(SocketAddr) -> bool) -> Option<Hide> {
    if retired.listeners.is_empty() && retired.backends.is_empty() {
        return None;
    }
    let mut listeners: BTreeSet<String> = (retired.listeners.iter())
        .filter(|(_, sockets)| sockets.iter().all(|s| s.strong_count() == 0))
        .map(|(name, _)| name.clone())
        .collect();
    let mut backends: BTreeSet<String> = (retired.backends.iter())
        .filter(|(_, (addr, bm))| bm.open.load(Ordering::Relaxed) == 0 && !routed(*addr))
        .map(|(label, _)| label.clone())
        .collect();
    for line in text.lines() {
        if !line.starts_with(ACTIVE) && !line.starts_with(BACKEND_ACTIVE) {
            continue;
        }
        let Some(sample) = Sample::parse(line) else {
            continue;
        };
        if sample.value == 0 {
            continue;
        }
        match sample.name {
            ACTIVE => {
                if let Some(l) = sample.label("listener") {
                    listeners.remove(l);
                }
            }
            BACKEND_ACTIVE => {
                if let Some(b) = sample.label("backend") {
                    backends.remove(b);
                }
            }
            _ => {}
        }
    }
    if listeners.is_empty() && backends.is_empty() {
        return None;
    }
    Some(Box::new(move |line: &str| {
        Sample::parse(line).is_some_and(|s| {
            s.label("listener").is_some_and(|l| listeners.contains(l))
                || s.label("backend").is_some_and(|b| backends.contains(b))
        })
    }))
}

/// Handles for one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    pub failed: Counter,
    pub rejected: Counter,
    pub denied: Counter,
    pub header_errors: Counter,
    /// [`SNI_TOTAL`]: `[routed, default, refused]`.
    pub sni: [Counter; 3],
    pub accept_errors: Counter,
    pub rate_waits: Counter,
    pub idle_timeouts: Counter,
    /// [`CONNECTION_ERRORS_TOTAL`], indexed by `Side as usize`: client, backend.
    pub errors: [Counter; 2],
    pub retries: Counter,
    pub queued: Counter,
    pub abandoned: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        Self {
            accepted: metrics::counter!(ACCEPTED_TOTAL, "listener" => l.clone()),
            active: metrics::gauge!(ACTIVE, "listener" => l.clone()),
            failed: metrics::counter!(FAILED_TOTAL, "listener" => l.clone()),
            rejected: metrics::counter!(REJECTED_TOTAL, "listener" => l.clone()),
            denied: metrics::counter!(DENIED_TOTAL, "listener" => l.clone()),
            header_errors: metrics::counter!(HEADER_ERRORS_TOTAL, "listener" => l.clone()),
            sni: ["routed", "default", "refused"]
                .map(|to| metrics::counter!(SNI_TOTAL, "listener" => l.clone(), "to" => to)),
            accept_errors: metrics::counter!(ACCEPT_ERRORS_TOTAL, "listener" => l.clone()),
            rate_waits: metrics::counter!(RATE_WAITS_TOTAL, "listener" => l.clone()),
            idle_timeouts: metrics::counter!(IDLE_TIMEOUTS_TOTAL, "listener" => l.clone()),
            errors: [Side::Client, Side::Backend].map(|side| {
                metrics::counter!(CONNECTION_ERRORS_TOTAL, "listener" => l.clone(), "side" => side.to_string())
            }),
            retries: metrics::counter!(RETRIES_TOTAL, "listener" => l.clone()),
            queued: metrics::counter!(QUEUED_TOTAL, "listener" => l.clone()),
            abandoned: metrics::counter!(ABANDONED_TOTAL, "listener" => l.clone()),
            bytes_up: metrics::counter!(LISTENER_BYTES_TOTAL, "listener" => l.clone(), "direction" => "up"),
            bytes_down: metrics::counter!(LISTENER_BYTES_TOTAL, "listener" => l, "direction" => "down"),
        }
    }
}

/// Handles for one backend, and its count of established connections.
#[derive(Debug)]
pub struct BackendMetrics {
    /// Connections assigned to it now, connecting or established ([`Assigned`]): what `balance =
    /// "least_connections"` compares. One per configured backend, kept across reloads.
    pub open: AtomicU64,
    /// Its `max_connections`: `open` never goes past it (0: no limit). Set from the config on each (re)load.
    pub max: AtomicU64,
    pub full: Counter,
    pub connects: Counter,
    pub connect_failures: Counter,
    pub active: Gauge,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub connect_seconds: Histogram,
    pub failing: Gauge,
    pub check_failures: Counter,
    /// Its `close_on_down`, set from the config on each (re)load.
    pub close_on_down: AtomicBool,
    /// How many times health checks put it down with `close_on_down` on: a connection that saw another
    /// count when it began is closed ([`BackendMetrics::went_down`]), by the io_uring tick or, on the tokio
    /// runtimes, woken by `down`.
    pub downs: AtomicU32,
    pub down: Arc<tokio::sync::Notify>,
    pub closed_on_down: Counter,
    /// A configured backend's: woken when one of its connections ends, for who waits for its place (a
    /// backend the directory routes to has no cap, so none).
    pub queue: Option<Arc<Queue>>,
}

/// One connection counted in its backend's `open` from the pick on: held by the connect attempt, then by the
/// connection once established, and uncounted when dropped. So a burst of connections that arrive within one
/// connect time is spread by least connections too, as HAProxy counts a connection on its server from the
/// moment it is assigned.
#[derive(Debug)]
pub struct Assigned(Arc<BackendMetrics>);

impl Assigned {
    /// Counts a connection on `bm`, unless it has `max_connections` open already: then `None`. One atomic
    /// update, so concurrent workers never take it past its limit together.
    pub fn try_new(bm: &Arc<BackendMetrics>) -> Option<Self> {
        let max = bm.max.load(Ordering::Relaxed);
        let taken = if max == 0 {
            bm.open.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            (bm.open)
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        };
        taken.then(|| Self(bm.clone()))
    }
}

impl std::ops::Deref for Assigned {
    type Target = BackendMetrics;

    fn deref(&self) -> &BackendMetrics {
        &self.0
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(q) = &self.0.queue {
            q.freed();
        }
    }
}

impl BackendMetrics {
    /// Health checks put it down: with `close_on_down`, every connection to it is to close.
    pub fn went_down(&self) {
        if self.close_on_down.load(Ordering::Relaxed) {
            self.downs.fetch_add(1, Ordering::Release);
            self.down.notify_waiters();
        }
    }

    /// Counts a successful connect begun at `started`.
    pub fn connected(&self, started: std::time::Instant) {
        self.connects.increment(1);
        self.connect_seconds.record(started.elapsed().as_secs_f64());
    }

    pub fn new(addr: SocketAddr, queue: Option<Arc<Queue>>) -> Self {
        let b = addr.to_string();
        Self {
            open: AtomicU64::new(0),
            max: AtomicU64::new(0),
            full: metrics::counter!(BACKEND_FULL_TOTAL, "backend" => b.clone()),
            connects: metrics::counter!(BACKEND_CONNECTS_TOTAL, "backend" => b.clone()),
            connect_failures: metrics::counter!(BACKEND_CONNECT_FAILURES_TOTAL, "backend" => b.clone()),
            active: metrics::gauge!(BACKEND_ACTIVE, "backend" => b.clone()),
            bytes_up: metrics::counter!(BACKEND_BYTES_TOTAL, "backend" => b.clone(), "direction" => "up"),
            bytes_down: metrics::counter!(BACKEND_BYTES_TOTAL, "backend" => b.clone(), "direction" => "down"),
            connect_seconds: metrics::histogram!(BACKEND_CONNECT_SECONDS, "backend" => b.clone()),
            failing: metrics::gauge!(BACKEND_FAILING, "backend" => b.clone()),
            check_failures: metrics::counter!(BACKEND_CHECK_FAILURES_TOTAL, "backend" => b.clone()),
            close_on_down: AtomicBool::new(false),
            downs: AtomicU32::new(0),
            down: Arc::default(),
            closed_on_down: metrics::counter!(BACKEND_CLOSED_ON_DOWN_TOTAL, "backend" => b),
            queue,
        }
    }
}

/// The proxy's counters per listener and per backend, read back from the Prometheus exposition `text`: the
/// counters are kept once, by the metrics registry, and `/v1/status` shows the same values as `/metrics`.
/// Lines that do not parse are skipped.
pub fn status(text: &str) -> ProxyStatus {
    let mut listeners: BTreeMap<String, ProxyListenerStatus> = BTreeMap::new();
    // Names with an info series, and whether one of them says the listener is configured now.
    let mut listed: BTreeMap<String, bool> = BTreeMap::new();
    let mut backends: BTreeMap<String, ProxyBackendStatus> = BTreeMap::new();
    // Backends with a `configured` series, and whether it says they are configured now.
    let mut configured: BTreeMap<String, bool> = BTreeMap::new();
    // Clients waiting, by request type.
    let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
    // The types each configured listener's connections may take, from its info series.
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let Some(Sample { name, labels, value }) = Sample::parse(line) else {
            continue;
        };
        let label = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        let up = label("direction") == Some("up");
        if let Some(l) = label("listener") {
            let e = listeners
                .entry(l.to_string())
                .or_insert_with(|| ProxyListenerStatus {
                    name: l.to_string(),
                    ..Default::default()
                });
            match name {
                ACCEPTED_TOTAL => e.accepted = value,
                ACTIVE => e.active = value,
                FAILED_TOTAL => e.failed = value,
                REJECTED_TOTAL => e.rejected = value,
                DENIED_TOTAL => e.denied = value,
                HEADER_ERRORS_TOTAL => e.header_errors = value,
                SNI_TOTAL if label("to") == Some("routed") => e.sni_routed = value,
                RATE_WAITS_TOTAL => e.rate_waits = value,
                RETRIES_TOTAL => e.retries = value,
                IDLE_TIMEOUTS_TOTAL => e.idle_timeouts = value,
                QUEUED_TOTAL => e.queued = value,
                ACCEPT_ERRORS_TOTAL => e.accept_errors = value,
                LISTENER_MAX_CONNECTIONS => e.max_connections = value,
                CONNECTION_ERRORS_TOTAL if label("side") == Some("client") => e.client_errors = value,
                CONNECTION_ERRORS_TOTAL => e.backend_errors = value,
                LISTENER_BYTES_TOTAL if up => e.bytes_up = value,
                LISTENER_BYTES_TOTAL => e.bytes_down = value,
                LISTENER_UNBOUND => e.unbound = value > 0,
                LISTENER_INFO => {
                    let now = listed.entry(l.to_string()).or_default();
                    if value > 0 {
                        *now = true;
                        e.addr = label("addr").unwrap_or_default().to_string();
                        e.request_type = label("type").unwrap_or_default().to_string();
                        types.insert(l.to_string(), label("types").unwrap_or_default().to_string());
                    }
                }
                _ => {}
            }
        } else if let Some(b) = label("backend") {
            let e = backends
                .entry(b.to_string())
                .or_insert_with(|| ProxyBackendStatus {
                    addr: b.to_string(),
                    ..Default::default()
                });
            match name {
                BACKEND_ACTIVE => e.active = value,
                BACKEND_CONNECTS_TOTAL => e.connects = value,
                BACKEND_CONNECT_FAILURES_TOTAL => e.connect_failures = value,
                BACKEND_CHECK_FAILURES_TOTAL => e.check_failures = value,
                BACKEND_FULL_TOTAL => e.full = value,
                BACKEND_CLOSED_ON_DOWN_TOTAL => e.closed_on_down = value,
                BACKEND_BYTES_TOTAL if up => e.bytes_up = value,
                BACKEND_BYTES_TOTAL => e.bytes_down = value,
                BACKEND_FAILING => e.failing = value > 0,
                BACKEND_BACKUP => e.backup = value > 0,
                BACKEND_MAX_CONNECTIONS => e.max_connections = value,
                BACKEND_WEIGHT => e.weight = Some(value),
                BACKEND_CONFIGURED => {
                    configured.insert(b.to_string(), value > 0);
                }
                _ => {}
            }
        } else if let (WAITING, Some(ty)) = (name, label("request_type")) {
            waiting.insert(ty.to_string(), value);
        }
    }
    for l in listeners.values_mut() {
        // Its clients queue under each type they are routed to (its `sni` may route them to several).
        let of = |t: &String| t.split(',').filter_map(|ty| waiting.get(ty)).sum();
        l.waiting = types.get(&l.name).map_or(0, of);
    }
    // A listener a reload removed keeps its counters in `/metrics`, but is no longer one of the proxy's.
    listeners.retain(|name, _| listed.get(name).copied().unwrap_or(true));
    // The same for a backend a reload removed.
    backends.retain(|addr, _| configured.get(addr).copied().unwrap_or(true));
    ProxyStatus {
        listeners: listeners.into_values().collect(),
        backends: backends.into_values().collect(),
    }
}

/// One sample line of the exposition format, `name{k="v",...} value`.
struct Sample<'a> {
    name: &'a str,
    /// Unescaped values.
    labels: Vec<(&'a str, String)>,
    /// As a whole number; negative or not finite: 0.
    value: u64,
}

impl<'a> Sample<'a> {
    /// The value of label `key`, if it has one.
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `line` if it is a sample of one of the proxy's series.
    fn parse(line: &'a str) -> Option<Self> {
        if !line.starts_with("xcluster_lb_proxy_") {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value: f64 = value.parse().ok()?;
        let value = if value.is_finite() && value > 0.0 {
            value as u64
        } else {
            0
        };
        let Some((name, rest)) = series.split_once('{') else {
            return Some(Self {
                name: series,
                labels: Vec::new(),
                value,
            });
        };
        let mut rest = rest.strip_suffix('}')?;
        let mut labels = Vec::new();
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"")?;
            let mut v = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => v.push('\n'),
                        c => v.push(c),
                    },
                    (_, c) => v.push(c),
                }
            };
            labels.push((key, v));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        Some(Self { name, labels, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retired listener's series go once its active count is 0; a retired backend's once no connection
    /// holds it and the directory does not route to it; nothing else, and nothing of another family.
    #[test]
    fn retired_series_are_hidden_once_unused() {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let handles = |open: u64| {
            let bm = Arc::new(BackendMetrics::new(addr(1), None));
            bm.open.store(open, Ordering::Relaxed);
            bm
        };
        let mut retired = Retired::default();
        assert!(hide_retired("", &retired, |_| false).is_none());
        // "closing" is idle, but its socket is still open: a client queued on it may yet be accepted.
        let socket: Arc<dyn Any + Send + Sync> = Arc::new(());
        for (name, sockets) in [
            (
                "gone",
                vec![Arc::downgrade(&(Arc::new(()) as Arc<dyn Any + Send + Sync>))],
            ),
            ("draining", vec![]),
            ("closing", vec![Arc::downgrade(&socket)]),
        ] {
            retired.listeners.insert(name.to_string(), sockets);
        }
        for (port, open) in [(10, 0), (11, 1), (12, 0), (13, 0)] {
            let a = addr(port);
            retired.backends.insert(a.to_string(), (a, handles(open)));
        }
        let text = r#"xcluster_lb_proxy_connections_active{listener="gone"} 0
xcluster_lb_proxy_connections_active{listener="draining"} 2
xcluster_lb_proxy_connections_active{listener="closing"} 0
xcluster_lb_proxy_backend_connections_active{backend="127.0.0.1:12"} 1
"#;
        let hide = hide_retired(text, &retired, |a| a == addr(13)).unwrap();
        for (line, hidden) in [
            (
                r#"xcluster_lb_proxy_connections_accepted_total{listener="gone"} 5"#,
                true,
            ),
            (r#"xcluster_lb_proxy_connections_active{listener="gone"} 0"#, true),
            (
                r#"xcluster_lb_proxy_listener_info{listener="gone",addr="127.0.0.1:1",type="t"} 0"#,
                true,
            ),
            (
                r#"xcluster_lb_proxy_connections_accepted_total{listener="draining"} 5"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_connections_accepted_total{listener="kept"} 5"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_connections_accepted_total{listener="closing"} 5"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:10"} 3"#,
                true,
            ),
            (
                r#"xcluster_lb_proxy_backend_connect_seconds_bucket{backend="127.0.0.1:10",le="0.001"} 3"#,
                true,
            ),
            (
                r#"xcluster_lb_proxy_backend_connect_seconds_sum{backend="127.0.0.1:10"} 0.1"#,
                true,
            ),
            (
                r#"xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:11"} 3"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:12"} 3"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:13"} 3"#,
                false,
            ),
            (
                r#"xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:14"} 3"#,
                false,
            ),
            (r#"xcluster_lb_reports_accepted_total{listener="gone"} 1"#, false),
        ] {
            assert_eq!(hide(line), hidden, "{line}");
        }
        // Once its sockets have closed, the idle listener's series go.
        drop(socket);
        let hide = hide_retired(text, &retired, |a| a == addr(13)).unwrap();
        assert!(hide(
            r#"xcluster_lb_proxy_connections_accepted_total{listener="closing"} 5"#
        ));
        // Nothing unused: nothing to hide.
        retired.listeners.remove("gone");
        retired.listeners.remove("closing");
        retired.backends.retain(|_, (a, _)| *a != addr(10));
        assert!(hide_retired(text, &retired, |a| a == addr(13)).is_none());
    }

    #[test]
    fn status_reads_the_proxy_series_back() {
        let text = r#"# TYPE xcluster_lb_proxy_connections_accepted_total counter
xcluster_lb_proxy_connections_accepted_total{listener="web"} 12
xcluster_lb_proxy_connections_active{listener="web"} 3
xcluster_lb_proxy_connections_active{listener="odd \"name\""} -1
xcluster_lb_proxy_listener_bytes_total{listener="web",direction="up"} 1000
xcluster_lb_proxy_listener_bytes_total{listener="web",direction="down"} 2.5e3
xcluster_lb_proxy_connections_queued_total{listener="web"} 8
xcluster_lb_proxy_accept_errors_total{listener="web"} 2
xcluster_lb_proxy_listener_max_connections{listener="web"} 50
xcluster_lb_proxy_connection_errors_total{listener="web",side="client"} 4
xcluster_lb_proxy_connection_errors_total{listener="web",side="backend"} 9
xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:9"} 7
xcluster_lb_proxy_backend_bytes_total{backend="127.0.0.1:9",direction="down"} 5
xcluster_lb_proxy_backend_connect_seconds_bucket{backend="127.0.0.1:9",le="0.001"} 7
xcluster_lb_proxy_backend_failing{backend="127.0.0.1:9"} 1
xcluster_lb_proxy_backend_backup{backend="127.0.0.1:9"} 1
xcluster_lb_proxy_backend_configured{backend="127.0.0.1:9"} 1
xcluster_lb_proxy_backend_weight{backend="127.0.0.1:9"} 0
xcluster_lb_proxy_backend_check_failures_total{backend="127.0.0.1:9"} 3
xcluster_lb_proxy_backend_full_total{backend="127.0.0.1:9"} 11
xcluster_lb_proxy_backend_closed_on_down_total{backend="127.0.0.1:9"} 2
xcluster_lb_proxy_backend_connects_total{backend="127.0.0.1:10"} 2
xcluster_lb_proxy_backend_configured{backend="127.0.0.1:10"} 0
xcluster_lb_proxy_backend_connects_total{backend="10.0.0.1:7101"} 4
xcluster_lb_proxy_workers{runtime="io_uring"} 2
xcluster_lb_proxy_connections_waiting{request_type="browse"} 6
xcluster_lb_proxy_connections_waiting{request_type="order"} 1
xcluster_lb_proxy_connections_waiting{request_type="api"} 2
xcluster_lb_proxy_listener_info{listener="tls",addr="127.0.0.1:443",type="browse",types="api,browse"} 1
xcluster_lb_reports_accepted_total{listener="web"} 99
xcluster_lb_proxy_connections_failed_total{listener="web" 4
xcluster_lb_proxy_listener_info{listener="web",addr="127.0.0.1:80",type="browse",types="browse"} 1
xcluster_lb_proxy_connections_accepted_total{listener="gone"} 5
xcluster_lb_proxy_listener_info{listener="gone",addr="127.0.0.1:81",type="pay"} 0
xcluster_lb_proxy_listener_info{listener="moved",addr="127.0.0.1:82",type="pay"} 0
xcluster_lb_proxy_listener_info{listener="moved",addr="127.0.0.1:83",type="pay"} 1
not a sample
"#;
        let s = status(text);
        assert_eq!(
            s.listeners,
            vec![
                ProxyListenerStatus {
                    name: "moved".into(),
                    addr: "127.0.0.1:83".into(),
                    request_type: "pay".into(),
                    ..Default::default()
                },
                ProxyListenerStatus {
                    name: "odd \"name\"".into(),
                    ..Default::default()
                },
                // Its clients queue under each type its `sni` routes them to.
                ProxyListenerStatus {
                    name: "tls".into(),
                    addr: "127.0.0.1:443".into(),
                    request_type: "browse".into(),
                    waiting: 8,
                    ..Default::default()
                },
                ProxyListenerStatus {
                    name: "web".into(),
                    addr: "127.0.0.1:80".into(),
                    request_type: "browse".into(),
                    accepted: 12,
                    active: 3,
                    bytes_up: 1000,
                    bytes_down: 2500,
                    waiting: 6,
                    queued: 8,
                    accept_errors: 2,
                    max_connections: 50,
                    client_errors: 4,
                    backend_errors: 9,
                    ..Default::default()
                },
            ]
        );
        // A backend a reload removed (configured 0) is left out; one the directory routes to (no such
        // series) is listed.
        assert_eq!(
            s.backends,
            vec![
                ProxyBackendStatus {
                    addr: "10.0.0.1:7101".into(),
                    connects: 4,
                    ..Default::default()
                },
                ProxyBackendStatus {
                    addr: "127.0.0.1:9".into(),
                    connects: 7,
                    bytes_down: 5,
                    check_failures: 3,
                    full: 11,
                    closed_on_down: 2,
                    failing: true,
                    backup: true,
                    weight: Some(0),
                    ..Default::default()
                },
            ]
        );
    }
}
