//! PostgreSQL catalog reads, order transitions, the `SKIP LOCKED` reservation sweeper, merchant stock updates
//! and flash-sale buckets. Mirrors `sqlite_orders`, but for order creation (`postgres_create`); the
//! differences are the locks PostgreSQL needs because its writers run concurrently (see `postgres`).

use postgres::Row;

use super::postgres::Tx;
use super::{LineView, OrderView, Product, Restocked, Sku, StockUpdate, StoreError};
use crate::domain::{OrderStatus, Reject, Transition, now_ms};

use super::order_rules::{self, Res};

const SKU_COLUMNS: &str = "SELECT s.sku, s.price_cents, s.available, s.reserved, s.sold,
        COALESCE((SELECT SUM(b.available) FROM sku_buckets b WHERE b.sku = s.sku), 0)::BIGINT,
        EXISTS(SELECT 1 FROM sku_buckets b WHERE b.sku = s.sku), s.sale_seq FROM skus s";

fn sku_row(r: &Row) -> Sku {
    Sku {
        sku: r.get(0),
        price_cents: r.get(1),
        available: r.get(2),
        reserved: r.get(3),
        sold: r.get(4),
        bucketed: r.get(5),
        flash_sale: r.get(6),
        sale_seq: r.get(7),
    }
}

/// Products with id ≥ `from` (exactly `from` when `exact`).
pub fn list_products_from(
    t: &mut Tx<'_>,
    from: i64,
    limit: u32,
    exact: bool,
) -> Result<Vec<Product>, StoreError> {
    let sql = if exact {
        "SELECT id, shop_id, name FROM products WHERE id = $1 LIMIT $2"
    } else {
        "SELECT id, shop_id, name FROM products WHERE id >= $1 ORDER BY id LIMIT $2"
    };
    let rows = t.query(sql, &[&from, &i64::from(limit)])?;
    let mut products: Vec<Product> = rows
        .iter()
        .map(|r| Product {
            id: r.get(0),
            shop_id: r.get(1),
            name: r.get(2),
            skus: Vec::new(),
        })
        .collect();
    let sql = format!("{SKU_COLUMNS} WHERE s.product_id = $1 ORDER BY s.sku COLLATE \"C\"");
    for p in &mut products {
        p.skus = t.query(&sql, &[&p.id])?.iter().map(sku_row).collect();
    }
    Ok(products)
}

/// `user`'s orders, newest first, before `before` (`(created_ms, id)`), at most `limit`: two round trips, the
/// orders and then all their lines, whatever the page's size.
pub fn user_orders(
    t: &mut Tx<'_>,
    user: &str,
    before: Option<(i64, String)>,
    limit: u32,
) -> Result<Vec<OrderView>, StoreError> {
    let (ms, id) = before.unwrap_or((i64::MAX, String::new()));
    let mut orders: Vec<OrderView> = t
        .query(
            &format!(
                r#"SELECT {ORDER_COLUMNS} FROM orders WHERE "user" = $1 AND (created_ms < $2 OR (created_ms = $2 AND id < $3))
                 ORDER BY created_ms DESC, id DESC LIMIT $4"#
            ),
            &[&user, &ms, &id, &i64::from(limit)],
        )?
        .iter()
        .map(order_row)
        .collect();
    if orders.is_empty() {
        return Ok(orders);
    }
    let ids: Vec<&str> = orders.iter().map(|o| o.id.as_str()).collect();
    let lines: Vec<(String, LineView)> = t
        .query(
            "SELECT order_id, sku, qty, price_cents, refunded_qty, sale_seq FROM order_lines
             WHERE order_id = ANY($1) ORDER BY sku COLLATE \"C\"",
            &[&ids],
        )?
        .iter()
        .map(|r| {
            (
                r.get(0),
                LineView {
                    sku: r.get(1),
                    qty: r.get(2),
                    price_cents: r.get(3),
                    refunded_qty: r.get(4),
                    sale_seq: r.get(5),
                },
            )
        })
        .collect();
    order_rules::attach_lines(&mut orders, lines);
    Ok(orders)
}

/// The order view's columns, as `order_row` reads them.
const ORDER_COLUMNS: &str = r#"id, "user", kind, status, total_cents, created_ms, expires_ms, paid_via"#;

fn order_row(r: &Row) -> OrderView {
    OrderView {
        id: r.get(0),
        user: r.get(1),
        kind: r.get(2),
        status: r.get(3),
        total_cents: r.get(4),
        created_ms: r.get(5),
        expires_ms: r.get(6),
        paid_via: r.get(7),
        lines: Vec::new(),
        refunded_cents: 0,
    }
}

