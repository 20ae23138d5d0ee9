//! The monitor's restart policy against real children: `autorestart` in its three modes with `exitcodes`,
//! `startsecs`/`startretries` to FATAL and the automatic retry from FATAL, `stopwaitsecs` escalation to SIGKILL,
//! and the whole process group dying with its program (no grandchild survives, no zombie is left).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use std::time::Duration;

use monitor_common::*;
use xcluster_tests::*;

#[test]
fn autorestart_modes_with_exitcodes() {
    let m = Mon::start(
        r#"
[programs.always]
command = "/bin/sh -c 'sleep 0.2; exit 0'"
autorestart = true
startsecs = 0
backoff_initial_ms = 50
[programs.never]
command = "/bin/sh -c 'sleep 0.2; exit 4'"
autorestart = false
startsecs = 0
[programs.expected]
command = "/bin/sh -c 'sleep 0.2; exit 3'"
exitcodes = [0, 3]
startsecs = 0
[programs.unexpected]
command = "/bin/sh -c 'sleep 0.2; exit 4'"
exitcodes = [0, 3]
startsecs = 0
backoff_initial_ms = 50
"#,
    );
    for name in ["always", "unexpected"] {
        eventually(T, &format!("{name} restarted twice"), || {
            (m.prog(name)["restarts"].as_u64().unwrap() >= 2).then_some(())
        });
    }
    let never = m.wait_state("never", "EXITED", T);
    assert_eq!(never["exit_code"], 4);
    let expected = m.wait_state("expected", "EXITED", T);
    assert_eq!(expected["exit_code"], 3);
    // By now each has long exited (the others restarted twice meanwhile): they stay down.
    assert_eq!(m.prog("never")["restarts"], 0);
    assert_eq!(m.prog("expected")["restarts"], 0);
    assert_eq!(m.state("never"), "EXITED");
    assert_eq!(m.state("expected"), "EXITED");
}

/// A one-shot task with `startsecs = 0` (Supervisord's way to run one) exits at once: that is a run, judged
/// by `autorestart` and `exitcodes`, not a failed start. It was taken for one, so the task ran four times and
/// ended FATAL ("exited too quickly: exit status 0").
#[test]
fn a_one_shot_task_with_startsecs_zero_runs_once_and_is_exited() {
    let m = Mon::start(
        r#"
[programs.oneshot]
command = "/bin/sh -c 'echo ran >> {run_dir}/oneshot.runs'"
startsecs = 0
autorestart = false
[programs.task]
command = "/bin/sh -c 'echo ran >> {run_dir}/task.runs; exit 3'"
startsecs = 0
exitcodes = [3]
"#,
    );
    for (name, code) in [("oneshot", 0), ("task", 3)] {
        let p = m.wait_state(name, "EXITED", T);
        assert_eq!(p["exit_code"], code);
        assert_eq!(p["restarts"], 0);
        let runs = std::fs::read_to_string(m.dir.path().join(format!("run/{name}.runs"))).unwrap();
        assert_eq!(runs, "ran\n", "{name} ran more than once");
    }
    // Started again, it runs and ends as it should: started, as supervisorctl says, not an "abnormal
    // termination: exit status 0" (exit 1). (A process still running at ctl's look is plainly "started".)
    let said = m.ctl_ok(&["start", "oneshot"]);
    assert!(said.starts_with("oneshot: started"), "{said}");
    let o = m.ctl(&["start", "task"]);
    assert!(out(&o).starts_with("task: started"), "{}", out(&o));
    m.wait_state("task", "EXITED", T);
    let runs = std::fs::read_to_string(m.dir.path().join("run/task.runs")).unwrap();
    assert_eq!(runs, "ran\nran\n");
}

