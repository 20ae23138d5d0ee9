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
use xcluster_runtime::Validator;

use super::acl::{self, Acl, Net};
use super::clients::Rate;
use super::sni::{MAX_ROUTES, SniRoutes, is_host_name};

/// The most addresses one backend's host name may stand for.
const MAX_ADDRS_PER_NAME: usize = 64;

/// The addresses of a backend's `addr` that is not an IP address and port: a host name and port, resolved
/// now, at each load and reload (as nginx does without `resolve`): every address it has, in the resolver's
/// order, without repeats. Problems go to `v`, and none is given back then.
fn resolve(v: &mut Validator, key: &str, text: &str) -> Vec<SocketAddr> {
    let named = text
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)));
    let Some((host, port)) = named.filter(|(h, p)| *p > 0 && is_host_name(h)) else {
        v.error(
            key,
            format!(
                "{text:?} is neither an IP address and port (127.0.0.1:7000, [::1]:7000) nor a host name and \
                 port (app1.internal:7000)"
            ),
        );
        return Vec::new();
    };
    let lookup = || -> std::io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        Ok(unique((host, port).to_socket_addrs()?.collect()))
    };
    // getaddrinfo blocks, for seconds if the DNS server does not answer: off the async workers when the
    // config is validated on one (a reload).
    let found = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(lookup)
        }
        _ => lookup(),
    };
    let mut found = match found {
        Ok(found) if !found.is_empty() => found,
        Ok(_) => {
            v.error(key, format!("{host:?} resolves to no address"));
            return Vec::new();
        }
        Err(e) => {
            v.error(key, format!("cannot resolve {host:?}: {e}"));
            return Vec::new();
        }
    };
    if found.len() > MAX_ADDRS_PER_NAME {
        v.error(
            key,
            format!(
                "{host:?} resolves to {} addresses, at most {MAX_ADDRS_PER_NAME}",
                found.len()
            ),
        );
        found.truncate(MAX_ADDRS_PER_NAME);
    }
    found
}

/// `found` in its order, without repeats.
pub fn unique(mut found: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = std::collections::HashSet::new();
    found.retain(|a| seen.insert(*a));
    found
}

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

const MAX_LISTENERS: usize = 256;
const MAX_BACKENDS: usize = 4096;

/// The entries of a listener's `allow` or `deny` at `key`, each an address or CIDR network.
fn nets(v: &mut Validator, key: &str, entries: &[String]) -> Vec<Net> {
    v.check(entries.len() <= acl::MAX_ENTRIES, key, || {
        format!("{} entries, at most {}", entries.len(), acl::MAX_ENTRIES)
    });
    entries
        .iter()
        .enumerate()
        .filter_map(|(j, e)| match Net::parse(e) {
            Ok(n) => Some(n),
            Err(msg) => {
                v.error(format!("{key}[{j}]"), msg);
                None
            }
        })
        .collect()
}

/// The most bytes of `check_send` and of `check_expect`.
const CHECK_BYTES_MAX: usize = 1024;

/// The probe of the check keys `path`, `send` and `expect` of `key` (`proxy` or a backend's): HTTP with a
/// path, send/expect with an `expect`, else the bare connect. Both, or a `send` without an `expect`, are
/// errors.
fn probe(v: &mut Validator, key: &str, path: &str, send: &str, expect: &str) -> Probe {
    check_path(v, &format!("{key}.check_http_path"), path);
    for (name, s) in [("check_send", send), ("check_expect", expect)] {
        v.check(s.len() <= CHECK_BYTES_MAX, &format!("{key}.{name}"), || {
            format!("{} bytes, at most {CHECK_BYTES_MAX}", s.len())
        });
    }
    v.check(
        send.is_empty() || !expect.is_empty(),
        &format!("{key}.check_send"),
        || "needs check_expect: what the answer must hold".into(),
    );
    v.check(
        path.is_empty() || expect.is_empty(),
        &format!("{key}.check_expect"),
        || "not with check_http_path: a check is either HTTP or send/expect".into(),
    );
    if !expect.is_empty() {
        Probe::Expect {
            send: send.as_bytes().to_vec(),
            expect: expect.as_bytes().to_vec(),
        }
    } else if !path.is_empty() {
        Probe::Http(path.to_string())
    } else {
        Probe::Connect
    }
}

/// An HTTP check's path: empty (the bare connect) or a path starting with `/`, at most 1024 visible ASCII
/// bytes (it goes into the request line as is).
fn check_path(v: &mut Validator, field: &str, path: &str) {
    v.check(
        path.is_empty()
            || (path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic())),
        field,
        || format!("{path:?} must be empty or a path starting with '/', at most 1024 visible ASCII bytes"),
    );
}

fn check_name(v: &mut Validator, key: &str, s: &str) {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    v.check(ok, key, || {
        format!("{s:?} must be 1..=64 characters of [A-Za-z0-9_.-]")
    });
}

