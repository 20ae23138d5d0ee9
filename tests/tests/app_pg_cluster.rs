//! XBuy on PostgreSQL and Redis (issue 8): three app instances on three loopback addresses (127.0.0.2, .3,
//! .4) share one PostgreSQL and one Redis. 1,000 buyers race for a 100-unit flash-sale item while one
//! instance is killed with SIGKILL (and restarted) and Redis is restarted empty: exactly 100 units sell,
//! every acknowledged order is in the store, and the invariant audit passes on every instance.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xcluster_tests::http::{HttpResponse, get, request};
use xcluster_tests::services::{HeldTx, Postgres, Redis};
use xcluster_tests::*;

const TOKEN: &str = "t0ken";
const BUYERS: usize = 1_000;
const CONCURRENCY: usize = 100;

/// A free port on one loopback address (127.0.0.0/8 is all local on Linux).
fn free_on(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

fn app_config(dir: &std::path::Path, n: usize, listen: SocketAddr, pg: &Postgres, redis: &Redis) -> String {
    let text = format!(
        r#"role = "app"
listen = "{listen}"
instance = "app-{n}"
store = "postgres"
postgres_url = "{pg}"
redis_url = "{redis}"
admin_token = "{TOKEN}"
store_threads = 8
reservation_ttl_ms = 3600000
[postgres]
pool_size = 8
statement_timeout_ms = 5000
[redis]
timeout_ms = 100
retry_after_ms = 300
rebuild_ms = 200
[seckill]
per_user_limit = 1
# No local sold-out memory: every attempt reaches the shared Redis gate.
sold_out_gate_ms = 0
"#,
        pg = pg.url,
        redis = redis.url,
    );
    write_file(dir, &format!("app{n}.toml"), &text)
        .display()
        .to_string()
}

fn start_app(n: usize, config: &str, addr: SocketAddr) -> Proc {
    let p = Proc::xcluster(&format!("app{n}"), &["app", "--config", config]);
    wait_ready(addr, Duration::from_secs(60));
    p
}

/// One app on its own PostgreSQL and Redis; everything stops when it drops.
struct OneApp {
    addr: SocketAddr,
    _app: Proc,
    _dir: tempfile::TempDir,
    redis: Redis,
    pg: Postgres,
}

impl OneApp {
    fn start() -> OneApp {
        Self::with_reservations_for(3_600_000)
    }

    /// An app whose reservations expire after `ttl_ms`.
    fn with_reservations_for(ttl_ms: u64) -> OneApp {
        let ttl = format!("reservation_ttl_ms = {ttl_ms}");
        Self::edited(|text| text.replace("reservation_ttl_ms = 3600000", &ttl))
    }

    /// An app on `app_config` as `edit` changes it.
    fn edited(edit: impl FnOnce(String) -> String) -> OneApp {
        let pg = Postgres::start();
        let redis = Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let config = app_config(dir.path(), 0, addr, &pg, &redis);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, edit(text)).unwrap();
        let app = start_app(0, &config, addr);
        OneApp {
            addr,
            _app: app,
            _dir: dir,
            redis,
            pg,
        }
    }
}

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

/// How many times the app at `addr` counted `answer` in `xcluster_app_redis_gate_total`.
fn gate_answers(addr: SocketAddr, answer: &str) -> f64 {
    let m = get(addr, "/metrics").unwrap().body;
    metric_value(
        &m,
        "xcluster_app_redis_gate_total",
        &format!("answer=\"{answer}\""),
    )
    .unwrap_or(0.0)
}

fn audit(addr: SocketAddr) -> serde_json::Value {
    let r = request(addr, "GET", "/admin/audit", &[("Authorization", &auth())], None).unwrap();
    assert_eq!(r.status, 200, "audit on {addr} failed: {}", r.body);
    r.json()
}

fn redis_answers(addrs: &[SocketAddr]) -> f64 {
    addrs
        .iter()
        .filter_map(|a| get(*a, "/metrics").ok())
        .map(|m| {
            ["taken", "sold_out", "over_limit"]
                .iter()
                .filter_map(|ans| {
                    metric_value(
                        &m.body,
                        "xcluster_app_redis_gate_total",
                        &format!("answer=\"{ans}\""),
                    )
                })
                .sum::<f64>()
        })
        .sum()
}

/// What happened to one buyer.
#[derive(Debug, Default)]
struct Outcomes {
    acked: Vec<String>,
    /// Buyers whose request may have committed without an answer (the instance died mid-request).
    ambiguous: usize,
    sold_out: usize,
}