pub fn load_order(t: &mut Tx<'_>, id: &str) -> Result<Option<OrderView>, StoreError> {
    let row = t.opt(
        &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"),
        &[&id],
    )?;
    let Some(r) = row else { return Ok(None) };
    let lines = t
        .query(
            "SELECT sku, qty, price_cents, refunded_qty, sale_seq FROM order_lines WHERE order_id = $1
             ORDER BY sku COLLATE \"C\"",
            &[&id],
        )?
        .iter()
        .map(|l| LineView {
            sku: l.get(0),
            qty: l.get(1),
            price_cents: l.get(2),
            refunded_qty: l.get(3),
            sale_seq: l.get(4),
        })
        .collect();
    let mut order = OrderView {
        lines,
        ..order_row(&r)
    };
    order_rules::count_refunded(&mut order);
    Ok(Some(order))
}

/// Moves an order along `t` under its row lock; returns the state it left.
pub fn transition(t: &mut Tx<'_>, id: &str, tr: Transition) -> Res<(OrderStatus, OrderStatus)> {
    let status = t.opt("SELECT status FROM orders WHERE id = $1 FOR UPDATE", &[&id])?;
    let status: Option<String> = status.map(|r| r.get(0));
    let (from, to) = match order_rules::next_status(id, status.as_deref(), tr)? {
        Ok(step) => step,
        Err(r) => return Ok(Err(r)),
    };
    let n = t.exec(
        "UPDATE orders SET status = $3, updated_ms = $4 WHERE id = $1 AND status = $2",
        &[&id, &from.as_str(), &to.as_str(), &now_ms()],
    )?;
    if n != 1 {
        return Err(StoreError::Internal(format!(
            "order {id} changed under its row lock"
        )));
    }
    Ok(Ok((from, to)))
}

/// Locks an order's row for the rest of the transaction (so a read-then-transition cannot race).
pub fn lock_order(t: &mut Tx<'_>, id: &str) -> Result<(), StoreError> {
    t.exec("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", &[&id])?;
    Ok(())
}

/// Locks the SKU rows of orders `ids`' lines, by name. Every transaction that writes several SKU rows takes
/// them in that order before writing (an order group does too, `postgres_create`): an `UPDATE ... FROM` locks
/// them in the order its plan meets them, and two such writers (a sweep and a group, two payments, two
/// merchants' updates) locking the same rows in opposite orders deadlocked until the server broke one and
/// the store retried it, about a second later.
pub fn lock_skus_of(t: &mut Tx<'_>, ids: &[&str]) -> Result<(), StoreError> {
    t.exec(
        "SELECT 1 FROM skus WHERE sku IN (SELECT sku FROM order_lines WHERE order_id = ANY($1))
         ORDER BY sku COLLATE \"C\" FOR UPDATE",
        &[&ids],
    )?;
    Ok(())
}

/// Locks SKU rows `skus` by name (see [`lock_skus_of`]).
fn lock_skus(t: &mut Tx<'_>, skus: &[&str]) -> Result<(), StoreError> {
    t.exec(
        "SELECT 1 FROM skus WHERE sku = ANY($1) ORDER BY sku COLLATE \"C\" FOR UPDATE",
        &[&skus],
    )?;
    Ok(())
}

/// Moves an order's units between stock columns (e.g. `reserved` → `available`), its SKU rows locked by
/// name first.
pub fn move_stock(t: &mut Tx<'_>, id: &str, from_col: &str, to_col: &str) -> Result<(), StoreError> {
    lock_skus_of(t, &[id])?;
    move_locked_stock(t, id, from_col, to_col)
}

/// [`move_stock`] for a caller that holds the order's SKU rows already (the sweep locks a batch's at once).
fn move_locked_stock(t: &mut Tx<'_>, id: &str, from_col: &str, to_col: &str) -> Result<(), StoreError> {
    let sql = format!(
        "UPDATE skus SET {from_col} = skus.{from_col} - l.qty, {to_col} = skus.{to_col} + l.qty
         FROM order_lines l WHERE l.order_id = $1 AND l.sku = skus.sku"
    );
    t.exec(&sql, &[&id])?;
    Ok(())
}

/// Takes `qty` refunded units of `sku` out of `sold`: back on sale (`available`) when `restock`, else out of
/// the stock altogether (`received` shrinks too: the goods are with the buyer).
pub fn return_units(t: &mut Tx<'_>, sku: &str, qty: i64, restock: bool) -> Result<(), StoreError> {
    let sql = if restock {
        "UPDATE skus SET sold = sold - $2, available = available + $2 WHERE sku = $1"
    } else {
        "UPDATE skus SET sold = sold - $2, received = received - $2 WHERE sku = $1"
    };
    t.exec(sql, &[&sku, &qty])?;
    Ok(())
}

