//! `numprocs` with per-instance names and ports, groups (`name:*`), log capture with size rotation, `tail`,
//! `tail -f` and `signal`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use monitor_common::*;
use xcluster_tests::*;

#[test]
fn numprocs_get_names_ports_and_a_group() {
    let m = Mon::start(
        r#"
[programs.web]
command = "/bin/sh -c 'echo port={port} num={num} name={name}; exec sleep 300'"
numprocs = 3
port_base = 7101
startsecs = 0
"#,
    );
    for (i, name) in ["web-0", "web-1", "web-2"].iter().enumerate() {
        m.wait_state(name, "RUNNING", T);
        let want = format!("port={} num={i} name={name}", 7101 + i);
        eventually(T, &format!("{name} printed its port"), || {
            let o = m.ctl(&["tail", name]);
            String::from_utf8_lossy(&o.stdout).contains(&want).then_some(())
        });
    }
    let metrics = get(m.addr, "/metrics").unwrap().body;
    for name in ["web-0", "web-1", "web-2"] {
        let l = format!("program=\"{name}\"");
        assert_eq!(
            metric_value(&metrics, "xcluster_monitor_program_up", &l),
            Some(1.0),
            "{metrics}"
        );
        assert_eq!(
            metric_value(&metrics, "xcluster_monitor_program_state", &l),
            Some(2.0),
            "{metrics}"
        );
        assert_eq!(
            metric_value(&metrics, "xcluster_monitor_program_restarts_total", &l),
            Some(0.0),
            "{metrics}"
        );
    }
    let o = m.ctl(&["status", "web:*"]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        3,
        "{}",
        out(&o)
    );
    // As supervisorctl: a pattern skips the programs already where the command takes them, a name does not.
    let o = m.ctl(&["stop", "web-1"]);
    assert_says(&o, 0, "web-1: stopped");
    let o = m.ctl(&["stop", "web:*"]);
    assert_says(&o, 0, "web-0: stopped\nweb-2: stopped");
    for name in ["web-0", "web-1", "web-2"] {
        assert_eq!(m.state(name), "STOPPED");
    }
    let o = m.ctl(&["stop", "all"]);
    assert_says(&o, 0, "");
    let o = m.ctl(&["stop", "web-0"]);
    assert_says(&o, 0, "web-0: ERROR (not running)");
    let o = m.ctl(&["status", "web:*"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "status of stopped programs exits 3: {}",
        out(&o)
    );
    let o = m.ctl(&["start", "web-2"]);
    assert_says(&o, 0, "web-2: started");
    let o = m.ctl(&["start", "all"]);
    assert_says(&o, 0, "web-0: started\nweb-1: started");
}

#[test]
fn logs_rotate_by_size_and_tail_follows_live_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("chatty.log");
    let m = Mon::start(&format!(
        r#"
[programs.chatty]
command = "/bin/sh -c 'i=0; while [ $i -lt 300 ]; do echo line-$i-0123456789012345678901234567890123456789; i=$((i+1)); done; trap \"echo got-usr1\" USR1; while :; do sleep 0.05; done'"
startsecs = 0
stdout_logfile = "{}"
stdout_logfile_maxbytes = 4096
stdout_logfile_backups = 2
"#,
        log.display()
    ));
    m.wait_state("chatty", "RUNNING", T);
    let o = eventually(T, "the last line in the tail", || {
        let o = m.ctl(&["tail", "chatty", "--bytes", "200"]);
        String::from_utf8_lossy(&o.stdout)
            .contains("line-299-")
            .then_some(o)
    });
    assert!(o.stdout.len() <= 200, "tail is bounded by --bytes");
    let whole = |line: &str| {
        line.strip_prefix("line-")
            .and_then(|l| l.split_once('-'))
            .is_some_and(|(n, rest)| {
                n.parse::<u32>().is_ok() && rest == "0123456789012345678901234567890123456789"
            })
    };
    // A tail from mid-file leaves the cut first line out (a line is 50 bytes: 180 starts inside one).
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.lines().all(whole), "a cut line in the tail: {text:?}");
    let o = m.ctl(&["tail", "chatty", "--bytes", "180"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        !text.is_empty() && text.lines().all(whole),
        "a cut line in the tail: {text:?}"
    );
    let backup = |i: u32| dir.path().join(format!("chatty.log.{i}"));
    assert!(backup(1).exists() && backup(2).exists(), "two backups kept");
    assert!(!backup(3).exists(), "no more than stdout_logfile_backups");
    for p in [log.clone(), backup(1), backup(2)] {
        assert!(
            std::fs::metadata(&p).unwrap().len() <= 4096,
            "{} over maxbytes",
            p.display()
        );
        // Rotated at line ends: every line whole.
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with('\n'), "{} ends mid-line", p.display());
        for line in text.lines() {
            assert!(whole(line), "{}: cut line {line:?}", p.display());
        }
    }

    // `tail -f | head -1` ends with head: the quiet log writes nothing more, so tail -f must see its output
    // closed without a write (it waited for the program's next line).
    let mut piped = Proc::spawn(
        "tail-f-head",
        std::path::Path::new("/bin/sh"),
        Spawn {
            args: [
                "-c",
                "\"$0\" ctl --url \"$1\" tail -f chatty --bytes 180 | head -1",
                &xcluster_bin().display().to_string(),
                &format!("http://{}", m.addr),
            ]
            .map(str::to_string)
            .to_vec(),
            ..Default::default()
        },
    );
    assert_eq!(piped.wait_exit(T), Some(0), "{}", piped.stderr());
    let first = piped.stdout();
    assert!(whole(first.trim_end()), "{first:?}");
    let needle = format!("XCLUSTER_TEST_TAG={}", piped.tag());
    eventually(T, "tail -f to end with its reader", || {
        tagged_pids(&needle).is_empty().then_some(())
    });

    // Follow: a signal makes the program print, and `tail -f` shows it as it happens.
    let follow = Proc::xcluster(
        "tail-f",
        &[
            "ctl",
            "--url",
            &format!("http://{}", m.addr),
            "tail",
            "-f",
            "chatty",
            "--bytes",
            "10",
        ],
    );
    // The follower subscribes before it reads the file, so anything printed after its first bytes arrive is seen.
    eventually(T, "tail -f connected", || {
        (!follow.stdout().is_empty()).then_some(())
    });
    let o = m.ctl(&["signal", "USR1", "chatty"]);
    assert!(o.status.success(), "{}", out(&o));
    eventually(T, "tail -f shows the live line", || {
        follow.stdout().contains("got-usr1").then_some(())
    });

    // `clear` empties the log and removes its backups; the program's next output starts the file again.
    let o = m.ctl(&["clear", "chatty"]);
    assert_says(&o, 0, "chatty: cleared");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
    assert!(!backup(1).exists() && !backup(2).exists(), "backups left");
    m.ctl_ok(&["signal", "USR1", "chatty"]);
    eventually(T, "the next line in the cleared log", || {
        (std::fs::read_to_string(&log).unwrap() == "got-usr1\n").then_some(())
    });
    let o = m.ctl(&["clear", "nope"]);
    assert_says(&o, 1, "xcluster ctl: no such process or group: nope");
}

