//! Payment and settlement (`pay` type): wallet payments, provider callbacks (idempotent by `payment_id`),
//! refunds, wallet balances, wallet credits and merchant settlement batches (admin, bearer token).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use xcluster_runtime::http::{Body, error, json, read_json, unauthorized};

use super::{App, BODY_TIMEOUT, authorized, path_id, respond, store_failed};
use crate::Config;
use crate::degrade::Level;
use crate::domain::{Cents, valid_id};
use crate::store::PaymentCallback;

/// Most wallets credited in one call.
const MAX_CREDIT_USERS: usize = 10_000;
/// Largest single credit, in cents.
const MAX_CREDIT: Cents = 1_000_000_000;

fn inline_weak(app: &App) -> bool {
    app.degrade.level() == Level::Sync
}

/// `POST /v1/orders/{id}/pay`: pays from the buyer's wallet; paying a paid order answers the same.
pub async fn pay(app: &Arc<App>, id: &str) -> Response<Body> {
    if let Err(resp) = path_id("order", id) {
        return resp;
    }
    let id = id.to_string();
    let weak = inline_weak(app);
    respond(
        StatusCode::OK,
        app.exec.run(move |s| s.pay_wallet(&id, weak)).await,
    )
}

/// `POST /v1/payments/callback` (from the payment provider; bearer token).
pub async fn callback(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if !authorized(cfg, &req) {
        return unauthorized();
    }
    let cb: PaymentCallback = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if !valid_id(&cb.payment_id) || !valid_id(&cb.order_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_callback",
            "payment_id and order_id must be 1..=64 bytes of [A-Za-z0-9._:-]",
        );
    }
    if cb.status != "succeeded" && cb.status != "failed" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_callback",
            &format!("status {:?} is not succeeded or failed", cb.status),
        );
    }
    if !(0..=MAX_CREDIT).contains(&cb.amount_cents) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_callback",
            &format!("amount_cents {} is out of range", cb.amount_cents),
        );
    }
    let weak = inline_weak(app);
    respond(
        StatusCode::OK,
        app.exec.run(move |s| s.payment_callback(&cb, weak)).await,
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundReq {
    order_id: String,
}

/// `POST /v1/refunds` `{"order_id": "..."}` (merchant; bearer token). A second refund answers the same.
pub async fn refund(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if !authorized(cfg, &req) {
        return unauthorized();
    }
    let body: RefundReq = match read_json(req, cfg.max_body_bytes, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Err(resp) = path_id("order", &body.order_id) {
        return resp;
    }
    let weak = inline_weak(app);
    respond(
        StatusCode::OK,
        app.exec.run(move |s| s.refund(&body.order_id, weak)).await,
    )
}

/// `GET /v1/wallets/{user}`.
pub async fn wallet(app: &Arc<App>, user: &str) -> Response<Body> {
    if let Err(resp) = path_id("user", user) {
        return resp;
    }
    let account = crate::store::sqlite::wallet_account(user);
    let key = account.clone();
    match app.exec.run(move |s| s.balance(&key)).await {
        Ok(b) => json(
            StatusCode::OK,
            &serde_json::json!({ "account": account, "balance_cents": b }),
        ),
        Err(e) => store_failed(&e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditReq {
    users: Vec<String>,
    amount_cents: Cents,
}

/// `POST /admin/credit` `{"users": [...], "amount_cents": N}` (bearer token): tops wallets up from `mint`.
pub async fn credit(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if !authorized(cfg, &req) {
        return unauthorized();
    }
    let body: CreditReq = match read_json(req, 1024 * 1024, BODY_TIMEOUT).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if body.users.is_empty() || body.users.len() > MAX_CREDIT_USERS {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_credit",
            &format!("users must hold 1..={MAX_CREDIT_USERS} ids"),
        );
    }
    if let Some(bad) = body.users.iter().find(|u| !valid_id(u)) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_credit",
            &format!("user {bad:?} is not 1..=64 bytes of [A-Za-z0-9._:-]"),
        );
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = body.users.iter().find(|u| !seen.insert(u.as_str())) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_credit",
            &format!("user {dup:?} is listed twice"),
        );
    }
    if !(1..=MAX_CREDIT).contains(&body.amount_cents) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_credit",
            &format!("amount_cents {} is not in 1..={MAX_CREDIT}", body.amount_cents),
        );
    }
    let n = body.users.len();
    match app
        .exec
        .run(move |s| s.credit(&body.users, body.amount_cents))
        .await
    {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "credited": n })),
        Err(e) => store_failed(&e),
    }
}

/// `POST /admin/settlements` (bearer token): one settlement batch over every merchant.
pub async fn settle(app: &Arc<App>, cfg: &Config, req: Request<Incoming>) -> Response<Body> {
    if !authorized(cfg, &req) {
        return unauthorized();
    }
    match app.exec.run(|s| s.settle()).await {
        Ok(batch) => json(StatusCode::OK, &serde_json::json!({ "settlements": batch })),
        Err(e) => store_failed(&e),
    }
}
