//! Whether a closing proxy listener can hand its clients over to another process instead of refusing new
//! handshakes for a while ([`xcluster_runtime::net::Closing`]).
//!
//! Balancers on one host share each proxy port through SO_REUSEPORT. When one of them drains, the kernel
//! still hashes new SYNs to its sockets until they close, and closing a listener resets the clients in its
//! accept queue. So by default a closing listener drops SYNs for a settle time, and its clients find the
//! other balancer only at their SYN retry, a second later. Linux 5.14+ can do better: with
//! `net.ipv4.tcp_migrate_req = 1`, closing a listener moves its handshakes in flight and its accept queue to
//! another socket of its group. That is safe only when such a socket stays open, that is one in another
//! process: this process's own sockets for the address all close together. Both facts are read when the
//! listener begins to close, off the workers' loops: the sysctl, and the listening sockets on the address
//! (a `sock_diag` netlink dump of listeners only, so its cost does not grow with the connections).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use tracing::{debug, info};

const MIGRATE_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// The socket's inode, which `sock_diag` reports for each socket.
pub fn inode(socket: impl AsFd) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(socket.as_fd())?.st_ino)
}

/// Whether closing the listening sockets `own` (every one of this process's sockets on `addr`) hands their
/// clients to another process: the kernel migrates them, and another process listens on `addr`.
pub fn possible(addr: SocketAddr, own: &[u64]) -> bool {
    migrate_on() && shared_with_another(addr, own)
}

/// Says, once a listener is bound, when another process shares its address but the kernel would not hand
/// clients over: each restart of either one then stalls some clients for a second.
pub fn advise(addr: SocketAddr, own: &[u64], name: &str) {
    if !migrate_on() && shared_with_another(addr, own) {
        info!(
            listener = %name, %addr,
            "another process listens on this address too; with net.ipv4.tcp_migrate_req = 1 a restart of \
             either one would hand its clients to the other instead of dropping their SYNs for 0.2 s"
        );
    }
}

/// Whether a socket other than `own` listens on `addr`: another process's (this one's are all in `own`).
fn shared_with_another(addr: SocketAddr, own: &[u64]) -> bool {
    match listeners(addr) {
        Ok(found) => found.iter().any(|i| !own.contains(i)),
        Err(e) => {
            debug!(%addr, error = %e, "cannot list the listeners sharing the address");
            false
        }
    }
}

fn migrate_on() -> bool {
    std::fs::read_to_string(MIGRATE_SYSCTL).is_ok_and(|s| s.trim() == "1")
}

// From <linux/sock_diag.h>, <linux/inet_diag.h> and <linux/netlink.h>.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDR: usize = 16;
const REQ_LEN: usize = 56;
const MSG_LEN: usize = 72;
/// A dump reply's worst case is bounded by the kernel's page-sized batches; this holds several.
const RECV_BUF: usize = 64 * 1024;
/// Ends a dump that never says it is done.
const MAX_REPLIES: usize = 1024;

/// The inodes of the TCP sockets listening on exactly `addr` in this network namespace.
fn listeners(addr: SocketAddr) -> io::Result<Vec<u64>> {
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval for the call's duration.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let req = request(family as u8);
    // SAFETY: `req` is alive and initialised for the call; the kernel is the peer (address zero).
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; RECV_BUF];
    let mut found = Vec::new();
    for _ in 0..MAX_REPLIES {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(n).unwrap_or(0);
        if parse(&buf[..n], addr, &mut found)? {
            return Ok(found);
        }
    }
    Err(io::Error::other("sock_diag dump did not end"))
}

/// A dump request for the family's listening TCP sockets (the address is matched in [`parse`]).
fn request(family: u8) -> [u8; NLMSG_HDR + REQ_LEN] {
    let mut m = [0u8; NLMSG_HDR + REQ_LEN];
    let len = (NLMSG_HDR + REQ_LEN) as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let r = &mut m[NLMSG_HDR..];
    r[0] = family;
    r[1] = libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m
}

/// Reads one datagram of the dump into `found`; true once the dump is done.
fn parse(mut b: &[u8], addr: SocketAddr, found: &mut Vec<u64>) -> io::Result<bool> {
    let bad = || io::Error::other("malformed sock_diag reply");
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(b[0..4].try_into().map_err(|_| bad())?) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().map_err(|_| bad())?);
        if len < NLMSG_HDR || len > b.len() {
            return Err(bad());
        }
        let body = &b[NLMSG_HDR..len];
        match i32::from(ty) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
            }
            _ if ty == SOCK_DIAG_BY_FAMILY && body.len() >= MSG_LEN && matches(body, addr) => {
                let inode = u32::from_ne_bytes([body[68], body[69], body[70], body[71]]);
                found.push(u64::from(inode));
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes.
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(false)
}

/// Whether an `inet_diag_msg` is a socket bound to exactly `addr` (port big-endian at 4, address at 8).
fn matches(msg: &[u8], addr: SocketAddr) -> bool {
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    port == addr.port()
        && match addr {
            SocketAddr::V4(a) => msg[8..12] == a.ip().octets(),
            SocketAddr::V6(a) => msg[8..24] == a.ip().octets(),
        }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reuseport(addr: SocketAddr) -> std::net::TcpListener {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(8).unwrap();
        s.into()
    }

    /// The dump finds both sockets of a SO_REUSEPORT group by inode, and nothing on another port or address.
    #[test]
    fn the_dump_lists_the_listeners_on_the_address() {
        let a = reuseport("127.0.0.1:0".parse().unwrap());
        let addr = a.local_addr().unwrap();
        let b = reuseport(addr);
        let _other = reuseport("127.0.0.1:0".parse().unwrap());
        let mut found = listeners(addr).unwrap();
        found.sort_unstable();
        let mut want = vec![inode(&a).unwrap(), inode(&b).unwrap()];
        want.sort_unstable();
        assert_eq!(found, want);
        let elsewhere = SocketAddr::new("127.0.0.2".parse().unwrap(), addr.port());
        assert!(listeners(elsewhere).unwrap().is_empty());
    }

    #[test]
    fn a_truncated_reply_is_an_error_not_a_panic() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut m = vec![0u8; NLMSG_HDR];
        m[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(parse(&m, addr, &mut Vec::new()).is_err());
        m[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse(&m, addr, &mut Vec::new()).is_err());
        // A message too short to be a socket is skipped.
        m[0..4].copy_from_slice(&16u32.to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(!parse(&m, addr, &mut Vec::new()).unwrap());
    }
}
