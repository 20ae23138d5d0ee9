//! The `[proxy]` section of the lb config: raw serde form, validation, typed form.
//!
//! Reloads live: `listeners` (added, removed or changed; established connections stay, and one changed on the
//! same address keeps its sockets), `backends` (their weights, `backup` and `max_connections`),
//! `connect_timeout_ms`, `idle_timeout_ms`, `fin_timeout_ms`, `connect_attempts`, `connect_retry_delay_ms`,
//! `check_interval_ms`, `check_fall`, `check_rise`, `check_http_path`, `slow_start_ms`, `queue_timeout_ms`,
//! `balance`, per-listener `proxy_protocol`, `accept_proxy`, `log_connections`, `max_connections`,
//! `max_connections_per_client`, `max_connection_rate_per_client`, `connection_rate_period_ms`, `allow`, `deny`,
//! `idle_timeout_ms` and `fin_timeout_ms`, and `busy_poll_us`.
//! Needs a restart: `workers`, `runtime`, `forwarding`, `[proxy] max_connections`, `backlog`, `keepalive_ms`,
//! `io_uring_buffers`. `warmup_ms` counts only at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::acl::{Acl, Net};
use super::clients::Rate;
use super::sni::SniRoutes;

mod validate;

pub use validate::unique;

/// `[proxy]` as written in the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    /// `[[proxy.listeners]]`: one TCP port per request type.
    pub listeners: Vec<ListenerRaw>,
    /// `[[proxy.backends]]`: the app instances the static picker chooses from.
    pub backends: Vec<BackendRaw>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// `io_uring` (default, measured fastest: one io_uring event loop and one SO_REUSEPORT listener per
    /// worker; `per_core` where the kernel refuses io_uring), `per_core` (one current-thread tokio runtime
    /// and one SO_REUSEPORT listener per worker) or `shared` (one multi-thread runtime with `workers`
    /// threads).
    pub runtime: String,
    /// `auto` (default: copy small messages, splice bulk streams through pooled pipes; measured best),
    /// `splice` (splice everything) or `copy` (always pooled user-space buffers). The io_uring runtime
    /// receives small messages into its provided buffers in every mode; this decides how its bulk streams
    /// move (`auto` and `splice` alike splice them).
    pub forwarding: String,
    pub connect_timeout_ms: u64,
    /// How many connects a connection may try before any byte is forwarded: each to a backend it has not
    /// tried yet (redispatch), then, once it has tried every backend of its type, to them again after
    /// `connect_retry_delay_ms` (HAProxy's `retries`).
    pub connect_attempts: u32,
    /// The pause before a connection tries again the backends it has all tried (HAProxy's turn-around), so
    /// that a backend restarting, or the only one of its type, gets another chance before the client is
    /// closed. Not taken when health checks have put every one of them down: the client is closed at once.
    /// At most 1,000.
    pub connect_retry_delay_ms: u64,
    /// A connection with no byte in either direction for this long is closed. 0 disables.
    pub idle_timeout_ms: u64,
    /// Once either side has closed its sending half (its FIN was passed on), the connection's idle timeout
    /// becomes this (HAProxy's `timeout client-fin` and `server-fin`): a peer that half-closed and vanished
    /// frees its place in seconds, not after `idle_timeout_ms`. 0: a half-closed connection keeps
    /// `idle_timeout_ms`.
    pub fin_timeout_ms: u64,
    /// Active health checks: every `[[proxy.backends]]` entry gets a TCP connect this often (timing out
    /// after `connect_timeout_ms`). 0 disables (failed client connects still hold a backend out).
    pub check_interval_ms: u64,
    /// Failed checks in a row that put a backend down, held out of the picks (HAProxy's `fall`).
    pub check_fall: u32,
    /// Passing checks in a row that bring a down backend back (HAProxy's `rise`).
    pub check_rise: u32,
    /// How a connection's backend is chosen among the `[[proxy.backends]]` of its type: `random` (the default:
    /// weighted random), `round_robin` (in turn, each backend as often as its weight says, interleaved, as
    /// HAProxy's `roundrobin`), `least_connections` (the fewest connections, connecting or established, for its
    /// weight, as HAProxy's `leastconn`: for long-lived connections, which a random draw can pile onto one
    /// backend) or `source` (by the client's address, see `proxy::pick`). Types routed by the directory
    /// follow its live weights either way.
    pub balance: String,
    /// `balance` for some request types of their own (HAProxy's `balance` per backend): `[proxy.balance_by_type]`
    /// with `ws = "least_connections"` for long-lived WebSockets while the others keep `balance`. Each type
    /// must be one that `[[proxy.backends]]` serve.
    pub balance_by_type: BTreeMap<String, String>,
    /// A backend back from being held out gets a share of the connections that grows from nothing to its
    /// whole weight over this time (HAProxy's `slowstart`); what it is passed over for goes to the other
    /// backends of its type. 0 (the default): its whole weight at once. At most 300,000 (5 minutes).
    pub slow_start_ms: u64,
    /// How long a connection that finds every backend of its type at its `max_connections` waits for a place
    /// (HAProxy's `timeout queue`), woken when a connection to one of them ends; it is closed and counted as
    /// failed when the time is up. Waiting connections are served in the order they came. 0 (the default): closed at once.
    /// At most 60,000.
    pub queue_timeout_ms: u64,
    /// How often the host names of backends (an `addr` such as `app1.internal:8001`) are resolved again:
    /// when a name's addresses change, the config is reloaded, as by SIGHUP (HAProxy's `resolvers` with
    /// `hold valid`). 0: only at load and reload. 1,000 to 86,400,000; 30,000 by default. See
    /// `proxy::names`.
    pub resolve_interval_ms: u64,
    /// With health checks on: instead of the bare connect, send `GET <path>` (HTTP/1.1, `Connection: close`)
    /// and pass only on a 2xx or 3xx status, as HAProxy's `option httpchk` does; the whole check stays within
    /// `connect_timeout_ms`. `/readyz`, which every XCluster role serves (503 while starting or draining),
    /// holds an XBuy instance out while it cannot serve. Empty (the default): the connect alone. Either way,
    /// a backend that a listener with `proxy_protocol` routes to gets a PROXY v2 `LOCAL` header first (as
    /// with HAProxy's `check-send-proxy`), since it expects one on every connection.
    pub check_http_path: String,
    /// With health checks on: instead of the bare connect, send these bytes (may be empty: a server that
    /// speaks first, such as SMTP's `220` banner) and pass only if `check_expect` appears within the first
    /// 4 KiB of the answer, as HAProxy's `tcp-check send` and `tcp-check expect string`; for services that
    /// speak no HTTP (Redis: `"PING\r\n"` and `"+PONG"`). Needs `check_expect`; not with `check_http_path`.
    /// At most 1,024 bytes each.
    pub check_send: String,
    pub check_expect: String,
    /// Concurrent proxied connections, over all listeners; a permit is taken before `accept`, once a client
    /// is queued.
    pub max_connections: usize,
    pub backlog: i32,
    /// TCP keepalive idle time on accepted sockets; 0 disables.
    pub keepalive_ms: u64,
    /// At start, how long the balancer waits for its directory to have an instance of every request type
    /// its listeners route by the directory (none in `[[proxy.backends]]`) before it opens them, and
    /// reports ready only after (Envoy's listener warming). Agents report every few hundred milliseconds;
    /// until the first reports a started balancer could only close the clients the kernel hands it. At
    /// most 60,000; 0 opens them at once.
    pub warmup_ms: u64,
    /// With `runtime = "io_uring"`: the most provided buffers of 16 KiB per worker, a power of two. Only
    /// directions with bytes in flight hold one; 256 are handed out at start and more as receives find
    /// none, up to this; then receives wait for the next one freed. Memory is reserved for all of them but
    /// resident only for those handed out. Bulk streams also borrow spare buffers, one sixteenth as many (1
    /// to 256), kept only by a send that would block.
    pub io_uring_buffers: u32,
    /// With `runtime = "io_uring"`: how long, in microseconds, a worker with nothing to do polls its ring
    /// before it sleeps (HAProxy's `busy-polling`, bounded), at most 1,000; 0 (the default, as HAProxy's)
    /// never polls. The window adapts: it shrinks to nothing while the worker's sleeps are long (an idle or
    /// lightly loaded proxy does not burn its core) and grows back while they are short. On a virtual
    /// machine whose idle CPUs halt, a sleeping worker costs the CPU that wakes it an interrupt through the
    /// hypervisor for each wake-up: polling takes that off the clients' and backends' CPUs (2-4% more
    /// requests and connections per second when they are the limit) for 6-12% more of the proxy's own.
    pub busy_poll_us: u32,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            backends: Vec::new(),
            workers: 0,
            runtime: "io_uring".into(),
            forwarding: "auto".into(),
            connect_timeout_ms: 1_000,
            connect_attempts: 3,
            connect_retry_delay_ms: 250,
            idle_timeout_ms: 300_000,
            fin_timeout_ms: 0,
            check_interval_ms: 2_000,
            // HAProxy's defaults.
            check_fall: 3,
            check_rise: 2,
            balance: "random".into(),
            balance_by_type: BTreeMap::new(),
            slow_start_ms: 0,
            queue_timeout_ms: 0,
            resolve_interval_ms: 30_000,
            check_http_path: String::new(),
            check_send: String::new(),
            check_expect: String::new(),
            max_connections: 20_000,
            backlog: 4096,
            keepalive_ms: 60_000,
            warmup_ms: 5_000,
            io_uring_buffers: 4096,
            busy_poll_us: 0,
        }
    }
}

