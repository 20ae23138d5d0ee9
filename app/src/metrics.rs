//! Metric names of the app (one place, so dashboards and tests agree).

xcluster_runtime::metric_names! {
    /// Requests by `type` (browse, order, seckill, pay, admin) and `outcome`: ok, client_error (4xx), server_error (500), or the retryable 503's reason: store_busy, overloaded, read_only.
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
    /// Seconds past its expiry of the oldest reservation still held (0 when none is overdue): how far the sweepers lag (sampled).
    pub const RESERVATIONS_OVERDUE: &str = "xcluster_app_reservations_overdue_seconds";
    /// How far the store's clock, which reservations are timed by, runs ahead of this host's (sampled; 0 on
    /// SQLite).
    pub const STORE_CLOCK_OFFSET: &str = "xcluster_app_store_clock_offset_seconds";
    /// Outbox items run by this process's workers.
    pub const OUTBOX_RUN_TOTAL: &str = "xcluster_app_outbox_run_total";
    /// Pending outbox items (sampled).
    pub const OUTBOX_DEPTH: &str = "xcluster_app_outbox_depth";
    /// Current degrade level (0 sync, 1 queued, 2 shed, 3 read_only).
    pub const DEGRADE_LEVEL: &str = "xcluster_app_degrade_level";
    /// The degrade level an operator set (`[degrade] level` or `POST /admin/degrade`; 0 sync to 3 read_only, which the breakers cannot change), or -1 when the breakers choose (`auto`).
    pub const DEGRADE_MANUAL_LEVEL: &str = "xcluster_app_degrade_manual_level";
    /// Each degrade breaker's state, by `breaker` (latency, errors, queue): 0 closed, 0.5 half-open (its trial), 1 open.
    pub const DEGRADE_BREAKER_STATE: &str = "xcluster_app_degrade_breaker_state";
    /// Times each degrade breaker opened from closed, by `breaker`: an opening the state gauge's samples miss (open for a second between two scrapes) is counted here.
    pub const DEGRADE_BREAKER_TRIPS_TOTAL: &str = "xcluster_app_degrade_breaker_trips_total";
    /// Orders committed per group commit at the queued level.
    pub const BATCH_SIZE: &str = "xcluster_app_batch_orders";
    /// Redis gate answers, by `answer` (taken, pass, sold_out, over_limit, in_flight; and error, a failed call,
    /// or busy, one not made as no connection was free within the command timeout, each also counted as pass
    /// when it was an attempt's) — issue 8.
    pub const REDIS_GATE_TOTAL: &str = "xcluster_app_redis_gate_total";
    /// Redis gate give-backs (a unit the store did not sell, a buyer's count of an ended order, units back on sale) waiting for Redis to take them: the reconciler sends them again once it answers.
    pub const REDIS_GIVE_BACKS_PENDING: &str = "xcluster_app_redis_give_backs_pending";
    /// Give-backs dropped, the oldest first, past 10,000 waiting: those buyers may be refused `limit_exceeded` until their count expires.
    pub const REDIS_GIVE_BACKS_DROPPED_TOTAL: &str = "xcluster_app_redis_give_backs_dropped_total";
    /// Background audits that found an invariant breach.
    pub const AUDIT_FAILURES_TOTAL: &str = "xcluster_app_audit_failures_total";
    /// Payment callbacks refused for their signature (`payment_callback_secret`): missing, stale or wrong.
    pub const CALLBACKS_REFUSED_TOTAL: &str = "xcluster_app_payment_callbacks_refused_total";
}

/// The counters without labels, registered at 0 when the app starts: an alert on one (a rate, an audit
/// failure) has a series to read before the first event ([`register_at_zero`]).
pub const UNLABELLED_COUNTERS: [&str; 6] = [
    SOLD_OUT_GATE_TOTAL,
    STORE_LOCK_WAITS_TOTAL,
    RESERVATIONS_EXPIRED_TOTAL,
    OUTBOX_RUN_TOTAL,
    AUDIT_FAILURES_TOTAL,
    CALLBACKS_REFUSED_TOTAL,
];

/// Puts every series whose labels are known in advance on `/metrics` at 0, so `increase()` and the alerts
/// see the first event: the unlabelled counters, each request type's every outcome, store errors both ways,
/// each breaker closed and not yet tripped, no reservation overdue. The Redis gate's answers wait for a
/// configured gate (`RedisGate::new`).
pub fn register_at_zero() {
    for name in UNLABELLED_COUNTERS {
        metrics::counter!(name).increment(0);
    }
    for retryable in ["true", "false"] {
        metrics::counter!(STORE_ERRORS_TOTAL, "retryable" => retryable).increment(0);
    }
    for ty in crate::config::REQUEST_TYPES {
        for outcome in crate::stats::OUTCOMES {
            metrics::counter!(REQUESTS_TOTAL, "type" => ty, "outcome" => outcome).increment(0);
        }
    }
    for breaker in crate::degrade::BREAKER_NAMES {
        metrics::gauge!(DEGRADE_BREAKER_STATE, "breaker" => breaker).set(0.0);
        metrics::counter!(DEGRADE_BREAKER_TRIPS_TOTAL, "breaker" => breaker).increment(0);
    }
    metrics::gauge!(RESERVATIONS_OVERDUE).set(0.0);
    metrics::gauge!(STORE_CLOCK_OFFSET).set(0.0);
}
