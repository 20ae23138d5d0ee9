//! XBuy's invariants with several real app processes on one SQLite database: no oversell under 1,000
//! concurrent buyers, one order per idempotency key under concurrency, no lost acknowledged order across a
//! `kill -9`, and the same end state at every degrade level.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "app_common.rs"]
mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use xcluster_tests::*;

#[test]
fn three_processes_sell_a_hundred_units_to_a_thousand_buyers() {
    let db = Db::new();
    let (_procs, addrs) = start_apps(&db, 3, "");
    let users: Vec<String> = (0..1000).map(|i| format!("buyer-{i}")).collect();
    // One credit each: exactly the price of one flash-1 unit (100 cents).
    credit(addrs[0], &users, 100);
    let results = parallel(1000, 100, |i| {
        buy(&addrs, i, &users[i], &format!("k-{i}"), "flash-1", true)
    });
    let won: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 100, "exactly the stock is sold");
    let lost: HashSet<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|s| s.as_str())
        .collect();
    assert_eq!(
        lost,
        HashSet::from(["sold_out"]),
        "every other buyer is told it is sold out"
    );
    let distinct: HashSet<&&String> = won.iter().collect();
    assert_eq!(distinct.len(), 100);
    let stock = sku_stock(addrs[1], 100, "flash-1");
    assert_eq!(
        (
            stock["available"].as_i64(),
            stock["reserved"].as_i64(),
            stock["sold"].as_i64()
        ),
        (Some(0), Some(0), Some(100))
    );
    let totals = drained_totals(addrs[2]);
    assert_eq!(totals["paid"], 100);
    assert_eq!(totals["orders"], 100);
    // Money: winners spent their credit, losers kept it; the audit checked the ledger sums to zero.
    for (i, r) in results.iter().enumerate().step_by(37) {
        let w = get(addrs[i % 3], &format!("/v1/wallets/{}", users[i]))
            .unwrap()
            .json();
        let expect = if r.is_ok() { 0 } else { 100 };
        assert_eq!(w["balance_cents"], expect, "{}", users[i]);
    }
}

#[test]
fn concurrent_requests_with_one_key_create_one_order() {
    let db = Db::new();
    // One instance commits in groups, so identical requests may share a transaction too.
    let (_p1, a1) = start_apps(&db, 2, "");
    let q = free_addr();
    let _p3 = start_app(&db, "app-q", q, "[degrade]\nlevel = \"queued\"");
    let addrs = [a1[0], a1[1], q];
    let body = json!({"user": "same", "lines": [{"sku": "sku-4-1", "qty": 3}, {"sku": "sku-5-2", "qty": 1}]});
    let answers = parallel(60, 30, |i| {
        until_answered(&addrs, i, |a| {
            post(a, "/v1/orders", Some("one-key"), false, &body)
        })
    });
    let ids: BTreeSet<String> = answers
        .iter()
        .map(|r| {
            assert!(r.status == 201 || r.status == 200, "{} {}", r.status, r.body);
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    assert_eq!(
        answers.iter().filter(|r| r.status == 201).count(),
        1,
        "one first answer, the rest replays"
    );
    assert!(
        answers
            .iter()
            .filter(|r| r.status == 200)
            .all(|r| r.header("idempotent-replay") == Some("true"))
    );
    // The same key with another body is refused.
    let other = json!({"user": "same", "lines": [{"sku": "sku-4-1", "qty": 4}]});
    let r = post(q, "/v1/orders", Some("one-key"), false, &other).unwrap();
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "idempotency_conflict");
    let totals = drained_totals(addrs[0]);
    assert_eq!(totals["orders"], 1);
    assert_eq!(totals["units_reserved"], 4);
}

#[test]
fn kill_9_during_load_loses_no_acknowledged_order() {
    let db = Db::new();
    let (mut procs, addrs) = start_apps(&db, 3, "audit_interval_ms = 1000\n[degrade]\nlevel = \"queued\"");
    let acked = Mutex::new(Vec::new());
    let count = AtomicUsize::new(0);
    // Requests answered either way: how far the load was when the instance died.
    let finished = AtomicUsize::new(0);
    let (results, finished_at_kill) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            eventually(Duration::from_secs(60), "load under way", || {
                (count.load(Ordering::Relaxed) >= 40).then_some(())
            });
            procs[0].signal(nix::sys::signal::Signal::SIGKILL);
            assert!(procs[0].wait_exit(Duration::from_secs(10)).is_some());
            finished.load(Ordering::Relaxed)
        });
        let results = parallel(400, 40, |i| {
            let r = buy(
                &addrs,
                i,
                &format!("b{i}"),
                &format!("kill-{i}"),
                if i % 2 == 0 { "flash-1" } else { "sku-6-1" },
                false,
            );
            if let Ok(id) = &r {
                acked.lock().unwrap().push(id.clone());
                count.fetch_add(1, Ordering::Relaxed);
            }
            finished.fetch_add(1, Ordering::Relaxed);
            r
        });
        (results, killer.join().unwrap())
    });
    // The kill hit the load, not its end: requests were still to be answered once the instance was dead.
    assert!(
        finished_at_kill < 400,
        "the load had ended ({finished_at_kill} of 400 answered) when the instance died"
    );
    // The killed instance comes back on the same database.
    let _back = start_app(&db, "app-1b", addrs[0], "");
    let acked = acked.into_inner().unwrap();
    for id in &acked {
        let r = get(addrs[0], &format!("/v1/orders/{id}")).unwrap();
        assert_eq!(r.status, 200, "acknowledged order {id} lost: {}", r.body);
        assert_eq!(r.json()["status"], "reserved");
    }
    let flash_ok = results
        .iter()
        .enumerate()
        .filter(|(i, r)| i % 2 == 0 && r.is_ok())
        .count();
    assert_eq!(flash_ok, 100, "the flash item sells out exactly, kill or not");
    let totals = drained_totals(addrs[0]);
    assert_eq!(
        totals["orders"].as_u64(),
        Some(acked.len() as u64),
        "no order beyond the acknowledged ones"
    );
    assert_eq!(totals["units_reserved"].as_u64(), Some(acked.len() as u64));
}

