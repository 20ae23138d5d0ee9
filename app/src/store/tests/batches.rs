//! Groups of orders (the queued level's one transaction): each order is refused alone, the others of its
//! group commit; groups from two handles locking the same SKUs in opposite orders all commit (on PostgreSQL
//! with no deadlock, counted by the server); and, on PostgreSQL, a group whose
//! connection breaks part-way acknowledges nothing.

use std::time::{Duration, Instant};

use super::*;

/// Reserved units of `sku`, read on the database itself.
fn reserved(fx: &dyn Fixture, sku: &str) -> i64 {
    fx.number(&format!("SELECT reserved FROM skus WHERE sku = '{sku}'"))
}

fn seckill(user: &str, qty: u32) -> NewOrder {
    order(user, None, OrderKind::Seckill, "flash-1", qty, 60_000)
}

/// Every kind of refusal in the middle of one group: each refused order leaves nothing behind (not even
/// the first line of a two-line order refused on its second), and the orders around it commit, each seeing
/// the ones before it (a key replayed or conflicting, the flash-sale limit counted within the group).
pub(super) fn a_refused_order_in_a_group_leaves_the_others_committed(fx: &dyn Fixture) {
    let s = fx.open();
    s.open_flash_sale("flash-1", 4).unwrap().unwrap();
    let key = |mut o: NewOrder, k: &str| {
        o.idem_key = Some(k.into());
        o
    };
    let group = vec![
        key(multi("u1", &[("sku-1-1", 2)]), "k1"),
        multi("u2", &[("sku-1-2", 1), ("sku-2-1", 1001)]),
        key(multi("u3", &[("sku-1-1", 1)]), "k3"),
        key(multi("u1", &[("sku-1-1", 2)]), "k1"),
        key(multi("u1", &[("sku-1-1", 3)]), "k1"),
        seckill("u4", 1),
        seckill("u4", 1),
        multi("u5", &[("flash-1", 1)]),
        multi("u6", &[("nope", 1)]),
        seckill("u7", 2),
        multi("u8", &[("sku-1-2", 1)]),
    ];
    let out = s.create_orders(&group, false).unwrap();
    assert_eq!(out.len(), group.len());
    let first = out[0].clone().unwrap();
    assert!(!first.replay);
    assert!(
        matches!(&out[1], Err(Reject::OutOfStock { sku, available: 1000, wanted: 1001 }) if sku == "sku-2-1"),
        "{:?}",
        out[1]
    );
    assert!(out[2].as_ref().is_ok_and(|c| !c.replay));
    assert!(
        matches!(&out[3], Ok(c) if c.replay && c.order == first.order),
        "{:?}",
        out[3]
    );
    assert!(
        matches!(out[4], Err(Reject::IdempotencyConflict { .. })),
        "{:?}",
        out[4]
    );
    assert!(out[5].is_ok(), "{:?}", out[5]);
    assert!(
        matches!(out[6], Err(Reject::LimitExceeded { .. })),
        "{:?}",
        out[6]
    );
    assert!(matches!(out[7], Err(Reject::OnFlashSale { .. })), "{:?}", out[7]);
    assert!(matches!(out[8], Err(Reject::NotFound { .. })), "{:?}", out[8]);
    assert!(
        matches!(out[9], Err(Reject::LimitExceeded { .. })),
        "{:?}",
        out[9]
    );
    assert!(out[10].is_ok(), "{:?}", out[10]);
    // Only the accepted orders exist, each with its stock and its outbox row.
    for (o, r) in group.iter().zip(&out) {
        let stored = s.get_order(&o.id).unwrap();
        match r {
            Ok(c) if !c.replay => assert_eq!(stored.as_ref(), Some(&c.order)),
            _ => assert!(stored.is_none(), "refused order {} was stored", o.id),
        }
    }
    assert_eq!(reserved(fx, "sku-1-1"), 3);
    assert_eq!(
        reserved(fx, "sku-1-2"),
        1,
        "the refused two-line order's first line stays"
    );
    assert_eq!(reserved(fx, "sku-2-1"), 0);
    assert_eq!(reserved(fx, "flash-1"), 1);
    let r = assert_audit(&s);
    assert_eq!((r.totals.orders, r.totals.outbox_pending), (4, 4));
    // The group's answers are what the stored keys replay.
    let replayed = out[2].as_ref().ok().map(|c| &c.order);
    assert!(matches!(s.keyed_answer(&group[2]).unwrap(), Keyed::Stored(Ok(c))
            if c.replay && Some(&c.order) == replayed));
}

