//! The store invariant suite, run unchanged against every store (`store_suite!` at the end): SQLite on a real
//! file, PostgreSQL on a throwaway server. Two store handles on one database stand in for two processes.

mod batches;
mod lock_order;
mod postgres_conn;
mod refunds;
mod sales;
mod stock_keys;

use batches::*;
use refunds::*;
use sales::*;
use stock_keys::*;

use std::time::{Duration, Instant};

use super::sqlite::SqliteStore;
use super::*;
use crate::domain::{OrderKind, OrderLineReq, fingerprint, new_order_id, now_ms};

/// A fresh, seeded database; `open` returns another handle (another "process") on it.
trait Fixture {
    fn open(&self) -> Box<dyn Store> {
        self.try_open().unwrap()
    }
    fn try_open(&self) -> Result<Box<dyn Store>, StoreError>;
    /// Runs `sql` on the database itself, as another tool would: to forge what the store never writes, or to
    /// build an old schema before the first `open` migrates it.
    fn exec(&self, sql: &str);
    /// The one number `sql` selects.
    fn number(&self, sql: &str) -> i64;
    /// The SQL that makes an empty database one of schema `version`, as that version's release left it.
    fn old_schema(&self, version: usize) -> String;
    fn schema_version(&self) -> i64;
    /// Marks the database as migrated to `version`, as a later build would.
    fn mark_schema_version(&self, version: i64);
}

struct SqliteFixture(tempfile::TempDir);

impl SqliteFixture {
    fn new() -> Self {
        SqliteFixture(tempfile::tempdir().unwrap())
    }
}

impl Fixture for SqliteFixture {
    fn try_open(&self) -> Result<Box<dyn Store>, StoreError> {
        let s = SqliteStore::open(
            &self.0.path().join("x.db"),
            std::time::Duration::from_secs(10),
            true,
        )?;
        Ok(Box::new(s))
    }
    fn exec(&self, sql: &str) {
        let c = rusqlite::Connection::open(self.0.path().join("x.db")).unwrap();
        c.execute_batch(sql).unwrap();
    }
    fn number(&self, sql: &str) -> i64 {
        let c = rusqlite::Connection::open(self.0.path().join("x.db")).unwrap();
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }
    fn old_schema(&self, version: usize) -> String {
        super::sqlite_schema::schema_up_to(version)
    }
    fn schema_version(&self) -> i64 {
        self.number("PRAGMA user_version")
    }
    fn mark_schema_version(&self, version: i64) {
        self.exec(&format!("PRAGMA user_version = {version}"));
    }
}

struct PostgresFixture(xcluster_tests::services::Postgres);

impl PostgresFixture {
    fn new() -> Self {
        PostgresFixture(xcluster_tests::services::Postgres::start())
    }
}

impl Fixture for PostgresFixture {
    fn try_open(&self) -> Result<Box<dyn Store>, StoreError> {
        let s = super::postgres::PostgresStore::open(&super::postgres::PgOptions {
            url: self.0.url.clone(),
            pool_size: 8,
            connect_timeout: std::time::Duration::from_secs(5),
            statement_timeout: std::time::Duration::from_secs(10),
            seed_demo: true,
        })?;
        Ok(Box::new(s))
    }
    fn exec(&self, sql: &str) {
        let mut c = ::postgres::Client::connect(&self.0.url, ::postgres::NoTls).unwrap();
        c.batch_execute(sql).unwrap();
    }
    fn number(&self, sql: &str) -> i64 {
        let mut c = ::postgres::Client::connect(&self.0.url, ::postgres::NoTls).unwrap();
        c.query_one(sql, &[]).unwrap().get(0)
    }
    fn old_schema(&self, version: usize) -> String {
        super::postgres_schema::schema_up_to(version)
    }
    fn schema_version(&self) -> i64 {
        self.number("SELECT MAX(version) FROM xbuy_schema")
    }
    fn mark_schema_version(&self, version: i64) {
        self.exec(&format!("INSERT INTO xbuy_schema(version) VALUES ({version})"));
    }
}

/// A new order of one line, as a request makes it.
pub(crate) fn order(
    user: &str,
    key: Option<&str>,
    kind: OrderKind,
    sku: &str,
    qty: u32,
    ttl_ms: i64,
) -> NewOrder {
    let lines = vec![OrderLineReq { sku: sku.into(), qty }];
    NewOrder {
        id: new_order_id(),
        fingerprint: fingerprint(kind, user, &lines),
        user: user.into(),
        kind,
        lines,
        idem_key: key.map(String::from),
        created_ms: now_ms(),
        expires_ms: now_ms() + ttl_ms,
        per_user_limit: 1,
    }
}

fn create(
    s: &impl std::ops::Deref<Target = dyn Store>,
    o: NewOrder,
    inline: bool,
) -> Result<Created, Reject> {
    s.create_orders(&[o], inline).unwrap().pop().unwrap()
}

/// A reserved order of one `sku-1-1` (610 cents) for `user`.
fn reserved_order(s: &impl std::ops::Deref<Target = dyn Store>, user: &str) -> OrderView {
    let o = order(user, None, OrderKind::Regular, "sku-1-1", 1, 60_000);
    create(s, o, true).unwrap().order
}

/// The provider's callback for payment `payment_id` of `amount_cents` on order `o`.
fn psp(o: &OrderView, payment_id: &str, amount_cents: i64, status: &str) -> PaymentCallback {
    PaymentCallback {
        payment_id: payment_id.into(),
        order_id: o.id.clone(),
        amount_cents,
        status: status.into(),
    }
}

fn assert_audit(s: &impl std::ops::Deref<Target = dyn Store>) -> AuditReport {
    let r = s.audit().unwrap();
    assert!(r.ok, "audit failed: {:?}", r.failures());
    r
}

