//! The XBuy load generator behind `scripts/bench/app` (a benchmark, never a test).
//!
//! `xbuy_bench orders --addrs A,B,C [--secs 5] [--concurrency 64]`: creates orders with unique idempotency
//! keys over keep-alive connections and prints `orders_per_sec=<n> ok=<n> rejected=<n> failed=<n>`.
//! `xbuy_bench seckill --addrs ... --sku flash-1`: flash-sale attempts by distinct users on one SKU, and
//! prints `attempts_per_sec=<n> won=<n> sold_out=<n> failed=<n>`.
//! Bounded in time (`--secs`, at most 120) and count (`--count`, at most 1,000,000 requests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const MAX_REQUESTS: u64 = 1_000_000;

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let addrs: Vec<SocketAddr> = arg(&args, "--addrs", "127.0.0.1:7101")
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let secs: u64 = arg(&args, "--secs", "5").parse::<u64>()?.clamp(1, 120);
    let conc: usize = arg(&args, "--concurrency", "64").parse::<usize>()?.clamp(1, 1024);
    let sku = arg(&args, "--sku", "flash-1");
    let run = arg(&args, "--run", "r");
    let max: u64 = arg(&args, "--count", &MAX_REQUESTS.to_string())
        .parse::<u64>()?
        .clamp(1, MAX_REQUESTS);
    anyhow::ensure!(
        mode == "orders" || mode == "seckill",
        "usage: xbuy_bench orders|seckill --addrs A,B [--secs N]"
    );

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..conc {
        let (client, counts, addrs, mode, sku, run) = (
            client.clone(),
            counts.clone(),
            addrs.clone(),
            mode.clone(),
            sku.clone(),
            run.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline && counts.sent.fetch_add(1, Ordering::Relaxed) < max {
                i += 1;
                let addr = addrs[(t + i as usize) % addrs.len()];
                let user = format!("{run}-{t}-{i}");
                let (path, body) = if mode == "orders" {
                    let product = (i % 12) + 1;
                    let line = format!("sku-{product}-{}", i % 2 + 1);
                    (
                        "/v1/orders".to_string(),
                        serde_json::json!({"user": user, "lines": [{"sku": line, "qty": 1}]}),
                    )
                } else {
                    (format!("/v1/seckill/{sku}"), serde_json::json!({"user": user}))
                };
                let req = http::Request::post(format!("http://{addr}{path}"))
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("{user}-k"))
                    .body(Full::new(Bytes::from(body.to_string())));
                let Ok(req) = req else { continue };
                let status = match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let s = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        s
                    }
                    _ => 0,
                };
                match status {
                    200 | 201 => counts.ok.fetch_add(1, Ordering::Relaxed),
                    400..=499 => counts.rejected.fetch_add(1, Ordering::Relaxed),
                    _ => counts.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, rej, failed) = (
        counts.ok.load(Ordering::Relaxed),
        counts.rejected.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    if mode == "orders" {
        println!(
            "orders_per_sec={:.0} ok={ok} rejected={rej} failed={failed}",
            ok as f64 / elapsed
        );
    } else {
        println!(
            "attempts_per_sec={:.0} won={ok} sold_out={rej} failed={failed}",
            (ok + rej + failed) as f64 / elapsed
        );
    }
    Ok(())
}
