//! The hyper integration: send an HTTP/1.1 request to the instance the client picks for a request type,
//! with bounded bodies and a timeout, feeding latency and errors back into the picker; plus a retry helper
//! for idempotent requests that tries other instances.
//!
//! One connection per request keeps the integration simple and makes every request a fresh pick; the
//! connect cost on a LAN is small next to picking the wrong instance.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::client::{Budget, Client};
use crate::error::{Error, Result};

/// Which instance served a response; [`Client::send`] puts it in the response's extensions.
///
/// ```
/// # fn demo(resp: http::Response<bytes::Bytes>) {
/// if let Some(b) = resp.extensions().get::<xcluster_sdk::Backend>() {
///     println!("served by {} at {}", b.id, b.addr);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The instance's id in the server list (empty when not known, as through a proxy).
    pub id: String,
    /// The address the request was sent to.
    pub addr: SocketAddr,
    /// Which attempt of the call this answer is (1 for the first): above 1, [`Client::send_idempotent`]
    /// retried, each earlier attempt having failed (an error, or a 502/503/504 answer) on another
    /// instance. A caller counting only outcomes would otherwise never see those failures.
    pub attempts: u32,
}

/// Sends one request over an already connected stream and reads the whole response, bounded by
/// `max_body` bytes and by `timeout` for the whole exchange. Sets `Host` when missing. Used by
/// [`Client::send`]; public so tools can send the same way over streams they connected themselves.
///
/// ```no_run
/// # async fn demo() -> Result<(), xcluster_sdk::Error> {
/// use std::time::Duration;
/// let addr = "127.0.0.1:8080".parse().unwrap();
/// let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
/// let req = http::Request::get("/v1/products").body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
/// let resp = xcluster_sdk::exchange(stream, addr, req, Duration::from_secs(5), 1 << 20).await?;
/// println!("{}", resp.status());
/// # Ok(()) }
/// ```
pub async fn exchange(
    stream: TcpStream,
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Response<Bytes>> {
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(&addr.to_string())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let work = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Http { addr, msg: chain(&e) })?;
        // The connection task ends when the exchange does (the sender is dropped) or on error.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::Http { addr, msg: chain(&e) })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, max_body).collect().await.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Error::ResponseTooLarge {
                    addr,
                    limit: max_body,
                }
            } else {
                Error::Http {
                    addr,
                    msg: chain(&*e),
                }
            }
        })?;
        Ok(Response::from_parts(parts, body.to_bytes()))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout { addr }),
    }
}

