//! The order rules both SQL stores apply alike: what an idempotent replay answers, when a flash-sale limit or
//! short stock refuses an order, what a reserved order's answer holds, which status a transition leads to, and
//! what a payment checks first. Each store keeps only its SQL and its locking around them.

use super::{
    Created, LineView, OrderView, PaymentCallback, Refunded, Restocked, Sku, StockUpdate, StoreError,
};
use crate::domain::{Cents, NewOrder, OrderKind, OrderLineReq, OrderStatus, Reject, Transition, now_ms};

pub(super) type Res<T> = Result<Result<T, Reject>, StoreError>;

/// The wallet account of a user.
pub(crate) fn wallet(user: &str) -> String {
    format!("user:{user}")
}

/// What shop `id` is owed for paid orders, until settled.
pub(crate) fn shop(id: i64) -> String {
    format!("shop:{id}")
}

/// What settlement has paid out to shop `id`.
pub(crate) fn payout(id: i64) -> String {
    format!("payout:{id}")
}

/// The answer to `o` when an earlier order with its idempotency key `key` stored `answer` for a request with
/// fingerprint `fingerprint`: that same answer again, or a conflict when the two requests differ.
pub(super) fn replay(key: &str, o: &NewOrder, fingerprint: &str, answer: &str) -> Res<Created> {
    if fingerprint != o.fingerprint {
        return Ok(Err(Reject::IdempotencyConflict { key: key.into() }));
    }
    let order: OrderView = serde_json::from_str(answer)
        .map_err(|e| StoreError::Internal(format!("stored answer of key {key:?} is corrupt: {e}")))?;
    Ok(Ok(Created { order, replay: true }))
}

/// The refusal of flash-sale line `l` of `o` when its user, who holds `bought` units of it already, would
/// pass the per-user limit.
pub(super) fn over_limit(o: &NewOrder, l: &OrderLineReq, bought: i64) -> Option<Reject> {
    (bought + i64::from(l.qty) > i64::from(o.per_user_limit)).then(|| Reject::LimitExceeded {
        user: o.user.clone(),
        sku: l.sku.clone(),
        limit: o.per_user_limit,
    })
}

/// The sale a new line of an order of `kind` is counted in, its SKU's sale being `sale_seq`: a flash-sale line
/// belongs to the SKU's latest sale (open or not: a seckill attempt with no sale open has the same limit, that
/// sale's), so the limit counts a buyer's units per sale, not over every sale of the SKU; an ordinary line to
/// none.
pub(super) fn sale_of(kind: OrderKind, sale_seq: i64) -> Option<i64> {
    (kind == OrderKind::Seckill).then_some(sale_seq)
}

/// The refusal of `wanted` units of `sku` when the conditional decrement found only `available` (for a flash
/// sale, what its buckets and the shelf hold together): an empty shelf is sold out; otherwise the buyer learns
/// how many are left. Only "sold out" closes the sold-out gate, so a flash-sale buyer asking for two of the
/// last unit must not be told that: the gate would then refuse the one-unit buyers the last unit is for.
pub(super) fn short_of_stock(sku: &str, available: i64, wanted: i64) -> Reject {
    if available <= 0 {
        Reject::SoldOut { sku: sku.into() }
    } else {
        Reject::OutOfStock {
            sku: sku.into(),
            available,
            wanted,
        }
    }
}

/// Where a flash-sale order of `qty` units of `sku` takes them when no one bucket holds them all: from
/// `buckets` (bucket, units) in order, then the shelf (`shelf` units). Refused as [`short_of_stock`] when all
/// of them together hold fewer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Gather {
    /// (bucket, units taken from it).
    pub buckets: Vec<(i64, i64)>,
    /// Units taken from the SKU's `available`.
    pub shelf: i64,
}

pub(super) fn gather(sku: &str, buckets: &[(i64, i64)], shelf: i64, qty: i64) -> Result<Gather, Reject> {
    let held = buckets.iter().map(|b| b.1.max(0)).sum::<i64>() + shelf.max(0);
    if held < qty {
        return Err(short_of_stock(sku, held, qty));
    }
    let mut left = qty;
    let mut plan = Gather {
        buckets: Vec::new(),
        shelf: 0,
    };
    for &(bucket, units) in buckets {
        if left == 0 {
            break;
        }
        let take = units.max(0).min(left);
        if take > 0 {
            plan.buckets.push((bucket, take));
            left -= take;
        }
    }
    plan.shelf = left;
    Ok(plan)
}

