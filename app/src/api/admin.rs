//! Operations: the stats contract for the agent (`GET /v1/stats`), the invariant audit (`GET /admin/audit`),
//! the degrade level (`GET|POST /admin/degrade`), and merchant batch updates (stock received, prices, opening a
//! flash sale). Mutations need the bearer token.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_proto::stats::InstanceStats;
use xcluster_runtime::http::{Body, error, json, read_json, read_json_or_default};

use super::bodies::{DegradeReq, FlashSaleReq, StockReq};
use super::{
    App, BODY_TIMEOUT, authorized, idem_key, keyed_json, path_id, reject, respond, store_failed,
    unkeyed_write_failed,
};
use crate::Config;
use crate::degrade::Level;
use crate::store::Restocked;

/// `GET /v1/stats`: `xcluster_proto::stats::InstanceStats`.
pub fn stats(app: &App) -> Response<Body> {
    let cfg = app.cfg();
    let w = app.stats.window();
    // `in_flight` is every request in a handler, the waiting ones too; reported are those being processed
    // (`in_flight`) and those waiting (`queued`), which the agent and balancers add: reported whole, a waiting
    // request counted twice there.
    let queued = app.batcher.queued() + app.exec.waiting();
    let s = InstanceStats {
        instance: cfg.instance.clone(),
        ready: app.health.is_ready(),
        in_flight: app.stats.in_flight.load(Ordering::Relaxed).saturating_sub(queued),
        queued,
        capacity: if app.degrade.level() >= Level::Shed {
            cfg.capacity / 2
        } else {
            cfg.capacity
        }
        .max(1),
        queue_depth: app.queue_depth.load(Ordering::Relaxed),
        request_rate: w.request_rate,
        error_rate: w.error_rate.clamp(0.0, 1.0),
        types: w.types.clone(),
    };
    json(StatusCode::OK, &s)
}

/// `GET /admin/audit`: 200 when every invariant holds, 409 with the report when one does not.
/// `counted`, the request's place in `in_flight`, is given up while it waits its turn and taken again for its
/// run: anyone may ask (no token), and a crowd of audits waiting behind one held the places the admission
/// limit leaves orders, which were refused `overloaded`.
pub async fn audit(app: &Arc<App>, counted: &mut Option<crate::stats::InFlight>) -> Response<Body> {
    drop(counted.take());
    let _turn = app.audits.lock().await;
    *counted = Some(app.stats.enter());
    match app.exec.read(|s| s.audit()).await {
        Ok(report) => json(
            if report.ok {
                StatusCode::OK
            } else {
                StatusCode::CONFLICT
            },
            &report,
        ),
        Err(e) => store_failed(&e),
    }
}

fn degrade_view(app: &App) -> serde_json::Value {
    let b = app.degrade.breakers.lock().unwrap_or_else(|e| e.into_inner());
    serde_json::json!({
        "level": app.degrade.level(),
        "manual": app.degrade.manual(),
        "auto": app.degrade.auto_level(),
        "breakers": { "latency": b.latency.state, "errors": b.errors.state, "queue": b.queue.state },
        // Each breaker's current (or last) wait before a trial: it backs off while the store keeps failing.
        "waits_ms": {
            "latency": b.latency.wait().as_millis() as u64,
            "errors": b.errors.wait().as_millis() as u64,
            "queue": b.queue.wait().as_millis() as u64,
        },
    })
}

/// `GET /admin/degrade`.
pub fn degrade_get(app: &App) -> Response<Body> {
    json(StatusCode::OK, &degrade_view(app))
}

/// `POST /admin/degrade` `{"level": "queued"}` (bearer token). `auto` hands the choice back to the breakers.
pub async fn degrade_set(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    let body: DegradeReq = match read_json(req, 4096, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let manual = match body.level.as_str() {
        "auto" => None,
        other => match Level::parse(other) {
            Some(l) => Some(l),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_level",
                    &format!("unknown level {other:?} (expected auto, sync, queued, shed or read_only)"),
                );
            }
        },
    };
    app.degrade.set_manual(manual);
    json(StatusCode::OK, &degrade_view(app))
}

