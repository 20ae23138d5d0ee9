//! XBuy's API edges on real processes: every malformed request gets a 4xx JSON error, reservations expire
//! exactly once across processes, payments and refunds through the API keep the ledger balanced, a keyed
//! merchant stock batch is received once, the stats contract for the agent, and the token-protected degrade
//! switch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "app_common.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use xcluster_tests::*;

#[test]
fn every_malformed_request_gets_a_4xx_json_error() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "max_body_bytes = 2048");
    let a = addrs[0];
    let order = |key: Option<&str>, body: &str| {
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(k) = key {
            h.push(("Idempotency-Key", k));
        }
        request(a, "POST", "/v1/orders", &h, Some(body.as_bytes())).unwrap()
    };
    let long_key = "k".repeat(200);
    let big = format!("{{\"user\":\"u\",\"lines\":[],\"pad\":\"{}\"}}", "x".repeat(4096));
    let cases: Vec<(&str, HttpResponse)> = vec![
        (
            "no key",
            order(None, r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":1}]}"#),
        ),
        (
            "bad key",
            order(
                Some(&long_key),
                r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":1}]}"#,
            ),
        ),
        (
            "two keys",
            request(
                a,
                "POST",
                "/v1/orders",
                &[
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", "k1"),
                    ("Idempotency-Key", "k2"),
                ],
                Some(br#"{"user":"u","lines":[{"sku":"sku-1-1","qty":1}]}"#),
            )
            .unwrap(),
        ),
        ("not json", order(Some("k1"), "not json")),
        ("empty body", order(Some("k1"), "")),
        (
            "unknown field",
            order(Some("k1"), r#"{"user":"u","lines":[],"x":1}"#),
        ),
        ("no lines", order(Some("k1"), r#"{"user":"u","lines":[]}"#)),
        (
            "zero qty",
            order(Some("k1"), r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":0}]}"#),
        ),
        (
            "negative qty",
            order(Some("k1"), r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":-1}]}"#),
        ),
        (
            "huge qty",
            order(
                Some("k1"),
                r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":99999999999}]}"#,
            ),
        ),
        (
            "bad user",
            order(
                Some("k1"),
                r#"{"user":"a b","lines":[{"sku":"sku-1-1","qty":1}]}"#,
            ),
        ),
        (
            "dup sku",
            order(
                Some("k1"),
                r#"{"user":"u","lines":[{"sku":"a","qty":1},{"sku":"a","qty":1}]}"#,
            ),
        ),
        (
            "unknown sku",
            order(Some("k2"), r#"{"user":"u","lines":[{"sku":"nope","qty":1}]}"#),
        ),
        ("too large", order(Some("k1"), &big)),
        (
            "too much stock",
            order(
                Some("k3"),
                r#"{"user":"u","lines":[{"sku":"sku-1-1","qty":5000}]}"#,
            ),
        ),
        ("unknown path", get(a, "/v1/nothing").unwrap()),
        (
            "wrong method",
            request(a, "DELETE", "/v1/orders", &[], None).unwrap(),
        ),
        ("bad product id", get(a, "/v1/products/abc").unwrap()),
        ("missing product", get(a, "/v1/products/999999").unwrap()),
        ("missing order", get(a, "/v1/orders/o-missing").unwrap()),
        ("bad order id", get(a, "/v1/orders/o%20x").unwrap()),
        ("bad query", get(a, "/v1/products?limit=0").unwrap()),
        ("unknown query", get(a, "/v1/products?color=red").unwrap()),
        (
            "pay missing",
            post(a, "/v1/orders/o-missing/pay", None, false, &json!({})).unwrap(),
        ),
        (
            "orders of a user, limit 0",
            get(a, "/v1/users/ann/orders?limit=0").unwrap(),
        ),
        (
            "orders of a user, a made-up cursor",
            get(a, "/v1/users/ann/orders?before=yesterday").unwrap(),
        ),
        (
            "orders of a user with a bad id",
            get(a, "/v1/users/a%20b/orders").unwrap(),
        ),
        (
            "order as an array of its fields",
            request(
                a,
                "POST",
                "/v1/orders",
                &[("Idempotency-Key", "arr")],
                Some(br#"["u1", [{"sku": "sku-1-1", "qty": 1}]]"#),
            )
            .unwrap(),
        ),
        (
            "seckill bad body",
            request(a, "POST", "/v1/seckill/flash-1", &[], Some(b"{\"usr\":1}")).unwrap(),
        ),
        (
            "seckill bad qty",
            post(
                a,
                "/v1/seckill/flash-1",
                None,
                false,
                &json!({"user": "u", "qty": 0}),
            )
            .unwrap(),
        ),
        (
            "callback no token",
            post(a, "/v1/payments/callback", None, false, &json!({})).unwrap(),
        ),
        (
            "callback bad status",
            post(
                a,
                "/v1/payments/callback",
                None,
                true,
                &json!({"payment_id": "p", "order_id": "o", "amount_cents": 1, "status": "maybe"}),
            )
            .unwrap(),
        ),
        (
            "refund missing",
            post(a, "/v1/refunds", None, true, &json!({"order_id": "o-missing"})).unwrap(),
        ),
        (
            "degrade no token",
            post(a, "/admin/degrade", None, false, &json!({"level": "sync"})).unwrap(),
        ),
        (
            "degrade bad level",
            post(a, "/admin/degrade", None, true, &json!({"level": "fast"})).unwrap(),
        ),
        (
            "credit negative",
            post(
                a,
                "/admin/credit",
                None,
                true,
                &json!({"users": ["u"], "amount_cents": -5}),
            )
            .unwrap(),
        ),
        (
            "stock unknown sku",
            post(
                a,
                "/v1/merchant/stock",
                None,
                true,
                &json!({"updates": [{"sku": "nope", "receive": 1}]}),
            )
            .unwrap(),
        ),
        (
            "flash bad buckets",
            post(
                a,
                "/v1/merchant/flash-sales/flash-1",
                None,
                true,
                &json!({"buckets": 500}),
            )
            .unwrap(),
        ),
    ];
    for (what, r) in &cases {
        assert!(
            (400..500).contains(&r.status),
            "{what}: status {} body {}",
            r.status,
            r.body
        );
        let v: serde_json::Value =
            serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.body));
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{what}: {v}"
        );
    }
    // Nothing malformed left a trace in the store.
    assert_eq!(audit_ok(a)["totals"]["orders"], 0);
}

#[test]
fn reservations_expire_exactly_once_across_processes() {
    let db = Db::new();
    let (procs, addrs) = start_apps(&db, 2, "reservation_ttl_ms = 2500");
    let ids = parallel(50, 10, |i| {
        buy(&addrs, i, &format!("u{i}"), &format!("e{i}"), "sku-8-1", false).unwrap()
    });
    assert_eq!(sku_stock(addrs[0], 8, "sku-8-1")["reserved"], 50);
    let totals = eventually(Duration::from_secs(20), "every reservation expired", || {
        let t = audit_ok(addrs[1])["totals"].clone();
        (t["expired"] == 50).then_some(t)
    });
    assert_eq!(totals["units_reserved"], 0);
    let stock = sku_stock(addrs[0], 8, "sku-8-1");
    assert_eq!(
        (stock["available"].as_i64(), stock["reserved"].as_i64()),
        (Some(1000), Some(0))
    );
    // Both sweepers ran; together they expired each reservation once.
    let expired: f64 = addrs
        .iter()
        .map(|a| {
            metric_value(
                &get(*a, "/metrics").unwrap().body,
                "xcluster_app_reservations_expired_total",
                "",
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(expired, 50.0);
    // An expired order can be neither paid nor cancelled back into stock.
    let r = post(
        addrs[0],
        &format!("/v1/orders/{}/pay", ids[0]),
        None,
        false,
        &json!({}),
    )
    .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    let r = post(
        addrs[1],
        &format!("/v1/orders/{}/cancel", ids[1]),
        None,
        false,
        &json!({}),
    )
    .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    audit_ok(addrs[0]);
    drop(procs);
}

#[test]
fn payments_refunds_and_settlement_balance_the_ledger() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 2, "");
    let (a, b) = (addrs[0], addrs[1]);
    // A keyed credit retried (on either instance) posts once; the key cannot carry another credit.
    let top_up = json!({"users": ["alice"], "amount_cents": 700});
    let first = post(a, "/admin/credit", Some("top-up-1"), true, &top_up).unwrap();
    assert_eq!(
        (first.status, first.header("idempotent-replay")),
        (200, None),
        "{}",
        first.body
    );
    let again = post(b, "/admin/credit", Some("top-up-1"), true, &top_up).unwrap();
    assert_eq!(
        (again.status, again.header("idempotent-replay")),
        (200, Some("true")),
        "{}",
        again.body
    );
    let other = json!({"users": ["alice"], "amount_cents": 701});
    let r = post(a, "/admin/credit", Some("top-up-1"), true, &other).unwrap();
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(get(b, "/v1/wallets/alice").unwrap().json()["balance_cents"], 700);
    let o1 = buy(&addrs, 0, "alice", "p1", "sku-1-1", true).unwrap();
    assert_eq!(get(b, "/v1/wallets/alice").unwrap().json()["balance_cents"], 90);
    // Her orders, as a "my orders" page lists them.
    // What the shop is owed for it, and (after settlement, below) was paid out.
    let shop_n = |n: u32, token: bool| {
        let bearer = format!("Bearer {TOKEN}");
        let headers: &[(&str, &str)] = if token { &[("Authorization", &bearer)] } else { &[] };
        request(b, "GET", &format!("/v1/merchant/shops/{n}"), headers, None).unwrap()
    };
    let shop = |token: bool| shop_n(1, token);
    assert_eq!(shop(false).status, 401);
    // A shop that does not exist is not one with nothing owed.
    let none = shop_n(99, true);
    assert_eq!(none.status, 404, "{}", none.body);
    assert_eq!(
        (
            shop(true).json()["receivable_cents"].as_i64(),
            shop(true).json()["paid_out_cents"].as_i64()
        ),
        (Some(610), Some(0)),
        "{}",
        shop(true).body
    );
    let mine = get(b, "/v1/users/alice/orders").unwrap().json();
    assert_eq!(mine["orders"][0]["id"], o1.as_str(), "{mine}");
    assert_eq!(mine["orders"][0]["status"], "paid", "{mine}");
    assert_eq!(mine["next_before"], serde_json::Value::Null, "{mine}");
    // An order key is the user's own: bob's "p1" is his order, not a conflict with alice's.
    let bobs = post(
        b,
        "/v1/orders",
        Some("p1"),
        false,
        &json!({"user": "bob", "lines": [{"sku": "sku-2-1", "qty": 1}]}),
    )
    .unwrap();
    assert_eq!(bobs.status, 201, "{}", bobs.body);
    assert_ne!(bobs.json()["id"].as_str(), Some(o1.as_str()));
    let r = post(
        b,
        &format!("/v1/orders/{}/cancel", bobs.json()["id"].as_str().unwrap()),
        None,
        false,
        &json!({}),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Not enough left for a second one: 402, the reservation stays.
    let o2 = buy(&addrs, 1, "alice", "p2", "sku-1-1", false).unwrap();
    let r = post(b, &format!("/v1/orders/{o2}/pay"), None, false, &json!({})).unwrap();
    assert_eq!(r.status, 402, "{}", r.body);
    // The provider pays it instead; the callback delivered twice (to two instances) has one effect.
    let cb = json!({"payment_id": "psp-1", "order_id": o2, "amount_cents": 610, "status": "succeeded"});
    for addr in [a, b] {
        let r = post(addr, "/v1/payments/callback", None, true, &cb).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["paid_via"], "psp");
    }
    // A capture of another amount is kept too (owed back), acknowledged, and pays nothing.
    let wrong = json!({"payment_id": "psp-2", "order_id": o2, "amount_cents": 1, "status": "succeeded"});
    let r = post(a, "/v1/payments/callback", None, true, &wrong).unwrap();
    assert_eq!(
        (r.status, &r.json()["paid_via"]),
        (200, &json!("psp")),
        "{}",
        r.body
    );
    // Money the provider captured for an order that cannot take it (paid already; cancelled) is kept, owed
    // back, and the delivery acknowledged: a refusal rolled the payment back and lost it. A replay is the
    // same delivery; the same payment id with another status is a conflict, so the payment was recorded.
    let o3 = buy(&addrs, 0, "alice", "p3", "sku-1-1", false).unwrap();
    let r = post(a, &format!("/v1/orders/{o3}/cancel"), None, false, &json!({})).unwrap();
    assert_eq!(r.json()["status"], "cancelled", "{}", r.body);
    for (id, order, status) in [("psp-3", &o2, "paid"), ("psp-4", &o3, "cancelled")] {
        let cb = json!({"payment_id": id, "order_id": order, "amount_cents": 610, "status": "succeeded"});
        for addr in [a, b] {
            let r = post(addr, "/v1/payments/callback", None, true, &cb).unwrap();
            assert_eq!(
                (r.status, r.json()["status"].as_str()),
                (200, Some(status)),
                "{id}: {}",
                r.body
            );
        }
        let failed = json!({"payment_id": id, "order_id": order, "amount_cents": 610, "status": "failed"});
        let r = post(a, "/v1/payments/callback", None, true, &failed).unwrap();
        assert_eq!(r.status, 422, "{id} was not recorded: {}", r.body);
    }
    // Refund the wallet payment twice: one effect, money back.
    for addr in [a, b] {
        let r = post(addr, "/v1/refunds", None, true, &json!({"order_id": o1})).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], "refunded");
    }
    assert_eq!(get(a, "/v1/wallets/alice").unwrap().json()["balance_cents"], 700);
    let r = post(b, &format!("/v1/orders/{o2}/fulfil"), None, true, &json!({})).unwrap();
    assert_eq!(r.json()["status"], "fulfilled");
    let s = post(a, "/admin/settlements", None, true, &json!({}))
        .unwrap()
        .json();
    let settled: i64 = s["settlements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["amount_cents"].as_i64().unwrap())
        .sum();
    assert_eq!(settled, 610);
    let after = shop(true).json();
    assert_eq!(
        (
            after["receivable_cents"].as_i64(),
            after["paid_out_cents"].as_i64()
        ),
        (Some(0), Some(610)),
        "{after}"
    );
    let totals = drained_totals(b);
    assert_eq!(
        (totals["refunded"].as_u64(), totals["fulfilled"].as_u64()),
        (Some(1), Some(1))
    );

    // A refund of a fulfilled order leaves its shipped units out of the stock: they are with the buyer, and
    // putting them back on sale would sell what the shop does not have. An unshipped refund restocks (o1).
    let stock = || {
        let p = get(a, "/v1/products/1").unwrap().json();
        let sku = p["skus"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sku"] == "sku-1-1")
            .cloned()
            .unwrap();
        (sku["available"].as_i64().unwrap(), sku["sold"].as_i64().unwrap())
    };
    let before = stock();
    let r = post(a, "/v1/refunds", None, true, &json!({"order_id": o2})).unwrap();
    assert_eq!(r.json()["status"], "refunded", "{}", r.body);
    assert_eq!(stock(), (before.0, before.1 - 1));
    audit_ok(a);
}

/// A merchant retries a stock batch whose answer was lost, under its `Idempotency-Key`: the units are received
/// once, the retry (on another instance) gets the first answer with `Idempotent-Replay: true`, and another
/// batch under the key is 422 and changes nothing; a batch without a key applies each time, as it did.
#[test]
fn a_keyed_stock_batch_is_received_once() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 2, "");
    let (a, b) = (addrs[0], addrs[1]);
    let available = || sku_stock(a, 7, "sku-7-1")["available"].as_i64().unwrap();
    let before = available();
    let stock = |at, key: Option<&str>, receive: u32| {
        let body = json!({"updates": [{"sku": "sku-7-1", "receive": receive}, {"sku": "sku-7-2", "price_cents": 1234}]});
        post(at, "/v1/merchant/stock", key, true, &body).unwrap()
    };

    let first = stock(a, Some("delivery-1"), 50);
    assert_eq!(
        (first.status, first.header("idempotent-replay")),
        (200, None),
        "{}",
        first.body
    );
    assert_eq!(first.json()["skus"][0]["available"].as_i64(), Some(before + 50));
    let again = stock(b, Some("delivery-1"), 50);
    assert_eq!(
        (again.status, again.header("idempotent-replay")),
        (200, Some("true")),
        "{}",
        again.body
    );
    assert_eq!(again.json(), first.json());
    assert_eq!(available(), before + 50, "the retry received nothing");

    let other = stock(b, Some("delivery-1"), 60);
    assert_eq!(
        (other.status, other.json()["error"]["code"].as_str()),
        (422, Some("idempotency_conflict")),
        "{}",
        other.body
    );
    let bad = stock(a, Some(&"k".repeat(200)), 1);
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].as_str()),
        (400, Some("bad_idempotency_key")),
        "{}",
        bad.body
    );
    assert_eq!(available(), before + 50, "refusals changed nothing");

    for _ in 0..2 {
        let r = stock(a, None, 1);
        assert_eq!(
            (r.status, r.header("idempotent-replay")),
            (200, None),
            "{}",
            r.body
        );
    }
    assert_eq!(available(), before + 52);
    audit_ok(b);
}

/// A shop refunds part of an order through the API: lines need an `Idempotency-Key` (a retry without one
/// would refund twice); a replay (on another instance) answers the first result and posts nothing; more than
/// is left, or a SKU the order lacks, is refused naming it; the order shows what was refunded; a full refund
/// then takes only the rest.
#[test]
fn partial_refunds_through_the_api() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 2, "");
    let (a, b) = (addrs[0], addrs[1]);
    credit(a, &["carol".to_string()], 5000);
    let o = post(
        a,
        "/v1/orders",
        Some("c1"),
        false,
        &json!({"user": "carol", "lines": [{"sku": "sku-1-1", "qty": 2}, {"sku": "sku-2-1", "qty": 1}]}),
    )
    .unwrap();
    assert_eq!(o.status, 201, "{}", o.body);
    let id = o.json()["id"].as_str().unwrap().to_string();
    let r = post(a, &format!("/v1/orders/{id}/pay"), None, false, &json!({})).unwrap();
    assert_eq!(
        (r.status, r.json()["total_cents"].as_i64()),
        (200, Some(1930)),
        "{}",
        r.body
    );
    let before = sku_stock(a, 1, "sku-1-1");
    let one = json!({"order_id": id, "lines": [{"sku": "sku-1-1", "qty": 1}]});

    let r = post(a, "/v1/refunds", None, true, &one).unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("missing_idempotency_key")),
        "{}",
        r.body
    );
    let first = post(a, "/v1/refunds", Some("ret-1"), true, &one).unwrap();
    assert_eq!(
        (first.status, first.header("idempotent-replay")),
        (200, None),
        "{}",
        first.body
    );
    let v = first.json();
    assert_eq!(
        (v["status"].as_str(), v["refunded_cents"].as_i64()),
        (Some("paid"), Some(610)),
        "{v}"
    );
    let again = post(b, "/v1/refunds", Some("ret-1"), true, &one).unwrap();
    assert_eq!(
        (again.status, again.header("idempotent-replay")),
        (200, Some("true")),
        "{}",
        again.body
    );
    assert_eq!(again.json(), v);
    assert_eq!(
        get(b, "/v1/wallets/carol").unwrap().json()["balance_cents"],
        5000 - 1930 + 610
    );
    let s = sku_stock(a, 1, "sku-1-1");
    assert_eq!(
        (s["available"].as_i64(), s["sold"].as_i64()),
        (
            before["available"].as_i64().map(|n| n + 1),
            before["sold"].as_i64().map(|n| n - 1)
        )
    );

    let refused = |key: &str, body: serde_json::Value| {
        let r = post(a, "/v1/refunds", Some(key), true, &body).unwrap();
        let e = r.json()["error"].clone();
        (
            r.status,
            e["code"].as_str().unwrap_or("").to_string(),
            e["message"].as_str().unwrap_or("").to_string(),
        )
    };
    let two = json!({"order_id": id, "lines": [{"sku": "sku-1-1", "qty": 2}]});
    let (status, code, _) = refused("ret-1", two.clone());
    assert_eq!((status, code.as_str()), (422, "idempotency_conflict"));
    let (status, code, msg) = refused("ret-2", two);
    assert_eq!((status, code.as_str()), (409, "over_refund"), "{msg}");
    assert!(
        msg.contains("1 unit of sku sku-1-1 left to refund, 2 wanted"),
        "{msg}"
    );
    let (status, code, msg) = refused(
        "ret-3",
        json!({"order_id": id, "lines": [{"sku": "sku-3-1", "qty": 1}]}),
    );
    assert_eq!((status, code.as_str()), (422, "not_in_order"), "{msg}");
    assert!(msg.contains("sku-3-1"), "{msg}");
    let (status, code, _) = refused(
        "ret-4",
        json!({"order_id": id, "lines": [{"sku": "sku-1-1", "qty": 1}, {"sku": "sku-1-1", "qty": 1}]}),
    );
    assert_eq!((status, code.as_str()), (400, "invalid_refund"));
    let (status, code, _) = refused("ret-5", json!({"order_id": id, "lines": []}));
    assert_eq!((status, code.as_str()), (400, "invalid_refund"));

    let view = get(b, &format!("/v1/orders/{id}")).unwrap().json();
    assert_eq!(view["refunded_cents"], 610, "{view}");
    let refunded: Vec<(String, i64)> = view["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["sku"].as_str().unwrap().to_string(),
                l["refunded_qty"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refunded,
        vec![("sku-1-1".to_string(), 1), ("sku-2-1".to_string(), 0)]
    );

    // A full refund takes only what is left.
    let r = post(b, "/v1/refunds", None, true, &json!({"order_id": id})).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.json()["status"].as_str(), r.json()["refunded_cents"].as_i64()),
        (Some("refunded"), Some(1930))
    );
    assert_eq!(get(a, "/v1/wallets/carol").unwrap().json()["balance_cents"], 5000);
    let totals = drained_totals(a);
    assert_eq!(totals["refunded"].as_u64(), Some(1));
}

