//! The lb's configuration: raw serde form, validation, typed form.
//!
//! Reloads live: `log.level`, `shutdown.*`, `peers`, `advertise`, every key of `[reports]`,
//! `[directory]`, `[admin]` and `[types.*]` (request types and their cost profiles), and the `[proxy]` keys listed in
//! `crate::proxy::config`. Needs a restart: `listen` (a reload naming another keeps the API, and the address
//! the directory advertises, where they started, with a warning), `http.*`, `directory.state_file` (read at
//! start only).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::common::{HttpSection, LogSection, ShutdownSection, ShutdownTimes};
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

use xcluster_proto::directory::MAX_SERVERS;
use xcluster_proto::report;

use crate::directory::ingest::ReportKeys;
use crate::directory::weights::{Params, TypeProfile};

/// Most request types a balancer may be configured with.
pub const MAX_TYPES: usize = 32;

/// The file-facing config (`role = "lb"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the lb's HTTP API (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    /// The address clients should use for this balancer (defaults to `listen`).
    pub advertise: String,
    /// API addresses of the other balancers, published in every server list.
    pub peers: Vec<String>,
    pub reports: ReportsSection,
    pub directory: DirectorySection,
    pub admin: AdminSection,
    /// Request types and their cost profiles, by name.
    pub types: BTreeMap<String, RawType>,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
    /// `[http]`: the API server's limits (connections, header timeout and size, declared body size).
    pub http: HttpSection,
    /// `[proxy]`: the layer-4 proxy mode (issue 5); see `crate::proxy::config` for the keys that reload.
    pub proxy: crate::proxy::ProxySection,
}

/// `[reports]`: how agent reports are authenticated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportsSection {
    /// The shared HMAC key, inline (prefer `key_file`).
    pub key: String,
    /// A file holding the shared HMAC key (surrounding whitespace is ignored).
    pub key_file: String,
    /// Agents with a key of their own: agent id → the file holding its HMAC key. Such an agent's reports
    /// must be signed with its key (the shared one, or another agent's, is refused), so one host's key, if
    /// stolen, reports only for that host. Agents not listed use the shared key, if one is set.
    pub agent_keys: BTreeMap<String, String>,
    /// How far a report's timestamp may be from this balancer's clock.
    pub skew_ms: u64,
    /// Most distinct agents remembered (bounds memory against a flood of agent ids).
    pub max_agents: usize,
    /// Most instances in the table, over every agent: a report that would add past it is refused, so
    /// one holder of the key cannot grow the table (and every server list and status) without bound. At
    /// most `MAX_SERVERS` (4096), what a server list may hold: a list lists every fresh instance, and the
    /// SDK refuses a longer one.
    pub max_instances: usize,
}

impl Default for ReportsSection {
    fn default() -> Self {
        Self {
            key: String::new(),
            key_file: String::new(),
            agent_keys: Default::default(),
            skew_ms: 10_000,
            max_agents: 1024,
            max_instances: MAX_SERVERS,
        }
    }
}

/// `[directory]`: the weight computation's tunables (see ARCHITECTURE.md, "lb").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectorySection {
    /// An instance without a report for this long is stale and leaves the published table.
    pub report_ttl_ms: u64,
    /// A stale instance is forgotten entirely (no longer counts for the panic threshold) after this long.
    pub forget_after_ms: u64,
    /// How long a client that polls (no watch) may use a server list; the SDK watches instead.
    pub list_ttl_ms: u64,
    /// Longest a `watch` long poll waits before answering with an unchanged table.
    pub watch_timeout_ms: u64,
    /// Below this fraction of fresh, ready instances, publish equal weights among all known ones.
    pub panic_threshold: f64,
    /// How long a new or recovered instance takes to ramp up to its full weight.
    pub slow_start_ms: u64,
    /// The weight fraction a slow-starting instance begins at.
    pub slow_start_min: f64,
    /// EWMA factor applied to each new target weight (1 = no damping).
    pub damping: f64,
    /// Largest change of a weight per report, as a fraction of the maximum weight.
    pub max_step: f64,
    /// How much an error rate counts as load (1 = a 10% error rate weighs like 10% more load).
    pub error_penalty: f64,
    /// Cores per instance at which an instance reaches the full weight scale (heterogeneous hosts).
    pub full_weight_cores: f64,
    /// An instance whose mean service time for a type is within this factor of the type's reference (the
    /// lower median over the instances) keeps its whole weight; a slower one's weight scales down with the
    /// ratio. 0 turns it off.
    pub service_tolerance: f64,
    /// A list is shown to clients anew (a new version, which wakes their watches) only when an instance or
    /// its state changed, or a weight moved by more than this fraction of itself; smaller moves still steer
    /// the balancer's own picks at once. 0 shows every change.
    pub publish_min_change: f64,
    /// A file where the balancer keeps its drains and run-time weights (HAProxy's server-state-file): written
    /// on every change, read at start, so they survive a restart of every balancer at once. Empty: none
    /// (a restarted balancer then has only its peers'). Each balancer needs its own. Needs a restart.
    pub state_file: String,
}

