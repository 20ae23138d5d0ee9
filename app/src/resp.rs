//! A minimal asynchronous Redis client (RESP2 over TCP) for the shared gate: commands are arrays of bulk
//! strings; replies are parsed with every length bounded, and every operation runs under a timeout. Only what
//! the gate needs (`EVAL`, `PING`): a full client crate would bring a second connection manager and retry
//! policy we would have to switch off anyway, since a slow Redis must cost a request nothing.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// Largest bulk reply and array accepted.
const MAX_BULK: usize = 1 << 20;
const MAX_ARRAY: usize = 4096;

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
}

/// A reply value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Text(String),
    Array(Vec<Value>),
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    io: BufStream<TcpStream>,
}

impl Conn {
    /// Connects to `host:port` within `timeout`, authenticating when `password` is given.
    pub async fn connect(addr: &str, password: Option<&str>, timeout: Duration) -> Result<Conn, RespError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RespError::Timeout)??;
        tcp.set_nodelay(true)?;
        let mut c = Conn {
            io: BufStream::new(tcp),
        };
        if let Some(p) = password {
            c.call(&["AUTH", p], timeout).await?;
        }
        Ok(c)
    }

    /// Sends one command and reads its reply, all within `timeout`.
    pub async fn call(&mut self, args: &[&str], timeout: Duration) -> Result<Value, RespError> {
        tokio::time::timeout(timeout, self.call_inner(args))
            .await
            .map_err(|_| RespError::Timeout)?
    }

    async fn call_inner(&mut self, args: &[&str]) -> Result<Value, RespError> {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        self.io.write_all(&buf).await?;
        self.io.flush().await?;
        let v = self.read_value().await?;
        if let Value::Array(items) = v {
            // One level of nesting is all the gate's scripts return.
            let mut out = Vec::with_capacity(items.len());
            for _ in 0..items.len() {
                out.push(self.read_value().await?);
            }
            return Ok(Value::Array(out));
        }
        Ok(v)
    }

    async fn line(&mut self) -> Result<String, RespError> {
        let mut line = Vec::new();
        let n = (&mut self.io)
            .take(MAX_BULK as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 || !line.ends_with(b"\r\n") {
            return Err(RespError::Protocol("connection closed mid-reply".into()));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|_| RespError::Protocol("reply is not UTF-8".into()))
    }

    /// Reads one value; an array is returned with placeholder items for the caller to fill.
    async fn read_value(&mut self) -> Result<Value, RespError> {
        let line = self.line().await?;
        let (kind, rest) = (line.get(..1).unwrap_or(""), line.get(1..).unwrap_or(""));
        let int = || {
            rest.parse::<i64>()
                .map_err(|_| RespError::Protocol(format!("bad length {rest:?}")))
        };
        match kind {
            "+" => Ok(Value::Text(rest.to_string())),
            "-" => Err(RespError::Server(rest.to_string())),
            ":" => Ok(Value::Int(int()?)),
            "$" => {
                let n = int()?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                let n = n as usize;
                if n > MAX_BULK {
                    return Err(RespError::Protocol(format!("bulk of {n} bytes")));
                }
                let mut data = vec![0u8; n + 2];
                self.io.read_exact(&mut data).await?;
                data.truncate(n);
                String::from_utf8(data)
                    .map(Value::Text)
                    .map_err(|_| RespError::Protocol("bulk is not UTF-8".into()))
            }
            "*" => {
                let n = int()?;
                if n < 0 {
                    return Ok(Value::Nil);
                }
                if n as usize > MAX_ARRAY {
                    return Err(RespError::Protocol(format!("array of {n} items")));
                }
                Ok(Value::Array(vec![Value::Nil; n as usize]))
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
