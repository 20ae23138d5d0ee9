//! The refund part of the store suite (run against every store by `store_suite!` in the parent): partial
//! refunds restock and pay back exactly their units, add up to the whole order, replay by key, refuse to
//! over-refund without changing anything, and the audit catches a refund posted twice. Also the migration of
//! a schema-2 database (whole-order refunds only) to partial refunds.

use super::*;

/// Demo prices and shops (`sqlite_schema::seed_demo`): `sku-<p>-<v>` costs 500 + 100p + 10v, sold by shop
/// (p - 1) % 3 + 1.
const SKU_1_1: i64 = 610; // shop 1
const SKU_2_1: i64 = 710; // shop 2
const SKU_4_1: i64 = 910; // shop 1

/// (available, sold) of `sku` of product `product`.
fn stock(s: &dyn Store, product: i64, sku: &str) -> (i64, i64) {
    let p = s.get_product(product).unwrap().unwrap();
    let k = p.skus.iter().find(|k| k.sku == sku).unwrap();
    (k.available, k.sold)
}

/// A paid order of `lines` for `user`, who is credited exactly its total first.
fn paid(s: &dyn Store, user: &str, lines: &[(&str, u32)]) -> OrderView {
    let o = create(&s, multi(user, lines), true).unwrap().order;
    s.credit(&[user.to_string()], o.total_cents).unwrap();
    let o = s.pay_wallet(&o.id, true).unwrap().unwrap();
    assert_eq!(o.status, "paid");
    o
}

fn line<'a>(o: &'a OrderView, sku: &str) -> &'a LineView {
    o.lines.iter().find(|l| l.sku == sku).unwrap()
}

/// One line of three, part of its units, of an unshipped order: exactly those units go back on sale and
/// exactly their price goes back, from their shop only.
pub(super) fn partial_refund_restocks_its_units_and_pays_back_their_shop(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr1", &[("sku-1-1", 2), ("sku-2-1", 1), ("sku-4-1", 3)]);
    assert_eq!(o.total_cents, 2 * SKU_1_1 + SKU_2_1 + 3 * SKU_4_1);
    assert_eq!(s.balance("user:pr1").unwrap(), 0);
    let shop1 = s.balance("shop:1").unwrap();
    let shop2 = s.balance("shop:2").unwrap();
    let (other, four) = (stock(&*s, 1, "sku-1-1"), stock(&*s, 4, "sku-4-1"));

    let r = refund(&s, &o.id, Some("ret-1"), &[("sku-4-1", 2)]).unwrap();
    assert!(!r.replay);
    assert_eq!(r.order.status, "paid", "partly refunded stays paid");
    assert_eq!(r.order.refunded_cents, 2 * SKU_4_1);
    assert_eq!(line(&r.order, "sku-4-1").refunded_qty, 2);
    assert_eq!(line(&r.order, "sku-1-1").refunded_qty, 0);
    assert_eq!(s.get_order(&o.id).unwrap().unwrap(), r.order);
    assert_eq!(s.balance("user:pr1").unwrap(), 2 * SKU_4_1);
    assert_eq!(s.balance("shop:1").unwrap(), shop1 - 2 * SKU_4_1);
    assert_eq!(s.balance("shop:2").unwrap(), shop2);
    assert_eq!(stock(&*s, 4, "sku-4-1"), (four.0 + 2, four.1 - 2));
    assert_eq!(stock(&*s, 1, "sku-1-1"), other);
    let page = s.user_orders("pr1", None, 10).unwrap();
    assert_eq!(page[0], r.order, "a listed order shows its refunds too");
    let a = assert_audit(&s);
    assert_eq!((a.totals.paid, a.totals.refunded), (1, 0));
}

