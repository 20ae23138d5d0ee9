//! PostgreSQL money and outbox: wallet payments, provider callbacks, refunds, credits and settlement on the
//! double-entry ledger, and the outbox with its idempotent effects. Mirrors `sqlite_money`; a payment locks
//! the order row and then the paying wallet's row (`FOR UPDATE`), so two payments from one wallet cannot both
//! pass the balance check, and the outbox workers take rows with `FOR UPDATE SKIP LOCKED`.

use super::postgres::Tx;
use super::postgres_orders::{load_order, lock_order, move_stock, ship_out, transition};
use super::{OrderView, PaymentCallback, Settlement, StoreError};
use crate::domain::{Cents, OrderStatus, Reject, Transition, now_ms};

use super::order_rules::{self, Res};

/// Posts one ledger transaction; `(kind, reference)` is unique, so a replay cannot post twice.
fn post(t: &mut Tx<'_>, kind: &str, reference: &str, entries: &[(String, Cents)]) -> Result<(), StoreError> {
    let sum: Cents = entries.iter().map(|(_, a)| a).sum();
    if sum != 0 {
        return Err(StoreError::Internal(format!(
            "ledger {kind}/{reference} does not balance: {sum}"
        )));
    }
    let id: i64 = t
        .one(
            "INSERT INTO ledger_tx(kind, ref, created_ms) VALUES ($1, $2, $3) RETURNING id",
            &[&kind, &reference, &now_ms()],
        )?
        .get(0);
    // Accounts in name order, so two transactions touching the same accounts lock them in the same order.
    let mut sorted: Vec<&(String, Cents)> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (account, amount) in sorted {
        t.exec(
            "INSERT INTO ledger_entries(tx_id, account, amount) VALUES ($1, $2, $3)",
            &[&id, account, amount],
        )?;
        t.exec(
            "INSERT INTO accounts(account, balance) VALUES ($1, $2)
             ON CONFLICT(account) DO UPDATE SET balance = accounts.balance + excluded.balance",
            &[account, amount],
        )?;
    }
    Ok(())
}

pub fn balance(t: &mut Tx<'_>, account: &str) -> Result<Cents, StoreError> {
    Ok(
        t.opt("SELECT balance FROM accounts WHERE account = $1", &[&account])?
            .map(|r| r.get(0))
            .unwrap_or(0),
    )
}

/// What each shop is owed for an order.
fn shop_shares(t: &mut Tx<'_>, order_id: &str) -> Result<Vec<(String, Cents)>, StoreError> {
    Ok(t.query(
        "SELECT shop_id, SUM(qty * price_cents)::BIGINT FROM order_lines WHERE order_id = $1
             GROUP BY shop_id ORDER BY shop_id",
        &[&order_id],
    )?
    .iter()
    .map(|r| (order_rules::shop(r.get(0)), r.get(1)))
    .collect())
}

fn order(t: &mut Tx<'_>, id: &str) -> Res<OrderView> {
    Ok(load_order(t, id)?.ok_or_else(|| Reject::NotFound {
        what: "order",
        id: id.into(),
    }))
}

/// Pays a reserved order, from the wallet (`via = None`) or from the provider.
pub fn pay(t: &mut Tx<'_>, id: &str, via: Option<&PaymentCallback>, inline_weak: bool) -> Res<OrderView> {
    lock_order(t, id)?;
    let o = match order(t, id)? {
        Ok(o) => o,
        Err(r) => return Ok(Err(r)),
    };
    if let Some(answer) = order_rules::before_pay(&o, via) {
        return Ok(answer);
    }
    if let Err(r) = transition(t, id, Transition::Pay)? {
        return Ok(Err(r));
    }
    let (payer, method) = order_rules::payer(&o, via);
    if via.is_none() {
        let have: Cents = t
            .opt(
                "SELECT balance FROM accounts WHERE account = $1 FOR UPDATE",
                &[&payer],
            )?
            .map(|r| r.get(0))
            .unwrap_or(0);
        if let Some(r) = order_rules::short_of_funds(&payer, have, o.total_cents) {
            return Ok(Err(r));
        }
    }
    let mut entries = vec![(payer, -o.total_cents)];
    entries.extend(shop_shares(t, id)?);
    post(t, "pay", id, &entries)?;
    move_stock(t, id, "reserved", "sold")?;
    t.exec("UPDATE orders SET paid_via = $2 WHERE id = $1", &[&id, &method])?;
    enqueue(t, "order.paid", id, inline_weak)?;
    order(t, id)
}

/// A provider callback; `payment_id` makes it idempotent (an advisory lock orders concurrent deliveries).
pub fn callback(t: &mut Tx<'_>, cb: &PaymentCallback, inline_weak: bool) -> Res<OrderView> {
    t.lock_key(&format!("payment:{}", cb.payment_id))?;
    let prior = t.opt(
        "SELECT order_id, status, amount_cents FROM payments WHERE payment_id = $1",
        &[&cb.payment_id],
    )?;
    if let Some(r) = prior {
        let (order_id, status, amount): (String, String, Cents) = (r.get(0), r.get(1), r.get(2));
        if let Some(r) = order_rules::payment_conflict(cb, &order_id, &status, amount) {
            return Ok(Err(r));
        }
        return order(t, &cb.order_id);
    }
    t.exec(
        "INSERT INTO payments(payment_id, order_id, status, amount_cents, created_ms) VALUES ($1, $2, $3, $4, $5)",
        &[&cb.payment_id, &cb.order_id, &cb.status, &cb.amount_cents, &now_ms()],
    )?;
    if cb.status == "failed" {
        // The reservation stays until the buyer retries or the sweeper expires it.
        return order(t, &cb.order_id);
    }
    match pay(t, &cb.order_id, Some(cb), inline_weak)? {
        Err(r) if order_rules::cannot_take_payment(&r) => {
            t.exec(
                "UPDATE payments SET status = $2 WHERE payment_id = $1",
                &[&cb.payment_id, &order_rules::REFUND_DUE],
            )?;
            tracing::warn!(
                payment = %cb.payment_id, order = %cb.order_id, refusal = ?r,
                "a provider's payment reached an order that cannot take it: kept as refund_due"
            );
            order(t, &cb.order_id)
        }
        other => Ok(other),
    }
}

