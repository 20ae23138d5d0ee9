//! Every metric name the lb emits, in one place. Labels are bounded: `reason` by [`crate::directory::ingest::REASONS`],
//! `type` by the configured types, `instance_id` by the table (bounded by the agents and instances per report).

xcluster_runtime::metric_names! {
    /// Reports accepted.
    pub const REPORTS_ACCEPTED_TOTAL: &str = "xcluster_lb_reports_accepted_total";
    /// Reports rejected, by `reason`.
    pub const REPORTS_REJECTED_TOTAL: &str = "xcluster_lb_reports_rejected_total";
    /// Published weight of an instance for a request type (`instance_id`, `type`).
    pub const INSTANCE_WEIGHT: &str = "xcluster_lb_instance_weight";
    /// Age of an instance's latest report (`instance_id`).
    pub const INSTANCE_REPORT_AGE_SECONDS: &str = "xcluster_lb_instance_report_age_seconds";
    /// 1 while a type's list is in panic mode (equal weights), by `type`.
    pub const PANIC: &str = "xcluster_lb_panic";
    /// Instances of accepted reports left out of the table because it held `[reports] max_instances`.
    pub const INSTANCES_LEFT_OUT_TOTAL: &str = "xcluster_lb_instances_left_out_total";
    /// Instances known to the table.
    pub const INSTANCES: &str = "xcluster_lb_instances";
    /// Directory queries answered, by `endpoint` (servers, watch, pick).
    pub const QUERIES_TOTAL: &str = "xcluster_lb_directory_queries_total";
    /// Watches answered at once because `max_watches` (three quarters of `[http] max_connections`) were held.
    pub const WATCHES_UNHELD_TOTAL: &str = "xcluster_lb_directory_watches_unheld_total";
    /// Writes of `[directory] state_file` that failed (the change held in memory; the call still succeeded).
    pub const STATE_WRITE_ERRORS_TOTAL: &str = "xcluster_lb_state_write_errors_total";
}
