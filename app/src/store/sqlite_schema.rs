//! Schema migrations (by `PRAGMA user_version`, each step in a `BEGIN IMMEDIATE` transaction so processes
//! starting together migrate once) and the demo seed. `CHECK` constraints repeat the stock invariants, so
//! even a bug cannot store negative stock.

use rusqlite::{Connection, TransactionBehavior, params};

use super::StoreError;
use crate::domain::now_ms;

pub(super) const V1: &str = r#"
CREATE TABLE shops(id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE products(id INTEGER PRIMARY KEY, shop_id INTEGER NOT NULL REFERENCES shops(id), name TEXT NOT NULL);
CREATE TABLE skus(
  sku TEXT PRIMARY KEY,
  product_id INTEGER NOT NULL REFERENCES products(id),
  price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
  received INTEGER NOT NULL CHECK (received >= 0),
  available INTEGER NOT NULL CHECK (available >= 0),
  reserved INTEGER NOT NULL CHECK (reserved >= 0),
  sold INTEGER NOT NULL CHECK (sold >= 0));
CREATE INDEX skus_product ON skus(product_id);
CREATE TABLE sku_buckets(
  sku TEXT NOT NULL REFERENCES skus(sku), bucket INTEGER NOT NULL,
  available INTEGER NOT NULL CHECK (available >= 0), PRIMARY KEY (sku, bucket));
CREATE TABLE orders(
  id TEXT PRIMARY KEY, idem_key TEXT UNIQUE, fingerprint TEXT NOT NULL, user TEXT NOT NULL, kind TEXT NOT NULL,
  status TEXT NOT NULL, total_cents INTEGER NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  paid_via TEXT, updated_ms INTEGER NOT NULL, answer TEXT NOT NULL);
CREATE INDEX orders_due ON orders(status, expires_ms);
CREATE INDEX orders_user ON orders(user, kind);
CREATE TABLE order_lines(
  order_id TEXT NOT NULL REFERENCES orders(id), sku TEXT NOT NULL REFERENCES skus(sku),
  qty INTEGER NOT NULL CHECK (qty > 0), price_cents INTEGER NOT NULL, shop_id INTEGER NOT NULL,
  PRIMARY KEY (order_id, sku));
CREATE INDEX lines_sku ON order_lines(sku);
CREATE TABLE outbox(
  id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, order_id TEXT NOT NULL, created_ms INTEGER NOT NULL,
  done INTEGER NOT NULL DEFAULT 0, UNIQUE (topic, order_id));
CREATE INDEX outbox_pending ON outbox(done, id);
CREATE TABLE effects(
  order_id TEXT NOT NULL, kind TEXT NOT NULL, value INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  PRIMARY KEY (order_id, kind));
CREATE TABLE accounts(account TEXT PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE ledger_tx(
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, ref TEXT NOT NULL, created_ms INTEGER NOT NULL,
  UNIQUE (kind, ref));
CREATE TABLE ledger_entries(tx_id INTEGER NOT NULL REFERENCES ledger_tx(id), account TEXT NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX entries_tx ON ledger_entries(tx_id);
CREATE INDEX entries_account ON ledger_entries(account);
CREATE TABLE payments(
  payment_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, status TEXT NOT NULL, amount_cents INTEGER NOT NULL,
  created_ms INTEGER NOT NULL);
CREATE TABLE settlements(
  batch TEXT NOT NULL, shop_id INTEGER NOT NULL, amount_cents INTEGER NOT NULL, created_ms INTEGER NOT NULL,
  PRIMARY KEY (batch, shop_id));
"#;

/// Idempotency keys are per user (two buyers may both send `checkout-1`): the key's `UNIQUE` becomes
/// `UNIQUE (user, idem_key)`; and a user's orders are listed newest first (`orders_user_time`). SQLite cannot drop a constraint, so the table is rebuilt (its documented
/// procedure: foreign keys off around the transaction, checked before the commit).
pub(super) const V2: &str = r#"
CREATE TABLE orders_v2(
  id TEXT PRIMARY KEY, idem_key TEXT, fingerprint TEXT NOT NULL, user TEXT NOT NULL, kind TEXT NOT NULL,
  status TEXT NOT NULL, total_cents INTEGER NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  paid_via TEXT, updated_ms INTEGER NOT NULL, answer TEXT NOT NULL, UNIQUE (user, idem_key));
INSERT INTO orders_v2(id, idem_key, fingerprint, user, kind, status, total_cents, created_ms, expires_ms, paid_via,
                      updated_ms, answer)
  SELECT id, idem_key, fingerprint, user, kind, status, total_cents, created_ms, expires_ms, paid_via, updated_ms,
         answer FROM orders;
DROP TABLE orders;
ALTER TABLE orders_v2 RENAME TO orders;
CREATE INDEX orders_due ON orders(status, expires_ms);
CREATE INDEX orders_user ON orders(user, kind);
CREATE INDEX orders_user_time ON orders(user, created_ms, id);
"#;

/// Partial refunds: each line counts its refunded units (`refunded_qty`, never above `qty`), and each refund
/// of an order is a `refunds` row (its number `n`, the order's own idempotency key, the ledger reference of its
/// posting, the answer a replay gives) with its units in `refund_lines`. A refund made before this version
/// refunded the whole order under the order id as its ledger reference: it becomes refund 1 of its order, with
/// every line refunded, so the audit reads old and new refunds alike.
const V3: &str = r#"
ALTER TABLE order_lines ADD COLUMN refunded_qty INTEGER NOT NULL DEFAULT 0
  CHECK (refunded_qty >= 0 AND refunded_qty <= qty);
CREATE TABLE refunds(
  order_id TEXT NOT NULL REFERENCES orders(id), n INTEGER NOT NULL CHECK (n > 0), idem_key TEXT,
  fingerprint TEXT NOT NULL, amount_cents INTEGER NOT NULL CHECK (amount_cents >= 0), ledger_ref TEXT NOT NULL UNIQUE,
  answer TEXT, created_ms INTEGER NOT NULL, PRIMARY KEY (order_id, n), UNIQUE (order_id, idem_key));
CREATE TABLE refund_lines(
  order_id TEXT NOT NULL, n INTEGER NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty > 0),
  PRIMARY KEY (order_id, n, sku), FOREIGN KEY (order_id, n) REFERENCES refunds(order_id, n),
  FOREIGN KEY (order_id, sku) REFERENCES order_lines(order_id, sku));
UPDATE order_lines SET refunded_qty = qty WHERE order_id IN (SELECT id FROM orders WHERE status = 'refunded');
INSERT INTO refunds(order_id, n, idem_key, fingerprint, amount_cents, ledger_ref, answer, created_ms)
  SELECT o.id, 1, NULL, '', o.total_cents, t.ref, NULL, t.created_ms
  FROM orders o JOIN ledger_tx t ON t.kind = 'refund' AND t.ref = o.id WHERE o.status = 'refunded';
INSERT INTO refund_lines(order_id, n, sku, qty)
  SELECT l.order_id, 1, l.sku, l.qty FROM order_lines l JOIN refunds r ON r.order_id = l.order_id;
"#;

/// Merchant stock batches sent with an `Idempotency-Key`: the key (one namespace: only the admin token sends
/// them), the batch's fingerprint and the answer a replay gives, written in the batch's own transaction. Kept
/// for good, as order keys are: a batch is an operator's call, rare and small, and a key that expired would let
/// a late retry receive its units twice.
const V4: &str = r#"
CREATE TABLE stock_keys(
  idem_key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, answer TEXT NOT NULL, created_ms INTEGER NOT NULL);
"#;

/// Flash sales are numbered, so the per-user limit counts a buyer's units of the current sale only: a SKU's
/// `sale_seq` grows when a sale opens on it with none open, and each seckill line keeps the number it was sold
/// under (NULL on ordinary lines). Seckill lines sold before this version get 0, the number every SKU starts
/// with, so a sale open across the upgrade keeps counting them.
const V5: &str = r#"
ALTER TABLE skus ADD COLUMN sale_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE order_lines ADD COLUMN sale_seq INTEGER;
UPDATE order_lines SET sale_seq = 0 WHERE order_id IN (SELECT id FROM orders WHERE kind = 'seckill');
"#;

const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// The schema version `migrate` brings a database to.
#[cfg(test)]
pub(super) const VERSION: i64 = MIGRATIONS.len() as i64;

/// The SQL that makes an empty database one of schema `version`, as that version's release left it, for
/// tests that migrate an old database.
#[cfg(test)]
pub(super) fn schema_up_to(version: usize) -> String {
    format!(
        "{}; PRAGMA user_version = {version};",
        MIGRATIONS[..version].join(";\n")
    )
}

/// Brings the schema to the newest version.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // A table rebuild drops a table others reference; the pragma is a no-op inside a transaction.
    conn.execute_batch("PRAGMA foreign_keys=OFF")?;
    let migrated = migrate_steps(conn);
    conn.execute_batch("PRAGMA foreign_keys=ON")?;
    migrated
}

fn migrate_steps(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    super::newer_than_this_build(current, MIGRATIONS.len())?;
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current < version {
            tx.execute_batch(step)?;
            let broken: i64 =
                tx.query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| r.get(0))?;
            if broken > 0 {
                return Err(StoreError::Internal(format!(
                    "schema step {version} would leave {broken} broken references; nothing changed"
                )));
            }
            tx.execute_batch(&format!("PRAGMA user_version = {version}"))?;
            tracing::info!(version, "store schema migrated");
        }
        tx.commit()?;
    }
    Ok(())
}