impl Default for DirectorySection {
    fn default() -> Self {
        Self {
            report_ttl_ms: 2_000,
            forget_after_ms: 60_000,
            list_ttl_ms: 1_000,
            watch_timeout_ms: 30_000,
            panic_threshold: 0.5,
            slow_start_ms: 10_000,
            slow_start_min: 0.1,
            damping: 0.5,
            max_step: 0.25,
            error_penalty: 2.0,
            full_weight_cores: 8.0,
            service_tolerance: 1.25,
            publish_min_change: 0.1,
            state_file: String::new(),
        }
    }
}

/// `[admin]`: the bearer token for drain/undrain.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Empty refuses every mutating call.
    pub token: String,
}

/// `[types.NAME]`: how much of each resource a request type uses, and its relative cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawType {
    pub cpu: f64,
    pub mem: f64,
    pub queue: f64,
    pub cost: f64,
}

impl Default for RawType {
    fn default() -> Self {
        Self {
            cpu: 0.4,
            mem: 0.1,
            queue: 0.5,
            cost: 1.0,
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7000".into(),
            advertise: String::new(),
            peers: Vec::new(),
            reports: ReportsSection::default(),
            directory: DirectorySection::default(),
            admin: AdminSection::default(),
            types: BTreeMap::from([("default".to_string(), RawType::default())]),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
            http: HttpSection::default(),
            proxy: crate::proxy::ProxySection::default(),
        }
    }
}

