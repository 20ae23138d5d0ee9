//! Report ingestion and the client API's refusals on one real balancer, with reports the test signs
//! itself: forged, unsigned, replayed, stale, oversized and malformed reports are rejected, counted by
//! reason in `/metrics` and `/v1/status`, and change nothing; bad queries get clear 4xx JSON; a watch wakes
//! on an accepted report; request types reload live.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod directory_support;

use std::time::{Duration, Instant};

use directory_support::*;
use xcluster_proto::report::{AGENT_HEADER, MAX_REPORT_BYTES, SIGNATURE_HEADER, sign};
use xcluster_tests::*;

const WAIT: Duration = Duration::from_secs(20);

fn rejected(lb: std::net::SocketAddr, reason: &str) -> (f64, u64) {
    let m = get(lb, "/metrics").unwrap().body;
    let metric = metric_value(
        &m,
        "xcluster_lb_reports_rejected_total",
        &format!("reason=\"{reason}\""),
    )
    .unwrap_or(0.0);
    let status = get(lb, "/v1/status").unwrap().json();
    (metric, status["reports_rejected"][reason].as_u64().unwrap())
}

#[test]
fn bad_reports_are_rejected_counted_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let _p = start("lb", lb, &lb_config(lb, &[]), dir.path());
    let app: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let seq0 = 1_000;

    let good = report("t", seq0, now_ms(), &[("t/a", app, 0)]);
    let r = post_signed(lb, &good);
    assert_eq!(r.status, 200, "{}", r.body);
    // Reports are published within a few milliseconds (rebuilds are coalesced), not necessarily at once.
    let before = eventually(WAIT, "the accepted report to be published", || {
        let l = servers(lb, "browse");
        (l["servers"].as_array().unwrap().len() == 1).then_some(l)
    });

    // Each bad report: its status, its error code, and that it moved only its own counter.
    let body = |r: &xcluster_proto::report::LoadReport| serde_json::to_vec(r).unwrap();
    // One body, signed as sent: building the report twice could read the clock twice, and a millisecond
    // between them made the signature not match (a flaky `bad_signature` instead of `replay`).
    let signed = |r: xcluster_proto::report::LoadReport| {
        let (b, sig) = signed_body(&r);
        (b, Some(sig))
    };
    let loaded = report("t", seq0 + 1, now_ms(), &[("t/a", app, 99), ("t/evil", app, 0)]);
    let cases: Vec<(&str, u16, Vec<u8>, Option<String>)> = vec![
        (
            "bad_signature",
            401,
            body(&loaded),
            Some(sign(b"not-the-key", &body(&loaded))),
        ),
        ("bad_signature", 401, body(&loaded), Some("hmac-sha256=zz".into())),
        ("missing_signature", 401, body(&loaded), None),
        (
            "replay",
            409,
            body(&good),
            Some(sign(KEY.as_bytes(), &body(&good))),
        ),
        {
            let (b, sig) = signed(report("t", seq0 - 1, now_ms(), &[]));
            ("replay", 409, b, sig)
        },
        {
            let (b, sig) = signed(report("t", seq0 + 2, now_ms() - 60_000, &[]));
            ("skew", 400, b, sig)
        },
        {
            let (b, sig) = signed(report("t", seq0 + 3, now_ms() + 60_000, &[]));
            ("skew", 400, b, sig)
        },
        (
            "malformed",
            400,
            b"{\"agent\":".to_vec(),
            Some(sign(KEY.as_bytes(), b"{\"agent\":")),
        ),
        (
            "too_large",
            413,
            vec![b' '; MAX_REPORT_BYTES + 10],
            Some("hmac-sha256=00".into()),
        ),
    ];
    for (reason, status, b, sig) in cases {
        let (m0, s0) = rejected(lb, reason);
        let r = post_report(lb, &b, sig.as_deref());
        assert_eq!(r.status, status, "{reason}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], reason, "{}", r.body);
        if reason == "replay" {
            // The last number accepted, so a restarted agent whose clock stepped back can continue above it.
            assert_eq!(r.json()["error"]["last_seq"], seq0, "{}", r.body);
        }
        let (m1, s1) = rejected(lb, reason);
        assert_eq!(
            (m1 - m0, s1 - s0),
            (1.0, 1),
            "{reason} counted once in /metrics and /v1/status"
        );
    }
    let after = servers(lb, "browse");
    assert_eq!(
        after["version"], before["version"],
        "a rejected report changed the table"
    );
    assert_eq!(after["servers"], {
        // Only the report age may differ.
        let mut s = before["servers"].clone();
        s[0]["report_age_ms"] = after["servers"][0]["report_age_ms"].clone();
        s
    });
    let status = get(lb, "/v1/status").unwrap().json();
    assert_eq!(status["reports_accepted"], 1);

    // A watch on the current version wakes when an accepted report changes the table.
    let v = after["version"].as_u64().unwrap();
    let begun = watches_begun(lb);
    let watcher = std::thread::spawn(move || {
        let r = get(lb, &format!("/v1/servers?type=browse&watch={v}")).unwrap();
        (Instant::now(), r)
    });
    wait_watching(lb, begun);
    let sent = Instant::now();
    let r = post_signed(
        lb,
        &report("t", seq0 + 10, now_ms(), &[("t/a", app, 0), ("t/new", app, 0)]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (woke, w) = watcher.join().unwrap();
    assert_eq!(w.status, 200);
    assert_ne!(
        w.json()["version"].as_u64().unwrap(),
        v,
        "watch timed out instead of waking"
    );
    assert!(entry(&w.json(), "t/new").is_some());
    println!(
        "watch woke {:?} after the report was sent",
        woke.saturating_duration_since(sent)
    );
}

#[test]
fn bad_queries_get_clear_4xx_json_and_types_reload_live() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let cfg = lb_config(lb, &[]);
    let path = write_file(dir.path(), "lb.toml", &cfg);
    let _p = Proc::xcluster("lb", &["lb", "--config", path.to_str().unwrap()]);
    wait_ready(lb, WAIT);

    let expect = |method: &str, path: &str, status: u16, code: &str| {
        let r = request(lb, method, path, &[], None).unwrap();
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], code, "{method} {path}: {}", r.body);
    };
    expect("GET", "/v1/servers?type=nope", 404, "unknown_type");
    expect("GET", "/v1/pick?type=nope", 404, "unknown_type");
    expect("GET", "/v1/servers", 400, "bad_query");
    expect("GET", "/v1/servers?type=browse&watch=abc", 400, "bad_query");
    expect("GET", "/v1/servers?type=browse&type=compute", 400, "bad_query");
    expect("GET", "/v1/servers?type=%zz", 400, "bad_query");
    expect("GET", "/v1/pick?type=browse&watch=1", 400, "bad_query");
    expect("GET", "/v1/pick?type=browse", 503, "no_instance");
    expect("DELETE", "/v1/servers", 405, "method_not_allowed");
    for (method, path, allow) in [
        ("POST", "/v1/servers", "GET"),
        ("GET", "/v1/reports", "POST"),
        ("GET", "/v1/servers/x/drain", "POST"),
    ] {
        let r = request(lb, method, path, &[], None).unwrap();
        assert_eq!(
            (r.status, r.header("allow")),
            (405, Some(allow)),
            "{method} {path}"
        );
    }
    expect("POST", "/v1/servers/x/drain", 401, "unauthorized");
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        lb,
        "POST",
        "/v1/servers/x/drain",
        &[("authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("unknown_instance"))
    );
    expect("GET", "/v1/nothing", 404, "not_found");
    // An unknown type names the known ones.
    let r = get(lb, "/v1/servers?type=nope").unwrap();
    assert!(r.body.contains("browse, compute"), "{}", r.body);

    // A new request type, added to the file, is served without a restart.
    let with_pay = format!("{cfg}[types.pay]\ncpu = 0.5\nmem = 0.1\nqueue = 0.4\ncost = 4.0\n");
    let tmp = write_file(dir.path(), ".lb.toml.swp", &with_pay);
    std::fs::rename(&tmp, &path).unwrap();
    eventually(WAIT, "type pay to be served after reload", || {
        (get(lb, "/v1/servers?type=pay").unwrap().status == 200).then_some(())
    });
    // An invalid profile is refused and the old types stay.
    write_file(
        dir.path(),
        "lb.toml",
        &format!("{with_pay}[types.bad]\ncpu = 2.0\n"),
    );
    eventually(WAIT, "invalid reload to be rejected", || {
        let m = get(lb, "/metrics").unwrap().body;
        metric_value(&m, "xcluster_config_reload_failures_total", "").filter(|v| *v >= 1.0)
    });
    assert_eq!(get(lb, "/v1/servers?type=pay").unwrap().status, 200);
    assert_eq!(get(lb, "/v1/servers?type=bad").unwrap().status, 404);

    // `listen` needs a restart: a reload naming another address changes the rest, and the balancer goes
    // on advertising the address it serves on, not one nothing listens on.
    let elsewhere = free_addr();
    let moved = with_pay.replace(
        &format!("listen = \"{lb}\""),
        &format!("listen = \"{elsewhere}\""),
    );
    let moved = format!("{moved}[types.later]\ncpu = 0.5\nmem = 0.1\nqueue = 0.4\ncost = 1.0\n");
    let tmp = write_file(dir.path(), ".lb.toml.swp", &moved);
    std::fs::rename(&tmp, &path).unwrap();
    eventually(WAIT, "the reload with another listen applied", || {
        (get(lb, "/v1/servers?type=later").unwrap().status == 200).then_some(())
    });
    let list = get(lb, "/v1/servers?type=later").unwrap().json();
    assert_eq!(list["balancers"][0], lb.to_string(), "{list}");
    assert_eq!(get(lb, "/v1/status").unwrap().json()["balancer"], lb.to_string());
}

