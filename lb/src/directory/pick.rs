//! Randomised picks: weighted power-of-two-choices over one type's published list, using the balancer's
//! own predicted load between reports. Two candidates are drawn in proportion to their weights and the one
//! with the lower predicted load *per unit of weight* wins; the winner's predicted load grows by the type's
//! cost. Drawing by weight keeps each instance's share at its weight's share; comparing load per weight
//! corrects the random drift, so a burst of picks between two reports spreads evenly instead of herding.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use rand::Rng;

use super::table::{Row, TypeList};

/// A type's list prepared for picking: cumulative weights for O(log n) weighted draws.
#[derive(Debug, Clone)]
pub struct PickView {
    pub list: TypeList,
    cumulative: Vec<u64>,
    total: u64,
    cost_milli: u64,
}

impl PickView {
    pub fn new(list: TypeList, cost_milli: u64) -> Self {
        let mut total = 0u64;
        let cumulative = list
            .rows
            .iter()
            .map(|r| {
                total += u64::from(r.weight);
                total
            })
            .collect();
        Self {
            list,
            cumulative,
            total,
            cost_milli,
        }
    }

    /// Draws one row by weight (`None` if every weight is 0).
    fn draw(&self, rng: &mut impl Rng) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let r = rng.random_range(0..self.total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }

    /// Picks one instance, avoiding `exclude`; records the pick in the predicted load.
    /// Whether a pick would find an instance: one row with weight. Unlike a pick, it adds no predicted load.
    pub fn can_pick(&self) -> bool {
        self.list.rows.iter().any(|r| r.weight > 0)
    }

    pub fn pick(&self, exclude: &[SocketAddr], rng: &mut impl Rng) -> Option<&Row> {
        let rows = &self.list.rows;
        let ok = |i: usize| rows[i].weight > 0 && !exclude.contains(&rows[i].addr);
        let mut draw = || -> Option<usize> {
            // A few rejection draws are cheap and leave the distribution exact; if the excluded set holds
            // most of the weight, fall back to a draw over the allowed rows only.
            for _ in 0..16 {
                let i = self.draw(rng)?;
                if ok(i) {
                    return Some(i);
                }
            }
            let allowed: Vec<usize> = (0..rows.len()).filter(|&i| ok(i)).collect();
            let total: u64 = allowed.iter().map(|&i| u64::from(rows[i].weight)).sum();
            if total == 0 {
                return None;
            }
            let mut r = rng.random_range(0..total);
            for i in allowed {
                let w = u64::from(rows[i].weight);
                if r < w {
                    return Some(i);
                }
                r -= w;
            }
            None
        };
        let a = draw()?;
        let b = draw().unwrap_or(a);
        let chosen = if a == b || less_loaded(&rows[a], &rows[b]) {
            a
        } else {
            b
        };
        let row = &rows[chosen];
        row.predicted.fetch_add(self.cost_milli, Ordering::Relaxed);
        Some(row)
    }
}

/// Whether `a` has no more predicted load per unit of weight than `b` (cross-multiplied: exact, no division).
fn less_loaded(a: &Row, b: &Row) -> bool {
    let la = u128::from(a.predicted.load(Ordering::Relaxed)) * u128::from(b.weight);
    let lb = u128::from(b.predicted.load(Ordering::Relaxed)) * u128::from(a.weight);
    la <= lb
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use xcluster_proto::directory::InstanceState;

    use super::*;

    fn view(weights: &[u32]) -> PickView {
        let rows = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Row {
                key: i as u64,
                id: Arc::from(format!("i{i}").as_str()),
                addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                weight: w,
                state: InstanceState::Up,
                received_ms: 0,
                predicted: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        PickView::new(
            TypeList {
                version: 1,
                rows,
                panic: false,
                warming: false,
            },
            1000,
        )
    }

    /// The warm-up's question: it needs a row with weight, and asking adds no predicted load.
    #[test]
    fn can_pick_needs_a_weight_and_counts_nothing() {
        assert!(!view(&[0, 0]).can_pick());
        let v = view(&[0, 3]);
        assert!(v.can_pick());
        assert!(
            v.list
                .rows
                .iter()
                .all(|r| r.predicted.load(Ordering::Relaxed) == 0)
        );
    }

    fn counts(v: &PickView, n: usize, exclude: &[SocketAddr]) -> Vec<usize> {
        let mut rng = rand::rng();
        let mut c = vec![0; v.list.rows.len()];
        for _ in 0..n {
            let a = v.pick(exclude, &mut rng).unwrap().addr;
            c[usize::from(a.port() - 1000)] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_do_not_herd() {
        let v = view(&[5000; 10]);
        let c = counts(&v, 10_000, &[]);
        let max = *c.iter().max().unwrap();
        assert!(max as f64 <= 1.25 * 1000.0, "busiest got {max}: {c:?}");
    }

    #[test]
    fn unequal_weights_give_proportional_shares() {
        let w = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10_000];
        let v = view(&w);
        let c = counts(&v, 10_000, &[]);
        let total: u32 = w.iter().sum();
        for (i, &n) in c.iter().enumerate() {
            let expect = 10_000.0 * f64::from(w[i]) / f64::from(total);
            assert!(
                (n as f64 - expect).abs() <= 0.1 * expect,
                "instance {i}: {n} vs {expect:.0}: {c:?}"
            );
        }
    }

    #[test]
    fn zero_weight_and_excluded_are_never_picked() {
        let v = view(&[0, 100, 100]);
        let excluded = [SocketAddr::from(([127, 0, 0, 1], 1001))];
        let c = counts(&v, 500, &excluded);
        assert_eq!(c, vec![0, 0, 500]);
        assert!(view(&[0, 0]).pick(&[], &mut rand::rng()).is_none());
        let all = [SocketAddr::from(([127, 0, 0, 1], 1000))];
        assert!(view(&[10]).pick(&all, &mut rand::rng()).is_none());
    }
}