/// Hands `lines` (order id, line; in SKU order) to their `orders`, for a page of orders read with one query
/// for all their lines.
pub(super) fn attach_lines(orders: &mut [OrderView], lines: Vec<(String, LineView)>) {
    let at: std::collections::HashMap<String, usize> = orders
        .iter()
        .enumerate()
        .map(|(i, o)| (o.id.clone(), i))
        .collect();
    for (id, line) in lines {
        if let Some(&i) = at.get(&id) {
            orders[i].lines.push(line);
        }
    }
    for o in orders {
        count_refunded(o);
    }
}

/// Sets `o.refunded_cents` from its lines: what refunds gave back is their refunded units at their prices.
pub(super) fn count_refunded(o: &mut OrderView) {
    o.refunded_cents = o.lines.iter().map(|l| l.refunded_qty * l.price_cents).sum();
}

/// Why stock update `u` changed nothing: its SKU does not exist (`available` is `None`), or it writes off
/// more than the SKU has on the shelf after what it receives.
pub(super) fn stock_update_refused(u: &StockUpdate, available: Option<i64>) -> Reject {
    match available {
        None => Reject::NotFound {
            what: "sku",
            id: u.sku.clone(),
        },
        Some(available) => Reject::OutOfStock {
            sku: u.sku.clone(),
            available: available + i64::from(u.receive),
            wanted: i64::from(u.write_off),
        },
    }
}

/// The fingerprint of merchant batch `updates` (`domain::stock_fingerprint`), stored with its key.
pub(super) fn stock_fingerprint(updates: &[StockUpdate]) -> String {
    crate::domain::stock_fingerprint(
        updates
            .iter()
            .map(|u| (u.sku.as_str(), u.receive, u.write_off, u.price_cents)),
    )
}

/// What a keyed batch stores to answer its replays: its SKUs as it left them.
pub(super) fn stock_answer(skus: &[Sku]) -> Result<String, StoreError> {
    serde_json::to_string(skus).map_err(|e| StoreError::Internal(format!("stock answer: {e}")))
}

/// The answer to batch `fingerprint` under `key` when the batch first applied under it had
/// `stored_fingerprint` and answered `answer`: that answer again (nothing applied), or a conflict.
pub(super) fn stock_replay(
    key: &str,
    fingerprint: &str,
    stored_fingerprint: &str,
    answer: &str,
) -> Res<Restocked> {
    if fingerprint != stored_fingerprint {
        return Ok(Err(Reject::IdempotencyConflict { key: key.into() }));
    }
    let skus: Vec<Sku> = serde_json::from_str(answer)
        .map_err(|e| StoreError::Internal(format!("stored stock answer of key {key:?} is corrupt: {e}")))?;
    Ok(Ok(Restocked { skus, replay: true }))
}

/// The order `o` becomes once its stock is reserved (lines by SKU), and that view as JSON: the answer an
/// idempotent replay gives.
pub(super) fn reserved(
    o: &NewOrder,
    lines: &[LineView],
    total_cents: i64,
) -> Result<(OrderView, String), StoreError> {
    let mut sorted = lines.to_vec();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    let view = OrderView {
        id: o.id.clone(),
        user: o.user.clone(),
        kind: o.kind.as_str().into(),
        status: OrderStatus::Reserved.as_str().into(),
        total_cents,
        lines: sorted,
        created_ms: o.created_ms,
        expires_ms: o.expires_ms,
        paid_via: None,
        refunded_cents: 0,
    };
    let answer = serde_json::to_string(&view).map_err(|e| StoreError::Internal(e.to_string()))?;
    Ok((view, answer))
}

