//! One proxied connection: pick and connect a backend with redispatch, send the optional PROXY header, then
//! forward both directions until both end, either side fails, the idle timeout fires, or the stop signal
//! (end of the drain grace period) arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Gauge;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span};

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
pub async fn serve(mut client: TcpStream, peer: SocketAddr, l: Arc<ListenerState>, shared: Arc<Shared>) {
    let span = debug_span!("proxy", listener = %l.cfg.name, %peer);
    async move {
        l.metrics.accepted.increment(1);
        let _active = Active::new(&l.metrics.active);
        let _ = client.set_nodelay(true);
        let timeouts = shared.timeouts.load_full();
        let stop = shared.stop.clone();
        let connected = tokio::select! {
            c = connect(&l, &shared, &timeouts) => c,
            _ = stop.cancelled() => return,
        };
        let Some((mut backend, addr, bm)) = connected else {
            l.metrics.failed.increment(1);
            debug!("no backend reachable; closing the client");
            return;
        };
        if l.cfg.proxy_protocol {
            let local = client.local_addr().unwrap_or(l.cfg.listen);
            let header = super::proxy_protocol::v2_header(peer, local);
            match tokio::time::timeout(timeouts.connect, write_all(&backend, &header)).await {
                Ok(Ok(())) => {}
                _ => {
                    debug!(backend = %addr, "cannot send the PROXY header");
                    return;
                }
            }
        }
        let _backend_active = Active::new(&bm.active);
        let outcome = pump(&mut client, &mut backend, &l, &bm, &shared, timeouts.idle).await;
        debug!(backend = %addr, ?outcome, "connection ended");
    }
    .instrument(span)
    .await
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
    let up = forward::one_way(
        mode,
        client_r,
        backend_w,
        Meter {
            listener_bytes: &l.metrics.bytes_up,
            backend_bytes: &bm.bytes_up,
            last: &last,
            start,
        },
    );
    let down = forward::one_way(
        mode,
        backend_r,
        client_w,
        Meter {
            listener_bytes: &l.metrics.bytes_down,
            backend_bytes: &bm.bytes_down,
            last: &last,
            start,
        },
    );
    let both = async { tokio::try_join!(up, down) };
    tokio::pin!(both);
    let mut deadline = idle.map(|d| tokio::time::Instant::from_std(start + d));
    loop {
        let idle_check = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut both => return r.map_or_else(Outcome::Error, |_| Outcome::Done),
            _ = shared.stop.cancelled() => return Outcome::Stopped,
            _ = idle_check => {
                let Some(idle) = idle else { continue };
                let last_at = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if last_at <= Instant::now() {
                    l.metrics.idle_timeouts.increment(1);
                    return Outcome::Idle;
                }
                deadline = Some(tokio::time::Instant::from_std(last_at));
            }
        }
    }
}