/// `[[proxy.listeners]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerRaw {
    /// A short label used in metrics; defaults to the request type.
    pub name: String,
    pub listen: String,
    /// The request type whose weights choose the backend.
    pub request_type: String,
    /// Send a PROXY protocol v2 header to the backend so it sees the client's address.
    pub proxy_protocol: bool,
    /// Every client sends a PROXY header (v1 or v2) first, as a front balancer does (HAProxy's
    /// `accept-proxy`): the address it names is the client's everywhere (log, per-client limit,
    /// `balance = "source"`, the header sent on). See `proxy::inbound`.
    pub accept_proxy: bool,
    /// With `accept_proxy`: the addresses or CIDR networks (the front balancers) whose PROXY headers are
    /// believed; a connection from anywhere else is closed at once, counted as denied. Empty (the
    /// default): any peer's header is taken, so any client that reaches the port can claim any address
    /// and pass `allow`, per-client limits and `balance = "source"` (HAProxy trusts `accept-proxy`
    /// alike, and advises a trusted-source rule).
    pub accept_proxy_from: Vec<String>,
    /// One log line per connection when it ends (HAProxy's `option tcplog`); see `proxy::access`.
    pub log_connections: bool,
    /// Connections open through this listener at once, within `[proxy] max_connections` (HAProxy's
    /// per-frontend `maxconn`): past it the listener accepts no more, and clients wait in its queue, as
    /// past the proxy-wide limit. 0 (the default): only the proxy-wide limit. Reloads live. See
    /// `proxy::limit`.
    pub max_connections: u32,
    /// Connections one client address may hold open through this listener at once; 0 (the default): no
    /// limit. See `proxy::clients`.
    pub max_connections_per_client: u32,
    /// New connections one client address may open through this listener per `connection_rate_period_ms`
    /// (a burst, or spread out); 0 (the default): no limit. See `proxy::clients`.
    pub max_connection_rate_per_client: u32,
    /// The period of `max_connection_rate_per_client`, 1 s to 1 h.
    pub connection_rate_period_ms: u64,
    /// New connections this listener accepts per second, over all workers (HAProxy's `rate-limit
    /// sessions`): past it, clients wait in the listener's queue, none is refused. 0 (the default): no
    /// limit. Reloads live. See `proxy::rate`.
    pub max_connection_rate: u32,
    /// Client addresses or CIDR networks let in; empty (the default): every one not denied. See
    /// `proxy::acl`.
    pub allow: Vec<String>,
    /// Client addresses or CIDR networks closed at once, even when an `allow` entry covers them.
    pub deny: Vec<String>,
    /// This listener's own `idle_timeout_ms` and `fin_timeout_ms` (as HAProxy's timeouts per frontend):
    /// long for WebSockets or database sessions, short for request/response traffic. Unset: the `[proxy]`
    /// ones. Reload live, for new connections.
    pub idle_timeout_ms: Option<u64>,
    pub fin_timeout_ms: Option<u64>,
    /// TLS server names to request types (nginx's `ssl_preread`, HAProxy's `req.ssl_sni`): a client's
    /// hello naming one goes to that type's backends, TLS passing through untouched; any other connection to
    /// `request_type`. `"*.example.com"` covers every name under `example.com`. See `proxy::sni`.
    pub sni: BTreeMap<String, String>,
    /// Only clients whose TLS hello names a server in `sni` are served; any other is closed before a
    /// backend is tried (HAProxy's `tcp-request content reject` unless the name is known), and
    /// `request_type` is not used.
    pub sni_only: bool,
}

