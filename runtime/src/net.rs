//! Listening sockets built with `socket2` from an options struct and converted to tokio at the edge, and how
//! one closes without resetting the clients in its accept queue ([`Closing`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, info, warn};

/// How to build a listening socket.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub addr: SocketAddr,
    pub backlog: i32,
    /// Lets several processes or threads share one address (the kernel spreads connections).
    pub reuse_port: bool,
}

impl ListenOptions {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            backlog: 1024,
            reuse_port: false,
        }
    }
}

/// Binds a non-blocking std listener. The error does not name the address: the caller's does
/// (`admin::ListenError`), once.
pub fn bind_std(opts: &ListenOptions) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(opts.addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(opts.addr))?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

/// Binds a tokio listener (must be called inside a runtime).
pub fn bind(opts: &ListenOptions) -> io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(bind_std(opts)?)
}

/// How long a closing listener goes on accepting after it stops new handshakes: a client whose SYN-ACK left
/// before the filter went on completes its handshake one round trip later, and would be reset if the socket
/// closed first.
const CLOSE_SETTLE: Duration = Duration::from_millis(200);

/// How often a closing accept loop looks at its queue again while it waits for a client or a permit.
const CLOSE_POLL: Duration = Duration::from_millis(50);

/// A listener being closed (by the drain, or a proxy listener removed by a reload). Closing the socket at
/// once would reset every client in its accept queue: their handshakes are complete, so they may have sent a
/// request already. So a socket filter first drops new SYNs (their clients retry the SYN a second later and
/// find the port closed, or another socket of its SO_REUSEPORT group), the loop goes on accepting, with
/// permits as before, and the socket closes once its queue is empty after [`CLOSE_SETTLE`], or at `give_up`
/// (the grace period), whichever comes first. The accept loop asks [`Closing::done`] before each wait, and
/// waits through [`next_look`].
#[derive(Debug)]
pub struct Closing {
    settle_at: Instant,
    give_up: Instant,
    /// Whether the clients it still waits for have been logged.
    told: bool,
    /// Closes at once: the kernel hands its clients to another socket ([`Closing::hand_over`]).
    at_once: bool,
}

impl Closing {
    pub fn begin(listener: BorrowedFd<'_>, name: &str, give_up: Instant) -> Self {
        match refuse_handshakes(listener) {
            Ok(()) => debug!(listener = %name, "closing listener: refusing new handshakes"),
            // Without the filter the queue still empties; new clients may join it until the socket closes.
            Err(e) => warn!(listener = %name, error = %e, "cannot stop new handshakes on a closing listener"),
        }
        let settle_at = Instant::now() + CLOSE_SETTLE;
        Self {
            settle_at: settle_at.min(give_up),
            give_up,
            told: false,
            at_once: false,
        }
    }

    /// A listener another socket of its SO_REUSEPORT group outlives, with `net.ipv4.tcp_migrate_req` on:
    /// closing it moves its handshakes in flight and its accept queue to that socket, so it closes at once
    /// and no client waits for a SYN retry.
    pub fn hand_over(name: &str, give_up: Instant) -> Self {
        debug!(listener = %name, "closing listener: the kernel hands its clients to another process");
        Self {
            settle_at: Instant::now(),
            give_up,
            told: false,
            at_once: true,
        }
    }

    /// When it gives up on clients still queued (and on its connections, where the grace period covers both).
    pub fn give_up(&self) -> Instant {
        self.give_up
    }

    /// Whether the socket may close now: nothing left to accept after the settle time, or out of time.
    pub fn done(&mut self, listener: BorrowedFd<'_>, name: &str) -> bool {
        if self.at_once {
            return true;
        }
        let now = Instant::now();
        if now < self.settle_at {
            return false;
        }
        let queued = has_queued(listener);
        if now >= self.give_up {
            if queued {
                warn!(listener = %name, "closing listener: out of time, resetting the clients still queued");
            }
            return true;
        }
        if queued && !self.told {
            self.told = true;
            info!(listener = %name, "closing listener: accepting the clients queued on it first");
        }
        !queued
    }
}

/// Attaches a classic BPF filter that drops segments with SYN and without ACK. A TCP socket's filter sees the
/// segment from its TCP header on (byte 13 holds the flags), and a listener's filter also runs on the last
/// ACK of a handshake it has answered, which passes. A connection whose handshake completes from here on
/// inherits the filter, which drops none of its segments (after the handshake none carries SYN).
fn refuse_handshakes(listener: BorrowedFd<'_>) -> io::Result<()> {
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let prog = [
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 13),
        op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the listener's accept queue holds a client (a listener polls readable then).
fn has_queued(listener: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// A wait of an accept loop: until `signal` (the listener starts closing) while it is open, or once it is
/// `closing`, until its next look at its queue ([`CLOSE_POLL`], `None`).
pub async fn next_look<F: Future>(closing: bool, signal: F) -> Option<F::Output> {
    if closing {
        tokio::time::sleep(CLOSE_POLL).await;
        None
    } else {
        Some(signal.await)
    }
}

/// Whether `name` is a host name as configs give them: dot-separated labels of letters, digits, `-` and
/// `_`, none empty, 253 bytes at most, the last not a number (RFC 1123). A name whose last label is a
/// number, which is no IP address Rust reads (`192.168.001.010`, `10.1`), the system resolver reads as
/// IPv4 in inet_aton's rules, leading zeros as octal: 192.168.1.8 and 10.0.0.1, another host than meant.
pub fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
        })
        && !name.rsplit('.').next().is_some_and(is_number_label)
}

/// A label inet_aton reads as a number: decimal (octal with a leading 0), or hexadecimal after `0x`.
fn is_number_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
    hex || label.bytes().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::fd::AsFd;

    use super::*;

    /// Names whose last label is a number are refused: the resolver would read them as IPv4 addresses.
    #[test]
    fn a_name_that_the_resolver_reads_as_ipv4_is_not_a_host_name() {
        for ok in [
            "app1.internal",
            "localhost",
            "db-2",
            "a.b_c",
            "10.in-addr.arpa",
            "x.0xg",
        ] {
            assert!(is_host_name(ok), "{ok}");
        }
        for bad in [
            "192.168.001.010",
            "10.1",
            "10.0.0",
            "127.1",
            "0x7f.1",
            "app.0x1",
            "app.123",
            "",
            "a..b",
        ] {
            assert!(!is_host_name(bad), "{bad}");
        }
    }

    /// A closing listener's filter drops new SYNs (on loopback a handshake takes microseconds, so one that
    /// has not completed in 300 ms was refused) while the client already queued is accepted and works, and
    /// the queue reads as empty after it.
    #[test]
    fn a_closing_listener_refuses_new_handshakes_but_keeps_its_queue() {
        use std::io::{Read, Write};
        let l = bind_std(&ListenOptions::new("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = l.local_addr().unwrap();
        let mut queued = std::net::TcpStream::connect(addr).unwrap();
        assert!(has_queued(l.as_fd()));
        refuse_handshakes(l.as_fd()).unwrap();
        let late = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            matches!(&late, Err(e) if e.kind() == io::ErrorKind::TimedOut),
            "{late:?}"
        );
        let (mut a, _) = l.accept().unwrap();
        assert!(!has_queued(l.as_fd()));
        queued.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }
}
