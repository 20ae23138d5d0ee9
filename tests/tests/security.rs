//! The locked-down control plane: every mutating endpoint of the monitor, the balancers and the app's admin
//! API refuses a missing or wrong token (and refuses everything when no token is configured); defaults bind
//! to loopback; secrets never show in logs, `--print-config` or the dashboard; a secret file readable by
//! others draws a warning. (Report signatures are refused in `directory_reports.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use xcluster_tests::http::{get, request};
use xcluster_tests::{
    EXIT_DEADLINE, Proc, RunToExit, eventually, free_addr, wait_ready, write_file, xcluster_bin,
};

const TOKEN: &str = "tok-3f9a1c77e2";
const KEY: &str = "key-b81d44a0c9";

fn start(role: &str, sets: &[String]) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let listen = format!("listen=\"{addr}\"");
    let mut args = vec![role, "--set", listen.as_str()];
    for s in sets {
        args.extend(["--set", s.as_str()]);
    }
    let p = Proc::xcluster(role, &args);
    wait_ready(addr, Duration::from_secs(20));
    (p, addr)
}

/// Posts to each path with no token, a wrong one and a malformed header; each must be 401 `unauthorized`.
fn all_refused(what: &str, addr: std::net::SocketAddr, paths: &[&str]) {
    let wrong = format!("Bearer {TOKEN}x");
    let basic = format!("Basic {TOKEN}");
    let auths: [&[(&str, &str)]; 4] = [
        &[],
        &[("authorization", &wrong)],
        &[("authorization", &basic)],
        &[("authorization", "Bearer ")],
    ];
    for path in paths {
        for auth in auths {
            let r = request(addr, "POST", path, auth, Some(b"{}")).unwrap();
            assert_eq!(r.status, 401, "{what} POST {path} with {auth:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "unauthorized", "{what} {path}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what} {path}");
        }
    }
}

const MONITOR_POSTS: [&str; 5] = [
    "/v1/programs/x/stop",
    "/v1/programs/x/start",
    "/v1/reread",
    "/v1/update",
    "/v1/shutdown",
];
const LB_POSTS: [&str; 2] = ["/v1/servers/a1/drain", "/v1/servers/a1/undrain"];
const APP_POSTS: [&str; 8] = [
    "/admin/degrade",
    "/admin/credit",
    "/admin/settlements",
    "/v1/merchant/stock",
    "/v1/merchant/flash-sales/flash-1",
    "/v1/refunds",
    "/v1/payments/callback",
    "/v1/orders/o1/fulfil",
];