/// Two partial refunds and then a full one: the full one refunds only the rest, the order is `refunded`,
/// and its refunds add up to its total, with the points its payment granted all revoked.
pub(super) fn partial_refunds_then_a_full_one_refund_exactly_the_total(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr2", &[("sku-1-1", 2), ("sku-2-1", 2)]);
    let before = (stock(&*s, 1, "sku-1-1"), stock(&*s, 2, "sku-2-1"));
    refund(&s, &o.id, Some("k1"), &[("sku-1-1", 1)]).unwrap();
    let second = refund(&s, &o.id, Some("k2"), &[("sku-2-1", 2)]).unwrap().order;
    assert_eq!(
        (second.status.as_str(), second.refunded_cents),
        ("paid", SKU_1_1 + 2 * SKU_2_1)
    );
    let full = refund(&s, &o.id, None, &[]).unwrap().order;
    assert_eq!(full.status, "refunded");
    assert_eq!(full.refunded_cents, o.total_cents);
    assert!(full.lines.iter().all(|l| l.refunded_qty == l.qty), "{full:?}");
    assert_eq!(s.balance("user:pr2").unwrap(), o.total_cents);
    assert_eq!(
        (s.balance("shop:1").unwrap(), s.balance("shop:2").unwrap()),
        (0, 0)
    );
    assert_eq!(
        (stock(&*s, 1, "sku-1-1"), stock(&*s, 2, "sku-2-1")),
        ((before.0.0 + 2, before.0.1 - 2), (before.1.0 + 2, before.1.1 - 2))
    );
    // Another full refund answers the same and posts nothing; a partial one finds nothing left.
    let posted = assert_audit(&s).totals.ledger_transactions;
    assert_eq!(refund(&s, &o.id, None, &[]).unwrap().order, full);
    assert_eq!(
        refund(&s, &o.id, Some("k3"), &[("sku-1-1", 1)]).unwrap_err(),
        Reject::OverRefund {
            id: o.id.clone(),
            sku: "sku-1-1".into(),
            left: 0,
            wanted: 1
        }
    );
    assert_eq!(assert_audit(&s).totals.ledger_transactions, posted);
    s.run_outbox(100).unwrap();
    assert_audit(&s);
    let points = |kind: &str| {
        fx.number(&format!(
            "SELECT CAST(COALESCE(SUM(value), 0) AS BIGINT) FROM effects WHERE order_id = '{}' AND kind LIKE '{kind}'",
            o.id
        ))
    };
    assert_eq!(points("points"), o.total_cents / 100);
    assert_eq!(
        points("points%"),
        0,
        "three refunds revoked what the payment granted"
    );
    assert_eq!(
        fx.number(&format!(
            "SELECT COUNT(*) FROM effects WHERE order_id = '{}' AND kind LIKE 'notify_refund%'",
            o.id
        )),
        3
    );
}

/// More units than a line has left, a SKU the order does not hold, an order not paid: refused, naming what
/// is wrong, with nothing changed (and the key left unspent).
pub(super) fn over_refund_is_refused_and_changes_nothing(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr3", &[("sku-3-1", 2)]);
    let snapshot = |s: &dyn Store| {
        (
            s.get_order(&o.id).unwrap().unwrap(),
            s.audit().unwrap().totals,
            s.balance("user:pr3").unwrap(),
            s.balance("shop:3").unwrap(),
            stock(s, 3, "sku-3-1"),
        )
    };
    let before = snapshot(&*s);
    assert_eq!(
        refund(&s, &o.id, Some("x"), &[("sku-3-1", 3)]).unwrap_err(),
        Reject::OverRefund {
            id: o.id.clone(),
            sku: "sku-3-1".into(),
            left: 2,
            wanted: 3
        }
    );
    assert_eq!(
        refund(&s, &o.id, Some("x"), &[("sku-3-1", 1), ("sku-1-1", 1)]).unwrap_err(),
        Reject::NotInOrder {
            id: o.id.clone(),
            sku: "sku-1-1".into()
        }
    );
    assert_eq!(snapshot(&*s), before);
    // The refused requests spent nothing: the key takes a good refund, after which less is left.
    assert!(!refund(&s, &o.id, Some("x"), &[("sku-3-1", 1)]).unwrap().replay);
    assert!(matches!(
        refund(&s, &o.id, Some("y"), &[("sku-3-1", 2)]).unwrap_err(),
        Reject::OverRefund { left: 1, .. }
    ));
    let reserved = create(&s, multi("pr3", &[("sku-3-1", 1)]), true).unwrap().order;
    assert!(matches!(
        refund(&s, &reserved.id, Some("z"), &[("sku-3-1", 1)]).unwrap_err(),
        Reject::BadTransition { from: "reserved", .. }
    ));
    assert!(matches!(
        refund(&s, "o-none", Some("z"), &[("sku-3-1", 1)]).unwrap_err(),
        Reject::NotFound { what: "order", .. }
    ));
    assert_audit(&s);
}

