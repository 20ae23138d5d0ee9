//! Which socket errors are the local host's, not the peer's: a connect or accept that fails for want of a
//! descriptor, memory or a local port says nothing of the instance or backend it was meant for. Counted as that
//! peer's failure, it held a healthy one out and moved its traffic to the others, which ran out in turn,
//! until every one was "down". The balancer's proxy and the SDK judge them alike.

use std::io;

/// Out of descriptors, buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the process or the system must
/// wait before the next accept or connect; another peer would fail alike.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connect that found no local port toward its peer (EADDRNOTAVAIL: the side that closes first keeps
/// each socket's TIME_WAIT, and with it the port toward that destination, for a minute). Ports run out per
/// destination, so another peer may still be reached.
pub fn out_of_local_ports(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_hosts_errors_are_told_from_the_peers() {
        let e = io::Error::from_raw_os_error;
        for local in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&e(local)), "{local}");
            assert!(!out_of_local_ports(&e(local)), "{local}");
        }
        assert!(out_of_local_ports(&e(libc::EADDRNOTAVAIL)));
        // A refusal, a reset, an unreachable or silent peer is the peer's, and holds it out.
        for peer in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
        ] {
            assert!(
                !is_resource_exhaustion(&e(peer)) && !out_of_local_ports(&e(peer)),
                "{peer}"
            );
        }
    }
}
