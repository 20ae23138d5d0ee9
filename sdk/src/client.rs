//! [`Client`]: picking and connecting per request type, the [`Picked`] guard that feeds local feedback
//! back, and [`ClientState`], the client's own account of how fresh its lists are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use xcluster_proto::local_error;

use crate::builder::{ClientBuilder, Options};
use crate::directory::{Shared, TypeSlot, watch_loop};
use crate::error::{Error, Result};
use crate::picker::{Clock, Stats};

/// A handle to the SDK: cheap to clone, shared by every task of an application. Background watches stop
/// when the last clone is dropped (or on [`Client::shutdown`]).
///
/// ```no_run
/// # async fn demo() -> Result<(), xcluster_sdk::Error> {
/// let client = xcluster_sdk::Client::builder()
///     .balancers(["127.0.0.1:7000"])
///     .request_types(["browse"])
///     .build()
///     .await?;
/// let picked = client.pick("browse")?;
/// println!("would send to {} ({})", picked.addr(), picked.id());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    /// The whole budget of each call made through this handle (the builder's `deadline`, or
    /// [`Client::with_deadline`]'s).
    deadline: Duration,
    /// The timeout of one exchange with an instance through this handle (the builder's `request_timeout`, or
    /// [`Client::with_request_timeout`]'s).
    pub(crate) request_timeout: Duration,
    cancel: CancellationToken,
    _guard: Arc<DropGuard>,
}

/// One call's deadline, started when the call is: what is left of it clips every attempt's timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    total: Duration,
    /// `None` when the end is beyond what the clock can represent (`Duration::MAX`): never reached.
    ends: Option<Instant>,
}

impl Budget {
    pub(crate) fn start(total: Duration) -> Self {
        Self {
            total,
            ends: Instant::now().checked_add(total),
        }
    }

    /// What is left, or `None` once the deadline has passed.
    pub(crate) fn left(&self) -> Option<Duration> {
        match self.ends {
            None => Some(Duration::MAX),
            Some(end) => end
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero()),
        }
    }

    /// `timeout` clipped to what is left, and whether the deadline (rather than `timeout`) would end the
    /// attempt: then its expiry is the deadline's, not the instance's fault. `None` once it has passed.
    pub(crate) fn clip(&self, timeout: Duration) -> Option<(Duration, bool)> {
        let left = self.left()?;
        Some(if left < timeout {
            (left, true)
        } else {
            (timeout, false)
        })
    }

    /// The error of a call whose deadline passed after `tried` connects, `last` the last failure before.
    pub(crate) fn exceeded(&self, tried: &[SocketAddr], last: Option<Error>) -> Error {
        Error::DeadlineExceeded {
            deadline: self.total,
            attempts: u32::try_from(tried.len()).unwrap_or(u32::MAX),
            last: last.map(Box::new),
        }
    }
}

/// One picked instance. While it lives it counts as a request in flight to that instance; report how the
/// request went with [`Picked::success`] or [`Picked::failure`] so later picks learn from it.
#[derive(Debug)]
pub struct Picked {
    id: Arc<str>,
    addr: SocketAddr,
    version: u64,
    stats: Arc<Stats>,
    clock: Clock,
    ejection: Duration,
    started: Instant,
}

impl Picked {
    /// The instance's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The instance's id as the balancers name it (e.g. `host/app-1`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The version of the list it was picked from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records a successful request: its latency (since the pick) feeds the instance's EWMA.
    pub fn success(self) {
        self.stats
            .record_success(self.started.elapsed(), self.clock.now_ms());
    }

    /// Records a failed request (an error counts as load).
    pub fn failure(self) {
        self.stats.record_error(self.clock.now_ms());
    }

    /// Avoids this instance for the ejection period (it refused a connection or timed out).
    pub fn eject(&self) {
        self.stats.eject(&self.clock, self.ejection);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.stats.instance.finish();
    }
}

/// How fresh a request type's list is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A balancer answered the last request (or a watch is connected).
    Live,
    /// No balancer is reachable; the client serves from the last list (static stability).
    Static {
        /// Time since a balancer last vouched for the list.
        age: Duration,
    },
    /// No balancer for longer than `max_staleness`: picks fail with [`Error::Stale`].
    Expired {
        /// Time since a balancer last vouched for the list.
        age: Duration,
    },
}

