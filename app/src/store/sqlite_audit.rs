//! The invariant checks as SQL over one read snapshot (see `crate::audit` for what each one means). Each
//! query returns the offending keys; an empty result is a pass.

use rusqlite::Transaction;

use super::StoreError;
use crate::audit::{AuditReport, Check, Totals};

/// Each check's name and query, for both stores (PostgreSQL runs them unchanged).
pub(super) const CHECKS: &[(&str, &str)] = &[
    ("no_oversell", "SELECT sku FROM skus WHERE available < 0 OR reserved < 0 OR sold < 0
        UNION ALL SELECT sku || '#' || bucket FROM sku_buckets WHERE available < 0"),
    ("stock_conserved", "SELECT s.sku FROM skus s WHERE s.received != s.available + s.reserved + s.sold
        + COALESCE((SELECT SUM(b.available) FROM sku_buckets b WHERE b.sku = s.sku), 0)"),
    ("reserved_matches_orders", "SELECT s.sku FROM skus s WHERE s.reserved != COALESCE((SELECT SUM(l.qty)
        FROM order_lines l JOIN orders o ON o.id = l.order_id WHERE l.sku = s.sku AND o.status = 'reserved'), 0)"),
    ("sold_matches_orders", "SELECT s.sku FROM skus s WHERE s.sold != COALESCE((SELECT SUM(l.qty - l.refunded_qty)
        FROM order_lines l JOIN orders o ON o.id = l.order_id WHERE l.sku = s.sku AND o.status IN ('paid', 'fulfilled')), 0)"),
    ("order_placed_once", "SELECT o.id FROM orders o WHERE (SELECT COUNT(*) FROM outbox x
        WHERE x.order_id = o.id AND x.topic = 'order.placed') != 1
        UNION ALL SELECT id FROM orders o WHERE NOT EXISTS (SELECT 1 FROM order_lines l WHERE l.order_id = o.id)
        UNION ALL SELECT o.id FROM orders o WHERE o.total_cents != (SELECT SUM(l.qty * l.price_cents)
        FROM order_lines l WHERE l.order_id = o.id)"),
    ("ledger_balanced", "SELECT CAST(tx_id AS TEXT) FROM ledger_entries GROUP BY tx_id HAVING SUM(amount) != 0
        UNION ALL SELECT CAST(t.id AS TEXT) FROM ledger_tx t WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.tx_id = t.id)"),
    ("balances_match_entries", "SELECT a.account FROM accounts a WHERE a.balance != COALESCE((SELECT SUM(e.amount)
        FROM ledger_entries e WHERE e.account = a.account), 0)
        UNION ALL SELECT DISTINCT e.account FROM ledger_entries e WHERE NOT EXISTS
        (SELECT 1 FROM accounts a WHERE a.account = e.account)"),
    ("wallets_not_negative", "SELECT account FROM accounts WHERE account LIKE 'user:%' AND balance < 0"),
    ("payments_once", "SELECT o.id FROM orders o WHERE
        (SELECT COUNT(*) FROM ledger_tx t WHERE t.kind = 'pay' AND t.ref = o.id)
          != (CASE WHEN o.status IN ('paid', 'fulfilled', 'refunded') THEN 1 ELSE 0 END)
        OR (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_tx t JOIN ledger_entries e ON e.tx_id = t.id
            WHERE t.kind = 'pay' AND t.ref = o.id AND e.amount > 0)
          != (CASE WHEN o.status IN ('paid', 'fulfilled', 'refunded') THEN o.total_cents ELSE 0 END)
        OR (SELECT COALESCE(SUM(e.amount), 0) FROM refunds r JOIN ledger_tx t ON t.kind = 'refund' AND t.ref = r.ledger_ref
            JOIN ledger_entries e ON e.tx_id = t.id WHERE r.order_id = o.id AND e.amount > 0)
          > (CASE WHEN o.status IN ('paid', 'fulfilled', 'refunded') THEN o.total_cents ELSE 0 END)
        OR (o.status = 'refunded' AND (SELECT COALESCE(SUM(e.amount), 0) FROM refunds r JOIN ledger_tx t
            ON t.kind = 'refund' AND t.ref = r.ledger_ref JOIN ledger_entries e ON e.tx_id = t.id
            WHERE r.order_id = o.id AND e.amount > 0) != o.total_cents)
        UNION ALL SELECT t.ref FROM ledger_tx t WHERE t.kind = 'refund'
          AND NOT EXISTS (SELECT 1 FROM refunds r WHERE r.ledger_ref = t.ref)"),
    ("refunds_match_lines", "SELECT l.order_id || '/' || l.sku FROM order_lines l JOIN orders o ON o.id = l.order_id WHERE
        l.refunded_qty < 0 OR l.refunded_qty > l.qty
        OR l.refunded_qty != COALESCE((SELECT SUM(rl.qty) FROM refund_lines rl
            WHERE rl.order_id = l.order_id AND rl.sku = l.sku), 0)
        OR (o.status = 'refunded' AND l.refunded_qty != l.qty)
        OR (o.status NOT IN ('paid', 'fulfilled', 'refunded') AND l.refunded_qty != 0)
        UNION ALL SELECT r.ledger_ref FROM refunds r WHERE
        r.amount_cents != COALESCE((SELECT SUM(rl.qty * l.price_cents) FROM refund_lines rl JOIN order_lines l
            ON l.order_id = rl.order_id AND l.sku = rl.sku WHERE rl.order_id = r.order_id AND rl.n = r.n), 0)
        OR r.amount_cents != COALESCE((SELECT SUM(e.amount) FROM ledger_tx t JOIN ledger_entries e ON e.tx_id = t.id
            WHERE t.kind = 'refund' AND t.ref = r.ledger_ref AND e.amount >= 0), -1)
        UNION ALL SELECT r.ledger_ref || ' ' || e.account FROM refunds r JOIN ledger_tx t
          ON t.kind = 'refund' AND t.ref = r.ledger_ref JOIN ledger_entries e ON e.tx_id = t.id
        WHERE e.amount < 0 AND -e.amount != COALESCE((SELECT SUM(rl.qty * l.price_cents) FROM refund_lines rl
            JOIN order_lines l ON l.order_id = rl.order_id AND l.sku = rl.sku
            WHERE rl.order_id = r.order_id AND rl.n = r.n AND 'shop:' || l.shop_id = e.account), 0)"),
    ("postings_name_the_payer", "SELECT o.id FROM orders o JOIN ledger_tx t ON t.kind = 'pay' AND t.ref = o.id
        JOIN ledger_entries e ON e.tx_id = t.id WHERE o.paid_via IS NOT NULL AND e.amount < 0
        AND e.account != (CASE WHEN o.paid_via = 'wallet' THEN 'user:' || o.\"user\" ELSE 'psp' END)
        UNION ALL SELECT r.ledger_ref FROM refunds r JOIN orders o ON o.id = r.order_id
        JOIN ledger_tx t ON t.kind = 'refund' AND t.ref = r.ledger_ref JOIN ledger_entries e ON e.tx_id = t.id
        WHERE o.paid_via IS NOT NULL AND e.amount > 0
        AND e.account != (CASE WHEN o.paid_via = 'wallet' THEN 'user:' || o.\"user\" ELSE 'psp' END)"),
    ("payments_match_orders", "SELECT o.id FROM orders o WHERE o.paid_via = 'psp'
        AND o.status IN ('paid', 'fulfilled', 'refunded')
        AND (SELECT COUNT(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'succeeded') != 1
        UNION ALL SELECT p.payment_id FROM payments p JOIN orders o ON o.id = p.order_id
        WHERE p.status = 'succeeded' AND (COALESCE(o.paid_via, '') != 'psp' OR p.amount_cents != o.total_cents)"),
    ("settlements_match_postings", "SELECT s.batch || ':' || s.shop_id FROM settlements s
        WHERE -s.amount_cents != COALESCE((SELECT SUM(e.amount) FROM ledger_tx t JOIN ledger_entries e ON e.tx_id = t.id
            WHERE t.kind = 'settle' AND t.ref = s.batch || ':' || s.shop_id AND e.account = 'shop:' || s.shop_id), 0)
        UNION ALL SELECT t.ref FROM ledger_tx t WHERE t.kind = 'settle'
        AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.batch || ':' || s.shop_id = t.ref)"),
    ("effects_once", "SELECT f.order_id || '/' || f.kind FROM effects f JOIN orders o ON o.id = f.order_id WHERE
        (f.kind IN ('points', 'notify_paid') AND o.status NOT IN ('paid', 'fulfilled', 'refunded'))
        OR (f.kind IN ('points_revoked', 'notify_refunded') AND o.status != 'refunded')
        OR ((f.kind LIKE 'points_revoked/r%' OR f.kind LIKE 'notify_refund_part/r%') AND NOT EXISTS (SELECT 1
            FROM refunds r WHERE r.order_id = f.order_id
            AND f.kind IN ('points_revoked/r' || r.n, 'notify_refund_part/r' || r.n)))
        UNION ALL SELECT order_id FROM effects f WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = f.order_id)"),
];

pub fn audit(tx: &Transaction<'_>) -> Result<AuditReport, StoreError> {
    let mut checks = Vec::new();
    for (name, sql) in CHECKS {
        let bad: Vec<String> = tx
            .prepare_cached(sql)?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        checks.push(Check::of(name, bad));
    }
    let count = |sql: &str| -> Result<i64, StoreError> { Ok(tx.query_row(sql, [], |r| r.get::<_, i64>(0))?) };
    let status = |s: &str| -> Result<u64, StoreError> {
        Ok(
            tx.query_row("SELECT COUNT(*) FROM orders WHERE status = ?1", [s], |r| {
                r.get::<_, i64>(0)
            })? as u64,
        )
    };
    let totals = Totals {
        orders: count("SELECT COUNT(*) FROM orders")? as u64,
        reserved: status("reserved")?,
        paid: status("paid")?,
        fulfilled: status("fulfilled")?,
        cancelled: status("cancelled")?,
        expired: status("expired")?,
        refunded: status("refunded")?,
        units_available: count("SELECT COALESCE(SUM(available), 0) FROM skus")?
            + count("SELECT COALESCE(SUM(available), 0) FROM sku_buckets")?,
        units_reserved: count("SELECT COALESCE(SUM(reserved), 0) FROM skus")?,
        units_sold: count("SELECT COALESCE(SUM(sold), 0) FROM skus")?,
        outbox_pending: count("SELECT COUNT(*) FROM outbox WHERE done = 0")? as u64,
        effects: count("SELECT COUNT(*) FROM effects")? as u64,
        ledger_transactions: count("SELECT COUNT(*) FROM ledger_tx")? as u64,
    };
    Ok(AuditReport::new(checks, totals))
}
