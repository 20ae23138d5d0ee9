//! Prometheus as an operator plugs it in on day one: the shipped scrape config and alert rules
//! (`configs/prometheus/`) pass `promtool`, the rules' unit tests (`alerts_test.yml`) pass, every role's
//! `/metrics` in the local cluster passes `promtool check metrics`, and every metric an alert reads is one
//! the real roles serve — so renaming a metric fails here instead of silently disabling its alert.
//!
//! `promtool` comes with Debian's `prometheus` package, which `scripts/install-deps` installs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod local_cluster;
mod monitor_common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use local_cluster::LocalCluster;
use xcluster_tests::*;

/// Metrics an alert reads that the local cluster's roles do not write. Each must still be declared in a
/// `metric_names!` list (checked), so a rename fails here too.
const NOT_IN_THE_LOCAL_CLUSTER: [&str; 1] = [
    // Only with a Redis seckill gate configured (at 0 from the start then).
    "xcluster_app_redis_gate_total",
];

fn prometheus_dir() -> PathBuf {
    workspace_root().join("configs/prometheus")
}

/// Runs `promtool ARGS` with `stdin` (if any); returns whether it succeeded and what it printed. Fails the
/// test when promtool is missing: the checks here must not pass by not running.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(workspace_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's `prometheus` package (scripts/install-deps)")
        });
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn the_shipped_scrape_config_and_alert_rules_pass_promtool_check() {
    let dir = prometheus_dir();
    let config = dir.join("prometheus.yml");
    let (ok, out) = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(ok, "promtool check config:\n{out}");
    // It checks the rule files the config names, so the config must name alerts.yml.
    assert!(
        out.contains("alerts.yml"),
        "prometheus.yml does not load alerts.yml:\n{out}"
    );
    let rules = dir.join("alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
}

#[test]
fn the_alert_rules_unit_tests_pass() {
    let tests = prometheus_dir().join("alerts_test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok, "promtool test rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The metric names the alert rules' expressions read: what is left of each `expr` once label matchers,
/// `by (...)`/`on (...)` lists, ranges, strings, numbers and PromQL's own words are taken out.
fn alert_metric_names(rules: &str) -> BTreeSet<String> {
    const PROMQL: [&str; 18] = [
        "rate",
        "increase",
        "max_over_time",
        "sum",
        "count",
        "max",
        "min",
        "avg",
        "and",
        "or",
        "unless",
        "by",
        "on",
        "without",
        "ignoring",
        "bool",
        "group_left",
        "group_right",
    ];
    let mut exprs = Vec::new();
    let lines: Vec<&str> = rules.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('>') || rest.starts_with('|') {
            // A block scalar: the lines indented deeper than `expr:`.
            let block = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(line));
            exprs.push(block.copied().collect::<Vec<_>>().join(" "));
        } else {
            exprs.push(rest.to_string());
        }
    }
    assert!(!exprs.is_empty(), "no expr in the alert rules");
    let mut names = BTreeSet::new();
    for e in exprs {
        // Drop `{...}`, `[...]` and quoted strings; then the label lists after by/on/without/ignoring.
        let mut plain = String::new();
        let mut depth = 0;
        for c in e.chars() {
            match c {
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                _ if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        let words: Vec<String> = plain
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '(' || c == ')'))
            .flat_map(|w| w.split_inclusive(['(', ')']))
            .map(str::to_string)
            .collect();
        let mut in_labels = false;
        let mut after_grouping = false;
        for w in words {
            let word = w.trim_end_matches(['(', ')']);
            if after_grouping && w == "(" {
                in_labels = true;
            }
            if in_labels {
                if w.ends_with(')') {
                    in_labels = false;
                }
                after_grouping = false;
                continue;
            }
            after_grouping = matches!(word, "by" | "on" | "without" | "ignoring");
            if word.is_empty() || PROMQL.contains(&word) || word.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            names.insert(word.to_string());
        }
    }
    names
}

/// Every metric name declared in a `metric_names!` list (each crate's `metrics.rs`), from the lists the
/// roles hand `telemetry::describe`.
fn declared_metric_names() -> BTreeSet<String> {
    let names: BTreeSet<String> = [
        xcluster_runtime::metrics::DESCRIPTIONS,
        xcluster_lb::metrics::DESCRIPTIONS,
        xcluster_lb::proxy::metrics::DESCRIPTIONS,
        xcluster_agent::metrics::DESCRIPTIONS,
        xcluster_monitor::metrics::DESCRIPTIONS,
        xcluster_app::metrics::DESCRIPTIONS,
    ]
    .into_iter()
    .flatten()
    .map(|(name, _)| name.to_string())
    .collect();
    assert!(names.len() > 50, "found only {names:?}");
    names
}

/// The metric families in a scrape, histograms and summaries by their family name.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_alert_rules_read_metrics_by_their_names() {
    // The parser above, on expressions shaped like the shipped ones.
    let rules = "      - alert: A\n        expr: >-\n          count by (job, instance, type) (a_metric)\n          \
                 unless on (job, type)\n          sum by (job) (rate(b_total{x=~\"y|z\"}[5m])) > 0.5\n      \
                 - alert: B\n        expr: up{job=~\"x-.*\"} == 0 and c_ratio / d_max > 0.8\n";
    let names: Vec<String> = alert_metric_names(rules).into_iter().collect();
    assert_eq!(names, ["a_metric", "b_total", "c_ratio", "d_max", "up"]);
}

