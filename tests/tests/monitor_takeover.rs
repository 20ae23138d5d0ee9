//! The monitor's own `kill -9` and restart leave exactly one copy of each program: the new monitor finds what
//! the old one left (state file + /proc start time). What is still configured with the same command is
//! adopted (same pid, watched, restarted when it dies); what changed or was removed is stopped before the
//! new monitor starts its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod monitor_common;

use monitor_common::*;
use xcluster_tests::*;

/// Live processes that carry `MARK=<mark>` and are the leader of program `name`.
fn copies(mark: &str, name: &str) -> Vec<i32> {
    let a = tagged_pids(&format!("MARK={mark}"));
    let b = tagged_pids(&format!("XCLUSTER_PROCESS_NAME={name}"));
    a.into_iter().filter(|p| b.contains(p)).collect()
}

fn programs(mark: &str, two: &str) -> String {
    format!(
        r#"
[programs.one]
command = "sleep 300"
startsecs = 0
environment = {{ MARK = "{mark}" }}
[programs.two]
command = "{two}"
startsecs = 0
numprocs = 2
environment = {{ MARK = "{mark}" }}
"#
    )
}

#[test]
fn kill_9_of_the_monitor_then_restart_adopts_the_running_programs() {
    let mark = format!("takeover-{}-{}", std::process::id(), free_port());
    let programs = programs(&mark, "sleep 301");
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &programs);
    let names = ["one", "two-0", "two-1"];
    for n in names {
        first.wait_state(n, "RUNNING", T);
    }
    // One crash under the first monitor, restarted by it: the count survives the takeover.
    let crashed = first.pid("two-0").unwrap();
    kill9(crashed);
    first.wait_new_pid("two-0", crashed, T);
    first.wait_state("two-0", "RUNNING", T);
    let old: Vec<i32> = names.iter().map(|n| first.pid(n).unwrap()).collect();
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    // The programs outlive the monitor...
    assert!(old.iter().all(|p| alive(*p)));

    // ...and the next monitor adopts them: the same processes, RUNNING, one copy each.
    let second = Mon::start_in(dir, addr, &programs);
    for (n, pid) in names.iter().zip(&old) {
        let p = second.wait_state(n, "RUNNING", T);
        assert_eq!(p["pid"], *pid, "{n} adopted: {p}");
        assert_eq!(copies(&mark, n), vec![*pid], "one copy of {n}");
    }
    assert_eq!(second.prog("two-0")["restarts"], 1, "{}", second.prog("two-0"));
    assert!(
        second
            .events()
            .iter()
            .any(|e| e["kind"] == "monitor" && e["detail"].as_str().unwrap().contains("adopted"))
    );
    // An adopted process is supervised: its death is seen (pidfd) and it is restarted.
    kill9(old[0]);
    let new = second.wait_new_pid("one", old[0], T);
    assert_eq!(copies(&mark, "one"), vec![new]);
    assert_eq!(second.prog("one")["restarts"], 1, "{}", second.prog("one"));
    drop(first);
}

#[test]
fn after_kill_9_a_program_whose_command_changed_is_replaced_not_adopted() {
    let mark = format!("takeover-c-{}-{}", std::process::id(), free_port());
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &programs(&mark, "sleep 301"));
    for n in ["one", "two-0", "two-1"] {
        first.wait_state(n, "RUNNING", T);
    }
    let one = first.pid("one").unwrap();
    let two: Vec<i32> = ["two-0", "two-1"].iter().map(|n| first.pid(n).unwrap()).collect();
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();

    let second = Mon::start_in(dir, addr, &programs(&mark, "sleep 302"));
    for p in &two {
        eventually(T, "the old copy stopped", || (!alive(*p)).then_some(()));
    }
    for n in ["two-0", "two-1"] {
        let pid = second.wait_state(n, "RUNNING", T)["pid"].as_i64().unwrap() as i32;
        assert!(!two.contains(&pid));
        assert_eq!(copies(&mark, n), vec![pid], "one copy of {n}");
    }
    assert_eq!(second.pid("one"), Some(one), "the unchanged program is adopted");
    assert!(
        second
            .events()
            .iter()
            .any(|e| e["kind"] == "monitor" && e["detail"].as_str().unwrap().contains("stopped leftovers"))
    );
    drop(first);
}

