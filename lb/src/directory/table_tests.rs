//! Unit tests of the server table: determinism, expiry, panic threshold, slow start, drain, replay.
#![allow(clippy::unwrap_used)]

use super::*;
use xcluster_proto::report::{HostLoad, InstanceLoad};

fn params() -> Params {
    let mut p = Params {
        slow_start: Duration::from_secs(4),
        report_ttl: Duration::from_secs(2),
        forget_after: Duration::from_secs(10),
        ..Default::default()
    };
    p.types = BTreeMap::from([
        (
            "cpu".into(),
            weights::TypeProfile {
                cpu: 1.0,
                mem: 0.0,
                queue: 0.0,
                cost: 3.0,
            },
        ),
        (
            "queue".into(),
            weights::TypeProfile {
                cpu: 0.0,
                mem: 0.0,
                queue: 1.0,
                cost: 1.0,
            },
        ),
    ]);
    p
}

fn inst(id: &str, port: u16, queued: u32) -> InstanceLoad {
    InstanceLoad {
        id: id.into(),
        addr: format!("127.0.0.1:{port}"),
        ready: true,
        queued,
        capacity: 100,
        ..Default::default()
    }
}

fn report(agent: &str, seq: u64, ts: u64, cpu: f64, instances: Vec<InstanceLoad>) -> LoadReport {
    LoadReport {
        agent: agent.into(),
        seq,
        boot: 0,
        timestamp_ms: ts,
        host: HostLoad {
            cpu,
            mem: 0.1,
            load1: 0.0,
            cores: 8,
        },
        instances,
    }
}

fn weight(t: &BTreeMap<String, TypeList>, ty: &str, id: &str) -> Option<(u32, InstanceState)> {
    t[ty]
        .rows
        .iter()
        .find(|r| &*r.id == id)
        .map(|r| (r.weight, r.state))
}

#[test]
fn same_reports_give_the_same_table_and_version() {
    let p = params();
    let (mut a, mut b) = (Table::default(), Table::default());
    for (seq, ts) in [(1, 1000), (2, 1500), (3, 2000)] {
        let r1 = report("h1", seq, ts, 0.7, vec![inst("h1/a", 1, 10 * seq as u32)]);
        let r2 = report("h2", seq, ts, 0.1, vec![inst("h2/a", 2, 5)]);
        a.apply(&r1, ts, &p);
        a.apply(&r2, ts, &p);
        // The other balancer hears the agents in the other order and at other local times.
        b.apply(&r2, ts + 7, &p);
        b.apply(&r1, ts + 9, &p);
    }
    let (ta, tb) = (a.publish(2010, &p), b.publish(2010, &p));
    for ty in ["cpu", "queue"] {
        assert_eq!(ta[ty].version, tb[ty].version);
        assert!(ta[ty].version <= weights::VERSION_BITS, "exact as a JSON double");
        assert_eq!(weight(&ta, ty, "h1/a"), weight(&tb, ty, "h1/a"));
    }
    assert_ne!(ta["cpu"].version, ta["queue"].version);
}

