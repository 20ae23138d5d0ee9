//! The workload: the request table (one builder per request type against XBuy's HTTP/JSON API) and the
//! `--mix` ratios. The table is deliberately small and flat so it is easy to adjust as the app's API
//! settles: a request type is a name, whether it is idempotent (safe to retry elsewhere), and a function
//! building the request.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use rand::Rng;

/// SKUs the generated requests name (`sku-1` ..= `sku-N`).
/// The demo catalog XBuy seeds: products 1..=12, each with SKUs `sku-<product>-1` and `-2`.
const PRODUCTS: u32 = 12;
/// Users the generated requests act for.
/// Demo buyers `demo-0`.. that XBuy seeds with wallet credit.
const USER_COUNT: u64 = 1_000;
/// Unpaid order ids remembered, for `pay` and to cancel at the end of the run; past it the oldest are
/// forgotten (counted).
const ORDER_IDS_KEPT: usize = 65_536;
/// How long a buyer token minted here lives (`--buyer-key-file`), and how much of it must be left for it to
/// be sent again: no longer than the least `buyer_token_max_life_secs` (60 s), so the app's minute of slack
/// is left whole for a clock here that runs ahead of the app's, and minted again as it runs out.
const BUYER_TOKEN_SECS: u64 = 60;
const BUYER_TOKEN_LEFT_SECS: u64 = 30;

/// State shared by the builders: sequence numbers for idempotency keys, and the ids of the orders the app
/// acknowledged and nothing paid yet: `order`'s for `pay` to pay real orders, `seckill`'s beside them.
#[derive(Debug, Default)]
pub struct Ctx {
    /// This run's part of every idempotency key, drawn at random. The process id was, and two generators in
    /// containers (both pid 1) or two runs a pid wrap apart sent the same keys for the same users: an
    /// `order` was refused `idempotency_conflict`, a `seckill` answered with the other run's order, which
    /// this run then cancelled.
    run: u64,
    seq: AtomicU64,
    orders: Mutex<Unpaid>,
    /// `Authorization` of every request (`--app-token`), but a buyer's with `buyers`.
    auth: Option<http::HeaderValue>,
    /// `--buyer-key-file`: a buyer call carries a token for its buyer.
    buyers: Option<Buyers>,
}

/// Buyer tokens minted with XBuy's `buyer_key_file` (`--buyer-key-file`), as a shop's login hands them
/// out, kept per buyer until they run low.
#[derive(Default)]
struct Buyers {
    key: Vec<u8>,
    /// Each buyer's token and when it expires (Unix seconds).
    tokens: Mutex<std::collections::HashMap<String, (http::HeaderValue, u64)>>,
}

impl std::fmt::Debug for Buyers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Buyers { key: <redacted> }")
    }
}

impl Buyers {
    /// `user`'s token, minted again when less than [`BUYER_TOKEN_LEFT_SECS`] of it is left.
    fn token(&self, user: &str) -> Option<http::HeaderValue> {
        let now = u64::try_from(xcluster_app::domain::now_ms() / 1000).unwrap_or(0);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, expires)) = tokens.get(user)
            && *expires >= now + BUYER_TOKEN_LEFT_SECS
        {
            return Some(token.clone());
        }
        let expires = now + BUYER_TOKEN_SECS;
        let minted = xcluster_proto::buyer::mint(&self.key, user, expires);
        let mut token = http::HeaderValue::try_from(format!("Bearer {minted}")).ok()?;
        token.set_sensitive(true);
        tokens.insert(user.to_string(), (token.clone(), expires));
        Some(token)
    }
}

/// The buyer a request acts for, carried in its extensions from the builder to [`Ctx::authorized`] (and to
/// the clean-up's requests, through [`Lost`] and the unpaid orders).
#[derive(Debug, Clone)]
pub struct BuyerOf(String);

/// An order the app acknowledged, with its buyer (from its answer; `None` if it named none).
#[derive(Debug, Clone)]
struct Order {
    id: String,
    buyer: Option<BuyerOf>,
}

