//! The agent's configuration: raw serde form, validation, typed form.
//!
//! Reloads live: `log.level`, `shutdown.*`, `balancers`, `key`/`key_file`, `interval_ms`,
//! `sample_ms`, `timeout_ms`, `instances`. Needs a restart: `listen`, `http.*`, `agent_id` (sequence numbers are per
//! agent id).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_proto::report;
use xcluster_runtime::common::{HttpSection, LogSection, ShutdownSection, ShutdownTimes};
use xcluster_runtime::config::HmacKey;
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

/// Most instances one agent reports (the report format's own bound).
pub const MAX_INSTANCES: usize = xcluster_proto::report::MAX_INSTANCES;

/// The file-facing config (`role = "agent"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the agent's HTTP API (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    /// The agent's id in reports; empty means the host name.
    pub agent_id: String,
    /// API addresses of every balancer to push reports to.
    pub balancers: Vec<String>,
    /// The shared HMAC key, inline (prefer `key_file`).
    pub key: String,
    /// A file holding the shared HMAC key (surrounding whitespace is ignored; keep it mode 600).
    pub key_file: String,
    /// How often a report is pushed to every balancer.
    pub interval_ms: u64,
    /// How often instances are sampled between reports, to send at once when a figure jumps.
    pub sample_ms: u64,
    /// Timeout of each stats fetch and each push.
    pub timeout_ms: u64,
    pub instances: Vec<RawInstance>,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
    /// `[http]`: the API server's limits (connections, header timeout and size, declared body size).
    pub http: HttpSection,
}

/// `[[instances]]`: one app instance on this host.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RawInstance {
    /// Cluster-unique id, e.g. `host-a/app-1`.
    pub id: String,
    /// Where clients connect, `ip:port`.
    pub addr: String,
    /// The instance's stats endpoint; default `http://{addr}/v1/stats`.
    pub stats_url: String,
    /// A file holding the instance's pid, to report its own CPU and RSS (optional).
    pub pid_file: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7200".into(),
            agent_id: String::new(),
            balancers: vec!["127.0.0.1:7000".into()],
            key: String::new(),
            key_file: String::new(),
            interval_ms: 500,
            sample_ms: 100,
            timeout_ms: 300,
            instances: Vec::new(),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
            http: HttpSection::default(),
        }
    }
}

/// One validated instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    pub id: String,
    pub addr: SocketAddr,
    /// Where to `GET` the stats: address and path.
    pub stats_addr: SocketAddr,
    pub stats_path: String,
    pub pid_file: Option<PathBuf>,
}

/// The validated config.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub agent_id: String,
    pub balancers: Vec<SocketAddr>,
    pub key: HmacKey,
    pub interval: Duration,
    pub sample: Duration,
    pub timeout: Duration,
    pub instances: Vec<InstanceConfig>,
    pub log_filter: String,
    pub shutdown: ShutdownTimes,
    /// The API server's limits (`[http]`, with `[shutdown]`'s grace period).
    pub http: xcluster_runtime::http::ServerLimits,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log.
        f.debug_struct("Config")
            .field("agent_id", &self.agent_id)
            .field("balancers", &self.balancers)
            .field("instances", &self.instances)
            .finish_non_exhaustive()
    }
}

