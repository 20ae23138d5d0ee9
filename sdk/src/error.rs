//! The SDK's one error type. Every variant says which side failed ([`Side`]) and whether trying again
//! (usually on another instance or balancer) can help ([`Error::is_retryable`]), so callers can `match`
//! instead of parsing messages.

use std::net::SocketAddr;
use std::time::Duration;

/// Which side of a request failed.
///
/// ```
/// use xcluster_sdk::{Error, Side};
/// let e = Error::UnknownType("nope".into());
/// assert_eq!(e.side(), Side::Client);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The caller: bad configuration or an unknown request type. Retrying does not help.
    Client,
    /// The balancers: unreachable, or answering with invalid lists.
    Balancer,
    /// The chosen backend instance: refused, timed out, or broke the HTTP exchange.
    Backend,
}

/// Everything the SDK can fail with.
///
/// ```
/// use xcluster_sdk::{Error, Side};
/// let e = Error::ConnectTimeout { addr: "127.0.0.1:1".parse().unwrap() };
/// assert!(e.is_retryable());
/// assert_eq!(e.side(), Side::Backend);
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The builder was given an invalid option.
    #[error("invalid sdk configuration: {0}")]
    Config(String),
    /// The request type was not named in [`crate::ClientBuilder::request_types`].
    #[error("unknown request type {0:?}: not one of the builder's request_types")]
    UnknownType(String),
    /// No balancer answered with a valid list for this request type during `build()`.
    #[error("bootstrap failed for request type {request_type:?}: no balancer answered ({last})")]
    Bootstrap {
        /// The request type that could not be fetched.
        request_type: String,
        /// What each balancer tried said, `; `-separated.
        last: String,
    },
    /// Every balancer answered during `build()` that it does not know this request type: it is not one of
    /// their `[types]` (a misspelt type, or balancers set up for other ones).
    #[error("no balancer serves request type {request_type:?}: it is not one of their [types] ({said})")]
    NotServed {
        /// The request type.
        request_type: String,
        /// What each balancer said, `; `-separated.
        said: String,
    },
    /// One balancer failed (unreachable, bad status, or an invalid list).
    #[error("balancer {addr}: {msg}")]
    Balancer {
        /// The balancer's API address.
        addr: SocketAddr,
        /// What went wrong.
        msg: String,
    },
    /// Every balancer has been unreachable for longer than `max_staleness`: the last list is too old to use.
    #[error("server list for {request_type:?} is {age:?} old, above max_staleness")]
    Stale {
        /// The request type.
        request_type: String,
        /// Time since a balancer last confirmed the list.
        age: Duration,
    },
    /// The list has no instance that may be picked (all down, drained, weight 0, or already tried).
    #[error("no usable instance for request type {0:?}")]
    NoInstance(String),
    /// Connecting to an instance failed (refused, unreachable).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The instance's address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// Connecting to an instance took longer than `connect_timeout`.
    #[error("connect to {addr} timed out")]
    ConnectTimeout {
        /// The instance's address.
        addr: SocketAddr,
    },
    /// The instance did not answer within `request_timeout`.
    #[error("request to {addr} timed out")]
    Timeout {
        /// The instance's address.
        addr: SocketAddr,
    },
    /// The HTTP exchange with an instance failed (connection reset, malformed response).
    #[error("http exchange with {addr} failed: {msg}")]
    Http {
        /// The instance's address.
        addr: SocketAddr,
        /// What went wrong.
        msg: String,
    },
    /// The instance's response body was larger than `max_response_bytes`.
    #[error("response from {addr} larger than {limit} bytes")]
    ResponseTooLarge {
        /// The instance's address.
        addr: SocketAddr,
        /// The configured limit.
        limit: usize,
    },
    /// The call's deadline ([`crate::ClientBuilder::deadline`] or [`crate::Client::with_deadline`]) passed:
    /// no further attempt was started, and the one in flight, if any, was cut off.
    #[error("deadline of {deadline:?} exceeded after {attempts} attempts{}", last_said(.last))]
    DeadlineExceeded {
        /// The whole call's budget.
        deadline: Duration,
        /// Instances tried (connects started), the cut-off one included.
        attempts: u32,
        /// The last failed attempt before the deadline, if one failed rather than being cut off.
        last: Option<Box<Error>>,
    },
    /// A balancer's `host:port` did not resolve at `build()` (unknown name, or no answer within
    /// `balancer_timeout`).
    #[error("cannot resolve balancer address {name:?}: {reason}")]
    Resolve {
        /// The address as given.
        name: String,
        /// What the resolver said.
        reason: String,
    },
    /// Every attempt allowed by the retry budget failed; `last` is the final failure.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Box<Error>,
    },
}

