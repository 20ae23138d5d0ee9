//! PostgreSQL order creation: a group of orders (one at the sync level, up to `queue::MAX_BATCH` at the
//! queued level) in ONE transaction, decided in memory under the group's locks and written with a few
//! set-based statements, whatever the group's size.
//!
//! SQLite creates each order of a group under a savepoint with a dozen statements; here every statement is a
//! round trip, and a group holds its SKU rows from its first lock to its commit, so instances queued on those
//! rows for (orders × round trips) each: one transaction per group that way ran at a quarter of the sync
//! level's rate. Instead the group first takes every lock it needs, each kind in one statement and in one
//! order (idempotency keys by hash, then SKU rows by name), and reads what the rules need: prices, shelves,
//! buckets, the stored answers of its keys and its buyers' flash-sale counts. While it holds those locks no
//! one else can change what it read: every order creation locks its SKU rows first, and so does everything
//! that writes buckets (opening and closing a sale); other writers of a SKU row (payments, cancels, merchant
//! updates) wait on its lock. So each order's decision in memory (`order_rules`, in the group's order, each
//! seeing the ones before it) is the one its own statements would have reached. A refused order has written
//! nothing, so it needs no savepoint to undo; the accepted ones are written together. A store error at any
//! point rolls the whole group back (`PostgresStore::run` retries it as a whole: a deadlock or a lost
//! connection included), so no order is answered that did not commit.

use std::collections::{BTreeMap, HashMap};

use super::order_rules;
use super::postgres::Tx;
use super::{Created, Keyed, LineView, StoreError};
use crate::domain::{NewOrder, OrderKind, Reject};

/// The answer of the order stored under `o`'s idempotency key, if any ([`crate::store::Store::keyed_answer`]).
pub fn keyed_answer(t: &mut Tx<'_>, o: &NewOrder) -> Result<Option<Result<Created, Reject>>, StoreError> {
    let Some(key) = &o.idem_key else {
        return Ok(None);
    };
    let prior = t.opt(
        r#"SELECT fingerprint, answer FROM orders WHERE "user" = $1 AND idem_key = $2"#,
        &[&o.user, key],
    )?;
    prior
        .map(|r| order_rules::replay(key, o, r.get(0), r.get(1)))
        .transpose()
}

/// What `o`'s idempotency key holds ([`crate::store::Store::keyed_answer`]), in a read-committed
/// transaction: an attempt writing under it holds the key's lock (`lock_and_read`) until it commits or
/// rolls back, so a lock not had says it may yet commit, and one had says it is over and its order, if any,
/// is there for the select after it.
pub fn key_held(t: &mut Tx<'_>, o: &NewOrder) -> Result<Keyed, StoreError> {
    let Some(key) = &o.idem_key else {
        return Ok(Keyed::Free);
    };
    let had: bool = t
        .one(
            // Shared: it waits for no one and fails only while a writer holds the key, so two retries of
            // one key asking at once do not take each other for a writer.
            "SELECT pg_try_advisory_xact_lock_shared(hashtextextended($1, 0))",
            &[&key_lock(&o.user, key)],
        )?
        .get(0);
    if !had {
        return Ok(Keyed::Writing);
    }
    Ok(keyed_answer(t, o)?.map_or(Keyed::Free, Keyed::Stored))
}

/// The name of the advisory lock an attempt under `user`'s idempotency `key` holds while it writes. A user id
/// never holds a space, so it names one pair; the text is the single-order path's before groups, so
/// instances of either version exclude each other on a key.
fn key_lock(user: &str, key: &str) -> String {
    format!("idem:{user} {key}")
}

/// A SKU as the group found it under its row lock, with what the group's orders have taken so far.
#[derive(Debug, Clone)]
struct Shelf {
    price: i64,
    shop: i64,
    available: i64,
    /// Its flash sale is open (it has bucket rows, even empty ones).
    on_sale: bool,
    /// The number of its latest sale (`skus.sale_seq`), which its flash-sale lines are sold in.
    sale_seq: i64,
    /// (bucket, units), by bucket.
    buckets: Vec<(i64, i64)>,
}

