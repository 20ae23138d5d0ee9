//! Metric names of the app (one place, so dashboards and tests agree).

xcluster_runtime::metric_names! {
    /// Requests by `type` (browse, order, seckill, pay, admin) and `outcome` (ok, client_error, server_error).
    pub const REQUESTS_TOTAL: &str = "xcluster_app_requests_total";
    /// Orders created (not replays), by `level`.
    pub const ORDERS_CREATED_TOTAL: &str = "xcluster_app_orders_created_total";
    /// Requests refused early by the sold-out gate.
    pub const SOLD_OUT_GATE_TOTAL: &str = "xcluster_app_sold_out_gate_total";
    /// SQLite writes that found the file's write lock held by another process and waited for it.
    pub const STORE_LOCK_WAITS_TOTAL: &str = "xcluster_app_store_lock_waits_total";
    /// WAL frames left after the last background checkpoint (SQLite).
    pub const STORE_WAL_FRAMES: &str = "xcluster_app_store_wal_frames";
    /// Store calls that failed, by `retryable`.
    pub const STORE_ERRORS_TOTAL: &str = "xcluster_app_store_errors_total";
    /// Reservations expired by this process's sweeper.
    pub const RESERVATIONS_EXPIRED_TOTAL: &str = "xcluster_app_reservations_expired_total";
    /// Outbox items run by this process's workers.
    pub const OUTBOX_RUN_TOTAL: &str = "xcluster_app_outbox_run_total";
    /// Pending outbox items (sampled).
    pub const OUTBOX_DEPTH: &str = "xcluster_app_outbox_depth";
    /// Current degrade level (0 sync, 1 queued, 2 shed, 3 read_only).
    pub const DEGRADE_LEVEL: &str = "xcluster_app_degrade_level";
    /// Orders committed per group commit at the queued level.
    pub const BATCH_SIZE: &str = "xcluster_app_batch_orders";
    /// Redis gate answers, by `answer` (taken, pass, sold_out, over_limit, error) — issue 8.
    pub const REDIS_GATE_TOTAL: &str = "xcluster_app_redis_gate_total";
    /// Background audits that found an invariant breach.
    pub const AUDIT_FAILURES_TOTAL: &str = "xcluster_app_audit_failures_total";
    /// Payment callbacks refused for their signature (`payment_callback_secret`): missing, stale or wrong.
    pub const CALLBACKS_REFUSED_TOTAL: &str = "xcluster_app_payment_callbacks_refused_total";
}

/// The counters without labels, registered at 0 when the app starts: an alert on one (a rate, an audit
/// failure) has a series to read before the first event.
pub const UNLABELLED_COUNTERS: [&str; 6] = [
    SOLD_OUT_GATE_TOTAL,
    STORE_LOCK_WAITS_TOTAL,
    RESERVATIONS_EXPIRED_TOTAL,
    OUTBOX_RUN_TOTAL,
    AUDIT_FAILURES_TOTAL,
    CALLBACKS_REFUSED_TOTAL,
];
