//! The embedded SQLite store: WAL, `synchronous=FULL`, a busy timeout, `BEGIN IMMEDIATE` for every write (so a
//! read-then-write never upgrades a lock and deadlocks), schema migrations and the demo seed on start. Safe for
//! several app processes on one host sharing the file: SQLite's file locks serialise writers, and every stock
//! decrement is conditional inside the writer's transaction.
//!
//! Waiting for the write lock is what sets the tail of every write, so three things keep it short:
//! - **One writer per process.** A process's writers queue on an in-process mutex, which wakes the next one
//!   the moment the lock is free; only one thread per process contends for SQLite's file lock.
//! - **A polling busy handler.** Between processes SQLite can only poll. Its default handler sleeps 1, 2, 5,
//!   10, ... up to 100 ms between tries, so one unlucky order waits tens of milliseconds for a lock that was
//!   free after one; ours retries after 50 µs, doubling to at most 1 ms, up to the busy timeout.
//! - **Checkpoints off the commit path.** The app checkpoints the WAL from a background task
//!   ([`Store::maintain`]); a commit never waits for the database file's fsync.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use super::{
    Created, OrderView, PaymentCallback, Product, RefundRequest, Refunded, Restocked, Settlement, Sku,
    StockUpdate, Store, StoreError, StoreResult,
};
use crate::audit::AuditReport;
use crate::domain::{Cents, NewOrder, Reject};

/// The SQLite store: a small pool of connections to one file.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    busy_timeout: Duration,
    pool: Mutex<Vec<Connection>>,
    /// Held for every write transaction: this process's writers wait here, not in SQLite's busy polling.
    writer: Mutex<()>,
}

/// SQLite's own checkpoint, run inside the commit that crosses this many WAL pages, is only a backstop for
/// a store whose owner runs no [`Store::maintain`] (a tool opening the file). Its default of 1,000 pages came
/// every ~60 orders, and that order then waited for the database file's fsync (40–100 ms seen here) while
/// holding this process's writer mutex: every write of the process stalled behind it.
const AUTO_CHECKPOINT_PAGES: u32 = 16_384;

/// The busy handler's first and longest pause between tries for a lock another process holds.
const BUSY_FIRST_PAUSE: Duration = Duration::from_micros(50);
const BUSY_MAX_PAUSE: Duration = Duration::from_millis(1);