#[derive(Debug, Default)]
struct Unpaid {
    /// `order`'s, paid by `pay` from the front.
    payable: VecDeque<Order>,
    /// `seckill`'s.
    flash: VecDeque<Order>,
    /// `order`'s whose `pay` got no 2xx: not paid, or not known to be, so not paid again (a refused one
    /// would be refused again) but cancelled at the end with the others.
    unsettled: VecDeque<Order>,
    /// `order`'s and `seckill`'s requests whose answer was lost: each may have placed its order.
    lost: VecDeque<Lost>,
    forgotten: u64,
}

/// An `order` or `seckill` request answered by an error, a timeout or a 5xx (`504 outcome_unknown` among
/// them): the order may stand, and only asking again under its key, which replays the first answer if it
/// committed, tells. Not remembered, such an order was neither cancelled after the run nor listed.
#[derive(Debug, Clone)]
pub struct Lost {
    flash: bool,
    path: String,
    key: String,
    buyer: Option<BuyerOf>,
    /// Its bytes until sent: cloning it copies nothing.
    body: Full<Bytes>,
}

/// Whether an order request answered `status` with `body` may have placed its order: a 5xx, but for the
/// refusals XBuy makes before any work (`overloaded`, `read_only`), which asked again would place an order only
/// for the clean-up to cancel it; and a 409 `in_progress`, another attempt under the key still in the store (a
/// retry of one that timed out elsewhere). (A `store_busy` 503 of a keyed request may have committed: its
/// retry replays.) Any other answer says none stands under the key: XBuy looks up a key's stored answer before
/// it refuses.
pub fn may_have_placed(status: http::StatusCode, body: &[u8]) -> bool {
    let code = || {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
    };
    if status.is_server_error() {
        return !matches!(code().as_deref(), Some("overloaded" | "read_only"));
    }
    status == http::StatusCode::CONFLICT && code().as_deref() == Some("in_progress")
}

/// Whether a request that failed with error `kind` certainly never reached an instance: it found none to send
/// to, or (`single_attempt`: not through the SDK, whose last attempt's kind may follow one that timed out)
/// could not connect.
pub fn never_sent(kind: &str, single_attempt: bool) -> bool {
    const BEFORE_ANY: [&str; 9] = [
        "config",
        "unknown_type",
        "bootstrap",
        "not_served",
        "balancer",
        "stale",
        "no_instance",
        "resolve",
        "no_target",
    ];
    BEFORE_ANY.contains(&kind) || (single_attempt && matches!(kind, "connect" | "connect_timeout"))
}

impl Lost {
    /// What asking again needs of `req` (its body shared, not copied), if it is an order of `kind` under a
    /// key.
    pub fn of(kind: &Kind, req: &Request<Full<Bytes>>) -> Option<Lost> {
        if kind.name != "order" && kind.name != "seckill" {
            return None;
        }
        let key = req.headers().get("idempotency-key")?.to_str().ok()?.to_string();
        Some(Lost {
            flash: kind.name == "seckill",
            path: req.uri().path().to_string(),
            key,
            buyer: req.extensions().get::<BuyerOf>().cloned(),
            body: req.body().clone(),
        })
    }

    /// The same request again, and the kind that routes it.
    pub fn request(&self) -> Routed {
        let mut req = Request::post(self.path.as_str())
            .header("content-type", "application/json")
            .header("idempotency-key", self.key.as_str())
            .body(self.body.clone())
            .unwrap_or_else(|_| Request::new(self.body.clone()));
        if let Some(b) = &self.buyer {
            req.extensions_mut().insert(b.clone());
        }
        (&CANCEL[usize::from(self.flash)], req)
    }
}

impl Unpaid {
    fn keep(&mut self, flash: bool, order: Order) {
        let q = if flash { &mut self.flash } else { &mut self.payable };
        Self::push(q, &mut self.forgotten, order);
    }