#[test]
fn stats_contract_degrade_switch_and_flash_sale() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "[slowdown]\ncpu_us_per_request = { seckill = 200 }");
    let a = addrs[0];
    let opened = post(
        a,
        "/v1/merchant/flash-sales/flash-1",
        None,
        true,
        &json!({"buckets": 4}),
    )
    .unwrap();
    assert_eq!(opened.json()["bucketed"], 100, "{}", opened.body);
    assert_eq!(opened.json()["flash_sale"], true, "{}", opened.body);
    // While the sale is open an ordinary order cannot buy it past the per-user limit.
    let bulk = post(
        a,
        "/v1/orders",
        Some("bulk"),
        false,
        &json!({"user": "bulk", "lines": [{"sku": "flash-1", "qty": 50}]}),
    )
    .unwrap();
    assert_eq!(bulk.status, 409, "{}", bulk.body);
    assert_eq!(bulk.json()["error"]["code"], "on_flash_sale");
    // The per-user limit (1) holds while stock remains: a second unit is refused as over the limit, not for
    // want of stock.
    let seckill = |user: &str| post(a, "/v1/seckill/flash-1", None, false, &json!({"user": user})).unwrap();
    let once = seckill("limited");
    assert_eq!(once.status, 201, "{}", once.body);
    let again = seckill("limited");
    assert_eq!(
        (again.status, again.json()["error"]["code"].as_str()),
        (429, Some("limit_exceeded")),
        "{}",
        again.body
    );
    // A SKU that does not exist is not found, however many units are asked for: past the limit it was
    // `limit_exceeded` ("at most 1 unit of nosuch").
    let unknown = post(
        a,
        "/v1/seckill/nosuch",
        None,
        false,
        &json!({"user": "u", "qty": 2}),
    )
    .unwrap();
    assert_eq!(
        (unknown.status, unknown.json()["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{}",
        unknown.body
    );
    let res = parallel(150, 20, |i| {
        until_answered(&addrs, i, |x| {
            post(
                x,
                "/v1/seckill/flash-1",
                None,
                false,
                &json!({"user": format!("s{i}")}),
            )
        })
    });
    // The 99 units left sell, and no more.
    assert_eq!(res.iter().filter(|r| r.status == 201).count(), 99);
    assert!(res.iter().filter(|r| r.status != 201).all(|r| r.status == 409));
    let stats = eventually(
        Duration::from_secs(10),
        "a stats window with seckill traffic",
        || {
            let s = get(a, "/v1/stats").unwrap().json();
            (s["types"]["seckill"]["rate"].as_f64().unwrap_or(0.0) > 0.0).then_some(s)
        },
    );
    assert_eq!(stats["instance"], "app-1");
    // Every answer names the instance that gave it, for a client behind an L4 proxy (`xcluster load --via
    // proxy` reported the proxy's listener as the backend), refusals too.
    assert_eq!(
        get(a, "/v1/stats").unwrap().header("x-xcluster-instance"),
        Some("app-1")
    );
    assert_eq!(again.header("x-xcluster-instance"), Some("app-1"));
    assert_eq!(stats["ready"], true);
    assert!(stats["capacity"].as_u64().unwrap() > 0);
    for t in ["browse", "order", "seckill", "pay"] {
        assert!(stats["types"][t]["service_ms"].is_number(), "{stats}");
    }
    assert!(
        stats["types"]["seckill"]["service_ms"].as_f64().unwrap() >= 0.2,
        "the CPU knob shows: {stats}"
    );
    // The degrade switch: token-protected, visible (on /metrics too, as the operator's), and enforced.
    let levels = || {
        let m = get(a, "/metrics").unwrap().body;
        let at = |name| metric_value(&m, name, "");
        (
            at("xcluster_app_degrade_level"),
            at("xcluster_app_degrade_manual_level"),
        )
    };
    assert_eq!(levels(), (Some(0.0), Some(-1.0)), "before any override");
    assert_eq!(
        post(a, "/admin/degrade", None, false, &json!({"level": "read_only"}))
            .unwrap()
            .status,
        401
    );
    let d = post(a, "/admin/degrade", None, true, &json!({"level": "read_only"}))
        .unwrap()
        .json();
    assert_eq!(d["level"], "read_only");
    assert_eq!(levels(), (Some(3.0), Some(3.0)), "read_only set by hand");
    assert_eq!(
        post(a, "/v1/seckill/flash-1", None, false, &json!({"user": "late"}))
            .unwrap()
            .status,
        503
    );
    let d = post(a, "/admin/degrade", None, true, &json!({"level": "auto"}))
        .unwrap()
        .json();
    assert_eq!(d["manual"], serde_json::Value::Null);
    assert_eq!(get(a, "/admin/degrade").unwrap().json()["level"], "sync");
    assert_eq!(levels(), (Some(0.0), Some(-1.0)), "back to the breakers");
    let totals = drained_totals(a);
    assert_eq!(totals["units_reserved"], 100);
    // Ending the sale: token-protected; what a cancelled winner gave back is then on the shelf for anyone.
    let winner = res.iter().find(|r| r.status == 201).unwrap().json();
    let cancelled = post(
        a,
        &format!("/v1/orders/{}/cancel", winner["id"].as_str().unwrap()),
        None,
        false,
        &json!({}),
    )
    .unwrap();
    assert_eq!(cancelled.json()["status"], "cancelled", "{}", cancelled.body);
    let close = |token: bool| {
        let bearer = format!("Bearer {TOKEN}");
        let headers: &[(&str, &str)] = if token { &[("Authorization", &bearer)] } else { &[] };
        request(a, "DELETE", "/v1/merchant/flash-sales/flash-1", headers, None).unwrap()
    };
    assert_eq!(close(false).status, 401);
    let closed = close(true);
    assert_eq!(closed.status, 200, "{}", closed.body);
    assert_eq!(
        (
            closed.json()["flash_sale"].clone(),
            closed.json()["available"].clone()
        ),
        (json!(false), json!(1))
    );
    let after = post(
        a,
        "/v1/orders",
        Some("after"),
        false,
        &json!({"user": "bulk", "lines": [{"sku": "flash-1", "qty": 1}]}),
    )
    .unwrap();
    assert_eq!(after.status, 201, "{}", after.body);
    // An empty body opens a sale with the configured buckets.
    let reopened = request(
        a,
        "POST",
        "/v1/merchant/flash-sales/sku-1-1",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .unwrap();
    assert_eq!(reopened.status, 200, "{}", reopened.body);
    assert_eq!(reopened.json()["flash_sale"], true);
    audit_ok(a);
}

/// With `payment_callback_secret`, a provider callback is taken on its signature (`X-Signature: t=..,v1=..`,
/// HMAC-SHA256 of "t.body"), computed here from the documented format: a delivery without one (even with
/// the admin token), with another body, or with a stale time is refused and counted; a signed one pays.
#[test]
fn payment_callbacks_are_taken_on_their_signature_when_a_secret_is_set() {
    use hmac::{Hmac, Mac};
    const SECRET: &str = "provider-shared-secret-1";
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, &format!("payment_callback_secret = \"{SECRET}\""));
    let a = addrs[0];
    // Counted from 0, on `/metrics` before the first refusal (and so is every counter an alert reads).
    let m = get(a, "/metrics").unwrap().body;
    for name in [
        "xcluster_app_payment_callbacks_refused_total",
        "xcluster_app_audit_failures_total",
    ] {
        assert_eq!(metric_value(&m, name, ""), Some(0.0), "{name}: {m}");
    }
    let order = buy(&addrs, 0, "signed", "s1", "sku-1-1", false).unwrap();
    let total = get(a, &format!("/v1/orders/{order}")).unwrap().json()["total_cents"].clone();
    let body =
        json!({"payment_id": "psp-s1", "order_id": order, "amount_cents": total, "status": "succeeded"})
            .to_string();
    let sign = |t: u64, body: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let deliver = |headers: &[(&str, &str)], body: &str| {
        request(a, "POST", "/v1/payments/callback", headers, Some(body.as_bytes())).unwrap()
    };
    let bearer = format!("Bearer {TOKEN}");
    let unsigned = deliver(&[("Authorization", &bearer)], &body);
    assert_eq!(unsigned.status, 401, "{}", unsigned.body);
    assert_eq!(unsigned.json()["error"]["code"], "bad_signature");
    let other = body.replace("psp-s1", "psp-s2");
    let tampered = deliver(&[("X-Signature", &sign(now, &body))], &other);
    assert_eq!(tampered.status, 401, "{}", tampered.body);
    let stale = deliver(&[("X-Signature", &sign(now - 3600, &body))], &body);
    assert_eq!(stale.status, 401, "{}", stale.body);
    assert_eq!(
        get(a, &format!("/v1/orders/{order}")).unwrap().json()["status"],
        "reserved",
        "no refused delivery paid it"
    );
    let signed = deliver(&[("X-Signature", &sign(now, &body))], &body);
    assert_eq!(signed.status, 200, "{}", signed.body);
    assert_eq!(
        (
            signed.json()["status"].as_str(),
            signed.json()["paid_via"].as_str()
        ),
        (Some("paid"), Some("psp"))
    );
    let m = get(a, "/metrics").unwrap().body;
    assert_eq!(
        metric_value(&m, "xcluster_app_payment_callbacks_refused_total", ""),
        Some(3.0),
        "{m}"
    );
    audit_ok(a);
}

/// A gate may refuse a new flash-sale order early, never a replay: a buyer whose `201` was lost, retrying with
/// the same key after the sale sold out (the sold-out gate closed), is shown the order they hold, while a new
/// buyer is refused by the gate without reaching the store.
#[test]
fn a_keyed_replay_after_the_sale_sold_out_gets_its_order() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "");
    let a = addrs[0];
    let buy = |user: &str, key: Option<&str>| {
        post(a, "/v1/seckill/flash-1", key, false, &json!({"user": user})).unwrap()
    };
    let first = buy("early", Some("k-early"));
    assert_eq!(first.status, 201, "{}", first.body);
    let mut sold = 1;
    for i in 0..200 {
        let r = buy(&format!("u{i}"), None);
        if r.status == 409 {
            assert_eq!(r.json()["error"]["code"], "sold_out", "{}", r.body);
            break;
        }
        assert_eq!(r.status, 201, "{}", r.body);
        sold += 1;
    }
    assert_eq!(sold, 100, "flash-1 holds 100 units");
    let gated = |a| {
        let m = get(a, "/metrics").unwrap().body;
        metric_value(&m, "xcluster_app_sold_out_gate_total", "").unwrap_or(0.0)
    };
    let before = gated(a);
    let late = buy("late", Some("k-late"));
    assert_eq!(late.json()["error"]["code"], "sold_out", "{}", late.body);
    assert!(gated(a) > before, "the gate answered the new buyer");
    let again = buy("early", Some("k-early"));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.header("idempotent-replay"), Some("true"));
    assert_eq!(again.json()["id"], first.json()["id"]);
    // The same key asking for something else is the conflict it always was.
    let other = post(
        a,
        "/v1/seckill/flash-1",
        Some("k-early"),
        false,
        &json!({"user": "early", "qty": 2}),
    )
    .unwrap();
    assert_eq!(other.status, 422, "{}", other.body);
}