/// Two agents under one `agent_id` (a copied config): the one that reported first keeps its instances, the
/// other is refused as a conflict, counted, and both sides say so in their logs; once the first stops (as a
/// restart would), the other takes over. Before, the later-started agent won every sequence check, its
/// report dropped the first one's instances, and the first was then locked out for `forget_after`.
#[test]
fn a_second_agent_under_one_id_is_refused_and_takes_over_once_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let lb_proc = start("lb", lb, &lb_config(lb, &[]), dir.path());
    let (app_a, app_b) = (FakeApp::start("a"), FakeApp::start("b"));
    let (ag1, ag2) = (free_addr(), free_addr());
    let first = start(
        "agent",
        ag1,
        &agent_config(ag1, "dup", &[lb], &[("dup/a", &app_a)]),
        dir.path(),
    );
    let listed = |id: &str| entry(&servers(lb, "browse"), id).is_some();
    eventually(WAIT, "the first agent's instance listed", || {
        listed("dup/a").then_some(())
    });
    let second = start(
        "agent",
        ag2,
        &agent_config(ag2, "dup", &[lb], &[("dup/b", &app_b)]),
        dir.path(),
    );
    eventually(WAIT, "the second agent's reports refused as conflicts", || {
        (rejected(lb, "conflict").1 >= 3).then_some(())
    });
    assert!(listed("dup/a") && !listed("dup/b"), "{}", servers(lb, "browse"));
    eventually(WAIT, "both logs to say so", || {
        (lb_proc.stderr().contains("two agents share this agent_id")
            && second.stderr().contains("load report not accepted"))
        .then_some(())
    });
    drop(first);
    eventually(WAIT, "the second agent to take over", || {
        (listed("dup/b") && !listed("dup/a")).then_some(())
    });
    eventually(WAIT, "the second agent to say its reports are accepted", || {
        second
            .stderr()
            .contains("load reports accepted again")
            .then_some(())
    });
}

