//! The invariant checks on PostgreSQL, over one REPEATABLE READ snapshot: the same queries as
//! `sqlite_audit` (each returns the offending keys; empty is a pass), with sums cast back to BIGINT.

use super::StoreError;
use super::postgres::Tx;
use crate::audit::{AuditReport, Check, Totals};

const CHECKS: &[(&str, &str)] = &[
    ("no_oversell", "SELECT sku FROM skus WHERE available < 0 OR reserved < 0 OR sold < 0
        UNION ALL SELECT sku || '#' || bucket FROM sku_buckets WHERE available < 0"),
    ("stock_conserved", "SELECT s.sku FROM skus s WHERE s.received != s.available + s.reserved + s.sold
        + COALESCE((SELECT SUM(b.available) FROM sku_buckets b WHERE b.sku = s.sku), 0)"),
    ("reserved_matches_orders", "SELECT s.sku FROM skus s WHERE s.reserved != COALESCE((SELECT SUM(l.qty)
        FROM order_lines l JOIN orders o ON o.id = l.order_id WHERE l.sku = s.sku AND o.status = 'reserved'), 0)"),
    ("sold_matches_orders", "SELECT s.sku FROM skus s WHERE s.sold != COALESCE((SELECT SUM(l.qty)
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
        OR (SELECT COUNT(*) FROM ledger_tx t WHERE t.kind = 'refund' AND t.ref = o.id)
          != (CASE WHEN o.status = 'refunded' THEN 1 ELSE 0 END)
        OR (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_tx t JOIN ledger_entries e ON e.tx_id = t.id
            WHERE t.kind = 'pay' AND t.ref = o.id AND e.amount > 0)
          != (CASE WHEN o.status IN ('paid', 'fulfilled', 'refunded') THEN o.total_cents ELSE 0 END)"),
    ("effects_once", "SELECT f.order_id || '/' || f.kind FROM effects f JOIN orders o ON o.id = f.order_id WHERE
        (f.kind IN ('points', 'notify_paid') AND o.status NOT IN ('paid', 'fulfilled', 'refunded'))
        OR (f.kind IN ('points_revoked', 'notify_refunded') AND o.status != 'refunded')
        UNION ALL SELECT order_id FROM effects f WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = f.order_id)"),
];

pub fn audit(t: &mut Tx<'_>) -> Result<AuditReport, StoreError> {
    let mut checks = Vec::new();
    for (name, sql) in CHECKS {
        let bad: Vec<String> = t.query(sql, &[])?.iter().map(|r| r.get(0)).collect();
        checks.push(Check {
            name: (*name).into(),
            ok: bad.is_empty(),
            violations: bad.len() as u64,
            sample: bad.into_iter().take(5).collect(),
        });
    }
    let mut count = |sql: &str| -> Result<i64, StoreError> { Ok(t.one(sql, &[])?.get(0)) };
    let mut totals = Totals {
        orders: count("SELECT COUNT(*) FROM orders")? as u64,
        units_available: count("SELECT COALESCE(SUM(available), 0)::BIGINT FROM skus")?
            + count("SELECT COALESCE(SUM(available), 0)::BIGINT FROM sku_buckets")?,
        units_reserved: count("SELECT COALESCE(SUM(reserved), 0)::BIGINT FROM skus")?,
        units_sold: count("SELECT COALESCE(SUM(sold), 0)::BIGINT FROM skus")?,
        outbox_pending: count("SELECT COUNT(*) FROM outbox WHERE NOT done")? as u64,
        effects: count("SELECT COUNT(*) FROM effects")? as u64,
        ledger_transactions: count("SELECT COUNT(*) FROM ledger_tx")? as u64,
        ..Totals::default()
    };
    for row in t.query("SELECT status, COUNT(*) FROM orders GROUP BY status", &[])? {
        let (status, n): (String, i64) = (row.get(0), row.get(1));
        let n = n as u64;
        match status.as_str() {
            "reserved" => totals.reserved = n,
            "paid" => totals.paid = n,
            "fulfilled" => totals.fulfilled = n,
            "cancelled" => totals.cancelled = n,
            "expired" => totals.expired = n,
            "refunded" => totals.refunded = n,
            _ => {}
        }
    }
    Ok(AuditReport::new(checks, totals))
}
