//! The monitor's own `kill -9` and restart leave exactly one copy of each program: the new monitor finds what
//! the old one left (state file + /proc start time) and stops it before starting its own.

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

#[test]
fn kill_9_of_the_monitor_then_restart_leaves_one_copy_of_each_program() {
    let mark = format!("takeover-{}-{}", std::process::id(), free_port());
    let programs = format!(
        r#"
[programs.one]
command = "sleep 300"
startsecs = 0
environment = {{ MARK = "{mark}" }}
[programs.two]
command = "sleep 301"
startsecs = 0
numprocs = 2
environment = {{ MARK = "{mark}" }}
"#
    );
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let addr = free_addr();
    let mut first = Mon::start_in(dir.clone(), addr, &programs);
    for n in ["one", "two-0", "two-1"] {
        first.wait_state(n, "RUNNING", T);
    }
    let old: Vec<i32> = ["one", "two-0", "two-1"]
        .iter()
        .map(|n| first.pid(n).unwrap())
        .collect();
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    first.proc.wait_exit(T).unwrap();
    // The programs outlive the monitor...
    assert!(old.iter().all(|p| alive(*p)));

    // ...and the next monitor stops them before it starts its own.
    let second = Mon::start_in(dir, addr, &programs);
    for n in ["one", "two-0", "two-1"] {
        second.wait_state(n, "RUNNING", T);
    }
    for p in &old {
        eventually(T, "the old copy stopped", || (!alive(*p)).then_some(()));
    }
    assert_eq!(copies(&mark, "one").len(), 1, "one copy of one");
    assert_eq!(copies(&mark, "two-0").len(), 1);
    assert_eq!(copies(&mark, "two-1").len(), 1);
    assert_eq!(copies(&mark, "one"), vec![second.pid("one").unwrap()]);
    assert!(
        second
            .events()
            .iter()
            .any(|e| e["kind"] == "monitor" && e["detail"].as_str().unwrap().contains("previous monitor"))
    );
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
    let o = std::process::Command::new(xcluster_bin())
        .args(["monitor", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(out(&o).contains("another monitor holds"), "{}", out(&o));
    // The first monitor is untouched by the refused one.
    m.wait_state("x", "RUNNING", T);
}
