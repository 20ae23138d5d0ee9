//! The shared flash-sale gate on Redis (issue 8), beside the local sold-out gate (`gate`): one atomic Lua
//! script checks a SKU's cached stock and the buyer's per-user count in the SKU's current sale and takes both,
//! so a flood of attempts on a hot or sold-out item is answered by Redis instead of the store. The counts are
//! per sale, as the store's are: a buyer of an earlier sale of the SKU must not be refused early.
//!
//! Redis may only reject early; the store's conditional decrement stays the authority, so Redis can never
//! cause an oversell: an admitted attempt still goes to the store, and when the store refuses it the unit
//! and the user's count are given back. A missing key (a fresh or restarted Redis) admits everything until
//! the reconciler ([`reconciler`]) rebuilds the stock counters from the store. Any Redis failure opens a
//! circuit for `retry_after`: while open, the gate admits without a network call, so a dead Redis costs a
//! request nothing and orders take the store-only path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::exec::StoreExec;
use crate::resp::{self, Conn, RespError, Value};

/// Takes `qty` of stock and of the user's allowance in the SKU's current sale, or says why not. Keys: stock,
/// and the SKU's sale number ([`sale_key`]). Args: qty, limit, the count's life in ms, and the user's count
/// key ([`bought_key`]) split around the sale number, which only the script reads atomically with the
/// counts (a standalone Redis, as the gate needs, lets a script name a key it builds). Returns {1, sale}
/// (taken, counted in that sale), 0 (sold out), -1 (over the user's limit in this sale), -2 (no counter or
/// no sale number yet, or fewer units than asked but some: ask the store, whose answer says how many are
/// left).
const ADMIT: &str = r#"
local s = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not s or not sale then return -2 end
local q = tonumber(ARGV[1])
if tonumber(s) <= 0 then return 0 end
if tonumber(s) < q then return -2 end
local bought = ARGV[4] .. sale .. ARGV[5]
local b = tonumber(redis.call('GET', bought) or '0')
if b + q > tonumber(ARGV[2]) then return -1 end
redis.call('DECRBY', KEYS[1], q)
redis.call('INCRBY', bought, q)
redis.call('PEXPIRE', bought, ARGV[3])
return {1, tonumber(sale)}
"#;

/// Raises a SKU's sale number to ARGV[1] (never lowers it: a reconciler that read the store before a sale
/// opened must not take the gate back to the sale before, whose counts would refuse that sale's buyers), and
/// keeps it ARGV[2] ms more. Keys: the sale number; then, when ARGV[3] is given, the stock counter set to it
/// (the reconciler's rebuild, in the same call).
const RAISE_SALE: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] then redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2]) end
return 1
"#;

/// Gives back what `ADMIT` took (the store refused or failed). Args: qty.
const RELEASE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
local b = tonumber(redis.call('GET', KEYS[2]) or '0')
if b > 0 then redis.call('DECRBY', KEYS[2], math.min(b, tonumber(ARGV[1]))) end
return 1
"#;

/// What the gate says about one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Taken from the Redis counters, counted in sale `sale`: give back with [`RedisGate::release`] if the
    /// store refuses.
    Taken {
        sale: i64,
    },
    /// Redis has no opinion (no counter, circuit open, or an error): ask the store.
    Pass,
    SoldOut,
    OverLimit,
}

impl Admission {
    /// Its `answer` label in `xcluster_app_redis_gate_total`.
    const fn label(self) -> &'static str {
        match self {
            Admission::Taken { .. } => "taken",
            Admission::Pass => "pass",
            Admission::SoldOut => "sold_out",
            Admission::OverLimit => "over_limit",
        }
    }
}

/// The `answer` label of a call that failed (the circuit opens).
const FAILED_ANSWER: &str = "error";

/// Every `answer` label of `xcluster_app_redis_gate_total`: an admission's, or a failed call's.
const ANSWERS: [&str; 5] = [
    Admission::Taken { sale: 0 }.label(),
    Admission::Pass.label(),
    Admission::SoldOut.label(),
    Admission::OverLimit.label(),
    FAILED_ANSWER,
];

/// Redis connection settings and timeouts.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// Bound on connecting and on each command.
    pub timeout: Duration,
    /// How long the circuit stays open after a failure.
    pub retry_after: Duration,
    /// How often the reconciler rebuilds the stock counters from the store.
    pub rebuild_every: Duration,
}

/// The Redis gate.
#[derive(Debug)]
pub struct RedisGate {
    addr: String,
    password: Option<String>,
    opts: RedisOptions,
    idle: Mutex<Vec<Conn>>,
    /// Until when (unix ms) the circuit is open.
    open_until_ms: AtomicI64,
    /// SKUs the store answered flash-sale attempts for ([`RedisGate::heat`]), with the time of the latest:
    /// the reconciler keeps their counters (bounded).
    hot: Mutex<BTreeMap<String, Instant>>,
}

