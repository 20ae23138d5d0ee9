//! Routing by TLS server name (a listener's `sni`, as nginx's `ssl_preread` and HAProxy's `req.ssl_sni`):
//! before a backend is picked, the proxy peeks at the client's first TLS record and takes the request type
//! its ClientHello's `server_name` maps to; TLS itself passes through untouched, to the backend.
//!
//! Nothing is taken from the socket: every step peeks from the first byte, so the hello reaches the backend
//! as it came and redispatch stays invisible. While the record is incomplete, `SO_RCVLOWAT` is set to its
//! whole length, so the socket turns readable only once it is all there (or the client ends): neither
//! runtime's poll wakes per segment or spins on bytes it has seen. A wake with no new byte means the client
//! ended or its stack woke us early under memory pressure; either way the hello is taken as it is. Anything
//! that is not a hello with a valid name (another protocol, a name cut off in a later record, a client that
//! sends nothing before the connect timeout) goes to the listener's own `request_type`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use xcluster_runtime::net::is_host_name;

use super::inbound::recv;

/// The longest TLS record (2^14 bytes of plaintext and the 5-byte header): the most a hello is waited for.
pub const MAX_RECORD: usize = 5 + (1 << 14);

/// The first peek's size: most hellos fit (browsers' are 0.5 to 2 KiB).
const FIRST_PEEK: usize = 2048;

/// What the bytes of a client's first record say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// They may be a hello, whose record needs `need` bytes in all.
    Incomplete { need: usize },
    /// A ClientHello naming this host (lowercase, without a trailing dot).
    Name(String),
    /// Not a TLS hello, or one without a valid `host_name` in its first record.
    NoName,
}

/// Reads the server name from `bytes`, the start of what a client sent.
pub fn parse(bytes: &[u8]) -> Parsed {
    // Record: content type 22 (handshake), a version of 3.x, its length.
    let Some(header) = bytes.get(..5) else {
        return match bytes.first() {
            Some(&t) if t != 22 => Parsed::NoName,
            _ => Parsed::Incomplete { need: 5 },
        };
    };
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if header[0] != 22 || header[1] != 3 || len == 0 || 5 + len > MAX_RECORD {
        return Parsed::NoName;
    }
    let Some(fragment) = bytes.get(5..5 + len) else {
        return Parsed::Incomplete { need: 5 + len };
    };
    client_hello(fragment).map_or(Parsed::NoName, Parsed::Name)
}

/// The host name in a handshake fragment starting with a ClientHello, if its first record holds it.
fn client_hello(fragment: &[u8]) -> Option<String> {
    let mut r = Reader(fragment);
    // Handshake type 1 (client_hello) and a 24-bit length; a hello longer than its record is cut off
    // where the record ends, which is fine as long as the extension comes before that.
    if r.u8()? != 1 {
        return None;
    }
    r.take(3)?;
    r.take(2 + 32)?; // legacy_version, random
    let session = usize::from(r.u8()?);
    r.take(session)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let body = extensions.vec16()?;
        if kind == 0 {
            return server_name(body);
        }
    }
    None
}

/// The `host_name` entry of a `server_name` extension (RFC 6066 §3), validated.
fn server_name(body: &[u8]) -> Option<String> {
    let mut list = Reader(Reader(body).vec16()?);
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            return host(name);
        }
    }
    None
}

/// `name` as a lowercase host name ([`is_host_name`]), without a trailing dot; `None` for anything else.
fn host(name: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(name.strip_suffix(b".").unwrap_or(name)).ok()?;
    is_host_name(name).then(|| name.to_ascii_lowercase())
}

/// A cursor over bytes whose every read is bounds-checked: a short or malformed hello gives `None`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 16-bit length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// A client's hello being waited for; its buffer lives only until the hello is read.
#[derive(Debug, Default)]
pub struct Hello {
    buf: Vec<u8>,
    /// Bytes the last peek saw.
    seen: usize,
    /// `SO_RCVLOWAT` was raised, and must be set back before the bytes are forwarded.
    raised: bool,
}

