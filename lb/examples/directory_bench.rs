//! Benchmark of the directory (`scripts/bench/directory` runs it): report ingestion, `/v1/pick` and
//! `/v1/servers` throughput with 1,000 simulated instances over real HTTP on loopback, each against the
//! same server's trivial `/livez` as the in-run reference; and the herding check: 32 concurrent clients
//! making 10,000 picks between two reports, over ten equal and then ten unequal instances, against a
//! "pick the best" reference. Every loop is bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use xcluster_lb::directory::weights::{Params, TypeProfile};
use xcluster_lb::directory::{Directory, Settings, api};
use xcluster_proto::report::{HostLoad, InstanceLoad, LoadReport, SIGNATURE_HEADER, sign};

const KEY: &[u8] = b"bench-key";
const PHASE: Duration = Duration::from_secs(3);

fn settings() -> Settings {
    let mut types = BTreeMap::new();
    for (name, cpu, queue, cost) in [
        ("browse", 0.2, 0.7, 1.0),
        ("order", 0.4, 0.4, 3.0),
        ("seckill", 0.2, 0.8, 2.0),
        ("pay", 0.5, 0.4, 4.0),
    ] {
        types.insert(
            name.to_string(),
            TypeProfile {
                cpu,
                mem: 0.1,
                queue,
                cost,
            },
        );
    }
    Settings {
        // Reports stay fresh for the whole run, so every phase sees all 1,000 instances.
        params: Params {
            types,
            slow_start: Duration::ZERO,
            panic_threshold: 0.0,
            report_ttl: Duration::from_secs(600),
            forget_after: Duration::from_secs(600),
            ..Default::default()
        },
        keys: xcluster_lb::directory::ingest::ReportKeys::shared(KEY),
        skew_ms: 60_000,
        max_agents: 10_000,
        max_instances: 1_000_000,
        balancers: vec!["127.0.0.1:7000".into()],
        admin_token: String::new(),
        // The herd phase holds thousands of watches at once.
        max_watches: usize::MAX,
        proxy_backends: Default::default(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A report of agent `a` with `n` instances whose in-flight counts come from `load(i)`.
fn report(a: usize, n: usize, seq: u64, load: impl Fn(usize) -> u32) -> LoadReport {
    LoadReport {
        agent: format!("agent-{a}"),
        seq,
        boot: 0,
        timestamp_ms: now_ms(),
        host: HostLoad {
            cpu: 0.3,
            mem: 0.4,
            load1: 1.0,
            cores: 8,
        },
        instances: (0..n)
            .map(|i| InstanceLoad {
                id: format!("agent-{a}/app-{i}"),
                addr: format!("10.{}.{}.{}:8080", a / 256, a % 256, i),
                ready: true,
                in_flight: load(i),
                capacity: 100,
                ..Default::default()
            })
            .collect(),
    }
}

fn signed(r: &LoadReport) -> (Bytes, String) {
    let body = serde_json::to_vec(r).unwrap();
    let sig = sign(KEY, &body);
    (Bytes::from(body), sig)
}

async fn serve(dir: Directory, cancel: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = xcluster_runtime::Health::new();
    health.set_ready();
    tokio::spawn(dir.clone().run_housekeeping(cancel.clone()));
    let handler = xcluster_runtime::admin::wrap(health, api::handler(dir));
    tokio::spawn(xcluster_runtime::http::serve(
        listener,
        handler,
        Default::default(),
        cancel,
    ));
    addr
}

/// `clients` keep-alive connections each sending `make(i)` until `total` requests or `PHASE` elapse.
/// Returns (answers per second, statuses other than 200, the bodies when `keep` is set).
async fn load<F>(addr: SocketAddr, clients: usize, total: u64, keep: bool, make: F) -> (f64, u64, Vec<Bytes>)
where
    F: Fn(u64) -> http::Request<Full<Bytes>> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (make, next, bad) = (make.clone(), next.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut bodies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || start.elapsed() > PHASE {
                    return bodies;
                }
                let resp = tx.send_request(make(i)).await.unwrap();
                if resp.status() != 200 {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                if keep {
                    bodies.push(body);
                }
            }
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.extend(t.await.unwrap());
    }
    let done = next.load(Ordering::Relaxed).min(total) as f64;
    (
        done / start.elapsed().as_secs_f64(),
        bad.load(Ordering::Relaxed),
        bodies,
    )
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::main]
async fn main() {
    let cancel = CancellationToken::new();
    let dir = Directory::new(settings());
    let addr = serve(dir.clone(), cancel.clone()).await;
    println!(
        "directory benchmark: one balancer, 1,000 instances (100 agents x 10), 4 request types, loopback HTTP"
    );

    // Fill the table, then measure ingestion: fresh reports from the 100 agents, round robin.
    let mut seq = 1u64;
    for a in 0..100 {
        let (b, s) = signed(&report(a, 10, seq, |i| (i * 7 % 90) as u32));
        dir.ingest(&b, Some(&s), None).unwrap();
    }
    let pre: Vec<(Bytes, String)> = (0..20_000u64)
        .map(|k| {
            seq += 1;
            signed(&report((k % 100) as usize, 10, seq, |i| {
                ((i as u64 * 7 + k) % 90) as u32
            }))
        })
        .collect();
    let pre = Arc::new(pre);
    let p = pre.clone();
    let (livez, _, _) = load(addr, 16, 200_000, false, |_| get("/livez")).await;
    let (ingest, bad, _) = load(addr, 1, pre.len() as u64, false, move |i| {
        let (b, s) = &p[i as usize];
        http::Request::post("/v1/reports")
            .header("host", "bench")
            .header(SIGNATURE_HEADER, s.as_str())
            .body(Full::new(b.clone()))
            .unwrap()
    })
    .await;
    println!("reference /livez:           {livez:>10.0} answers/s (16 connections)");
    println!(
        "POST /v1/reports:           {ingest:>10.0} reports/s  (1 connection, in order; {:.3} of /livez; {bad} refused)",
        ingest / livez
    );
    let (_, body) = dir.servers_json("browse").unwrap();
    let listed = dir.servers("browse").unwrap().servers.len();
    println!(
        "table: {listed} instances listed for browse; one list is {} bytes of JSON",
        body.len()
    );
    let (servers, bad_s, _) = load(addr, 16, 200_000, false, |_| get("/v1/servers?type=browse")).await;
    println!(
        "GET /v1/servers (1,000):    {servers:>10.0} answers/s  ({:.3} of /livez; {bad_s} non-200)",
        servers / livez
    );
    let (picks, bad_p, _) = load(addr, 16, 500_000, false, |_| get("/v1/pick?type=browse")).await;
    println!(
        "GET /v1/pick:               {picks:>10.0} answers/s  ({:.3} of /livez; {bad_p} non-200)",
        picks / livez
    );
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(1) && n < 5_000_000 {
        std::hint::black_box(dir.pick("browse", &[]));
        n += 1;
    }
    println!(
        "Directory::pick in process: {:>10.0} picks/s (what the L4 proxy calls)",
        n as f64 / t.elapsed().as_secs_f64()
    );

    herding("ten equal instances", true, |_| 20).await;
    herding("ten unequal instances", false, |i| (i * 9) as u32).await;
    cancel.cancel();
}

/// Replaces the table with ten instances, then 32 clients make 10,000 picks before the next report.
async fn herding(what: &str, equal: bool, load_of: impl Fn(usize) -> u32) {
    let cancel = CancellationToken::new();
    let dir = Directory::new(settings());
    let addr = serve(dir.clone(), cancel.clone()).await;
    let (b, s) = signed(&report(0, 10, 1, load_of));
    dir.ingest(&b, Some(&s), None).unwrap();
    let list = dir.servers("browse").unwrap();
    let weights: BTreeMap<String, u32> = list.servers.iter().map(|e| (e.addr.clone(), e.weight)).collect();
    let (_, bad, bodies) = load(addr, 32, 10_000, true, |_| get("/v1/pick?type=browse")).await;
    let mut counts: BTreeMap<String, u64> = weights.keys().map(|k| (k.clone(), 0)).collect();
    for b in &bodies {
        let p: xcluster_proto::directory::Pick = serde_json::from_slice(b).unwrap();
        *counts.entry(p.addr).or_default() += 1;
    }
    let total: u64 = counts.values().sum();
    let wsum: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mean = total as f64 / counts.len() as f64;
    let busiest = *counts.values().max().unwrap() as f64;
    let worst_share = counts
        .iter()
        .map(|(k, c)| {
            let want = u64::from(weights[k]) as f64 / wsum as f64;
            ((*c as f64 / total as f64) - want).abs() / want
        })
        .fold(0.0, f64::max);
    println!("herding, {what}: {total} picks by 32 clients ({bad} non-200) between two reports");
    println!("  weights {:?}", weights.values().collect::<Vec<_>>());
    println!("  picks   {:?}", counts.values().collect::<Vec<_>>());
    if equal {
        println!(
            "  busiest / mean = {:.3} (bound 1.25; a \"pick the best\" balancer: {:.1})",
            busiest / mean,
            total as f64 / mean
        );
    }
    println!(
        "  worst share deviation from the weight share = {:.1}% (bound 10%)",
        worst_share * 100.0
    );
    cancel.cancel();
}
