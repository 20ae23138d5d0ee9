//! The PostgreSQL store, for app instances on several hosts sharing one database: the same schema and
//! invariants as the SQLite store (`postgres_*` mirror `sqlite_*` file by file), on the synchronous `postgres`
//! client (the trait runs on blocking threads) with a small bounded pool of its own.
//!
//! Where SQLite serialises every writer with `BEGIN IMMEDIATE`, PostgreSQL runs writers side by side under
//! READ COMMITTED, so each read-then-write takes the lock it needs: conditional `UPDATE ... WHERE available >=`
//! for stock (re-checked on the newest row version), `SELECT ... FOR UPDATE` on the order and the paying
//! wallet, transaction-scoped advisory locks on an idempotency key or a payment id, SKU rows locked first by
//! every order creation (`postgres_create`), and `FOR UPDATE SKIP LOCKED` for the sweeper and the outbox
//! workers so instances share the work without waiting on each other. Serialization failures, deadlocks, lock and statement timeouts and lost connections are
//! retried here a few times, then surface as the retryable [`StoreError::Busy`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, NoTls, Row, Statement, Transaction};

use super::{
    Created, OrderView, PaymentCallback, Product, RefundRequest, Refunded, Restocked, Settlement, Sku,
    StockUpdate, Store, StoreError, StoreResult,
};
use crate::audit::AuditReport;
use crate::domain::{Cents, Clock, NewOrder, Reject, now_ms};

/// How to reach PostgreSQL and how long to wait for it.
#[derive(Debug, Clone)]
pub struct PgOptions {
    pub url: String,
    /// Connections this process keeps at most.
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// Server-side bound on one statement (and on one lock wait).
    pub statement_timeout: Duration,
    pub seed_demo: bool,
}

impl PgOptions {
    /// How long one store call may take before its caller is answered a retryable 503 (`StoreExec::bounded`).
    /// The server bounds a statement and a lock wait (`statement_timeout`), and `connect` a connection, but a
    /// server that stops answering holds a query for good: the client has no timeout of its own. A
    /// statement, a connect and a second to spare fit in it.
    pub fn call_bound(&self) -> Duration {
        self.statement_timeout + self.connect_timeout + Duration::from_secs(1)
    }

    /// How long a store call given up on at [`PgOptions::call_bound`] may still run on: its transaction's
    /// retries each take up to about that bound again.
    pub fn longest_call(&self) -> Duration {
        self.call_bound() * ATTEMPTS
    }
}

/// Attempts for a transaction that failed with a retryable error (deadlock, serialization, lost connection).
const ATTEMPTS: u32 = 4;

/// One pooled connection with its prepared statements (a prepare costs a round trip; reuse saves it).
pub(crate) struct Conn {
    client: Client,
    stmts: HashMap<String, Statement>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Conn>,
    open: usize,
}

/// The PostgreSQL store.
pub struct PostgresStore {
    config: postgres::Config,
    /// `host:port` for messages.
    target: String,
    connect_timeout: Duration,
    /// Connection attempts under way, given up on ones included (see [`PostgresStore::connect`]).
    connecting: Arc<AtomicUsize>,
    max: usize,
    acquire_timeout: Duration,
    pool: Mutex<PoolState>,
    freed: Condvar,
    /// The server's clock, as read last (`sync_clock`): reservations are timed by it on every instance.
    clock: Clock,
}

impl Drop for PostgresStore {
    /// A `postgres::Client` closes by blocking on a runtime of its own, which panics on an async worker, and
    /// the last handle on the store is often dropped on one (a connection task ending after SIGINT or
    /// SIGTERM): that panic, inside a drop, aborted the process. The idle connections are closed on a
    /// thread of their own instead, waited for a bounded time so a hung server cannot hold the exit.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.pool.get_mut().unwrap_or_else(|e| e.into_inner()).idle);
        if idle.is_empty() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let closing = std::thread::Builder::new()
            .name("pg-close".into())
            .spawn(move || {
                drop(idle);
                let _ = tx.send(());
            });
        if closing.is_ok() {
            let _ = rx.recv_timeout(self.connect_timeout.max(Duration::from_secs(1)));
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("max", &self.max).finish()
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        let busy = match e.code() {
            Some(code) => {
                *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED
                    || *code == SqlState::LOCK_NOT_AVAILABLE
                    || *code == SqlState::QUERY_CANCELED
                    || *code == SqlState::UNIQUE_VIOLATION
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || code.code().starts_with("08")
            }
            // No SQLSTATE: the connection failed or closed, which another connection may not.
            None => true,
        };
        let text = describe(&e);
        if busy {
            StoreError::Busy(text)
        } else {
            StoreError::Internal(text)
        }
    }
}