#[test]
fn startretries_lead_to_fatal_which_is_retried_after_the_cooldown() {
    let m = Mon::start(
        r#"
[programs.crash]
command = "/bin/sh -c 'exit 1'"
startsecs = 1
startretries = 2
backoff_initial_ms = 50
fatal_retry_secs = 1
"#,
    );
    let p = m.wait_state("crash", "FATAL", T);
    assert_eq!(p["fatal_reason"], "too many start retries too quickly");
    assert_eq!(p["exit_code"], 1);
    let transitions = |m: &Mon| -> Vec<(String, String)> {
        m.events()
            .iter()
            .filter(|e| e["kind"] == "state" && e["program"] == "crash")
            .map(|e| {
                (
                    e["from"].as_str().unwrap().to_string(),
                    e["to"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let t = transitions(&m);
    let starts = t.iter().filter(|(_, to)| to == "STARTING").count();
    assert_eq!(starts, 3, "one start and startretries=2 retries: {t:?}");
    assert_eq!(
        t.iter()
            .filter(|(f, to)| f == "STARTING" && to == "BACKOFF")
            .count(),
        3,
        "{t:?}"
    );
    assert_eq!(t.last().unwrap(), &("BACKOFF".to_string(), "FATAL".to_string()));
    // The cool-down retries FATAL without a human.
    eventually(T, "FATAL retried after fatal_retry_secs", || {
        transitions(&m)
            .iter()
            .any(|(f, to)| f == "FATAL" && to == "STARTING")
            .then_some(())
    });
}

/// A shutdown starts nothing again: `base` crashes while the shutdown waits for `slow`, which depends on it,
/// to stop. Its restart spawned a new `base` in the middle of the shutdown, which then had to be stopped
/// in its turn (a BACKOFF or FATAL timer, or a failing liveness probe, did the same).
#[test]
fn a_shutdown_starts_nothing_again() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("base.starts");
    let mut m = Mon::start(&format!(
        r#"
[programs.base]
command = "/bin/sh -c 'echo started >> {starts}; exec sleep 1000'"
startsecs = 0
[programs.slow]
command = '''{held}'''
depends_on = ["base"]
startsecs = 0
stopwaitsecs = 600
"#,
        starts = starts.display(),
        held = held_until_released(dir.path())
    ));
    m.wait_state("slow", "RUNNING", T);
    trapped(&m, "slow", 1);
    let (base, slow) = (m.pid("base").unwrap(), m.pid("slow").unwrap());
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    m.wait_state("slow", "STOPPING", T);
    assert_eq!(m.state("base"), "RUNNING", "held for slow, which depends on it");
    kill9(base);
    // Its exit handled (abandoned, or started again) while slow still stops.
    eventually(T, "base's exit seen", || {
        let p = m.prog("base");
        (p["pid"].as_i64() != Some(i64::from(base)) || p["state"] != "RUNNING").then_some(())
    });
    release(dir.path(), slow);
    assert_eq!(m.proc.wait_exit(T), Some(0));
    let started = std::fs::read_to_string(&starts).unwrap();
    assert_eq!(started.lines().count(), 1, "base started again: {started:?}");
}

/// A monitor running `stubborn`, a program that ignores SIGTERM (so a stop lasts until `stopwaitsecs` ends
/// it with SIGKILL), once its trap is set.
fn stubborn(stopwaitsecs: u32) -> Mon {
    let m = Mon::start(&format!(
        r#"
[programs.stubborn]
command = "/bin/sh -c 'trap \"\" TERM; echo trapped; while :; do sleep 0.1; done'"
startsecs = 0
stopwaitsecs = {stopwaitsecs}
"#
    ));
    m.wait_state("stubborn", "RUNNING", T);
    trapped(&m, "stubborn", 1);
    m
}

/// Waits until `program` has printed `trapped` `n` times in all: a stop sent before the shell has set its
/// trap would end it at once.
fn trapped(m: &Mon, program: &str, n: usize) {
    eventually(T, "the TERM trap installed", || {
        let r = get(
            m.addr,
            &format!("/v1/programs/{program}/log?stream=stdout&bytes=4096"),
        )
        .ok()?;
        (r.body.matches("trapped").count() == n).then_some(())
    });
}

#[test]
fn stopwaitsecs_escalates_to_sigkill_for_a_child_ignoring_sigterm() {
    let m = stubborn(1);
    let pid = m.pid("stubborn").unwrap();
    let r = m.post("/v1/programs/stubborn/stop");
    assert_eq!(r.status, 200, "{}", r.body);
    // SIGTERM is ignored, so it stays STOPPING until stopwaitsecs runs out and the group gets SIGKILL.
    let p = m.wait_state("stubborn", "STOPPED", T);
    assert_eq!(p["exit_signal"], 9, "{p}");
    // How long it was STOPPING is read from the monitor's own record, not by looking in time (a slow test
    // could miss a 1 s window): the whole of stopwaitsecs, not killed at once. (Give or take the moment
    // between the stop timer's start and the event.)
    let events = m.events();
    let at = |to: &str| {
        let e = events
            .iter()
            .rev()
            .find(|e| e["program"] == "stubborn" && e["to"] == to);
        e.and_then(|e| e["time_ms"].as_u64())
            .unwrap_or_else(|| panic!("no {to} in {events:?}"))
    };
    let stopping = at("STOPPED") - at("STOPPING");
    assert!(stopping >= 900, "STOPPING for {stopping} ms of stopwaitsecs = 1");
    eventually(T, "the process reaped", || (!exists(pid)).then_some(()));
}

/// A program stopped with SIGSTOP gets its stop signal and a SIGCONT, so it ends by its own TERM handling
/// rather than by SIGKILL once `stopwaitsecs` (here far longer than the test's wait) runs out.
#[test]
fn a_stopped_program_is_continued_to_take_its_stop_signal() {
    let m = Mon::start(
        r#"
[programs.polite]
command = "/bin/sh -c 'trap \"echo bye; exit 7\" TERM; echo trapped; while :; do sleep 0.1; done'"
startsecs = 0
stopwaitsecs = 3600
autorestart = false
"#,
    );
    m.wait_state("polite", "RUNNING", T);
    trapped(&m, "polite", 1);
    let pid = m.pid("polite").unwrap();
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    eventually(T, "the program stopped", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit(')').next()?.split_whitespace().next()?.to_string();
        (state == "T").then_some(())
    });
    let r = m.post("/v1/programs/polite/stop");
    assert_eq!(r.status, 200, "{}", r.body);
    let p = m.wait_state("polite", "STOPPED", T);
    assert_eq!(p["exit_code"], 7, "{p}");
    eventually(T, "the process reaped", || (!exists(pid)).then_some(()));
}

/// A monitor running `held`, a program that on SIGTERM goes on until the test releases it ([`release`]), with
/// a `stopwaitsecs` far past the test: its stops last exactly as long as the test needs, however slow the
/// machine. Returned once its trap is set.
fn held(dir: &std::path::Path) -> Mon {
    let m = Mon::start(&format!(
        "[programs.held]\ncommand = '''{}'''\nstartsecs = 0\nstopwaitsecs = 3600\n",
        held_until_released(dir)
    ));
    m.wait_state("held", "RUNNING", T);
    trapped(&m, "held", 1);
    m
}

#[test]
fn the_last_of_stop_start_and_restart_wins_while_a_stop_is_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let m = held(dir.path());
    // The restart's stop lasts until the test releases the program; a stop in that time is the user's last
    // word and must win over the restart's start.
    let first = m.pid("held").unwrap();
    m.ctl_ok(&["--no-wait", "restart", "held"]);
    assert_eq!(m.state("held"), "STOPPING");
    let said = m.ctl_ok(&["--no-wait", "stop", "held"]);
    assert!(said.contains("restart cancelled"), "{said}");
    release(dir.path(), first);
    // Stopped and started again would be one step: once it leaves STOPPING, STOPPED is where it must be.
    let p = eventually(T, "the stop to end", || {
        let p = m.prog("held");
        (p["state"] != "STOPPING").then_some(p)
    });
    assert_eq!(p["state"], "STOPPED", "{p}");
    assert_eq!(p["exit_code"], 0, "{p}");

    // The other way round, as a script's `stop` then `start` does: a start during a stop starts the program
    // once the stop is over.
    // (`start` answers once the program runs, so its pid is there to read.)
    m.ctl_ok(&["start", "held"]);
    let old = m.pid("held").unwrap();
    trapped(&m, "held", 2);
    m.ctl_ok(&["--no-wait", "stop", "held"]);
    assert_eq!(m.state("held"), "STOPPING");
    let said = m.ctl_ok(&["--no-wait", "start", "held"]);
    assert!(said.contains("starting once stopped"), "{said}");
    release(dir.path(), old);
    let third = m.wait_new_pid("held", old, T);
    trapped(&m, "held", 3);

    // A shutdown during a restart does not start the program again on the way out either.
    m.ctl_ok(&["--no-wait", "restart", "held"]);
    m.ctl_ok(&["--no-wait", "shutdown"]);
    release(dir.path(), third);
    let mut m = m;
    assert!(m.proc.wait_exit(T).is_some(), "the monitor did not exit");
    let log = m.proc.stderr();
    let spawns = log.matches("spawned program=\"held\"").count();
    assert_eq!(spawns, 3, "{log}");
}

#[test]
fn grandchildren_die_with_their_program_and_nothing_is_left_a_zombie() {
    let dir = tempfile::tempdir().unwrap();
    let gc = dir.path().join("gc");
    let m = Mon::start(&format!(
        r#"
[programs.tree]
command = "/bin/sh -c 'sleep 300 & echo $! > {gc}; exec sleep 301'"
startsecs = 0
backoff_initial_ms = 50
"#,
        gc = gc.display()
    ));
    let read_gc = || -> Option<i32> { std::fs::read_to_string(&gc).ok()?.trim().parse().ok() };
    m.wait_state("tree", "RUNNING", T);
    let leader = m.pid("tree").unwrap();
    let grandchild = eventually(T, "grandchild pid written", read_gc);
    assert!(alive(grandchild));

    // kill -9 of the leader: the monitor reaps it at once, kills the rest of its group, and restarts it.
    std::fs::remove_file(&gc).unwrap();
    kill9(leader);
    let leader2 = m.wait_new_pid("tree", leader, T);
    eventually(T, "the killed leader reaped (no zombie)", || {
        (!exists(leader)).then_some(())
    });
    eventually(T, "the first grandchild killed with its program", || {
        (!alive(grandchild)).then_some(())
    });
    let grandchild2 = eventually(T, "second grandchild pid written", read_gc);
    assert!(alive(grandchild2));

    // A stop signals the whole group.
    let r = m.post("/v1/programs/tree/stop");
    assert_eq!(r.status, 200);
    m.wait_state("tree", "STOPPED", T);
    eventually(
        Duration::from_secs(5),
        "the second grandchild stopped with its program",
        || (!alive(grandchild2) && !exists(leader2)).then_some(()),
    );
}

/// A process a program started in a session of its own (`setsid`, as a daemon does) is outside its group,
/// so the group signals never reached it: it outlived its program's stop and its exit. Now it ends with the
/// program either way, and the monitor says so.
#[test]
fn processes_that_left_the_group_end_with_their_program() {
    let dir = tempfile::tempdir().unwrap();
    let (served, left) = (dir.path().join("served"), dir.path().join("left"));
    let m = Mon::start(&format!(
        r#"
[programs.daemonizes]
command = "/bin/sh -c 'setsid sleep 300 & echo $! > {served}; exec sleep 301'"
startsecs = 0

[programs.launcher]
command = "/bin/sh -c 'setsid sleep 302 & echo $! > {left}; sleep 303 & wait $!'"
startsecs = 0
autorestart = false
"#,
        served = served.display(),
        left = left.display()
    ));
    let stray = |file: &std::path::Path| {
        eventually(T, &format!("{} written", file.display()), || {
            let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
            // Once `setsid` has its session (it execs `sleep` in place).
            let pgrp = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).ok()?;
            (stat_of(pid)?.2 == "sleep" && pgrp.as_raw() == pid).then_some(pid)
        })
    };
    // Whatever happens below, no stray outlives the test: they inherit the monitor's test tag, and the
    // monitor's `Proc` kills every process with it when dropped (by tag, not by a pid that may be reused).
    m.wait_state("daemonizes", "RUNNING", T);
    let daemon = stray(&served);
    let launched = stray(&left);

    // A stop reaches it, and the program is stopped only once it is gone.
    assert_eq!(m.ctl_ok(&["stop", "daemonizes"]).trim(), "daemonizes: stopped");
    assert!(!alive(daemon), "the stray outlived its program's stop");

    // The launcher's leader exits by itself (killed here): its stray goes with its group.
    kill9(m.pid("launcher").unwrap());
    m.wait_state("launcher", "EXITED", T);
    eventually(T, "the launcher's stray killed with its program", || {
        (!alive(launched)).then_some(())
    });
    let log = m.proc.stderr();
    for (program, pid) in [("daemonizes", daemon), ("launcher", launched)] {
        assert!(
            log.lines()
                .any(|l| l.contains("left processes outside its process group")
                    && l.contains(&format!("program={program}"))
                    && l.contains(&format!("{pid} (sleep)"))),
            "no warning naming {pid} of {program}: {log}"
        );
    }
}

/// SIGINT stops everything at once and SIGKILLs what is left after 3 s, a stray that ignores the stop signal
/// too: its program's exit waited for its whole `stopwaitsecs` (an hour here), so the monitor ended by the
/// runtime's forced exit after 5 s (status 2), and the stray ran on.
#[test]
fn sigint_ends_a_stray_that_ignores_the_stop_signal_after_3_s() {
    let dir = tempfile::tempdir().unwrap();
    let left = dir.path().join("left");
    let script = dir.path().join("stubborn.sh");
    std::fs::write(
        &script,
        format!(
            "setsid sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 0.1; done' &\nexec sleep 301\n",
            left.display()
        ),
    )
    .unwrap();
    let mut m = Mon::start(&format!(
        r#"
[programs.stubborn]
command = "/bin/sh {}"
startsecs = 0
stopwaitsecs = 3600
"#,
        script.display()
    ));
    m.wait_state("stubborn", "RUNNING", T);
    let stray: i32 = eventually(T, "the stray to start", || {
        std::fs::read_to_string(&left).ok()?.trim().parse().ok()
    });
    m.proc.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(m.proc.wait_exit(T), Some(0), "{}", m.proc.stderr());
    assert!(!alive(stray), "the stray outlived the monitor");
}

/// A wrapper shell that does not exec (`sh -c 'sh server.sh; true'`) dies of the stop signal at once, while
/// the server it runs, signalled with the group, shuts down cleanly: the monitor waits for the rest of the
/// group (within `stopwaitsecs`) before it calls the program stopped. It SIGKILLed the group as soon as the
/// wrapper exited, so the server's clean shutdown never finished.
#[test]
fn a_stop_lets_the_rest_of_the_group_finish_after_its_leader_exits() {
    let dir = tempfile::tempdir().unwrap();
    let wrapped = WrappedServer::new(dir.path());
    let m = Mon::start(&wrapped.programs);
    m.wait_state("wrap", "RUNNING", T);
    let server_pid = wrapped.server_pid();
    let said = m.ctl_ok(&["stop", "wrap"]);
    assert_eq!(said.trim(), "wrap: stopped");
    // Stopped means the whole group is: the server finished its shutdown first.
    assert!(wrapped.shut_down_cleanly());
    assert!(!alive(server_pid));
}

/// `redirect_stderr` is `2>&1`: one pipe, so stdout and stderr lines keep their order; `tail` says when a
/// stream has no log of its own; a spawn error says what could not be done.
#[test]
fn output_streams_and_spawn_errors_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mon::start(&format!(
        r#"
[programs.both]
command = "/bin/sh -c 'for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; done; exec sleep 300'"
startsecs = 0
redirect_stderr = true
[programs.quiet]
command = "sleep 300"
startsecs = 0
stdout_logfile = "none"
[programs.nowhere]
command = "sleep 300"
directory = "{}/missing"
startsecs = 0
startretries = 0
fatal_retry_secs = 0
[programs.nocommand]
command = "/no/such/command"
startsecs = 0
startretries = 0
fatal_retry_secs = 0
"#,
        dir.path().display()
    ));
    let o = eventually(T, "both's output in its log", || {
        let o = m.ctl(&["tail", "both"]);
        String::from_utf8_lossy(&o.stdout).contains("err6").then_some(o)
    });
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = (1..=6)
        .flat_map(|i| [format!("out{i}"), format!("err{i}")])
        .collect();
    assert_eq!(lines, want);

    let o = m.ctl(&["tail", "both", "--stream", "stderr"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("stderr goes to its stdout"), "{}", out(&o));
    let o = m.ctl(&["tail", "quiet"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("quiet keeps no stdout log"), "{}", out(&o));

    for (name, says) in [
        ("nowhere", "cannot change to directory"),
        ("nocommand", "cannot find command \"/no/such/command\""),
    ] {
        let p = m.wait_state(name, "FATAL", T);
        let error = p["spawn_error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(says), "{name}: {p}");
    }
}

/// A program's `directory` is entered as its `user`, after the switch, as Supervisord does: the monitor
/// (root) entered it first, so a program started in a directory its user may not enter (and, on a
/// root-squashed NFS share, could not start in one it may). Needs root, to switch users.
#[test]
fn a_programs_directory_is_entered_as_its_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not run: switching users needs root");
        return;
    }
    // Root's, mode 0700: `nobody` may not enter it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let m = Mon::start(&format!(
        r#"
[programs.closed]
command = "sleep 300"
user = "nobody"
directory = "{}"
startsecs = 0
startretries = 0
fatal_retry_secs = 0
"#,
        dir.path().display()
    ));
    let p = m.wait_state("closed", "FATAL", T);
    let error = p["spawn_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "cannot change to directory {} as user \"nobody\"",
            dir.path().display()
        )),
        "{p}"
    );
}

