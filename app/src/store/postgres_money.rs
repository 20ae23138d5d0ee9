//! PostgreSQL money and outbox: wallet payments, provider callbacks, refunds, credits and settlement on the
//! double-entry ledger, and the outbox with its idempotent effects. Mirrors `sqlite_money`; a payment locks
//! the order row and then the paying wallet's row (`FOR UPDATE`), so two payments from one wallet cannot both
//! pass the balance check, and the outbox workers take rows with `FOR UPDATE SKIP LOCKED`.

use super::postgres::Tx;
use super::postgres_orders::{
    load_order, lock_order, lock_skus_of, move_stock, refund_lines, return_units, transition,
};
use super::{OrderView, PaymentCallback, RefundRequest, Refunded, Settlement, StoreError};
use crate::domain::{Cents, Clock, OrderStatus, Reject, Transition, now_ms};

use super::order_rules::{self, PriorPayment, RefundDone, RefundEvent, Res};

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
pub fn pay(
    t: &mut Tx<'_>,
    id: &str,
    via: Option<&PaymentCallback>,
    inline_weak: bool,
    clock: &Clock,
) -> Res<OrderView> {
    lock_order(t, id)?;
    let o = match order(t, id)? {
        Ok(o) => o,
        Err(r) => return Ok(Err(r)),
    };
    if let Some(answer) = order_rules::before_pay(&o, via, clock.now_ms()) {
        return Ok(answer);
    }
    if let Err(r) = transition(t, id, Transition::Pay)? {
        return Ok(Err(r));
    }
    let (payer, method) = order_rules::payer(&o, via);
    let mut entries = vec![(payer.clone(), -o.total_cents)];
    entries.extend(shop_shares(t, id)?);
    if via.is_none() {
        // Every account of the posting, locked in name order in one statement, as `post` locks them: the
        // wallet locked first deadlocked with a refund into it from one of its shops, which locks the shop first.
        let accounts: Vec<&str> = entries.iter().map(|(a, _)| a.as_str()).collect();
        let have: Cents = (t.query(
            "SELECT account, balance FROM accounts WHERE account = ANY($1) ORDER BY account FOR UPDATE",
            &[&accounts],
        )?)
        .iter()
        .find(|r| r.get::<_, &str>(0) == payer)
        .map_or(0, |r| r.get(1));
        if let Some(r) = order_rules::short_of_funds(&payer, have, o.total_cents) {
            return Ok(Err(r));
        }
    }
    post(t, "pay", id, &entries)?;
    move_stock(t, id, "reserved", "sold")?;
    t.exec("UPDATE orders SET paid_via = $2 WHERE id = $1", &[&id, &method])?;
    enqueue(t, "order.paid", id, inline_weak)?;
    order(t, id)
}