impl Default for ListenerRaw {
    fn default() -> Self {
        Self {
            name: String::new(),
            listen: String::new(),
            request_type: "default".into(),
            proxy_protocol: false,
            accept_proxy: false,
            accept_proxy_from: Vec::new(),
            log_connections: false,
            max_connections: 0,
            max_connections_per_client: 0,
            max_connection_rate_per_client: 0,
            connection_rate_period_ms: 10_000,
            max_connection_rate: 0,
            allow: Vec::new(),
            deny: Vec::new(),
            idle_timeout_ms: None,
            fin_timeout_ms: None,
            sni: BTreeMap::new(),
            sni_only: false,
        }
    }
}

/// `[[proxy.backends]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendRaw {
    pub addr: String,
    /// Relative share of connections; 0 keeps the backend listed but unused.
    pub weight: u32,
    /// Request types this backend serves; empty means every type.
    pub request_types: Vec<String>,
    /// Used only while no other backend of its request type can take a connection (every one is down,
    /// held out or weighted 0), as HAProxy's `backup`: a standby instance, or a server of a "back soon" page.
    pub backup: bool,
    /// Connections it may have open at once, connecting or established (HAProxy's server `maxconn`): a
    /// backend at its limit is passed over for another of its type, and a connection that finds every one
    /// full waits up to `queue_timeout_ms` for a place. 0: no limit.
    pub max_connections: u32,
    /// Whether the active health checks look at it (with `check_interval_ms` on); false leaves it to the
    /// passive ones (a client's failed connect), as a HAProxy server without `check`.
    pub check: bool,
    /// Its own `check_http_path`, instead of the `[proxy]` one: a path for an HTTP check, or `""` for the
    /// bare connect. Unset: the `[proxy]` one. So a pool can mix XBuy instances (`/readyz`) and services that
    /// speak no HTTP.
    pub check_http_path: Option<String>,
    /// Its own `check_send` and `check_expect`. A backend that sets any of its three check keys is checked
    /// by them alone (the `[proxy]` ones do not mix in).
    pub check_send: Option<String>,
    pub check_expect: Option<String>,
    /// The port its health checks connect to, on its address, instead of its own (HAProxy's `port` on a
    /// server): a service checked by a side port, such as PostgreSQL by Patroni's REST API
    /// (`check_port = 8008` with `check_http_path = "/primary"`). Unset: its own port.
    pub check_port: Option<u16>,
    /// When its health checks put it down, its established connections are closed too (HAProxy's
    /// `on-marked-down shutdown-sessions`): clients of a database primary that lost its role reconnect, and
    /// reach the new one, rather than hang on the old. Off: they run on, as HAProxy's default.
    pub close_on_down: bool,
}