/// An order of several lines (SKU, units).
fn multi(user: &str, lines: &[(&str, u32)]) -> NewOrder {
    let lines: Vec<OrderLineReq> = lines
        .iter()
        .map(|(sku, qty)| OrderLineReq {
            sku: (*sku).into(),
            qty: *qty,
        })
        .collect();
    NewOrder {
        id: new_order_id(),
        fingerprint: fingerprint(OrderKind::Regular, user, &lines),
        user: user.into(),
        kind: OrderKind::Regular,
        lines,
        idem_key: None,
        created_ms: now_ms(),
        expires_ms: now_ms() + 60_000,
        per_user_limit: 0,
    }
}

/// Refunds `lines` (SKU, units) of order `id`, or the whole order when `lines` is empty, synchronously.
fn refund(
    s: &impl std::ops::Deref<Target = dyn Store>,
    id: &str,
    key: Option<&str>,
    lines: &[(&str, u32)],
) -> Result<Refunded, Reject> {
    let lines = (!lines.is_empty()).then(|| {
        lines
            .iter()
            .map(|(sku, qty)| OrderLineReq {
                sku: (*sku).into(),
                qty: *qty,
            })
            .collect()
    });
    s.refund(&RefundRequest::new(id, lines, key.map(String::from)), true)
        .unwrap()
}

fn idempotent_create_and_conflict(fx: &dyn Fixture) {
    let s = fx.open();
    let a = create(
        &s,
        order("u1", Some("k"), OrderKind::Regular, "sku-1-1", 2, 60_000),
        true,
    )
    .unwrap();
    assert!(!a.replay);
    let b = create(
        &s,
        order("u1", Some("k"), OrderKind::Regular, "sku-1-1", 2, 60_000),
        true,
    )
    .unwrap();
    assert!(b.replay);
    assert_eq!(a.order, b.order);
    let c = create(
        &s,
        order("u1", Some("k"), OrderKind::Regular, "sku-1-1", 3, 60_000),
        true,
    );
    assert!(matches!(c, Err(Reject::IdempotencyConflict { .. })));
    // A key is the user's own: another buyer's "k" is another order, and each replays its own.
    let d = create(
        &s,
        order("u2", Some("k"), OrderKind::Regular, "sku-1-1", 3, 60_000),
        true,
    )
    .unwrap();
    assert!(!d.replay);
    assert_ne!(d.order.id, a.order.id);
    let e = create(
        &s,
        order("u2", Some("k"), OrderKind::Regular, "sku-1-1", 3, 60_000),
        true,
    )
    .unwrap();
    assert!(e.replay);
    assert_eq!(e.order, d.order);
    // What a gate asks before it refuses a keyed request: the same answers, without creating anything.
    let keyed = |user, key, qty| {
        s.keyed_answer(&order(user, key, OrderKind::Regular, "sku-1-1", qty, 60_000))
            .unwrap()
    };
    assert!(matches!(keyed("u1", Some("k"), 2), Keyed::Stored(Ok(c)) if c.replay && c.order == a.order));
    assert!(matches!(
        keyed("u1", Some("k"), 3),
        Keyed::Stored(Err(Reject::IdempotencyConflict { .. }))
    ));
    assert!(matches!(keyed("u1", Some("other"), 2), Keyed::Free));
    assert!(matches!(keyed("u1", None, 2), Keyed::Free));
    let r = assert_audit(&s);
    assert_eq!(r.totals.orders, 2);
    assert_eq!(r.totals.units_reserved, 5);
}

fn never_oversells_and_rejects_in_a_batch_independently(fx: &dyn Fixture) {
    let s = fx.open();
    let batch: Vec<NewOrder> = (0..150)
        .map(|i| order(&format!("u{i}"), None, OrderKind::Regular, "flash-1", 1, 60_000))
        .collect();
    let out = s.create_orders(&batch, false).unwrap();
    assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 100);
    assert!(matches!(out[149], Err(Reject::SoldOut { .. })));
    let big = create(
        &s,
        order("x", None, OrderKind::Regular, "sku-2-1", 1001, 60_000),
        true,
    );
    assert!(matches!(big, Err(Reject::OutOfStock { available: 1000, .. })));
    assert!(matches!(
        create(&s, order("x", None, OrderKind::Regular, "nope", 1, 1), true),
        Err(Reject::NotFound { .. })
    ));
    let r = assert_audit(&s);
    assert_eq!(r.totals.orders, 100);
    assert_eq!(r.totals.outbox_pending, 100);
    assert_eq!(s.run_outbox(1000).unwrap(), 100);
    assert_eq!(s.run_outbox(1000).unwrap(), 0);
    assert_eq!(assert_audit(&s).totals.effects, 100);
}