/// The validated config.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// This balancer first, then its peers: what every server list names.
    pub balancers: Vec<SocketAddr>,
    /// The keys reports are checked with (their files' permissions are checked at start and reload).
    pub keys: crate::directory::ingest::ReportKeys,
    pub skew: Duration,
    pub max_agents: usize,
    pub max_instances: usize,
    pub params: Params,
    pub admin_token: String,
    pub log_filter: String,
    pub shutdown: ShutdownTimes,
    /// The API server's limits (`[http]`, with `[shutdown]`'s grace period).
    pub http: xcluster_runtime::http::ServerLimits,
    /// The L4 proxy (issue 5).
    pub proxy: crate::proxy::ProxyConfig,
    /// `[directory] state_file`: where drains and run-time weights are kept across restarts.
    pub state_file: Option<PathBuf>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key and the token never reach a log.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("balancers", &self.balancers)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl RoleConfig for Config {
    const ROLE: &'static str = "lb";
    type Raw = RawConfig;
    // `listen` and the proxy's own restart keys warn where they are applied, with what runs instead. The
    // state file is read at start: a new one would be written without ever having been read.
    const RESTART_KEYS: &'static [&'static str] = &["http", "directory.state_file"];

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        // Every list names these balancers and clients fail over to them: `0.0.0.0` or `::` (listening on
        // every address) is none a client can reach, and one that learned it connected to its own host.
        let advertise = if raw.advertise.is_empty() {
            v.check(report::usable_addr(listen), "listen", || {
                format!(
                    "{listen} is what every server list names as this balancer while advertise is empty, and no \
                     client can connect to it: set advertise to the address clients reach this balancer at"
                )
            });
            listen
        } else {
            let a = v.addr("advertise", &raw.advertise);
            v.check(report::usable_addr(a), "advertise", || {
                format!("{a} {}", report::ADDR_RULE)
            });
            a
        };
        let mut balancers = vec![advertise];
        v.check(
            raw.peers.len() < xcluster_proto::directory::MAX_BALANCERS,
            "peers",
            || format!("at most {} peers", xcluster_proto::directory::MAX_BALANCERS - 1),
        );
        for (i, p) in raw.peers.iter().enumerate() {
            let key = format!("peers[{i}]");
            let a = v.addr(&key, p);
            v.check(report::usable_addr(a), &key, || {
                format!("{a} {}", report::ADDR_RULE)
            });
            if !balancers.contains(&a) {
                balancers.push(a);
            }
        }
        let skew = v.millis("reports.skew_ms", raw.reports.skew_ms, 100, 3_600_000);
        let max_agents = v.range("reports.max_agents", raw.reports.max_agents, 1, 100_000);
        let keys = validate_keys(&mut v, &raw.reports, max_agents);
        v.token("admin.token", &raw.admin.token);
        // Every list names every fresh instance (every known one in panic mode), and the SDK refuses a list
        // of more than MAX_SERVERS: at 16,384 a balancer took a table whose lists no client could read, and
        // every SDK client failed ("too many servers") while the balancer ran on, looking healthy.
        let max_instances = raw.reports.max_instances;
        v.check(
            (1..=MAX_SERVERS).contains(&max_instances),
            "reports.max_instances",
            || {
                format!(
                    "{max_instances} is out of range (1..={MAX_SERVERS}: a server list names at most \
                 {MAX_SERVERS} instances, and clients refuse a longer one)"
                )
            },
        );
        let max_instances = max_instances.clamp(1, MAX_SERVERS);
        let params = validate_directory(&mut v, &raw.directory, &raw.types);
        // A report is taken while its timestamp is within the skew of the balancer's clock, either way, so
        // one stamped by a clock `skew` ahead is taken for up to 2 × skew after it arrived: an agent must
        // be remembered (its last sequence number) that long, or its last reports could be played again.
        v.check(params.forget_after >= 2 * skew, "directory.forget_after_ms", || {
            "must be at least twice reports.skew_ms (a report stamped up to the skew ahead is taken for twice \
             the skew: a forgotten agent's old reports must fail the skew check)"
                .into()
        });
        raw.log.validate(&mut v);
        let shutdown = raw.shutdown.validate(&mut v);
        let http = raw.http.validate(&mut v, shutdown.grace);
        let proxy = raw.proxy.validate(&mut v);
        let state_file = validate_state_file(&mut v, &raw.directory.state_file);
        check_proxy_types(&mut v, &proxy, &params);
        for (i, l) in proxy.listeners.iter().enumerate() {
            if clash(l.listen, listen) {
                v.error(
                    format!("proxy.listeners[{i}].listen"),
                    format!(
                        "{} takes the balancer's own API address (listen = {listen})",
                        l.listen
                    ),
                );
            }
        }
        v.finish(Config {
            listen,
            balancers,
            keys,
            skew,
            max_agents,
            max_instances,
            params,
            admin_token: raw.admin.token.clone(),
            log_filter: raw.log.level.clone(),
            shutdown,
            http,
            proxy,
            state_file,
        })
    }

    fn redact(raw: &mut RawConfig) {
        if !raw.reports.key.is_empty() {
            raw.reports.key = "<redacted>".into();
        }
        if !raw.admin.token.is_empty() {
            raw.admin.token = "<redacted>".into();
        }
    }
}

