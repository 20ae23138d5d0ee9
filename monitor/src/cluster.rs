//! The cluster view: each configured balancer's `GET /v1/status`, fetched concurrently with a short timeout.
//! A balancer that does not answer 200 with JSON in time is "down"; the JSON is passed through as it is, so the
//! dashboard renders whatever fields the balancer has.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest status body accepted from a balancer.
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct BalancerView {
    pub addr: String,
    pub up: bool,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub balancers: Vec<BalancerView>,
}

pub async fn fetch(balancers: &[SocketAddr], timeout: Duration) -> ClusterView {
    let tasks: Vec<_> = balancers
        .iter()
        .map(|a| (*a, tokio::spawn(one(*a, timeout))))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for (addr, t) in tasks {
        out.push(t.await.unwrap_or_else(|e| BalancerView {
            addr: addr.to_string(),
            up: false,
            latency_ms: None,
            error: Some(e.to_string()),
            status: None,
        }));
    }
    ClusterView { balancers: out }
}

async fn one(addr: SocketAddr, timeout: Duration) -> BalancerView {
    let t0 = Instant::now();
    let res = tokio::time::timeout(timeout, get_json(addr))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
    match res {
        Ok(v) => BalancerView {
            addr: addr.to_string(),
            up: true,
            latency_ms: Some(t0.elapsed().as_millis() as u64),
            error: None,
            status: Some(v),
        },
        Err(e) => BalancerView {
            addr: addr.to_string(),
            up: false,
            latency_ms: None,
            error: Some(e),
            status: None,
        },
    }
}

async fn get_json(addr: SocketAddr) -> Result<serde_json::Value, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!(
        "GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    (&mut s)
        .take(MAX_BODY as u64 + 65_536)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed response")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status}"));
    }
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or("malformed chunked body")?;
    }
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks() {
        assert_eq!(
            super::dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(super::dechunk(b"zz\r\n").is_none());
    }
}
