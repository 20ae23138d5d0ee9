//! Money: wallet payments, provider callbacks, refunds, wallet credits and merchant settlement, all posted to
//! a double-entry ledger (every transaction's entries sum to zero; an account's balance is the sum of its
//! entries). Also the durable outbox and its idempotent effects (loyalty points, notifications).
//!
//! Balance checks run under the `BEGIN IMMEDIATE` write lock, so check-then-debit cannot race here; a
//! PostgreSQL store does the same with a conditional `UPDATE ... WHERE balance >= $n`.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::sqlite_orders::{load_order, move_stock, refund_lines, return_units, transition};
use super::{OrderView, PaymentCallback, RefundRequest, Refunded, Settlement, StoreError};
use crate::domain::{Cents, OrderStatus, Reject, Transition, now_ms};

use super::order_rules::{self, PriorPayment, RefundDone, RefundEvent, Res};

/// Posts one ledger transaction; `(kind, reference)` is unique, so a replay cannot post twice.
fn post(
    tx: &Transaction<'_>,
    kind: &str,
    reference: &str,
    entries: &[(String, Cents)],
) -> Result<(), StoreError> {
    let sum: Cents = entries.iter().map(|(_, a)| a).sum();
    if sum != 0 {
        return Err(StoreError::Internal(format!(
            "ledger {kind}/{reference} does not balance: {sum}"
        )));
    }
    tx.prepare_cached("INSERT INTO ledger_tx(kind, ref, created_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![kind, reference, now_ms()])?;
    let id = tx.last_insert_rowid();
    for (account, amount) in entries {
        tx.prepare_cached("INSERT INTO ledger_entries(tx_id, account, amount) VALUES (?1, ?2, ?3)")?
            .execute(params![id, account, amount])?;
        tx.prepare_cached(
            "INSERT INTO accounts(account, balance) VALUES (?1, ?2)
             ON CONFLICT(account) DO UPDATE SET balance = balance + excluded.balance",
        )?
        .execute(params![account, amount])?;
    }
    Ok(())
}

pub fn balance(c: &Connection, account: &str) -> Result<Cents, StoreError> {
    Ok(
        c.prepare_cached("SELECT balance FROM accounts WHERE account = ?1")?
            .query_row([account], |r| r.get(0))
            .optional()?
            .unwrap_or(0),
    )
}

/// What each shop is owed for an order.
fn shop_shares(tx: &Transaction<'_>, order_id: &str) -> Result<Vec<(String, Cents)>, StoreError> {
    Ok(tx
        .prepare_cached("SELECT shop_id, SUM(qty * price_cents) FROM order_lines WHERE order_id = ?1 GROUP BY shop_id ORDER BY shop_id")?
        .query_map([order_id], |r| Ok((order_rules::shop(r.get(0)?), r.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

fn order(tx: &Transaction<'_>, id: &str) -> Res<OrderView> {
    Ok(load_order(tx, id)?.ok_or_else(|| Reject::NotFound {
        what: "order",
        id: id.into(),
    }))
}

/// Pays a reserved order, from the wallet (`via = None`) or from the provider.
pub fn pay(
    tx: &Transaction<'_>,
    id: &str,
    via: Option<&PaymentCallback>,
    inline_weak: bool,
) -> Res<OrderView> {
    let o = match order(tx, id)? {
        Ok(o) => o,
        Err(r) => return Ok(Err(r)),
    };
    if let Some(answer) = order_rules::before_pay(&o, via, now_ms()) {
        return Ok(answer);
    }
    if let Err(r) = transition(tx, id, Transition::Pay)? {
        return Ok(Err(r));
    }
    let (payer, method) = order_rules::payer(&o, via);
    if via.is_none() {
        let have = balance(tx, &payer)?;
        if let Some(r) = order_rules::short_of_funds(&payer, have, o.total_cents) {
            return Ok(Err(r));
        }
    }
    let mut entries = vec![(payer, -o.total_cents)];
    entries.extend(shop_shares(tx, id)?);
    post(tx, "pay", id, &entries)?;
    move_stock(tx, id, "reserved", "sold")?;
    tx.prepare_cached("UPDATE orders SET paid_via = ?2 WHERE id = ?1")?
        .execute(params![id, method])?;
    enqueue(tx, "order.paid", id, inline_weak)?;
    order(tx, id)
}

/// A provider callback; `payment_id` makes it idempotent.
pub fn callback(tx: &Transaction<'_>, cb: &PaymentCallback, inline_weak: bool) -> Res<OrderView> {
    let prior: Option<(String, String, Cents)> = tx
        .prepare_cached("SELECT order_id, status, amount_cents FROM payments WHERE payment_id = ?1")?
        .query_row([&cb.payment_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    match prior.map(|(order_id, status, amount)| order_rules::prior_payment(cb, &order_id, &status, amount)) {
        Some(PriorPayment::Conflict(r)) => return Ok(Err(r)),
        Some(PriorPayment::Replay) => return order(tx, &cb.order_id),
        Some(PriorPayment::Succeeded) => {
            tx.prepare_cached("UPDATE payments SET status = ?2, amount_cents = ?3 WHERE payment_id = ?1")?
                .execute(params![cb.payment_id, cb.status, cb.amount_cents])?;
        }
        None => {
            tx.prepare_cached("INSERT INTO payments(payment_id, order_id, status, amount_cents, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![cb.payment_id, cb.order_id, cb.status, cb.amount_cents, now_ms()])?;
            if cb.status == "failed" {
                // The reservation stays until the buyer retries or the sweeper expires it.
                return order(tx, &cb.order_id);
            }
        }
    }
    match pay(tx, &cb.order_id, Some(cb), inline_weak)? {
        Err(r) if order_rules::cannot_take_payment(&r) => {
            tx.prepare_cached("UPDATE payments SET status = ?2 WHERE payment_id = ?1")?
                .execute(params![cb.payment_id, order_rules::REFUND_DUE])?;
            tracing::warn!(
                payment = %cb.payment_id, order = %cb.order_id, refusal = ?r,
                "a provider's payment reached an order that cannot take it: kept as refund_due"
            );
            order(tx, &cb.order_id)
        }
        other => Ok(other),
    }
}

/// Refunds the units `r` names (all left when none) under the write lock: one ledger posting under the
/// refund's own reference, the units back on sale (unshipped) or out of the stock (fulfilled), the lines'
/// `refunded_qty`, a `refunds` row (with the key and the answer a replay gives) and its outbox row.
pub fn refund(tx: &Transaction<'_>, r: &RefundRequest, inline_weak: bool) -> Res<Refunded> {
    let id = r.order_id.as_str();
    let o = match order(tx, id)? {
        Ok(o) => o,
        Err(rej) => return Ok(Err(rej)),
    };
    if let Some(key) = &r.idem_key {
        let prior: Option<(String, Option<String>)> = tx
            .prepare_cached("SELECT fingerprint, answer FROM refunds WHERE order_id = ?1 AND idem_key = ?2")?
            .query_row(params![id, key], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((fp, answer)) = prior {
            return order_rules::refund_replay(key, &r.fingerprint, &fp, answer.as_deref());
        }
    }
    let refunded = o.status == OrderStatus::Refunded.as_str();
    if !refunded && let Err(rej) = order_rules::next_status(id, Some(&o.status), Transition::Refund)? {
        return Ok(Err(rej));
    }
    let plan = match order_rules::plan_refund(id, &refund_lines(tx, id)?, r.lines.as_deref()) {
        Ok(plan) => plan,
        Err(rej) => return Ok(Err(rej)),
    };
    if plan.take.is_empty() {
        // A full refund of a refunded order: the same answer, nothing posted (and the key not spent).
        return Ok(Ok(Refunded {
            order: o,
            replay: false,
            restocked: Vec::new(),
        }));
    }
    let n: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(n), 0) + 1 FROM refunds WHERE order_id = ?1")?
        .query_row([id], |row| row.get(0))?;
    let reference = order_rules::refund_ref(id, n);
    post(tx, "refund", &reference, &order_rules::refund_entries(&o, &plan))?;
    // Goods not shipped come back on sale; shipped ones stay with the buyer.
    let restock = order_rules::refund_restocks(&o);
    for (sku, qty) in &plan.take {
        return_units(tx, sku, *qty, restock)?;
        tx.prepare_cached(
            "UPDATE order_lines SET refunded_qty = refunded_qty + ?3 WHERE order_id = ?1 AND sku = ?2",
        )?
        .execute(params![id, sku, qty])?;
    }
    if plan.completes
        && let Err(rej) = transition(tx, id, Transition::Refund)?
    {
        return Ok(Err(rej));
    }
    let view = match order(tx, id)? {
        Ok(v) => v,
        Err(rej) => return Ok(Err(rej)),
    };
    let answer = serde_json::to_string(&view).map_err(|e| StoreError::Internal(e.to_string()))?;
    tx.prepare_cached(
        "INSERT INTO refunds(order_id, n, idem_key, fingerprint, amount_cents, ledger_ref, answer, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![id, n, r.idem_key, r.fingerprint, plan.amount, reference, answer, now_ms()])?;
    for (sku, qty) in &plan.take {
        tx.prepare_cached("INSERT INTO refund_lines(order_id, n, sku, qty) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![id, n, sku, qty])?;
    }
    let topic = if plan.completes {
        "order.refunded".to_string()
    } else {
        order_rules::refund_part_topic(n)
    };
    enqueue(tx, &topic, id, inline_weak)?;
    let restocked = match restock {
        true => plan.take,
        false => Vec::new(),
    };
    Ok(Ok(Refunded {
        order: view,
        replay: false,
        restocked,
    }))
}

pub fn credit(tx: &Transaction<'_>, users: &[String], amount: Cents) -> Result<(), StoreError> {
    let (entries, reference) = order_rules::credit_entries(users, amount);
    post(tx, "credit", &reference, &entries)
}

/// A credit sent with idempotency key `key`: `Ok(true)` when it was posted before (a replay).
pub fn credit_once(tx: &Transaction<'_>, key: &str, users: &[String], amount: Cents) -> Res<bool> {
    let reference = order_rules::keyed_credit_ref(key);
    let posted: Option<i64> = tx
        .prepare_cached("SELECT id FROM ledger_tx WHERE kind = 'credit' AND ref = ?1")?
        .query_row([&reference], |r| r.get(0))
        .optional()?;
    if let Some(id) = posted {
        let stored = tx
            .prepare_cached("SELECT account, amount FROM ledger_entries WHERE tx_id = ?1")?
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        return Ok(order_rules::credit_replay(key, stored, users, amount).map(|()| true));
    }
    let (entries, _) = order_rules::credit_entries(users, amount);
    post(tx, "credit", &reference, &entries)?;
    Ok(Ok(false))
}

/// Moves every positive merchant receivable into its payout account, one ledger transaction per merchant.
pub fn settle(tx: &Transaction<'_>) -> Result<Vec<Settlement>, StoreError> {
    let owed: Vec<(String, Cents)> = tx
        .prepare_cached("SELECT account, balance FROM accounts WHERE account LIKE 'shop:%' AND balance > 0 ORDER BY account")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let batch = order_rules::settlement_batch();
    let mut out = Vec::new();
    for (account, amount) in owed {
        let (shop_id, reference, entries) = order_rules::settlement(&batch, account, amount);
        post(tx, "settle", &reference, &entries)?;
        tx.prepare_cached(
            "INSERT INTO settlements(batch, shop_id, amount_cents, created_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![batch, shop_id, amount, now_ms()])?;
        out.push(Settlement {
            batch: batch.clone(),
            shop_id,
            amount_cents: amount,
        });
    }
    Ok(out)
}

/// Adds an outbox row for `(topic, order)`; with `inline_weak` its effects are applied now and the row is
/// born done (the synchronous level), otherwise the workers apply them later.
pub fn enqueue(
    tx: &Transaction<'_>,
    topic: &str,
    order_id: &str,
    inline_weak: bool,
) -> Result<(), StoreError> {
    if inline_weak {
        apply_effects(tx, topic, order_id)?;
    }
    tx.prepare_cached(
        "INSERT OR IGNORE INTO outbox(topic, order_id, created_ms, done) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![topic, order_id, now_ms(), inline_weak])?;
    Ok(())
}

/// The weak effects of an event. Each is keyed by `(order, kind)`, so redelivery has no second effect; a
/// partial refund's effects carry its number in their kind (`points_revoked/r2`).
fn apply_effects(tx: &Transaction<'_>, topic: &str, order_id: &str) -> Result<(), StoreError> {
    let total: Cents = tx
        .prepare_cached("SELECT total_cents FROM orders WHERE id = ?1")?
        .query_row([order_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let refund = match order_rules::refund_event(topic) {
        None => None,
        Some(event) => {
            let n: i64 = match event {
                RefundEvent::Part(n) => n,
                RefundEvent::Completing => tx
                    .prepare_cached("SELECT COALESCE(MAX(n), 0) FROM refunds WHERE order_id = ?1")?
                    .query_row([order_id], |r| r.get(0))?,
            };
            let (before, amount): (Cents, Cents) = tx
                .prepare_cached(
                    "SELECT COALESCE(SUM(CASE WHEN n < ?2 THEN amount_cents END), 0),
                            COALESCE(SUM(CASE WHEN n = ?2 THEN amount_cents END), 0)
                     FROM refunds WHERE order_id = ?1",
                )?
                .query_row(params![order_id, n], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Some(RefundDone { n, before, amount })
        }
    };
    for (kind, value) in &order_rules::effects(topic, total, refund) {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO effects(order_id, kind, value, created_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![order_id, kind, value, now_ms()])?;
    }
    Ok(())
}

/// Runs pending outbox items in id order.
pub fn run_outbox(tx: &Transaction<'_>, limit: u32) -> Result<u32, StoreError> {
    let items: Vec<(i64, String, String)> = tx
        .prepare_cached("SELECT id, topic, order_id FROM outbox WHERE done = 0 ORDER BY id LIMIT ?1")?
        .query_map([limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (id, topic, order_id) in &items {
        apply_effects(tx, topic, order_id)?;
        tx.prepare_cached("UPDATE outbox SET done = 1 WHERE id = ?1")?
            .execute([id])?;
    }
    Ok(items.len() as u32)
}
