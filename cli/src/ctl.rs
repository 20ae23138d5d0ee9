//! `xcluster ctl`: the monitor's control client, with Supervisorctl's verbs over the monitor's HTTP API.
//!
//! Exit codes: 0 success; 1 a refused or failed action (unknown program, already started, invalid config, a
//! program that did not come up or stop within `--wait-secs`);
//! 3 `status` found a process that is not RUNNING (as supervisorctl), `pid` a program without a process, or
//! `cluster`, `drain` or `undrain` a balancer that does not answer; 69 the monitor cannot be reached or does
//! not answer within `--timeout-secs`; 77 the token was refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::Value;
use xcluster_monitor::policy::ExitInfo;
use xcluster_monitor::status::abnormal_termination;
use xcluster_runtime::http::percent_encode;

use crate::args::{CtlArgs, CtlVerb};

mod stream;

const EXIT_FAILED: i32 = 1;
const EXIT_NOT_RUNNING: i32 = 3;
const EXIT_USAGE: i32 = 64;
const EXIT_UNAVAILABLE: i32 = 69;
const EXIT_NOPERM: i32 = 77;

/// A program's name and the monitor's answer for it: done (with what happened) or why not.
type Answer = (String, Result<String, String>);
/// Largest answer we read. A status of hundreds of programs is far smaller, but the cluster view passes on
/// each balancer's status (up to 16 MiB each, the monitor's own bound), so this leaves room for several.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

struct Client {
    addr: SocketAddr,
    url: String,
    token: Option<String>,
    timeout: Duration,
}

struct Resp {
    status: u16,
    body: Vec<u8>,
    /// Whether the request carried a token: a 401 means a wrong one then, a missing one otherwise.
    tokened: bool,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn message(&self) -> String {
        let v = self.json();
        v["error"]["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&self.body).trim().to_string(),
            str::to_string,
        )
    }
}

#[derive(Debug)]
enum Failure {
    Unreachable(String),
    /// Connected (or connecting), but nothing came within `--timeout-secs`: a stopped (SIGSTOP) or overloaded
    /// monitor, told apart from one that is not there, which the OS's "Resource temporarily unavailable" hid.
    TimedOut,
    Exit(i32),
}

/// An I/O error talking to the monitor. A socket timeout surfaces as `WouldBlock` (EAGAIN, from
/// `SO_RCVTIMEO`/`SO_SNDTIMEO`) or `TimedOut` (from `connect_timeout`).
fn io_failure(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Failure::TimedOut,
        _ => Failure::Unreachable(e.to_string()),
    }
}

pub fn run(args: CtlArgs) -> i32 {
    let client = match Client::new(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xcluster ctl: {e}");
            return EXIT_USAGE;
        }
    };
    match run_verb(&client, &args) {
        Ok(code) => code,
        Err(Failure::Exit(code)) => code,
        Err(Failure::Unreachable(e)) => {
            eprintln!(
                "xcluster ctl: cannot reach the monitor at {}: {e} (is it running?)",
                client.url
            );
            EXIT_UNAVAILABLE
        }
        Err(Failure::TimedOut) => {
            eprintln!(
                "xcluster ctl: the monitor at {} did not answer within {}s (is it stopped or overloaded?)",
                client.url,
                client.timeout.as_secs()
            );
            EXIT_UNAVAILABLE
        }
    }
}

