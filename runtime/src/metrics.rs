//! Names of the metrics the runtime itself records. Roles keep their own names in their own `metrics.rs`.

crate::metric_names! {
    /// Config reloads applied (a file change or SIGHUP whose config was valid).
    pub const CONFIG_RELOADS_TOTAL: &str = "xcluster_config_reloads_total";
    /// Config reloads rejected: the file was invalid, and the config in force was kept.
    pub const CONFIG_RELOAD_FAILURES_TOTAL: &str = "xcluster_config_reload_failures_total";
    /// 1 if the last reload was applied, 0 if it was rejected (the config in force is then older than the file).
    pub const CONFIG_LAST_RELOAD_OK: &str = "xcluster_config_last_reload_ok";
    /// 1 while the config in force changes keys that need a restart ([`crate::config::RoleConfig::RESTART_KEYS`]):
    /// the process still runs with the values it started with.
    pub const CONFIG_RESTART_PENDING: &str = "xcluster_config_restart_pending";
    /// Connections the role's HTTP API answered 503 and closed: over `[http] max_connections` or its per-client cap.
    pub const HTTP_CONNECTIONS_REJECTED_TOTAL: &str = "xcluster_http_connections_rejected_total";
    /// Accepts of the role's HTTP API that failed (out of descriptors or memory); the loop backs off and goes on.
    pub const HTTP_ACCEPT_ERRORS_TOTAL: &str = "xcluster_http_accept_errors_total";
    /// 1, labelled with the `role` and the `version` of the binary.
    pub const BUILD_INFO: &str = "xcluster_build_info";
    /// 1 while the role reports ready (`/readyz` 200), 0 while it starts or drains.
    pub const READY: &str = "xcluster_ready";
    /// Log lines dropped because the writer thread's queue was full (a stuck output never stalls the role).
    pub const LOG_LINES_DROPPED_TOTAL: &str = "xcluster_log_lines_dropped_total";
    /// Open file descriptors of the process (`/proc/self/fd`), as Prometheus client libraries name it.
    pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
    /// The process's soft open-descriptor limit (`RLIMIT_NOFILE`, raised to the hard one at start): past it
    /// accepts and connects fail with EMFILE.
    pub const PROCESS_MAX_FDS: &str = "process_max_fds";
}

/// Declares metric names, each with its doc comment, and `DESCRIPTIONS`: every name with that comment, which
/// [`crate::telemetry::describe`] makes its Prometheus `# HELP`, so the reader of the code and the reader of
/// `/metrics` get the same words. Every name needs a doc comment.
#[macro_export]
macro_rules! metric_names {
    ($( $(#[doc = $doc:literal])+ pub const $name:ident: &str = $value:literal; )+) => {
        $( $(#[doc = $doc])+ pub const $name: &str = $value; )+
        /// Every metric name above with its doc comment, for `# HELP` (`xcluster_runtime::telemetry::describe`).
        pub const DESCRIPTIONS: &[(&str, &str)] = &[$( ($value, concat!($($doc),+)) ),+];
    };
}
