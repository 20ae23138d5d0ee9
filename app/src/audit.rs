//! The invariant checker's report, served at `GET /admin/audit` and used by the tests. The checks themselves
//! run inside the store (one read snapshot); this module owns what they mean:
//!
//! - `no_oversell`: no SKU has negative available, reserved or sold stock;
//! - `stock_conserved`: received = available + bucketed + reserved + sold, per SKU;
//! - `reserved_matches_orders` / `sold_matches_orders`: the stock columns equal the order lines in the
//!   `reserved` and `paid`/`fulfilled` orders, less their refunded units (so every expiry, cancel and refund
//!   gave stock back exactly once);
//! - `order_placed_once`: every order has exactly one `order.placed` outbox row (an acknowledged order exists
//!   once, with its follow-up work queued);
//! - `ledger_balanced`: every ledger transaction sums to zero;
//! - `balances_match_entries`: every account's balance equals the sum of its entries;
//! - `wallets_not_negative`: no buyer wallet below zero;
//! - `payments_once`: paid, fulfilled and refunded orders have exactly one payment posting of their total,
//!   others none; an order's refund postings give back at most its payment, exactly its total once it is
//!   `refunded`; every refund posting belongs to a refund of an order (idempotent replays and retried
//!   refunds had no second effect);
//! - `refunds_match_lines`: each line's refunded units are within its quantity and the sum of its refunds'
//!   units (all of them for a `refunded` order, none for one never paid); each refund's posting gives back
//!   its units at their lines' prices, and each shop exactly its own lines' share;
//! - `postings_name_the_payer`: an order's payment is taken from, and each of its refunds given back to, the
//!   account that paid it (the buyer's wallet, or the provider's `psp`), never another's;
//! - `payments_match_orders`: an order the provider paid has exactly one `succeeded` payment, of its total,
//!   and a `succeeded` payment belongs to such an order (one its order could not take is `refund_due`);
//! - `settlements_match_postings`: each settlement row is what its posting took from its shop, and each
//!   settlement posting has its row;
//! - `effects_once`: no weak effect for an order that never reached the state that causes it, nor a partial
//!   refund's (`points_revoked/r<n>`) for a refund the order does not have.

use serde::{Deserialize, Serialize};

/// One check's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// How many rows break the invariant.
    pub violations: u64,
    /// A few offending keys, for a human.
    pub sample: Vec<String>,
}

impl Check {
    /// The outcome of check `name` whose query returned the keys in `bad`.
    pub fn of(name: &str, bad: Vec<String>) -> Self {
        Check {
            name: name.into(),
            ok: bad.is_empty(),
            violations: bad.len() as u64,
            sample: bad.into_iter().take(5).collect(),
        }
    }
}

/// Totals that describe the end state (the benchmark compares them across levels).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Totals {
    pub orders: u64,
    pub reserved: u64,
    pub paid: u64,
    pub fulfilled: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub refunded: u64,
    pub units_available: i64,
    pub units_reserved: i64,
    pub units_sold: i64,
    pub outbox_pending: u64,
    pub effects: u64,
    pub ledger_transactions: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditReport {
    pub ok: bool,
    pub checks: Vec<Check>,
    pub totals: Totals,
}

impl AuditReport {
    pub fn new(checks: Vec<Check>, totals: Totals) -> Self {
        Self {
            ok: checks.iter().all(|c| c.ok),
            checks,
            totals,
        }
    }

    /// The names of failing checks.
    pub fn failures(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }
}
