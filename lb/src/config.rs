//! The lb's configuration: raw serde form, validation, typed form.
//!
//! Reloads live: `log.level`, `shutdown.grace_ms`, and the `[proxy]` keys listed in `crate::proxy::config`.
//! Needs a restart: `listen`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::common::{LogSection, ShutdownSection};
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

/// The file-facing config (`role = "lb"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the lb's HTTP API (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
    /// `[proxy]`: the layer-4 proxy mode (issue 5); see `crate::proxy::config` for the keys that reload.
    pub proxy: crate::proxy::ProxySection,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7000".into(),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
            proxy: crate::proxy::ProxySection::default(),
        }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub log_filter: String,
    pub grace: Duration,
    /// The L4 proxy (issue 5).
    pub proxy: crate::proxy::ProxyConfig,
}

impl RoleConfig for Config {
    const ROLE: &'static str = "lb";
    type Raw = RawConfig;

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        raw.log.validate(&mut v);
        let grace = raw.shutdown.validate(&mut v);
        let proxy = raw.proxy.validate(&mut v);
        v.finish(Config {
            listen,
            log_filter: raw.log.level.clone(),
            grace,
            proxy,
        })
    }
}

impl DaemonConfig for Config {
    fn grace(&self) -> Duration {
        self.grace
    }
    fn log_filter(&self) -> &str {
        &self.log_filter
    }
}
