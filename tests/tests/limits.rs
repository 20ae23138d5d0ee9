//! The HTTP limits of every role's API server (`[http]`): an oversized head gets 431, an oversized declared
//! body 413 with a JSON error, a client that never finishes its head (slowloris) is closed, and connections
//! over the cap get 503 `too_many_connections` — and each time the daemon goes on serving everyone else;
//! and the descriptor limit each role raises for itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use xcluster_tests::http::get;
use xcluster_tests::{
    Proc, Spawn, content_length, eventually, free_addr, metric_value, wait_ready, write_file, xcluster_bin,
};

const ROLES: [&str; 4] = ["lb", "agent", "monitor", "app"];
/// A mutating path of each role, to show the body bound applies before any handler.
fn post_path(role: &str) -> &'static str {
    match role {
        "lb" => "/v1/reports",
        "agent" => "/v1/report",
        "monitor" => "/v1/update",
        _ => "/v1/orders",
    }
}

fn start(role: &str, sets: &[&str]) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let listen = format!("listen=\"{addr}\"");
    let mut args = vec![role, "--set", listen.as_str()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let p = Proc::xcluster(role, &args);
    wait_ready(addr, Duration::from_secs(20));
    (p, addr)
}

/// Writes `bytes` (write errors ignored: the server may close early) and reads until the server closes.
/// Returns what was read; a reset after the answer arrived is not an error here.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    read_until_close(&mut s)
}

fn read_until_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed after {} bytes: {e}", out.len()),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn still_serves(role: &str, addr: SocketAddr) {
    let r = get(addr, "/livez").unwrap_or_else(|e| panic!("{role}: /livez after the limit: {e}"));
    assert_eq!(r.status, 200, "{role}: {}", r.body);
}

const SMALL: [&str; 3] = [
    "http.max_header_bytes=8192",
    "http.max_body_bytes=2048",
    "http.header_read_timeout_ms=1000",
];

#[test]
fn oversized_heads_get_431_and_the_daemon_serves_on() {
    for role in ROLES {
        let (_p, addr) = start(role, &SMALL);
        let big = "a".repeat(12 * 1024);
        let req = format!("GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
        let answer = exchange(addr, req.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 431"), "{role}: {answer:?}");
        still_serves(role, addr);
        // A head under the bound is served as usual.
        let small = "a".repeat(4 * 1024);
        let req = format!("GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: {small}\r\nConnection: close\r\n\r\n");
        assert!(
            exchange(addr, req.as_bytes()).starts_with("HTTP/1.1 200"),
            "{role}"
        );
    }
}

#[test]
fn oversized_declared_bodies_get_413_json_and_the_daemon_serves_on() {
    for role in ROLES {
        let (_p, addr) = start(role, &SMALL);
        let path = post_path(role);
        // Only the head is sent: the answer must come without the server waiting for (or reading) the body.
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        );
        let answer = exchange(addr, req.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 413"), "{role}: {answer:?}");
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "body_too_large", "{role}: {body}");
        assert!(
            json["error"]["message"].as_str().unwrap().contains("2048"),
            "{role}: the message names the bound: {body}"
        );
        still_serves(role, addr);
    }
}

#[test]
fn a_slowloris_client_is_closed_while_others_are_served() {
    for role in ROLES {
        let (_p, addr) = start(role, &SMALL);
        let mut slow = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        // Half a head, then nothing: the server must not wait for the rest forever.
        slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").unwrap();
        still_serves(role, addr);
        slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 1024];
        match slow.read(&mut buf) {
            // Closed (hyper may say 408 first); a read timeout would mean the server still holds it.
            Ok(n) => assert!(
                n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
                "{role}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{role}: {e}"),
        }
        still_serves(role, addr);
    }
}

