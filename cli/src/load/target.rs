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
    /// Listeners: one per request type (`TYPE=ADDR` in `--targets`), and one for the types not named.
    Proxy {
        by_type: Vec<(String, SocketAddr)>,
        other: Option<SocketAddr>,
    },
    Rr {
        backends: Vec<SocketAddr>,
        next: AtomicUsize,
    },
}

/// A completed exchange (any status) and who served it, or an error kind and the backend it was sent to (empty
/// when the SDK failed before it had one), so a backend that refuses shows in the shares with its failures.
pub type Outcome = Result<(Response<Bytes>, String), (String, String)>;

/// How long the resolver may take over one `--targets` name (the SDK's default `balancer_timeout`).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The entries of `--targets`, comma-separated, as given: the address of each, after its `TYPE=` if it has
/// one (`--via proxy`: a listener per request type).
pub fn entries(targets: &str) -> Vec<(Option<&str>, &str)> {
    targets
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|e| match e.split_once('=') {
            Some((ty, addr)) => (Some(ty.trim()), addr.trim()),
            None => (None, e),
        })
        .collect()
}

/// The addresses of `--targets`' entries.
pub fn names(targets: &str) -> Vec<&str> {
    entries(targets).into_iter().map(|(_, addr)| addr).collect()
}

/// Every `--targets` entry (`ip:port`, or `host:port`) resolved the SDK's way: each entry's addresses, in
/// the resolver's order. An error names the entry.
pub async fn resolve(targets: &str) -> Result<Vec<Vec<SocketAddr>>, String> {
    let mut out = Vec::new();
    for name in names(targets) {
        // The SDK's message names a balancer; with `--via proxy` the entry is a listener.
        let addrs = xcluster_sdk::resolve(name, RESOLVE_TIMEOUT)
            .await
            .map_err(|e| match e {
                xcluster_sdk::Error::Resolve { name, reason } => {
                    format!("--targets: cannot resolve {name:?}: {reason}")
                }
                e => format!("--targets: {e}"),
            })?;
        out.push(addrs);
    }
    Ok(out)
}

impl Target {
    /// Builds the target from `--targets` (`given`, as written, and `targets`, resolved); for the SDK this
    /// bootstraps from the balancers as given (a name stays a name, which the SDK resolves again while no
    /// balancer answers), for a proxy or round robin each entry's first address is the backend. `timeout`
    /// bounds each whole request, retries included.
    pub async fn new(
        via: Via,
        given: &[&str],
        targets: Vec<Vec<SocketAddr>>,
        labels: Vec<Option<String>>,
        types: &[&str],
        timeout: Duration,
    ) -> Result<Target, String> {
        let firsts: Vec<SocketAddr> = targets.iter().filter_map(|a| a.first().copied()).collect();
        if firsts.is_empty() {
            return Err("no targets given".into());
        }
        match via {
            Via::Sdk => Client::builder()
                .balancers(given)
                .request_types(types)
                // One mechanism bounds a request: the SDK's deadline, which clips each attempt's timeouts.
                .deadline(timeout)
                .request_timeout(timeout)
                .max_response_bytes(MAX_BODY)
                .build()
                .await
                .map(Target::Sdk)
                .map_err(|e| e.to_string()),
            // `load::check` let at most one entry without a type through, and none of another type.
            Via::Proxy => {
                let mut by_type = Vec::new();
                let mut other = None;
                for (label, addr) in labels.into_iter().zip(firsts) {
                    match label {
                        Some(ty) => by_type.push((ty, addr)),
                        None => other = Some(addr),
                    }
                }
                Ok(Target::Proxy { by_type, other })
            }
            Via::Rr => Ok(Target::Rr {
                backends: firsts,
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// Sends one request of `kind`, within `timeout` overall (through the SDK, its client's deadline).
    pub async fn send(&self, kind: &Kind, req: Request<Full<Bytes>>, timeout: Duration) -> Outcome {
        match self {
            Target::Sdk(client) => {
                let r = if kind.idempotent {
                    client.send_idempotent(kind.name, req).await
                } else {
                    client.send(kind.name, req).await
                };
                let resp = r.map_err(|e| (e.kind().to_string(), String::new()))?;
                let who = resp
                    .extensions()
                    .get::<Backend>()
                    .map(|b| b.addr.to_string())
                    .unwrap_or_default();
                Ok((resp, who))
            }
            Target::Proxy { by_type, other } => {
                let listener = by_type.iter().find(|(ty, _)| ty == kind.name).map(|(_, a)| *a);
                let Some(addr) = listener.or(*other) else {
                    // `load::check` saw that every type of the mix has one.
                    return Err(("no_target".into(), String::new()));
                };
                let resp = direct(addr, req, timeout)
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
