//! XBuy, the bundled commerce core: catalog, stock, orders, flash sales, payment and settlement.
//!
//! The store ([`store::Store`], SQLite by default) is the only authority for stock and money; the sold-out
//! gate only rejects early. Several app processes may share one database file.
//!
//! # API (HTTP/JSON; errors are `{"error": {"code", "message"}}` with a 4xx for every malformed request)
//!
//! | Method and path | Type | Notes |
//! |---|---|---|
//! | `GET /v1/products?after=&limit=` | browse | products with SKUs, price and stock |
//! | `GET /v1/products/{id}` | browse | |
//! | `GET /v1/orders/{id}` | browse | |
//! | `GET /v1/wallets/{user}` | browse | wallet balance |
//! | `POST /v1/orders` | order | `Idempotency-Key` required (a user's own: another user may use the same); `{"user", "lines": [{"sku", "qty"}]}`; 201, or 200 + `Idempotent-Replay: true` for a replay; 422 for a key reused with another body |
//! | `GET /v1/users/{user}/orders` | browse | `?limit=1..=100&before=CURSOR`: the user's orders, newest first; `next_before` pages on |
//! | `POST /v1/orders/{id}/cancel` | order | gives the reservation back |
//! | `POST /v1/orders/{id}/fulfil` | order | token |
//! | `POST /v1/seckill/{sku}` | seckill | `{"user", "qty"?}`, optional `Idempotency-Key`; per-user limit; sold-out gate |
//! | `POST /v1/orders/{id}/pay` | pay | from the buyer's wallet |
//! | `POST /v1/payments/callback` | pay | `X-Signature` with `payment_callback_secret` set (`api::signature`), else token; `{"payment_id", "order_id", "amount_cents", "status"}`, idempotent by `payment_id` (one reported `failed` may succeed later and pay) |
//! | `POST /v1/refunds` | pay | token; `{"order_id", "lines"?: [{"sku", "qty"}]}`: without `lines` refunds every unit not refunded yet (a refunded order answers the same); with them only those units, `Idempotency-Key` required (400 `missing_idempotency_key`; the order's own key: a replay is 200 + `Idempotent-Replay: true`, another body 422); 409 `over_refund` / 422 `not_in_order` name the SKU; the order shows `refunded_qty` per line and `refunded_cents`, and is `refunded` once every unit is |
//! | `POST /v1/merchant/stock` | admin | token; `{"updates": [{"sku", "receive"?, "write_off"?, "price_cents"?}]}`, all or none; a write-off beyond the shelf is 409 `out_of_stock`; optional `Idempotency-Key` applies the batch once (a replay is 200 + `Idempotent-Replay: true` with the first answer, another batch under the key 422 `idempotency_conflict`; a refused batch records nothing) |
//! | `GET /v1/merchant/shops/{id}` | admin | token; what the shop is owed (`receivable_cents`) and was paid out by settlement (`paid_out_cents`); 404 for no such shop |
//! | `POST /v1/merchant/flash-sales/{sku}` | admin | token; `{"buckets"?}` (or no body) splits stock into buckets and opens the sale: `/v1/orders` then refuses the SKU (409 `on_flash_sale`); a SKU with no sale open starts its next sale (`sale_seq` + 1: the per-user limit counts afresh), an open one only gets the stock |
//! | `DELETE /v1/merchant/flash-sales/{sku}` | admin | token; ends the sale: what the buckets hold goes back on the shelf |
//! | `POST /admin/credit` | admin | token; `{"users": [...], "amount_cents"}`; optional `Idempotency-Key` posts once |
//! | `POST /admin/settlements` | admin | token; one settlement batch |
//! | `GET /admin/audit` | admin | invariant report; 409 when one fails; one at a time (callers take turns) |
//! | `GET /admin/degrade`, `POST /admin/degrade` | admin | token for POST; `{"level": "auto"|"sync"|"queued"|"shed"|"read_only"}` |
//! | `GET /v1/stats` | — | `xcluster_proto::stats::InstanceStats` for the agent |
//!
//! With `buyer_key_file` set, the buyer calls (`GET /v1/orders/{id}`, `/v1/wallets/{user}`,
//! `/v1/users/{user}/orders`, `POST /v1/orders`, `/v1/seckill/{sku}`, `/v1/orders/{id}/pay`,
//! `/v1/orders/{id}/cancel`) take a buyer token (`xcluster_proto::buyer`) or the admin token, and act for the
//! token's user alone (`api::buyers`): 401 without a valid one, 403 `not_your_user` for another's `user`, 404
//! for another's order.
//!
//! Stock statuses: 409 `out_of_stock`/`sold_out`; 402 `insufficient_funds`; 429 `limit_exceeded`; 503 with
//! `Retry-After` for `overloaded`, `read_only` and `store_busy` (all retryable). `overloaded` and `read_only`
//! refuse before the store is asked; `store_busy` may also answer a call that a store which stopped
//! answering in time (`[postgres]`'s bound) still runs, and may commit: a write with an `Idempotency-Key`
//! is safe to send again (the key replays the first run), an unkeyed one may have applied: a credit or stock
//! batch is then answered 504 `outcome_unknown`, as is one whose connection failed at COMMIT (never retried
//! inside the store).