fn run_verb(c: &Client, args: &CtlArgs) -> Result<i32, Failure> {
    match &args.verb {
        CtlVerb::Status { names } => status(c, names, args.json),
        CtlVerb::Start { names } => action(c, "start", names, None, args),
        CtlVerb::Stop { names } => action(c, "stop", names, None, args),
        CtlVerb::Restart { names, rolling: true } => rolling_restart(c, names, args),
        CtlVerb::Restart { names, .. } => action(c, "restart", names, None, args),
        CtlVerb::Signal { signal, names } => action(c, "signal", names, Some(signal), args),
        CtlVerb::Clear { names } => action(c, "clear", names, None, args),
        CtlVerb::Pid { names } => pid(c, names, args.json),
        CtlVerb::Version => {
            let version = monitor_status(c)?["monitor"]["version"].clone();
            if args.json {
                println!("{}", serde_json::json!({ "version": version }));
            } else {
                println!("{}", version.as_str().unwrap_or("?"));
            }
            Ok(0)
        }
        CtlVerb::Tail {
            name,
            follow,
            stream,
            bytes,
        } => {
            let path = format!(
                "/v1/programs/{}/log?stream={stream}&bytes={bytes}{}",
                percent_encode(name),
                if *follow { "&follow=1" } else { "" }
            );
            let code = c.stream(&path, *follow)?;
            Ok(code)
        }
        CtlVerb::Cluster => cluster(c, args.json),
        CtlVerb::Drain { ids } => drain(c, ids, true, args.json),
        CtlVerb::Undrain { ids } => drain(c, ids, false, args.json),
        CtlVerb::Reread => plan(c, "/v1/reread", false, args.json),
        CtlVerb::Update { rolling: false } => plan(c, "/v1/update", true, args.json),
        CtlVerb::Update { rolling: true } => rolling_update(c, args),
        CtlVerb::Shutdown => {
            let r = c.call("POST", "/v1/shutdown")?;
            check(&r)?;
            println!(
                "{}",
                if args.json {
                    String::from_utf8_lossy(&r.body).to_string()
                } else {
                    "Shut down".into()
                }
            );
            Ok(0)
        }
    }
}

fn check(r: &Resp) -> Result<(), Failure> {
    match r.status {
        200 => Ok(()),
        401 if r.tokened => {
            eprintln!("xcluster ctl: the monitor refused the token (set --token or XCLUSTER_TOKEN)");
            Err(Failure::Exit(EXIT_NOPERM))
        }
        401 => {
            eprintln!("xcluster ctl: this needs the monitor's token: set --token or XCLUSTER_TOKEN");
            Err(Failure::Exit(EXIT_NOPERM))
        }
        // The monitor has no token: no --token can help.
        403 => {
            eprintln!("xcluster ctl: {}", r.message());
            Err(Failure::Exit(EXIT_NOPERM))
        }
        _ => {
            let message = r.message();
            eprintln!("xcluster ctl: {message}");
            // A lone issue is often the message itself (a file that does not parse): say it once.
            for i in items(&r.json()["error"]["issues"])
                .iter()
                .filter_map(Value::as_str)
            {
                // A config's issues are in its message already.
                if !message.contains(i) {
                    eprintln!("  {i}");
                }
            }
            Err(Failure::Exit(EXIT_FAILED))
        }
    }
}

/// The monitor's `/v1/status`: the programs, the monitor itself, the last reload and the roll.
fn monitor_status(c: &Client) -> Result<Value, Failure> {
    let r = c.call("GET", "/v1/status")?;
    check(&r)?;
    let v = r.json();
    // A balancer answers /v1/status too: without this, `ctl status` there printed nothing and exited 0.
    if !(v["programs"].is_array() && v["monitor"]["version"].is_string()) {
        eprintln!(
            "xcluster ctl: {} answered, but not as an XCluster monitor (a balancer's or an app's API?); \
             a monitor listens on http://127.0.0.1:7300 unless its config says otherwise",
            c.url
        );
        return Err(Failure::Exit(EXIT_UNAVAILABLE));
    }
    Ok(v)
}

fn status(c: &Client, names: &[String], as_json: bool) -> Result<i32, Failure> {
    let v = monitor_status(c)?;
    let all = items(&v["programs"]);
    let shown = if names.is_empty() {
        all.iter().collect()
    } else {
        pick(all, names)?
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(shown.iter().map(|v| (*v).clone()).collect()))
                .unwrap_or_default()
        );
    } else {
        let width = shown
            .iter()
            .filter_map(|p| p["name"].as_str())
            .map(str::len)
            .max()
            .unwrap_or(4)
            .max(4);
        for p in &shown {
            println!(
                "{:width$}  {:9} {}",
                p["name"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                describe(p)
            );
        }
        if v["roll"]["finished"] == false {
            let steps = items(&v["roll"]["programs"]);
            let done = steps.iter().filter(|s| s["step"] == "done").count();
            let now = (steps.iter().find(|s| s["step"] == "restarting"))
                .and_then(|s| s["name"].as_str())
                .unwrap_or("?");
            eprintln!(
                "rolling restart {}: {now} restarting, {done} of {} done",
                v["roll"]["id"],
                steps.len()
            );
        }
        if let Some(e) = v["reload"]["last_error"].as_str() {
            eprintln!("config reload failed (the old config stays): {e}");
        }
    }
    let all_running = shown.iter().all(|p| p["state"] == "RUNNING");
    Ok(if all_running { 0 } else { EXIT_NOT_RUNNING })
}

