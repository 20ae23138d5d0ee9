//! The SDK's whole-call deadline against instances that accept and never answer: a call ends with
//! `Error::DeadlineExceeded` once its budget is spent, whatever its retry budgets would allow, without
//! starting another attempt; and balancers may be named `host:port`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sdk_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use sdk_support::{Backend, FakeBalancer, list};
use xcluster_sdk::{Client, Error};

const HOLD: Duration = Duration::from_secs(60);
/// The bound on a call whose 300 ms deadline must cut off a 60 s attempt: far above the deadline and far below
/// the attempt, so only a broken deadline gets near it, however slow the machine.
const GENEROUS: Duration = Duration::from_secs(8);

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

/// Instances that accept connections and read requests but never answer, all in one `browse` list.
fn hanging(n: usize) -> (Vec<Backend>, FakeBalancer) {
    let stuck: Vec<Backend> = (0..n).map(|i| Backend::hanging(&format!("s{i}"))).collect();
    let lb = FakeBalancer::start(HOLD);
    let names: Vec<String> = stuck.iter().map(|b| b.name.clone()).collect();
    let entries: Vec<_> = stuck
        .iter()
        .zip(&names)
        .map(|(b, name)| (name.as_str(), b.addr, 100))
        .collect();
    lb.set(list("browse", 1, &entries, &[lb.addr]));
    (stuck, lb)
}

/// A client of `lb`'s `browse` list with these retry budgets and whole-call deadline.
async fn client(lb: &FakeBalancer, attempts: u32, request_timeout: Duration, deadline: Duration) -> Client {
    Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .request_attempts(attempts)
        .request_timeout(request_timeout)
        .deadline(deadline)
        .build()
        .await
        .unwrap()
}

/// The error of an idempotent browse through `client` to instances that never answer.
async fn hung_browse(client: &Client) -> Error {
    client
        .send_idempotent("browse", get("/v1/products"))
        .await
        .unwrap_err()
}

/// Connections the instances accepted, once it stops rising short of `at_least` (bounded poll: an accept
/// may lag the client's connect by a scheduling slice).
async fn accepted(stuck: &[Backend], at_least: u64) -> u64 {
    let count = || stuck.iter().map(|b| b.conns.load(Ordering::Relaxed)).sum::<u64>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count() < at_least && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    count()
}

/// With a 60 s request timeout and three attempts a hung browse could take 3 min; a 300 ms deadline ends it
/// with the deadline's error, the one attempt in flight cut off and no other started. The same through a
/// per-call deadline on a client built with the default one, and for a plain `send` and `connect`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cuts_off_the_attempt_in_flight() {
    let (stuck, lb) = hanging(3);
    let client = client(&lb, 3, Duration::from_secs(60), Duration::from_millis(300)).await;
    // The bound is the point here: the deadline honoured (300 ms), not the attempt's own timeout (60 s).
    let started = Instant::now();
    let err = hung_browse(&client).await;
    assert!(started.elapsed() < GENEROUS, "took {:?}", started.elapsed());
    match &err {
        Error::DeadlineExceeded {
            deadline,
            attempts,
            last,
        } => {
            assert_eq!(*deadline, Duration::from_millis(300));
            assert_eq!(*attempts, 1, "{err}");
            assert!(last.is_none(), "{err}");
        }
        other => panic!("not the deadline's error: {other:?}"),
    }
    assert_eq!((err.kind(), err.is_retryable()), ("deadline", false));
    assert_eq!(accepted(&stuck, 1).await, 1, "another attempt was started");
    // Cut off by the caller's deadline, not by its own timeout: the instance is not ejected.
    assert!(client.state().types[0].ejected.is_empty());

    // The builder's default deadline (15 s) would let this run 10 s; the per-call one ends it.
    let default = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .request_timeout(Duration::from_secs(10))
        .build()
        .await
        .unwrap();
    assert_eq!(default.deadline(), xcluster_sdk::DEFAULT_DEADLINE);
    let tight = default.with_deadline(Duration::from_millis(200));
    let post = http::Request::post("/v1/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = tight.send("browse", post).await.unwrap_err();
    // The per-call deadline is the one that ended it (the default's would say 15 s); that a deadline ends the
    // attempt in time is bounded above.
    assert!(
        matches!(err, Error::DeadlineExceeded { attempts: 1, deadline, .. } if deadline == Duration::from_millis(200)),
        "{err}"
    );
    assert_eq!(accepted(&stuck, 2).await, 2);
    // A spent budget starts nothing at all.
    let err = default
        .with_deadline(Duration::ZERO)
        .connect("browse")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DeadlineExceeded { attempts: 0, .. }),
        "{err}"
    );
    // It returned before any connect, so there is no late accept to wait for.
    assert_eq!(accepted(&stuck, 2).await, 2);
}

/// Attempts that time out on their own (300 ms each, ejected) are retried until the 750 ms deadline: the
/// third is clipped to what is left, and of five allowed attempts the last two are never started. The
/// error carries the last attempt that failed before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attempt_starts_after_the_deadline() {
    let (stuck, lb) = hanging(5);
    let client = client(&lb, 5, Duration::from_millis(300), Duration::from_millis(750)).await;
    let err = hung_browse(&client).await;
    let Error::DeadlineExceeded { attempts, last, .. } = &err else {
        panic!("not the deadline's error: {err:?}");
    };
    // Two whole attempts fit in 750 ms, and the third starts with 150 ms left (two on a very slow machine).
    assert!((2..=3).contains(attempts), "{err}");
    assert!(matches!(last.as_deref(), Some(Error::Timeout { .. })), "{err}");
    assert_eq!(accepted(&stuck, u64::from(*attempts)).await, u64::from(*attempts));
}

/// A balancer may be named `localhost:PORT`: `build()` resolves it and the client works as with `ip:port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancers_may_be_named_by_host_and_port() {
    let backend = Backend::start("a");
    let lb = FakeBalancer::start(HOLD);
    lb.set(list("browse", 1, &[("a", backend.addr, 100)], &[lb.addr]));
    let client = Client::builder()
        .balancers([format!("localhost:{}", lb.addr.port())])
        .request_types(["browse"])
        .build()
        .await
        .unwrap();
    assert!(client.state().balancers.contains(&lb.addr));
    let resp = client
        .send_idempotent("browse", get("/v1/products"))
        .await
        .unwrap();
    assert_eq!(resp.body().as_ref(), b"a");
    let err = Client::builder()
        .balancers(["no-such-host.invalid:7000"])
        .request_types(["browse"])
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Resolve { .. }), "{err}");
    assert!(err.to_string().contains("no-such-host.invalid:7000"), "{err}");
}