fn pay_refund_settle_balance_the_ledger(fx: &dyn Fixture) {
    let s = fx.open();
    s.credit(&["u1".into(), "u2".into()], 1000).unwrap();
    let a = create(
        &s,
        order("u1", None, OrderKind::Regular, "sku-1-1", 1, 60_000),
        true,
    )
    .unwrap()
    .order;
    assert_eq!(a.total_cents, 610);
    let paid = s.pay_wallet(&a.id, true).unwrap().unwrap();
    assert_eq!(paid.status, "paid");
    // A replayed payment has no second effect.
    assert_eq!(s.pay_wallet(&a.id, true).unwrap().unwrap().status, "paid");
    assert_eq!(s.balance("user:u1").unwrap(), 390);
    let b = create(
        &s,
        order("u1", None, OrderKind::Regular, "sku-1-1", 1, 60_000),
        true,
    )
    .unwrap()
    .order;
    assert!(matches!(
        s.pay_wallet(&b.id, true).unwrap(),
        Err(Reject::InsufficientFunds { .. })
    ));
    assert_eq!(s.get_order(&b.id).unwrap().unwrap().status, "reserved");
    let cb = PaymentCallback {
        payment_id: "p1".into(),
        order_id: b.id.clone(),
        amount_cents: 610,
        status: "succeeded".into(),
    };
    assert_eq!(s.payment_callback(&cb, false).unwrap().unwrap().status, "paid");
    assert_eq!(s.payment_callback(&cb, false).unwrap().unwrap().status, "paid");
    let other = PaymentCallback {
        amount_cents: 1,
        ..cb.clone()
    };
    assert!(matches!(
        s.payment_callback(&other, false).unwrap(),
        Err(Reject::IdempotencyConflict { .. })
    ));
    assert_eq!(refund(&s, &a.id, None, &[]).unwrap().order.status, "refunded");
    assert_eq!(refund(&s, &a.id, None, &[]).unwrap().order.status, "refunded");
    assert_eq!(s.balance("user:u1").unwrap(), 1000);
    let batch = s.settle().unwrap();
    assert_eq!(batch.iter().map(|x| x.amount_cents).sum::<i64>(), 610);
    assert_eq!(s.balance("payout:1").unwrap(), 610);
    s.run_outbox(100).unwrap();
    assert_audit(&s);
    // A settlement recorded for more than its posting paid out.
    fx.exec("UPDATE settlements SET amount_cents = amount_cents + 1");
    assert_eq!(s.audit().unwrap().failures(), vec!["settlements_match_postings"]);
}

/// A reservation past its expiry that the sweeper has not reached yet takes no payment: the wallet is refused
/// as expired and charged nothing, a provider's capture is kept as refund due, and the sweep then expires the
/// order and puts its unit back on sale.
fn a_reservation_past_its_expiry_takes_no_payment(fx: &dyn Fixture) {
    let s = fx.open();
    s.credit(&["u1".into()], 1000).unwrap();
    let due = create(&s, order("u1", None, OrderKind::Regular, "sku-1-1", 1, -1), true)
        .unwrap()
        .order;
    let expired = |r| {
        matches!(
            r,
            Err(Reject::BadTransition {
                from: "expired",
                action: "pay",
                ..
            })
        )
    };
    assert!(expired(s.pay_wallet(&due.id, true).unwrap()));
    assert_eq!(s.balance("user:u1").unwrap(), 1000);
    let cb = psp(&due, "late-1", due.total_cents, "succeeded");
    assert_eq!(
        s.payment_callback(&cb, false).unwrap().unwrap().status,
        "reserved"
    );
    assert_eq!(
        fx.number("SELECT COUNT(*) FROM payments WHERE status = 'refund_due'"),
        1
    );
    assert_eq!(s.expire_due(now_ms(), 100).unwrap().orders, 1);
    assert_eq!(s.get_order(&due.id).unwrap().unwrap().status, "expired");
    assert_eq!(assert_audit(&s).totals.units_reserved, 0);
}

/// A provider's payment id spans the buyer's attempts: the one that failed may succeed later, and that capture
/// pays the order (it was refused as a conflict, on every delivery, and the money was nowhere). A failure
/// reported after the success is still a conflict, and the success's replay one payment.
fn a_failed_payment_that_succeeds_later_pays_the_order(fx: &dyn Fixture) {
    let s = fx.open();
    let o = reserved_order(&s, "u1");
    let cb = |status: &str| psp(&o, "pi-1", 610, status);
    for _ in 0..2 {
        assert_eq!(
            s.payment_callback(&cb("failed"), false).unwrap().unwrap().status,
            "reserved"
        );
    }
    for _ in 0..2 {
        let paid = s.payment_callback(&cb("succeeded"), false).unwrap().unwrap();
        assert_eq!(
            (paid.status.as_str(), paid.paid_via.as_deref()),
            ("paid", Some("psp"))
        );
    }
    assert!(matches!(
        s.payment_callback(&cb("failed"), false).unwrap(),
        Err(Reject::IdempotencyConflict { .. })
    ));
    assert_eq!(s.balance("psp").unwrap(), -610);
    assert_audit(&s);
}

/// A provider's capture of another amount than the order's total leaves the order unpaid and is kept, owed
/// back (its replay answers, where a refusal rolled its record back); and a failed attempt's amount binds
/// nothing: the success under its id, for the total, pays the order (it was an `idempotency_conflict`).
fn a_capture_of_another_amount_is_kept_and_a_failed_attempts_amount_binds_nothing(fx: &dyn Fixture) {
    let s = fx.open();
    let o = reserved_order(&s, "u1");
    let cb = |id: &str, amount_cents: i64, status: &str| psp(&o, id, amount_cents, status);
    for _ in 0..2 {
        let kept = s
            .payment_callback(&cb("pi-short", 500, "succeeded"), false)
            .unwrap();
        assert_eq!(kept.unwrap().status, "reserved", "unpaid, the capture kept");
    }
    assert_eq!(
        s.payment_callback(&cb("pi-2", 1, "failed"), false)
            .unwrap()
            .unwrap()
            .status,
        "reserved"
    );
    let paid = s
        .payment_callback(&cb("pi-2", 610, "succeeded"), false)
        .unwrap()
        .unwrap();
    assert_eq!(paid.status, "paid");
    assert_eq!(
        s.balance("psp").unwrap(),
        -610,
        "only the payment of the total is posted"
    );
    assert_audit(&s);
    // The kept capture recorded as the order's payment instead: the audit sees an order paid twice.
    fx.exec("UPDATE payments SET status = 'succeeded' WHERE payment_id = 'pi-short'");
    assert_eq!(s.audit().unwrap().failures(), vec!["payments_match_orders"]);
}

