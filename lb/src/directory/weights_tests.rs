//! Unit tests of the weight formula.
#![allow(clippy::unwrap_used)]

use super::*;

fn cpu_type() -> TypeProfile {
    TypeProfile {
        cpu: 1.0,
        mem: 0.0,
        queue: 0.0,
        cost: 4.0,
    }
}
fn queue_type() -> TypeProfile {
    TypeProfile {
        cpu: 0.0,
        mem: 0.0,
        queue: 1.0,
        cost: 1.0,
    }
}
fn load(cpu: f64, mem: f64, queue: f64) -> Load {
    Load {
        cpu,
        mem,
        queue,
        cores_per_instance: 8.0,
        ..Default::default()
    }
}

#[test]
fn weight_falls_as_the_resources_a_type_uses_fill_up() {
    let p = Params::default();
    let mixed = TypeProfile {
        cpu: 0.4,
        mem: 0.2,
        queue: 0.4,
        cost: 1.0,
    };
    let mut last = u32::MAX;
    for step in 0..=10 {
        let u = f64::from(step) / 10.0;
        let w = target("t", &mixed, &load(u, u, u), &p);
        assert!(
            w < last || (w == 1 && last == 1),
            "not falling at {u}: {w} after {last}"
        );
        last = w;
    }
    assert_eq!(target("t", &mixed, &load(0.0, 0.0, 0.0), &p), MAX_WEIGHT);
    assert_eq!(
        target("t", &mixed, &load(1.0, 1.0, 1.0), &p),
        1,
        "saturated keeps a floor of 1"
    );
    // Each resource alone lowers the weight of a type that uses it.
    let idle = target("t", &mixed, &load(0.0, 0.0, 0.0), &p);
    assert!(target("t", &mixed, &load(0.5, 0.0, 0.0), &p) < idle);
    assert!(target("t", &mixed, &load(0.0, 0.5, 0.0), &p) < idle);
    assert!(target("t", &mixed, &load(0.0, 0.0, 0.5), &p) < idle);
}

#[test]
fn cpu_heavy_type_leaves_a_cpu_loaded_host_while_a_queue_bound_type_does_not() {
    let p = Params::default();
    let busy_cpu = load(0.9, 0.3, 0.2);
    let idle_cpu = load(0.1, 0.3, 0.2);
    let (c_busy, c_idle) = (
        target("c", &cpu_type(), &busy_cpu, &p),
        target("c", &cpu_type(), &idle_cpu, &p),
    );
    let (q_busy, q_idle) = (
        target("q", &queue_type(), &busy_cpu, &p),
        target("q", &queue_type(), &idle_cpu, &p),
    );
    assert!(
        c_busy * 5 < c_idle,
        "cpu type should avoid the cpu-loaded host: {c_busy} vs {c_idle}"
    );
    assert_eq!(q_busy, q_idle, "a queue-bound type does not care about cpu");
}

#[test]
fn errors_count_as_load() {
    let p = Params::default();
    let t = queue_type();
    let clean = load(0.2, 0.2, 0.2);
    let mut failing = clean.clone();
    failing.error_rate = 0.2;
    assert!(target("q", &t, &failing, &p) < target("q", &t, &clean, &p));
    // A per-type error rate wins over the instance-wide one for that type only.
    let mut typed = clean.clone();
    typed.type_errors.insert("q".into(), 0.3);
    assert!(target("q", &t, &typed, &p) < target("q", &t, &clean, &p));
    assert_eq!(target("other", &t, &typed, &p), target("other", &t, &clean, &p));
    // A fast-failing idle instance is not a sinkhole: all errors, weight at the floor.
    let mut sink = load(0.0, 0.0, 0.0);
    sink.error_rate = 1.0;
    assert_eq!(target("q", &t, &sink, &p), 1);
}

#[test]
fn smaller_share_of_a_host_means_smaller_weight() {
    let p = Params::default();
    let mut small = load(0.2, 0.2, 0.2);
    small.cores_per_instance = 2.0;
    let big = load(0.2, 0.2, 0.2);
    let (ws, wb) = (
        target("q", &queue_type(), &small, &p),
        target("q", &queue_type(), &big, &p),
    );
    assert_eq!(ws * 4, wb, "2 cores is a quarter of the 8-core scale");
}