/// A failed COMMIT. One whose answer was lost with the connection (no SQLSTATE: the socket failed or
/// closed; `08xxx`; the server shutting down) may have committed: it is not retried as a busy store is, since
/// the retry of an unkeyed credit or stock batch applied it twice (a fresh reference each run, so no unique
/// key caught it). It is `Unsettled`, as a write given up on while it ran: a keyed request is answered 503
/// and its retry replays the first run if it committed; an unkeyed credit or stock batch 504
/// `outcome_unknown` (a 500 `internal` read as "failed", and an operator's retry applied it twice). A
/// refusal the server sent (a serialization failure at commit) rolled back, and is retried as before.
fn at_commit(e: postgres::Error) -> StoreError {
    if connection_lost(e.code()) {
        return StoreError::Unsettled(format!(
            "the connection failed at COMMIT, so the transaction may have committed (not retried): {}",
            describe(&e)
        ));
    }
    e.into()
}

/// Whether an error with this SQLSTATE (`None`: none came) lost the connection rather than being the
/// server's answer to the statement.
fn connection_lost(code: Option<&SqlState>) -> bool {
    code.is_none_or(|c| *c == SqlState::ADMIN_SHUTDOWN || c.code().starts_with("08"))
}

/// The server's own words where it sent any: `postgres::Error`'s `Display` says only "db error" then, which
/// hid a refused login (`28000: no pg_hba.conf entry for host ...`) behind "cannot connect: db error".
/// Otherwise the error and its causes: its `Display` alone leaves the cause out, so a refused port, a name
/// that does not resolve and an unreachable host all read "error connecting to server".
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Where the config points, for messages: `host:port` of each host it lists.
fn target(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    hosts.join(",")
}

/// A transaction with the connection's statement cache.
pub(crate) struct Tx<'a> {
    tx: Transaction<'a>,
    stmts: &'a mut HashMap<String, Statement>,
}

pub(crate) type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Tx<'_> {
    fn stmt(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        // Bounded: the SQL is our own constants (plus two column-pair variants), never request text.
        if self.stmts.len() < 256 {
            self.stmts.insert(sql.to_string(), s.clone());
        }
        Ok(s)
    }
    pub fn exec(&mut self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.tx.execute(&s, params)?)
    }
    pub fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.tx.query(&s, params)?)
    }
    pub fn opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.tx.query_opt(&s, params)?)
    }
    pub fn one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.tx.query_one(&s, params)?)
    }
    pub fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.tx.batch_execute(sql)?)
    }
    /// A transaction-scoped advisory lock on a string key: serialises check-then-insert on that key across
    /// every instance (idempotency keys, per-user limits, payment ids).
    pub fn lock_key(&mut self, key: &str) -> Result<(), StoreError> {
        self.exec("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&key])?;
        Ok(())
    }
}