/// As supervisorctl's `pid`: the monitor's pid, or each named program's, one per line for scripts (`kill -HUP
/// $(xcluster ctl pid app-0)`); 0 for a program without a process, which exits 3 as `status` would.
fn pid(c: &Client, names: &[String], as_json: bool) -> Result<i32, Failure> {
    let v = monitor_status(c)?;
    if names.is_empty() {
        let pid = v["monitor"]["pid"].as_u64().unwrap_or(0);
        if as_json {
            println!("{}", serde_json::json!({ "pid": pid }));
        } else {
            println!("{pid}");
        }
        return Ok(0);
    }
    let pids: Vec<(&str, u64)> = (pick(items(&v["programs"]), names)?.into_iter())
        .map(|p| (p["name"].as_str().unwrap_or("?"), p["pid"].as_u64().unwrap_or(0)))
        .collect();
    if as_json {
        let list: Vec<Value> = (pids.iter())
            .map(|(name, pid)| serde_json::json!({ "name": name, "pid": pid }))
            .collect();
        println!("{}", Value::Array(list));
    } else {
        pids.iter().for_each(|(_, pid)| println!("{pid}"));
    }
    Ok(if pids.iter().all(|(_, pid)| *pid > 0) {
        0
    } else {
        EXIT_NOT_RUNNING
    })
}

