//! The client-connection protocol: what a balancer answers to clients (`GET /v1/servers`, `GET /v1/pick`)
//! and to the dashboard (`GET /v1/status`).
//!
//! Weights are integers (0..=[`MAX_WEIGHT`]) so every balancer, given the same reports, publishes the same
//! table byte for byte; `version` is derived from the table's content, so equal tables have equal versions.
//!
//! ```
//! use xcluster_proto::directory::{ServerList, ServerEntry, InstanceState};
//! let list: ServerList = serde_json::from_str(r#"{"request_type":"browse","version":7,"ttl_ms":2000,
//!   "servers":[{"id":"h/app-1","addr":"127.0.0.1:7101","weight":500,"state":"up","report_age_ms":120}],
//!   "balancers":["127.0.0.1:7000"]}"#).unwrap();
//! assert_eq!(list.servers[0].state, InstanceState::Up);
//! assert!(list.validate().is_ok());
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The largest weight a balancer publishes.
pub const MAX_WEIGHT: u32 = 10_000;
/// Largest server-list or pick body a client accepts, in bytes: room for the largest list a balancer can
/// publish (`MAX_SERVERS` entries of the longest id and address; a test builds it), which at 1 MiB did not
/// fit, so a large enough table had every client refuse its lists.
pub const MAX_LIST_BYTES: usize = 2 * 1024 * 1024;
/// Most servers one list may hold.
pub const MAX_SERVERS: usize = 4096;
/// Most balancers one list may name.
pub const MAX_BALANCERS: usize = 64;

/// An instance's state in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Fresh report, ready, full weight.
    Up,
    /// New or recovered: weight ramping up.
    SlowStart,
    /// Drained by an operator: no new picks.
    Drained,
    /// Not ready, or its report is stale: no picks.
    Down,
}

/// `GET /v1/servers?type=T[&watch=VERSION]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    pub request_type: String,
    /// Changes whenever the table for this type changes; equal tables have equal versions.
    pub version: u64,
    /// How long a client that polls (without `watch`) may use this list before asking again. The SDK
    /// watches instead, so its list is as fresh as its watch; its own `max_staleness` bounds how long it
    /// uses one no balancer vouches for.
    pub ttl_ms: u64,
    pub servers: Vec<ServerEntry>,
    /// API addresses of every balancer (`ip:port`), so a client learns its peers.
    pub balancers: Vec<String>,
    /// Whether the balancer has applied no report since it started, so an empty list says nothing of the
    /// instances: a client keeps the entries it has then, and takes an empty list from a balancer that has
    /// heard its agents as the truth (every instance of the type is gone). Absent from a balancer of an
    /// earlier build: read as warming, as clients did before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warming: Option<bool>,
}

/// One instance in a server list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEntry {
    pub id: String,
    /// Where to connect, `ip:port`.
    pub addr: String,
    /// Relative weight, 0..=MAX_WEIGHT; 0 means "do not pick".
    pub weight: u32,
    pub state: InstanceState,
    /// Age of the report this entry came from, in milliseconds.
    pub report_age_ms: u64,
}

/// `GET /v1/pick?type=T`: one instance to connect to now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    pub request_type: String,
    pub version: u64,
    pub id: String,
    pub addr: String,
}

/// `GET /v1/status`: the balancer's whole view, for the monitor's dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct LbStatus {
    /// This balancer's API address.
    pub balancer: String,
    /// Version of the whole table (all types).
    pub version: u64,
    pub types: Vec<String>,
    pub instances: Vec<InstanceStatus>,
    /// Reports accepted, and rejected by reason.
    pub reports_accepted: u64,
    pub reports_rejected: BTreeMap<String, u64>,
    /// The L4 proxy's counters per listener and per backend (empty lists without a proxy).
    pub proxy: ProxyStatus,
    /// The instance ids drained on this balancer, reported or not: a balancer that starts takes its peers'
    /// so that a drain outlives its restart.
    pub drained: Vec<String>,
    /// The weights set at run time on this balancer (`xcluster ctl weight`), by instance id or proxy
    /// backend address, as [`WeightSet`] writes them: a starting balancer takes its peers', as it takes
    /// their drains.
    pub weights: BTreeMap<String, String>,
    /// When `drained` or `weights` last changed by an operator's call (Unix time, ms; 0: never, or a balancer
    /// older than this field), carried along when a balancer restores them from its state file or a peer.
    /// A starting balancer keeps the newest of its file's and its peers' (ARCHITECTURE.md, lb: directory).
    pub state_changed_unix_ms: u64,
}

