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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::exec::StoreExec;
use crate::resp::{self, Conn, RespError, Value};

/// Takes `qty` of stock and of the user's allowance in the SKU's current sale, or says why not. Keys: stock,
/// and the SKU's sale number ([`sale_key`]). Args: qty, limit, the count's life in ms, the user's count key
/// ([`bought_key`]) split around the sale number, which only the script reads atomically with the counts (a
/// standalone Redis, as the gate needs, lets a script name a key it builds), and, for a keyed attempt, its
/// key's in-flight mark ([`in_flight_key`], else empty), the mark's life in ms and the attempt's own name
/// on it ([`Mark`]). Returns {1, sale} (taken, counted in that sale), 0 (sold out), -1 (over the user's
/// limit in this sale), -2 (no counter or no sale number yet, or fewer units than asked but some: ask the
/// store, whose answer says how many are left), -3 (it would refuse, but an attempt under the same key is in
/// flight: the units it counts may be that attempt's own). An attempt sent on to the store (1, -2) is
/// written on its key's mark, a hash, with what it took (the sale it was counted in, or `-`) until it
/// settles: so its give-back, when its reply was lost, is exactly what it took ([`SETTLE_MARKED`]), and
/// taking it off is the same however often it is sent.
const ADMIT: &str = r#"
local mark = ARGV[6]
local function refuse(code)
  if mark ~= '' and redis.call('EXISTS', mark) == 1 then return -3 end
  return code
end
local function marked(answer, took)
  if mark ~= '' then
    redis.call('HSET', mark, ARGV[8], took)
    redis.call('PEXPIRE', mark, ARGV[7])
  end
  return answer
end
local s = redis.call('GET', KEYS[1])
local sale = redis.call('GET', KEYS[2])
if not s or not sale then return marked(-2, '-') end
local q = tonumber(ARGV[1])
if tonumber(s) <= 0 then return refuse(0) end
if tonumber(s) < q then return marked(-2, '-') end
local bought = ARGV[4] .. sale .. ARGV[5]
local b = tonumber(redis.call('GET', bought) or '0')
if b + q > tonumber(ARGV[2]) then return refuse(-1) end
redis.call('DECRBY', KEYS[1], q)
redis.call('INCRBY', bought, q)
redis.call('PEXPIRE', bought, ARGV[3])
return marked({1, tonumber(sale)}, sale)
"#;

/// Raises a SKU's sale number to ARGV[1] (never lowers it: a reconciler that read the store before a sale
/// opened must not take the gate back to the sale before, whose counts would refuse that sale's buyers), and
/// keeps it ARGV[2] ms more. Keys: the sale number; then, when ARGV[3] is given, the stock counter set to it
/// (the reconciler's rebuild, in the same call) plus the units put back since its read of the store (the
/// count KEYS[3] now, less ARGV[4], the count it read before the store): set to what it read, a unit a cancel
/// put back meanwhile was overwritten, and refused `sold_out` until the next rebuild. (One put back after
/// its commit, which the read saw, counts twice until then: the lenient side.) The count lives as long as
/// the counter, so it does not expire between the reconciler's read of it and the rebuild.
const RAISE_SALE: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] then
  local since = tonumber(redis.call('GET', KEYS[3]) or '0') - tonumber(ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  redis.call('SET', KEYS[2], tonumber(ARGV[3]) + math.max(since, 0), 'PX', ARGV[2])
end
return 1
"#;

/// The Lua function the give-back scripts share: puts `qty` back on the stock counter (if there is one: a
/// counter of only these units would refuse the rest) and takes it off the buyer's count `bought`.
macro_rules! give_back_lua {
    () => {
        r#"
local function give_back(stock, bought, qty)
  if redis.call('EXISTS', stock) == 1 then redis.call('INCRBY', stock, qty) end
  local b = tonumber(redis.call('GET', bought) or '0')
  if b > 0 then redis.call('DECRBY', bought, math.min(b, tonumber(qty))) end
end
"#
    };
}

/// Gives back what an unkeyed `ADMIT` took (the store refused or failed). Keys: stock, the buyer's count.
/// Args: qty. Sent again after a reply lost, it applies twice (only lenient: the store decides).
const RELEASE: &str = concat!(
    give_back_lua!(),
    "give_back(KEYS[1], KEYS[2], ARGV[1])\nreturn 1\n"
);

/// Gives back what an unkeyed `ADMIT` whose reply was lost may have taken, in the SKU's current sale (its
/// number read as `ADMIT` reads it): with no mark, nothing says whether it ran, nor in which sale. Keys:
/// stock, sale number. Args: the buyer's count key around the number (as `ADMIT`'s), qty. No sale number:
/// `ADMIT` took nothing.
const RELEASE_UNSURE: &str = concat!(
    give_back_lua!(),
    r#"
local sale = redis.call('GET', KEYS[2])
if sale then give_back(KEYS[1], ARGV[1] .. sale .. ARGV[2], ARGV[3]) end
return 1
"#
);

/// Gives back what a keyed attempt took, as its mark says ([`Admission::Taken`], or an
/// [`Admission::Unsure`] whose `ADMIT` reply was lost): nothing when it is not on the mark (it never ran, or
/// refused), else in the sale it names. What it took is then written as `-`, so the script sent again
/// (after a reply lost in turn) gives nothing more, where `RELEASE` sent twice took another attempt's count
/// off; and with ARGV[5] `1` (the attempt settled) it is taken off the mark. Keys: stock, the mark. Args:
/// the buyer's count key around the number (as `ADMIT`'s), qty, the attempt's name on the mark, `1` or `0`.
/// Were the mark to expire first (`in_flight_mark`, 30 s or more), nothing is given back: the buyer's count
/// then lasts its own life.
const SETTLE_MARKED: &str = concat!(
    give_back_lua!(),
    r#"
local took = redis.call('HGET', KEYS[2], ARGV[4])
if not took then return 0 end
if took ~= '-' then give_back(KEYS[1], ARGV[1] .. took .. ARGV[2], ARGV[3]) end
if ARGV[5] == '1' then
  redis.call('HDEL', KEYS[2], ARGV[4])
else
  redis.call('HSET', KEYS[2], ARGV[4], '-')
end
return 1
"#
);

/// Puts units back on a SKU's stock counter, if it has one (none: the gate asks the store until the reconciler
/// builds it, and a counter of only these units would refuse the rest), and counts them for the reconciler
/// (`RAISE_SALE`). Keys: stock, the count of units put back; then, when given, a buyer's count to delete
/// ([`RedisGate::forget`]). Args: the units, 0 or more; how long the count lives (ms).
const PUT_BACK: &str = r#"
if tonumber(ARGV[1]) > 0 then
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('INCRBY', KEYS[1], ARGV[1]) end
  redis.call('INCRBY', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if KEYS[3] then redis.call('DEL', KEYS[3]) end
return 1
"#;

/// The least an in-flight mark lives unless its attempt settles first ([`RedisOptions::in_flight_mark`]).
pub const MIN_IN_FLIGHT_MARK: Duration = Duration::from_secs(30);

/// An attempt's own name on its idempotency key's in-flight mark: random, so attempts under one key on
/// several instances never share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(u64);

/// What the gate says about one attempt. Each one sent on to the store is settled with
/// [`RedisGate::settle`] once the store has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Taken from the Redis counters, counted in sale `sale`; `mark`: a keyed attempt's name on its key's
    /// in-flight mark.
    Taken {
        sale: i64,
        mark: Option<Mark>,
    },
    /// Redis has no opinion (no counter, circuit open, or a call that never ran): ask the store. `mark`:
    /// written on its key's in-flight mark (Redis answered).
    Pass {
        mark: Option<Mark>,
    },
    /// The call failed once Redis may have run it (a reset or a timeout after it was sent): its unit may be
    /// taken and its buyer counted, with no word of it. Ask the store. Left alone, the buyer was counted for a
    /// unit the store never sold. Keyed (`mark`), its mark says whether it ran and what it took, and that is
    /// given back exactly. Unkeyed, as for a taken one, in the SKU's current sale: given back when it had not
    /// run, or in a sale opened since, the gate is only more lenient, and the store decides.
    Unsure {
        mark: Option<Mark>,
    },
    SoldOut,
    OverLimit,
    /// Redis would refuse, but an attempt under the same idempotency key is in flight, whose units may be
    /// what it counts: a refusal now could contradict that attempt's answer (a buyer told `sold_out` who
    /// then holds an order). Ask again once it settles.
    InFlight,
}

impl Admission {
    /// Its `answer` label in `xcluster_app_redis_gate_total`.
    const fn label(self) -> &'static str {
        match self {
            Admission::Taken { .. } => "taken",
            // The call's failure counts too, as `error`.
            Admission::Pass { .. } | Admission::Unsure { .. } => "pass",
            Admission::SoldOut => "sold_out",
            Admission::OverLimit => "over_limit",
            Admission::InFlight => "in_flight",
        }
    }
}