impl PostgresStore {
    /// Connects, migrates (idempotent; concurrent starters migrate once) and seeds the demo catalog if asked
    /// and empty.
    pub fn open(opts: &PgOptions) -> Result<PostgresStore, StoreError> {
        let mut config: postgres::Config = opts
            .url
            .parse()
            .map_err(|e| StoreError::Internal(format!("bad postgres_url: {e}")))?;
        let ms = opts.statement_timeout.as_millis();
        config
            .connect_timeout(opts.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("xcluster-app")
            // The server's notices are ours (`CREATE TABLE IF NOT EXISTS` on a migrated database says "already
            // exists, skipping" at every start): debug, not one info line per instance start.
            .notice_callback(|n| tracing::debug!(severity = n.severity(), "postgres notice: {}", n.message()))
            // A killed instance's open transaction must not hold row locks for long.
            .options(&format!(
                "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={}",
                ms.max(1000) * 2
            ));
        let store = PostgresStore {
            target: target(&config),
            config,
            connect_timeout: opts.connect_timeout,
            connecting: Arc::default(),
            max: opts.pool_size.max(1),
            acquire_timeout: opts.statement_timeout.max(Duration::from_secs(1)),
            pool: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            clock: Clock::default(),
        };
        store.write(super::postgres_schema::migrate)?;
        // Before the first order: its expiry is timed by the server's clock too.
        store.sync_clock()?;
        if opts.seed_demo {
            store.write(super::postgres_schema::seed_demo)?;
        }
        Ok(store)
    }

    fn take(&self) -> Result<Conn, StoreError> {
        let deadline = Instant::now() + self.acquire_timeout;
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = pool.idle.pop() {
                return Ok(c);
            }
            if pool.open < self.max {
                pool.open += 1;
                drop(pool);
                return match self.connect() {
                    Ok(client) => Ok(Conn {
                        client,
                        stmts: HashMap::new(),
                    }),
                    Err(e) => {
                        self.release(None);
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Busy("no postgres connection free".into()));
            }
            pool = self
                .freed
                .wait_timeout(pool, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Opens a connection within `connect_timeout`, handshake and login included. The client's own
    /// `connect_timeout` bounds only the TCP connect: a server that accepts and then says nothing (a hung
    /// PostgreSQL, or a `postgres_url` naming another service's port) held the caller for good, at start and
    /// whenever the pool opened a connection. The client cannot be interrupted, so the attempt runs on a
    /// thread of its own that is left to finish by itself past the deadline; at most `pool_size` such
    /// threads exist at once, so a silent server costs a bounded number of them, not one per request.
    fn connect(&self) -> Result<Client, StoreError> {
        let unanswered = || {
            StoreError::Busy(format!(
                "postgres at {} did not complete a connection within {} ms (is it a PostgreSQL server, and answering?)",
                self.target,
                self.connect_timeout.as_millis()
            ))
        };
        if self.connecting.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.connecting.fetch_sub(1, Ordering::AcqRel);
            return Err(unanswered());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (config, connecting) = (self.config.clone(), self.connecting.clone());
        let spawned = std::thread::Builder::new()
            .name("pg-connect".into())
            .spawn(move || {
                // A client that comes too late is dropped here, off any async worker.
                let _ = tx.send(config.connect(NoTls));
                connecting.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.connecting.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Busy(format!(
                "cannot start a postgres connect thread: {e}"
            )));
        }
        match rx.recv_timeout(self.connect_timeout) {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(StoreError::Busy(format!(
                "cannot connect to postgres at {}: {}",
                self.target,
                describe(&e)
            ))),
            Err(_) => Err(unanswered()),
        }
    }

    /// Returns a connection (or its slot, when it broke) to the pool. A connection that broke takes the idle
    /// ones with it: what broke it (a server restart or failover, a cut network) broke them too, but an idle
    /// client only finds out when used, and each retry of a call took the next dead one, so a burst of
    /// calls after a restart ran out of attempts on connections that were already gone.
    fn release(&self, conn: Option<Conn>) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let stale = match conn {
            Some(c) if !c.client.is_closed() => {
                pool.idle.push(c);
                Vec::new()
            }
            Some(_) => {
                let stale = std::mem::take(&mut pool.idle);
                pool.open = pool.open.saturating_sub(1 + stale.len());
                stale
            }
            // A connect that failed: its slot only.
            None => {
                pool.open = pool.open.saturating_sub(1);
                Vec::new()
            }
        };
        drop(pool);
        self.freed.notify_all();
        // Closed outside the lock: closing a connection may wait on its socket.
        drop(stale);
    }

    /// Runs `f` in one transaction at `level`, retrying retryable failures; `f` decides commit or rollback
    /// through `commit(&T)`.
    fn run<T>(
        &self,
        level: IsolationLevel,
        read_only: bool,
        f: &mut dyn FnMut(&mut Tx<'_>) -> Result<T, StoreError>,
        commit: fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // No retry when no connection could be had: connecting (or waiting for a free one) has had its
            // whole bound already, and four of them made a silent server cost a caller four times that.
            let conn = self.take()?;
            let out = self.once(conn, level, read_only, f, commit);
            match out {
                Err(StoreError::Busy(why)) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, %why, "postgres transaction retried");
                    std::thread::sleep(Duration::from_millis(
                        u64::from(attempt) * 5 + u64::from(rand::random::<u8>() % 10),
                    ));
                }
                other => return other,
            }
        }
    }

    fn once<T>(
        &self,
        mut conn: Conn,
        level: IsolationLevel,
        read_only: bool,
        f: &mut dyn FnMut(&mut Tx<'_>) -> Result<T, StoreError>,
        commit: fn(&T) -> bool,
    ) -> Result<T, StoreError> {
        let out = (|| {
            let Conn { client, stmts } = &mut conn;
            let tx = client
                .build_transaction()
                .isolation_level(level)
                .read_only(read_only)
                .start()?;
            let mut tx = Tx { tx, stmts };
            let out = f(&mut tx)?;
            if commit(&out) {
                tx.tx.commit().map_err(at_commit)?;
            } else {
                tx.tx.rollback()?;
            }
            Ok(out)
        })();
        self.release(Some(conn));
        out
    }

    pub(crate) fn write<T>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.run(IsolationLevel::ReadCommitted, false, &mut f, |_| true)
    }

    fn write_domain<T>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<Result<T, Reject>, StoreError>,
    ) -> StoreResult<T> {
        self.run(IsolationLevel::ReadCommitted, false, &mut f, |r| r.is_ok())
    }

