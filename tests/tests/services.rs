//! The throwaway PostgreSQL and Redis servers the store tests stand on start, answer, and restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use xcluster_tests::services::{Postgres, Redis, ping};

#[test]
fn postgres_starts_and_answers() {
    let pg = Postgres::start();
    let out = Command::new("psql")
        .args([pg.url.as_str(), "-tAc", "select 40 + 2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[test]
fn redis_starts_and_restarts() {
    let mut r = Redis::start();
    assert!(ping(r.addr));
    r.restart();
    assert!(ping(r.addr));
}