/// Everything the group's decisions read, and what the accepted orders change.
#[derive(Debug, Default)]
struct Plan {
    shelves: HashMap<String, Shelf>,
    /// (user, key) → (fingerprint, stored answer): stored before, or created earlier in this group.
    answers: HashMap<(String, String), (String, String)>,
    /// (user, SKU) → flash-sale units the user holds in live orders of the SKU's current sale.
    bought: HashMap<(String, String), i64>,
    /// SKU → (units off the shelf, units into `reserved`).
    sku_moves: BTreeMap<String, (i64, i64)>,
    /// (SKU, bucket) → units taken.
    bucket_takes: BTreeMap<(String, i64), i64>,
}

/// One accepted order's rows.
struct Accepted {
    order: usize,
    total: i64,
    answer: String,
    lines: Vec<(LineView, i64)>,
}

/// Creates `orders` inside the caller's transaction: each is refused alone or accepted, in the group's order.
pub fn create_orders(
    t: &mut Tx<'_>,
    orders: &[NewOrder],
    inline_weak: bool,
) -> Result<Vec<Result<Created, Reject>>, StoreError> {
    let mut plan = lock_and_read(t, orders)?;
    let mut out = Vec::with_capacity(orders.len());
    let mut accepted = Vec::new();
    for (i, o) in orders.iter().enumerate() {
        match decide(&mut plan, o)? {
            Decision::Answer(a) => out.push(a),
            Decision::Create(mut a) => {
                a.order = i;
                let (view, answer) = order_rules::reserved(
                    o,
                    &a.lines.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>(),
                    a.total,
                )?;
                if let Some(key) = &o.idem_key {
                    plan.answers.insert(
                        (o.user.clone(), key.clone()),
                        (o.fingerprint.clone(), answer.clone()),
                    );
                }
                a.answer = answer;
                accepted.push(a);
                out.push(Ok(Created {
                    order: view,
                    replay: false,
                }));
            }
        }
    }
    write(t, &plan, orders, &accepted, inline_weak)?;
    Ok(out)
}

/// Takes the group's locks and reads what its decisions need. Lock order, the same in every group so two
/// concurrent groups (on any instance) queue instead of deadlocking: idempotency keys (advisory, by hash),
/// then SKU rows (by name); bucket rows are written only under their SKU's row lock.
fn lock_and_read(t: &mut Tx<'_>, orders: &[NewOrder]) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    let keys: Vec<String> = orders
        .iter()
        .filter_map(|o| o.idem_key.as_ref().map(|k| key_lock(&o.user, k)))
        .collect();
    if !keys.is_empty() {
        // Concurrent requests with one key queue here; the second then sees the first's row (the reads below
        // are later statements, so under READ COMMITTED they see every commit made before the lock).
        t.exec(
            "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h
             FROM unnest($1::text[]) k ORDER BY h) l",
            &[&keys],
        )?;
    }
    let mut skus: Vec<&str> = orders
        .iter()
        .flat_map(|o| o.lines.iter().map(|l| l.sku.as_str()))
        .collect();
    skus.sort_unstable();
    skus.dedup();
    // `FOR UPDATE` returns each row's newest version once its lock is ours: the stock the decisions start from.
    for r in t.query(
        "SELECT s.sku, s.price_cents, p.shop_id, s.available, s.sale_seq FROM skus s
         JOIN products p ON p.id = s.product_id WHERE s.sku = ANY($1)
         ORDER BY s.sku COLLATE \"C\" FOR UPDATE OF s",
        &[&skus],
    )? {
        plan.shelves.insert(
            r.get(0),
            Shelf {
                price: r.get(1),
                shop: r.get(2),
                available: r.get(3),
                on_sale: false,
                sale_seq: r.get(4),
                buckets: Vec::new(),
            },
        );
    }
    for r in t.query(
        "SELECT sku, bucket, available FROM sku_buckets WHERE sku = ANY($1)
         ORDER BY sku COLLATE \"C\", bucket",
        &[&skus],
    )? {
        let sku: String = r.get(0);
        if let Some(s) = plan.shelves.get_mut(&sku) {
            s.on_sale = true;
            s.buckets.push((r.get(1), r.get(2)));
        }
    }
    let (users, keys): (Vec<&str>, Vec<&str>) = orders
        .iter()
        .filter_map(|o| o.idem_key.as_deref().map(|k| (o.user.as_str(), k)))
        .unzip();
    if !keys.is_empty() {
        for r in t.query(
            r#"SELECT "user", idem_key, fingerprint, answer FROM orders
             WHERE ("user", idem_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))"#,
            &[&users, &keys],
        )? {
            plan.answers.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
        }
    }
    let (users, skus): (Vec<&str>, Vec<&str>) = orders
        .iter()
        .filter(|o| o.kind == OrderKind::Seckill)
        .flat_map(|o| o.lines.iter().map(|l| (o.user.as_str(), l.sku.as_str())))
        .unzip();
    if !users.is_empty() {
        // Every order creation holds these SKUs' row locks, so no other can add to these counts before we
        // commit; a cancel, an expiry or a refund only lowers them, and opening a sale (a new number) takes
        // the row lock too.
        for r in t.query(
            // Refunded units count no more than a refunded order's do; units of an earlier sale of the SKU not
            // at all (`order_rules::sale_of`). A flash-sale line with no number was written after the upgrade
            // by an instance of the build before (a rolling upgrade), in the sale then current: counted in
            // this one, so that window cannot sell a buyer past the limit.
            r#"SELECT o."user", l.sku, SUM(l.qty - l.refunded_qty)::BIGINT FROM orders o JOIN order_lines l ON l.order_id = o.id
             JOIN skus s ON s.sku = l.sku AND COALESCE(l.sale_seq, s.sale_seq) = s.sale_seq
             WHERE o.kind = 'seckill' AND o.status IN ('reserved', 'paid', 'fulfilled')
               AND (o."user", l.sku) IN (SELECT * FROM unnest($1::text[], $2::text[]))
             GROUP BY 1, 2"#,
            &[&users, &skus],
        )? {
            plan.bought.insert((r.get(0), r.get(1)), r.get(2));
        }
    }
    Ok(plan)
}

