//! Numbered flash sales: the per-user limit counts a buyer's units of the SKU's current sale, not of every
//! sale of it. A buyer who bought in last month's sale of a SKU was refused `limit_exceeded` in this month's.

use super::*;

/// A flash-sale order of `qty` units of `flash-1` by `user`, with a limit of two a buyer.
fn seckill2(user: &str, qty: u32) -> NewOrder {
    NewOrder {
        per_user_limit: 2,
        ..order(user, None, OrderKind::Seckill, "flash-1", qty, 60_000)
    }
}

fn over_limit(r: Result<Created, Reject>) -> bool {
    matches!(r, Err(Reject::LimitExceeded { .. }))
}

/// Sale 1 counts its buyers' units to the limit, reopened or closed; sale 2 counts afresh; a line keeps the
/// sale it was sold in.
pub(super) fn the_flash_sale_limit_counts_per_sale(fx: &dyn Fixture) {
    let s = fx.open();
    let opened = s.open_flash_sale("flash-1", 4).unwrap().unwrap();
    assert_eq!((opened.sale_seq, opened.flash_sale), (1, true));
    let bought = create(&s, seckill2("ann", 2), true).unwrap().order;
    assert_eq!(bought.lines[0].sale_seq, Some(1));
    assert_eq!(s.get_order(&bought.id).unwrap().as_ref(), Some(&bought));
    assert!(over_limit(create(&s, seckill2("ann", 1), true)));
    // Opening an open sale again adds stock, not a new sale: ann is still at her limit.
    assert_eq!(s.open_flash_sale("flash-1", 4).unwrap().unwrap().sale_seq, 1);
    assert!(over_limit(create(&s, seckill2("ann", 1), true)));
    // Closed, the SKU keeps its latest sale's number, and a flash-sale attempt still counts against it.
    let closed = s.close_flash_sale("flash-1").unwrap().unwrap();
    assert_eq!((closed.sale_seq, closed.flash_sale), (1, false));
    assert!(over_limit(create(&s, seckill2("ann", 1), true)));
    let ordinary = create(&s, multi("bob", &[("flash-1", 1)]), true).unwrap().order;
    assert_eq!(ordinary.lines[0].sale_seq, None, "an ordinary line is in no sale");
    // Sale 2: ann buys up to the limit again, and no further.
    assert_eq!(s.open_flash_sale("flash-1", 4).unwrap().unwrap().sale_seq, 2);
    let again = create(&s, seckill2("ann", 1), true).unwrap().order;
    assert_eq!(again.lines[0].sale_seq, Some(2));
    create(&s, seckill2("ann", 1), true).expect("two units of sale 2 allowed");
    assert!(over_limit(create(&s, seckill2("ann", 1), true)));
    // Her sale-1 order is still hers, with its sale.
    assert_eq!(
        s.get_order(&bought.id).unwrap().unwrap().lines[0].sale_seq,
        Some(1)
    );
    let r = assert_audit(&s);
    assert_eq!(r.totals.units_reserved, 2 + 1 + 2);
}

/// A group (the queued level's one transaction; on PostgreSQL decided in memory from one count read for the
/// group) mixing buyers of the sale before, who buy again, with buyers of this sale at their limit, and the
/// limit counted within the group.
pub(super) fn a_group_counts_the_limit_in_the_current_sale(fx: &dyn Fixture) {
    let s = fx.open();
    s.open_flash_sale("flash-1", 4).unwrap().unwrap();
    create(&s, seckill2("old", 2), false).unwrap();
    s.close_flash_sale("flash-1").unwrap().unwrap();
    assert_eq!(s.open_flash_sale("flash-1", 4).unwrap().unwrap().sale_seq, 2);
    create(&s, seckill2("now", 2), false).unwrap();
    let group = vec![
        seckill2("old", 2),
        seckill2("now", 1),
        seckill2("old", 1),
        seckill2("new", 1),
        multi("bob", &[("sku-1-1", 1)]),
        seckill2("new", 1),
        seckill2("new", 1),
    ];
    let out = s.create_orders(&group, false).unwrap();
    let accepted: Vec<bool> = out.iter().map(|r| r.is_ok()).collect();
    assert_eq!(accepted, [true, false, false, true, true, true, false], "{out:?}");
    assert!(over_limit(out[1].clone()) && over_limit(out[2].clone()) && over_limit(out[6].clone()));
    for (o, r) in group.iter().zip(&out) {
        if let Ok(c) = r {
            let sale = (o.kind == OrderKind::Seckill).then_some(2);
            assert_eq!(c.order.lines[0].sale_seq, sale);
            assert_eq!(s.get_order(&o.id).unwrap().as_ref(), Some(&c.order));
        }
    }
    assert_audit(&s);
}

