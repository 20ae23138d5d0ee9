//! Shared by the directory tests: a fake app instance whose stats the test scripts, config writers for
//! balancers and agents, signed-report helpers, and small JSON accessors.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xcluster_proto::report::{HostLoad, InstanceLoad, LoadReport, SIGNATURE_HEADER, sign};
use xcluster_proto::stats::InstanceStats;
use xcluster_tests::*;

pub const KEY: &str = "test-report-key";
pub const TOKEN: &str = "test-admin-token";

/// A fake app instance: serves `GET /v1/stats` with whatever the test put in `stats`.
pub struct FakeApp {
    pub addr: SocketAddr,
    pub stats: Arc<Mutex<InstanceStats>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApp {
    pub fn start(name: &str) -> FakeApp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Mutex::new(InstanceStats {
            instance: name.into(),
            ready: true,
            capacity: 100,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let mut head = Vec::new();
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body = serde_json::to_string(&*s.lock().unwrap()).unwrap();
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    // Non-blocking accept: nothing pending, look again shortly (also notices `stop`).
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FakeApp {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut InstanceStats)) {
        f(&mut self.stats.lock().unwrap());
    }
}

impl Drop for FakeApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A balancer config for tests: queue-bound `browse`, CPU-bound `compute`, short TTL and slow start.
pub fn lb_config(addr: SocketAddr, peers: &[SocketAddr]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"role = "lb"
listen = "{addr}"
peers = [{}]
[reports]
key = "{KEY}"
skew_ms = 5000
[directory]
report_ttl_ms = 1500
slow_start_ms = 1000
watch_timeout_ms = 10000
list_ttl_ms = 500
panic_threshold = 0.3
[admin]
token = "{TOKEN}"
[types.browse]
cpu = 0.0
mem = 0.0
queue = 1.0
cost = 1.0
[types.compute]
cpu = 1.0
mem = 0.0
queue = 0.0
cost = 2.0
"#,
        peers.join(", ")
    )
}

/// An agent config reporting `apps` (id, fake app) to `balancers`.
pub fn agent_config(
    addr: SocketAddr,
    id: &str,
    balancers: &[SocketAddr],
    apps: &[(&str, &FakeApp)],
) -> String {
    let bals: Vec<String> = balancers.iter().map(|b| format!("\"{b}\"")).collect();
    let mut s = format!(
        "role = \"agent\"\nlisten = \"{addr}\"\nagent_id = \"{id}\"\nbalancers = [{}]\nkey = \"{KEY}\"\ninterval_ms = 500\nsample_ms = 50\ntimeout_ms = 300\n",
        bals.join(", ")
    );
    for (iid, app) in apps {
        s.push_str(&format!(
            "[[instances]]\nid = \"{iid}\"\naddr = \"{}\"\n",
            app.addr
        ));
    }
    s
}

/// Starts a role with a config file written into its own temp dir; waits until ready.
pub fn start(role: &str, addr: SocketAddr, config: &str, dir: &Path) -> Proc {
    let path = write_file(dir, &format!("{role}-{}.toml", addr.port()), config);
    let p = Proc::xcluster(role, &[role, "--config", path.to_str().unwrap()]);
    wait_ready(addr, Duration::from_secs(30));
    p
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A report from agent `agent` with one ready instance per (id, addr, in_flight).
pub fn report(agent: &str, seq: u64, ts: u64, instances: &[(&str, SocketAddr, u32)]) -> LoadReport {
    LoadReport {
        agent: agent.into(),
        seq,
        boot: 0,
        timestamp_ms: ts,
        host: HostLoad {
            cpu: 0.1,
            mem: 0.1,
            load1: 0.0,
            cores: 8,
        },
        instances: instances
            .iter()
            .map(|(id, addr, in_flight)| InstanceLoad {
                id: (*id).into(),
                addr: addr.to_string(),
                ready: true,
                in_flight: *in_flight,
                capacity: 100,
                ..Default::default()
            })
            .collect(),
    }
}

/// Posts a body with an optional signature header.
pub fn post_report(lb: SocketAddr, body: &[u8], signature: Option<&str>) -> HttpResponse {
    let headers: Vec<(&str, &str)> = signature.map(|s| vec![(SIGNATURE_HEADER, s)]).unwrap_or_default();
    request(lb, "POST", "/v1/reports", &headers, Some(body)).unwrap()
}

/// Signs and posts a report; returns the response.
pub fn post_signed(lb: SocketAddr, r: &LoadReport) -> HttpResponse {
    let (body, sig) = signed_body(r);
    post_report(lb, &body, Some(&sig))
}

/// `r` as the body it is sent as, and that body's signature with the test key.
pub fn signed_body(r: &LoadReport) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(r).unwrap();
    let sig = sign(KEY.as_bytes(), &body);
    (body, sig)
}

/// `GET /v1/servers?type=ty` as JSON (panics on a non-200).
pub fn servers(lb: SocketAddr, ty: &str) -> serde_json::Value {
    let r = get(lb, &format!("/v1/servers?type={ty}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The (weight, state) of instance `id` in a server list.
pub fn entry(list: &serde_json::Value, id: &str) -> Option<(u64, String)> {
    list["servers"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| {
            (
                s["weight"].as_u64().unwrap(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
}

/// `POST /v1/servers/ID/VERB` (`drain` or `undrain`) on `lb` with the test token (`id` percent-encoded).
pub fn set_drain(lb: SocketAddr, id: &str, verb: &str) -> HttpResponse {
    let path = format!("/v1/servers/{}/{verb}", id.replace('/', "%2F"));
    let auth = format!("Bearer {TOKEN}");
    request(lb, "POST", &path, &[("authorization", &auth)], None).unwrap()
}

/// Watches `lb` has begun (`xcluster_lb_directory_queries_total{endpoint="watch"}`, counted as each arrives).
pub fn watches_begun(lb: SocketAddr) -> f64 {
    let m = get(lb, "/metrics").unwrap().body;
    metric_value(&m, "xcluster_lb_directory_queries_total", "endpoint=\"watch\"").unwrap_or(0.0)
}

/// Waits until `lb` has begun more than `before` watches: the long poll a test started has reached it.
pub fn wait_watching(lb: SocketAddr, before: f64) {
    eventually(Duration::from_secs(10), "the watch to reach the balancer", || {
        (watches_begun(lb) > before).then_some(())
    });
}
