//! Config sections every role shares, so the keys read the same everywhere.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::Validator;

/// `[log]`: reloads live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// A `tracing` env-filter such as `info` or `info,xcluster_lb=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self { level: "info".into() }
    }
}

impl LogSection {
    pub fn validate(&self, v: &mut Validator) {
        if let Err(e) = crate::telemetry::check_filter(&self.level) {
            v.error("log.level", e);
        }
    }
}

/// `[shutdown]`: what SIGTERM does. Reloads live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    /// How long in-flight work may finish once the drain begins.
    pub grace_ms: u64,
    /// How long the daemon reports not ready (`/readyz` 503; an app's stats say so to the agent) while it
    /// still serves everything, before the drain begins: long enough for what sends it work (balancers'
    /// weights fed by agent reports, health checks) to stop, so no client meets a closing port (HAProxy's
    /// global `grace`). 0: the drain begins at once.
    pub deregister_ms: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            grace_ms: 10_000,
            deregister_ms: 0,
        }
    }
}

/// `[shutdown]`, validated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownTimes {
    pub grace: std::time::Duration,
    pub deregister: std::time::Duration,
}

impl ShutdownSection {
    pub fn validate(&self, v: &mut Validator) -> ShutdownTimes {
        ShutdownTimes {
            grace: v.millis("shutdown.grace_ms", self.grace_ms, 0, 3_600_000),
            deregister: v.millis("shutdown.deregister_ms", self.deregister_ms, 0, 60_000),
        }
    }
}

/// `[http]`: the limits of the role's HTTP server (see [`crate::http::ServerLimits`]). Needs a restart: the
/// server is built once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Concurrent connections; above it a new one is answered 503 `too_many_connections`.
    pub max_connections: usize,
    /// Concurrent connections from one client address; over it a new one is answered 503. 0 (the
    /// default): a quarter of `max_connections` (at least 16, or all of a smaller cap), so one client
    /// cannot take every place, the agents' reports' and the probes' included.
    pub max_connections_per_client: usize,
    /// Time a client has to send a request's headers; a slower one (slowloris) is closed.
    pub header_read_timeout_ms: u64,
    /// A client that takes no byte of an answer for this long is closed (nginx's `send_timeout`).
    pub send_timeout_ms: u64,
    /// Largest request head; a larger one is answered 431.
    pub max_header_bytes: usize,
    /// Largest declared request body; a larger `Content-Length` is answered 413 before the body is read.
    pub max_body_bytes: usize,
    /// Host names, besides IP addresses and `localhost`, that a browser's request reaching this server on a loopback
    /// address may name in its `Host` header; any other is answered 421, so a web page re-pointed at
    /// 127.0.0.1 (DNS rebinding) cannot read this host's dashboard, logs or status. `["*"]` turns the check
    /// off. Unset: no names for the control plane (lb, agent, monitor); no check for XBuy, whose front ends
    /// call it under names of their own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for HttpSection {
    fn default() -> Self {
        let d = crate::http::ServerLimits::default();
        Self {
            max_connections: d.max_connections,
            max_connections_per_client: 0,
            header_read_timeout_ms: d.header_read_timeout.as_millis() as u64,
            send_timeout_ms: d.send_timeout.as_millis() as u64,
            max_header_bytes: d.max_header_bytes,
            max_body_bytes: d.max_body_bytes,
            allowed_hosts: None,
        }
    }
}

impl HttpSection {
    /// The server limits these keys describe, with `grace` from the `[shutdown]` section.
    pub fn validate(&self, v: &mut Validator, grace: std::time::Duration) -> crate::http::ServerLimits {
        self.validate_for(v, grace, true)
    }

    /// As [`HttpSection::validate`], for a server its clients reach through proxies (XBuy behind the L4
    /// proxy, where every proxied connection comes from a balancer's address): no per-client cap unless
    /// `max_connections_per_client` sets one.
    pub fn validate_behind_proxies(
        &self,
        v: &mut Validator,
        grace: std::time::Duration,
    ) -> crate::http::ServerLimits {
        self.validate_for(v, grace, false)
    }

    fn validate_for(
        &self,
        v: &mut Validator,
        grace: std::time::Duration,
        share: bool,
    ) -> crate::http::ServerLimits {
        let max_connections = v.range("http.max_connections", self.max_connections, 1, 1_000_000);
        let per_client = match self.max_connections_per_client {
            0 if share => (max_connections / 4).max(max_connections.min(16)),
            0 => max_connections,
            n => v.range("http.max_connections_per_client", n, 1, max_connections),
        };
        crate::http::ServerLimits {
            max_connections,
            max_connections_per_client: per_client,
            header_read_timeout: v.millis(
                "http.header_read_timeout_ms",
                self.header_read_timeout_ms,
                100,
                600_000,
            ),
            send_timeout: v.millis("http.send_timeout_ms", self.send_timeout_ms, 100, 3_600_000),
            // hyper will not buffer less than 8 KiB of head.
            max_header_bytes: v.range("http.max_header_bytes", self.max_header_bytes, 8192, 1024 * 1024),
            max_body_bytes: v.range("http.max_body_bytes", self.max_body_bytes, 1024, 64 * 1024 * 1024),
            grace,
            loopback_hosts: match &self.allowed_hosts {
                None if share => crate::http::LoopbackHosts::Named(Arc::from([])),
                None => crate::http::LoopbackHosts::Any,
                Some(names) => allowed_hosts(v, names),
            },
        }
    }
}

/// `[http] allowed_hosts`, checked: at most 64 host names (lowercased), or `"*"` alone.
fn allowed_hosts(v: &mut Validator, names: &[String]) -> crate::http::LoopbackHosts {
    const KEY: &str = "http.allowed_hosts";
    if names.iter().any(|n| n == "*") {
        v.check(names.len() == 1, KEY, || {
            "\"*\" (any host) stands alone".to_string()
        });
        return crate::http::LoopbackHosts::Any;
    }
    v.check(names.len() <= 64, KEY, || {
        format!("{} names; at most 64", names.len())
    });
    for n in names {
        let ok = crate::net::is_host_name(n);
        v.check(ok, KEY, || {
            format!("{n:?} is not a host name (letters, digits, '-', '_' and dots; no port)")
        });
    }
    crate::http::LoopbackHosts::Named(names.iter().map(|n| n.to_ascii_lowercase()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::LoopbackHosts;

    fn hosts(names: Option<&[&str]>, share: bool) -> Result<LoopbackHosts, Vec<crate::config::ConfigIssue>> {
        let s = HttpSection {
            allowed_hosts: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
            ..HttpSection::default()
        };
        let mut v = Validator::new();
        let limits = s.validate_for(&mut v, std::time::Duration::ZERO, share);
        v.finish(limits.loopback_hosts)
    }

    #[test]
    fn allowed_hosts_default_by_role_and_are_checked() {
        assert_eq!(hosts(None, true).unwrap(), LoopbackHosts::Named(Arc::from([])));
        assert_eq!(hosts(None, false).unwrap(), LoopbackHosts::Any);
        assert_eq!(hosts(Some(&["*"]), true).unwrap(), LoopbackHosts::Any);
        assert_eq!(
            hosts(Some(&["Dash.Internal"]), false).unwrap(),
            LoopbackHosts::Named(Arc::from(["dash.internal".to_string()]))
        );
        for bad in [&["*", "a"][..], &["a:80"], &[""], &["a..b"], &["http://a"]] {
            let issues = hosts(Some(bad), true).unwrap_err();
            assert_eq!(issues[0].key, "http.allowed_hosts", "{bad:?}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("h{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(hosts(Some(&many), true).is_err());
    }
}
