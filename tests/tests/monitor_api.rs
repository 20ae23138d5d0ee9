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

/// `ctl tail -f` says when its monitor goes: one that does not answer within `--timeout-secs` (stopped) is
/// unreachable, 69, where the follow waited on it for ever; and a stream the monitor's death cut short is
/// no normal end (it exited 0).
#[test]
fn tail_f_tells_a_monitor_that_stopped_answering_or_died() {
    use nix::sys::signal::Signal;
    let m = Mon::start(
        "[programs.x]\ncommand = \"sh -c 'while :; do echo tick; sleep 0.2; done'\"\nstartsecs = 0\n",
    );
    m.wait_state("x", "RUNNING", T);
    let url = format!("http://{}", m.addr);
    m.proc.signal(Signal::SIGSTOP);
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &url, "--timeout-secs", "1", "tail", "-f", "x"])
        .output_within(EXIT_DEADLINE);
    m.proc.signal(Signal::SIGCONT);
    assert_eq!(o.status.code(), Some(69), "{}", out(&o));
    let mut follow = Proc::xcluster("tail-f", &["ctl", "--url", &url, "tail", "-f", "x"]);
    eventually(T, "tail -f to show the program's output", || {
        follow.stdout().contains("tick").then_some(())
    });
    m.proc.signal(Signal::SIGKILL);
    assert_eq!(follow.wait_exit(T), Some(69), "{}", follow.stderr());
    assert!(
        follow.stderr().contains("closed the stream"),
        "{}",
        follow.stderr()
    );
}

/// `ctl` pointed at a server that is no XCluster API (its errors are HTML pages) says so in a line, as it
/// does for a balancer's API, and exits 69 (no monitor there): it dumped the whole page and exited 1.
#[test]
fn ctl_at_a_server_that_is_no_xcluster_api_says_so() {
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = web.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in web.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let page = "<html>\n<head><title>404 Not Found</title></head>\n<body>nope</body>\n</html>\n";
            let _ = write!(
                s,
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let o = std::process::Command::new(xcluster_bin())
        .args(["ctl", "--url", &format!("http://{addr}"), "status"])
        .output_within(EXIT_DEADLINE);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(69), "{text}");
    assert!(text.contains("not as an XCluster monitor"), "{text}");
    assert!(!text.contains("<body>"), "the page dumped: {text}");
}

/// A `--url` without its port, with a user part or with a path, is a usage error naming what is missing (64), not the
/// resolver's "invalid socket address".
#[test]
fn a_url_without_its_port_is_a_usage_error_that_says_so() {
    for (url, says) in [
        ("http://127.0.0.1", "with the port"),
        ("http://user@127.0.0.1:7300", "without a user part"),
        ("ftp://127.0.0.1:7300", "must be http://HOST:PORT"),
        // Every call goes to the monitor's own paths: a gateway's prefix was dropped without a word.
        ("http://127.0.0.1:7300/monitor", "without a path"),
    ] {
        let o = std::process::Command::new(xcluster_bin())
            .args(["ctl", "--url", url, "status"])
            .output_within(EXIT_DEADLINE);
        assert_eq!(o.status.code(), Some(64), "{url}: {}", out(&o));
        assert!(out(&o).contains(says), "{url}: {}", out(&o));
    }
}