/// The workload for the degrade comparison: a flash sale (300 buyers for 100 units, all pay) and 120
/// regular orders (even ones paid, every fourth cancelled).
fn degrade_workload(level: &str) -> serde_json::Value {
    let db = Db::new();
    let (_procs, addrs) = start_apps(&db, 2, &format!("[degrade]\nlevel = \"{level}\""));
    let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    credit(addrs[0], &users, 10_000);
    let flash = parallel(300, 50, |i| {
        buy(&addrs, i, &users[i], &format!("f{i}"), "flash-1", true)
    });
    assert_eq!(flash.iter().filter(|r| r.is_ok()).count(), 100, "{level}");
    parallel(120, 40, |i| {
        let id = buy(&addrs, i, &users[i], &format!("r{i}"), "sku-7-2", i % 2 == 0).unwrap();
        if i % 4 == 1 {
            let r = until_answered(&addrs, i, |a| {
                post(a, &format!("/v1/orders/{id}/cancel"), None, false, &json!({}))
            });
            assert_eq!(r.json()["status"], "cancelled");
        }
    });
    drained_totals(addrs[1])
}

#[test]
fn same_workload_same_end_state_at_every_degrade_level() {
    let reference = degrade_workload("sync");
    assert_eq!(reference["paid"], 160);
    assert_eq!(reference["cancelled"], 30);
    assert_eq!(reference["reserved"], 30);
    for level in ["queued", "shed"] {
        assert_eq!(
            degrade_workload(level),
            reference,
            "end state at {level} differs from sync"
        );
    }
    // Read-only refuses every write (retryable) and changes nothing.
    let db = Db::new();
    let (_p, addrs) = start_apps(&db, 1, "[degrade]\nlevel = \"read_only\"");
    let before = audit_ok(addrs[0])["totals"].clone();
    let r = post(
        addrs[0],
        "/v1/orders",
        Some("ro"),
        false,
        &json!({"user": "u", "lines": [{"sku": "sku-1-1", "qty": 1}]}),
    )
    .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "read_only");
    assert!(r.header("retry-after").is_some());
    assert_eq!(get(addrs[0], "/v1/products").unwrap().status, 200);
    assert_eq!(audit_ok(addrs[0])["totals"], before);
}
