//! The PROXY protocol header that tells a backend the real client address of a proxied connection: the
//! balancer's L4 proxy encodes it (v2, binary) toward backends, and [`decode`] reads either version (from a
//! front balancer, on listeners with `accept_proxy`; and for backends and tests). Spec: haproxy's
//! `doc/proxy-protocol.txt`, sections 2.1 (v1, text) and 2.2 (v2).
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
/// Longest v1 header, its CRLF included (the spec's bound: a TCP6 line with the longest addresses).
pub const V1_MAX_LEN: usize = 107;
/// How a v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";

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

/// The header a proxy's own connection opens with, such as a health check toward a backend that expects
/// one on every connection (HAProxy's `check-send-proxy`): command `LOCAL`, no addresses, so the backend
/// uses the socket's own.
pub const fn encode_v2_local() -> [u8; FIXED_LEN] {
    let mut h = [0u8; FIXED_LEN];
    let mut i = 0;
    while i < SIGNATURE.len() {
        h[i] = SIGNATURE[i];
        i += 1;
    }
    h[12] = V2_LOCAL;
    // Family and protocol UNSPEC, address length 0 (bytes 13 to 15 stay zero).
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
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
}

/// Decodes a header of either version from the start of `buf`: v1 if it starts with `P`, else v2. On
/// `Incomplete`, every byte of `buf` belongs to the header, and `need` is a lower bound of its length (for
/// v2, once its fixed part is in, the exact length). Never reads past `buf` and never allocates.
pub fn decode(buf: &[u8]) -> Result<Header, HeaderError> {
    match buf.first() {
        Some(b'P') => decode_v1(buf),
        _ => decode_v2(buf),
    }
}

/// Decodes a v1 (text) header: `PROXY TCP4|TCP6 <src ip> <dst ip> <src port> <dst port>\r\n`, or
/// `PROXY UNKNOWN ...\r\n` (the connection's own addresses stand).
pub fn decode_v1(buf: &[u8]) -> Result<Header, HeaderError> {
    let head = &buf[..buf.len().min(V1_MAX_LEN)];
    let prefix = head.len().min(V1_PREFIX.len());
    if head[..prefix] != V1_PREFIX[..prefix] {
        return Err(HeaderError::BadV1("does not start with \"PROXY \""));
    }
    let Some(cr) = head.iter().position(|&b| b == b'\r' || b == b'\n') else {
        if head.len() == V1_MAX_LEN {
            return Err(HeaderError::BadV1("no CRLF within 107 bytes"));
        }
        if !head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(HeaderError::BadV1("a byte that is not printable ASCII"));
        }
        return Err(HeaderError::Incomplete { need: head.len() + 1 });
    };
    match head.get(cr..cr + 2) {
        Some(b"\r\n") => {}
        Some(_) => return Err(HeaderError::BadV1("a line end that is not CRLF")),
        None if head[cr] == b'\r' && cr + 1 < V1_MAX_LEN => {
            return Err(HeaderError::Incomplete { need: cr + 2 });
        }
        None => return Err(HeaderError::BadV1("a line end that is not CRLF")),
    }
    let line = std::str::from_utf8(&head[V1_PREFIX.len().min(cr)..cr])
        .map_err(|_| HeaderError::BadV1("a byte that is not printable ASCII"))?;
    let mut fields = line.split(' ');
    let addresses = match fields.next() {
        Some("UNKNOWN") => Addresses::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let mut next = || fields.next().ok_or(HeaderError::BadV1("too few fields"));
            let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
            if fields.next().is_some() {
                return Err(HeaderError::BadV1("too many fields"));
            }
            let ip = |s: &str| -> Result<std::net::IpAddr, HeaderError> {
                let ip = if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(Into::into)
                } else {
                    s.parse::<Ipv6Addr>().map(Into::into)
                };
                ip.map_err(|_| HeaderError::BadV1("an address that does not parse for its family"))
            };
            let port = |s: &str| -> Result<u16, HeaderError> {
                // The spec's ports are plain decimal: no sign, no leading zero.
                match s.parse::<u16>() {
                    Ok(p) if !s.starts_with('+') && (s == "0" || !s.starts_with('0')) => Ok(p),
                    _ => Err(HeaderError::BadV1("a port that is not 0-65535")),
                }
            };
            Addresses::Proxied {
                src: SocketAddr::new(ip(src)?, port(sport)?),
                dst: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(HeaderError::BadV1("a protocol other than TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Header {
        len: cr + 2,
        addresses,
    })
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
        let own = encode_v2_local();
        assert_eq!(
            decode_v2(&own),
            Ok(Header {
                len: FIXED_LEN,
                addresses: Addresses::Local
            })
        );
        // Trailing TLVs and payload are not part of the header.
        let mut tlv = good[..16].to_vec();
        tlv[15] = 12 + 3;
        tlv.extend_from_slice(&good[16..]);
        tlv.extend_from_slice(&[0x04, 0, 0, b'x']);
        assert_eq!(decode_v2(&tlv).unwrap().len, 31);
    }

    #[test]
    fn v1_headers_decode() {
        let tcp4 = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\nGET /";
        let h = decode(tcp4).unwrap();
        assert_eq!(h.len, tcp4.len() - 5);
        assert_eq!(
            h.addresses,
            Addresses::Proxied {
                src: "192.168.0.1:56324".parse().unwrap(),
                dst: "10.0.0.2:443".parse().unwrap()
            }
        );
        let tcp6 = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert_eq!(
            decode(tcp6).unwrap().addresses,
            Addresses::Proxied {
                src: "[2001:db8::1]:1".parse().unwrap(),
                dst: "[::1]:65535".parse().unwrap()
            }
        );
        let unknown = b"PROXY UNKNOWN ffff:f...f:ffff 4242\r\n";
        assert_eq!(
            decode(unknown).unwrap(),
            Header {
                len: unknown.len(),
                addresses: Addresses::Local
            }
        );
        assert_eq!(decode(b"PROXY UNKNOWN\r\n").unwrap().len, 15);
        // Every cut of a good header is a prefix that asks for more, never an error or a header.
        for cut in 0..tcp6.len() {
            assert!(
                matches!(decode(&tcp6[..cut]), Err(HeaderError::Incomplete { need }) if need > cut),
                "cut at {cut}"
            );
        }
        // v2 still decodes through the same entry point.
        let v2 = encode_v2("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        assert_eq!(decode(&v2).unwrap(), decode_v2(&v2).unwrap());
    }

    #[test]
    fn v1_refuses_malformed_lines() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY\r\n",
            b"PROXI TCP4",
            b"PROXY TCP4 1.2.3.4\x00",
            b"PROXY TCP4 1.2.3.4\rX",
        ] {
            assert!(
                matches!(decode(bad), Err(HeaderError::BadV1(_))),
                "{:?} gave {:?}",
                String::from_utf8_lossy(bad),
                decode(bad)
            );
        }
        // No line end within the spec's 107 bytes.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        assert_eq!(decode(&long), Err(HeaderError::BadV1("no CRLF within 107 bytes")));
        long.truncate(106);
        assert_eq!(decode(&long), Err(HeaderError::Incomplete { need: 107 }));
        long.push(b'\r');
        assert!(matches!(decode(&long), Err(HeaderError::BadV1(_))));
    }
}
