//! The HTTP/JSON API: routing, request classification (for `/v1/stats`), admission against capacity, the
//! CPU-work knob, and the mapping of domain rejections and store failures to JSON errors. One file per area:
//! `catalog` (browse), `orders` (order and seckill), `money` (pay, callbacks, refunds, wallets, settlement),
//! `admin` (audit, degrade, stats, merchant updates).

// Handlers return an error response by value once per request; boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod admin;
pub mod bodies;
mod buyers;
mod catalog;
mod money;
mod orders;
pub mod signature;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;
use xcluster_runtime::http::{Body, Handler, error, method_not_allowed};

use crate::Config;
use crate::degrade::{Degrade, Level};
use crate::domain::Reject;
use crate::domain::request::valid_idem_key;
use crate::exec::StoreExec;
use crate::gate::SoldOutGate;
use crate::queue::Batcher;
use crate::stats::{ReqType, Stats, Unavailable};
use crate::store::StoreError;

/// Time allowed for a request body to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs.
#[derive(Debug)]
pub struct App {
    pub config: watch::Receiver<Arc<Config>>,
    pub exec: StoreExec,
    pub batcher: Batcher,
    pub degrade: Degrade,
    pub stats: Arc<Stats>,
    pub gate: SoldOutGate,
    /// The shared Redis gate (issue 8), when `redis_url` is set.
    pub redis_gate: Option<Arc<crate::gate_redis::RedisGate>>,
    pub health: xcluster_runtime::health::Health,
    pub queue_depth: std::sync::atomic::AtomicU64,
    /// Held by the audit that runs (`GET /admin/audit`, no token, scans every table): callers take turns,
    /// so a loop of them holds one read lane, not all of them (browsing and the stats sampler queued
    /// behind).
    pub audits: tokio::sync::Mutex<()>,
    /// `X-XCluster-Instance` of every answer: this instance's id, which tells a client behind an L4 proxy
    /// (`xcluster load --via proxy`, whose report of backend shares named only the proxy's listener) which
    /// backend answered. `None` if the id is no header value.
    pub instance_header: Option<http::HeaderValue>,
    /// The keyed flash-sale attempts this instance is placing, which a retry refused by a gate must not be
    /// told `sold_out` while they may commit.
    pub placing: Arc<crate::placing::Placing>,
    /// The store's clock, which reservations are timed by (`Store::clock`).
    pub clock: crate::domain::Clock,
}

impl App {
    pub fn cfg(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Units an order's end (a cancel, an expiry, a refund) put back on the shelf, per SKU, once committed:
    /// on the Redis gate's stock counter, if it has one (`restock` touches no other), and off this instance's
    /// sold-out mark. A flash sale of the SKU sells them, and left to the gates' next rebuild or the mark's
    /// end, they were refused `sold_out` until then.
    pub async fn back_on_sale(&self, units: &[(String, i64)]) {
        for (sku, qty) in units {
            let Ok(qty @ 1..) = u32::try_from(*qty) else {
                continue;
            };
            if let Some(g) = &self.redis_gate {
                g.restock(sku, qty).await;
            }
            self.gate.clear(sku);
        }
    }
}

/// A route with its captured path parts.
#[derive(Debug)]
enum Route {
    Products,
    Product(String),
    Order(String),
    UserOrders(String),
    Wallet(String),
    CreateOrder,
    Pay(String),
    Cancel(String),
    Fulfil(String),
    Seckill(String),
    Callback,
    Refund,
    MerchantStock,
    Shop(String),
    FlashSale(String),
    CloseFlashSale(String),
    Stats,
    Audit,
    DegradeGet,
    DegradeSet,
    Credit,
    Settle,
}

/// Finds the route: `Err(Some(allow))` when the path exists with other methods (`allow` names them),
/// `Err(None)` when it does not.
fn route(method: &Method, path: &str) -> Result<(ReqType, Route), Option<&'static str>> {
    const GET: &str = "GET";
    const POST: &str = "POST";
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let s = |v: &str| v.to_string();
    let (allow, r) = match parts.as_slice() {
        ["v1", "products"] => (GET, (ReqType::Browse, Route::Products)),
        ["v1", "products", id] => (GET, (ReqType::Browse, Route::Product(s(id)))),
        ["v1", "orders"] => (POST, (ReqType::Order, Route::CreateOrder)),
        ["v1", "orders", id] => (GET, (ReqType::Browse, Route::Order(s(id)))),
        ["v1", "orders", id, "pay"] => (POST, (ReqType::Pay, Route::Pay(s(id)))),
        ["v1", "orders", id, "cancel"] => (POST, (ReqType::Order, Route::Cancel(s(id)))),
        ["v1", "orders", id, "fulfil"] => (POST, (ReqType::Order, Route::Fulfil(s(id)))),
        ["v1", "wallets", user] => (GET, (ReqType::Browse, Route::Wallet(s(user)))),
        ["v1", "users", user, "orders"] => (GET, (ReqType::Browse, Route::UserOrders(s(user)))),
        ["v1", "seckill", sku] => (POST, (ReqType::Seckill, Route::Seckill(s(sku)))),
        ["v1", "payments", "callback"] => (POST, (ReqType::Pay, Route::Callback)),
        ["v1", "refunds"] => (POST, (ReqType::Pay, Route::Refund)),
        ["v1", "merchant", "stock"] => (POST, (ReqType::Admin, Route::MerchantStock)),
        ["v1", "merchant", "shops", id] => (GET, (ReqType::Admin, Route::Shop(s(id)))),
        ["v1", "merchant", "flash-sales", sku] if method == Method::POST => {
            (POST, (ReqType::Admin, Route::FlashSale(s(sku))))
        }
        ["v1", "merchant", "flash-sales", sku] if method == Method::DELETE => {
            ("DELETE", (ReqType::Admin, Route::CloseFlashSale(s(sku))))
        }
        ["v1", "merchant", "flash-sales", _] => return Err(Some("POST, DELETE")),
        ["v1", "stats"] => (GET, (ReqType::Admin, Route::Stats)),
        ["admin", "audit"] => (GET, (ReqType::Admin, Route::Audit)),
        ["admin", "degrade"] if method == Method::GET => (GET, (ReqType::Admin, Route::DegradeGet)),
        ["admin", "degrade"] if method == Method::POST => (POST, (ReqType::Admin, Route::DegradeSet)),
        ["admin", "degrade"] => return Err(Some("GET, POST")),
        ["admin", "credit"] => (POST, (ReqType::Admin, Route::Credit)),
        ["admin", "settlements"] => (POST, (ReqType::Admin, Route::Settle)),
        _ => return Err(None),
    };
    if method.as_str() == allow {
        Ok(r)
    } else {
        Err(Some(allow))
    }
}