#[test]
fn stale_instances_leave_the_list_and_are_forgotten_later() {
    let p = params();
    let mut t = Table::default();
    t.apply(&report("h1", 1, 0, 0.1, vec![inst("h1/a", 1, 0)]), 0, &p);
    t.apply(&report("h2", 1, 0, 0.1, vec![inst("h2/a", 2, 0)]), 0, &p);
    t.apply(&report("h3", 1, 0, 0.1, vec![inst("h3/a", 3, 0)]), 0, &p);
    // h1 keeps reporting; h2 and h3 stop. 1 of 3 fresh is below the 0.5 panic threshold...
    t.apply(&report("h1", 2, 2500, 0.1, vec![inst("h1/a", 1, 0)]), 2500, &p);
    let list = t.publish(2500, &p);
    assert!(list["queue"].panic);
    assert_eq!(
        list["queue"].rows.len(),
        3,
        "panic spreads over every known instance"
    );
    assert!(
        list["queue"]
            .rows
            .iter()
            .all(|r| r.weight == weights::PANIC_WEIGHT)
    );
    // ...so with a lower threshold the stale ones simply leave the list.
    let lenient = Params {
        panic_threshold: 0.3,
        ..params()
    };
    let list = t.publish(2500, &lenient);
    assert!(!list["queue"].panic);
    assert_eq!(list["queue"].rows.len(), 1);
    assert!(weight(&list, "queue", "h2/a").is_none());
    // Within TTL it is still listed (the TTL boundary is inclusive).
    assert!(weight(&t.publish(2000, &lenient), "queue", "h2/a").is_some());
    // After forget_after it is gone from memory too.
    assert!(!t.expire(10_000, &p));
    assert!(t.expire(10_001, &p));
    assert_eq!(t.instances.len(), 1);
}

#[test]
fn not_ready_is_down_with_weight_zero() {
    let p = params();
    let mut t = Table::default();
    let mut down = inst("h1/b", 2, 0);
    down.ready = false;
    t.apply(&report("h1", 1, 0, 0.1, vec![inst("h1/a", 1, 0), down]), 0, &p);
    let list = t.publish(0, &p);
    assert_eq!(weight(&list, "queue", "h1/b"), Some((0, InstanceState::Down)));
}

/// An operator's weight scales what the load gives an instance; it gives none to one the load gives none.
#[test]
fn a_set_weight_gives_no_weight_to_an_instance_that_is_not_ready() {
    let p = params();
    let mut t = Table::default();
    let mut down = inst("h1/b", 2, 0);
    down.ready = false;
    t.apply(&report("h1", 1, 0, 0.1, vec![inst("h1/a", 1, 0), down]), 0, &p);
    for set in [WeightSet::Absolute(7), WeightSet::Percent(200)] {
        t.weights.insert("h1/b".into(), set);
        let list = t.publish(0, &p);
        assert_eq!(
            weight(&list, "queue", "h1/b"),
            Some((0, InstanceState::Down)),
            "{set:?}"
        );
    }
}

#[test]
fn slow_start_ramps_new_and_recovered_instances() {
    let p = params();
    let mut t = Table::default();
    t.apply(&report("h1", 1, 10_000, 0.0, vec![inst("h1/a", 1, 0)]), 0, &p);
    let (w0, s0) = weight(&t.publish(0, &p), "queue", "h1/a").unwrap();
    assert_eq!(s0, InstanceState::SlowStart);
    assert_eq!(w0, 1000, "starts at slow_start_min (0.1) of full weight");
    t.apply(&report("h1", 2, 12_000, 0.0, vec![inst("h1/a", 1, 0)]), 1, &p);
    let (w1, _) = weight(&t.publish(1, &p), "queue", "h1/a").unwrap();
    assert_eq!(w1, 5500, "half way: 0.1 + 0.9 * 0.5");
    t.apply(&report("h1", 3, 14_000, 0.0, vec![inst("h1/a", 1, 0)]), 2, &p);
    assert_eq!(
        weight(&t.publish(2, &p), "queue", "h1/a"),
        Some((10_000, InstanceState::Up))
    );
    // Unready, then ready again: ramps afresh.
    let mut off = inst("h1/a", 1, 0);
    off.ready = false;
    t.apply(&report("h1", 4, 14_500, 0.0, vec![off]), 3, &p);
    t.apply(&report("h1", 5, 15_000, 0.0, vec![inst("h1/a", 1, 0)]), 4, &p);
    assert_eq!(
        weight(&t.publish(4, &p), "queue", "h1/a"),
        Some((1000, InstanceState::SlowStart))
    );
    // A gap longer than the TTL (by the agent's clock) counts as a recovery too.
    t.apply(&report("h1", 6, 20_000, 0.0, vec![inst("h1/a", 1, 0)]), 5, &p);
    t.apply(&report("h1", 7, 30_000, 0.0, vec![inst("h1/a", 1, 0)]), 6, &p);
    assert_eq!(
        weight(&t.publish(6, &p), "queue", "h1/a").unwrap().1,
        InstanceState::SlowStart
    );
}