/// The lines of order `id` as a refund reads them (the caller holds the order's row lock).
pub fn refund_lines(t: &mut Tx<'_>, id: &str) -> Result<Vec<order_rules::RefundLine>, StoreError> {
    Ok(t.query(
        "SELECT sku, qty, refunded_qty, price_cents, shop_id FROM order_lines WHERE order_id = $1
             ORDER BY sku COLLATE \"C\"",
        &[&id],
    )?
    .iter()
    .map(|r| order_rules::RefundLine {
        sku: r.get(0),
        qty: r.get(1),
        refunded: r.get(2),
        price_cents: r.get(3),
        shop_id: r.get(4),
    })
    .collect())
}

fn view(t: &mut Tx<'_>, id: &str) -> Res<OrderView> {
    Ok(load_order(t, id)?.ok_or_else(|| Reject::NotFound {
        what: "order",
        id: id.into(),
    }))
}

pub fn cancel(t: &mut Tx<'_>, id: &str) -> Res<(OrderView, bool)> {
    match transition(t, id, Transition::Cancel)? {
        Ok((from, _)) => {
            if from.holds_reservation() {
                move_stock(t, id, "reserved", "available")?;
            }
            Ok(view(t, id)?.map(|v| (v, true)))
        }
        // Cancelling a cancelled order again is a replay: same answer, no second effect.
        Err(Reject::BadTransition {
            from: "cancelled", ..
        }) => Ok(view(t, id)?.map(|v| (v, false))),
        Err(r) => Ok(Err(r)),
    }
}

pub fn fulfil(t: &mut Tx<'_>, id: &str) -> Res<OrderView> {
    match transition(t, id, Transition::Fulfil)? {
        Ok(_) => view(t, id),
        Err(Reject::BadTransition {
            from: "fulfilled", ..
        }) => view(t, id),
        Err(r) => Ok(Err(r)),
    }
}