#[test]
fn three_instances_sell_exactly_the_stock_through_kill_and_redis_restart() {
    let pg = Postgres::start();
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| free_on(ip))
        .collect();
    let configs: Vec<String> = (0..3)
        .map(|n| app_config(dir.path(), n, addrs[n], &pg, &redis))
        .collect();
    // One instance first: it migrates and seeds; the others find the schema in place.
    let mut apps: Vec<Proc> = vec![start_app(0, &configs[0], addrs[0])];
    for n in 1..3 {
        apps.push(start_app(n, &configs[n], addrs[n]));
    }
    let r = request(
        addrs[1],
        "POST",
        "/v1/merchant/flash-sales/flash-1",
        &[("Authorization", &auth()), ("Content-Type", "application/json")],
        Some(br#"{"buckets": 8}"#),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let before = audit(addrs[2]);
    assert_eq!(before["totals"]["orders"], 0);

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let deadline = Instant::now() + Duration::from_secs(240);
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let (next, done, outcomes, addrs) = (next.clone(), done.clone(), outcomes.clone(), addrs.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= BUYERS {
                        return;
                    }
                    let body = format!(r#"{{"user": "buyer-{i}"}}"#);
                    let mut ambiguous = false;
                    let mut attempt = 0usize;
                    let answer = loop {
                        assert!(Instant::now() < deadline, "buyer {i} never got an answer");
                        let addr = addrs[(i + w + attempt) % addrs.len()];
                        attempt += 1;
                        match request(
                            addr,
                            "POST",
                            "/v1/seckill/flash-1",
                            &[("Content-Type", "application/json")],
                            Some(body.as_bytes()),
                        ) {
                            Ok(r) if r.status == 503 => std::thread::sleep(Duration::from_millis(20)),
                            Ok(r) => break r,
                            Err(e) => {
                                // Refused: nothing was sent. Anything else: the instance may have died after
                                // committing, so the buyer's retry may meet its own order (429).
                                if e.kind() != std::io::ErrorKind::ConnectionRefused {
                                    ambiguous = true;
                                }
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    };
                    let mut o = outcomes.lock().unwrap();
                    match answer.status {
                        201 => o.acked.push(answer.json()["id"].as_str().unwrap().to_string()),
                        409 => o.sold_out += 1,
                        429 if ambiguous => o.ambiguous += 1,
                        other => panic!("buyer {i}: unexpected {other}: {}", answer.body),
                    }
                    drop(o);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Mid-sale: kill instance 0 outright and restart Redis empty, then bring instance 0 back.
    eventually(Duration::from_secs(120), "the first buyers to finish", || {
        (done.load(Ordering::Relaxed) >= 30).then_some(())
    });
    let acked_at_kill = outcomes.lock().unwrap().acked.len();
    apps[0].signal(nix::sys::signal::Signal::SIGKILL);
    assert!(apps[0].wait_exit(Duration::from_secs(10)).is_some());
    redis.restart();
    apps[0] = start_app(0, &configs[0], addrs[0]);
    for w in workers {
        w.join().unwrap();
    }

    let o = outcomes.lock().unwrap();
    eprintln!(
        "acked at kill {acked_at_kill}; end: acked {}, sold out {}, ambiguous {}",
        o.acked.len(),
        o.sold_out,
        o.ambiguous
    );
    let acked: HashSet<&String> = o.acked.iter().collect();
    assert_eq!(acked.len(), o.acked.len(), "an order id was acknowledged twice");
    assert_eq!(o.acked.len() + o.sold_out + o.ambiguous, BUYERS);
    for id in &acked {
        let r = get(addrs[1], &format!("/v1/orders/{id}")).unwrap();
        assert_eq!(r.status, 200, "acknowledged order {id} is missing: {}", r.body);
        assert_eq!(r.json()["status"], "reserved");
    }
    for a in &addrs {
        let report = audit(*a);
        assert_eq!(report["ok"], true, "{report}");
        let t = &report["totals"];
        assert_eq!(t["orders"], 100, "exactly the stock sold: {t}");
        assert_eq!(t["units_reserved"], 100, "{t}");
    }
    // Orders the store holds beyond the acknowledged ones are exactly those whose answer was lost.
    assert!(
        100 - o.acked.len() <= o.ambiguous,
        "{} acked, {} ambiguous",
        o.acked.len(),
        o.ambiguous
    );

    // The Redis gate answered during the sale, and after the restart it is rebuilt and rejects early again.
    let seen = redis_answers(&addrs);
    assert!(seen > 0.0, "the Redis gate never answered");
    eventually(
        Duration::from_secs(30),
        "the rebuilt Redis gate to answer sold out",
        || {
            let before = redis_answers(&addrs);
            for a in &addrs {
                let r = request(
                    *a,
                    "POST",
                    "/v1/seckill/flash-1",
                    &[("Content-Type", "application/json")],
                    Some(br#"{"user": "late"}"#),
                )
                .unwrap();
                assert_eq!(r.status, 409, "{}", r.body);
            }
            (redis_answers(&addrs) >= before + 3.0).then_some(())
        },
    );
}

/// A Redis that is down from the start: flash-sale orders take the store-only path, nothing fails, and the
/// circuit means Redis is tried once per `retry_after_ms`, not once per request.
#[test]
fn dead_redis_costs_one_attempt_and_fails_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let app_addr = free_addr();
    let dead_redis = free_addr(); // nothing listens here
    let text = format!(
        r#"role = "app"
listen = "{app_addr}"
db_path = "{db}"
redis_url = "redis://{dead_redis}"
[redis]
timeout_ms = 200
retry_after_ms = 600000
[seckill]
sold_out_gate_ms = 0
"#,
        db = dir.path().join("x.db").display(),
    );
    let config = write_file(dir.path(), "app.toml", &text);
    let _app = Proc::xcluster("app", &["app", "--config", config.to_str().unwrap()]);
    wait_ready(app_addr, Duration::from_secs(60));
    // Every answer is on /metrics at 0 before the first attempt, so `rate()` and the alert on errors see
    // the first one.
    let m = get(app_addr, "/metrics").unwrap().body;
    for answer in ["taken", "pass", "sold_out", "over_limit", "error"] {
        let at = metric_value(
            &m,
            "xcluster_app_redis_gate_total",
            &format!("answer=\"{answer}\""),
        );
        assert_eq!(at, Some(0.0), "{answer} before any attempt");
    }
    let (mut won, mut sold_out) = (0, 0);
    for i in 0..130 {
        let body = format!(r#"{{"user": "u{i}"}}"#);
        let r = request(
            app_addr,
            "POST",
            "/v1/seckill/flash-1",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
        .unwrap();
        match r.status {
            201 => won += 1,
            409 => sold_out += 1,
            other => panic!("attempt {i}: {other} {}", r.body),
        }
    }
    assert_eq!((won, sold_out), (100, 30));
    let (errors, passed) = (gate_answers(app_addr, "error"), gate_answers(app_addr, "pass"));
    assert_eq!(errors, 1.0, "the circuit should stop per-request Redis attempts");
    assert_eq!(passed, 130.0);
}

/// On PostgreSQL as on SQLite: a provider's payment for a cancelled order is kept (`refund_due`) and
/// acknowledged, and a refund of a fulfilled order leaves its shipped units out of the stock.
#[test]
fn money_edges_on_postgres() {
    let one = OneApp::start();
    let addr = one.addr;
    let call = |path: &str, key: Option<&str>, body: serde_json::Value| {
        let auth = auth();
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        let body = body.to_string();
        request(addr, "POST", path, &headers, Some(body.as_bytes())).unwrap()
    };
    let order = |key: &str| {
        let r = call(
            "/v1/orders",
            Some(key),
            serde_json::json!({"user": "pgu", "lines": [{"sku": "sku-1-1", "qty": 1}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let v = r.json();
        (
            v["id"].as_str().unwrap().to_string(),
            v["total_cents"].as_i64().unwrap(),
        )
    };
    let callback = |payment: &str, id: &str, amount: i64, status: &str| {
        let cb = serde_json::json!({"payment_id": payment, "order_id": id, "amount_cents": amount, "status": status});
        call("/v1/payments/callback", None, cb)
    };

    let (o1, total) = order("pg-1");
    assert_eq!(
        call(&format!("/v1/orders/{o1}/cancel"), None, serde_json::json!({})).status,
        200
    );
    let r = callback("pg-p1", &o1, total, "succeeded");
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("cancelled")),
        "{}",
        r.body
    );
    assert_eq!(
        callback("pg-p1", &o1, total, "failed").status,
        422,
        "the payment was not recorded"
    );

    let stock = || {
        let p = get(addr, "/v1/products/1").unwrap().json();
        let sku = (p["skus"].as_array().unwrap().iter())
            .find(|s| s["sku"] == "sku-1-1")
            .cloned()
            .unwrap();
        (sku["available"].as_i64().unwrap(), sku["sold"].as_i64().unwrap())
    };
    let (o2, total) = order("pg-2");
    assert_eq!(
        callback("pg-p2", &o2, total, "succeeded").json()["status"],
        "paid"
    );
    assert_eq!(
        call(&format!("/v1/orders/{o2}/fulfil"), None, serde_json::json!({})).json()["status"],
        "fulfilled"
    );
    let before = stock();
    let r = call("/v1/refunds", None, serde_json::json!({"order_id": o2}));
    assert_eq!(r.json()["status"], "refunded", "{}", r.body);
    assert_eq!(stock(), (before.0, before.1 - 1));
    audit(addr);
}

/// A deploy's SIGTERM (and Ctrl-C's SIGINT) to an instance on PostgreSQL that has served requests: it drains
/// and exits 0. It aborted (exit 134, SIGABRT) instead: the last handle on the store was dropped on an async
/// worker, where closing a `postgres::Client` panics inside the drop, so the monitor saw a crash at every
/// restart.
#[test]
fn an_instance_on_postgres_stops_cleanly_on_sigterm_and_sigint() {
    let pg = Postgres::start();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    for (n, signal) in [
        (0, nix::sys::signal::Signal::SIGTERM),
        (1, nix::sys::signal::Signal::SIGINT),
    ] {
        let addr = free_addr();
        let config = app_config(dir.path(), n, addr, &pg, &redis);
        let mut app = start_app(n, &config, addr);
        let r = get(addr, "/v1/products/1").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        // Its start names the store it serves from, not the SQLite file it never opened, and the second
        // start (a migrated database) logs no server notice at info.
        let serving = app.stderr();
        assert!(
            serving.contains(&format!("db={}", pg.url))
                && !serving.contains("xbuy.db")
                && !serving.contains("NOTICE"),
            "{serving}"
        );
        app.signal(signal);
        let code = app.wait_exit(Duration::from_secs(30));
        assert_eq!(
            code,
            Some(0),
            "{signal} should stop the app cleanly: {}",
            app.stderr()
        );
        assert!(!app.stderr().contains("panicked"), "{}", app.stderr());
    }
}

/// One app's open flash sale `flash-1` behind a warm Redis gate: until the reconciler has built the SKU's
/// counter, the gate passes attempts to the store uncounted, so warm-up buyers take units until it counts.
struct FlashSale {
    one: OneApp,
}

impl FlashSale {
    /// An open sale whose store calls wait on a lock (`lock_sku`) rather than time out (30 s statements).
    fn slow() -> FlashSale {
        FlashSale::open(OneApp::edited(|t| {
            t.replace("statement_timeout_ms = 5000", "statement_timeout_ms = 30000")
        }))
    }

    /// Holds flash-1's row lock: every sale of it waits for this transaction (a slow store).
    fn lock_sku(&self) -> HeldTx {
        self.one
            .pg
            .hold("SELECT 1 FROM skus WHERE sku = 'flash-1' FOR UPDATE")
    }

    fn open(one: OneApp) -> FlashSale {
        open_flash_sale(one.addr);
        let sale = FlashSale { one };
        let mut warm = 0;
        eventually(
            Duration::from_secs(20),
            "the redis gate to take an attempt",
            || {
                warm += 1;
                assert_eq!(sale.buy(&format!("warm-{warm}")).status, 201);
                (sale.taken() >= 1.0).then_some(())
            },
        );
        sale
    }

    fn buy(&self, user: &str) -> HttpResponse {
        seckill(self.one.addr, user, None)
    }

    fn taken(&self) -> f64 {
        gate_answers(self.one.addr, "taken")
    }

    /// `user` buys their one unit, counted by the gate; returns the order's id.
    fn buy_counted(&self, user: &str) -> String {
        let before = self.taken();
        let r = self.buy(user);
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(self.taken(), before + 1.0, "the gate counted this purchase");
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Once `user`'s order has ended, the store sells to them again and the gate lets it through; the limit
    /// still holds for the order they then have.
    fn sells_again_to(&self, user: &str) {
        let r = self.buy(user);
        assert_eq!(r.status, 201, "the store sells to {user} again: {}", r.body);
        assert_eq!(self.buy(user).status, 429);
    }

    fn post(&self, path: &str, key: Option<&str>, body: &str) -> serde_json::Value {
        let auth = auth();
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        let r = request(self.one.addr, "POST", path, &headers, Some(body.as_bytes())).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        r.json()
    }
}

/// A buyer whose flash-sale order was cancelled, or refunded in full, may buy again, as the store (which
/// counts only live orders) allows: the gate's count of their units was kept for its counter's life, so
/// they were refused `limit_exceeded` by Redis.
#[test]
fn a_cancelled_or_refunded_flash_sale_order_frees_the_buyers_allowance_at_the_redis_gate() {
    let sale = FlashSale::open(OneApp::start());
    let id = sale.buy_counted("canceller");
    let v = sale.post(&format!("/v1/orders/{id}/cancel"), None, "");
    assert_eq!(v["status"], "cancelled", "{v}");
    sale.sells_again_to("canceller");

    let id = sale.buy_counted("refunder");
    sale.post(
        "/admin/credit",
        Some("refunder-credit"),
        r#"{"users": ["refunder"], "amount_cents": 1000000}"#,
    );
    let v = sale.post(&format!("/v1/orders/{id}/pay"), None, "");
    assert_eq!(v["status"], "paid", "{v}");
    let v = sale.post("/v1/refunds", None, &format!(r#"{{"order_id": "{id}"}}"#));
    assert_eq!(v["status"], "refunded", "{v}");
    sale.sells_again_to("refunder");
    audit(sale.one.addr);
}

/// A partial refund gives its units back to the buyer's allowance at the gate too, as it does in the store:
/// only a full refund cleared the gate's count, so a buyer holding one unit of a limit of two was refused by
/// Redis for its counter's life.
#[test]
fn a_partly_refunded_flash_sale_order_frees_its_units_at_the_redis_gate() {
    let sale = FlashSale::open(OneApp::edited(|text| {
        text.replace("per_user_limit = 1", "per_user_limit = 2")
    }));
    let before = sale.taken();
    let body = br#"{"user": "parter", "qty": 2}"#;
    let r = request(sale.one.addr, "POST", "/v1/seckill/flash-1", &[], Some(body)).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(sale.taken(), before + 1.0, "the gate counted both units");
    let id = r.json()["id"].as_str().unwrap().to_string();
    sale.post(
        "/admin/credit",
        Some("parter-credit"),
        r#"{"users": ["parter"], "amount_cents": 1000000}"#,
    );
    assert_eq!(
        sale.post(&format!("/v1/orders/{id}/pay"), None, "")["status"],
        "paid"
    );
    let lines = format!(r#"{{"order_id": "{id}", "lines": [{{"sku": "flash-1", "qty": 1}}]}}"#);
    let v = sale.post("/v1/refunds", Some("part-1"), &lines);
    assert_eq!(v["status"], "paid", "{v}");
    sale.sells_again_to("parter");
    audit(sale.one.addr);
}

/// Flash-sale attempts on SKUs that do not exist (no token needed) are not found, and do not keep a later
/// sale out of the Redis gate: the gate took every SKU an attempt named into its bounded set of counters to
/// build, 256 of them, so after such a flood no sale's counter was built and every attempt passed to the
/// store until a restart.
#[test]
fn attempts_on_unknown_skus_do_not_keep_a_sale_out_of_the_redis_gate() {
    let one = OneApp::start();
    for i in 0..300 {
        let path = format!("/v1/seckill/no-such-{i}");
        // Past the per-user limit (1) too: not found, where it was `limit_exceeded` of a SKU with no sale.
        let body = [
            &br#"{"user": "flooder"}"#[..],
            br#"{"user": "flooder", "qty": 2}"#,
        ][i % 2];
        let r = request(one.addr, "POST", &path, &[], Some(body)).unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
    }
    // Opening waits (bounded) for the gate to take an attempt on the sale.
    let sale = FlashSale::open(one);
    sale.buy_counted("after-the-flood");
    audit(sale.one.addr);
}

/// A buyer of one sale is admitted by the Redis gate in the next sale of the SKU (closed, then opened again),
/// as the store sells to them, and refused by it over the limit within each sale: the gate counted a buyer's
/// units of a SKU over all its sales, so Redis refused a buyer of last month's sale `limit_exceeded` in this
/// month's, which the store, counting per sale, would not.
#[test]
fn a_buyer_of_the_last_sale_is_admitted_by_the_redis_gate_in_the_next() {
    let sale = FlashSale::open(OneApp::start());
    let over_limit = || gate_answers(sale.one.addr, "over_limit");
    let admin = |method: &str| {
        let path = "/v1/merchant/flash-sales/flash-1";
        let r = request(sale.one.addr, method, path, &[("Authorization", &auth())], None).unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
        r.json()
    };
    sale.buy_counted("regular");
    let refused = over_limit();
    assert_eq!(sale.buy("regular").status, 429);
    assert_eq!(over_limit(), refused + 1.0, "redis refused the buyer in sale 1");
    // Opening the open sale again adds stock, not a new sale.
    assert_eq!(admin("POST")["sale_seq"], 1);
    assert_eq!(sale.buy("regular").status, 429);
    assert_eq!(admin("DELETE")["sale_seq"], 1);
    assert_eq!(admin("POST")["sale_seq"], 2);
    sale.buy_counted("regular");
    let refused = over_limit();
    assert_eq!(sale.buy("regular").status, 429);
    assert_eq!(over_limit(), refused + 1.0, "redis refused the buyer in sale 2");
    audit(sale.one.addr);
}

/// The same for a flash-sale order that expired unpaid: the sweeper tells the gate.
#[test]
fn an_expired_flash_sale_order_frees_the_buyers_allowance_at_the_redis_gate() {
    let sale = FlashSale::open(OneApp::with_reservations_for(1_000));
    let id = sale.buy_counted("expirer");
    eventually(Duration::from_secs(20), "the reservation to expire", || {
        let r = get(sale.one.addr, &format!("/v1/orders/{id}")).unwrap();
        (r.json()["status"] == "expired").then_some(())
    });
    sale.sells_again_to("expirer");
    audit(sale.one.addr);
}

/// A sale of `units` units of `flash-1` (the rest written off before it opens) on an app whose reservations
/// last `ttl_ms` and whose reconciler does not rebuild the gate's counters within a test (10 minutes): the
/// stock counter is set by hand, as its rebuild would, so what the gate then says comes from what the app
/// told it since.
fn sale_of(units: u32, ttl_ms: u64) -> OneApp {
    sale_after_regular_orders(units, &[], ttl_ms).0
}

/// [`sale_of`], after each of `buyers` reserved a unit of `flash-1` in a regular order (their ids, in
/// order), before the sale opened: units off the sale until their orders end.
fn sale_after_regular_orders(units: u32, buyers: &[&str], ttl_ms: u64) -> (OneApp, Vec<String>) {
    let ttl = format!("reservation_ttl_ms = {ttl_ms}");
    let one = OneApp::edited(|t| {
        (t.replace("rebuild_ms = 200", "rebuild_ms = 600000")).replace("reservation_ttl_ms = 3600000", &ttl)
    });
    let body = format!(
        r#"{{"updates": [{{"sku": "flash-1", "write_off": {}}}]}}"#,
        100 - units as usize - buyers.len()
    );
    merchant_stock(one.addr, &body);
    let ids = (buyers.iter())
        .map(|user| {
            let body = serde_json::json!({"user": user, "lines": [{"sku": "flash-1", "qty": 1}]}).to_string();
            let key = [("Idempotency-Key", *user)];
            let r = request(one.addr, "POST", "/v1/orders", &key, Some(body.as_bytes())).unwrap();
            assert_eq!(r.status, 201, "{}", r.body);
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    open_flash_sale(one.addr);
    let set = format!("SET xbuy:stock:flash-1 {units} PX 600000");
    assert_eq!(one.redis.command(&set), "+OK");
    (one, ids)
}

fn merchant_stock(addr: SocketAddr, body: &str) {
    admin_post(addr, "/v1/merchant/stock", body);
}

/// A POST with the admin token, which must answer 200: its answer.
fn admin_post(addr: SocketAddr, path: &str, body: &str) -> HttpResponse {
    let auth = auth();
    let headers = [("Authorization", auth.as_str())];
    let r = request(addr, "POST", path, &headers, Some(body.as_bytes())).unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r
}

/// `user`'s attempt is refused `sold_out` by the Redis gate (not by the store).
fn refused_by_the_gate(addr: SocketAddr, user: &str) {
    let sold_out = || gate_answers(addr, "sold_out");
    let before = sold_out();
    let r = seckill(addr, user, None);
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (409, "sold_out".into()),
        "{}",
        r.body
    );
    assert_eq!(sold_out(), before + 1.0, "the gate refused {user}");
}

/// A cancelled reservation's units, a merchant's restock and a refund's units are sellable through the Redis
/// gate at once: its stock counter kept them out until the reconciler's next rebuild (a second by default),
/// and a buyer was told `sold_out` while the store had them.
#[test]
fn units_back_on_sale_pass_the_redis_gate_at_once() {
    let one = sale_of(2, 3_600_000);
    let first = seckill(one.addr, "buyer-a", None);
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(seckill(one.addr, "buyer-b", None).status, 201);
    refused_by_the_gate(one.addr, "buyer-c");
    let id = first.json()["id"].as_str().unwrap().to_string();
    let r = request(one.addr, "POST", &format!("/v1/orders/{id}/cancel"), &[], None).unwrap();
    assert_eq!(r.json()["status"], "cancelled", "{}", r.body);
    let r = seckill(one.addr, "buyer-c", None);
    assert_eq!(r.status, 201, "the cancelled unit: {}", r.body);
    refused_by_the_gate(one.addr, "buyer-d");
    merchant_stock(one.addr, r#"{"updates": [{"sku": "flash-1", "receive": 1}]}"#);
    let r = seckill(one.addr, "buyer-d", None);
    assert_eq!(r.status, 201, "the restocked unit: {}", r.body);
    refused_by_the_gate(one.addr, "buyer-e");
    // A refund of an order not shipped puts its units back on sale, and on the gate's counter.
    let id = r.json()["id"].as_str().unwrap().to_string();
    admin_post(
        one.addr,
        "/admin/credit",
        r#"{"users": ["buyer-d"], "amount_cents": 100000}"#,
    );
    let paid = request(one.addr, "POST", &format!("/v1/orders/{id}/pay"), &[], None).unwrap();
    assert_eq!(paid.json()["status"], "paid", "{}", paid.body);
    let refunded = admin_post(one.addr, "/v1/refunds", &format!(r#"{{"order_id": "{id}"}}"#));
    assert_eq!(refunded.json()["status"], "refunded", "{}", refunded.body);
    let r = seckill(one.addr, "buyer-e", None);
    assert_eq!(r.status, 201, "the refunded unit: {}", r.body);
    refused_by_the_gate(one.addr, "buyer-f");
    audit(one.addr);
}

/// A regular order's units, reserved before a sale of the SKU opened, pass the Redis gate at once when the
/// order is cancelled or expires: the sale sells them, and the gate refused them `sold_out` until the
/// reconciler's next rebuild. (The expiry is asked until admitted, as in the test below.)
#[test]
fn a_regular_orders_units_pass_the_redis_gate_at_once_when_it_ends() {
    let (one, ids) = sale_after_regular_orders(1, &["regular-a", "regular-b"], 8_000);
    let credit = r#"{"users": ["buyer-a", "buyer-b"], "amount_cents": 100000}"#;
    admin_post(one.addr, "/admin/credit", credit);
    // Paid, the sale's orders do not expire: only the regular order's end can put a unit back.
    let bought = |user: &str, what: &str| {
        let r = seckill(one.addr, user, None);
        assert_eq!(r.status, 201, "{what}: {}", r.body);
        let pay = format!("/v1/orders/{}/pay", r.json()["id"].as_str().unwrap());
        let paid = request(one.addr, "POST", &pay, &[], None).unwrap();
        assert_eq!(paid.json()["status"], "paid", "{}", paid.body);
    };
    bought("buyer-a", "the sale's unit");
    refused_by_the_gate(one.addr, "buyer-b");
    let r = request(
        one.addr,
        "POST",
        &format!("/v1/orders/{}/cancel", ids[0]),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(r.json()["status"], "cancelled", "{}", r.body);
    bought("buyer-b", "the cancelled unit");
    refused_by_the_gate(one.addr, "buyer-c");
    sells_once_expired(one.addr, &ids[1], "buyer-c");
    audit(one.addr);
}

/// Waits for order `id` to expire (30 s at most), then for its unit to sell to `user` through the gate:
/// asked until admitted, within 10 s (the sweeper puts it back once the expiry has committed, so an attempt
/// right after the order reads `expired` may still meet the counter before).
fn sells_once_expired(addr: SocketAddr, id: &str, user: &str) {
    eventually(Duration::from_secs(30), "the reservation to expire", || {
        let r = get(addr, &format!("/v1/orders/{id}")).unwrap();
        (r.json()["status"] == "expired").then_some(())
    });
    eventually(Duration::from_secs(10), "the expired unit to sell", || {
        let r = seckill(addr, user, None);
        assert!(matches!(r.status, 201 | 409), "{}", r.body);
        (r.status == 201).then_some(())
    });
}

/// The same for an expired reservation's units, which the sweeper puts back once the expiry has committed
/// (so an attempt right after the order reads `expired` may still meet the counter before: asked until
/// admitted, within a bound far below the reconciler's 10 minutes).
#[test]
fn an_expired_reservations_units_pass_the_redis_gate_at_once() {
    let one = sale_of(1, 3_000);
    let first = seckill(one.addr, "buyer-a", None);
    assert_eq!(first.status, 201, "{}", first.body);
    refused_by_the_gate(one.addr, "buyer-b");
    let id = first.json()["id"].as_str().unwrap().to_string();
    sells_once_expired(one.addr, &id, "buyer-b");
    audit(one.addr);
}

/// A buyer's retry under the same key while their first attempt is still in the store is told to wait (409
/// `in_progress`, `Retry-After`), and once that attempt is through, answered with its order. The gate counts
/// the first attempt's unit as soon as it admits it: before, the retry met `limit_exceeded` (or `sold_out`
/// on a sale's last unit), found no order under its key yet, and was refused, and the buyer who gave up
/// then held the order the first attempt placed.
#[test]
fn a_keyed_retry_while_its_first_attempt_is_in_the_store_waits_for_its_answer() {
    let sale = FlashSale::slow();
    let addr = sale.one.addr;
    let buy = move |key: &str| seckill(addr, "retrier", Some(key));
    // Every sale of flash-1 waits for this transaction (a slow store).
    let lock = sale.lock_sku();
    let before = sale.taken();
    let first = std::thread::spawn(move || buy("retry-1"));
    eventually(
        Duration::from_secs(20),
        "the gate to admit the first attempt",
        || (sale.taken() > before).then_some(()),
    );
    let retry = buy("retry-1");
    told_in_progress(&retry);
    // Another key is another purchase, over the limit whatever is in flight.
    assert_eq!(buy("retry-2").status, 429);
    lock.commit();
    let first = first.join().unwrap();
    assert_eq!(first.status, 201, "{}", first.body);
    let again = buy("retry-1");
    assert!(matches!(again.status, 200 | 201), "{}", again.body);
    assert_eq!(again.header("idempotent-replay"), Some("true"), "{}", again.body);
    assert_eq!(
        again.json()["id"],
        first.json()["id"],
        "the retry is answered with the first order"
    );
    assert_eq!(
        buy("retry-2").status,
        429,
        "the limit holds once the key is settled"
    );
}

/// A keyed retry that reaches another instance, whose own sold-out gate refuses it, while its first attempt
/// is in the store on the first instance, is answered `in_progress`, then the first attempt's order: the
/// gate's refusal was final, so the buyer was told `sold_out` and then held the order.
#[test]
fn a_keyed_retry_another_instances_gate_refuses_waits_for_its_first_attempt() {
    // No Redis (each instance's own gate alone), a gate that remembers a sale sold out for a minute, and
    // statements that wait on a lock rather than time out.
    let edit = |t: String| {
        (t.lines()
            .filter(|l| !l.starts_with("redis_url"))
            .collect::<Vec<_>>()
            .join("\n"))
        .replace("sold_out_gate_ms = 0", "sold_out_gate_ms = 60000")
        .replace("statement_timeout_ms = 5000", "statement_timeout_ms = 30000")
    };
    let first = OneApp::edited(edit);
    let (a, dir) = (first.addr, tempfile::tempdir().unwrap());
    let b = free_addr();
    let config = app_config(dir.path(), 1, b, &first.pg, &first.redis);
    std::fs::write(&config, edit(std::fs::read_to_string(&config).unwrap())).unwrap();
    let _second = start_app(1, &config, b);
    merchant_stock(a, r#"{"updates": [{"sku": "flash-1", "write_off": 99}]}"#);
    open_flash_sale(a);
    // The one unit sold on the first instance; the second is told `sold_out` by the store and remembers it.
    let sold = seckill(a, "early", None);
    assert_eq!(sold.status, 201, "{}", sold.body);
    let refused = seckill(b, "late", None);
    assert_eq!(
        (refused.status, refused.json()["error"]["code"].as_str()),
        (409, Some("sold_out"))
    );
    // The unit comes back on the first instance: the second's gate, which no cancel there cleared, still
    // refuses the sale.
    let id = sold.json()["id"].as_str().unwrap().to_string();
    admin_post(a, &format!("/v1/orders/{id}/cancel"), "");
    let lock = first
        .pg
        .hold("SELECT 1 FROM skus WHERE sku = 'flash-1' FOR UPDATE");
    let attempt = std::thread::spawn(move || seckill(a, "retrier", Some("once")));
    eventually(Duration::from_secs(20), "the attempt to hold its key", || {
        let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
        (first.pg.query(held) == "1").then_some(())
    });
    let retry = seckill(b, "retrier", Some("once"));
    told_in_progress(&retry);
    lock.commit();
    let attempt = attempt.join().unwrap();
    assert_eq!(attempt.status, 201, "{}", attempt.body);
    let again = seckill(b, "retrier", Some("once"));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        again.json()["id"],
        attempt.json()["id"],
        "the retry is answered with the first order"
    );
}

/// A flash-sale attempt whose client left while the store worked stays counted in `in_flight` until it
/// settles: its store call runs on, and counted by its handler alone, such work escaped the admission limit
/// and piled up in the store's lanes while new requests were admitted.
#[test]
fn a_flash_sale_attempt_whose_client_left_stays_counted_until_it_settles() {
    use std::io::Write;
    let sale = FlashSale::slow();
    let addr = sale.one.addr;
    let in_flight = || {
        get(addr, "/v1/stats").unwrap().json()["in_flight"]
            .as_u64()
            .unwrap()
    };
    let lock = sale.lock_sku();
    let before = sale.taken();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let body = r#"{"user": "leaver"}"#;
    write!(
        client,
        "POST /v1/seckill/flash-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    eventually(Duration::from_secs(20), "the gate to admit the attempt", || {
        (sale.taken() > before).then_some(())
    });
    // The client leaves: on its end of file the server closes the connection (hyper without half-close),
    // dropping the handler, while the attempt waits on the lock.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let closed = std::io::Read::read_to_end(&mut client, &mut rest);
    assert!(
        closed.is_ok() && rest.is_empty(),
        "the server answered or kept the connection: {closed:?} {rest:?}"
    );
    assert_eq!(
        in_flight(),
        1,
        "the attempt left uncounted while the store works on it"
    );
    lock.commit();
    eventually(Duration::from_secs(20), "the attempt to settle", || {
        (in_flight() == 0).then_some(())
    });
}

/// A TCP relay to `upstream` that can be frozen: while frozen it forwards nothing either way (the bytes wait
/// in it), as a PostgreSQL that stopped answering, or whose host was cut off, looks to its clients.
struct FreezeRelay {
    addr: SocketAddr,
    frozen: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl FreezeRelay {
    fn start(upstream: SocketAddr) -> FreezeRelay {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let gate = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let ways = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ];
                for (mut from, mut to) in ways {
                    let gate = gate.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            let (lock, thawed) = &*gate;
                            drop(thawed.wait_while(lock.lock().unwrap(), |f| *f).unwrap());
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        FreezeRelay { addr, frozen }
    }

    fn set_frozen(&self, on: bool) {
        *self.frozen.0.lock().unwrap() = on;
        self.frozen.1.notify_all();
    }
}

/// PostgreSQL stops answering (hung, or cut off) under an instance: its clients get a retryable 503 within
/// a bound, not a wait as long as the outage, and once it answers again the instance serves, and a retried
/// order gives one order. The server bounds a statement (`statement_timeout`), but a query sent to a server
/// that answers nothing was held for good: requests hung for as long as the outage lasted.
#[test]
fn a_postgres_that_stops_answering_costs_a_bounded_wait_and_a_retryable_503() {
    let app = RelayedApp::start("# No breaker in the way: every request meets the store.\nlevel = \"sync\"");
    let (addr, relay) = (app.addr, &app.relay);
    assert_eq!(get(addr, "/v1/products/1").unwrap().status, 200);
    let order = || {
        let body = r#"{"user": "frozen", "lines": [{"sku": "sku-1-1", "qty": 1}]}"#;
        request(
            addr,
            "POST",
            "/v1/orders",
            &[("Idempotency-Key", "frozen-1")],
            Some(body.as_bytes()),
        )
    };
    relay.set_frozen(true);
    let read = || get(addr, "/v1/products/1");
    let attempts: [(&str, &dyn Fn() -> std::io::Result<HttpResponse>); 2] =
        [("a read", &read), ("an order", &order)];
    // PostgreSQL stays silent until it is unfrozen below: any answer meanwhile is the app's own bound at
    // work, not the outage ending (a request held as long as the outage gets no answer: the client's read
    // timeout fails it).
    for (what, attempt) in attempts {
        let r = attempt().unwrap_or_else(|e| panic!("{what} got no answer while postgres is silent: {e}"));
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (503, Some("store_busy")),
            "{what}: {}",
            r.body
        );
        assert!(r.header("retry-after").is_some(), "{what}: {}", r.body);
    }
    // Counted as a busy store, apart from a 500: an operator's alert tells the one from the other.
    let m = get(addr, "/metrics").unwrap().body;
    for ty in ["browse", "order"] {
        let busy = format!("type=\"{ty}\",outcome=\"store_busy\"");
        let fault = format!("type=\"{ty}\",outcome=\"server_error\"");
        assert_eq!(
            metric_value(&m, "xcluster_app_requests_total", &busy),
            Some(1.0),
            "{ty}"
        );
        assert_eq!(
            metric_value(&m, "xcluster_app_requests_total", &fault),
            Some(0.0),
            "{ty}"
        );
    }
    relay.set_frozen(false);
    let placed = eventually(Duration::from_secs(30), "orders to be placed again", || {
        let r = order().ok()?;
        matches!(r.status, 200 | 201).then_some(r.json())
    });
    let mine = get(addr, "/v1/users/frozen/orders").unwrap().json();
    let ids: Vec<&str> = (mine["orders"].as_array().unwrap().iter())
        .filter_map(|o| o["id"].as_str())
        .collect();
    assert_eq!(ids, vec![placed["id"].as_str().unwrap()], "one order for one key");
    audit(addr);
}

/// A credit sent without an idempotency key that the store does not confirm in time is answered 504
/// `outcome_unknown` with no `Retry-After`, for it runs on and may commit: answered 503 "retry later", an
/// operator's retry of a slow batch credited every wallet twice once both committed. A keyed one is still
/// "retry later", which its key makes safe. A flash-sale attempt without a key alike: retried, a buyer
/// under a limit of 2 held two orders, or under 1 was told `limit_exceeded` while holding the first.
#[test]
fn an_unkeyed_write_the_store_did_not_confirm_is_not_answered_retry_later() {
    // Connections enough that the credits below find one open while PostgreSQL is silent, so they begin
    // (one that must connect first fails its connect, which applies nothing and is rightly a plain 503).
    let app = RelayedApp::edited("level = \"sync\"", |text| {
        text.replace("pool_size = 4", "pool_size = 32")
            .replace("store_threads = 4", "store_threads = 16")
    });
    let (addr, relay) = (app.addr, &app.relay);
    let credit = |key: Option<&str>| {
        let auth = auth();
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend(key.map(|k| ("Idempotency-Key", k)));
        let body = r#"{"users": ["slow"], "amount_cents": 700}"#;
        request(addr, "POST", "/admin/credit", &headers, Some(body.as_bytes())).unwrap()
    };
    let balance = || get(addr, "/v1/wallets/slow").unwrap().json()["balance_cents"].as_i64();
    assert_eq!(balance(), Some(0));
    app.hold_connections(8);
    open_flash_sale(addr);
    relay.set_frozen(true);
    // Unkeyed, each may still apply: 504 with no `Retry-After`.
    for r in [credit(None), seckill(addr, "slow", None)] {
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (504, Some("outcome_unknown")),
            "{}",
            r.body
        );
        assert_eq!(r.header("retry-after"), None, "{}", r.body);
    }
    let r = credit(Some("slow-1"));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (503, Some("store_busy")),
        "{}",
        r.body
    );
    assert!(r.header("retry-after").is_some(), "{}", r.body);
    relay.set_frozen(false);
    // Its retry, once connections to PostgreSQL work again (those opened while it was frozen time out).
    eventually(
        Duration::from_secs(30),
        "the keyed credit's retry to be answered",
        || (credit(Some("slow-1")).status == 200).then_some(()),
    );
    // The unkeyed credit was not lost with its answer: it commits once PostgreSQL answers again, beside
    // the keyed one, whose retry applied it once.
    eventually(Duration::from_secs(30), "the unsettled credit to commit", || {
        (balance() == Some(1400)).then_some(())
    });
}

/// One app on PostgreSQL through a [`FreezeRelay`]; everything stops when it drops.
/// A keyed flash-sale attempt the app gave up on while PostgreSQL was silent may still commit, so it keeps its
/// in-flight mark at the Redis gate, and a retry under its key that the gate would refuse is told to wait
/// (409 `in_progress`). Its mark taken off, at a sale's last unit the gate refused such a retry `sold_out`,
/// with no order under its key yet, while the first attempt's order was placed.
#[test]
fn a_keyed_flash_sale_attempt_given_up_on_keeps_its_mark() {
    let redis = Redis::start();
    // Connections enough that the attempt below finds one open while PostgreSQL is silent, so it begins
    // (one that must connect first fails its connect, which applies nothing, and rightly gives its mark up).
    let top = format!("redis_url = \"{}\"\nstore_threads = 16", redis.url);
    let app = RelayedApp::edited("level = \"sync\"", |text| {
        (text.replace("store_threads = 4", &top)).replace("pool_size = 4", "pool_size = 32")
    });
    let addr = app.addr;
    app.hold_connections(8);
    open_flash_sale(addr);
    let buy = |user: &str, key: &str| seckill(addr, user, Some(key));
    let taken = || gate_answers(addr, "taken");
    // Until the gate takes attempts (its counters built), each from a buyer of its own: the connections
    // these open stay in the pool, so the attempt below finds one open while PostgreSQL is silent.
    let mut warm = 0;
    eventually(
        Duration::from_secs(30),
        "the redis gate to take an attempt",
        || {
            warm += 1;
            let r = buy(&format!("warm-{warm}"), &format!("warm-{warm}"));
            assert_eq!(r.status, 201, "{}", r.body);
            (taken() >= 1.0).then_some(())
        },
    );
    app.relay.set_frozen(true);
    let first = buy("slow", "slow-1");
    assert_eq!(
        (first.status, first.json()["error"]["code"].as_str()),
        (503, Some("store_busy")),
        "{}",
        first.body
    );
    assert!(
        first.body.contains("did not answer within"),
        "given up on as it ran: {}",
        first.body
    );
    // It may still commit: its mark stays, so a retry the gate would refuse waits for its answer.
    assert!(
        redis.exists("xbuy:attempts:slow/slow-1"),
        "the attempt's in-flight mark"
    );
    // Once PostgreSQL answers, the retry is answered with an order: the first attempt's if it committed
    // (its connection may also have been ended while silent, and rolled back), and the buyer holds one.
    app.relay.set_frozen(false);
    let again = eventually(Duration::from_secs(30), "the retry's answer", || {
        let r = buy("slow", "slow-1");
        matches!(r.status, 200 | 201).then_some(r)
    });
    let orders = get(addr, "/v1/users/slow/orders").unwrap().json();
    let ids: Vec<&serde_json::Value> = orders["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["id"])
        .collect();
    assert_eq!(ids, [&again.json()["id"]], "{orders}");
}

/// `user`'s flash-sale attempt at `flash-1` on the app at `addr`, under `key` if given.
/// `r` is 409 `in_progress` with `Retry-After: 1`: an attempt under its key may still commit.
fn told_in_progress(r: &HttpResponse) {
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (409, Some("in_progress")),
        "{}",
        r.body
    );
    assert_eq!(r.header("retry-after"), Some("1"), "{}", r.body);
}

fn seckill(addr: SocketAddr, user: &str, key: Option<&str>) -> HttpResponse {
    let body = format!(r#"{{"user": "{user}"}}"#);
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    request(
        addr,
        "POST",
        "/v1/seckill/flash-1",
        &headers,
        Some(body.as_bytes()),
    )
    .unwrap()
}

/// Opens the sale of `flash-1` on the app at `addr`.
fn open_flash_sale(addr: SocketAddr) {
    let r = request(
        addr,
        "POST",
        "/v1/merchant/flash-sales/flash-1",
        &[("Authorization", &auth())],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

struct RelayedApp {
    addr: SocketAddr,
    relay: FreezeRelay,
    _app: Proc,
    _dir: tempfile::TempDir,
    pg: Postgres,
}

impl RelayedApp {
    /// Until the app holds more than `n` connections to PostgreSQL: reads side by side open them, and they
    /// then wait in the pool, more than the housekeeping tasks can hold while PostgreSQL is silent.
    fn hold_connections(&self, n: u32) {
        let addr = self.addr;
        eventually(Duration::from_secs(30), "the app to hold its connections", || {
            let warm: Vec<_> = (0..2 * n)
                .map(|_| std::thread::spawn(move || get(addr, "/v1/wallets/warm")))
                .collect();
            for w in warm {
                assert_eq!(w.join().unwrap().unwrap().status, 200);
            }
            let open = self
                .pg
                .query("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'");
            // One of them is this query's own.
            (open.parse::<u32>().unwrap() > n).then_some(())
        });
    }

    /// Short store timeouts, and the given `[degrade]` lines.
    fn start(degrade: &str) -> RelayedApp {
        Self::edited(degrade, |text| text)
    }

    /// As [`Self::start`], on the config as `edit` changes it.
    fn edited(degrade: &str, edit: impl FnOnce(String) -> String) -> RelayedApp {
        let pg = Postgres::start();
        let relay = FreezeRelay::start(pg.addr);
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let config = write_file(dir.path(), "app.toml", &edit(behind_relay(addr, &relay, degrade)));
        let app = start_app(0, config.to_str().unwrap(), addr);
        RelayedApp {
            addr,
            relay,
            _app: app,
            _dir: dir,
            pg,
        }
    }
}

fn behind_relay(addr: SocketAddr, relay: &FreezeRelay, degrade: &str) -> String {
    format!(
        r#"role = "app"
listen = "{addr}"
store = "postgres"
postgres_url = "postgres://xcluster@{relay}/xcluster"
admin_token = "{TOKEN}"
store_threads = 4
[postgres]
pool_size = 4
connect_timeout_ms = 1000
statement_timeout_ms = 1000
[degrade]
{degrade}
"#,
        relay = relay.addr,
    )
}

fn degrade_state(addr: SocketAddr) -> serde_json::Value {
    let r = request(addr, "GET", "/admin/degrade", &[("Authorization", &auth())], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// A short PostgreSQL outage opens the error breaker (read-only), and once PostgreSQL answers the instance
/// takes orders again after the breaker's short first wait, not after `open_ms`: here `open_ms` is ten
/// minutes, which the test's deadline would see. Before the backoff every opening waited the whole `open_ms`
/// (5 s by default), so a 1 s restart refused orders for about 7 s.
#[test]
fn after_a_short_postgres_outage_the_error_breaker_closes_after_its_first_short_wait() {
    let app = RelayedApp::start("level = \"auto\"\nopen_ms = 600000\nopen_min_ms = 1000");
    let (addr, relay) = (app.addr, &app.relay);
    let order = |key: &str| {
        let body = r#"{"user": "outage", "lines": [{"sku": "sku-1-1", "qty": 1}]}"#;
        request(
            addr,
            "POST",
            "/v1/orders",
            &[("Idempotency-Key", key)],
            Some(body.as_bytes()),
        )
    };
    assert_eq!(order("before").unwrap().status, 201);
    relay.set_frozen(true);
    // Calls fail (503 store_busy) once their bound passes; the sampler then opens the error breaker.
    let failing: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || get(addr, &format!("/v1/products/{}", i + 1))))
        .collect();
    let opened = eventually(Duration::from_secs(30), "the error breaker to open", || {
        let d = degrade_state(addr);
        (d["level"] == "read_only").then_some(d)
    });
    assert_eq!(opened["breakers"]["errors"], "open", "{opened}");
    // Backing off from its short first wait (two failed trials at most here), not waiting `open_ms`.
    let wait = opened["waits_ms"]["errors"].as_u64().unwrap();
    assert!((1000..=4000).contains(&wait), "{opened}");
    let refused = order("during").unwrap();
    assert_eq!(refused.status, 503, "read-only refuses orders: {}", refused.body);
    relay.set_frozen(false);
    for t in failing {
        let _ = t.join();
    }
    let placed = eventually(Duration::from_secs(60), "orders to be taken again", || {
        let r = order("after").ok()?;
        (r.status == 201).then_some(r)
    });
    assert_eq!(placed.json()["status"], "reserved", "{}", placed.body);
    // The trial that took this order closes the breaker. The latency breaker may be open too (the frozen
    // calls took seconds): its level, queued, takes orders.
    let d = eventually(Duration::from_secs(30), "the error breaker to close", || {
        let d = degrade_state(addr);
        (d["breakers"]["errors"] == "closed").then_some(d)
    });
    assert_ne!(d["level"], "read_only", "{d}");
    audit(addr);
}
