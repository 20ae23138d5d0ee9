//! The cluster view: each configured balancer's `GET /v1/status`, fetched concurrently with a short timeout.
//! A balancer that does not answer 200 with JSON in time is "down"; the JSON is passed through as it is, so the
//! dashboard renders whatever fields the balancer has. And cluster-wide actions: [`drain`] calls every
//! balancer's own drain endpoint at once (for the dashboard's buttons and `xcluster ctl drain`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xcluster_proto::directory::ServerAction;

/// Largest status body accepted from a balancer. A balancer's status lists every instance it knows (a few
/// hundred bytes each, more with many request types), so thousands of instances make several MiB; 16 MiB
/// leaves room for that while bounding what one balancer can make the monitor hold (per balancer, per view).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Room for the response head and chunk-size lines beyond the body.
const MAX_FRAMING: usize = 64 * 1024;

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

/// How long one cluster view serves every request for it.
const VIEW_FRESH: Duration = Duration::from_secs(1);

/// The last cluster view, shared: requests within [`VIEW_FRESH`] of it get it, and requests that come while
/// one is fetched wait for that one (they queue on the lock) instead of each calling every balancer. Before,
/// each `GET /v1/cluster` or dashboard load (an open read, polled every 2 s per open tab) made a connection
/// and a status build on every balancer and could hold 16 MiB per balancer.
#[derive(Debug, Default)]
pub struct ViewCache {
    last: tokio::sync::Mutex<Option<(Instant, std::sync::Arc<ClusterView>)>>,
}

impl ViewCache {
    pub async fn get(&self, balancers: &[SocketAddr], timeout: Duration) -> std::sync::Arc<ClusterView> {
        let mut last = self.last.lock().await;
        if let Some((at, view)) = &*last
            && at.elapsed() < VIEW_FRESH
        {
            return view.clone();
        }
        let view = std::sync::Arc::new(fetch(balancers, timeout).await);
        *last = Some((Instant::now(), view.clone()));
        view
    }

    /// After an action on the balancers: the next view is fetched, so it shows the action's effect.
    pub async fn forget(&self) {
        *self.last.lock().await = None;
    }
}

pub async fn fetch(balancers: &[SocketAddr], timeout: Duration) -> ClusterView {
    let views = balancers.iter().map(|&a| one(a, timeout));
    ClusterView {
        balancers: futures_util::future::join_all(views).await,
    }
}

async fn one(addr: SocketAddr, timeout: Duration) -> BalancerView {
    let t0 = Instant::now();
    let (status, error) = match call(addr, "GET", "/v1/status", None, timeout, None).await {
        Ok((200, body)) => (Some(body), None),
        Ok((status, _)) => (None, Some(format!("status {status}"))),
        Err(e) => (None, Some(e)),
    };
    BalancerView {
        addr: addr.to_string(),
        up: status.is_some(),
        latency_ms: status.as_ref().map(|_| t0.elapsed().as_millis() as u64),
        error,
        status,
    }
}

/// What one balancer said to a drain, an undrain or a weight.
#[derive(Debug, Serialize)]
pub struct ActionResult {
    pub balancer: String,
    pub id: String,
    /// `ok`, `unknown_instance`, `token_refused`, `down`, `unknown` (asked, not answered in time) or `failed`.
    pub result: &'static str,
    /// For people: `drained`, `undrained`, `weight 50%`, or what went wrong.
    pub outcome: String,
}

/// Drains, undrains or sets the weight of instance `id` on every balancer in `balancers` at once, through
/// each one's `POST /v1/servers/ID/drain` (`undrain`, `weight/50%25`) with `token` (the monitor's own:
/// balancers take the same, as `xcluster up` sets them).
pub async fn server_action(
    balancers: &[SocketAddr],
    id: &str,
    action: ServerAction,
    token: &str,
    timeout: Duration,
) -> Vec<ActionResult> {
    let path = format!(
        "/v1/servers/{}/{}",
        xcluster_runtime::http::percent_encode(id),
        action.path()
    );
    let calls = balancers.iter().map(|&addr| {
        let path = &path;
        async move {
            let message = |body: &serde_json::Value, status: u16| {
                body["error"]["message"]
                    .as_str()
                    .map_or_else(|| format!("status {status}"), str::to_string)
            };
            let sent = std::sync::atomic::AtomicBool::new(false);
            let (result, outcome) = match call(
                addr,
                "POST",
                path,
                Some(token),
                timeout.max(ACTION_TIMEOUT),
                Some(&sent),
            )
            .await
            {
                Ok((200, _)) => ("ok", action.done()),
                Ok((401, _)) => ("token_refused", "the balancer refused the token".into()),
                Ok((404, body)) => ("unknown_instance", message(&body, 404)),
                Ok((status, body)) => ("failed", message(&body, status)),
                // Asked and not answered: the balancer may well have applied it (it saves its state file
                // before it answers), so it is not called down.
                Err(e) if sent.load(std::sync::atomic::Ordering::Relaxed) => (
                    "unknown",
                    format!("{e}: it may have been applied; `xcluster ctl cluster` shows whether"),
                ),
                Err(e) => ("down", format!("down: {e}")),
            };
            ActionResult {
                balancer: addr.to_string(),
                id: id.to_string(),
                result,
                outcome,
            }
        }
    });
    futures_util::future::join_all(calls).await
}

