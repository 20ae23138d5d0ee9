//! The SDK's HTTP/1.1 client for the balancers' directory API: one `GET` per connection
//! (`Connection: close`), a connect timeout, a whole-exchange timeout (long for a watch, short otherwise),
//! and a hard bound on the bytes read. Hand-rolled over `TcpStream` because the directory API is tiny and a
//! bounded, dependency-light reader is easier to reason about than a pooled client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xcluster_proto::directory::{MAX_LIST_BYTES, Pick, ServerList};

/// Largest response head accepted from a balancer.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What a list request returned.
#[derive(Debug)]
pub(crate) enum Fetched {
    /// A valid list (maybe the same version as before, when a watch timed out on the server).
    List(ServerList),
    /// `304 Not Modified`: the watch timed out on the server with no change.
    Unchanged,
}

/// Fetches `GET /v1/servers?type=T[&watch=V&wait_ms=W]` from `addr`: `watch` is the version held and how
/// long the balancer may hold the poll. `on_connected` runs once the TCP connection is up (the caller uses it
/// to know the balancer is alive while a long poll waits).
pub(crate) async fn server_list(
    addr: SocketAddr,
    request_type: &str,
    watch: Option<(u64, Duration)>,
    connect_timeout: Duration,
    exchange_timeout: Duration,
    on_connected: impl FnOnce(),
) -> Result<Fetched, String> {
    let path = list_path(request_type, watch);
    let (status, body) = get(addr, &path, connect_timeout, exchange_timeout, on_connected).await?;
    list_from(status, &body)
}

/// The request target of a list fetch. `wait_ms` is capped at `u64::MAX`: the balancer parses it as a u64
/// and refuses more with a 400, so a `Duration::MAX` hold would fail every watch.
fn list_path(request_type: &str, watch: Option<(u64, Duration)>) -> String {
    match watch {
        Some((v, wait)) => format!(
            "/v1/servers?type={request_type}&watch={v}&wait_ms={}",
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
        ),
        None => format!("/v1/servers?type={request_type}"),
    }
}

