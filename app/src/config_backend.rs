//! The storage backend keys of the app config (issue 8): `store = "sqlite" | "postgres"`, `postgres_url`,
//! `redis_url`, and the `[postgres]` and `[redis]` sections with pool size and timeouts. All need a restart.
//! Passwords in the URLs are hidden by [`redact_url`] whenever the config is shown.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use xcluster_runtime::Validator;

use crate::gate_redis::{MIN_IN_FLIGHT_MARK, RedisOptions};
use crate::store::postgres::PgOptions;

/// `[postgres]`: used when `store = "postgres"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    /// Connections this process keeps at most (also bounded by `store_threads` in use at once).
    pub pool_size: u32,
    /// Bound on opening one connection, TCP connect, handshake and login included.
    pub connect_timeout_ms: u64,
    /// Server-side bound on one statement and on one lock wait; past it the call is a retryable 503. A
    /// server that answers nothing costs a call at most this + `connect_timeout_ms` + 1 s (`PgOptions::call_bound`).
    pub statement_timeout_ms: u64,
}

impl Default for PostgresSection {
    fn default() -> Self {
        Self {
            pool_size: 8,
            connect_timeout_ms: 3_000,
            statement_timeout_ms: 5_000,
        }
    }
}

/// `[redis]`: used when `redis_url` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    /// Bound on connecting and on each command; keep it short, Redis only saves the store work.
    pub timeout_ms: u64,
    /// After a Redis failure, how long the gate is skipped (store-only path) before Redis is tried again.
    pub retry_after_ms: u64,
    /// How often the reconciler rebuilds the stock counters from the store.
    pub rebuild_ms: u64,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            timeout_ms: 50,
            retry_after_ms: 2_000,
            rebuild_ms: 1_000,
        }
    }
}

/// Which store the app runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres(PgOptions),
}

/// Validates the backend keys (every problem goes to `v`).
pub fn validate(
    v: &mut Validator,
    store: &str,
    postgres_url: &str,
    pg: &PostgresSection,
    redis_url: &str,
    redis: &RedisSection,
    seed_demo: bool,
) -> (Backend, Option<RedisOptions>) {
    let pool_size = v.range("postgres.pool_size", pg.pool_size, 1, 256) as usize;
    let connect_timeout = v.millis("postgres.connect_timeout_ms", pg.connect_timeout_ms, 10, 60_000);
    let statement_timeout = v.millis(
        "postgres.statement_timeout_ms",
        pg.statement_timeout_ms,
        10,
        600_000,
    );
    let backend = match store {
        "sqlite" => Backend::Sqlite,
        "postgres" => {
            v.check(
                postgres_url.starts_with("postgres://") || postgres_url.starts_with("postgresql://"),
                "postgres_url",
                || {
                    "store = \"postgres\" needs postgres_url = \"postgres://user[:password]@host:port/db\""
                        .into()
                },
            );
            // What the store parses at start, checked here so `check-config` and a reload refuse it: a URL the
            // client cannot read passed as valid and failed only at the next start. The client's error names
            // no part of the URL (it may hold a password).
            match postgres_url.parse::<postgres::Config>() {
                Err(e) => v.error(
                    "postgres_url",
                    format!("not a connection URL the client reads: {e}"),
                ),
                // The store connects without TLS (`NoTls`): such a URL could never connect.
                Ok(c) if matches!(c.get_ssl_mode(), postgres::config::SslMode::Require) => v.error(
                    "postgres_url",
                    "sslmode=require: the store connects without TLS (use a private network or a tunnel)",
                ),
                Ok(_) => {}
            }
            Backend::Postgres(PgOptions {
                url: postgres_url.to_string(),
                pool_size,
                connect_timeout,
                statement_timeout,
                seed_demo,
            })
        }
        other => {
            v.error(
                "store",
                format!("unknown store {other:?} (expected sqlite or postgres)"),
            );
            Backend::Sqlite
        }
    };
    let timeout = v.millis("redis.timeout_ms", redis.timeout_ms, 1, 10_000);
    let retry_after = v.millis("redis.retry_after_ms", redis.retry_after_ms, 10, 600_000);
    let rebuild_every = v.millis("redis.rebuild_ms", redis.rebuild_ms, 50, 600_000);
    let redis = if redis_url.is_empty() {
        None
    } else {
        v.check(crate::resp::parse_url(redis_url).is_some(), "redis_url", || {
            "expected redis://[:password@]host:port (the default user and database 0 only)".into()
        });
        let in_flight_mark = match &backend {
            Backend::Postgres(o) => (o.longest_call() + Duration::from_secs(5)).max(MIN_IN_FLIGHT_MARK),
            Backend::Sqlite => MIN_IN_FLIGHT_MARK,
        };
        Some(RedisOptions {
            url: redis_url.to_string(),
            timeout,
            retry_after,
            rebuild_every,
            in_flight_mark,
        })
    };
    (backend, redis)
}