thread_local! {
    /// The busy timeout of the store this thread is using (set by `take`; the handler is a plain `fn`
    /// and a connection moves between threads, so the timeout travels with the call, not the connection).
    static BUSY_TIMEOUT: Cell<Duration> = const { Cell::new(Duration::from_secs(10)) };
    /// When the current wait for a lock began.
    static BUSY_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Waits for another process's write lock since start (also exported as a metric; tests read this one).
pub(crate) static LOCK_WAITS: AtomicU64 = AtomicU64::new(0);

/// SQLite's busy handler: `tries` is how many times it was called for this wait. Returns whether to try
/// again; giving up makes the statement fail with SQLITE_BUSY (our retryable 503).
fn on_busy(tries: i32) -> bool {
    let now = Instant::now();
    let since = match BUSY_SINCE.get() {
        Some(t) if tries > 0 => t,
        _ => {
            LOCK_WAITS.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::STORE_LOCK_WAITS_TOTAL).increment(1);
            BUSY_SINCE.set(Some(now));
            now
        }
    };
    if now.duration_since(since) >= BUSY_TIMEOUT.get() {
        return false;
    }
    let shift = u32::try_from(tries.clamp(0, 5)).unwrap_or(5);
    std::thread::sleep((BUSY_FIRST_PAUSE * (1 << shift)).min(BUSY_MAX_PAUSE));
    true
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy(e.to_string()),
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database, migrates it and seeds the demo catalog when asked and empty.
    pub fn open(path: &Path, busy_timeout: Duration, seed_demo: bool) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        // A new database is readable by its owner alone: it holds the customers' orders and wallets, and
        // SQLite gives its `-wal` and `-shm` files the database file's mode. Made by SQLite, it was 0644 under
        // the usual umask, open to every user of the host. An existing file keeps the mode it has.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Internal(format!("cannot open {}: {e}", path.display())))?;
        }
        let store = SqliteStore {
            path: path.to_path_buf(),
            busy_timeout,
            pool: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
        };
        let mut conn = store.take()?;
        super::sqlite_schema::migrate(&mut conn)?;
        if seed_demo {
            super::sqlite_schema::seed_demo(&mut conn)?;
        }
        store.put(conn);
        Ok(store)
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Internal(format!("cannot open {}: {e}", self.path.display())))?;
        conn.busy_handler(Some(on_busy))?;
        // WAL lets readers run beside the one writer; FULL makes every commit durable before it returns,
        // which is what lets the API acknowledge an order only after its commit.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Internal(format!(
                "journal_mode is {mode}, WAL required"
            )));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint={AUTO_CHECKPOINT_PAGES};"
        ))?;
        Ok(conn)
    }

    /// A connection for this thread's next statements, with this store's busy timeout in force.
    fn take(&self) -> Result<Connection, StoreError> {
        BUSY_TIMEOUT.set(self.busy_timeout);
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => self.connect(),
        }
    }

    fn put(&self, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 64 {
            pool.push(conn);
        }
    }

    /// Runs `f` on a pooled connection.
    pub(crate) fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let out = f(&mut conn);
        // A connection left inside a transaction (a failed commit) is not reused.
        if conn.is_autocommit() {
            self.put(conn);
        }
        out
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction, committing when it returns `Ok`.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Like `write`, for calls whose domain answer is a rejection: a rejection rolls back too.
    pub(crate) fn write_domain<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<Result<T, Reject>, StoreError>,
    ) -> StoreResult<T> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            match f(&tx)? {
                Ok(v) => {
                    tx.commit()?;
                    Ok(Ok(v))
                }
                Err(r) => {
                    tx.rollback()?;
                    Ok(Err(r))
                }
            }
        })
    }
}

