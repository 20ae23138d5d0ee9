//! A name's addresses, as `--url` or a `--targets` entry resolved, tried in turn until one connects: every
//! address is kept, not just the first, since `localhost` resolves to `::1` first on Debian while the
//! monitor and the apps listen on 127.0.0.1, so the first alone was refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The addresses, in the resolver's order, and the one that last took a connection.
#[derive(Debug)]
pub struct Addrs {
    list: Vec<SocketAddr>,
    /// Where the next connection starts, so an address that refuses (or drops SYNs) costs one attempt, not
    /// one per request (which would also show in the latencies `xcluster load` measures).
    good: AtomicUsize,
}

/// Why no address took a connection: the last attempt's error, and the address it was made to.
#[derive(Debug)]
pub struct ConnectFailure {
    pub error: std::io::Error,
    pub addr: SocketAddr,
}

impl Addrs {
    /// `list` must not be empty (the callers refuse a name without an address).
    pub fn new(list: Vec<SocketAddr>) -> Addrs {
        Addrs {
            list,
            good: AtomicUsize::new(0),
        }
    }

    /// The attempts, in order: from the last good address, each once. With `started` and `timeout`, each
    /// may take an equal share of what is left, so one that drops SYNs leaves time for the next (a single
    /// address has the whole `timeout`); `None` once the time is spent.
    fn attempt(
        &self,
        i: usize,
        started: Instant,
        timeout: Duration,
    ) -> Option<(usize, SocketAddr, Duration)> {
        let n = self.list.len();
        if i >= n || (i > 0 && started.elapsed() >= timeout) {
            return None;
        }
        let at = (self.good.load(Ordering::Relaxed) + i) % n;
        let left = timeout.saturating_sub(started.elapsed());
        // `n - i` attempts remain, this one included; a zero timeout is refused by `connect_timeout`.
        let share = (left / u32::try_from(n - i).unwrap_or(u32::MAX)).max(Duration::from_millis(1));
        Some((at, self.list[at], share))
    }

    fn connected(&self, at: usize) {
        self.good.store(at, Ordering::Relaxed);
    }

    fn failure(&self) -> ConnectFailure {
        ConnectFailure {
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no address to connect to"),
            addr: self.list[self.good.load(Ordering::Relaxed) % self.list.len().max(1)],
        }
    }

    /// Connects (blocking) to the first address that accepts, within `timeout` overall.
    pub fn connect_blocking(
        &self,
        timeout: Duration,
    ) -> Result<(std::net::TcpStream, SocketAddr), ConnectFailure> {
        let started = Instant::now();
        let mut failed = self.failure();
        for i in 0.. {
            let Some((at, addr, share)) = self.attempt(i, started, timeout) else {
                break;
            };
            match std::net::TcpStream::connect_timeout(&addr, share) {
                Ok(s) => {
                    self.connected(at);
                    return Ok((s, addr));
                }
                Err(error) => failed = ConnectFailure { error, addr },
            }
        }
        Err(failed)
    }

    /// Connects to the first address that accepts, within `timeout` overall.
    pub async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<(tokio::net::TcpStream, SocketAddr), ConnectFailure> {
        let started = Instant::now();
        let mut failed = self.failure();
        for i in 0.. {
            let Some((at, addr, share)) = self.attempt(i, started, timeout) else {
                break;
            };
            match tokio::time::timeout(share, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    self.connected(at);
                    return Ok((s, addr));
                }
                Ok(Err(error)) => failed = ConnectFailure { error, addr },
                Err(_) => {
                    let error = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                    failed = ConnectFailure { error, addr };
                }
            }
        }
        Err(failed)
    }
}
