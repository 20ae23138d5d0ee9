//! Config sections every role shares, so the keys read the same everywhere.

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

/// `[shutdown]`: how long SIGTERM lets in-flight work finish. Reloads live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    pub grace_ms: u64,
}

impl Default for ShutdownSection {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

impl ShutdownSection {
    pub fn validate(&self, v: &mut Validator) -> std::time::Duration {
        v.millis("shutdown.grace_ms", self.grace_ms, 0, 3_600_000)
    }
}