/// An agent restarted after its host's clock stepped back (its predecessor's clock an hour ahead) numbers
/// its reports below the last one the balancer accepted under its id: refused as a replay, it continues
/// above the number the refusal names and is heard at its next report. Before, every balancer refused it
/// until it forgot the id (`forget_after_ms`, 60 s here), the host's instances out of every list meanwhile.
#[test]
fn an_agent_restarted_after_its_clock_stepped_back_continues_above_its_predecessor() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let _lb = start("lb", lb, &lb_config(lb, &[]), dir.path());
    let app = FakeApp::start("a");
    let hour_ahead = (now_ms() + 3_600_000) * 1000;
    let mut before = report("stepped", hour_ahead, now_ms(), &[("stepped/a", app.addr, 0)]);
    before.boot = hour_ahead;
    let r = post_signed(lb, &before);
    assert_eq!(r.status, 200, "{}", r.body);
    let ag = free_addr();
    let agent = start(
        "agent",
        ag,
        &agent_config(ag, "stepped", &[lb], &[("stepped/a", &app)]),
        dir.path(),
    );
    eventually(WAIT, "the restarted agent's report refused as a replay", || {
        (rejected(lb, "replay").1 >= 1).then_some(())
    });
    eventually(
        WAIT,
        "the restarted agent to be heard above its predecessor",
        || {
            agent
                .stderr()
                .contains("load reports accepted again")
                .then_some(())
        },
    );
    assert!(
        agent.stderr().contains("numbering the next report above them"),
        "{}",
        agent.stderr()
    );
    // Listed on the agent's own reports: the predecessor's expired with report_ttl_ms (1.5 s), which the
    // agent had to stay silent for before its reports were a restart's and not a second agent's.
    eventually(WAIT, "the instance listed", || {
        entry(&servers(lb, "browse"), "stepped/a").map(|_| ())
    });
}

