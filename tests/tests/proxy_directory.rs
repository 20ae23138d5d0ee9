//! The L4 proxy and the directory together: a listener with no fixed backends routes each connection by the
//! directory's live table, so an instance that agents report is reachable through the proxy, a drained one
//! gets no new connections, and with no instance known the client is closed at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "directory_support/mod.rs"]
mod support;

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

fn through(proxy: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn proxy_routes_by_the_directory_and_respects_drain() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_addr();
    let proxy = free_addr();
    let config = format!(
        "{}[[proxy.listeners]]\nname = \"browse\"\nlisten = \"{proxy}\"\nrequest_type = \"browse\"\n",
        lb_config(api, &[])
    );
    let _lb = start("lb", api, &config, dir.path());

    // Nothing reported yet: the directory knows no instance, so the client is closed without data.
    assert_eq!(through(proxy), "");

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
    eventually(
        Duration::from_secs(10),
        "both instances to be picked through the proxy",
        || {
            let seen: std::collections::BTreeSet<String> = (0..40).map(|_| through(proxy)).collect();
            (seen.contains("A") && seen.contains("B")).then_some(())
        },
    );

    // Drain A on this balancer: new proxied connections all go to B.
    let token = format!("Bearer {}", support::TOKEN);
    let r = request(
        api,
        "POST",
        "/v1/servers/h1%2Fa/drain",
        &[("authorization", &token)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(
        Duration::from_secs(10),
        "drained instance to leave the proxy's choice",
        || (0..40).all(|_| through(proxy) == "B").then_some(()),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reporter.join().unwrap();
}
