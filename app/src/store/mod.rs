//! The store: the only authority for stock and money. [`Store`] is a synchronous trait (callers run it on
//! blocking threads through [`crate::exec::StoreExec`]), so a PostgreSQL backend with its own connection pool
//! implements the same methods with `SELECT ... FOR UPDATE SKIP LOCKED` where SQLite takes the write lock.
//!
//! Every write method is one transaction: a method returns only after its commit is durable.

// PostgreSQL backend (issue 8).
mod order_rules;

/// Ledger account names: a user's wallet, what a shop is owed, what it was paid out.
pub(crate) use order_rules::{payout as payout_account, shop as shop_account, wallet as wallet_account};
pub mod postgres;
mod postgres_audit;
mod postgres_create;
mod postgres_money;
mod postgres_orders;
mod postgres_schema;
pub mod sqlite;
mod sqlite_audit;
mod sqlite_money;
mod sqlite_orders;
mod sqlite_schema;
#[cfg(test)]
pub(crate) mod tests;

use serde::{Deserialize, Serialize};

use crate::audit::AuditReport;
use crate::domain::{Cents, Clock, NewOrder, OrderLineReq, Reject, refund_fingerprint};

/// Why a store call failed: infrastructure, not the request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another writer held the lock past the busy timeout: retryable.
    #[error("store busy: {0}")]
    Busy(String),
    #[error("store failure: {0}")]
    Internal(String),
    /// A write given up on while it ran ([`crate::exec::StoreExec::bounded`]): it runs on and may still
    /// commit. Retryable under an idempotency key (the retry replays it), not blindly.
    #[error("store busy: {0}")]
    Unsettled(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Busy(_) | StoreError::Unsettled(_))
    }
}

/// Refuses a store whose schema a newer build migrated (`current` past the `known` versions of this one): this
/// build would write rows without what the newer one counts on (a flash-sale line without its sale number),
/// so an old instance restarted during a rolling upgrade stops with why instead of running on.
fn newer_than_this_build(current: i64, known: usize) -> Result<(), StoreError> {
    if current > known as i64 {
        return Err(StoreError::Internal(format!(
            "the store's schema is version {current}, newer than this build knows ({known}): \
             run the newer xcluster (a rolling upgrade that went back?)"
        )));
    }
    Ok(())
}

/// A store result whose inner `Result` carries the domain's answer.
pub type StoreResult<T> = Result<Result<T, Reject>, StoreError>;

/// A SKU as the catalog shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sku {
    pub sku: String,
    pub price_cents: Cents,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    /// Units held in flash-sale buckets (sellable, counted apart from `available`).
    pub bucketed: i64,
    /// Its flash sale is open: only `POST /v1/seckill/{sku}` sells it, within the per-user limit.
    #[serde(default)]
    pub flash_sale: bool,
    /// The number of its latest flash sale (0 before the first): it grows when a sale opens on a SKU with
    /// none open, and the per-user limit counts only the units bought under it.
    #[serde(default)]
    pub sale_seq: i64,
}

/// A product (SPU) with its SKUs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Product {
    pub id: i64,
    pub shop_id: i64,
    pub name: String,
    pub skus: Vec<Sku>,
}

/// An order line as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineView {
    pub sku: String,
    pub qty: i64,
    pub price_cents: Cents,
    /// Units of the line refunded so far (0..=qty). Absent from answers stored before refunds were partial.
    #[serde(default)]
    pub refunded_qty: i64,
    /// The flash sale (its SKU's `sale_seq`) a flash-sale line was sold in, which the per-user limit counts it
    /// against; none on an ordinary line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sale_seq: Option<i64>,
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderView {
    pub id: String,
    pub user: String,
    pub kind: String,
    pub status: String,
    pub total_cents: Cents,
    pub lines: Vec<LineView>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub paid_via: Option<String>,
    /// What refunds have given back so far: the refunded units at their lines' prices.
    #[serde(default)]
    pub refunded_cents: Cents,
}

/// The result of creating an order: the answer and whether it was an idempotent replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub order: OrderView,
    pub replay: bool,
}

/// What an idempotency key holds for a request a gate would refuse ([`Store::keyed_answer`]).
#[derive(Debug)]
pub enum Keyed {
    /// No order is stored under it, and no attempt under it is writing one that this store can see.
    Free,
    /// An attempt under it is in its transaction (on any instance, with PostgreSQL) and may yet commit.
    Writing,
    /// What the order stored under it answers: its replay, or the conflict when asked for differently.
    Stored(Result<Created, Reject>),
}

/// A refund as the store takes it (the API has checked its lines: `bodies::RefundReq::check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub order_id: String,
    /// The units to refund; `None` refunds every unit not refunded yet.
    pub lines: Option<Vec<OrderLineReq>>,
    /// The order's own idempotency key for this refund (required with `lines` by the API).
    pub idem_key: Option<String>,
    /// SHA-256 of the order and the lines, so a key reused with another body is caught.
    pub fingerprint: String,
}

