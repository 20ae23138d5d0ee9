//! Names of the metrics the runtime itself records. Roles keep their own names in their own `metrics.rs`.

pub const CONFIG_RELOADS_TOTAL: &str = "xcluster_config_reloads_total";
pub const CONFIG_RELOAD_FAILURES_TOTAL: &str = "xcluster_config_reload_failures_total";
pub const CONFIG_LAST_RELOAD_OK: &str = "xcluster_config_last_reload_ok";
/// 1 while the config in force changes keys that need a restart ([`crate::config::RoleConfig::RESTART_KEYS`]):
/// the process still runs with the values it started with.
pub const CONFIG_RESTART_PENDING: &str = "xcluster_config_restart_pending";
pub const HTTP_REQUESTS_TOTAL: &str = "xcluster_http_requests_total";
pub const HTTP_CONNECTIONS_REJECTED_TOTAL: &str = "xcluster_http_connections_rejected_total";
pub const HTTP_ACCEPT_ERRORS_TOTAL: &str = "xcluster_http_accept_errors_total";
pub const BUILD_INFO: &str = "xcluster_build_info";
pub const READY: &str = "xcluster_ready";