fn reservations_expire_exactly_once_across_handles(fx: &dyn Fixture) {
    let s1 = fx.open();
    let s2 = fx.open();
    for i in 0..20 {
        create(
            &s1,
            order(&format!("u{i}"), None, OrderKind::Regular, "sku-3-1", 2, -1),
            true,
        )
        .unwrap();
    }
    let keep = create(
        &s1,
        order("k", None, OrderKind::Regular, "sku-3-1", 1, 60_000),
        true,
    )
    .unwrap()
    .order;
    // A flash-sale order expires too, and the sweep names its buyer, SKU and sale (for the Redis gate).
    assert_eq!(s1.open_flash_sale("flash-1", 8).unwrap().unwrap().sale_seq, 1);
    let flash = order("f", None, OrderKind::Seckill, "flash-1", 1, -1);
    assert_eq!(create(&s1, flash, true).unwrap().order.status, "reserved");
    let both = |x: Expired, y: Expired| Expired {
        orders: x.orders + y.orders,
        flash_sale: [x.flash_sale, y.flash_sale].concat(),
        restocked: [x.restocked, y.restocked].concat(),
    };
    let (a, b) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| {
            both(
                s1.expire_due(now_ms(), 7).unwrap(),
                s1.expire_due(now_ms(), 100).unwrap(),
            )
        });
        let h2 = sc.spawn(|| s2.expire_due(now_ms(), 100).unwrap());
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert_eq!(a.orders + b.orders, 21);
    // The regular orders' units back on sale, per SKU (for the Redis gate's counter), each once.
    let restocked: Vec<(String, i64)> = [&a.restocked[..], &b.restocked[..]].concat();
    assert!(restocked.iter().all(|(sku, _)| sku == "sku-3-1"), "{restocked:?}");
    assert_eq!(restocked.iter().map(|(_, n)| n).sum::<i64>(), 40, "{restocked:?}");
    assert_eq!(
        [a.flash_sale, b.flash_sale].concat(),
        [crate::store::ExpiredLine {
            user: "f".to_string(),
            sku: "flash-1".to_string(),
            sale: 1,
            qty: 1
        }]
    );
    let r = assert_audit(&s1);
    assert_eq!(r.totals.expired, 21);
    assert_eq!(r.totals.units_reserved, 1);
    // An expired order cannot be paid or cancelled back into stock.
    let first = s1.cancel(&keep.id).unwrap().unwrap();
    assert_eq!((first.0.status.as_str(), first.1), ("cancelled", true));
    // A second cancel answers the same, and ended nothing.
    let again = s1.cancel(&keep.id).unwrap().unwrap();
    assert_eq!((again.0.status.as_str(), again.1), ("cancelled", false));
    assert_eq!(assert_audit(&s2).totals.units_reserved, 0);
}

/// The sampler's lag reading: the first expiry among reservations still held, whoever created them, and
/// none once the sweep has taken them (a paid or cancelled order is not held).
fn oldest_reservation_expiry_names_the_first_held(fx: &dyn Fixture) {
    let s1 = fx.open();
    let s2 = fx.open();
    assert_eq!(
        s1.oldest_reservation_expiry().unwrap(),
        None,
        "a fresh store holds none"
    );
    let late = order("a", None, OrderKind::Regular, "sku-3-1", 1, 60_000);
    let overdue = order("b", None, OrderKind::Regular, "sku-3-1", 1, -5_000);
    let gone = order("c", None, OrderKind::Regular, "sku-3-1", 1, -9_000);
    let (late_at, overdue_at) = (late.expires_ms, overdue.expires_ms);
    create(&s1, late, true).unwrap();
    create(&s1, overdue, true).unwrap();
    let cancelled = create(&s1, gone, true).unwrap().order;
    assert_eq!(s1.cancel(&cancelled.id).unwrap().unwrap().0.status, "cancelled");
    assert_eq!(s2.oldest_reservation_expiry().unwrap(), Some(overdue_at));
    assert_eq!(s2.expire_due(now_ms(), 100).unwrap().orders, 1);
    assert_eq!(s1.oldest_reservation_expiry().unwrap(), Some(late_at));
}

fn flash_sale_buckets_and_user_limit(fx: &dyn Fixture) {
    let s = fx.open();
    let sku = s.open_flash_sale("flash-1", 8).unwrap().unwrap();
    assert_eq!((sku.available, sku.bucketed), (0, 100));
    let first = create(
        &s,
        order("u1", None, OrderKind::Seckill, "flash-1", 1, 60_000),
        false,
    );
    assert!(first.is_ok());
    let again = create(
        &s,
        order("u1", None, OrderKind::Seckill, "flash-1", 1, 60_000),
        false,
    );
    assert!(matches!(again, Err(Reject::LimitExceeded { .. })));
    let many: Vec<NewOrder> = (2..=120)
        .map(|i| order(&format!("u{i}"), None, OrderKind::Seckill, "flash-1", 1, 60_000))
        .collect();
    let ok = s
        .create_orders(&many, false)
        .unwrap()
        .iter()
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(ok, 99);
    let r = assert_audit(&s);
    assert_eq!(
        (r.totals.units_reserved, r.totals.units_available - 24_000),
        (100, 0)
    );
}