impl Hello {
    /// Peeks at `fd` (a non-blocking socket) again: the name its hello gives, `None` when it gives none
    /// (see the module doc), or `WouldBlock` while the record is incomplete. The socket is left as it was
    /// found once this returns anything but `WouldBlock`.
    pub fn step(&mut self, fd: RawFd) -> io::Result<Option<String>> {
        let parsed = loop {
            if self.buf.is_empty() {
                self.buf.resize(FIRST_PEEK, 0);
            }
            let n = match recv(fd, &mut self.buf, libc::MSG_PEEK) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.seen == 0 => return Err(e),
                // The client reset, or a wake without bytes: the backend gets what the socket holds.
                Err(_) => 0,
            };
            match parse(&self.buf[..n]) {
                // The buffer was too small for the record: more may be there already.
                Parsed::Incomplete { need } if n == self.buf.len() => self.buf.resize(need, 0),
                Parsed::Incomplete { need } if n > self.seen => {
                    self.seen = n;
                    match set_rcvlowat(fd, need) {
                        Ok(()) => {
                            self.raised = true;
                            tracing::debug!(have = n, need, "TLS hello incomplete; waiting for the rest");
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        Err(_) => break Parsed::NoName,
                    }
                }
                parsed => break parsed,
            }
        };
        self.end(fd);
        Ok(match parsed {
            Parsed::Name(name) => Some(name),
            _ => None,
        })
    }

    /// Gives up waiting (the caller's timeout): the socket's `SO_RCVLOWAT` is set back.
    pub fn end(&mut self, fd: RawFd) {
        if std::mem::take(&mut self.raised) {
            // A failure leaves a socket that wakes its poll late; nothing better can be done with it.
            let _ = set_rcvlowat(fd, 1);
        }
        self.buf = Vec::new();
    }
}

