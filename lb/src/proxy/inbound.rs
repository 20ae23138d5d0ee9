//! `accept_proxy` on a listener: every client sends a PROXY header (v1 or v2) before its own bytes, as a
//! front balancer does (HAProxy's `accept-proxy`), and the address it names is the client's from then on.
//!
//! The header is read without taking a byte past it. Each step peeks at what the socket holds, decodes it,
//! and takes only the header's bytes: all of what was peeked while the header is still incomplete (a valid
//! prefix is header through and through), else exactly its length. So the client's own bytes stay in the
//! socket, none is read before a backend answers, and redispatch stays invisible to the client. Both
//! runtimes call [`Inbound::step`] on the raw socket when it is readable.

use std::io;
use std::os::fd::RawFd;

use xcluster_proto::proxy_header::{Addresses, HeaderError, V1_MAX_LEN, decode};

/// The longest header taken (v2 TLVs included; AWS's and HAProxy's are a few hundred bytes at most). A
/// longer one is refused rather than buffered.
pub const MAX_LEN: usize = 4096;

/// A header being read; its buffer lives only until the header is whole.
#[derive(Debug, Default)]
pub struct Inbound {
    buf: Vec<u8>,
}

impl Inbound {
    /// Reads on as far as `fd` (a non-blocking socket) holds the header. `Ok` once it is whole;
    /// `WouldBlock` when it needs more bytes than have arrived; any other error (`InvalidData` for a
    /// malformed or overlong header, `UnexpectedEof` for a client that closed first) ends the connection.
    pub fn step(&mut self, fd: RawFd) -> io::Result<Addresses> {
        loop {
            let have = self.buf.len();
            let need = match decode(&self.buf) {
                Err(HeaderError::Incomplete { need }) => need,
                Ok(h) => return Ok(h.addresses),
                Err(e) => return Err(invalid(e)),
            };
            if need > MAX_LEN {
                return Err(invalid(format!(
                    "a PROXY header of {need} bytes, more than {MAX_LEN}"
                )));
            }
            // Room for any v1 line, or for the rest of a v2 header once its length is known.
            self.buf.resize(need.clamp(V1_MAX_LEN, MAX_LEN), 0);
            let peeked = match recv(fd, &mut self.buf[have..], libc::MSG_PEEK) {
                Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            };
            self.buf.truncate(have + peeked.as_ref().map_or(0, |n| *n));
            let n = peeked?;
            let (take, whole) = match decode(&self.buf) {
                Ok(h) => (h.len - have, true),
                Err(HeaderError::Incomplete { .. }) => (n, false),
                Err(e) => return Err(invalid(e)),
            };
            // The same bytes again, taken this time: they are in the socket, so one call gets them all.
            let got = recv(fd, &mut self.buf[have..have + take], 0)?;
            if got != take {
                return Err(io::Error::other(format!("took {got} of {take} peeked bytes")));
            }
            self.buf.truncate(have + take);
            if whole {
                return decode(&self.buf).map(|h| h.addresses).map_err(invalid);
            }
        }
    }
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// One non-blocking `recv` into `buf` with `flags` (`MSG_PEEK`: the bytes stay in the socket).
pub(super) fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into a live, exclusively borrowed buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags | libc::MSG_DONTWAIT) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    /// A connected pair: the client end, and the accepted end (non-blocking) the header is read from.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    /// Steps until the header is whole or refused; `WouldBlock` is waited out by polling the socket.
    fn read(inb: &mut Inbound, s: &TcpStream) -> io::Result<Addresses> {
        loop {
            match inb.step(s.as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: polls one live descriptor, for at most 10 s.
                    assert!(
                        unsafe { libc::poll(&mut p, 1, 10_000) } > 0,
                        "no bytes within 10 s"
                    );
                }
                r => return r,
            }
        }
    }

    #[test]
    fn takes_the_header_and_leaves_the_payload_whole() {
        for header in [
            b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 443\r\n".to_vec(),
            xcluster_proto::proxy_header::encode_v2(
                "10.1.2.3:40000".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap(),
            ),
        ] {
            // In one segment with the payload, and byte by byte.
            for split in [false, true] {
                let (mut c, mut s) = pair();
                let mut inb = Inbound::default();
                if split {
                    for b in &header {
                        c.write_all(&[*b]).unwrap();
                        c.flush().unwrap();
                        let r = inb.step(s.as_raw_fd());
                        assert!(
                            r.is_ok() || r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
                            "{r:?}"
                        );
                    }
                    c.write_all(b"GET /").unwrap();
                } else {
                    c.write_all(&[&header[..], b"GET /"].concat()).unwrap();
                }
                let a = read(&mut inb, &s).unwrap();
                assert_eq!(
                    a,
                    Addresses::Proxied {
                        src: "10.1.2.3:40000".parse().unwrap(),
                        dst: "10.0.0.1:443".parse().unwrap()
                    }
                );
                s.set_nonblocking(false).unwrap();
                let mut rest = [0u8; 5];
                s.read_exact(&mut rest).unwrap();
                assert_eq!(
                    &rest, b"GET /",
                    "the payload after the header stays in the socket"
                );
            }
        }
    }

    #[test]
    fn refuses_what_is_not_a_header_and_a_client_that_leaves() {
        let (mut c, s) = pair();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = read(&mut Inbound::default(), &s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");

        // A v2 header that says it is longer than MAX_LEN.
        let (mut c, s) = pair();
        let mut h = xcluster_proto::proxy_header::SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        c.write_all(&h).unwrap();
        let e = read(&mut Inbound::default(), &s).unwrap_err();
        assert!(e.to_string().contains("more than 4096"), "{e}");

        let (mut c, s) = pair();
        c.write_all(b"PROXY TCP4 1.2").unwrap();
        drop(c);
        let e = read(&mut Inbound::default(), &s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
