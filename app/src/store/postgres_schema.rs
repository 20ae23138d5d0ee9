//! PostgreSQL schema migrations and the demo seed: the SQLite schema (`sqlite_schema`) with PostgreSQL types.
//! The version lives in `xbuy_schema`; every step runs under one transaction-scoped advisory lock, so
//! instances starting together migrate (and seed) exactly once, and a restart is a no-op.

use super::StoreError;
use super::postgres::Tx;
use crate::domain::now_ms;

/// The advisory lock key of schema changes and the seed.
const MIGRATION_LOCK: i64 = 0x7862_7579_0001;

pub(super) const V1: &str = r#"
CREATE TABLE shops(id BIGINT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE products(id BIGINT PRIMARY KEY, shop_id BIGINT NOT NULL REFERENCES shops(id), name TEXT NOT NULL);
CREATE TABLE skus(
  sku TEXT PRIMARY KEY,
  product_id BIGINT NOT NULL REFERENCES products(id),
  price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
  received BIGINT NOT NULL CHECK (received >= 0),
  available BIGINT NOT NULL CHECK (available >= 0),
  reserved BIGINT NOT NULL CHECK (reserved >= 0),
  sold BIGINT NOT NULL CHECK (sold >= 0));
CREATE INDEX skus_product ON skus(product_id);
CREATE TABLE sku_buckets(
  sku TEXT NOT NULL REFERENCES skus(sku), bucket BIGINT NOT NULL,
  available BIGINT NOT NULL CHECK (available >= 0), PRIMARY KEY (sku, bucket));
CREATE TABLE orders(
  id TEXT PRIMARY KEY, idem_key TEXT UNIQUE, fingerprint TEXT NOT NULL, "user" TEXT NOT NULL, kind TEXT NOT NULL,
  status TEXT NOT NULL, total_cents BIGINT NOT NULL, created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL,
  paid_via TEXT, updated_ms BIGINT NOT NULL, answer TEXT NOT NULL);
CREATE INDEX orders_due ON orders(status, expires_ms);
CREATE INDEX orders_user ON orders("user", kind);
CREATE TABLE order_lines(
  order_id TEXT NOT NULL REFERENCES orders(id), sku TEXT NOT NULL REFERENCES skus(sku),
  qty BIGINT NOT NULL CHECK (qty > 0), price_cents BIGINT NOT NULL, shop_id BIGINT NOT NULL,
  PRIMARY KEY (order_id, sku));
CREATE INDEX lines_sku ON order_lines(sku);
CREATE TABLE outbox(
  id BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, order_id TEXT NOT NULL, created_ms BIGINT NOT NULL,
  done BOOLEAN NOT NULL DEFAULT false, UNIQUE (topic, order_id));
CREATE INDEX outbox_pending ON outbox(id) WHERE NOT done;
CREATE TABLE effects(
  order_id TEXT NOT NULL, kind TEXT NOT NULL, value BIGINT NOT NULL, created_ms BIGINT NOT NULL,
  PRIMARY KEY (order_id, kind));
CREATE TABLE accounts(account TEXT PRIMARY KEY, balance BIGINT NOT NULL);
CREATE TABLE ledger_tx(
  id BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, ref TEXT NOT NULL, created_ms BIGINT NOT NULL,
  UNIQUE (kind, ref));
CREATE TABLE ledger_entries(tx_id BIGINT NOT NULL REFERENCES ledger_tx(id), account TEXT NOT NULL, amount BIGINT NOT NULL);
CREATE INDEX entries_tx ON ledger_entries(tx_id);
CREATE INDEX entries_account ON ledger_entries(account);
CREATE TABLE payments(
  payment_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, status TEXT NOT NULL, amount_cents BIGINT NOT NULL,
  created_ms BIGINT NOT NULL);
CREATE TABLE settlements(
  batch TEXT NOT NULL, shop_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL, created_ms BIGINT NOT NULL,
  PRIMARY KEY (batch, shop_id));
"#;

/// Idempotency keys are per user (two buyers may both send `checkout-1`); a user's orders are listed newest
/// first (`orders_user_time`).
pub(super) const V2: &str = r#"
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_idem_key_key;
ALTER TABLE orders ADD CONSTRAINT orders_user_idem_key UNIQUE ("user", idem_key);
CREATE INDEX orders_user_time ON orders("user", created_ms, id);
"#;

/// Partial refunds: `refunded_qty` per line, a `refunds` row per refund with its units in `refund_lines`; a
/// whole-order refund made before becomes refund 1 of its order (see `sqlite_schema::V3`).
const V3: &str = r#"
ALTER TABLE order_lines ADD COLUMN refunded_qty BIGINT NOT NULL DEFAULT 0;
ALTER TABLE order_lines ADD CONSTRAINT order_lines_refunded_qty CHECK (refunded_qty >= 0 AND refunded_qty <= qty);
CREATE TABLE refunds(
  order_id TEXT NOT NULL REFERENCES orders(id), n BIGINT NOT NULL CHECK (n > 0), idem_key TEXT,
  fingerprint TEXT NOT NULL, amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0), ledger_ref TEXT NOT NULL UNIQUE,
  answer TEXT, created_ms BIGINT NOT NULL, PRIMARY KEY (order_id, n), UNIQUE (order_id, idem_key));
