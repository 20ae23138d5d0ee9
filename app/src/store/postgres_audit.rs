//! The invariant checks on PostgreSQL, over one REPEATABLE READ snapshot: the queries of `sqlite_audit`
//! (each returns the offending keys; empty is a pass); the totals cast their sums back to BIGINT.

use super::StoreError;
use super::postgres::Tx;
use super::sqlite_audit::CHECKS;
use crate::audit::{AuditReport, Check, Totals};

pub fn audit(t: &mut Tx<'_>) -> Result<AuditReport, StoreError> {
    let mut checks = Vec::new();
    for (name, sql) in CHECKS {
        let bad: Vec<String> = t.query(sql, &[])?.iter().map(|r| r.get(0)).collect();
        checks.push(Check::of(name, bad));
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