/// The L4 proxy's counters, the same values `/metrics` shows, for the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxyStatus {
    /// By name.
    pub listeners: Vec<ProxyListenerStatus>,
    /// By address.
    pub backends: Vec<ProxyBackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxyListenerStatus {
    pub name: String,
    /// The address it listens on (empty from a balancer that does not say).
    pub addr: String,
    /// The request type it routes by.
    pub request_type: String,
    pub active: u64,
    /// Its own `max_connections`; 0: only the proxy-wide limit.
    pub max_connections: u64,
    pub accepted: u64,
    /// Connections closed because no backend could be reached.
    pub failed: u64,
    /// Connections closed at accept: their client held `max_connections_per_client` already, or was over its
    /// `max_connection_rate_per_client`.
    pub rejected: u64,
    /// Connections closed at accept: the listener's `allow`/`deny` keep their client out.
    pub denied: u64,
    /// Connections closed without a valid PROXY header (`accept_proxy`).
    pub header_errors: u64,
    /// Connections its `sni` sent to the type their TLS server name maps to (the others went to its own).
    pub sni_routed: u64,
    /// Connect attempts beyond the first (redispatch).
    pub retries: u64,
    /// Clients of its request types (its own and those of its `sni`) waiting for a place now (every backend
    /// at its `max_connections`; HAProxy's "Queue Cur"); listeners of one type share their queue.
    pub waiting: u64,
    /// Its clients that have had to wait for a place, in all (`xcluster_lb_proxy_connections_queued_total`).
    pub queued: u64,
    /// Times its accepts waited for its `max_connection_rate` (`xcluster_lb_proxy_rate_waits_total`).
    pub rate_waits: u64,
    /// Accepts that failed (out of descriptors or memory; the accept loop backs off and goes on).
    pub accept_errors: u64,
    pub idle_timeouts: u64,
    /// Established connections ended by a socket error on the client's side (HAProxy's `cli_abrt`), and on
    /// the backend's (`srv_abrt`).
    pub client_errors: u64,
    pub backend_errors: u64,
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    /// Its address could not be bound when a reload added it (in use by another process): the balancer
    /// retries every second, and nothing is accepted on it meanwhile.
    pub unbound: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxyBackendStatus {
    pub addr: String,
    pub active: u64,
    pub connects: u64,
    pub connect_failures: u64,
    /// Its failed health checks, in all (HAProxy's `chkfail`).
    pub check_failures: u64,
    /// Times it was passed over for being at its `max_connections`.
    pub full: u64,
    /// Established connections closed because its checks put it down (`close_on_down`).
    pub closed_on_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Its last connect failed: it is held out of the picks until its hold ends and a connect succeeds.
    pub failing: bool,
    /// A backup (`backup = true`): picked only while no other backend of its request type can be.
    pub backup: bool,
    /// Its `max_connections`; 0: no cap.
    pub max_connections: u64,
    /// Its configured `weight` (0: drained, HAProxy's "drain": no new connections); `None` for an instance
    /// the directory routes to, whose weights are the directory's.
    pub weight: Option<u64>,
    /// Drained at run time, by its address or its instance's id (`xcluster ctl drain`): no new connections
    /// until undrained, whatever its `weight`.
    pub drained: bool,
    /// Its weight as set at run time (`xcluster ctl weight`), which `weight` is the configured one beneath.
    pub weight_set: Option<String>,
    /// The weight its picks use (HAProxy's effective weight): `weight` with `weight_set` applied, 0 while
    /// drained; `None` where `weight` is.
    pub effective_weight: Option<u64>,
}

/// One instance as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceStatus {
    pub id: String,
    pub addr: String,
    pub state: Option<InstanceState>,
    pub report_age_ms: u64,
    /// Host CPU utilisation, 0..=1.
    pub cpu: f64,
    /// Host memory utilisation, 0..=1.
    pub mem: f64,
    /// In flight + queued over capacity, 0..=1 (may exceed 1 when overloaded).
    pub queue: f64,
    /// Weight per request type.
    pub weights: BTreeMap<String, u32>,
    /// The smoothed mean service time per request type, in milliseconds, that the weight compares with its
    /// peers' (absent for a type without recent requests).
    pub service_ms: BTreeMap<String, f64>,
    /// The share of its load-driven weight it is given, set at run time (`xcluster ctl weight ID 10%`).
    pub weight_set: Option<String>,
}

/// Largest percentage a run-time weight may scale a weight by.
pub const MAX_WEIGHT_PERCENT: u32 = 1000;
/// Largest weight a proxy backend may be set to at run time (as its configured `weight`).
pub const MAX_BACKEND_WEIGHT: u32 = 1_000_000;

