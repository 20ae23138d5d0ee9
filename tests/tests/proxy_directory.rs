//! The L4 proxy and the directory together: a listener with no fixed backends routes each connection by the
//! directory's live table, so an instance that agents report is reachable through the proxy, a drained one
//! gets no new connections, and with no instance known the client is closed at once. A starting balancer
//! opens such a listener once its directory can route the type (`warmup_ms`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "directory_support/mod.rs"]
mod support;

use serde_json::json;
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::*;
use xcluster_tests::*;

/// A backend that answers every connection with its own name, then closes.
fn named_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(name.as_bytes());
        }
    });
    addr
}

/// The lb config of these tests: `[proxy] warmup_ms`, and listener `browse` on `proxy`, routed by the
/// directory.
fn proxy_config(api: SocketAddr, proxy: SocketAddr, warmup_ms: u64) -> String {
    let listener = format!("name = \"browse\"\nlisten = \"{proxy}\"\nrequest_type = \"browse\"\n");
    let lb = lb_config(api, &[]);
    format!("{lb}[proxy]\nwarmup_ms = {warmup_ms}\n[[proxy.listeners]]\n{listener}")
}

/// What a connection through `proxy` read until the proxy closed it; an error when it was reset, or held
/// open past the read timeout (5 s).
fn through(proxy: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The backends 40 connections through `proxy` reached.
fn seen(proxy: SocketAddr) -> std::collections::BTreeSet<String> {
    (0..40).map(|_| through(proxy).unwrap_or_default()).collect()
}

/// Whether 40 connections through `proxy` reached both `A` and `B`.
fn both_seen(proxy: SocketAddr) -> Option<()> {
    let seen = seen(proxy);
    (seen.contains("A") && seen.contains("B")).then_some(())
}

/// Waits until connections through `proxy` reach both `A` and `B`.
fn both(proxy: SocketAddr, what: &str) {
    eventually(Duration::from_secs(10), what, || both_seen(proxy));
}

/// The `/v1/status` row of proxy backend `addr` on the balancer at `api`.
fn backend_row(api: SocketAddr, addr: SocketAddr) -> serde_json::Value {
    let st = get(api, "/v1/status").unwrap().json();
    let backends = st["proxy"]["backends"].as_array().unwrap().clone();
    let row = backends.iter().find(|r| r["addr"] == addr.to_string()).cloned();
    row.unwrap_or_else(|| panic!("{addr} not in {st}"))
}

#[test]
fn proxy_routes_by_the_directory_and_respects_drain() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_addr();
    let proxy = free_addr();
    let lb = start("lb", api, &proxy_config(api, proxy, 300), dir.path());

    // Nothing reported yet: after its warm-up the proxy opens anyway, says so, and with no instance known
    // the client is closed without data: a clean end of stream, not a reset nor a connection held open.
    let closed = through(proxy);
    assert!(matches!(&closed, Ok(s) if s.is_empty()), "{closed:?}");
    assert!(
        lb.stderr().contains("opening the proxy listeners anyway"),
        "{}",
        lb.stderr()
    );

    let (a, b) = (named_backend("A"), named_backend("B"));
    // An agent's worth of reports, every 300 ms (the report TTL is 1.5 s), until the test ends.
    let r = post_signed(
        api,
        &report(
            "host-1",
            now_ms() * 1000,
            now_ms(),
            &[("h1/a", a, 0), ("h1/b", b, 0)],
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reporter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
                post_signed(
                    api,
                    &report(
                        "host-1",
                        now_ms() * 1000,
                        now_ms(),
                        &[("h1/a", a, 0), ("h1/b", b, 0)],
                    ),
                );
            }
        })
    };
    both(proxy, "both instances to be picked through the proxy");

    // Drain A on this balancer: new proxied connections all go to B.
    let r = set_drain(api, "h1/a", "drain");
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(10),
        "drained instance to leave the proxy's choice",
        || {
            (0..40)
                .all(|_| through(proxy).is_ok_and(|s| s == "B"))
                .then_some(())
        },
    );

    // Undrained, then given 0% of its load-driven weight at run time: out of the proxy's choice again, though
    // its state stays up; 100% brings it back. A weight of its own is for proxy backends only.
    assert_eq!(set_drain(api, "h1/a", "undrain").status, 200);
    let weight_set = || {
        let st = get(api, "/v1/status").unwrap().json();
        let a = st["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "h1/a")
            .cloned();
        (a.unwrap()["weight_set"].clone(), st["weights"].clone())
    };
    let r = set_drain(api, "h1/a", "weight/0%25");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(weight_set(), (json!("0%"), json!({"h1/a": "0%"})));
    eventually(
        Duration::from_secs(10),
        "an instance at 0% to leave the proxy's choice",
        || {
            (0..40)
                .all(|_| through(proxy).is_ok_and(|s| s == "B"))
                .then_some(())
        },
    );
    let r = set_drain(api, "h1/a", "weight/7");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("set a share of it"), "{}", r.body);
    assert_eq!(set_drain(api, "h1/a", "weight/100%25").status, 200);
    assert_eq!(weight_set(), (json!(null), json!({})));
    both(proxy, "A back at its whole weight");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reporter.join().unwrap();
}

