//! Orders (`order` type) and flash sales (`seckill` type): create with an idempotency key, get, cancel,
//! fulfil. Creation takes the path of the current degrade level: at `sync` one transaction per order with
//! weak effects inline; at `queued`/`shed` a group commit through the order queue with weak effects deferred
//! to the outbox. Both answer only after the commit.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_runtime::http::{Body, error, json, query_pairs, read_json};

use super::bodies::{CreateOrder, SeckillReq};
use super::buyers::Buyer;
use super::{
    App, BODY_TIMEOUT, authorized, idem_key, keyed_json, path_id, reject, respond, store_failed,
    unkeyed_write_failed,
};
use crate::Config;
use crate::degrade::Level;
use crate::domain::{NewOrder, OrderKind, OrderStatus, Reject, fingerprint, new_order_id};
use crate::gate_redis::{Admission, Outcome};
use crate::placing::{Hold, Placing};
use crate::queue::OrderOutcome;
use crate::store::{Keyed, StoreError};

/// Creates an order on the path of the current degrade level. `hold`, a keyed flash-sale attempt's place
/// in [`Placing`], goes into the store call and is let go when that call ends.
async fn place(app: &Arc<App>, order: NewOrder, hold: Option<Hold>) -> OrderOutcome {
    let level = app.degrade.level();
    let out = if level == Level::Sync {
        let orders = vec![order];
        app.exec
            .run(move |s| {
                let _hold = hold;
                s.create_orders(&orders, true)
            })
            .await
            .and_then(|v| {
                v.into_iter()
                    .next()
                    .ok_or_else(|| StoreError::Internal("store returned no outcome".into()))
            })
    } else {
        app.batcher.submit(order, hold).await
    };
    if let Ok(Ok(c)) = &out
        && !c.replay
    {
        metrics::counter!(crate::metrics::ORDERS_CREATED_TOTAL, "level" => level.as_str()).increment(1);
    }
    out
}

fn created(out: OrderOutcome) -> Response<Body> {
    match out {
        Ok(Ok(c)) => {
            let status = if c.replay {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            keyed_json(status, &c.order, c.replay)
        }
        Ok(Err(r)) => reject(&r),
        Err(e) => store_failed(&e),
    }
}

/// `POST /v1/orders` with `Idempotency-Key` and `{"user": "...", "lines": [{"sku": "...", "qty": 1}]}`.
pub async fn create(app: &Arc<App>, cfg: &Config, buyer: &Buyer, req: Request<Incoming>) -> Response<Body> {
    let key = match idem_key(&req) {
        Ok(Some(k)) => k,
        Ok(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "missing_idempotency_key",
                "POST /v1/orders needs an Idempotency-Key header",
            );
        }
        Err(resp) => return resp,
    };
    let body: CreateOrder = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Err((code, msg)) = body.check() {
        return error(StatusCode::BAD_REQUEST, code, &msg);
    }
    if let Err(refused) = buyer.check(&body.user) {
        return refused;
    }
    let now = app.clock.now_ms();
    let order = NewOrder {
        id: new_order_id(),
        fingerprint: fingerprint(OrderKind::Regular, &body.user, &body.lines),
        user: body.user,
        kind: OrderKind::Regular,
        lines: body.lines,
        idem_key: Some(key),
        created_ms: now,
        expires_ms: now + cfg.reservation_ttl.as_millis() as i64,
        per_user_limit: 0,
    };
    created(place(app, order, None).await)
}

