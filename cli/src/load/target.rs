//! How a request reaches a backend: through the SDK (the balancers' weights plus local feedback), through
//! an L4 proxy (XCluster's or HAProxy's), or by plain round robin over fixed backends (the baseline).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use xcluster_sdk::{Backend, Client};

use crate::addrs::Addrs;
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
        by_type: Vec<(String, Addrs)>,
        other: Option<Addrs>,
    },
    Rr {
        backends: Vec<Addrs>,
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

/// The timeout of one exchange with an instance within a request's `timeout`: four fifths of it, so an
/// instance that does not answer is timed out (and ejected) before the request's deadline cuts it, with time
/// left for an idempotent request's retry elsewhere.
fn exchange_timeout(timeout: Duration) -> Duration {
    timeout - timeout / 5
}

impl Target {
    /// Builds the target from `--targets` (`given`, as written, and `targets`, resolved); for the SDK this
    /// bootstraps from the balancers as given (a name stays a name, which the SDK resolves again while no
    /// balancer answers), for a proxy or round robin each entry is one backend, reached on whichever of its
    /// addresses accepts. `timeout` bounds each whole request, retries included.
    pub async fn new(
        via: Via,
        given: &[&str],
        targets: Vec<Vec<SocketAddr>>,
        labels: Vec<Option<String>>,
        types: &[&str],
        timeout: Duration,
    ) -> Result<Target, String> {
        // `resolve` never returns an entry without an address; one is refused all the same, not skipped
        // (that would pair `--via proxy`'s types with the wrong listeners), so `Addrs::connect` has one.
        if let Some(i) = targets.iter().position(Vec::is_empty) {
            let name = given.get(i).copied().unwrap_or("?");
            return Err(format!("--targets: {name:?} has no address"));
        }
        let entries: Vec<Addrs> = targets.into_iter().map(Addrs::new).collect();
        if entries.is_empty() {
            return Err("no targets given".into());
        }
        match via {
            Via::Sdk => Client::builder()
                .balancers(given)
                .request_types(types)
                // The SDK's deadline bounds a request, and clips each attempt's timeouts. An exchange's own
                // timeout sits below it: equal, the deadline always cut first, and an instance that accepts
                // and never answers was never ejected (each request to it waited out the whole deadline).
                .deadline(timeout)
                .request_timeout(exchange_timeout(timeout))
                .max_response_bytes(MAX_BODY)
                .build()
                .await
                .map(Target::Sdk)
                .map_err(|e| e.to_string()),
            // `load::check` let at most one entry without a type through, and none of another type.
            Via::Proxy => {
                let mut by_type = Vec::new();
                let mut other = None;
                for (label, addr) in labels.into_iter().zip(entries) {
                    match label {
                        Some(ty) => by_type.push((ty, addr)),
                        None => other = Some(addr),
                    }
                }
                Ok(Target::Proxy { by_type, other })
            }
            Via::Rr => Ok(Target::Rr {
                backends: entries,
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// Whether a request gets one attempt (not through the SDK, which retries).
    pub fn single_attempt(&self) -> bool {
        !matches!(self, Target::Sdk(_))
    }

    /// Sends one request of `kind`, within `timeout` overall (through the SDK, its client's deadline).
    pub async fn send(&self, kind: &Kind, req: Request<Full<Bytes>>, timeout: Duration) -> Outcome {
        match self {
            Target::Sdk(client) => {
                // A call with a budget of its own (the clean-up's cancels, given at least 2 s whatever
                // `--timeout-ms` says) gets its exchanges' timeout to match.
                let other;
                let client = if timeout == client.deadline() {
                    client
                } else {
                    other = client
                        .with_deadline(timeout)
                        .with_request_timeout(exchange_timeout(timeout));
                    &other
                };
                let r = if kind.idempotent {
                    client.send_idempotent(kind.name, req).await
                } else {
                    client.send(kind.name, req).await
                };
                // Named by the instance that failed, so one that fails every request shows in the shares; not
                // this host's own want (out of descriptors), no instance's doing.
                let resp = r.map_err(|e| {
                    let local = matches!(&e, xcluster_sdk::Error::Connect { source, .. }
                        if xcluster_proto::local_error::is_resource_exhaustion(source));
                    let who = e
                        .addr()
                        .filter(|_| !local)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    (e.kind().to_string(), who)
                })?;
                let who = resp
                    .extensions()
                    .get::<Backend>()
                    .map(|b| b.addr.to_string())
                    .unwrap_or_default();
                Ok((resp, who))
            }
            Target::Proxy { by_type, other } => {
                let listener = by_type.iter().find(|(ty, _)| ty == kind.name).map(|(_, a)| a);
                let Some(addrs) = listener.or(other.as_ref()) else {
                    // `load::check` saw that every type of the mix has one.
                    return Err(("no_target".into(), String::new()));
                };
                let (resp, addr) = direct(addrs, req, timeout)
                    .await
                    .map_err(|(kind, addr)| (kind, format!("via {addr}")))?;
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
                let addrs = &backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                let (resp, addr) = direct(addrs, req, timeout)
                    .await
                    .map_err(|(kind, addr)| (kind, addr.to_string()))?;
                Ok((resp, addr.to_string()))
            }
        }
    }
}

/// Connects to one of `addrs` and exchanges one request, within `timeout` overall: the answer and the address
/// that gave it, or the error's kind and the address it came from.
async fn direct(
    addrs: &Addrs,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(Response<Bytes>, SocketAddr), (String, SocketAddr)> {
    let started = tokio::time::Instant::now();
    let (stream, addr) = addrs.connect(timeout).await.map_err(|f| {
        let kind = match f.error.kind() {
            std::io::ErrorKind::TimedOut => "connect_timeout",
            _ => "connect",
        };
        (kind.to_string(), f.addr)
    })?;
    let _ = stream.set_nodelay(true);
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    xcluster_sdk::exchange(stream, addr, req, left, MAX_BODY)
        .await
        .map(|resp| (resp, addr))
        .map_err(|e| (e.kind().to_string(), addr))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::load::mix::KINDS;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// An address on which nothing listens: a port the OS just handed out, released.
    fn refusing() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A backend answering 200 to each of `answers` connections, one request each.
    async fn backend(answers: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..answers {
                let Ok((mut s, _)) = l.accept().await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                // A request head is far shorter than 64 KiB: the bound ends a client that never finishes one.
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    fn request() -> Request<Full<Bytes>> {
        Request::get("/v1/products")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn target(via: Via, addrs: Vec<SocketAddr>) -> Target {
        Target::new(via, &["backend:1"], vec![addrs], vec![None], &["browse"], TIMEOUT)
            .await
            .unwrap()
    }

    /// `localhost` resolves to `::1` then 127.0.0.1 on Debian, where the apps listen on 127.0.0.1 only: a
    /// target whose first address refuses is reached on its next, in both modes that connect themselves.
    #[tokio::test]
    async fn a_target_is_reached_on_its_next_address_when_the_first_refuses() {
        for via in [Via::Rr, Via::Proxy] {
            let (dead, live) = (refusing(), backend(2).await);
            let t = target(via, vec![dead, live]).await;
            // Twice: the second starts from the address that took the first.
            for _ in 0..2 {
                let (resp, who) = t.send(&KINDS[0], request(), TIMEOUT).await.unwrap();
                assert_eq!(resp.status(), 200, "{via:?}");
                let expected = match via {
                    Via::Rr => live.to_string(),
                    _ => format!("via {live}"),
                };
                assert_eq!(who, expected, "{via:?}");
            }
        }
    }

    /// When every address refuses, the request fails as a connect error, named after the last one tried.
    #[tokio::test]
    async fn a_target_whose_every_address_refuses_fails_to_connect() {
        let (a, b) = (refusing(), refusing());
        let t = target(Via::Rr, vec![a, b]).await;
        let err = t.send(&KINDS[0], request(), TIMEOUT).await.unwrap_err();
        assert_eq!(err, ("connect".to_string(), b.to_string()));
    }
}
