//! The app's configuration: raw serde form, validation, typed form.
//!
//! Reloads live: `log.level`, `shutdown.*`, `slowdown.*`, `degrade.*` (the manual level and the
//! breaker thresholds), `reservation_ttl_ms`, `seckill.per_user_limit`, `seckill.sold_out_gate_ms`,
//! `admin_token`, `payment_callback_secret`, `buyer_key_file` (and a new key in that file),
//! `buyer_token_max_life_secs`,
//! `audit_interval_ms`.
//! Needs a restart: `listen`, `http.*`, `instance`, `db_path`, `store_threads`, `busy_timeout_ms`, `seed_demo`,
//! `capacity`, `max_body_bytes`, `seckill.buckets` (buckets are laid out when a flash sale is opened), and
//! the storage backend keys of `config_backend` (`store`, `postgres_url`, `redis_url`, `[postgres]`, `[redis]`).
//! A reload keeps those at their running values in what the app reads (the runtime's `config::reload`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::common::{HttpSection, LogSection, ShutdownSection, ShutdownTimes};
use xcluster_runtime::{ConfigIssue, DaemonConfig, RoleConfig, Validator};

use crate::degrade::Level;

/// The request types the app classifies (the keys of `slowdown.cpu_us_per_request`).
pub const REQUEST_TYPES: [&str; 5] = ["browse", "order", "seckill", "pay", "admin"];

/// The longest `buyer_token_max_life_secs` (and `xcluster buyer-token --ttl-secs`): a year.
pub const MAX_BUYER_TOKEN_LIFE_SECS: u64 = 365 * 86_400;

/// The file-facing config (`role = "app"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the app's HTTP API (also serves `/metrics`, `/livez`, `/readyz`).
    pub listen: String,
    /// This instance's id in stats; empty means `app-<port>`.
    pub instance: String,
    /// The SQLite database file, shared by every app process on the host.
    pub db_path: String,
    /// Blocking threads (and SQLite connections) this process uses for store writes, and as many for reads.
    pub store_threads: u32,
    /// How long a writer waits for another process's write lock before giving up (503, retryable).
    pub busy_timeout_ms: u64,
    /// Seed the demo catalog when the database is empty.
    pub seed_demo: bool,
    /// Requests held at once (in flight + queued); beyond it the app answers 503.
    pub capacity: u32,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Bearer token for mutating admin calls; empty disables them.
    pub admin_token: String,
    /// The secret the payment provider signs its callbacks with (`X-Signature`); empty: callbacks carry the
    /// admin token instead.
    pub payment_callback_secret: String,
    /// A file holding the key a shop's login service signs buyer tokens with (`xcluster buyer-token`): set,
    /// the buyer calls (orders, flash sales, payments from the wallet, cancels, a buyer's orders and wallet)
    /// need `Authorization: Bearer <token>` and act for its user alone (the admin token acts for any). Empty:
    /// `user` is trusted as sent, and a gateway in front must set it.
    pub buyer_key_file: String,
    /// The longest a buyer token may still live when it comes (its `expires` from now, with a minute of
    /// slack for the signer's clock): a longer one is refused, so a token that leaks works this long at most.
    pub buyer_token_max_life_secs: u64,
    /// How long a reservation holds stock before the sweeper gives it back.
    pub reservation_ttl_ms: u64,
    /// How often the reconciler runs the invariant audit in the background (0 = never).
    pub audit_interval_ms: u64,
    pub degrade: DegradeSection,
    pub seckill: SeckillSection,
    pub slowdown: SlowdownSection,
    pub log: LogSection,
    pub shutdown: ShutdownSection,
    /// `[http]`: the API server's limits (connections, header timeout and size, declared body size).
    pub http: HttpSection,
    // --- Storage backend (issue 8; see `config_backend`). ---
    /// `sqlite` (one host, `db_path`) or `postgres` (several hosts, `postgres_url`).
    pub store: String,
    /// `postgres://user[:password]@host:port/db`, used when `store = "postgres"`.
    pub postgres_url: String,
    /// `redis://[:password@]host:port` for the shared flash-sale gate; empty: no Redis.
    pub redis_url: String,
    pub postgres: crate::config_backend::PostgresSection,
    pub redis: crate::config_backend::RedisSection,
}

