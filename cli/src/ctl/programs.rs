//! The program commands: `status`, `pid`, `start`/`stop`/`restart`/`signal` (waiting for their outcome),
//! rolling restarts and updates, `reread` and `update`.

use std::time::{Duration, Instant};

use serde_json::Value;
use xcluster_monitor::policy::ExitInfo;
use xcluster_monitor::status::abnormal_termination;
use xcluster_runtime::http::percent_encode;

use super::cluster::cell;
use super::{
    Answer, Client, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_UNKNOWN, Failure, check, items, monitor_status, pick,
    pick_quietly, poll_status,
};
use crate::args::CtlArgs;

pub(super) fn status(c: &Client, names: &[String], as_json: bool) -> Result<i32, Failure> {
    let v = monitor_status(c)?;
    let all = items(&v["programs"]);
    // As supervisorctl, a name that picks nothing is said, and the others are shown all the same: `status a
    // nope` refused to show `a`, and exited 1 where supervisorctl's 4 (LSB's "status unknown") is what a
    // check script tells apart from 3 (not running).
    let (known, unknown): (Vec<String>, Vec<String>) =
        (names.iter().cloned()).partition(|n| pick_quietly(&v, std::slice::from_ref(n)).is_ok());
    for n in &unknown {
        let line = format!("{n}: ERROR (no such process or group)");
        if as_json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
    let shown = match (names.is_empty(), known.is_empty()) {
        (true, _) => all.iter().collect(),
        (false, true) => Vec::new(),
        (false, false) => pick(&v, &known)?,
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
        if v["pending"].is_object() {
            let list = |key: &str| {
                let names: Vec<&str> = items(&v["pending"][key])
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                names.join(", ")
            };
            eprintln!(
                "config saved but not applied (auto_update = false): added [{}] changed [{}] removed [{}]; \
                 `xcluster ctl update` applies it",
                list("added"),
                list("changed"),
                list("removed")
            );
        }
    }
    // A program shown not running wins over a name unknown, as in supervisorctl.
    Ok(if !shown.iter().all(|p| p["state"] == "RUNNING") {
        EXIT_NOT_RUNNING
    } else if !unknown.is_empty() {
        EXIT_UNKNOWN
    } else {
        0
    })
}

/// As supervisorctl's `pid`: the monitor's pid, or each named program's, one per line for scripts (`kill -HUP
/// $(xcluster ctl pid app-0)`); 0 for a program without a process, which exits 3 as `status` would.
pub(super) fn pid(c: &Client, names: &[String], as_json: bool) -> Result<i32, Failure> {
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
    let pids: Vec<(&str, u64)> = (pick(&v, names)?.into_iter())
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
    // Why it fails, while it does: a stopped program's old failure read as a current one.
    let why = match p["state"].as_str() {
        Some("FATAL") => p["fatal_message"].as_str().or(p["fatal_reason"].as_str()),
        Some("BACKOFF") => p["spawn_error"].as_str(),
        _ => None,
    };
    parts.extend(why.map(str::to_string));
    if p["update_pending"] == true {
        parts.push("runs an older config (a restart applies the new one)".into());
    }
    if p["change_waiting"] == true {
        parts.push("its saved change waits for `ctl update`".into());
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
pub(super) fn action(
    c: &Client,
    verb: &str,
    names: &[String],
    signal: Option<&String>,
    args: &CtlArgs,
) -> Result<i32, Failure> {
    let (mut results, mut already) = send(c, verb, names, signal)?;
    let goal = match verb {
        "start" | "restart" => Some(Goal::Running),
        "stop" => Some(Goal::Stopped),
        _ => None,
    };
    if let Some(goal) = goal.filter(|_| !args.no_wait) {
        await_goal(
            c,
            &mut results,
            &mut already,
            goal,
            Duration::from_secs(args.wait_secs),
        )?;
    }
    if args.json {
        print_json(&results, &already, None);
    } else {
        results.iter().for_each(print_line);
    }
    Ok(exit_code(&results, &already))
}

/// Sends `verb` for all of `names` as one command (so a stop of several stops dependents first, and an
/// unknown name changes nothing) and returns each program's answer, and whether each was refused only because
/// it was already done (`already started`, a stop's `not running`).
fn send(
    c: &Client,
    verb: &str,
    names: &[String],
    signal: Option<&String>,
) -> Result<(Vec<Answer>, Vec<bool>), Failure> {
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
            let answer = (name, if res["ok"] == true { Ok(msg) } else { Err(msg) });
            (answer, res["already"] == true)
        })
        .unzip())
}