#[test]
fn damping_bounds_each_step_and_converges() {
    let p = Params::default();
    assert_eq!(damp(None, 7000, &p), 7000, "first report sets the weight");
    let bound = (p.max_step * f64::from(MAX_WEIGHT)) as u32;
    let mut w = MAX_WEIGHT;
    let mut steps = 0;
    while w != 1 {
        let next = damp(Some(w), 1, &p);
        assert!(w - next <= bound, "step {} above {bound}", w - next);
        assert!(next < w);
        w = next;
        steps += 1;
        assert!(steps < 100, "does not converge");
    }
    // Upward too, and an unchanged target is a fixed point.
    let up = damp(Some(1000), 9000, &p);
    assert_eq!(up, 1000 + bound);
    assert_eq!(damp(Some(4321), 4321, &p), 4321);
    // Small differences still close exactly (no stuck off-by-one).
    assert_eq!(damp(Some(100), 101, &p), 101);
    assert_eq!(damp(Some(101), 100, &p), 100);
}

#[test]
fn damping_does_not_oscillate_on_an_alternating_target() {
    // A target flapping between two values must give a published weight that stays between them and
    // moves less than the target does.
    let p = Params::default();
    let mut w = damp(None, 5000, &p);
    let mut min = u32::MAX;
    let mut max = 0;
    for i in 0..50 {
        let t = if i % 2 == 0 { 3000 } else { 7000 };
        w = damp(Some(w), t, &p);
        if i > 10 {
            min = min.min(w);
            max = max.max(w);
        }
    }
    assert!((3000..=7000).contains(&min) && (3000..=7000).contains(&max));
    assert!(max - min < 4000 / 2 + 1, "swing {} not damped", max - min);
}

#[test]
fn slow_start_ramps_linearly_then_ends() {
    let p = Params {
        slow_start: Duration::from_secs(10),
        slow_start_min: 0.1,
        ..Default::default()
    };
    assert_eq!(slow_start(Duration::ZERO, &p), Some(0.1));
    let half = slow_start(Duration::from_secs(5), &p).unwrap();
    assert!((half - 0.55).abs() < 1e-9, "{half}");
    assert_eq!(slow_start(Duration::from_secs(10), &p), None);
    assert_eq!(ramp(8000, Some(0.1)), 800);
    assert_eq!(ramp(8000, None), 8000);
    assert_eq!(ramp(3, Some(0.1)), 1, "never below the floor");
    let off = Params {
        slow_start: Duration::ZERO,
        ..p
    };
    assert_eq!(slow_start(Duration::ZERO, &off), None);
}

#[test]
fn panic_threshold() {
    assert!(!panic(0, 0, 0.5), "nothing known is not a panic");
    assert!(panic(0, 4, 0.5));
    assert!(panic(1, 4, 0.5));
    assert!(!panic(2, 4, 0.5), "exactly at the threshold is fine");
    assert!(!panic(0, 4, 0.0), "threshold 0 disables it");
}

#[test]
fn fnv_is_stable() {
    assert_eq!(fnv1a(b"", 0), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a", 0), 0xaf63_dc4c_8601_ec8c);
    assert_ne!(fnv1a(b"ab", 0), fnv1a(b"ba", 0));
}

/// Randomised properties over many seeded inputs (reproducible: fixed seed).
#[test]
fn properties_hold_for_random_inputs() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let p = Params::default();
    for _ in 0..5_000 {
        let t = TypeProfile {
            cpu: rng.random(),
            mem: rng.random(),
            queue: rng.random::<f64>() + 0.01,
            cost: 1.0,
        };
        let l = Load {
            cpu: rng.random(),
            mem: rng.random(),
            queue: rng.random(),
            error_rate: rng.random::<f64>() * 0.2,
            cores_per_instance: rng.random_range(0.1..32.0),
            ..Default::default()
        };
        let w = target("t", &t, &l, &p);
        assert!((1..=MAX_WEIGHT).contains(&w));
        // More of any resource never raises the weight.
        for bump in 0..3 {
            let mut more = l.clone();
            match bump {
                0 => more.cpu = (more.cpu + 0.1).min(1.0),
                1 => more.mem = (more.mem + 0.1).min(1.0),
                _ => more.queue = (more.queue + 0.1).min(1.0),
            }
            assert!(target("t", &t, &more, &p) <= w, "{t:?} {l:?} bump {bump}");
        }
        // Damping moves toward the target, never past it, within the bound.
        let prev = rng.random_range(0..=MAX_WEIGHT);
        let next = damp(Some(prev), w, &p);
        let bound = (p.max_step * f64::from(MAX_WEIGHT)) as u32;
        assert!(next.abs_diff(prev) <= bound);
        assert!(next.abs_diff(w) <= prev.abs_diff(w));
        assert!((prev.min(w)..=prev.max(w)).contains(&next));
    }
}