/// A cancelled flash-sale order's units are back on sale at once on the instance that cancelled it: its
/// sold-out mark (here kept a minute) used to refuse them until it expired, while the store would sell them.
#[test]
fn a_cancelled_flash_sale_unit_is_sold_again_at_once() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "[seckill]\nsold_out_gate_ms = 60000\n");
    let a = addrs[0];
    let buy = |user: &str| post(a, "/v1/seckill/flash-1", None, false, &json!({"user": user})).unwrap();
    let first = buy("early");
    assert_eq!(first.status, 201, "{}", first.body);
    for i in 0..200 {
        let r = buy(&format!("u{i}"));
        if r.status == 409 {
            break;
        }
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let gated = || {
        let m = get(a, "/metrics").unwrap().body;
        metric_value(&m, "xcluster_app_sold_out_gate_total", "").unwrap_or(0.0)
    };
    let before = gated();
    assert_eq!(buy("late").json()["error"]["code"], "sold_out");
    assert!(gated() > before, "the sold-out mark is set");
    let order = first.json()["id"].as_str().unwrap().to_string();
    let cancelled = post(a, &format!("/v1/orders/{order}/cancel"), None, false, &json!({})).unwrap();
    assert_eq!(cancelled.json()["status"], "cancelled", "{}", cancelled.body);
    let again = buy("late");
    assert_eq!(again.status, 201, "the cancelled unit is sold: {}", again.body);
    audit_ok(a);
}