/// Where `tr` takes order `id`, whose stored status is `status` (`None`: no such order): the status it leaves
/// and the one it enters, or why it may not.
pub(super) fn next_status(id: &str, status: Option<&str>, tr: Transition) -> Res<(OrderStatus, OrderStatus)> {
    let Some(status) = status else {
        return Ok(Err(Reject::NotFound {
            what: "order",
            id: id.into(),
        }));
    };
    let from = OrderStatus::parse(status)
        .ok_or_else(|| StoreError::Internal(format!("order {id} has unknown status {status:?}")))?;
    Ok(match from.apply(tr) {
        Some(to) => Ok((from, to)),
        None => Err(Reject::BadTransition {
            id: id.into(),
            from: from.as_str(),
            action: tr.as_str(),
        }),
    })
}

/// What paying `o` answers before anything moves (from the wallet when `via` is `None`, else by the
/// provider's callback): paying a paid order from the wallet again is a replay (its view again, no second
/// debit), and a callback for another amount is refused. `None`: go on.
///
/// A reservation past its expiry is refused as expired although the sweeper has not reached it yet (it may
/// be seconds behind, or stopped): its units are due back on sale, and a shop that takes the money for them
/// anyway sells units another buyer may already hold. A provider's payment for it is kept as refund due.
pub(super) fn before_pay(
    o: &OrderView,
    via: Option<&PaymentCallback>,
    now_ms: i64,
) -> Option<Result<OrderView, Reject>> {
    let status = OrderStatus::parse(&o.status);
    let paid = matches!(status, Some(OrderStatus::Paid | OrderStatus::Fulfilled));
    match via {
        None if paid => Some(Ok(o.clone())),
        Some(cb) if cb.amount_cents != o.total_cents => Some(Err(Reject::AmountMismatch {
            given: cb.amount_cents,
            total: o.total_cents,
        })),
        // The sweeper's rule (`expire_due`): due once `expires_ms <= now`.
        _ if status == Some(OrderStatus::Reserved) && o.expires_ms <= now_ms => {
            Some(Err(Reject::BadTransition {
                id: o.id.clone(),
                from: OrderStatus::Expired.as_str(),
                action: Transition::Pay.as_str(),
            }))
        }
        _ => None,
    }
}

/// The account that pays `o` and how the order records it (`paid_via`).
pub(super) fn payer(o: &OrderView, via: Option<&PaymentCallback>) -> (String, &'static str) {
    match via {
        None => (wallet(&o.user), "wallet"),
        Some(_) => ("psp".to_string(), "psp"),
    }
}

/// The refusal of a wallet payment of `needed` when `account` holds only `balance`.
pub(super) fn short_of_funds(account: &str, balance: Cents, needed: Cents) -> Option<Reject> {
    (balance < needed).then(|| Reject::InsufficientFunds {
        account: account.into(),
        balance,
        needed,
    })
}

/// Whether refunding `o` puts its units back on sale: not once it was fulfilled, since the goods are with the
/// buyer; they leave the stock (received and sold both shrink), and a return is the merchant's restock.
pub(super) fn refund_restocks(o: &OrderView) -> bool {
    o.status != OrderStatus::Fulfilled.as_str()
}

/// The status of a provider's payment that reached an order unable to take it (cancelled, expired, paid
/// already): the money was captured, so the payment is kept, owed back to the payer, and the delivery is
/// acknowledged. Refusing it rolled the payment back with the refusal, and the money was lost without a trace.
pub(super) const REFUND_DUE: &str = "refund_due";

/// Whether a refusal of paying an order by callback means the order cannot take this payment (so it is kept
/// as [`REFUND_DUE`]): it is cancelled, expired or paid already, or the amount captured is not its total
/// (the order stays unpaid, and the money is owed back). Refused, a capture of another amount was rolled back
/// with the refusal and was in no record at all. An unknown order is a bad delivery: refused.
pub(super) fn cannot_take_payment(r: &Reject) -> bool {
    matches!(r, Reject::BadTransition { .. } | Reject::AmountMismatch { .. })
}

