//! Listening sockets for the proxy (built with `socket2`; a tokio worker converts its own, an io_uring worker
//! accepts on it directly) and the tokio accept loop: a connection permit is taken before `accept`, accept
//! errors back off and never end the loop, each connection runs as its own task on the worker's runtime, and
//! a closing listener serves the clients in its accept queue first ([`Closing`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, warn};

use xcluster_runtime::net::{Closing, next_look};

use super::config::ListenerConfig;
use super::limit::Permit;
use super::service::{Admit, LiveListener, Shared};

/// How a listener closes: when it gives up on the clients still queued, and whether another process takes
/// them over ([`super::handover`]).
#[derive(Debug, Clone, Copy)]
pub struct Close {
    pub give_up: Instant,
    pub hand_over: bool,
}

impl Close {
    pub fn begin(self, listener: BorrowedFd<'_>, name: &str) -> Closing {
        if self.hand_over {
            Closing::hand_over(name, self.give_up)
        } else {
            Closing::begin(listener, name, self.give_up)
        }
    }
}

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

// Out of a resource (wait before accepting again), or of local ports toward a backend: the proxy sends the
// first FIN toward a backend when its client closes first, so it holds those sockets' TIME_WAIT. Neither is
// the backend's failure (HAProxy takes them as local errors too): another backend is tried, none held out.
pub(super) use xcluster_proto::local_error::{is_resource_exhaustion, out_of_local_ports};

/// Accepts until closed: `close` turns to `Some` when the listener is removed or the proxy drains,
/// and the loop then ends as [`Closing`] says, which closes the socket. Must run on the worker runtime that
/// will own the connections.
pub async fn accept_loop(
    std_listener: std::net::TcpListener,
    state: LiveListener,
    shared: Arc<Shared>,
    mut close: watch::Receiver<Option<Close>>,
) {
    // SAFETY: the `AsyncFd` owns the listener, whose descriptor stays open and the same until it is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(std_listener, Interest::READABLE) };
    let listener = match registered {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %state.load().cfg.name, error = %e, "cannot register the listener");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    let mut closing: Option<Closing> = None;
    'accept: loop {
        if closing.is_none()
            && let Some(how) = *close.borrow_and_update()
        {
            let fd = listener.get_ref().as_fd();
            closing = Some(how.begin(fd, &state.load().cfg.name));
        }
        if let Some(c) = &mut closing
            && c.done(listener.get_ref().as_fd(), &state.load().cfg.name)
        {
            return;
        }
        // A client first, then a permit: a socket with nobody to accept holds none, so with
        // `max_connections` below the number of sockets (listeners times workers) none starves the others.
        let mut ready = tokio::select! {
            biased;
            gone = interrupted(&mut close, closing.is_some()) => if gone { return } else { continue },
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    warn!(listener = %state.load().cfg.name, error = %e, "cannot wait on the listener");
                    return;
                }
            },
        };
        // The listener's own place, then its turn at `max_connection_rate`: waiting for either holds no
        // proxy-wide permit from the others.
        let limit = state.load().limit.clone();
        let place = tokio::select! {
            biased;
            gone = interrupted(&mut close, closing.is_some()) => if gone { return } else { continue },
            p = limit.take() => p,
        };
        while let Err(wait) = state.load().rate.try_take() {
            state.load().metrics.rate_waits.increment(1);
            tokio::select! {
                biased;
                gone = interrupted(&mut close, closing.is_some()) => if gone { return } else { continue 'accept },
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let permit = tokio::select! {
            biased;
            gone = interrupted(&mut close, closing.is_some()) => if gone { return } else { continue },
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(all) => Permit { all, place },
                Err(_) => return,
            },
        };
        // Nothing queued after all clears the readiness, and the loop waits again.
        let Ok(accepted) = ready.try_io(|l| accept_nonblocking(l.get_ref())) else {
            continue;
        };
        // A connection the runtime's poller cannot take (epoll out of memory or of watches) fails as an accept
        // does, and is dropped as one: without the back-off, each client after it was accepted, dropped and
        // warned about at once, in a loop as fast as clients came.
        match accepted.map(|(stream, peer)| (tokio::net::TcpStream::from_std(stream), peer)) {
            Ok((Ok(stream), peer)) => {
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
            Ok((Err(e), _)) | Err(e)
                if is_resource_exhaustion(&e) || e.raw_os_error() == Some(libc::ENOSPC) =>
            {
                let state = state.load();
                state.metrics.accept_errors.increment(1);
                warn!(listener = %state.cfg.name, error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    gone = interrupted(&mut close, closing.is_some()) => if gone { return },
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Ok((Err(e), _)) | Err(e) => {
                // Per-connection errors (ECONNABORTED and the like): the next accept is fine.
                let state = state.load();
                state.metrics.accept_errors.increment(1);
                debug!(listener = %state.cfg.name, error = %e, "accept failed");
            }
        }
    }
}

/// `accept4` with the new socket non-blocking already, as tokio wants it (std's `accept` would need an
/// `fcntl` more).
fn accept_nonblocking(l: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let mut storage = SockAddrStorage::zeroed();
    let mut len = storage.size_of();
    // SAFETY: `storage` and `len` are live for the call and `len` is the size of `storage`.
    let fd = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            (&raw mut storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful accept returns a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    // SAFETY: the kernel wrote a socket address of `len` bytes into `storage`.
    let peer = unsafe { SockAddr::new(storage, len) }.as_socket();
    let peer = peer.ok_or_else(|| io::Error::other("the client has no IP address"))?;
    Ok((stream, peer))
}

/// What ends a wait of the accept loop ([`next_look`]): `true` when its manager is gone without closing it,
/// and the loop ends at once.
async fn interrupted(close: &mut watch::Receiver<Option<Close>>, closing: bool) -> bool {
    next_look(closing, close.changed())
        .await
        .is_some_and(|r| r.is_err())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn loopback() -> ListenerConfig {
        ListenerConfig::for_tests("127.0.0.1:0".parse().unwrap())
    }

    /// `conn::serve` relies on accepted sockets inheriting TCP_NODELAY and keepalive from the listener
    /// rather than setting them again (a syscall per connection).
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let l = bind(&loopback(), 16, Some(Duration::from_secs(30))).unwrap();
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