/// The app's request handler.
pub fn handler(app: Arc<App>) -> Handler {
    Arc::new(move |req, _peer: SocketAddr| {
        let app = app.clone();
        Box::pin(async move { dispatch(app, req).await })
    })
}

async fn dispatch(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let mut resp = answer(&app, req).await;
    if let Some(id) = &app.instance_header {
        resp.headers_mut().insert(INSTANCE_HEADER, id.clone());
    }
    resp
}

/// Names the instance that answered ([`App::instance_header`]).
pub const INSTANCE_HEADER: http::HeaderName = http::HeaderName::from_static("x-xcluster-instance");

async fn answer(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let (ty, r) = match route(req.method(), req.uri().path()) {
        Ok(found) => found,
        Err(Some(allow)) => return method_not_allowed(req.method(), req.uri().path(), allow),
        Err(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {}", req.uri().path()),
            );
        }
    };
    if matches!(r, Route::Stats) {
        return admin::stats(app);
    }
    let mut held = Some(app.stats.enter());
    let resp = admitted(app, ty, r, req, &mut held).await;
    let unavailable = resp.extensions().get::<Unavailable>().copied();
    let before_work = resp.extensions().get::<crate::stats::BeforeWork>().is_some();
    app.stats
        .record(ty, started, resp.status().as_u16(), unavailable, before_work);
    resp
}

