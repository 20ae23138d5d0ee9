//! The monitor's HTTP API, from a blocking client: one request per connection, every step within
//! `--timeout-secs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{Client, EXIT_FAILED, Failure, MAX_RESPONSE, Resp, check, io_failure, stream};
use crate::addrs::Addrs;
use crate::args::CtlArgs;

impl Client {
    pub(super) fn new(args: &CtlArgs) -> Result<Self, String> {
        // `host:port` alone is taken as http (as curl does); another scheme is refused.
        let rest = match args.url.split_once("://") {
            None => args.url.as_str(),
            Some(("http", rest)) => rest,
            Some(_) => return Err(format!("--url must be http://HOST:PORT, found {:?}", args.url)),
        };
        let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
        // Every call goes to the monitor's own paths (`/v1/...`): a path given would be dropped.
        if !path.is_empty() {
            return Err(format!(
                "--url must be http://HOST:PORT, without a path: found {:?}",
                args.url
            ));
        }
        // Said plainly, where the resolver's own words ("invalid socket address", "failed to lookup address
        // information") named neither the port nor the user part.
        if hostport.contains('@') {
            return Err(format!(
                "--url must be http://HOST:PORT, without a user part: found {:?}",
                args.url
            ));
        }
        let has_port = hostport.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
        });
        if !has_port {
            return Err(format!(
                "--url must be http://HOST:PORT, with the port: found {:?}",
                args.url
            ));
        }
        let mut list: Vec<SocketAddr> = Vec::new();
        let found = hostport
            .to_socket_addrs()
            .map_err(|e| format!("bad --url {:?}: {e}", args.url))?;
        for a in found {
            if !list.contains(&a) {
                list.push(a);
            }
        }
        if list.is_empty() {
            return Err(format!("bad --url {:?}: the name has no address", args.url));
        }
        Ok(Self {
            addrs: Addrs::new(list),
            url: args.url.clone(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            timeout: Duration::from_secs(args.timeout_secs.max(1)),
        })
    }

    fn open(&self, method: &str, path: &str) -> Result<TcpStream, Failure> {
        let (mut s, addr) = self
            .addrs
            .connect_blocking(self.timeout)
            .map_err(|f| io_failure(f.error))?;
        s.set_read_timeout(Some(self.timeout)).map_err(io_failure)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io_failure)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        // Only where the monitor checks it: a read sends no token over plain HTTP, nor to whatever answers
        // a mistyped --url.
        if method == "POST" {
            if let Some(t) = &self.token {
                head.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).map_err(io_failure)?;
        Ok(s)
    }

    pub(super) fn call(&self, method: &str, path: &str) -> Result<Resp, Failure> {
        let s = self.open(method, path)?;
        // One byte past the bound tells an answer over it from one that fits: cut short, it would read as
        // no answer at all (`cluster` printed "no balancers configured").
        let mut r = BufReader::new(s.take(MAX_RESPONSE + 1));
        let (status, chunked) = read_head(&mut r)?;
        let mut body = Vec::new();
        let read = if chunked {
            loop {
                match read_chunk(&mut r) {
                    Ok(Some(chunk)) => body.extend(chunk),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        } else {
            r.read_to_end(&mut body).map(drop).map_err(io_failure)
        };
        // Checked before a read error: running out of the bound mid-chunk is one.
        if r.get_ref().limit() == 0 {
            eprintln!(
                "xcluster ctl: the monitor's answer to {method} {path} is larger than {} MiB",
                MAX_RESPONSE / (1024 * 1024)
            );
            return Err(Failure::Exit(EXIT_FAILED));
        }
        read?;
        let tokened = self.token.is_some();
        Ok(Resp {
            status,
            body,
            tokened,
        })
    }

    /// Copies a (possibly endless) response body to stdout as it arrives.
    pub(super) fn stream(&self, path: &str, follow: bool) -> Result<i32, Failure> {
        let s = self.open("GET", path)?;
        let mut r = BufReader::new(s);
        // The answer's head within `--timeout-secs`, following or not: a monitor that does not answer (stopped,
        // hung) is one, where `tail -f` used to wait on it for ever.
        let (status, chunked) = read_head(&mut r)?;
        if follow {
            // A quiet log is not a dead monitor: no read timeout on the body while following. Keepalive
            // probes end it (in about a minute) when the monitor's host is gone or cut off, which no read
            // would ever tell.
            let _ = r.get_ref().set_read_timeout(None);
            let probes = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            let _ = socket2::SockRef::from(r.get_ref()).set_tcp_keepalive(&probes);
        }
        if status != 200 {
            let mut body = Vec::new();
            let _ = (&mut r).take(MAX_RESPONSE).read_to_end(&mut body);
            if chunked {
                body = dechunk_all(&body);
            }
            let tokened = self.token.is_some();
            check(&Resp {
                status,
                body,
                tokened,
            })?;
        }
        if chunked {
            stream::copy_chunks(&mut r)
        } else {
            stream::copy_all(&mut r.take(MAX_RESPONSE))
        }
    }
}

/// The longest line of an answer's head or of a chunk's size read: a server that sends bytes without a
/// newline ends the read there instead of growing it without bound.
const MAX_LINE: u64 = 16 * 1024;

/// Reads one line of at most [`MAX_LINE`] bytes into `line`: its length, 0 at the end of the stream.
fn read_line(r: &mut impl BufRead, line: &mut String) -> Result<usize, Failure> {
    r.take(MAX_LINE).read_line(line).map_err(io_failure)
}

pub(super) fn read_head(r: &mut impl BufRead) -> Result<(u16, bool), Failure> {
    let mut line = String::new();
    read_line(r, &mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure::Unreachable(format!("not an HTTP answer: {:?}", line.trim())))?;
    let mut chunked = false;
    for _ in 0..100 {
        line.clear();
        if read_line(r, &mut line)? == 0 || line == "\r\n" {
            break;
        }
        let l = line.to_ascii_lowercase();
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

pub(super) fn read_chunk(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, Failure> {
    let mut line = String::new();
    if read_line(r, &mut line)? == 0 {
        // Closed without the last chunk: the monitor died, or its connection did. Taken as the end, a
        // `tail -f` of a monitor killed mid-follow exited 0, as after a normal end.
        return Err(Failure::Unreachable(
            "the monitor closed the stream before its end (did it stop?)".into(),
        ));
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| Failure::Unreachable("malformed chunked answer".into()))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; size.min(MAX_RESPONSE as usize)];
    r.read_exact(&mut buf).map_err(io_failure)?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).map_err(io_failure)?;
    Ok(Some(buf))
}

pub(super) fn dechunk_all(b: &[u8]) -> Vec<u8> {
    let mut r = BufReader::new(b);
    let mut out = Vec::new();
    while let Ok(Some(c)) = read_chunk(&mut r) {
        out.extend(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::TcpListener;

    use super::*;

    /// An address on which nothing listens: a port the OS just handed out, released.
    fn refusing() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    fn client(list: Vec<SocketAddr>) -> Client {
        Client {
            addrs: Addrs::new(list),
            url: "http://monitor:7300".into(),
            token: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// `--url http://localhost:7300` resolves to `::1` then 127.0.0.1 on Debian, where the monitor listens
    /// on 127.0.0.1 only: the monitor is reached on the next address when the first refuses.
    #[test]
    fn the_monitor_is_reached_on_its_next_address_when_the_first_refuses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let live = l.local_addr().unwrap();
        // Two calls: the second starts from the address that took the first.
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(&s);
                // Bounded: a request head of more than 100 lines is not one `call` sends.
                let mut line = String::new();
                for _ in 0..100 {
                    line.clear();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                }
                (&s).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
            }
        });
        let c = client(vec![refusing(), live]);
        for _ in 0..2 {
            let r = c.call("GET", "/readyz").unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        }
        server.join().unwrap();
    }

    /// When every address refuses, the monitor is unreachable (exit 69), not timed out.
    #[test]
    fn a_monitor_whose_every_address_refuses_is_unreachable() {
        let c = client(vec![refusing(), refusing()]);
        let e = c.call("GET", "/readyz").err();
        assert!(matches!(e, Some(Failure::Unreachable(_))), "{e:?}");
    }
}