CREATE TABLE refund_lines(
  order_id TEXT NOT NULL, n BIGINT NOT NULL, sku TEXT NOT NULL, qty BIGINT NOT NULL CHECK (qty > 0),
  PRIMARY KEY (order_id, n, sku), FOREIGN KEY (order_id, n) REFERENCES refunds(order_id, n),
  FOREIGN KEY (order_id, sku) REFERENCES order_lines(order_id, sku));
UPDATE order_lines SET refunded_qty = qty WHERE order_id IN (SELECT id FROM orders WHERE status = 'refunded');
INSERT INTO refunds(order_id, n, idem_key, fingerprint, amount_cents, ledger_ref, answer, created_ms)
  SELECT o.id, 1, NULL, '', o.total_cents, t.ref, NULL, t.created_ms
  FROM orders o JOIN ledger_tx t ON t.kind = 'refund' AND t.ref = o.id WHERE o.status = 'refunded';
INSERT INTO refund_lines(order_id, n, sku, qty)
  SELECT l.order_id, 1, l.sku, l.qty FROM order_lines l JOIN refunds r ON r.order_id = l.order_id;
"#;

/// Keyed merchant stock batches (see `sqlite_schema::V4`).
const V4: &str = r#"
CREATE TABLE stock_keys(
  idem_key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, answer TEXT NOT NULL, created_ms BIGINT NOT NULL);
"#;

/// Numbered flash sales (see `sqlite_schema::V5`).
const V5: &str = r#"
ALTER TABLE skus ADD COLUMN sale_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE order_lines ADD COLUMN sale_seq BIGINT;
UPDATE order_lines SET sale_seq = 0 WHERE order_id IN (SELECT id FROM orders WHERE kind = 'seckill');
"#;

const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

/// The SQL that makes an empty database one of schema `version`, as `sqlite_schema::schema_up_to`.
#[cfg(test)]
pub(super) fn schema_up_to(version: usize) -> String {
    let versions: Vec<String> = (1..=version).map(|v| format!("({v})")).collect();
    format!(
        "CREATE TABLE xbuy_schema(version BIGINT NOT NULL); INSERT INTO xbuy_schema(version) VALUES {};\n{}",
        versions.join(", "),
        MIGRATIONS[..version].join(";\n")
    )
}

/// Brings the schema to the newest version (one transaction).
pub fn migrate(t: &mut Tx<'_>) -> Result<(), StoreError> {
    t.exec("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    t.batch("CREATE TABLE IF NOT EXISTS xbuy_schema(version BIGINT NOT NULL)")?;
    let current: i64 = t
        .one("SELECT COALESCE(MAX(version), 0) FROM xbuy_schema", &[])?
        .get(0);
    super::newer_than_this_build(current, MIGRATIONS.len())?;
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if current < version {
            t.batch(step)?;
            t.exec("INSERT INTO xbuy_schema(version) VALUES ($1)", &[&version])?;
            tracing::info!(version, "postgres schema migrated");
        }
    }
    Ok(())
}

/// The demo catalog, identical to SQLite's: three shops, twelve products with two SKUs each, `flash-1`, and
/// the demo buyers `demo-0`.. with their wallet credit.
pub fn seed_demo(t: &mut Tx<'_>) -> Result<(), StoreError> {
    t.exec("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let shops: i64 = t.one("SELECT COUNT(*) FROM shops", &[])?.get(0);
    if shops > 0 {
        return Ok(());
    }
    for shop in 1..=3i64 {
        t.exec(
            "INSERT INTO shops(id, name) VALUES ($1, $2)",
            &[&shop, &format!("Demo shop {shop}")],
        )?;
    }
    for p in 1..=12i64 {
        let shop = (p - 1) % 3 + 1;
        t.exec(
            "INSERT INTO products(id, shop_id, name) VALUES ($1, $2, $3)",
            &[&p, &shop, &format!("Demo product {p}")],
        )?;
        for v in 1..=2i64 {
            let stock = 1_000i64;
            t.exec(
                "INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
                 VALUES ($1, $2, $3, $4, $4, 0, 0)",
                &[&format!("sku-{p}-{v}"), &p, &(500 + p * 100 + v * 10), &stock],
            )?;
        }
    }
    t.batch(
        "INSERT INTO products(id, shop_id, name) VALUES (100, 1, 'Flash sale item');
         INSERT INTO skus(sku, product_id, price_cents, received, available, reserved, sold)
         VALUES ('flash-1', 100, 100, 100, 100, 0, 0);",
    )?;
    // The demo buyers' wallet credit, as SQLite's seed gives it: without it every payment `xcluster load`
    // makes on PostgreSQL was refused `insufficient_funds`.
    let buyers: Vec<String> = (0..super::sqlite_schema::DEMO_BUYERS)
        .map(|i| format!("demo-{i}"))
        .collect();
    super::postgres_money::credit(t, &buyers, super::sqlite_schema::DEMO_CREDIT_CENTS)?;
    tracing::info!(at_ms = now_ms(), "demo catalog seeded");
    Ok(())
}