/// The demo catalog: three shops, twelve products, two SKUs each, plus the flash-sale SKU `flash-1`.
/// Demo buyers seeded with wallet credit (`demo-0`..), and how much each gets.
pub const DEMO_BUYERS: usize = 1000;
pub const DEMO_CREDIT_CENTS: i64 = 1_000_000;

pub fn seed_demo(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let shops: i64 = tx.query_row("SELECT COUNT(*) FROM shops", [], |r| r.get(0))?;
    if shops > 0 {
        tx.commit()?;
        return Ok(());
    }
    for shop in 1..=3i64 {
        tx.execute(
            "INSERT INTO shops(id, name) VALUES (?1, ?2)",
            params![shop, format!("Demo shop {shop}")],
        )?;
    }
    for p in 1..=12i64 {
        let shop = (p - 1) % 3 + 1;
        tx.execute(
            "INSERT INTO products(id, shop_id, name) VALUES (?1, ?2, ?3)",
            params![p, shop, format!("Demo product {p}")],
        )?;
        for v in 1..=2i64 {
            let stock = 1_000i64;
            tx.execute(
                "INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
                 VALUES (?1, ?2, ?3, ?4, ?4, 0, 0)",
                params![format!("sku-{p}-{v}"), p, 500 + p * 100 + v * 10, stock],
            )?;
        }
    }
    tx.execute(
        "INSERT INTO products(id, shop_id, name) VALUES (100, 1, 'Flash sale item')",
        [],
    )?;
    tx.execute(
        "INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
         VALUES ('flash-1', 100, 100, 100, 100, 0, 0)",
        [],
    )?;
    // Demo buyers demo-0..demo-999 get wallet credit, so `xcluster load` can pay for what it orders out of the box.
    let buyers: Vec<String> = (0..DEMO_BUYERS).map(|i| format!("demo-{i}")).collect();
    super::sqlite_money::credit(&tx, &buyers, DEMO_CREDIT_CENTS)?;
    tracing::info!(at_ms = now_ms(), "demo catalog seeded");
    tx.commit()?;
    Ok(())
}