/// A weight set at run time on a server, HAProxy's `set server weight`: a percentage of the weight it would
/// have (its configured weight, or the load-driven weight the directory gives an instance), or, for a
/// `[[proxy.backends]]` entry, a weight of its own in place of the configured one. Written `50%` or `7`.
///
/// ```
/// use xcluster_proto::directory::WeightSet;
/// let w: WeightSet = "25%".parse().unwrap();
/// assert_eq!(w, WeightSet::Percent(25));
/// assert_eq!(w.apply(200), 50);
/// assert_eq!("7".parse::<WeightSet>().unwrap().apply(200), 7);
/// assert!("-1".parse::<WeightSet>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightSet {
    /// Of the weight it would have, 0..=[`MAX_WEIGHT_PERCENT`]. `100%` is no change.
    Percent(u32),
    /// In place of its configured weight, 0..=[`MAX_BACKEND_WEIGHT`]; proxy backends only.
    Absolute(u32),
}

impl WeightSet {
    /// The weight a server of weight `weight` gets. A percentage that is not 0 leaves a server that had a
    /// weight at least 1, so a small share never rounds to a drain.
    pub fn apply(self, weight: u32) -> u32 {
        match self {
            WeightSet::Absolute(w) => w,
            WeightSet::Percent(p) => {
                let scaled = u64::from(weight) * u64::from(p) / 100;
                let floor = u64::from(p > 0 && weight > 0);
                u32::try_from(scaled.max(floor)).unwrap_or(u32::MAX)
            }
        }
    }

    /// Whether it leaves every weight as it is (`100%`): setting it clears what was set.
    pub fn is_neutral(self) -> bool {
        self == WeightSet::Percent(100)
    }
}

/// What an operator asks of a server on every balancer (`xcluster ctl drain|undrain|weight`), as the path
/// under its id: `POST /v1/servers/{id}/drain`, `/undrain` or `/weight/{value}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAction {
    /// Drain (`true`) or undrain.
    Drain(bool),
    Weight(WeightSet),
}

impl ServerAction {
    /// The path under the server's id, percent-encoded (`weight/50%25`).
    pub fn path(self) -> String {
        match self {
            ServerAction::Drain(true) => "drain".into(),
            ServerAction::Drain(false) => "undrain".into(),
            ServerAction::Weight(w) => format!("weight/{}", w.to_string().replace('%', "%25")),
        }
    }

    /// What was done, for people: `drained`, `undrained`, `weight 50%`.
    pub fn done(self) -> String {
        match self {
            ServerAction::Drain(true) => "drained".into(),
            ServerAction::Drain(false) => "undrained".into(),
            ServerAction::Weight(w) => format!("weight {w}"),
        }
    }
}

impl std::fmt::Display for WeightSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightSet::Percent(p) => write!(f, "{p}%"),
            WeightSet::Absolute(w) => write!(f, "{w}"),
        }
    }
}

impl std::str::FromStr for WeightSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "weight {:?}: a percentage 0% to {MAX_WEIGHT_PERCENT}% of the weight it would have, or a proxy \
                 backend's own weight 0 to {MAX_BACKEND_WEIGHT}",
                s.chars().take(32).collect::<String>()
            )
        };
        let digits = |d: &str| -> Result<u32, String> {
            if d.is_empty() || d.len() > 7 || !d.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            d.parse().map_err(|_| bad())
        };
        match s.trim().strip_suffix('%') {
            Some(p) => Some(digits(p)?)
                .filter(|&p| p <= MAX_WEIGHT_PERCENT)
                .map(WeightSet::Percent),
            None => Some(digits(s.trim())?)
                .filter(|&w| w <= MAX_BACKEND_WEIGHT)
                .map(WeightSet::Absolute),
        }
        .ok_or_else(bad)
    }
}

/// Why a directory answer was refused by a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("server list larger than {MAX_LIST_BYTES} bytes")]
    TooLarge,
    #[error("malformed server list: {0}")]
    Malformed(String),
}

impl ServerList {
    /// Decodes and validates a server-list body.
    pub fn decode(body: &[u8]) -> Result<Self, ListError> {
        if body.len() > MAX_LIST_BYTES {
            return Err(ListError::TooLarge);
        }
        let list: ServerList =
            serde_json::from_slice(body).map_err(|e| ListError::Malformed(e.to_string()))?;
        list.validate()?;
        Ok(list)
    }