/// Two handles (two instances) commit groups at once, one naming two SKUs in one order, the other in the
/// reverse order and with two-line orders: every order commits and the stock adds up. On PostgreSQL each
/// group locks its SKU rows by name before anything else, so they queue on the first instead of deadlocking.
pub(super) fn concurrent_groups_in_opposite_orders_all_commit(fx: &dyn Fixture) {
    let handles = [fx.open(), fx.open()];
    let (a, b) = ("sku-3-1", "sku-4-1");
    let rounds = 15;
    let ok = commit_concurrently(&handles, rounds, |h, round| {
        let user = |i: usize| format!("h{h}r{round}o{i}");
        if h == 0 {
            (0..6)
                .map(|i| multi(&user(i), &[(if i % 2 == 0 { a } else { b }, 1)]))
                .collect()
        } else {
            (0..6)
                .map(|i| match i % 3 {
                    0 => multi(&user(i), &[(b, 1)]),
                    1 => multi(&user(i), &[(b, 1), (a, 1)]),
                    _ => multi(&user(i), &[(a, 1)]),
                })
                .collect()
        }
    });
    assert_eq!(ok, 2 * rounds * 6);
    // Handle 0: 3 + 3 units a round; handle 1: b 4, a 4.
    assert_eq!(reserved(fx, a), (rounds * (3 + 4)) as i64);
    assert_eq!(reserved(fx, b), (rounds * (3 + 4)) as i64);
    assert_audit(&handles[0]);
}

/// PostgreSQL only: a group whose connection is cut after it has written its stock, orders and lines (it
/// waits on its last statement, the outbox rows, behind another transaction's row) acknowledges none of
/// them: every attempt the store makes is cut the same way, the caller gets a retryable error, and nothing
/// of the group is in the database. The same group then commits whole.
#[test]
fn postgres_a_group_whose_connection_breaks_acknowledges_nothing() {
    let fx = PostgresFixture::new();
    let s = fx.open();
    let group: Vec<NewOrder> = (0..5)
        .map(|i| multi(&format!("u{i}"), &[("sku-5-1", 1)]))
        .collect();
    let before = reserved(&fx, "sku-5-1");
    // Another session holds an uncommitted outbox row for the group's third order: the group's
    // `INSERT ... ON CONFLICT` into the outbox waits for it, after every other write of the group.
    let mut blocker = ::postgres::Client::connect(&fx.0.url, ::postgres::NoTls).unwrap();
    let mut hold = blocker.transaction().unwrap();
    hold.execute(
        "INSERT INTO outbox(topic, order_id, created_ms) VALUES ('order.placed', $1, 0)",
        &[&group[2].id],
    )
    .unwrap();
    let mut killer = ::postgres::Client::connect(&fx.0.url, ::postgres::NoTls).unwrap();
    let (done, result) = std::sync::mpsc::channel();
    let mut cut = 0;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let _ = done.send(s.create_orders(&group, false));
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match result.recv_timeout(Duration::from_millis(20)) {
                Ok(out) => {
                    let err = out.expect_err("a group whose every attempt was cut committed");
                    assert!(err.is_retryable(), "{err}");
                    break;
                }
                Err(_) => assert!(
                    Instant::now() < deadline,
                    "the group neither failed nor committed"
                ),
            }
            // Only the store's own sessions, and only once one waits on the held row.
            cut += killer
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'xcluster-app' AND wait_event_type = 'Lock'
                       AND query LIKE 'INSERT INTO outbox%'",
                    &[],
                )
                .unwrap()
                .len();
        }
    });
    assert!(cut >= 1, "no attempt reached the outbox insert");
    hold.rollback().unwrap();
    let ids: Vec<&str> = group.iter().map(|o| o.id.as_str()).collect();
    let stored: i64 = killer
        .query_one("SELECT COUNT(*) FROM orders WHERE id = ANY($1)", &[&ids])
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "orders of a broken group were committed");
    assert_eq!(reserved(&fx, "sku-5-1"), before);
    let out = s.create_orders(&group, false).unwrap();
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    assert_eq!(reserved(&fx, "sku-5-1"), before + 5);
    assert_audit(&s);
}

/// PostgreSQL only: those groups never deadlock (counted by the server, see `lock_order`).
#[test]
fn postgres_groups_in_opposite_orders_never_deadlock() {
    let fx = super::lock_order::counting_deadlocks();
    concurrent_groups_in_opposite_orders_all_commit(&fx);
    let deadlocks = super::lock_order::deadlocks_once_closed(&fx);
    assert_eq!(deadlocks, 0, "the server broke {deadlocks} deadlocks");
}