/// A reload that changes keys needing a restart leaves their running values in force, as its log says: the
/// handlers read `max_body_bytes`, `capacity` and `instance` per request, and took a reloaded value at once
/// (a 2 KB order refused 413, `/v1/stats` naming an instance the balancers did not know).
#[test]
fn a_reload_leaves_the_keys_that_need_a_restart_as_they_were() {
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "");
    let a = addrs[0];
    let path = db.dir.path().join("app-1.toml");
    let started = std::fs::read_to_string(&path).unwrap();
    let reloaded = started.replace("instance = \"app-1\"", "instance = \"renamed\"")
        + "capacity = 7\nmax_body_bytes = 1024\n[seckill]\nper_user_limit = 3\n";
    write_file(db.dir.path(), "app-1.toml", &reloaded);
    eventually(Duration::from_secs(10), "the reload to apply", || {
        let m = get(a, "/metrics").unwrap().body;
        (metric_value(&m, "xcluster_config_reloads_total", "role=\"app\"") == Some(1.0)).then_some(())
    });
    let stats = get(a, "/v1/stats").unwrap().json();
    assert_eq!(
        (stats["instance"].as_str(), stats["capacity"].as_u64()),
        (Some("app-1"), Some(1024)),
        "{stats}"
    );
    // A 2 KB body, under the running max_body_bytes (64 KiB) and over the reloaded one.
    let body = format!(
        "{}{}",
        json!({"user": "u1", "lines": [{"sku": "sku-1-1", "qty": 1}]}),
        " ".repeat(2048)
    );
    let headers = [("Content-Type", "application/json"), ("Idempotency-Key", "big-1")];
    let r = request(a, "POST", "/v1/orders", &headers, Some(body.as_bytes())).unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    // A key that reloads live still applies: three flash-sale units for one buyer.
    for _ in 0..3 {
        let r = post(a, "/v1/seckill/flash-1", None, false, &json!({"user": "u1"})).unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
}

