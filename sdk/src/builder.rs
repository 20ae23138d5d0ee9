//! [`ClientBuilder`]: the SDK's options, validated all at once, and the bootstrap that turns them into a
//! running [`Client`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::resolve;
use crate::retry::{DEFAULT_MAX_TOKENS, DEFAULT_TOKEN_RATIO};

/// A call's whole budget unless the builder says otherwise: Envoy's default route timeout. It leaves room for
/// one full `request_timeout` (10 s) and the connect failovers and a quick retry around it, and cuts the
/// worst case of the default retry budgets (3 × (3 × 500 ms + 10 s), about 35 s) to a bound a caller can
/// plan around.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);

/// Validated options of a client.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The seeds given as `ip:port`.
    pub(crate) balancers: Vec<SocketAddr>,
    /// The seeds given as `host:port`, and what each resolved to at `build()` (the client's `Shared` takes
    /// them over and resolves them again).
    pub(crate) named: Vec<(String, Vec<SocketAddr>)>,
    pub(crate) request_types: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) balancer_timeout: Duration,
    pub(crate) watch_timeout: Duration,
    pub(crate) repoll_interval: Duration,
    pub(crate) max_staleness: Duration,
    pub(crate) ejection: Duration,
    pub(crate) connect_attempts: u32,
    pub(crate) request_attempts: u32,
    pub(crate) retry_max_tokens: u32,
    pub(crate) retry_token_ratio: f64,
    pub(crate) request_timeout: Duration,
    pub(crate) deadline: Duration,
    pub(crate) max_response_bytes: usize,
}

impl Options {
    /// How long a watch asks the balancer to hold it: `watch_timeout`, at most half of `max_staleness` (a
    /// list must be vouched for, or found unvouched, well inside it), and at least 100 ms.
    pub(crate) fn watch_hold(&self) -> Duration {
        self.watch_timeout
            .min(self.max_staleness / 2)
            .max(Duration::from_millis(100))
    }
}

/// Builds a [`Client`]. Every option has a default except the balancers and the request types.
///
/// ```no_run
/// # async fn demo() -> Result<(), xcluster_sdk::Error> {
/// use std::time::Duration;
/// let client = xcluster_sdk::Client::builder()
///     .balancers(["127.0.0.1:7000", "127.0.0.1:7001"])
///     .request_types(["browse", "order"])
///     .max_staleness(Duration::from_secs(120))
///     .build()
///     .await?;
/// let stream = client.connect("browse").await?;
/// # drop(stream); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    balancers: Vec<String>,
    request_types: Vec<String>,
    pub(crate) opts: Options,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            balancers: Vec::new(),
            request_types: Vec::new(),
            opts: Options {
                balancers: Vec::new(),
                named: Vec::new(),
                request_types: Vec::new(),
                connect_timeout: Duration::from_millis(500),
                balancer_timeout: Duration::from_secs(2),
                watch_timeout: Duration::from_secs(10),
                repoll_interval: Duration::from_secs(1),
                max_staleness: Duration::from_secs(300),
                ejection: Duration::from_secs(10),
                connect_attempts: 3,
                request_attempts: 3,
                retry_max_tokens: DEFAULT_MAX_TOKENS,
                retry_token_ratio: DEFAULT_TOKEN_RATIO,
                request_timeout: Duration::from_secs(10),
                deadline: DEFAULT_DEADLINE,
                max_response_bytes: 8 * 1024 * 1024,
            },
        }
    }
}

