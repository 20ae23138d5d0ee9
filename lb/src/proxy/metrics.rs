//! Metric names of the L4 proxy, and the handles each listener and backend keeps so the hot path never looks
//! a metric up by name. Labels are bounded: listener names and backend addresses come from config (or from
//! the directory's bounded instance list).

use std::net::SocketAddr;

use metrics::{Counter, Gauge, Histogram};

pub const ACCEPTED_TOTAL: &str = "xcluster_lb_proxy_connections_accepted_total";
pub const ACTIVE: &str = "xcluster_lb_proxy_connections_active";
/// Connections closed because no backend could be reached.
pub const FAILED_TOTAL: &str = "xcluster_lb_proxy_connections_failed_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "xcluster_lb_proxy_accept_errors_total";
pub const IDLE_TIMEOUTS_TOTAL: &str = "xcluster_lb_proxy_idle_timeouts_total";
/// Connect attempts beyond the first (redispatch to another backend).
pub const RETRIES_TOTAL: &str = "xcluster_lb_proxy_retries_total";
/// Bytes by `direction`: `up` is client to backend, `down` backend to client.
pub const LISTENER_BYTES_TOTAL: &str = "xcluster_lb_proxy_listener_bytes_total";
pub const BACKEND_CONNECTS_TOTAL: &str = "xcluster_lb_proxy_backend_connects_total";
pub const BACKEND_CONNECT_FAILURES_TOTAL: &str = "xcluster_lb_proxy_backend_connect_failures_total";
pub const BACKEND_ACTIVE: &str = "xcluster_lb_proxy_backend_connections_active";
pub const BACKEND_BYTES_TOTAL: &str = "xcluster_lb_proxy_backend_bytes_total";
pub const BACKEND_CONNECT_SECONDS: &str = "xcluster_lb_proxy_backend_connect_seconds";
/// Worker threads, labelled with the `runtime` they run (after any fallback from `io_uring`).
pub const WORKERS: &str = "xcluster_lb_proxy_workers";
/// Receives of the io_uring runtime that found every provided buffer in use and waited for one.
pub const BUFFER_WAITS_TOTAL: &str = "xcluster_lb_proxy_buffer_waits_total";
/// Receives of the io_uring runtime paused because their direction's destination is not keeping up.
pub const RECEIVE_PAUSES_TOTAL: &str = "xcluster_lb_proxy_receive_pauses_total";
/// Provided buffers of the io_uring runtime holding bytes received and not yet sent on, over all workers.
pub const BUFFERS_HELD: &str = "xcluster_lb_proxy_buffers_held";
pub const LISTENER_BIND_FAILURES_TOTAL: &str = "xcluster_lb_proxy_listener_bind_failures_total";

/// Handles for one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    pub failed: Counter,
    pub accept_errors: Counter,
    pub idle_timeouts: Counter,
    pub retries: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let l = listener.to_string();
        Self {
            accepted: metrics::counter!(ACCEPTED_TOTAL, "listener" => l.clone()),
            active: metrics::gauge!(ACTIVE, "listener" => l.clone()),
            failed: metrics::counter!(FAILED_TOTAL, "listener" => l.clone()),
            accept_errors: metrics::counter!(ACCEPT_ERRORS_TOTAL, "listener" => l.clone()),
            idle_timeouts: metrics::counter!(IDLE_TIMEOUTS_TOTAL, "listener" => l.clone()),
            retries: metrics::counter!(RETRIES_TOTAL, "listener" => l.clone()),
            bytes_up: metrics::counter!(LISTENER_BYTES_TOTAL, "listener" => l.clone(), "direction" => "up"),
            bytes_down: metrics::counter!(LISTENER_BYTES_TOTAL, "listener" => l, "direction" => "down"),
        }
    }
}

/// Handles for one backend.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connects: Counter,
    pub connect_failures: Counter,
    pub active: Gauge,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub connect_seconds: Histogram,
}

impl BackendMetrics {
    /// Counts a successful connect begun at `started`.
    pub fn connected(&self, started: std::time::Instant) {
        self.connects.increment(1);
        self.connect_seconds.record(started.elapsed().as_secs_f64());
    }

    pub fn new(addr: SocketAddr) -> Self {
        let b = addr.to_string();
        Self {
            connects: metrics::counter!(BACKEND_CONNECTS_TOTAL, "backend" => b.clone()),
            connect_failures: metrics::counter!(BACKEND_CONNECT_FAILURES_TOTAL, "backend" => b.clone()),
            active: metrics::gauge!(BACKEND_ACTIVE, "backend" => b.clone()),
            bytes_up: metrics::counter!(BACKEND_BYTES_TOTAL, "backend" => b.clone(), "direction" => "up"),
            bytes_down: metrics::counter!(BACKEND_BYTES_TOTAL, "backend" => b.clone(), "direction" => "down"),
            connect_seconds: metrics::histogram!(BACKEND_CONNECT_SECONDS, "backend" => b),
        }
    }
}