/// Hides the password of `scheme://user:password@host...`, and the whole user part of `redis://secret@host`
/// (the password-only form `resp::parse_url` takes).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user part ends at the last `@` before the path, and the path starts at the first `/` after the first
    // `@`: the postgres client ends the credentials at the first `@`, so its password may hold a `/` (as a
    // base64 one does), and the Redis one may hold an `@`. Taking the first `/` of the URL as the path left a
    // password with a `/` in it unredacted in `--print-config` and the logs.
    let path_from = rest.find('@').unwrap_or(0);
    let authority_end = rest[path_from..].find('/').map_or(rest.len(), |i| path_from + i);
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{}", &rest[at..]),
        // A user name alone is no secret, but Redis reads it as the password.
        None if scheme == "redis" => format!("{scheme}://<redacted>{}", &rest[at..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://xb:pw@10.0.0.1:5432/xbuy"),
            "postgres://xb:<redacted>@10.0.0.1:5432/xbuy"
        );
        assert_eq!(redact_url("redis://:pw@h:6379"), "redis://:<redacted>@h:6379");
        assert_eq!(redact_url("postgres://xb@h/db"), "postgres://xb@h/db");
        // A base64 password holds `/`; the postgres client takes it (its credentials end at the first `@`).
        assert_eq!(
            redact_url("postgres://xb:ab/cd+e=@10.0.0.1/xbuy?sslmode=disable"),
            "postgres://xb:<redacted>@10.0.0.1/xbuy?sslmode=disable"
        );
        assert_eq!(
            redact_url("redis://:p@ss@h:6379/0"),
            "redis://:<redacted>@h:6379/0"
        );
        // `redis://secret@host:port` is a password alone (`resp::parse_url`).
        assert_eq!(redact_url("redis://s3cret@h:6379"), "redis://<redacted>@h:6379");
    }

    #[test]
    fn postgres_needs_a_url() {
        let mut v = Validator::new();
        let (_, r) = validate(
            &mut v,
            "postgres",
            "",
            &PostgresSection::default(),
            "",
            &RedisSection::default(),
            true,
        );
        assert!(r.is_none());
        assert!(v.finish(()).is_err());
        for (url, says) in [
            ("postgres://xb:s3cret@h:notaport/db", "not a connection URL"),
            ("postgres://xb:s3cret@h/db?bogus=1", "not a connection URL"),
            ("postgres://xb:s3cret@h/db?sslmode=require", "without TLS"),
        ] {
            let mut v = Validator::new();
            let pg = PostgresSection::default();
            validate(&mut v, "postgres", url, &pg, "", &RedisSection::default(), true);
            let issues = format!("{:?}", v.finish(()).expect_err(url));
            assert!(
                issues.contains("postgres_url") && issues.contains(says),
                "{url}: {issues}"
            );
            assert!(!issues.contains("s3cret"), "{issues}");
        }
        let mut v = Validator::new();
        let url = "postgres://xb:s3cret@10.0.0.1:5432/xbuy?sslmode=disable";
        validate(
            &mut v,
            "postgres",
            url,
            &PostgresSection::default(),
            "",
            &RedisSection::default(),
            true,
        );
        assert!(v.finish(()).is_ok());
    }
}
