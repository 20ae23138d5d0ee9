//! Listening sockets for the proxy (built with `socket2`; a tokio worker converts its own, an io_uring worker
//! accepts on it directly) and the tokio accept loop: a connection permit is taken before `accept`, accept
//! errors back off and never end the loop, and each connection runs as its own task on the worker's runtime.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::config::ListenerConfig;
use super::service::{Admit, LiveListener, Shared};

pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(5);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds one SO_REUSEPORT listener for `cfg`; each per-core worker gets its own and the kernel spreads
/// connections among them. Options set here (TCP_NODELAY, keepalive) are inherited by accepted sockets.
pub fn bind(
    cfg: &ListenerConfig,
    backlog: i32,
    keepalive: Option<Duration>,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(cfg.listen), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(k) = keepalive {
        socket.set_tcp_keepalive(&TcpKeepalive::new().with_time(k))?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(cfg.listen))?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Errors that mean the process or system is out of a resource: wait before accepting again.
pub(super) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts until `cancel` fires. Must run on the worker runtime that will own the connections.
pub async fn accept_loop(
    std_listener: std::net::TcpListener,
    state: LiveListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %state.load().cfg.name, error = %e, "cannot register the listener");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let state = state.load_full();
                // Rejected: the stream and the permit drop here.
                if let Admit::Open(client) = state.admit(peer) {
                    shared.tracker.spawn(super::conn::serve(
                        stream,
                        peer,
                        state,
                        shared.clone(),
                        permit,
                        client,
                    ));
                }
            }
            Err(e) if is_resource_exhaustion(&e) => {
                let state = state.load();
                state.metrics.accept_errors.increment(1);
                warn!(listener = %state.cfg.name, error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                // Per-connection errors (ECONNABORTED and the like): the next accept is fine.
                let state = state.load();
                state.metrics.accept_errors.increment(1);
                debug!(listener = %state.cfg.name, error = %e, "accept failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `conn::serve` relies on accepted sockets inheriting TCP_NODELAY and keepalive from the listener
    /// rather than setting them again (a syscall per connection).
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let cfg = ListenerConfig {
            name: "x".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            request_type: "x".into(),
            proxy_protocol: false,
            accept_proxy: false,
            log_connections: false,
            max_connections_per_client: None,
            connection_rate: None,
            acl: Default::default(),
        };
        let l = bind(&cfg, 16, Some(Duration::from_secs(30))).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.set_nonblocking(false).unwrap();
        let (a, _) = l.accept().unwrap();
        assert!(a.nodelay().unwrap(), "TCP_NODELAY not inherited");
        assert!(
            socket2::SockRef::from(&a).keepalive().unwrap(),
            "keepalive not inherited"
        );
    }
}