pub mod api;
pub mod audit;
pub mod config;
pub mod config_backend;
pub mod degrade;
pub mod domain;
pub mod exec;
pub mod gate;
pub mod gate_redis;
pub mod metrics;
pub mod placing;
pub mod queue;
pub mod resp;
pub mod stats;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use config::Config;
use tokio_util::sync::CancellationToken;
use xcluster_runtime::Context;

use crate::degrade::{Signals, Thresholds};

/// Why the app stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] xcluster_runtime::admin::ListenError),
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: store::StoreError },
}

/// Runs the app until drained.
pub async fn run(ctx: Context<Config>) -> Result<(), Error> {
    xcluster_runtime::telemetry::describe(crate::metrics::DESCRIPTIONS);
    let cfg = ctx.config();
    let drain = ctx.shutdown.drain_token();
    // The port first: a second app started on a taken port must fail before it creates or seeds a database.
    let listener = xcluster_runtime::admin::listen_api(cfg.listen)?;
    metrics::register_at_zero();
    let (path, busy, seed) = (cfg.db_path.clone(), cfg.busy_timeout, cfg.seed_demo);
    // Store construction: SQLite or PostgreSQL (issue 8).
    let backend = cfg.backend.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Arc<dyn store::Store>, store::StoreError> {
        Ok(match backend {
            config_backend::Backend::Sqlite => Arc::new(store::sqlite::SqliteStore::open(&path, busy, seed)?),
            config_backend::Backend::Postgres(opts) => Arc::new(store::postgres::PostgresStore::open(&opts)?),
        })
    })
    .await
    .unwrap_or_else(|e| Err(store::StoreError::Internal(format!("open task failed: {e}"))));
    let opened = opened.map_err(|source| Error::Store {
        path: match &cfg.backend {
            config_backend::Backend::Sqlite => cfg.db_path.display().to_string(),
            config_backend::Backend::Postgres(o) => config_backend::redact_url(&o.url),
        },
        source,
    })?;
    let clock = opened.clock();
    let exec = exec::StoreExec::new(opened, cfg.store_threads);
    let exec = match &cfg.backend {
        config_backend::Backend::Postgres(o) => exec.bounded(o.call_bound()),
        config_backend::Backend::Sqlite => exec,
    };
    let redis_gate = match &cfg.redis {
        Some(opts) => Some(Arc::new(gate_redis::RedisGate::new(opts.clone()).map_err(
            |e| Error::Store {
                path: config_backend::redact_url(&opts.url),
                source: store::StoreError::Internal(e),
            },
        )?)),
        None => None,
    };
    let background = CancellationToken::new();
    let batcher = queue::Batcher::spawn(exec.clone(), cfg.capacity as usize, background.clone());
    let app = Arc::new(api::App {
        config: ctx.config.clone(),
        exec: exec.clone(),
        batcher,
        degrade: degrade::Degrade::new(cfg.manual_level),
        stats: Arc::default(),
        gate: gate::SoldOutGate::default(),
        redis_gate: redis_gate.clone(),
        health: ctx.health.clone(),
        queue_depth: Default::default(),
        audits: tokio::sync::Mutex::new(()),
        // `instance` needs a restart: made once.
        instance_header: http::HeaderValue::from_str(&cfg.instance).ok(),
        placing: Arc::default(),
        clock,
    });
    tokio::spawn(queue::workers::outbox_worker(
        exec.background(),
        background.clone(),
    ));
    tokio::spawn(queue::workers::maintainer(exec.background(), background.clone()));
    tokio::spawn(queue::workers::sweeper(app.clone(), background.clone()));
    tokio::spawn(sampler(app.clone(), background.clone()));
    if let Some(g) = redis_gate {
        tokio::spawn(gate_redis::reconciler(g, exec.background(), background.clone()));
    }
    tokio::spawn(follow_config(app.clone(), background.clone()));
    tokio::spawn(reconciler(app.clone(), background.clone()));

    let app_for_drain = app.clone();
    let limits = cfg.http.clone();
    xcluster_runtime::admin::serve_api_on(
        listener,
        ctx.health.clone(),
        api::handler(app),
        limits,
        &ctx.shutdown,
    );
    ctx.health.set_ready();
    // The store in use: `db_path` means nothing on PostgreSQL, where it named a file never opened.
    let store_at = match &cfg.backend {
        config_backend::Backend::Sqlite => cfg.db_path.display().to_string(),
        config_backend::Backend::Postgres(o) => config_backend::redact_url(&o.url),
    };
    tracing::info!(instance = %cfg.instance, db = %store_at, "xbuy serving");
    drain.cancelled().await;
    // In-flight requests (and the group commits they wait on) finish within the grace period before the
    // background work stops; an order is acknowledged only after its commit, so a cut here loses nothing.
    let grace_end = tokio::time::Instant::now() + ctx.config().shutdown.grace;
    while app_for_drain.stats.in_flight.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < grace_end
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    background.cancel();
    Ok(())
}