#[test]
fn every_role_serves_clean_metrics_and_every_metric_the_alerts_read() {
    let c = LocalCluster::start();
    c.wait_serving(Duration::from_secs(60));
    // One connection through the L4 proxy and one order request, so the per-backend series and the app's
    // request counters exist, as they do in any cluster that served a client.
    eventually(Duration::from_secs(20), "a request through the L4 proxy", || {
        get(c.proxy, "/v1/products").ok().filter(|r| r.status == 200)
    });
    let targets: Vec<(&str, SocketAddr)> = [("lb-0", c.balancers[0]), ("lb-1", c.balancers[1])]
        .into_iter()
        .chain(c.apps.iter().map(|a| ("app", *a)))
        .chain([("agent", c.agent), ("monitor", c.mon.addr)])
        .collect();
    // Each balancer has had an agent's report and the agent a push accepted before the scrapes.
    for b in c.balancers {
        eventually(Duration::from_secs(20), "the balancer to accept a report", || {
            let m = get(b, "/metrics").ok()?.body;
            (metric_value(&m, "xcluster_lb_reports_accepted_total", "")? > 0.0).then_some(())
        });
    }

    let mut served = BTreeSet::new();
    for (name, addr) in &targets {
        let r = get(*addr, "/metrics").unwrap();
        assert_eq!(r.status, 200, "{name} {addr}");
        let (ok, out) = promtool(&["check", "metrics"], Some(&r.body));
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on {name} ({addr}):\n{out}\n---- /metrics ----\n{}",
            r.body
        );
        served.extend(families(&r.body));
    }
    // The families a role may write, whichever role: each crate's lists (and their docs) cover them all.
    let declared = declared_metric_names();
    let undeclared: Vec<&String> = served.iter().filter(|n| !declared.contains(*n)).collect();
    assert!(
        undeclared.is_empty(),
        "served without a metric_names! entry: {undeclared:?}"
    );

    let rules = std::fs::read_to_string(prometheus_dir().join("alerts.yml")).unwrap();
    let read = alert_metric_names(&rules);
    assert!(read.len() > 20, "the alert rules read only {read:?}");
    // `up` is Prometheus's own, one per target.
    let missing: Vec<&String> = (read.iter())
        .filter(|n| *n != "up" && !served.contains(*n) && !NOT_IN_THE_LOCAL_CLUSTER.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts.yml reads metrics no role serves (renamed or removed?): {missing:?}"
    );
    let unknown: Vec<&String> = (read.iter())
        .filter(|n| *n != "up" && !declared.contains(*n))
        .collect();
    assert!(
        unknown.is_empty(),
        "alerts.yml reads metrics no metric_names! declares: {unknown:?}"
    );
    for n in NOT_IN_THE_LOCAL_CLUSTER {
        assert!(
            read.contains(n),
            "{n} is listed as read by an alert, and none does"
        );
    }
}
