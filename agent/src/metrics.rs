//! Every metric name the agent emits. Labels are bounded by the config (`balancer`, `instance_id`).

xcluster_runtime::metric_names! {
    /// Reports built (one per interval or jump).
    pub const REPORTS_TOTAL: &str = "xcluster_agent_reports_total";
    /// Reports carrying a jump (sent at once, or with the interval's report when the jump was seen just then).
    pub const JUMP_REPORTS_TOTAL: &str = "xcluster_agent_jump_reports_total";
    /// Pushes to a balancer, by `balancer` and `result` (ok, error).
    pub const PUSHES_TOTAL: &str = "xcluster_agent_pushes_total";
    /// Reports built and not sent, by `reason`: `too_large` (over the balancers' `MAX_REPORT_BYTES`: fewer
    /// instances or request types would fit), `encode`.
    pub const REPORTS_UNSENT_TOTAL: &str = "xcluster_agent_reports_unsent_total";
    /// Reports never pushed to a balancer because a newer one took their place while the push before was
    /// in flight (one push at a time per balancer: a slow or silent balancer gets the latest report next).
    pub const REPORTS_SUPERSEDED_TOTAL: &str = "xcluster_agent_reports_superseded_total";
    /// Failed stats fetches, by `instance_id`.
    pub const STATS_FAILURES_TOTAL: &str = "xcluster_agent_stats_failures_total";
    /// Host CPU utilisation in the latest sample.
    pub const HOST_CPU: &str = "xcluster_agent_host_cpu_ratio";
}