/// `clear` of a program whose stderr goes to its stdout (`redirect_stderr`) and whose log is in a directory
/// of its own empties that log and says so. It also tried the stderr log, which is never written, and
/// failed (exit 1) on the default log directory nothing had made.
#[test]
fn clear_of_a_redirected_program_clears_its_one_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("x.log");
    let m = Mon::start(&format!(
        "[programs.x]\ncommand = \"/bin/sh -c 'echo one; echo two >&2; exec sleep 300'\"\nstartsecs = 0\n\
         redirect_stderr = true\nstdout_logfile = \"{}\"\n",
        log.display()
    ));
    eventually(T, "x's output in its log", || {
        (std::fs::read_to_string(&log).ok()? == "one\ntwo\n").then_some(())
    });
    let o = m.ctl(&["clear", "x"]);
    assert_says(&o, 0, "x: cleared");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
}

/// `(state, ppid, comm)` of process `pid`, from `/proc/<pid>/stat`.
fn stat_of(pid: i32) -> Option<(char, i32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?, comm))
}

/// The children of `parent`, each with its state.
fn children_of(parent: i32) -> Vec<(i32, char, String)> {
    let pids = std::fs::read_dir("/proc").unwrap().flatten();
    pids.filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (state, ppid, comm) = stat_of(pid)?;
            (ppid == parent).then_some((pid, state, comm))
        })
        .collect()
}

