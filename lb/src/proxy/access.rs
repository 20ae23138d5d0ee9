//! The connection log, HAProxy's `option tcplog`: on a listener with `log_connections = true`, each
//! connection leaves one line at `info` when it ends, with target `access` (so `level = "info,access=off"`
//! silences it, and the JSON format gives every field as a key): the client, the backend, how long the connect
//! took and how many backends it tried, the TLS server name on listeners with `sni`, the bytes each way, the duration and how it ended.
//!
//! The record lives in the connection's `conn::Active`, which writes the line when it drops, so every way a
//! connection can end is covered, the end of the drain grace period included (`shutdown`). Listeners without
//! it hold `None`: a word per connection.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::info;

/// How a connection ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions reached their end of stream and were passed on.
    Closed,
    /// No byte either way for `idle_timeout_ms`.
    Idle,
    /// Half-closed, and no byte either way for `fin_timeout_ms` (HAProxy's client-fin and server-fin).
    FinTimeout,
    /// Health checks put its backend down, which has `close_on_down`.
    BackendDown,
    /// A socket error (an OS error number) on the client's socket or the backend's; most often a reset by
    /// that side (HAProxy's `CD` and `SD`).
    Error(Side, i32),
    /// No backend could be tried: none configured or routed for its type, or every one held out or at
    /// weight 0 (the client is closed without a byte).
    NoBackend,
    /// Every connect it tried failed (refused or timed out; the client is closed without a byte): the
    /// line names the last backend tried, as HAProxy's `SC` does.
    ConnectFailed,
    /// Every backend stayed at its `max_connections` for `queue_timeout_ms` (HAProxy's `sQ`).
    QueueTimeout,
    /// The client left (reset, or closed without a byte) while it waited for a place (HAProxy's `CQ`).
    ClientLeft,
    /// The client held `max_connections_per_client` already: closed as soon as accepted.
    ClientLimit,
    /// The client opened `max_connection_rate_per_client` connections within the period: closed as soon as
    /// accepted.
    ClientRate,
    /// The listener's `allow`/`deny` keep the client out: closed as soon as accepted.
    Denied,
    /// The PROXY protocol header could not be sent to the backend.
    ProxyHeader,
    /// On a listener with `accept_proxy`: the client sent no valid PROXY header in time.
    ClientHeader,
    /// On a listener with `sni_only`: the client's TLS hello named no server of its `sni` (or it sent none
    /// in time).
    NoSniRoute,
    /// Still open when the proxy stopped (the end of the drain grace period).
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            Self::Idle => f.write_str("idle timeout"),
            Self::FinTimeout => f.write_str("fin timeout"),
            Self::BackendDown => f.write_str("backend down"),
            Self::Error(side, errno) => {
                write!(f, "{side} error: {}", io::Error::from_raw_os_error(*errno))
            }
            Self::NoBackend => f.write_str("no backend"),
            Self::ConnectFailed => f.write_str("connect failed"),
            Self::QueueTimeout => f.write_str("queue timeout"),
            Self::ClientLeft => f.write_str("client left while queued"),
            Self::ClientLimit => f.write_str("client limit"),
            Self::ClientRate => f.write_str("client rate"),
            Self::Denied => f.write_str("denied"),
            Self::ProxyHeader => f.write_str("PROXY header not sent"),
            Self::ClientHeader => f.write_str("no valid PROXY header from the client"),
            Self::NoSniRoute => f.write_str("no sni route"),
            Self::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// Which socket of a connection something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// The side direction `d` reads from: the client for 0 (up), the backend for 1 (down).
    pub fn source_of(d: usize) -> Self {
        if d == 0 { Self::Client } else { Self::Backend }
    }

    /// The side direction `d` writes to.
    pub fn destination_of(d: usize) -> Self {
        if d == 0 { Self::Backend } else { Self::Client }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Backend => "backend",
        })
    }
}