/// Asserts that each of `names`, in order, was stopped (its stop after event `after`) only once the one
/// before it was ready again.
fn assert_one_at_a_time(events: &[serde_json::Value], names: &[&str], after: u64) {
    let seq = |program: &str, is: &dyn Fn(&serde_json::Value) -> bool| -> Vec<u64> {
        (events.iter())
            .filter(|e| e["program"] == program && is(e))
            .map(|e| e["seq"].as_u64().unwrap())
            .filter(|s| *s > after)
            .collect()
    };
    for pair in names.windows(2) {
        let stopped = seq(pair[0], &|e| e["to"] == "STOPPING")[0];
        let back = *seq(pair[0], &|e| e["kind"] == "probe" && e["ok"] == true)
            .iter()
            .find(|s| **s > stopped)
            .expect("ready again");
        let next_stopped = seq(pair[1], &|e| e["to"] == "STOPPING")[0];
        assert!(
            back < next_stopped,
            "{} stopped before {} was back: {events:?}",
            pair[1],
            pair[0]
        );
    }
}

/// Programs ready once their marker exists (made at start, removed on TERM), each `numprocs = 3`, started
/// with `version` as an argument (`broken` never gets ready, `held` once the file `release` is made in `d`);
/// `app` rolls on an update by itself.
fn versioned(d: &std::path::Path, version: &str) -> String {
    let d = d.display();
    let mut s = String::new();
    for (name, strategy) in [("app", "rolling"), ("web", "restart")] {
        s += &format!(
            r#"
[programs.{name}]
command = "/bin/sh -c 'trap \"rm -f {d}/{{name}}.ready; exit 0\" TERM; [ {version} = held ] && until [ -e {d}/release ]; do sleep 0.05; done; [ {version} = broken ] || touch {d}/{{name}}.ready; while :; do sleep 0.05; done' {version}"
numprocs = 3
startsecs = 0
update_strategy = "{strategy}"
[programs.{name}.readiness]
command = "test -e {d}/{{name}}.ready"
period_ms = 50
"#
        );
    }
    s
}

