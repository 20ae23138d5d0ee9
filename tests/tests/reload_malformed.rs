//! A malformed config on live reload never applies: for every role, many broken variants (shared ones —
//! bad TOML, bad bytes, unknown keys, wrong types, out-of-range values, a wrong role, an oversized file —
//! and the role's own) are saved over the running config one after another. Each is rejected and counted,
//! nothing is applied, the daemon keeps serving, and a valid change afterwards still applies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use xcluster_tests::http::get;
use xcluster_tests::{Proc, eventually, free_addr, metric_value, wait_ready, write_file};

/// Saves `bytes` over `path` the way editors do (write a new file, rename it over the old one).
fn save(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Variants every role must refuse, each appended to (or replacing) the role's valid base.
fn shared_variants(role: &str, base: &str) -> Vec<(String, Vec<u8>)> {
    let add = |name: &str, extra: &str| (name.to_string(), format!("{base}\n{extra}\n").into_bytes());
    let other_role = if role == "app" { "lb" } else { "app" };
    let mut v = vec![
        add("syntax error", "this is = = not toml"),
        add("unterminated string", "[log]\nlevel = \"info"),
        add("duplicate key", "[log]\nlevel = \"info\"\nlevel = \"debug\""),
        add(
            "duplicate table",
            "[shutdown]\ngrace_ms = 1\n[shutdown]\ngrace_ms = 2",
        ),
        add("unknown top-level key", "bogus = true"),
        add(
            "unknown key in a section",
            "[log]\nlevel = \"info\"\ncolour = true",
        ),
        add("unknown section", "[nonsense]\nx = 1"),
        add("table given as array", "log = [1, 2]"),
        add("string for a number", "[shutdown]\ngrace_ms = \"ten\""),
        add("negative duration", "[shutdown]\ngrace_ms = -5"),
        add("float for an integer", "[http]\nmax_connections = 1.5"),
        add("duration out of range", "[shutdown]\ngrace_ms = 99999999999"),
        add("bad log filter", "[log]\nlevel = \"xcluster=notalevel[\""),
        add("zero connections", "[http]\nmax_connections = 0"),
        add(
            "header bound below hyper's minimum",
            "[http]\nmax_header_bytes = 100",
        ),
        add("header timeout too short", "[http]\nheader_read_timeout_ms = 1"),
        add("body bound too large", "[http]\nmax_body_bytes = 999999999999"),
        add("unknown http key", "[http]\nmax_requests = 5"),
        (
            "another role's config".into(),
            base.replacen(
                &format!("role = \"{role}\""),
                &format!("role = \"{other_role}\""),
                1,
            )
            .into_bytes(),
        ),
        (
            "role of the wrong type".into(),
            base.replacen(&format!("role = \"{role}\""), "role = 5", 1)
                .into_bytes(),
        ),
        ("invalid listen address".into(), {
            let mut text = String::new();
            for line in base.lines() {
                if line.starts_with("listen") {
                    text.push_str("listen = \"nowhere\"\n");
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
            text.into_bytes()
        }),
        ("not utf-8".into(), {
            let mut b = base.as_bytes().to_vec();
            b.extend_from_slice(b"\n# \xff\xfe\n");
            b
        }),
        ("larger than the bound".into(), {
            let mut b = base.as_bytes().to_vec();
            b.extend_from_slice(format!("\n# {}\n", "x".repeat(1024 * 1024 + 10)).as_bytes());
            b
        }),
        ("empty document with a bad role".into(), b"role = \"\"\n".to_vec()),
    ];
    v.retain(|(_, b)| b != base.as_bytes());
    v
}

fn role_variants(role: &str, base: &str) -> Vec<(String, Vec<u8>)> {
    let add = |name: &str, extra: &str| (name.to_string(), format!("{base}\n{extra}\n").into_bytes());
    match role {
        "lb" => vec![
            add("skew below the minimum", "[reports]\nskew_ms = 1"),
            add("no agents allowed", "[reports]\nmax_agents = 0"),
            add(
                "key and key_file both",
                "[reports]\nkey = \"k\"\nkey_file = \"/etc/hostname\"",
            ),
            add(
                "missing key file",
                "[reports]\nkey_file = \"/nonexistent/xcluster/key\"",
            ),
            add("panic threshold above one", "[directory]\npanic_threshold = 2.0"),
            add(
                "negative type cost",
                "[types.browse]\ncpu = 1.0\nmem = 0.0\nqueue = 0.0\ncost = -1.0",
            ),
            add("bad peer address", "peers = [\"not-an-addr\"]"),
            add("unknown proxy key", "[proxy]\nturbo = true"),
        ],
        "agent" => vec![
            add("zero interval", "interval_ms = 0"),
            add("zero timeout", "timeout_ms = 0"),
            add("bad balancer address", "balancers = [\"nope\"]"),
            add(
                "instance with a bad addr",
                "[[instances]]\nid = \"a1\"\naddr = \"x\"",
            ),
            add(
                "instance with an unknown key",
                "[[instances]]\nid = \"a1\"\naddr = \"127.0.0.1:1\"\nweight = 3",
            ),
            add("missing key file", "key_file = \"/nonexistent/xcluster/key\""),
        ],
        "monitor" => vec![
            add("program without a command", "[programs.p]\nnumprocs = 1"),
            add(
                "zero numprocs",
                "[programs.p]\ncommand = \"sleep 1\"\nnumprocs = 0",
            ),
            add(
                "unknown dependency",
                "[programs.p]\ncommand = \"sleep 1\"\ndepends_on = [\"ghost\"]",
            ),
            add(
                "dependency cycle",
                "[programs.p]\ncommand = \"sleep 1\"\ndepends_on = [\"q\"]\n[programs.q]\ncommand = \"sleep 1\"\ndepends_on = [\"p\"]",
            ),
            add(
                "bad autorestart",
                "[programs.p]\ncommand = \"sleep 1\"\nautorestart = \"sometimes\"",
            ),
            add(
                "bad stop signal",
                "[programs.p]\ncommand = \"sleep 1\"\nstopsignal = \"NOPE\"",
            ),
            add(
                "unknown program key",
                "[programs.p]\ncommand = \"sleep 1\"\nrestart_always = true",
            ),
            add(
                "missing token file",
                "token_file = \"/nonexistent/xcluster/token\"",
            ),
            add("endless token file", "token_file = \"/dev/zero\""),
        ],
        _ => vec![
            add("zero capacity", "capacity = 0"),
            add("tiny body bound", "max_body_bytes = 1"),
            add("unknown store", "store = \"mongo\""),
            add("zero reservation ttl", "reservation_ttl_ms = 0"),
            add("unknown degrade key", "[degrade]\nturbo = true"),
            add("zero store threads", "store_threads = 0"),
        ],
    }
}

fn counter(addr: std::net::SocketAddr, role: &str, name: &str) -> f64 {
    let m = get(addr, "/metrics").unwrap().body;
    metric_value(&m, name, &format!("role=\"{role}\"")).unwrap_or(0.0)
}

fn check_role(role: &str, extra_base: &str) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let base = format!("role = \"{role}\"\nlisten = \"{addr}\"\n{extra_base}");
    let path = write_file(dir.path(), &format!("{role}.toml"), &base);
    let mut p = Proc::xcluster(role, &[role, "--config", path.to_str().unwrap()]);
    wait_ready(addr, Duration::from_secs(20));
    let pid = p.pid();
    let reloads = |a| counter(a, role, "xcluster_config_reloads_total");
    let failures = |a| counter(a, role, "xcluster_config_reload_failures_total");
    let applied = reloads(addr);

    let mut variants = shared_variants(role, &base);
    variants.extend(role_variants(role, &base));
    assert!(variants.len() >= 20, "{role}: only {} variants", variants.len());
    for (i, (name, bytes)) in variants.iter().enumerate() {
        let before = failures(addr);
        save(&path, bytes);
        eventually(
            Duration::from_secs(10),
            &format!("{role}: {name:?} to be rejected"),
            || (failures(addr) > before).then_some(()),
        );
        assert_eq!(
            reloads(addr),
            applied,
            "{role}: {name:?} (variant {i}) was applied"
        );
        assert_eq!(get(addr, "/readyz").unwrap().status, 200, "{role} after {name:?}");
    }
    assert!(p.is_running(), "{role}: {}", p.stderr());
    assert_eq!(p.pid(), pid);
    assert!(p.stderr().contains("config reload rejected"), "{role}");

    // The reload path still works: a valid change applies.
    save(&path, format!("{base}\n[log]\nlevel = \"debug\"\n").as_bytes());
    eventually(
        Duration::from_secs(10),
        &format!("{role}: the valid change to apply"),
        || (reloads(addr) > applied).then_some(()),
    );
    assert!(
        p.stderr().contains("log.level: \"info\" -> \"debug\""),
        "{role}: {}",
        p.stderr()
    );
}

#[test]
fn lb_rejects_every_malformed_reload() {
    check_role("lb", "");
}

#[test]
fn agent_rejects_every_malformed_reload() {
    check_role("agent", "");
}

#[test]
fn monitor_rejects_every_malformed_reload() {
    check_role("monitor", "");
}

#[test]
fn app_rejects_every_malformed_reload() {
    check_role("app", "");
}