/// `[degrade]`: the manual level and the circuit-breaker thresholds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DegradeSection {
    /// `auto` (breakers decide), `sync`, `queued`, `shed` or `read_only`.
    pub level: String,
    /// Mean store commit time above which the latency breaker opens.
    pub latency_threshold_ms: u64,
    /// Store error ratio above which the error breaker opens.
    pub error_ratio_threshold: f64,
    /// Outbox depth above which the queue breaker opens.
    pub queue_depth_threshold: u64,
    /// The longest an open breaker waits before a half-open trial (each failed trial doubles the wait).
    pub open_ms: u64,
    /// The first wait of an open breaker (capped by `open_ms`).
    pub open_min_ms: u64,
}

impl Default for DegradeSection {
    fn default() -> Self {
        Self {
            level: "auto".into(),
            latency_threshold_ms: 50,
            error_ratio_threshold: 0.2,
            queue_depth_threshold: 10_000,
            open_ms: 5_000,
            open_min_ms: 1_000,
        }
    }
}

/// `[seckill]`: flash sales.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SeckillSection {
    /// Units one user may buy of one flash-sale SKU.
    pub per_user_limit: u32,
    /// Stock buckets a flash-sale SKU is split into.
    pub buckets: u32,
    /// How long a sold-out answer is trusted locally before the store is asked again.
    pub sold_out_gate_ms: u64,
}

impl Default for SeckillSection {
    fn default() -> Self {
        Self {
            per_user_limit: 1,
            buckets: 8,
            sold_out_gate_ms: 500,
        }
    }
}

/// `[slowdown]`: extra CPU work per request type, for benchmarks that need one slow instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SlowdownSection {
    /// Microseconds of busy CPU per request, by type, e.g. `{ seckill = 2000, order = 500 }`.
    pub cpu_us_per_request: BTreeMap<String, u64>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7101".into(),
            instance: String::new(),
            db_path: "./xbuy.db".into(),
            store_threads: 4,
            busy_timeout_ms: 10_000,
            seed_demo: true,
            capacity: 1024,
            max_body_bytes: 64 * 1024,
            admin_token: String::new(),
            buyer_key_file: String::new(),
            buyer_token_max_life_secs: 7 * 86_400,
            payment_callback_secret: String::new(),
            reservation_ttl_ms: 15 * 60 * 1000,
            audit_interval_ms: 60_000,
            degrade: DegradeSection::default(),
            seckill: SeckillSection::default(),
            slowdown: SlowdownSection::default(),
            log: LogSection::default(),
            shutdown: ShutdownSection::default(),
            http: HttpSection::default(),
            store: "sqlite".into(),
            postgres_url: String::new(),
            redis_url: String::new(),
            postgres: Default::default(),
            redis: Default::default(),
        }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub instance: String,
    pub db_path: PathBuf,
    pub store_threads: usize,
    pub busy_timeout: Duration,
    pub seed_demo: bool,
    pub capacity: u32,
    pub max_body_bytes: usize,
    pub admin_token: String,
    /// `payment_callback_secret`.
    pub callback_secret: String,
    /// The key of `buyer_key_file`: `None` trusts `user` as sent.
    pub buyer_key: Option<xcluster_runtime::config::HmacKey>,
    /// `buyer_token_max_life_secs`.
    pub buyer_token_max_life_secs: u64,
    pub reservation_ttl: Duration,
    /// `None` disables the background reconciler.
    pub audit_interval: Option<Duration>,
    /// `None` means automatic (breakers decide).
    pub manual_level: Option<Level>,
    pub latency_threshold: Duration,
    pub error_ratio_threshold: f64,
    pub queue_depth_threshold: u64,
    pub breaker_open: crate::degrade::OpenWait,
    pub per_user_limit: u32,
    pub buckets: u32,
    pub sold_out_gate: Duration,
    pub cpu_us: BTreeMap<String, u64>,
    pub log_filter: String,
    pub shutdown: ShutdownTimes,
    /// The API server's limits (`[http]`, with `[shutdown]`'s grace period).
    pub http: xcluster_runtime::http::ServerLimits,
    /// The store to open (issue 8).
    pub backend: crate::config_backend::Backend,
    /// The shared Redis gate, if configured (issue 8).
    pub redis: Option<crate::gate_redis::RedisOptions>,
}