/// Units refunded give back the buyer's flash-sale allowance, a partial refund's as a full one's: the limit
/// counted a partly refunded order's every unit, so a buyer holding one unit of a limit of two was refused.
fn a_partial_refund_gives_back_its_units_flash_sale_allowance(fx: &dyn Fixture) {
    let s = fx.open();
    let seckill = |qty: u32| NewOrder {
        per_user_limit: 2,
        ..order("demo-1", None, OrderKind::Seckill, "flash-1", qty, 60_000)
    };
    let o = create(&s, seckill(2), true).unwrap().order;
    assert_eq!(s.pay_wallet(&o.id, true).unwrap().unwrap().status, "paid");
    assert!(matches!(
        create(&s, seckill(1), true),
        Err(Reject::LimitExceeded { .. })
    ));
    let partly = refund(&s, &o.id, Some("r1"), &[("flash-1", 1)]).unwrap().order;
    assert_eq!(
        (partly.status.as_str(), partly.lines[0].refunded_qty),
        ("paid", 1)
    );
    create(&s, seckill(1), true).expect("one unit held of two allowed");
    assert!(matches!(
        create(&s, seckill(1), true),
        Err(Reject::LimitExceeded { .. })
    ));
    assert_audit(&s);
}

/// A user's orders page newest first, by `(created_ms, id)`, with no order lost or repeated across pages
/// (several share a millisecond), and none of another user's.
fn user_orders_page_newest_first(fx: &dyn Fixture) {
    let s = fx.open();
    let mut placed: Vec<(i64, String)> = (0..5)
        .map(|_| {
            let o = create(
                &s,
                order("lister", None, OrderKind::Regular, "sku-2-2", 1, 60_000),
                true,
            )
            .unwrap();
            (o.order.created_ms, o.order.id)
        })
        .collect();
    create(
        &s,
        order("other", None, OrderKind::Regular, "sku-2-2", 1, 60_000),
        true,
    )
    .unwrap();
    placed.sort();
    placed.reverse();
    let mut seen = Vec::new();
    let mut before = None;
    for want in [2, 2, 1, 0] {
        let page = s.user_orders("lister", before.clone(), 2).unwrap();
        assert_eq!(page.len(), want);
        assert!(page.iter().all(|o| o.user == "lister" && o.lines.len() == 1));
        seen.extend(page.iter().map(|o| (o.created_ms, o.id.clone())));
        before = page.last().map(|o| (o.created_ms, o.id.clone()));
    }
    assert_eq!(seen, placed);
    assert!(s.user_orders("nobody", None, 10).unwrap().is_empty());
}

/// A write-off takes units off the shelf and out of what was received; more than the shelf holds refuses
/// the whole batch.
fn a_write_off_takes_from_the_shelf_or_refuses_the_batch(fx: &dyn Fixture) {
    let s = fx.open();
    let up = |sku: &str, receive: u32, write_off: u32| StockUpdate {
        sku: sku.into(),
        receive,
        write_off,
        price_cents: None,
    };
    let done = s.update_stock(&[up("sku-3-2", 0, 5)]).unwrap().unwrap();
    assert_eq!(done[0].available, 995);
    let refused = s
        .update_stock(&[up("sku-3-2", 10, 0), up("sku-4-1", 3, 2000)])
        .unwrap();
    assert_eq!(
        refused.unwrap_err(),
        Reject::OutOfStock {
            sku: "sku-4-1".into(),
            available: 1003,
            wanted: 2000
        }
    );
    let after = s.update_stock(&[up("sku-3-2", 0, 0)]).unwrap().unwrap();
    assert_eq!(after[0].available, 995, "the batch left nothing behind");
    assert!(matches!(
        s.update_stock(&[up("nope", 0, 1)]).unwrap(),
        Err(Reject::NotFound { .. })
    ));
    assert_audit(&s);
}

/// A credit with an idempotency key posts once however often it is retried, and the key cannot be reused
/// for another credit.
/// The demo seed gives every demo buyer wallet credit, on every store, so `xcluster load` can pay.
fn demo_buyers_are_seeded_with_credit(fx: &dyn Fixture) {
    let s = fx.open();
    let credit = super::sqlite_schema::DEMO_CREDIT_CENTS;
    let last = format!("user:demo-{}", super::sqlite_schema::DEMO_BUYERS - 1);
    assert_eq!(
        (s.balance("user:demo-0").unwrap(), s.balance(&last).unwrap()),
        (credit, credit)
    );
    // A second handle (another instance starting) seeds nothing twice.
    let again = fx.open();
    assert_eq!(again.balance("user:demo-0").unwrap(), credit);
    assert_audit(&s);
}

fn keyed_credit_posts_once(fx: &dyn Fixture) {
    let s = fx.open();
    let users: Vec<String> = vec!["ka".into(), "kb".into()];
    assert_eq!(s.credit_once("top-up-1", &users, 500).unwrap(), Ok(false));
    assert_eq!(s.credit_once("top-up-1", &users, 500).unwrap(), Ok(true));
    let reversed: Vec<String> = vec!["kb".into(), "ka".into()];
    assert_eq!(s.credit_once("top-up-1", &reversed, 500).unwrap(), Ok(true));
    for other in [(&users[..1], 500), (&users[..], 501)] {
        assert_eq!(
            s.credit_once("top-up-1", other.0, other.1).unwrap(),
            Err(Reject::IdempotencyConflict {
                key: "top-up-1".into()
            })
        );
    }
    assert_eq!(s.credit_once("top-up-2", &users[..1], 500).unwrap(), Ok(false));
    assert_eq!(
        (s.balance("user:ka").unwrap(), s.balance("user:kb").unwrap()),
        (1000, 500)
    );
    assert_audit(&s);
}