/// A keyed partial refund retried (on any handle, even at once) posts once and answers its first result;
/// the key cannot carry another refund of the order.
pub(super) fn keyed_partial_refund_replays_and_posts_once(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr4", &[("sku-1-1", 3)]);
    let first = refund(&s, &o.id, Some("k"), &[("sku-1-1", 1)]).unwrap();
    let posted = assert_audit(&s).totals.ledger_transactions;
    let again = refund(&s, &o.id, Some("k"), &[("sku-1-1", 1)]).unwrap();
    assert!(again.replay);
    assert_eq!(again.order, first.order);
    assert_eq!(s.balance("user:pr4").unwrap(), SKU_1_1);
    for other in [&[("sku-1-1", 2)][..], &[][..]] {
        assert_eq!(
            refund(&s, &o.id, Some("k"), other).unwrap_err(),
            Reject::IdempotencyConflict { key: "k".into() }
        );
    }
    assert_eq!(assert_audit(&s).totals.ledger_transactions, posted);
    // A key is its order's own: another order's "k" is another refund.
    let p = paid(&*s, "pr4", &[("sku-1-1", 1)]);
    assert!(!refund(&s, &p.id, Some("k"), &[("sku-1-1", 1)]).unwrap().replay);
    // After a second refund, the first key still answers its own first result.
    refund(&s, &o.id, Some("k2"), &[("sku-1-1", 1)]).unwrap();
    assert_eq!(
        refund(&s, &o.id, Some("k"), &[("sku-1-1", 1)]).unwrap().order,
        first.order
    );
    // Two handles sending one new key at once: one refund, one replay of it.
    let (s1, s2) = (fx.open(), fx.open());
    let id = o.id.as_str();
    let outcomes: Vec<Refunded> = std::thread::scope(|sc| {
        let joins: Vec<_> = [&s1, &s2]
            .into_iter()
            .map(|h| sc.spawn(move || refund(h, id, Some("k3"), &[("sku-1-1", 1)]).unwrap()))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|r| r.replay).count(), 1);
    assert_eq!(outcomes[0].order, outcomes[1].order);
    assert_eq!(outcomes[0].order.status, "refunded");
    // Her three units of the first order and the one of the second, each given back once.
    assert_eq!(s.balance("user:pr4").unwrap(), 4 * SKU_1_1);
    assert_audit(&s);
}

/// A fulfilled order's refunded units stay with the buyer (out of the stock, not back on sale); a paid order
/// partly refunded and then fulfilled ships only the units not refunded.
pub(super) fn fulfilled_partial_refund_does_not_restock(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr5", &[("sku-2-1", 2)]);
    assert_eq!(s.fulfil(&o.id).unwrap().unwrap().status, "fulfilled");
    let before = stock(&*s, 2, "sku-2-1");
    let r = refund(&s, &o.id, Some("f1"), &[("sku-2-1", 1)]).unwrap().order;
    assert_eq!((r.status.as_str(), r.refunded_cents), ("fulfilled", SKU_2_1));
    assert_eq!(stock(&*s, 2, "sku-2-1"), (before.0, before.1 - 1));
    assert_audit(&s);

    let p = paid(&*s, "pr6", &[("sku-2-1", 2)]);
    let before = stock(&*s, 2, "sku-2-1");
    refund(&s, &p.id, Some("p1"), &[("sku-2-1", 1)]).unwrap();
    assert_eq!(stock(&*s, 2, "sku-2-1"), (before.0 + 1, before.1 - 1));
    assert_eq!(s.fulfil(&p.id).unwrap().unwrap().status, "fulfilled");
    assert_eq!(stock(&*s, 2, "sku-2-1"), (before.0 + 1, before.1 - 1));
    let done = refund(&s, &p.id, None, &[]).unwrap().order;
    assert_eq!(
        (done.status.as_str(), done.refunded_cents),
        ("refunded", 2 * SKU_2_1)
    );
    // The shipped unit left the stock; only the unshipped one went back on sale.
    assert_eq!(stock(&*s, 2, "sku-2-1"), (before.0 + 1, before.1 - 2));
    s.run_outbox(100).unwrap();
    assert_audit(&s);
}

