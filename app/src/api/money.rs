//! Payment and settlement (`pay` type): wallet payments, provider callbacks (idempotent by `payment_id`),
//! refunds, wallet balances, wallet credits and merchant settlement batches (admin, bearer token).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_runtime::http::{Body, decode_json, error, json, read_body, read_json};

use super::bodies::{CreditReq, RefundReq, check_callback};
use super::buyers::Buyer;
use super::signature;
use super::{
    App, BODY_TIMEOUT, authorized, idem_key, keyed_json, path_id, reject, respond, store_failed,
    unkeyed_write_failed,
};
use crate::Config;
use crate::degrade::Level;
use crate::store::{PaymentCallback, RefundRequest};

fn inline_weak(app: &App) -> bool {
    app.degrade.level() == Level::Sync
}

/// `POST /v1/orders/{id}/pay`: pays from the buyer's wallet; paying a paid order answers the same.
pub async fn pay(app: &Arc<App>, id: &str, buyer: &Buyer) -> Response<Body> {
    if let Err(resp) = path_id("order", id) {
        return resp;
    }
    if let Err(resp) = super::orders::owned(app, id, buyer).await {
        return resp;
    }
    let id = id.to_string();
    let weak = inline_weak(app);
    respond(
        StatusCode::OK,
        app.exec.run(move |s| s.pay_wallet(&id, weak)).await,
    )
}

/// `POST /v1/payments/callback` (from the payment provider): signed with `payment_callback_secret` when one
/// is set (`X-Signature`, see `signature`), else with the bearer token.
pub async fn callback(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    let signed = !cfg.callback_secret.is_empty();
    if !signed && let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    let header = req
        .headers()
        .get(signature::HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = match read_body(req.into_body(), cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    if signed {
        let now = u64::try_from(crate::domain::now_ms() / 1000).unwrap_or(0);
        if let Err(why) = signature::verify(&cfg.callback_secret, header.as_deref(), &bytes, now) {
            metrics::counter!(crate::metrics::CALLBACKS_REFUSED_TOTAL).increment(1);
            tracing::warn!(reason = %why, "payment callback refused");
            return error(StatusCode::UNAUTHORIZED, "bad_signature", &why);
        }
    }
    let cb: PaymentCallback = match decode_json(&bytes) {
        Ok(b) => b,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_json", &msg),
    };
    if let Err((code, msg)) = check_callback(&cb) {
        return error(StatusCode::BAD_REQUEST, code, &msg);
    }
    let weak = inline_weak(app);
    respond(
        StatusCode::OK,
        app.exec.run(move |s| s.payment_callback(&cb, weak)).await,
    )
}

/// `POST /v1/refunds` `{"order_id": "...", "lines"?: [{"sku", "qty"}]}` (merchant; bearer token). Without
/// `lines` every unit not refunded yet is refunded (a refunded order answers the same, nothing posted); with
/// them only those units, and an `Idempotency-Key` is required: a retried partial refund without one would
/// refund twice. A key is the order's own: its replay answers the first result (`idempotent-replay: true`),
/// another body under it is 422.
pub async fn refund(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    let key = match idem_key(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let body: RefundReq = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Err((code, msg)) = body.check() {
        return error(StatusCode::BAD_REQUEST, code, &msg);
    }
    if body.lines.is_some() && key.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "a partial refund (with lines) needs an Idempotency-Key header, so a retry cannot refund twice",
        );
    }
    let r = RefundRequest::new(&body.order_id, body.lines, key);
    let weak = inline_weak(app);
    // The refund and its give-back at the gates on a task of their own, as a cancel's: a merchant gone
    // between the two (its handler dropped) lost the give-back for good.
    let task_app = app.clone();
    let out = super::settle(app, "refund", async move {
        let out = task_app.exec.run_to_end(move |s| s.refund(&r, weak)).await;
        if let Ok(Ok(done)) = &out {
            // A partial refund's units leave the buyer's flash-sale count in the store, as a full one's do,
            // and those back on sale go on the gate's stock counter.
            let freed = super::orders::Freed::Refunded(&done.restocked);
            super::orders::forget_at_gate(&task_app, &done.order, freed).await;
        }
        out
    })
    .await;
    match out {
        Ok(Ok(done)) => keyed_json(StatusCode::OK, &done.order, done.replay),
        Ok(Err(r)) => reject(&r),
        Err(e) => store_failed(&e),
    }
}

/// `GET /v1/wallets/{user}`.
pub async fn wallet(app: &Arc<App>, user: &str, buyer: &Buyer) -> Response<Body> {
    if let Err(resp) = path_id("user", user).and_then(|()| buyer.check(user)) {
        return resp;
    }
    let account = crate::store::wallet_account(user);
    let key = account.clone();
    match app.exec.read(move |s| s.balance(&key)).await {
        Ok(b) => json(
            StatusCode::OK,
            &serde_json::json!({ "account": account, "balance_cents": b }),
        ),
        Err(e) => store_failed(&e),
    }
}

/// `GET /v1/merchant/shops/{id}` (bearer token): what shop `id` is owed (paid orders not yet settled, less
/// refunds) and what settlement has paid out to it.
pub async fn shop(app: &Arc<App>, cfg: &Config, id: &str, req: &Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, req) {
        return refused;
    }
    let Ok(shop_id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_id",
            &format!("shop id {id:?} is not a number"),
        );
    };
    let balances = app
        .exec
        .read(move |s| {
            if !s.shop_exists(shop_id)? {
                return Ok(None);
            }
            Ok(Some((
                s.balance(&crate::store::shop_account(shop_id))?,
                s.balance(&crate::store::payout_account(shop_id))?,
            )))
        })
        .await;
    match balances {
        // Zeros for a shop that does not exist read as a real shop with nothing owed.
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found", &format!("no shop {shop_id}")),
        Ok(Some((owed, paid_out))) => json(
            StatusCode::OK,
            &serde_json::json!({ "shop_id": shop_id, "receivable_cents": owed, "paid_out_cents": paid_out }),
        ),
        Err(e) => store_failed(&e),
    }
}

/// `POST /admin/credit` `{"users": [...], "amount_cents": N}` (bearer token): tops wallets up from `mint`. With
/// an `Idempotency-Key` a retried credit posts once (the replay answers the same, `idempotent-replay: true`).
pub async fn credit(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    let key = match idem_key(&req) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let body: CreditReq = match read_json(req, 1024 * 1024, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Err((code, msg)) = body.check() {
        return error(StatusCode::BAD_REQUEST, code, &msg);
    }
    let n = body.users.len();
    let keyed = key.is_some();
    let posted = app
        .exec
        .run(move |s| match key {
            Some(key) => s.credit_once(&key, &body.users, body.amount_cents),
            None => s.credit(&body.users, body.amount_cents).map(|()| Ok(false)),
        })
        .await;
    match posted {
        Ok(Ok(replay)) => keyed_json(StatusCode::OK, &serde_json::json!({ "credited": n }), replay),
        Ok(Err(r)) => reject(&r),
        Err(e) if keyed => store_failed(&e),
        Err(e) => unkeyed_write_failed(&e),
    }
}

/// `POST /admin/settlements` (bearer token): one settlement batch over every merchant.
pub async fn settle(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if let Err(refused) = authorized(cfg, &req) {
        return refused;
    }
    match app.exec.run(|s| s.settle()).await {
        Ok(batch) => json(StatusCode::OK, &serde_json::json!({ "settlements": batch })),
        Err(e) => store_failed(&e),
    }
}
