//! The agent's configuration: raw serde form, validation, typed form.
//!
//! Reloads live: `log.level`, `shutdown.grace_ms`. Needs a restart: `listen`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::common::{LogSection, ShutdownSection};
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

/// The file-facing config (`role = "agent"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the agent's HTTP API (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7200".into(),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
        }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub log_filter: String,
    pub grace: Duration,
}

impl RoleConfig for Config {
    const ROLE: &'static str = "agent";
    type Raw = RawConfig;

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        raw.log.validate(&mut v);
        let grace = raw.shutdown.validate(&mut v);
        v.finish(Config {
            listen,
            log_filter: raw.log.level.clone(),
            grace,
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
