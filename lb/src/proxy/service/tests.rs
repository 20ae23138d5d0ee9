#![allow(clippy::unwrap_used)]
use super::*;

/// A proxy with `toml`'s config: its shared state and its first listener's.
fn serve(toml: &str) -> (Shared, Arc<ListenerState>) {
    let cfg = ProxyConfig::for_tests(toml);
    let shared = Shared::for_tests(&cfg);
    let l = ListenerState::new(&cfg.listeners[0], None);
    (shared, l)
}

/// The address every test's client connects from.
const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// With `balance = "least_connections"`, a connection counts on its backend from the pick, while it
/// connects: picks made before any connect completes (a burst of accepts) alternate between two equal
/// backends instead of all taking the one that looked idle, and a backend whose connections end is
/// preferred again.
#[test]
fn least_connections_counts_connections_from_the_pick() {
    let (shared, l) = serve(
        r#"
        balance = "least_connections"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        [[backends]]
        addr = "127.0.0.1:2"
        "#,
    );
    // Ten connections still connecting: none has completed, all hold their assignment.
    let connecting: Vec<(SocketAddr, Assigned)> = (0..10)
        .map(|_| {
            shared
                .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
                .unwrap()
        })
        .collect();
    let on_1 = connecting.iter().filter(|(a, _)| a.port() == 1).count();
    assert_eq!(on_1, 5, "10 picks in a burst went {on_1} to 10 - {on_1}");
    // Backend 1's connections end: the next five go to it.
    let kept: Vec<_> = connecting.into_iter().filter(|(a, _)| a.port() == 2).collect();
    let later: Vec<(SocketAddr, Assigned)> = (0..5)
        .map(|_| {
            shared
                .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
                .unwrap()
        })
        .collect();
    assert!(later.iter().all(|(a, _)| a.port() == 1));
    drop((kept, later));
}

/// A backend at its `max_connections` is passed over; with every backend full there is no pick, and a
/// connection that ends frees its place.
#[test]
fn a_backend_at_max_connections_is_passed_over() {
    let (shared, l) = serve(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        max_connections = 2
        [[backends]]
        addr = "127.0.0.1:2"
        weight = 1
        max_connections = 3
        "#,
    );
    let mut open: Vec<(SocketAddr, Assigned)> = (0..5)
        .map(|_| {
            shared
                .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
                .unwrap()
        })
        .collect();
    let on_1 = open.iter().filter(|(a, _)| a.port() == 1).count();
    assert_eq!(on_1, 2, "{open:?}");
    assert_eq!(
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
            .err(),
        Some(NoBackend::Full)
    );
    let both: Vec<SocketAddr> = open.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &both, 0, None)
            .err(),
        Some(NoBackend::TurnAround)
    );
    let on_2 = open.iter().position(|(a, _)| a.port() == 2).unwrap();
    open.swap_remove(on_2);
    let (addr, _held) = shared
        .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
        .unwrap();
    assert_eq!(addr.port(), 2);
}

/// A connection that has tried every backend tries them again after a pause while it has attempts
/// left, unless health checks have put them all down; then, or with no attempt left, it is closed.
#[test]
fn every_backend_tried_turns_around_unless_checks_put_them_down() {
    let (shared, l) = serve(
        r#"
        connect_attempts = 3
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        "#,
    );
    let (only, bm) = shared
        .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
        .unwrap();
    let mut tried = Vec::new();
    shared.connect_failed(only, &bm, &mut tried);
    assert_eq!(
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &tried, 1, None)
            .err(),
        Some(NoBackend::TurnAround)
    );
    // After the pause, with `tried` cleared, the held backend is tried again: it is all there is.
    let (again, _) = shared
        .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 1, None)
        .unwrap();
    assert_eq!(again, only);
    assert_eq!(
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &tried, 3, None)
            .err(),
        Some(NoBackend::Exhausted),
        "no attempt left"
    );
    shared.hold_out(only, &bm, Failure::Checks(Duration::from_secs(3)), "test", false);
    assert_eq!(
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &tried, 1, None)
            .err(),
        Some(NoBackend::Exhausted),
        "down by its checks: not worth a wait"
    );
}

/// A backend its health checks hold down is never picked, not even when every backend is held out (a check
/// past the connect, an HTTP status or a side port, fails while the connect would succeed), and a client's
/// connect to it that succeeds anyway (picked just before it went down) does not bring it back; a backend a
/// client's failed connect holds out still is tried then.
#[test]
fn a_backend_down_by_its_checks_gets_no_client() {
    let (shared, l) = serve(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        [[backends]]
        addr = "127.0.0.1:2"
        "#,
    );
    let pick = || {
        shared
            .next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None)
            .map(|(a, _)| a)
    };
    let backends = shared.backends.load_full();
    let (down, restarting): (SocketAddr, SocketAddr) =
        ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
    let checks = Failure::Checks(Duration::from_secs(3));
    shared.hold_out(down, &backends[&down], checks, "test", false);
    shared.hold_out(
        restarting,
        &backends[&restarting],
        Failure::Connect,
        "test",
        false,
    );
    for _ in 0..20 {
        assert_eq!(
            pick(),
            Ok(restarting),
            "only the one a client's connect holds out"
        );
    }
    shared.hold_out(restarting, &backends[&restarting], checks, "test", false);
    assert_eq!(pick().err(), Some(NoBackend::Exhausted), "every one down");
    shared.connected(down, &backends[&down], Instant::now());
    assert_eq!(pick().err(), Some(NoBackend::Exhausted), "still down");
    assert!(shared.holds.exclude(&[]).unwrap().contains(&down));
}