#[test]
fn mutating_endpoints_refuse_missing_and_wrong_tokens() {
    let (_lb, lb) = start("lb", &[format!("admin.token=\"{TOKEN}\"")]);
    all_refused("lb", lb, &LB_POSTS);
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        lb,
        "POST",
        "/v1/servers/a1/drain",
        &[("authorization", &auth)],
        None,
    )
    .unwrap();
    // The right token passes the check: the call is judged on its merits (no such instance here).
    assert_eq!(r.status, 404, "the right token is accepted: {}", r.body);
    assert_eq!(r.json()["error"]["code"], "unknown_instance");

    let (_app, app) = start("app", &[format!("admin_token=\"{TOKEN}\"")]);
    all_refused("app", app, &APP_POSTS);
    let r = request(
        app,
        "POST",
        "/admin/degrade",
        &[("authorization", &auth)],
        Some(br#"{"level":"auto"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 200, "the right token is accepted: {}", r.body);

    let (mut mon, m) = start("monitor", &[format!("token=\"{TOKEN}\"")]);
    all_refused("monitor", m, &MONITOR_POSTS);
    assert!(mon.is_running(), "a refused shutdown does not stop the monitor");
    // With the token, shutdown is answered before the monitor exits.
    let r = request(m, "POST", "/v1/shutdown", &[("authorization", &auth)], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        mon.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        mon.stderr()
    );
}

/// Without a configured token every mutation is refused, whatever is sent, with a 403 that names the
/// setting: no token can pass, so a 401 asking for one would mislead.
fn all_forbidden(what: &str, addr: std::net::SocketAddr, paths: &[&str], setting: &str) {
    let any = format!("Bearer {TOKEN}");
    for path in paths {
        for auth in [
            &[][..],
            &[("authorization", any.as_str())][..],
            &[("authorization", "Bearer ")][..],
        ] {
            let r = request(addr, "POST", path, auth, Some(b"{}")).unwrap();
            assert_eq!(r.status, 403, "{what} POST {path} with {auth:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "no_token", "{what} {path}");
            assert!(r.body.contains(setting), "{what} {path}: {}", r.body);
        }
    }
}

#[test]
fn without_a_configured_token_every_mutation_is_refused() {
    let (_lb, lb) = start("lb", &[]);
    all_forbidden("lb", lb, &LB_POSTS, "[admin] token");
    let (_app, app) = start("app", &[]);
    all_forbidden("app", app, &APP_POSTS, "admin_token");
    let (mut mon, m) = start("monitor", &[]);
    all_forbidden("monitor", m, &MONITOR_POSTS, "token or token_file");
    assert!(mon.is_running());
    // ctl says so, not that the token was wrong.
    let o = Command::new(xcluster_bin())
        .args(["ctl", "--url", &m.to_string(), "--token", TOKEN, "stop", "x"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(77), "{text}");
    assert!(text.contains("no token is configured"), "{text}");
}

fn print_config(role: &str, sets: &[String]) -> String {
    let mut args = vec![role.to_string(), "--print-config".into()];
    for s in sets {
        args.extend(["--set".into(), s.clone()]);
    }
    let out = Command::new(xcluster_bin())
        .args(&args)
        .output_within(EXIT_DEADLINE);
    assert!(
        out.status.success(),
        "{role}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn defaults_bind_to_loopback() {
    for role in ["lb", "agent", "monitor", "app"] {
        let text = print_config(role, &[]);
        let mut listens = 0;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("listen =") || line.starts_with("advertise =") {
                listens += 1;
                assert!(
                    line.contains("\"127.0.0.1:") || line.contains("\"[::1]:") || line.ends_with("\"\""),
                    "{role}: {line}"
                );
            }
        }
        assert!(listens >= 1, "{role} shows its listen address:\n{text}");
    }
}

#[test]
fn secrets_stay_out_of_print_config_logs_and_the_dashboard() {
    let cases: [(&str, Vec<String>); 4] = [
        (
            "lb",
            vec![
                format!("reports.key=\"{KEY}\""),
                format!("admin.token=\"{TOKEN}\""),
            ],
        ),
        ("agent", vec![format!("key=\"{KEY}\"")]),
        ("monitor", vec![format!("token=\"{TOKEN}\"")]),
        ("app", vec![format!("admin_token=\"{TOKEN}\"")]),
    ];
    for (role, sets) in &cases {
        let text = print_config(role, sets);
        assert!(!text.contains(KEY) && !text.contains(TOKEN), "{role}:\n{text}");
        assert!(
            text.contains("<redacted>"),
            "{role} shows that a secret is set:\n{text}"
        );

        // Debug logging, a reload and a refused call: still no secret in the log.
        let mut with_debug = sets.clone();
        with_debug.push("log.level=\"debug\"".into());
        let (p, addr) = start(role, &with_debug);
        // A call each role guards with its token (the agent has no token, nor a call that would take one).
        let guarded = match *role {
            "lb" => Some("/v1/servers/a1/drain"),
            "app" => Some("/admin/degrade"),
            "monitor" => Some("/v1/shutdown"),
            _ => None,
        };
        if let Some(path) = guarded {
            let r = request(addr, "POST", path, &[("authorization", "Bearer nope")], None).unwrap();
            assert_eq!(r.status, 401, "{role} POST {path}: {}", r.body);
        }
        p.signal(nix::sys::signal::Signal::SIGHUP);
        if *role == "monitor" {
            for path in ["/", "/v1/status", "/v1/events/recent"] {
                let r = get(addr, path).unwrap();
                assert_eq!(r.status, 200, "{path}");
                assert!(!r.body.contains(TOKEN), "monitor {path} shows the token");
            }
        }
        let metrics = get(addr, "/metrics").unwrap().body;
        assert!(
            !metrics.contains(KEY) && !metrics.contains(TOKEN),
            "{role} metrics"
        );
        eventually(Duration::from_secs(10), "the reload to be logged", || {
            p.stderr().contains("reload").then_some(())
        });
        let log = p.stderr();
        assert!(!log.contains(KEY) && !log.contains(TOKEN), "{role} log:\n{log}");
    }
}

#[test]
fn secret_files_readable_by_others_draw_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_file(dir.path(), "key", KEY);
    let token = write_file(dir.path(), "token", TOKEN);
    for (role, set, file) in [
        ("lb", "reports.key_file", &key),
        ("agent", "key_file", &key),
        ("monitor", "token_file", &token),
    ] {
        for (mode, warned) in [(0o644, true), (0o600, false)] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
            let (p, _addr) = start(role, &[format!("{set}=\"{}\"", file.display())]);
            let log = p.stderr();
            assert_eq!(
                log.contains("readable by group or others"),
                warned,
                "{role} with mode {mode:o}:\n{log}"
            );
            assert!(!log.contains(KEY) && !log.contains(TOKEN), "{role}:\n{log}");
        }
    }
}

/// A token written to the monitor's `token_file` applies without a signal, as an edit of its config does:
/// the file is part of the config. Before, the watcher knew only the config's own files, and the old token
/// kept working (and the new one was refused) until SIGHUP.
#[test]
fn a_rotated_token_file_applies_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(dir.path(), "token", TOKEN);
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addr = free_addr();
    let config = write_file(
        dir.path(),
        "monitor.toml",
        &format!(
            "role = \"monitor\"\nlisten = \"{addr}\"\nrun_dir = \"{}\"\ntoken_file = \"{}\"\n",
            dir.path().join("run").display(),
            token.display()
        ),
    );
    let mon = Proc::xcluster("monitor", &["monitor", "--config", config.to_str().unwrap()]);
    wait_ready(addr, Duration::from_secs(20));
    let status_with = |t: &str| {
        let auth = format!("Bearer {t}");
        let r = request(
            addr,
            "POST",
            "/v1/programs/x/stop",
            &[("authorization", &auth)],
            None,
        )
        .unwrap();
        r.status
    };
    assert_ne!(status_with(TOKEN), 401, "the token in force is accepted");
    let new = format!("{TOKEN}-rotated");
    std::fs::write(&token, &new).unwrap();
    eventually(Duration::from_secs(10), "the rotated token to apply", || {
        (status_with(&new) != 401).then_some(())
    });
    assert_eq!(status_with(TOKEN), 401, "{}", mon.stderr());
    assert!(mon.stderr().contains("config reloaded"), "{}", mon.stderr());
}
