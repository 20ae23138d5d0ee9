//! The dashboard in a real browser (headless Chromium): it shows the programs and the cluster view (a balancer
//! up with its instances and weights, one down), and a restart shows in it (new pid,
//! restart count, the transitions in the event list).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::time::Duration;

use monitor_common::*;
use xcluster_tests::*;

/// Loads the page in headless Chromium and returns the DOM after its script ran.
fn dump(addr: std::net::SocketAddr) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut chrome = Proc::spawn(
        "chromium",
        std::path::Path::new("chromium"),
        Spawn {
            args: [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--user-data-dir={}", profile.path().display()),
                "--timeout=5000",
                "--dump-dom",
                &format!("http://{addr}/"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
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
    let m = Mon::start(&format!(
        "[cluster]\nbalancers = [\"{up}\", \"{down}\"]\n[programs.web]\ncommand = \"sleep 300\"\nstartsecs = 0\n"
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
    assert!(row.contains("class=\"restarts\">1<"), "{row}");
    assert!(
        dom.contains("web: RUNNING → STOPPING"),
        "the restart in the event list: {dom}"
    );
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
            && dom.contains("w(order)"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<b>{down}</b> <span class=\"down\">down</span>")),
        "{dom}"
    );
    // Its L4 proxy, per listener and per backend.
    assert!(
        dom.contains(
            "<tr data-listener=\"browse\"><td>browse</td><td>2</td><td>1234</td><td>1</td><td>4</td><td>5</td>\
             <td>6</td><td>3</td><td>0</td><td>2.0 KiB</td><td>5.0 MiB</td></tr>"
        ),
        "{dom}"
    );
    assert!(
        dom.contains(
            "<tr data-backend=\"127.0.0.1:7101\"><td>127.0.0.1:7101</td><td>2</td><td>1233</td><td>1</td>\
             <td>2.0 KiB</td><td>5.0 MiB</td><td>failing</td><td>backup</td></tr>"
        ),
        "{dom}"
    );
}