/// A provider callback; `payment_id` makes it idempotent (an advisory lock orders concurrent deliveries).
pub fn callback(t: &mut Tx<'_>, cb: &PaymentCallback, inline_weak: bool, clock: &Clock) -> Res<OrderView> {
    t.lock_key(&format!("payment:{}", cb.payment_id))?;
    let prior = t.opt(
        "SELECT order_id, status, amount_cents FROM payments WHERE payment_id = $1",
        &[&cb.payment_id],
    )?;
    let prior = prior.map(|r| {
        let (order_id, status, amount): (String, String, Cents) = (r.get(0), r.get(1), r.get(2));
        order_rules::prior_payment(cb, &order_id, &status, amount)
    });
    match prior {
        Some(PriorPayment::Conflict(r)) => return Ok(Err(r)),
        Some(PriorPayment::Replay) => return order(t, &cb.order_id),
        Some(PriorPayment::Succeeded) => {
            t.exec(
                "UPDATE payments SET status = $2, amount_cents = $3 WHERE payment_id = $1",
                &[&cb.payment_id, &cb.status, &cb.amount_cents],
            )?;
        }
        None => {
            t.exec(
                "INSERT INTO payments(payment_id, order_id, status, amount_cents, created_ms) VALUES ($1, $2, $3, $4, $5)",
                &[&cb.payment_id, &cb.order_id, &cb.status, &cb.amount_cents, &now_ms()],
            )?;
            if cb.status == "failed" {
                // The reservation stays until the buyer retries or the sweeper expires it.
                return order(t, &cb.order_id);
            }
        }
    }
    match pay(t, &cb.order_id, Some(cb), inline_weak, clock)? {
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

/// Refunds the units `r` names (all left when none) under the order's row lock, which serialises refunds of
/// one order (their numbers, keys and line counts): see `sqlite_money::refund` for what one writes.
pub fn refund(t: &mut Tx<'_>, r: &RefundRequest, inline_weak: bool) -> Res<Refunded> {
    let id = r.order_id.as_str();
    lock_order(t, id)?;
    let o = match order(t, id)? {
        Ok(o) => o,
        Err(rej) => return Ok(Err(rej)),
    };
    if let Some(key) = &r.idem_key {
        let prior = t.opt(
            "SELECT fingerprint, answer FROM refunds WHERE order_id = $1 AND idem_key = $2",
            &[&id, key],
        )?;
        if let Some(row) = prior {
            let (fp, answer): (String, Option<String>) = (row.get(0), row.get(1));
            return order_rules::refund_replay(key, &r.fingerprint, &fp, answer.as_deref());
        }
    }
    let refunded = o.status == OrderStatus::Refunded.as_str();
    if !refunded && let Err(rej) = order_rules::next_status(id, Some(&o.status), Transition::Refund)? {
        return Ok(Err(rej));
    }
    let plan = match order_rules::plan_refund(id, &refund_lines(t, id)?, r.lines.as_deref()) {
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
    let n: i64 = t
        .one(
            "SELECT COALESCE(MAX(n), 0) + 1 FROM refunds WHERE order_id = $1",
            &[&id],
        )?
        .get(0);
    let reference = order_rules::refund_ref(id, n);
    post(t, "refund", &reference, &order_rules::refund_entries(&o, &plan))?;
    // Goods not shipped come back on sale; shipped ones stay with the buyer.
    let restock = order_rules::refund_restocks(&o);
    lock_skus_of(t, &[id])?;
    for (sku, qty) in &plan.take {
        return_units(t, sku, *qty, restock)?;
        t.exec(
            "UPDATE order_lines SET refunded_qty = refunded_qty + $3 WHERE order_id = $1 AND sku = $2",
            &[&id, sku, qty],
        )?;
    }
    if plan.completes
        && let Err(rej) = transition(t, id, Transition::Refund)?
    {
        return Ok(Err(rej));
    }
    let view = match order(t, id)? {
        Ok(v) => v,
        Err(rej) => return Ok(Err(rej)),
    };
    let answer = serde_json::to_string(&view).map_err(|e| StoreError::Internal(e.to_string()))?;
    t.exec(
        "INSERT INTO refunds(order_id, n, idem_key, fingerprint, amount_cents, ledger_ref, answer, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&id, &n, &r.idem_key, &r.fingerprint, &plan.amount, &reference, &answer, &now_ms()],
    )?;
    for (sku, qty) in &plan.take {
        t.exec(
            "INSERT INTO refund_lines(order_id, n, sku, qty) VALUES ($1, $2, $3, $4)",
            &[&id, &n, sku, qty],
        )?;
    }
    let topic = if plan.completes {
        "order.refunded".to_string()
    } else {
        order_rules::refund_part_topic(n)
    };
    enqueue(t, &topic, id, inline_weak)?;
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

/// The weak effects of an event. Each is keyed by `(order, kind)`, so redelivery has no second effect; a
/// partial refund's effects carry its number in their kind (`points_revoked/r2`).
fn apply_effects(t: &mut Tx<'_>, topic: &str, order_id: &str) -> Result<(), StoreError> {
    let total: Cents = t
        .opt("SELECT total_cents FROM orders WHERE id = $1", &[&order_id])?
        .map(|r| r.get(0))
        .unwrap_or(0);
    let refund = match order_rules::refund_event(topic) {
        None => None,
        Some(event) => {
            let n: i64 = match event {
                RefundEvent::Part(n) => n,
                RefundEvent::Completing => t
                    .one(
                        "SELECT COALESCE(MAX(n), 0)::BIGINT FROM refunds WHERE order_id = $1",
                        &[&order_id],
                    )?
                    .get(0),
            };
            let row = t.one(
                "SELECT COALESCE(SUM(CASE WHEN n < $2 THEN amount_cents END), 0)::BIGINT,
                        COALESCE(SUM(CASE WHEN n = $2 THEN amount_cents END), 0)::BIGINT
                 FROM refunds WHERE order_id = $1",
                &[&order_id, &n],
            )?;
            Some(RefundDone {
                n,
                before: row.get(0),
                amount: row.get(1),
            })
        }
    };
    for (kind, value) in &order_rules::effects(topic, total, refund) {
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