/// A program that writes is adopted like one that does not: the monitor's `kill -9` does not end it by
/// SIGPIPE (it holds a copy of its pipes' read ends), what it wrote while no monitor ran waits in the pipe,
/// and the next monitor reads on from there into its log.
#[test]
fn an_adopted_program_keeps_writing_and_nothing_it_wrote_meanwhile_is_lost() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let (log, counter) = (dir.path().join("talker.log"), dir.path().join("counter"));
    let programs = format!(
        r#"
[programs.talker]
command = "/bin/sh -c 'i=0; while :; do echo line-$i; echo $i > {counter}; i=$((i+1)); sleep 0.02; done'"
startsecs = 0
stdout_logfile = "{log}"
"#,
        counter = counter.display(),
        log = log.display()
    );
    let numbers = || -> Vec<u64> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
            .collect()
    };
    let count = || -> Option<u64> { std::fs::read_to_string(&counter).ok()?.trim().parse().ok() };
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &programs);
    first.wait_state("talker", "RUNNING", T);
    let pid = first.pid("talker").unwrap();
    eventually(T, "the first lines logged", || {
        (numbers().len() > 5).then_some(())
    });
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    let logged = numbers().last().copied().unwrap();
    // It writes on with no monitor reading.
    eventually(T, "lines written with no monitor", || {
        count().filter(|c| *c >= logged + 10).map(|_| ())
    });
    assert!(alive(pid), "the monitor's death ended the program");
    let written = count().unwrap();

    let second = Mon::start_in(dir.clone(), addr, &programs);
    let p = second.wait_state("talker", "RUNNING", T);
    assert_eq!(p["pid"], pid, "adopted: {p}");
    eventually(T, "lines from the adopted program logged", || {
        numbers().last().filter(|n| **n > written + 5).map(|_| ())
    });
    // Every line from where the first monitor stopped to past the adoption is in the log, once, in order.
    let got = numbers();
    let from = got.iter().position(|n| *n == logged).unwrap();
    let want: Vec<u64> = (logged..=written + 5).collect();
    assert_eq!(&got[from..from + want.len()], &want[..]);
    assert_eq!(second.pid("talker"), Some(pid));
    assert_eq!(second.prog("talker")["restarts"], 0);
    drop(first);
}

#[test]
fn a_second_monitor_on_the_same_run_dir_is_refused() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let m = Mon::start_in(
        dir.clone(),
        free_addr(),
        "[programs.x]\ncommand = \"sleep 300\"\n",
    );
    let cfg = write_file(
        dir.path(),
        "second.toml",
        &config_text(free_addr(), dir.path(), ""),
    );
    // Bounded: were the lock not held, this monitor would serve for ever.
    let o = std::process::Command::new(xcluster_bin())
        .args(["monitor", "--config", cfg.to_str().unwrap()])
        .output_within(EXIT_DEADLINE);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("another monitor holds"), "{}", out(&o));
    // The first monitor is untouched by the refused one.
    m.wait_state("x", "RUNNING", T);
}

/// An adopted program's stop is a spawned one's: once a wrapper shell (no exec) dies of the stop signal,
/// the server it runs still finishes its clean shutdown, within `stopwaitsecs`, before the program is
/// stopped. The adopted process's watch SIGKILLed the group as soon as the wrapper exited.
#[test]
fn an_adopted_program_stops_as_a_spawned_one_with_the_rest_of_its_group() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let wrapped = WrappedServer::new(dir.path());
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &wrapped.programs);
    first.wait_state("wrap", "RUNNING", T);
    let pid = first.pid("wrap").unwrap();
    let server_pid = wrapped.server_pid();
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();

    let second = Mon::start_in(dir.clone(), addr, &wrapped.programs);
    let p = second.wait_state("wrap", "RUNNING", T);
    assert_eq!(p["pid"], pid, "adopted: {p}");
    let said = second.ctl_ok(&["stop", "wrap"]);
    assert_eq!(said.trim(), "wrap: stopped");
    assert!(wrapped.shut_down_cleanly());
    assert!(!alive(server_pid));
    drop(first);
}