impl Default for BackendRaw {
    fn default() -> Self {
        Self {
            addr: String::new(),
            weight: 100,
            request_types: Vec::new(),
            backup: false,
            max_connections: 0,
            check: true,
            check_http_path: None,
            check_send: None,
            check_expect: None,
            check_port: None,
            close_on_down: false,
        }
    }
}

/// How worker threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeMode {
    PerCore,
    Shared,
    /// One io_uring event loop per worker (`uring`); falls back to `PerCore` where the kernel refuses it.
    IoUring,
}

impl RuntimeMode {
    /// Every mode, in the order the config's error lists them.
    pub const ALL: [Self; 3] = [Self::PerCore, Self::Shared, Self::IoUring];

    /// The name `proxy.runtime` gives it (the one validation accepts, so logs and metrics spell it so too).
    pub fn name(self) -> &'static str {
        match self {
            Self::PerCore => "per_core",
            Self::Shared => "shared",
            Self::IoUring => "io_uring",
        }
    }
}

/// How a static backend is chosen (`proxy.balance`): see `pick` for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    Random,
    /// In turn, in proportion to the weights (HAProxy's and nginx's default).
    RoundRobin,
    LeastConnections,
    /// By the client's address (HAProxy's `balance source` with `hash-type consistent`).
    Source,
}