/// The sampler reads the store's clock every this many ticks (seconds), the first at its first tick: clocks
/// drift by milliseconds a day, but NTP steps a host's clock at once.
const CLOCK_SYNC_TICKS: u32 = 10;

/// Once a second: closes the stats window, samples the outbox depth and how overdue the oldest reservation
/// is, reads the store's clock every [`CLOCK_SYNC_TICKS`], and feeds the degrade breakers.
async fn sampler(app: Arc<api::App>, cancel: CancellationToken) {
    let exec = app.exec.background();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // A sample held up by a slow store call is followed by the next a second on, not by the missed ticks
    // back to back: they rolled windows of a millisecond (rates up a thousandfold or nothing, an error
    // rate of 0 or 1 from one request) and fed the breakers samples a second apart that were not.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut synced, mut syncing) = (CLOCK_SYNC_TICKS, None::<tokio::task::JoinHandle<()>>);
    loop {
        // The tick's scheduled time, not the time the sample is fed: the outbox read below takes a varying
        // while, and a breaker's 1 s wait measured from jittered instants would miss a tick (2 s).
        let at = tokio::select! {
            _ = cancel.cancelled() => return,
            at = tick.tick() => at.into_std(),
        };
        app.stats.roll();
        synced += 1;
        // On a task of its own, one at a time: awaited here, a store that hangs held every tenth sample (and
        // the breakers' feed) up a whole call bound more, in the outage the breakers are there for.
        if synced >= CLOCK_SYNC_TICKS && syncing.as_ref().is_none_or(|t| t.is_finished()) {
            synced = 0;
            let (exec, clock) = (exec.clone(), app.clock.clone());
            syncing = Some(tokio::spawn(async move {
                if let Err(e) = exec.read(|s| s.sync_clock()).await {
                    tracing::debug!(error = %e, "cannot read the store's clock; the last reading stays");
                }
                ::metrics::gauge!(crate::metrics::STORE_CLOCK_OFFSET).set(clock.offset_ms() as f64 / 1000.0);
            }));
        }
        // One store call for both: a store that hangs holds the call up to its bound, and two calls held
        // the breakers' feed (below) twice as long in the outage they are there to react to. The overdue
        // reservation is read here, not by the sweeper: a sweeper stuck in a store call, or failing every
        // pass, would stop updating the very gauge that should show it. On a failed read the last values stay.
        let read = exec.read(|s| Ok((s.outbox_depth()?, s.oldest_reservation_expiry()?)));
        let depth = match read.await {
            Ok((depth, expiry)) => {
                ::metrics::gauge!(crate::metrics::RESERVATIONS_OVERDUE)
                    .set(overdue_seconds(expiry, app.clock.now_ms()));
                depth
            }
            Err(_) => app.queue_depth.load(Ordering::Relaxed),
        };
        app.queue_depth.store(depth, Ordering::Relaxed);
        ::metrics::gauge!(crate::metrics::OUTBOX_DEPTH).set(depth as f64);
        let sample = app.exec.sample();
        let cfg = app.cfg();
        let error_ratio = if sample.calls > 0 {
            sample.errors as f64 / sample.calls as f64
        } else {
            0.0
        };
        app.degrade.sample(
            Signals {
                store_latency: Duration::from_micros(sample.mean_us),
                error_ratio,
                queue_depth: depth,
            },
            Thresholds {
                latency: cfg.latency_threshold,
                error_ratio: cfg.error_ratio_threshold,
                queue_depth: cfg.queue_depth_threshold,
                open: cfg.breaker_open,
            },
            at,
        );
        for (breaker, state) in app.degrade.breaker_states() {
            ::metrics::gauge!(crate::metrics::DEGRADE_BREAKER_STATE, "breaker" => breaker).set(state.gauge());
        }
    }
}