    fn push(q: &mut VecDeque<Order>, forgotten: &mut u64, mut order: Order) {
        // It goes into a path: anything else than an id's usual characters is not sent back.
        if !order
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return;
        }
        // And the buyer into a token: one that is no buyer id is no buyer of ours.
        order.buyer = order
            .buyer
            .filter(|b| xcluster_app::domain::request::valid_id(&b.0));
        if q.len() >= ORDER_IDS_KEPT {
            q.pop_front();
            *forgotten += 1;
        }
        q.push_back(order);
    }
}

impl Ctx {
    /// A run's state, its requests carrying `token` as a bearer token (`--app-token`), and with `buyer_key`
    /// (`--buyer-key-file`'s) each buyer call a token of its buyer in its place. A token that is no header
    /// value (a control character) is refused.
    pub fn with_auth(token: Option<&str>, buyer_key: Option<Vec<u8>>) -> Result<Ctx, String> {
        let auth = token
            .map(|t| http::HeaderValue::try_from(format!("Bearer {t}")))
            .transpose()
            .map_err(|_| "--app-token: not a header value (a control character?)".to_string())?;
        Ok(Ctx {
            run: rand::random(),
            auth: auth.map(|mut v| {
                v.set_sensitive(true);
                v
            }),
            buyers: buyer_key.map(|key| Buyers {
                key,
                ..Buyers::default()
            }),
            ..Ctx::default()
        })
    }

    /// `req` with the run's `Authorization`, if it has one: its buyer's token for a buyer call
    /// (`--buyer-key-file`), else `--app-token`.
    pub fn authorized(&self, mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
        let buyer = (self.buyers.as_ref())
            .zip(req.extensions().get::<BuyerOf>())
            .and_then(|(buyers, b)| buyers.token(&b.0));
        if let Some(auth) = buyer.as_ref().or(self.auth.as_ref()) {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, auth.clone());
        }
        req
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Remembers the order id of a successful `order` response (`{"id": ...}` or `{"order_id": ...}`) for
    /// `pay`, and returns the id of an order the app acknowledged (`order` or `seckill`).
    pub fn observe(&self, kind: &Kind, body: &[u8]) -> Option<String> {
        if kind.name != "order" && kind.name != "seckill" {
            return None;
        }
        let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
        let id = ["id", "order_id"].iter().find_map(|k| match v.get(*k)? {
            serde_json::Value::String(s) if s.len() <= 128 => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })?;
        let buyer = v["user"].as_str().map(|u| BuyerOf(u.to_string()));
        (self.unpaid()).keep(
            kind.name == "seckill",
            Order {
                id: id.clone(),
                buyer,
            },
        );
        Some(id)
    }

    fn unpaid(&self) -> std::sync::MutexGuard<'_, Unpaid> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn payable(&self) -> Option<Order> {
        self.unpaid().payable.pop_front()
    }

    /// A `pay` request to `path` got no 2xx (an error, a 503, a refusal such as `insufficient_funds`): its
    /// order may still be unpaid, so it is cancelled with the others at the end. It used to be dropped
    /// with the pay, and held its stock for the app's reservation time after the run.
    pub fn pay_failed(&self, path: &str, buyer: Option<&BuyerOf>) {
        if let Some(id) = path
            .strip_prefix("/v1/orders/")
            .and_then(|p| p.strip_suffix("/pay"))
        {
            let u = &mut *self.unpaid();
            let order = Order {
                id: id.to_string(),
                buyer: buyer.cloned(),
            };
            Unpaid::push(&mut u.unsettled, &mut u.forgotten, order);
        }
    }

    /// An order request whose answer was lost ([`Lost`]), to ask again after the run.
    pub fn lost(&self, lost: Lost) {
        let u = &mut *self.unpaid();
        if u.lost.len() >= ORDER_IDS_KEPT {
            u.lost.pop_front();
            u.forgotten += 1;
        }
        u.lost.push_back(lost);
    }

    /// Takes the order requests whose answer was lost.
    pub fn take_lost(&self) -> Vec<Lost> {
        std::mem::take(&mut self.unpaid().lost).into()
    }

    /// Takes every order still unpaid, each as its cancel with the kind that routes it (as [`CANCEL`]), and
    /// how many were forgotten (past [`ORDER_IDS_KEPT`]).
    pub fn take_unpaid(&self) -> (Vec<Routed>, u64) {
        let u = std::mem::take(&mut *self.unpaid());
        let [order, flash] = &CANCEL;
        let cancels = (u.payable.into_iter().chain(u.unsettled).map(|o| (order, o)))
            .chain(u.flash.into_iter().map(|o| (flash, o)))
            .map(|(kind, o)| (kind, cancel_request(&o)))
            .collect();
        (cancels, u.forgotten)
    }
}