/// A monitor that is PID 1 (a container's entrypoint: here in a PID namespace of its own) is handed every
/// orphan of its programs, and reaps each once it exits, as an init does. It left them zombies for good, one
/// per helper a program forked and left (`cmd &` in a shell that exits). Its own programs' exits are still
/// seen with their status.
#[test]
fn as_pid_1_the_monitor_reaps_the_orphans_it_is_handed() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let programs = r#"
[programs.forks]
command = "/bin/sh -c '(sleep 1 & sleep 1 & sleep 1 &) ; exec sleep 1000'"
startsecs = 0
[programs.once]
command = "/bin/sh -c 'sleep 0.5; exit 3'"
autorestart = false
startsecs = 0
"#;
    let config = write_file(
        dir.path(),
        "monitor.toml",
        &config_text(addr, dir.path(), programs),
    );
    let bin = xcluster_bin();
    let mut unshare = Proc::spawn(
        "monitor as PID 1",
        std::path::Path::new("unshare"),
        Spawn {
            args: ["--fork", "--pid", "--kill-child", bin.to_str().unwrap()]
                .into_iter()
                .chain(["monitor", "--config", config.to_str().unwrap()])
                .map(String::from)
                .collect(),
            ..Default::default()
        },
    );
    wait_ready(addr, T);
    let monitor = eventually(T, "the monitor under unshare", || {
        children_of(unshare.pid() as i32).first().map(|c| c.0)
    });
    let status = get(addr, "/v1/status").unwrap().json();
    assert_eq!(status["monitor"]["pid"], 1, "{status}");
    // The three sleeps are handed to the monitor when their subshell exits, then exit themselves.
    eventually(T, "the orphans handed to the monitor", || {
        let sleeps = children_of(monitor)
            .into_iter()
            .filter(|c| c.2 == "sleep")
            .count();
        (sleeps == 4).then_some(())
    });
    eventually(T, "every orphan reaped", || {
        let left = children_of(monitor);
        let zombies: Vec<_> = left.iter().filter(|c| c.1 == 'Z').collect();
        (zombies.is_empty() && left.iter().filter(|c| c.2 == "sleep").count() == 1).then_some(())
    });
    let reaped = metric_value(
        &get(addr, "/metrics").unwrap().body,
        "xcluster_monitor_orphans_reaped_total",
        "",
    );
    assert_eq!(reaped, Some(3.0));
    let once = eventually(T, "once EXITED", || {
        let s = get(addr, "/v1/status").unwrap().json();
        listed(&s, "once").filter(|p| p["state"] == "EXITED").cloned()
    });
    assert_eq!(
        once["exit_code"], 3,
        "its own child's status is still its waiter's: {once}"
    );
    // unshare passes no signal on: the monitor is stopped itself, and unshare ends with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(unshare.wait_exit(T).is_some(), "the monitor stopped");
}
