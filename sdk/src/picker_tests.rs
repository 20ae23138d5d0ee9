use super::*;

fn entry(port: u16, weight: u32, state: InstanceState) -> Entry {
    Entry {
        id: Arc::from(format!("i{port}")),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        weight,
        state,
        stats: Arc::new(Stats::default()),
    }
}

fn counts(t: &Table, n: usize, exclude: &[SocketAddr]) -> std::collections::HashMap<u16, usize> {
    let mut m = std::collections::HashMap::new();
    for _ in 0..n {
        if let Some(e) = t.pick(0, exclude) {
            *m.entry(e.addr.port()).or_default() += 1;
        }
    }
    m
}

/// How many picks went to `port`.
fn n(c: &std::collections::HashMap<u16, usize>, port: u16) -> usize {
    c.get(&port).copied().unwrap_or(0)
}

#[test]
fn follows_weights_and_skips_unpickable() {
    let t = Table::new(
        1,
        vec![
            entry(1, 900, InstanceState::Up),
            entry(2, 100, InstanceState::SlowStart),
            entry(3, 0, InstanceState::Down),
            entry(4, 5000, InstanceState::Drained),
            entry(5, 0, InstanceState::Up),
        ],
    );
    let c = counts(&t, 10_000, &[]);
    assert_eq!(c.keys().filter(|p| **p > 2).count(), 0, "{c:?}");
    // With nothing learned locally, the split is the published weights' 9:1.
    let share = c[&1] as f64 / 10_000.0;
    assert!((0.87..0.93).contains(&share), "{c:?}");
}

/// The balancer's panic mode lists every known instance at the panic weight, the ones it has no fresh
/// ready report of as Down: a client picks them all as the balancer's own picks do, where it used to pick
/// only the Up ones, the few the balancer's panic mode spreads traffic away from.
#[test]
fn a_balancer_in_panic_mode_has_its_down_entries_picked_too() {
    let t = Table::new(
        1,
        vec![
            entry(1, 5000, InstanceState::Up),
            entry(2, 5000, InstanceState::Down),
            entry(3, 5000, InstanceState::Down),
            entry(4, 0, InstanceState::Drained),
        ],
    );
    assert!(t.has_healthy(), "the published weights are followed");
    let c = counts(&t, 6000, &[]);
    assert_eq!(c.get(&4), None, "{c:?}");
    assert!(
        [1, 2, 3].iter().all(|p| (1600..2400).contains(&n(&c, *p))),
        "{c:?}"
    );
}

/// A list with no weight (0% on every instance, or a balancer whose panic mode is off with all of them down)
/// is picked from by nobody, as the L4 proxy and `/v1/pick` pick nothing from it: the client used to spread
/// traffic over every entry at equal weight, which the operator had set to get none.
#[test]
fn a_list_without_weights_picks_nothing() {
    let t = Table::new(
        1,
        vec![
            entry(1, 0, InstanceState::Down),
            entry(2, 0, InstanceState::Up),
            entry(3, 0, InstanceState::Drained),
        ],
    );
    assert!(!t.has_healthy());
    assert!(t.pick(0, &[]).is_none());
    assert!(
        Table::new(1, vec![entry(1, 5, InstanceState::Drained)])
            .pick(0, &[])
            .is_none()
    );
    let up = Table::new(1, vec![entry(1, 5, InstanceState::Up)]);
    assert!(up.has_healthy());
}

#[test]
fn ejected_and_excluded_instances_are_avoided() {
    let t = Table::new(
        1,
        vec![entry(1, 100, InstanceState::Up), entry(2, 100, InstanceState::Up)],
    );
    t.all[1]
        .stats
        .instance
        .ejected_until_ms
        .store(10, Ordering::Relaxed);
    assert_eq!(counts(&t, 1000, &[]).get(&2), None);
    // Once the ejection has passed it is picked again.
    let later = (0..1000)
        .filter_map(|_| t.pick(11, &[]))
        .filter(|e| e.addr.port() == 2)
        .count();
    assert!(later > 0);
    let a1 = t.all[0].addr;
    // Everything else excluded: an ejected instance is still better than nothing.
    assert_eq!(t.pick(0, &[a1]).map(|e| e.addr.port()), Some(2));
    assert!(t.pick(0, &[a1, t.all[1].addr]).is_none());
    assert!(Table::new(1, vec![]).pick(0, &[]).is_none());
}