/// How a call to Redis went.
enum Called {
    Answered(Value),
    /// It never reached Redis (the circuit open, no turn, closed or failed before it was sent whole).
    NotRun,
    /// It failed once it was sent: Redis may have run it.
    MaybeRan,
}

/// The `answer` label of a call that failed (the circuit opens).
const FAILED_ANSWER: &str = "error";

/// The `answer` label of a call not made: every connection was busy for the whole command timeout.
const BUSY_ANSWER: &str = "busy";

/// Every `answer` label of `xcluster_app_redis_gate_total`: an admission's, or a failed or unmade call's.
const ANSWERS: [&str; 7] = [
    Admission::Taken { sale: 0, mark: None }.label(),
    Admission::Pass { mark: None }.label(),
    Admission::SoldOut.label(),
    Admission::OverLimit.label(),
    Admission::InFlight.label(),
    FAILED_ANSWER,
    BUSY_ANSWER,
];

/// Most connections to Redis at once, each carrying one command: a flood at a sale's opening waits for one
/// (up to the command timeout) rather than opening a connection per attempt, a connect storm that itself
/// timed out and opened the circuit. Redis runs one script at a time, so more would only queue there.
const MAX_CONNECTIONS: usize = 64;

/// Most give-backs of one batch in flight at once ([`RedisGate::forget_all`]): a quarter of the turns, so a
/// sweep after a sale leaves the rest to the attempts it runs beside.
const GIVE_BACKS_AT_ONCE: usize = MAX_CONNECTIONS / 4;

/// Idle time after which a pooled connection is checked with a `PING` before it carries a command. One a
/// NAT or Redis's `timeout` dropped while idle may take the command and then be reset, and a command whose
/// reply was lost cannot be sent again (a script would apply twice): the circuit opened, the flood going
/// to the store. A failed `PING` is only a connection to replace. Under load, connections are reused long
/// before this, and pay nothing.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(10);
/// How long an idle connection's `PING` may take: a round trip to a Redis that is up, with room for one
/// running a script.
const PING_WITHIN: Duration = Duration::from_millis(250);

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
    /// How long an in-flight mark lives unless its attempt settles first: longer than a store call may run
    /// (with PostgreSQL, its retries included), so that only an attempt whose instance died leaves one to
    /// expire, and its buyer's retries are answered `in_progress` until then. An attempt given up on while
    /// it ran keeps its mark: it may still commit, and a retry let through would find the last unit gone and
    /// be told `sold_out` while the first attempt's order was placed.
    pub in_flight_mark: Duration,
}

/// The Redis gate.
#[derive(Debug)]
pub struct RedisGate {
    addr: String,
    password: Option<String>,
    opts: RedisOptions,
    idle: Mutex<Vec<Conn>>,
    /// [`CHECK_IDLE_AFTER`], shorter in tests.
    check_idle_after: Duration,
    /// A connection's turn ([`MAX_CONNECTIONS`]), taken for each command.
    turns: tokio::sync::Semaphore,
    /// What the circuit's clock counts from: a monotonic one, so a wall clock stepped back (NTP) cannot hold
    /// the circuit open for the step, nor one stepped forward close it at once.
    epoch: Instant,
    /// Until when (ms since `epoch`) the circuit is open.
    open_until_ms: AtomicU64,
    /// SKUs the store answered flash-sale attempts for ([`RedisGate::heat`]), with the time of the latest:
    /// the reconciler keeps their counters (bounded).
    hot: Mutex<BTreeMap<String, Instant>>,
    /// Give-backs Redis has not taken yet, sent again by the reconciler (bounded, [`MAX_PENDING`]).
    pending: Mutex<std::collections::VecDeque<GiveBack>>,
}

/// Most SKUs whose counters the reconciler keeps.
const MAX_HOT: usize = 256;

/// Most give-backs kept while Redis does not take them (a few hundred bytes each).
const MAX_PENDING: usize = 10_000;

