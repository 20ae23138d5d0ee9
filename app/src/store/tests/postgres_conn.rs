//! PostgreSQL only: reaching the server. A connection is bounded in time, handshake included, whatever the
//! server at `postgres_url` does; a refused one says why and where; and the store may be dropped anywhere,
//! an async worker included, as the app's last handle on it is at shutdown.

use std::net::TcpListener;
use std::time::Duration;

use super::super::postgres::{PgOptions, PostgresStore};
use super::*;

fn options(url: String, connect_timeout: Duration) -> PgOptions {
    PgOptions {
        url,
        pool_size: 2,
        connect_timeout,
        statement_timeout: Duration::from_secs(5),
        seed_demo: true,
    }
}

/// Opens the store on another thread and waits at most `bound` for the outcome: a hang fails the test
/// instead of holding it.
fn open_within(opts: PgOptions, bound: Duration) -> Result<PostgresStore, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(PostgresStore::open(&opts));
    });
    rx.recv_timeout(bound)
        .unwrap_or_else(|_| panic!("opening the store did not finish within {bound:?}"))
}

/// A server that accepts (the kernel completes the handshake into the listen backlog) and never answers, as a
/// hung PostgreSQL or another service's port does: opening fails within the connect timeout, not never.
#[test]
fn a_silent_server_fails_the_open_within_connect_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    // A hang fails in `open_within`; the message says the 300 ms connect timeout is what ended it.
    let err = open_within(
        options(format!("postgres://x@{addr}/x"), Duration::from_millis(300)),
        Duration::from_secs(10),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&addr.to_string()) && text.contains("did not complete a connection within 300 ms"),
        "{text}"
    );
    drop(silent);
}

/// A refused connection names the address and the cause, not just "error connecting to server".
#[test]
fn a_refused_connection_says_where_and_why() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = open_within(
        options(format!("postgres://x@{addr}/x"), Duration::from_secs(2)),
        Duration::from_secs(10),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("at {addr}")) && text.to_lowercase().contains("refused"),
        "{text}"
    );
}

/// The store's last handle dropped on an async worker, with connections in its pool: this panicked inside
/// `postgres::Client`'s drop ("Cannot start a runtime from within a runtime"), which aborted the app at
/// every SIGINT and SIGTERM once it had served a request.
#[test]
fn dropping_the_store_on_an_async_worker_closes_its_connections() {
    let fx = PostgresFixture::new();
    let store = PostgresStore::open(&options(fx.0.url.clone(), Duration::from_secs(5))).unwrap();
    assert!(store.get_product(1).unwrap().is_some());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        tokio::spawn(async move { drop(store) }).await.unwrap();
    });
    // Its connection is gone from the server too, not left open behind a process still running.
    let others =
        || fx.number("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'xcluster-app'");
    xcluster_tests::eventually(
        Duration::from_secs(10),
        "the store's connections to close",
        || (others() == 0).then_some(()),
    );
}

/// The server drops every connection (a restart, a failover): the first call that finds its connection gone
/// takes the idle ones with it, so it and the calls after it connect afresh instead of spending their
/// retries on connections that died with the others.
#[test]
fn a_broken_connection_takes_the_idle_ones_with_it() {
    let fx = PostgresFixture::new();
    let mut opts = options(fx.0.url.clone(), Duration::from_secs(5));
    opts.pool_size = 6;
    let store = std::sync::Arc::new(PostgresStore::open(&opts).unwrap());
    // Six calls at once leave six idle connections, more than a call's attempts.
    let together = std::sync::Arc::new(std::sync::Barrier::new(6));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (store, together) = (store.clone(), together.clone());
            std::thread::spawn(move || store.write(|_| Ok(together.wait())).unwrap())
        })
        .collect();
    for c in calls {
        c.join().unwrap();
    }
    let ours = "FROM pg_stat_activity WHERE application_name = 'xcluster-app'";
    assert_eq!(fx.number(&format!("SELECT COUNT(*) {ours}")), 6);
    fx.number(&format!("SELECT COUNT(pg_terminate_backend(pid)) {ours}"));
    xcluster_tests::eventually(Duration::from_secs(10), "the server to drop them", || {
        (fx.number(&format!("SELECT COUNT(*) {ours}")) == 0).then_some(())
    });
    assert!(store.get_product(1).unwrap().is_some());
    assert!(store.get_product(2).unwrap().is_some());
}