enum Decision {
    /// A replay, a conflict or a refusal: nothing to write.
    Answer(Result<Created, Reject>),
    Create(Accepted),
}

/// The rules of `create_one` before groups, in its order: a keyed replay, the flash-sale limit, then each
/// line's SKU and stock. Changes `plan` only when the order is accepted.
fn decide(plan: &mut Plan, o: &NewOrder) -> Result<Decision, StoreError> {
    if let Some(key) = &o.idem_key
        && let Some((fp, answer)) = plan.answers.get(&(o.user.clone(), key.clone()))
    {
        return Ok(Decision::Answer(order_rules::replay(key, o, fp, answer)?));
    }
    if o.kind == OrderKind::Seckill {
        for l in &o.lines {
            let bought = plan
                .bought
                .get(&(o.user.clone(), l.sku.clone()))
                .copied()
                .unwrap_or(0);
            // An unknown SKU is refused below as not found, not as over the limit of a sale it has none of.
            if let Some(r) =
                order_rules::over_limit(o, l, bought).filter(|_| plan.shelves.contains_key(&l.sku))
            {
                return Ok(Decision::Answer(Err(r)));
            }
        }
    }
    // Tentative shelves: a line refused after another was taken leaves the plan as it was.
    let mut taken: HashMap<String, Shelf> = HashMap::new();
    let mut moves = Vec::new();
    let mut lines = Vec::with_capacity(o.lines.len());
    let mut total = 0i64;
    for l in &o.lines {
        let qty = i64::from(l.qty);
        let shelf = match taken.get(&l.sku).or_else(|| plan.shelves.get(&l.sku)) {
            Some(s) => s.clone(),
            None => {
                return Ok(Decision::Answer(Err(Reject::NotFound {
                    what: "sku",
                    id: l.sku.clone(),
                })));
            }
        };
        let (shelf, take) = match reserve(o.kind, &l.sku, shelf, qty) {
            Ok(done) => done,
            Err(r) => return Ok(Decision::Answer(Err(r))),
        };
        total += shelf.price * qty;
        lines.push((
            LineView {
                sku: l.sku.clone(),
                qty,
                price_cents: shelf.price,
                refunded_qty: 0,
                sale_seq: order_rules::sale_of(o.kind, shelf.sale_seq),
            },
            shelf.shop,
        ));
        moves.push((l.sku.clone(), qty, take));
        taken.insert(l.sku.clone(), shelf);
    }
    plan.shelves.extend(taken);
    for (sku, qty, take) in moves {
        let m = plan.sku_moves.entry(sku.clone()).or_default();
        m.0 += take.shelf;
        m.1 += qty;
        for (bucket, units) in take.buckets {
            *plan.bucket_takes.entry((sku.clone(), bucket)).or_default() += units;
        }
        if o.kind == OrderKind::Seckill {
            *plan.bought.entry((o.user.clone(), sku)).or_default() += qty;
        }
    }
    Ok(Decision::Create(Accepted {
        order: 0,
        total,
        answer: String::new(),
        lines,
    }))
}

