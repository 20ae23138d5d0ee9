//! One proxied connection: pick and connect a backend with redispatch, send the optional PROXY header, then
//! forward both directions until both end, either side fails, the idle timeout fires, or the stop signal
//! (end of the drain grace period) arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio::net::TcpStream;
use tracing::{debug, debug_span};

use super::config::Timeouts;
use super::forward::{self, Meter};
use super::metrics::BackendMetrics;
use super::service::{ListenerState, Shared};

/// Counts one active connection on a gauge for as long as it lives.
struct Active(Gauge);

impl Active {
    fn new(g: &Gauge) -> Self {
        g.increment(1.0);
        Self(g.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Serves one accepted client connection to the end.
///
/// The connect phase is boxed so that its large futures (connect, timeout, PROXY header) are freed once the
/// backend answers; what stays for the connection's life is the small forwarding state.
pub async fn serve(mut client: TcpStream, peer: SocketAddr, l: Arc<ListenerState>, shared: Arc<Shared>) {
    l.metrics.accepted.increment(1);
    let _active = Active::new(&l.metrics.active);
    let _ = client.set_nodelay(true);
    let connected = tokio::select! {
        c = Box::pin(establish(&client, peer, &l, &shared)) => c,
        _ = shared.stop.cancelled() => return,
    };
    let Some((mut backend, bm)) = connected else {
        return;
    };
    let _backend_active = Active::new(&bm.active);
    let idle = shared.timeouts.load().idle;
    let outcome = pump(&mut client, &mut backend, &l, &bm, &shared, idle).await;
    debug!(?outcome, "connection ended");
}

/// The span every event of one connection carries.
pub fn span(l: &ListenerState, peer: SocketAddr) -> tracing::Span {
    debug_span!("proxy", listener = %l.cfg.name, %peer)
}

/// Connects a backend (with redispatch) and sends the optional PROXY header.
async fn establish(
    client: &TcpStream,
    peer: SocketAddr,
    l: &ListenerState,
    shared: &Shared,
) -> Option<(TcpStream, Arc<BackendMetrics>)> {
    let timeouts = shared.timeouts.load_full();
    let Some((backend, addr, bm)) = connect(l, shared, &timeouts).await else {
        l.metrics.failed.increment(1);
        debug!("no backend reachable; closing the client");
        return None;
    };
    debug!(backend = %addr, "connected");
    if l.cfg.proxy_protocol {
        let local = client.local_addr().unwrap_or(l.cfg.listen);
        let header = xcluster_proto::proxy_header::encode_v2(peer, local);
        match tokio::time::timeout(timeouts.connect, write_all(&backend, &header)).await {
            Ok(Ok(())) => {}
            _ => {
                debug!(backend = %addr, "cannot send the PROXY header");
                return None;
            }
        }
    }
    Some((backend, bm))
}

/// Writes all of `data` through a shared reference (the header is small: one write in practice).
async fn write_all(s: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Tries up to `connect_attempts` distinct backends; none of the client's bytes are read before one answers,
/// so a retry is invisible to the client.
async fn connect(
    l: &ListenerState,
    shared: &Shared,
    t: &Timeouts,
) -> Option<(TcpStream, SocketAddr, Arc<BackendMetrics>)> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    for attempt in 0..t.connect_attempts {
        let addr = shared.picker.pick(&l.cfg.request_type, &tried)?;
        if attempt > 0 {
            l.metrics.retries.increment(1);
        }
        let bm = shared.backend_metrics(addr);
        let t0 = Instant::now();
        match tokio::time::timeout(t.connect, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                bm.connects.increment(1);
                bm.connect_seconds.record(t0.elapsed().as_secs_f64());
                let _ = s.set_nodelay(true);
                return Some((s, addr, bm));
            }
            Ok(Err(e)) => debug!(backend = %addr, error = %e, "connect failed"),
            Err(_) => debug!(backend = %addr, timeout = ?t.connect, "connect timed out"),
        }
        bm.connect_failures.increment(1);
        shared.picker.report_failure(addr);
        tried.push(addr);
    }
    None
}

/// How a forwarded connection ended.
#[derive(Debug)]
enum Outcome {
    Done,
    Error(#[expect(dead_code, reason = "read through Debug in the closing log line")] std::io::Error),
    Idle,
    Stopped,
}

async fn pump(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    l: &ListenerState,
    bm: &BackendMetrics,
    shared: &Shared,
    idle: Option<Duration>,
) -> Outcome {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let mode = shared.forwarding;
    let (client_r, client_w) = client.split();
    let (backend_r, backend_w) = backend.split();
    // Built in place inside `try_join` (no named locals): a future moved into another is otherwise stored
    // twice in the enclosing state machine, and this state is what every idle connection costs.
    let both = futures_util::future::try_join(
        forward::one_way(
            mode,
            client_r,
            backend_w,
            Meter {
                listener_bytes: &l.metrics.bytes_up,
                backend_bytes: &bm.bytes_up,
                last: &last,
                start,
            },
        ),
        forward::one_way(
            mode,
            backend_r,
            client_w,
            Meter {
                listener_bytes: &l.metrics.bytes_down,
                backend_bytes: &bm.bytes_down,
                last: &last,
                start,
            },
        ),
    );
    tokio::pin!(both);
    // One timer for the connection's life, pushed forward lazily: activity only stamps `last`, and the
    // timer, when it fires, re-arms itself for `last + idle`.
    let idle = idle.unwrap_or(NO_IDLE_TIMEOUT);
    let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(start + idle));
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            r = &mut both => return r.map_or_else(Outcome::Error, |_| Outcome::Done),
            _ = shared.stop.cancelled() => return Outcome::Stopped,
            _ = &mut sleep => {
                let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if due <= Instant::now() {
                    l.metrics.idle_timeouts.increment(1);
                    return Outcome::Idle;
                }
                sleep.as_mut().reset(tokio::time::Instant::from_std(due));
            }
        }
    }
}

/// Stands in for "no idle timeout": far enough never to fire, near enough not to overflow `Instant`.
const NO_IDLE_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 86_400);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The connection future is most of what an idle connection costs (the goal is under 2 KiB per idle
    /// connection, everything included); this guards against a change that silently doubles it.
    #[tokio::test]
    async fn connection_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let c = TcpStream::connect(a).await.unwrap();
        let cfg = crate::proxy::ProxySection::default().validate(&mut xcluster_runtime::Validator::new());
        let shared = Arc::new(Shared::for_tests(&cfg));
        let state = Arc::new(ListenerState {
            cfg: crate::proxy::config::ListenerConfig {
                name: "x".into(),
                listen: a,
                request_type: "x".into(),
                proxy_protocol: false,
            },
            metrics: crate::proxy::metrics::ListenerMetrics::new("x"),
        });
        let f = serve(c, a, state, shared);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 1280, "the connection future grew to {size} bytes");
    }
}
