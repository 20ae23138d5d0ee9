//! Keyed merchant stock batches in the store suite (run against every store by `store_suite!` in the parent):
//! a batch under an idempotency key applies once however often it is retried, on one handle or on several at
//! once, a replay answers the first result, another batch under the key is refused; and a schema-3 database
//! (before the keys) migrates.

use super::*;

fn up(sku: &str, receive: u32, write_off: u32, price_cents: Option<Cents>) -> StockUpdate {
    StockUpdate {
        sku: sku.into(),
        receive,
        write_off,
        price_cents,
    }
}

/// `sku` of product `product` as the catalog shows it now.
fn shelf(s: &dyn Store, product: i64, sku: &str) -> Sku {
    let p = s.get_product(product).unwrap().unwrap();
    p.skus.into_iter().find(|k| k.sku == sku).unwrap()
}

/// The merchant's retry of `receive: 50` after a lost answer: received once, the first answer again (not the
/// shelf as it is now), nothing changed by the replay; another batch under the key is a conflict that
/// changes nothing; a refused batch records nothing, so its key may carry it again; without a key a batch
/// applies each time, as it always did.
pub(super) fn keyed_stock_batch_applies_once_and_replays_its_answer(fx: &dyn Fixture) {
    let s = fx.open();
    let batch = [up("sku-5-1", 50, 0, None), up("sku-5-2", 0, 0, Some(777))];
    let first = s.update_stock_once("restock-1", &batch).unwrap().unwrap();
    assert!(!first.replay);
    assert_eq!((first.skus[0].available, first.skus[1].price_cents), (1050, 777));
    // An order between the two deliveries: the replay answers what the batch did, not the shelf of now.
    create(
        &s,
        order("buyer", None, OrderKind::Regular, "sku-5-1", 1, 60_000),
        true,
    )
    .unwrap();
    let again = fx.open().update_stock_once("restock-1", &batch).unwrap().unwrap();
    assert_eq!(
        again,
        Restocked {
            skus: first.skus.clone(),
            replay: true
        }
    );
    assert_eq!(shelf(&*s, 5, "sku-5-1").available, 1049, "received once");

    let other = [up("sku-5-1", 51, 0, None), up("sku-5-2", 0, 0, Some(777))];
    assert_eq!(
        s.update_stock_once("restock-1", &other).unwrap(),
        Err(Reject::IdempotencyConflict {
            key: "restock-1".into()
        })
    );
    let reordered = [batch[1].clone(), batch[0].clone()];
    assert!(matches!(
        s.update_stock_once("restock-1", &reordered).unwrap(),
        Err(Reject::IdempotencyConflict { .. })
    ));
    assert_eq!(
        shelf(&*s, 5, "sku-5-1").available,
        1049,
        "a conflict changes nothing"
    );

    let too_many = [up("sku-5-1", 0, 5000, None)];
    assert!(matches!(
        s.update_stock_once("restock-2", &too_many).unwrap(),
        Err(Reject::OutOfStock { .. })
    ));
    let fixed = [up("sku-5-1", 0, 9, None)];
    let later = s.update_stock_once("restock-2", &fixed).unwrap().unwrap();
    assert_eq!((later.replay, later.skus[0].available), (false, 1040));

    for want in [1041, 1042] {
        let unkeyed = s.update_stock(&[up("sku-5-1", 1, 0, None)]).unwrap().unwrap();
        assert_eq!(unkeyed[0].available, want);
    }
    assert_eq!(fx.number("SELECT COUNT(*) FROM stock_keys"), 2);
    assert_audit(&s);
}

/// Eight deliveries of one keyed batch at once, over four handles (instances): exactly one applies, every
/// other one answers its result as a replay. On PostgreSQL they run side by side, so the key's lock must hold
/// each from its lookup to its commit.
pub(super) fn concurrent_keyed_stock_batches_apply_once(fx: &dyn Fixture) {
    let handles: Vec<Box<dyn Store>> = (0..4).map(|_| fx.open()).collect();
    let before = shelf(&*handles[0], 6, "sku-6-1").available;
    for round in 0..3 {
        let key = format!("race-{round}");
        let batch = [up("sku-6-1", 50, 0, None), up("sku-6-2", 5, 0, None)];
        let start = std::sync::Barrier::new(8);
        let answers: Vec<Restocked> = std::thread::scope(|sc| {
            let joins: Vec<_> = (0..8)
                .map(|i| {
                    let (s, key, batch, start) = (&handles[i % 4], &key, &batch, &start);
                    sc.spawn(move || {
                        start.wait();
                        s.update_stock_once(key, batch).unwrap().unwrap()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let applied: Vec<&Restocked> = answers.iter().filter(|a| !a.replay).collect();
        assert_eq!(applied.len(), 1, "round {round}: {answers:?}");
        assert!(answers.iter().all(|a| a.skus == applied[0].skus));
        assert_eq!(
            shelf(&*handles[1], 6, "sku-6-1").available,
            before + 50 * (round + 1)
        );
    }
    assert_audit(&handles[2]);
}

/// A schema-3 database (before keyed stock batches) migrates at the first start: its catalog reads as before
/// and takes keyed batches.
pub(super) fn migration_to_stock_keys_keeps_the_catalog(fx: &dyn Fixture) {
    fx.exec(&fx.old_schema(3));
    fx.exec(
        "INSERT INTO shops(id, name) VALUES (1, 'S');
        INSERT INTO products(id, shop_id, name) VALUES (1, 1, 'P');
        INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
          VALUES ('old-1', 1, 100, 10, 10, 0, 0);",
    );
    assert_eq!(fx.schema_version(), 3);
    let s = fx.open();
    assert_eq!(fx.schema_version(), super::super::sqlite_schema::VERSION);
    let batch = [up("old-1", 5, 0, None)];
    let first = s.update_stock_once("after-upgrade", &batch).unwrap().unwrap();
    assert_eq!((first.replay, first.skus[0].available), (false, 15));
    let again = fx
        .open()
        .update_stock_once("after-upgrade", &batch)
        .unwrap()
        .unwrap();
    assert_eq!((again.replay, again.skus), (true, first.skus));
    assert_eq!(shelf(&*s, 1, "old-1").available, 15);
    assert_audit(&s);
}
