//! A minimal asynchronous Redis client (RESP2 over TCP) for the shared gate: commands are arrays of bulk
//! strings; replies are parsed with every length bounded, and every operation runs under a timeout. Only what
//! the gate needs (`EVAL`, `PING`): a full client crate would bring a second connection manager and retry
//! policy we would have to switch off anyway, since a slow Redis must cost a request nothing.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// Largest reply accepted: bytes on the wire, and items of its arrays at every depth.
const MAX_BULK: usize = 1 << 20;
const MAX_ARRAY: usize = 4096;
/// Deepest nesting of arrays accepted (the gate's scripts return one level).
const MAX_DEPTH: usize = 4;
/// Idle time before the kernel probes a connection: a NAT or firewall forgets a connection it has seen
/// nothing on for some minutes (AWS's NAT gateway after 350 s), and one that sat in the pool longer was
/// reset at its next command, which the gate cannot tell from Redis failing after it ran it.
const KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("redis i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis timed out")]
    Timeout,
    #[error("redis error reply: {0}")]
    Server(String),
    #[error("redis protocol: {0}")]
    Protocol(String),
    /// The connection was closed once the command was sent, before any byte of its reply: the server, or a
    /// proxy between, may have run it. (One closed while it sat idle is seen before a command is sent on
    /// it: [`Conn::closed_by_peer`].)
    #[error("redis closed the connection before replying")]
    Closed,
    /// Writing the command failed (the connection was reset or closed): it did not reach the server whole,
    /// so it did not run.
    #[error("redis connection failed before the command was sent: {0}")]
    Unsent(std::io::Error),
}

impl RespError {
    /// Whether the command certainly did not run, so it may be sent again on another connection. An error
    /// once it was written may come after the server ran it (a reset before or during its reply): a script
    /// sent again would apply twice.
    pub fn not_run(&self) -> bool {
        match self {
            RespError::Unsent(_) => true,
            // Refusals Redis makes before it runs anything: loading its data, busy with another script, out
            // of memory, a replica, no quorum, not authenticated or not allowed.
            RespError::Server(m) => NOT_RUN_REPLIES.contains(&m.split(' ').next().unwrap_or_default()),
            _ => false,
        }
    }
}

/// The error replies of a command Redis refused before running it ([`RespError::not_run`]).
const NOT_RUN_REPLIES: [&str; 7] = [
    "LOADING",
    "BUSY",
    "OOM",
    "READONLY",
    "MASTERDOWN",
    "NOAUTH",
    "NOPERM",
];

/// A reply value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Text(String),
    Array(Vec<Value>),
}

/// What one line of a reply starts: a whole value, or an array of this many items to come.
enum Head {
    Value(Value),
    Array(usize),
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    io: BufStream<TcpStream>,
    /// When its last reply came (or it connected).
    used: Instant,
}

