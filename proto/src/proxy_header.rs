//! The PROXY protocol v2 header (binary form) that tells a backend the real client address of a proxied
//! connection: the balancer's L4 proxy encodes it, and [`decode_v2`] reads it (for backends and tests).
//! Spec: haproxy's `doc/proxy-protocol.txt`, section 2.2.
//!
//! ```
//! use xcluster_proto::proxy_header::{Addresses, decode_v2, encode_v2};
//! let src = "10.0.0.7:40000".parse().unwrap();
//! let dst = "127.0.0.1:7100".parse().unwrap();
//! let header = encode_v2(src, dst);
//! let decoded = decode_v2(&header).unwrap();
//! assert_eq!(decoded.len, header.len());
//! assert_eq!(decoded.addresses, Addresses::Proxied { src, dst });
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The 12-byte v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL (health checks from the proxy itself: no addresses).
const V2_LOCAL: u8 = 0x20;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// The fixed part: signature, version/command, family/protocol, length.
pub const FIXED_LEN: usize = 16;
/// Largest header a decoder accepts: the fixed part plus the largest length field. TLVs beyond the addresses
/// are skipped, not interpreted.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + u16::MAX as usize;

/// The header for a TCP connection from `src` (the client) to `dst` (the proxy's listening address).
/// Mixed families are sent as IPv6 (IPv4 mapped), as the spec allows.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
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

/// What a v2 header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// A proxied TCP connection from `src` to `dst`.
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// `LOCAL`, or a family/protocol we do not map (UDP, UNIX): use the connection's own addresses.
    Local,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header took; the connection's payload starts after them.
    pub len: usize,
    pub addresses: Addresses,
}

/// Why bytes are not a v2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// More bytes are needed (at least this many in all); not an error yet on a stream.
    #[error("incomplete PROXY v2 header: {need} bytes needed")]
    Incomplete { need: usize },
    #[error("not a PROXY v2 header (bad signature)")]
    BadSignature,
    #[error("unsupported PROXY header version/command byte {0:#04x}")]
    BadVersion(u8),
    #[error("PROXY header address block of {len} bytes is too short for family {family:#04x}")]
    ShortAddresses { family: u8, len: usize },
}

/// Decodes a v2 header from the start of `buf`. Never reads past `buf` and never allocates.
pub fn decode_v2(buf: &[u8]) -> Result<Header, HeaderError> {
    let sig_len = buf.len().min(SIGNATURE.len());
    if buf[..sig_len] != SIGNATURE[..sig_len] {
        return Err(HeaderError::BadSignature);
    }
    let Some(fixed) = buf.get(..FIXED_LEN) else {
        return Err(HeaderError::Incomplete { need: FIXED_LEN });
    };
    let ver_cmd = fixed[12];
    let family = fixed[13];
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let total = FIXED_LEN + len;
    let Some(block) = buf.get(FIXED_LEN..total) else {
        return Err(HeaderError::Incomplete { need: total });
    };
    let addresses = match ver_cmd {
        V2_LOCAL => Addresses::Local,
        V2_PROXY => match family {
            TCP4 => {
                let a = block
                    .get(..12)
                    .ok_or(HeaderError::ShortAddresses { family, len })?;
                let ip = |i: usize| Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]);
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                Addresses::Proxied {
                    src: SocketAddr::V4(SocketAddrV4::new(ip(0), port(8))),
                    dst: SocketAddr::V4(SocketAddrV4::new(ip(4), port(10))),
                }
            }
            TCP6 => {
                let a = block
                    .get(..36)
                    .ok_or(HeaderError::ShortAddresses { family, len })?;
                let ip = |i: usize| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&a[i..i + 16]);
                    Ipv6Addr::from(o)
                };
                let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
                let addr = |ip: Ipv6Addr, port: u16| match ip.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                    None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
                };
                Addresses::Proxied {
                    src: addr(ip(0), port(32)),
                    dst: addr(ip(16), port(34)),
                }
            }
            _ => Addresses::Local,
        },
        other => return Err(HeaderError::BadVersion(other)),
    };
    Ok(Header {
        len: total,
        addresses,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let h = encode_v2(
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
        let h = encode_v2("[::1]:5".parse().unwrap(), "127.0.0.1:6".parse().unwrap());
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(h[13], 0x21);
        assert_eq!(h[31], 1);
        assert_eq!(&h[32..48], &Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());
        assert_eq!(u16::from_be_bytes([h[48], h[49]]), 5);
        assert_eq!(u16::from_be_bytes([h[50], h[51]]), 6);
        let d = decode_v2(&h).unwrap();
        assert_eq!(
            d.addresses,
            Addresses::Proxied {
                src: "[::1]:5".parse().unwrap(),
                dst: "127.0.0.1:6".parse().unwrap()
            }
        );
    }

    #[test]
    fn decoder_refuses_what_is_not_a_header() {
        let good = encode_v2("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        for cut in 0..good.len() {
            assert!(matches!(
                decode_v2(&good[..cut]),
                Err(HeaderError::Incomplete { .. })
            ));
        }
        assert_eq!(decode_v2(b"GET / HTTP/1.1\r\n"), Err(HeaderError::BadSignature));
        let mut bad = good.clone();
        bad[12] = 0x11;
        assert_eq!(decode_v2(&bad), Err(HeaderError::BadVersion(0x11)));
        let mut short = good[..16].to_vec();
        short[15] = 4;
        short.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_v2(&short),
            Err(HeaderError::ShortAddresses { .. })
        ));
        let mut local = good.clone();
        local[12] = 0x20;
        assert_eq!(decode_v2(&local).unwrap().addresses, Addresses::Local);
        // Trailing TLVs and payload are not part of the header.
        let mut tlv = good[..16].to_vec();
        tlv[15] = 12 + 3;
        tlv.extend_from_slice(&good[16..]);
        tlv.extend_from_slice(&[0x04, 0, 0, b'x']);
        assert_eq!(decode_v2(&tlv).unwrap().len, 31);
    }
}