/// An open flash sale sells only through seckill; an order of several units gathers them from buckets that
/// each hold fewer; the last units are "out of stock" to a buyer wanting more, never "sold out" while some are
/// left; closing the sale puts what the buckets hold back on the shelf.
fn flash_sale_is_seckill_only_gathers_units_and_closes(fx: &dyn Fixture) {
    let s = fx.open();
    let limited = |user: &str, qty: u32| NewOrder {
        per_user_limit: 3,
        ..order(user, None, OrderKind::Seckill, "flash-1", qty, 60_000)
    };
    // 100 units over 64 buckets: none holds more than 2.
    let sku = s.open_flash_sale("flash-1", 64).unwrap().unwrap();
    assert_eq!((sku.available, sku.bucketed, sku.flash_sale), (0, 100, true));
    let regular = create(
        &s,
        order("r", None, OrderKind::Regular, "flash-1", 5, 60_000),
        true,
    );
    assert_eq!(
        regular.unwrap_err(),
        Reject::OnFlashSale {
            sku: "flash-1".into()
        }
    );
    assert!(create(&s, limited("u0", 3), false).is_ok());
    let sku = s.close_flash_sale("flash-1").unwrap().unwrap();
    assert_eq!(
        (sku.available, sku.bucketed, sku.reserved, sku.flash_sale),
        (97, 0, 3, false)
    );
    assert_eq!(s.close_flash_sale("flash-1").unwrap().unwrap(), sku);
    assert!(matches!(
        s.close_flash_sale("nope").unwrap(),
        Err(Reject::NotFound { .. })
    ));
    assert!(
        create(
            &s,
            order("r", None, OrderKind::Regular, "flash-1", 5, 60_000),
            true
        )
        .is_ok()
    );
    // Reopened with 92: 30 buyers of 3 leave 2 units in two buckets.
    assert_eq!(s.open_flash_sale("flash-1", 64).unwrap().unwrap().bucketed, 92);
    for i in 1..=30 {
        assert!(
            create(&s, limited(&format!("u{i}"), 3), false).is_ok(),
            "buyer {i}"
        );
    }
    assert_eq!(
        create(&s, limited("late", 3), false).unwrap_err(),
        Reject::OutOfStock {
            sku: "flash-1".into(),
            available: 2,
            wanted: 3
        }
    );
    assert!(create(&s, limited("late", 2), false).is_ok());
    assert_eq!(
        create(&s, limited("last", 1), false).unwrap_err(),
        Reject::SoldOut {
            sku: "flash-1".into()
        }
    );
    let r = assert_audit(&s);
    assert_eq!((r.totals.units_reserved, r.totals.orders), (100, 33));
}

