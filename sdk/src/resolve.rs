//! Addresses as people write them: `ip:port`, or `host:port` resolved by the system resolver under a timeout,
//! since a resolver that never answers must not hang a client's `build()` (or a tool's start) for ever.
//! The one resolution of the SDK's balancers and of `xcluster load --targets`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Whether `s` has the shape of `ip:port` or `host:port` (a non-empty host and a port number), without
/// resolving it; the builder's validation reports every malformed address at once before any lookup.
pub(crate) fn well_formed(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok(),
        None => false,
    }
}

/// Resolves `addr` (`ip:port` or `host:port`) to its addresses, in the resolver's order, within `timeout`.
/// An `ip:port` is returned as is, without a lookup. Fails with [`Error::Resolve`] naming `addr` when it is
/// malformed, the name is unknown, or the resolver does not answer in time.
///
/// ```no_run
/// # async fn demo() -> Result<(), xcluster_sdk::Error> {
/// use std::time::Duration;
/// let addrs = xcluster_sdk::resolve("localhost:7000", Duration::from_secs(2)).await?;
/// println!("{addrs:?}");
/// # Ok(()) }
/// ```
pub async fn resolve(addr: &str, timeout: Duration) -> Result<Vec<SocketAddr>> {
    let fail = |reason: String| Error::Resolve {
        name: addr.to_string(),
        reason,
    };
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if !well_formed(addr) {
        let hint = xcluster_proto::bracket_hint(addr).unwrap_or_default();
        return Err(fail(format!("not an ip:port or host:port address{hint}")));
    }
    // getaddrinfo runs on a blocking thread that cannot be cancelled; the timeout stops the wait for it.
    let found = match tokio::time::timeout(timeout, tokio::net::lookup_host(addr)).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(fail(format!("no answer from the resolver within {timeout:?}"))),
    };
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in found {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(fail("the name has no address".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_told_apart_without_a_lookup() {
        for ok in ["127.0.0.1:80", "[::1]:80", "localhost:7000", "lb-1.example:1"] {
            assert!(well_formed(ok), "{ok}");
        }
        for bad in ["", "nope", ":80", "host:", "host:99999", "host:port", "::1:80"] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_and_bad_names_say_which() {
        let found = resolve("localhost:7000", Duration::from_secs(5)).await;
        let found = found.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            found.iter().all(|a| a.ip().is_loopback() && a.port() == 7000),
            "{found:?}"
        );
        // `.invalid` never resolves (RFC 6761); without a resolver the lookup fails or times out: an error
        // either way, naming the address.
        for bad in ["no-such-host.invalid:80", "nope"] {
            match resolve(bad, Duration::from_secs(5)).await {
                Err(e @ Error::Resolve { .. }) => assert!(e.to_string().contains(bad), "{e}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