/// `POST /v1/merchant/stock` `{"updates": [{"sku": "...", "receive": 10, "price_cents": 990}]}` (bearer token):
/// all of the batch or none of it. With an `Idempotency-Key` the batch applies once: a merchant's retry after a
/// lost answer would otherwise receive its units twice. The replay answers the first result
/// (`idempotent-replay: true`), another batch under the key is 422.
pub async fn merchant_stock(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    let key = match idem_key(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let body: StockReq = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Err((code, msg)) = body.check() {
        return error(StatusCode::BAD_REQUEST, code, &msg);
    }
    let received: Vec<String> = (body.updates.iter())
        .filter(|u| u.receive > 0)
        .map(|u| u.sku.clone())
        .collect();
    // What each SKU gained over the batch, its write-offs netted out, so the Redis gate never counts more units
    // than the store added (a loss is left to the reconciler: a counter too high is only lenient).
    let mut gained: std::collections::BTreeMap<String, i64> = Default::default();
    for u in &body.updates {
        *gained.entry(u.sku.clone()).or_default() += i64::from(u.receive) - i64::from(u.write_off);
    }
    let keyed = key.is_some();
    let done = app
        .exec
        .run(move |s| match key {
            Some(key) => s.update_stock_once(&key, &body.updates),
            None => s
                .update_stock(&body.updates)
                .map(|r| r.map(|skus| Restocked { skus, replay: false })),
        })
        .await;
    match done {
        Ok(Ok(done)) => {
            // Once committed: cleared before, an attempt answered sold out from the stock before it marked
            // the SKU again, refused until the mark's end.
            for sku in &received {
                app.gate.clear(sku);
            }
            // The units on the Redis gate's counters (`PUT_BACK` adds to one only where it exists: the counter
            // is shared, and this instance may have served no attempt on the SKU), not again on a replay; on a
            // task of their own, as a cancel's give-back, so a merchant gone before the answer does not drop
            // them.
            if let Some(g) = &app.redis_gate
                && !done.replay
            {
                let puts: Vec<(String, u32)> = (gained.into_iter())
                    .filter(|(_, n)| *n > 0)
                    .map(|(sku, n)| (sku, u32::try_from(n).unwrap_or(u32::MAX)))
                    .collect();
                let g = g.clone();
                let _ = tokio::spawn(async move {
                    for (sku, n) in puts {
                        g.restock(&sku, n).await;
                    }
                })
                .await;
            }
            keyed_json(
                StatusCode::OK,
                &serde_json::json!({ "skus": done.skus }),
                done.replay,
            )
        }
        Ok(Err(r)) => reject(&r),
        Err(e) if keyed => store_failed(&e),
        Err(e) => unkeyed_write_failed(&e),
    }
}

/// `POST /v1/merchant/flash-sales/{sku}` `{"buckets": 8}` (bearer token; an empty body takes `[seckill]
/// buckets`): splits the SKU's stock into buckets and opens its sale, so only `POST /v1/seckill/{sku}` sells it.
pub async fn flash_sale(app: &Arc<App>, cfg: &Config, sku: &str, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    if let Err(resp) = path_id("sku", sku) {
        return resp;
    }
    let body: FlashSaleReq = match read_json_or_default(req, 4096, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let buckets = body.buckets.unwrap_or(cfg.buckets);
    if !(1..=64).contains(&buckets) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_update",
            &format!("buckets {buckets} is not in 1..=64"),
        );
    }
    let sku = sku.to_string();
    match app.exec.run(move |s| s.open_flash_sale(&sku, buckets)).await {
        Ok(r) => {
            // Once committed, the Redis gate counts in the sale's number at once, rather than at the
            // reconciler's next pass: counting in the sale before, it would refuse that sale's buyers early.
            if let (Ok(opened), Some(g)) = (&r, &app.redis_gate) {
                g.open_sale(&opened.sku, opened.sale_seq).await;
            }
            respond(StatusCode::OK, Ok(r))
        }
        Err(e) => store_failed(&e),
    }
}

/// `DELETE /v1/merchant/flash-sales/{sku}` (bearer token): ends the SKU's flash sale. What its buckets still
/// hold goes back on the shelf for ordinary orders; closing a SKU with no open sale answers the same.
pub async fn close_flash_sale(
    app: &Arc<App>,
    cfg: &Config,
    sku: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    if let Err(resp) = path_id("sku", sku) {
        return resp;
    }
    let sku = sku.to_string();
    let closing = sku.clone();
    match app.exec.run(move |s| s.close_flash_sale(&closing)).await {
        Ok(r) => {
            // Once committed, as a restock's (`merchant_stock`).
            if r.is_ok() {
                app.gate.clear(&sku);
            }
            respond(StatusCode::OK, Ok(r))
        }
        Err(e) => store_failed(&e),
    }
}