/// Commits `group(handle, round)` for `rounds` rounds on each handle's own thread, all at once (the handles
/// as instances); the orders committed in all.
fn commit_concurrently(
    handles: &[Box<dyn Store>],
    rounds: usize,
    group: impl Fn(usize, usize) -> Vec<NewOrder> + Sync,
) -> usize {
    std::thread::scope(|sc| {
        let group = &group;
        let joins: Vec<_> = (handles.iter().enumerate())
            .map(|(h, s)| {
                sc.spawn(move || {
                    (0..rounds)
                        .map(|round| {
                            let out = s.create_orders(&group(h, round), false).unwrap();
                            out.iter().filter(|r| r.is_ok()).count()
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).sum()
    })
}

/// Several handles (processes) at once: groups racing for one SKU sell exactly its stock, and concurrent
/// payments from one wallet cannot overdraw it.
fn concurrent_handles_never_oversell_or_overdraw(fx: &dyn Fixture) {
    let handles: Vec<Box<dyn Store>> = (0..4).map(|_| fx.open()).collect();
    let sold = commit_concurrently(&handles, 5, |h, g| {
        (0..10)
            .map(|i| {
                order(
                    &format!("h{h}g{g}u{i}"),
                    None,
                    OrderKind::Regular,
                    "flash-1",
                    1,
                    60_000,
                )
            })
            .collect()
    });
    assert_eq!(sold, 100);
    handles[0].credit(&["w".into()], 1000).unwrap();
    let ids: Vec<String> = (0..4)
        .map(|_| {
            create(
                &handles[0],
                order("w", None, OrderKind::Regular, "sku-1-1", 1, 60_000),
                true,
            )
            .unwrap()
            .order
            .id
        })
        .collect();
    let paid: usize = std::thread::scope(|sc| {
        let joins: Vec<_> = handles
            .iter()
            .zip(&ids)
            .map(|(s, id)| sc.spawn(move || s.pay_wallet(id, true).unwrap().is_ok() as usize))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).sum()
    });
    assert_eq!(paid, 1, "1000 cents pay for exactly one 610-cent order");
    assert_eq!(handles[1].balance("user:w").unwrap(), 390);
    let r = assert_audit(&handles[2]);
    assert_eq!((r.totals.orders, r.totals.paid), (104, 1));
}

/// Runs every suite function as a test against the fixture `$fx`.
macro_rules! store_suite {
    ($fx:ty: $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                super::$name(&<$fx>::new());
            }
        )*
    };
}

/// Every test of the suite, run on fixture `$fx`: the one list both stores share.
macro_rules! every_store_test {
    ($fx:ty) => {
        store_suite!($fx:
            partial_refund_restocks_its_units_and_pays_back_their_shop,
            partial_refunds_then_a_full_one_refund_exactly_the_total,
            over_refund_is_refused_and_changes_nothing,
            keyed_partial_refund_replays_and_posts_once,
            fulfilled_partial_refund_does_not_restock,
            audit_catches_a_forged_double_refund,
            audit_catches_a_refund_to_another_account,
            migration_to_partial_refunds_keeps_paid_and_refunded_orders,
            idempotent_create_and_conflict,
            never_oversells_and_rejects_in_a_batch_independently,
            a_refused_order_in_a_group_leaves_the_others_committed,
            concurrent_groups_in_opposite_orders_all_commit,
            pay_refund_settle_balance_the_ledger,
            a_reservation_past_its_expiry_takes_no_payment,
            a_failed_payment_that_succeeds_later_pays_the_order,
            a_capture_of_another_amount_is_kept_and_a_failed_attempts_amount_binds_nothing,
            reservations_expire_exactly_once_across_handles,
            oldest_reservation_expiry_names_the_first_held,
            flash_sale_buckets_and_user_limit,
            a_partial_refund_gives_back_its_units_flash_sale_allowance,
            the_flash_sale_limit_counts_per_sale,
            a_group_counts_the_limit_in_the_current_sale,
            migration_to_numbered_sales_keeps_counting_an_open_sale,
            a_flash_sale_line_without_a_number_counts_in_the_current_sale,
            a_store_a_newer_build_migrated_is_refused,
            flash_sale_is_seckill_only_gathers_units_and_closes,
            keyed_credit_posts_once,
            demo_buyers_are_seeded_with_credit,
            user_orders_page_newest_first,
            a_write_off_takes_from_the_shelf_or_refuses_the_batch,
            keyed_stock_batch_applies_once_and_replays_its_answer,
            concurrent_keyed_stock_batches_apply_once,
            migration_to_stock_keys_keeps_the_catalog,
            concurrent_handles_never_oversell_or_overdraw,
        );
    };
}

mod sqlite {
    every_store_test!(super::SqliteFixture);
}

mod postgres {
    every_store_test!(super::PostgresFixture);
}

/// SQLite only: the sampler's lag reading is one seek in the `orders_due` index, not a scan of the orders (it
/// runs every second in every process, and orders only grow).
#[test]
fn sqlite_oldest_reservation_is_one_index_seek() {
    let fx = SqliteFixture::new();
    drop(fx.open());
    let c = rusqlite::Connection::open(fx.0.path().join("x.db")).unwrap();
    let plan: Vec<String> = c
        .prepare(&format!("EXPLAIN QUERY PLAN {}", super::OLDEST_HELD_SQL))
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(plan.len(), 1, "{plan:?}");
    assert!(
        plan[0].contains("USING COVERING INDEX orders_due (status=?)"),
        "{plan:?}"
    );
}

/// SQLite only: a database whose orders table has the first schema's global key migrates to per-user
/// idempotency keys: the order and its key survive (its replay still answers), and another user may use it.
#[test]
fn sqlite_migration_to_per_user_keys_keeps_every_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let open = || -> Box<dyn Store> {
        Box::new(SqliteStore::open(&path, std::time::Duration::from_secs(10), true).unwrap())
    };
    // A database as version 1 left it, with an order placed under key "k" by u1.
    let first = order("u1", Some("k"), OrderKind::Regular, "sku-1-1", 2, 60_000);
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(&super::sqlite_schema::schema_up_to(1)).unwrap();
    let answer = format!(
        r#"{{"id":"{}","user":"u1","kind":"regular","status":"reserved","total_cents":1220,"lines":[{{"sku":"sku-1-1","qty":2,"price_cents":610}}],"created_ms":1,"expires_ms":9999999999999,"paid_via":null}}"#,
        first.id
    );
    c.execute_batch(&format!(
        r#"INSERT INTO shops(id, name) VALUES (1, 'S');
        INSERT INTO products(id, shop_id, name) VALUES (1, 1, 'P');
        INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
          VALUES ('sku-1-1', 1, 610, 10, 8, 2, 0);
        INSERT INTO orders(id, idem_key, fingerprint, user, kind, status, total_cents, created_ms, expires_ms,
                           updated_ms, answer)
          VALUES ('{id}', 'k', '{fp}', 'u1', 'regular', 'reserved', 1220, 1, 9999999999999, 1, '{answer}');
        INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id) VALUES ('{id}', 'sku-1-1', 2, 610, 1);
        INSERT INTO outbox(topic, order_id, created_ms, done) VALUES ('order.placed', '{id}', 1, 1);"#,
        id = first.id,
        fp = first.fingerprint,
    ))
    .unwrap();
    let schema = || -> (i64, String) {
        let version = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        let sql = c
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'orders'", [], |r| {
                r.get(0)
            })
            .unwrap();
        (version, sql)
    };
    assert!(schema().1.contains("idem_key TEXT UNIQUE"), "{}", schema().1);
    let s = open();
    let (version, sql) = schema();
    assert_eq!(version, super::sqlite_schema::VERSION);
    assert!(sql.contains("UNIQUE (user, idem_key)"), "{sql}");
    let id = first.id.clone();
    let replay = create(&s, first, true).unwrap();
    assert!(replay.replay);
    assert_eq!(replay.order.id, id);
    let other = create(
        &s,
        order("u2", Some("k"), OrderKind::Regular, "sku-1-1", 1, 60_000),
        true,
    )
    .unwrap();
    assert!(!other.replay);
    let r = assert_audit(&s);
    assert_eq!((r.totals.orders, r.totals.units_reserved), (2, 3));
}

/// SQLite only: a write that finds another process's lock waits for it (and commits once it is released),
/// and gives up with a retryable `Busy` at its own busy timeout rather than hanging.
#[test]
fn sqlite_write_waits_for_another_process_lock_up_to_its_busy_timeout() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let patient = SqliteStore::open(&path, Duration::from_secs(30), true).unwrap();
    let hasty = SqliteStore::open(&path, Duration::from_millis(150), false).unwrap();
    // Another process holding the write lock.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();

    let users = vec!["lock".to_string()];
    assert!(matches!(hasty.credit(&users, 5), Err(StoreError::Busy(_))));

    let waits = super::sqlite::LOCK_WAITS.load(Ordering::Relaxed);
    let writer = std::thread::spawn(move || patient.credit(&["lock".to_string()], 7).map(|()| patient));
    let deadline = Instant::now() + Duration::from_secs(10);
    while super::sqlite::LOCK_WAITS.load(Ordering::Relaxed) == waits {
        assert!(Instant::now() < deadline, "the write never waited for the lock");
        std::thread::yield_now();
    }
    holder.execute_batch("COMMIT").unwrap();
    let patient = writer.join().unwrap().unwrap();
    assert_eq!(patient.balance("user:lock").unwrap(), 7);
}