/// A request with the kind that routes it.
pub type Routed = (&'static Kind, Request<Full<Bytes>>);

/// One request type of the workload.
#[derive(Debug)]
pub struct Kind {
    /// The request type (as the balancers and the app name it).
    pub name: &'static str,
    /// Safe to send twice: the SDK may retry it on another instance.
    pub idempotent: bool,
    build: fn(&Ctx, u64) -> Option<Request<Full<Bytes>>>,
}

impl Kind {
    /// Builds one request; `None` when there is nothing to send yet (`pay` before any order was seen).
    pub fn build(&self, ctx: &Ctx) -> Option<Request<Full<Bytes>>> {
        (self.build)(ctx, ctx.next()).map(|req| ctx.authorized(req))
    }
}

fn sku() -> String {
    let mut rng = rand::rng();
    format!(
        "sku-{}-{}",
        rng.random_range(1..=PRODUCTS),
        rng.random_range(1..=2)
    )
}

/// A POST of `body` under `key`, acting for `buyer`.
fn json_post(
    path: &str,
    key: Option<String>,
    buyer: Option<BuyerOf>,
    body: serde_json::Value,
) -> Request<Full<Bytes>> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    let body = Full::new(Bytes::from(body.to_string()));
    let mut req = b.body(body.clone()).unwrap_or_else(|_| Request::new(body));
    if let Some(buyer) = buyer {
        req.extensions_mut().insert(buyer);
    }
    req
}

fn browse(_: &Ctx, n: u64) -> Option<Request<Full<Bytes>>> {
    let path = format!("/v1/products?limit=5&after={}", (n % 3) * 4);
    Request::get(path.as_str()).body(Full::new(Bytes::new())).ok()
}

fn order(ctx: &Ctx, n: u64) -> Option<Request<Full<Bytes>>> {
    let key = format!("load-{:016x}-{n}", ctx.run);
    let user = format!("demo-{}", n % USER_COUNT);
    let body = serde_json::json!({"user": user, "lines": [{"sku": sku(), "qty": 1}]});
    Some(json_post("/v1/orders", Some(key), Some(BuyerOf(user)), body))
}

fn seckill(ctx: &Ctx, n: u64) -> Option<Request<Full<Bytes>>> {
    let key = format!("load-sk-{:016x}-{n}", ctx.run);
    let user = format!("demo-{}", n % USER_COUNT);
    let body = serde_json::json!({"user": user});
    Some(json_post(
        "/v1/seckill/flash-1",
        Some(key),
        Some(BuyerOf(user)),
        body,
    ))
}

fn pay(ctx: &Ctx, n: u64) -> Option<Request<Full<Bytes>>> {
    // Only real orders are paid: a made-up id would get a 404 that says nothing about the cluster.
    let order = ctx.payable()?;
    let key = format!("load-pay-{:016x}-{n}", ctx.run);
    let path = format!("/v1/orders/{}/pay", order.id);
    Some(json_post(&path, Some(key), order.buyer, serde_json::json!({})))
}

/// `POST /v1/orders/{id}/cancel`: gives an unpaid order's stock back (a second cancel answers the same, so
/// it is safe to retry). Routed as the type that placed the order (`order`, `seckill`); not in the table, so
/// no `--mix` draws them.
pub static CANCEL: [Kind; 2] = [
    Kind {
        name: "order",
        idempotent: true,
        build: |_, _| None,
    },
    Kind {
        name: "seckill",
        idempotent: true,
        build: |_, _| None,
    },
];