/// What provider callback `cb` is when an earlier one with its `payment_id` recorded `order_id`, `status` and
/// `amount`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PriorPayment {
    /// The same callback again: the order's view, no second effect.
    Replay,
    /// The payment that failed has succeeded since (a provider's payment id spans the buyer's attempts): the
    /// success is taken, with its own amount. A failure has no effect, so it must not make the later capture
    /// a conflict, nor its amount either: refused 422 on every delivery, that money was in no order and no
    /// `refund_due` row.
    Succeeded,
    /// Another order, amount or outcome under the id (a success reported failed later among them).
    Conflict(Reject),
}

pub(super) fn prior_payment(
    cb: &PaymentCallback,
    order_id: &str,
    status: &str,
    amount: Cents,
) -> PriorPayment {
    // A payment kept as owed back was a success the provider reported: its replay is the same delivery.
    let reported = if status == REFUND_DUE { "succeeded" } else { status };
    let failed_before = reported == "failed" && cb.status == "succeeded";
    if order_id != cb.order_id || (amount != cb.amount_cents && !failed_before) {
        return PriorPayment::Conflict(Reject::IdempotencyConflict {
            key: cb.payment_id.clone(),
        });
    }
    match (reported, cb.status.as_str()) {
        (was, now) if was == now => PriorPayment::Replay,
        ("failed", "succeeded") => PriorPayment::Succeeded,
        _ => PriorPayment::Conflict(Reject::IdempotencyConflict {
            key: cb.payment_id.clone(),
        }),
    }
}

/// An order line as a refund reads it (with the shop its share goes back from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RefundLine {
    pub sku: String,
    pub qty: i64,
    pub refunded: i64,
    pub price_cents: Cents,
    pub shop_id: i64,
}

/// What one refund takes: the units per line, what each shop gives back and the whole amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RefundPlan {
    /// (SKU, units), in SKU order; empty when a full refund finds nothing left.
    pub take: Vec<(String, i64)>,
    /// (`shop:<id>`, cents) by shop: exactly its refunded lines' units at their prices.
    pub shares: Vec<(String, Cents)>,
    pub amount: Cents,
    /// Every unit of the order is refunded once this refund is: the order becomes `refunded`.
    pub completes: bool,
}

/// What refunding `wanted` of order `id` (every unit left when `None`) takes from its `lines`: refused when a
/// SKU is not a line of the order or asks for more units than the line has left unrefunded.
pub(super) fn plan_refund(
    id: &str,
    lines: &[RefundLine],
    wanted: Option<&[OrderLineReq]>,
) -> Result<RefundPlan, Reject> {
    let mut take: Vec<(String, i64)> = Vec::new();
    match wanted {
        None => take.extend(
            lines
                .iter()
                .filter(|l| l.qty > l.refunded)
                .map(|l| (l.sku.clone(), l.qty - l.refunded)),
        ),
        Some(wanted) => {
            for w in wanted {
                let Some(l) = lines.iter().find(|l| l.sku == w.sku) else {
                    return Err(Reject::NotInOrder {
                        id: id.into(),
                        sku: w.sku.clone(),
                    });
                };
                let left = l.qty - l.refunded;
                if i64::from(w.qty) > left {
                    return Err(Reject::OverRefund {
                        id: id.into(),
                        sku: w.sku.clone(),
                        left,
                        wanted: i64::from(w.qty),
                    });
                }
                take.push((w.sku.clone(), i64::from(w.qty)));
            }
        }
    }
    take.sort();
    let mut by_shop: std::collections::BTreeMap<i64, Cents> = std::collections::BTreeMap::new();
    let mut remaining: i64 = lines.iter().map(|l| l.qty - l.refunded).sum();
    for (sku, units) in &take {
        if let Some(l) = lines.iter().find(|l| &l.sku == sku) {
            *by_shop.entry(l.shop_id).or_default() += units * l.price_cents;
            remaining -= units;
        }
    }
    let shares: Vec<(String, Cents)> = by_shop.into_iter().map(|(s, v)| (shop(s), v)).collect();
    Ok(RefundPlan {
        amount: shares.iter().map(|s| s.1).sum(),
        completes: !take.is_empty() && remaining == 0,
        take,
        shares,
    })
}