/// How long past its expiry the first held reservation is at `now_ms`: 0 when none is held or none is due.
fn overdue_seconds(expiry_ms: Option<i64>, now_ms: i64) -> f64 {
    expiry_ms.map_or(0.0, |at| now_ms.saturating_sub(at).max(0) as f64 / 1000.0)
}

/// Applies a reloaded `degrade.level` (the other live keys are read per request).
async fn follow_config(app: Arc<api::App>, cancel: CancellationToken) {
    let mut rx = app.config.clone();
    let mut last = rx.borrow().manual_level;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        let level = rx.borrow_and_update().manual_level;
        if level != last {
            app.degrade.set_manual(level);
            last = level;
        }
    }
}

/// The reconciler: runs the invariant audit every `audit_interval_ms` and reports any breach loudly.
async fn reconciler(app: Arc<api::App>, cancel: CancellationToken) {
    let exec = app.exec.background();
    loop {
        let every = app.cfg().audit_interval.unwrap_or(Duration::from_secs(60));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if app.cfg().audit_interval.is_none() {
            continue;
        }
        match exec.read(|s| s.audit()).await {
            Ok(report) if report.ok => tracing::debug!("reconciler: every invariant holds"),
            Ok(report) => {
                ::metrics::counter!(crate::metrics::AUDIT_FAILURES_TOTAL).increment(1);
                tracing::error!(failures = ?report.failures(), "reconciler: invariant breach");
            }
            Err(e) => tracing::warn!(error = %e, "reconciler: audit could not run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::overdue_seconds;

    #[test]
    fn overdue_counts_only_past_the_expiry() {
        assert_eq!(overdue_seconds(None, 10_000), 0.0);
        assert_eq!(overdue_seconds(Some(12_000), 10_000), 0.0, "not due yet");
        assert_eq!(overdue_seconds(Some(10_000), 10_000), 0.0);
        assert_eq!(overdue_seconds(Some(7_500), 10_000), 2.5);
    }
}
