//! Pure domain types and rules: money in integer minor units, the order state machine, validated requests
//! and idempotency fingerprints. No I/O here; the store and the API both speak these types.

pub mod clock;
pub mod order;
pub mod request;

pub use clock::Clock;
pub use order::{OrderKind, OrderStatus, Transition};
pub use request::{
    NewOrder, OrderLineReq, fingerprint, new_order_id, now_ms, refund_fingerprint, stock_fingerprint,
    valid_id,
};

use serde::Serialize;

/// Money in minor units (cents). Never a float.
pub type Cents = i64;

/// Why the domain refused a request (a client-side problem, never retryable as is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reject {
    #[error("no such {what}: {id}")]
    NotFound { what: &'static str, id: String },
    #[error("sku {sku} has only {available} {} available, {wanted} wanted", units(*available))]
    OutOfStock {
        sku: String,
        available: i64,
        wanted: i64,
    },
    #[error("sku {sku} is sold out")]
    SoldOut { sku: String },
    #[error("idempotency key {key:?} was used with a different request")]
    IdempotencyConflict { key: String },
    #[error("order {id} is {from}; cannot {action}")]
    BadTransition {
        id: String,
        from: &'static str,
        action: &'static str,
    },
    #[error("account {account} has {balance} cents, {needed} needed")]
    InsufficientFunds {
        account: String,
        balance: Cents,
        needed: Cents,
    },
    // Per sale: the SKU's flash-sale orders of its current sale (`sale_seq`) still live count; a buyer of
    // the last sale may buy up to the limit again.
    #[error("user {user} may buy at most {limit} {} of {sku} in flash-sale orders", units(i64::from(*limit)))]
    LimitExceeded { user: String, sku: String, limit: u32 },
    #[error("payment amount {given} does not match the order total {total}")]
    AmountMismatch { given: Cents, total: Cents },
    /// An ordinary order for a SKU whose flash sale is open: it would pass the per-user limit.
    #[error("sku {sku} is on flash sale: buy it with POST /v1/seckill/{sku}")]
    OnFlashSale { sku: String },
    /// A partial refund naming a SKU the order has no line for.
    #[error("order {id} has no line for sku {sku}")]
    NotInOrder { id: String, sku: String },
    /// A partial refund of more units than its line has left unrefunded.
    #[error("order {id} has {left} {} of sku {sku} left to refund, {wanted} wanted", units(*left))]
    OverRefund {
        id: String,
        sku: String,
        left: i64,
        wanted: i64,
    },
}

fn units(n: i64) -> &'static str {
    if n == 1 { "unit" } else { "units" }
}

impl Reject {
    /// The stable machine-readable code (also the JSON `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Reject::NotFound { .. } => "not_found",
            Reject::OutOfStock { .. } => "out_of_stock",
            Reject::SoldOut { .. } => "sold_out",
            Reject::IdempotencyConflict { .. } => "idempotency_conflict",
            Reject::BadTransition { .. } => "bad_transition",
            Reject::InsufficientFunds { .. } => "insufficient_funds",
            Reject::LimitExceeded { .. } => "limit_exceeded",
            Reject::AmountMismatch { .. } => "amount_mismatch",
            Reject::OnFlashSale { .. } => "on_flash_sale",
            Reject::NotInOrder { .. } => "not_in_order",
            Reject::OverRefund { .. } => "over_refund",
        }
    }

    /// The HTTP status this rejection maps to.
    pub fn status(&self) -> u16 {
        match self {
            Reject::NotFound { .. } => 404,
            Reject::OutOfStock { .. } | Reject::SoldOut { .. } | Reject::OnFlashSale { .. } => 409,
            Reject::IdempotencyConflict { .. } => 422,
            Reject::BadTransition { .. } => 409,
            Reject::InsufficientFunds { .. } => 402,
            Reject::LimitExceeded { .. } => 429,
            Reject::AmountMismatch { .. } => 422,
            // The request names something the order does not hold: no retry can make it right.
            Reject::NotInOrder { .. } => 422,
            // Like a short stock: the order holds fewer units than asked, as its view shows.
            Reject::OverRefund { .. } => 409,
        }
    }
}