/// `POST /v1/seckill/{sku}` with `{"user": "...", "qty": 1}` and an optional `Idempotency-Key`.
pub async fn seckill(
    app: &Arc<App>,
    cfg: &Config,
    sku: &str,
    buyer: &Buyer,
    req: Request<Incoming>,
    held: Option<crate::stats::InFlight>,
) -> Response<Body> {
    if let Err(resp) = path_id("sku", sku) {
        return resp;
    }
    let key = match idem_key(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let body: SeckillReq = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let lines = match body.lines(sku) {
        Ok(lines) => lines,
        Err((code, msg)) => return error(StatusCode::BAD_REQUEST, code, &msg),
    };
    if let Err(refused) = buyer.check(&body.user) {
        return refused;
    }
    let now = app.clock.now_ms();
    let order = NewOrder {
        id: new_order_id(),
        fingerprint: fingerprint(OrderKind::Seckill, &body.user, &lines),
        user: body.user.clone(),
        kind: OrderKind::Seckill,
        lines,
        idem_key: key,
        created_ms: now,
        expires_ms: now + cfg.reservation_ttl.as_millis() as i64,
        per_user_limit: cfg.per_user_limit,
    };
    // The gates (this instance's sold-out gate, the shared Redis one) may refuse a new order early, never a
    // replay: a keyed request they would refuse is looked up first, so a buyer whose answer was lost and who
    // retries after the sale sold out is shown the order they hold, not "sold out".
    let (user, qty) = (body.user, body.qty);
    // Held from before the gates, which may let it through, until its store call has ended: a retry that a
    // gate refuses meanwhile is answered `in_progress`, not `sold_out`. Let go at once when a gate refuses
    // this attempt itself, so its own look-up does not find it.
    let placing = Placing::hold(&app.placing, &user, order.idem_key.as_deref());
    let refusal = if app.gate.is_sold_out(sku) {
        metrics::counter!(crate::metrics::SOLD_OUT_GATE_TOTAL).increment(1);
        Some(Reject::SoldOut { sku: sku.to_string() })
    } else {
        None
    };
    let redis = app.redis_gate.clone().filter(|_| refusal.is_none());
    let admission = match &redis {
        Some(g) => (g.admit(sku, &user, qty, cfg.per_user_limit, order.idem_key.as_deref())).await,
        None => Admission::Pass { mark: None },
    };
    // The attempt before under this key is still in the store, and the units Redis counts may be its own:
    // refused, a buyer whose first answer was lost could be told `sold_out` and then hold that order. One
    // given up on keeps its mark while it may still commit: once it has, its order is the answer (told
    // `in_progress`, its buyer waited out the mark's life).
    if admission == Admission::InFlight {
        drop(placing);
        return match stored_answer(app, order).await {
            Some(answer) => answer,
            None => in_progress(),
        };
    }
    let refusal = refusal.or(match admission {
        Admission::SoldOut => Some(Reject::SoldOut { sku: sku.to_string() }),
        Admission::OverLimit => Some(Reject::LimitExceeded {
            user: user.clone(),
            sku: sku.to_string(),
            limit: cfg.per_user_limit,
        }),
        _ => None,
    });
    if let Some(refusal) = refusal {
        drop(placing);
        if let Some(answer) = stored_answer(app, order).await {
            return answer;
        }
        return reject(&refusal);
    }
    // The store's answer and the gates' bookkeeping after it run on a task of their own: a client that goes
    // away while the store works drops this handler, and with it, before, the give-back of the unit the gate
    // took, which its count kept (a buyer refused `limit_exceeded` for the count's life).
    let (app, sku, sold_out_gate) = (app.clone(), sku.to_string(), cfg.sold_out_gate);
    let key = order.idem_key.clone();
    let keyed = key.is_some();
    let settled = tokio::spawn(async move {
        // Counted in `in_flight` until it settles, its client there or not: counted by the handler alone,
        // work whose clients had left escaped the admission limit, and piled up in the store's lanes while
        // new requests were admitted.
        let _held = held;
        let sku = sku.as_str();
        let asked = app.gate.generation();
        let out = place(&app, order, placing).await;
        if let Ok(Err(Reject::SoldOut { .. })) = &out {
            app.gate.mark(sku, sold_out_gate, asked);
        }
        if let Some(g) = &redis
            && matches!(&out, Ok(r) if !matches!(r, Err(Reject::NotFound { .. })))
        {
            g.heat(sku);
        }
        // What the gate took is given back unless it became a new order (a replay took nothing), and a keyed
        // attempt is taken off its key's mark unless it may still commit.
        if let Some(g) = &redis {
            let outcome = match &out {
                Ok(Ok(c)) if !c.replay => Outcome::Ordered,
                Err(StoreError::Unsettled(_)) => Outcome::MayCommit,
                _ => Outcome::NotOrdered,
            };
            g.settle(sku, &user, qty, key.as_deref(), admission, outcome)
                .await;
        }
        out
    });
    match settled.await {
        // Without a key a retry buys again: one the store did not confirm may still commit, and answered
        // "retry later" a buyer under a limit of 2 held two orders, or under 1 was told `limit_exceeded`
        // while holding the first.
        Ok(Err(e)) if !keyed => unkeyed_write_failed(&e),
        Ok(out) => created(out),
        Err(e) => created(Err(StoreError::Internal(format!("order task: {e}")))),
    }
}

/// The answer to a request a gate refuses, if its idempotency key has one: the order an earlier attempt
/// under it stored, or `in_progress` while an attempt under it (on this instance, or on any with PostgreSQL)
/// may still commit. None for a key that holds nothing, and for an order without a key.
async fn stored_answer(app: &Arc<App>, order: NewOrder) -> Option<Response<Body>> {
    let key = order.idem_key.as_deref()?;
    if app.placing.holds(&order.user, key) {
        return Some(in_progress());
    }
    match app.exec.read(move |s| s.keyed_answer(&order)).await {
        Ok(Keyed::Stored(answer)) => Some(created(Ok(answer))),
        Ok(Keyed::Writing) => Some(in_progress()),
        Ok(Keyed::Free) => None,
        Err(e) => Some(created(Err(e))),
    }
}

/// 409 `in_progress`: an attempt under the request's idempotency key has not settled yet; the same request
/// later gets that attempt's answer (the IETF draft on `Idempotency-Key` answers a concurrent retry so).
fn in_progress() -> Response<Body> {
    let mut resp = error(
        StatusCode::CONFLICT,
        "in_progress",
        "a request under this Idempotency-Key is still being processed; retry it in a moment",
    );
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    resp
}

/// `GET /v1/orders/{id}`.
pub async fn get(app: &Arc<App>, id: &str, buyer: &Buyer) -> Response<Body> {
    if let Err(resp) = path_id("order", id) {
        return resp;
    }
    let id = id.to_string();
    let key = id.clone();
    match app.exec.read(move |s| s.get_order(&key)).await {
        Ok(Some(o)) if buyer.may_act_for(&o.user) => json(StatusCode::OK, &o),
        // Another buyer's order is not there for this one: a 403 would say that it exists.
        Ok(_) => reject(&Reject::NotFound { what: "order", id }),
        Err(e) => store_failed(&e),
    }
}

/// `Ok` when `buyer` may act on order `id`; the answer otherwise (404 for another buyer's order, as for
/// one that is not there). Read before the call acts: an order's user never changes.
pub(super) async fn owned(app: &App, id: &str, buyer: &Buyer) -> Result<(), Response<Body>> {
    let Buyer::Only(user) = buyer else {
        return Ok(());
    };
    let key = id.to_string();
    match app.exec.read(move |s| s.get_order(&key)).await {
        Ok(Some(o)) if o.user == *user => Ok(()),
        Ok(_) => Err(reject(&Reject::NotFound {
            what: "order",
            id: id.to_string(),
        })),
        Err(e) => Err(store_failed(&e)),
    }
}

/// `GET /v1/users/{user}/orders?limit=N&before=CURSOR`: the user's orders, newest first (limit 1..=100,
/// default 20); `next_before` is the cursor of the next page (`null` on the last).
pub async fn user_orders(
    app: &Arc<App>,
    user: &str,
    buyer: &Buyer,
    req: &Request<Incoming>,
) -> Response<Body> {
    if let Err(resp) = path_id("user", user).and_then(|()| buyer.check(user)) {
        return resp;
    }
    let pairs = match query_pairs(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", &e),
    };
    let (mut before, mut limit) = (None, 20u32);
    for (k, v) in pairs {
        let bad = |what: &str| error(StatusCode::BAD_REQUEST, "bad_query", &format!("{k}={v:?} {what}"));
        match k.as_str() {
            "limit" => match v.parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => limit = n,
                _ => return bad("is not in 1..=100"),
            },
            "before" => match parse_cursor(&v) {
                Some(c) => before = Some(c),
                None => return bad("is not a cursor from next_before"),
            },
            _ => return bad("is not a query parameter here (limit, before)"),
        }
    }
    let who = user.to_string();
    match app.exec.read(move |s| s.user_orders(&who, before, limit)).await {
        Ok(orders) => {
            let next = orders
                .last()
                .filter(|_| orders.len() == limit as usize)
                .map(|o| format!("{}-{}", o.created_ms, o.id));
            json(
                StatusCode::OK,
                &serde_json::json!({ "user": user, "orders": orders, "next_before": next }),
            )
        }
        Err(e) => store_failed(&e),
    }
}