/// `directory.state_file`: empty for none; else a file (existing or not) in an existing directory, so a bad
/// path is said at start rather than by every write failing.
fn validate_state_file(v: &mut Validator, path: &str) -> Option<PathBuf> {
    const KEY: &str = "directory.state_file";
    if path.is_empty() {
        return None;
    }
    let p = Path::new(path);
    if path.contains('\0') || path.len() > 4096 {
        v.error(KEY, "not a usable path (a NUL byte, or longer than 4096 bytes)");
        return None;
    }
    if p.file_name().is_none() || path.ends_with('/') {
        v.error(KEY, format!("{path:?} names no file"));
        return None;
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if p.is_dir() {
        v.error(KEY, format!("{path:?} is a directory; name a file in it"));
    } else if !dir.is_dir() {
        v.error(
            KEY,
            format!("{path:?}: its directory {} does not exist", dir.display()),
        );
    }
    Some(p.to_path_buf())
}

/// The shared key and each agent's own (`[reports.agent_keys]`, at most `max_agents` of them).
fn validate_keys(v: &mut Validator, raw: &ReportsSection, max_agents: usize) -> ReportKeys {
    let mut keys = ReportKeys {
        shared: v.key("reports.", &raw.key, &raw.key_file),
        agents: Default::default(),
    };
    v.check(raw.agent_keys.len() <= max_agents, "reports.agent_keys", || {
        format!(
            "{} agents, more than reports.max_agents ({max_agents})",
            raw.agent_keys.len()
        )
    });
    for (agent, path) in &raw.agent_keys {
        let field = format!("reports.agent_keys.{}", report::shown(agent));
        if !report::valid_id(agent) {
            v.error(&field, format!("agent id {}", report::ID_RULE));
            continue;
        }
        keys.agents.insert(agent.clone(), v.key_file(&field, path));
    }
    keys
}

/// Each of a listener's types (its own and its `sni` ones) must route somewhere: a configured backend serves
/// it, or the directory knows it (`[types]`); else every connection of it fails. A backend's `request_types` must each be some listener's,
/// or the backend serves nothing (a misspelt type, most likely).
fn check_proxy_types(v: &mut Validator, proxy: &crate::proxy::config::ProxyConfig, params: &Params) {
    for (i, l) in proxy.listeners.iter().enumerate() {
        for ty in l.types() {
            if !params.types.contains_key(ty) && !proxy.backends.iter().any(|b| b.serves(ty)) {
                let key = if ty == l.request_type {
                    "request_type"
                } else {
                    "sni"
                };
                v.error(
                    format!("proxy.listeners[{i}].{key}"),
                    format!(
                        "{ty:?} is neither a [types] entry nor served by a [[proxy.backends]] (types: {})",
                        params.types.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
    }
    if proxy.listeners.is_empty() {
        return;
    }
    for (i, b) in proxy.backends.iter().enumerate() {
        for ty in &b.request_types {
            if !proxy.listeners.iter().any(|l| l.types().any(|t| t == ty)) {
                v.error(
                    format!("proxy.backends[{i}].request_types"),
                    format!(
                        "no listener has type {ty:?} (listeners' types: {}); a misspelling, or a listener \
                         removed: drop the type from its backends in the same save",
                        proxy
                            .listeners
                            .iter()
                            .flat_map(|l| l.types())
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
    }
}

/// Whether sockets on `a` and `b` would take the same port: the same address, or the same port with either
/// on every address (`0.0.0.0`, `[::]`).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate_directory(v: &mut Validator, d: &DirectorySection, types: &BTreeMap<String, RawType>) -> Params {
    let unit = |v: &mut Validator, key: &str, x: f64, min: f64| {
        if !(x.is_finite() && x >= min && x <= 1.0) {
            v.error(key, format!("{x} is out of range ({min}..=1)"));
        }
    };
    unit(v, "directory.panic_threshold", d.panic_threshold, 0.0);
    unit(v, "directory.publish_min_change", d.publish_min_change, 0.0);
    unit(v, "directory.slow_start_min", d.slow_start_min, 0.01);
    unit(v, "directory.damping", d.damping, 0.01);
    unit(v, "directory.max_step", d.max_step, 0.01);
    if !(d.error_penalty.is_finite() && (0.0..=100.0).contains(&d.error_penalty)) {
        v.error(
            "directory.error_penalty",
            format!("{} is out of range (0..=100)", d.error_penalty),
        );
    }
    if !(d.full_weight_cores.is_finite() && (0.01..=4096.0).contains(&d.full_weight_cores)) {
        v.error(
            "directory.full_weight_cores",
            format!("{} is out of range (0.01..=4096)", d.full_weight_cores),
        );
    }
    let tol = d.service_tolerance;
    if !(tol.is_finite() && (tol == 0.0 || (1.0..=100.0).contains(&tol))) {
        v.error(
            "directory.service_tolerance",
            format!("{tol} is out of range (0 to turn it off, or 1..=100)"),
        );
    }
    let ttl = v.millis("directory.report_ttl_ms", d.report_ttl_ms, 100, 600_000);
    let forget = v.millis("directory.forget_after_ms", d.forget_after_ms, 100, 86_400_000);
    v.check(forget >= ttl, "directory.forget_after_ms", || {
        "must be at least directory.report_ttl_ms".into()
    });
    let list_ttl = v.millis("directory.list_ttl_ms", d.list_ttl_ms, 10, 600_000);
    let watch_timeout = v.millis("directory.watch_timeout_ms", d.watch_timeout_ms, 10, 300_000);
    let slow_start = v.millis("directory.slow_start_ms", d.slow_start_ms, 0, 3_600_000);
    v.check(!types.is_empty(), "types", || {
        "at least one request type is required".into()
    });
    v.check(types.len() <= MAX_TYPES, "types", || {
        format!("at most {MAX_TYPES} request types")
    });
    let mut profiles = BTreeMap::new();
    for (name, t) in types {
        let key = format!("types.{name}");
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        v.check(name_ok, &key, || "type names are 1..=64 of [A-Za-z0-9_-]".into());
        for (k, x) in [("cpu", t.cpu), ("mem", t.mem), ("queue", t.queue)] {
            if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
                v.error(format!("{key}.{k}"), format!("{x} is out of range (0..=1)"));
            }
        }
        if t.cpu + t.mem + t.queue <= 0.0 {
            v.error(&key, "at least one of cpu, mem, queue must be above 0");
        }
        if !(t.cost.is_finite() && t.cost > 0.0 && t.cost <= 1000.0) {
            v.error(
                format!("{key}.cost"),
                format!("{} is out of range (0 < cost <= 1000)", t.cost),
            );
        }
        profiles.insert(
            name.clone(),
            TypeProfile {
                cpu: t.cpu,
                mem: t.mem,
                queue: t.queue,
                cost: t.cost,
            },
        );
    }
    Params {
        types: profiles,
        report_ttl: ttl,
        forget_after: forget,
        list_ttl,
        watch_timeout,
        panic_threshold: d.panic_threshold,
        slow_start,
        slow_start_min: d.slow_start_min,
        damping: d.damping,
        max_step: d.max_step,
        error_penalty: d.error_penalty,
        full_weight_cores: d.full_weight_cores,
        service_tolerance: d.service_tolerance,
        publish_min_change: d.publish_min_change,
    }
}

impl DaemonConfig for Config {
    fn shutdown(&self) -> ShutdownTimes {
        self.shutdown
    }
    fn log_filter(&self) -> &str {
        &self.log_filter
    }
    /// Two per proxied connection (the client's and the backend's), when it proxies, and the API's.
    fn descriptors(&self) -> u64 {
        let proxied = if self.proxy.listeners.is_empty() {
            0
        } else {
            self.proxy.max_connections as u64
        };
        2 * proxied + self.http.max_connections as u64 + xcluster_runtime::limits::BASE_DESCRIPTORS
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn issues(text: &str) -> Vec<String> {
        let raw: RawConfig = toml::from_str(text).unwrap();
        match Config::validate(&raw) {
            Ok(_) => Vec::new(),
            Err(issues) => issues.iter().map(ToString::to_string).collect(),
        }
    }

    /// Each agent's own key is read from its file; a bad id, a missing or empty file, or more agents than
    /// `max_agents` are refused, each named.
    #[test]
    fn agent_keys_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("xcluster-agent-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, empty) = (dir.join("a.key"), dir.join("empty.key"));
        std::fs::write(&good, "host-a-secret\n").unwrap();
        std::fs::write(&empty, "\n").unwrap();
        let text = |entries: &str| format!("[reports]\nmax_agents = 2\n[reports.agent_keys]\n{entries}");
        let raw: RawConfig = toml::from_str(&text(&format!("host-a = {good:?}\n"))).unwrap();
        let cfg = Config::validate(&raw).unwrap();
        assert_eq!(cfg.keys.agents["host-a"].bytes, b"host-a-secret");
        assert!(cfg.keys.shared.bytes.is_empty());
        assert!(
            !format!("{:?}", cfg.keys).contains("secret"),
            "keys stay out of logs"
        );
        let found = issues(&text(&format!(
            "\"<b>\" = {good:?}\nhost-b = {empty:?}\nhost-c = {:?}\n",
            dir.join("missing.key")
        )));
        std::fs::remove_dir_all(&dir).unwrap();
        let has = |key: &str, what: &str| found.iter().any(|i| i.contains(key) && i.contains(what));
        assert!(
            has("reports.agent_keys", "more than reports.max_agents (2)"),
            "{found:?}"
        );
        assert!(has("reports.agent_keys.<b>", "agent id must be"), "{found:?}");
        assert!(has("reports.agent_keys.host-b", "is empty"), "{found:?}");
        assert!(has("reports.agent_keys.host-c", "missing.key"), "{found:?}");
    }

    /// `directory.state_file`: off when empty; a file in an existing directory, else each problem is named.
    #[test]
    fn the_state_file_must_be_a_file_in_a_directory() {
        let raw: RawConfig = toml::from_str("").unwrap();
        assert!(Config::validate(&raw).unwrap().state_file.is_none());
        let dir = std::env::temp_dir();
        let good = dir.join(format!("xcluster-lb-state-{}.json", std::process::id()));
        let cfg = |p: &str| format!("[directory]\nstate_file = {p:?}\n");
        let raw: RawConfig = toml::from_str(&cfg(good.to_str().unwrap())).unwrap();
        assert_eq!(Config::validate(&raw).unwrap().state_file, Some(good));
        // A relative path is relative to where the balancer runs (`xcluster up`'s run directory).
        assert!(issues(&cfg("lb.state.json")).is_empty());
        let found = issues(&cfg(dir.to_str().unwrap()));
        assert!(found.iter().any(|i| i.contains("is a directory")), "{found:?}");
        let found = issues(&cfg("/nonexistent-xcluster-dir/lb.state.json"));
        assert!(
            found
                .iter()
                .any(|i| i.contains("directory.state_file") && i.contains("does not exist")),
            "{found:?}"
        );
        let found = issues(&cfg("state/"));
        assert!(found.iter().any(|i| i.contains("names no file")), "{found:?}");
    }

    /// A proxy listener on the API's own port would fail to bind at start; check-config says so first.
    #[test]
    fn a_proxy_listener_may_not_take_the_api_address() {
        let cfg = |api: &str, proxy: &str| {
            format!(
                "listen = \"{api}\"\n[types.web]\n[[proxy.listeners]]\nlisten = \"{proxy}\"\nrequest_type = \"web\"\n"
            )
        };
        let found = issues(&cfg("127.0.0.1:7000", "127.0.0.1:7000"));
        assert!(
            found
                .iter()
                .any(|i| i.contains("proxy.listeners[0].listen") && i.contains("API address")),
            "{found:?}"
        );
        assert_eq!(issues(&cfg("127.0.0.1:7000", "0.0.0.0:7000")).len(), 1);
        assert!(issues(&cfg("127.0.0.1:7000", "127.0.0.1:7400")).is_empty());
        assert!(issues(&cfg("127.0.0.1:7000", "127.0.0.2:7000")).is_empty());
    }

    /// What the server lists name as balancers must be addresses clients can connect to: a balancer on
    /// `0.0.0.0` with no `advertise` published `0.0.0.0:7000`, and a client failing over to it connected to
    /// its own host.
    #[test]
    fn the_published_balancers_are_connectable() {
        let found = issues("listen = \"0.0.0.0:7000\"\n");
        assert!(
            found
                .iter()
                .any(|i| i.starts_with("listen:") && i.contains("set advertise")),
            "{found:?}"
        );
        assert!(issues("listen = \"0.0.0.0:7000\"\nadvertise = \"10.0.0.1:7000\"\n").is_empty());
        for bad in [
            "advertise = \"[::]:7000\"",
            "peers = [\"10.0.0.2:7000\", \"0.0.0.0:7001\"]",
        ] {
            let found = issues(&format!("{bad}\n"));
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(found[0].contains("not 0.0.0.0"), "{bad}: {found:?}");
        }
        assert!(issues("peers = [\"10.0.0.2:0\"]\n")[0].starts_with("peers[0]"));
    }

    /// The table may not hold more instances than a server list may name: at the old default (16,384) a
    /// balancer accepted reports of 4,352 instances and served lists that every SDK client refused.
    #[test]
    fn the_table_holds_no_more_instances_than_a_list_may_name() {
        assert!(issues("").is_empty());
        assert_eq!(ReportsSection::default().max_instances, MAX_SERVERS);
        let found = issues("[reports]\nmax_instances = 16384\n");
        assert!(
            found
                .iter()
                .any(|i| i.contains("reports.max_instances") && i.contains("(1..=4096: a server list")),
            "{found:?}"
        );
        assert!(issues("[reports]\nmax_instances = 4096\n").is_empty());
    }

    /// An agent is remembered at least twice the skew: a report stamped the skew ahead is taken for that
    /// long, and forgotten sooner its last reports could be played again.
    #[test]
    fn agents_are_remembered_twice_the_skew() {
        let cfg =
            |forget: u64| format!("[reports]\nskew_ms = 10000\n[directory]\nforget_after_ms = {forget}\n");
        assert!(issues(&cfg(20_000)).is_empty());
        let found = issues(&cfg(19_999));
        assert!(
            found
                .iter()
                .any(|i| i.contains("directory.forget_after_ms") && i.contains("twice reports.skew_ms")),
            "{found:?}"
        );
    }

    /// A listener whose type routes nowhere, and a backend whose type no listener has, are refused.
    #[test]
    fn proxy_types_must_route_and_be_used() {
        let base = "[types.web]\n[[proxy.listeners]]\nlisten = \"127.0.0.1:7400\"\nrequest_type = \"web\"\n";
        assert!(issues(base).is_empty(), "{:?}", issues(base));
        let nowhere =
            format!("{base}[[proxy.listeners]]\nlisten = \"127.0.0.1:7401\"\nrequest_type = \"wbe\"\n");
        let found = issues(&nowhere);
        assert!(
            found
                .iter()
                .any(|i| i.contains("proxy.listeners[1].request_type") && i.contains("\"wbe\"")),
            "{found:?}"
        );
        let served =
            format!("{nowhere}[[proxy.backends]]\naddr = \"127.0.0.1:9000\"\nrequest_types = [\"wbe\"]\n");
        assert!(issues(&served).is_empty(), "{:?}", issues(&served));
        let unused =
            format!("{base}[[proxy.backends]]\naddr = \"127.0.0.1:9000\"\nrequest_types = [\"api\"]\n");
        let found = issues(&unused);
        assert!(
            found
                .iter()
                .any(|i| i.contains("proxy.backends[0].request_types") && i.contains("\"api\"")),
            "{found:?}"
        );
    }

    /// The types a listener's `sni` names count as its types: each must route somewhere, and a backend
    /// may serve one no listener has as its own.
    #[test]
    fn sni_types_must_route_and_may_be_served() {
        let sni = "[[proxy.listeners]]\nlisten = \"127.0.0.1:7400\"\nrequest_type = \"web\"\n\
                   sni = { \"shop.example.com\" = \"shop\", \"*.example.com\" = \"web\" }\n\
                   [[proxy.backends]]\naddr = \"127.0.0.1:9000\"\nrequest_types = [\"web\"]\n";
        let found = issues(sni);
        assert!(
            found
                .iter()
                .any(|i| i.contains("proxy.listeners[0].sni") && i.contains("\"shop\"")),
            "{found:?}"
        );
        let served =
            format!("{sni}[[proxy.backends]]\naddr = \"127.0.0.1:9001\"\nrequest_types = [\"shop\"]\n");
        assert!(issues(&served).is_empty(), "{:?}", issues(&served));
        // With `sni_only`, the listener's own type is not used: it need not route anywhere.
        let only = sni.replace(
            "request_type = \"web\"\n",
            "request_type = \"nowhere\"\nsni_only = true\n",
        );
        let only =
            format!("{only}[[proxy.backends]]\naddr = \"127.0.0.1:9001\"\nrequest_types = [\"shop\"]\n");
        assert!(issues(&only).is_empty(), "{:?}", issues(&only));
        let without = "[[proxy.listeners]]\nlisten = \"127.0.0.1:7400\"\nrequest_type = \"web\"\nsni_only = true\n\
                       [[proxy.backends]]\naddr = \"127.0.0.1:9000\"\n";
        let found = issues(without);
        assert!(
            found
                .iter()
                .any(|i| i.contains("sni_only") && i.contains("needs sni")),
            "{found:?}"
        );
        let bad = served.replace("\"*.example.com\"", "\"*.exa mple.com\"");
        let found = issues(&bad);
        assert!(
            found
                .iter()
                .any(|i| i.contains("proxy.listeners[0].sni") && i.contains("not a host name")),
            "{found:?}"
        );
    }
}