impl Conn {
    /// Connects to `host:port` within `timeout`, authenticating when `password` is given.
    pub async fn connect(addr: &str, password: Option<&str>, timeout: Duration) -> Result<Conn, RespError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RespError::Timeout)??;
        tcp.set_nodelay(true)?;
        let probes = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE)
            .with_interval(KEEPALIVE / 6);
        socket2::SockRef::from(&tcp).set_tcp_keepalive(&probes)?;
        let mut c = Conn {
            io: BufStream::new(tcp),
            used: Instant::now(),
        };
        if let Some(p) = password {
            c.call(&["AUTH", p], timeout).await?;
        }
        Ok(c)
    }

    /// Sends one command and reads its reply, all within `timeout`.
    pub async fn call(&mut self, args: &[&str], timeout: Duration) -> Result<Value, RespError> {
        let reply = tokio::time::timeout(timeout, self.call_inner(args))
            .await
            .map_err(|_| RespError::Timeout)??;
        self.used = Instant::now();
        Ok(reply)
    }

    /// How long since its last reply.
    pub fn idle_for(&self) -> Duration {
        self.used.elapsed()
    }

    /// Whether the server closed or reset the connection while it sat idle, or sent what no command asked
    /// for: a command sent on it would go nowhere, or be answered out of step. Told before the command is
    /// sent (the socket is non-blocking, so the peek never waits), a close is no doubt about the command:
    /// seen only after it was sent, it could have come from a proxy that ran it.
    pub fn closed_by_peer(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        match socket2::SockRef::from(self.io.get_ref()).peek(&mut byte) {
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            // The end of the stream, or a byte out of step.
            Ok(_) => true,
        }
    }

    async fn call_inner(&mut self, args: &[&str]) -> Result<Value, RespError> {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        let sent = async {
            self.io.write_all(&buf).await?;
            self.io.flush().await
        };
        sent.await.map_err(RespError::Unsent)?;
        // A reply's first byte, or the sign that the connection was closed before it.
        if self.io.fill_buf().await?.is_empty() {
            return Err(RespError::Closed);
        }
        self.read_reply().await
    }

    /// Reads one whole reply, arrays nested up to `MAX_DEPTH` deep with every item read, so the next reply
    /// starts where this one ended. (Reading only the first level left a nested array's items in the
    /// stream, to be taken for the next call's reply.)
    async fn read_reply(&mut self) -> Result<Value, RespError> {
        // Each open array: the items read so far and how many it has.
        let mut open: Vec<(Vec<Value>, usize)> = Vec::new();
        let (mut bytes_left, mut values_left) = (MAX_BULK, MAX_ARRAY);
        loop {
            if !open.is_empty() {
                values_left = values_left
                    .checked_sub(1)
                    .ok_or_else(|| RespError::Protocol(format!("reply of over {MAX_ARRAY} items")))?;
            }
            let mut v = match self.read_value(&mut bytes_left).await? {
                Head::Array(0) => Value::Array(Vec::new()),
                Head::Array(n) => {
                    if open.len() == MAX_DEPTH {
                        return Err(RespError::Protocol(format!(
                            "arrays nested over {MAX_DEPTH} deep"
                        )));
                    }
                    open.push((Vec::with_capacity(n), n));
                    continue;
                }
                Head::Value(v) => v,
            };
            // Place the value; each array it completes becomes a value of the one around it.
            loop {
                let Some((items, n)) = open.last_mut() else {
                    return Ok(v);
                };
                items.push(v);
                if items.len() < *n {
                    break;
                }
                let (done, _) = open.pop().unwrap_or_default();
                v = Value::Array(done);
            }
        }
    }

    /// One line, its bytes taken from the reply's `bytes_left`.
    async fn line(&mut self, bytes_left: &mut usize) -> Result<String, RespError> {
        let mut line = Vec::new();
        let n = (&mut self.io)
            .take(*bytes_left as u64)
            .read_until(b'\n', &mut line)
            .await?;
        *bytes_left -= n;
        if !line.ends_with(b"\r\n") {
            return Err(RespError::Protocol(if line.ends_with(b"\n") {
                "a line not ended by CRLF".into()
            } else if *bytes_left == 0 {
                format!("reply of over {MAX_BULK} bytes")
            } else {
                "connection closed mid-reply".into()
            }));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| RespError::Protocol("reply is not UTF-8".into()))
    }

    /// Reads one value, or the head of an array, whose items `read_reply` reads.
    async fn read_value(&mut self, bytes_left: &mut usize) -> Result<Head, RespError> {
        let line = self.line(bytes_left).await?;
        let (kind, rest) = (line.get(..1).unwrap_or(""), line.get(1..).unwrap_or(""));
        let int = || {
            rest.parse::<i64>()
                .map_err(|_| RespError::Protocol(format!("bad length {rest:?}")))
        };
        match kind {
            "+" => Ok(Head::Value(Value::Text(rest.to_string()))),
            "-" => Err(RespError::Server(rest.to_string())),
            ":" => Ok(Head::Value(Value::Int(int()?))),
            "$" => {
                let n = int()?;
                if n < 0 {
                    return Ok(Head::Value(Value::Nil));
                }
                let n = n as usize;
                if n.saturating_add(2) > *bytes_left {
                    return Err(RespError::Protocol(format!(
                        "bulk of {n} bytes: reply of over {MAX_BULK} bytes"
                    )));
                }
                *bytes_left -= n + 2;
                let mut data = vec![0u8; n + 2];
                self.io.read_exact(&mut data).await?;
                if !data.ends_with(b"\r\n") {
                    return Err(RespError::Protocol(format!(
                        "bulk of {n} bytes not followed by CRLF"
                    )));
                }
                data.truncate(n);
                String::from_utf8(data)
                    .map(|t| Head::Value(Value::Text(t)))
                    .map_err(|_| RespError::Protocol("bulk is not UTF-8".into()))
            }
            "*" => {
                let n = int()?;
                if n < 0 {
                    return Ok(Head::Value(Value::Nil));
                }
                if n as usize > MAX_ARRAY {
                    return Err(RespError::Protocol(format!("array of {n} items")));
                }
                Ok(Head::Array(n as usize))
            }
            _ => Err(RespError::Protocol(format!("unknown reply type {kind:?}"))),
        }
    }
}