/// A `next_before` cursor: `<created_ms>-<order id>`.
fn parse_cursor(v: &str) -> Option<(i64, String)> {
    let (ms, id) = v.split_once('-')?;
    let ms: i64 = ms.parse().ok().filter(|ms| *ms >= 0)?;
    crate::domain::valid_id(id).then(|| (ms, id.to_string()))
}

/// `POST /v1/orders/{id}/cancel`: gives a reservation back; a second cancel answers the same.
pub async fn cancel(app: &Arc<App>, id: &str, buyer: &Buyer) -> Response<Body> {
    if let Err(resp) = path_id("order", id) {
        return resp;
    }
    if let Err(resp) = owned(app, id, buyer).await {
        return resp;
    }
    let (task_app, id) = (app.clone(), id.to_string());
    // The cancel and its give-back at the gates on a task of their own (`settle`), as a flash-sale
    // attempt's: only the cancel that ended the order gives back, so one given up on between the two lost
    // the give-back for good.
    let out = super::settle(app, "cancel", async move {
        let out = task_app.exec.run_to_end(move |s| s.cancel(&id)).await;
        if let Ok(Ok((view, ended))) = &out
            && *ended
            && view.status == OrderStatus::Cancelled.as_str()
        {
            forget_at_gate(&task_app, view, Freed::Units).await;
        }
        out
    })
    .await;
    respond(StatusCode::OK, out.map(|r| r.map(|(view, _)| view)))
}