#[test]
fn local_feedback_shifts_load_away_from_slow_and_failing_instances() {
    let t = Table::new(
        1,
        vec![entry(1, 100, InstanceState::Up), entry(2, 100, InstanceState::Up)],
    );
    for _ in 0..20 {
        t.all[0].stats.record_success(Duration::from_millis(40), 0);
        t.all[1].stats.record_success(Duration::from_millis(1), 0);
    }
    let c = counts(&t, 4000, &[]);
    assert!(n(&c, 2) > 2 * n(&c, 1), "{c:?}");
    for _ in 0..20 {
        t.all[1].stats.record_success(Duration::from_millis(40), 0);
        t.all[1].stats.record_error(0);
    }
    let c = counts(&t, 4000, &[]);
    assert!(n(&c, 1) > 2 * n(&c, 2), "{c:?}");
}

#[test]
fn a_slow_instance_is_compared_on_every_pick_not_only_when_drawn_twice() {
    let t = Table::new(
        1,
        vec![
            entry(1, 100, InstanceState::Up),
            entry(2, 100, InstanceState::Up),
            entry(3, 100, InstanceState::Up),
        ],
    );
    for _ in 0..20 {
        t.all[0].stats.record_success(Duration::from_millis(8), 0);
        t.all[1].stats.record_success(Duration::from_millis(2), 0);
        t.all[2].stats.record_success(Duration::from_millis(2), 0);
    }
    // Equal weights: a pick that could draw the slow one twice would send it about 1/9 of requests.
    let c = counts(&t, 9000, &[]);
    assert!(n(&c, 1) < 90, "{c:?}");
    assert!(n(&c, 2) > 3000 && c[&3] > 3000, "{c:?}");
}

#[test]
fn one_stalled_answer_moves_the_estimate_a_bounded_step() {
    let s = Stats::default();
    for _ in 0..10 {
        s.record_success(Duration::from_millis(2), 0);
    }
    s.record_success(Duration::from_millis(30), 0);
    // Clipped to 4 × 2 ms, then a quarter of the way: 2 + (8 − 2) / 4.
    assert_eq!(s.ewma_us.load(Ordering::Relaxed), 3_500);
    // A steadily slower instance still shows within a few answers.
    for _ in 0..4 {
        s.record_success(Duration::from_millis(8), 0);
    }
    assert!(s.ewma_us.load(Ordering::Relaxed) > 6_000);
}

#[test]
fn an_unmeasured_instance_gets_its_weights_share_and_sub_millisecond_noise_is_ignored() {
    let t = Table::new(
        1,
        vec![entry(1, 100, InstanceState::Up), entry(2, 100, InstanceState::Up)],
    );
    t.all[0].stats.record_success(Duration::from_micros(200), 0);
    let share = n(&counts(&t, 4000, &[]), 2) as f64 / 4000.0;
    assert!((0.4..0.6).contains(&share), "unmeasured: {share}");
    // 0.2 ms against 0.4 ms: twice, but both far under a millisecond.
    t.all[1].stats.record_success(Duration::from_micros(400), 0);
    let share = n(&counts(&t, 4000, &[]), 2) as f64 / 4000.0;
    assert!((0.4..0.6).contains(&share), "sub-millisecond: {share}");
}

