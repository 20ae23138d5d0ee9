//! The dashboard in a real browser (headless Chromium): it shows the programs and the cluster view (a balancer
//! up with its instances and weights, one down), and a restart shows in it (new pid,
//! restart count, the transitions in the event list); its buttons, clicked, act with the typed token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monitor_common::*;
use xcluster_tests::browser::{Browser, headless_args};
use xcluster_tests::*;

/// Loads the page in headless Chromium and returns the DOM after its script ran.
fn dump(addr: std::net::SocketAddr) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut chrome = Proc::spawn(
        "chromium",
        std::path::Path::new("chromium"),
        Spawn {
            args: headless_args(
                profile.path(),
                &["--timeout=5000", "--dump-dom", &format!("http://{addr}/")],
            ),
            ..Default::default()
        },
    );
    assert_eq!(
        chrome.wait_exit(Duration::from_secs(20)),
        Some(0),
        "chromium: {}",
        chrome.stderr()
    );
    chrome.stdout()
}

fn row_of(dom: &str, name: &str) -> String {
    let row = dom
        .split(&format!("<tr data-name=\"{name}\">"))
        .nth(1)
        .unwrap_or_else(|| panic!("no row for {name} in the page: {dom}"));
    row[..row.find("</tr>").unwrap()].to_string()
}

#[test]
fn the_dashboard_shows_programs_and_the_cluster_and_reacts_to_a_restart() {
    let up = fake_balancer();
    // A "balancer" that accepts and hangs up: held by this test, so no other test can take its port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = dead.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in dead.incoming().take(100) {
            drop(s);
        }
    });
    // `pair` never becomes ready: a rolling restart of it stays on its first program.
    let m = Mon::start(&format!(
        "[cluster]\nbalancers = [\"{up}\", \"{down}\"]\n[programs.web]\ncommand = \"sleep 300\"\nstartsecs = 0\n\
         [programs.pair]\ncommand = \"sleep 300\"\nnumprocs = 2\nstartsecs = 0\n\
         [programs.pair.readiness]\ncommand = \"false\"\nperiod_ms = 60000\n\
         [groups.site]\nprograms = [\"web\", \"pair\"]\n[groups.solo]\nprograms = [\"web\"]\n"
    ));
    let p = m.wait_state("web", "RUNNING", T);
    let pid = p["pid"].as_i64().unwrap() as i32;

    let first = dump(m.addr);
    let row = row_of(&first, "web");
    assert!(
        row.contains("RUNNING") && row.contains(&format!(">{pid}<")),
        "{row}"
    );

    // A restart (through the API, as the page's button does) shows up in the page.
    let r = m.post("/v1/programs/web/restart");
    assert_eq!(r.status, 200, "{}", r.body);
    let new_pid = m.wait_new_pid("web", pid, T);
    let dom = dump(m.addr);
    let row = row_of(&dom, "web");
    assert!(row.contains("RUNNING"), "{row}");
    assert!(
        row.contains(&format!(">{new_pid}<")),
        "the page shows the new pid {new_pid}: {row}"
    );
    // Asked for: not one of the restarts the monitor counts (those it makes by itself).
    assert!(row.contains("class=\"restarts\">0<"), "{row}");
    assert!(
        dom.contains("web: RUNNING → STOPPING"),
        "the restart in the event list: {dom}"
    );
    // A crash the monitor restarts from is counted, and shows.
    kill9(new_pid);
    let revived = m.wait_new_pid("web", new_pid, T);
    let row = eventually(T, "the page to count the restart", || {
        let row = row_of(&dump(m.addr), "web");
        (row.contains(&format!(">{revived}<")) && row.contains("RUNNING")).then_some(row)
    });
    assert!(row.contains("class=\"restarts\">1<"), "{row}");
    // The cluster view: one balancer up with its instance, its weights and a drain button, the other down.
    assert!(
        dom.contains(&format!("<b>{up}</b> <span class=\"up\">up</span>")),
        "{dom}"
    );
    assert!(
        dom.contains("app-7")
            && dom.contains("<button data-drain=\"app-7\" data-action=\"drain\">drain</button>")
            && dom.contains(">7500<")
            && dom.contains(">25.0%<")
            && dom.contains(">50%<")
            && dom.contains("w(order)"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<b>{down}</b> <span class=\"down\">down</span>")),
        "{dom}"
    );
    // A group of several programs (a program's instances, or a `[groups.*]` section's) gets a rolling
    // restart button; a roll under way shows where it stands.
    assert!(
        dom.contains("<button data-roll=\"pair\">rolling restart pair:*</button>")
            && dom.contains("<button data-roll=\"site\">rolling restart site:*</button>")
            && !dom.contains("data-roll=\"web\"")
            && !dom.contains("data-roll=\"solo\""),
        "{dom}"
    );
    let r = m.post("/v1/programs/pair%3A*/restart?rolling=1");
    assert_eq!(r.status, 200, "{}", r.body);
    let dom = dump(m.addr);
    assert!(
        dom.contains("<div id=\"roll\">rolling restart 1: pair-0 restarting, pair-1 waiting</div>"),
        "{dom}"
    );
    // Its L4 proxy, per listener and per backend.
    assert!(
        dom.contains(
            "<tr data-listener=\"browse\"><td>browse</td><td>127.0.0.1:7400</td><td>browse</td><td>2</td><td>100</td><td>1234</td><td>1</td><td>4</td>\
             <td>5</td><td>6</td><td>16</td><td>3</td><td>7</td><td>9</td><td>17</td><td>0</td><td>11</td><td>14</td><td>2.0 KiB</td><td>5.0 MiB</td><td>10</td><td>unbound</td></tr>"
        ),
        "{dom}"
    );
    assert!(
        dom.contains(
            "<tr data-backend=\"127.0.0.1:7101\"><td>127.0.0.1:7101</td><td>2</td><td>64</td><td>1233</td><td>1</td><td>12</td><td>13</td>\
             <td>15</td><td>2.0 KiB</td><td>5.0 MiB</td><td>0 (drain)</td><td>3</td><td>0</td><td>failing</td><td>drained</td><td>backup</td>\
             <td><button data-drain=\"127.0.0.1:7101\" data-action=\"undrain\">undrain</button></td></tr>"
        ),
        "{dom}"
    );
}

