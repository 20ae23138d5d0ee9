//! The endpoints every daemon serves: `/metrics` (Prometheus text), `/livez` and `/readyz` (not ready while
//! starting or draining). They are layered in front of a role's own API so each role needs one port only.

use std::sync::Arc;

use http::{Method, StatusCode};

use crate::health::Health;
use crate::http::{Handler, error, text, with_type};
use crate::signals::Shutdown;

/// Wraps a role's handler so that the admin paths are answered first.
pub fn wrap(health: Health, inner: Handler) -> Handler {
    Arc::new(move |req, peer| {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            match req.uri().path() {
                "/metrics" => {
                    let body = crate::telemetry::render_metrics();
                    return Box::pin(async move {
                        with_type(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
                    });
                }
                "/livez" => return Box::pin(async { text(StatusCode::OK, "ok\n") }),
                "/readyz" => {
                    let phase = health.phase();
                    return Box::pin(async move {
                        if phase == crate::health::Phase::Ready {
                            text(StatusCode::OK, "ready\n")
                        } else {
                            text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready: {phase:?}\n").to_lowercase(),
                            )
                        }
                    });
                }
                _ => {}
            }
        }
        inner(req, peer)
    })
}

/// A handler that knows nothing: every path is a 404 (for roles whose only HTTP surface is the admin one).
pub fn not_found() -> Handler {
    Arc::new(|req, _| {
        let path = req.uri().path().to_string();
        Box::pin(async move {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            )
        })
    })
}

/// A role's API could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: std::net::SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` and serves `handler` behind the admin endpoints until `shutdown` drains, then lets the
/// clients queued on the port and the requests in flight finish within `limits.grace`. The server runs as a
/// task of `shutdown` ([`Shutdown::spawn`]), so the process does not end before it does. The role marks itself
/// ready once this is listening.
pub async fn serve_api(
    addr: std::net::SocketAddr,
    health: Health,
    handler: Handler,
    limits: crate::http::ServerLimits,
    shutdown: &Shutdown,
) -> Result<std::net::SocketAddr, ListenError> {
    Ok(serve_api_on(listen_api(addr)?, health, handler, limits, shutdown))
}

/// [`serve_api`] on its own `drain` signal, returning the server's task: it ends once `drain` fired and
/// in-flight requests finished (or `limits.grace` ran out). For a role whose API outlives its drain (the
/// monitor's stays up until its programs are stopped); it awaits the task.
pub async fn spawn_api(
    addr: std::net::SocketAddr,
    health: Health,
    handler: Handler,
    limits: crate::http::ServerLimits,
    drain: tokio_util::sync::CancellationToken,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), ListenError> {
    let l = listen_api(addr)?;
    let local = l.local;
    Ok((local, tokio::spawn(l.server(health, handler, limits, drain))))
}

/// A role's API address, bound but not served yet: clients wait in its backlog until [`serve_api_on`].
#[derive(Debug)]
pub struct ApiListener {
    listener: tokio::net::TcpListener,
    local: std::net::SocketAddr,
}

impl ApiListener {
    /// The server of `handler` behind the admin endpoints on this address, until `drain`.
    fn server(
        self,
        health: Health,
        handler: Handler,
        limits: crate::http::ServerLimits,
        drain: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + use<> {
        crate::http::serve(self.listener, wrap(health, handler), limits, drain)
    }
}

/// Binds `addr`, for a role that must know its port is its own before it does work that leaves traces (the
/// app creates and seeds its database).
pub fn listen_api(addr: std::net::SocketAddr) -> Result<ApiListener, ListenError> {
    let failed = |source| ListenError { addr, source };
    let listener = crate::net::bind(&crate::net::ListenOptions::new(addr)).map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    tracing::info!(%local, "listening");
    Ok(ApiListener { listener, local })
}

/// [`serve_api`] on an address bound already.
pub fn serve_api_on(
    l: ApiListener,
    health: Health,
    handler: Handler,
    limits: crate::http::ServerLimits,
    shutdown: &Shutdown,
) -> std::net::SocketAddr {
    let local = l.local;
    shutdown.spawn(l.server(health, handler, limits, shutdown.drain_token()));
    local
}