impl RoleConfig for Config {
    const ROLE: &'static str = "app";
    type Raw = RawConfig;
    // The server, the store and its connections are built once, at start (the module's doc says which).
    const RESTART_KEYS: &'static [&'static str] = &[
        "listen",
        "instance",
        "db_path",
        "store_threads",
        "busy_timeout_ms",
        "seed_demo",
        "capacity",
        "max_body_bytes",
        "seckill.buckets",
        "http",
        "store",
        "postgres_url",
        "redis_url",
        "postgres",
        "redis",
    ];

    fn validate(raw: &RawConfig) -> Result<Self, Vec<ConfigIssue>> {
        let mut v = Validator::new();
        let listen = v.addr("listen", &raw.listen);
        v.check(raw.instance.len() <= 128, "instance", || {
            format!("{} bytes, max 128", raw.instance.len())
        });
        v.check(!raw.db_path.trim().is_empty(), "db_path", || {
            "must not be empty".into()
        });
        let store_threads = v.range("store_threads", raw.store_threads, 1, 64) as usize;
        let busy_timeout = v.millis("busy_timeout_ms", raw.busy_timeout_ms, 100, 600_000);
        let capacity = v.range("capacity", raw.capacity, 1, 1_000_000);
        let max_body_bytes = v.range("max_body_bytes", raw.max_body_bytes, 1024, 16 * 1024 * 1024);
        let reservation_ttl = v.millis("reservation_ttl_ms", raw.reservation_ttl_ms, 100, 7 * 86_400_000);
        let audit_interval = match raw.audit_interval_ms {
            0 => None,
            ms => Some(v.millis("audit_interval_ms", ms, 1000, 86_400_000)),
        };
        let manual_level = match raw.degrade.level.as_str() {
            "auto" => None,
            other => match Level::parse(other) {
                Some(l) => Some(l),
                None => {
                    v.error(
                        "degrade.level",
                        format!("unknown level {other:?} (expected auto, sync, queued, shed or read_only)"),
                    );
                    None
                }
            },
        };
        let d = &raw.degrade;
        let latency_threshold = v.millis("degrade.latency_threshold_ms", d.latency_threshold_ms, 1, 600_000);
        v.check(
            d.error_ratio_threshold.is_finite()
                && d.error_ratio_threshold > 0.0
                && d.error_ratio_threshold <= 1.0,
            "degrade.error_ratio_threshold",
            || format!("{} is not in (0, 1]", d.error_ratio_threshold),
        );
        let queue_depth_threshold = v.range(
            "degrade.queue_depth_threshold",
            d.queue_depth_threshold,
            1,
            u64::MAX,
        );
        let breaker_open = crate::degrade::OpenWait {
            min: v.millis("degrade.open_min_ms", d.open_min_ms, 10, 3_600_000),
            max: v.millis("degrade.open_ms", d.open_ms, 10, 3_600_000),
        };
        let s = &raw.seckill;
        let per_user_limit = v.range("seckill.per_user_limit", s.per_user_limit, 1, 1_000);
        let buckets = v.range("seckill.buckets", s.buckets, 1, 64);
        let sold_out_gate = v.millis("seckill.sold_out_gate_ms", s.sold_out_gate_ms, 0, 60_000);
        for (ty, us) in &raw.slowdown.cpu_us_per_request {
            v.check(
                REQUEST_TYPES.contains(&ty.as_str()),
                "slowdown.cpu_us_per_request",
                || format!("unknown request type {ty:?} (expected one of {REQUEST_TYPES:?})"),
            );
            v.check(*us <= 1_000_000, "slowdown.cpu_us_per_request", || {
                format!("{ty} = {us} us is above 1000000")
            });
        }
        v.token("admin_token", &raw.admin_token);
        let secret = &raw.payment_callback_secret;
        v.check(
            secret.is_empty() || secret.len() >= 16,
            "payment_callback_secret",
            || {
                format!(
                    "{} bytes; at least 16 (or empty: callbacks carry the admin token)",
                    secret.len()
                )
            },
        );
        let buyer_key =
            (!raw.buyer_key_file.is_empty()).then(|| v.key_file("buyer_key_file", &raw.buyer_key_file));
        // Each key held (one per line: the new and the old while one is changed).
        if let Some(key) = &buyer_key {
            v.long_keys("buyer_key_file", key);
        }
        let buyer_token_max_life_secs = v.range(
            "buyer_token_max_life_secs",
            raw.buyer_token_max_life_secs,
            60,
            MAX_BUYER_TOKEN_LIFE_SECS,
        );
        let (backend, redis) = crate::config_backend::validate(
            &mut v,
            &raw.store,
            &raw.postgres_url,
            &raw.postgres,
            &raw.redis_url,
            &raw.redis,
            raw.seed_demo,
        );
        raw.log.validate(&mut v);
        let shutdown = raw.shutdown.validate(&mut v);
        // Clients come through the balancers' L4 proxy too, all from a balancer's address.
        let http = raw.http.validate_behind_proxies(&mut v, shutdown.grace);
        let instance = if raw.instance.is_empty() {
            format!("app-{}", listen.port())
        } else {
            raw.instance.clone()
        };
        v.finish(Config {
            listen,
            instance,
            db_path: PathBuf::from(&raw.db_path),
            store_threads,
            busy_timeout,
            seed_demo: raw.seed_demo,
            capacity,
            max_body_bytes,
            admin_token: raw.admin_token.clone(),
            callback_secret: raw.payment_callback_secret.clone(),
            buyer_key,
            buyer_token_max_life_secs,
            reservation_ttl,
            audit_interval,
            manual_level,
            latency_threshold,
            error_ratio_threshold: d.error_ratio_threshold,
            queue_depth_threshold,
            breaker_open,
            per_user_limit,
            buckets,
            sold_out_gate,
            cpu_us: raw.slowdown.cpu_us_per_request.clone(),
            log_filter: raw.log.level.clone(),
            shutdown,
            http,
            backend,
            redis,
        })
    }

    fn redact(raw: &mut RawConfig) {
        if !raw.admin_token.is_empty() {
            raw.admin_token = "<redacted>".into();
        }
        if !raw.payment_callback_secret.is_empty() {
            raw.payment_callback_secret = "<redacted>".into();
        }
        raw.postgres_url = crate::config_backend::redact_url(&raw.postgres_url);
        raw.redis_url = crate::config_backend::redact_url(&raw.redis_url);
    }
}