    /// Checks sizes, ids, addresses and weights, as a balancer checks the reports its lists come from: an
    /// id of `report::valid_id`'s characters (it reaches the caller's logs and errors), an address one can
    /// connect to (not `0.0.0.0`, `[::]` or port 0: the client would connect to its own host).
    pub fn validate(&self) -> Result<(), ListError> {
        let bad = |m: String| Err(ListError::Malformed(m));
        if self.servers.len() > MAX_SERVERS || self.balancers.len() > MAX_BALANCERS {
            return bad("too many servers or balancers".into());
        }
        for s in &self.servers {
            if !crate::report::valid_id(&s.id) {
                return bad(format!(
                    "server id {:?} {}",
                    crate::report::shown(&s.id),
                    crate::report::ID_RULE
                ));
            }
            if !s
                .addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(crate::report::usable_addr)
            {
                return bad(format!(
                    "server {:?} has an invalid addr {:?}",
                    s.id,
                    crate::report::shown(&s.addr)
                ));
            }
            if s.weight > MAX_WEIGHT {
                return bad(format!(
                    "server {:?} weight {} above {MAX_WEIGHT}",
                    s.id, s.weight
                ));
            }
        }
        for b in &self.balancers {
            if b.parse::<std::net::SocketAddr>().is_err() {
                return bad(format!("invalid balancer addr {b:?}"));
            }
        }
        Ok(())
    }
}

impl Pick {
    /// Decodes and validates a pick body.
    pub fn decode(body: &[u8]) -> Result<Self, ListError> {
        if body.len() > MAX_LIST_BYTES {
            return Err(ListError::TooLarge);
        }
        let pick: Pick = serde_json::from_slice(body).map_err(|e| ListError::Malformed(e.to_string()))?;
        if pick.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(ListError::Malformed(format!("invalid addr {:?}", pick.addr)));
        }
        Ok(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest list a balancer can publish is one a client takes: every entry at its longest (an id of
    /// `MAX_ID_BYTES`, a scoped IPv6 address, the longest state, the largest numbers), every balancer too.
    #[test]
    fn the_largest_list_fits() {
        let addr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535";
        assert!(addr.parse::<std::net::SocketAddr>().is_ok());
        let list = ServerList {
            request_type: "t".repeat(crate::report::MAX_ID_BYTES),
            version: u64::MAX,
            ttl_ms: u64::MAX,
            servers: (0..MAX_SERVERS)
                .map(|_| ServerEntry {
                    id: "i".repeat(crate::report::MAX_ID_BYTES),
                    addr: addr.into(),
                    weight: MAX_WEIGHT,
                    state: InstanceState::SlowStart,
                    report_age_ms: u64::MAX,
                })
                .collect(),
            balancers: vec![addr.into(); MAX_BALANCERS],
            warming: Some(false),
        };
        let body = serde_json::to_vec(&list).unwrap_or_default();
        assert!(
            body.len() > 1024 * 1024,
            "{} bytes: the worst case is not built",
            body.len()
        );
        assert_eq!(ServerList::decode(&body), Ok(list));
    }

    #[test]
    fn rejects_bad_lists() {
        let ok = r#"{"request_type":"t","version":1,"ttl_ms":1,"servers":[],"balancers":[]}"#;
        assert!(ServerList::decode(ok.as_bytes()).is_ok());
        let bad_addr = ok.replace("\"balancers\":[]", "\"balancers\":[\"x\"]");
        assert!(ServerList::decode(bad_addr.as_bytes()).is_err());
        assert_eq!(
            ServerList::decode(&vec![b' '; MAX_LIST_BYTES + 1]),
            Err(ListError::TooLarge)
        );
        assert!(Pick::decode(br#"{"request_type":"t","version":1,"id":"a","addr":"nope"}"#).is_err());
        // Servers: an id and an address as a report's.
        let server = |id: &str, addr: &str| {
            ok.replace(
                "\"servers\":[]",
                &format!(
                    r#""servers":[{{"id":"{id}","addr":"{addr}","weight":1,"state":"up","report_age_ms":0}}]"#
                ),
            )
        };
        assert!(ServerList::decode(server("h/a-1", "127.0.0.1:80").as_bytes()).is_ok());
        for (id, addr) in [
            ("h/a", "0.0.0.0:80"),
            ("h/a", "[::]:80"),
            ("h/a", "127.0.0.1:0"),
            ("h/a<b>", "127.0.0.1:80"),
            ("", "127.0.0.1:80"),
        ] {
            assert!(
                ServerList::decode(server(id, addr).as_bytes()).is_err(),
                "{id:?} at {addr}"
            );
        }
    }
}