impl ClientBuilder {
    /// Seed balancers' API addresses: `ip:port`, or `host:port` (such as `localhost:7000`), resolved by
    /// `build()` with the system resolver within `balancer_timeout`; every address a name resolves to is a
    /// seed. The client learns the other balancers from the lists they serve. While no balancer answers, the
    /// names are resolved again (at most every 5 s), so a client whose balancers all came back on new
    /// addresses finds them by name, as gRPC's resolver does.
    pub fn balancers<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.balancers = addrs.into_iter().map(|s| s.as_ref().trim().to_string()).collect();
        self
    }

    /// The request types this client sends (`[A-Za-z0-9_-]`, 1..=64 chars); one list is kept per type.
    pub fn request_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.request_types = types.into_iter().map(|s| s.as_ref().to_string()).collect();
        self
    }

    /// Timeout of every TCP connect, to balancers and instances (default 500 ms).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.opts.connect_timeout = d;
        self
    }

    /// Timeout of a plain (non-watch) list fetch from a balancer (default 2 s).
    pub fn balancer_timeout(mut self, d: Duration) -> Self {
        self.opts.balancer_timeout = d;
        self
    }

    /// How long a watch may wait for a change: the client asks the balancer to hold it that long
    /// (`wait_ms`, which the balancer caps at its `watch_timeout_ms`), at most half of `max_staleness`,
    /// and gives up `balancer_timeout` after it. So a balancer that hangs without closing its sockets is
    /// left for the next one within that time, and the list never passes for fresh longer (default 10 s).
    pub fn watch_timeout(mut self, d: Duration) -> Self {
        self.opts.watch_timeout = d;
        self
    }

    /// Base interval of re-polls after an answer that did not wait (jittered between half and all of it;
    /// default 1 s).
    pub fn repoll_interval(mut self, d: Duration) -> Self {
        self.opts.repoll_interval = d;
        self
    }

    /// How long the client keeps serving from its last lists once every balancer is unreachable (static
    /// stability); after that, picks fail with [`Error::Stale`] (default 300 s).
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.opts.max_staleness = d;
        self
    }

    /// How long an instance that refused a connection or timed out is avoided (default 10 s).
    pub fn ejection(mut self, d: Duration) -> Self {
        self.opts.ejection = d;
        self
    }

    /// Instances tried by one `connect` before giving up (default 3).
    pub fn connect_attempts(mut self, n: u32) -> Self {
        self.opts.connect_attempts = n;
        self
    }

    /// Attempts of one [`Client::send_idempotent`] (default 3).
    pub fn request_attempts(mut self, n: u32) -> Self {
        self.opts.request_attempts = n;
        self
    }

    /// The retry budget of each request type (gRPC's retry throttling; default 100 tokens, 0.1): a retry of
    /// [`Client::send_idempotent`] is made only while more than half of `max_tokens` are left; each attempt
    /// that fails in a way worth retrying (a retryable error, a 502/503/504) spends a token and each other
    /// answer gives back `token_ratio` of one. So a burst of failures (an instance dying with requests in
    /// flight) is retried, but when most attempts fail for long, a client stops multiplying its load on the
    /// failing instances after `max_tokens / 2` retries (each call then returns its first attempt's answer
    /// or error), and retries stay under about `token_ratio` of the successes. `max_tokens` is 1..=1000 and
    /// `token_ratio` above 0 and at most `max_tokens` (which gives back a whole bucket per success: retries
    /// held back only by consecutive failures). [`crate::TypeState::retries_throttled`] says when it holds.
    pub fn retry_budget(mut self, max_tokens: u32, token_ratio: f64) -> Self {
        self.opts.retry_max_tokens = max_tokens;
        self.opts.retry_token_ratio = token_ratio;
        self
    }

    /// Timeout of one HTTP exchange with an instance, through the whole body (default 10 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.opts.request_timeout = d;
        self
    }

    /// The whole budget of one call ([`Client::send`], [`Client::send_idempotent`], [`Client::connect`],
    /// [`Client::connect_tracked`]), retries included, like Envoy's route timeout or a gRPC deadline
    /// (default [`DEFAULT_DEADLINE`], 15 s). Each attempt's own timeouts (`connect_timeout`,
    /// `request_timeout`) are clipped to what is left of it; once it passes no attempt is started, the one
    /// in flight is cut off, and the call fails with [`Error::DeadlineExceeded`]. `Duration::MAX` leaves
    /// calls bounded only by the retry budgets. [`Client::with_deadline`] sets it for some calls only.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), xcluster_sdk::Error> {
    /// use std::time::Duration;
    /// let client = xcluster_sdk::Client::builder()
    ///     .balancers(["localhost:7000"])
    ///     .request_types(["browse"])
    ///     .deadline(Duration::from_secs(2))
    ///     .build()
    ///     .await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn deadline(mut self, d: Duration) -> Self {
        self.opts.deadline = d;
        self
    }

    /// Largest response body [`Client::send`] accepts (default 8 MiB).
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.opts.max_response_bytes = n;
        self
    }

    /// Checks every option, reporting every problem at once. Returns the options with the balancers given
    /// as `ip:port`, and the `host:port` names still to resolve.
    fn validate(mut self) -> Result<(Options, Vec<String>)> {
        let mut problems = Vec::new();
        let mut names = Vec::new();
        if self.balancers.is_empty() {
            problems.push("balancers: at least one is required".to_string());
        }
        for b in &self.balancers {
            match b.parse::<SocketAddr>() {
                Ok(a) => crate::directory::extend_new(&mut self.opts.balancers, [a]),
                Err(_) if resolve::well_formed(b) => {
                    if !names.contains(b) {
                        names.push(b.clone());
                    }
                }
                Err(_) => problems.push(format!(
                    "balancers: {b:?} is not an ip:port or host:port address{}",
                    xcluster_proto::bracket_hint(b).unwrap_or_default()
                )),
            }
        }
        if self.request_types.is_empty() {
            problems.push("request_types: at least one is required".to_string());
        }
        for t in &self.request_types {
            let ok = !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
            if !ok {
                problems.push(format!("request_types: {t:?} must be 1..=64 of [A-Za-z0-9_-]"));
            } else if !self.opts.request_types.contains(t) {
                self.opts.request_types.push(t.clone());
            }
        }
        let o = &self.opts;
        for (name, d) in [
            ("connect_timeout", o.connect_timeout),
            ("balancer_timeout", o.balancer_timeout),
            ("watch_timeout", o.watch_timeout),
            ("repoll_interval", o.repoll_interval),
            ("request_timeout", o.request_timeout),
            ("deadline", o.deadline),
        ] {
            if d.is_zero() {
                problems.push(format!("{name}: must be above zero"));
            }
        }
        if o.connect_attempts == 0 || o.request_attempts == 0 {
            problems.push("connect_attempts and request_attempts: must be at least 1".into());
        }
        // Written so that a NaN ratio fails it.
        let ratio_ok = o.retry_token_ratio > 0.0 && o.retry_token_ratio <= f64::from(o.retry_max_tokens);
        if !(1..=1000).contains(&o.retry_max_tokens) || !ratio_ok {
            problems.push(format!(
                "retry_budget: max_tokens must be 1..=1000 and token_ratio above 0 and at most max_tokens \
                 (got {}, {})",
                o.retry_max_tokens, o.retry_token_ratio
            ));
        }
        if o.max_response_bytes == 0 {
            // Would turn every response with a body into ResponseTooLarge, far from the cause.
            problems.push("max_response_bytes: must be at least 1".into());
        }
        if problems.is_empty() {
            Ok((self.opts, names))
        } else {
            Err(Error::Config(problems.join("; ")))
        }
    }

    /// Validates the options, resolves the balancers named `host:port`, fetches a list for every request type
    /// from the first balancer that answers, and starts the background watches. Fails with
    /// [`Error::Resolve`] if a name does not resolve, and [`Error::Bootstrap`] if no balancer serves a type.
    pub async fn build(self) -> Result<Client> {
        let (mut opts, names) = self.validate()?;
        for name in names {
            let addrs = resolve::resolve(&name, opts.balancer_timeout).await?;
            opts.named.push((name, addrs));
        }
        Client::bootstrap(opts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_reports_every_problem() {
        let err = ClientBuilder::default()
            .balancers(["nope", "127.0.0.1:1"])
            .request_types(["ok", "bad type"])
            .connect_timeout(Duration::ZERO)
            .connect_attempts(0)
            .deadline(Duration::ZERO)
            .max_response_bytes(0)
            .retry_budget(10, f64::NAN)
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for needle in [
            "\"nope\"",
            "\"bad type\"",
            "connect_timeout",
            "connect_attempts",
            "deadline",
            "max_response_bytes",
            "retry_budget",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        let ok = ClientBuilder::default()
            .balancers(["127.0.0.1:1", "127.0.0.1:1", "lb.example:7000", "lb.example:7000"])
            .request_types(["a", "a", "b"])
            .validate();
        let (ok, names) = ok.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.balancers.len(), 1);
        assert_eq!(
            names,
            ["lb.example:7000"],
            "a name is kept for build() to resolve"
        );
        assert_eq!(ok.request_types, ["a", "b"]);
        assert_eq!(ok.deadline, DEFAULT_DEADLINE);
    }

    /// A balancer named by an unknown host fails `build()` with the name, before any connection.
    #[tokio::test]
    async fn an_unresolvable_balancer_is_named() {
        let err = ClientBuilder::default()
            .balancers(["no-such-host.invalid:7000"])
            .request_types(["a"])
            .build()
            .await
            .err();
        match err {
            Some(e @ Error::Resolve { .. }) => assert!(e.to_string().contains("no-such-host.invalid"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