/// SQLite only: commits leave the write-ahead log to grow (no checkpoint inside a commit below the backstop)
/// and `maintain` copies it into the database file, so a commit never waits for that file's fsync.
#[test]
fn sqlite_commits_do_not_checkpoint_and_maintain_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let store = SqliteStore::open(&path, std::time::Duration::from_secs(10), true).unwrap();
    let db_len = || std::fs::metadata(&path).unwrap().len();
    // Start from a checkpointed file, so what follows is only this test's commits.
    store.maintain().unwrap();
    let before = db_len();
    // About 2,000 WAL pages: SQLite's default would have checkpointed twice inside these commits.
    for i in 0..400 {
        let users: Vec<String> = (0..20).map(|j| format!("wal-{i}-{j}")).collect();
        store.credit(&users, 1).unwrap();
    }
    let wal = std::fs::metadata(dir.path().join("x.db-wal")).unwrap().len();
    assert!(wal > 4 << 20, "the WAL holds the commits ({wal} bytes)");
    assert_eq!(
        db_len(),
        before,
        "no commit copied the WAL into the database file"
    );
    store.maintain().unwrap();
    assert!(
        db_len() > before,
        "maintain checkpointed the new pages into the file"
    );
    assert_eq!(store.balance("user:wal-399-19").unwrap(), 1);
}

/// SQLite only: a new database, and the write-ahead files SQLite makes beside it, are readable by their owner
/// alone (customers' orders and wallets); they were 0644, open to every user of the host. An existing file
/// keeps its mode.
#[test]
fn sqlite_database_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.db");
    let store = SqliteStore::open(&path, std::time::Duration::from_secs(10), true).unwrap();
    store.credit(&["perm".to_string()], 1).unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for name in ["x.db", "x.db-wal", "x.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    drop(store);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let store = SqliteStore::open(&path, std::time::Duration::from_secs(10), false).unwrap();
    assert_eq!(store.balance("user:perm").unwrap(), 1);
    assert_eq!(mode("x.db"), 0o640, "an existing file's mode is the operator's");
}

/// PostgreSQL only: an attempt under a key that is writing (on another instance: another handle) is told
/// apart from a key that holds nothing, so a retry a gate refuses is not told `sold_out` while it may
/// commit; once it has, its order is the answer.
#[test]
fn postgres_a_key_whose_attempt_is_writing_is_not_free() {
    let fx = PostgresFixture::new();
    let (writer, asker) = (fx.open(), fx.open());
    let attempt = order("u1", Some("k"), OrderKind::Regular, "sku-1-1", 1, 60_000);
    assert!(matches!(asker.keyed_answer(&attempt).unwrap(), Keyed::Free));
    // Another client holds the SKU's row: the attempt takes its key's lock first, then waits for the row.
    let mut blocker = ::postgres::Client::connect(&fx.0.url, ::postgres::NoTls).unwrap();
    let mut held = blocker.transaction().unwrap();
    held.execute("SELECT 1 FROM skus WHERE sku = 'sku-1-1' FOR UPDATE", &[])
        .unwrap();
    std::thread::scope(|sc| {
        let placed = sc.spawn(|| create(&writer, attempt.clone(), true));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match asker.keyed_answer(&attempt).unwrap() {
                Keyed::Writing => break,
                Keyed::Free if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                other => panic!("the attempt is waiting for the row: {other:?}"),
            }
        }
        held.rollback().unwrap();
        let first = placed.join().unwrap().unwrap();
        assert!(matches!(
            asker.keyed_answer(&attempt).unwrap(),
            Keyed::Stored(Ok(c)) if c.replay && c.order == first.order
        ));
    });
}

/// PostgreSQL only: reservations are timed by the server's clock, read at open and again by `sync_clock`,
/// not by this host's: a host whose clock runs ahead would expire other instances' reservations early and
/// refuse their payments as late.
#[test]
fn postgres_reservations_are_timed_by_the_servers_clock() {
    let fx = PostgresFixture::new();
    let s = fx.open();
    let clock = s.clock();
    let near = |clock: &crate::domain::Clock| clock.offset_ms().abs() < 1_000;
    assert!(
        near(&clock),
        "the server runs on this host: {}",
        clock.offset_ms()
    );
    s.credit(&["u1".to_string()], 10_000).unwrap();
    let held = create(
        &s,
        order("u1", None, OrderKind::Regular, "sku-1-1", 1, 60_000),
        true,
    )
    .unwrap()
    .order;
    // As the handle of a host whose clock runs two minutes ahead of the server's would time things.
    assert!(clock.set_from(0, 120_000, 0));
    assert!(matches!(
        s.pay_wallet(&held.id, true).unwrap(),
        Err(Reject::BadTransition { from: "expired", .. })
    ));
    s.sync_clock().unwrap();
    assert!(near(&s.clock()), "read again: {}", s.clock().offset_ms());
    assert_eq!(s.expire_due(s.clock().now_ms(), 100).unwrap().orders, 0);
    assert_eq!(s.pay_wallet(&held.id, true).unwrap().unwrap().status, "paid");
}