/// A monitor running [`versioned`] programs at `v1`, with `auto_update = false`, so the file watcher leaves
/// the updates to `ctl update`.
struct Versioned {
    m: Mon,
    /// Where the programs' ready markers are.
    real: tempfile::TempDir,
}

impl Versioned {
    fn start() -> Versioned {
        let real = tempfile::tempdir().unwrap();
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let d = dir.clone();
        let programs = Self::programs(real.path(), "v1");
        let m = Mon::launch(dir, None, move |addr| {
            write_file(d.path(), "monitor.toml", &config_text(addr, d.path(), &programs))
        });
        Versioned { m, real }
    }

    fn programs(real: &std::path::Path, version: &str) -> String {
        format!("auto_update = false\n{}", versioned(real, version))
    }

    /// Saves the config at `version` (applied by `ctl update`).
    fn write(&self, version: &str) {
        let programs = Self::programs(self.real.path(), version);
        std::fs::write(
            &self.m.config,
            config_text(self.m.addr, self.m.dir.path(), &programs),
        )
        .unwrap();
    }
}

/// An update restarts the changed instances of a program with `update_strategy = "rolling"` one at a time,
/// and `ctl update --rolling` those of any program; added programs start at once.
#[test]
fn an_update_rolls_a_program_whose_strategy_says_so_and_update_rolling_rolls_any() {
    let v = Versioned::start();
    let m = &v.m;
    let apps = ["app-0", "app-1", "app-2"];
    let webs = ["web-0", "web-1", "web-2"];
    for name in apps.iter().chain(&webs) {
        eventually(T, "every instance ready", || {
            (m.prog(name)["ready"] == true).then_some(())
        });
    }
    let last_seq = || {
        m.events()
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let write = |version: &str| v.write(version);
    let runs = |name: &str, version: &str| {
        let p = m.prog(name);
        (p["command"].as_array().unwrap().last() == Some(&serde_json::json!(version)) && p["ready"] == true)
            .then_some(())
    };

    // A plain update: app rolls (its strategy), web restarts at once as Supervisord does.
    let before = last_seq();
    write("v2");
    let o = m.ctl(&["update"]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("web-0: changed (applied)"), "{text}");
    // The roll is followed to its end, as `--rolling`'s is: it said "applied" and exited as the roll began.
    let rolled = |text: &str, names: &[&str], version: &str| {
        for name in names {
            assert!(text.contains(&format!("{name}: changed (rolling)")), "{text}");
            assert!(text.contains(&format!("{name}: started")), "{text}");
            let p = m.prog(name);
            assert!(runs(name, version).is_some(), "{name} once ctl returned: {p}");
        }
    };
    rolled(&text, &apps, "v2");
    for name in apps.iter().chain(&webs) {
        eventually(T, &format!("{name} to run v2"), || runs(name, "v2"));
    }
    let events = m.events();
    assert_one_at_a_time(&events, &apps, before);
    let first_stop = |name: &str| {
        (events.iter())
            .find(|e| e["program"] == name && e["to"] == "STOPPING" && e["seq"].as_u64().unwrap() > before)
            .map(|e| e["seq"].as_u64().unwrap())
            .unwrap()
    };
    let web_stops: Vec<u64> = webs.iter().map(|n| first_stop(n)).collect();
    let web_back = (events.iter())
        .filter(|e| e["program"] == "web-0" && e["kind"] == "probe" && e["ok"] == true)
        .filter_map(|e| e["seq"].as_u64())
        .find(|s| *s > web_stops[0])
        .unwrap();
    assert!(
        web_stops.iter().all(|s| *s < web_back),
        "web restarted one at a time: {events:?}"
    );

    // `update --rolling` rolls web too, and prints each instance as it comes back.
    let before = last_seq();
    write("v3");
    let o = m.ctl(&["update", "--rolling"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    rolled(&text, &[apps, webs].concat(), "v3");
    let events = m.events();
    let order: Vec<&str> = apps.iter().chain(&webs).copied().collect();
    assert_one_at_a_time(&events, &order, before);
    // Applied once: the reloader's own apply of the same file restarted nothing more.
    let pids: Vec<Option<i32>> = order.iter().map(|n| m.pid(n)).collect();
    assert!(m.ctl_ok(&["update"]).contains("No config updates"));
    assert_eq!(order.iter().map(|n| m.pid(n)).collect::<Vec<_>>(), pids);
    assert!(order.iter().all(|n| m.prog(n)["update_pending"] == false));

    // A version that never gets ready: the roll stops at the first instance, and the rest keep running
    // their old settings, shown as pending.
    write("broken");
    let o = m.ctl(&["--wait-secs", "1", "update", "--rolling"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("app-0: ERROR (still RUNNING, not ready after 1 s)"),
        "{text}"
    );
    assert!(
        text.contains("app-1: ERROR (not restarted: the roll stopped)"),
        "{text}"
    );
    for name in ["app-1", "app-2", "web-0"] {
        assert_eq!(
            m.pid(name),
            pids[order.iter().position(|n| n == &name).unwrap()],
            "{name}"
        );
        assert_eq!(m.prog(name)["update_pending"], true, "{}", m.prog(name));
    }
    let status = m.ctl_ok(&["status", "app-1"]);
    assert!(
        status.contains("runs an older config (a restart applies the new one)"),
        "{status}"
    );

    // Reverted: the instances still on v3 keep their processes, their pending change dropped (they were
    // restarted onto what they ran), and app-0, restarted into the broken version, rolls back.
    write("v3");
    let o = m.ctl(&["update"]);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("app-0: started"), "{text}");
    for name in ["app-1", "app-2", "web-0", "web-1", "web-2"] {
        let i = order.iter().position(|n| n == &name).unwrap();
        assert_eq!(m.pid(name), pids[i], "{name}: {text}");
        assert_eq!(m.prog(name)["update_pending"], false, "{}", m.prog(name));
    }
    assert!(runs("app-0", "v3").is_some(), "{}", m.prog("app-0"));
}

/// An update reverted while its roll is under way: the instances still waiting for it are passed over, not
/// restarted onto the settings they already run, and the one the roll was restarting rolls back at its end.
#[test]
fn a_change_reverted_while_its_roll_runs_restarts_nothing_more() {
    let v = Versioned::start();
    let m = &v.m;
    let apps = ["app-0", "app-1", "app-2"];
    for name in apps {
        eventually(T, "every instance ready", || {
            (m.prog(name)["ready"] == true).then_some(())
        });
    }
    let pids: Vec<_> = apps.iter().map(|n| m.pid(n)).collect();
    // `held` is not ready until released: the roll stays at app-0, app-1 and app-2 waiting.
    v.write("held");
    m.ctl_ok(&["--no-wait", "update"]);
    eventually(T, "app-0 to run the held version", || {
        let p = m.prog("app-0");
        (p["state"] == "RUNNING" && p["command"].as_array()?.last()? == "held").then_some(())
    });
    let step = |i: usize| m.status()["roll"]["programs"][i]["step"].clone();
    assert_eq!((step(0), step(1)), ("restarting".into(), "waiting".into()));
    v.write("v1");
    m.ctl_ok(&["--no-wait", "update"]);
    std::fs::write(v.real.path().join("release"), "").unwrap();
    // app-0 comes back on `held`, then rolls back to v1 in the step the revert added.
    let unchanged = ("done", "not restarted: its settings are those in force");
    let started = ("done", "started");
    assert_roll_ended(m, &[started, unchanged, unchanged, started]);
    assert_eq!((m.pid("app-1"), m.pid("app-2")), (pids[1], pids[2]));
    let v1 = serde_json::json!("v1");
    assert_eq!(m.prog("app-0")["command"].as_array().unwrap().last(), Some(&v1));
}

/// Waits for the roll under way to end; asserts each program's step and message then.
fn assert_roll_ended(m: &Mon, want: &[(&str, &str)]) {
    let roll = eventually(T, "the roll to end", || {
        let roll = m.status()["roll"].clone();
        (roll["finished"] == true).then_some(roll)
    });
    let steps: Vec<(&str, &str)> = (roll["programs"].as_array().unwrap().iter())
        .map(|s| (s["step"].as_str().unwrap(), s["message"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, want);
}

#[test]
fn a_rolling_restart_takes_one_program_at_a_time_and_stops_at_one_that_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Ready once its marker exists: made at start unless `broken-<name>` does, removed on TERM.
    let m = Mon::start(&format!(
        r#"
[programs.app]
command = "/bin/sh -c 'trap \"rm -f {d}/{{name}}.ready; exit 0\" TERM; [ -e {d}/broken-{{name}} ] || touch {d}/{{name}}.ready; while :; do sleep 0.05; done'"
numprocs = 3
startsecs = 0
[programs.app.readiness]
command = "test -e {d}/{{name}}.ready"
period_ms = 50
"#
    ));
    let names = ["app-0", "app-1", "app-2"];
    let ready = |name: &str| (m.prog(name)["ready"] == true).then_some(());
    for name in names {
        eventually(T, "every instance ready", || ready(name));
    }
    assert_eq!(m.ctl_ok(&["status", "all"]).lines().count(), 3);
    let before: Vec<i32> = names.iter().map(|n| m.pid(n).unwrap()).collect();

    let o = m.ctl(&["restart", "--rolling", "app:*"]);
    assert_says(&o, 0, "app-0: started\napp-1: started\napp-2: started");
    for (name, old) in names.iter().zip(&before) {
        assert_ne!(m.pid(name), Some(*old), "{name} was not restarted");
    }
    assert_one_at_a_time(&m.events(), &names, 0);

    // app-1 does not come back ready: the roll stops there and app-2 keeps its process.
    std::fs::write(dir.path().join("broken-app-1"), "").unwrap();
    let app_2 = m.pid("app-2").unwrap();
    let o = m.ctl(&["--wait-secs", "2", "restart", "--rolling", "app"]);
    assert_says(
        &o,
        1,
        "app-0: started\napp-1: ERROR (still RUNNING, not ready after 2 s)\n\
         app-2: ERROR (not restarted: the roll stopped)",
    );
    assert_eq!(m.pid("app-2"), Some(app_2));

    // The monitor drives the roll: it goes on after `ctl --no-wait` has returned, shows in the status,
    // refuses a second roll meanwhile, and a stop of the program it waits for ends it there. app-1, not
    // ready, goes first.
    let o = m.ctl(&["--no-wait", "--wait-secs", "60", "restart", "--rolling", "app"]);
    assert_says(&o, 0, "app-0: waiting\napp-1: restarting\napp-2: waiting");
    let step = |i: usize| m.status()["roll"]["programs"][i]["step"].clone();
    assert_eq!((step(0), step(1)), ("waiting".into(), "restarting".into()));
    let o = m.ctl(&["status", "app-0"]);
    assert!(
        out(&o).contains("rolling restart 3: app-1 restarting, 0 of 3 done"),
        "{}",
        out(&o)
    );
    let o = m.ctl(&["restart", "--rolling", "app"]);
    assert_says(
        &o,
        1,
        "xcluster ctl: a rolling restart is under way (app-1 restarting)",
    );
    m.ctl_ok(&["stop", "app-1"]);
    assert_roll_ended(
        &m,
        &[
            ("skipped", "not restarted: the roll stopped"),
            ("failed", "stopped"),
            ("skipped", "not restarted: the roll stopped"),
        ],
    );
    assert_eq!(m.pid("app-2"), Some(app_2));
    // The rolls before the last stay in the status, finished, for a client that followed one of them.
    let past = m.status()["past_rolls"].clone();
    let past: Vec<_> = (past.as_array().unwrap().iter())
        .map(|r| (r["id"].clone(), r["finished"].clone()))
        .collect();
    assert_eq!(past, [(1.into(), true.into()), (2.into(), true.into())]);
}

/// A roll restarts an instance that is not ready (down already) before those that serve: here it does not
/// come back, so the roll stops there and the serving ones keep their processes. Taken in order, each
/// serving one went down in turn while that one was down too.
#[test]
fn a_rolling_restart_takes_an_instance_that_is_down_first() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mon::start(&format!(
        "[programs.app]\ncommand = \"sleep 300\"\nnumprocs = 3\nstartsecs = 0\n\
         [programs.app.readiness]\ncommand = \"test ! -e {}/down-{{name}}\"\nperiod_ms = 50\n",
        dir.path().display()
    ));
    for name in ["app-0", "app-1", "app-2"] {
        eventually(T, "every instance ready", || {
            (m.prog(name)["ready"] == true).then_some(())
        });
    }
    std::fs::write(dir.path().join("down-app-2"), "").unwrap();
    eventually(T, "app-2 not ready", || {
        (m.prog("app-2")["ready"] == false).then_some(())
    });
    let serving = [m.pid("app-0"), m.pid("app-1")];
    let o = m.ctl(&["--wait-secs", "2", "restart", "--rolling", "app:*"]);
    assert_says(
        &o,
        1,
        "app-0: ERROR (not restarted: the roll stopped)\napp-1: ERROR (not restarted: the roll stopped)\n\
         app-2: ERROR (still RUNNING, not ready after 2 s)",
    );
    assert_eq!([m.pid("app-0"), m.pid("app-1")], serving);
}

/// An instance an update removes while a roll is under way is passed over when its turn comes: "gone"
/// stopped the roll there, as a failure, and the programs after it were not restarted.
#[test]
fn a_rolling_restart_passes_over_an_instance_removed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let hold = dir.path().join("hold");
    // Ready unless `hold` exists.
    let programs = |n: u32| {
        format!(
            "[programs.app]\ncommand = \"sleep 300\"\nnumprocs = {n}\nstartsecs = 0\n\
             [programs.app.readiness]\ncommand = \"test ! -e {}\"\nperiod_ms = 50\n",
            hold.display()
        )
    };
    let m = Mon::start(&programs(3));
    for name in ["app-0", "app-1", "app-2"] {
        eventually(T, "every instance ready", || {
            (m.prog(name)["ready"] == true).then_some(())
        });
    }
    std::fs::write(&hold, "").unwrap();
    let o = m.ctl(&["--no-wait", "--wait-secs", "60", "restart", "--rolling", "app:*"]);
    assert_says(&o, 0, "app-0: restarting\napp-1: waiting\napp-2: waiting");
    m.rewrite(&programs(2));
    eventually(T, "app-2 removed", || {
        (!lists(&m.status(), "app-2")).then_some(())
    });
    std::fs::remove_file(&hold).unwrap();
    assert_roll_ended(
        &m,
        &[
            ("done", "started"),
            ("done", "started"),
            ("skipped", "removed from the config"),
        ],
    );
}

/// A roll of one-shot tasks: each runs, and ends as its `exitcodes` expect, which is how it should come back
/// (never ready: its readiness command fails, so only its exit decides). The roll stopped at the first one,
/// calling its clean exit an abnormal termination.
#[test]
fn a_rolling_restart_of_one_shot_tasks_takes_their_expected_exits_as_done() {
    let m = Mon::start(
        r#"
[programs.job]
command = "/bin/sh -c 'sleep 0.2; exit 0'"
numprocs = 2
startsecs = 0
autorestart = false
[programs.job.readiness]
command = "false"
period_ms = 50
"#,
    );
    for name in ["job-0", "job-1"] {
        m.wait_state(name, "EXITED", T);
    }
    let o = m.ctl(&["restart", "--rolling", "job:*"]);
    assert_says(
        &o,
        0,
        "job-0: started, then exited: exit status 0\njob-1: started, then exited: exit status 0",
    );
}

/// A program FATAL after an outage, fixed and rolled: the roll starts each instance and waits for it. It
/// failed the first with its old fatal message, before the start had even begun, and skipped the rest.
#[test]
fn a_rolling_restart_of_a_fatal_program_waits_for_its_new_start() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let m = Mon::start(&format!(
        r#"
[programs.app]
command = "/bin/sh -c 'test -f {} && exec sleep 300; exit 3'"
numprocs = 2
startretries = 0
"#,
        fixed.display()
    ));
    for name in ["app-0", "app-1"] {
        m.wait_state(name, "FATAL", T);
    }
    std::fs::write(&fixed, "").unwrap();
    let o = m.ctl(&["restart", "--rolling", "app:*"]);
    assert_says(&o, 0, "app-0: started\napp-1: started");
    for name in ["app-0", "app-1"] {
        m.wait_state(name, "RUNNING", T);
    }
}

/// A program logging to a device (`/dev/null` here; `/dev/stdout` in a container) has nothing to tail: a
/// tail says so (404 `no_log`), and `tail -f` shows its output from now on. Before, the tail read the device
/// on a runtime worker: `/dev/stdout` reopened the monitor's own stdout, a pipe or terminal that never
/// reaches its end, and each such request pinned a worker for good.
#[test]
fn a_program_logging_to_a_device_is_followed_not_tailed() {
    let m = Mon::start(
        "[programs.dev]\ncommand = \"sh -c 'trap \\\"echo got-usr1\\\" USR1; while :; do sleep 0.05; done'\"\n\
         startsecs = 0\nstdout_logfile = \"/dev/null\"\n",
    );
    m.wait_state("dev", "RUNNING", T);
    let r = get(m.addr, "/v1/programs/dev/log").unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "no_log", "{}", r.body);
    assert!(r.body.contains("follow it"), "{}", r.body);
    let follow = Proc::xcluster(
        "tail-f-device",
        &["ctl", "--url", &format!("http://{}", m.addr), "tail", "-f", "dev"],
    );
    // Nothing to show until the program writes: signal until the follower has subscribed and shows it.
    eventually(T, "tail -f shows the live line", || {
        let o = m.ctl(&["signal", "USR1", "dev"]);
        assert!(o.status.success(), "{}", out(&o));
        follow.stdout().contains("got-usr1").then_some(())
    });
}