/// A refund given back to another account than the one that paid (forged in the ledger, balances and all)
/// fails the audit, and only the check that names the payer.
pub(super) fn audit_catches_a_refund_to_another_account(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr8", &[("sku-1-1", 1)]);
    refund(&s, &o.id, None, &[]).unwrap();
    assert_audit(&s);
    fx.exec(&format!(
        "UPDATE accounts SET balance = balance - {SKU_1_1} WHERE account = 'user:pr8';
         INSERT INTO accounts(account, balance) VALUES ('user:thief', {SKU_1_1});
         UPDATE ledger_entries SET account = 'user:thief' WHERE amount > 0
           AND tx_id = (SELECT id FROM ledger_tx WHERE kind = 'refund' AND ref = '{}/r1');",
        o.id
    ));
    let r = s.audit().unwrap();
    assert_eq!(r.failures(), vec!["postings_name_the_payer"], "{r:?}");
}

/// A refund posted twice (forged straight into the ledger, balances and all) fails the audit, and so does a
/// line counted refunded with no refund behind it.
pub(super) fn audit_catches_a_forged_double_refund(fx: &dyn Fixture) {
    let s = fx.open();
    let o = paid(&*s, "pr7", &[("sku-1-1", 1)]);
    let q = paid(&*s, "pr7", &[("sku-1-1", 1)]);
    refund(&s, &o.id, None, &[]).unwrap();
    assert_audit(&s);
    let id = &o.id;
    fx.exec(&format!(
        "INSERT INTO ledger_tx(kind, ref, created_ms) VALUES ('refund', '{id}/r2', 0);
         INSERT INTO ledger_entries(tx_id, account, amount)
           SELECT id, 'user:pr7', {SKU_1_1} FROM ledger_tx WHERE kind = 'refund' AND ref = '{id}/r2';
         INSERT INTO ledger_entries(tx_id, account, amount)
           SELECT id, 'shop:1', -{SKU_1_1} FROM ledger_tx WHERE kind = 'refund' AND ref = '{id}/r2';
         UPDATE accounts SET balance = balance + {SKU_1_1} WHERE account = 'user:pr7';
         UPDATE accounts SET balance = balance - {SKU_1_1} WHERE account = 'shop:1';"
    ));
    let r = s.audit().unwrap();
    assert_eq!(r.failures(), vec!["payments_once"], "{r:?}");
    // Recorded as a refund of its own, it gives back more than the order's payment.
    fx.exec(&format!(
        "INSERT INTO refunds(order_id, n, idem_key, fingerprint, amount_cents, ledger_ref, answer, created_ms)
           VALUES ('{id}', 2, NULL, '', {SKU_1_1}, '{id}/r2', NULL, 0);
         INSERT INTO refund_lines(order_id, n, sku, qty) VALUES ('{id}', 2, 'sku-1-1', 1);"
    ));
    let r = s.audit().unwrap();
    assert!(r.failures().contains(&"payments_once"), "{r:?}");
    assert!(r.failures().contains(&"refunds_match_lines"), "{r:?}");
    fx.exec(&format!(
        "UPDATE order_lines SET refunded_qty = 1 WHERE order_id = '{}'",
        q.id
    ));
    let r = s.audit().unwrap();
    let bad = &r
        .checks
        .iter()
        .find(|c| c.name == "refunds_match_lines")
        .unwrap()
        .sample;
    assert!(bad.contains(&format!("{}/sku-1-1", q.id)), "{r:?}");
    assert!(r.failures().contains(&"sold_matches_orders"), "{r:?}");
}