/// A `[[proxy.backends]]` entry's weight is set at run time by its address (HAProxy's `set server weight`):
/// a weight of its own, or a share of its configured one; `100%` gives it back.
#[test]
fn a_fixed_backend_takes_a_weight_set_at_run_time() {
    // Bound whole first: the lb and its directory live as long as `lb`.
    let lb = ab_lb();
    let AB { api, proxy, a, b, .. } = lb;
    let seen = || seen(proxy);
    let both = || both(proxy, "A and B both picked");
    let weight_set = |addr| backend_row(api, addr)["weight_set"].clone();
    both();
    // Its own weight 0: applied with the answer, every new connection goes to B.
    let r = set_drain(api, &a.to_string(), "weight/0");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(seen(), ["B".to_string()].into());
    assert_eq!((weight_set(a), weight_set(b)), (json!("0"), json!(null)));
    // What the picks use, as the status shows it: A's 0, B's configured weight.
    let weight = |addr| backend_row(api, addr)["weight"].as_u64().unwrap();
    let effective = |addr| backend_row(api, addr)["effective_weight"].as_u64();
    assert_eq!((effective(a), effective(b)), (Some(0), Some(weight(b))));
    // A share of it: 0% of B's, with A back at 50% of its own, leaves only A.
    assert_eq!(set_drain(api, &a.to_string(), "weight/50%25").status, 200);
    assert_eq!(set_drain(api, &b.to_string(), "weight/0%25").status, 200);
    assert_eq!(seen(), ["A".to_string()].into());
    assert_eq!(
        (effective(a), effective(b)),
        (Some((weight(a) / 2).max(1)), Some(0))
    );
    // Refused: a weight out of range, and an address that is no backend.
    let r = set_drain(api, &a.to_string(), "weight/1001%25");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("bad_weight"), "{}", r.body);
    let r = set_drain(api, &free_addr().to_string(), "weight/5");
    assert_eq!(r.status, 404, "{}", r.body);
    // An unknown name lists the backends too; an IPv6 address without brackets is told how to write it.
    let r = set_drain(api, "nope", "weight/5");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains(&a.to_string()) && r.body.contains(&b.to_string()),
        "{}",
        r.body
    );
    let r = set_drain(api, "::1:8001", "weight/5");
    assert!(
        r.body.contains("an IPv6 address takes brackets: [::1]:8001"),
        "{}",
        r.body
    );
    // 100% clears it.
    for backend in [a, b] {
        assert_eq!(set_drain(api, &backend.to_string(), "weight/100%25").status, 200);
        assert_eq!(weight_set(backend), json!(null));
    }
    both();
}