#[test]
fn loaded_instance_loses_weight_over_damped_steps() {
    let p = Params {
        slow_start: Duration::ZERO,
        ..params()
    };
    let mut t = Table::default();
    t.apply(&report("h1", 1, 0, 0.0, vec![inst("h1/a", 1, 0)]), 0, &p);
    let mut last = weight(&t.publish(0, &p), "queue", "h1/a").unwrap().0;
    assert_eq!(last, 10_000);
    for seq in 2..6 {
        t.apply(
            &report("h1", seq, seq * 100, 0.0, vec![inst("h1/a", 1, 90)]),
            seq,
            &p,
        );
        let w = weight(&t.publish(seq, &p), "queue", "h1/a").unwrap().0;
        assert!(w < last && last - w <= 2500, "{last} -> {w}");
        last = w;
    }
    assert_eq!(
        weight(&t.publish(5, &p), "cpu", "h1/a").unwrap().0,
        10_000,
        "cpu type unaffected"
    );
}

#[test]
fn drained_instance_is_listed_with_weight_zero() {
    let p = params();
    let mut t = Table::default();
    t.apply(
        &report("h1", 1, 0, 0.0, vec![inst("h1/a", 1, 0), inst("h1/b", 2, 0)]),
        0,
        &p,
    );
    let v0 = t.publish(0, &p)["queue"].version;
    t.drained.insert("h1/a".into());
    let list = t.publish(0, &p);
    assert_eq!(weight(&list, "queue", "h1/a"), Some((0, InstanceState::Drained)));
    assert_ne!(list["queue"].version, v0, "draining changes the version");
}

/// Withheld from every route (the proxy's fixed backends too): drained, or not ready by a fresh report. A
/// stale report says nothing either way.
#[test]
fn drained_and_not_ready_instances_are_withheld() {
    let p = params();
    let mut t = Table::default();
    let mut down = inst("h1/c", 3, 0);
    down.ready = false;
    t.apply(
        &report(
            "h1",
            1,
            0,
            0.0,
            vec![inst("h1/a", 1, 0), inst("h1/b", 2, 0), down],
        ),
        0,
        &p,
    );
    assert_eq!(t.withheld(0, &p), ["127.0.0.1:3".parse().unwrap()]);
    t.drained.insert("h1/a".into());
    let both: Vec<std::net::SocketAddr> =
        vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:3".parse().unwrap()];
    assert_eq!(t.withheld(0, &p), both);
    assert_eq!(
        t.withheld(2_001, &p),
        ["127.0.0.1:1".parse().unwrap()],
        "stale: only the drain holds"
    );
}

#[test]
fn replay_and_agent_bound() {
    let p = params();
    let mut t = Table::default();
    let r = report("h1", 5, 0, 0.0, vec![]);
    assert!(t.check_seq(&r, 2, 0, &p).is_ok());
    t.apply(&r, 0, &p);
    assert_eq!(t.check_seq(&r, 2, 0, &p).unwrap_err().reason(), "replay");
    assert_eq!(
        t.check_seq(&report("h1", 4, 0, 0.0, vec![]), 2, 0, &p)
            .unwrap_err()
            .reason(),
        "replay"
    );
    assert!(t.check_seq(&report("h1", 6, 0, 0.0, vec![]), 2, 0, &p).is_ok());
    t.apply(&report("h2", 1, 0, 0.0, vec![]), 0, &p);
    assert!(
        t.check_seq(&report("h3", 1, 0, 0.0, vec![]), 2, 10_001, &p)
            .is_err(),
        "third agent over the bound"
    );
    // Silent agents are forgotten after forget_after, which frees room for new ones.
    t.apply(&report("h1", 7, 0, 0.0, vec![]), 9_000, &p);
    t.expire(10_001, &p);
    assert_eq!(t.last_seq.len(), 1, "h2 (silent since 0) forgotten, h1 kept");
    assert!(
        t.check_seq(&report("h3", 1, 0, 0.0, vec![]), 2, 10_001, &p)
            .is_ok()
    );
}