/// With `buyer_key_file` set, a buyer call needs a buyer token (`xcluster buyer-token`, as a shop's login
/// service signs one) and acts for its user alone: another buyer's order is not there for it (404, paying
/// or cancelling it too), another's wallet and order list are refused (403), and an order placed for
/// another user is refused. No token, an altered one, an expired one or one that lives longer than
/// `buyer_token_max_life_secs` is a 401. The admin token acts for
/// any buyer; browsing needs nothing. Without it, anyone could place, pay or cancel any buyer's orders by
/// naming them, straight at an instance, which is where the directory sends clients.
#[test]
fn buyer_calls_act_for_the_tokens_user_alone() {
    let db = Db::new();
    let key = write_file(db.dir.path(), "buyer.key", "buyer-key-0123456789\n");
    let extra = format!("buyer_key_file = \"{}\"", key.display());
    let (_p, addrs) = start_apps(&db, 1, &extra);
    let a = addrs[0];
    let mint = |user: &str| {
        let out = std::process::Command::new(xcluster_bin())
            .args(["buyer-token", "--key-file", key.to_str().unwrap(), "--user", user])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        format!("Bearer {}", String::from_utf8(out.stdout).unwrap().trim())
    };
    let (alice, bob) = (mint("demo-1"), mint("demo-2"));
    let admin = format!("Bearer {TOKEN}");
    let call = |method: &str, path: &str, auth: Option<&str>, body: Option<&str>| {
        let mut headers = vec![("Idempotency-Key", "buy-1")];
        headers.extend(auth.map(|v| ("Authorization", v)));
        request(a, method, path, &headers, body.map(str::as_bytes)).unwrap()
    };
    let order = json!({"user": "demo-1", "lines": [{"sku": "sku-1-1", "qty": 1}]}).to_string();

    let none = call("POST", "/v1/orders", None, Some(&order));
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.header("www-authenticate"), Some("Bearer realm=\"xbuy\""));
    let altered = alice.replace("demo-1", "demo-2");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |expires| {
        let token = xcluster_proto::buyer::mint(b"buyer-key-0123456789", "demo-1", expires);
        format!("Bearer {token}")
    };
    let expired = signed(now - 1);
    // Past the longest life taken (7 days and a minute's slack by default): a token that leaks works that
    // long at most.
    let too_long = signed(now + 8 * 86_400);
    for (auth, why) in [
        (&altered, "signature"),
        (&expired, "expired"),
        (&too_long, "longest life"),
    ] {
        let refused = call("POST", "/v1/orders", Some(auth), Some(&order));
        assert_eq!(refused.status, 401, "{}", refused.body);
        assert!(refused.body.contains(why), "{}", refused.body);
    }
    let for_another = call("POST", "/v1/orders", Some(&bob), Some(&order));
    assert_eq!(for_another.status, 403, "{}", for_another.body);
    assert_eq!(for_another.json()["error"]["code"], "not_your_user");
    let attempt = json!({"user": "demo-1", "qty": 1}).to_string();
    let flash_for_another = call("POST", "/v1/seckill/flash-1", Some(&bob), Some(&attempt));
    assert_eq!(flash_for_another.status, 403, "{}", flash_for_another.body);

    let placed = call("POST", "/v1/orders", Some(&alice), Some(&order));
    assert_eq!(placed.status, 201, "{}", placed.body);
    let id = placed.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/orders/{id}");
    assert_eq!(call("GET", &path, None, None).status, 401);
    for (method, path) in [
        ("GET", path.clone()),
        ("POST", format!("{path}/pay")),
        ("POST", format!("{path}/cancel")),
    ] {
        let other = call(method, &path, Some(&bob), None);
        assert_eq!(
            other.status, 404,
            "{method} {path} by another buyer: {}",
            other.body
        );
    }
    let own = call("GET", &path, Some(&alice), None);
    assert_eq!(
        (own.status, own.json()["status"].as_str()),
        (200, Some("reserved"))
    );
    for path in ["/v1/wallets/demo-1", "/v1/users/demo-1/orders"] {
        assert_eq!(call("GET", path, Some(&bob), None).status, 403, "{path}");
        assert_eq!(call("GET", path, Some(&alice), None).status, 200, "{path}");
        assert_eq!(call("GET", path, Some(&admin), None).status, 200, "{path}");
    }
    assert_eq!(call("GET", &path, Some(&admin), None).status, 200);
    assert_eq!(call("GET", "/v1/products", None, None).status, 200);
    let paid = call("POST", &format!("{path}/pay"), Some(&alice), None);
    assert_eq!(
        (paid.status, paid.json()["status"].as_str()),
        (200, Some("paid")),
        "{}",
        paid.body
    );

    // `xcluster load` acts for its many buyers with the admin token, or with a token of each buyer minted
    // with the buyer key; without either, every order is refused.
    let target = a.to_string();
    let load = |auth: &[&str], exit: i32| {
        let mut args = vec![
            "load",
            "--via",
            "rr",
            "--targets",
            &target,
            "--mix",
            "order=1,pay=1",
        ];
        args.extend(["--workers", "2", "--requests", "40", "--json"]);
        args.extend(auth);
        let mut p = Proc::xcluster("load", &args);
        assert_eq!(p.wait_exit(Duration::from_secs(60)), Some(exit), "{}", p.stderr());
        let report: serde_json::Value = serde_json::from_str(&p.stdout())
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", p.stdout(), p.stderr()));
        report
    };
    let key_file = key.to_str().unwrap();
    for auth in [["--app-token", TOKEN], ["--buyer-key-file", key_file]] {
        let with = load(&auth, 0);
        assert_eq!(
            (&with["requests"], &with["errors"], &with["refused"]),
            (&json!(40), &json!(0), &json!(0)),
            "{auth:?}: {with}"
        );
        assert_eq!(
            with["released"]["failed"], 0,
            "{auth:?}: the run's cancels pass too: {with}"
        );
    }
    // Every request refused: the run exits 1, as one that served nothing.
    let without = load(&[], 1);
    assert_eq!(without["errors"], 40, "{without}");
    assert!(without.to_string().contains("\"status_401\":40"), "{without}");

    // A key is changed with no moment of disagreement: the new one first in the file beside the old (the
    // login service then signs with the new), then the old one dropped. The reload follows the file.
    let wallet = |auth: &str| call("GET", "/v1/wallets/demo-1", Some(auth), None).status;
    std::fs::write(&key, "second-key-0123456789\nbuyer-key-0123456789\n").unwrap();
    let new = eventually(Duration::from_secs(10), "the new key to be taken", || {
        let new = mint("demo-1");
        (wallet(&new) == 200).then_some(new)
    });
    assert_eq!(wallet(&alice), 200, "the old key still passes beside the new");
    std::fs::write(&key, "second-key-0123456789\n").unwrap();
    eventually(Duration::from_secs(10), "the old key to be dropped", || {
        (wallet(&alice) == 401).then_some(())
    });
    assert_eq!(wallet(&new), 200);
    audit_ok(a);
}