/// A backend a reload removes while it has connections, and another adds back, still counts them: at its
/// max_connections it takes no more.
#[test]
fn a_backend_removed_and_added_back_keeps_its_open_count() {
    let cfg = |port: u16| {
        ProxyConfig::for_tests(&format!(
            "[[listeners]]\nlisten = \"127.0.0.1:7100\"\n\
             [[backends]]\naddr = \"127.0.0.1:{port}\"\nmax_connections = 1\n"
        ))
    };
    let shared = Shared::for_tests(&cfg(1));
    let l = ListenerState::new(&cfg(1).listeners[0], None);
    let pick = || shared.next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, None);
    let (first, open) = pick().unwrap();
    assert_eq!(first.port(), 1);
    shared.set_backends(&cfg(2));
    shared.picker.on_config(&cfg(2));
    shared.set_backends(&cfg(1));
    shared.picker.on_config(&cfg(1));
    assert_eq!(pick().err(), Some(NoBackend::Full), "its connection still open");
    drop(open);
    assert_eq!(pick().unwrap().0, first);
}

/// A type's places are those of its capped backends a pick could take now; one such without a cap, or no
/// configured backend, gives it places without end. Weights set at run time count as the picks see them: a
/// backend taken to 0 (or drained) gives no place a newcomer could pass the waiting clients for, and one
/// given a weight (0 in the file) gives its places to them.
#[test]
fn places_count_only_capped_backends_a_pick_could_take() {
    use crate::proxy::pick::{StaticPicker, WeightOverrides};
    let cfg = ProxyConfig::for_tests(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        request_types = ["web"]
        max_connections = 2
        [[backends]]
        addr = "127.0.0.1:2"
        request_types = ["web"]
        max_connections = 3
        [[backends]]
        addr = "127.0.0.1:3"
        request_types = ["web"]
        weight = 0
        [[backends]]
        addr = "127.0.0.1:4"
        request_types = ["web"]
        weight = 0
        max_connections = 4
        [[backends]]
        addr = "127.0.0.1:5"
        request_types = ["api"]
        "#,
    );
    let picker = Arc::new(StaticPicker::new(&cfg));
    let mut shared = Shared::for_tests(&cfg);
    shared.picker = picker.clone();
    let free = |ty: &str| shared.places.load().free(ty, |a| shared.takes(ty, a));
    assert_eq!(free("web"), 5);
    let addr = |i: usize| cfg.backends[i].addr;
    shared.backends.load()[&addr(1)].open.store(3, Ordering::Relaxed);
    assert_eq!(free("web"), 2);
    assert_eq!(free("api"), usize::MAX, "a backend without a cap");
    assert_eq!(free("routed"), usize::MAX, "no configured backend");
    let set = |version, weights: &[(usize, &str)]| {
        let by_addr = weights
            .iter()
            .map(|(i, w)| (addr(*i), w.parse().unwrap()))
            .collect();
        picker.set_weights(&Arc::new(WeightOverrides { version, by_addr }));
    };
    // The first taken out at run time: only the second's places are left, and it is full.
    set(1, &[(0, "0")]);
    assert_eq!(free("web"), 0);
    // The capped one of weight 0 in the file given a weight: its 4 places count.
    set(2, &[(0, "0"), (3, "7")]);
    assert_eq!(free("web"), 4);
    // The uncapped one given a weight: places without end.
    set(3, &[(2, "7")]);
    assert_eq!(free("web"), usize::MAX);
    // None a pick could take: without end too, so the pick says so at once rather than the queue.
    set(4, &[(0, "0"), (1, "0")]);
    assert_eq!(free("web"), usize::MAX);
}

/// A place that frees goes to the client that has waited longest, not to a later one nor a newcomer.
#[test]
fn a_freed_place_goes_to_the_client_that_waited_longest() {
    let (shared, l) = serve(
        r#"
        [[listeners]]
        listen = "127.0.0.1:7100"
        [[backends]]
        addr = "127.0.0.1:1"
        max_connections = 1
        "#,
    );
    let ask = |ticket: Option<&Ticket>| shared.next_backend(&l, &l.cfg.request_type, CLIENT, &[], 0, ticket);
    let held = ask(None).unwrap();
    assert_eq!(ask(None).err(), Some(NoBackend::Full));
    let bells: [Arc<tokio::sync::Notify>; 2] = [Arc::default(), Arc::default()];
    let rung = |i: usize| futures_util::FutureExt::now_or_never(bells[i].notified()).is_some();
    let first = shared
        .queue
        .join(&l.cfg.request_type, Waker::Task(bells[0].clone()));
    let second = shared
        .queue
        .join(&l.cfg.request_type, Waker::Task(bells[1].clone()));
    assert_eq!((rung(0), rung(1)), (false, false));
    // The end of the connection holding the place rings the oldest waiter, and only it.
    drop(held);
    assert_eq!((rung(0), rung(1)), (true, false));
    assert_eq!(ask(Some(&second)).err(), Some(NoBackend::Full));
    assert_eq!(ask(None).err(), Some(NoBackend::Full));
    let served = ask(Some(&first)).unwrap();
    // Served, the first leaves the queue and rings the next, in case a second place is free.
    drop(first);
    assert_eq!((rung(0), rung(1)), (false, true));
    assert_eq!(
        ask(Some(&second)).err(),
        Some(NoBackend::Full),
        "no place is free"
    );
    drop(served);
    let _served = ask(Some(&second)).unwrap();
}
