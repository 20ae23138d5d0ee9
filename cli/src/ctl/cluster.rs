//! `ctl cluster`, `drain`, `undrain` and `weight`: the balancers the monitor watches, as tables.

use serde_json::Value;
use xcluster_proto::directory::ServerAction;
use xcluster_runtime::http::percent_encode;

use super::{Client, EXIT_FAILED, EXIT_NOPERM, EXIT_NOT_RUNNING, Failure, check, items, worst};

/// The cluster view, as the dashboard shows it: per balancer, its instances and its L4 proxy.
pub(super) fn cluster(c: &Client, as_json: bool) -> Result<i32, Failure> {
    let r = c.call("GET", "/v1/cluster")?;
    check(&r)?;
    let v = r.json();
    let balancers = items(&v["balancers"]);
    let code = if balancers.iter().all(|b| b["up"] == true) {
        0
    } else {
        EXIT_NOT_RUNNING
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(code);
    }
    if balancers.is_empty() {
        println!("no balancers configured ([cluster] balancers)");
    }
    for b in balancers {
        let addr = b["addr"].as_str().unwrap_or("?");
        if b["up"] != true {
            println!("{addr}  down  {}", b["error"].as_str().unwrap_or(""));
            continue;
        }
        let st = &b["status"];
        println!(
            "{addr}  up  table version {}, {} ms",
            cell(&st["version"]),
            cell(&b["latency_ms"])
        );
        let instances = items(&st["instances"]);
        let mut types: Vec<&String> = Vec::new();
        for t in instances
            .iter()
            .filter_map(|i| i["weights"].as_object())
            .flat_map(|w| w.keys())
        {
            if !types.contains(&t) {
                types.push(t);
            }
        }
        // The fixed columns, then one weight column per request type seen.
        let mut rows = spec_rows(instances, INSTANCE_COLUMNS);
        rows[0].extend(types.iter().map(|t| format!("w({t})")));
        for (row, i) in rows[1..].iter_mut().zip(instances) {
            row.extend(types.iter().map(|t| weight(&i["weights"][t.as_str()])));
        }
        print_table(&rows);
        let (listeners, backends) = (items(&st["proxy"]["listeners"]), items(&st["proxy"]["backends"]));
        if !listeners.is_empty() || !backends.is_empty() {
            print_table(&spec_rows(listeners, LISTENER_COLUMNS));
            if backends.is_empty() {
                // A type routed by the directory has no configured backends: its instances show here once the
                // proxy has connected to them.
                println!("  proxy backends: none connected yet");
            } else {
                print_table(&spec_rows(backends, BACKEND_COLUMNS));
            }
        }
    }
    Ok(code)
}

/// Drains, undrains or sets the weight of instances `ids` on every balancer the monitor watches: the
/// monitor calls each balancer's own API with its token (`POST /v1/cluster/servers/ID/drain`, `undrain`,
/// `weight/50%25`). One line per balancer and instance; the exit code is the worst seen: 77 a refused
/// token, 3 a balancer that does not answer, 1 an instance a balancer does not know or a weight it refused.
pub(super) fn server_action(
    c: &Client,
    ids: &[String],
    action: ServerAction,
    as_json: bool,
) -> Result<i32, Failure> {
    let mut code = 0;
    let mut results = Vec::new();
    for id in ids {
        let r = c.call(
            "POST",
            &format!("/v1/cluster/servers/{}/{}", percent_encode(id), action.path()),
        )?;
        check(&r)?;
        for b in items(&r.json()["results"]) {
            let fail = match b["result"].as_str() {
                Some("ok") => 0,
                Some("token_refused") => EXIT_NOPERM,
                Some("down") => EXIT_NOT_RUNNING,
                _ => EXIT_FAILED,
            };
            code = worst(code, fail);
            let (addr, outcome) = (cell(&b["balancer"]), cell(&b["outcome"]));
            if as_json {
                results.push(
                    serde_json::json!({ "balancer": addr, "id": id, "ok": fail == 0, "outcome": outcome }),
                );
            } else {
                println!("{addr}  {id}  {outcome}");
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&results).unwrap_or_default());
    }
    Ok(code)
}

