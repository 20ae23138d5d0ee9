//! The HTTP/1.1 server every role's API runs on, with the limits every network input needs: a connection
//! cap taken before `accept` (connections over it get a 503), a header-read timeout (slowloris), a header
//! size bound (431), a bound on declared bodies (413), bounded body reads with a timeout, and graceful
//! shutdown that resets none of the clients queued on the listener. Also the JSON response helpers, so every
//! role answers errors alike.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::net::{Closing, next_look};
use crate::per_client::{ClientSlot, OpenCounts};

/// The response body type of every XCluster server: a full buffer or a stream (SSE, long poll, log follow).
pub type Body = BoxBody<Bytes, Infallible>;

/// A boxed future returning a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// A request handler: one per server, shared by every connection.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> ResponseFuture + Send + Sync>;

/// Limits applied to every connection of a server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Concurrent connections. A connection over it is answered 503 `too_many_connections` and closed (by at
    /// most 64 short-lived tasks at once; past that, excess clients wait in the listen backlog).
    pub max_connections: usize,
    /// Concurrent connections from one client address; over it a new one is answered 503
    /// `too_many_connections` and closed, so one client (idle connections, say) cannot take the others'.
    pub max_connections_per_client: usize,
    /// Time allowed for a request's headers to arrive (and for the first one after keep-alive).
    pub header_read_timeout: Duration,
    /// Longest a write to a client may wait with nothing taken ([`SendTimeout`]).
    pub send_timeout: Duration,
    /// Largest buffered request head, in bytes (hyper's minimum is 8 KiB).
    pub max_header_bytes: usize,
    /// Largest declared body (`Content-Length`): a larger one is answered 413 before any of it is read.
    /// Handlers bound what they actually read with their own, usually smaller, limits.
    pub max_body_bytes: usize,
    /// How long in-flight requests may run after shutdown starts.
    pub grace: Duration,
    /// Which `Host` a request that came in on a loopback address may name; see [`LoopbackHosts`].
    pub loopback_hosts: LoopbackHosts,
}

/// The guard against DNS rebinding: a web page whose own name the attacker re-points at 127.0.0.1 is, to the
/// browser, the same origin as that name, so its script could read a server on this host's loopback (the
/// dashboard, program logs, status) and the answers would go back to the page. Such a request names the
/// attacker's host in `Host`. So a request arriving on a loopback address is answered only if its `Host` is an
/// IP address, `localhost` (or a name under `.localhost`), or one of `names`; any other is a 421. Requests
/// on other addresses, and requests that are not a browser's, pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LoopbackHosts {
    /// No check (XBuy: the shop's own front ends call it on loopback under names of their choosing).
    #[default]
    Any,
    /// IP addresses, `localhost`, and these names (lowercase, without a port).
    Named(Arc<[String]>),
}

impl LoopbackHosts {
    /// Whether a request naming `host` (a `Host` header's value) may be answered on a loopback address.
    pub fn allows(&self, host: &str) -> bool {
        let Self::Named(names) = self else {
            return true;
        };
        let Some(name) = host_name(host) else {
            return false;
        };
        if name.starts_with('[') || name.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        name == "localhost" || name.ends_with(".localhost") || names.contains(&name)
    }
}

/// The name part of a `Host` value (`name`, `name:port`, `[v6]`, `[v6]:port`), or `None` if it is not one.
fn host_name(host: &str) -> Option<&str> {
    let name = if host.starts_with('[') {
        let end = host.find(']')?;
        let (v6, rest) = host.split_at(end + 1);
        v6[1..end].parse::<std::net::Ipv6Addr>().ok()?;
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        v6
    } else {
        match host.split_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => host,
        }
    };
    (!name.is_empty()).then_some(name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// The answer to a loopback request naming a host this server does not answer for.
fn misdirected(host: &str) -> Response<Body> {
    let shown: String = host.chars().take(100).collect();
    error(
        StatusCode::MISDIRECTED_REQUEST,
        "unknown_host",
        &format!(
            "this server answers on its loopback address only to IP addresses, localhost and [http] allowed_hosts; \
             Host {shown:?} is none of them (a guard against DNS rebinding)"
        ),
    )
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_client: 256,
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 1024 * 1024,
            grace: Duration::from_secs(10),
            loopback_hosts: LoopbackHosts::Any,
        }
    }
}

