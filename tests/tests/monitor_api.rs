//! The monitor's API beyond the programs: its event stream resumed after a reconnect, its own settings
//! applied by a reload that holds the programs' changes, and cluster actions a balancer took but did not
//! answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use monitor_common::*;
use xcluster_tests::*;

/// Opens `GET /v1/events<query>` with `headers` and reads until `until` holds for what arrived.
fn read_events(addr: SocketAddr, query: &str, headers: &str, until: impl Fn(&str) -> bool) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "GET /v1/events{query} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 8192];
    while !until(&seen) {
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("{e} after: {seen}"));
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

/// The SSE ids in a stream, in order: (boot, seq).
fn ids(stream: &str) -> Vec<(u64, u64)> {
    stream
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|id| {
            let (b, s) = id.split_once('-').unwrap_or_else(|| panic!("id {id:?}"));
            (b.parse().unwrap(), s.parse().unwrap())
        })
        .collect()
}

/// A client that reconnects with `Last-Event-ID` gets only what it missed; one whose id is of another
/// monitor process (a restart: numbers start again) gets the history; `?history=N` caps the replay. Before,
/// ids were bare numbers, so a dashboard that outlived a restart dropped every new event as seen, and each
/// reconnect replayed the whole history.
#[test]
fn the_event_stream_resumes_after_the_last_event_id() {
    let m = Mon::start("[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n");
    m.wait_state("x", "RUNNING", T);
    let first = read_events(m.addr, "", "", |s| s.contains("\"to\":\"RUNNING\""));
    let history = ids(&first);
    assert!(history.len() >= 2, "{first}");
    let (boot, last) = *history.last().unwrap();
    assert!(history.iter().all(|&(b, _)| b == boot), "{first}");

    // Resumed after the last one seen: a restart's events, and nothing from before.
    let restarted = std::thread::spawn({
        let addr = m.addr;
        move || {
            read_events(addr, "", &format!("Last-Event-ID: {boot}-{last}\r\n"), |s| {
                s.contains("\"to\":\"STOPPING\"")
            })
        }
    });
    // Whether the stream opens before or after the restart, its events come after `last`.
    let r = m.post("/v1/programs/x/restart");
    assert_eq!(r.status, 200, "{}", r.body);
    let resumed = restarted.join().unwrap();
    let got = ids(&resumed);
    assert!(!got.is_empty(), "{resumed}");
    assert!(
        got.iter().all(|&(b, s)| b == boot && s > last),
        "replayed what was seen: {resumed}"
    );

    // An id of another process: its history, from the first event.
    let other = read_events(
        m.addr,
        "",
        &format!("Last-Event-ID: {}-{last}\r\n", boot + 1),
        |s| ids(s).len() > last as usize,
    );
    assert_eq!(ids(&other)[0], (boot, 1), "{other}");

    // At most `history` events back.
    let capped = read_events(m.addr, "?history=1", "", |s| !ids(s).is_empty());
    assert!(ids(&capped)[0].1 > last, "only the newest: {capped}");
    let r = get(m.addr, "/v1/events?history=lots").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "bad_query", "{}", r.body);
}

/// With `auto_update = false` a reload holds the programs' changes, but the monitor's own settings apply:
/// a larger `events_history` keeps more events at once. Before, only an update set it, and with no program
/// changed there was nothing to update.
#[test]
fn a_changed_events_history_applies_while_program_changes_wait() {
    let program = "[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n";
    let m = Mon::start(&format!("auto_update = false\nevents_history = 3\n{program}"));
    m.wait_state("x", "RUNNING", T);
    let restart = |m: &Mon| {
        let r = m.post("/v1/programs/x/restart");
        assert_eq!(r.status, 200, "{}", r.body);
    };
    restart(&m);
    m.wait_state("x", "RUNNING", T);
    assert_eq!(m.events().len(), 3, "{:?}", m.events());
    let reloads = m.status()["reload"]["reloads"].as_u64().unwrap();
    m.rewrite(&format!("auto_update = false\nevents_history = 50\n{program}"));
    eventually(T, "the reload applied", || {
        (m.status()["reload"]["reloads"].as_u64().unwrap() > reloads).then_some(())
    });
    restart(&m);
    // A restart is STOPPING, STOPPED, STARTING and RUNNING: more than 3 kept once the larger size applies.
    eventually(T, "more than 3 events kept", || {
        (m.events().len() > 3).then_some(())
    });
}

/// A balancer that takes a drain and does not answer it in time may have applied it: the outcome says so
/// (`unknown`, exit 1), not that the balancer is down (exit 3), which sent operators to restart a healthy one.
#[test]
fn a_drain_a_balancer_took_but_did_not_answer_is_not_called_down() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bal = silent.local_addr().unwrap();
    // Reads the request and holds the connection without a word, until the test ends.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            held.push(s);
        }
    });
    let m = Mon::start(&format!(
        "[cluster]\nbalancers = [\"{bal}\"]\n[programs.x]\ncommand = \"sleep 300\"\nstartsecs = 0\n"
    ));
    let o = m.ctl(&["drain", "app-1"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("may have been applied"), "{text}");
    assert!(!text.contains("down"), "{text}");
}