/// A column of the cluster tables: its heading, the JSON field it shows, and how.
type Column = (&'static str, &'static str, fn(&Value) -> String);

const INSTANCE_COLUMNS: &[Column] = &[
    ("instance", "id", cell),
    ("address", "addr", cell),
    ("state", "state", cell),
    ("report age ms", "report_age_ms", cell),
    ("cpu", "cpu", percent),
    ("mem", "mem", percent),
    ("queue", "queue", percent),
    ("weight set", "weight_set", cell),
];

const LISTENER_COLUMNS: &[Column] = &[
    ("proxy listener", "name", cell),
    ("address", "addr", cell),
    ("type", "request_type", cell),
    ("active", "active", cell),
    ("max", "max_connections", limit),
    ("accepted", "accepted", cell),
    ("failed", "failed", cell),
    ("rejected", "rejected", cell),
    ("denied", "denied", cell),
    ("bad headers", "header_errors", cell),
    ("sni routed", "sni_routed", cell),
    ("retries", "retries", cell),
    ("waiting", "waiting", cell),
    ("queued", "queued", cell),
    ("rate waits", "rate_waits", cell),
    ("idle timeouts", "idle_timeouts", cell),
    ("client errors", "client_errors", cell),
    ("backend errors", "backend_errors", cell),
    ("bytes up", "bytes_up", bytes),
    ("bytes down", "bytes_down", bytes),
    ("accept errors", "accept_errors", cell),
    ("state", "unbound", |v| flag(v, "unbound", "ok")),
];

const BACKEND_COLUMNS: &[Column] = &[
    ("proxy backend", "addr", cell),
    ("active", "active", cell),
    ("max", "max_connections", limit),
    ("connects", "connects", cell),
    ("connect failures", "connect_failures", cell),
    ("check failures", "check_failures", cell),
    ("full", "full", cell),
    ("closed on down", "closed_on_down", cell),
    ("bytes up", "bytes_up", bytes),
    ("bytes down", "bytes_down", bytes),
    ("weight", "weight", |v| match v.as_u64() {
        None => "-".into(),
        Some(0) => "0 (drain)".into(),
        Some(n) => n.to_string(),
    }),
    ("weight set", "weight_set", cell),
    ("effective", "effective_weight", cell),
    ("state", "failing", |v| flag(v, "failing", "ok")),
    ("drain", "drained", |v| flag(v, "drained", "-")),
    ("tier", "backup", |v| flag(v, "backup", "primary")),
];

/// A `max_connections`: `-` for none (0, or a balancer too old to say).
fn limit(v: &Value) -> String {
    match v.as_u64() {
        Some(0) | None => "-".into(),
        Some(n) => n.to_string(),
    }
}

/// A heading row, then one row per item, as `columns` say.
fn spec_rows(items: &[Value], columns: &[Column]) -> Vec<Vec<String>> {
    let head = columns.iter().map(|(h, _, _)| (*h).to_string()).collect();
    std::iter::once(head)
        .chain(
            items
                .iter()
                .map(|i| columns.iter().map(|(_, k, f)| f(&i[*k])).collect()),
        )
        .collect()
}

/// A JSON value as a table cell: strings without quotes, nothing as "-".
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// A flag as one of two words.
fn flag(v: &Value, yes: &str, no: &str) -> String {
    match v.as_bool() {
        Some(true) => yes.to_string(),
        Some(false) => no.to_string(),
        None => cell(v),
    }
}

/// A fraction (0..=1) as a percentage.
fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| cell(v), |x| format!("{:.1}%", x * 100.0))
}

/// A weight, rounded.
fn weight(v: &Value) -> String {
    v.as_f64().map_or_else(|| cell(v), |w| format!("{w:.0}"))
}

/// A byte count in binary units.
fn bytes(v: &Value) -> String {
    let Some(n) = v.as_u64() else { return cell(v) };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut i) = (n as f64, 0);
    while x >= 1024.0 && i < units.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

/// Rows of cells in aligned columns, indented under their balancer.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:w$}")).collect();
        println!("  {}", line.join("  ").trim_end());
    }
}