/// A second process reporting under an agent's id is refused while the first goes on reporting (it would
/// drop the first one's instances); a restart (the first goes silent) takes over after two of its report
/// intervals, while its instances are still fresh.
#[test]
fn a_second_agent_under_one_id_is_refused_and_a_restart_takes_over() {
    let p = params();
    let mut t = Table::default();
    let from = |seq: u64, boot: u64, ts: u64, instances: Vec<InstanceLoad>| LoadReport {
        boot,
        ..report("h", seq, ts, 0.1, instances)
    };
    let first = |seq: u64, ts: u64| from(seq, 100, ts, vec![inst("h/a", 1, 0), inst("h/b", 2, 0)]);
    for (seq, at) in [(100, 0), (101, 500), (102, 1_000)] {
        t.check_seq(&first(seq, at), 8, at, &p).unwrap();
        t.apply(&first(seq, at), at, &p);
    }
    // A second agent, started later (its sequence is far above), while the first reports every 500 ms.
    let second = from(9_000, 9_000, 1_200, vec![inst("h/x", 9, 0)]);
    let err = t.check_seq(&second, 8, 1_200, &p).unwrap_err();
    assert_eq!(err.reason(), "conflict", "{err}");
    assert!(
        err.to_string().contains("two agents share this agent_id"),
        "{err}"
    );
    assert_eq!(t.instances.len(), 2, "the first one's instances stand");
    // The first goes on; then it stops (a restart): after two of its intervals its successor takes over.
    t.check_seq(&first(103, 1_500), 8, 1_500, &p).unwrap();
    t.apply(&first(103, 1_500), 1_500, &p);
    assert!(
        t.check_seq(&second, 8, 2_400, &p).is_err(),
        "silent 900 ms: not yet"
    );
    let next = from(9_001, 9_000, 2_500, vec![inst("h/a", 1, 0), inst("h/b", 2, 0)]);
    t.check_seq(&next, 8, 2_500, &p).unwrap();
    t.apply(&next, 2_500, &p);
    // The old process, back, is the one refused now; reports without a boot keep the old rule.
    assert_eq!(
        t.check_seq(&first(104, 2_600), 8, 2_600, &p)
            .unwrap_err()
            .reason(),
        "conflict"
    );
    assert!(t.check_seq(&from(9_002, 0, 2_700, vec![]), 8, 2_700, &p).is_ok());
}

/// An agent's early report on a jump in load, 50 ms after the one before, does not make its interval 50 ms:
/// taken so, a second agent under its id that reported 150 ms later counted as its restart and took over.
#[test]
fn an_early_report_does_not_open_the_id_to_a_second_agent() {
    let p = params();
    let mut t = Table::default();
    let first = |seq: u64, ts: u64| LoadReport {
        boot: 100,
        ..report("h", seq, ts, 0.1, vec![inst("h/a", 1, 0)])
    };
    for (seq, at) in [(100, 0), (101, 500), (102, 1_000), (103, 1_050)] {
        t.check_seq(&first(seq, at), 8, at, &p).unwrap();
        t.apply(&first(seq, at), at, &p);
    }
    let second = LoadReport {
        boot: 9_000,
        ..report("h", 9_000, 1_200, 0.1, vec![inst("h/x", 9, 0)])
    };
    let err = t.check_seq(&second, 8, 1_200, &p).unwrap_err();
    assert_eq!(err.reason(), "conflict", "{err}");
    // Silent for two of its intervals, it has restarted.
    assert!(t.check_seq(&second, 8, 1_050 + 1_000, &p).is_ok());
}