/// What the gate gives back: a unit the store did not sell ([`RedisGate::release`]), or a buyer's count of
/// a sale whose order ended ([`RedisGate::forget`]).
#[derive(Debug, Clone)]
enum GiveBack {
    Release {
        sku: String,
        /// The sale `ADMIT` counted it in; `None`: not known ([`Admission::Unsure`]), the SKU's current one.
        sale: Option<i64>,
        user: String,
        qty: u32,
    },
    Forget {
        sku: String,
        sale: i64,
        user: String,
        /// Units the order's end put back on sale, which go back on the stock counter.
        freed: u32,
    },
    /// Units added to a SKU's stock ([`RedisGate::restock`]).
    Restock { sku: String, qty: u32 },
    /// A keyed attempt settled: taken off its key's mark.
    Unmark { user: String, key: String, mark: Mark },
    /// A keyed attempt's give-back by its mark ([`SETTLE_MARKED`]); `settled`: also taken off the mark.
    Marked {
        sku: String,
        user: String,
        key: String,
        qty: u32,
        mark: Mark,
        settled: bool,
    },
}

/// What became of an attempt the gate sent on to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new order: it keeps what it took.
    Ordered,
    /// No new order (refused, failed, or a replay, which took nothing): what it took is given back.
    NotOrdered,
    /// Given up on while it ran: it may still commit. What it took is given back (the gate only more lenient,
    /// the store decides), and its mark stays until it expires, so a retry under its key is told to wait
    /// (`in_progress`), not let through to find the last unit gone and be told `sold_out` while this
    /// attempt's order is placed.
    MayCommit,
}

fn stock_key(sku: &str) -> String {
    format!("xbuy:stock:{sku}")
}

/// The number of `sku`'s latest flash sale, as the store's `skus.sale_seq`: the per-user counts are per sale.
fn sale_key(sku: &str) -> String {
    format!("xbuy:sale:{sku}")
}

