//! Catalog reads, order creation (the conditional stock decrement, the order row and its outbox row in one
//! transaction), order transitions that move stock, the reservation sweeper, and merchant stock updates.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Created, LineView, OrderView, Product, Restocked, Sku, StockUpdate, StoreError};
use crate::domain::{NewOrder, OrderKind, OrderStatus, Reject, Transition, now_ms};

use super::order_rules::{self, Res};

/// The SKU view's columns (`sku_row` reads them) with the query's own tail.
macro_rules! sku_select {
    ($tail:literal) => {
        concat!(
            "SELECT s.sku, s.price_cents, s.available, s.reserved, s.sold,
                    COALESCE((SELECT SUM(b.available) FROM sku_buckets b WHERE b.sku = s.sku), 0),
                    EXISTS(SELECT 1 FROM sku_buckets b WHERE b.sku = s.sku), s.sale_seq
             FROM skus s ",
            $tail
        )
    };
}

fn sku_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sku> {
    Ok(Sku {
        sku: r.get(0)?,
        price_cents: r.get(1)?,
        available: r.get(2)?,
        reserved: r.get(3)?,
        sold: r.get(4)?,
        bucketed: r.get(5)?,
        flash_sale: r.get(6)?,
        sale_seq: r.get(7)?,
    })
}

pub fn list_products(c: &Connection, after: i64, limit: u32) -> Result<Vec<Product>, StoreError> {
    list_products_from(c, after.saturating_add(1), limit, false)
}