/// The stock decision of one line, as the conditional decrements made it: an ordinary order is refused while
/// a flash sale is open; a flash-sale order takes from one bucket holding `qty` (from a random start, as
/// before, so a SKU's buckets drain evenly), else from the shelf, else from several buckets and the shelf
/// together (`order_rules::gather`); what is short is `order_rules::short_of_stock`.
fn reserve(
    kind: OrderKind,
    sku: &str,
    mut s: Shelf,
    qty: i64,
) -> Result<(Shelf, order_rules::Gather), Reject> {
    if kind == OrderKind::Regular && s.on_sale {
        return Err(Reject::OnFlashSale { sku: sku.into() });
    }
    if kind == OrderKind::Seckill {
        let start = i64::from(rand::random::<u8>() % 64);
        let pick = s
            .buckets
            .iter_mut()
            .filter(|b| b.1 >= qty)
            .min_by_key(|b| (b.0 - start).rem_euclid(64));
        if let Some(b) = pick {
            b.1 -= qty;
            let took = vec![(b.0, qty)];
            return Ok((
                s,
                order_rules::Gather {
                    buckets: took,
                    shelf: 0,
                },
            ));
        }
    }
    if s.available >= qty {
        s.available -= qty;
        return Ok((
            s,
            order_rules::Gather {
                buckets: Vec::new(),
                shelf: qty,
            },
        ));
    }
    if kind != OrderKind::Seckill {
        return Err(order_rules::short_of_stock(sku, s.available, qty));
    }
    let held: Vec<(i64, i64)> = s.buckets.iter().copied().filter(|b| b.1 > 0).collect();
    let plan = order_rules::gather(sku, &held, s.available, qty)?;
    for &(bucket, take) in &plan.buckets {
        if let Some(b) = s.buckets.iter_mut().find(|b| b.0 == bucket) {
            b.1 -= take;
        }
    }
    s.available -= plan.shelf;
    Ok((s, plan))
}