/// A report of an earlier process, played again once its successor is silent, is a replay: its sequence
/// number is below the last accepted. It was taken as a restart, with the old load, and the real agent's
/// next report was then refused as a conflict.
#[test]
fn an_earlier_process_report_played_again_is_a_replay() {
    let p = params();
    let mut t = Table::default();
    let from = |seq: u64, boot: u64, ts: u64| LoadReport {
        boot,
        ..report("h", seq, ts, 0.1, vec![inst("h/a", 1, 0)])
    };
    let captured = from(101, 100, 500);
    for r in [from(100, 100, 0), captured.clone(), from(5_000, 5_000, 1_600)] {
        t.check_seq(&r, 8, r.timestamp_ms, &p).unwrap();
        t.apply(&r, r.timestamp_ms, &p);
    }
    // The restarted agent stops reporting for a while (it is stopped, or a link is down).
    let err = t.check_seq(&captured, 8, 4_000, &p).unwrap_err();
    assert_eq!(err.reason(), "replay", "{err}");
    // A restart after that still takes over.
    t.check_seq(&from(9_000, 9_000, 4_000), 8, 4_000, &p).unwrap();
}

/// An instance id two agents report stays with the first while its reports are fresh.
#[test]
fn an_instance_id_two_agents_claim_stays_with_the_first() {
    let p = params();
    let mut t = Table::default();
    t.apply(&report("h1", 1, 0, 0.1, vec![inst("x/app", 1, 0)]), 0, &p);
    t.apply(&report("h2", 1, 0, 0.1, vec![inst("x/app", 2, 0)]), 100, &p);
    let owner = &t.instances[&Arc::<str>::from("x/app")];
    assert_eq!((owner.agent.as_str(), owner.addr.port()), ("h1", 1));
    // Once the first is stale, the other's claim is taken.
    t.apply(&report("h2", 2, 3_000, 0.1, vec![inst("x/app", 2, 0)]), 3_000, &p);
    assert_eq!(t.instances[&Arc::<str>::from("x/app")].addr.port(), 2);
}

#[test]
fn an_agent_dropping_an_instance_removes_it() {
    let p = params();
    let mut t = Table::default();
    t.apply(
        &report("h1", 1, 0, 0.0, vec![inst("h1/a", 1, 0), inst("h1/b", 2, 0)]),
        0,
        &p,
    );
    t.apply(&report("h2", 1, 0, 0.0, vec![inst("h2/a", 3, 0)]), 0, &p);
    t.apply(&report("h1", 2, 1, 0.0, vec![inst("h1/a", 1, 0)]), 1, &p);
    assert_eq!(t.instances.len(), 2);
    assert!(t.instances.contains_key("h2/a"), "another agent's instance stays");
}

/// An instance that reports `ms` of service time for the "cpu" type.
fn timed(id: &str, port: u16, ms: f64) -> InstanceLoad {
    let mut i = inst(id, port, 0);
    i.types.insert(
        "cpu".into(),
        xcluster_proto::stats::TypeStats {
            rate: 100.0,
            service_ms: ms,
            error_rate: 0.0,
        },
    );
    i
}