pub fn refund(t: &mut Tx<'_>, id: &str, inline_weak: bool) -> Res<OrderView> {
    lock_order(t, id)?;
    let o = match order(t, id)? {
        Ok(o) => o,
        Err(r) => return Ok(Err(r)),
    };
    if o.status == OrderStatus::Refunded.as_str() {
        return Ok(Ok(o));
    }
    if let Err(r) = transition(t, id, Transition::Refund)? {
        return Ok(Err(r));
    }
    let entries = order_rules::refund_entries(&o, shop_shares(t, id)?);
    post(t, "refund", id, &entries)?;
    // Goods not shipped come back on sale; shipped ones stay with the buyer.
    if order_rules::refund_restocks(&o) {
        move_stock(t, id, "sold", "available")?;
    } else {
        ship_out(t, id)?;
    }
    enqueue(t, "order.refunded", id, inline_weak)?;
    order(t, id)
}

pub fn credit(t: &mut Tx<'_>, users: &[String], amount: Cents) -> Result<(), StoreError> {
    let (entries, reference) = order_rules::credit_entries(users, amount);
    post(t, "credit", &reference, &entries)
}

/// A credit sent with idempotency key `key`: `Ok(true)` when it was posted before (a replay). Concurrent
/// deliveries of one key queue on its advisory lock; the second finds the first's posting.
pub fn credit_once(t: &mut Tx<'_>, key: &str, users: &[String], amount: Cents) -> Res<bool> {
    let reference = order_rules::keyed_credit_ref(key);
    t.lock_key(&format!("credit:{key}"))?;
    let posted = t.opt(
        "SELECT id FROM ledger_tx WHERE kind = 'credit' AND ref = $1",
        &[&reference],
    )?;
    if let Some(row) = posted {
        let id: i64 = row.get(0);
        let stored = t
            .query(
                "SELECT account, amount FROM ledger_entries WHERE tx_id = $1",
                &[&id],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        return Ok(order_rules::credit_replay(key, stored, users, amount).map(|()| true));
    }
    let (entries, _) = order_rules::credit_entries(users, amount);
    post(t, "credit", &reference, &entries)?;
    Ok(Ok(false))
}

/// Moves every positive merchant receivable into its payout account, one ledger transaction per merchant.
pub fn settle(t: &mut Tx<'_>) -> Result<Vec<Settlement>, StoreError> {
    let owed: Vec<(String, Cents)> = t
        .query(
            "SELECT account, balance FROM accounts WHERE account LIKE 'shop:%' AND balance > 0
             ORDER BY account FOR UPDATE",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let batch = order_rules::settlement_batch();
    let mut out = Vec::new();
    for (account, amount) in owed {
        let (shop_id, reference, entries) = order_rules::settlement(&batch, account, amount);
        post(t, "settle", &reference, &entries)?;
        t.exec(
            "INSERT INTO settlements(batch, shop_id, amount_cents, created_ms) VALUES ($1, $2, $3, $4)",
            &[&batch, &shop_id, &amount, &now_ms()],
        )?;
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
pub fn enqueue(t: &mut Tx<'_>, topic: &str, order_id: &str, inline_weak: bool) -> Result<(), StoreError> {
    if inline_weak {
        apply_effects(t, topic, order_id)?;
    }
    t.exec(
        "INSERT INTO outbox(topic, order_id, created_ms, done) VALUES ($1, $2, $3, $4)
         ON CONFLICT (topic, order_id) DO NOTHING",
        &[&topic, &order_id, &now_ms(), &inline_weak],
    )?;
    Ok(())
}

/// The weak effects of an event. Each is keyed by `(order, kind)`, so redelivery has no second effect.
fn apply_effects(t: &mut Tx<'_>, topic: &str, order_id: &str) -> Result<(), StoreError> {
    let total: Cents = t
        .opt("SELECT total_cents FROM orders WHERE id = $1", &[&order_id])?
        .map(|r| r.get(0))
        .unwrap_or(0);
    let points = total / 100;
    let effects: &[(&str, i64)] = match topic {
        "order.placed" => &[("notify_placed", 0)],
        "order.paid" => &[("points", points), ("notify_paid", 0)],
        "order.refunded" => &[("points_revoked", -points), ("notify_refunded", 0)],
        _ => &[],
    };
    for (kind, value) in effects {
        t.exec(
            "INSERT INTO effects(order_id, kind, value, created_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (order_id, kind) DO NOTHING",
            &[&order_id, kind, value, &now_ms()],
        )?;
    }
    Ok(())
}

/// Runs pending outbox items in id order; `SKIP LOCKED` gives concurrent workers (in any instance) disjoint
/// rows, and a worker that dies mid-batch leaves its rows pending for the next one (redelivery is harmless).
pub fn run_outbox(t: &mut Tx<'_>, limit: u32) -> Result<u32, StoreError> {
    let items: Vec<(i64, String, String)> = t
        .query(
            "SELECT id, topic, order_id FROM outbox WHERE NOT done ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&i64::from(limit)],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for (id, topic, order_id) in &items {
        apply_effects(t, topic, order_id)?;
        t.exec("UPDATE outbox SET done = true WHERE id = $1", &[id])?;
    }
    Ok(items.len() as u32)
}