/// Sends a keep-alive request on `s` and reads one response with a Content-Length body.
fn keep_alive_get(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = content_length(&text[..end]);
            if out.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// A GET of `/livez` on a new connection from loopback address `from`; the answer.
fn livez_from(from: [u8; 4], addr: SocketAddr) -> String {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect_timeout(&addr.into(), Duration::from_secs(10)).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    read_until_close(&mut s)
}

/// One client address holding its share of the connections (idle ones, say) is refused more, with a 503
/// that names the per-client cap, while another address is served: a single host cannot take an API away
/// from the agents and probes.
#[test]
fn one_client_over_its_share_gets_503_and_the_others_are_served() {
    let (_p, addr) = start(
        "lb",
        &[
            "http.max_connections=8",
            "http.max_connections_per_client=2",
            "http.header_read_timeout_ms=60000",
        ],
    );
    // Two idle connections from 127.0.0.3, counted once accepted (the readiness probe came from 127.0.0.1).
    let idle: Vec<socket2::Socket> = (0..2)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 3], 0)).into()).unwrap();
            s.connect_timeout(&addr.into(), Duration::from_secs(10)).unwrap();
            s
        })
        .collect();
    let refused = eventually(
        Duration::from_secs(10),
        "a third connection to be refused",
        || {
            let a = livez_from([127, 0, 0, 3], addr);
            a.starts_with("HTTP/1.1 503").then_some(a)
        },
    );
    assert!(refused.contains("max_connections_per_client"), "{refused:?}");
    assert!(livez_from([127, 0, 0, 4], addr).starts_with("HTTP/1.1 200"));
    drop(idle);
    eventually(Duration::from_secs(10), "the address to be served again", || {
        livez_from([127, 0, 0, 3], addr)
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
}

#[test]
fn connections_over_the_cap_get_503_while_the_others_are_served() {
    for role in ROLES {
        let (_p, addr) = start(
            role,
            &["http.max_connections=3", "http.header_read_timeout_ms=60000"],
        );
        // Three keep-alive connections, each answered once, so each surely holds a permit. (The readiness
        // probe's connection may hold its permit a moment after it closed: a 503 here is retried.)
        let mut held: Vec<TcpStream> = (0..3)
            .map(|i| {
                eventually(
                    Duration::from_secs(10),
                    &format!("{role}: connection {i} served"),
                    || {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                        keep_alive_get(&mut s, "/livez")
                            .starts_with("HTTP/1.1 200")
                            .then_some(s)
                    },
                )
            })
            .collect();
        let answer = exchange(
            addr,
            b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 503"), "{role}: {answer:?}");
        assert!(answer.contains("too_many_connections"), "{role}: {answer:?}");
        // The connections within the cap are still served.
        assert!(
            keep_alive_get(&mut held[0], "/livez").starts_with("HTTP/1.1 200"),
            "{role}"
        );
        // One closes: its slot is free again for a newcomer.
        drop(held.pop());
        let body = eventually(Duration::from_secs(10), "a new connection to be served", || {
            let a = exchange(
                addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            a.starts_with("HTTP/1.1 200").then_some(a)
        });
        let rejected = metric_value(&body, "xcluster_http_connections_rejected_total", "")
            .unwrap_or_else(|| panic!("{role}: no rejection counter"));
        assert!(rejected >= 1.0, "{role}: {rejected}");
    }
}

/// DNS rebinding: a web page whose name was re-pointed at 127.0.0.1 names its own host in `Host`. The control
/// plane answers such a browser's request on loopback with 421 and no data; IP addresses, `localhost` and
/// `[http] allowed_hosts` pass, as do clients that are not browsers; XBuy, called by the shop's front ends
/// under names of their own, checks none.
#[test]
fn browser_requests_on_loopback_naming_an_unknown_host_get_421_on_the_control_plane() {
    const BROWSER: &str = "User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nSec-Fetch-Mode: cors\r\n";
    let ask_as = |addr: SocketAddr, host: &str, who: &str| {
        exchange(
            addr,
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n{who}Connection: close\r\n\r\n").as_bytes(),
        )
    };
    let ask = |addr: SocketAddr, host: &str| ask_as(addr, host, BROWSER);
    for role in ["lb", "agent", "monitor"] {
        let (_p, addr) = start(role, &[]);
        let port = addr.port();
        for host in [
            "attacker.example",
            &format!("attacker.example:{port}"),
            "127.0.0.1.nip.io",
        ] {
            let r = ask(addr, host);
            assert!(r.starts_with("HTTP/1.1 421"), "{role} answered {host}: {r}");
            assert!(
                r.contains("unknown_host") && !r.contains("xcluster_"),
                "{role}: {r}"
            );
        }
        for host in [
            addr.to_string(),
            format!("LOCALHOST:{port}"),
            "dash.localhost".into(),
            "[::1]".into(),
        ] {
            let r = ask(addr, &host);
            assert!(r.starts_with("HTTP/1.1 200"), "{role} refused {host}: {r}");
        }
        let absolute = exchange(
            addr,
            format!("GET http://attacker.example/metrics HTTP/1.1\r\nHost: {addr}\r\n{BROWSER}Connection: close\r\n\r\n").as_bytes(),
        );
        assert!(absolute.starts_with("HTTP/1.1 421"), "{role}: {absolute}");
        // Each mark of a browser alone is enough; a client with none (curl, an agent naming this host as
        // its resolver has it) is answered.
        for who in [
            "Origin: http://attacker.example\r\n",
            "Sec-Fetch-Site: cross-site\r\n",
            "User-Agent: Mozilla/5.0\r\n",
        ] {
            let r = ask_as(addr, "attacker.example", who);
            assert!(r.starts_with("HTTP/1.1 421"), "{role} with {who}: {r}");
        }
        let r = ask_as(addr, "my-host:80", "User-Agent: curl/7.88.1\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{role}: {r}");
        still_serves(role, addr);
    }
    let (_p, addr) = start("monitor", &["http.allowed_hosts=[\"Dash.Internal\"]"]);
    assert!(ask(addr, "dash.internal:80").starts_with("HTTP/1.1 200"));
    assert!(ask(addr, "other.internal").starts_with("HTTP/1.1 421"));
    let (_p, addr) = start("lb", &["http.allowed_hosts=[\"*\"]"]);
    assert!(ask(addr, "attacker.example").starts_with("HTTP/1.1 200"));
    let (_p, addr) = start("app", &[]);
    assert!(ask(addr, "shop.example").starts_with("HTTP/1.1 200"));
}

/// Every role raises its soft descriptor limit to the hard one (a service starts at a soft 1024 under systemd,
/// which a balancer's proxy outgrew at about 500 connections), and warns when its config may hold more
/// connections at once than the hard limit allows; one whose config fits says nothing.
#[test]
fn every_role_raises_its_descriptor_limit_and_warns_when_its_config_needs_more() {
    for (api_connections, warns) in [(1024, false), (5000, true)] {
        for role in ROLES {
            let addr = free_addr();
            // Soft 256 under a hard 4096: 5,000 API connections need more than 4,096 descriptors.
            let script = format!(
                "ulimit -Sn 256 && ulimit -Hn 4096 && exec \"$0\" {role} --set 'listen=\"{addr}\"' \
                 --set http.max_connections={api_connections}"
            );
            let p = Proc::spawn(
                role,
                std::path::Path::new("/bin/sh"),
                Spawn {
                    args: vec!["-c".into(), script, xcluster_bin().display().to_string()],
                    ..Default::default()
                },
            );
            wait_ready(addr, Duration::from_secs(20));
            let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.pid())).unwrap();
            let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
            let (soft, hard) = {
                let mut n = line.split_whitespace().skip(3);
                (n.next().unwrap().to_string(), n.next().unwrap().to_string())
            };
            assert_eq!((soft.as_str(), hard.as_str()), ("4096", "4096"), "{role}: {line}");
            // The check is logged before the API listens, and lines are written in order.
            let log = eventually(Duration::from_secs(10), "the listening line", || {
                let log = p.stderr();
                log.contains("listening").then_some(log)
            });
            assert!(log.contains("raised the open-descriptor limit"), "{role}: {log}");
            assert_eq!(
                log.contains("the open-descriptor limit (RLIMIT_NOFILE) is below what this config may hold"),
                warns,
                "{role} with {api_connections} API connections: {log}"
            );
        }
    }
}

/// A monitor's programs, and their probe commands, get the descriptor limit the monitor was started with, not
/// the one it raised for itself: a program built on `select` fails on a descriptor above 1024, and one that
/// closes every descriptor up to its limit as it starts took seconds over a million of them.
#[test]
fn a_monitors_programs_get_the_limit_it_was_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, seen) = (free_addr(), dir.path().join("seen"));
    let probe_seen = dir.path().join("probe-seen");
    let config = format!(
        "role = \"monitor\"\nlisten = \"{addr}\"\nrun_dir = \"{run}\"\n\
         [programs.p]\ncommand = \"/bin/sh -c 'echo $(ulimit -Sn) $(ulimit -Hn) > {seen}; exec sleep 300'\"\n\
         [programs.p.readiness]\ncommand = \"/bin/sh -c 'echo $(ulimit -Sn) > {probe_seen}'\"\nperiod_ms = 100\n",
        run = dir.path().join("run").display(),
        seen = seen.display(),
        probe_seen = probe_seen.display(),
    );
    let path = write_file(dir.path(), "monitor.toml", &config);
    let script = format!(
        "ulimit -Sn 256 && ulimit -Hn 4096 && exec \"$0\" monitor --config {}",
        path.display()
    );
    let p = Proc::spawn(
        "monitor",
        std::path::Path::new("/bin/sh"),
        Spawn {
            args: vec!["-c".into(), script, xcluster_bin().display().to_string()],
            ..Default::default()
        },
    );
    let got = eventually(Duration::from_secs(20), "the program's limits", || {
        std::fs::read_to_string(&seen).ok().filter(|s| s.ends_with('\n'))
    });
    assert_eq!(got, "256 4096\n", "{}", p.stderr());
    let probed = eventually(Duration::from_secs(20), "the probe's limit", || {
        std::fs::read_to_string(&probe_seen)
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    assert_eq!(probed, "256\n", "{}", p.stderr());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("4096                 4096")),
        "the monitor's own stays raised: {limits}"
    );
}

/// A client that sends requests and never reads the answers is closed once its answers have waited
/// `send_timeout_ms` with nothing taken, and its place goes to others: hyper's only timer is the header
/// read's, so such a client (pipelined `/metrics`, its window full) held its connection for good. Here the
/// server takes one connection at a time, so until it is closed every other client is refused.
#[test]
fn a_client_that_never_reads_its_answers_is_closed() {
    let (_p, addr) = start("lb", &["http.max_connections=1", "http.send_timeout_ms=500"]);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // A small window, so that the answers back up into the server quickly.
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), Duration::from_secs(10)).unwrap();
    let mut greedy: TcpStream = s.into();
    greedy.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let writer = std::thread::spawn(move || {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        // Until the server stops reading (a write times out) or closes it.
        for _ in 0..20_000 {
            if greedy.write_all(req).is_err() {
                break;
            }
        }
        greedy
    });
    eventually(
        Duration::from_secs(30),
        "the greedy client to hold the only place",
        || get(addr, "/livez").ok().filter(|r| r.status == 503).map(|_| ()),
    );
    eventually(Duration::from_secs(30), "another client served", || {
        get(addr, "/livez").ok().filter(|r| r.status == 200).map(|_| ())
    });
    drop(writer.join().unwrap());
}