/// The API path of `verb` for all of `names` as one command: `/v1/programs/db,app%3A*/stop`.
fn programs_path(names: &[String], verb: &str) -> String {
    let list: Vec<String> = names.iter().map(|n| percent_encode(n)).collect();
    format!("/v1/programs/{}/{verb}", list.join(","))
}

/// 0 when every program's answer is good, else `EXIT_FAILED`. As supervisorctl, an answer refused only because
/// it was already done (`already[i]`: `start` of a running program, `stop` of a stopped one) is no failure,
/// so a script or a configuration-management tool can start or stop idempotently.
fn exit_code(results: &[Answer], already: &[bool]) -> i32 {
    let failed = |i: usize| results[i].1.is_err() && !already.get(i).copied().unwrap_or(false);
    if (0..results.len()).any(failed) {
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
/// `{"results": [...]}`, beside what `plan` (an update's plan, when the results are its roll's) holds.
fn print_json(results: &[Answer], already: &[bool], plan: Option<&Value>) {
    let list: Vec<Value> = (results.iter().enumerate())
        .map(|(i, (name, r))| {
            let (ok, message) = match r {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            let already = already.get(i).copied().unwrap_or(false);
            serde_json::json!({ "name": name, "ok": ok, "already": already, "message": message })
        })
        .collect();
    let mut out = plan
        .filter(|p| p.is_object())
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    out["results"] = Value::Array(list);
    println!("{out}");
}

/// `restart --rolling`: the monitor restarts one program at a time, the next only once this one runs and is
/// ready again, so a group serving clients never has more than one of them down (a deploy without an
/// outage); the roll stops at the first program that does not come back, and the ones after it keep running
/// untouched. The monitor drives the roll: this follows it in `/v1/status`, printing each program's outcome
/// as it comes, and an interrupted `ctl` leaves it going. `--no-wait` prints where it stands and returns.
pub(super) fn rolling_restart(c: &Client, names: &[String], args: &CtlArgs) -> Result<i32, Failure> {
    let path = format!(
        "{}?rolling=1&wait_secs={}",
        programs_path(names, "restart"),
        args.wait_secs
    );
    let r = c.call("POST", &path)?;
    check(&r)?;
    see_roll_through(c, r.json()["roll"].clone(), args, None)
}

/// Follows the roll `roll` the monitor has just begun (unless `--no-wait`), printing each program's outcome,
/// and answers with the exit code of the worst.
/// Follows `roll` to its end (unless `--no-wait`) and answers each program's outcome; in JSON, beside `plan`
/// (the update that began the roll, if one did).
fn see_roll_through(
    c: &Client,
    mut roll: Value,
    args: &CtlArgs,
    plan: Option<&Value>,
) -> Result<i32, Failure> {
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
        print_json(&results, &[], plan);
    } else {
        results.iter().skip(printed).for_each(print_line);
    }
    Ok(exit_code(&results, &[]))
}

/// `update --rolling`: added and removed programs are applied at once; the changed ones that run are
/// restarted with their new settings one at a time, as `restart --rolling` does (a changed program that
/// does not run takes its settings at once).
/// `name=` query parameters for a named update, after `first` (`?` or `&`); empty without names.
pub(super) fn names_query(names: &[String], first: char) -> String {
    let mut q = String::new();
    for (i, n) in names.iter().enumerate() {
        q.push(if i == 0 { first } else { '&' });
        q.push_str("name=");
        q.push_str(&percent_encode(n));
    }
    q
}

/// `ctl avail`: one line per program, as supervisorctl's (`in use`/`avail`, `auto`/`manual`, priority), and
/// the change `update` would apply to it.
pub(super) fn avail(c: &Client, as_json: bool) -> Result<i32, Failure> {
    let r = c.call("GET", "/v1/avail")?;
    check(&r)?;
    if as_json {
        println!("{}", String::from_utf8_lossy(&r.body));
        return Ok(0);
    }
    let v = r.json();
    let programs = items(&v["programs"]);
    let width = (programs.iter())
        .filter_map(|p| p["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for p in programs {
        let name = p["name"].as_str().unwrap_or("?");
        let used = if p["in_use"].as_bool() == Some(true) {
            "in use"
        } else {
            "avail"
        };
        let auto = if p["autostart"].as_bool() == Some(true) {
            "auto"
        } else {
            "manual"
        };
        let priority = p["priority"].as_i64().unwrap_or(0);
        let pending = match p["pending"].as_str() {
            Some(change) => format!("  ({change}: `update {name}` applies it)"),
            None => String::new(),
        };
        println!("{name:<width$}  {used:<6}  {auto:<6}  {priority}{pending}");
    }
    Ok(0)
}

pub(super) fn rolling_update(c: &Client, args: &CtlArgs, names: &[String]) -> Result<i32, Failure> {
    let path = format!(
        "/v1/update?rolling=1&wait_secs={}{}",
        args.wait_secs,
        names_query(names, '&')
    );
    plan_with(c, &path, true, args, "")
}

/// Follows the roll `roll` in the status until it has finished, printing (with `print`) each program's
/// outcome in order as it settles. Returns the finished roll and how many lines were printed.
fn follow_roll(c: &Client, mut roll: Value, print: bool) -> Result<(Value, usize), Failure> {
    let id = roll["id"].clone();
    let (mut printed, mut missed) = (0, 0);
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
        // The roll goes on without us: its limits are the monitor's, so a poll missed is asked again.
        let Some(v) = poll(c, &mut missed, None)? else {
            continue;
        };
        // Ended between two polls, and another began: it is among the monitor's past rolls.
        roll = std::iter::once(&v["roll"])
            .chain(items(&v["past_rolls"]))
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap_or(Value::Null);
        if roll.is_null() {
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
        // Marked to start once what it depends on is ready: its state (FATAL, EXITED) is still the old one.
        Goal::Running if !items(&p["waiting_for"]).is_empty() => None,
        Goal::Running => match state {
            "RUNNING" if p["ready"] == true => Some(Ok("started".into())),
            // The monitor's words: the spawn error or the last exit, and the tries it took.
            "FATAL" => Some(Err(p["fatal_message"]
                .as_str()
                .or(p["fatal_reason"].as_str())
                .unwrap_or("fatal")
                .to_string())),
            // Ran and ended as it should (a one-shot task, `startsecs = 0`): supervisorctl says "started".
            "EXITED" if p["exit_expected"] == true => Some(Ok(match last_exit(p) {
                Some(exit) => format!("started, then exited: {exit}"),
                None => "started, then exited".into(),
            })),
            "EXITED" => Some(Err(abnormal_termination(last_exit(p)))),
            // Stopped and waiting for nothing: someone else stopped it meanwhile.
            "STOPPED" => Some(Err("stopped".into())),
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

/// How often a waiting start, stop, restart or shutdown asks the monitor again.
pub(super) const WAIT_POLL: Duration = Duration::from_millis(100);
/// Status polls in a row a wait may miss before it gives up.
const MISSED_POLLS: u32 = 3;

/// A wait's status poll, once its command was taken: one the monitor did not answer (busy, at its connection
/// limit) is `None`, to be asked again, a few times in a row (`missed` counts them) within `deadline` and
/// without a word; past that, the last says why. One miss ended the command with none of its answers, and a
/// miss said aloud looked like the failure of a wait that then succeeded.
fn poll(c: &Client, missed: &mut u32, deadline: Option<Instant>) -> Result<Option<Value>, Failure> {
    if *missed >= MISSED_POLLS || deadline.is_some_and(|d| Instant::now() >= d) {
        // Answered, the misses in a row are over: kept, one more miss for the rest of a long wait (a roll)
        // ended it.
        let v = monitor_status(c)?;
        *missed = 0;
        return Ok(Some(v));
    }
    let v = poll_status(c)?;
    *missed = if v.is_some() { 0 } else { *missed + 1 };
    Ok(v)
}

/// Waits until every program whose command was taken reaches `goal` or fails, up to `limit`, and puts the
/// final answer in its result.
///
/// A program `already` there is waited for too, as a start of it would be: `start` of one still STARTING (as
/// just after the monitor came up) or not ready answered `already started` at once, exit 0, before it had
/// proved itself, and a script's next step found it down when it went FATAL. It keeps that answer once it
/// gets there; if it fails, the failure is its answer.
fn await_goal(
    c: &Client,
    results: &mut [Answer],
    already: &mut [bool],
    goal: Goal,
    limit: Duration,
) -> Result<(), Failure> {
    // Checked: the limit comes from the command line (bounded by its parser, but a clock near its end must
    // not panic either); no deadline means waiting until every program settles.
    let deadline = Instant::now().checked_add(limit);
    let done_already = |i: usize| already.get(i).copied().unwrap_or(false);
    let mut open: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].1.is_ok() || done_already(i))
        .collect();
    let mut missed = 0;
    while !open.is_empty() {
        let Some(v) = poll(c, &mut missed, deadline)? else {
            std::thread::sleep(WAIT_POLL);
            continue;
        };
        let late = deadline.is_some_and(|d| Instant::now() >= d);
        open.retain(|&i| {
            let (name, result) = &mut results[i];
            let p = items(&v["programs"]).iter().find(|p| p["name"] == name.as_str());
            let answer = match p {
                None => Some(Err("gone".to_string())),
                Some(p) => outcome(p, goal).or_else(|| late.then(|| Err(overdue(p, limit)))),
            };
            match answer {
                None => true,
                // There, as it already was: its answer stands.
                Some(Ok(_)) if already.get(i).copied().unwrap_or(false) => false,
                Some(a) => {
                    if a.is_err()
                        && let Some(d) = already.get_mut(i)
                    {
                        *d = false;
                    }
                    *result = a;
                    false
                }
            }
        });
        if !open.is_empty() {
            std::thread::sleep(WAIT_POLL);
        }
    }
    Ok(())
}

/// What `ctl add` and `ctl remove` say of a name they were given that had nothing of their kind.
pub(super) const NOT_ADDED: &str = "not added: nothing of it is new in the saved config";
pub(super) const NOT_REMOVED: &str = "not removed: it is still in the saved config";

/// Prints the changes `path` applied (or, `applied` false, would apply): `reread`, `update`.
pub(super) fn plan(c: &Client, path: &str, applied: bool, args: &CtlArgs) -> Result<i32, Failure> {
    plan_with(c, path, applied, args, "")
}

/// [`plan`], and each name `add` or `remove` was given that had nothing of its kind, with `skipped` (the
/// monitor lists them only for those verbs). A roll the update began (`--rolling`, or a changed program's
/// `update_strategy = "rolling"`) is followed to its end, as `restart --rolling` is: a plain `update` said
/// "applied" and exited 0 as its roll began, and one that stopped at a broken instance went unseen.
pub(super) fn plan_with(
    c: &Client,
    path: &str,
    applied: bool,
    args: &CtlArgs,
    skipped: &str,
) -> Result<i32, Failure> {
    let r = c.call("POST", path)?;
    check(&r)?;
    let v = r.json();
    let rolled: Vec<String> = items(&v["roll"]["programs"]).iter().map(roll_name).collect();
    if !args.json {
        let mut any = false;
        for key in ["added", "changed", "removed"] {
            for n in items(&v[key]).iter().filter_map(Value::as_str) {
                any = true;
                match (applied, rolled.iter().any(|r| r == n)) {
                    (false, _) => println!("{n}: {key}"),
                    (true, true) => println!("{n}: {key} (rolling)"),
                    (true, false) => println!("{n}: {key} (applied)"),
                }
            }
        }
        if !any {
            println!("No config updates to processes");
        }
        for n in items(&v["skipped"]).iter().filter_map(Value::as_str) {
            println!("{n}: {skipped}");
        }
    }
    if v["roll"].is_object() {
        return see_roll_through(c, v["roll"].clone(), args, Some(&v));
    }
    if args.json {
        println!("{v}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A monitor on a free port answering each status poll with the next of `answers` (status, body); the
    /// last is answered from then on.
    fn scripted_monitor(answers: Vec<(u16, String)>) -> Client {
        use std::io::{BufRead, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let Ok(mut s) = s else { return };
                let mut head = String::new();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                while r.read_line(&mut head).is_ok_and(|n| n > 2) {}
                let (status, body) = &answers[i.min(answers.len() - 1)];
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Client {
            addrs: crate::addrs::Addrs::new(vec![addr]),
            url: format!("http://{addr}"),
            token: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// A wait asks again after status polls the monitor did not take (here two 503s: at its connection
    /// limit), and ends with the program's answer; past `MISSED_POLLS` in a row it gives up, exit 69.
    #[test]
    fn a_wait_asks_again_after_missed_polls() {
        let busy = (
            503,
            r#"{"error": {"code": "unavailable", "message": "busy"}}"#.to_string(),
        );
        let running = serde_json::json!({
            "monitor": { "version": "test" },
            "programs": [{ "name": "p", "state": "RUNNING", "ready": true }],
        });
        // Said nothing about: a poll that gets a 503 goes through `poll_status`, which prints nothing (this
        // one takes the first answer; the wait then meets two more).
        let c = scripted_monitor(vec![
            busy.clone(),
            busy.clone(),
            busy.clone(),
            (200, running.to_string()),
        ]);
        assert!(matches!(poll_status(&c), Ok(None)));
        let mut results = vec![("p".to_string(), Ok("starting".to_string()))];
        let limit = Duration::from_secs(10);
        assert!(await_goal(&c, &mut results, &mut [false], Goal::Running, limit).is_ok());
        assert_eq!(results[0].1, Ok("started".to_string()));

        let c = scripted_monitor(vec![busy]);
        let mut results = vec![("p".to_string(), Ok("starting".to_string()))];
        let given_up = await_goal(&c, &mut results, &mut [false], Goal::Running, limit);
        assert!(matches!(given_up, Err(Failure::Exit(69))));
    }

    /// Misses in a row are over once a poll is answered: a wait that had missed `MISSED_POLLS` once gave up
    /// at the next single miss for the rest of its life (a long roll's follow ended exit 69 on one 503).
    #[test]
    fn an_answer_ends_a_run_of_missed_polls() {
        let busy = (503, r#"{"error": {"code": "unavailable"}}"#.to_string());
        let up = serde_json::json!({ "monitor": { "version": "test" }, "programs": [] });
        let c = scripted_monitor(vec![
            busy.clone(),
            busy.clone(),
            busy.clone(),
            (200, up.to_string()),
            busy,
            (200, up.to_string()),
        ]);
        let mut missed = 0;
        for _ in 0..MISSED_POLLS {
            assert!(matches!(poll(&c, &mut missed, None), Ok(None)));
        }
        assert!(matches!(poll(&c, &mut missed, None), Ok(Some(_))));
        assert!(
            matches!(poll(&c, &mut missed, None), Ok(None)),
            "one miss after an answer ended the wait"
        );
        assert!(matches!(poll(&c, &mut missed, None), Ok(Some(_))));
    }

    /// A roll that ended between two polls, another begun meanwhile, is found among the monitor's past rolls:
    /// its outcome was reported "gone".
    #[test]
    fn a_roll_followed_is_found_after_the_next_began() {
        let step =
            |step: &str, message: &str| serde_json::json!({ "name": "p", "step": step, "message": message });
        let roll = |id: u64, finished: bool, s: Value| serde_json::json!({ "id": id, "finished": finished, "limit_secs": 60, "programs": [s] });
        let status = serde_json::json!({
            "monitor": { "version": "test" },
            "programs": [],
            "roll": roll(8, false, step("restarting", "")),
            "past_rolls": [roll(7, true, step("done", "started"))],
        });
        // A poll the monitor did not take first (at its connection limit): asked again.
        let busy = (
            503,
            r#"{"error": {"code": "unavailable", "message": "busy"}}"#.to_string(),
        );
        let c = scripted_monitor(vec![busy, (200, status.to_string())]);
        let (followed, _) = follow_roll(&c, roll(7, false, step("restarting", "")), false).unwrap();
        assert_eq!(
            (followed["id"].clone(), roll_outcome(&followed["programs"][0])),
            (7.into(), Some(Ok("started".into())))
        );
    }

    #[test]
    fn only_a_program_with_a_process_is_ready_or_not() {
        let probe = serde_json::json!({ "http": "http://127.0.0.1:1/readyz" });
        let stopped = serde_json::json!({ "state": "STOPPED", "exit_code": 0, "readiness": probe });
        assert_eq!(describe(&stopped), "exit status 0");
        let starting =
            serde_json::json!({ "state": "STARTING", "pid": 5, "readiness": probe, "ready": false });
        assert_eq!(describe(&starting), "pid 5, not ready");
    }

    #[test]
    fn a_failure_is_shown_only_while_it_lasts() {
        let failed = |state: &str| {
            describe(&serde_json::json!({
                "state": state,
                "fatal_reason": "too many start retries too quickly",
                "fatal_message": "spawn error: no such file, gave up after 3 tries",
                "spawn_error": "no such file",
            }))
        };
        assert_eq!(
            failed("FATAL"),
            "spawn error: no such file, gave up after 3 tries"
        );
        assert_eq!(failed("BACKOFF"), "no such file");
        assert_eq!(failed("STOPPED"), "");
    }
}