/// A program's leader that dies while no monitor runs (this one was killed) leaves the rest of its group
/// running, unsupervised and holding what it held (a wrapper's server, its port): the next monitor ends it,
/// as a monitor ends what a crashed leader leaves. It was left running for good.
#[test]
fn what_a_leader_left_in_its_group_while_no_monitor_ran_is_ended() {
    let mark = format!("takeover-o-{}-{}", std::process::id(), free_port());
    let files = tempfile::tempdir().unwrap();
    let pidfile = files.path().join("worker.pid");
    let programs = format!(
        r#"
[programs.wrapper]
command = "/bin/sh -c 'sleep 300 & echo $! > {pidfile}; wait'"
startsecs = 0
environment = {{ MARK = "{mark}" }}
"#,
        pidfile = pidfile.display()
    );
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &programs);
    first.wait_state("wrapper", "RUNNING", T);
    let leader = first.pid("wrapper").unwrap();
    let worker: i32 = eventually(T, "the wrapper to start its worker", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    // Ended by the test if not by the second monitor (a failed assertion).
    let _worker = Marked(worker, format!("MARK={mark}"));
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    kill9(leader);
    // Reaped by whoever inherited it: a zombie would still pass for the live leader.
    eventually(T, "the leader to be gone", || (!exists(leader)).then_some(()));
    assert!(alive(worker), "the worker outlives its leader");

    let second = Mon::start_in(dir, addr, &programs);
    eventually(T, "the worker to be ended", || (!alive(worker)).then_some(()));
    let fresh = second.wait_state("wrapper", "RUNNING", T)["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_ne!(fresh, leader);
    drop(first);
}

/// Kills process `.0` when dropped, if it is still alive and carries the environment entry `.1` (so not a
/// later process given its pid).
struct Marked(i32, String);

impl Drop for Marked {
    fn drop(&mut self) {
        if alive(self.0) && tagged_pids(&self.1).contains(&self.0) {
            kill9(self.0);
        }
    }
}

/// A leftover that is not adopted (its command changed) is stopped with what it started outside its group
/// (a `setsid` daemon, found by its mark), as a program's own stop takes its strays: stopped by group
/// alone, the daemon ran on unsupervised beside the new copy.
#[test]
fn a_replaced_leftovers_strays_go_with_it() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let files = tempfile::tempdir().unwrap();
    let daemon_file = files.path().join("daemon");
    let program = |arg: &str| {
        format!(
            r#"
[programs.daemonizes]
command = "/bin/sh -c 'setsid sleep 31{arg} & echo $! > {file}; exec sleep 32{arg}'"
startsecs = 0
"#,
            file = daemon_file.display()
        )
    };
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &program("1"));
    first.wait_state("daemonizes", "RUNNING", T);
    let daemon = eventually(T, "the daemon's pid written", || {
        let pid: i32 = std::fs::read_to_string(&daemon_file).ok()?.trim().parse().ok()?;
        // Once `setsid` has its session (it execs `sleep` in place).
        let pgrp = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep" && pgrp.as_raw() == pid).then_some(pid)
    });
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    assert!(alive(daemon), "the daemon outlives the monitor's kill -9");
    let second = Mon::start_in(dir, addr, &program("2"));
    second.wait_state("daemonizes", "RUNNING", T);
    eventually(T, "the old daemon stopped with its leftover", || {
        (!alive(daemon)).then_some(())
    });
    drop(first);
}

/// A leftover that is not adopted is stopped as its program is configured to stop, as the monitor that
/// started it would have: here `stopsignal = "INT"` (a server's graceful stop). Every leftover got SIGTERM.
#[test]
fn a_replaced_leftover_is_stopped_with_its_own_stop_signal() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let files = tempfile::tempdir().unwrap();
    let (said, ready) = (files.path().join("stopped-by"), files.path().join("ready"));
    let script = write_file(
        files.path(),
        "graceful.sh",
        &format!(
            "trap 'echo int > {said}; exit 0' INT\ntrap 'echo term > {said}; exit 0' TERM\ntouch {ready}\n\
             while :; do sleep $1; done\n",
            said = said.display(),
            ready = ready.display()
        ),
    );
    // The loop's nap differs between the two configs, so the second monitor does not adopt the first's.
    let program = |nap: &str| {
        format!(
            "[programs.graceful]\ncommand = \"/bin/sh {} {nap}\"\nstopsignal = \"INT\"\nstartsecs = 0\n",
            script.display()
        )
    };
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &program("0.1"));
    first.wait_state("graceful", "RUNNING", T);
    let old = first.pid("graceful").unwrap();
    eventually(T, "its traps set", || ready.exists().then_some(()));
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    assert!(alive(old), "the program outlives the monitor's kill -9");

    let second = Mon::start_in(dir, addr, &program("0.2"));
    eventually(T, "the leftover stopped", || (!alive(old)).then_some(()));
    let by = std::fs::read_to_string(&said).unwrap_or_default();
    assert_eq!(by.trim(), "int", "stopped by its own stop signal");
    let fresh = second.wait_state("graceful", "RUNNING", T)["pid"]
        .as_i64()
        .unwrap() as i32;
    assert_ne!(fresh, old);
    drop(first);
}
