//! PostgreSQL only: every transaction that writes several SKU rows locks them by name first, so writers that
//! name the same SKUs in opposite orders queue instead of deadlocking. Counted, not timed: the server's own
//! deadlock counter, with its check brought down to 20 ms so a deadlock is found (and counted) at once.

use super::*;

/// A PostgreSQL server whose deadlock check runs after 20 ms of waiting (1 s by default), so a deadlock
/// is found and counted before anything else ends it (a lock or statement timeout).
pub(super) fn counting_deadlocks() -> PostgresFixture {
    let fx = PostgresFixture::new();
    fx.exec("ALTER DATABASE xcluster SET deadlock_timeout = '20ms'");
    fx
}

/// The deadlocks the server broke in the store's sessions, read once they have all ended (a session
/// reports its counters when it ends): the caller drops every handle first.
pub(super) fn deadlocks_once_closed(fx: &PostgresFixture) -> i64 {
    let sessions = "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'xcluster-app'";
    xcluster_tests::eventually(
        std::time::Duration::from_secs(30),
        "the store's sessions to end",
        || (fx.number(sessions) == 0).then_some(()),
    );
    fx.number("SELECT deadlocks FROM pg_stat_database WHERE datname = 'xcluster'")
}

/// Rounds each writer runs.
const ROUNDS: usize = 60;

/// Two merchants' stock updates naming two SKUs in opposite orders, a buyer's two-line orders cancelled,
/// a group of one-line orders in the other order, and a sweep expiring everything reserved, all at once:
/// the server sees no deadlock, and the stock adds up.
#[test]
fn postgres_stock_writers_in_opposite_orders_never_deadlock() {
    let fx = counting_deadlocks();
    let (a, b) = ("sku-3-1", "sku-4-1");
    let received = |sku| fx.number(&format!("SELECT received FROM skus WHERE sku = '{sku}'"));
    let update = |skus: [&str; 2]| -> Vec<StockUpdate> {
        skus.iter()
            .map(|sku| StockUpdate {
                sku: (*sku).into(),
                receive: 1,
                write_off: 0,
                price_cents: None,
            })
            .collect()
    };
    let handles: Vec<Box<dyn Store>> = (0..5).map(|_| fx.open()).collect();
    let before = (received(a), received(b));
    std::thread::scope(|sc| {
        let (h0, h1, h2, h3, h4) = (&handles[0], &handles[1], &handles[2], &handles[3], &handles[4]);
        sc.spawn(move || {
            for _ in 0..ROUNDS {
                h0.update_stock(&update([a, b])).unwrap().unwrap();
            }
        });
        sc.spawn(move || {
            for _ in 0..ROUNDS {
                h1.update_stock(&update([b, a])).unwrap().unwrap();
            }
        });
        sc.spawn(move || {
            for i in 0..ROUNDS {
                let o = multi(&format!("c{i}"), &[(b, 1), (a, 1)]);
                h2.create_orders(std::slice::from_ref(&o), false).unwrap()[0]
                    .as_ref()
                    .unwrap();
                // The sweep may have expired it first: a refusal, not an error.
                let _ = h2.cancel(&o.id).unwrap();
            }
        });
        sc.spawn(move || {
            for i in 0..ROUNDS {
                let group = [
                    multi(&format!("g{i}"), &[(a, 1)]),
                    multi(&format!("g{i}"), &[(b, 1)]),
                ];
                for r in h3.create_orders(&group, false).unwrap() {
                    r.unwrap();
                }
            }
        });
        sc.spawn(move || {
            for _ in 0..ROUNDS {
                h4.expire_due(i64::MAX, 64).unwrap();
            }
        });
    });
    assert_audit(&handles[0]);
    drop(handles);
    let deadlocks = deadlocks_once_closed(&fx);
    assert_eq!(deadlocks, 0, "the server broke {deadlocks} deadlocks");
    let rounds = ROUNDS as i64;
    assert_eq!(
        (received(a), received(b)),
        (before.0 + 2 * rounds, before.1 + 2 * rounds)
    );
}

/// A buyer paying orders from the wallet while a shop's refunds of their earlier orders go back into it: both
/// post between the wallet and the shop, and the server sees no deadlock (the payment locked the wallet
/// first, the refund the shop: each deadlock cost a second, the server's check, and a retry).
#[test]
fn postgres_wallet_payments_and_refunds_into_the_wallet_never_deadlock() {
    let fx = counting_deadlocks();
    let handles: Vec<Box<dyn Store>> = (0..2).map(|_| fx.open()).collect();
    let buyer = "deadlock-buyer";
    let paid_order = |s: &dyn Store| {
        let o = reserved_order(&s, buyer);
        s.pay_wallet(&o.id, true).unwrap().unwrap();
        o.id
    };
    handles[0].credit(&[buyer.to_string()], 1_000_000_000).unwrap();
    // More rounds than the others: a payment and a refund meet in the window only now and then.
    let rounds = 3 * ROUNDS;
    let to_refund: Vec<String> = (0..rounds).map(|_| paid_order(handles[0].as_ref())).collect();
    std::thread::scope(|sc| {
        let (h0, h1) = (&handles[0], &handles[1]);
        sc.spawn(move || {
            for _ in 0..rounds {
                paid_order(h0.as_ref());
            }
        });
        sc.spawn(move || {
            for id in &to_refund {
                refund(h1, id, None, &[]).unwrap();
            }
        });
    });
    assert_audit(&handles[0]);
    drop(handles);
    let deadlocks = deadlocks_once_closed(&fx);
    assert_eq!(deadlocks, 0, "the server broke {deadlocks} deadlocks");
}
