//! Connections open per client address, for the servers that cap them: the L4 proxy's listeners
//! (`max_connections_per_client`) and every role's HTTP API (`[http] max_connections_per_client`).
//!
//! Counts live in a map sharded by address, so accepts on different threads rarely meet on a lock; an entry
//! exists only while its client has a connection open, so the map is bounded by the server's own connection
//! cap. A client is its address (`client_key`): an IPv4 client seen as IPv6-mapped counts as itself, and an
//! IPv6 client is its /64, because one host is given a whole /64 and may take any address in it, so a per-address
//! cap on IPv6 would hold no one. Touched once per accept and once per close, never per request or per byte.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

const SHARDS: usize = 16;

/// The client an address is counted as: an IPv4 address (IPv6-mapped or not) as itself, an IPv6 address
/// as its /64 network (the host part zeroed), the smallest block one host is routinely given.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
pub struct OpenCounts {
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
    hasher: RandomState,
}

/// One connection counted against its client; the count drops with it.
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<OpenCounts>,
    ip: IpAddr,
}

impl OpenCounts {
    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        // The modulo keeps the index below SHARDS.
        &self.shards[usize::try_from(self.hasher.hash_one(ip) % SHARDS as u64).unwrap_or(0)]
    }

    /// Counts one more connection from `ip`, unless it holds `limit` already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limit: u32) -> Option<ClientSlot> {
        let ip = client_key(ip);
        let mut map = self.shard(&ip).lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }

    /// Connections `ip` holds open.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let ip = client_key(ip);
        let map = self.shard(&ip).lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self
            .counts
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_client_holds_at_most_the_limit_and_its_slots_free_on_drop() {
        let c = Arc::new(OpenCounts::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = c.admit(a, 2).unwrap();
        let _second = c.admit(a, 2).unwrap();
        assert!(c.admit(a, 2).is_none(), "a third from the same client");
        let _other = c.admit(b, 2).unwrap();
        drop(first);
        assert_eq!(c.open(a), 1);
        let _third = c.admit(a, 2).unwrap();
        // The same client over IPv6 (mapped) counts as itself.
        assert!(c.admit("::ffff:10.0.0.1".parse().unwrap(), 2).is_none());
        // An IPv6 client is its /64: another address in it is the same client, one outside it is not.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _v6a = c.admit(v6("2001:db8:1:2::1"), 2).unwrap();
        let _v6b = c.admit(v6("2001:db8:1:2:ffff:ffff:ffff:fffe"), 2).unwrap();
        assert!(
            c.admit(v6("2001:db8:1:2:abcd::7"), 2).is_none(),
            "a third from the same /64"
        );
        assert_eq!(c.open(v6("2001:db8:1:2::99")), 2);
        let _v6c = c.admit(v6("2001:db8:1:3::1"), 2).unwrap();
        drop((_v6a, _v6b, _v6c));
        drop((_second, _third, _other));
        assert!(
            c.shards.iter().all(|s| s.lock().unwrap().is_empty()),
            "entries go with their last slot"
        );
    }
}
