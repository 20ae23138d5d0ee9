//! Background work of every app process: the outbox workers (idempotent effects, so redelivery after a crash
//! or a race between processes has no second effect) and the reservation sweeper (expiry by a conditional
//! status update, so each reservation gives its stock back exactly once, whichever process sweeps it).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::App;
use crate::exec::StoreExec;

const OUTBOX_BATCH: u32 = 500;

/// Drains the outbox: a pass every 100 ms, repeated at once while full batches come back.
pub async fn outbox_worker(exec: StoreExec, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match exec.run(|s| s.run_outbox(OUTBOX_BATCH)).await {
                Ok(n) => {
                    metrics::counter!(crate::metrics::OUTBOX_RUN_TOTAL).increment(u64::from(n));
                    if n < OUTBOX_BATCH || cancel.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "outbox pass failed; retrying on the next tick");
                    break;
                }
            }
        }
    }
}

/// Store housekeeping (the SQLite WAL checkpoint) every [`MAINTAIN_EVERY`], so no commit runs it.
pub async fn maintainer(exec: StoreExec, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(MAINTAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Logged when it starts failing and when it recovers, not five times a second in between.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        match exec.maintain().await {
            Err(e) if !failing => {
                warn!(error = %e, "store housekeeping failed; retrying every {MAINTAIN_EVERY:?}");
                failing = true;
            }
            Err(_) => {}
            Ok(()) if failing => {
                info!("store housekeeping works again");
                failing = false;
            }
            Ok(()) => {}
        }
    }
}

/// How often [`maintainer`] runs: at a few hundred orders a second the WAL gains about 1,000 pages (4 MB) in
/// this time, so each checkpoint's fsync stays short.
const MAINTAIN_EVERY: Duration = Duration::from_millis(200);

/// Expires due reservations, ten times per TTL (at least every 50 ms, at most every second).
pub async fn sweeper(app: Arc<App>, cancel: CancellationToken) {
    // Unbounded: an expiry's gate cleanup below needs its outcome, which a given-up call loses while the
    // call may still commit.
    let exec = app.exec.unbounded().background();
    loop {
        let ttl = app.config.borrow().reservation_ttl;
        let every = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            // By the store's clock, which every instance on it shares: by this host's, one whose clock ran
            // ahead expired the others' reservations early.
            match exec.run(|s| s.expire_due(s.clock().now_ms(), 500)).await {
                Ok(expired) => {
                    let n = expired.orders;
                    metrics::counter!(crate::metrics::RESERVATIONS_EXPIRED_TOTAL).increment(u64::from(n));
                    // The store no longer counts an expired flash-sale order against its buyer; neither may
                    // the gate, or it refuses them a purchase the store would make, for a counter's life.
                    if let Some(g) = &app.redis_gate {
                        g.forget_all(&expired.flash_sale).await;
                    }
                    // Its units are back in the sale: a sold-out mark would refuse them for its life. Once per
                    // SKU: a clear copies the gate's map, and a sale's expiries come by the hundred.
                    let skus: std::collections::BTreeSet<&str> =
                        expired.flash_sale.iter().map(|l| l.sku.as_str()).collect();
                    for sku in skus {
                        app.gate.clear(sku);
                    }
                    // The other orders' units are back on the shelf, which a flash sale sells too.
                    app.back_on_sale(&expired.restocked).await;
                    if n < 500 {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reservation sweep failed; retrying on the next tick");
                    break;
                }
            }
        }
    }
}