/// With `warmup_ms`, a starting balancer serves its API (agents must reach it) but is not ready and leaves
/// the proxy port closed, so the kernel hands it no client it could only close; the first report that
/// names an instance of the type opens the port and makes it ready.
#[test]
fn a_starting_balancer_opens_its_proxy_port_once_the_directory_routes() {
    let dir = tempfile::tempdir().unwrap();
    let (api, proxy) = (free_addr(), free_addr());
    let path = write_file(dir.path(), "lb.toml", &proxy_config(api, proxy, 60_000));
    let lb = Proc::xcluster("lb", &["lb", "--config", path.to_str().unwrap()]);
    eventually(Duration::from_secs(30), "the lb's API", || {
        get(api, "/livez").ok().filter(|r| r.status == 200)
    });
    assert_eq!(get(api, "/readyz").unwrap().status, 503);
    let early = TcpStream::connect_timeout(&proxy, Duration::from_secs(5));
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{early:?}"
    );
    let a = named_backend("A");
    let r = post_signed(
        api,
        &report("host-1", now_ms() * 1000, now_ms(), &[("h1/a", a, 0)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_ready(api, Duration::from_secs(10));
    assert_eq!(through(proxy).unwrap(), "A");
    assert!(lb.stderr().contains("directory warm"), "{}", lb.stderr());
}

/// An lb whose listener `browse` routes to two fixed backends, `A` and `B`, each answering with its name.
struct AB {
    _lb: Proc,
    _dir: tempfile::TempDir,
    api: SocketAddr,
    proxy: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
}

fn ab_lb() -> AB {
    let dir = tempfile::tempdir().unwrap();
    let (api, proxy) = (free_addr(), free_addr());
    let (a, b) = (named_backend("A"), named_backend("B"));
    let config = format!(
        "{}[[proxy.backends]]\naddr = \"{a}\"\n[[proxy.backends]]\naddr = \"{b}\"\n",
        proxy_config(api, proxy, 0)
    );
    let lb = start("lb", api, &config, dir.path());
    AB {
        _lb: lb,
        _dir: dir,
        api,
        proxy,
        a,
        b,
    }
}

/// A fixed `[[proxy.backends]]` entry that an agent also reports follows the directory: drained on the
/// balancer, or reported not ready, it gets no new connections (without waiting for `check_fall` failed
/// health checks), and it is back once undrained and ready.
#[test]
fn a_fixed_backend_an_agent_reports_follows_its_drain_and_readiness() {
    let lb = ab_lb();
    let AB { api, proxy, a, .. } = lb;
    // An agent's report of A, saying what `ready` holds, sent again before every look so that it stays fresh
    // (the report TTL is 1.5 s) however long the looks take.
    let (ready, seq) = (Cell::new(true), Cell::new(now_ms() * 1000));
    let report_a = || {
        seq.set(seq.get() + 1);
        let mut r = report("host-1", seq.get(), now_ms(), &[("h1/a", a, 0)]);
        r.instances[0].ready = ready.get();
        let r = post_signed(api, &r);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let both = || {
        eventually(Duration::from_secs(10), "A and B both picked", || {
            report_a();
            both_seen(proxy)
        })
    };
    let only_b = |what| {
        eventually(Duration::from_secs(10), what, || {
            report_a();
            (0..40)
                .all(|_| through(proxy).is_ok_and(|s| s == "B"))
                .then_some(())
        })
    };
    both();
    let set = |verb: &str| {
        let r = set_drain(api, "h1/a", verb);
        assert_eq!(r.status, 200, "{}", r.body);
    };
    set("drain");
    only_b("the drained backend to get no connection");
    set("undrain");
    both();
    ready.set(false);
    only_b("the backend reported not ready to get no connection");
    ready.set(true);
    both();
}

/// A `[[proxy.backends]]` entry no agent reports is drained at run time by its address (HAProxy's `set server
/// state drain`): it gets no new connections, `/v1/status` shows it drained, and it is back once undrained.
/// An address that is no backend is refused, named.
#[test]
fn a_fixed_backend_is_drained_by_its_address() {
    let lb = ab_lb();
    let AB { api, proxy, a, b, .. } = lb;
    let seen = || seen(proxy);
    let both = || both(proxy, "A and B both picked");
    let drained = |addr| backend_row(api, addr)["drained"].as_bool();
    both();
    assert_eq!(drained(a), Some(false));
    // Written with a leading zero in its port, the same backend.
    let r = set_drain(api, &format!("127.0.0.1:0{}", a.port()), "drain");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(&format!("\"id\":\"{a}\"")), "{}", r.body);
    // Applied with the drain's answer: every new connection goes to B at once.
    assert_eq!(seen(), ["B".to_string()].into());
    assert_eq!((drained(a), drained(b)), (Some(true), Some(false)));
    let unknown = free_addr();
    let r = set_drain(api, &unknown.to_string(), "drain");
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains("no [[proxy.backends]] at that address"),
        "{}",
        r.body
    );
    let r = set_drain(api, &a.to_string(), "undrain");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(drained(a), Some(false));
    both();
}
