//! The PROXY protocol v2 header (binary form) that tells the backend the client's real address.
//! Spec: haproxy's `doc/proxy-protocol.txt`, section 2.2.

use std::net::SocketAddr;

/// The 12-byte v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;

/// The header for a TCP connection from `src` (the client) to `dst` (the proxy's listening address).
/// Mixed families are sent as IPv6 (IPv4 mapped), as the spec allows.
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = Vec::with_capacity(52);
    h.extend_from_slice(&SIGNATURE);
    h.push(V2_PROXY);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(TCP4);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v) => v.ip().to_ipv6_mapped().octets(),
                SocketAddr::V6(v) => v.ip().octets(),
            };
            h.push(TCP6);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src));
            h.extend_from_slice(&v6(dst));
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = v2_header(
            "10.1.2.3:4000".parse().unwrap(),
            "127.0.0.1:7100".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 12);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[10, 1, 2, 3]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 4000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 7100);
    }

    #[test]
    fn ipv6_and_mixed_headers() {
        let h = v2_header("[::1]:5".parse().unwrap(), "127.0.0.1:6".parse().unwrap());
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(h[13], 0x21);
        assert_eq!(h[31], 1);
        assert_eq!(
            &h[32..48],
            &std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets()
        );
        assert_eq!(u16::from_be_bytes([h[48], h[49]]), 5);
        assert_eq!(u16::from_be_bytes([h[50], h[51]]), 6);
    }
}