/// What the log line of one connection says, gathered while it lives.
#[derive(Debug)]
pub struct ConnLog {
    pub(super) client: SocketAddr,
    accepted: Instant,
    /// The backend it is connected to, or before that the last one it tried.
    backend: Option<SocketAddr>,
    /// From the accept to the backend's answer, retries included (the wait for a place too, taken off
    /// when it is written).
    connect: Option<Duration>,
    /// How long it waited for a place (`queue_timeout_ms`), if it did.
    queued: Option<Duration>,
    tries: u32,
    /// `[up, down]`: client to backend, backend to client.
    pub bytes: [u64; 2],
    end: Option<End>,
    /// The server name its TLS hello gave, on listeners with `sni`.
    pub(super) sni: Option<Box<str>>,
}

impl ConnLog {
    /// A record for a connection just accepted from `client`.
    pub fn new(client: SocketAddr) -> Box<Self> {
        Box::new(Self {
            client,
            accepted: Instant::now(),
            backend: None,
            connect: None,
            queued: None,
            tries: 0,
            bytes: [0; 2],
            end: None,
            sni: None,
        })
    }

    /// A connect to `addr` is tried.
    pub fn tried(&mut self, addr: SocketAddr) {
        self.tries += 1;
        self.backend = Some(addr);
    }

    /// `addr` answered.
    pub fn connected(&mut self, addr: SocketAddr) {
        self.backend = Some(addr);
        self.connect = Some(self.accepted.elapsed());
    }

    /// It waited `d` for a place in all (the last wait that ended counts, from when it began).
    pub fn waited(&mut self, d: Duration) {
        self.queued = Some(d);
    }

    /// Records how the connection ended; the first cause given is kept (a close that follows an error is
    /// not the reason).
    pub fn ended(&mut self, end: End) {
        // Out of backends after trying some: they failed, which "no backend" hid (a walk read it as a
        // type without backends, while three connects had been refused).
        let end = match end {
            End::NoBackend if self.tries > 0 => End::ConnectFailed,
            end => end,
        };
        self.end.get_or_insert(end);
    }

    /// Writes the line, for a connection on `listener`; with no end recorded, it was cut by the shutdown.
    pub fn write(&self, listener: &str) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let backend = self.backend.map_or_else(|| "-".to_string(), |a| a.to_string());
        info!(
            target: "access",
            listener = %listener,
            client = %self.client,
            sni = self.sni.as_deref(),
            backend = %backend,
            tries = self.tries,
            queue_ms = self.queued.map(ms),
            connect_ms = self.connect.map(|c| ms(c.saturating_sub(self.queued.unwrap_or_default()))),
            duration_ms = ms(self.accepted.elapsed()),
            bytes_up = self.bytes[0],
            bytes_down = self.bytes[1],
            end = %self.end.unwrap_or(End::Shutdown),
            "connection"
        );
    }
}

/// The errno of `e` for [`End::Error`]; 0 ("success") only for errors without one, which sockets do not
/// raise.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_reads_plainly() {
        let reset = End::Error(Side::Backend, libc::ECONNRESET);
        assert_eq!(
            reset.to_string(),
            "backend error: Connection reset by peer (os error 104)"
        );
        let gone = End::Error(Side::Client, libc::EPIPE);
        assert_eq!(gone.to_string(), "client error: Broken pipe (os error 32)");
        assert_eq!(End::NoBackend.to_string(), "no backend");
        assert_eq!(End::Closed.to_string(), "closed");
    }

    #[test]
    fn out_of_backends_after_a_try_reads_as_a_failed_connect_to_the_last_one() {
        let client: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let (a, b): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let mut none = ConnLog::new(client);
        none.ended(End::NoBackend);
        assert_eq!((none.end, none.backend), (Some(End::NoBackend), None));
        let mut failed = ConnLog::new(client);
        failed.tried(a);
        failed.tried(b);
        failed.ended(End::NoBackend);
        assert_eq!((failed.end, failed.backend), (Some(End::ConnectFailed), Some(b)));
        assert_eq!(End::ConnectFailed.to_string(), "connect failed");
    }
}