/// A balancer whose one instance, `app-7`, can be drained: `/v1/status` shows it `up` until a
/// `POST /v1/servers/app-7/drain` comes, `drained` after. Returns its address and the head of each drain
/// request it got.
fn drainable_balancer() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for s in l.incoming().take(500) {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let body = if head.starts_with("POST /v1/servers/app-7/drain ") {
                seen.lock().unwrap().push(head);
                r#"{"id": "app-7", "state": "drained"}"#.to_string()
            } else {
                let state = if seen.lock().unwrap().is_empty() {
                    "up"
                } else {
                    "drained"
                };
                format!(
                    r#"{{"version": 1, "instances": [{{"id": "app-7", "addr": "127.0.0.1:7101", "state": "{state}",
                    "report_age_ms": 120, "cpu": 0.25, "weights": {{"browse": 7500}}}}]}}"#
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, heads)
}

/// The page's buttons, clicked with the mouse in the browser: without a token the monitor refuses a restart
/// and a drain, and the page says so until the next action (its refreshes keep the message); with the token
/// typed into its box, drain reaches the balancer with the monitor's token and the instance's button turns
/// to undrain, restart gives the program a new pid, and a group's rolling restart gives each of its programs
/// one.
#[test]
fn the_dashboard_buttons_act_with_the_typed_token() {
    let (balancer, drains) = drainable_balancer();
    let m = Mon::start(&format!(
        "[cluster]\nbalancers = [\"{balancer}\"]\n[programs.web]\ncommand = \"sleep 300\"\nstartsecs = 0\n\
         [programs.pair]\ncommand = \"sleep 300\"\nnumprocs = 2\nstartsecs = 0\n"
    ));
    let pid = m.wait_state("web", "RUNNING", T)["pid"].as_i64().unwrap() as i32;
    let mut b = Browser::open(&format!("http://{}/", m.addr));
    let drain = r#"button[data-drain="app-7"]"#;
    b.wait_for(
        T,
        "the drain button",
        &format!("document.querySelector('{drain}[data-action=\"drain\"]') !== null"),
    );

    let restart = r#"button[data-verb="restart"][data-name="web"]"#;
    let err = "document.getElementById('err').textContent";
    b.click(restart);
    let refused = b.wait_for(T, "the page to show the refusal", &format!("{err} || null"));
    assert!(
        refused.as_str().unwrap().starts_with("restart web: "),
        "{refused}"
    );
    // The message outlives the page's refreshes (the status bar's time changes with each).
    let bar = b.eval("document.getElementById('bar').textContent");
    b.wait_for(
        T,
        "a refresh of the page",
        &format!("document.getElementById('bar').textContent !== {bar}"),
    );
    assert_eq!(b.eval(err), refused, "a refresh wiped the message");
    assert_eq!(
        m.pid("web"),
        Some(pid),
        "a restart without the token went through"
    );

    b.click(drain);
    let refused = b.wait_for(
        T,
        "the page to show the drain's refusal",
        &format!("{err}.startsWith('drain app-7: ') || null"),
    );
    assert_eq!(refused, true);
    assert!(
        drains.lock().unwrap().is_empty(),
        "a drain without the token went through"
    );

    b.type_into("#token", TOKEN);
    b.click(drain);
    let head = eventually(T, "the drain to reach the balancer", || {
        drains.lock().unwrap().first().cloned()
    });
    assert!(
        head.contains(&format!("Authorization: Bearer {TOKEN}\r\n")),
        "{head}"
    );
    b.wait_for(
        T,
        "the button to turn to undrain",
        &format!("document.querySelector('{drain}[data-action=\"undrain\"]') !== null"),
    );
    assert_eq!(b.eval(err), "", "the page shows an error");

    b.click(restart);
    m.wait_new_pid("web", pid, T);

    let pairs: Vec<i32> = ["pair-0", "pair-1"]
        .iter()
        .map(|n| m.wait_state(n, "RUNNING", T)["pid"].as_i64().unwrap() as i32)
        .collect();
    b.click(r#"button[data-roll="pair"]"#);
    let roll = eventually(T, "the roll to end", || {
        let roll = m.status()["roll"].clone();
        (roll["finished"] == true).then_some(roll)
    });
    assert!(
        roll["programs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["step"] == "done"),
        "{roll}"
    );
    for (name, old) in ["pair-0", "pair-1"].iter().zip(pairs) {
        assert_ne!(m.pid(name), Some(old), "{name} kept its process");
    }
}
