//! The contract between an app instance and its host's agent: `GET /v1/stats` on the app returns an
//! [`InstanceStats`] as JSON. The agent turns it into the instance part of a load report. Unknown fields are
//! ignored so an app may be upgraded before its agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest stats body an agent accepts, in bytes.
pub const MAX_STATS_BYTES: usize = 64 * 1024;
/// Most request types an instance may report.
pub const MAX_REQUEST_TYPES: usize = 32;

/// What an app instance says about itself, sampled when asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceStats {
    /// The instance's own id (e.g. `app-1`), stable across restarts.
    pub instance: String,
    /// Whether the instance accepts work now (`/readyz` says the same).
    pub ready: bool,
    /// Requests being processed now.
    pub in_flight: u32,
    /// Requests waiting for a worker (or queued orders awaiting persistence).
    pub queued: u32,
    /// How many requests the instance can hold (in flight + queued) before it sheds load.
    pub capacity: u32,
    /// Depth of the durable order/outbox queue.
    pub queue_depth: u64,
    /// Requests completed per second over the last sampling window.
    pub request_rate: f64,
    /// Fraction (0..=1) of requests that failed on the server side over the window.
    pub error_rate: f64,
    /// Per request type (`browse`, `order`, `seckill`, `pay`, ...).
    pub types: BTreeMap<String, TypeStats>,
}

/// Per-request-type figures over the sampling window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TypeStats {
    /// Completed per second.
    pub rate: f64,
    /// Mean service time in milliseconds.
    pub service_ms: f64,
    /// Fraction (0..=1) that failed on the server side.
    pub error_rate: f64,
}

/// Why a stats document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("stats field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl InstanceStats {
    /// Checks the figures are within their ranges (an agent never forwards nonsense to a balancer).
    pub fn validate(&self) -> Result<(), StatsError> {
        let bad = |field, reason: String| Err(StatsError::Invalid { field, reason });
        if self.instance.is_empty() || self.instance.len() > 128 {
            return bad(
                "instance",
                format!("length {} not in 1..=128", self.instance.len()),
            );
        }
        if self.types.len() > MAX_REQUEST_TYPES {
            return bad(
                "types",
                format!("{} types, max {MAX_REQUEST_TYPES}", self.types.len()),
            );
        }
        for (name, value) in [
            ("request_rate", self.request_rate),
            ("error_rate", self.error_rate),
        ] {
            if !value.is_finite() || value < 0.0 {
                return bad(name, format!("{value} is not a finite non-negative number"));
            }
        }
        if self.error_rate > 1.0 {
            return bad("error_rate", format!("{} is above 1", self.error_rate));
        }
        for (name, t) in &self.types {
            if name.is_empty() || name.len() > 64 {
                return bad("types", format!("type name {name:?} not 1..=64 bytes"));
            }
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !ok(t.rate) || !ok(t.service_ms) || !ok(t.error_rate) || t.error_rate > 1.0 {
                return bad("types", format!("type {name:?} has an out-of-range figure"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range() {
        let mut s = InstanceStats {
            instance: "app-1".into(),
            ..Default::default()
        };
        assert!(s.validate().is_ok());
        s.error_rate = 1.5;
        assert!(s.validate().is_err());
        s.error_rate = f64::NAN;
        assert!(s.validate().is_err());
    }

    #[test]
    fn newer_fields_are_ignored() {
        // An app newer than its agent may add figures; the agent must keep working (version skew).
        let r: InstanceStats = serde_json::from_str(r#"{"instance":"a","ready":true,"future":1}"#).unwrap();
        assert!(r.ready);
    }
}