#[test]
fn an_instance_slower_at_a_type_loses_weight_for_it_and_regains_it_when_fast_again() {
    let p = Params {
        slow_start: Duration::ZERO,
        ..params()
    };
    let mut t = Table::default();
    let three = |slow_ms: f64| {
        vec![
            timed("h1/a", 1, slow_ms),
            timed("h1/b", 2, 2.0),
            timed("h1/c", 3, 2.2),
        ]
    };
    for seq in 1..=8 {
        t.apply(&report("h1", seq, seq * 1000, 0.0, three(8.0)), seq, &p);
    }
    let table = t.publish(8, &p);
    let slow = weight(&table, "cpu", "h1/a").unwrap().0;
    // Three instances on an 8-core host: a third of the scale each, before any service-time term.
    let full = 3_333;
    let fast = weight(&table, "cpu", "h1/b").unwrap().0;
    assert_eq!(
        fast, full,
        "within the tolerance of the reference: its whole weight"
    );
    assert_eq!(
        weight(&table, "cpu", "h1/c").unwrap().0,
        full,
        "2.2 ms is within 1.25x of 2.0"
    );
    // (1.25 * 2.2 + 0.5) / 8 of the weight: the reference is the lower median, 2.2 ms.
    assert!(
        (1_340..=1_370).contains(&slow),
        "4x slower keeps about 40%: {slow}"
    );
    assert_eq!(
        weight(&table, "queue", "h1/a").unwrap().0,
        full,
        "other types unaffected"
    );

    // Fast again: back to its whole weight within 4 s of reports a second apart, never overshooting.
    let mut last = slow;
    for seq in 9..=12 {
        t.apply(&report("h1", seq, seq * 1000, 0.0, three(2.0)), seq, &p);
        let w = weight(&t.publish(seq, &p), "cpu", "h1/a").unwrap().0;
        assert!(w >= last && w <= full, "{last} -> {w}");
        last = w;
    }
    assert_eq!(last, full);
}

#[test]
fn service_time_needs_two_instances_to_compare_and_can_be_turned_off() {
    let p = Params {
        slow_start: Duration::ZERO,
        ..params()
    };
    let mut t = Table::default();
    t.apply(&report("h1", 1, 100, 0.0, vec![timed("h1/a", 1, 50.0)]), 1, &p);
    assert_eq!(
        weight(&t.publish(1, &p), "cpu", "h1/a").unwrap().0,
        10_000,
        "alone: nothing to compare"
    );

    let off = Params {
        service_tolerance: 0.0,
        ..p.clone()
    };
    let two = vec![timed("h1/a", 1, 50.0), timed("h1/b", 2, 1.0)];
    t.apply(&report("h1", 2, 200, 0.0, two), 2, &p);
    let unscaled = weight(&t.publish(2, &off), "queue", "h1/a").unwrap().0;
    assert_eq!(weight(&t.publish(2, &off), "cpu", "h1/a").unwrap().0, unscaled);
    assert!(weight(&t.publish(2, &p), "cpu", "h1/a").unwrap().0 < unscaled / 2);

    // A figure no request has refreshed fades back toward the reference.
    let mut t = Table::default();
    let b = || timed("h1/b", 2, 1.0);
    t.apply(
        &report("h1", 1, 100, 0.0, vec![timed("h1/a", 1, 20.0), b()]),
        1,
        &p,
    );
    let full = weight(&t.publish(1, &p), "queue", "h1/a").unwrap().0;
    let cut = weight(&t.publish(1, &p), "cpu", "h1/a").unwrap().0;
    assert_eq!(cut, (f64::from(full) * 1.75 / 20.0).round() as u32);
    let mut quiet = inst("h1/a", 1, 0);
    quiet.types.clear();
    t.apply(&report("h1", 2, 1_600, 0.0, vec![quiet, b()]), 2, &p);
    let later = weight(&t.publish(2, &p), "cpu", "h1/a").unwrap().0;
    // (1.25 · 1 + 0.5) / (1 + 19 / e) after one time constant without a request.
    let expected = f64::from(full) * 1.75 / (1.0 + 19.0 / std::f64::consts::E);
    assert_eq!(later, expected.round() as u32, "{cut} -> {later} of {full}");
}

