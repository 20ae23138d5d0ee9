//! PostgreSQL only: the connections to the server. The store may be dropped anywhere, an async worker
//! included, as the app's last handle on it is at shutdown.

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
