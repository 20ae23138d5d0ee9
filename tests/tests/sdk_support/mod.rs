//! Test doubles for the SDK tests, over real loopback sockets: a fake balancer that serves scripted server
//! lists with the real long-poll behaviour (`watch=VERSION` waits until the table differs or the hold
//! expires), and tiny HTTP backends that answer with their own name. Each runs on its own tokio runtime so
//! a test can kill it abruptly (listener and every open connection closed at once), like a dead process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use xcluster_proto::directory::{InstanceState, ServerEntry, ServerList};

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads a request head (bounded) and the body its Content-Length announces.
async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = xcluster_tests::content_length(&head);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

async fn respond(s: &mut TcpStream, status: u16, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body).await;
    let _ = s.shutdown().await;
}

/// A server list for `request_type` with `servers` as `(id, addr, weight)`, all `up`.
pub fn list(
    request_type: &str,
    version: u64,
    servers: &[(&str, SocketAddr, u32)],
    balancers: &[SocketAddr],
) -> ServerList {
    ServerList {
        request_type: request_type.into(),
        version,
        ttl_ms: 2000,
        servers: servers
            .iter()
            .map(|(id, addr, weight)| ServerEntry {
                id: id.to_string(),
                addr: addr.to_string(),
                weight: *weight,
                state: InstanceState::Up,
                report_age_ms: 10,
            })
            .collect(),
        balancers: balancers.iter().map(|b| b.to_string()).collect(),
        // As a balancer that has heard its agents says.
        warming: Some(false),
    }
}

struct Tables {
    lists: Mutex<HashMap<String, ServerList>>,
    bump: tokio::sync::watch::Sender<u64>,
    hold: Duration,
    /// Hung (`FakeBalancer::hang`): connections are taken and never answered, held polls included.
    hung: std::sync::atomic::AtomicBool,
}

/// A scripted balancer: `GET /v1/servers?type=T[&watch=V]` over real sockets.
pub struct FakeBalancer {
    pub addr: SocketAddr,
    tables: Arc<Tables>,
    /// List requests served.
    pub requests: Arc<AtomicU64>,
    rt: Option<Runtime>,
}

impl FakeBalancer {
    /// Starts on a free loopback port (bound here, so no race) with the long-poll hold time `hold`.
    pub fn start(hold: Duration) -> FakeBalancer {
        Self::start_at("127.0.0.1:0", hold).unwrap()
    }