/// A database of schema 4 with a sale open and a buyer at the limit: after the migration the SKU is in sale 0
/// and her units still count in it; the next sale counts afresh.
pub(super) fn migration_to_numbered_sales_keeps_counting_an_open_sale(fx: &dyn Fixture) {
    fx.exec(&fx.old_schema(4));
    fx.exec(
        r#"INSERT INTO shops(id, name) VALUES (1, 'S');
        INSERT INTO products(id, shop_id, name) VALUES (100, 1, 'F');
        INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
          VALUES ('flash-1', 100, 100, 10, 0, 3, 0), ('sku-1-1', 100, 50, 10, 9, 1, 0);
        INSERT INTO sku_buckets(sku, bucket, available) VALUES ('flash-1', 0, 4), ('flash-1', 1, 3);
        INSERT INTO orders(id, idem_key, fingerprint, "user", kind, status, total_cents, created_ms, expires_ms,
                           paid_via, updated_ms, answer)
          VALUES ('oa', NULL, 'fa', 'ann', 'seckill', 'reserved', 200, 1, 9999999999999, NULL, 1, '{}'),
                 ('ob', NULL, 'fb', 'ann', 'seckill', 'cancelled', 100, 1, 2, NULL, 1, '{}'),
                 ('oc', NULL, 'fc', 'cat', 'seckill', 'reserved', 100, 1, 9999999999999, NULL, 1, '{}'),
                 ('od', NULL, 'fd', 'ann', 'regular', 'reserved', 50, 1, 9999999999999, NULL, 1, '{}');
        INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id)
          VALUES ('oa', 'flash-1', 2, 100, 1), ('ob', 'flash-1', 1, 100, 1), ('oc', 'flash-1', 1, 100, 1),
                 ('od', 'sku-1-1', 1, 50, 1);
        INSERT INTO outbox(topic, order_id, created_ms, done)
          VALUES ('order.placed', 'oa', 1, true), ('order.placed', 'ob', 1, true), ('order.placed', 'oc', 1, true),
                 ('order.placed', 'od', 1, true);"#,
    );
    assert_eq!(fx.schema_version(), 4);
    let s = fx.open();
    assert_eq!(fx.schema_version(), super::super::sqlite_schema::VERSION);
    let a = s.get_order("oa").unwrap().unwrap();
    assert_eq!(a.lines[0].sale_seq, Some(0));
    assert_eq!(s.get_order("od").unwrap().unwrap().lines[0].sale_seq, None);
    assert!(
        over_limit(create(&s, seckill2("ann", 1), true)),
        "the open sale's orders still count"
    );
    assert!(over_limit(create(&s, seckill2("cat", 2), true)));
    let cat = create(&s, seckill2("cat", 1), true).unwrap().order;
    assert_eq!(cat.lines[0].sale_seq, Some(0), "the open sale is sale 0");
    // Reopening the open sale keeps its number; closing and opening starts sale 1.
    assert_eq!(s.open_flash_sale("flash-1", 2).unwrap().unwrap().sale_seq, 0);
    assert!(over_limit(create(&s, seckill2("ann", 1), true)));
    s.close_flash_sale("flash-1").unwrap().unwrap();
    assert_eq!(s.open_flash_sale("flash-1", 2).unwrap().unwrap().sale_seq, 1);
    create(&s, seckill2("ann", 2), true).expect("a new sale counts afresh");
    assert_audit(&s);
}

/// A flash-sale line with no sale number, as an instance of the build before writes while a rolling upgrade
/// runs (the schema already migrated under it), counts in the current sale: counted in none, its buyer could
/// buy the limit again through the upgraded instances.
pub(super) fn a_flash_sale_line_without_a_number_counts_in_the_current_sale(fx: &dyn Fixture) {
    let s = fx.open();
    assert_eq!(s.open_flash_sale("flash-1", 4).unwrap().unwrap().sale_seq, 1);
    fx.exec(
        r#"INSERT INTO orders(id, idem_key, fingerprint, "user", kind, status, total_cents, created_ms, expires_ms,
                           paid_via, updated_ms, answer)
          VALUES ('old-build', NULL, 'f', 'ann', 'seckill', 'reserved', 200, 1, 9999999999999, NULL, 1, '{}');
        INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id)
          SELECT 'old-build', 'flash-1', 2, s.price_cents, p.shop_id FROM skus s
          JOIN products p ON p.id = s.product_id WHERE s.sku = 'flash-1';
        UPDATE sku_buckets SET available = available - 2 WHERE sku = 'flash-1' AND bucket = 0;
        UPDATE skus SET reserved = reserved + 2 WHERE sku = 'flash-1';"#,
    );
    let line = s.get_order("old-build").unwrap().unwrap().lines[0].clone();
    assert_eq!((line.qty, line.sale_seq), (2, None));
    assert!(
        over_limit(create(&s, seckill2("ann", 1), true)),
        "at the limit through the old build"
    );
    assert!(
        over_limit(create(&s, seckill2("ann", 1), false)),
        "in a group too"
    );
    create(&s, seckill2("bob", 2), true).expect("another buyer is not held by it");
    // Expired, it is named with that sale too, for the gate to forget where the limit counted it.
    let expired = s.expire_due(i64::MAX, 100).unwrap();
    assert!(
        expired.flash_sale.contains(&crate::store::ExpiredLine {
            user: "ann".into(),
            sku: "flash-1".into(),
            sale: 1,
            qty: 2
        }),
        "{expired:?}"
    );
}

/// A store whose schema a newer build migrated is refused, saying why: this build would write flash-sale lines
/// without their sale number.
pub(super) fn a_store_a_newer_build_migrated_is_refused(fx: &dyn Fixture) {
    drop(fx.open());
    let newer = fx.schema_version() + 1;
    fx.mark_schema_version(newer);
    let refused = match fx.try_open() {
        Ok(_) => panic!("a store of schema {newer} opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains(&format!("schema is version {newer}, newer than this build knows")),
        "{refused}"
    );
}