#[test]
fn a_forgotten_instance_leaves_the_metrics() {
    use super::super::snapshot::{Snapshot, instance_status, write_metrics};
    let p = params();
    let mut t = Table::default();
    t.apply(&report("h1", 1, 0, 0.1, vec![inst("h1/a", 1, 0)]), 0, &p);
    t.apply(&report("h2", 1, 0, 0.1, vec![inst("h2/a", 2, 0)]), 0, &p);
    let text = |t: &Table, now: u64| {
        let snap = Snapshot::build(t, now, &p, None);
        let mut out = xcluster_runtime::telemetry::Exposition::default();
        write_metrics(&instance_status(t, &snap, now), &snap, &mut out);
        out.text().to_string()
    };
    let before = text(&t, 0);
    assert!(before.contains("xcluster_lb_instances 2\n"), "{before}");
    assert!(
        before.contains("xcluster_lb_instance_report_age_seconds{instance_id=\"h2/a\"} 0\n"),
        "{before}"
    );
    assert!(
        before.contains("xcluster_lb_instance_weight{instance_id=\"h2/a\",type=\"queue\"}"),
        "{before}"
    );
    t.apply(
        &report("h1", 2, 10_001, 0.1, vec![inst("h1/a", 1, 0)]),
        10_001,
        &p,
    );
    assert!(t.expire(10_001, &p));
    let after = text(&t, 10_001);
    assert!(after.contains("xcluster_lb_instances 1\n"), "{after}");
    assert!(after.contains("instance_id=\"h1/a\""), "{after}");
    assert!(!after.contains("h2/a"), "{after}");
}

#[test]
fn clients_are_shown_a_new_list_only_when_it_changed_enough() {
    use super::super::snapshot::Snapshot;
    let p = Params {
        slow_start: Duration::ZERO,
        ..params()
    };
    let mut t = Table::default();
    let load = |a: u32, b_ready: bool| {
        let mut b = inst("h1/b", 2, 10);
        b.ready = b_ready;
        vec![inst("h1/a", 1, a), b]
    };
    let weight_of = |s: &Snapshot, id: &str| {
        let rows = &s.types["queue"].list.rows;
        rows.iter().find(|r| &*r.id == id).map(|r| r.weight)
    };
    let settings = super::super::Settings {
        params: p.clone(),
        keys: Default::default(),
        skew_ms: 0,
        max_agents: 1,
        max_instances: 16,
        balancers: Vec::new(),
        admin_token: String::new(),
        max_watches: 64,
        proxy_backends: Default::default(),
    };
    let shown_weight = |s: &Snapshot, id: &str| {
        let list = s.server_list("queue", 0, &settings).unwrap();
        list.servers.iter().find(|e| e.id == id).map(|e| e.weight)
    };
    t.apply(&report("h1", 1, 0, 0.1, load(10, true)), 0, &p);
    let s0 = Snapshot::build(&t, 0, &p, None);
    let v0 = s0.served_version("queue").unwrap();

    // One more request queued moves a's weight a little: picks here follow it, clients are not told.
    t.apply(&report("h1", 2, 100, 0.1, load(11, true)), 100, &p);
    let s1 = Snapshot::build(&t, 100, &p, Some(&s0));
    assert_ne!(
        weight_of(&s1, "h1/a"),
        weight_of(&s0, "h1/a"),
        "the load did not move a's weight"
    );
    assert_eq!(s1.served_version("queue").unwrap(), v0);
    assert_eq!(s1.version, s0.version);
    assert_eq!(shown_weight(&s1, "h1/a"), weight_of(&s0, "h1/a"));
    // With publish_min_change 0, every move is shown.
    let every = Params {
        publish_min_change: 0.0,
        ..p.clone()
    };
    let s1_every = Snapshot::build(&t, 100, &every, Some(&s0));
    assert_ne!(s1_every.served_version("queue").unwrap(), v0);
    assert_eq!(shown_weight(&s1_every, "h1/a"), weight_of(&s1, "h1/a"));

    // A large move is shown, with the list's own version.
    t.apply(&report("h1", 3, 200, 0.1, load(90, true)), 200, &p);
    let s2 = Snapshot::build(&t, 200, &p, Some(&s1));
    let v2 = s2.served_version("queue").unwrap();
    assert_ne!(
        v2,
        v0,
        "a: {:?} -> {:?}",
        weight_of(&s1, "h1/a"),
        weight_of(&s2, "h1/a")
    );
    assert_eq!(v2, s2.types["queue"].list.version);
    assert_eq!(shown_weight(&s2, "h1/a"), weight_of(&s2, "h1/a"));

    // So is a change of state, however small the weights' moves.
    t.apply(&report("h1", 4, 300, 0.1, load(90, false)), 300, &p);
    let s3 = Snapshot::build(&t, 300, &p, Some(&s2));
    assert_ne!(s3.served_version("queue").unwrap(), v2);
    assert_eq!(shown_weight(&s3, "h1/b"), Some(0));
}

