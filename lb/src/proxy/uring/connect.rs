//! A new connection: its preamble (a PROXY header, a TLS hello) and the connect to a backend, with
//! redispatch.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use io_uring::types::{Fd, Timespec};
use io_uring::{opcode, squeue};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::debug;
use xcluster_proto::proxy_header::Addresses;

use crate::proxy::access::{End, Side};
use crate::proxy::clients::ClientSlot;
use crate::proxy::conn::Active;
use crate::proxy::limit::Permit;
use crate::proxy::queue::{Wait, Waker};
use crate::proxy::service::{ListenerState, NoBackend};
use crate::proxy::sni::Hello;

use super::{Conn, Connecting, DIR, Loop, Op, WAIT_BACKUP_TS, user_data};

impl Loop {
    pub(super) fn start_conn(
        &mut self,
        client: OwnedFd,
        peer: SocketAddr,
        l: Arc<ListenerState>,
        permit: Permit,
        slot: Option<Box<ClientSlot>>,
    ) {
        let header = l.cfg.accept_proxy.then(Box::default);
        let hello = l.cfg.sni.is_some().then(Hello::default);
        let conn = Conn {
            client,
            backend: None,
            active: Active::new(l, permit, slot, peer),
            _token: self.shared.tracker.token(),
            connecting: Some(Box::new(Connecting {
                peer,
                to: None,
                header,
                hello,
                routed: None,
                tried: Vec::new(),
                attempt: 0,
                wait: Wait::default(),
                addr: peer,
                bm: None,
                sockaddr: SockAddr::from(peer),
                timeout: Timespec::new(),
                started: Instant::now(),
            })),
            dirs: [DIR; 2],
            ops: 0,
            last_ms: self.now_ms,
            unflushed: [0; 2],
            closing: false,
            downs_seen: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                u32::try_from(self.conns.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.read_preamble(slot);
    }

    /// Reads what the client sends before a backend is picked, as far as its socket holds it: its PROXY
    /// header (`accept_proxy`), then its TLS hello (`sni`). While bytes are missing, a poll waits for more,
    /// with a linked timeout so that both take at most the connect timeout from the accept. Then the connect.
    pub(super) fn read_preamble(&mut self, slot: u32) {
        enum Step {
            Wait,
            Header(io::Result<Addresses>),
            Hello(Option<String>),
            Connect,
        }
        let connect = self.shared.timeouts.load().connect;
        let Some(c) = self.conn(slot) else { return };
        let Some(k) = c.connecting.as_mut() else { return };
        let fd = c.client.as_raw_fd();
        let pending = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
        let step = if let Some(header) = k.header.as_mut() {
            match header.step(fd) {
                Err(e) if pending(&e) => Step::Wait,
                read => Step::Header(read),
            }
        } else if let Some(hello) = k.hello.as_mut() {
            match hello.step(fd) {
                Err(e) if pending(&e) => Step::Wait,
                read => Step::Hello(read.ok().flatten()),
            }
        } else {
            Step::Connect
        };
        match step {
            Step::Wait => {
                let left = connect.saturating_sub(k.started.elapsed());
                if left.is_zero() {
                    self.preamble_failed(slot, io::ErrorKind::TimedOut.into());
                    return;
                }
                k.timeout = Timespec::from(left);
                let poll = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(user_data(Op::Header, slot, 0));
                let timeout = (opcode::LinkTimeout::new(&k.timeout).build()).user_data(user_data(
                    Op::LinkTimeout,
                    slot,
                    0,
                ));
                c.ops += 2;
                self.push_all(&[poll, timeout]);
            }
            Step::Header(read) => self.header_read(slot, read),
            Step::Hello(name) => self.hello_read(slot, name),
            Step::Connect => self.connect_next(slot),
        }
    }

    /// The poll for more of a PROXY header or a TLS hello completed: bytes came, or (ECANCELED) its timeout
    /// fired.
    pub(super) fn on_header(&mut self, slot: u32, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        match res {
            0.. => self.read_preamble(slot),
            e if e == -libc::ECANCELED => self.preamble_failed(slot, io::ErrorKind::TimedOut.into()),
            e => self.preamble_failed(slot, io::Error::from_raw_os_error(-e)),
        }
    }

    /// The connect timeout ran out, or the poll failed, while the client's PROXY header or TLS hello was
    /// incomplete: the former closes the connection, the latter sends it to the listener's own type.
    pub(super) fn preamble_failed(&mut self, slot: u32, e: io::Error) {
        let Some(c) = self.conn(slot) else { return };
        let Some(k) = c.connecting.as_mut() else { return };
        if k.header.is_some() {
            self.header_read(slot, Err(e));
        } else {
            if let Some(hello) = k.hello.as_mut() {
                hello.end(c.client.as_raw_fd());
            }
            self.hello_read(slot, None);
        }
    }

    /// The client's PROXY header is read, or failed to be: on to its hello or the connect, or closed.
    pub(super) fn header_read(&mut self, slot: u32, read: io::Result<Addresses>) {
        let Some(c) = self.conn(slot) else { return };
        let Some(k) = c.connecting.as_mut() else { return };
        k.header = None;
        match c.active.header_read(read, k.peer) {
            Some((peer, to)) => {
                (k.peer, k.to) = (peer, to);
                self.read_preamble(slot);
            }
            None => self.close(slot),
        }
    }

    /// The client's TLS hello gave `name`, or none: the type it routes to, then the connect.
    pub(super) fn hello_read(&mut self, slot: u32, name: Option<String>) {
        let Some(c) = self.conn(slot) else { return };
        let Some(k) = c.connecting.as_mut() else { return };
        k.hello = None;
        match c.active.hello_read(name) {
            Some(routed) => {
                k.routed = routed;
                self.connect_next(slot);
            }
            None => self.close(slot),
        }
    }

    /// Submits a connect to the next backend, with its timeout linked; when every backend is full, a timer
    /// to try again while `queue_timeout_ms` allows; when every backend has been tried, a timer to try them
    /// again (`connect_retry_delay_ms`); closes the client when no attempt is left (none of its bytes were
    /// read, so a retry is invisible to it).
    pub(super) fn connect_next(&mut self, slot: u32) {
        let t = self.shared.timeouts.load_full();
        let shared = self.shared.clone();
        loop {
            // The field, not `conn()`, so that the queue's waker below may borrow `door` beside it.
            let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
                return;
            };
            let l = c.active.l.clone();
            let Some(k) = c.connecting.as_mut() else { return };
            if k.wait.left(c.client.as_fd()) {
                let end = c.active.wait_left(&k.wait);
                self.give_up(slot, end);
                return;
            }
            let ty = k.routed.as_deref().unwrap_or(&l.cfg.request_type);
            let (addr, bm) =
                match shared.next_backend(&l, ty, k.peer.ip(), &k.tried, k.attempt, k.wait.ticket()) {
                    Ok(pick) => pick,
                    Err(NoBackend::Full)
                        if shared.keep_waiting(&l, ty, &mut k.wait, || Waker::Ring {
                            door: self.door.clone(),
                            slot,
                        }) =>
                    {
                        if k.wait.just_joined() {
                            continue;
                        }
                        // Ended early by a knock (`on_wake` cancels it), else the backup retry.
                        let e = (opcode::Timeout::new(&WAIT_BACKUP_TS).build()).user_data(user_data(
                            Op::Queue,
                            slot,
                            0,
                        ));
                        c.ops += 1;
                        self.push(&e);
                        return;
                    }
                    Err(NoBackend::TurnAround) => {
                        // Every backend has been tried: all of them again after the pause, which ends as
                        // `Op::Queue` does, in a pick.
                        k.tried.clear();
                        k.timeout = Timespec::from(t.retry_delay);
                        let e = (opcode::Timeout::new(&k.timeout).build()).user_data(user_data(
                            Op::Queue,
                            slot,
                            0,
                        ));
                        c.ops += 1;
                        self.push(&e);
                        return;
                    }
                    Err(why) => {
                        let end = c.active.wait_failed(&k.wait, why);
                        self.give_up(slot, end);
                        return;
                    }
                };
            c.active.wait_served(&mut k.wait);
            k.attempt += 1;
            c.active.tried(addr);
            // Its backend's count of falls (low byte) from the pick on: checks that put it down while this
            // connects close it too. Taken once connected, a fall in between was missed, and the connection
            // stayed on the down backend until its idle timeout.
            c.downs_seen = bm.downs.load(Ordering::Acquire) as u8;
            let socket = match backend_socket(addr) {
                Ok(s) => s,
                // This process's (or the host's) descriptors or memory, not the backend: holding it out for
                // it showed healthy backends failing through a burst of clients.
                Err(e) => {
                    debug!(backend = %addr, error = %e, "cannot open a socket");
                    let errno = e.raw_os_error().unwrap_or(0);
                    self.give_up(slot, End::Error(Side::Backend, errno));
                    return;
                }
            };
            k.addr = addr;
            k.bm = Some(bm);
            k.sockaddr = SockAddr::from(addr);
            k.timeout = Timespec::from(t.connect);
            k.started = Instant::now();
            let fd = socket.as_raw_fd();
            let connect = opcode::Connect::new(Fd(fd), k.sockaddr.as_ptr().cast(), k.sockaddr.len())
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(user_data(Op::Connect, slot, 0));
            let timeout =
                opcode::LinkTimeout::new(&k.timeout)
                    .build()
                    .user_data(user_data(Op::LinkTimeout, slot, 0));
            c.backend = Some(socket);
            c.ops += 2;
            self.push_all(&[connect, timeout]);
            return;
        }
    }

    /// Closes a client that takes no backend (none can take it, or it left while it waited; counted by
    /// `Active::wait_failed` and `wait_left`).
    pub(super) fn give_up(&mut self, slot: u32, end: End) {
        let Some(c) = self.conn(slot) else { return };
        if let Some(k) = &c.connecting {
            debug!(listener = %c.active.l.cfg.name, peer = %k.peer, why = %end, "no backend taken; closing the client");
        }
        c.active.ended(end);
        self.close(slot);
    }

    pub(super) fn on_connect(&mut self, slot: u32, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let now_ms = self.now_ms;
        let shared = self.shared.clone();
        let Some(c) = self.conn(slot) else { return };
        let Some(k) = c.connecting.as_mut() else { return };
        let Some(bm) = k.bm.take() else { return };
        let (addr, peer, to, started) = (k.addr, k.peer, k.to, k.started);
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            // No local port toward it, or out of memory here: not the backend's failure, so it is not held
            // out; another backend is tried for the first.
            let local_ports = crate::proxy::listener::out_of_local_ports(&e);
            if local_ports || crate::proxy::listener::is_resource_exhaustion(&e) {
                debug!(backend = %addr, error = %e, "cannot connect from this host");
                c.backend = None;
                drop(bm);
                if local_ports {
                    k.tried.push(addr);
                    self.connect_next(slot);
                } else {
                    self.give_up(slot, End::Error(Side::Backend, -res));
                }
                return;
            }
            // ECANCELED: the linked timeout fired first.
            debug!(backend = %addr, error = %e, "connect failed or timed out");
            shared.connect_failed(addr, &bm, &mut k.tried);
            c.backend = None;
            // Uncounted before the next pick.
            drop(bm);
            self.connect_next(slot);
            return;
        }
        shared.connected(addr, &bm, started);
        debug!(backend = %addr, "connected");
        c.active.connected_to(addr);
        if c.active.l.cfg.proxy_protocol && !send_proxy_header(c, peer, to) {
            debug!(backend = %addr, "cannot send the PROXY header");
            c.active.ended(End::ProxyHeader);
            self.close(slot);
            return;
        }
        c.connecting = None;
        c.active.set_backend(bm);
        c.last_ms = now_ms;
        self.arm_recv(slot, 0);
        self.arm_recv(slot, 1);
    }
}

/// A non-blocking socket for a connect to `addr`, with TCP_NODELAY.
fn backend_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Writes the PROXY v2 header on a just-connected backend socket. Its send buffer is empty, so the few
/// dozen bytes go in one non-blocking `send` or the connection is given up.
fn send_proxy_header(c: &Conn, peer: SocketAddr, to: Option<SocketAddr>) -> bool {
    let local = to.unwrap_or_else(|| {
        socket2::SockRef::from(&c.client)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(c.active.l.cfg.listen)
    });
    let header = xcluster_proto::proxy_header::encode_v2(peer, local);
    let Some(b) = &c.backend else { return false };
    // SAFETY: sends from a live buffer on a descriptor this connection owns.
    let n = unsafe {
        libc::send(
            b.as_raw_fd(),
            header.as_ptr().cast(),
            header.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).is_ok_and(|n| n == header.len())
}
