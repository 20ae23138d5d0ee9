//! Source address rules on a listener (`allow` and `deny`, nginx's stream `allow`/`deny`, HAProxy's
//! `tcp-request connection reject if { src ... }`): a client whose address a `deny` entry covers is closed as
//! soon as it is accepted, and so is one that no `allow` entry covers when there are any. With
//! `accept_proxy` the address is the one the PROXY header names.
//!
//! An entry is an address or a network in CIDR form, IPv4 or IPv6; an IPv4 entry also covers the same
//! client seen as IPv4-mapped IPv6 on a dual-stack listener. A check is a scan of a few words per entry,
//! without allocation.

use std::fmt;
use std::net::IpAddr;

/// Most entries in one listener's `allow` or `deny`.
pub const MAX_ENTRIES: usize = 1024;

/// One address or network, held as an IPv6 network (IPv4 as IPv4-mapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: u128,
    /// Leading bits that must match, 0 to 128.
    bits: u8,
}

impl Net {
    /// Parses `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32` or `::1`. The bits below the prefix must be zero,
    /// so that an entry reads as what it covers (`10.1.2.3/8` is refused rather than taken as `10.0.0.0/8`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max && (b == "0" || !b.starts_with('0')) => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        let net = Self {
            addr: mapped(ip),
            bits: bits + (128 - max),
        };
        if net.addr & !net.mask() != 0 {
            return Err(format!("{s:?} has bits set below its /{bits} prefix"));
        }
        Ok(net)
    }

    fn mask(self) -> u128 {
        u128::MAX.checked_shl(128 - u32::from(self.bits)).unwrap_or(0)
    }

    fn covers(self, ip: u128) -> bool {
        (ip ^ self.addr) & self.mask() == 0
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = std::net::Ipv6Addr::from(self.addr);
        match ip.to_ipv4_mapped() {
            Some(v4) if self.bits >= 96 => write!(f, "{v4}/{}", self.bits - 96),
            _ => write!(f, "{ip}/{}", self.bits),
        }
    }
}

/// `ip` as the 128 bits of its IPv6 form (IPv4 as IPv4-mapped), so a client seen either way is one client.
pub(super) fn mapped(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A listener's rules; empty (the default) lets every client in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub allow: Vec<Net>,
    pub deny: Vec<Net>,
}

/// Whether one of `nets` covers `ip`.
pub fn any_covers(nets: &[Net], ip: IpAddr) -> bool {
    let ip = mapped(ip);
    nets.iter().any(|n| n.covers(ip))
}

impl Acl {
    /// Whether a client at `ip` may connect: no `deny` entry covers it, and an `allow` entry does if any
    /// are listed.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = mapped(ip);
        !self.deny.iter().any(|n| n.covers(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.covers(ip)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        let nets = |l: &[&str]| l.iter().map(|s| Net::parse(s).unwrap()).collect();
        Acl {
            allow: nets(allow),
            deny: nets(deny),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_allow_limits() {
        let a = acl(&["10.0.0.0/8", "2001:db8::/32"], &["10.6.0.0/16", "10.7.7.7"]);
        assert!(a.admits(ip("10.1.2.3")));
        assert!(a.admits(ip("2001:db8:1::5")));
        assert!(!a.admits(ip("10.6.1.1")), "denied inside an allowed network");
        assert!(!a.admits(ip("10.7.7.7")));
        assert!(a.admits(ip("10.7.7.8")));
        assert!(!a.admits(ip("192.0.2.1")), "not allowed");
        assert!(!a.admits(ip("2001:db9::1")));
        // The same IPv4 client seen IPv4-mapped on a dual-stack listener.
        assert!(a.admits(ip("::ffff:10.1.2.3")));
        assert!(!a.admits(ip("::ffff:10.6.1.1")));
        // No allow list: everything not denied.
        let d = acl(&[], &["0.0.0.0/0"]);
        assert!(!d.admits(ip("1.2.3.4")));
        assert!(d.admits(ip("::1")), "an IPv4 /0 covers IPv4 only");
        assert!(Acl::default().admits(ip("1.2.3.4")));
        assert!(
            !acl(&[], &["::/0"]).admits(ip("1.2.3.4")),
            "an IPv6 /0 covers everything"
        );
    }

    #[test]
    fn entries_parse_strictly() {
        assert_eq!(Net::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Net::parse("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(Net::parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(Net::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        for bad in [
            "10.1.2.3/8",
            "10.0.0.0/33",
            "10.0.0.0/08",
            "10.0.0.0/",
            "example.com",
            "::/129",
            "1.2.3.4/-1",
            "",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
