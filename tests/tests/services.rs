//! The throwaway PostgreSQL and Redis servers the store tests stand on start, answer, and restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

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

/// Sends one inline command and returns its one-line reply (`+OK`, `:1`).
fn redis_line(addr: std::net::SocketAddr, command: &str) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// A restart is a fresh server: what the old one held is gone.
#[test]
fn redis_starts_and_restarts() {
    let mut r = Redis::start();
    assert!(ping(r.addr));
    assert_eq!(redis_line(r.addr, "SET before-restart 1"), "+OK");
    assert_eq!(redis_line(r.addr, "EXISTS before-restart"), ":1");
    r.restart();
    assert!(ping(r.addr));
    assert_eq!(redis_line(r.addr, "EXISTS before-restart"), ":0");
}
