//! How a request reaches a backend: through the SDK (the balancers' weights plus local feedback), through
//! an L4 proxy (XCluster's or HAProxy's), or by plain round robin over fixed backends (the baseline).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::net::TcpStream;
use xcluster_sdk::{Backend, Client};

use crate::args::Via;
use crate::load::mix::Kind;

/// Largest response body read by the generator.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Response header a proxied backend may use to say who it is (the proxy hides the address).
const INSTANCE_HEADER: &str = "x-xcluster-instance";

/// Where requests go.
#[derive(Debug)]
pub enum Target {
    Sdk(Client),
    Proxy(SocketAddr),
    Rr {
        backends: Vec<SocketAddr>,
        next: AtomicUsize,
    },
}

/// A completed exchange (any status) and who served it, or an error kind and the backend it was sent to (empty
/// when the SDK failed before it had one), so a backend that refuses shows in the shares with its failures.
pub type Outcome = Result<(Response<Bytes>, String), (String, String)>;

/// The addresses of `--targets`, comma-separated: `ip:port`, or `host:port` resolved now (its first address).
pub fn parse(targets: &str) -> Result<Vec<SocketAddr>, String> {
    targets
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>().or_else(|_| {
                std::net::ToSocketAddrs::to_socket_addrs(s)
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| format!("target {s:?} is not ip:port, nor a host:port that resolves"))
            })
        })
        .collect()
}

impl Target {
    /// Builds the target; for the SDK this bootstraps from the balancers.
    pub async fn new(via: Via, targets: &str, types: &[&str], timeout: Duration) -> Result<Target, String> {
        let addrs = parse(targets)?;
        if addrs.is_empty() {
            return Err("no targets given".into());
        }
        match via {
            Via::Sdk => Client::builder()
                .balancers(addrs.iter().map(|a| a.to_string()))
                .request_types(types)
                .request_timeout(timeout)
                .max_response_bytes(MAX_BODY)
                .build()
                .await
                .map(Target::Sdk)
                .map_err(|e| e.to_string()),
            // `load::check` let exactly one through.
            Via::Proxy => Ok(Target::Proxy(addrs[0])),
            Via::Rr => Ok(Target::Rr {
                backends: addrs,
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// Sends one request of `kind`.
    pub async fn send(&self, kind: &Kind, req: Request<Full<Bytes>>, timeout: Duration) -> Outcome {
        match self {
            Target::Sdk(client) => {
                let r = if kind.idempotent {
                    tokio::time::timeout(timeout, client.send_idempotent(kind.name, req)).await
                } else {
                    tokio::time::timeout(timeout, client.send(kind.name, req)).await
                };
                // The SDK's request_timeout bounds one attempt; `--timeout-ms` is for the whole request,
                // retries on other instances included.
                let r = r.map_err(|_| ("timeout".to_string(), String::new()))?;
                let resp = r.map_err(|e| (e.kind().to_string(), String::new()))?;
                let who = resp
                    .extensions()
                    .get::<Backend>()
                    .map(|b| b.addr.to_string())
                    .unwrap_or_default();
                Ok((resp, who))
            }
            Target::Proxy(addr) => {
                let resp = direct(*addr, req, timeout)
                    .await
                    .map_err(|kind| (kind, format!("via {addr}")))?;
                let who = resp
                    .headers()
                    .get(INSTANCE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|s| s.len() <= 128)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("via {addr}"));
                Ok((resp, who))
            }
            Target::Rr { backends, next } => {
                let addr = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                let resp = direct(addr, req, timeout)
                    .await
                    .map_err(|kind| (kind, addr.to_string()))?;
                Ok((resp, addr.to_string()))
            }
        }
    }
}

/// Connects to `addr` and exchanges one request, within `timeout` overall.
async fn direct(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Response<Bytes>, String> {
    let started = tokio::time::Instant::now();
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err("connect".into()),
        Err(_) => return Err("connect_timeout".into()),
    };
    let _ = stream.set_nodelay(true);
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    xcluster_sdk::exchange(stream, addr, req, left, MAX_BODY)
        .await
        .map_err(|e| e.kind().to_string())
}