/// At least this long for a balancer to answer a drain, an undrain or a weight: it answers once its state
/// file is saved, which a busy disk can hold past the status fetches' `cluster.timeout_ms` (500 ms).
const ACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.1 request to a balancer, within `timeout`: its status and JSON body (`null` when the body is
/// not JSON). `sent` is set once the whole request is written.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
    sent: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(u16, serde_json::Value), String> {
    tokio::time::timeout(timeout, request(addr, method, path, bearer, sent))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    sent: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(u16, serde_json::Value), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    if let Some(sent) = sent {
        sent.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let too_large = || format!("status larger than {} MiB", MAX_BODY / (1024 * 1024));
    let mut raw = Vec::new();
    // One byte past the cap tells a body over it from one that just fits: cut short, it would only fail to
    // parse, and a healthy balancer would show as down with a JSON error that hides the cause.
    (&mut s)
        .take((MAX_BODY + MAX_FRAMING + 1) as u64)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if raw.len() > MAX_BODY + MAX_FRAMING {
        return Err(too_large());
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed response")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed status line")?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or("malformed chunked body")?;
    }
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    match serde_json::from_slice(&body) {
        Ok(v) => Ok((status, v)),
        Err(_) if status != 200 => Ok((status, serde_json::Value::Null)),
        Err(e) => Err(format!("not JSON: {e}")),
    }
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A balancer that answers one request with `answer` and sends the request's head back on `tx`.
    async fn balancer(
        answer: &'static str,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            tx.send(String::from_utf8_lossy(&head).into_owned()).unwrap();
            s.write_all(answer.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn an_action_calls_every_balancer_and_tells_each_answer() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let not_found = "HTTP/1.1 404 Not Found\r\ncontent-length: 63\r\n\r\n\
                         {\"error\":{\"code\":\"unknown_instance\",\"message\":\"no such thing\"}}";
        let ok = balancer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", tx.clone()).await;
        let refused = balancer(
            "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n",
            tx.clone(),
        )
        .await;
        let unknown = balancer(not_found, tx).await;
        // Bound and closed again: nothing listens there.
        let down = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let timeout = std::time::Duration::from_secs(5);
        let balancers = [ok, refused, unknown, down];
        let got = server_action(&balancers, "h/app 1", ServerAction::Drain(true), "tok", timeout).await;
        let results: Vec<(&str, &str)> = got.iter().map(|r| (r.result, r.outcome.as_str())).collect();
        assert_eq!(
            results[..3],
            [
                ("ok", "drained"),
                ("token_refused", "the balancer refused the token"),
                ("unknown_instance", "no such thing")
            ]
        );
        assert_eq!(results[3].0, "down");
        for _ in 0..3 {
            let head = rx.recv().await.unwrap();
            assert!(
                head.starts_with("POST /v1/servers/h%2Fapp%201/drain HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nAuthorization: Bearer tok\r\n"), "{head}");
        }
        // A weight goes the same way, its `%` encoded, and is told as set.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ok = balancer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", tx).await;
        let weight = ServerAction::Weight("10%".parse().unwrap());
        let got = server_action(&[ok], "h/a", weight, "tok", timeout).await;
        assert_eq!((got[0].result, got[0].outcome.as_str()), ("ok", "weight 10%"));
        let head = rx.recv().await.unwrap();
        assert!(
            head.starts_with("POST /v1/servers/h%2Fa/weight/10%25 HTTP/1.1\r\n"),
            "{head}"
        );
    }

    /// A balancer whose status is over the limit is reported as too large, not as "not JSON" from a body
    /// cut short; one just under the limit (a big but legitimate status) is up.
    #[tokio::test]
    async fn an_oversized_status_says_so() {
        async fn serve(body: Vec<u8>) -> std::net::SocketAddr {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
            addr
        }
        // A JSON string of `len` bytes in all.
        let json_of = |len: usize| {
            let mut b = vec![b'"'];
            b.resize(len - 1, b'x');
            b.push(b'"');
            b
        };
        let timeout = std::time::Duration::from_secs(20);
        let big = serve(json_of(super::MAX_BODY + 1)).await;
        let fits = serve(json_of(super::MAX_BODY)).await;
        let view = super::fetch(&[big, fits], timeout).await;
        let b = &view.balancers;
        assert!(!b[0].up);
        assert_eq!(b[0].error.as_deref(), Some("status larger than 16 MiB"));
        assert!(b[1].up, "{:?}", b[1].error);
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            super::dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(super::dechunk(b"zz\r\n").is_none());
    }
}