#[test]
fn service_reference_is_the_lower_median_and_speed_is_the_bounded_ratio() {
    assert_eq!(reference_service(vec![]), None);
    assert_eq!(reference_service(vec![3.0]), None);
    assert_eq!(reference_service(vec![8.0, 2.0]), Some(2.0));
    assert_eq!(reference_service(vec![8.0, 2.0, 2.5]), Some(2.5));
    assert_eq!(
        reference_service(vec![8.0, 9.0, 2.0, 2.5]),
        Some(2.5),
        "a slow half does not drag it up"
    );

    let p = Params::default();
    assert_eq!(speed(Some(3.0), Some(2.0), &p), 1.0, "within tolerance and slack");
    assert!((speed(Some(8.0), Some(2.0), &p) - 3.0 / 8.0).abs() < 1e-9);
    assert_eq!(speed(Some(1e9), Some(1.0), &p), 0.05, "never below the floor");
    assert_eq!(speed(None, Some(1.0), &p), 1.0, "unmeasured: no change");
    assert_eq!(speed(Some(5.0), None, &p), 1.0);
    // Sub-millisecond noise does not count.
    assert_eq!(speed(Some(0.6), Some(0.2), &p), 1.0);
}

/// One type's window: `rate` requests a second of `ms` each.
fn window(rate: f64, ms: f64) -> BTreeMap<String, TypeStats> {
    let w = TypeStats {
        rate,
        service_ms: ms,
        error_rate: 0.0,
    };
    BTreeMap::from([("t".to_string(), w)])
}

/// The figure after `secs` seconds of reports 250 ms apart, each carrying `w`.
fn reports(
    from: &BTreeMap<String, Served>,
    w: &BTreeMap<String, TypeStats>,
    secs: u32,
) -> BTreeMap<String, Served> {
    (0..secs * 4).fold(from.clone(), |s, _| smooth_service(Some(&s), w, 250))
}

#[test]
fn service_times_are_smoothed_by_requests_clipped_and_forgotten_without_requests() {
    let ms = |m: &BTreeMap<String, Served>| m["t"].ms;
    let first = smooth_service(None, &window(100.0, 8.0), 0);
    assert_eq!(
        (ms(&first), first["t"].samples),
        (8.0, 100.0),
        "a first window: its second of requests"
    );
    let same = smooth_service(Some(&first), &window(100.0, 2.0), 0);
    assert_eq!(ms(&same), 8.0, "no time passed: no new requests");
    // At a steady rate, the figure moves 1 − e^(−Δt/1.5 s) of the way per report, however often they come:
    // the requests it stands for settle at rate × 1.5 s.
    let steady = reports(&first, &window(100.0, 8.0), 10);
    assert!((steady["t"].samples - 100.0 * 1.5).abs() < 20.0, "{steady:?}");
    let four = reports(&steady, &window(100.0, 4.0), 1);
    let once = smooth_service(Some(&steady), &window(100.0, 4.0), 1_000);
    assert!((ms(&four) - ms(&once)).abs() < 0.3, "{four:?} {once:?}");
    assert!(
        ms(&once) > 5.0 && ms(&once) < 6.5,
        "about half way in a second: {once:?}"
    );
    // A stalled window counts for at most 2x the figure, so one second of it stays near the tolerance.
    let spike = smooth_service(Some(&steady), &window(100.0, 300.0), 1_000_000);
    assert!((ms(&spike) - 16.0).abs() < 1e-6, "{spike:?}");
    let p = Params::default();
    let stalled = smooth_service(Some(&steady), &window(100.0, 300.0), 1_000);
    assert!(
        speed(Some(ms(&stalled)), Some(8.0), &p) > 0.8,
        "one stalled second: {stalled:?}"
    );
    // Without requests the figure is kept (its requests fading) for 10 s, then forgotten.
    let mut quiet = steady.clone();
    for _ in 0..10 {
        quiet = smooth_service(Some(&quiet), &BTreeMap::new(), 1_000);
        assert_eq!(ms(&quiet), ms(&steady));
    }
    assert!(quiet["t"].samples < 0.01 * steady["t"].samples, "{quiet:?}");
    quiet = smooth_service(Some(&quiet), &BTreeMap::new(), 1_000);
    assert!(quiet.is_empty());
}