#[test]
fn an_avoided_instance_is_tried_again_after_a_while_and_taken_back_when_fast() {
    let t = Table::new(
        1,
        vec![
            entry(1, 100, InstanceState::Up),
            entry(2, 100, InstanceState::Up),
            entry(3, 100, InstanceState::Up),
        ],
    );
    for e in &t.all[1..] {
        e.stats.record_success(Duration::from_millis(2), 0);
    }
    t.all[0].stats.record_success(Duration::from_millis(8), 0);
    let picks_at = |now| {
        (0..3000)
            .filter(|_| t.pick(now, &[]).is_some_and(|e| e.addr.port() == 1))
            .count()
    };
    assert!(picks_at(0) < 30, "slow: avoided");
    // The others keep being sampled; the slow one is not. Twelve seconds on it is worth a try again.
    for e in &t.all[1..] {
        e.stats.record_success(Duration::from_millis(2), 12_000);
    }
    assert!(picks_at(12_000) > 500, "faded: tried again");
    // It answered fast: from then on it is an equal again.
    t.all[0].stats.record_success(Duration::from_millis(2), 12_000);
    let share = picks_at(12_000) as f64 / 3000.0;
    assert!((0.25..0.42).contains(&share), "{share}");
    // Errors fade the same way.
    for _ in 0..20 {
        t.all[0].stats.record_error(12_000);
    }
    assert!(picks_at(12_000) < 300);
    assert!(picks_at(32_000) > 500);
}

#[test]
fn a_clients_own_in_flight_follows_the_weights_without_countering_them() {
    // One client-wide count, as the directory wires it.
    let total = Arc::new(AtomicU32::new(0));
    let inst = |port, weight| {
        let i = Arc::new(InstanceStats {
            total_in_flight: total.clone(),
            ..InstanceStats::default()
        });
        Entry {
            stats: Arc::new(Stats::of_instance(i)),
            ..entry(port, weight, InstanceState::Up)
        }
    };
    let t = Table::new(1, vec![inst(1, 900), inst(2, 100)]);
    for e in &t.all {
        e.stats.record_success(Duration::from_millis(1), 0);
    }
    // Two requests in flight, both on the heavy instance: its fair share (1.8), so no excess.
    t.all[0].stats.instance.in_flight.store(2, Ordering::Relaxed);
    total.store(2, Ordering::Relaxed);
    let share = n(&counts(&t, 10_000, &[]), 1) as f64 / 10_000.0;
    assert!((0.87..0.93).contains(&share), "{share}");
    // Six there, far past its share of six: the light one takes over.
    t.all[0].stats.instance.in_flight.store(6, Ordering::Relaxed);
    total.store(6, Ordering::Relaxed);
    let share = n(&counts(&t, 10_000, &[]), 1) as f64 / 10_000.0;
    assert!(share < 0.2, "{share}");
}

#[test]
fn a_short_queue_at_a_fast_instance_does_not_send_work_to_a_much_slower_one() {
    let total = Arc::new(AtomicU32::new(0));
    let inst = |port| {
        let i = Arc::new(InstanceStats {
            total_in_flight: total.clone(),
            ..InstanceStats::default()
        });
        Entry {
            stats: Arc::new(Stats::of_instance(i)),
            ..entry(port, 100, InstanceState::Up)
        }
    };
    let t = Table::new(1, vec![inst(1), inst(2)]);
    t.all[0].stats.record_success(Duration::from_millis(5), 0);
    t.all[1].stats.record_success(Duration::from_millis(15), 0);
    // Four of the client's five requests are at the fast instance: 1.5 over its share. Counted whole,
    // that queue (2.5 × 6 ms) would tie with the slow one (16 ms) and it would take half the picks.
    t.all[0].stats.instance.in_flight.store(4, Ordering::Relaxed);
    t.all[1].stats.instance.in_flight.store(1, Ordering::Relaxed);
    total.store(5, Ordering::Relaxed);
    let c = counts(&t, 4000, &[]);
    assert!(n(&c, 2) < 200, "{c:?}");
}

#[test]
fn requests_of_other_types_in_flight_count_against_an_instance() {
    let (busy, idle) = (
        Arc::new(InstanceStats::default()),
        Arc::new(InstanceStats::default()),
    );
    let browse = |i: &Arc<InstanceStats>, port| Entry {
        stats: Arc::new(Stats::of_instance(i.clone())),
        ..entry(port, 100, InstanceState::Up)
    };
    let t = Table::new(1, vec![browse(&busy, 1), browse(&idle, 2)]);
    for e in &t.all {
        e.stats.record_success(Duration::from_millis(1), 0);
    }
    // Slow orders in flight on instance 1, counted in its instance stats by the order table's pick.
    busy.in_flight.store(4, Ordering::Relaxed);
    let c = counts(&t, 4000, &[]);
    assert!(n(&c, 2) > 2 * n(&c, 1), "{c:?}");
}