/// An agent that reports less often than the balancer's `report_ttl_ms` (an `interval_ms` set on another
/// host) is warned about: its instance left the lists between reports and slow-started again at each one,
/// for ever at a fraction of its weight, and nothing said so.
#[test]
fn an_agent_reporting_less_often_than_the_ttl_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let lb = free_addr();
    let lb_proc = start("lb", lb, &lb_config(lb, &[]), dir.path());
    let app = FakeApp::start("a");
    let ag = free_addr();
    // The test balancer's report_ttl_ms is 1500.
    let slow = agent_config(ag, "rare", &[lb], &[("rare/a", &app)])
        .replace("interval_ms = 500", "interval_ms = 2000");
    let _agent = start("agent", ag, &slow, dir.path());
    eventually(WAIT, "the balancer to warn of the agent", || {
        let log = lb_proc.stderr();
        (log.contains("reports less often than [directory] report_ttl_ms") && log.contains("rare"))
            .then_some(())
    });
}

/// An agent with its own key (`[reports.agent_keys]`): a real agent signing with it is heard; the shared key,
/// or its key naming another agent, speaks for no one else, refused as `wrong_key` (403), counted and
/// changing nothing. A balancer that drops the agent's entry (a reload) then refuses its key.
#[test]
fn an_agent_with_its_own_key_is_heard_and_its_key_speaks_for_no_one_else() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let own_key = "host-a-own-key-0123456789";
    let key_file = write_file(dir.path(), "host-a.key", &format!("{own_key}\n"));
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let lb = free_addr();
    let with_keys = format!(
        "{}[reports.agent_keys]\n\"host-a\" = {key_file:?}\n",
        lb_config(lb, &[])
    );
    let lb_proc = start("lb", lb, &with_keys, dir.path());
    let app = FakeApp::start("a");
    let ag = free_addr();
    let agent_cfg = agent_config(ag, "host-a", &[lb], &[("host-a/app", &app)])
        .replace(&format!("key = \"{KEY}\""), &format!("key_file = {key_file:?}"));
    let agent = start("agent", ag, &agent_cfg, dir.path());
    let listed = |id: &str| entry(&servers(lb, "browse"), id).is_some();
    eventually(WAIT, "the agent's instance listed", || {
        listed("host-a/app").then_some(())
    });

    // Anyone with the shared key, speaking for host-a; host-a's key speaking for another agent.
    let forged = report("host-a", u64::MAX / 2, now_ms(), &[("host-a/evil", app.addr, 0)]);
    let other = report("host-b", 1, now_ms(), &[("host-b/evil", app.addr, 0)]);
    let other_body = serde_json::to_vec(&other).unwrap();
    let other_sig = sign(own_key.as_bytes(), &other_body);
    let headers = [(SIGNATURE_HEADER, other_sig.as_str()), (AGENT_HEADER, "host-a")];
    let before = rejected(lb, "wrong_key");
    for r in [
        post_signed(lb, &forged),
        request(lb, "POST", "/v1/reports", &headers, Some(&other_body)).unwrap(),
    ] {
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "wrong_key", "{}", r.body);
    }
    assert_eq!(rejected(lb, "wrong_key"), (before.0 + 2.0, before.1 + 2));
    let list = servers(lb, "browse");
    assert!(
        entry(&list, "host-a/evil").is_none() && entry(&list, "host-b/evil").is_none(),
        "{list}"
    );
    assert!(listed("host-a/app"), "{list}");

    // host-a's instance ids are its own: the shared key cannot report one (at an address of its choosing),
    // nor can host-a's key report an id outside them.
    let taken = report("host-c", 1, now_ms(), &[("host-a/app", app.addr, 0)]);
    let stray = report(
        "host-a",
        u64::MAX / 2,
        now_ms(),
        &[("elsewhere/app", app.addr, 0)],
    );
    let stray_body = serde_json::to_vec(&stray).unwrap();
    let stray_sig = sign(own_key.as_bytes(), &stray_body);
    let headers = [(SIGNATURE_HEADER, stray_sig.as_str()), (AGENT_HEADER, "host-a")];
    for r in [
        post_signed(lb, &taken),
        request(lb, "POST", "/v1/reports", &headers, Some(&stray_body)).unwrap(),
    ] {
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "foreign_instance", "{}", r.body);
    }
    assert_eq!(rejected(lb, "foreign_instance").1, 2);
    assert!(listed("host-a/app"));

    // Without its entry, host-a's own key is checked as the shared key's stand-in, and fails.
    write_file(dir.path(), &format!("lb-{}.toml", lb.port()), &lb_config(lb, &[]));
    eventually(WAIT, "the reloaded balancer to refuse host-a's key", || {
        (rejected(lb, "bad_signature").1 >= 2).then_some(())
    });
    assert!(
        agent.stderr().contains("load report not accepted"),
        "{}",
        agent.stderr()
    );
    drop(lb_proc);
}
