//! XBuy's operational metrics under a store that refuses writes: a test holds the SQLite file's write lock,
//! as a stuck process would, so the app's writers (orders, the reservation sweeper, the outbox) wait
//! `busy_timeout_ms` and give up while its reads go on (WAL). What an operator's alerts read must show it:
//! reservations overdue and growing, orders answered 503 `store_busy` counted apart from a 500, the degrade
//! breakers open; and, once the lock is gone, all of it back to 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "app_common.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use xcluster_tests::*;

fn metrics(addr: SocketAddr) -> String {
    get(addr, "/metrics").unwrap().body
}

/// One series' value; `None` when it is not on `/metrics` (the test fails on a series that is not there
/// from the start).
fn series(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    metric_value(&metrics(addr), name, labels)
}

const OVERDUE: &str = "xcluster_app_reservations_overdue_seconds";
const BREAKER: &str = "xcluster_app_degrade_breaker_state";
const REQUESTS: &str = "xcluster_app_requests_total";
const TRIPS: &str = "xcluster_app_degrade_breaker_trips_total";

fn order_status(addr: SocketAddr, id: &str) -> String {
    let r = get(addr, &format!("/v1/orders/{id}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["status"].as_str().unwrap().to_string()
}

#[test]
fn a_store_that_refuses_writes_shows_as_overdue_reservations_store_busy_and_open_breakers() {
    let db = Db::new();
    // The reservation's life is the window between the order and the lock below: wide, for a slow machine
    // (the test waits it out once the lock is taken).
    let (procs, addrs) = start_apps(&db, 1, "reservation_ttl_ms = 10000\nbusy_timeout_ms = 100");
    let a = addrs[0];
    // Present at 0 from the start, so an alert's increase() sees the first event.
    assert_eq!(series(a, OVERDUE, ""), Some(0.0));
    for breaker in ["latency", "errors", "queue"] {
        let label = format!("breaker=\"{breaker}\"");
        assert_eq!(series(a, BREAKER, &label), Some(0.0), "{breaker}");
        assert_eq!(series(a, TRIPS, &label), Some(0.0), "{breaker}");
    }
    for outcome in ["store_busy", "overloaded", "read_only", "server_error"] {
        let label = format!("type=\"order\",outcome=\"{outcome}\"");
        assert_eq!(series(a, REQUESTS, &label), Some(0.0), "{outcome}");
    }

    let id = buy(&addrs, 0, "lag", "lag-1", "sku-8-1", false).unwrap();
    let lock = rusqlite::Connection::open(db.path()).unwrap();
    lock.busy_timeout(Duration::from_secs(10)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The reservation is still held: the lock came before its expiry (10 s).
    assert_eq!(order_status(a, &id), "reserved");

    // Orders meet the busy store (503 store_busy), then, once the error breaker opens, the read-only level
    // (503 read_only); each is counted by its reason, and none as a 500.
    let mut answers: BTreeMap<String, f64> = BTreeMap::new();
    let body = json!({"user": "lag", "lines": [{"sku": "sku-8-1", "qty": 1}]});
    eventually(Duration::from_secs(30), "an order answered store_busy", || {
        let r = post(
            a,
            "/v1/orders",
            Some(&format!("busy-{}", answers.len())),
            false,
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 503, "{}", r.body);
        let code = r.json()["error"]["code"].as_str().unwrap().to_string();
        *answers.entry(code.clone()).or_default() += 1.0;
        (code == "store_busy").then_some(())
    });
    for (code, n) in &answers {
        let label = format!("type=\"order\",outcome=\"{code}\"");
        assert_eq!(series(a, REQUESTS, &label), Some(*n), "{code}: {answers:?}");
    }
    assert_eq!(
        series(a, REQUESTS, "type=\"order\",outcome=\"server_error\""),
        Some(0.0)
    );

    // The sweeper cannot expire the reservation: the gauge shows it overdue, and growing.
    let first = eventually(Duration::from_secs(30), "the reservation shown overdue", || {
        series(a, OVERDUE, "").filter(|v| *v >= 1.0)
    });
    eventually(Duration::from_secs(30), "the overdue time to grow", || {
        series(a, OVERDUE, "").filter(|v| *v >= first + 1.0)
    });
    assert_eq!(order_status(a, &id), "reserved");
    // Every write fails: the error breaker opens, and says so by name.
    eventually(Duration::from_secs(30), "the error breaker shown open", || {
        series(a, BREAKER, "breaker=\"errors\"").filter(|v| *v == 1.0)
    });

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    // The sweeper catches up: the reservation expires and nothing is overdue; the breakers close.
    eventually(Duration::from_secs(30), "the sweeper to catch up", || {
        (series(a, OVERDUE, "") == Some(0.0) && order_status(a, &id) == "expired").then_some(())
    });
    eventually(Duration::from_secs(30), "every breaker closed again", || {
        ["latency", "errors", "queue"]
            .iter()
            .all(|b| series(a, BREAKER, &format!("breaker=\"{b}\"")) == Some(0.0))
            .then_some(())
    });
    // Its opening stays counted once it has closed (a scrape may have missed it open); one opening, not
    // one per failed trial.
    let trips = series(a, TRIPS, "breaker=\"errors\"").unwrap_or(0.0);
    assert!(trips >= 1.0, "{trips}");
    audit_ok(a);
    drop(procs);
}