/// Products with id ≥ `from` (exactly `from` when `exact`).
pub fn list_products_from(
    c: &Connection,
    from: i64,
    limit: u32,
    exact: bool,
) -> Result<Vec<Product>, StoreError> {
    let sql = if exact {
        "SELECT id, shop_id, name FROM products WHERE id = ?1 LIMIT ?2"
    } else {
        "SELECT id, shop_id, name FROM products WHERE id >= ?1 ORDER BY id LIMIT ?2"
    };
    let mut stmt = c.prepare_cached(sql)?;
    let mut products: Vec<Product> = stmt
        .query_map(params![from, limit], |r| {
            Ok(Product {
                id: r.get(0)?,
                shop_id: r.get(1)?,
                name: r.get(2)?,
                skus: Vec::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut skus = c.prepare_cached(sku_select!("WHERE s.product_id = ?1 ORDER BY s.sku"))?;
    for p in &mut products {
        p.skus = skus.query_map([p.id], sku_row)?.collect::<Result<_, _>>()?;
    }
    Ok(products)
}

/// The order view's columns, as `order_row` reads them.
const ORDER_COLUMNS: &str = "id, user, kind, status, total_cents, created_ms, expires_ms, paid_via";

fn order_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OrderView> {
    Ok(OrderView {
        id: r.get(0)?,
        user: r.get(1)?,
        kind: r.get(2)?,
        status: r.get(3)?,
        total_cents: r.get(4)?,
        created_ms: r.get(5)?,
        expires_ms: r.get(6)?,
        paid_via: r.get(7)?,
        lines: Vec::new(),
        refunded_cents: 0,
    })
}

pub fn load_order(c: &Connection, id: &str) -> Result<Option<OrderView>, StoreError> {
    let order = c
        .prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?1"))?
        .query_row([id], order_row)
        .optional()?;
    let Some(mut order) = order else { return Ok(None) };
    order.lines = lines(c, id)?;
    order_rules::count_refunded(&mut order);
    Ok(Some(order))
}

/// `user`'s orders, newest first, before `before` (`(created_ms, id)`), at most `limit`: two queries, the
/// orders and then all their lines, whatever the page's size.
pub fn user_orders(
    c: &Connection,
    user: &str,
    before: Option<(i64, String)>,
    limit: u32,
) -> Result<Vec<OrderView>, StoreError> {
    let (ms, id) = before.unwrap_or((i64::MAX, String::new()));
    let mut orders: Vec<OrderView> = c
        .prepare_cached(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE user = ?1 AND (created_ms < ?2 OR (created_ms = ?2 AND id < ?3))
             ORDER BY created_ms DESC, id DESC LIMIT ?4"
        ))?
        .query_map(params![user, ms, id, limit], order_row)?
        .collect::<Result<_, _>>()?;
    if orders.is_empty() {
        return Ok(orders);
    }
    // Read in the caller's transaction with the orders (`Store::user_orders`): a refund committed between
    // the two reads showed an order `paid` with every line refunded.
    let marks = vec!["?"; orders.len()].join(",");
    let lines: Vec<(String, LineView)> = c
        .prepare(&format!(
            "SELECT order_id, sku, qty, price_cents, refunded_qty, sale_seq FROM order_lines
             WHERE order_id IN ({marks}) ORDER BY sku"
        ))?
        .query_map(rusqlite::params_from_iter(orders.iter().map(|o| &o.id)), |r| {
            Ok((
                r.get(0)?,
                LineView {
                    sku: r.get(1)?,
                    qty: r.get(2)?,
                    price_cents: r.get(3)?,
                    refunded_qty: r.get(4)?,
                    sale_seq: r.get(5)?,
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    order_rules::attach_lines(&mut orders, lines);
    Ok(orders)
}

fn lines(c: &Connection, id: &str) -> Result<Vec<LineView>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT sku, qty, price_cents, refunded_qty, sale_seq FROM order_lines WHERE order_id = ?1 ORDER BY sku",
    )?;
    Ok(stmt
        .query_map([id], |r| {
            Ok(LineView {
                sku: r.get(0)?,
                qty: r.get(1)?,
                price_cents: r.get(2)?,
                refunded_qty: r.get(3)?,
                sale_seq: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// Creates each order under its own savepoint inside the caller's transaction.
pub fn create_orders(
    tx: &Transaction<'_>,
    orders: &[NewOrder],
    inline_weak: bool,
) -> Result<Vec<Result<Created, Reject>>, StoreError> {
    let mut out = Vec::with_capacity(orders.len());
    for o in orders {
        tx.execute_batch("SAVEPOINT new_order")?;
        match create_one(tx, o, inline_weak) {
            Ok(Ok(created)) => {
                tx.execute_batch("RELEASE new_order")?;
                out.push(Ok(created));
            }
            Ok(Err(reject)) => {
                tx.execute_batch("ROLLBACK TO new_order; RELEASE new_order")?;
                out.push(Err(reject));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The answer of the order stored under `o`'s idempotency key, if any ([`super::Store::keyed_answer`]).
pub fn keyed_answer(c: &Connection, o: &NewOrder) -> Result<Option<Result<Created, Reject>>, StoreError> {
    let Some(key) = &o.idem_key else {
        return Ok(None);
    };
    let prior: Option<(String, String)> = c
        .prepare_cached("SELECT fingerprint, answer FROM orders WHERE user = ?1 AND idem_key = ?2")?
        .query_row([&o.user, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    prior
        .map(|(fp, answer)| order_rules::replay(key, o, &fp, &answer))
        .transpose()
}

fn create_one(tx: &Transaction<'_>, o: &NewOrder, inline_weak: bool) -> Res<Created> {
    if let Some(answer) = keyed_answer(tx, o)? {
        return Ok(answer);
    }
    if o.kind == OrderKind::Seckill {
        for l in &o.lines {
            let bought: i64 = tx
                .prepare_cached(
                    // Refunded units count no more than a refunded order's do; units of an earlier sale of the
                    // SKU not at all (`sale_of`). An unknown SKU counts nothing and is refused below. A
                    // flash-sale line with no number came from an instance of the build before, still running
                    // in a rolling upgrade: counted in this sale, so the upgrade cannot sell past the limit.
                    "SELECT COALESCE(SUM(l.qty - l.refunded_qty), 0) FROM orders o JOIN order_lines l ON l.order_id = o.id
                     JOIN skus s ON s.sku = l.sku AND COALESCE(l.sale_seq, s.sale_seq) = s.sale_seq
                     WHERE o.user = ?1 AND o.kind = 'seckill' AND l.sku = ?2
                       AND o.status IN ('reserved', 'paid', 'fulfilled')",
                )?
                .query_row(params![o.user, l.sku], |r| r.get(0))?;
            if let Some(r) = order_rules::over_limit(o, l, bought) {
                // An unknown SKU (it counts nothing) is refused below as not found, not as over a limit.
                let known = bought > 0
                    || (tx.prepare_cached("SELECT 1 FROM skus WHERE sku = ?1")?).exists([&l.sku])?;
                if known {
                    return Ok(Err(r));
                }
            }
        }
    }
    let mut views = Vec::with_capacity(o.lines.len());
    let mut shops = Vec::with_capacity(o.lines.len());
    let mut total = 0i64;
    for l in &o.lines {
        let qty = i64::from(l.qty);
        let info: Option<(i64, i64, i64)> = tx
            .prepare_cached(
                "SELECT s.price_cents, p.shop_id, s.sale_seq FROM skus s JOIN products p ON p.id = s.product_id
                 WHERE s.sku = ?1",
            )?
            .query_row([&l.sku], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((price, shop, sale_seq)) = info else {
            return Ok(Err(Reject::NotFound {
                what: "sku",
                id: l.sku.clone(),
            }));
        };
        if let Err(r) = reserve_stock(tx, o.kind, &l.sku, qty)? {
            return Ok(Err(r));
        }
        total += price * qty;
        shops.push(shop);
        views.push(LineView {
            sku: l.sku.clone(),
            qty,
            price_cents: price,
            refunded_qty: 0,
            sale_seq: order_rules::sale_of(o.kind, sale_seq),
        });
    }
    let (view, answer) = order_rules::reserved(o, &views, total)?;
    tx.prepare_cached(
        "INSERT INTO orders(id, idem_key, fingerprint, user, kind, status, total_cents, created_ms, expires_ms,
                            paid_via, updated_ms, answer)
         VALUES (?1, ?2, ?3, ?4, ?5, 'reserved', ?6, ?7, ?8, NULL, ?7, ?9)",
    )?
    .execute(params![o.id, o.idem_key, o.fingerprint, o.user, o.kind.as_str(), total, o.created_ms, o.expires_ms, answer])?;
    for (l, shop) in views.iter().zip(&shops) {
        tx.prepare_cached(
            "INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id, sale_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![o.id, l.sku, l.qty, l.price_cents, shop, l.sale_seq])?;
    }
    super::sqlite_money::enqueue(tx, "order.placed", &o.id, inline_weak)?;
    Ok(Ok(Created {
        order: view,
        replay: false,
    }))
}

/// The conditional decrement: never below zero. A flash-sale SKU takes from one of its buckets first (a
/// random start, so concurrent buyers spread over rows in a store with row locks), then from `available`, and
/// when no one row holds `qty`, from several buckets and the shelf together. An ordinary order for a SKU
/// whose flash sale is open is refused: it would buy past the per-user limit.
fn reserve_stock(
    tx: &Transaction<'_>,
    kind: OrderKind,
    sku: &str,
    qty: i64,
) -> Result<Result<(), Reject>, StoreError> {
    if kind == OrderKind::Regular && on_flash_sale(tx, sku)? {
        return Ok(Err(Reject::OnFlashSale { sku: sku.into() }));
    }
    if kind == OrderKind::Seckill {
        let start = i64::from(rand::random::<u8>() % 64);
        let took = tx
            .prepare_cached(
                "UPDATE sku_buckets SET available = available - ?2
                 WHERE sku = ?1 AND available >= ?2 AND bucket = (
                   SELECT bucket FROM sku_buckets WHERE sku = ?1 AND available >= ?2
                   ORDER BY (bucket - ?3 + 64) % 64 LIMIT 1)",
            )?
            .execute(params![sku, qty, start])?;
        if took == 1 {
            tx.prepare_cached("UPDATE skus SET reserved = reserved + ?2 WHERE sku = ?1")?
                .execute(params![sku, qty])?;
            return Ok(Ok(()));
        }
    }
    let took = tx
        .prepare_cached(
            "UPDATE skus SET available = available - ?2, reserved = reserved + ?2 WHERE sku = ?1 AND available >= ?2",
        )?
        .execute(params![sku, qty])?;
    if took == 1 {
        return Ok(Ok(()));
    }
    let available: i64 = tx
        .prepare_cached("SELECT available FROM skus WHERE sku = ?1")?
        .query_row([sku], |r| r.get(0))?;
    if kind == OrderKind::Seckill {
        // The write lock is held: what the buckets hold now is what the takes below find.
        let buckets: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT bucket, available FROM sku_buckets WHERE sku = ?1 AND available > 0 ORDER BY bucket",
            )?
            .query_map([sku], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let plan = match order_rules::gather(sku, &buckets, available, qty) {
            Ok(plan) => plan,
            Err(r) => return Ok(Err(r)),
        };
        for (bucket, take) in plan.buckets {
            tx.prepare_cached(
                "UPDATE sku_buckets SET available = available - ?3 WHERE sku = ?1 AND bucket = ?2",
            )?
            .execute(params![sku, bucket, take])?;
        }
        tx.prepare_cached(
            "UPDATE skus SET available = available - ?2, reserved = reserved + ?3 WHERE sku = ?1",
        )?
        .execute(params![sku, plan.shelf, qty])?;
        return Ok(Ok(()));
    }
    Ok(Err(order_rules::short_of_stock(sku, available, qty)))
}

/// Whether `sku`'s flash sale is open: it has buckets from `open_flash_sale` that `close_flash_sale` has not
/// taken away.
fn on_flash_sale(c: &Connection, sku: &str) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT EXISTS(SELECT 1 FROM sku_buckets WHERE sku = ?1)")?
            .query_row([sku], |r| r.get(0))?,
    )
}

/// Moves an order along `t` with a conditional update; returns the state it left.
pub fn transition(tx: &Transaction<'_>, id: &str, t: Transition) -> Res<(OrderStatus, OrderStatus)> {
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM orders WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let (from, to) = match order_rules::next_status(id, status.as_deref(), t)? {
        Ok(step) => step,
        Err(r) => return Ok(Err(r)),
    };
    let n = tx
        .prepare_cached("UPDATE orders SET status = ?3, updated_ms = ?4 WHERE id = ?1 AND status = ?2")?
        .execute(params![id, from.as_str(), to.as_str(), now_ms()])?;
    if n != 1 {
        return Err(StoreError::Internal(format!(
            "order {id} changed under a write lock"
        )));
    }
    Ok(Ok((from, to)))
}

/// Moves an order's units between stock columns (e.g. `reserved` → `available`).
pub fn move_stock(tx: &Transaction<'_>, id: &str, from_col: &str, to_col: &str) -> Result<(), StoreError> {
    let sql = format!(
        "UPDATE skus SET {from_col} = {from_col} - l.qty, {to_col} = {to_col} + l.qty
         FROM order_lines l WHERE l.order_id = ?1 AND l.sku = skus.sku"
    );
    tx.prepare_cached(&sql)?.execute([id])?;
    Ok(())
}

/// Takes `qty` refunded units of `sku` out of `sold`: back on sale (`available`) when `restock`, else out of
/// the stock altogether (`received` shrinks too: the goods are with the buyer).
pub fn return_units(tx: &Transaction<'_>, sku: &str, qty: i64, restock: bool) -> Result<(), StoreError> {
    let sql = if restock {
        "UPDATE skus SET sold = sold - ?2, available = available + ?2 WHERE sku = ?1"
    } else {
        "UPDATE skus SET sold = sold - ?2, received = received - ?2 WHERE sku = ?1"
    };
    tx.prepare_cached(sql)?.execute(params![sku, qty])?;
    Ok(())
}

/// The lines of order `id` as a refund reads them.
pub fn refund_lines(tx: &Transaction<'_>, id: &str) -> Result<Vec<order_rules::RefundLine>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT sku, qty, refunded_qty, price_cents, shop_id FROM order_lines WHERE order_id = ?1 ORDER BY sku",
        )?
        .query_map([id], |r| {
            Ok(order_rules::RefundLine {
                sku: r.get(0)?,
                qty: r.get(1)?,
                refunded: r.get(2)?,
                price_cents: r.get(3)?,
                shop_id: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

fn view(tx: &Transaction<'_>, id: &str) -> Res<OrderView> {
    Ok(load_order(tx, id)?.ok_or_else(|| Reject::NotFound {
        what: "order",
        id: id.into(),
    }))
}

pub fn cancel(tx: &Transaction<'_>, id: &str) -> Res<(OrderView, bool)> {
    match transition(tx, id, Transition::Cancel)? {
        Ok((from, _)) => {
            if from.holds_reservation() {
                move_stock(tx, id, "reserved", "available")?;
            }
            Ok(view(tx, id)?.map(|v| (v, true)))
        }
        // Cancelling a cancelled order again is a replay: same answer, no second effect.
        Err(Reject::BadTransition {
            from: "cancelled", ..
        }) => Ok(view(tx, id)?.map(|v| (v, false))),
        Err(r) => Ok(Err(r)),
    }
}

pub fn fulfil(tx: &Transaction<'_>, id: &str) -> Res<OrderView> {
    match transition(tx, id, Transition::Fulfil)? {
        Ok(_) => view(tx, id),
        Err(Reject::BadTransition {
            from: "fulfilled", ..
        }) => view(tx, id),
        Err(r) => Ok(Err(r)),
    }
}

/// Expires due reservations; the conditional status update makes each give its stock back exactly once,
/// however many sweepers (in however many processes) race.
pub fn expire_due(tx: &Transaction<'_>, now: i64, limit: u32) -> Result<super::Expired, StoreError> {
    let due: Vec<(String, String, String)> = tx
        .prepare_cached(
            r#"SELECT id, "user", kind FROM orders WHERE status = 'reserved' AND expires_ms <= ?1
               ORDER BY expires_ms LIMIT ?2"#,
        )?
        .query_map(params![now, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = super::Expired::default();
    for (id, user, kind) in due {
        if transition(tx, &id, Transition::Expire)?.is_ok() {
            move_stock(tx, &id, "reserved", "available")?;
            out.orders += 1;
            if kind == OrderKind::Seckill.as_str() {
                let lines = tx
                    .prepare_cached(
                        "SELECT l.sku, COALESCE(l.sale_seq, s.sale_seq), l.qty FROM order_lines l
                         JOIN skus s ON s.sku = l.sku WHERE l.order_id = ?1",
                    )?
                    .query_map([&id], |r| {
                        Ok(super::ExpiredLine {
                            user: user.clone(),
                            sku: r.get(0)?,
                            sale: r.get(1)?,
                            qty: r.get(2)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                out.flash_sale.extend(lines);
            } else {
                let lines = tx
                    .prepare_cached("SELECT sku, qty FROM order_lines WHERE order_id = ?1")?
                    .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                for (sku, qty) in lines {
                    out.restock(sku, qty);
                }
            }
        }
    }
    Ok(out)
}

pub fn update_stock(tx: &Transaction<'_>, updates: &[StockUpdate]) -> Res<Vec<Sku>> {
    let mut out = Vec::new();
    for u in updates {
        let change = i64::from(u.receive) - i64::from(u.write_off);
        let n = tx
            .prepare_cached(
                "UPDATE skus SET received = received + ?2, available = available + ?2,
                    price_cents = COALESCE(?3, price_cents) WHERE sku = ?1 AND available + ?2 >= 0",
            )?
            .execute(params![u.sku, change, u.price_cents])?;
        if n != 1 {
            let available: Option<i64> = tx
                .prepare_cached("SELECT available FROM skus WHERE sku = ?1")?
                .query_row([&u.sku], |r| r.get(0))
                .optional()?;
            return Ok(Err(order_rules::stock_update_refused(u, available)));
        }
        out.push(sku(tx, &u.sku)?);
    }
    Ok(Ok(out))
}

/// `updates` under idempotency key `key`, once: the writer's lock (`BEGIN IMMEDIATE`) is held from the key's
/// lookup to the commit of the batch with its record, so a concurrent retry waits and then finds the record.
pub fn update_stock_once(tx: &Transaction<'_>, key: &str, updates: &[StockUpdate]) -> Res<Restocked> {
    let fingerprint = order_rules::stock_fingerprint(updates);
    let stored: Option<(String, String)> = tx
        .prepare_cached("SELECT fingerprint, answer FROM stock_keys WHERE idem_key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((stored_fingerprint, answer)) = stored {
        return order_rules::stock_replay(key, &fingerprint, &stored_fingerprint, &answer);
    }
    let skus = match update_stock(tx, updates)? {
        Ok(skus) => skus,
        Err(refused) => return Ok(Err(refused)),
    };
    tx.prepare_cached(
        "INSERT INTO stock_keys(idem_key, fingerprint, answer, created_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        key,
        fingerprint,
        order_rules::stock_answer(&skus)?,
        now_ms()
    ])?;
    Ok(Ok(Restocked { skus, replay: false }))
}

fn sku(c: &Connection, sku: &str) -> Result<Sku, StoreError> {
    Ok(c.prepare_cached(sku_select!("WHERE s.sku = ?1"))?
        .query_row([sku], sku_row)?)
}

/// Splits a SKU's available stock evenly over `buckets` rows (adding to buckets that already exist). A SKU
/// with no buckets starts its next sale (`sale_seq` + 1), so the per-user limit counts afresh; an open one
/// only gets the stock, and its buyers' units still count.
pub fn open_flash_sale(tx: &Transaction<'_>, sku_id: &str, buckets: u32) -> Res<Sku> {
    let available: Option<i64> = tx
        .prepare_cached("SELECT available FROM skus WHERE sku = ?1")?
        .query_row([sku_id], |r| r.get(0))
        .optional()?;
    let Some(available) = available else {
        return Ok(Err(Reject::NotFound {
            what: "sku",
            id: sku_id.into(),
        }));
    };
    tx.prepare_cached(
        "UPDATE skus SET sale_seq = sale_seq + 1
         WHERE sku = ?1 AND NOT EXISTS(SELECT 1 FROM sku_buckets WHERE sku = ?1)",
    )?
    .execute([sku_id])?;
    let n = i64::from(buckets.max(1));
    for b in 0..n {
        let share = available / n + i64::from(b < available % n);
        tx.prepare_cached(
            "INSERT INTO sku_buckets(sku, bucket, available) VALUES (?1, ?2, ?3)
             ON CONFLICT(sku, bucket) DO UPDATE SET available = available + excluded.available",
        )?
        .execute(params![sku_id, b, share])?;
    }
    tx.prepare_cached("UPDATE skus SET available = 0 WHERE sku = ?1")?
        .execute([sku_id])?;
    Ok(Ok(sku(tx, sku_id)?))
}

/// Ends `sku_id`'s flash sale: what its buckets hold goes back to `available`, and the buckets go.
pub fn close_flash_sale(tx: &Transaction<'_>, sku_id: &str) -> Res<Sku> {
    let bucketed: Option<i64> = tx
        .prepare_cached(
            "SELECT COALESCE((SELECT SUM(b.available) FROM sku_buckets b WHERE b.sku = s.sku), 0)
             FROM skus s WHERE s.sku = ?1",
        )?
        .query_row([sku_id], |r| r.get(0))
        .optional()?;
    let Some(bucketed) = bucketed else {
        return Ok(Err(Reject::NotFound {
            what: "sku",
            id: sku_id.into(),
        }));
    };
    tx.prepare_cached("DELETE FROM sku_buckets WHERE sku = ?1")?
        .execute([sku_id])?;
    tx.prepare_cached("UPDATE skus SET available = available + ?2 WHERE sku = ?1")?
        .execute(params![sku_id, bucketed])?;
    Ok(Ok(sku(tx, sku_id)?))
}
