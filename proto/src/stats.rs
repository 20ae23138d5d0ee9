//! The contract between an app instance and its host's agent: `GET /v1/stats` on the app returns an
//! [`InstanceStats`] as JSON. The agent turns it into the instance part of a load report. Unknown fields are
//! ignored so an app may be upgraded before its agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest stats body an agent accepts, in bytes.
pub const MAX_STATS_BYTES: usize = 64 * 1024;
/// Most request types an instance may report.
pub const MAX_REQUEST_TYPES: usize = 32;
/// The highest request rate (per second) and mean service time (ms) a figure may carry: far beyond any real
/// instance, and low enough that a balancer's smoothing of them (rate × window × service time, summed over
/// reports) stays finite. Unbounded, two reports of `1.7e308` made a smoothed service time NaN, and with it
/// the reference the other instances' weights are judged by.
pub const MAX_RATE: f64 = 1e9;
pub const MAX_SERVICE_MS: f64 = 86_400_000.0;

/// Whether a per-type figure is in range: rate and service time finite, non-negative and within
/// [`MAX_RATE`] and [`MAX_SERVICE_MS`], the error rate a fraction.
pub fn type_figures_ok(t: &TypeStats) -> bool {
    let within = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
    within(t.rate, MAX_RATE) && within(t.service_ms, MAX_SERVICE_MS) && within(t.error_rate, 1.0)
}

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
        for (name, value, max) in [
            ("request_rate", self.request_rate, MAX_RATE),
            ("error_rate", self.error_rate, 1.0),
        ] {
            if !value.is_finite() || !(0.0..=max).contains(&value) {
                return bad(name, format!("{value} is not a finite number in 0..={max}"));
            }
        }
        for (name, t) in &self.types {
            if name.is_empty() || name.len() > 64 {
                return bad("types", format!("type name {name:?} not 1..=64 bytes"));
            }
            if !type_figures_ok(t) {
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
        s.error_rate = 0.0;
        s.request_rate = MAX_RATE * 2.0;
        assert!(s.validate().is_err());
        s.request_rate = MAX_RATE;
        let huge = TypeStats {
            rate: 1.7e308,
            service_ms: 1.0,
            error_rate: 0.0,
        };
        s.types.insert("browse".into(), huge);
        assert!(s.validate().is_err());
        s.types.get_mut("browse").unwrap().rate = MAX_RATE;
        assert!(s.validate().is_ok());
        s.types.get_mut("browse").unwrap().service_ms = MAX_SERVICE_MS + 1.0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn newer_fields_are_ignored() {
        // An app newer than its agent may add figures; the agent must keep working (version skew).
        let r: InstanceStats = serde_json::from_str(r#"{"instance":"a","ready":true,"future":1}"#).unwrap();
        assert!(r.ready);
    }
}