/// A cancel carries a key of its own so that the SDK retries it (a POST without one is sent once): a cancel
/// again answers as the first did, and without the retry an order whose cancel met a draining instance (a
/// roll at the run's end) stayed reserved for the app's reservation time.
fn cancel_request(order: &Order) -> Request<Full<Bytes>> {
    let key = format!("cancel-{}", order.id);
    let path = format!("/v1/orders/{}/cancel", order.id);
    json_post(&path, Some(key), order.buyer.clone(), serde_json::json!({}))
}

/// The request table.
pub static KINDS: [Kind; 4] = [
    Kind {
        name: "browse",
        idempotent: true,
        build: browse,
    },
    Kind {
        name: "order",
        idempotent: true, // carries an Idempotency-Key
        build: order,
    },
    Kind {
        name: "seckill",
        idempotent: true, // carries an Idempotency-Key
        build: seckill,
    },
    Kind {
        name: "pay",
        idempotent: true, // carries an Idempotency-Key
        build: pay,
    },
];

/// A parsed `--mix`: the request types in use and their cumulative ratios.
#[derive(Debug)]
pub struct Mix {
    pub kinds: Vec<&'static Kind>,
    cumulative: Vec<u64>,
}

impl Mix {
    /// Parses `name=ratio,...`; every name must be in the table, ratios are positive integers.
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut kinds = Vec::new();
        let mut cumulative = Vec::new();
        let mut sum = 0u64;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, ratio) = part
                .split_once('=')
                .ok_or_else(|| format!("mix entry {part:?} is not name=ratio"))?;
            let kind = KINDS.iter().find(|k| k.name == name.trim()).ok_or_else(|| {
                let known: Vec<_> = KINDS.iter().map(|k| k.name).collect();
                format!(
                    "unknown request type {name:?} in mix (known: {})",
                    known.join(", ")
                )
            })?;
            let ratio: u64 = ratio
                .trim()
                .parse()
                .ok()
                .filter(|r| (1..=1_000_000).contains(r))
                .ok_or_else(|| {
                    format!("ratio of {name:?} must be an integer in 1..=1000000, got {ratio:?}")
                })?;
            if kinds.iter().any(|k: &&Kind| k.name == kind.name) {
                return Err(format!("request type {name:?} appears twice in mix"));
            }
            sum += ratio;
            kinds.push(kind);
            cumulative.push(sum);
        }
        if kinds.is_empty() {
            return Err("mix is empty".into());
        }
        // `pay` pays orders that this run's `order` requests placed; without them it never sends anything
        // and the run would report zero requests as a success.
        let has = |n: &str| kinds.iter().any(|k| k.name == n);
        if has("pay") && !has("order") {
            return Err("pay in the mix needs order too (it pays the orders this run places)".into());
        }
        Ok(Mix { kinds, cumulative })
    }

    /// Draws a request type (its index in `kinds`) by ratio.
    pub fn draw(&self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1);
        let x = rand::rng().random_range(0..total);
        self.cumulative.partition_point(|c| *c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_draws_by_ratio() {
        let m = Mix::parse("browse=3, order=1").unwrap();
        assert_eq!(m.kinds.len(), 2);
        let browses = (0..4000).filter(|_| m.draw() == 0).count();
        assert!((2700..3300).contains(&browses), "{browses}");
        for bad in [
            "",
            "browse",
            "nope=1",
            "browse=0",
            "browse=x",
            "browse=1,browse=2",
            "pay=1",
            "pay=1,seckill=1",
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Two runs never send the same idempotency key: keyed by the process id, two generators in
    /// containers (both pid 1) sent the same keys for the same users, and got each other's orders.
    #[test]
    fn two_runs_send_different_keys() {
        let key = |ctx: &Ctx| {
            let r = KINDS[2].build(ctx).unwrap();
            r.headers()["idempotency-key"].to_str().unwrap().to_string()
        };
        let [a, b] = [(); 2].map(|()| Ctx::with_auth(None, None).unwrap());
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn builders_follow_the_app_api() {
        let ctx = Ctx::default();
        assert!(KINDS[3].build(&ctx).is_none(), "nothing to pay yet");
        let r = KINDS[1].build(&ctx).unwrap();
        assert_eq!(r.method(), http::Method::POST);
        assert_eq!(r.uri().path(), "/v1/orders");
        assert!(r.headers().contains_key("idempotency-key"));
        assert_eq!(
            ctx.observe(&KINDS[1], br#"{"id":"o-42"}"#).as_deref(),
            Some("o-42")
        );
        // A flash-sale order is acknowledged too, but is not one to pay by the `pay` builder.
        assert_eq!(
            ctx.observe(&KINDS[2], br#"{"order_id":"o-7"}"#).as_deref(),
            Some("o-7")
        );
        assert_eq!(ctx.observe(&KINDS[0], br#"{"id":"p-1"}"#), None);
        assert_eq!(KINDS[3].build(&ctx).unwrap().uri().path(), "/v1/orders/o-42/pay");
        assert_eq!(KINDS[2].build(&ctx).unwrap().uri().path(), "/v1/seckill/flash-1");
        assert!(
            KINDS[0]
                .build(&ctx)
                .unwrap()
                .uri()
                .path_and_query()
                .unwrap()
                .as_str()
                .contains("after=")
        );
    }

    /// With `--buyer-key-file`, each buyer call carries a token of its own buyer, which the app's check
    /// takes (`proto::buyer::verify` with the same key): the order, its pay, and the clean-up's cancel of an
    /// order whose pay failed; browsing carries the app token, as before.
    #[test]
    fn buyer_calls_carry_their_buyers_token() {
        let key = b"buyer-key-0123456789".to_vec();
        let ctx = Ctx::with_auth(Some("admin"), Some(key.clone())).unwrap();
        let acts_for = |req: &Request<Full<Bytes>>| {
            let auth = req.headers()[http::header::AUTHORIZATION].to_str().unwrap();
            let token = auth.strip_prefix("Bearer ").unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let limits = xcluster_proto::buyer::Limits {
                now_unix: now.as_secs(),
                max_life_secs: 60,
            };
            xcluster_proto::buyer::verify(&key, token, limits).ok()
        };
        let order = KINDS[1].build(&ctx).unwrap();
        let buyer = acts_for(&order).expect("a buyer token the app takes, within a 60 s limit");
        assert!(buyer.starts_with("demo-"), "{buyer}");
        let body = format!(r#"{{"id":"o-1","user":"{buyer}"}}"#);
        ctx.observe(&KINDS[1], body.as_bytes());
        let pay = KINDS[3].build(&ctx).unwrap();
        assert_eq!(acts_for(&pay).as_deref(), Some(buyer.as_str()));
        ctx.pay_failed(pay.uri().path(), pay.extensions().get::<BuyerOf>());
        let (cancels, _) = ctx.take_unpaid();
        let cancel = ctx.authorized(cancels.into_iter().next().unwrap().1);
        assert_eq!(acts_for(&cancel).as_deref(), Some(buyer.as_str()));
        let browse = KINDS[0].build(&ctx).unwrap();
        assert_eq!(browse.headers()[http::header::AUTHORIZATION], "Bearer admin");
    }

    /// An order whose pay failed is cancelled at the end of the run, not paid again (a refused pay would be
    /// refused again) and not dropped (it would hold its stock for the app's reservation time).
    #[test]
    fn an_order_whose_pay_failed_is_left_to_cancel() {
        let ctx = Ctx::default();
        ctx.observe(&KINDS[1], br#"{"id":"o-1"}"#);
        let pay = KINDS[3].build(&ctx).unwrap();
        ctx.pay_failed(pay.uri().path(), None);
        ctx.pay_failed("/v1/orders/../pay/x", None);
        assert!(KINDS[3].build(&ctx).is_none(), "not paid again");
        let (cancels, forgotten) = ctx.take_unpaid();
        let cancels: Vec<_> = (cancels.iter()).map(|(k, r)| (k.name, r.uri().path())).collect();
        assert_eq!(
            (cancels, forgotten),
            (vec![("order", "/v1/orders/o-1/cancel")], 0)
        );
    }
}