/// The ledger entries of refund `plan` of `o`: each shop gives its share back to whoever paid.
pub(super) fn refund_entries(o: &OrderView, plan: &RefundPlan) -> Vec<(String, Cents)> {
    let payer = match o.paid_via.as_deref() {
        Some("wallet") => wallet(&o.user),
        _ => "psp".to_string(),
    };
    let mut entries: Vec<(String, Cents)> = plan.shares.iter().map(|(a, v)| (a.clone(), -v)).collect();
    entries.push((payer, plan.amount));
    entries
}

/// The ledger reference of refund `n` (1, 2, ...) of order `order_id`: unique per posting, and never an order
/// id (ids hold no `/`). Refunds made before schema version 3 kept the order id as theirs; the `refunds` table
/// records each refund's reference, so the audit reads both alike.
pub(super) fn refund_ref(order_id: &str, n: i64) -> String {
    format!("{order_id}/r{n}")
}

/// The outbox topic of refund `n` of an order when it leaves units unrefunded (one row per refund: the
/// outbox is unique by topic and order). The refund that completes the order is `order.refunded`.
pub(super) fn refund_part_topic(n: i64) -> String {
    format!("{REFUND_PART}{n}")
}

const REFUND_PART: &str = "order.refund_part/r";

/// The refund number of a partial refund's topic.
pub(super) fn refund_part_of(topic: &str) -> Option<i64> {
    topic.strip_prefix(REFUND_PART)?.parse().ok()
}

/// The refund an outbox event stands for, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefundEvent {
    /// Refund `n`, which left units unrefunded.
    Part(i64),
    /// `order.refunded`: the order's last refund, the one that completed it (the store finds its number).
    Completing,
}

pub(super) fn refund_event(topic: &str) -> Option<RefundEvent> {
    match topic {
        "order.refunded" => Some(RefundEvent::Completing),
        _ => refund_part_of(topic).map(RefundEvent::Part),
    }
}

/// A refund as its event's effects read it: its number, what the order's refunds before it gave back, and
/// its own amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RefundDone {
    pub n: i64,
    pub before: Cents,
    pub amount: Cents,
}

/// The weak effects of event `topic` of an order of `total` cents (`refund`: the refund it stands for), each
/// keyed by its kind, which is unique per order: a partial refund's carry its number (`points_revoked/r2`).
pub(super) fn effects(topic: &str, total: Cents, refund: Option<RefundDone>) -> Vec<(String, i64)> {
    let revoked = |r: RefundDone| -points_revoked(total, r.before, r.amount);
    match (topic, refund) {
        ("order.placed", _) => vec![("notify_placed".into(), 0)],
        ("order.paid", _) => vec![("points".into(), points(total)), ("notify_paid".into(), 0)],
        ("order.refunded", Some(r)) => {
            vec![
                ("points_revoked".into(), revoked(r)),
                ("notify_refunded".into(), 0),
            ]
        }
        (_, Some(r)) => vec![
            (format!("points_revoked/r{}", r.n), revoked(r)),
            (format!("notify_refund_part/r{}", r.n), 0),
        ],
        _ => Vec::new(),
    }
}

/// Loyalty points an order of `total` cents earns when paid.
pub(super) fn points(total: Cents) -> i64 {
    total / 100
}

/// Points a refund of `amount` revokes from an order of `total` whose earlier refunds gave back `before`: what
/// the order earns drops from `points(total - before)` to `points(total - before - amount)`, so an order's
/// refunds together revoke exactly what its payment granted, however it was split.
pub(super) fn points_revoked(total: Cents, before: Cents, amount: Cents) -> i64 {
    points(total - before) - points(total - before - amount)
}

/// The answer to refund request `fingerprint` under `key` when the order's refund under that key had
/// `stored_fingerprint` and answered `answer`: that answer again, or a conflict for another body.
pub(super) fn refund_replay(
    key: &str,
    fingerprint: &str,
    stored_fingerprint: &str,
    answer: Option<&str>,
) -> Res<Refunded> {
    if fingerprint != stored_fingerprint {
        return Ok(Err(Reject::IdempotencyConflict { key: key.into() }));
    }
    let answer = answer.unwrap_or_default();
    let order: OrderView = serde_json::from_str(answer)
        .map_err(|e| StoreError::Internal(format!("stored refund answer of key {key:?} is corrupt: {e}")))?;
    Ok(Ok(Refunded {
        order,
        replay: true,
        restocked: Vec::new(),
    }))
}

