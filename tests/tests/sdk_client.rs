//! The SDK against scripted balancers and real backends over loopback: it follows table changes through the
//! long-poll watch, fails over between balancers without failing a request, ejects a refused instance at
//! once, keeps serving from its last list with every balancer down (and says so), and its hyper
//! integration sends each request to the instance it picked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sdk_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use sdk_support::{Backend, FakeBalancer, dead_addr, list};
use xcluster_sdk::{Client, Error, Freshness, Side};

/// Long enough that only a watch notification (never a timed-out re-poll) can deliver a change in a test.
const HOLD: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

async fn eventually_async<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_table_changes_within_a_watch_round_trip() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = FakeBalancer::start(HOLD);
    let peer = FakeBalancer::start(HOLD);
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr, peer.addr]));
    let client = browse_client(&lb).await;
    assert_eq!(client.pick("browse").unwrap().addr(), a.addr);
    // It learned the peer from the list.
    assert!(client.state().balancers.contains(&peer.addr));
    // Wait until the watch is parked on the balancer (request 2, after the bootstrap), then change the table.
    eventually_async("the watch request", || {
        (lb.requests.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    lb.set(list("browse", 2, &[("b", b.addr, 100)], &[lb.addr, peer.addr]));
    eventually_async("the client to install version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    // The parked watch delivered it: at most the next watch has been sent since, no polling.
    assert!(
        lb.requests.load(Ordering::Relaxed) <= 3,
        "the client polled instead of watching"
    );
    for _ in 0..50 {
        assert_eq!(client.pick("browse").unwrap().addr(), b.addr);
    }
    assert!(matches!(client.pick("order"), Err(Error::UnknownType(_))));
    assert_eq!(client.state().types[0].freshness, Freshness::Live);
}

/// A list naming a balancer no client can connect to (`0.0.0.0:PORT`, as a balancer listening on every address
/// without `advertise` published itself) does not teach it: the client would connect to its own host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconnectable_balancer_in_a_list_is_not_learned() {
    let a = Backend::start("a");
    let lb = FakeBalancer::start(HOLD);
    let unspecified: SocketAddr = format!("0.0.0.0:{}", lb.addr.port()).parse().unwrap();
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr, unspecified]));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .build()
        .await
        .unwrap();
    assert_eq!(client.state().balancers, [lb.addr]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_its_balancer_dies_with_no_failed_request() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let mut first = FakeBalancer::start(HOLD);
    let second = FakeBalancer::start(HOLD);
    let both = [first.addr, second.addr];
    for lb in [&first, &second] {
        lb.set(list(
            "browse",
            1,
            &[("a", a.addr, 100), ("b", b.addr, 100)],
            &both,
        ));
    }
    // Seeded with the first balancer only: the second is learned from the list.
    let client = Client::builder()
        .balancers([first.addr.to_string()])
        .request_types(["browse"])
        .build()
        .await
        .unwrap();
    assert_eq!(client.state().types[0].balancer, Some(first.addr));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.send("browse", get("/v1/products")).await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let before = ok.load(Ordering::Relaxed);
    eventually_async("traffic before the failover", || {
        (ok.load(Ordering::Relaxed) > before + 20).then_some(())
    })
    .await;
    first.kill();
    // Only the surviving balancer can deliver this change.
    second.set(list("browse", 2, &[("b", b.addr, 100)], &both));
    eventually_async("the client to follow the second balancer's version 2", || {
        let s = client.state();
        (s.types[0].version == 2 && s.types[0].balancer == Some(second.addr)).then_some(())
    })
    .await;
    let after = ok.load(Ordering::Relaxed);
    eventually_async("traffic after the failover", || {
        (ok.load(Ordering::Relaxed) > after + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the failover"
    );
    assert_eq!(client.state().types[0].freshness, Freshness::Live);
    assert!(!client.state().is_static());
}

/// A balancer (holding watches [`HOLD`]) whose list of type `ty` (version 1) names `servers`.
fn listing(ty: &str, servers: &[(&str, SocketAddr, u32)]) -> FakeBalancer {
    let lb = FakeBalancer::start(HOLD);
    lb.set(list(ty, 1, servers, &[lb.addr]));
    lb
}

/// An instance's 503 in hand stands when the retry reaches no instance (the other refuses connections):
/// what the caller got, the 503 or the connect error, hung on which instance was picked first. A fresh
/// client each round, so the refused instance is not ejected and either may come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_hand_stands_when_the_retry_reaches_no_instance() {
    let busy = Backend::with_status("busy", 503);
    let lb = listing("browse", &[("busy", busy.addr, 100), ("dead", dead_addr(), 100)]);
    for round in 0..12 {
        let client = Client::builder()
            .balancers([lb.addr.to_string()])
            .request_types(["browse"])
            .build()
            .await
            .unwrap();
        let resp = client.send_idempotent("browse", get("/v1/products")).await;
        let resp = resp.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(resp.status(), 503, "round {round}");
        client.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avoids_a_refused_instance_at_once() {
    let a = Backend::start("a");
    let dead = dead_addr();
    let lb = listing("order", &[("a", a.addr, 100), ("dead", dead, 100)]);
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["order"])
        .ejection(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    // Every connect succeeds: the refusal is absorbed by trying the other instance.
    for _ in 0..50 {
        let (picked, _stream) = client.connect_tracked("order").await.unwrap();
        assert_eq!(picked.addr(), a.addr);
        if client.state().types[0].ejected == [dead] {
            break;
        }
    }
    assert_eq!(
        client.state().types[0].ejected,
        [dead],
        "the refused instance was not ejected"
    );
    // From now on it is never picked, long before any balancer would say so.
    for _ in 0..500 {
        assert_eq!(client.pick("order").unwrap().addr(), a.addr);
    }
    // With only dead instances a connect fails, naming the backend side and the refusal.
    lb.set(list("order", 2, &[("dead", dead, 100)], &[lb.addr]));
    eventually_async("version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    let err = client.connect("order").await.unwrap_err();
    assert_eq!(err.side(), Side::Backend);
    assert_eq!(err.kind(), "connect", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_its_last_list_with_every_balancer_down() {
    let a = Backend::start("a");
    let mut lbs = [FakeBalancer::start(HOLD), FakeBalancer::start(HOLD)];
    let addrs = [lbs[0].addr, lbs[1].addr];
    for lb in &lbs {
        lb.set(list("browse", 1, &[("a", a.addr, 100)], &addrs));
    }
    let client = Client::builder()
        .balancers(addrs.iter().map(|a| a.to_string()))
        .request_types(["browse"])
        .max_staleness(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    for lb in &mut lbs {
        lb.kill();
    }
    eventually_async("the client to notice every balancer is down", || {
        matches!(client.state().types[0].freshness, Freshness::Static { .. }).then_some(())
    })
    .await;
    assert!(client.state().is_static());
    // Requests keep flowing from the last list.
    for _ in 0..20 {
        let resp = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(a.hits() >= 20);
    // Past max_staleness the list is no longer trusted, and the error says the balancers are the cause.
    expires(&client).await;
}

/// After `shutdown`, picks work from the last list until it expires (`max_staleness`): nothing vouches for
/// it any more. A watch cancelled in its sleep between answers (where a balancer that answers at once, as
/// one past its `max_watches` does, leaves it most of the time) left it `Live` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_the_list_expires() {
    let (_a, _lb, client) = watching_one_balancer(Duration::ZERO).await;
    client.shutdown();
    client.pick("browse").expect("the last list, until it expires");
    expires(&client).await;
}

/// A client with `max_staleness` 3 s of type `browse` on one balancer (holding watches `hold`) that lists
/// one backend, once the balancer has had a second request (a watch after the first answer).
async fn watching_one_balancer(hold: Duration) -> (Backend, FakeBalancer, Client) {
    let a = Backend::start("a");
    let lb = FakeBalancer::start(hold);
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr]));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .max_staleness(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    eventually_async("a watch after the first answer", || {
        (lb.requests.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    (a, lb, client)
}

/// Waits for `client`'s `browse` list to expire, and checks a pick then fails as stale.
async fn expires(client: &Client) {
    eventually_async("the list to expire", || {
        matches!(client.state().types[0].freshness, Freshness::Expired { .. }).then_some(())
    })
    .await;
    let err = client.pick("browse").unwrap_err();
    assert!(matches!(err, Error::Stale { .. }), "{err}");
    assert_eq!(err.side(), Side::Balancer, "{err}");
}

/// A balancer that hangs (a host stopped without closing its sockets) stops vouching for the list within the
/// hold the client asks for (half of `max_staleness`), and the client moves to the next one, which has a
/// newer list: it does not go on saying `Live` with a list nobody answers for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_balancer_is_left_within_the_hold_it_was_asked_for() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lbs = [FakeBalancer::start(HOLD), FakeBalancer::start(HOLD)];
    let addrs = [lbs[0].addr, lbs[1].addr];
    lbs[0].set(list("browse", 1, &[("a", a.addr, 100)], &addrs));
    let client = Client::builder()
        .balancers([addrs[0].to_string()])
        .request_types(["browse"])
        .max_staleness(Duration::from_secs(4))
        .balancer_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    eventually_async("a watch held by the first balancer", || {
        (client.state().types[0].balancer == Some(addrs[0])).then_some(())
    })
    .await;
    lbs[1].set(list("browse", 2, &[("b", b.addr, 100)], &addrs));
    lbs[0].hang();
    // Within 2 s of hold and 0.5 s of grace the first stops vouching and the second is asked.
    eventually_async("the client to take the second balancer's list", || {
        let s = client.state();
        (s.types[0].version == 2 && s.types[0].balancer == Some(addrs[1])).then_some(())
    })
    .await;
    assert_eq!(client.state().types[0].freshness, Freshness::Live);
    let picked = client.pick("browse").unwrap();
    assert_eq!(picked.addr(), b.addr);
    // With both hung, the list goes static and then expires, not live.
    lbs[1].hang();
    eventually_async("the list to expire", || {
        matches!(client.state().types[0].freshness, Freshness::Expired { .. }).then_some(())
    })
    .await;
    // And stays so: each new connection to a hung balancer vouched for the list for a hold (2 s), so it
    // read Live most of the time and picks never saw it stale. Checked at every poll until the client has
    // sent two more watches to the hung balancers, each of which used to vouch for it.
    let asked = || {
        lbs.iter()
            .map(|l| l.requests.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = asked();
    eventually_async("two more watches sent to the hung balancers", || {
        let err = client.pick("browse").expect_err("a pick from an expired list");
        assert!(matches!(err, Error::Stale { .. }), "{err}");
        (asked() >= before + 2).then_some(())
    })
    .await;
}

/// A type no balancer knows is the client's mistake, said as such and not retryable; with one balancer down
/// as well, it is a bootstrap failure naming what each balancer said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_no_balancer_serves_is_named_as_such_at_build() {
    let a = Backend::start("a");
    let lb = FakeBalancer::start(HOLD);
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr]));
    let build = |balancers: Vec<String>| {
        Client::builder()
            .balancers(balancers)
            .request_types(["browse", "refnud"])
            .connect_timeout(Duration::from_millis(300))
            .build()
    };
    let err = build(vec![lb.addr.to_string()]).await.unwrap_err();
    assert!(matches!(err, Error::NotServed { .. }), "{err}");
    assert!(!err.is_retryable() && err.side() == Side::Client, "{err}");
    assert!(
        err.to_string().contains("\"refnud\"") && err.to_string().contains("[types]"),
        "{err}"
    );
    let dead = dead_addr();
    let err = build(vec![lb.addr.to_string(), dead.to_string()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Bootstrap { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&lb.addr.to_string()) && text.contains(&dead.to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_integration_sends_requests_to_the_picked_instance() {
    let backends = [Backend::start("a"), Backend::start("b"), Backend::start("c")];
    let lb = FakeBalancer::start(HOLD);
    let servers: Vec<_> = backends.iter().map(|b| (b.name.as_str(), b.addr, 100)).collect();
    lb.set(list("browse", 1, &servers, &[lb.addr]));
    let client = browse_client(&lb).await;
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..60 {
        let resp = client.send("browse", get("/v1/products?limit=5")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let backend = resp.extensions().get::<xcluster_sdk::Backend>().unwrap().clone();
        // The instance that answered is the one the SDK says it picked.
        let body = String::from_utf8(resp.body().to_vec()).unwrap();
        assert_eq!(body, backend.id);
        let expected = backends.iter().find(|b| b.name == body).unwrap();
        assert_eq!(backend.addr, expected.addr);
        *seen.entry(body).or_default() += 1;
    }
    for b in &backends {
        assert_eq!(
            seen.get(&b.name).copied().unwrap_or(0),
            b.hits(),
            "hits of {}",
            b.name
        );
    }
    assert_eq!(seen.len(), 3, "every instance gets a share: {seen:?}");

    // The idempotent helper retries elsewhere after a 503 and after a refused instance.
    let unavailable = Backend::with_status("busy", 503);
    let dead = dead_addr();
    lb.set(list(
        "browse",
        2,
        &[
            ("busy", unavailable.addr, 100),
            ("dead", dead, 100),
            ("a", backends[0].addr, 100),
        ],
        &[lb.addr],
    ));
    eventually_async("version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    for _ in 0..20 {
        let resp = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_for_the_wrong_type_is_refused_and_another_balancer_used() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let (confused, good) = (FakeBalancer::start(HOLD), FakeBalancer::start(HOLD));
    let both = [confused.addr, good.addr];
    confused.set_for("browse", list("order", 1, &[("b", b.addr, 100)], &both));
    good.set(list("browse", 1, &[("a", a.addr, 100)], &both));
    for _ in 0..5 {
        // Whichever seed the bootstrap starts with, only the valid list is installed.
        let client = Client::builder()
            .balancers(both.iter().map(|x| x.to_string()))
            .request_types(["browse"])
            .build()
            .await
            .unwrap();
        assert_eq!(client.state().types[0].balancer, Some(good.addr));
        assert_eq!(client.pick("browse").unwrap().addr(), a.addr);
    }
    // With no valid answer anywhere the bootstrap fails, naming the type and the balancer side.
    let err = Client::builder()
        .balancers([confused.addr.to_string()])
        .request_types(["browse"])
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Bootstrap { request_type, .. } if request_type == "browse"),
        "{err}"
    );
    assert_eq!(err.side(), Side::Balancer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_times_out_is_ejected_and_the_request_retried() {
    let (good, stuck) = (Backend::start("good"), Backend::hanging("stuck"));
    let lb = FakeBalancer::start(HOLD);
    lb.set(list(
        "browse",
        1,
        &[("good", good.addr, 100), ("stuck", stuck.addr, 100)],
        &[lb.addr],
    ));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .request_timeout(Duration::from_millis(300))
        .ejection(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    for _ in 0..40 {
        let resp = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
        assert_eq!(resp.body().as_ref(), b"good");
        if client.state().types[0].ejected == [stuck.addr] {
            break;
        }
    }
    assert_eq!(client.state().types[0].ejected, [stuck.addr]);
    assert_eq!(
        stuck.hits(),
        1,
        "the stuck instance got a request after it was ejected"
    );
    // A plain send (not idempotent) is not retried after a timeout: the error says so.
    lb.set(list("browse", 2, &[("stuck", stuck.addr, 100)], &[lb.addr]));
    eventually_async("version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    let err = client.send("browse", get("/v1/products")).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.is_retryable() && !err.not_sent());
}

/// A balancer that has just restarted lists nothing (and says it has heard no report yet), then every
/// instance Down at a weight (its panic mode) until readiness reports arrive. The client keeps its last
/// entries through the empty list and uses every weighted instance that is not drained through the
/// all-Down one, so no request fails. An empty list from a balancer that has heard its agents is the truth:
/// every instance is gone, and picks say so, where the client once tried the dead addresses as live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_balancers_empty_then_all_down_lists_do_not_stop_requests() {
    use xcluster_proto::directory::InstanceState;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = FakeBalancer::start(HOLD);
    let both = [("a", a.addr, 100), ("b", b.addr, 100)];
    lb.set(list("browse", 1, &both, &[lb.addr]));
    let client = browse_client(&lb).await;
    eventually_async("the watch request", || {
        (lb.requests.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;

    let mut restarted = list("browse", 2, &[], &[lb.addr]);
    restarted.warming = Some(true);
    lb.set(restarted);
    eventually_async("the client to see version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    for _ in 0..20 {
        let r = client.send_idempotent("browse", get("/v1/products")).await;
        assert_eq!(r.unwrap().status(), 200);
    }

    let mut down = list("browse", 3, &both, &[lb.addr]);
    for s in &mut down.servers {
        s.state = InstanceState::Down;
    }
    down.servers[1].state = InstanceState::Drained;
    lb.set(down);
    eventually_async("the client to see version 3", || {
        (client.state().types[0].version == 3).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            client.pick("browse").unwrap().addr(),
            a.addr,
            "not the drained one"
        );
        let r = client.send_idempotent("browse", get("/v1/products")).await;
        assert_eq!(r.unwrap().status(), 200);
    }

    lb.set(list("browse", 4, &[], &[lb.addr]));
    eventually_async("the client to see version 4", || {
        (client.state().types[0].version == 4).then_some(())
    })
    .await;
    let err = client.pick("browse").unwrap_err();
    assert!(matches!(err, Error::NoInstance(_)), "{err}");
}

/// A client of `lb` for `browse`, with every other setting at its default.
async fn browse_client(lb: &FakeBalancer) -> Client {
    Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .build()
        .await
        .unwrap()
}

/// `send_idempotent` is documented for a GET or a POST carrying an idempotency key. A POST without one
/// that gets a 503 may still have had its effect (an app may fail after its commit), so it must not be
/// sent again to another instance; with a key it is retried as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_an_idempotency_key_is_not_retried() {
    let (a, b) = (Backend::with_status("a", 503), Backend::with_status("b", 503));
    let lb = FakeBalancer::start(HOLD);
    lb.set(list(
        "order",
        1,
        &[("a", a.addr, 100), ("b", b.addr, 100)],
        &[lb.addr],
    ));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["order"])
        .build()
        .await
        .unwrap();
    let post = |key: Option<&str>| {
        let mut r = http::Request::post("/v1/orders");
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    let resp = client.send_idempotent("order", post(None)).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(a.hits() + b.hits(), 1, "a POST without a key was sent twice");
    let resp = client.send_idempotent("order", post(Some("k-1"))).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        a.hits() + b.hits(),
        3,
        "a POST with a key is retried on the other instance"
    );
}

/// "Forever" spelled as `Duration::MAX` (keep serving the last list however long the balancers are gone,
/// hold watches as long as they will) must not break the watch: the client still follows a table change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_do_not_break_the_watch() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = FakeBalancer::start(Duration::from_millis(200));
    lb.set(list("browse", 1, &[("a", a.addr, 100)], &[lb.addr]));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .max_staleness(Duration::MAX)
        .watch_timeout(Duration::MAX)
        .balancer_timeout(Duration::MAX)
        .build()
        .await
        .unwrap();
    assert_eq!(client.pick("browse").unwrap().addr(), a.addr);
    lb.set(list("browse", 2, &[("b", b.addr, 100)], &[lb.addr]));
    eventually_async("the client to install version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    assert_eq!(client.pick("browse").unwrap().addr(), b.addr);
}

/// When every instance answers 503 (overloaded, or their store down), `send_idempotent` must not keep
/// multiplying the load on them by `request_attempts`: a retry is made only while the type's retry budget
/// lasts (by default 100 tokens, retries while more than 50 are left), so a hundred calls reach the two
/// instances at most 100 + 50 times, where each call used to try both (200), and the last of them once
/// each. Answers that stand refill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_when_every_instance_fails() {
    let (a, b, c) = (
        Backend::with_status("a", 503),
        Backend::with_status("b", 503),
        Backend::start("c"),
    );
    let lb = FakeBalancer::start(HOLD);
    lb.set(list(
        "browse",
        1,
        &[("a", a.addr, 100), ("b", b.addr, 100)],
        &[lb.addr],
    ));
    let client = browse_client(&lb).await;
    assert!(!client.state().types[0].retries_throttled);
    for _ in 0..100 {
        let resp = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
    }
    let sent = a.hits() + b.hits();
    assert!(
        sent <= 150,
        "{sent} attempts for 100 calls: retries went on with every instance failing"
    );
    assert!(
        sent > 100,
        "the first failures are still retried ({sent} attempts)"
    );
    assert!(client.state().types[0].retries_throttled);
    for _ in 0..10 {
        client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
    }
    assert_eq!(a.hits() + b.hits(), sent + 10, "a spent budget retries nothing");
    // A healthy instance's answers give the budget back: 501 successes at 0.1 token each.
    eventually_async("the watch request", || {
        (lb.requests.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    lb.set(list("browse", 2, &[("c", c.addr, 100)], &[lb.addr]));
    eventually_async("the client to install version 2", || {
        (client.state().types[0].version == 2).then_some(())
    })
    .await;
    for _ in 0..501 {
        let resp = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(!client.state().types[0].retries_throttled);
}

/// A call whose first attempt got a 503 and whose retry the deadline cut off returns the 503 it has, as it
/// does when no time is left to start the retry: it used to end with a deadline error saying nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stands_when_the_deadline_cuts_its_retry_off() {
    let (busy, stuck) = (Backend::with_status("busy", 503), Backend::hanging("stuck"));
    let lb = FakeBalancer::start(HOLD);
    lb.set(list(
        "browse",
        1,
        &[("busy", busy.addr, 100), ("stuck", stuck.addr, 100)],
        &[lb.addr],
    ));
    let client = Client::builder()
        .balancers([lb.addr.to_string()])
        .request_types(["browse"])
        .deadline(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // Each call tries the two in the order it picks them: the busy one first, and its 503 stands; the
    // stuck one first, and the deadline ends the call there.
    let mut answered = 0;
    for _ in 0..12 {
        match client.send_idempotent("browse", get("/v1/products")).await {
            Ok(resp) => {
                assert_eq!(resp.status(), 503);
                answered += 1;
            }
            Err(e) => assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e}"),
        }
    }
    assert!(busy.hits() > 0, "the busy instance was never tried");
    assert_eq!(answered, busy.hits(), "every 503 stands");
}

/// Calls that reach no instance (nothing pickable: every instance at weight 0, as after a drain of them all)
/// cost the instances nothing and spend no retry token: they used to, so a type with nothing pickable for a
/// hundred calls had its budget spent, and the real failures after it went unretried until 501 answers
/// came back. Nor is "none to pick" picked again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_reach_no_instance_spend_no_retry_budget() {
    let a = Backend::start("a");
    let lb = FakeBalancer::start(HOLD);
    lb.set(list("browse", 1, &[("a", a.addr, 0)], &[lb.addr]));
    let client = browse_client(&lb).await;
    for _ in 0..100 {
        let err = client
            .send_idempotent("browse", get("/v1/products"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoInstance(_)), "{err}");
    }
    assert_eq!(a.hits(), 0);
    assert!(!client.state().types[0].retries_throttled);
}

/// A balancer that answers at once with an error (here a list of another type, as a confused balancer
/// sends; a 5xx or garbage is the same) vouches for nothing: with every balancer answering so, the list
/// ages and expires after `max_staleness`, as with every balancer down. Each such answer used to count as
/// a sign of life, which kept the list's age under the watch's 2 s backoff: it never expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancers_answering_only_errors_do_not_keep_the_list_fresh() {
    let (a, lb, client) = watching_one_balancer(HOLD).await;
    lb.set_for("browse", list("order", 2, &[("a", a.addr, 100)], &[lb.addr]));
    eventually_async("the list to go static", || {
        matches!(client.state().types[0].freshness, Freshness::Static { .. }).then_some(())
    })
    .await;
    expires(&client).await;
}