/// One request type as the client sees it.
#[derive(Debug, Clone)]
pub struct TypeState {
    /// The request type.
    pub request_type: String,
    /// Version of the installed list.
    pub version: u64,
    /// Servers in the list (all states).
    pub servers: usize,
    /// Instances currently ejected by local feedback.
    pub ejected: Vec<SocketAddr>,
    /// The balancer that served the list last.
    pub balancer: Option<SocketAddr>,
    /// Whether the list is live, served statically, or expired.
    pub freshness: Freshness,
    /// The type's retry budget is spent: [`Client::send_idempotent`] makes one attempt per call until
    /// enough answers come back (see [`crate::ClientBuilder::retry_budget`]).
    pub retries_throttled: bool,
}

/// The client's state, from [`Client::state`].
#[derive(Debug, Clone)]
pub struct ClientState {
    /// Every balancer the client knows (seeds and learned).
    pub balancers: Vec<SocketAddr>,
    /// One entry per request type, in builder order.
    pub types: Vec<TypeState>,
}

impl ClientState {
    /// True when any type is served from a list no balancer currently confirms.
    pub fn is_static(&self) -> bool {
        self.types.iter().any(|t| t.freshness != Freshness::Live)
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    pub(crate) async fn bootstrap(opts: Options) -> Result<Client> {
        let shared = Arc::new(Shared::new(opts));
        let served_by = shared
            .bootstrap()
            .await
            .map_err(|(request_type, said, not_served)| {
                if not_served {
                    Error::NotServed { request_type, said }
                } else {
                    Error::Bootstrap {
                        request_type,
                        last: said,
                    }
                }
            })?;
        let cancel = CancellationToken::new();
        for (idx, b) in served_by.into_iter().enumerate() {
            tokio::spawn(watch_loop(shared.clone(), idx, b, cancel.clone()));
        }
        Ok(Client {
            deadline: shared.opts.deadline,
            request_timeout: shared.opts.request_timeout,
            shared,
            _guard: Arc::new(cancel.clone().drop_guard()),
            cancel,
        })
    }

    /// A handle to the same client (same lists, feedback and watches) whose calls have the whole budget `d`
    /// instead of the builder's [`ClientBuilder::deadline`]: for the few calls that need a tighter or
    /// looser bound than the rest. A zero budget fails every call at once with [`Error::DeadlineExceeded`].
    ///
    /// ```no_run
    /// # async fn demo(client: xcluster_sdk::Client) -> Result<(), xcluster_sdk::Error> {
    /// use std::time::Duration;
    /// let req = http::Request::get("/v1/products")
    ///     .body(http_body_util::Full::new(bytes::Bytes::new()))
    ///     .unwrap();
    /// let resp = client
    ///     .with_deadline(Duration::from_millis(300))
    ///     .send_idempotent("browse", req)
    ///     .await?;
    /// # drop(resp); Ok(()) }
    /// ```
    pub fn with_deadline(&self, d: Duration) -> Client {
        Client {
            deadline: d,
            ..self.clone()
        }
    }

    /// A handle to the same client whose exchanges with an instance time out after `d` instead of the
    /// builder's [`ClientBuilder::request_timeout`] (still clipped to the call's deadline). An exchange that
    /// outlives its own timeout ejects the instance; one cut by the deadline first does not, so a handle whose
    /// calls must fail over from a hung instance keeps this below its deadline.
    pub fn with_request_timeout(&self, d: Duration) -> Client {
        Client {
            request_timeout: d,
            ..self.clone()
        }
    }

    /// The whole budget of this handle's calls.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    pub(crate) fn budget(&self) -> Budget {
        Budget::start(self.deadline)
    }

    /// Stops the background watches now (they also stop when the last clone is dropped). Picks keep
    /// working from the last lists until they expire.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }

    pub(crate) fn slot(&self, request_type: &str) -> Result<&TypeSlot> {
        self.shared
            .types
            .iter()
            .find(|s| s.name == request_type)
            .ok_or_else(|| Error::UnknownType(request_type.to_string()))
    }

    /// Picks an instance for `request_type` without connecting.
    pub fn pick(&self, request_type: &str) -> Result<Picked> {
        self.pick_excluding(request_type, &[])
    }

    pub(crate) fn pick_excluding(&self, request_type: &str, exclude: &[SocketAddr]) -> Result<Picked> {
        let slot = self.slot(request_type)?;
        let clock = self.shared.clock;
        if let Some(age) = slot.staleness(&clock)
            && age > self.shared.opts.max_staleness
        {
            return Err(Error::Stale {
                request_type: request_type.to_string(),
                age,
            });
        }
        let table = slot.table.load();
        let e = table
            .pick(clock.now_ms(), exclude)
            .ok_or_else(|| Error::NoInstance(request_type.to_string()))?;
        e.stats.instance.start();
        Ok(Picked {
            id: e.id.clone(),
            addr: e.addr,
            version: table.version,
            stats: e.stats.clone(),
            clock,
            ejection: self.shared.opts.ejection,
            started: Instant::now(),
        })
    }