impl ProxySection {
    /// Checks every key and returns the typed section; problems go to `v`.
    pub fn validate(&self, v: &mut Validator) -> ProxyConfig {
        v.check(self.listeners.len() <= MAX_LISTENERS, "proxy.listeners", || {
            format!("{} listeners, at most {MAX_LISTENERS}", self.listeners.len())
        });
        v.check(self.backends.len() <= MAX_BACKENDS, "proxy.backends", || {
            format!("{} backends, at most {MAX_BACKENDS}", self.backends.len())
        });
        // The `[proxy]` idle and fin timeouts, and each listener's own; 0 turns either off.
        let timeout = |v: &mut Validator, key: &str, ms: u64| {
            Some(v.millis(key, ms, 0, 86_400_000)).filter(|d| !d.is_zero())
        };
        let idle = timeout(v, "proxy.idle_timeout_ms", self.idle_timeout_ms);
        let fin = timeout(v, "proxy.fin_timeout_ms", self.fin_timeout_ms);
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("proxy.listeners[{i}]");
            let listen = v.addr(&format!("{key}.listen"), &l.listen);
            check_name(v, &format!("{key}.request_type"), &l.request_type);
            // Port 0 would give each per-core socket a different port.
            if listen.port() == 0 && l.listen.parse::<SocketAddr>().is_ok() {
                v.error(format!("{key}.listen"), format!("{listen} must name a port"));
            }
            let name = if l.name.is_empty() {
                l.request_type.clone()
            } else {
                check_name(v, &format!("{key}.name"), &l.name);
                l.name.clone()
            };
            if listeners.iter().any(|o| o.listen == listen) {
                v.error(
                    format!("{key}.listen"),
                    format!("{listen} is used by another listener"),
                );
            }
            if listeners.iter().any(|o| o.name == name) {
                v.error(
                    format!("{key}.name"),
                    format!("{name:?} is used by another listener"),
                );
            }
            let sni = (!l.sni.is_empty()).then(|| {
                let key = format!("{key}.sni");
                v.check(l.sni.len() <= MAX_ROUTES, &key, || {
                    format!("{} names, at most {MAX_ROUTES}", l.sni.len())
                });
                for ty in l.sni.values() {
                    check_name(v, &key, ty);
                }
                let pairs = l.sni.iter().map(|(n, t)| (n.as_str(), t.as_str()));
                SniRoutes::new(pairs).unwrap_or_else(|e| {
                    v.error(key, e);
                    SniRoutes::default()
                })
            });
            v.check(!l.sni_only || sni.is_some(), &format!("{key}.sni_only"), || {
                "needs sni: with no names listed, every client would be closed".into()
            });
            v.check(
                l.accept_proxy || l.accept_proxy_from.is_empty(),
                &format!("{key}.accept_proxy_from"),
                || "has no effect without accept_proxy = true".into(),
            );
            listeners.push(ListenerConfig {
                name,
                listen,
                request_type: l.request_type.clone(),
                proxy_protocol: l.proxy_protocol,
                accept_proxy: l.accept_proxy,
                proxy_from: nets(v, &format!("{key}.accept_proxy_from"), &l.accept_proxy_from),
                log_connections: l.log_connections,
                max_connections: v.range(&format!("{key}.max_connections"), l.max_connections, 0, 1_000_000),
                max_connections_per_client: Some(v.range(
                    &format!("{key}.max_connections_per_client"),
                    l.max_connections_per_client,
                    0,
                    1_000_000,
                ))
                .filter(|&n| n > 0),
                connection_rate: Some(Rate {
                    count: v.range(
                        &format!("{key}.max_connection_rate_per_client"),
                        l.max_connection_rate_per_client,
                        0,
                        1_000_000,
                    ),
                    period: v.millis(
                        &format!("{key}.connection_rate_period_ms"),
                        l.connection_rate_period_ms,
                        1000,
                        3_600_000,
                    ),
                })
                .filter(|r| r.count > 0),
                max_connection_rate: v.range(
                    &format!("{key}.max_connection_rate"),
                    l.max_connection_rate,
                    0,
                    10_000_000,
                ),
                acl: Acl {
                    allow: nets(v, &format!("{key}.allow"), &l.allow),
                    deny: nets(v, &format!("{key}.deny"), &l.deny),
                },
                idle: match l.idle_timeout_ms {
                    Some(ms) => timeout(v, &format!("{key}.idle_timeout_ms"), ms),
                    None => idle,
                },
                fin: match l.fin_timeout_ms {
                    Some(ms) => timeout(v, &format!("{key}.fin_timeout_ms"), ms),
                    None => fin,
                },
                sni,
                sni_only: l.sni_only,
            });
        }
        let mut backends: Vec<BackendConfig> = Vec::new();
        let mut names: Vec<(String, Vec<SocketAddr>)> = Vec::new();
        // How each is checked: worked out here, once per (re)load, for the health-check task.
        let mut checks = Vec::new();
        let global_probe = probe(
            v,
            "proxy",
            &self.check_http_path,
            &self.check_send,
            &self.check_expect,
        );
        for (i, b) in self.backends.iter().enumerate() {
            let key = format!("proxy.backends[{i}]");
            let weight = v.range(&format!("{key}.weight"), b.weight, 0, 1_000_000);
            let max_connections = v.range(
                &format!("{key}.max_connections"),
                b.max_connections,
                0,
                10_000_000,
            );
            for t in &b.request_types {
                check_name(v, &format!("{key}.request_types"), t);
            }
            let own = b.check_http_path.is_some() || b.check_send.is_some() || b.check_expect.is_some();
            let probe = if own {
                fn text(o: &Option<String>) -> &str {
                    o.as_deref().unwrap_or("")
                }
                let (path, send, expect) = (&b.check_http_path, &b.check_send, &b.check_expect);
                probe(v, &key, text(path), text(send), text(expect))
            } else {
                global_probe.clone()
            };
            if let Some(port) = b.check_port {
                v.check(port > 0, &format!("{key}.check_port"), || {
                    "must be 1 to 65535".into()
                });
            }
            // A host name stands for every address it resolves to, each a backend with the entry's settings.
            let resolved = match b.addr.parse::<SocketAddr>() {
                Ok(addr) => vec![addr],
                Err(_) => {
                    let found = resolve(v, &format!("{key}.addr"), &b.addr);
                    if !names.iter().any(|(n, _)| *n == b.addr) {
                        names.push((b.addr.clone(), found.clone()));
                    }
                    found
                }
            };
            for addr in resolved {
                let backend = BackendConfig {
                    addr,
                    weight,
                    request_types: b.request_types.clone(),
                    backup: b.backup,
                    max_connections,
                    close_on_down: b.close_on_down,
                };
                let target = SocketAddr::new(addr.ip(), b.check_port.unwrap_or(addr.port()));
                let check = b.check.then(|| Check {
                    probe: probe.clone(),
                    target,
                    // Only the service's own port expects the header; a side port (`check_port`) is another
                    // program's.
                    proxy_header: target == addr
                        && listeners
                            .iter()
                            .any(|l| l.proxy_protocol && l.types().any(|t| backend.serves(t))),
                });
                match backends.iter().position(|o| o.addr == addr) {
                    None => checks.extend(check.map(|c| (addr, c))),
                    // The same server in another pool (HAProxy lists a server in several backends), with its own
                    // weight and `backup` there: one server, so one connection limit and one health check.
                    Some(j) => {
                        // Disjoint from every earlier entry of the address; the settings of the server need only
                        // match the first, which each later one matched too.
                        let other = &backends[j];
                        let overlap = (backends.iter().enumerate()).find(|(_, o)| {
                            o.addr == addr
                                && (b.request_types.is_empty()
                                    || o.request_types.is_empty()
                                    || b.request_types.iter().any(|t| o.serves(t)))
                        });
                        if let Some((k, _)) = overlap {
                            v.error(
                                format!("{key}.addr"),
                                format!(
                                    "{addr} is listed in proxy.backends[{k}] too: an address may be in several \
                                     entries only with disjoint, non-empty request_types"
                                ),
                            );
                        }
                        v.check(
                            max_connections == other.max_connections,
                            &format!("{key}.max_connections"),
                            || {
                                format!(
                                    "{max_connections} differs from proxy.backends[{j}] of the same address"
                                )
                            },
                        );
                        v.check(
                            b.close_on_down == other.close_on_down,
                            &format!("{key}.close_on_down"),
                            || format!("differs from proxy.backends[{j}] of the same address"),
                        );
                        let earlier = checks.iter_mut().find(|(a, _)| *a == addr).map(|(_, c)| c);
                        let same = match (earlier, check) {
                            (None, None) => true,
                            (Some(e), Some(c)) => {
                                // Headers go to the server if any of its pools' listeners sends them.
                                e.proxy_header |= c.proxy_header;
                                e.probe == c.probe && e.target == c.target
                            }
                            _ => false,
                        };
                        v.check(same, &format!("{key}.check"), || {
                            format!(
                                "its checks (check, check_http_path, check_send, check_expect, check_port) differ from proxy.backends[{j}] of \
                                 the same address"
                            )
                        });
                    }
                }
                backends.push(backend);
            }
        }
        v.check(backends.len() <= MAX_BACKENDS, "proxy.backends", || {
            format!(
                "{} backends once host names are resolved, at most {MAX_BACKENDS}",
                backends.len()
            )
        });
        let workers = v.range("proxy.workers", self.workers, 0, 256);
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        };
        let runtime = v.one_of(
            "proxy.runtime",
            &self.runtime,
            &RuntimeMode::ALL.map(|m| (m.name(), m)),
        );
        let forwarding = v.one_of(
            "proxy.forwarding",
            &self.forwarding,
            &Forwarding::ALL.map(|f| (f.name(), f)),
        );
        let connect = v.millis("proxy.connect_timeout_ms", self.connect_timeout_ms, 1, 60_000);
        let connect_attempts = v.range("proxy.connect_attempts", self.connect_attempts, 1, 16);
        // Bounded: a closing io_uring connection waits for its pause to end.
        let retry_delay = v.millis(
            "proxy.connect_retry_delay_ms",
            self.connect_retry_delay_ms,
            0,
            1_000,
        );
        let check = v.millis("proxy.check_interval_ms", self.check_interval_ms, 0, 3_600_000);
        v.check(
            check.is_zero() || check >= Duration::from_millis(100),
            "proxy.check_interval_ms",
            || format!("{} must be 0 (off) or at least 100", check.as_millis()),
        );
        let check_fall = v.range("proxy.check_fall", self.check_fall, 1, 100);
        let check_rise = v.range("proxy.check_rise", self.check_rise, 1, 100);
        let slow_start = v.millis("proxy.slow_start_ms", self.slow_start_ms, 0, 300_000);
        let queue = v.millis("proxy.queue_timeout_ms", self.queue_timeout_ms, 0, 60_000);
        let balance_of = |v: &mut Validator, key: &str, name: &str| {
            v.one_of(
                key,
                name,
                &[
                    ("random", Balance::Random),
                    ("round_robin", Balance::RoundRobin),
                    ("least_connections", Balance::LeastConnections),
                    ("source", Balance::Source),
                ],
            )
        };
        let balance = balance_of(v, "proxy.balance", &self.balance);
        let mut balance_by_type = BTreeMap::new();
        v.check(
            self.balance_by_type.len() <= MAX_LISTENERS,
            "proxy.balance_by_type",
            || format!("{} entries, at most {MAX_LISTENERS}", self.balance_by_type.len()),
        );
        for (ty, name) in &self.balance_by_type {
            let key = format!("proxy.balance_by_type.{ty}");
            check_name(v, &key, ty);
            // A type the directory routes follows its live weights: a balance for it would do nothing.
            v.check(backends.iter().any(|b| b.serves(ty)), &key, || {
                format!("no [[proxy.backends]] serve {ty:?}; the directory's weights route it")
            });
            balance_by_type.insert(ty.clone(), balance_of(v, &key, name));
        }
        let max_connections = v.range("proxy.max_connections", self.max_connections, 1, 1_000_000);
        let backlog = v.range("proxy.backlog", self.backlog, 1, 65_535);
        let io_uring_buffers = v.range("proxy.io_uring_buffers", self.io_uring_buffers, 1, 32_768);
        v.check(
            io_uring_buffers.is_power_of_two(),
            "proxy.io_uring_buffers",
            || format!("{io_uring_buffers} must be a power of two"),
        );
        let keepalive = v.millis("proxy.keepalive_ms", self.keepalive_ms, 0, 86_400_000);
        let warmup = v.millis("proxy.warmup_ms", self.warmup_ms, 0, 60_000);
        let busy_poll = v.range("proxy.busy_poll_us", self.busy_poll_us, 0, 1_000);
        ProxyConfig {
            listeners,
            backends,
            workers,
            runtime,
            forwarding,
            timeouts: Timeouts {
                connect,
                connect_attempts,
                retry_delay,
                check_interval: (!check.is_zero()).then_some(check),
                checks,
                check_fall,
                check_rise,
                slow_start: (!slow_start.is_zero()).then_some(slow_start),
                queue: (!queue.is_zero()).then_some(queue),
                busy_poll: Duration::from_micros(u64::from(busy_poll)),
            },
            max_connections,
            backlog,
            keepalive: (!keepalive.is_zero()).then_some(keepalive),
            warmup,
            // At most 32,768 after the range check.
            io_uring_buffers: u16::try_from(io_uring_buffers).unwrap_or(u16::MAX),
            balance,
            balance_by_type,
            names,
            resolve_interval: match self.resolve_interval_ms {
                0 => None,
                ms => Some(v.millis("proxy.resolve_interval_ms", ms, 1_000, 86_400_000)),
            },
        }
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
        let mut v = Validator::new();
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, Vec<String>> {
        let raw: ProxySection = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut v = Validator::new();
        let cfg = raw.validate(&mut v);
        v.finish(cfg)
            .map_err(|issues| issues.iter().map(|i| i.to_string()).collect())
    }

    #[test]
    fn a_reload_names_the_keys_it_cannot_apply() {
        let running = parse("workers = 2").unwrap();
        assert!(
            running
                .restart_pending(&parse("workers = 2\nidle_timeout_ms = 5").unwrap())
                .is_empty()
        );
        let new = parse("workers = 3\nbacklog = 16\nconnect_timeout_ms = 5").unwrap();
        assert_eq!(running.restart_pending(&new), ["proxy.workers", "proxy.backlog"]);
    }

    #[test]
    fn defaults_validate() {
        let cfg = parse("").unwrap();
        assert!(cfg.listeners.is_empty());
        assert!(cfg.workers >= 1);
        assert_eq!(cfg.forwarding, Forwarding::Auto);
        assert_eq!(cfg.timeouts.connect_attempts, 3);
        assert_eq!(cfg.timeouts.check_interval, Some(Duration::from_secs(2)));
    }

    #[test]
    fn health_checks_are_off_at_0_and_refused_below_100_ms() {
        let cfg = parse("check_interval_ms = 0\n").unwrap();
        assert_eq!(cfg.timeouts.check_interval, None);
        let errs = parse("check_interval_ms = 50\n").unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("check_interval_ms"),
            "{errs:#?}"
        );
    }

    #[test]
    fn check_streaks_default_to_haproxys_and_are_at_least_1() {
        let t = parse("").unwrap().timeouts;
        assert_eq!((t.check_fall, t.check_rise), (3, 2));
        let t = parse("check_fall = 1\ncheck_rise = 5\n").unwrap().timeouts;
        assert_eq!((t.check_fall, t.check_rise), (1, 5));
        let errs = parse("check_fall = 0\ncheck_rise = 101\n").unwrap_err();
        assert!(
            errs.len() == 2 && errs[0].contains("check_fall") && errs[1].contains("check_rise"),
            "{errs:#?}"
        );
    }

    #[test]
    fn balance_is_random_least_connections_or_source() {
        assert_eq!(parse("").unwrap().balance, Balance::Random);
        let cfg = parse("balance = \"least_connections\"\n").unwrap();
        assert_eq!(cfg.balance, Balance::LeastConnections);
        assert_eq!(parse("balance = \"source\"\n").unwrap().balance, Balance::Source);
        assert_eq!(
            parse("balance = \"round_robin\"\n").unwrap().balance,
            Balance::RoundRobin
        );
        let errs = parse("balance = \"leastconn\"\n").unwrap_err();
        assert!(errs.len() == 1 && errs[0].contains("balance"), "{errs:#?}");
    }

    #[test]
    fn a_type_may_have_its_own_balance_if_backends_serve_it() {
        let pools = "[[backends]]\naddr = \"127.0.0.1:1\"\nrequest_types = [\"ws\", \"web\"]\n";
        let cfg = parse(&format!(
            "balance = \"round_robin\"\n[balance_by_type]\nws = \"least_connections\"\n{pools}"
        ))
        .unwrap();
        assert_eq!(
            (cfg.balance_for("ws"), cfg.balance_for("web")),
            (Balance::LeastConnections, Balance::RoundRobin)
        );
        for (bad, key) in [
            ("ws = \"leastconn\"", "proxy.balance_by_type.ws"),
            ("api = \"source\"", "proxy.balance_by_type.api"),
            ("\"a b\" = \"source\"", "proxy.balance_by_type.a b"),
        ] {
            let errs = parse(&format!("[balance_by_type]\n{bad}\n{pools}")).unwrap_err();
            assert!(errs.iter().all(|e| e.contains(key)), "{bad}: {errs:#?}");
        }
    }

    /// A backend may be named by host name and port: it stands for every address the name resolves to (here
    /// `localhost`, from the hosts file), each with the entry's settings; a name that does not resolve, or
    /// is not a host name, is refused.
    #[test]
    fn a_backend_named_by_host_resolves_to_its_addresses() {
        let cfg = parse("[[backends]]\naddr = \"localhost:9000\"\nweight = 7\nrequest_types = [\"web\"]\n")
            .unwrap();
        let local = SocketAddr::from(([127, 0, 0, 1], 9000));
        assert!(cfg.backends.iter().any(|b| b.addr == local), "{:?}", cfg.backends);
        assert!(
            cfg.backends
                .iter()
                .all(|b| b.addr.port() == 9000 && b.weight == 7 && b.request_types == ["web"])
        );
        assert!(
            cfg.timeouts
                .checks
                .iter()
                .any(|(a, c)| *a == local && c.target == local)
        );
        for (addr, why) in [
            (
                "no-such-host.invalid:9000",
                "cannot resolve \"no-such-host.invalid\"",
            ),
            ("bad host:9000", "nor a host name and port"),
            ("localhost:0", "nor a host name and port"),
            ("localhost", "nor a host name and port"),
        ] {
            let issues = parse(&format!("[[backends]]\naddr = \"{addr}\"\n")).unwrap_err();
            assert!(
                issues
                    .iter()
                    .any(|i| i.contains("proxy.backends[0].addr") && i.contains(why)),
                "{addr}: {issues:?}"
            );
        }
    }

    #[test]
    fn an_address_may_be_in_several_pools_of_disjoint_types() {
        let entry = |types: &str, extra: &str| {
            format!("[[backends]]\naddr = \"127.0.0.1:9000\"\nrequest_types = [{types}]\n{extra}")
        };
        let two = |first: String, second: String| parse(&format!("{first}{second}"));
        let cfg = two(
            entry("\"a\"", "weight = 3\n"),
            entry("\"b\", \"c\"", "weight = 1\nbackup = true\n"),
        )
        .unwrap();
        assert_eq!(cfg.backends.len(), 2);
        assert_eq!(
            cfg.timeouts.checks.len(),
            1,
            "one server, one check: {:?}",
            cfg.timeouts.checks
        );
        let refused = |first: String, second: String, key: &str| {
            let errs = two(first, second).unwrap_err();
            assert!(errs.len() == 1 && errs[0].contains(key), "{errs:#?}");
        };
        // A type in both pools, or a pool of every type, would make the entries compete.
        refused(entry("\"a\"", ""), entry("\"b\", \"a\"", ""), "backends[1].addr");
        refused(entry("\"a\"", ""), entry("", ""), "backends[1].addr");
        // Every earlier entry counts, not only the first: the third overlaps the second.
        let third = parse(&format!(
            "{}{}{}",
            entry("\"a\"", ""),
            entry("\"b\"", ""),
            entry("\"b\"", "")
        ))
        .unwrap_err();
        assert!(
            third.len() == 1 && third[0].contains("backends[2].addr") && third[0].contains("backends[1]"),
            "{third:#?}"
        );
        // One server: one limit and one health check.
        refused(
            entry("\"a\"", ""),
            entry("\"b\"", "max_connections = 5\n"),
            "backends[1].max_connections",
        );
        refused(
            entry("\"a\"", ""),
            entry("\"b\"", "check = false\n"),
            "backends[1].check",
        );
        refused(
            entry("\"a\"", ""),
            entry("\"b\"", "check_http_path = \"/readyz\"\n"),
            "backends[1].check",
        );
    }

    #[test]
    fn idle_and_fin_timeouts_are_the_proxys_unless_a_listener_has_its_own() {
        let listener = |name: &str, own: &str| {
            format!(
                "[[listeners]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{}\"\n{own}",
                7100 + name.len()
            )
        };
        let timeouts = |cfg: &ProxyConfig| -> Vec<(Option<Duration>, Option<Duration>)> {
            cfg.listeners.iter().map(|l| (l.idle, l.fin)).collect()
        };
        let ms = |n: u64| Some(Duration::from_millis(n));
        // By default: five minutes idle, and a half-closed connection keeps it.
        assert_eq!(
            timeouts(&parse(&listener("a", "")).unwrap()),
            [(ms(300_000), None)]
        );
        let cfg = parse(&format!(
            "idle_timeout_ms = 60000\nfin_timeout_ms = 1500\n{}{}{}",
            listener("a", ""),
            listener("bb", "idle_timeout_ms = 3600000\n"),
            listener("ccc", "idle_timeout_ms = 0\nfin_timeout_ms = 0\n"),
        ))
        .unwrap();
        assert_eq!(
            timeouts(&cfg),
            [(ms(60_000), ms(1500)), (ms(3_600_000), ms(1500)), (None, None)]
        );
        for bad in [
            "fin_timeout_ms = 86400001\n".to_string(),
            listener("a", "idle_timeout_ms = 86400001\n"),
        ] {
            let errs = parse(&bad).unwrap_err();
            assert!(
                errs.len() == 1 && errs[0].contains("timeout_ms"),
                "{bad}: {errs:#?}"
            );
        }
    }

    #[test]
    fn slow_start_is_off_by_default_and_at_most_5_minutes() {
        assert_eq!(parse("").unwrap().timeouts.slow_start, None);
        let t = parse("slow_start_ms = 30000\n").unwrap().timeouts;
        assert_eq!(t.slow_start, Some(Duration::from_secs(30)));
        let errs = parse("slow_start_ms = 300001\n").unwrap_err();
        assert!(errs.len() == 1 && errs[0].contains("slow_start_ms"), "{errs:#?}");
    }

    #[test]
    fn the_queue_is_off_by_default_and_at_most_a_minute() {
        assert_eq!(parse("").unwrap().timeouts.queue, None);
        let t = parse("queue_timeout_ms = 250\n").unwrap().timeouts;
        assert_eq!(t.queue, Some(Duration::from_millis(250)));
        let errs = parse("queue_timeout_ms = 60001\n").unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("queue_timeout_ms"),
            "{errs:#?}"
        );
        let errs = parse("[[backends]]\naddr = \"127.0.0.1:1\"\nmax_connections = 10000001\n").unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("max_connections"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_per_client_limit_is_off_at_0_and_bounded() {
        let l = |n: u64| {
            format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\nmax_connections_per_client = {n}\n")
        };
        assert_eq!(
            parse(&l(0)).unwrap().listeners[0].max_connections_per_client,
            None
        );
        assert_eq!(
            parse(&l(5)).unwrap().listeners[0].max_connections_per_client,
            Some(5)
        );
        let errs = parse(&l(2_000_000)).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("max_connections_per_client"),
            "{errs:#?}"
        );
    }

    #[test]
    fn an_http_check_path_is_a_plain_absolute_path() {
        let backend = "[[backends]]\naddr = \"127.0.0.1:9001\"\n";
        let probe = |cfg: &ProxyConfig| cfg.timeouts.checks[0].1.probe.clone();
        let cfg = parse(&format!("check_http_path = \"/readyz\"\n{backend}")).unwrap();
        assert_eq!(probe(&cfg), Probe::Http("/readyz".into()));
        assert_eq!(probe(&parse(backend).unwrap()), Probe::Connect);
        for bad in ["readyz", "/a b", "/a\\r\\nHost: x"] {
            let errs = parse(&format!("check_http_path = \"{bad}\"\n")).unwrap_err();
            assert!(
                errs.len() == 1 && errs[0].contains("check_http_path"),
                "{bad}: {errs:#?}"
            );
            let errs = parse(&format!("{backend}check_http_path = \"{bad}\"\n")).unwrap_err();
            assert!(
                errs.len() == 1 && errs[0].contains("proxy.backends[0].check_http_path"),
                "{bad}: {errs:#?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = parse(
            r#"
            runtime = "fibers"
            forwarding = "magic"
            connect_timeout_ms = 0
            busy_poll_us = 1001
            [[listeners]]
            listen = "nope"
            request_type = "bad type"
            [[backends]]
            addr = "127.0.0.1:1"
            [[backends]]
            addr = "127.0.0.1:1"
            request_types = [""]
            "#,
        )
        .unwrap_err();
        assert_eq!(errs.len(), 8, "{errs:#?}");
        assert!(errs.iter().any(|e| e.contains("proxy.busy_poll_us")), "{errs:#?}");
    }

    #[test]
    fn io_uring_takes_splice_and_refuses_odd_buffer_counts() {
        let errs =
            parse("runtime = \"io_uring\"\nforwarding = \"splice\"\nio_uring_buffers = 300\n").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("power of two"), "{errs:#?}");
        let cfg = parse("runtime = \"io_uring\"\nforwarding = \"splice\"\nio_uring_buffers = 16\n").unwrap();
        assert_eq!(
            (cfg.runtime, cfg.forwarding, cfg.io_uring_buffers),
            (RuntimeMode::IoUring, Forwarding::Splice, 16)
        );
    }

    #[test]
    fn listener_name_defaults_to_request_type() {
        let cfg = parse(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            request_type = "browse"
            proxy_protocol = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.listeners[0].name, "browse");
        assert!(cfg.listeners[0].proxy_protocol);
    }

    #[test]
    fn checks_send_a_proxy_header_to_backends_a_proxy_protocol_listener_routes_to() {
        let cfg = parse(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            request_type = "browse"
            proxy_protocol = true
            [[listeners]]
            listen = "127.0.0.1:7101"
            request_type = "order"
            [[backends]]
            addr = "127.0.0.1:9001"
            request_types = ["browse"]
            [[backends]]
            addr = "127.0.0.1:9002"
            request_types = ["order"]
            [[backends]]
            addr = "127.0.0.1:9003"
            "#,
        )
        .unwrap();
        let headers: Vec<(u16, bool)> = cfg
            .timeouts
            .checks
            .iter()
            .map(|(a, c)| (a.port(), c.proxy_header))
            .collect();
        assert_eq!(headers, [(9001, true), (9002, false), (9003, true)]);
    }

    #[test]
    fn a_check_port_moves_the_check_to_a_side_port_without_a_proxy_header() {
        let cfg = parse(
            r#"
            [[listeners]]
            listen = "127.0.0.1:7100"
            proxy_protocol = true
            [[backends]]
            addr = "127.0.0.1:5432"
            check_port = 8008
            [[backends]]
            addr = "127.0.0.1:5433"
            "#,
        )
        .unwrap();
        let checks: Vec<(u16, u16, bool)> = (cfg.timeouts.checks.iter())
            .map(|(a, c)| (a.port(), c.target.port(), c.proxy_header))
            .collect();
        assert_eq!(checks, [(5432, 8008, false), (5433, 5433, true)]);
        let errs = parse("[[backends]]\naddr = \"127.0.0.1:1\"\ncheck_port = 0\n").unwrap_err();
        assert!(errs.len() == 1 && errs[0].contains("check_port"), "{errs:#?}");
    }

    #[test]
    fn a_backend_may_have_its_own_check_or_none() {
        let cfg = parse(
            r#"
            check_http_path = "/readyz"
            [[backends]]
            addr = "127.0.0.1:9001"
            [[backends]]
            addr = "127.0.0.1:9002"
            check_http_path = ""
            [[backends]]
            addr = "127.0.0.1:9003"
            check_http_path = "/health"
            [[backends]]
            addr = "127.0.0.1:9004"
            check = false
            "#,
        )
        .unwrap();
        let probes: Vec<(u16, &Probe)> = cfg
            .timeouts
            .checks
            .iter()
            .map(|(a, c)| (a.port(), &c.probe))
            .collect();
        let http = |p: &str| Probe::Http(p.into());
        assert_eq!(
            probes,
            [
                (9001, &http("/readyz")),
                (9002, &Probe::Connect),
                (9003, &http("/health"))
            ],
            "9004 is not checked"
        );
    }

    #[test]
    fn a_send_expect_check_needs_its_expect_and_is_its_own() {
        let cfg = parse(
            r#"
            check_send = "PING\r\n"
            check_expect = "+PONG"
            [[backends]]
            addr = "127.0.0.1:9001"
            [[backends]]
            addr = "127.0.0.1:9002"
            check_expect = "220 "
            [[backends]]
            addr = "127.0.0.1:9003"
            check_http_path = "/readyz"
            "#,
        )
        .unwrap();
        let probes: Vec<&Probe> = cfg.timeouts.checks.iter().map(|(_, c)| &c.probe).collect();
        let expect = |send: &[u8], expect: &[u8]| Probe::Expect {
            send: send.to_vec(),
            expect: expect.to_vec(),
        };
        // A backend's own keys replace the [proxy] ones whole: 9002 sends nothing, 9003 is HTTP alone.
        assert_eq!(
            probes,
            [
                &expect(b"PING\r\n", b"+PONG"),
                &expect(b"", b"220 "),
                &Probe::Http("/readyz".into())
            ]
        );
        for (bad, key) in [
            ("check_send = \"PING\"\n", "proxy.check_send"),
            (
                "check_expect = \"+PONG\"\ncheck_http_path = \"/readyz\"\n",
                "proxy.check_expect",
            ),
            (
                "[[backends]]\naddr = \"127.0.0.1:9001\"\ncheck_send = \"x\"\n",
                "proxy.backends[0].check_send",
            ),
        ] {
            let errs = parse(bad).unwrap_err();
            assert!(errs.len() == 1 && errs[0].contains(key), "{bad}: {errs:#?}");
        }
        let long = "x".repeat(1025);
        let errs = parse(&format!("check_expect = \"{long}\"\n")).unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("proxy.check_expect"),
            "{errs:#?}"
        );
    }

    #[test]
    fn allow_and_deny_entries_are_checked_one_by_one() {
        let listener = |rules: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\n{rules}\n");
        let cfg = parse(&listener(
            "allow = [\"10.0.0.0/8\", \"::1\"]\ndeny = [\"10.6.0.0/16\"]",
        ))
        .unwrap();
        let acl = &cfg.listeners[0].acl;
        assert_eq!((acl.allow.len(), acl.deny.len()), (2, 1));
        assert!(acl.admits("10.1.1.1".parse().unwrap()) && !acl.admits("10.6.1.1".parse().unwrap()));
        let errs = parse(&listener(
            "allow = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\ndeny = [\"nowhere\"]",
        ))
        .unwrap_err();
        assert!(
            errs.len() == 2
                && errs[0].contains("proxy.listeners[0].allow[1]")
                && errs[0].contains("below its /8 prefix")
                && errs[1].contains("proxy.listeners[0].deny[0]"),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_connection_rate_is_off_by_default_and_its_period_bounded() {
        let listener = |keys: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:7100\"\n{keys}\n");
        assert_eq!(parse(&listener("")).unwrap().listeners[0].connection_rate, None);
        let cfg = parse(&listener("max_connection_rate_per_client = 20")).unwrap();
        let want = Rate {
            count: 20,
            period: Duration::from_secs(10),
        };
        assert_eq!(cfg.listeners[0].connection_rate, Some(want));
        let errs = parse(&listener(
            "max_connection_rate_per_client = 5\nconnection_rate_period_ms = 500",
        ))
        .unwrap_err();
        assert!(
            errs.len() == 1 && errs[0].contains("proxy.listeners[0].connection_rate_period_ms"),
            "{errs:#?}"
        );
    }
}