/// Expires due reservations. `SKIP LOCKED` lets sweepers in every instance take disjoint rows; the row lock
/// plus the conditional status update make each give its stock back exactly once.
pub fn expire_due(t: &mut Tx<'_>, now: i64, limit: u32) -> Result<super::Expired, StoreError> {
    let due: Vec<(String, String, String)> = t
        .query(
            r#"SELECT id, "user", kind FROM orders WHERE status = 'reserved' AND expires_ms <= $1
             ORDER BY expires_ms LIMIT $2 FOR UPDATE SKIP LOCKED"#,
            &[&now, &i64::from(limit)],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if due.is_empty() {
        return Ok(super::Expired::default());
    }
    // Every due order's SKU rows at once: one order's at a time would lock a later order's rows after an
    // earlier one's, in no set order.
    let ids: Vec<&str> = due.iter().map(|(id, ..)| id.as_str()).collect();
    lock_skus_of(t, &ids)?;
    let mut out = super::Expired::default();
    for (id, user, kind) in due {
        if transition(t, &id, Transition::Expire)?.is_ok() {
            move_locked_stock(t, &id, "reserved", "available")?;
            out.orders += 1;
            if kind == crate::domain::OrderKind::Seckill.as_str() {
                let lines = t.query(
                    "SELECT l.sku, COALESCE(l.sale_seq, s.sale_seq), l.qty FROM order_lines l
                     JOIN skus s ON s.sku = l.sku WHERE l.order_id = $1",
                    &[&id],
                )?;
                out.flash_sale.extend(lines.iter().map(|r| super::ExpiredLine {
                    user: user.clone(),
                    sku: r.get(0),
                    sale: r.get(1),
                    qty: r.get(2),
                }));
            } else {
                let lines = t.query("SELECT sku, qty FROM order_lines WHERE order_id = $1", &[&id])?;
                for r in &lines {
                    out.restock(r.get(0), r.get(1));
                }
            }
        }
    }
    Ok(out)
}

pub fn update_stock(t: &mut Tx<'_>, updates: &[StockUpdate]) -> Res<Vec<Sku>> {
    // Applied in the merchant's order, locked by name.
    let skus: Vec<&str> = updates.iter().map(|u| u.sku.as_str()).collect();
    lock_skus(t, &skus)?;
    let mut out = Vec::new();
    for u in updates {
        let change = i64::from(u.receive) - i64::from(u.write_off);
        let n = t.exec(
            "UPDATE skus SET received = received + $2, available = available + $2,
                price_cents = COALESCE($3, price_cents) WHERE sku = $1 AND available + $2 >= 0",
            &[&u.sku, &change, &u.price_cents],
        )?;
        if n != 1 {
            let available = t.opt("SELECT available FROM skus WHERE sku = $1", &[&u.sku])?;
            return Ok(Err(order_rules::stock_update_refused(
                u,
                available.map(|r| r.get(0)),
            )));
        }
        out.push(sku(t, &u.sku)?);
    }
    Ok(Ok(out))
}

/// `updates` under idempotency key `key`, once. Concurrent deliveries of one key queue on its advisory lock
/// (taken before the SKU rows, as order creation takes its keys first), so the second finds the first's
/// record, committed with its batch, instead of applying it again.
pub fn update_stock_once(t: &mut Tx<'_>, key: &str, updates: &[StockUpdate]) -> Res<Restocked> {
    t.lock_key(&format!("stock:{key}"))?;
    let fingerprint = order_rules::stock_fingerprint(updates);
    if let Some(row) = t.opt(
        "SELECT fingerprint, answer FROM stock_keys WHERE idem_key = $1",
        &[&key],
    )? {
        return order_rules::stock_replay(key, &fingerprint, row.get(0), row.get(1));
    }
    let skus = match update_stock(t, updates)? {
        Ok(skus) => skus,
        Err(refused) => return Ok(Err(refused)),
    };
    t.exec(
        "INSERT INTO stock_keys(idem_key, fingerprint, answer, created_ms) VALUES ($1, $2, $3, $4)",
        &[&key, &fingerprint, &order_rules::stock_answer(&skus)?, &now_ms()],
    )?;
    Ok(Ok(Restocked { skus, replay: false }))
}

fn sku(t: &mut Tx<'_>, id: &str) -> Result<Sku, StoreError> {
    Ok(sku_row(
        &t.one(&format!("{SKU_COLUMNS} WHERE s.sku = $1"), &[&id])?,
    ))
}

/// Splits a SKU's available stock evenly over `buckets` rows (adding to buckets that already exist). A SKU
/// with no buckets starts its next sale (`sale_seq` + 1, as `sqlite_orders::open_flash_sale`); the row lock
/// taken first keeps a concurrent open from numbering it twice.
pub fn open_flash_sale(t: &mut Tx<'_>, sku_id: &str, buckets: u32) -> Res<Sku> {
    let available = t.opt("SELECT available FROM skus WHERE sku = $1 FOR UPDATE", &[&sku_id])?;
    let Some(available) = available else {
        return Ok(Err(Reject::NotFound {
            what: "sku",
            id: sku_id.into(),
        }));
    };
    let available: i64 = available.get(0);
    t.exec(
        "UPDATE skus SET sale_seq = sale_seq + 1
         WHERE sku = $1 AND NOT EXISTS(SELECT 1 FROM sku_buckets WHERE sku = $1)",
        &[&sku_id],
    )?;
    let n = i64::from(buckets.max(1));
    for b in 0..n {
        let share = available / n + i64::from(b < available % n);
        t.exec(
            "INSERT INTO sku_buckets(sku, bucket, available) VALUES ($1, $2, $3)
             ON CONFLICT(sku, bucket) DO UPDATE SET available = sku_buckets.available + excluded.available",
            &[&sku_id, &b, &share],
        )?;
    }
    t.exec("UPDATE skus SET available = 0 WHERE sku = $1", &[&sku_id])?;
    Ok(Ok(sku(t, sku_id)?))
}

/// Ends `sku_id`'s flash sale under the SKU's row lock: what its buckets hold goes back to `available`.
pub fn close_flash_sale(t: &mut Tx<'_>, sku_id: &str) -> Res<Sku> {
    if t.opt("SELECT 1 FROM skus WHERE sku = $1 FOR UPDATE", &[&sku_id])?
        .is_none()
    {
        return Ok(Err(Reject::NotFound {
            what: "sku",
            id: sku_id.into(),
        }));
    }
    let bucketed: i64 = t
        .one(
            "WITH gone AS (DELETE FROM sku_buckets WHERE sku = $1 RETURNING available)
             SELECT COALESCE(SUM(available), 0)::BIGINT FROM gone",
            &[&sku_id],
        )?
        .get(0);
    t.exec(
        "UPDATE skus SET available = available + $2 WHERE sku = $1",
        &[&sku_id, &bucketed],
    )?;
    Ok(Ok(sku(t, sku_id)?))
}