/// How bytes move between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    Splice,
    Copy,
    Auto,
}

impl Forwarding {
    /// Every mode, in the order the config's error lists them.
    pub const ALL: [Self; 3] = [Self::Splice, Self::Copy, Self::Auto];

    /// The name `proxy.forwarding` gives it (the one validation accepts), as logs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Splice => "splice",
            Self::Copy => "copy",
            Self::Auto => "auto",
        }
    }
}

/// One validated listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub request_type: String,
    pub proxy_protocol: bool,
    pub accept_proxy: bool,
    /// Peers whose PROXY headers are believed; empty: any.
    pub proxy_from: Vec<Net>,
    pub log_connections: bool,
    /// 0: only the proxy-wide limit.
    pub max_connections: u32,
    /// `None`: no limit.
    pub max_connections_per_client: Option<u32>,
    /// `None`: no limit.
    pub connection_rate: Option<Rate>,
    /// Accepts per second; 0: no limit.
    pub max_connection_rate: u32,
    pub acl: Acl,
    /// Its idle timeout (its own or the `[proxy]` one); `None` when disabled.
    pub idle: Option<Duration>,
    /// Its idle timeout once half-closed (its own `fin_timeout_ms` or the `[proxy]` one); `None`: it keeps
    /// `idle`.
    pub fin: Option<Duration>,
    /// Request types by TLS server name; `None`: every connection is `request_type`.
    pub sni: Option<SniRoutes>,
    /// A connection whose hello names no server of `sni` is closed, not sent to `request_type`.
    pub sni_only: bool,
}

impl ListenerConfig {
    /// Every request type its connections may take: its own (unless `sni_only`), then those of its `sni`.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        let sni = self.sni.iter().flat_map(SniRoutes::types);
        let own = (!self.sni_only).then_some(self.request_type.as_str());
        own.into_iter().chain(sni)
    }
}

/// One validated backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    pub request_types: Vec<String>,
    pub backup: bool,
    /// 0: no limit.
    pub max_connections: u32,
    /// Its connections are closed when its health checks put it down.
    pub close_on_down: bool,
}

impl BackendConfig {
    /// Whether it serves request type `ty`: it names it, or names none (every type).
    pub fn serves(&self, ty: &str) -> bool {
        self.request_types.is_empty() || self.request_types.iter().any(|t| t == ty)
    }
}

/// How one backend is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What is asked once connected.
    pub probe: Probe,
    /// Where the check connects: the backend's address, or its `check_port` on the same host (which gets no
    /// PROXY header).
    pub target: SocketAddr,
    /// The check opens with a PROXY v2 `LOCAL` header: a listener with `proxy_protocol` routes to the
    /// backend, which so expects one on every connection.
    pub proxy_header: bool,
}