/// The ledger entries and a fresh reference for minting `amount` into each of `users`' wallets.
pub(super) fn credit_entries(users: &[String], amount: Cents) -> (Vec<(String, Cents)>, String) {
    let mut entries: Vec<(String, Cents)> = users.iter().map(|u| (wallet(u), amount)).collect();
    entries.push(("mint".into(), -amount * users.len() as Cents));
    (entries, format!("c{:x}{:016x}", now_ms(), rand::random::<u64>()))
}

/// The ledger reference of a credit sent with idempotency key `key` (a fresh credit's reference starts with
/// `c`, so the two cannot meet).
pub(super) fn keyed_credit_ref(key: &str) -> String {
    format!("k:{key}")
}

/// A keyed credit whose reference is posted already, with `stored` entries: the same wallets and amount are a
/// replay (nothing more is posted), anything else reuses the key for another credit.
pub(super) fn credit_replay(
    key: &str,
    mut stored: Vec<(String, Cents)>,
    users: &[String],
    amount: Cents,
) -> Result<(), Reject> {
    let (mut wanted, _) = credit_entries(users, amount);
    wanted.sort();
    stored.sort();
    if wanted == stored {
        Ok(())
    } else {
        Err(Reject::IdempotencyConflict { key: key.into() })
    }
}

/// A fresh reference for one settlement run.
pub(super) fn settlement_batch() -> String {
    format!("b{:x}{:08x}", now_ms(), rand::random::<u32>())
}

