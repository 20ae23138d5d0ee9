//! A minimal HTTP/1.1 client for the roles' calls to each other: the agent's `GET` of an instance's stats and
//! `POST` of a report to a balancer, and a starting balancer's `GET` of its peers' status. One connection per
//! call (a few per second: cheaper than managing a pool), the whole exchange under one timeout, and the
//! response body bounded.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr}: {message}")]
    Io { addr: SocketAddr, message: String },
    /// The answer's body exceeded `max` bytes: not a failure of the peer's to retry, but of the bound.
    #[error("{addr}: answer larger than {max} bytes")]
    TooLarge { addr: SocketAddr, max: usize },
    #[error("{addr}: answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        body: String,
    },
}

/// How much of an unsuccessful answer's body `CallError::Status` keeps.
pub const STATUS_BODY_BYTES: usize = 512;

/// Sends one request and returns the body of a 2xx answer (at most `max_body` bytes).
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    max_body: usize,
    timeout: Duration,
) -> Result<Bytes, CallError> {
    match tokio::time::timeout(timeout, exchange(addr, method, path, headers, body, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(CallError::Timeout { addr, timeout }),
    }
}

async fn exchange(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    max_body: usize,
) -> Result<Bytes, CallError> {
    let io = |e: &dyn std::fmt::Display| CallError::Io {
        addr,
        message: e.to_string(),
    };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| io(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io(&e))?;
    // The connection task ends with the exchange (or with the timeout that drops the sender).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close");
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| io(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| io(&e))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
            Some(_) => CallError::TooLarge { addr, max: max_body },
            None => io(&format!("reading the body: {e}")),
        })?
        .to_bytes();
    if !status.is_success() {
        // Enough for any of our error answers whole (a refused report's, with its agent id, is ~350 bytes),
        // bounded for the logs it goes to.
        let body = String::from_utf8_lossy(&bytes[..bytes.len().min(STATUS_BODY_BYTES)]).into_owned();
        return Err(CallError::Status { addr, status, body });
    }
    Ok(bytes)
}