/// Most SKUs whose counters the reconciler keeps.
const MAX_HOT: usize = 256;

fn stock_key(sku: &str) -> String {
    format!("xbuy:stock:{sku}")
}

/// The number of `sku`'s latest flash sale, as the store's `skus.sale_seq`: the per-user counts are per sale.
fn sale_key(sku: &str) -> String {
    format!("xbuy:sale:{sku}")
}

/// The key of the units of `sku` the gate let `user` take lately in sale `sale`, in two parts around the
/// number (`ADMIT` puts in the number it reads). `/` is in no id (`domain::valid_id`) nor in a number, so no
/// two triples share a key.
fn bought_key_parts(sku: &str, user: &str) -> (String, String) {
    (format!("xbuy:bought:{sku}/"), format!("/{user}"))
}

fn bought_key(sku: &str, sale: i64, user: &str) -> String {
    let (head, tail) = bought_key_parts(sku, user);
    format!("{head}{sale}{tail}")
}

impl RedisGate {
    pub fn new(opts: RedisOptions) -> Result<RedisGate, String> {
        let (addr, password) =
            resp::parse_url(&opts.url).ok_or("redis_url must be redis://[:password@]host:port")?;
        // At 0 from the start, so `rate()` and the alert on errors see the first one.
        for answer in ANSWERS {
            metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => answer).increment(0);
        }
        Ok(RedisGate {
            addr,
            password,
            opts,
            idle: Mutex::new(Vec::new()),
            open_until_ms: AtomicI64::new(0),
            hot: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether the circuit is closed (Redis is being used).
    pub fn is_up(&self) -> bool {
        now_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Runs one command on a pooled connection, opening the circuit on any failure.
    async fn call(&self, args: &[&str]) -> Option<Value> {
        if !self.is_up() {
            return None;
        }
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(c) => Ok(c),
            None => Conn::connect(&self.addr, self.password.as_deref(), self.opts.timeout).await,
        };
        let result = match conn {
            Ok(mut c) => match c.call(args, self.opts.timeout).await {
                Ok(v) => {
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() < 32 {
                        idle.push(c);
                    }
                    Ok(v)
                }
                // Any failure drops the connection, which may be out of step with its replies; a script's
                // error reply too (a bug of ours, or a Redis that is not what we expect), so the circuit
                // opens and the store alone decides.
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.trip(&e);
                None
            }
        }
    }

    fn trip(&self, e: &RespError) {
        let until = now_ms() + self.opts.retry_after.as_millis() as i64;
        let was = self.open_until_ms.swap(until, Ordering::Relaxed);
        if was < now_ms() {
            tracing::warn!(error = %e, retry_ms = self.opts.retry_after.as_millis() as u64, "redis gate circuit open: store-only path");
        }
        metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => FAILED_ANSWER).increment(1);
        // Connections may be dead too (a restart): start afresh.
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Has the reconciler keep `sku`'s counter: a SKU the store answered a flash-sale attempt for, so one that
    /// exists. Taking every SKU an attempt named, before the store had, let anyone fill the bounded set with
    /// made-up names (256 requests, no token), and no later sale's counter was ever built: its attempts all
    /// passed to the store until a restart.
    ///
    /// When full, the SKU whose latest attempt is the oldest gives way: the set only grew, so an instance that
    /// had seen attempts on 256 SKUs (sales over its life) built no counter for any later sale.
    pub fn heat(&self, sku: &str) {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        // Every attempt passes here: one already hot is stamped without a new key allocated.
        if let Some(at) = hot.get_mut(sku) {
            *at = Instant::now();
            return;
        }
        if hot.len() >= MAX_HOT {
            let coldest = hot.iter().min_by_key(|(_, at)| **at).map(|(s, _)| s.clone());
            if let Some(coldest) = coldest {
                hot.remove(&coldest);
            }
        }
        hot.insert(sku.to_string(), Instant::now());
    }

    /// Asks the gate for `qty` units of `sku` for `user` with a per-user `limit`.
    pub async fn admit(&self, sku: &str, user: &str, qty: u32, limit: u32) -> Admission {
        let (stock, sale) = (stock_key(sku), sale_key(sku));
        let (head, tail) = bought_key_parts(sku, user);
        let (qty, limit, ttl) = (
            qty.to_string(),
            limit.to_string(),
            self.counter_ttl_ms().to_string(),
        );
        let answer = match self
            .call(&[
                "EVAL", ADMIT, "2", &stock, &sale, &qty, &limit, &ttl, &head, &tail,
            ])
            .await
        {
            Some(Value::Array(taken)) => match taken.as_slice() {
                [Value::Int(1), Value::Int(sale)] => Admission::Taken { sale: *sale },
                _ => Admission::Pass,
            },
            Some(Value::Int(0)) => Admission::SoldOut,
            Some(Value::Int(-1)) => Admission::OverLimit,
            _ => Admission::Pass,
        };
        metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => answer.label()).increment(1);
        answer
    }

    /// Gives back a [`Admission::Taken`] in sale `sale` the store did not turn into an order.
    pub async fn release(&self, sku: &str, sale: i64, user: &str, qty: u32) {
        let (stock, bought) = (stock_key(sku), bought_key(sku, sale, user));
        let qty = qty.to_string();
        self.call(&["EVAL", RELEASE, "2", &stock, &bought, &qty]).await;
    }

    /// Forgets what `user` took of `sku` in sale `sale` (their flash-sale order of that sale was cancelled),
    /// so the gate does not refuse them `limit_exceeded` when the store, which counts only live orders, would
    /// sell to them again.
    pub async fn forget(&self, sku: &str, sale: i64, user: &str) {
        self.call(&["DEL", &bought_key(sku, sale, user)]).await;
    }

    /// Has the gate count in sale `sale` of `sku` from now on (the store just opened it; the number is only
    /// ever raised). Until then the gate counted in the sale before, whose buyers it would refuse early in
    /// this one, which the store would not.
    pub async fn open_sale(&self, sku: &str, sale: i64) {
        let ttl = self.counter_ttl_ms().to_string();
        self.call(&["EVAL", RAISE_SALE, "1", &sale_key(sku), &sale.to_string(), &ttl])
            .await;
    }

    /// How long a stock counter or a user's count lives unless written again. A count is never read back
    /// from the store, and an order can end without passing here (it expires, or is refunded): so an
    /// `over_limit` answer is trusted this long at most, and the counts of past sales do not pile up in Redis.
    fn counter_ttl_ms(&self) -> u64 {
        (self.opts.rebuild_every.as_millis() as u64 * 10).max(5_000)
    }

    /// Sets a SKU's stock counter to what the store says is sellable, and raises its sale number to the
    /// store's (a restarted Redis has none, and an instance's write at a sale's opening may have failed). Both
    /// expire unless rebuilt, so a stopped reconciler cannot leave Redis rejecting on stale numbers for long.
    async fn rebuild(&self, sku: &str, sellable: i64, sale: i64) {
        let ttl = self.counter_ttl_ms().to_string();
        self.call(&[
            "EVAL",
            RAISE_SALE,
            "2",
            &sale_key(sku),
            &stock_key(sku),
            &sale.to_string(),
            &ttl,
            &sellable.max(0).to_string(),
        ])
        .await;
    }

    fn hot(&self) -> Vec<String> {
        self.hot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// Rebuilds the hot SKUs' counters from the store every `rebuild_every` (and right after Redis comes back,
/// since a restarted Redis is empty and the circuit's half-open call lands here or on a request).
pub async fn reconciler(gate: Arc<RedisGate>, exec: StoreExec, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(gate.opts.rebuild_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hot = gate.hot();
        if hot.is_empty() || !gate.is_up() {
            continue;
        }
        // Products are few and small; a bounded scan finds the hot SKUs' sellable stock.
        let products = exec
            .run(|s| {
                let mut all = Vec::new();
                let mut after = 0;
                for _ in 0..10 {
                    let page = s.list_products(after, 500)?;
                    let Some(last) = page.last() else { break };
                    after = last.id;
                    all.extend(page);
                }
                Ok(all)
            })
            .await;
        let Ok(products) = products else { continue };
        for p in products {
            for s in p.skus {
                if hot.contains(&s.sku) {
                    gate.rebuild(&s.sku, s.available + s.bucketed, s.sale_seq).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new SKU's attempts always get its counter built: when the set is full, the coldest SKU gives way.
    #[test]
    fn a_full_hot_set_takes_a_new_sku_in_place_of_the_coldest() {
        let gate = RedisGate::new(RedisOptions {
            url: "redis://127.0.0.1:1".into(),
            timeout: Duration::from_millis(10),
            retry_after: Duration::from_secs(1),
            rebuild_every: Duration::from_secs(1),
        })
        .expect("a valid url");
        for i in 0..MAX_HOT {
            gate.heat(&format!("old-{i}"));
        }
        gate.heat("old-0");
        gate.heat("new-sale");
        let hot = gate.hot();
        assert_eq!(hot.len(), MAX_HOT);
        assert!(hot.iter().any(|s| s == "new-sale"), "the new sale's SKU is hot");
        assert!(hot.iter().any(|s| s == "old-0"), "a SKU heated again stays");
        assert!(!hot.iter().any(|s| s == "old-1"), "the coldest gave way");
    }
}