    fn read<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.run(IsolationLevel::RepeatableRead, true, &mut f, |_| true)
    }
}

use super::postgres_create as create;
use super::postgres_money as money;
use super::postgres_orders as orders;

impl Store for PostgresStore {
    fn list_products(&self, after: i64, limit: u32) -> Result<Vec<Product>, StoreError> {
        self.read(|t| orders::list_products_from(t, after.saturating_add(1), limit, false))
    }
    fn get_product(&self, id: i64) -> Result<Option<Product>, StoreError> {
        self.read(|t| Ok(orders::list_products_from(t, id, 1, true)?.pop()))
    }
    fn get_order(&self, id: &str) -> Result<Option<OrderView>, StoreError> {
        self.read(|t| orders::load_order(t, id))
    }
    // Read committed, not the repeatable read of other reads: the select after the key's lock must see what
    // the writer that held it committed, and a repeatable read's snapshot is taken before the lock.
    fn keyed_answer(&self, o: &NewOrder) -> Result<super::Keyed, StoreError> {
        self.run(
            IsolationLevel::ReadCommitted,
            true,
            &mut |t| create::key_held(t, o),
            |_| true,
        )
    }
    fn user_orders(
        &self,
        user: &str,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Vec<OrderView>, StoreError> {
        self.read(|t| orders::user_orders(t, user, before.clone(), limit))
    }
    fn create_orders(
        &self,
        new: &[NewOrder],
        inline_weak: bool,
    ) -> Result<Vec<Result<Created, Reject>>, StoreError> {
        // One transaction for the whole group (one commit, one WAL flush), its decisions taken under locks
        // it takes first in one order (`postgres_create`). A retryable failure (a deadlock with a writer that
        // locks SKU rows in another order, a lost connection) re-runs the whole group: nothing of it committed.
        self.write(|t| create::create_orders(t, new, inline_weak))
    }
    fn pay_wallet(&self, order_id: &str, inline_weak: bool) -> StoreResult<OrderView> {
        self.write_domain(|t| money::pay(t, order_id, None, inline_weak, &self.clock))
    }
    fn payment_callback(&self, cb: &PaymentCallback, inline_weak: bool) -> StoreResult<OrderView> {
        self.write_domain(|t| money::callback(t, cb, inline_weak, &self.clock))
    }
    fn cancel(&self, order_id: &str) -> StoreResult<(OrderView, bool)> {
        self.write_domain(|t| orders::cancel(t, order_id))
    }
    fn fulfil(&self, order_id: &str) -> StoreResult<OrderView> {
        self.write_domain(|t| orders::fulfil(t, order_id))
    }
    fn refund(&self, r: &RefundRequest, inline_weak: bool) -> StoreResult<Refunded> {
        self.write_domain(|t| money::refund(t, r, inline_weak))
    }
    fn expire_due(&self, now_ms: i64, limit: u32) -> Result<super::Expired, StoreError> {
        self.write(|t| orders::expire_due(t, now_ms, limit))
    }
    fn run_outbox(&self, limit: u32) -> Result<u32, StoreError> {
        self.write(|t| money::run_outbox(t, limit))
    }
    fn outbox_depth(&self) -> Result<u64, StoreError> {
        self.read(|t| {
            let n: i64 = t.one("SELECT COUNT(*) FROM outbox WHERE NOT done", &[])?.get(0);
            Ok(n.max(0) as u64)
        })
    }
    fn oldest_reservation_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.read(|t| {
            let row = t.opt(super::OLDEST_HELD_SQL, &[])?;
            Ok(row.map(|r| r.get(0)))
        })
    }
    fn clock(&self) -> Clock {
        self.clock.clone()
    }
    fn sync_clock(&self) -> Result<(), StoreError> {
        let (before, server, after) = self.read(|t| {
            // This host's readings around the statement alone: the transaction's begin is another round trip.
            let before = now_ms();
            let server: i64 = t
                .one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8", &[])?
                .get(0);
            Ok((before, server, now_ms()))
        })?;
        if !self.clock.set_from(before, server, after) {
            tracing::debug!(
                took_ms = after - before,
                "postgres clock reading too slow to take; the last one stays"
            );
        }
        Ok(())
    }
    fn update_stock(&self, updates: &[StockUpdate]) -> StoreResult<Vec<Sku>> {
        self.write_domain(|t| orders::update_stock(t, updates))
    }
    fn update_stock_once(&self, key: &str, updates: &[StockUpdate]) -> StoreResult<Restocked> {
        self.write_domain(|t| orders::update_stock_once(t, key, updates))
    }
    fn open_flash_sale(&self, sku: &str, buckets: u32) -> StoreResult<Sku> {
        self.write_domain(|t| orders::open_flash_sale(t, sku, buckets))
    }
    fn close_flash_sale(&self, sku: &str) -> StoreResult<Sku> {
        self.write_domain(|t| orders::close_flash_sale(t, sku))
    }
    fn credit(&self, users: &[String], amount: Cents) -> Result<(), StoreError> {
        self.write(|t| money::credit(t, users, amount))
    }
    fn credit_once(&self, key: &str, users: &[String], amount: Cents) -> StoreResult<bool> {
        self.write_domain(|t| money::credit_once(t, key, users, amount))
    }
    fn balance(&self, account: &str) -> Result<Cents, StoreError> {
        self.read(|t| money::balance(t, account))
    }
    fn shop_exists(&self, id: i64) -> Result<bool, StoreError> {
        self.read(|t| Ok(t.opt("SELECT 1 FROM shops WHERE id = $1", &[&id])?.is_some()))
    }
    fn settle(&self) -> Result<Vec<Settlement>, StoreError> {
        self.write(money::settle)
    }
    fn audit(&self) -> Result<AuditReport, StoreError> {
        // REPEATABLE READ: every check sees one snapshot.
        self.read(super::postgres_audit::audit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost answer (no SQLSTATE, a connection exception, the server shutting down) is told apart from the
    /// server's refusals, which roll back.
    #[test]
    fn a_commit_without_its_answer_is_told_from_a_refused_one() {
        for lost in [
            None,
            Some(&SqlState::CONNECTION_FAILURE),
            Some(&SqlState::CONNECTION_EXCEPTION),
            Some(&SqlState::ADMIN_SHUTDOWN),
        ] {
            assert!(connection_lost(lost), "{lost:?}");
        }
        for refused in [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::UNIQUE_VIOLATION,
            SqlState::QUERY_CANCELED,
        ] {
            assert!(!connection_lost(Some(&refused)), "{refused:?}");
        }
    }
}