impl Store for SqliteStore {
    fn list_products(&self, after: i64, limit: u32) -> Result<Vec<Product>, StoreError> {
        self.with_conn(|c| super::sqlite_orders::list_products(c, after, limit))
    }
    fn get_product(&self, id: i64) -> Result<Option<Product>, StoreError> {
        self.with_conn(|c| Ok(super::sqlite_orders::list_products_from(c, id, 1, true)?.pop()))
    }
    // An order and its lines are read in one read transaction (one snapshot), as PostgreSQL reads them: two
    // statements apart, a refund committed between them showed a `paid` order with every line refunded.
    fn get_order(&self, id: &str) -> Result<Option<OrderView>, StoreError> {
        self.with_conn(|c| super::sqlite_orders::load_order(&*c.transaction()?, id))
    }
    // An attempt of this process in flight is the API's to know (`placing::Placing`), so `Writing` is never
    // answered here. One of another process on the same file (waiting for SQLite's write lock) is not seen.
    fn keyed_answer(&self, o: &NewOrder) -> Result<super::Keyed, StoreError> {
        let stored = self.with_conn(|c| super::sqlite_orders::keyed_answer(&*c.transaction()?, o))?;
        Ok(stored.map_or(super::Keyed::Free, super::Keyed::Stored))
    }
    fn user_orders(
        &self,
        user: &str,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        // One snapshot for the orders and their lines, as `get_order`: a refund committed between the two
        // reads showed an order `paid` with every line refunded.
        self.with_conn(|c| super::sqlite_orders::user_orders(&*c.transaction()?, user, before, limit))
    }
    fn create_orders(
        &self,
        orders: &[NewOrder],
        inline_weak: bool,
    ) -> Result<Vec<Result<Created, Reject>>, StoreError> {
        self.write(|tx| super::sqlite_orders::create_orders(tx, orders, inline_weak))
    }
    fn pay_wallet(&self, order_id: &str, inline_weak: bool) -> StoreResult<OrderView> {
        self.write_domain(|tx| super::sqlite_money::pay(tx, order_id, None, inline_weak))
    }
    fn payment_callback(&self, cb: &PaymentCallback, inline_weak: bool) -> StoreResult<OrderView> {
        self.write_domain(|tx| super::sqlite_money::callback(tx, cb, inline_weak))
    }
    fn cancel(&self, order_id: &str) -> StoreResult<(OrderView, bool)> {
        self.write_domain(|tx| super::sqlite_orders::cancel(tx, order_id))
    }
    fn fulfil(&self, order_id: &str) -> StoreResult<OrderView> {
        self.write_domain(|tx| super::sqlite_orders::fulfil(tx, order_id))
    }
    fn refund(&self, r: &RefundRequest, inline_weak: bool) -> StoreResult<Refunded> {
        self.write_domain(|tx| super::sqlite_money::refund(tx, r, inline_weak))
    }
    fn expire_due(&self, now_ms: i64, limit: u32) -> Result<super::Expired, StoreError> {
        self.write(|tx| super::sqlite_orders::expire_due(tx, now_ms, limit))
    }
    fn run_outbox(&self, limit: u32) -> Result<u32, StoreError> {
        self.write(|tx| super::sqlite_money::run_outbox(tx, limit))
    }
    fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.with_conn(|c| {
            let n: i64 = c.query_row("SELECT COUNT(*) FROM outbox WHERE done = 0", [], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
    }
    fn oldest_reservation_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.with_conn(|c| {
            let at = c
                .prepare_cached(super::OLDEST_HELD_SQL)?
                .query_row([], |r| r.get(0))
                .optional()?;
            Ok(at)
        })
    }
    fn update_stock(&self, updates: &[StockUpdate]) -> StoreResult<Vec<Sku>> {
        self.write_domain(|tx| super::sqlite_orders::update_stock(tx, updates))
    }
    fn update_stock_once(&self, key: &str, updates: &[StockUpdate]) -> StoreResult<Restocked> {
        self.write_domain(|tx| super::sqlite_orders::update_stock_once(tx, key, updates))
    }
    fn open_flash_sale(&self, sku: &str, buckets: u32) -> StoreResult<Sku> {
        self.write_domain(|tx| super::sqlite_orders::open_flash_sale(tx, sku, buckets))
    }
    fn close_flash_sale(&self, sku: &str) -> StoreResult<Sku> {
        self.write_domain(|tx| super::sqlite_orders::close_flash_sale(tx, sku))
    }
    fn credit(&self, users: &[String], amount: Cents) -> Result<(), StoreError> {
        self.write(|tx| super::sqlite_money::credit(tx, users, amount))
    }
    fn credit_once(&self, key: &str, users: &[String], amount: Cents) -> StoreResult<bool> {
        self.write_domain(|tx| super::sqlite_money::credit_once(tx, key, users, amount))
    }
    fn balance(&self, account: &str) -> Result<Cents, StoreError> {
        self.with_conn(|c| super::sqlite_money::balance(c, account))
    }
    fn shop_exists(&self, id: i64) -> Result<bool, StoreError> {
        self.with_conn(|c| {
            let found = c
                .prepare_cached("SELECT 1 FROM shops WHERE id = ?1")?
                .query_row([id], |_| Ok(()));
            Ok(rusqlite::OptionalExtension::optional(found)?.is_some())
        })
    }
    fn settle(&self) -> Result<Vec<Settlement>, StoreError> {
        self.write(super::sqlite_money::settle)
    }
    fn maintain(&self) -> Result<(), StoreError> {
        // PASSIVE copies what it can without waiting for any lock; another process's checkpoint running
        // at the same time makes this one busy, which is fine: that one does the work.
        // The row is (busy, frames in the WAL, frames copied into the database file).
        let frames = self.with_conn(|c| {
            Ok(c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })?)
        });
        match frames {
            Ok((log, copied)) => {
                let left = log.saturating_sub(copied).max(0);
                metrics::gauge!(crate::metrics::STORE_WAL_FRAMES).set(left as f64);
                Ok(())
            }
            Err(StoreError::Busy(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn audit(&self) -> Result<AuditReport, StoreError> {
        // One read transaction, so every check sees the same snapshot.
        self.with_conn(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let report = super::sqlite_audit::audit(&tx)?;
            tx.commit()?;
            Ok(report)
        })
    }
}