/// The cluster view, as the dashboard shows it: per balancer, its instances and its L4 proxy.
fn cluster(c: &Client, as_json: bool) -> Result<i32, Failure> {
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

/// Drains (`on`) or undrains instances `ids` on every balancer the monitor watches: the monitor calls each
/// balancer's own API with its token (`POST /v1/cluster/servers/ID/drain`). One line per balancer and
/// instance; the exit code is the worst seen: 77 a refused token, 3 a balancer that does not answer, 1 an
/// instance a balancer does not know.
fn drain(c: &Client, ids: &[String], on: bool, as_json: bool) -> Result<i32, Failure> {
    let verb = if on { "drain" } else { "undrain" };
    let mut code = 0;
    let mut results = Vec::new();
    for id in ids {
        let r = c.call(
            "POST",
            &format!("/v1/cluster/servers/{}/{verb}", percent_encode(id)),
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

/// The worse of two exit codes: a refused token, then a balancer down, then any other failure.
fn worst(a: i32, b: i32) -> i32 {
    let rank = |c: i32| {
        [0, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_NOPERM]
            .iter()
            .position(|&x| x == c)
    };
    if rank(b) > rank(a) { b } else { a }
}

/// The elements of a JSON array; none for anything else.
fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// The programs of a status (`all`) that `names` pick, as the monitor picks them for a command.
fn pick<'v>(all: &'v [Value], names: &[String]) -> Result<Vec<&'v Value>, Failure> {
    let programs: Vec<(&str, &str)> = (all.iter())
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["group"].as_str().unwrap_or(""),
            )
        })
        .collect();
    match xcluster_monitor::select::resolve(&programs, names) {
        Ok(picked) => Ok(picked.into_iter().map(|(i, _)| &all[i]).collect()),
        Err(n) => {
            eprintln!("xcluster ctl: no such process or group: {n}");
            Err(Failure::Exit(EXIT_FAILED))
        }
    }
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
fn cell(v: &Value) -> String {
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

/// Supervisorctl's description column.
fn describe(p: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(pid) = p["pid"].as_u64() {
        parts.push(format!("pid {pid}"));
    }
    if let Some(ms) = p["uptime_ms"].as_u64() {
        let s = ms / 1000;
        parts.push(format!("uptime {}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60));
    }
    // The last exit, once there is no process: while one runs (or stops) it is an earlier run's.
    if !matches!(p["state"].as_str(), Some("RUNNING" | "STARTING" | "STOPPING"))
        && let Some(exit) = last_exit(p)
    {
        parts.push(exit.to_string());
    }
    if let Some(r) = p["restarts"].as_u64().filter(|r| *r > 0) {
        parts.push(format!("restarts {r}"));
    }
    // Readiness is a process's: a program with none is not "not ready", it is stopped.
    if p["readiness"].is_object() && p["pid"].as_u64().is_some() {
        parts.push(if p["ready"] == true {
            "ready".into()
        } else {
            "not ready".into()
        });
    }
    if let Some(w) = p["waiting_for"].as_array().filter(|w| !w.is_empty()) {
        let w: Vec<&str> = w.iter().filter_map(Value::as_str).collect();
        parts.push(format!("waiting for {}", w.join(", ")));
    }
    for key in ["fatal_reason", "spawn_error"] {
        if let Some(s) = p[key].as_str() {
            parts.push(s.to_string());
        }
    }
    if p["update_pending"] == true {
        parts.push("runs an older config (a restart applies the new one)".into());
    }
    parts.join(", ")
}

/// A program's last exit, as its status gives it.
fn last_exit(p: &Value) -> Option<ExitInfo> {
    let field = |key: &str| p[key].as_i64().and_then(|n| i32::try_from(n).ok());
    let (code, signal) = (field("exit_code"), field("exit_signal"));
    (code.is_some() || signal.is_some()).then_some(ExitInfo { code, signal })
}

/// Sends `verb` for each of `names` and prints one line per program it reached. A start, stop or restart
/// then waits, as supervisorctl does, until each program is running and ready (or stopped), so a script's
/// next step finds it so; `--no-wait` returns at once.
fn action(
    c: &Client,
    verb: &str,
    names: &[String],
    signal: Option<&String>,
    args: &CtlArgs,
) -> Result<i32, Failure> {
    need_names(names)?;
    let mut results = send(c, verb, names, signal)?;
    let goal = match verb {
        "start" | "restart" => Some(Goal::Running),
        "stop" => Some(Goal::Stopped),
        _ => None,
    };
    if let Some(goal) = goal.filter(|_| !args.no_wait) {
        await_goal(c, &mut results, goal, Duration::from_secs(args.wait_secs))?;
    }
    if args.json {
        print_json(&results);
    } else {
        results.iter().for_each(print_line);
    }
    Ok(exit_code(&results))
}

/// A start, stop, restart or signal needs at least one name.
fn need_names(names: &[String]) -> Result<(), Failure> {
    if names.is_empty() {
        eprintln!("xcluster ctl: name a process, group:*, or all");
        return Err(Failure::Exit(EXIT_FAILED));
    }
    Ok(())
}

/// Sends `verb` for all of `names` as one command (so a stop of several stops dependents first, and an
/// unknown name changes nothing) and returns each program's answer.
fn send(c: &Client, verb: &str, names: &[String], signal: Option<&String>) -> Result<Vec<Answer>, Failure> {
    let mut path = programs_path(names, verb);
    if let Some(s) = signal {
        path.push_str(&format!("?signal={}", percent_encode(s)));
    }
    let r = c.call("POST", &path)?;
    check(&r)?;
    Ok((items(&r.json()["results"]).iter())
        .map(|res| {
            let name = res["name"].as_str().unwrap_or("?").to_string();
            let msg = res["message"].as_str().unwrap_or("").to_string();
            (name, if res["ok"] == true { Ok(msg) } else { Err(msg) })
        })
        .collect())
}

/// The API path of `verb` for all of `names` as one command: `/v1/programs/db,app%3A*/stop`.
fn programs_path(names: &[String], verb: &str) -> String {
    let list: Vec<String> = names.iter().map(|n| percent_encode(n)).collect();
    format!("/v1/programs/{}/{verb}", list.join(","))
}

/// 0 when every program's answer is good, else `EXIT_FAILED`.
fn exit_code(results: &[Answer]) -> i32 {
    if results.iter().any(|(_, r)| r.is_err()) {
        EXIT_FAILED
    } else {
        0
    }
}

/// One program's answer, as a line.
fn print_line((name, r): &Answer) {
    match r {
        Ok(m) => println!("{name}: {m}"),
        Err(m) => println!("{name}: ERROR ({m})"),
    }
}

/// Every program's answer, as one JSON object.
fn print_json(results: &[Answer]) {
    let list: Vec<Value> = (results.iter())
        .map(|(name, r)| {
            let (ok, message) = match r {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            serde_json::json!({ "name": name, "ok": ok, "message": message })
        })
        .collect();
    println!("{}", serde_json::json!({ "results": list }));
}

/// `restart --rolling`: the monitor restarts one program at a time, the next only once this one runs and is
/// ready again, so a group serving clients never has more than one of them down (a deploy without an
/// outage); the roll stops at the first program that does not come back, and the ones after it keep running
/// untouched. The monitor drives the roll: this follows it in `/v1/status`, printing each program's outcome
/// as it comes, and an interrupted `ctl` leaves it going. `--no-wait` prints where it stands and returns.
fn rolling_restart(c: &Client, names: &[String], args: &CtlArgs) -> Result<i32, Failure> {
    need_names(names)?;
    let path = format!(
        "{}?rolling=1&wait_secs={}",
        programs_path(names, "restart"),
        args.wait_secs
    );
    let r = c.call("POST", &path)?;
    check(&r)?;
    see_roll_through(c, r.json()["roll"].clone(), args)
}

/// Follows the roll `roll` the monitor has just begun (unless `--no-wait`), printing each program's outcome,
/// and answers with the exit code of the worst.
fn see_roll_through(c: &Client, mut roll: Value, args: &CtlArgs) -> Result<i32, Failure> {
    let mut printed = 0;
    if !args.no_wait {
        (roll, printed) = follow_roll(c, roll, !args.json)?;
    }
    // A program not settled yet (`--no-wait`) answers where it stands: `restarting`, `waiting`.
    let results: Vec<Answer> = (items(&roll["programs"]).iter())
        .map(|s| {
            let state = s["step"].as_str().unwrap_or("?").to_string();
            (roll_name(s), roll_outcome(s).unwrap_or(Ok(state)))
        })
        .collect();
    if args.json {
        print_json(&results);
    } else {
        results.iter().skip(printed).for_each(print_line);
    }
    Ok(exit_code(&results))
}

/// `update --rolling`: added and removed programs are applied at once; the changed ones that run are
/// restarted with their new settings one at a time, as `restart --rolling` does (a changed program that
/// does not run takes its settings at once).
fn rolling_update(c: &Client, args: &CtlArgs) -> Result<i32, Failure> {
    let path = format!("/v1/update?rolling=1&wait_secs={}", args.wait_secs);
    let r = c.call("POST", &path)?;
    check(&r)?;
    let v = r.json();
    let rolled: Vec<String> = items(&v["roll"]["programs"]).iter().map(roll_name).collect();
    if !args.json {
        let mut any = false;
        for key in ["added", "changed", "removed"] {
            for n in items(&v[key]).iter().filter_map(Value::as_str) {
                any = true;
                let how = if rolled.iter().any(|r| r == n) {
                    "rolling"
                } else {
                    "applied"
                };
                println!("{n}: {key} ({how})");
            }
        }
        if !any {
            println!("No config updates to processes");
        }
    }
    if v["roll"].is_null() {
        if args.json {
            println!("{v}");
        }
        return Ok(0);
    }
    see_roll_through(c, v["roll"].clone(), args)
}

/// Follows the roll `roll` in the status until it has finished, printing (with `print`) each program's
/// outcome in order as it settles. Returns the finished roll and how many lines were printed.
fn follow_roll(c: &Client, mut roll: Value, print: bool) -> Result<(Value, usize), Failure> {
    let id = roll["id"].clone();
    let mut printed = 0;
    loop {
        for s in items(&roll["programs"]).iter().skip(printed) {
            let Some(outcome) = roll_outcome(s).filter(|_| print) else {
                break;
            };
            print_line(&(roll_name(s), outcome));
            printed += 1;
        }
        if roll["finished"] == true {
            return Ok((roll, printed));
        }
        std::thread::sleep(WAIT_POLL);
        roll = monitor_status(c)?["roll"].clone();
        if roll["id"] != id {
            eprintln!(
                "xcluster ctl: the rolling restart is gone from the monitor's status (did it restart?)"
            );
            return Err(Failure::Exit(EXIT_FAILED));
        }
    }
}

/// A roll's program once settled: `started`, or why not.
fn roll_outcome(step: &Value) -> Option<Result<String, String>> {
    let message = step["message"].as_str().unwrap_or("").to_string();
    match step["step"].as_str() {
        Some("done") => Some(Ok(message)),
        Some("failed" | "skipped") => Some(Err(message)),
        _ => None,
    }
}

fn roll_name(step: &Value) -> String {
    step["name"].as_str().unwrap_or("?").to_string()
}

/// Where a start, restart or stop is headed.
#[derive(Debug, Clone, Copy)]
enum Goal {
    Running,
    Stopped,
}

/// How far a program (its entry in `/v1/status`) is from `goal`: `None` while under way, else the answer.
/// The monitor publishes a command's effect before it answers it, so the first status read after the answer
/// already shows the program stopping or starting: a state that ends the wait is never a stale one.
fn outcome(p: &Value, goal: Goal) -> Option<Result<String, String>> {
    let state = p["state"].as_str().unwrap_or("");
    match goal {
        Goal::Running => match state {
            "RUNNING" if p["ready"] == true => Some(Ok("started".into())),
            // The monitor's words: the spawn error or the last exit, and the tries it took.
            "FATAL" => Some(Err(p["fatal_message"]
                .as_str()
                .or(p["fatal_reason"].as_str())
                .unwrap_or("fatal")
                .to_string())),
            "EXITED" => Some(Err(abnormal_termination(last_exit(p)))),
            // Stopped and waiting for nothing: someone else stopped it meanwhile.
            "STOPPED" if items(&p["waiting_for"]).is_empty() => Some(Err("stopped".into())),
            _ => None,
        },
        Goal::Stopped => match state {
            "STOPPED" | "EXITED" | "FATAL" => Some(Ok("stopped".into())),
            "STARTING" | "RUNNING" => Some(Err("started again".into())),
            _ => None,
        },
    }
}

/// What a program the wait gave up on is still doing: its state, and what keeps it there when the status says.
fn overdue(p: &Value, limit: Duration) -> String {
    let waiting: Vec<String> = items(&p["waiting_for"]).iter().map(cell).collect();
    let why = match p["state"].as_str() {
        Some("RUNNING") => ", not ready".to_string(),
        _ if !waiting.is_empty() => format!(", waiting for {}", waiting.join(", ")),
        _ => String::new(),
    };
    format!("still {}{why} after {} s", cell(&p["state"]), limit.as_secs())
}

/// How often a waiting start, stop or restart reads the status.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Waits until every program whose command was taken reaches `goal` or fails, up to `limit`, and puts the
/// final answer in its result.
fn await_goal(c: &Client, results: &mut [Answer], goal: Goal, limit: Duration) -> Result<(), Failure> {
    // Checked: the limit comes from the command line (bounded by its parser, but a clock near its end must
    // not panic either); no deadline means waiting until every program settles.
    let deadline = Instant::now().checked_add(limit);
    let mut open: Vec<usize> = (0..results.len()).filter(|&i| results[i].1.is_ok()).collect();
    while !open.is_empty() {
        let v = monitor_status(c)?;
        let late = deadline.is_some_and(|d| Instant::now() >= d);
        open.retain(|&i| {
            let (name, result) = &mut results[i];
            let p = items(&v["programs"]).iter().find(|p| p["name"] == name.as_str());
            let answer = match p {
                None => Some(Err("gone".to_string())),
                Some(p) => outcome(p, goal).or_else(|| late.then(|| Err(overdue(p, limit)))),
            };
            answer.map(|a| *result = a).is_none()
        });
        if !open.is_empty() {
            std::thread::sleep(WAIT_POLL);
        }
    }
    Ok(())
}

fn plan(c: &Client, path: &str, applied: bool, as_json: bool) -> Result<i32, Failure> {
    let r = c.call("POST", path)?;
    check(&r)?;
    if as_json {
        println!("{}", String::from_utf8_lossy(&r.body));
        return Ok(0);
    }
    let v = r.json();
    let mut any = false;
    for (key, word) in [("added", "added"), ("changed", "changed"), ("removed", "removed")] {
        for n in v[key].as_array().cloned().unwrap_or_default() {
            any = true;
            let verb = if applied {
                format!("{word} (applied)")
            } else {
                word.to_string()
            };
            println!("{}: {verb}", n.as_str().unwrap_or("?"));
        }
    }
    if !any {
        println!("No config updates to processes");
    }
    Ok(0)
}

impl Client {
    fn new(args: &CtlArgs) -> Result<Self, String> {
        // `host:port` alone is taken as http (as curl does); another scheme is refused.
        let rest = match args.url.split_once("://") {
            None => args.url.as_str(),
            Some(("http", rest)) => rest,
            Some(_) => return Err(format!("--url must be http://HOST:PORT, found {:?}", args.url)),
        };
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("bad --url {:?}: {e}", args.url))?
            .next()
            .ok_or_else(|| format!("bad --url {:?}", args.url))?;
        Ok(Self {
            addr,
            url: args.url.clone(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            timeout: Duration::from_secs(args.timeout_secs.max(1)),
        })
    }

    fn open(&self, method: &str, path: &str) -> Result<TcpStream, Failure> {
        let mut s = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(io_failure)?;
        s.set_read_timeout(Some(self.timeout)).map_err(io_failure)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io_failure)?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if method == "POST" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).map_err(io_failure)?;
        Ok(s)
    }

    fn call(&self, method: &str, path: &str) -> Result<Resp, Failure> {
        let s = self.open(method, path)?;
        // One byte past the bound tells an answer over it from one that fits: cut short, it would read as
        // no answer at all (`cluster` printed "no balancers configured").
        let mut r = BufReader::new(s.take(MAX_RESPONSE + 1));
        let (status, chunked) = read_head(&mut r)?;
        let mut body = Vec::new();
        let read = if chunked {
            loop {
                match read_chunk(&mut r) {
                    Ok(Some(chunk)) => body.extend(chunk),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        } else {
            r.read_to_end(&mut body).map(drop).map_err(io_failure)
        };
        // Checked before a read error: running out of the bound mid-chunk is one.
        if r.get_ref().limit() == 0 {
            eprintln!(
                "xcluster ctl: the monitor's answer to {method} {path} is larger than {} MiB",
                MAX_RESPONSE / (1024 * 1024)
            );
            return Err(Failure::Exit(EXIT_FAILED));
        }
        read?;
        let tokened = self.token.is_some();
        Ok(Resp {
            status,
            body,
            tokened,
        })
    }

    /// Copies a (possibly endless) response body to stdout as it arrives.
    fn stream(&self, path: &str, follow: bool) -> Result<i32, Failure> {
        let s = self.open("GET", path)?;
        if follow {
            // A quiet log is not a dead monitor: no read timeout while following.
            let _ = s.set_read_timeout(None);
        }
        let mut r = BufReader::new(s);
        let (status, chunked) = read_head(&mut r)?;
        if status != 200 {
            let mut body = Vec::new();
            let _ = (&mut r).take(MAX_RESPONSE).read_to_end(&mut body);
            if chunked {
                body = dechunk_all(&body);
            }
            let tokened = self.token.is_some();
            check(&Resp {
                status,
                body,
                tokened,
            })?;
        }
        if chunked {
            stream::copy_chunks(&mut r)
        } else {
            stream::copy_all(&mut r.take(MAX_RESPONSE))
        }
    }
}

fn read_head(r: &mut impl BufRead) -> Result<(u16, bool), Failure> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(io_failure)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure::Unreachable(format!("not an HTTP answer: {:?}", line.trim())))?;
    let mut chunked = false;
    for _ in 0..100 {
        line.clear();
        if r.read_line(&mut line).map_err(io_failure)? == 0 || line == "\r\n" {
            break;
        }
        let l = line.to_ascii_lowercase();
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

fn read_chunk(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, Failure> {
    let mut line = String::new();
    if r.read_line(&mut line).map_err(io_failure)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| Failure::Unreachable("malformed chunked answer".into()))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; size.min(MAX_RESPONSE as usize)];
    r.read_exact(&mut buf).map_err(io_failure)?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf).map_err(io_failure)?;
    Ok(Some(buf))
}

fn dechunk_all(b: &[u8]) -> Vec<u8> {
    let mut r = BufReader::new(b);
    let mut out = Vec::new();
    while let Ok(Some(c)) = read_chunk(&mut r) {
        out.extend(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_program_with_a_process_is_ready_or_not() {
        let probe = serde_json::json!({ "http": "http://127.0.0.1:1/readyz" });
        let stopped = serde_json::json!({ "state": "STOPPED", "exit_code": 0, "readiness": probe });
        assert_eq!(describe(&stopped), "exit status 0");
        let starting =
            serde_json::json!({ "state": "STARTING", "pid": 5, "readiness": probe, "ready": false });
        assert_eq!(describe(&starting), "pid 5, not ready");
    }
}