impl RefundRequest {
    pub fn new(order_id: &str, lines: Option<Vec<OrderLineReq>>, idem_key: Option<String>) -> Self {
        RefundRequest {
            fingerprint: refund_fingerprint(order_id, lines.as_deref()),
            order_id: order_id.into(),
            lines,
            idem_key,
        }
    }
}

/// The result of a refund: the order after it, and whether it was a keyed replay (the first answer again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub order: OrderView,
    pub replay: bool,
    /// The units this refund put back on sale, per SKU: none once the order had shipped (the goods are
    /// with the buyer), nor for a replay or a refund of nothing. The Redis gate's stock counter takes them.
    pub restocked: Vec<(String, i64)>,
}

/// What a sweep expired.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub orders: u32,
    /// Each expired flash-sale order's lines: the Redis gate forgets what it counted of them under their
    /// sale, as on a cancel, and has their units back on its stock counter.
    pub flash_sale: Vec<ExpiredLine>,
    /// The units the other expired orders put back on sale, per SKU (in name order): a flash sale of the
    /// SKU sells them too, so they go on the gate's stock counter.
    pub restocked: Vec<(String, i64)>,
}

impl Expired {
    /// Counts `qty` units of `sku` back on sale in [`Expired::restocked`].
    fn restock(&mut self, sku: String, qty: i64) {
        match self.restocked.binary_search_by(|(s, _)| s.as_str().cmp(&sku)) {
            Ok(at) => self.restocked[at].1 += qty,
            Err(at) => self.restocked.insert(at, (sku, qty)),
        }
    }
}

/// A line of an expired flash-sale order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLine {
    pub user: String,
    pub sku: String,
    /// The sale it was sold in. A line without a number (written by the build before, during a rolling
    /// upgrade) is in the SKU's current sale, where the limit counts it.
    pub sale: i64,
    /// Its units, back on sale.
    pub qty: i64,
}

/// A payment provider's callback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PaymentCallback {
    /// The provider's id for the payment: the idempotency key of the callback.
    pub payment_id: String,
    pub order_id: String,
    pub amount_cents: Cents,
    /// `succeeded` or `failed`.
    pub status: String,
}

/// One merchant stock/price change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StockUpdate {
    pub sku: String,
    /// Units received into stock (added to `available`).
    #[serde(default)]
    pub receive: u32,
    /// Units written off (damaged, lost, a stock count that found fewer): taken from `available` (after
    /// `receive`) and from `received`; more than `available` holds refuses the whole batch.
    #[serde(default)]
    pub write_off: u32,
    /// A new price, if any.
    #[serde(default)]
    pub price_cents: Option<Cents>,
}

/// The result of a keyed merchant stock batch: the SKUs as the batch left them, and whether it was a replay
/// (the first answer again, nothing applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restocked {
    pub skus: Vec<Sku>,
    pub replay: bool,
}

/// One merchant's settlement in a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settlement {
    pub batch: String,
    pub shop_id: i64,
    pub amount_cents: Cents,
}

/// The first expiry among held reservations, the same statement on both backends. `ORDER BY ... LIMIT 1`
/// rather than `MIN()`: its plan is the `orders_due` index seek whatever SQLite's version (test
/// `sqlite_oldest_reservation_is_one_index_seek`).
pub(crate) const OLDEST_HELD_SQL: &str =
    "SELECT expires_ms FROM orders WHERE status = 'reserved' ORDER BY expires_ms LIMIT 1";