/// A schema-2 database (refunds were whole orders, posted under the order id) holding a paid order and a
/// refunded one, its refund's effects still pending, migrates: both read as before (the refunded one with
/// every unit refunded), the audit holds, the pending event revokes the right points, and the paid order
/// takes partial refunds.
pub(super) fn migration_to_partial_refunds_keeps_paid_and_refunded_orders(fx: &dyn Fixture) {
    fx.exec(&fx.old_schema(2));
    fx.exec(
        r#"INSERT INTO shops(id, name) VALUES (1, 'S');
        INSERT INTO products(id, shop_id, name) VALUES (1, 1, 'P');
        INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
          VALUES ('sku-1-1', 1, 610, 10, 8, 0, 2), ('sku-1-2', 1, 620, 10, 10, 0, 0);
        INSERT INTO orders(id, idem_key, fingerprint, "user", kind, status, total_cents, created_ms, expires_ms,
                           paid_via, updated_ms, answer)
          VALUES ('oa', 'ka', 'fa', 'ann', 'regular', 'paid', 1220, 1, 2, 'wallet', 1, '{}'),
                 ('ob', 'kb', 'fb', 'ann', 'regular', 'refunded', 620, 1, 2, 'wallet', 1, '{}');
        INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id)
          VALUES ('oa', 'sku-1-1', 2, 610, 1), ('ob', 'sku-1-2', 1, 620, 1);
        INSERT INTO outbox(topic, order_id, created_ms, done)
          VALUES ('order.placed', 'oa', 1, true), ('order.placed', 'ob', 1, true), ('order.paid', 'oa', 1, true),
                 ('order.paid', 'ob', 1, true), ('order.refunded', 'ob', 1, false);
        INSERT INTO effects(order_id, kind, value, created_ms) VALUES ('oa', 'points', 12, 1), ('ob', 'points', 6, 1);
        INSERT INTO ledger_tx(kind, ref, created_ms)
          VALUES ('credit', 'c1', 1), ('pay', 'oa', 1), ('pay', 'ob', 1), ('refund', 'ob', 1);
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'mint', -2000 FROM ledger_tx WHERE kind = 'credit' AND ref = 'c1';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'user:ann', 2000 FROM ledger_tx WHERE kind = 'credit' AND ref = 'c1';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'user:ann', -1220 FROM ledger_tx WHERE kind = 'pay' AND ref = 'oa';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'shop:1', 1220 FROM ledger_tx WHERE kind = 'pay' AND ref = 'oa';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'user:ann', -620 FROM ledger_tx WHERE kind = 'pay' AND ref = 'ob';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'shop:1', 620 FROM ledger_tx WHERE kind = 'pay' AND ref = 'ob';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'shop:1', -620 FROM ledger_tx WHERE kind = 'refund' AND ref = 'ob';
        INSERT INTO ledger_entries(tx_id, account, amount)
          SELECT id, 'user:ann', 620 FROM ledger_tx WHERE kind = 'refund' AND ref = 'ob';
        INSERT INTO accounts(account, balance) VALUES ('mint', -2000), ('user:ann', 780), ('shop:1', 1220);"#,
    );
    assert_eq!(fx.schema_version(), 2);
    let s = fx.open();
    assert_eq!(fx.schema_version(), super::super::sqlite_schema::VERSION);
    let a = s.get_order("oa").unwrap().unwrap();
    assert_eq!(
        (a.status.as_str(), a.total_cents, a.refunded_cents),
        ("paid", 1220, 0)
    );
    assert_eq!((a.lines[0].qty, a.lines[0].refunded_qty), (2, 0));
    let b = s.get_order("ob").unwrap().unwrap();
    assert_eq!((b.status.as_str(), b.refunded_cents), ("refunded", 620));
    assert_eq!((b.lines[0].qty, b.lines[0].refunded_qty), (1, 1));
    assert_audit(&s);
    // The refund made before the migration is refund 1 of its order: its pending event revokes its points.
    assert_eq!(s.run_outbox(10).unwrap(), 1);
    assert_eq!(
        fx.number(
            "SELECT CAST(SUM(value) AS BIGINT) FROM effects WHERE order_id = 'ob' AND kind LIKE 'points%'"
        ),
        0
    );
    let posted = assert_audit(&s).totals.ledger_transactions;
    assert_eq!(refund(&s, "ob", None, &[]).unwrap().order, b);
    assert_eq!(assert_audit(&s).totals.ledger_transactions, posted);
    let part = refund(&s, "oa", Some("r"), &[("sku-1-1", 1)]).unwrap().order;
    assert_eq!((part.status.as_str(), part.refunded_cents), ("paid", 610));
    assert_eq!(
        fx.number("SELECT COUNT(*) FROM ledger_tx WHERE kind = 'refund' AND ref = 'oa/r1'"),
        1
    );
    assert_eq!(s.balance("user:ann").unwrap(), 780 + 610);
    assert_audit(&s);
}