#[test]
fn a_balancer_raising_an_avoided_instances_share_makes_the_client_measure_it_again() {
    // Measured slow (15 ms against 5) while the balancers gave it a small share.
    let table = |slow_weight| {
        let t = Table::new(
            1,
            vec![
                entry(1, 400, InstanceState::Up),
                entry(2, slow_weight, InstanceState::Up),
            ],
        );
        t.publish_shares();
        t
    };
    let before = table(100);
    before.all[0].stats.record_success(Duration::from_millis(5), 0);
    before.all[1].stats.record_success(Duration::from_millis(15), 0);
    assert_eq!(n(&counts(&before, 4000, &[]), 2), 0);
    // The same stats under a new table: a small change to the share keeps the client's measurement...
    let same = |t: &Table, slow_weight| {
        let next = Table::new(
            2,
            vec![
                Entry {
                    stats: t.all[0].stats.clone(),
                    ..entry(1, 400, InstanceState::Up)
                },
                Entry {
                    stats: t.all[1].stats.clone(),
                    ..entry(2, slow_weight, InstanceState::Up)
                },
            ],
        );
        next.publish_shares();
        next
    };
    let a_little = same(&before, 130);
    assert_eq!(n(&counts(&a_little, 4000, &[]), 2), 0);
    // ...while the balancers giving it its whole share back (their figures come from every client's
    // requests) drops it: picks follow the weights until its next answer.
    let back = same(&a_little, 400);
    let c = counts(&back, 4000, &[]);
    assert!((1600..2400).contains(&n(&c, 2)), "{c:?}");
    // That answer decides: still slow, and it is avoided again.
    back.all[1].stats.record_success(Duration::from_millis(15), 0);
    assert_eq!(n(&counts(&back, 4000, &[]), 2), 0);
    // A later table at that same share keeps the new measurement.
    let again = same(&back, 400);
    assert_eq!(n(&counts(&again, 4000, &[]), 2), 0);
    // A cut after the last sample and a rise back from it is news too, though the share is only back
    // where it was at the sample.
    let lower = same(&again, 150);
    assert_eq!(n(&counts(&lower, 4000, &[]), 2), 0);
    let up = same(&lower, 400);
    assert!(n(&counts(&up, 4000, &[]), 2) > 1000);
}

#[test]
fn an_instance_the_balancers_find_healthy_is_tried_again_sooner_than_one_they_cut() {
    // Both measured at 12 ms against a peer at 4 ms; one is at a full share of the table, one at a third.
    let measured = |rel_share: f64| {
        let s = Stats::default();
        s.published(rel_share);
        s.record_success(Duration::from_millis(12), 0);
        s
    };
    let (full, cut, peer) = (measured(1.0), measured(0.3), Stats::default());
    peer.record_success(Duration::from_millis(4), 0);
    // When the avoided one is the first draw, it keeps the pick once the peer is no longer clearly cheaper.
    // (The peer keeps answering in 4 ms, so its own estimate stays fresh.)
    let tried = |s: &Stats, at: u64| {
        peer.record_success(Duration::from_millis(4), at);
        !peer.cost(at, 0.5).below(s.cost(at, 0.5), SWITCH_RATIO)
    };
    let first = |s: &Stats| (0..20_000u64).step_by(100).find(|&at| tried(s, at));
    let (f, c) = (first(&full).unwrap(), first(&cut).unwrap());
    // 12 ms fades to about 5 ms: 1.2 half-lives, 1.2 s at a full share, 4.8 s when cut.
    assert!((1_000..1_500).contains(&f), "{f}");
    assert!((4_500..5_500).contains(&c), "{c}");
    // Before any table, the long half-life.
    let none = Stats::default();
    none.record_success(Duration::from_millis(12), 0);
    assert_eq!(first(&none), Some(c));
}