/// The store: catalog, orders, payments, outbox and audit.
pub trait Store: Send + Sync + 'static {
    /// Products with their SKUs, by id, after `after`, at most `limit`.
    fn list_products(&self, after: i64, limit: u32) -> Result<Vec<Product>, StoreError>;
    fn get_product(&self, id: i64) -> Result<Option<Product>, StoreError>;
    fn get_order(&self, id: &str) -> Result<Option<OrderView>, StoreError>;
    /// `user`'s orders, newest first, from before `before` (`(created_ms, id)` of the last one seen), at
    /// most `limit`.
    fn user_orders(
        &self,
        user: &str,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError>;

    /// What `o`'s idempotency key holds: the answer an earlier order under it gave (or the conflict, when
    /// that order was asked for differently), an attempt under it still writing, or nothing (as for a
    /// request without a key). A gate that would refuse `o` (sold out, over the buyer's limit) asks this
    /// first, so a replay still gets its first answer, and a retry is not told `sold_out` while its first
    /// attempt may still commit.
    fn keyed_answer(&self, o: &NewOrder) -> Result<Keyed, StoreError>;

    /// Creates orders in ONE transaction (one per call at the sync level, a group at the queued level):
    /// for each, the conditional stock decrements, the order row and its outbox row, or nothing (a
    /// savepoint per order). `inline_weak` writes the weak effects (points, notifications) in the same
    /// transaction instead of leaving them to the outbox workers.
    fn create_orders(
        &self,
        orders: &[NewOrder],
        inline_weak: bool,
    ) -> Result<Vec<Result<Created, Reject>>, StoreError>;

    /// Pays a reserved order from the buyer's wallet.
    fn pay_wallet(&self, order_id: &str, inline_weak: bool) -> StoreResult<OrderView>;
    /// Applies a provider callback; the same `payment_id` twice has one effect.
    fn payment_callback(&self, cb: &PaymentCallback, inline_weak: bool) -> StoreResult<OrderView>;
    /// Cancels a reservation; a second cancel answers the same view. With it, whether this cancel ended the
    /// order (false for the second): what the gates give back (a buyer's count, a sold-out mark) is given
    /// back once, not at every repeat, which anyone could send to keep a sold-out sale's flood off the
    /// gates.
    fn cancel(&self, order_id: &str) -> StoreResult<(OrderView, bool)>;
    fn fulfil(&self, order_id: &str) -> StoreResult<OrderView>;
    /// Refunds the named units of a paid or fulfilled order (all not yet refunded when `lines` is `None`) to
    /// whoever paid, each shop giving back its lines' share; unshipped units go back on sale. The order is
    /// `refunded` once every unit is. A full refund of a refunded order is a no-op answer; a key already used
    /// on the order answers its first result again (`replay`), or `IdempotencyConflict` for another body.
    fn refund(&self, r: &RefundRequest, inline_weak: bool) -> StoreResult<Refunded>;

    /// Expires reservations due at `now_ms` (at most `limit`), each giving its stock back exactly once.
    fn expire_due(&self, now_ms: i64, limit: u32) -> Result<Expired, StoreError>;
    /// Runs up to `limit` pending outbox items (idempotent effects) and marks them done, in one transaction.
    fn run_outbox(&self, limit: u32) -> Result<u32, StoreError>;
    /// Pending outbox items.
    fn outbox_depth(&self) -> Result<u64, StoreError>;
    /// The expiry (ms) of the reservation still held that expires first, `None` when none is held: one seek
    /// in the `orders_due (status, expires_ms)` index, cheap enough for the once-a-second sampler, which
    /// turns it into `xcluster_app_reservations_overdue_seconds` (how far the sweepers lag).
    fn oldest_reservation_expiry(&self) -> Result<Option<i64>, StoreError>;

    /// The clock this store's reservations are timed by ([`Clock`]); clones share its offset.
    fn clock(&self) -> Clock {
        Clock::default()
    }

    /// Reads the store's clock again, to keep [`Store::clock`]'s offset true (clocks drift, and are stepped).
    /// Nothing to read for a store whose clock is this host's.
    fn sync_clock(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn update_stock(&self, updates: &[StockUpdate]) -> StoreResult<Vec<Sku>>;
    /// A batch sent with idempotency key `key` applies once: the batch and the key's record (its fingerprint
    /// and answer) commit in one transaction, so a retry after a lost answer finds it and gets that answer
    /// again (`replay`), and another batch under the key is `IdempotencyConflict`. A refused batch records
    /// nothing: it changed nothing, so its key may carry it again.
    fn update_stock_once(&self, key: &str, updates: &[StockUpdate]) -> StoreResult<Restocked>;
    /// Moves a SKU's available stock into `buckets` flash-sale buckets: the sale is open. A SKU with no sale
    /// open starts a new one (its `sale_seq` grows, so the per-user limit starts afresh); one open already
    /// only gets the stock.
    fn open_flash_sale(&self, sku: &str, buckets: u32) -> StoreResult<Sku>;
    /// Ends a SKU's flash sale: its buckets' units go back to `available`, for ordinary orders. Closing a
    /// SKU with no open sale changes nothing and answers the same.
    fn close_flash_sale(&self, sku: &str) -> StoreResult<Sku>;
    /// Credits wallets from the mint account (one ledger transaction).
    fn credit(&self, users: &[String], amount: Cents) -> Result<(), StoreError>;
    /// A credit sent with idempotency key `key` posts once: `Ok(true)` answers a replay of the same credit,
    /// `IdempotencyConflict` one of another credit under the key.
    fn credit_once(&self, key: &str, users: &[String], amount: Cents) -> StoreResult<bool>;
    fn balance(&self, account: &str) -> Result<Cents, StoreError>;
    /// Whether shop `id` is in the catalog.
    fn shop_exists(&self, id: i64) -> Result<bool, StoreError>;
    /// Settles every merchant's receivable into its payout account, as one batch.
    fn settle(&self) -> Result<Vec<Settlement>, StoreError>;

    /// Checks every invariant on the live data.
    fn audit(&self) -> Result<AuditReport, StoreError>;

    /// Housekeeping run in the background, never on a request's path (SQLite: a checkpoint of the
    /// write-ahead log). The default has none.
    fn maintain(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