/// `counted` counts the request in `in_flight`; a handler whose work may outlive it (a flash-sale attempt,
/// whose store call runs on if its client leaves) takes it along.
async fn admitted(
    app: &Arc<App>,
    ty: ReqType,
    r: Route,
    req: Request<Incoming>,
    counted: &mut Option<crate::stats::InFlight>,
) -> Response<Body> {
    let cfg = app.cfg();
    let level = app.degrade.level();
    // Shedding halves the admission limit: the tighter rate limit of the shed level.
    let capacity = if level >= Level::Shed {
        cfg.capacity / 2
    } else {
        cfg.capacity
    }
    .max(1);
    // Every request in a handler, those waiting in the order queue or for a store lane included: adding the
    // queue's count counted those twice, so an instance refused at half its capacity when its store was slow.
    let held = app.stats.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    if held > capacity && ty != ReqType::Admin {
        return retry_later(
            Unavailable::Overloaded,
            &format!("{held} requests held, capacity {capacity}"),
        );
    }
    if level == Level::ReadOnly && req.method() == Method::POST && ty != ReqType::Admin {
        return retry_later(
            Unavailable::ReadOnly,
            "the store is in read-only degrade; retry later",
        );
    }
    let for_buyer = matches!(
        r,
        Route::Order(_)
            | Route::Wallet(_)
            | Route::UserOrders(_)
            | Route::CreateOrder
            | Route::Seckill(_)
            | Route::Pay(_)
            | Route::Cancel(_)
    );
    let buyer = match for_buyer {
        true => match buyers::Buyer::of(&cfg, &req) {
            Ok(b) => b,
            Err(refused) => return refused,
        },
        false => buyers::Buyer::Any,
    };
    if let Some(us) = cfg.cpu_us.get(ty.name()).copied().filter(|us| *us > 0) {
        burn(Duration::from_micros(us));
    }
    match r {
        Route::Products => catalog::list(app, &req).await,
        Route::Product(id) => catalog::product(app, &id).await,
        Route::Order(id) => orders::get(app, &id, &buyer).await,
        Route::Wallet(user) => money::wallet(app, &user, &buyer).await,
        Route::UserOrders(user) => orders::user_orders(app, &user, &buyer, &req).await,
        Route::CreateOrder => orders::create(app, &cfg, &buyer, req).await,
        Route::Seckill(sku) => orders::seckill(app, &cfg, &sku, &buyer, req, counted.take()).await,
        Route::Pay(id) => money::pay(app, &id, &buyer).await,
        Route::Cancel(id) => orders::cancel(app, &id, &buyer).await,
        Route::Fulfil(id) => orders::fulfil(app, &cfg, &id, req).await,
        Route::Callback => money::callback(app, &cfg, req).await,
        Route::Refund => money::refund(app, &cfg, req).await,
        Route::MerchantStock => admin::merchant_stock(app, &cfg, req).await,
        Route::Shop(id) => money::shop(app, &cfg, &id, &req).await,
        Route::FlashSale(sku) => admin::flash_sale(app, &cfg, &sku, req).await,
        Route::CloseFlashSale(sku) => admin::close_flash_sale(app, &cfg, &sku, req).await,
        Route::Stats => admin::stats(app),
        Route::Audit => admin::audit(app, counted).await,
        Route::DegradeGet => admin::degrade_get(app),
        Route::DegradeSet => admin::degrade_set(app, &cfg, req).await,
        Route::Credit => money::credit(app, &cfg, req).await,
        Route::Settle => money::settle(app, &cfg, req).await,
    }
}

/// What [`settle`] waits past the store's bound: for the task's own answer at the bound (`Busy`).
const SETTLE_MARGIN: Duration = Duration::from_millis(100);

/// Runs `work` (a store call with [`crate::exec::StoreExec::run_to_end`], and its give-backs at the gates)
/// on a task of its own, waiting for it within the store's bound: past it, the answer is that the call may
/// still commit (`Unsettled`), and the task goes on, its give-backs with it. With `run`, a call that
/// committed after its bound was given up on and its give-backs with it, which no retry brought back (the
/// order was refunded or cancelled already); dropped with a client gone mid-way, the same. The wait is the
/// bound and a little more, so a call given up before it began answers its own `Busy`.
pub(super) async fn settle<T: Send + 'static>(
    app: &Arc<App>,
    what: &str,
    work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let settled = tokio::spawn(work);
    let done = match app.exec.call_bound() {
        Some(bound) => match tokio::time::timeout(bound + SETTLE_MARGIN, settled).await {
            Ok(done) => done,
            Err(_) => {
                let why = format!(
                    "the store did not answer the {what} within {} ms",
                    bound.as_millis()
                );
                return Err(StoreError::Unsettled(why));
            }
        },
        None => settled.await,
    };
    done.unwrap_or_else(|e| Err(StoreError::Internal(format!("{what} task: {e}"))))
}

/// The CPU-work knob: busy work on the request's own worker, as a slow instance would do.
fn burn(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < end {
        for i in 0..256u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
}

/// A retryable refusal: 503 with `Retry-After`, its reason kept in the response's extensions for
/// [`Stats::record`] (the request metrics count each reason apart from a 500).
fn retry_later(why: Unavailable, msg: &str) -> Response<Body> {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, why.code(), msg);
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp.extensions_mut().insert(why);
    resp
}

/// A keyed request's JSON answer: a replay (the key's first answer again, nothing done) says so in
/// `Idempotent-Replay: true`.
fn keyed_json(status: StatusCode, body: &impl serde::Serialize, replay: bool) -> Response<Body> {
    let mut resp = xcluster_runtime::http::json(status, body);
    if replay {
        resp.headers_mut()
            .insert("idempotent-replay", HeaderValue::from_static("true"));
    }
    resp
}

/// The answer to a domain rejection.
fn reject(r: &Reject) -> Response<Body> {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::CONFLICT);
    error(status, r.code(), &r.to_string())
}