/// Splits `redis://[:password@]host:port[/0]` into the address and the password. A URL naming what the gate
/// would not use is refused rather than half-used: a database other than 0 (the gate never `SELECT`s one, so
/// `/3` put its keys in database 0, beside whatever lives there) and a user other than `default` (`AUTH` with
/// the password alone logs in as `default`, so `redis://app:pw@...` was refused by Redis, or logged in as
/// another user than the one named).
pub fn parse_url(url: &str) -> Option<(String, Option<String>)> {
    let rest = url.strip_prefix("redis://")?;
    let (rest, db) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(db, "" | "0") {
        return None;
    }
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    if host.is_empty() || !host.contains(':') {
        return None;
    }
    let password = match auth.map(|a| a.split_once(':')) {
        None => None,
        Some(Some((user, password))) if user.is_empty() || user == "default" => Some(password),
        Some(Some(_)) => return None,
        // `redis://secret@host:port`: the form older clients took for a password alone.
        Some(None) => auth,
    };
    Some((
        host.to_string(),
        password.filter(|p| !p.is_empty()).map(String::from),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a server that answers with `replies`, written at once, then reads until the client
    /// is gone (so no unread request resets the connection under the replies).
    async fn scripted(replies: Vec<u8>) -> Conn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(&replies).await.expect("write");
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
        });
        Conn::connect(&addr, None, Duration::from_secs(5))
            .await
            .expect("connect")
    }

    async fn ping(c: &mut Conn) -> Result<Value, RespError> {
        c.call(&["PING"], Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn a_nested_array_is_read_whole_and_the_next_reply_is_the_next_calls() {
        let mut c = scripted(b"*3\r\n*2\r\n:1\r\n$1\r\na\r\n*0\r\n$-1\r\n+OK\r\n".to_vec()).await;
        let first = ping(&mut c).await.expect("nested");
        let inner = Value::Array(vec![Value::Int(1), Value::Text("a".into())]);
        assert_eq!(first, Value::Array(vec![inner, Value::Array(vec![]), Value::Nil]));
        assert_eq!(ping(&mut c).await.expect("next"), Value::Text("OK".into()));
    }

    #[tokio::test]
    async fn replies_past_the_bounds_are_refused() {
        let mut deep = b"*1\r\n".repeat(MAX_DEPTH + 1);
        deep.extend_from_slice(b":1\r\n");
        let mut items = format!("*2\r\n*{MAX_ARRAY}\r\n").into_bytes();
        items.extend_from_slice(&b":1\r\n".repeat(MAX_ARRAY + 1));
        let mut at_the_bound = format!("*{MAX_ARRAY}\r\n").into_bytes();
        at_the_bound.extend_from_slice(&b":1\r\n".repeat(MAX_ARRAY));
        let big = format!("*2\r\n${}\r\n", MAX_BULK - 2).into_bytes();
        let long_line = [b"+".as_slice(), &vec![b'x'; MAX_BULK], b"\r\n"].concat();
        let cases: [(&str, Vec<u8>, &str); 6] = [
            ("nested too deep", deep, "nested over"),
            ("too many items", items, "items"),
            ("a bulk over the reply's bytes", big, "bytes"),
            ("a line over the reply's bytes", long_line, "bytes"),
            ("a bulk without its CRLF", b"$2\r\nabXY".to_vec(), "CRLF"),
            ("a bare LF", b":1\n".to_vec(), "CRLF"),
        ];
        for (what, reply, says) in cases {
            let mut c = scripted(reply).await;
            match ping(&mut c).await {
                Err(RespError::Protocol(m)) => assert!(m.contains(says), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        let mut c = scripted(at_the_bound).await;
        match ping(&mut c).await {
            Ok(Value::Array(v)) => assert_eq!(v.len(), MAX_ARRAY),
            other => panic!("an array of {MAX_ARRAY} items: {other:?}"),
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6379"),
            Some(("127.0.0.1:6379".into(), None))
        );
        assert_eq!(
            parse_url("redis://:s3cret@10.0.0.1:6379/0"),
            Some(("10.0.0.1:6379".into(), Some("s3cret".into())))
        );
        assert_eq!(
            parse_url("redis://default:s3cret@10.0.0.1:6379"),
            Some(("10.0.0.1:6379".into(), Some("s3cret".into())))
        );
        // What the gate would not use is refused, not half-used: another user, another database.
        assert_eq!(parse_url("redis://app:s3cret@10.0.0.1:6379"), None);
        assert_eq!(parse_url("redis://10.0.0.1:6379/3"), None);
        assert_eq!(parse_url("http://x:1"), None);
        assert_eq!(parse_url("redis://nohost"), None);
    }
}
