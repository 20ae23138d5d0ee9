//! Per-client limits: with `max_connections_per_client` on a listener, one client address may hold at most
//! that many connections through it at once; the next is closed as soon as it is accepted, before any
//! backend is tried (HAProxy's `tcp-request connection reject if { src_conn_cur ge N }`). One busy or
//! hostile client (a bot at a flash sale) then cannot take every `max_connections` permit, nor every
//! backend's capacity, from the others.
//!
//! Counts are `xcluster_runtime::per_client::OpenCounts` (sharded by address, an entry only while its client
//! has a connection open, so bounded by `max_connections`), shared with the HTTP APIs' per-client cap. The
//! count survives a reload that changes the listener in place (the map moves to its new state).
//!
//! A client is an address as `client_key` counts it: an IPv4 address, or an IPv6 /64.
//!
//! Rates: with `max_connection_rate_per_client = N` a client address may open N connections per
//! `connection_rate_period_ms` (HAProxy's `sc0_conn_rate`), as a burst or spread out; the next is closed as
//! soon as it is accepted. Each address holds how many connections it has used, in millionths, and when: the
//! use drains at N per period (a leaky bucket counted in connections, so a reload that raises N gives a client
//! the difference at once). A client whose use has drained to nothing is as good as absent. The map is
//! bounded: a shard that reaches `RATE_ENTRIES_PER_SHARD` first drops those clients (exact), and if every
//! entry still has some use the connection is let in unrecorded (a flood from that many addresses is the
//! concurrent limits' job).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use xcluster_runtime::per_client::ClientSlot;
use xcluster_runtime::per_client::{OpenCounts, client_key};

const SHARDS: usize = 16;
/// Clients tracked for their rate per shard, 65,536 in all: 1 MiB or so at most.
const RATE_ENTRIES_PER_SHARD: usize = 4096;

/// Open connections, and recent connection rates, per client address, on one listener.
#[derive(Debug)]
pub struct ClientCounts {
    open: Arc<OpenCounts>,
    /// Per client with a rate limit: connections used, in millionths, as of when (µs after `epoch`).
    rates: [Mutex<HashMap<IpAddr, (u64, u64)>>; SHARDS],
    hasher: RandomState,
    epoch: Instant,
}

impl Default for ClientCounts {
    fn default() -> Self {
        Self {
            open: Arc::default(),
            rates: Default::default(),
            hasher: RandomState::default(),
            epoch: Instant::now(),
        }
    }
}

/// `max_connection_rate_per_client` connections per `connection_rate_period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl ClientCounts {
    fn index(&self, ip: &IpAddr) -> usize {
        // The modulo keeps the index below SHARDS.
        usize::try_from(self.hasher.hash_one(ip) % SHARDS as u64).unwrap_or(0)
    }

    /// Whether `ip` may open one more connection within `rate`; if so, it is recorded.
    pub fn within_rate(&self, ip: IpAddr, rate: Rate) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.within_rate_at(client_key(ip), rate, now)
    }

    /// The leaky bucket at time `now` (µs): a connection is let in if the client's use, drained at
    /// `rate.count` per `rate.period` since it was last recorded, leaves room for one more.
    fn within_rate_at(&self, ip: IpAddr, rate: Rate, now: u64) -> bool {
        const ONE: u64 = 1_000_000;
        let period = u64::try_from(rate.period.as_micros()).unwrap_or(u64::MAX).max(1);
        let drained = |(used, at): (u64, u64)| {
            let gone = u128::from(now.saturating_sub(at)) * u128::from(rate.count) * u128::from(ONE)
                / u128::from(period);
            used.saturating_sub(u64::try_from(gone).unwrap_or(u64::MAX))
        };
        let mut map = self.rates[self.index(&ip)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let used = map.get(&ip).copied().map_or(0, drained) + ONE;
        if used > u64::from(rate.count) * ONE {
            return false;
        }
        if map.len() >= RATE_ENTRIES_PER_SHARD && !map.contains_key(&ip) {
            map.retain(|_, e| drained(*e) > 0);
            if map.len() >= RATE_ENTRIES_PER_SHARD {
                return true;
            }
        }
        map.insert(ip, (used, now));
        true
    }

    /// Counts one more connection from `ip`, unless it holds `limit` already.
    pub fn admit(&self, ip: IpAddr, limit: u32) -> Option<ClientSlot> {
        self.open.admit(ip, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_opens_at_most_its_rate_per_period_and_regains_it_over_time() {
        let c = ClientCounts::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let rate = Rate {
            count: 3,
            period: Duration::from_secs(3),
        };
        let s = 1_000_000;
        // A burst of three at once, then nothing until an interval (1 s) has passed.
        assert!((0..3).all(|_| c.within_rate_at(a, rate, 10 * s)));
        assert!(!c.within_rate_at(a, rate, 10 * s));
        assert!(!c.within_rate_at(a, rate, 11 * s - 1));
        assert!(c.within_rate_at(a, rate, 11 * s));
        assert!(!c.within_rate_at(a, rate, 11 * s));
        // Refused connections cost nothing: another comes a second later.
        assert!(c.within_rate_at(a, rate, 12 * s));
        // Another client is on its own allowance.
        assert!((0..3).all(|_| c.within_rate_at(b, rate, 12 * s)));
        // Quiet for a whole period: a full burst again.
        assert!((0..3).all(|_| c.within_rate_at(a, rate, 15 * s)));
        assert!(!c.within_rate_at(a, rate, 15 * s));
        // A higher rate (a reload) gives the difference at once: one more of four.
        let four = Rate { count: 4, ..rate };
        assert!(c.within_rate_at(a, four, 15 * s));
        assert!(!c.within_rate_at(a, four, 15 * s));
    }

    #[test]
    fn an_ipv6_client_is_held_to_its_rate_across_its_whole_64() {
        let c = ClientCounts::default();
        let rate = Rate {
            count: 2,
            period: Duration::from_secs(3600),
        };
        // A bot that takes a fresh address of its /64 for each connection is still one client.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c.within_rate(v6("2001:db8:5:6::1"), rate));
        assert!(c.within_rate(v6("2001:db8:5:6::2"), rate));
        assert!(!c.within_rate(v6("2001:db8:5:6:dead:beef::3"), rate));
        assert!(
            c.within_rate(v6("2001:db8:5:7::1"), rate),
            "the next /64 is another client"
        );
    }

    #[test]
    fn the_rate_map_is_bounded_and_forgets_clients_with_a_full_allowance() {
        let c = ClientCounts::default();
        let rate = Rate {
            count: 1,
            period: Duration::from_secs(1),
        };
        let len = |ip: &IpAddr| c.rates[c.index(ip)].lock().unwrap().len();
        // Twice as many clients as the map holds, all at once and each at its limit: let in, recorded or not.
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 | i));
        let n = u32::try_from(SHARDS * RATE_ENTRIES_PER_SHARD * 2).unwrap();
        assert!((0..n).all(|i| c.within_rate_at(ip(i), rate, 0)));
        assert!((0..n).all(|i| len(&ip(i)) <= RATE_ENTRIES_PER_SHARD));
        // The first client was recorded (its shard was empty): still held to its rate half a period on.
        assert!(!c.within_rate_at(ip(0), rate, 500_000));
        // A period on, every allowance is full again: a new client's shard forgets them all and keeps it.
        let new = ip(n);
        assert!(c.within_rate_at(new, rate, 1_000_000));
        assert_eq!(len(&new), 1);
    }
}