/// The table holds at most `max_instances` over every agent: of what a report would add past it, only what
/// fits is taken (the first it lists), while the instances the table holds are updated all the same. A
/// report that would overfill it was refused whole: one more instance on a host took the whole host out of
/// the lists, for as long as the table stayed full.
#[test]
fn a_report_that_would_overfill_the_table_adds_only_what_fits() {
    let p = params();
    let mut t = Table::default();
    let two = |agent: &str, base: u16| {
        vec![
            inst(&format!("{agent}/a"), base, 1),
            inst(&format!("{agent}/b"), base + 1, 1),
        ]
    };
    let first = report("h1", 1, 0, 0.1, two("h1", 1));
    assert_eq!(t.room(&first, 3), Room { new: 2, fits: 2 });
    t.apply_within(&first, 0, &p, 2);
    let second = report("h2", 1, 0, 0.1, two("h2", 10));
    let room = t.room(&second, 3);
    assert_eq!(room, Room { new: 2, fits: 1 });
    t.apply_within(&second, 0, &p, room.fits);
    let ids = |t: &Table| t.instances.keys().map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&t), ["h1/a", "h1/b", "h2/a"], "the first it lists");
    // A full table: h1 reports a third instance; the two it has are updated, the third left out.
    let three = [two("h1", 1), vec![inst("h1/c", 3, 1)]].concat();
    let grown = report("h1", 2, 500, 0.1, three);
    let room = t.room(&grown, 3);
    assert_eq!(room, Room { new: 1, fits: 0 });
    t.apply_within(&grown, 500, &p, room.fits);
    assert_eq!(ids(&t), ["h1/a", "h1/b", "h2/a"]);
    assert_eq!(t.instances["h1/a"].received_ms, 500, "updated all the same");
    // h1's instances renamed (a deploy) replace its old ones, which it no longer lists.
    let renamed = report("h1", 3, 600, 0.1, vec![inst("h1/c", 3, 1), inst("h1/d", 4, 1)]);
    assert_eq!(t.room(&renamed, 3), Room { new: 2, fits: 2 });
    t.apply_within(&renamed, 600, &p, 2);
    assert_eq!(ids(&t), ["h1/c", "h1/d", "h2/a"]);
}

/// Only the types the balancer weighs keep a service time: a report of 32 new names each time, under a
/// clock that does not move, piled every name up before.
#[test]
fn reported_types_the_balancer_does_not_weigh_keep_no_service_time() {
    let p = params();
    let mut t = Table::default();
    for seq in 1..=50u64 {
        let mut i = timed("h1/a", 1, 2.0);
        for n in 0..31 {
            let stats = xcluster_proto::stats::TypeStats {
                rate: 1.0,
                service_ms: 1.0,
                error_rate: 0.0,
            };
            i.types.insert(format!("t{seq}-{n}"), stats);
        }
        t.apply(&report("h1", seq, 1_000, 0.0, vec![i]), seq, &p);
    }
    let kept: Vec<&String> = t.instances["h1/a"].service.keys().collect();
    assert_eq!(kept, ["cpu"]);
}