/// What an order's end gave back, for [`forget_at_gate`].
pub(super) enum Freed<'a> {
    /// A cancelled reservation: every unit of its lines is back on sale.
    Units,
    /// A refund, in full or in part: the buyer's allowance, and the units it put back on sale per SKU
    /// (`Refunded::restocked`: none once the order had shipped).
    Refunded(&'a [(String, i64)]),
}

/// The Redis gate counted the buyer's flash-sale units; the store no longer counts those of an order that
/// ended (cancelled) or were refunded, so neither may the gate, or it refuses a purchase the store would make
/// for as long as its counter lives. Those units are back on sale (unless a refunded order had shipped), so
/// this instance's sold-out mark on them goes too, and the units a cancel or a refund put back on sale go on
/// the gate's stock counter: it may only refuse what the store would. (The sweeper does the same for expired
/// ones.)
pub(super) async fn forget_at_gate(app: &App, view: &crate::store::OrderView, freed: Freed<'_>) {
    if view.kind != OrderKind::Seckill.as_str() {
        // A regular order's cancelled or refunded units are on sale again too, which a flash sale of the SKU
        // sells from the shelf.
        match freed {
            Freed::Refunded(restocked) => app.back_on_sale(restocked).await,
            Freed::Units => {
                let lines = view.lines.iter();
                let cancelled: Vec<_> = lines.map(|l| (l.sku.clone(), l.qty - l.refunded_qty)).collect();
                app.back_on_sale(&cancelled).await
            }
        }
        return;
    }
    for line in &view.lines {
        // The gate counted the line in the sale it was sold in (every flash-sale line has one).
        if let Some(g) = &app.redis_gate
            && let Some(sale) = line.sale_seq
        {
            let units = match freed {
                Freed::Units => line.qty - line.refunded_qty,
                Freed::Refunded(restocked) => (restocked.iter())
                    .find(|(sku, _)| *sku == line.sku)
                    .map_or(0, |(_, qty)| *qty),
            };
            g.forget(&line.sku, sale, &view.user, u32::try_from(units).unwrap_or(0))
                .await;
        }
        app.gate.clear(&line.sku);
    }
}

/// `POST /v1/orders/{id}/fulfil` (merchant; bearer token).
pub async fn fulfil(app: &Arc<App>, cfg: &Config, id: &str, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    if let Err(resp) = path_id("order", id) {
        return resp;
    }
    let id = id.to_string();
    respond(StatusCode::OK, app.exec.run(move |s| s.fulfil(&id)).await)
}