/// The answer to a store failure: busy is retryable (503), anything else is ours (500). A write that may still
/// commit is retryable too: this answers requests whose retry replays (an idempotency key, or a state change
/// that a second time finds done); see [`unkeyed_write_failed`] for those whose retry would apply again.
fn store_failed(e: &StoreError) -> Response<Body> {
    match e {
        StoreError::Busy(_) | StoreError::Unsettled(_) => retry_later(Unavailable::StoreBusy, &e.to_string()),
        StoreError::Internal(_) => {
            tracing::error!(error = %e, "store failure");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &e.to_string())
        }
    }
}

/// The answer to a store failure of a write sent without an idempotency key whose retry would apply it again
/// (a credit, a stock batch): one given up on while it ran may still commit, so it is 504 `outcome_unknown`,
/// with no `Retry-After`. Answered "retry later", an operator's retry of a slow batch credited every wallet
/// twice once both committed.
fn unkeyed_write_failed(e: &StoreError) -> Response<Body> {
    match e {
        StoreError::Unsettled(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome_unknown",
            &format!(
                "{e}, and the write may still apply: check before sending it again, or send it with an \
                 Idempotency-Key, whose retry is safe"
            ),
        ),
        _ => store_failed(e),
    }
}

/// Maps a store call's outcome to a response with `ok` as the success status.
fn respond<T: serde::Serialize>(ok: StatusCode, r: Result<Result<T, Reject>, StoreError>) -> Response<Body> {
    match r {
        Ok(Ok(v)) => xcluster_runtime::http::json(ok, &v),
        Ok(Err(rej)) => reject(&rej),
        Err(e) => store_failed(&e),
    }
}

/// Checks the admin bearer token of a mutating call: the refusal to answer with, if any.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once per refused request
fn authorized(cfg: &Config, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    xcluster_runtime::http::authorize(req, &cfg.admin_token, "admin_token")
}

/// The `Idempotency-Key` header: `Ok(None)` when absent, an error response when malformed.
fn idem_key(req: &Request<Incoming>) -> Result<Option<String>, Response<Body>> {
    let mut all = req.headers().get_all("idempotency-key").iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    // Two keys name two requests: taking the first silently made a client's retry under the second a new
    // order.
    if all.next().is_some() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
            "one Idempotency-Key header, not several",
        ));
    }
    match v.to_str() {
        Ok(s) if valid_idem_key(s) => Ok(Some(s.to_string())),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
            "Idempotency-Key must be 1..=128 printable ASCII bytes",
        )),
    }
}

/// An id from the path, validated.
fn path_id(what: &str, id: &str) -> Result<(), Response<Body>> {
    if crate::domain::valid_id(id) {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "bad_id",
            &crate::domain::request::bad_id(&format!("{what} id"), id),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_classify_and_refuse() {
        let t = |m: Method, p: &str| route(&m, p).map(|(t, _)| t);
        assert_eq!(t(Method::GET, "/v1/products"), Ok(ReqType::Browse));
        assert_eq!(t(Method::POST, "/v1/orders"), Ok(ReqType::Order));
        assert_eq!(t(Method::POST, "/v1/orders/o1/pay"), Ok(ReqType::Pay));
        assert_eq!(t(Method::POST, "/v1/seckill/flash-1"), Ok(ReqType::Seckill));
        assert_eq!(t(Method::GET, "/admin/degrade"), Ok(ReqType::Admin));
        assert_eq!(t(Method::POST, "/admin/degrade"), Ok(ReqType::Admin));
        assert_eq!(t(Method::GET, "/v1/orders"), Err(Some("POST")));
        assert_eq!(t(Method::POST, "/v1/products"), Err(Some("GET")));
        assert_eq!(t(Method::DELETE, "/admin/degrade"), Err(Some("GET, POST")));
        assert_eq!(
            t(Method::DELETE, "/v1/merchant/flash-sales/f"),
            Ok(ReqType::Admin)
        );
        assert_eq!(
            t(Method::GET, "/v1/merchant/flash-sales/f"),
            Err(Some("POST, DELETE"))
        );
        assert_eq!(t(Method::GET, "/v1/users/ann/orders"), Ok(ReqType::Browse));
        assert_eq!(t(Method::GET, "/v2/x"), Err(None));
        assert_eq!(t(Method::GET, "/v1/orders/a/b/c/d"), Err(None));
    }

    /// A busy store's 503 carries its reason to the request metrics; a store fault's 500 carries none.
    #[test]
    fn a_busy_store_is_answered_apart_from_a_store_fault() {
        let busy = store_failed(&StoreError::Busy("database is locked".into()));
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(busy.headers().contains_key(http::header::RETRY_AFTER));
        assert_eq!(
            busy.extensions().get::<Unavailable>(),
            Some(&Unavailable::StoreBusy)
        );
        let fault = store_failed(&StoreError::Internal("disk I/O error".into()));
        assert_eq!(fault.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(fault.extensions().get::<Unavailable>(), None);
    }
}