/// What a health check asks of a backend once connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing: the connect alone.
    Connect,
    /// `GET` this path; 2xx or 3xx passes.
    Http(String),
    /// Send `send` (maybe nothing), then `expect` must appear within the first 4 KiB of the answer.
    Expect { send: Vec<u8>, expect: Vec<u8> },
}

/// Settings that reload live: each connection's, and the health checks'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub connect_attempts: u32,
    /// The pause before trying again backends that have all been tried.
    pub retry_delay: Duration,
    /// Active health checks of the configured backends; `None` when disabled.
    pub check_interval: Option<Duration>,
    /// How each configured backend is checked (those with `check = false` are not).
    pub checks: Vec<(SocketAddr, Check)>,
    /// Failed checks in a row that put a backend down, and passing ones that bring it back; at least 1.
    pub check_fall: u32,
    pub check_rise: u32,
    /// The ramp of a backend back from a hold; `None` when off.
    pub slow_start: Option<Duration>,
    /// How long a connection waits for a place when every backend is full; `None`: not at all.
    pub queue: Option<Duration>,
    /// The most an io_uring worker busy-polls before sleeping (zero: never).
    pub busy_poll: Duration,
}

/// The validated `[proxy]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listeners: Vec<ListenerConfig>,
    pub backends: Vec<BackendConfig>,
    pub workers: usize,
    pub runtime: RuntimeMode,
    pub forwarding: Forwarding,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub backlog: i32,
    pub keepalive: Option<Duration>,
    pub warmup: Duration,
    pub io_uring_buffers: u16,
    /// The default, and the types with their own (`balance_by_type`).
    pub balance: Balance,
    pub balance_by_type: BTreeMap<String, Balance>,
    /// The backends' host names (`host:port` as written) with the addresses they resolved to, for
    /// `proxy::names`.
    pub names: Vec<(String, Vec<SocketAddr>)>,
    /// `resolve_interval_ms`; `None`: off.
    pub resolve_interval: Option<Duration>,
}

impl ProxyConfig {
    /// How a backend of `request_type` is chosen.
    pub fn balance_for(&self, request_type: &str) -> Balance {
        self.balance_by_type
            .get(request_type)
            .copied()
            .unwrap_or(self.balance)
    }
}

impl ProxyConfig {
    /// The keys that need a restart whose value in `new` differs from this (running) config's, as
    /// `proxy.KEY`, so a reload's warning names what it could not apply.
    pub fn restart_pending(&self, new: &ProxyConfig) -> Vec<&'static str> {
        [
            ("proxy.workers", self.workers != new.workers),
            ("proxy.runtime", self.runtime != new.runtime),
            ("proxy.forwarding", self.forwarding != new.forwarding),
            (
                "proxy.max_connections",
                self.max_connections != new.max_connections,
            ),
            ("proxy.backlog", self.backlog != new.backlog),
            ("proxy.keepalive_ms", self.keepalive != new.keepalive),
            (
                "proxy.io_uring_buffers",
                self.io_uring_buffers != new.io_uring_buffers,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

#[cfg(test)]
impl ProxyConfig {
    /// The `[proxy]` section written as `toml`, validated; for tests, so it must be valid.
    pub fn for_tests(toml: &str) -> Self {
        let raw: ProxySection = toml::from_str(toml).expect("a [proxy] section");
        let mut v = xcluster_runtime::Validator::new();
        let cfg = raw.validate(&mut v);
        v.finish(cfg).expect("a valid [proxy] section")
    }
}

#[cfg(test)]
impl ListenerConfig {
    /// A listener on `listen` (port 0 too, which a config refuses) with every setting at its default; for
    /// tests.
    pub fn for_tests(listen: SocketAddr) -> Self {
        let toml = "[[listeners]]\nname = \"x\"\nlisten = \"127.0.0.1:1\"\nrequest_type = \"x\"\n";
        let mut l = ProxyConfig::for_tests(toml).listeners.remove(0);
        l.listen = listen;
        l
    }
}

#[cfg(test)]
mod tests;