/// Settling `amount` owed on merchant `account` (`shop:<id>`) in run `batch`: the shop's id, the ledger
/// reference and the entries that move the amount to the shop's payout account.
pub(super) fn settlement(batch: &str, account: String, amount: Cents) -> (i64, String, [(String, Cents); 2]) {
    let shop_id: i64 = account.trim_start_matches("shop:").parse().unwrap_or(0);
    (
        shop_id,
        format!("{batch}:{shop_id}"),
        [(account, -amount), (payout(shop_id), amount)],
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn order(status: &str, paid_via: Option<&str>) -> OrderView {
        OrderView {
            id: "o1".into(),
            user: "ann".into(),
            kind: "regular".into(),
            status: status.into(),
            total_cents: 500,
            lines: Vec::new(),
            created_ms: 0,
            expires_ms: 10_000,
            paid_via: paid_via.map(str::to_string),
            refunded_cents: 0,
        }
    }

    fn line(sku: &str, qty: i64, refunded: i64, price_cents: Cents, shop_id: i64) -> RefundLine {
        RefundLine {
            sku: sku.into(),
            qty,
            refunded,
            price_cents,
            shop_id,
        }
    }

    fn want(sku: &str, qty: u32) -> OrderLineReq {
        OrderLineReq { sku: sku.into(), qty }
    }

    fn callback(amount_cents: Cents) -> PaymentCallback {
        PaymentCallback {
            payment_id: "p1".into(),
            order_id: "o1".into(),
            amount_cents,
            status: "succeeded".into(),
        }
    }

    #[test]
    fn a_flash_sale_order_gathers_its_units_from_buckets_then_the_shelf() {
        assert_eq!(
            gather("s", &[(0, 1), (3, 1), (5, 1)], 0, 4),
            Err(Reject::OutOfStock {
                sku: "s".into(),
                available: 3,
                wanted: 4
            })
        );
        assert_eq!(
            gather("s", &[(0, 1), (3, 2), (5, 1)], 0, 2),
            Ok(Gather {
                buckets: vec![(0, 1), (3, 1)],
                shelf: 0
            })
        );
        assert_eq!(
            gather("s", &[(2, 1)], 5, 3),
            Ok(Gather {
                buckets: vec![(2, 1)],
                shelf: 2
            })
        );
        assert_eq!(gather("s", &[], 0, 1), Err(Reject::SoldOut { sku: "s".into() }));
    }

    #[test]
    fn short_stock_is_sold_out_only_when_nothing_is_left_and_says_what_is_left_otherwise() {
        assert!(matches!(short_of_stock("s", 0, 1), Reject::SoldOut { .. }));
        assert!(matches!(
            short_of_stock("s", 3, 5),
            Reject::OutOfStock {
                available: 3,
                wanted: 5,
                ..
            }
        ));
    }

    #[test]
    fn a_wallet_payment_of_a_paid_order_is_a_replay_and_a_callback_must_match_the_total() {
        assert_eq!(
            before_pay(&order("paid", Some("wallet")), None, 0),
            Some(Ok(order("paid", Some("wallet"))))
        );
        assert_eq!(before_pay(&order("reserved", None), None, 0), None);
        assert_eq!(
            before_pay(&order("reserved", None), Some(&callback(500)), 0),
            None
        );
        assert!(matches!(
            before_pay(&order("reserved", None), Some(&callback(499)), 0),
            Some(Err(Reject::AmountMismatch {
                given: 499,
                total: 500
            }))
        ));
        // Past its expiry, a reservation the sweeper has not reached takes no payment of either kind; a
        // paid order's replay is still answered.
        assert_eq!(before_pay(&order("reserved", None), None, 9_999), None);
        for via in [None, Some(&callback(500))] {
            assert_eq!(
                before_pay(&order("reserved", None), via, 10_000),
                Some(Err(Reject::BadTransition {
                    id: "o1".into(),
                    from: "expired",
                    action: "pay"
                }))
            );
        }
        assert_eq!(
            before_pay(&order("paid", Some("wallet")), None, 20_000),
            Some(Ok(order("paid", Some("wallet"))))
        );
        assert_eq!(
            prior_payment(&callback(500), "o1", "succeeded", 500),
            PriorPayment::Replay
        );
        assert_eq!(
            prior_payment(&callback(500), "o1", "refund_due", 500),
            PriorPayment::Replay
        );
        assert_eq!(
            prior_payment(&callback(500), "o1", "failed", 500),
            PriorPayment::Succeeded
        );
        let failed = PaymentCallback {
            status: "failed".into(),
            ..callback(500)
        };
        // A failed attempt's amount binds nothing: its success is taken with its own.
        assert_eq!(
            prior_payment(&callback(500), "o1", "failed", 499),
            PriorPayment::Succeeded
        );
        for (cb, order, status, amount) in [
            (&failed, "o1", "succeeded", 500),
            (&callback(500), "o2", "failed", 500),
            (&failed, "o1", "failed", 499),
            (&callback(500), "o1", "succeeded", 499),
        ] {
            assert!(
                matches!(
                    prior_payment(cb, order, status, amount),
                    PriorPayment::Conflict(_)
                ),
                "{status} {order} {amount}"
            );
        }
    }

    #[test]
    fn ledger_entries_balance() {
        let lines = [line("a", 2, 0, 150, 1), line("b", 1, 0, 200, 2)];
        let plan = plan_refund("o1", &lines, None).unwrap();
        for paid_via in [Some("wallet"), Some("psp")] {
            let entries = refund_entries(&order("paid", paid_via), &plan);
            assert_eq!(entries.iter().map(|e| e.1).sum::<Cents>(), 0, "{entries:?}");
            assert!(entries.contains(&("shop:1".to_string(), -300)), "{entries:?}");
        }
        let (entries, _) = credit_entries(&["ann".into(), "bob".into()], 700);
        assert_eq!(entries.iter().map(|e| e.1).sum::<Cents>(), 0, "{entries:?}");
        let (shop, reference, entries) = settlement("b1", "shop:7".into(), 900);
        assert_eq!((shop, reference.as_str()), (7, "b1:7"));
        assert_eq!(entries[1], ("payout:7".to_string(), 900));
        assert_eq!(entries.iter().map(|e| e.1).sum::<Cents>(), 0);
    }

    #[test]
    fn a_partial_refund_takes_only_its_units_from_their_shops() {
        let lines = [
            line("a", 3, 1, 100, 1),
            line("b", 2, 0, 250, 2),
            line("c", 1, 0, 40, 1),
        ];
        let plan = plan_refund("o1", &lines, Some(&[want("b", 1), want("a", 2)])).unwrap();
        assert_eq!(plan.take, vec![("a".to_string(), 2), ("b".to_string(), 1)]);
        assert_eq!(
            plan.shares,
            vec![("shop:1".to_string(), 200), ("shop:2".to_string(), 250)]
        );
        assert_eq!((plan.amount, plan.completes), (450, false));
        // A full refund takes what is left, and completes the order.
        let rest = plan_refund("o1", &lines, None).unwrap();
        assert_eq!(rest.amount, 2 * 100 + 2 * 250 + 40);
        assert!(rest.completes);
        // So does a partial refund of exactly what is left.
        let exact = [line("a", 2, 1, 100, 1)];
        assert!(
            plan_refund("o1", &exact, Some(&[want("a", 1)]))
                .unwrap()
                .completes
        );
        // Nothing left: a full refund takes nothing and completes nothing.
        let done = plan_refund("o1", &[line("a", 2, 2, 100, 1)], None).unwrap();
        assert!(done.take.is_empty() && !done.completes && done.amount == 0);
    }

    #[test]
    fn a_refund_of_more_than_is_left_or_of_no_line_names_the_sku() {
        let lines = [line("a", 3, 2, 100, 1)];
        assert_eq!(
            plan_refund("o1", &lines, Some(&[want("a", 2)])),
            Err(Reject::OverRefund {
                id: "o1".into(),
                sku: "a".into(),
                left: 1,
                wanted: 2
            })
        );
        assert_eq!(
            plan_refund("o1", &lines, Some(&[want("z", 1)])),
            Err(Reject::NotInOrder {
                id: "o1".into(),
                sku: "z".into()
            })
        );
        let msg = plan_refund("o1", &lines, Some(&[want("a", 2)]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("1 unit of sku a left"), "{msg}");
    }

    #[test]
    fn refunds_revoke_exactly_the_points_the_payment_granted() {
        for (total, parts) in [
            (1_050, vec![50, 1_000]),
            (999, vec![333, 333, 333]),
            (12_345, vec![45, 300, 12_000]),
            (610, vec![610]),
        ] {
            let mut before = 0;
            let mut revoked = 0;
            for amount in parts {
                revoked += points_revoked(total, before, amount);
                before += amount;
            }
            assert_eq!(before, total);
            assert_eq!(revoked, points(total), "total {total}");
        }
        assert_eq!(refund_part_of(&refund_part_topic(12)), Some(12));
        assert_eq!(refund_event(&refund_part_topic(3)), Some(RefundEvent::Part(3)));
        assert_eq!(refund_event("order.refunded"), Some(RefundEvent::Completing));
        assert_eq!(refund_event("order.paid"), None);
        let part = RefundDone {
            n: 2,
            before: 50,
            amount: 1_000,
        };
        assert_eq!(
            effects(&refund_part_topic(2), 1_050, Some(part)),
            [
                ("points_revoked/r2".to_string(), -10),
                ("notify_refund_part/r2".to_string(), 0)
            ]
        );
        assert_eq!(
            effects("order.paid", 1_050, None),
            [("points".to_string(), 10), ("notify_paid".to_string(), 0)]
        );
        assert_eq!(refund_part_of("order.refunded"), None);
        assert_eq!(refund_ref("o1", 2), "o1/r2");
    }

    #[test]
    fn a_transition_names_the_missing_order_and_the_refused_step() {
        assert!(matches!(
            next_status("o1", None, Transition::Pay).unwrap(),
            Err(Reject::NotFound { what: "order", .. })
        ));
        assert_eq!(
            next_status("o1", Some("reserved"), Transition::Pay).unwrap(),
            Ok((OrderStatus::Reserved, OrderStatus::Paid))
        );
        assert!(matches!(
            next_status("o1", Some("cancelled"), Transition::Pay).unwrap(),
            Err(Reject::BadTransition {
                from: "cancelled",
                ..
            })
        ));
        assert!(next_status("o1", Some("lost"), Transition::Pay).is_err());
    }
}
