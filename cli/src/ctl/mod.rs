//! `xcluster ctl`: the monitor's control client, with Supervisorctl's verbs over the monitor's HTTP API.
//!
//! Exit codes: 0 success (also a `start` of a program already running and a `stop` of one already stopped,
//! which say so, as supervisorctl: scripts may call them idempotently); 1 a refused or failed action (unknown
//! program, a spawn error, FATAL, invalid config, a program that did not come up or stop within `--wait-secs`);
//! 2 bad arguments (clap's usage error, as a `start` without a name);
//! 3 `status` found a process that is not RUNNING (as supervisorctl), `pid` a program without a process, or
//! `cluster`, `drain` or `undrain` a balancer that does not answer; 4 `status` was given a name that picks
//! nothing, and showed the rest all RUNNING (as supervisorctl); 69 the monitor cannot be reached or does
//! not answer within `--timeout-secs`; 77 the token was refused.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use xcluster_runtime::http::percent_encode;

use crate::args::{CtlArgs, CtlVerb};

mod client;
mod cluster;
mod programs;
mod stream;

use cluster::{cluster, server_action};
use programs::{action, avail, names_query, pid, plan, rolling_restart, rolling_update, status};
use xcluster_proto::directory::ServerAction;

const EXIT_FAILED: i32 = 1;
const EXIT_NOT_RUNNING: i32 = 3;
/// `status` was given a name that picks nothing (LSB's "program status unknown", as supervisorctl).
const EXIT_UNKNOWN: i32 = 4;
const EXIT_USAGE: i32 = 64;
const EXIT_UNAVAILABLE: i32 = 69;
const EXIT_NOPERM: i32 = 77;

/// A program's name and the monitor's answer for it: done (with what happened) or why not.
type Answer = (String, Result<String, String>);
/// Largest answer we read. A status of hundreds of programs is far smaller, but the cluster view passes on
/// each balancer's status (up to 16 MiB each, the monitor's own bound), so this leaves room for several.
const MAX_RESPONSE: u64 = 64 * 1024 * 1024;

struct Client {
    /// Every address `--url` resolved to, tried in turn (`localhost` may be `::1` first).
    addrs: crate::addrs::Addrs,
    url: String,
    token: Option<String>,
    timeout: Duration,
}

/// Whether the monitor at `addr` answers `GET /readyz` with 200 within `timeout` (`up --detach` waits on it).
pub(crate) fn monitor_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let c = Client {
        addrs: crate::addrs::Addrs::new(vec![addr]),
        url: format!("http://{addr}"),
        token: None,
        timeout,
    };
    c.call("GET", "/readyz").is_ok_and(|r| r.status == 200)
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