fn set_rcvlowat(fd: RawFd, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` outlives the call, which reads `size_of::<c_int>()` bytes of it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The most names one listener routes.
pub const MAX_ROUTES: usize = 10_000;

/// A listener's `sni`: server names to request types. An exact name wins over a wildcard (`*.example.com`,
/// any name ending in `.example.com`), and a longer wildcard over a shorter one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SniRoutes {
    exact: BTreeMap<String, Arc<str>>,
    /// The wildcards as suffixes (`.example.com`), longest first.
    suffixes: Vec<(String, Arc<str>)>,
}

impl SniRoutes {
    /// Routes from the config's `name = type` pairs, or why a name is not valid. Names are taken in any
    /// case, as DNS does.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut routes = Self::default();
        for (name, ty) in pairs {
            let (wild, bare) = match name.strip_prefix("*.") {
                Some(bare) => (true, bare),
                None => (false, name),
            };
            let valid = is_host_name(bare).then(|| bare.to_ascii_lowercase());
            let Some(bare) = valid else {
                return Err(format!(
                    "{name:?} is not a host name (letters, digits, '-', '_' and dots), nor '*.' and one"
                ));
            };
            let ty: Arc<str> = ty.into();
            let clash = if wild {
                let suffix = format!(".{bare}");
                let clash = routes.suffixes.iter().any(|(s, _)| *s == suffix);
                routes.suffixes.push((suffix, ty));
                clash
            } else {
                routes.exact.insert(bare, ty).is_some()
            };
            if clash {
                return Err(format!("{name:?} is listed twice (names are taken in any case)"));
            }
        }
        routes.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(routes)
    }

    /// The request type of `name` (lowercase, as [`parse`] gives it), if any entry covers it.
    pub fn route(&self, name: &str) -> Option<&Arc<str>> {
        self.exact.get(name).or_else(|| {
            let suffix = self.suffixes.iter().find(|(s, _)| name.ends_with(s.as_str()));
            suffix.map(|(_, ty)| ty)
        })
    }

    /// Every request type named.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        let exact = self.exact.values();
        exact.chain(self.suffixes.iter().map(|(_, ty)| ty)).map(|t| &**t)
    }
}

/// A ClientHello record naming `name` (TLS 1.2 layout with one cipher suite and the SNI extension after
/// another one).
#[cfg(test)]
pub fn hello_for_tests(name: &str) -> Vec<u8> {
    let mut sni = Vec::new();
    let entry_len = 1 + 2 + name.len();
    sni.extend_from_slice(&u16::try_from(entry_len).unwrap_or(0).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
    sni.extend_from_slice(name.as_bytes());
    let mut ext = Vec::new();
    // A supported_versions extension first, so the parser has to skip one.
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    ext.extend_from_slice(&[0x00, 0x00]);
    ext.extend_from_slice(&u16::try_from(sni.len()).unwrap_or(0).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]);
    body.push(32);
    body.extend_from_slice(&[9; 32]);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&u16::try_from(ext.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&u16::try_from(hs.len()).unwrap_or(0).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_hello_gives_its_server_name_in_lowercase() {
        let hello = hello_for_tests("Shop.Example.COM.");
        assert_eq!(parse(&hello), Parsed::Name("shop.example.com".into()));
    }

    #[test]
    fn every_prefix_of_a_hello_asks_for_the_whole_record() {
        let hello = hello_for_tests("shop.example.com");
        for cut in 0..hello.len() {
            let need = if cut < 5 { 5 } else { hello.len() };
            assert_eq!(parse(&hello[..cut]), Parsed::Incomplete { need }, "cut at {cut}");
        }
    }

    #[test]
    fn other_protocols_and_bad_names_give_no_name() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NoName);
        assert_eq!(parse(b"\x16\x02"), Parsed::Incomplete { need: 5 });
        assert_eq!(parse(b"\x16\x02\x00\x00\x05hello"), Parsed::NoName);
        // A record longer than TLS allows.
        assert_eq!(parse(&[22, 3, 1, 0xff, 0xff]), Parsed::NoName);
        for bad in ["", "a b", "caf\u{e9}.example", &"a".repeat(254)] {
            assert_eq!(parse(&hello_for_tests(bad)), Parsed::NoName, "{bad:?}");
        }
    }

    #[test]
    fn a_hello_cut_short_inside_its_record_gives_no_name() {
        let mut hello = hello_for_tests("shop.example.com");
        // The record says it ends before the extensions do.
        let short = hello.len() - 5 - 10;
        hello[3..5].copy_from_slice(&u16::try_from(short).unwrap().to_be_bytes());
        hello.truncate(5 + short);
        assert_eq!(parse(&hello), Parsed::NoName);
    }

    /// A real client's hello: `openssl s_client -servername shop.example.com` (OpenSSL 3, TLS 1.3 with
    /// its key shares and a dozen extensions), captured once.
    #[test]
    fn a_real_clients_hello_gives_its_name() {
        let hello = include_bytes!("testdata/openssl_client_hello.bin");
        assert_eq!(parse(hello), Parsed::Name("shop.example.com".into()));
        assert_eq!(parse(&hello[..100]), Parsed::Incomplete { need: hello.len() });
    }

    #[test]
    fn exact_names_win_over_wildcards_and_longer_wildcards_over_shorter() {
        let pairs = [
            ("*.example.com", "wild"),
            ("*.api.Example.com", "api"),
            ("pay.api.example.com", "pay"),
        ];
        let r = SniRoutes::new(pairs).unwrap();
        let route = |n: &str| r.route(n).map(|t| t.to_string());
        assert_eq!(route("pay.api.example.com").as_deref(), Some("pay"));
        assert_eq!(route("v1.api.example.com").as_deref(), Some("api"));
        assert_eq!(route("a.b.example.com").as_deref(), Some("wild"));
        assert_eq!(route("example.com"), None);
        assert_eq!(route("notexample.com"), None);
        let mut types: Vec<&str> = r.types().collect();
        types.sort_unstable();
        assert_eq!(types, ["api", "pay", "wild"]);
    }

    #[test]
    fn bad_or_repeated_names_are_refused() {
        for bad in ["", "*", "*.", "a b", "a..b", ".a", "**.a", "a.*.b", "caf\u{e9}"] {
            assert!(SniRoutes::new([(bad, "t")]).is_err(), "{bad:?}");
        }
        let twice = SniRoutes::new([("A.example", "t"), ("a.example", "u")]).unwrap_err();
        assert!(twice.contains("listed twice"), "{twice}");
        assert!(SniRoutes::new([("*.a.example", "t"), ("*.A.example", "t")]).is_err());
        assert!(SniRoutes::new([("a.example", "t"), ("*.a.example", "t")]).is_ok());
    }

    fn rcvlowat(fd: RawFd) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `value`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        value
    }

    /// Whether `fd` is readable, as its `SO_RCVLOWAT` counts, within `ms`.
    fn poll(fd: RawFd, ms: libc::c_int) -> bool {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut poll, 1, ms) == 1 }
    }

    fn readable(fd: RawFd) {
        assert!(poll(fd, 5000), "not readable within 5 s");
    }

    /// On a real socket: a hello that comes in two parts is waited for with `SO_RCVLOWAT` at its length,
    /// read without taking a byte, and the socket is left as it was.
    #[test]
    fn a_hello_in_parts_is_peeked_whole_and_left_in_the_socket() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        let hello = hello_for_tests("shop.example.com");
        let mut h = Hello::default();
        assert_eq!(h.step(fd).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        client.write_all(&hello[..40]).unwrap();
        readable(fd);
        assert_eq!(h.step(fd).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(rcvlowat(fd), libc::c_int::try_from(hello.len()).unwrap());
        assert!(!poll(fd, 0), "40 bytes of the hello must not wake the poll");
        client.write_all(&hello[40..]).unwrap();
        readable(fd);
        let name = h.step(fd).unwrap();
        assert_eq!(name.as_deref(), Some("shop.example.com"));
        assert_eq!(rcvlowat(fd), 1);
        server.set_nonblocking(false).unwrap();
        let mut got = vec![0; hello.len()];
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, hello);
    }

    /// A client that sends part of a hello and closes is sent on as it is, once its end wakes the poll.
    #[test]
    fn a_client_ending_mid_hello_gives_no_name() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        let hello = hello_for_tests("shop.example.com");
        client.write_all(&hello[..40]).unwrap();
        let mut h = Hello::default();
        readable(fd);
        assert_eq!(h.step(fd).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // The end is what the next wake brings: no new byte, so the hello is taken as it is.
        readable(fd);
        assert_eq!(h.step(fd).unwrap(), None);
        assert_eq!(rcvlowat(fd), 1);
    }

    /// Random bytes parse without a panic, and whatever parses as incomplete asks for more than it has.
    #[test]
    fn random_bytes_parse() {
        for _ in 0..20_000 {
            let len = rand::random_range(0..600);
            let mut bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            // Half of them look like a handshake record, to get past the first check.
            if rand::random() && len >= 3 {
                bytes[..3].copy_from_slice(&[22, 3, 1]);
            }
            if let Parsed::Incomplete { need } = parse(&bytes) {
                assert!(need > bytes.len() && need <= MAX_RECORD, "{bytes:?}");
            }
        }
    }

    /// Random host names come back from their hello, lowercased.
    #[test]
    fn host_names_round_trip() {
        let chars = b"abcXYZ019-_";
        for _ in 0..2_000 {
            let labels = rand::random_range(1..5);
            let name: Vec<String> = (0..labels)
                .map(|_| {
                    let len = rand::random_range(1..20);
                    (0..len)
                        .map(|_| char::from(chars[rand::random_range(0..chars.len())]))
                        .collect()
                })
                .collect();
            // The last label is not a number (a name the resolver would read as IPv4 is none).
            let name = name.join(".") + ".x";
            assert_eq!(
                parse(&hello_for_tests(&name)),
                Parsed::Name(name.to_ascii_lowercase())
            );
        }
    }

    #[test]
    fn every_one_byte_change_parses_without_panic() {
        let hello = hello_for_tests("shop.example.com");
        // Every single-byte change of a valid hello, each value: bounds are checked everywhere.
        for i in 0..hello.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = hello.clone();
                b[i] = v;
                let _ = parse(&b);
            }
        }
    }
}