    /// Connects to an instance for `request_type`, trying others (up to `connect_attempts`) when one refuses
    /// or times out; those are ejected at once. The whole call is bounded by the client's deadline.
    ///
    /// ```no_run
    /// # async fn demo(client: xcluster_sdk::Client) -> Result<(), xcluster_sdk::Error> {
    /// use tokio::io::AsyncWriteExt;
    /// let mut stream = client.connect("order").await?;
    /// stream.write_all(b"PING\r\n").await.ok();
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, request_type: &str) -> Result<TcpStream> {
        self.connect_tracked(request_type).await.map(|(_, s)| s)
    }

    /// Like [`Client::connect`], also returning the [`Picked`] guard, which counts the request in flight
    /// until dropped and takes its outcome.
    pub async fn connect_tracked(&self, request_type: &str) -> Result<(Picked, TcpStream)> {
        let mut tried = Vec::new();
        self.connect_excluding(request_type, &mut tried, self.budget())
            .await
    }

    pub(crate) async fn connect_excluding(
        &self,
        request_type: &str,
        tried: &mut Vec<SocketAddr>,
        budget: Budget,
    ) -> Result<(Picked, TcpStream)> {
        let attempts = self.shared.opts.connect_attempts;
        let mut last = None;
        for _ in 0..attempts {
            let Some((timeout, cut)) = budget.clip(self.shared.opts.connect_timeout) else {
                return Err(budget.exceeded(tried, last));
            };
            let picked = match self.pick_excluding(request_type, tried) {
                Ok(p) => p,
                Err(e) if last.is_none() => return Err(e),
                Err(_) => break,
            };
            let addr = picked.addr;
            tried.push(addr);
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok((picked, stream));
                }
                // This host out of descriptors or memory: the instance is not at fault, and another would
                // fail alike.
                Ok(Err(source)) if local_error::is_resource_exhaustion(&source) => {
                    return Err(Error::Connect { addr, source });
                }
                // Out of local ports toward this instance (TIME_WAITs of this client's own closes): not the
                // instance's fault either, but ports run out per destination, so another is tried.
                Ok(Err(source)) if local_error::out_of_local_ports(&source) => {
                    tracing::debug!(%addr, error = %source, "no local port toward the instance; trying another");
                    last = Some(Error::Connect { addr, source });
                }
                Ok(Err(source)) => {
                    tracing::debug!(%addr, error = %source, "connect failed; ejecting the instance");
                    picked.eject();
                    last = Some(Error::Connect { addr, source });
                }
                // The caller's deadline, not the instance's connect_timeout, ran out: no ejection.
                Err(_) if cut => return Err(budget.exceeded(tried, last)),
                Err(_) => {
                    tracing::debug!(%addr, "connect timed out; ejecting the instance");
                    picked.eject();
                    last = Some(Error::ConnectTimeout { addr });
                }
            }
        }
        let last = last.unwrap_or_else(|| Error::NoInstance(request_type.to_string()));
        Err(Error::Exhausted {
            attempts: u32::try_from(tried.len()).unwrap_or(u32::MAX),
            last: Box::new(last),
        })
    }

    /// The client's view of its lists and balancers.
    pub fn state(&self) -> ClientState {
        let clock = self.shared.clock;
        let now = clock.now_ms();
        let types = self
            .shared
            .types
            .iter()
            .map(|slot| {
                let table = slot.table.load();
                let freshness = match slot.staleness(&clock) {
                    None => Freshness::Live,
                    Some(age) if age > self.shared.opts.max_staleness => Freshness::Expired { age },
                    Some(age) => Freshness::Static { age },
                };
                TypeState {
                    request_type: slot.name.clone(),
                    version: table.version,
                    servers: table.all.len(),
                    ejected: table
                        .all
                        .iter()
                        .filter(|e| e.stats.is_ejected(now))
                        .map(|e| e.addr)
                        .collect(),
                    balancer: *slot.balancer.lock().unwrap_or_else(|p| p.into_inner()),
                    freshness,
                    retries_throttled: !slot.retry.allows_retries(),
                }
            })
            .collect();
        ClientState {
            balancers: self.shared.balancers.load().to_vec(),
            types,
        }
    }
}