/// Builds a boxed body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, "application/json", bytes),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot encode response: {e}"),
        ),
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body)
}

/// A response with a given content type.
pub fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The JSON error every XCluster API returns: `{"error": {"code": "...", "message": "..."}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut resp = with_type(status, "application/json", body.to_string());
    *resp.status_mut() = status;
    resp
}

/// 405 for a path that exists but not with `method`, with the `Allow` header (RFC 9110) naming the methods
/// it takes, so a client learns the fix from the answer.
pub fn method_not_allowed(method: &http::Method, path: &str, allow: &'static str) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not allowed on {path} (allowed: {allow})"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body not received within {0:?}")]
    Timeout(Duration),
    #[error("request body could not be read: {0}")]
    Read(String),
}

impl BodyError {
    /// The response this error deserves.
    pub fn response(&self) -> Response<Body> {
        match self {
            BodyError::TooLarge { .. } => {
                error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", &self.to_string())
            }
            BodyError::Timeout(_) => error(StatusCode::REQUEST_TIMEOUT, "body_timeout", &self.to_string()),
            BodyError::Read(_) => error(StatusCode::BAD_REQUEST, "bad_body", &self.to_string()),
        }
    }
}

/// Reads a request body completely, bounded in size and time.
pub async fn read_body(body: Incoming, limit: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    let limited = Limited::new(body, limit);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Read(e.to_string()))
            }
        }
    }
}

/// Reads and decodes a JSON body, answering the right 4xx on any problem.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<T, Response<Body>> {
    read_json_else(req, limit, timeout, None).await
}

/// As `read_json`, for a body whose every field is optional: an empty body is `T::default()`.
pub async fn read_json_or_default<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<T, Response<Body>> {
    read_json_else(req, limit, timeout, Some(T::default)).await
}

/// `read_json`, with `empty` giving the value of an empty body (else it is bad JSON).
async fn read_json_else<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
    empty: Option<fn() -> T>,
) -> Result<T, Response<Body>> {
    let bytes = read_body(req.into_body(), limit, timeout)
        .await
        .map_err(|e| e.response())?;
    if let Some(empty) = empty
        && bytes.iter().all(u8::is_ascii_whitespace)
    {
        return Ok(empty());
    }
    decode_json(&bytes).map_err(|m| error(StatusCode::BAD_REQUEST, "bad_json", &m))
}

/// Every body the APIs take is an object; serde would also fill a struct from an array of its fields in
/// order (`["ann", [...]]` as an order), which no client means. The error is the `bad_json` message (for a
/// handler that must see the bytes first, as a signature check does).
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("invalid JSON body: expected a JSON object".into());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// Parses a query string into pairs (percent-decoding `%XX` and `+`), bounded in count.
pub fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(q) = query else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        if out.len() >= 32 {
            return Err("too many query parameters (max 32)".into());
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// Percent-encodes `s` for a path segment or a query value: everything but letters, digits and `-_.:*`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' | b'*' => {
                out.push(char::from(b))
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// A query value: `%XX` and `+` (a space).
fn percent_decode(s: &str) -> Result<String, String> {
    decode_percent(s, true)
}

/// A path segment: `%XX` only; `+`, `&` and `=` are themselves (query rules do not apply to a path).
pub fn percent_decode_path(s: &str) -> Result<String, String> {
    decode_percent(s, false)
}

fn decode_percent(s: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                // Two hex digits exactly: `from_str_radix` alone would take a sign ("%+1" as 1).
                let digit = |j: usize| bytes.get(j).and_then(|b| char::from(*b).to_digit(16));
                let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) else {
                    return Err(format!("bad percent-encoding in {s:?}"));
                };
                // Both below 16.
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to utf-8"))
}

/// Checks `Authorization: Bearer <token>` in constant time. An empty configured token refuses everything.
pub fn bearer_ok<B>(req: &Request<B>, token: &str) -> bool {
    !token.is_empty() && bearer(req).is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes()))
}

/// The credentials of `Authorization: Bearer <credentials>`, if the request has that header.
pub fn bearer<B>(req: &Request<B>) -> Option<&str> {
    let given = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are `Bearer`.
    let (scheme, given) = given.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| given.trim_start_matches(' '))
}

/// Compares a presented secret with the configured one in time set by the configured one's length only: an
/// early return on a length mismatch told a caller, by timing, how long the token is.
fn same_secret(given: &[u8], token: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != token.len());
    for (i, t) in token.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ t;
    }
    std::hint::black_box(diff) == 0
}

/// The 401 answer for a mutating call without a valid token.
/// Checks a mutating call's bearer token against `token`: a 403 when none is configured (no token can pass:
/// the answer names the setting, `setting`, that turns such calls on), a 401 when the request's is missing
/// or wrong.
#[allow(clippy::result_large_err)] // the error is the answer itself, built once per refused request
pub fn authorize<B>(req: &Request<B>, token: &str, setting: &str) -> Result<(), Response<Body>> {
    if token.is_empty() {
        let msg = format!("mutating calls are off here: no token is configured ({setting})");
        return Err(error(StatusCode::FORBIDDEN, "no_token", &msg));
    }
    if bearer_ok(req, token) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

pub fn unauthorized() -> Response<Body> {
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required for this call",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Serves `handler` on `listener` until `cancel` fires, then drains in-flight requests for up to `grace`.
/// The listener closes as [`Closing`] says: the clients already in its accept queue are served (one request
/// each), not reset.
pub async fn serve(listener: TcpListener, handler: Handler, limits: ServerLimits, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Connections accepted while the listener closes: they are not told of the shutdown (hyper would close
    // one that has not sent its request yet), they just serve one request; waited for with the rest.
    let late = TaskTracker::new();
    let mut closing: Option<Closing> = None;
    let local = listener.local_addr().ok();
    let name = local.map_or_else(|| "api".to_string(), |a| format!("api {a}"));
    // Connections over the cap are told so (503) by short-lived tasks, themselves capped: past that the
    // listener stops accepting and the kernel backlog holds the rest.
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let clients = Arc::new(OpenCounts::default());
    // At most `max_connections` (a million) after validation.
    let per_client = u32::try_from(limits.max_connections_per_client).unwrap_or(u32::MAX);
    let mut backoff = Duration::from_millis(5);
    loop {
        if closing.is_none() && cancel.is_cancelled() {
            closing = Some(Closing::begin(
                listener.as_fd(),
                &name,
                Instant::now() + limits.grace,
            ));
        }
        if let Some(c) = &mut closing
            && c.done(listener.as_fd(), &name)
        {
            break;
        }
        // The permit comes first, so a connection over the cap never reaches hyper.
        let slot = match permits.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => match refusals.clone().try_acquire_owned() {
                Ok(r) => Err(r),
                Err(_) => tokio::select! {
                    _ = next_look(closing.is_some(), cancel.cancelled()) => continue,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => Ok(p), Err(_) => break },
                },
            },
        };
        let (stream, peer) = tokio::select! {
            _ = next_look(closing.is_some(), cancel.cancelled()) => continue,
            r = listener.accept() => match r {
                Ok(pair) => { backoff = Duration::from_millis(5); pair }
                Err(e) => {
                    // EMFILE/ENFILE and friends are transient: back off and keep the loop alive.
                    metrics::counter!(crate::metrics::HTTP_ACCEPT_ERRORS_TOTAL).increment(1);
                    warn!(error = %e, ?local, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // A connection may have closed while we waited in `accept`: take its permit rather than refuse.
        let slot = slot.or_else(|refusal| permits.clone().try_acquire_owned().map_err(|_| refusal));
        let permit = match slot {
            Ok(permit) => permit,
            Err(refusal) => {
                metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REJECTED_TOTAL).increment(1);
                debug!(%peer, max = limits.max_connections, "at the connection cap; refusing");
                tokio::spawn(refuse(stream, refusal, FULL));
                continue;
            }
        };
        let Some(client) = clients.admit(peer.ip(), per_client) else {
            metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REJECTED_TOTAL).increment(1);
            debug!(%peer, max = limits.max_connections_per_client, "client at its connection cap; refusing");
            drop(permit);
            // Told so while refusals are few; a flood from one address is closed without a word.
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(refuse(stream, refusal, CLIENT_FULL));
            }
            continue;
        };
        let handler = handler.clone();
        let max_body = limits.max_body_bytes;
        // The address the client reached, which for a listener on 0.0.0.0 may be loopback or not.
        let hosts = match stream.local_addr() {
            Ok(a) if a.ip().to_canonical().is_loopback() => limits.loopback_hosts.clone(),
            _ => LoopbackHosts::Any,
        };
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let fut = match (declared_too_large(&req, max_body), unknown_host(&req, &hosts)) {
                (Some(resp), _) | (None, Some(resp)) => Box::pin(std::future::ready(resp)),
                (None, None) => handler(req, peer),
            };
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(closing.is_none());
        let stream = SendTimeout::new(stream, limits.send_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let span = info_span!("http_conn", %peer);
        let held = (permit, client);
        if closing.is_some() {
            late.spawn(serve_conn(conn, held).instrument(span));
        } else {
            tokio::spawn(serve_conn(graceful.watch(conn), held).instrument(span));
        }
    }
    drop(listener);
    let give_up = closing.map_or_else(|| Instant::now() + limits.grace, |c| c.give_up());
    late.close();
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), late.wait()) } => {}
        _ = tokio::time::sleep_until(give_up.into()) => {
            warn!(?local, "grace period over; no longer waiting for the remaining connections (they end with the process)");
        }
    }
}

/// The 421 for a browser's request whose `Host` (or absolute-form target) `hosts` does not allow. Only a
/// browser can be turned by rebinding, and every one says it is one in headers a page's script can neither
/// set nor remove (`Sec-Fetch-*`, `Origin`) or in its `User-Agent`; our own clients, curl and scripts that
/// name this host as its resolver has it (a Debian host's name is 127.0.1.1) are not refused.
fn unknown_host<B>(req: &Request<B>, hosts: &LoopbackHosts) -> Option<Response<Body>> {
    if *hosts == LoopbackHosts::Any || !from_browser(req) {
        return None;
    }
    let named = req
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or(""));
    let target = req.uri().authority().map(|a| a.as_str());
    named.chain(target).find(|h| !hosts.allows(h)).map(misdirected)
}

fn from_browser<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    h.contains_key(header::ORIGIN)
        || h.keys().any(|k| k.as_str().starts_with("sec-fetch-"))
        || h.get(header::USER_AGENT)
            .is_some_and(|ua| ua.as_bytes().starts_with(b"Mozilla/"))
}

/// A client's socket whose writes must make progress: one (or a flush) that has waited `limit` with nothing
/// taken fails, and its connection ends. hyper's only timer is the header read's, and it is not armed while
/// an answer is being written: a client that sent requests and never read the answers (pipelined `/metrics`
/// until its window and our send buffer were full) held its connection, its permit and its place in its
/// address's cap for good. A reader that is slow but reading (`tail -f`, the event stream) resets the wait
/// with each byte it takes.
struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write first waits; dropped when one goes through.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            waiting: None,
        }
    }

    /// The outcome of a write's poll: ready ends the wait; pending starts it, or fails once it is up.
    fn progress<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let wait = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match wait.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of the answer within http.send_timeout_ms",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, polled)
    }
}

/// Serves one connection; `held` (its permit and its client's count) is given back when it ends.
async fn serve_conn<E: std::fmt::Display>(
    conn: impl Future<Output = Result<(), E>>,
    held: (tokio::sync::OwnedSemaphorePermit, ClientSlot),
) {
    if let Err(e) = conn.await {
        debug!(error = %e, "connection ended with an error");
    }
    drop(held);
}

/// Most connections being refused at once (each for at most [`REFUSAL_TIME`]).
const REFUSALS_AT_ONCE: usize = 64;
/// How long a refused connection is given to take its 503.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// The refusal at the server's connection cap.
const FULL: &str = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit (http.max_connections); retry later"}}"#;
/// The refusal at a client's own cap.
const CLIENT_FULL: &str = r#"{"error":{"code":"too_many_connections","message":"this client address has as many connections open as it may (http.max_connections_per_client); close one, or retry later"}}"#;

/// Answers a connection over a cap with a 503 (`body`) and closes it. The request is read (bounded) first,
/// so the close does not reset the connection before the client has read the answer.
async fn refuse(mut stream: tokio::net::TcpStream, _refusal: tokio::sync::OwnedSemaphorePermit, body: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        let mut buf = [0u8; 4096];
        // Wait for the request head (or give up at the deadline), then answer and drain what follows.
        let _ = stream.read(&mut buf).await;
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut total = 0usize;
        while total < 64 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// The 413 for a request that declares a body over the server's bound, so no handler buffers any of it.
fn declared_too_large<B>(req: &Request<B>, max: usize) -> Option<Response<Body>> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    if declared <= max as u64 {
        return None;
    }
    debug!(declared, max, "request body over the server's bound");
    let mut resp = BodyError::TooLarge { limit: max }.response();
    // The unread body would otherwise have to be drained before the next request on this connection.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = query_pairs(Some("type=browse&watch=12&x=a%20b+c")).unwrap();
        assert_eq!(q[0], ("type".into(), "browse".into()));
        assert_eq!(q[2], ("x".into(), "a b c".into()));
        assert!(query_pairs(Some("x=%zz")).is_err());
        assert!(query_pairs(Some("x=%4")).is_err());
        assert!(query_pairs(Some("x=%+1")).is_err(), "a sign is not a hex digit");
        assert!(query_pairs(Some("x=%-1")).is_err());
        assert_eq!(query_pairs(Some("x=%4a%4A")).unwrap()[0].1, "JJ");
        let many = (0..40).map(|i| format!("k{i}=1")).collect::<Vec<_>>().join("&");
        assert!(query_pairs(Some(&many)).is_err());
    }

    #[test]
    fn bearer_checks_exactly() {
        let req = |v: &str| Request::builder().header("authorization", v).body(()).unwrap();
        assert!(bearer_ok(&req("Bearer s3cret"), "s3cret"));
        assert!(bearer_ok(&req("bearer s3cret"), "s3cret"));
        assert!(bearer_ok(&req("BEARER  s3cret"), "s3cret"));
        assert!(!bearer_ok(&req("Bearers3cret"), "s3cret"));
        assert!(!bearer_ok(&req("Bearer s3cre"), "s3cret"));
        assert!(!bearer_ok(&req("Basic s3cret"), "s3cret"));
        assert!(!bearer_ok(&req("Bearer "), ""));
        // Longer, or a prefix of the token padded with what a missing byte reads as.
        assert!(!bearer_ok(&req("Bearer s3cretX"), "s3cret"));
        assert!(!bearer_ok(&req("Bearer s3cre"), "s3cre\0"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn loopback_hosts_allow_addresses_localhost_and_the_named() {
        let any = LoopbackHosts::Any;
        assert!(any.allows("attacker.example"));
        let named = LoopbackHosts::Named(Arc::from(["dash.internal".to_string()]));
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9100",
            "[::1]",
            "[::1]:9100",
            "localhost",
            "LocalHost:80",
            "localhost.",
            "a.localhost",
            "dash.internal",
            "DASH.internal:8080",
            "10.1.2.3:1",
        ] {
            assert!(named.allows(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:9100",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
            "",
            ":80",
            "[::1",
            "[::1]x",
            "[evil]:80",
            "localhost:80:80",
            "localhost:port",
            "dash.internal.evil",
        ] {
            assert!(!named.allows(bad), "{bad:?}");
        }
    }

    #[test]
    fn declared_bodies_over_the_bound_are_refused() {
        let req = |len: &str| Request::builder().header("content-length", len).body(()).unwrap();
        assert!(declared_too_large(&req("1024"), 1024).is_none());
        let resp = declared_too_large(&req("1025"), 1024).unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(declared_too_large(&req("99999999999999999999999"), 1024).is_none());
        assert!(declared_too_large(&Request::new(()), 1024).is_none());
    }
}