    /// Starts on `addr`; `None` if it cannot be bound.
    pub fn start_at(addr: &str, hold: Duration) -> Option<FakeBalancer> {
        let std_listener = std::net::TcpListener::bind(addr).ok()?;
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let tables = Arc::new(Tables {
            lists: Mutex::new(HashMap::new()),
            bump: tokio::sync::watch::channel(0).0,
            hold,
            hung: std::sync::atomic::AtomicBool::new(false),
        });
        let requests = Arc::new(AtomicU64::new(0));
        let rt = runtime();
        let (t, r) = (tables.clone(), requests.clone());
        rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (t, r) = (t.clone(), r.clone());
                tokio::spawn(async move {
                    let Some((head, _)) = read_request(&mut s).await else {
                        return;
                    };
                    r.fetch_add(1, Ordering::Relaxed);
                    let (status, body) = serve_list(&t, &head).await;
                    respond(&mut s, status, &body).await;
                });
            }
        });
        Some(FakeBalancer {
            addr,
            tables,
            requests,
            rt: Some(rt),
        })
    }

    /// Publishes `list` for its request type (waking the watches waiting on it).
    pub fn set(&self, list: ServerList) {
        self.tables
            .lists
            .lock()
            .unwrap()
            .insert(list.request_type.clone(), list);
        self.tables.bump.send_modify(|v| *v += 1);
    }

    /// Serves `list` when type `ty` is asked for, whatever type the list names (a confused balancer).
    pub fn set_for(&self, ty: &str, list: ServerList) {
        self.tables.lists.lock().unwrap().insert(ty.to_string(), list);
        self.tables.bump.send_modify(|v| *v += 1);
    }

    /// Hangs, as a host that stopped without closing its sockets: connections are still accepted, and no
    /// request (a watch it holds now included) is ever answered.
    pub fn hang(&self) {
        self.tables.hung.store(true, Ordering::Relaxed);
        self.tables.bump.send_modify(|v| *v += 1);
    }

    /// Dies at once: the listener and every open connection close.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FakeBalancer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_list(t: &Tables, head: &str) -> (u16, Vec<u8>) {
    let target = head.split_whitespace().nth(1).unwrap_or("");
    let Some(query) = target.strip_prefix("/v1/servers?") else {
        return (404, b"{}".to_vec());
    };
    let mut ty = None;
    let mut watch = None;
    let mut hold = t.hold;
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("type", v)) => ty = Some(v.to_string()),
            Some(("watch", v)) => watch = v.parse::<u64>().ok(),
            // As a balancer does: the client's wait, capped by its own.
            Some(("wait_ms", v)) => {
                hold = v.parse().map_or(hold, |ms| hold.min(Duration::from_millis(ms)));
            }
            _ => {}
        }
    }
    let Some(ty) = ty else {
        return (400, b"{}".to_vec());
    };
    let mut rx = t.bump.subscribe();
    let current = |t: &Tables| t.lists.lock().unwrap().get(&ty).cloned();
    if let Some(w) = watch {
        let deadline = tokio::time::Instant::now() + hold;
        while current(t).is_some_and(|l| l.version == w) && !t.hung.load(Ordering::Relaxed) {
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                break;
            }
        }
    }
    if t.hung.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    match current(t) {
        Some(l) => (200, serde_json::to_vec(&l).unwrap()),
        None => (
            404,
            b"{\"error\":{\"code\":\"unknown_type\",\"message\":\"unknown request type\"}}".to_vec(),
        ),
    }
}

/// A tiny HTTP backend answering every request with `status` and its own name as the body.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests answered.
    pub hits: Arc<AtomicU64>,
    /// Connections accepted.
    pub conns: Arc<AtomicU64>,
    rt: Option<Runtime>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::with_status(name, 200)
    }

    pub fn with_status(name: &str, status: u16) -> Backend {
        Self::spawn(name, status, false, Duration::ZERO)
    }

    /// Answers each request after `delay`, as a backend with real work to do.
    pub fn with_delay(name: &str, delay: Duration) -> Backend {
        Self::spawn(name, 200, false, delay)
    }

    /// Accepts connections and reads requests but never answers.
    pub fn hanging(name: &str) -> Backend {
        Self::spawn(name, 200, true, Duration::ZERO)
    }

    /// Answers each request with the status `status` gives for its head (request line and headers).
    pub fn scripted(name: &str, status: impl Fn(&str) -> u16 + Send + Sync + 'static) -> Backend {
        Self::spawn_with(name, Arc::new(status), false, Duration::ZERO)
    }

    fn spawn(name: &str, status: u16, hang: bool, delay: Duration) -> Backend {
        Self::spawn_with(name, Arc::new(move |_: &str| status), hang, delay)
    }

    fn spawn_with(
        name: &str,
        status: Arc<dyn Fn(&str) -> u16 + Send + Sync>,
        hang: bool,
        delay: Duration,
    ) -> Backend {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let rt = runtime();
        let (h, c, body) = (hits.clone(), conns.clone(), name.as_bytes().to_vec());
        rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let (h, body, status) = (h.clone(), body.clone(), status.clone());
                tokio::spawn(async move {
                    if let Some((head, _)) = read_request(&mut s).await {
                        h.fetch_add(1, Ordering::Relaxed);
                        let status = status(&head);
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        respond(&mut s, status, &body).await;
                    }
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            conns,
            rt: Some(rt),
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// An address nothing listens on (bound, then released): connecting to it is refused.
pub fn dead_addr() -> SocketAddr {
    xcluster_tests::free_addr()
}