/// Writes the accepted orders: stock, buckets, orders, lines and outbox rows, one statement each. The
/// `CHECK (available >= 0)` constraints still stand behind the decisions: a wrong one fails the group.
fn write(
    t: &mut Tx<'_>,
    plan: &Plan,
    orders: &[NewOrder],
    accepted: &[Accepted],
    inline_weak: bool,
) -> Result<(), StoreError> {
    if accepted.is_empty() {
        return Ok(());
    }
    let (skus, moves): (Vec<&str>, Vec<(i64, i64)>) =
        plan.sku_moves.iter().map(|(s, m)| (s.as_str(), *m)).unzip();
    let (shelf, reserved): (Vec<i64>, Vec<i64>) = moves.into_iter().unzip();
    let n = t.exec(
        "UPDATE skus SET available = skus.available - d.shelf, reserved = skus.reserved + d.res
         FROM unnest($1::text[], $2::int8[], $3::int8[]) AS d(sku, shelf, res) WHERE skus.sku = d.sku",
        &[&skus, &shelf, &reserved],
    )?;
    if n != skus.len() as u64 {
        return Err(StoreError::Internal(format!(
            "order group: {n} of {} SKU rows updated under their locks",
            skus.len()
        )));
    }
    if !plan.bucket_takes.is_empty() {
        let mut bskus = Vec::new();
        let mut buckets = Vec::new();
        let mut takes = Vec::new();
        for ((s, b), u) in &plan.bucket_takes {
            bskus.push(s.as_str());
            buckets.push(*b);
            takes.push(*u);
        }
        t.exec(
            "UPDATE sku_buckets SET available = sku_buckets.available - d.take
             FROM unnest($1::text[], $2::int8[], $3::int8[]) AS d(sku, bucket, take)
             WHERE sku_buckets.sku = d.sku AND sku_buckets.bucket = d.bucket",
            &[&bskus, &buckets, &takes],
        )?;
    }
    let mut ids = Vec::with_capacity(accepted.len());
    let mut keys = Vec::with_capacity(accepted.len());
    let mut fps = Vec::with_capacity(accepted.len());
    let mut users = Vec::with_capacity(accepted.len());
    let mut kinds = Vec::with_capacity(accepted.len());
    let mut totals = Vec::with_capacity(accepted.len());
    let mut created = Vec::with_capacity(accepted.len());
    let mut expires = Vec::with_capacity(accepted.len());
    let mut answers = Vec::with_capacity(accepted.len());
    let (mut l_ids, mut l_skus, mut l_qty, mut l_price, mut l_shop, mut l_sale) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for a in accepted {
        let o = &orders[a.order];
        ids.push(o.id.as_str());
        keys.push(o.idem_key.as_deref());
        fps.push(o.fingerprint.as_str());
        users.push(o.user.as_str());
        kinds.push(o.kind.as_str());
        totals.push(a.total);
        created.push(o.created_ms);
        expires.push(o.expires_ms);
        answers.push(a.answer.as_str());
        for (l, shop) in &a.lines {
            l_ids.push(o.id.as_str());
            l_skus.push(l.sku.as_str());
            l_qty.push(l.qty);
            l_price.push(l.price_cents);
            l_shop.push(*shop);
            l_sale.push(l.sale_seq);
        }
    }
    t.exec(
        r#"INSERT INTO orders(id, idem_key, fingerprint, "user", kind, status, total_cents, created_ms, expires_ms,
                            paid_via, updated_ms, answer)
         SELECT id, k, fp, u, kind, 'reserved', total, created, expires, NULL, created, answer
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[],
                     $8::int8[], $9::text[]) AS o(id, k, fp, u, kind, total, created, expires, answer)"#,
        &[&ids, &keys, &fps, &users, &kinds, &totals, &created, &expires, &answers],
    )?;
    t.exec(
        "INSERT INTO order_lines(order_id, sku, qty, price_cents, shop_id, sale_seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])",
        &[&l_ids, &l_skus, &l_qty, &l_price, &l_shop, &l_sale],
    )?;
    if inline_weak {
        // The sync level (a group of one): the weak effects read the order just written.
        for id in &ids {
            super::postgres_money::enqueue(t, "order.placed", id, true)?;
        }
    } else {
        t.exec(
            "INSERT INTO outbox(topic, order_id, created_ms, done)
             SELECT 'order.placed', id, $2, false FROM unnest($1::text[]) WITH ORDINALITY AS o(id, n) ORDER BY n
             ON CONFLICT (topic, order_id) DO NOTHING",
            &[&ids, &crate::domain::now_ms()],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shelf(available: i64, buckets: &[(i64, i64)]) -> Shelf {
        Shelf {
            price: 100,
            shop: 1,
            available,
            on_sale: !buckets.is_empty(),
            sale_seq: 1,
            buckets: buckets.to_vec(),
        }
    }

    #[test]
    fn a_flash_sale_line_takes_one_bucket_then_the_shelf_then_gathers() {
        let (s, took) = reserve(OrderKind::Seckill, "f", shelf(0, &[(0, 1), (1, 1)]), 1).unwrap();
        assert_eq!((took.buckets.len(), took.shelf), (1, 0));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<i64>(), 1);
        let (s, took) = reserve(OrderKind::Seckill, "f", shelf(2, &[(0, 1)]), 2).unwrap();
        assert_eq!((took.buckets, took.shelf, s.available), (vec![], 2, 0));
        let (s, took) = reserve(OrderKind::Seckill, "f", shelf(1, &[(0, 1), (1, 1)]), 3).unwrap();
        assert_eq!((took.buckets, took.shelf), (vec![(0, 1), (1, 1)], 1));
        assert_eq!((s.available, s.buckets), (0, vec![(0, 0), (1, 0)]));
        assert_eq!(
            reserve(OrderKind::Seckill, "f", shelf(0, &[(0, 0)]), 1).unwrap_err(),
            Reject::SoldOut { sku: "f".into() }
        );
    }

    #[test]
    fn an_ordinary_line_takes_the_shelf_or_is_refused() {
        assert!(matches!(
            reserve(OrderKind::Regular, "s", shelf(5, &[(0, 5)]), 1),
            Err(Reject::OnFlashSale { .. })
        ));
        assert!(matches!(
            reserve(OrderKind::Regular, "s", shelf(1, &[]), 2),
            Err(Reject::OutOfStock {
                available: 1,
                wanted: 2,
                ..
            })
        ));
        let (s, took) = reserve(OrderKind::Regular, "s", shelf(3, &[]), 2).unwrap();
        assert_eq!((s.available, took.shelf), (1, 2));
    }
}