impl Error {
    /// Whether trying again (on another instance or balancer, or a little later) can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::UnknownType(_)
            | Error::NotServed { .. }
            | Error::ResponseTooLarge { .. }
            | Error::Resolve { .. } => false,
            // The caller's budget is spent: another attempt would start past it.
            Error::DeadlineExceeded { .. } => false,
            Error::Stale { .. } => false,
            Error::Exhausted { .. } => false,
            Error::Bootstrap { .. }
            | Error::Balancer { .. }
            | Error::NoInstance(_)
            | Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Timeout { .. }
            | Error::Http { .. } => true,
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            Error::Config(_) | Error::UnknownType(_) | Error::NotServed { .. } | Error::Resolve { .. } => {
                Side::Client
            }
            Error::Bootstrap { .. } | Error::Balancer { .. } | Error::Stale { .. } => Side::Balancer,
            Error::NoInstance(_)
            | Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Timeout { .. }
            | Error::Http { .. }
            | Error::ResponseTooLarge { .. } => Side::Backend,
            Error::Exhausted { last, .. } => last.side(),
            // Cut off while connecting to or waiting for an instance: that instance was too slow.
            Error::DeadlineExceeded { last, .. } => last.as_ref().map_or(Side::Backend, |l| l.side()),
        }
    }

    /// Whether the request certainly never reached the instance (so even a non-idempotent request may be
    /// retried elsewhere).
    pub fn not_sent(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectTimeout { .. } | Error::NoInstance(_) => true,
            // Every connect of a call failed.
            Error::Exhausted { last, .. } => last.not_sent(),
            _ => false,
        }
    }

    /// The instance the error came from: the one that failed, or, for a call that gave up or ran out of
    /// time, the last one that failed before; `None` when no instance was reached or none failed.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Error::Connect { addr, .. }
            | Error::ConnectTimeout { addr }
            | Error::Timeout { addr }
            | Error::Http { addr, .. }
            | Error::ResponseTooLarge { addr, .. } => Some(*addr),
            Error::Exhausted { last, .. } => last.addr(),
            Error::DeadlineExceeded { last, .. } => last.as_ref().and_then(|l| l.addr()),
            Error::Config(_)
            | Error::UnknownType(_)
            | Error::Bootstrap { .. }
            | Error::NotServed { .. }
            | Error::Balancer { .. }
            | Error::Stale { .. }
            | Error::NoInstance(_)
            | Error::Resolve { .. } => None,
        }
    }

    /// A short, stable name for the error kind (for metrics and the load generator's report).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::UnknownType(_) => "unknown_type",
            Error::Bootstrap { .. } => "bootstrap",
            Error::NotServed { .. } => "not_served",
            Error::Balancer { .. } => "balancer",
            Error::Stale { .. } => "stale",
            Error::NoInstance(_) => "no_instance",
            Error::Connect { .. } => "connect",
            Error::ConnectTimeout { .. } => "connect_timeout",
            Error::Timeout { .. } => "timeout",
            Error::Http { .. } => "http",
            Error::ResponseTooLarge { .. } => "too_large",
            Error::Exhausted { last, .. } => last.kind(),
            // Not the last attempt's kind: what ended the call is the deadline, whatever came before.
            Error::DeadlineExceeded { .. } => "deadline",
            Error::Resolve { .. } => "resolve",
        }
    }
}

/// `: <the last error>` when there is one, for [`Error::DeadlineExceeded`]'s message.
fn last_said(last: &Option<Box<Error>>) -> String {
    last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default()
}

/// The SDK's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausted_reports_the_last_side_and_kind() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
        let e = Error::Exhausted {
            attempts: 3,
            last: Box::new(Error::ConnectTimeout { addr }),
        };
        assert_eq!(e.side(), Side::Backend);
        assert_eq!(e.kind(), "connect_timeout");
        assert!(!e.is_retryable());
        assert!(
            Error::Connect {
                addr,
                source: std::io::ErrorKind::ConnectionRefused.into()
            }
            .not_sent()
        );
    }

    #[test]
    fn an_error_names_the_instance_it_failed_on() {
        let addr: SocketAddr = "127.0.0.1:7101".parse().unwrap();
        let timeout = Error::Timeout { addr };
        assert_eq!(timeout.addr(), Some(addr));
        let gave_up = Error::Exhausted {
            attempts: 3,
            last: Box::new(Error::ConnectTimeout { addr }),
        };
        assert_eq!(gave_up.addr(), Some(addr));
        let cut = |last: Option<Error>| Error::DeadlineExceeded {
            deadline: Duration::from_secs(1),
            attempts: 1,
            last: last.map(Box::new),
        };
        assert_eq!(cut(Some(timeout)).addr(), Some(addr));
        assert_eq!(cut(None).addr(), None);
        assert_eq!(Error::NoInstance("browse".into()).addr(), None);
    }

    #[test]
    fn a_deadline_is_its_own_kind_and_not_retryable() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
        let cut = Error::DeadlineExceeded {
            deadline: Duration::from_millis(300),
            attempts: 1,
            last: None,
        };
        assert_eq!((cut.kind(), cut.side()), ("deadline", Side::Backend));
        assert!(!cut.is_retryable() && !cut.not_sent());
        assert!(cut.to_string().contains("300ms"), "{cut}");
        let after = Error::DeadlineExceeded {
            deadline: Duration::from_millis(300),
            attempts: 2,
            last: Some(Box::new(Error::Timeout { addr })),
        };
        assert_eq!(after.kind(), "deadline");
        assert!(
            after.to_string().contains("request to 127.0.0.1:9 timed out"),
            "{after}"
        );
    }
}
