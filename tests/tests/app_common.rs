//! Shared helpers of the XBuy end-to-end tests (included with `#[path]` by the `app_*` test files).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use xcluster_tests::*;

pub const TOKEN: &str = "test-token";

/// A temp directory holding one shared database.
#[derive(Debug)]
pub struct Db {
    pub dir: tempfile::TempDir,
}

impl Default for Db {
    fn default() -> Self {
        Self::new()
    }
}

impl Db {
    pub fn new() -> Db {
        Db {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("xbuy.db")
    }
}

/// Starts one `xcluster app` on the shared database, with `extra` TOML appended to its config.
pub fn start_app(db: &Db, name: &str, addr: SocketAddr, extra: &str) -> Proc {
    let cfg = write_file(
        db.dir.path(),
        &format!("{name}.toml"),
        &format!(
            "role = \"app\"\nlisten = \"{addr}\"\ninstance = \"{name}\"\ndb_path = \"{}\"\nadmin_token = \"{TOKEN}\"\n{extra}\n",
            db.path().display()
        ),
    );
    let p = Proc::xcluster(name, &["app", "--config", cfg.to_str().unwrap()]);
    wait_ready(addr, Duration::from_secs(30));
    p
}

/// Starts `n` app processes on one database; returns them with their addresses.
pub fn start_apps(db: &Db, n: usize, extra: &str) -> (Vec<Proc>, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
    let procs = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| start_app(db, &format!("app-{}", i + 1), *a, extra))
        .collect();
    (procs, addrs)
}

/// A POST with a JSON body, optional idempotency key and optional admin token.
pub fn post(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    token: bool,
    body: &Value,
) -> std::io::Result<HttpResponse> {
    let bearer = format!("Bearer {TOKEN}");
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    if token {
        headers.push(("Authorization", bearer.as_str()));
    }
    request(addr, "POST", path, &headers, Some(body.to_string().as_bytes()))
}

/// Retries a request across instances until it gets an answer that is not 503 or a connection failure
/// (bounded: 30 s). Returns the final response.
pub fn until_answered(
    addrs: &[SocketAddr],
    start: usize,
    mut f: impl FnMut(SocketAddr) -> std::io::Result<HttpResponse>,
) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = start;
    loop {
        let addr = addrs[i % addrs.len()];
        match f(addr) {
            Ok(r) if r.status != 503 => return r,
            _ => {
                assert!(Instant::now() < deadline, "no answer within 30 s");
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Credits every wallet in `users` with `amount_cents`.
pub fn credit(addr: SocketAddr, users: &[String], amount_cents: i64) {
    let r = post(
        addr,
        "/admin/credit",
        None,
        true,
        &json!({"users": users, "amount_cents": amount_cents}),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Runs `n` jobs on `threads` threads (bounded concurrency); job `i` returns a value kept at index `i`.
pub fn parallel<T: Send>(n: usize, threads: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.min(n).max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let v = job(i);
                    out.lock().unwrap()[i] = Some(v);
                }
            });
        }
    });
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(|v| v.unwrap())
        .collect()
}

/// One buyer: orders `qty` of `sku` with key `key`, then pays when asked. Returns the order id when the
/// order was acknowledged (and paid, if `pay`), else the final error code.
pub fn buy(
    addrs: &[SocketAddr],
    i: usize,
    user: &str,
    key: &str,
    sku: &str,
    pay: bool,
) -> Result<String, String> {
    let body = json!({"user": user, "lines": [{"sku": sku, "qty": 1}]});
    let r = until_answered(addrs, i, |a| post(a, "/v1/orders", Some(key), false, &body));
    if r.status != 201 && r.status != 200 {
        return Err(r.json()["error"]["code"].as_str().unwrap_or("?").to_string());
    }
    let id = r.json()["id"].as_str().unwrap().to_string();
    if pay {
        let p = until_answered(addrs, i, |a| {
            post(a, &format!("/v1/orders/{id}/pay"), None, false, &json!({}))
        });
        assert_eq!(p.status, 200, "pay {id}: {}", p.body);
        assert_eq!(p.json()["status"], "paid");
    }
    Ok(id)
}

/// The audit report, asserting every invariant holds.
pub fn audit_ok(addr: SocketAddr) -> Value {
    let r = get(addr, "/admin/audit").unwrap();
    assert_eq!(r.status, 200, "audit failed: {}", r.body);
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    v
}

/// Waits until the outbox is drained, then returns the audit totals.
pub fn drained_totals(addr: SocketAddr) -> Value {
    eventually(Duration::from_secs(30), "outbox drained", || {
        let v = audit_ok(addr);
        (v["totals"]["outbox_pending"] == 0).then(|| v["totals"].clone())
    })
}

/// A SKU's stock columns from the catalog.
pub fn sku_stock(addr: SocketAddr, product: i64, sku: &str) -> Value {
    let p = get(addr, &format!("/v1/products/{product}")).unwrap().json();
    p["skus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sku"] == sku)
        .unwrap()
        .clone()
}

pub fn db_files_exist(dir: &Path) -> bool {
    dir.join("xbuy.db").exists()
}