impl DaemonConfig for Config {
    fn shutdown(&self) -> ShutdownTimes {
        self.shutdown
    }
    fn log_filter(&self) -> &str {
        &self.log_filter
    }
    /// The API's connections (the store's are among the base ones: its pool is small).
    fn descriptors(&self) -> u64 {
        self.http.max_connections as u64 + xcluster_runtime::limits::BASE_DESCRIPTORS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = Config::validate(&RawConfig::default()).expect("defaults are valid");
        assert_eq!(c.instance, "app-7101");
        assert!(c.manual_level.is_none());
    }

    #[test]
    fn every_problem_is_reported() {
        let mut raw = RawConfig::default();
        raw.degrade.level = "fast".into();
        raw.store_threads = 0;
        raw.slowdown.cpu_us_per_request.insert("nope".into(), 5);
        let issues = Config::validate(&raw).expect_err("invalid");
        assert_eq!(issues.len(), 3, "{issues:?}");
    }

    #[test]
    fn a_reload_keeps_the_running_values_of_the_keys_that_need_a_restart() {
        let running = Config::validate(&RawConfig::default()).expect("defaults are valid");
        // Every key of RESTART_KEYS changed, and one that reloads live.
        let raw = RawConfig {
            listen: "127.0.0.1:7999".into(),
            instance: "renamed".into(),
            db_path: "/elsewhere.db".into(),
            store_threads: 2,
            busy_timeout_ms: 500,
            seed_demo: false,
            capacity: 7,
            max_body_bytes: 2048,
            seckill: SeckillSection {
                buckets: 2,
                per_user_limit: 3,
                ..SeckillSection::default()
            },
            http: HttpSection {
                max_connections: 10,
                ..HttpSection::default()
            },
            store: "postgres".into(),
            postgres_url: "postgres://xb@10.0.0.1/xbuy".into(),
            redis_url: "redis://10.0.0.1:6379".into(),
            ..RawConfig::default()
        };
        let loaded = xcluster_runtime::config::Loaded {
            config: Config::validate(&raw).expect("valid"),
            raw,
            sources: None,
        };
        let reloaded = xcluster_runtime::config::keep_restart_keys(loaded, &RawConfig::default(), "app.toml")
            .expect("valid")
            .config;
        assert_eq!(reloaded.per_user_limit, 3, "a live key applies");
        let expected = Config {
            per_user_limit: 3,
            ..running
        };
        assert_eq!(format!("{reloaded:?}"), format!("{expected:?}"));
    }
}