/// `shutdown`: like `stop`, it answers once done (within `--wait-secs`; `--no-wait` at once). The monitor
/// keeps its API until every program has stopped and its run directory is released, so once the API no
/// longer answers the next `xcluster up` finds the port and the directory free (it failed with "address
/// already in use" when run straight after).
///
/// A monitor already shutting down (an earlier `--no-wait shutdown`, SIGTERM) is no failure: this waits for
/// it to be gone as for its own, so a script's `ctl shutdown` then `xcluster up` works either way (it exited 1
/// at once, with the monitor still there), and says so, as supervisorctl does.
fn shutdown(c: &Client, args: &CtlArgs) -> Result<i32, Failure> {
    let r = c.call("POST", "/v1/shutdown")?;
    let already = r.status == 409 && r.json()["error"]["code"] == "shutting_down";
    if already {
        eprintln!("xcluster ctl: the monitor at {} was already shutting down", c.url);
    } else {
        check(&r)?;
    }
    if !args.no_wait {
        let deadline = std::time::Instant::now() + Duration::from_secs(args.wait_secs);
        // A refused (or reset) connection is the monitor gone; a slow answer is one still stopping.
        while !matches!(c.call("GET", "/livez"), Err(Failure::Unreachable(_))) {
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "xcluster ctl: the monitor at {} still answers after {}s: its programs are still \
                     stopping (`ctl status` shows which)",
                    c.url, args.wait_secs
                );
                return Ok(EXIT_FAILED);
            }
            std::thread::sleep(programs::WAIT_POLL);
        }
    }
    if args.json {
        println!("{}", String::from_utf8_lossy(&r.body));
    } else if args.no_wait {
        // Not waited for: it has begun, and its programs may still be stopping.
        println!("Shutting down");
    } else {
        println!("Shut down");
    }
    Ok(0)
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
            channel,
            follow,
            stream,
            bytes,
        } => {
            let stream = channel.as_ref().unwrap_or(stream);
            let path = format!(
                "/v1/programs/{}/log?stream={stream}&bytes={bytes}{}",
                percent_encode(name),
                if *follow { "&follow=1" } else { "" }
            );
            let code = c.stream(&path, *follow)?;
            Ok(code)
        }
        CtlVerb::Maintail { follow, bytes } => {
            let path = format!("/v1/log?bytes={bytes}{}", if *follow { "&follow=1" } else { "" });
            c.stream(&path, *follow)
        }
        CtlVerb::Cluster => cluster(c, args.json),
        CtlVerb::Drain { ids } => server_action(c, ids, ServerAction::Drain(true), args.json),
        CtlVerb::Undrain { ids } => server_action(c, ids, ServerAction::Drain(false), args.json),
        CtlVerb::Weight { weight, ids } => server_action(c, ids, ServerAction::Weight(*weight), args.json),
        CtlVerb::Reread => plan(c, "/v1/reread", false, args),
        CtlVerb::Avail => avail(c, args.json),
        CtlVerb::Update {
            rolling: false,
            names,
        } => plan(c, &format!("/v1/update{}", names_query(names, '?')), true, args),
        CtlVerb::Update { rolling: true, names } => rolling_update(c, args, names),
        CtlVerb::Add { names } => programs::plan_with(
            c,
            &format!("/v1/update{}&only=added", names_query(names, '?')),
            true,
            args,
            programs::NOT_ADDED,
        ),
        CtlVerb::Remove { names } => programs::plan_with(
            c,
            &format!("/v1/update{}&only=removed", names_query(names, '?')),
            true,
            args,
            programs::NOT_REMOVED,
        ),
        CtlVerb::Shutdown => shutdown(c, args),
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
        // Over its connection limit, or its supervisor not taking commands: unavailable for now (69), which
        // a script may retry, not a failed action. (A command taken and not answered in time is a 504, a
        // failure: sent again, it could apply twice.)
        503 if r.json()["error"]["code"].is_string() => {
            eprintln!("xcluster ctl: {}", r.message());
            Err(Failure::Exit(EXIT_UNAVAILABLE))
        }
        // Not an XCluster API's error (an HTML page, nothing): said as such, not dumped whole, and as a
        // monitor not found (69).
        _ if !r.json()["error"]["code"].is_string() => {
            let first = r.message();
            let first: String = first.lines().next().unwrap_or("").chars().take(120).collect();
            eprintln!(
                "xcluster ctl: the server answered HTTP {} ({first}), not as an XCluster monitor; a monitor \
                 listens on http://127.0.0.1:7300 unless its config says otherwise",
                r.status
            );
            Err(Failure::Exit(EXIT_UNAVAILABLE))
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
    status_of(c, &c.call("GET", "/v1/status")?)
}

/// A status poll of a wait: `None`, said nothing about, when the monitor did not answer it now (busy, at its
/// connection limit, or not reached), for the wait to ask again ([`monitor_status`] says why on the last).
fn poll_status(c: &Client) -> Result<Option<Value>, Failure> {
    match c.call("GET", "/v1/status") {
        Ok(r) if r.status != 503 => status_of(c, &r).map(Some),
        Ok(_) | Err(_) => Ok(None),
    }
}

/// The monitor's answer to `GET /v1/status`, checked.
fn status_of(c: &Client, r: &Resp) -> Result<Value, Failure> {
    check(r)?;
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

/// The programs of a status (`v`, `GET /v1/status`) that `names` pick, as the monitor picks them for a command.
fn pick<'v>(v: &'v Value, names: &[String]) -> Result<Vec<&'v Value>, Failure> {
    pick_quietly(v, names).map_err(|n| {
        eprintln!("xcluster ctl: no such process or group: {n}");
        Failure::Exit(EXIT_FAILED)
    })
}

/// [`pick`], saying nothing: `Err` is the first name that picks nothing.
fn pick_quietly<'v, 'n>(v: &'v Value, names: &'n [String]) -> Result<Vec<&'v Value>, &'n str> {
    let all = items(&v["programs"]);
    // `[groups.*]`, from a monitor that has them.
    let groups: xcluster_monitor::select::Groups = (v["groups"].as_object().into_iter().flatten())
        .map(|(name, programs)| {
            let programs = items(programs)
                .iter()
                .filter_map(|p| p.as_str().map(str::to_string));
            (name.clone(), programs.collect())
        })
        .collect();
    let programs: Vec<(&str, &str)> = (all.iter())
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["group"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let picked = xcluster_monitor::select::resolve(&programs, &groups, names)?;
    Ok(picked.into_iter().map(|(i, _)| &all[i]).collect())
}