#[test]
fn an_instance_that_gets_few_requests_shows_a_recovery_as_fast_as_a_busy_one() {
    // Slow (12 ms) for a while: one instance with a trickle of 2 requests a second (as a slow one gets once
    // its weight is cut), one with 200.
    let p = Params::default();
    for rate in [2.0, 200.0] {
        let slow = reports(
            &smooth_service(None, &window(rate, 12.0), 0),
            &window(rate, 12.0),
            10,
        );
        assert!((ms_of(&slow) - 12.0).abs() < 1e-9);
        // Fast again (3 ms against a 3 ms reference): within three seconds of reports it is back within the
        // tolerance, and in one past half its weight, whatever its rate.
        let back = reports(&slow, &window(rate, 3.0), 3);
        assert_eq!(
            speed(Some(ms_of(&back)), Some(3.0), &p),
            1.0,
            "rate {rate}: {back:?}"
        );
        let one = reports(&slow, &window(rate, 3.0), 1);
        assert!(
            speed(Some(ms_of(&one)), Some(3.0), &p) > 0.5,
            "rate {rate}: {one:?}"
        );
    }
    // And a thin trickle is not held at its old figure: a window of one request still counts.
    let slow = reports(
        &smooth_service(None, &window(1.0, 12.0), 0),
        &window(1.0, 12.0),
        10,
    );
    let moved = reports(&slow, &window(1.0, 3.0), 1);
    assert!(ms_of(&moved) < 8.0, "{moved:?}");
}

fn ms_of(m: &BTreeMap<String, Served>) -> f64 {
    m["t"].ms
}

#[test]
fn a_figure_without_new_requests_fades_toward_the_reference() {
    let p = Params::default();
    let served = |ms: f64, unsampled_ms: u64| Served {
        ms,
        samples: 1.0,
        unsampled_ms,
    };
    assert_eq!(
        served(12.0, 0).credible_ms(Some(3.0)),
        12.0,
        "refreshed: taken as it is"
    );
    let one_tau = served(12.0, 1_500).credible_ms(Some(3.0));
    assert!(
        (one_tau - (3.0 + 9.0 / std::f64::consts::E)).abs() < 1e-9,
        "{one_tau}"
    );
    assert_eq!(
        served(2.0, 9_000).credible_ms(Some(3.0)),
        2.0,
        "faster is taken as it is"
    );
    assert_eq!(served(12.0, 9_000).credible_ms(None), 12.0);
    // One slow request on a quiet type cuts the weight; seconds without another give it back.
    let one = smooth_service(None, &window(1.0, 50.0), 0);
    let cut = speed(Some(one["t"].credible_ms(Some(1.0))), Some(1.0), &p);
    assert!(cut < 0.1, "{cut}");
    let later = (0..6).fold(one, |s, _| smooth_service(Some(&s), &BTreeMap::new(), 1_000));
    let back = speed(Some(later["t"].credible_ms(Some(1.0))), Some(1.0), &p);
    assert!(back > 0.5, "{back} {later:?}");
    // A trickle keeps it: one request every second, each as slow.
    let trickle = (0..6).fold(smooth_service(None, &window(1.0, 50.0), 0), |s, _| {
        smooth_service(Some(&s), &window(1.0, 50.0), 1_000)
    });
    assert_eq!(trickle["t"].credible_ms(Some(1.0)), 50.0);
}

/// An instance that reports no capacity is idle only while it holds nothing: with a backlog it is judged
/// full, not handed an idle instance's share.
#[test]
fn unknown_capacity_with_a_backlog_reads_as_full() {
    let host = xcluster_proto::report::HostLoad {
        cpu: 0.1,
        mem: 0.1,
        load1: 0.0,
        cores: 8,
    };
    let inst = |in_flight: u32, queued: u32, capacity: u32| xcluster_proto::report::InstanceLoad {
        in_flight,
        queued,
        capacity,
        ..Default::default()
    };
    assert_eq!(Load::from_report(&host, &inst(0, 0, 0), 1).queue, 0.0);
    assert_eq!(
        Load::from_report(&host, &inst(u32::MAX, u32::MAX, 0), 1).queue,
        1.0
    );
    assert_eq!(Load::from_report(&host, &inst(5, 5, 40), 1).queue, 0.25);
}