/// The units put back on `sku`'s counter lately ([`PUT_BACK`]), which the reconciler reads before the store.
fn put_back_key(sku: &str) -> String {
    format!("xbuy:putback:{sku}")
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

/// The in-flight mark of `user`'s attempts under idempotency `key` (a key is its user's own): a hash of the
/// attempts in flight, each with what it took. The user comes first: `/` is in no id, so no two pairs share
/// a mark.
fn in_flight_key(user: &str, key: &str) -> String {
    format!("xbuy:attempts:{user}/{key}")
}

impl RedisGate {
    pub fn new(opts: RedisOptions) -> Result<RedisGate, String> {
        let (addr, password) =
            resp::parse_url(&opts.url).ok_or("redis_url must be redis://[:password@]host:port")?;
        // At 0 from the start, so `rate()` and the alert on errors see the first one.
        for answer in ANSWERS {
            metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => answer).increment(0);
        }
        metrics::counter!(crate::metrics::REDIS_GIVE_BACKS_DROPPED_TOTAL).increment(0);
        metrics::gauge!(crate::metrics::REDIS_GIVE_BACKS_PENDING).set(0.0);
        Ok(RedisGate {
            addr,
            password,
            opts,
            idle: Mutex::new(Vec::new()),
            check_idle_after: CHECK_IDLE_AFTER,
            turns: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
            epoch: Instant::now(),
            open_until_ms: AtomicU64::new(0),
            hot: Mutex::new(BTreeMap::new()),
            pending: Mutex::default(),
        })
    }

    /// Whether the circuit is closed (Redis is being used).
    pub fn is_up(&self) -> bool {
        self.clock_ms() >= self.open_until_ms.load(Ordering::Relaxed)
    }

    fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs one command on a pooled connection, opening the circuit on any failure. A pooled connection
    /// that Redis (or a NAT) closed while it sat idle is replaced once by a fresh one: taken as a failure,
    /// it turned the gate off for `retry_after`, the flood going straight to the store. One idle for
    /// [`CHECK_IDLE_AFTER`] is checked first, as one dropped may be reset only once it took the command.
    async fn call(&self, args: &[&str]) -> Option<Value> {
        match self.call_telling(args).await {
            Called::Answered(v) => Some(v),
            Called::NotRun | Called::MaybeRan => None,
        }
    }

    /// [`Self::call`], telling a call that never ran from one that may have.
    async fn call_telling(&self, args: &[&str]) -> Called {
        if !self.is_up() {
            return Called::NotRun;
        }
        // Waiting for a turn is not Redis failing: the circuit stays closed, and this attempt alone goes to
        // the store (a give-back is kept for the reconciler).
        let Ok(Ok(_turn)) = tokio::time::timeout(self.opts.timeout, self.turns.acquire()).await else {
            metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => BUSY_ANSWER).increment(1);
            return Called::NotRun;
        };
        // The circuit may have opened while this call waited: it is not sent into the failure just seen.
        if !self.is_up() {
            return Called::NotRun;
        }
        // One Redis (or a NAT) closed while it sat in the pool is replaced before it carries anything.
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let pooled = match pooled.filter(|c| !c.closed_by_peer()) {
            Some(c) if c.idle_for() >= self.check_idle_after => self.checked(c).await,
            pooled => pooled,
        };
        let fresh = || async {
            let fresh = Conn::connect(&self.addr, self.password.as_deref(), self.opts.timeout).await;
            // A connection that failed carried nothing.
            fresh.map_err(|e| RespError::Unsent(std::io::Error::other(e.to_string())))
        };
        // On a pooled connection that failed as the command was written, or that Redis refused before it ran
        // anything (`RespError::not_run`), the command did not run, so it is sent again on a fresh one. Not
        // after any other failure, a close before the reply too: a script that ran but whose reply was lost
        // would apply twice (another unit taken, the buyer's count raised again, never given back). Nor when
        // the fresh one failed: a Redis that does not answer a connect is not asked twice per call.
        let result = match pooled {
            Some(c) => match self.call_on(Ok(c), args).await {
                Err(e) if e.not_run() => self.call_on(fresh().await, args).await,
                answered => answered,
            },
            None => self.call_on(fresh().await, args).await,
        };
        match result {
            Ok(v) => Called::Answered(v),
            Err(e) => {
                self.trip(&e);
                match e.not_run() {
                    true => Called::NotRun,
                    false => Called::MaybeRan,
                }
            }
        }
    }

    /// `conn`, when it answers a `PING` within [`PING_WITHIN`] (or the command timeout, if shorter); dropped
    /// otherwise. Bounded apart: a connection whose packets a middlebox now drops would hold the call for a
    /// whole timeout before its fresh connection and its command took theirs.
    async fn checked(&self, mut conn: Conn) -> Option<Conn> {
        match conn.call(&["PING"], self.opts.timeout.min(PING_WITHIN)).await {
            Ok(_) => Some(conn),
            Err(e) => {
                tracing::debug!(error = %e, "an idle redis connection did not answer a PING; replaced");
                None
            }
        }
    }

    /// Runs one command on `conn`, which goes back to the pool if it answered.
    async fn call_on(&self, conn: Result<Conn, RespError>, args: &[&str]) -> Result<Value, RespError> {
        let mut c = conn?;
        // Any failure drops the connection, which may be out of step with its replies; a script's error
        // reply too (a bug of ours, or a Redis that is not what we expect), so the circuit opens and the
        // store alone decides.
        let v = c.call(args, self.opts.timeout).await?;
        // Never more than the turns allow, so a burst's connections stay for the next one.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_CONNECTIONS {
            idle.push(c);
        }
        Ok(v)
    }

    fn trip(&self, e: &RespError) {
        let now = self.clock_ms();
        let until = now + self.opts.retry_after.as_millis() as u64;
        let was = self.open_until_ms.swap(until, Ordering::Relaxed);
        if was < now {
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

    /// Asks the gate for `qty` units of `sku` for `user` with a per-user `limit`; `key` is the attempt's
    /// idempotency key, if any.
    pub async fn admit(&self, sku: &str, user: &str, qty: u32, limit: u32, key: Option<&str>) -> Admission {
        let (stock, sale) = (stock_key(sku), sale_key(sku));
        let (head, tail) = bought_key_parts(sku, user);
        let mark = key.map(|_| Mark(rand::random()));
        let (mark_key, name) = match (key, mark) {
            (Some(k), Some(m)) => (in_flight_key(user, k), m.0.to_string()),
            _ => Default::default(),
        };
        let (qty, limit, ttl, mark_ttl) = (
            qty.to_string(),
            limit.to_string(),
            self.counter_ttl_ms().to_string(),
            self.opts.in_flight_mark.as_millis().to_string(),
        );
        let called = self
            .call_telling(&[
                "EVAL", ADMIT, "2", &stock, &sale, &qty, &limit, &ttl, &head, &tail, &mark_key, &mark_ttl,
                &name,
            ])
            .await;
        let answer = match called {
            Called::Answered(Value::Array(taken)) => match taken.as_slice() {
                [Value::Int(1), Value::Int(sale)] => Admission::Taken { sale: *sale, mark },
                // Not a reply of ours: as if it had not run. Had it, the mark names what to give back.
                _ => Admission::Pass { mark },
            },
            Called::Answered(Value::Int(0)) => Admission::SoldOut,
            Called::Answered(Value::Int(-1)) => Admission::OverLimit,
            Called::Answered(Value::Int(-2)) => Admission::Pass { mark },
            Called::Answered(Value::Int(-3)) => Admission::InFlight,
            Called::MaybeRan => Admission::Unsure { mark },
            Called::Answered(_) => Admission::Pass { mark },
            Called::NotRun => Admission::Pass { mark: None },
        };
        metrics::counter!(crate::metrics::REDIS_GATE_TOTAL, "answer" => answer.label()).increment(1);
        answer
    }

    /// Settles an attempt at `qty` units of `sku` by `user` (under idempotency `key`, if any) that the gate
    /// sent on to the store as `admission`: gives back what it took unless it became an order, and takes a
    /// keyed one off its key's mark, before its answer leaves, so a retry sent the moment it arrives is
    /// answered, not told to wait.
    pub async fn settle(
        &self,
        sku: &str,
        user: &str,
        qty: u32,
        key: Option<&str>,
        admission: Admission,
        outcome: Outcome,
    ) {
        let give_back = outcome != Outcome::Ordered;
        let settled = outcome != Outcome::MayCommit;
        let unmark = |mark| GiveBack::Unmark {
            user: user.to_string(),
            key: key.unwrap_or_default().to_string(),
            mark,
        };
        let release = |sale| GiveBack::Release {
            sku: sku.to_string(),
            sale,
            user: user.to_string(),
            qty,
        };
        let (first, then) = match (admission, key) {
            // A keyed attempt's mark says what it took: given back exactly, once however often sent.
            (
                Admission::Taken { mark: Some(mark), .. } | Admission::Unsure { mark: Some(mark) },
                Some(key),
            ) if give_back => (
                Some(GiveBack::Marked {
                    sku: sku.to_string(),
                    user: user.to_string(),
                    key: key.to_string(),
                    qty,
                    mark,
                    settled,
                }),
                None,
            ),
            // Ordered, it keeps what it took, whatever that was.
            (Admission::Taken { mark: Some(mark), .. } | Admission::Unsure { mark: Some(mark) }, Some(_)) => {
                (None, Some(unmark(mark)))
            }
            (Admission::Taken { sale, .. }, _) => (give_back.then(|| release(Some(sale))), None),
            (Admission::Pass { mark }, _) => (None, mark.filter(|_| settled).map(unmark)),
            (Admission::Unsure { .. }, _) => (give_back.then(|| release(None)), None),
            (Admission::SoldOut | Admission::OverLimit | Admission::InFlight, _) => (None, None),
        };
        for g in [first, then].into_iter().flatten() {
            self.give_back(g).await;
        }
    }

    /// Gives back a [`Admission::Taken`] in sale `sale` the store did not turn into an order.
    #[cfg(test)]
    async fn release(&self, sku: &str, sale: i64, user: &str, qty: u32) {
        self.give_back(GiveBack::Release {
            sku: sku.to_string(),
            sale: Some(sale),
            user: user.to_string(),
            qty,
        })
        .await;
    }

    /// Forgets what `user` took of `sku` in sale `sale` (their flash-sale order of that sale was cancelled),
    /// so the gate does not refuse them `limit_exceeded` when the store, which counts only live orders, would
    /// sell to them again; and puts the `freed` units the order's end put back on sale on the stock counter,
    /// so the gate does not answer `sold_out` for them until the reconciler's next rebuild.
    pub async fn forget(&self, sku: &str, sale: i64, user: &str, freed: u32) {
        self.give_back(GiveBack::Forget {
            sku: sku.to_string(),
            sale,
            user: user.to_string(),
            freed,
        })
        .await;
    }

    /// [`Self::forget`] for each of a sweep's expired flash-sale `lines`, up to [`GIVE_BACKS_AT_ONCE`] at once
    /// (each on a connection of its own): one at a time, a sale's hundreds of expiries waited a round trip
    /// each, and their buyers were refused `limit_exceeded` meanwhile.
    pub async fn forget_all(&self, lines: &[crate::store::ExpiredLine]) {
        use futures_util::StreamExt;
        (futures_util::stream::iter(lines))
            .for_each_concurrent(GIVE_BACKS_AT_ONCE, |l| async move {
                let freed = u32::try_from(l.qty).unwrap_or(0);
                self.forget(&l.sku, l.sale, &l.user, freed).await;
            })
            .await;
    }

    /// Puts `qty` units a merchant added to `sku` (once committed) on its stock counter: a restocked sold-out
    /// item was refused `sold_out` by the gate until the reconciler's next rebuild.
    pub async fn restock(&self, sku: &str, qty: u32) {
        self.give_back(GiveBack::Restock {
            sku: sku.to_string(),
            qty,
        })
        .await;
    }

    /// Sends a give-back, or keeps it for the reconciler when Redis does not take it (a failed call, an open
    /// circuit): dropped, the buyer's count kept units the store never sold or had taken back, and they were
    /// refused `limit_exceeded` for the count's life (10 s, or 10 minutes with a slow rebuild). Units sent
    /// again after a rebuild that already counted them make the counter too high until the next one: the
    /// gate is then more lenient, and the store still decides.
    async fn give_back(&self, g: GiveBack) {
        if !self.send(&g).await {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() >= MAX_PENDING {
                // The oldest first: its count has likely expired meanwhile.
                pending.pop_front();
                metrics::counter!(crate::metrics::REDIS_GIVE_BACKS_DROPPED_TOTAL).increment(1);
            }
            pending.push_back(g);
            metrics::gauge!(crate::metrics::REDIS_GIVE_BACKS_PENDING).set(pending.len() as f64);
        }
    }

    async fn send(&self, g: &GiveBack) -> bool {
        let called = match g {
            GiveBack::Release {
                sku,
                sale: Some(sale),
                user,
                qty,
            } => {
                let (stock, bought) = (stock_key(sku), bought_key(sku, *sale, user));
                let qty = qty.to_string();
                self.call(&["EVAL", RELEASE, "2", &stock, &bought, &qty]).await
            }
            GiveBack::Release {
                sku,
                sale: None,
                user,
                qty,
            } => {
                let (stock, sale) = (stock_key(sku), sale_key(sku));
                let ((head, tail), qty) = (bought_key_parts(sku, user), qty.to_string());
                self.call(&["EVAL", RELEASE_UNSURE, "2", &stock, &sale, &head, &tail, &qty])
                    .await
            }
            GiveBack::Forget {
                sku,
                sale,
                user,
                freed,
            } => {
                let (stock, put, bought) = (stock_key(sku), put_back_key(sku), bought_key(sku, *sale, user));
                let (freed, ttl) = (freed.to_string(), self.counter_ttl_ms().to_string());
                self.call(&["EVAL", PUT_BACK, "3", &stock, &put, &bought, &freed, &ttl])
                    .await
            }
            GiveBack::Restock { sku, qty } => {
                let (stock, put) = (stock_key(sku), put_back_key(sku));
                let (qty, ttl) = (qty.to_string(), self.counter_ttl_ms().to_string());
                self.call(&["EVAL", PUT_BACK, "2", &stock, &put, &qty, &ttl])
                    .await
            }
            // Both take the attempt's own name off, the same however often they run.
            GiveBack::Unmark { user, key, mark } => {
                self.call(&["HDEL", &in_flight_key(user, key), &mark.0.to_string()])
                    .await
            }
            GiveBack::Marked {
                sku,
                user,
                key,
                qty,
                mark,
                settled,
            } => {
                let (stock, mark_key) = (stock_key(sku), in_flight_key(user, key));
                let ((head, tail), qty) = (bought_key_parts(sku, user), qty.to_string());
                let (name, settled) = (mark.0.to_string(), if *settled { "1" } else { "0" });
                self.call(&[
                    "EVAL",
                    SETTLE_MARKED,
                    "2",
                    &stock,
                    &mark_key,
                    &head,
                    &tail,
                    &qty,
                    &name,
                    settled,
                ])
                .await
            }
        };
        called.is_some()
    }

    /// Sends the give-backs kept while Redis did not take them, oldest first, until one fails.
    async fn resend_pending(&self) {
        loop {
            let next = self.pending.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            let Some(g) = next else { break };
            if !self.send(&g).await {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_front(g);
                break;
            }
        }
        metrics::gauge!(crate::metrics::REDIS_GIVE_BACKS_PENDING).set(self.pending() as f64);
    }

    /// Give-backs waiting for Redis.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
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
    /// `put_back`: the SKU's count of units put back ([`Self::put_backs`]) read before `sellable` was read
    /// from the store.
    async fn rebuild(&self, sku: &str, sellable: i64, sale: i64, put_back: i64) {
        let ttl = self.counter_ttl_ms().to_string();
        self.call(&[
            "EVAL",
            RAISE_SALE,
            "3",
            &sale_key(sku),
            &stock_key(sku),
            &put_back_key(sku),
            &sale.to_string(),
            &ttl,
            &sellable.max(0).to_string(),
            &put_back.to_string(),
        ])
        .await;
    }

    /// Each of `skus`' count of units put back ([`PUT_BACK`]; 0 for none), in their order; `None` if Redis
    /// did not answer.
    async fn put_backs(&self, skus: &[String]) -> Option<Vec<i64>> {
        let keys: Vec<String> = skus.iter().map(|s| put_back_key(s)).collect();
        let args: Vec<&str> = std::iter::once("MGET")
            .chain(keys.iter().map(String::as_str))
            .collect();
        let Value::Array(counts) = self.call(&args).await? else {
            return None;
        };
        let count = |v: &Value| match v {
            Value::Text(t) => t.parse().unwrap_or(0),
            _ => 0,
        };
        (counts.len() == skus.len()).then(|| counts.iter().map(count).collect())
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
        if !gate.is_up() {
            continue;
        }
        gate.resend_pending().await;
        let hot = gate.hot();
        if hot.is_empty() {
            continue;
        }
        // Before the store: what is put back once the store was read is added to what it says.
        let Some(put_backs) = gate.put_backs(&hot).await else {
            continue;
        };
        // Products are few and small; a bounded scan finds the hot SKUs' sellable stock. On a read lane: a
        // write lane is for the orders.
        let products = exec
            .read(|s| {
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
                if let Some(i) = hot.iter().position(|h| *h == s.sku) {
                    let put_back = put_backs.get(i).copied().unwrap_or(0);
                    gate.rebuild(&s.sku, s.available + s.bucketed, s.sale_seq, put_back)
                        .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate on the Redis at `addr`, with `timeout` on each command and the circuit open `retry_after`.
    fn gate(addr: &str, timeout: Duration, retry_after: Duration) -> RedisGate {
        RedisGate::new(RedisOptions {
            url: format!("redis://{addr}"),
            timeout,
            retry_after,
            rebuild_every: Duration::from_secs(1),
            in_flight_mark: MIN_IN_FLIGHT_MARK,
        })
        .expect("a valid url")
    }

    /// A fake Redis on a free port, handing each connection it accepts to `on_connection`; its address.
    async fn fake_redis(mut on_connection: impl FnMut(tokio::net::TcpStream) + Send + 'static) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                on_connection(s);
            }
        });
        addr.to_string()
    }

    /// A give-back Redis does not take (here its first connection is closed at once, and the retry on a
    /// fresh one too) is kept, and sent again once the circuit has closed: dropped, the buyer's count kept
    /// units the store never sold, and they were refused `limit_exceeded` for its life.
    #[tokio::test]
    async fn a_give_back_redis_did_not_take_is_sent_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = served.clone();
        let mut n = 0;
        let addr = fake_redis(move |mut s| {
            n += 1;
            if n == 1 {
                return; // closed at once: the first give-back fails
            }
            // Each later connection answers one command and is closed, so the pool only ever holds
            // connections Redis has closed meanwhile.
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(b":1\r\n").await;
                }
            });
        })
        .await;
        let gate = gate(&addr, Duration::from_secs(5), Duration::from_millis(1));
        gate.release("sku-1", 3, "u1", 1).await;
        assert_eq!(gate.pending(), 1, "kept");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gate.is_up() {
            assert!(Instant::now() < deadline, "the circuit never closed");
            tokio::task::yield_now().await;
        }
        gate.resend_pending().await;
        assert_eq!(gate.pending(), 0, "sent again");
        assert_eq!(served.load(Ordering::Relaxed), 1);
        // A pooled connection Redis closed meanwhile is replaced, not taken as a failure (once the close has
        // come: one that comes after the command leaves it in doubt, the next test).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gate.idle.lock().unwrap().iter().all(Conn::closed_by_peer) {
            assert!(Instant::now() < deadline, "the fake never closed the connection");
            tokio::task::yield_now().await;
        }
        gate.forget("sku-1", 3, "u1", 1).await;
        assert_eq!(gate.pending(), 0, "taken on a fresh connection");
        assert_eq!(served.load(Ordering::Relaxed), 2);
        assert!(gate.is_up());
    }

    /// A fake Redis each of whose connections answers its first command and is reset at the next (a zero
    /// linger sends an RST at close), as a NAT that forgot it: its address, and the commands it read and
    /// answered.
    async fn resetting_redis() -> (
        String,
        Arc<std::sync::atomic::AtomicU32>,
        Arc<std::sync::atomic::AtomicU32>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let [read, answered] = [(); 2].map(|()| Arc::new(std::sync::atomic::AtomicU32::new(0)));
        let counts = (read.clone(), answered.clone());
        let addr = fake_redis(move |mut s| {
            let (read, answered) = counts.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut first = true;
                while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                    read.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::take(&mut first) {
                        let _ = s.set_zero_linger();
                        break;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(b":1\r\n").await;
                }
            });
        })
        .await;
        (addr, read, answered)
    }

    /// A command Redis read and whose reply was lost to a reset is not sent again on a fresh connection: the
    /// script may have run, and a second run of `ADMIT` took another unit and raised the buyer's count and
    /// mark again, never given back. (A command that went nowhere, closed before any reply, is: test above.)
    #[tokio::test]
    async fn a_command_reset_after_redis_read_it_is_not_sent_again() {
        let (addr, read, _) = resetting_redis().await;
        let gate = gate(&addr, Duration::from_secs(5), Duration::from_secs(60));
        gate.release("sku-1", 3, "u1", 1).await;
        assert_eq!(read.load(Ordering::Relaxed), 1);
        assert!(gate.is_up());
        gate.release("sku-1", 3, "u2", 1).await;
        assert_eq!(read.load(Ordering::Relaxed), 2, "sent once");
        assert!(!gate.is_up(), "the circuit opened: the store alone decides");
    }

    /// A connection closed cleanly once a command was sent, before its reply, may have run it (a proxy
    /// between that ran it and then closed): the command is not sent again, and `ADMIT` is
    /// [`Admission::Unsure`]. Taken for one that went nowhere, a script whose reply was lost ran twice.
    #[tokio::test]
    async fn a_close_after_a_command_was_sent_leaves_it_in_doubt() {
        use tokio::io::AsyncReadExt;
        let read = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = read.clone();
        let addr = fake_redis(move |mut s| {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                // Dropped: closed with a FIN, no reply.
            });
        })
        .await;
        let gate = gate(&addr, Duration::from_secs(5), Duration::from_secs(60));
        let admitted = gate.admit("sku-1", "u1", 1, 2, None).await;
        assert_eq!(admitted, Admission::Unsure { mark: None });
        assert_eq!(read.load(Ordering::Relaxed), 1, "sent once");
    }

    /// A pooled connection a NAT forgot while it sat idle takes the next command and is reset: that command
    /// cannot be sent again (the test above), and the circuit opened. One idle for long is checked with a
    /// `PING` first, whose reset only replaces it.
    #[tokio::test]
    async fn an_idle_connection_dropped_by_the_network_is_replaced_before_a_command() {
        let (addr, _, commands) = resetting_redis().await;
        let mut gate = gate(&addr, Duration::from_secs(5), Duration::from_secs(60));
        gate.check_idle_after = Duration::ZERO;
        for user in ["u1", "u2", "u3"] {
            gate.release("sku-1", 3, user, 1).await;
            assert!(gate.is_up(), "the circuit opened at {user}'s give-back");
        }
        assert_eq!(commands.load(Ordering::Relaxed), 3, "each answered once");
        assert_eq!(gate.pending(), 0);
    }

    /// What [`losing_proxy`] loses next.
    #[derive(Clone, Default)]
    struct Lose {
        /// The next command: the connection is reset as it arrives, and Redis never sees it.
        request: Arc<std::sync::atomic::AtomicBool>,
        /// The next reply: Redis ran the command, and the connection is reset in place of its answer.
        reply: Arc<std::sync::atomic::AtomicBool>,
    }

    /// A TCP proxy to `upstream` that resets the client's connection in place of what `lose` says (a NAT's
    /// reset, a cut link): its address.
    async fn losing_proxy(upstream: std::net::SocketAddr, lose: Lose) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        /// Closed with no FIN (a dropped write half shuts down with one), the read half going with its task:
        /// a reset.
        fn reset(to_client: tokio::net::tcp::OwnedWriteHalf) {
            let _ = to_client.as_ref().set_zero_linger();
            to_client.forget();
        }
        /// Copies `from` to `to` until either ends or `now` is found set (taken); whether it was.
        async fn pass(
            mut from: tokio::net::tcp::OwnedReadHalf,
            to: &mut tokio::net::tcp::OwnedWriteHalf,
            now: &std::sync::atomic::AtomicBool,
        ) -> bool {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                if now.swap(false, Ordering::SeqCst) {
                    return true;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            false
        }
        fake_redis(move |client| {
            let lose = lose.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let ((from_client, mut to_client), (from_server, mut to_server)) =
                    (client.into_split(), server.into_split());
                let (reply, request) = (lose.reply.clone(), lose.request.clone());
                // Each direction stops the other when it ends: the client's half goes to whichever resets.
                let (tx, mut rx) = tokio::sync::oneshot::channel();
                let up = tokio::spawn(async move {
                    let lost = pass(from_client, &mut to_server, &request).await;
                    let _ = tx.send(lost);
                });
                tokio::select! {
                    lost = pass(from_server, &mut to_client, &reply) => {
                        if lost {
                            reset(to_client);
                        }
                    }
                    lost = &mut rx => {
                        if lost.unwrap_or(false) {
                            reset(to_client);
                        }
                    }
                }
                up.abort();
            });
        })
        .await
    }

    /// Starts a real Redis behind a [`losing_proxy`], and a gate on the proxy whose circuit closes soon,
    /// with `sku-1` at 5 units in sale 3.
    async fn redis_behind_a_losing_proxy() -> (xcluster_tests::services::Redis, Lose, RedisGate) {
        let redis = xcluster_tests::services::Redis::start();
        let lose = Lose::default();
        let addr = losing_proxy(redis.addr, lose.clone()).await;
        let gate = gate(&addr, Duration::from_secs(5), Duration::from_millis(200));
        for set in ["SET xbuy:stock:sku-1 5", "SET xbuy:sale:sku-1 3"] {
            assert_eq!(redis.command(set), "+OK");
        }
        (redis, lose, gate)
    }

    /// Sends the give-backs the gate kept while its circuit was open, once it closes (within 10 s).
    async fn flush(gate: &RedisGate) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.pending() > 0 {
            assert!(Instant::now() < deadline, "the give-backs were not sent");
            tokio::time::sleep(Duration::from_millis(50)).await;
            gate.resend_pending().await;
        }
    }

    /// An `ADMIT` whose reply was lost may have run: the attempt passes to the store as [`Admission::Unsure`],
    /// and once the store did not sell, what it took is given back. Before, the unit and the buyer's count
    /// stayed until the counters expired. A keyed attempt's mark says what it took: given back in its own
    /// sale (here a new one opened meanwhile), once however often it is sent, and the attempt is off the
    /// mark, so a retry is answered at once. An unkeyed one is given back in the SKU's current sale. On a
    /// real Redis, behind a proxy that loses the reply.
    #[tokio::test]
    async fn an_admit_whose_reply_was_lost_is_given_back_what_it_took() {
        let (redis, lose, gate) = redis_behind_a_losing_proxy().await;
        let read = |key: &str| redis.command(&format!("INCRBY {key} 0"));
        lose.reply.store(true, Ordering::SeqCst);
        let admitted = gate.admit("sku-1", "u1", 1, 2, Some("k1")).await;
        let Admission::Unsure { mark: Some(_) } = admitted else {
            panic!("{admitted:?}")
        };
        // It ran: the unit taken, the buyer counted, the attempt on its key's mark.
        assert_eq!(read("xbuy:stock:sku-1"), ":4");
        assert_eq!(read("xbuy:bought:sku-1/3/u1"), ":1");
        assert_eq!(redis.command("HLEN xbuy:attempts:u1/k1"), ":1");
        assert_eq!(redis.command("SET xbuy:sale:sku-1 4"), "+OK", "a new sale");
        // The store refused it: given back (kept while the circuit is open, sent once it closes), as the
        // seckill handler does; a second time, as a give-back resent after it applied.
        for _ in 0..2 {
            gate.settle("sku-1", "u1", 1, Some("k1"), admitted, Outcome::NotOrdered)
                .await;
            flush(&gate).await;
        }
        assert_eq!(read("xbuy:stock:sku-1"), ":5", "given back once");
        assert_eq!(
            read("xbuy:bought:sku-1/3/u1"),
            ":0",
            "in the sale it was counted in"
        );
        assert!(!redis.exists("xbuy:attempts:u1/k1"), "settled: off its mark");
        // Unkeyed, nothing says which sale: the current one.
        lose.reply.store(true, Ordering::SeqCst);
        let admitted = gate.admit("sku-1", "u2", 1, 2, None).await;
        assert_eq!(admitted, Admission::Unsure { mark: None });
        assert_eq!(read("xbuy:bought:sku-1/4/u2"), ":1");
        gate.settle("sku-1", "u2", 1, None, admitted, Outcome::NotOrdered)
            .await;
        flush(&gate).await;
        assert_eq!(read("xbuy:stock:sku-1"), ":5");
        assert_eq!(read("xbuy:bought:sku-1/4/u2"), ":0");
    }

    /// A unit put back while the reconciler read the store (a cancel committed after its read) stays on the
    /// counter: the rebuild set the counter to what it had read, and the unit was refused `sold_out` until
    /// the next one, while the store had it. On a real Redis.
    #[tokio::test]
    async fn a_unit_put_back_while_the_store_was_read_stays_on_sale() {
        let redis = xcluster_tests::services::Redis::start();
        let gate = gate(
            &redis.addr.to_string(),
            Duration::from_secs(5),
            Duration::from_millis(200),
        );
        let hot = ["sku-1".to_string()];
        let read = || redis.command("INCRBY xbuy:stock:sku-1 0");
        gate.rebuild("sku-1", 0, 3, 0).await;
        assert_eq!(read(), ":0", "sold out");
        // The reconciler's round: the counts put back, then the store (0 left), then a cancel commits and
        // puts its unit back, then the rebuild.
        let seen = gate.put_backs(&hot).await.expect("an answer");
        gate.restock("sku-1", 1).await;
        assert_eq!(read(), ":1");
        gate.rebuild("sku-1", 0, 3, seen[0]).await;
        assert_eq!(read(), ":1", "the unit put back was overwritten");
        // The next round reads the store with it.
        let seen = gate.put_backs(&hot).await.expect("an answer");
        gate.rebuild("sku-1", 1, 3, seen[0]).await;
        assert_eq!(read(), ":1");
    }

    /// A keyed taken attempt's give-back applies once, however often it is sent (its reply lost, it is kept
    /// and sent again): `RELEASE` sent twice put two units back and took the buyer's other attempt's count
    /// off, letting them past their limit at the gate.
    #[tokio::test]
    async fn a_taken_attempts_give_back_applies_once() {
        let (redis, _lose, gate) = redis_behind_a_losing_proxy().await;
        let read = |key: &str| redis.command(&format!("INCRBY {key} 0"));
        let first = gate.admit("sku-1", "u1", 1, 2, Some("k1")).await;
        let second = gate.admit("sku-1", "u1", 1, 2, Some("k2")).await;
        for a in [first, second] {
            assert!(
                matches!(
                    a,
                    Admission::Taken {
                        sale: 3,
                        mark: Some(_)
                    }
                ),
                "{a:?}"
            );
        }
        for _ in 0..2 {
            gate.settle("sku-1", "u1", 1, Some("k1"), first, Outcome::NotOrdered)
                .await;
        }
        assert_eq!(
            read("xbuy:stock:sku-1"),
            ":4",
            "one unit back, the other attempt's held"
        );
        assert_eq!(
            read("xbuy:bought:sku-1/3/u1"),
            ":1",
            "the other attempt's count kept"
        );
        assert!(!redis.exists("xbuy:attempts:u1/k1"));
        assert_eq!(redis.command("HLEN xbuy:attempts:u1/k2"), ":1");
    }

    /// A keyed `ADMIT` lost on its way, which Redis never ran, is given back nothing: its mark does not name
    /// it. Given back as an unkeyed one is, the counter held a unit the store may not have (only lenient),
    /// and a buyer's count of another attempt was taken off. One the store may still commit keeps its key's
    /// mark, so a retry is told to wait.
    #[tokio::test]
    async fn a_keyed_admit_redis_never_ran_is_given_back_nothing() {
        let (redis, lose, gate) = redis_behind_a_losing_proxy().await;
        let read = |key: &str| redis.command(&format!("INCRBY {key} 0"));
        let first = gate.admit("sku-1", "u1", 1, 2, Some("k1")).await;
        assert!(
            matches!(
                first,
                Admission::Taken {
                    sale: 3,
                    mark: Some(_)
                }
            ),
            "{first:?}"
        );
        lose.request.store(true, Ordering::SeqCst);
        let lost = gate.admit("sku-1", "u1", 1, 2, Some("k2")).await;
        let Admission::Unsure { mark: Some(_) } = lost else {
            panic!("{lost:?}")
        };
        gate.settle("sku-1", "u1", 1, Some("k2"), lost, Outcome::MayCommit)
            .await;
        flush(&gate).await;
        assert_eq!(
            read("xbuy:stock:sku-1"),
            ":4",
            "the first attempt's unit alone taken"
        );
        assert_eq!(
            read("xbuy:bought:sku-1/3/u1"),
            ":1",
            "the first attempt's count kept"
        );
        // The first may still commit: its key stays marked, and a retry under it that Redis would refuse
        // waits.
        gate.settle("sku-1", "u1", 1, Some("k1"), first, Outcome::MayCommit)
            .await;
        assert_eq!(redis.command("HLEN xbuy:attempts:u1/k1"), ":1");
        assert_eq!(redis.command("SET xbuy:stock:sku-1 0"), "+OK");
        let retry = gate.admit("sku-1", "u1", 1, 2, Some("k1")).await;
        assert_eq!(retry, Admission::InFlight);
    }

    /// A sweep's give-backs go several at once: here Redis answers none until four have come, which one at a
    /// time never happens (the first timed out, the circuit opened, and the rest waited for the reconciler).
    #[tokio::test]
    async fn a_sweeps_give_backs_go_several_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let arrived = Arc::new(tokio::sync::watch::Sender::new(0u32));
        let seen = arrived.clone();
        let addr = fake_redis(move |mut s| {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                    seen.send_modify(|n| *n += 1);
                    if seen.subscribe().wait_for(|n| *n >= 4).await.is_err() {
                        break;
                    }
                    let _ = s.write_all(b":1\r\n").await;
                }
            });
        })
        .await;
        let gate = gate(&addr, Duration::from_secs(2), Duration::from_secs(60));
        let lines: Vec<crate::store::ExpiredLine> = (0..8)
            .map(|i| crate::store::ExpiredLine {
                user: format!("u{i}"),
                sku: "sku-1".into(),
                sale: 3,
                qty: 1,
            })
            .collect();
        gate.forget_all(&lines).await;
        assert!(gate.is_up(), "a give-back was not answered");
        assert_eq!((gate.pending(), *arrived.borrow()), (0, 8));
    }

    /// A burst of attempts opens at most [`MAX_CONNECTIONS`] connections, the rest waiting their turn, and each
    /// is answered by Redis: a connection per attempt was a connect storm at a sale's opening.
    #[tokio::test]
    async fn a_burst_opens_no_more_connections_than_its_turns() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (open, opened) = tokio::sync::watch::channel(false);
        let count = accepted.clone();
        let addr = fake_redis(move |mut s| {
            // No answer until the turns are all taken: without them, every attempt would connect first.
            if count.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_CONNECTIONS {
                let _ = open.send(true);
            }
            let mut opened = opened.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while s.read(&mut buf).await.is_ok_and(|r| r > 0) {
                    if opened.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    let _ = s.write_all(b":0\r\n").await;
                }
            });
        })
        .await;
        let gate = Arc::new(gate(&addr, Duration::from_secs(10), Duration::from_secs(60)));
        let attempts: Vec<_> = (0..3 * MAX_CONNECTIONS)
            .map(|i| {
                let gate = gate.clone();
                tokio::spawn(async move { gate.admit("sku-1", &format!("u{i}"), 1, 1, None).await })
            })
            .collect();
        for a in attempts {
            assert_eq!(a.await.unwrap(), Admission::SoldOut, "answered by redis");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), MAX_CONNECTIONS);
        assert!(gate.is_up());
    }

    /// A new SKU's attempts always get its counter built: when the set is full, the coldest SKU gives way.
    #[test]
    fn a_full_hot_set_takes_a_new_sku_in_place_of_the_coldest() {
        let gate = gate("127.0.0.1:1", Duration::from_millis(10), Duration::from_secs(1));
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