fn list_from(status: u16, body: &[u8]) -> Result<Fetched, String> {
    match status {
        200 => ServerList::decode(body)
            .map(Fetched::List)
            .map_err(|e| e.to_string()),
        304 | 204 => Ok(Fetched::Unchanged),
        s => Err(format!(
            "status {s}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

/// Decodes a balancer's whole raw answer to `GET /v1/servers?type=T` as the watch loop does: the HTTP head,
/// the body framing, the list and its type. `Ok(None)` means unchanged. The entry point of the `sdk_lists`
/// fuzz target; nothing here may panic, whatever the bytes.
pub fn decode_list_response(raw: &[u8], request_type: &str) -> Result<Option<ServerList>, String> {
    let (status, body) = parse_response(raw)?;
    crate::directory::check_type(list_from(status, &body)?, request_type)
}

/// Decodes a raw answer to `GET /v1/pick?type=T` (head, framing, body).
pub fn decode_pick_response(raw: &[u8]) -> Result<Pick, String> {
    match parse_response(raw)? {
        (200, body) => Pick::decode(&body).map_err(|e| e.to_string()),
        (s, _) => Err(format!("status {s}")),
    }
}

/// One bounded `GET`. Returns the status and the decoded body.
pub(crate) async fn get(
    addr: SocketAddr,
    path: &str,
    connect_timeout: Duration,
    exchange_timeout: Duration,
    on_connected: impl FnOnce(),
) -> Result<(u16, Vec<u8>), String> {
    let mut stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err("connect timed out".into()),
    };
    on_connected();
    let _ = stream.set_nodelay(true);
    let exchange = async {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let limit = MAX_HEAD_BYTES + MAX_LIST_BYTES + 64 * 1024;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        let mut scan = HeadScan::default();
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > limit {
                return Err(format!("response larger than {limit} bytes"));
            }
            // Stop early once a Content-Length body is complete (some servers linger before closing).
            if let Some(done) = scan.advance(&buf)?
                && buf.len() >= done
            {
                break;
            }
        }
        Ok::<_, String>(buf)
    };
    let buf = match tokio::time::timeout(exchange_timeout, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(format!("no answer within {exchange_timeout:?}")),
    };
    parse_response(&buf)
}

/// How far a response being read has been looked through for the end of its head, and, once that is found,
/// its whole length when the head carries `Content-Length`. Each byte is looked at once: searching the whole
/// buffer after every read cost a balancer that trickles a head with no end (up to the 2 MiB read limit, a
/// few bytes a read) some 10^10 comparisons on the client's runtime, each watch round, per request type.
#[derive(Debug, Default)]
struct HeadScan {
    /// Bytes of the buffer searched already.
    searched: usize,
    /// Found: the total length, if the head said it.
    total: Option<Option<usize>>,
}

impl HeadScan {
    /// The response's total length once its head is complete and carries one; an error once the head
    /// passes `MAX_HEAD_BYTES` without ending (the parse would refuse it anyway).
    fn advance(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        if let Some(total) = self.total {
            return Ok(total);
        }
        // The terminator may straddle the last read: start 3 bytes back.
        let from = self.searched.saturating_sub(3);
        match find(&buf[from..], b"\r\n\r\n") {
            Some(at) => {
                let total = total_len(&buf[..from + at + 4]);
                self.total = Some(total);
                Ok(total)
            }
            None if buf.len() > MAX_HEAD_BYTES + 4 => Err("response head missing or too large".into()),
            None => {
                self.searched = buf.len();
                Ok(None)
            }
        }
    }
}

/// The total length of the response whose whole head (its blank line included) is `head`, when it carries
/// `Content-Length`.
fn total_len(head: &[u8]) -> Option<usize> {
    let head_end = head.len();
    let head = std::str::from_utf8(head).ok()?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })?;
    // A hostile Content-Length near usize::MAX must not overflow; such a body can never complete anyway.
    head_end.checked_add(len)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a complete HTTP/1.1 response (Content-Length, chunked, or read-to-close body).
pub(crate) fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = find(&buf[..buf.len().min(MAX_HEAD_BYTES + 4)], b"\r\n\r\n")
        .ok_or("response head missing or too large")?;
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "response head is not utf-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad content-length {v:?}"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let rest = &buf[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = content_length {
        if rest.len() < len {
            return Err(format!("body truncated: {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

/// Decodes a chunked body (trailers ignored).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("chunk size line missing")?;
        let size_str = std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size not utf-8")?;
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| format!("bad chunk size {size_str:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        // `size` comes from the peer: compare without adding to it, so a huge size cannot overflow.
        if rest.len() < 2 || rest.len() - 2 < size {
            return Err("chunk truncated".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_watch_hold_asks_for_at_most_u64_max_ms() {
        assert_eq!(
            list_path("a", Some((3, Duration::MAX))),
            format!("/v1/servers?type=a&watch=3&wait_ms={}", u64::MAX)
        );
        assert_eq!(
            list_path("a", Some((3, Duration::ZERO))),
            "/v1/servers?type=a&watch=3&wait_ms=1"
        );
    }

    #[test]
    fn parses_length_chunked_and_close_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX");
        assert_eq!(r, Ok((200, b"hi".to_vec())));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3\r\n!!!\r\n0\r\n\r\n",
        );
        assert_eq!(r, Ok((200, b"hi!!!".to_vec())));
        let r = parse_response(b"HTTP/1.0 304 Not Modified\r\n\r\n");
        assert_eq!(r, Ok((304, vec![])));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").is_err());
        assert!(parse_response(b"SSH-2.0 hello\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(&vec![b'a'; 100_000]).is_err());
    }

    /// The head's end is found across reads of any size, the total taken from it once; a head that passes
    /// its bound without ending is refused there, not read on to the 2 MiB limit.
    #[test]
    fn a_head_is_scanned_across_reads_and_bounded() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for step in [1, 2, 3, 7, resp.len()] {
            let mut scan = HeadScan::default();
            let mut buf = Vec::new();
            let mut total = None;
            for piece in resp.chunks(step) {
                buf.extend_from_slice(piece);
                total = scan.advance(&buf).unwrap();
            }
            assert_eq!(total, Some(resp.len()), "in pieces of {step}");
        }
        let mut scan = HeadScan::default();
        let no_length = b"HTTP/1.1 200 OK\r\n\r\nbody";
        assert_eq!(scan.advance(no_length), Ok(None));
        let mut scan = HeadScan::default();
        let mut endless = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        while endless.len() <= MAX_HEAD_BYTES + 4 {
            assert_eq!(scan.advance(&endless), Ok(None));
            endless.extend_from_slice(&[b'a'; 100]);
        }
        assert!(scan.advance(&endless).is_err());
    }

    /// A balancer's chunk size near `usize::MAX` wrapped `size + 2`, and the slice after it panicked (in
    /// release builds too); a huge Content-Length wrapped the completion check. The `sdk_lists` fuzz target
    /// feeds exactly such heads.
    #[test]
    fn huge_lengths_do_not_overflow() {
        let huge = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\nhi", usize::MAX);
        assert_eq!(HeadScan::default().advance(huge.as_bytes()), Ok(None));
        assert!(parse_response(huge.as_bytes()).is_err());
        let chunk = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\nhi\r\n0\r\n\r\n",
            usize::MAX
        );
        assert!(parse_response(chunk.as_bytes()).is_err());
        assert!(decode_list_response(chunk.as_bytes(), "t").is_err());
        let ok = b"HTTP/1.1 304 Not Modified\r\n\r\n";
        assert_eq!(decode_list_response(ok, "t"), Ok(None));
    }
}
