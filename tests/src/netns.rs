//! A network namespace of a test's own, for what would change the whole host's network: a kernel setting
//! such as `net.ipv4.tcp_migrate_req`, or TCP counters no other test may move. The namespace belongs to the
//! calling thread, and to the threads and processes it starts from then on; the tests run as root (their
//! set-up installs packages), which `unshare(CLONE_NEWNET)` needs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Moves the calling thread into a new network namespace with its loopback up.
pub fn enter_private() {
    // SAFETY: no pointer; it affects the calling thread only.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "cannot make a network namespace (needs root): {}",
        std::io::Error::last_os_error()
    );
    loopback_up();
}

/// `ifreq` is 40 bytes: the name, then a union whose first member here is the flags (a short).
fn loopback_up() {
    const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr = [0u8; 40];
    ifr[..2].copy_from_slice(b"lo");
    // SAFETY: `ifr` is as large as the kernel's `struct ifreq` and alive for both calls.
    unsafe {
        assert_eq!(libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, ifr.as_mut_ptr()), 0);
        let flags = i16::from_ne_bytes([ifr[16], ifr[17]]) | libc::IFF_UP as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, ifr.as_mut_ptr()),
            0,
            "cannot bring lo up: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sets `net.*` setting `name` (as `net/ipv4/tcp_migrate_req`) in the calling thread's namespace.
pub fn set(name: &str, value: &str) {
    let path = format!("/proc/sys/{name}");
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("cannot set {path}: {e}"));
}

/// A `TcpExt` counter of the calling thread's namespace (`/proc/net` would be the process's first thread's).
pub fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no {name}"));
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}