impl RoleConfig for Config {
    const ROLE: &'static str = "agent";
    type Raw = RawConfig;
    const RESTART_KEYS: &'static [&'static str] = &["listen", "agent_id", "http"];

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        let agent_id = if raw.agent_id.is_empty() {
            host_name()
        } else {
            raw.agent_id.clone()
        };
        v.check(report::valid_id(&agent_id), "agent_id", || {
            format!("{agent_id:?} {}", report::ID_RULE)
        });
        v.check(!raw.balancers.is_empty(), "balancers", || {
            "at least one balancer is required: with none, no report goes anywhere".into()
        });
        v.check(raw.balancers.len() <= 64, "balancers", || {
            "at most 64 balancers".into()
        });
        let balancers: Vec<SocketAddr> = raw
            .balancers
            .iter()
            .enumerate()
            .map(|(i, b)| v.addr(&format!("balancers[{i}]"), b))
            .collect();
        for (i, b) in balancers.iter().enumerate() {
            v.check(!balancers[..i].contains(b), &format!("balancers[{i}]"), || {
                format!("{b} is listed twice: it would get every report twice")
            });
        }
        let key = v.key("", &raw.key, &raw.key_file);
        let interval = v.millis("interval_ms", raw.interval_ms, 50, 60_000);
        let sample = v.millis("sample_ms", raw.sample_ms, 10, 60_000);
        let timeout = v.millis("timeout_ms", raw.timeout_ms, 10, 60_000);
        v.check(raw.instances.len() <= MAX_INSTANCES, "instances", || {
            format!("at most {MAX_INSTANCES} instances")
        });
        let mut instances: Vec<InstanceConfig> = Vec::new();
        for (n, i) in raw.instances.iter().enumerate() {
            let key = format!("instances[{n}]");
            v.check(report::valid_id(&i.id), &format!("{key}.id"), || {
                format!("{:?} {}", i.id, report::ID_RULE)
            });
            v.check(
                !instances.iter().any(|o| o.id == i.id),
                &format!("{key}.id"),
                || format!("{:?} is repeated", i.id),
            );
            let addr = v.addr(&format!("{key}.addr"), &i.addr);
            v.check(report::usable_addr(addr), &format!("{key}.addr"), || {
                format!("{addr} {}", report::ADDR_RULE)
            });
            let (stats_addr, stats_path) = if i.stats_url.is_empty() {
                (addr, "/v1/stats".to_string())
            } else {
                match parse_http_url(&i.stats_url) {
                    Some(p) => p,
                    None => {
                        v.error(
                            format!("{key}.stats_url"),
                            format!("{:?} is not http://IP:PORT/PATH", i.stats_url),
                        );
                        (addr, String::new())
                    }
                }
            };
            instances.push(InstanceConfig {
                id: i.id.clone(),
                addr,
                stats_addr,
                stats_path,
                pid_file: (!i.pid_file.is_empty()).then(|| PathBuf::from(&i.pid_file)),
            });
        }
        raw.log.validate(&mut v);
        let shutdown = raw.shutdown.validate(&mut v);
        let http = raw.http.validate(&mut v, shutdown.grace);
        v.finish(Config {
            listen,
            agent_id,
            balancers,
            key,
            interval,
            sample,
            timeout,
            instances,
            log_filter: raw.log.level.clone(),
            shutdown,
            http,
        })
    }

    fn redact(raw: &mut RawConfig) {
        if !raw.key.is_empty() {
            raw.key = "<redacted>".into();
        }
    }
}

/// `http://IP:PORT/PATH` → (address, path). Only literal addresses: the agent does no DNS.
pub fn parse_http_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority.parse().ok()?;
    (path.len() <= 1024 && !path.contains(char::is_whitespace)).then(|| (addr, path.to_string()))
}

/// The host name, from the kernel, as it was at the first ask: `agent_id` needs a restart, and an empty one
/// read the name again at each reload's validation, so a host renamed while its agent ran changed the id
/// its reports carry (and the balancers took it for a new agent, its instances for new ones).
fn host_name() -> String {
    static AT_START: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    AT_START
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().chars().take(64).collect())
                .unwrap_or_else(|_| "localhost".into())
        })
        .clone()
}

impl DaemonConfig for Config {
    fn shutdown(&self) -> ShutdownTimes {
        self.shutdown
    }
    fn log_filter(&self) -> &str {
        &self.log_filter
    }
    fn descriptors(&self) -> u64 {
        self.http.max_connections as u64 + xcluster_runtime::limits::BASE_DESCRIPTORS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (a, p) = parse_http_url("http://127.0.0.1:7101/v1/stats").unwrap_or_else(|| unreachable!());
        assert_eq!((a.port(), p.as_str()), (7101, "/v1/stats"));
        assert!(parse_http_url("https://127.0.0.1:1/").is_none());
        assert!(parse_http_url("http://localhost:1/").is_none());
    }

    #[test]
    fn an_agent_needs_a_balancer() {
        let raw = RawConfig {
            balancers: Vec::new(),
            ..RawConfig::default()
        };
        let issues = Config::validate(&raw).err().unwrap_or_default();
        assert!(
            issues
                .iter()
                .any(|i| i.to_string().contains("at least one balancer")),
            "{issues:?}"
        );
    }
}