/// Statuses after which an idempotent request is worth trying on another instance.
fn retryable_status(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

impl Client {
    /// Sends `req` to an instance picked for `request_type` and returns the whole response (any status).
    /// Connect failures are retried on other instances (the request was not sent); anything later is not,
    /// since the request may have had its effect. Use an origin-form URI (`/v1/...`). The whole call is
    /// bounded by the client's deadline ([`Error::DeadlineExceeded`]).
    ///
    /// ```no_run
    /// # async fn demo(client: xcluster_sdk::Client) -> Result<(), xcluster_sdk::Error> {
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// let req = http::Request::post("/v1/orders")
    ///     .header("idempotency-key", "k-1")
    ///     .header("content-type", "application/json")
    ///     .body(Full::new(Bytes::from_static(
    ///         br#"{"user":"ann","lines":[{"sku":"sku-1-1","qty":1}]}"#,
    ///     )))
    ///     .unwrap();
    /// let resp = client.send("order", req).await?;
    /// println!("{} from {:?}", resp.status(), resp.extensions().get::<xcluster_sdk::Backend>());
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, request_type: &str, req: Request<Full<Bytes>>) -> Result<Response<Bytes>> {
        let mut tried = Vec::new();
        let r = self.send_once(request_type, req, &mut tried, self.budget()).await;
        // Not retried, but what it met tells the type's retry budget how the instances fare.
        self.may_retry(request_type, &r);
        r
    }

    /// Feeds an attempt's outcome to the type's retry budget ([`crate::ClientBuilder::retry_budget`]) and
    /// says whether to try again: the outcome is worth retrying (a retryable error, a 502/503/504) and the
    /// budget allows it. An error that no retry could help (the deadline, a response too large) neither
    /// spends nor earns a token.
    fn may_retry(&self, request_type: &str, r: &Result<Response<Bytes>>) -> bool {
        let Ok(slot) = self.slot(request_type) else {
            return false;
        };
        let worth = match r {
            Ok(resp) if retryable_status(resp.status()) => true,
            Ok(_) => {
                slot.retry.succeeded();
                return false;
            }
            // Nothing reached an instance (every connect failed, or none to pick): it cost the instances
            // nothing, so it neither spends nor earns a token. Spent, a type left with nothing pickable
            // (all drained, weight 0) emptied the bucket in 100 calls, and 501 answers were then needed
            // before a real failure was retried again. Another pick follows a failed connect's round;
            // none follows "none to pick".
            // Nor after this host ran out of descriptors or memory: another attempt would fail alike.
            Err(Error::Connect { source, .. })
                if xcluster_proto::local_error::is_resource_exhaustion(source) =>
            {
                return false;
            }
            Err(e) if e.not_sent() => return !matches!(e, Error::NoInstance(_)),
            Err(e) => e.is_retryable(),
        };
        if !worth {
            return false;
        }
        let allowed = slot.retry.failed();
        if !allowed {
            tracing::debug!(request_type, "retry budget spent: not retrying");
        }
        allowed
    }

    async fn send_once(
        &self,
        request_type: &str,
        req: Request<Full<Bytes>>,
        tried: &mut Vec<SocketAddr>,
        budget: Budget,
    ) -> Result<Response<Bytes>> {
        let (picked, stream) = self.connect_excluding(request_type, tried, budget).await?;
        let addr = picked.addr();
        let opts = &self.shared.opts;
        let Some((timeout, cut)) = budget.clip(self.request_timeout) else {
            return Err(budget.exceeded(tried, None));
        };
        match exchange(stream, addr, req, timeout, opts.max_response_bytes).await {
            Ok(mut resp) => {
                resp.extensions_mut().insert(Backend {
                    id: picked.id().to_string(),
                    addr,
                    attempts: 1,
                });
                if resp.status().is_server_error() {
                    picked.failure();
                } else {
                    picked.success();
                }
                Ok(resp)
            }
            Err(Error::Timeout { .. }) if cut => {
                // Slow for this caller, so it counts against the instance; but it did not break its own
                // request_timeout, so it is not ejected.
                picked.failure();
                Err(budget.exceeded(tried, None))
            }
            Err(e) => {
                if matches!(e, Error::Timeout { .. }) {
                    picked.eject();
                }
                picked.failure();
                Err(e)
            }
        }
    }

    /// Sends an idempotent request (a GET, or a POST carrying an idempotency key), retrying on another
    /// instance after a retryable error or a 502/503/504, up to `request_attempts` in all and while the
    /// type's retry budget lasts ([`crate::ClientBuilder::retry_budget`]: when most attempts fail, retries
    /// stop rather than multiply the load on failing instances). Returns the last response or error. A request that is neither (say a POST with no `Idempotency-Key`) is sent as
    /// [`Client::send`] sends it: once, with only connect failures tried elsewhere.
    ///
    /// The whole call, retries included, is bounded by the client's deadline: no attempt starts after it,
    /// the one in flight is cut off, and the call fails with [`Error::DeadlineExceeded`] (carrying the last
    /// failed attempt's error). A 502/503/504 with no time left for another attempt is returned as is.
    ///
    /// ```no_run
    /// # async fn demo(client: xcluster_sdk::Client) -> Result<(), xcluster_sdk::Error> {
    /// let req = http::Request::get("/v1/products?limit=10")
    ///     .body(http_body_util::Full::new(bytes::Bytes::new()))
    ///     .unwrap();
    /// let resp = client.send_idempotent("browse", req).await?;
    /// assert!(resp.status().is_success());
    /// # Ok(()) }
    /// ```
    pub async fn send_idempotent(
        &self,
        request_type: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Bytes>> {
        if !is_idempotent(&req) {
            // A retry could apply it twice (an instance may fail after its commit): send it once.
            return self.send(request_type, req).await;
        }
        let attempts = self.shared.opts.request_attempts;
        let budget = self.budget();
        let mut tried = Vec::new();
        let mut last: Option<Result<Response<Bytes>>> = None;
        for attempt in 0..attempts {
            if budget.left().is_none() {
                // No time for another attempt: an answer stands (as when the attempts run out), an error
                // becomes the deadline's.
                return match last {
                    Some(Ok(resp)) => Ok(resp),
                    prev => Err(budget.exceeded(&tried, prev.and_then(Result::err))),
                };
            }
            let mut r = self
                .send_once(request_type, clone_request(&req), &mut tried, budget)
                .await;
            if let Ok(resp) = &mut r
                && let Some(b) = resp.extensions_mut().get_mut::<Backend>()
            {
                b.attempts = attempt + 1;
            }
            if let Err(e @ Error::DeadlineExceeded { .. }) = r {
                // The retry was cut off: an answer in hand (a 503) stands, as when no time was left to
                // start it; it was dropped for a deadline error that said nothing of it.
                return match last {
                    Some(Ok(resp)) => Ok(resp),
                    prev => Err(with_last(e, prev.and_then(Result::err))),
                };
            }
            if matches!(r, Err(Error::NoInstance(_)))
                && let Some(prev) = last.take()
            {
                // Every instance has been tried: the previous failure says more than "none left".
                return prev;
            }
            // An answer in hand (a 503) says more than a later attempt that reached no instance: it stands.
            // Replaced by the connect error, what the caller got hung on the order the instances were
            // picked in.
            let answered_before = matches!(&last, Some(Ok(_))) && r.as_ref().is_err_and(Error::not_sent);
            if !self.may_retry(request_type, &r) || attempt + 1 == attempts {
                return match last {
                    Some(answer @ Ok(_)) if answered_before => answer,
                    _ => r,
                };
            }
            tracing::debug!(
                request_type,
                attempt,
                "retrying an idempotent request on another instance"
            );
            if !answered_before {
                last = Some(r);
            }
        }
        last.unwrap_or_else(|| Err(Error::NoInstance(request_type.to_string())))
    }
}

/// An error and its causes, `: `-separated. hyper's errors say only what failed ("connection error"), the
/// cause (a reset, an early end of the stream) being their source: the message alone could not tell a
/// caller or a log why.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

/// A deadline error of an attempt cut off in flight, carrying `prev` (the earlier attempt's error) when it
/// has no failure of its own to tell: what went wrong before the time ran out.
fn with_last(e: Error, prev: Option<Error>) -> Error {
    match e {
        Error::DeadlineExceeded {
            deadline,
            attempts,
            last: None,
        } => Error::DeadlineExceeded {
            deadline,
            attempts,
            last: prev.map(Box::new),
        },
        e => e,
    }
}

/// Whether sending `req` twice has the effect of sending it once: an idempotent method, or any request
/// carrying an idempotency key (the app then answers a repeat with the first outcome).
fn is_idempotent(req: &Request<Full<Bytes>>) -> bool {
    req.method().is_idempotent() || req.headers().contains_key("idempotency-key")
}

fn clone_request(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut out = Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection error")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_http_error_names_its_causes() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ));
        assert_eq!(chain(&e), "connection error: connection reset by peer");
    }
}
