//! One proxied connection: pick and connect a backend with redispatch, send the optional PROXY header, then
//! forward both directions until both end, either side fails, or the idle timeout fires. The end of the
//! drain grace period needs nothing here: it ends the worker runtimes, which drops every connection.
//!
//! The task is [`Serve`]: a boxed connect phase (its large futures are freed once the backend answers), then
//! [`Conn`], a hand-written future of a few hundred bytes, because what a connection holds while forwarding is
//! what every idle connection costs.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use metrics::Counter;
use pin_project_lite::pin_project;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Sleep;
use tracing::{Instrument, debug, debug_span};
use xcluster_proto::proxy_header::Addresses;

use super::access::{self, ConnLog, End, Side};
use super::clients::ClientSlot;
use super::config::Timeouts;
use super::forward::Direction;
use super::inbound::Inbound;
use super::limit::Permit;
use super::metrics::Assigned;
use super::queue::{WAIT_BACKUP, Wait, Waker};
use super::service::{Admit, ListenerState, NoBackend, Shared};
use super::sni::Hello;

/// Counts the connection on the listener's active gauge, and on its backend's once connected, for as long
/// as it lives; holds the connection's permit of `max_connections` (and its place on its listener).
pub(super) struct Active {
    pub(super) l: Arc<ListenerState>,
    pub(super) bm: Option<Assigned>,
    _permit: OwnedSemaphorePermit,
    /// Its count against its client's `max_connections_per_client`, on listeners with one.
    client: Option<Box<ClientSlot>>,
    /// Its record for the connection log, on listeners with `log_connections`; written when this drops.
    pub(super) log: Option<Box<ConnLog>>,
}

impl Active {
    /// A connection just accepted on `l` from `peer` (counted as accepted, and active while this lives).
    pub(super) fn new(
        l: Arc<ListenerState>,
        permit: Permit,
        client: Option<Box<ClientSlot>>,
        peer: SocketAddr,
    ) -> Self {
        l.metrics.accepted.increment(1);
        l.metrics.active.increment(1.0);
        // Given back by `drop`, through `l`: the place is its listener's.
        permit.place.keep();
        let log = l.cfg.log_connections.then(|| ConnLog::new(peer));
        Self {
            l,
            bm: None,
            _permit: permit.all,
            client,
            log,
        }
    }

    /// Takes in what reading the client's PROXY header (`accept_proxy`, see `inbound`) gave, for a
    /// connection from `peer`: the client's own address (named in the connection log from now on, and
    /// admitted by the listener's `allow`/`deny` and `max_connections_per_client`) and the address it
    /// connected to, or `None` when the connection must close: no valid header, or a client refused (each
    /// counted).
    pub(super) fn header_read(
        &mut self,
        header: std::io::Result<Addresses>,
        peer: SocketAddr,
    ) -> Option<(SocketAddr, Option<SocketAddr>)> {
        let (client, to) = match header {
            Ok(Addresses::Proxied { src, dst }) => (src, Some(dst)),
            // `LOCAL` (a front balancer's own health check): the socket's addresses stand.
            Ok(Addresses::Local) => (peer, None),
            Err(e) => {
                self.l.metrics.header_errors.increment(1);
                self.ended(End::ClientHeader);
                debug!(listener = %self.l.cfg.name, %peer, error = %e, "no valid PROXY header; closing the client");
                return None;
            }
        };
        if let Some(g) = self.log.as_deref_mut() {
            g.client = client;
        }
        match self.l.admit_client(client) {
            Admit::Open(slot) => {
                self.client = slot;
                Some((client, to))
            }
            Admit::Rejected(end) => {
                self.ended(end);
                None
            }
        }
    }

    /// Takes in the server name the client's TLS hello gave, if any, on a listener with `sni`: `Some` of
    /// the request type it routes to (`None` within: the listener's own), or `None` when the connection
    /// must close (`sni_only`, no name listed). Each is counted; the name goes to the log.
    pub(super) fn hello_read(&mut self, name: Option<String>) -> Option<Option<Arc<str>>> {
        let Some(routes) = self.l.cfg.sni.as_ref() else {
            return Some(None);
        };
        let ty = name.as_deref().and_then(|n| routes.route(n)).cloned();
        let refused = ty.is_none() && self.l.cfg.sni_only;
        let to = if refused { 2 } else { usize::from(ty.is_none()) };
        self.l.metrics.sni[to].increment(1);
        debug!(listener = %self.l.cfg.name, sni = name.as_deref(), request_type = ty.as_deref(), refused, "TLS hello read");
        if let Some(g) = self.log.as_deref_mut() {
            g.sni = name.map(String::into_boxed_str);
        }
        if refused {
            self.ended(End::NoSniRoute);
            return None;
        }
        Some(ty)
    }

    /// A connect to `addr` is tried (for the connection log).
    pub(super) fn tried(&mut self, addr: SocketAddr) {
        if let Some(g) = self.log.as_deref_mut() {
            g.tried(addr);
        }
    }

    /// It has a backend: its wait for a place (if it waited) ends, and goes to the connection log.
    pub(super) fn wait_served(&mut self, wait: &mut Wait) {
        let waited = wait.served();
        self.log_wait(waited);
    }

    /// It gets no backend (`why`): counted as failed; how it ends, a queue timeout if it was waiting for a
    /// place (its wait logged).
    pub(super) fn wait_failed(&mut self, wait: &Wait, why: NoBackend) -> End {
        self.l.metrics.failed.increment(1);
        self.log_wait(wait.waited());
        wait.end(why)
    }

    /// Its client left while it waited for a place ([`Wait::left`]): counted apart from the failures, which
    /// are the proxy's; its wait logged.
    pub(super) fn wait_left(&mut self, wait: &Wait) -> End {
        self.l.metrics.abandoned.increment(1);
        self.log_wait(wait.waited());
        End::ClientLeft
    }

    fn log_wait(&mut self, waited: Option<std::time::Duration>) {
        if let (Some(g), Some(d)) = (self.log.as_deref_mut(), waited) {
            g.waited(d);
        }
    }

    /// Backend `addr` answered (for the connection log).
    pub(super) fn connected_to(&mut self, addr: SocketAddr) {
        if let Some(g) = self.log.as_deref_mut() {
            g.connected(addr);
        }
    }

    /// How the connection ended, counted here for every runtime and written to its log record.
    pub(super) fn ended(&mut self, end: End) {
        match end {
            End::Error(side, _) => self.l.metrics.errors[side as usize].increment(1),
            End::Idle | End::FinTimeout => self.l.metrics.idle_timeouts.increment(1),
            End::BackendDown => {
                if let Some(bm) = &self.bm {
                    bm.closed_on_down.increment(1);
                }
            }
            _ => {}
        }
        if let Some(g) = self.log.as_deref_mut() {
            g.ended(end);
        }
    }

    /// The connection is established to the backend it was assigned (and is counted on from now on).
    pub(super) fn set_backend(&mut self, bm: Assigned) {
        bm.active.increment(1.0);
        self.bm = Some(bm);
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // The client's count and the listener's place first: once the gauge shows the connection gone, its
        // client may open another.
        self.client = None;
        self.l.limit.release();
        self.l.metrics.active.decrement(1.0);
        if let Some(g) = &self.log {
            g.write(&self.l.cfg.name);
        }
        if let Some(bm) = &self.bm {
            bm.active.decrement(1.0);
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Option<Conn>> + Send>>;

pin_project! {
    /// The task of one accepted client connection, from connect to close.
    #[project = ServeProj]
    pub enum Serve {
        Connecting { fut: Connecting },
        Forwarding { #[pin] conn: Conn },
    }
}

/// Serves one accepted client connection to the end; `permit` is released when it ends.
pub fn serve(
    client: TcpStream,
    peer: SocketAddr,
    l: Arc<ListenerState>,
    shared: Arc<Shared>,
    permit: Permit,
    slot: Option<Box<ClientSlot>>,
) -> Serve {
    // No `set_nodelay` here: the socket inherited TCP_NODELAY from its listener (`listener::bind`).
    let span = debug_span!("proxy", listener = %l.cfg.name, %peer);
    let mut active = Active::new(l, permit, slot, peer);
    Serve::Connecting {
        fut: Box::pin(
            async move {
                let accepted = Instant::now();
                let timeouts = shared.timeouts.load_full();
                // With `accept_proxy`, the client as its header names it; the socket's peer stays `peer`.
                let client_addrs = if active.l.cfg.accept_proxy {
                    let mut header = Inbound::default();
                    let fd = client.as_raw_fd();
                    let read = client.async_io(Interest::READABLE, || header.step(fd));
                    let read = tokio::time::timeout(timeouts.connect, read).await;
                    active.header_read(read.unwrap_or_else(|e| Err(e.into())), peer)?
                } else {
                    (peer, None)
                };
                // With `sni`, the type the client's TLS hello routes to, read within what is left of the
                // connect timeout; `None`: the listener's own.
                let routed = if active.l.cfg.sni.is_some() {
                    let mut hello = Hello::default();
                    let fd = client.as_raw_fd();
                    let read = client.async_io(Interest::READABLE, || hello.step(fd));
                    let left = timeouts.connect.saturating_sub(accepted.elapsed());
                    let name = match tokio::time::timeout(left, read).await {
                        Ok(Ok(name)) => name,
                        _ => {
                            hello.end(fd);
                            None
                        }
                    };
                    active.hello_read(name)?
                } else {
                    None
                };
                let (backend, picked) =
                    establish(&client, client_addrs, routed, &mut active, &shared, &timeouts).await?;
                let up = Direction::new(shared.forwarding);
                let down = Direction::new(shared.forwarding);
                let limits = (active.l.cfg.idle, active.l.cfg.fin);
                Some(Conn::new(client, backend, picked, active, (up, down), limits))
            }
            .instrument(span),
        ),
    }
}

impl Future for Serve {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                ServeProj::Connecting { fut } => match ready!(fut.as_mut().poll(cx)) {
                    Some(conn) => self.set(Self::Forwarding { conn }),
                    None => return Poll::Ready(()),
                },
                ServeProj::Forwarding { conn } => {
                    let outcome = ready!(conn.poll(cx));
                    debug!(?outcome, "connection ended");
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// Connects a backend of type `routed` (`None`: the listener's own) with redispatch, and sends the optional
/// PROXY header, which names `peer` and `to`, the address the client connected to (`None`: the client
/// socket's own).
async fn establish(
    client: &TcpStream,
    (peer, to): (SocketAddr, Option<SocketAddr>),
    routed: Option<Arc<str>>,
    active: &mut Active,
    shared: &Shared,
    timeouts: &Timeouts,
) -> Option<(TcpStream, (Assigned, DownWatch))> {
    let (backend, addr, picked) = match connect(active, routed, client, peer.ip(), shared, timeouts).await {
        Ok(connected) => connected,
        Err(end) => {
            active.ended(end);
            debug!(why = %end, "no backend taken; closing the client");
            return None;
        }
    };
    debug!(backend = %addr, "connected");
    if active.l.cfg.proxy_protocol {
        let local = to.unwrap_or_else(|| client.local_addr().unwrap_or(active.l.cfg.listen));
        let header = xcluster_proto::proxy_header::encode_v2(peer, local);
        match tokio::time::timeout(timeouts.connect, write_all(&backend, &header)).await {
            Ok(Ok(())) => {}
            _ => {
                debug!(backend = %addr, "cannot send the PROXY header");
                active.ended(End::ProxyHeader);
                return None;
            }
        }
    }
    Some((backend, picked))
}

/// Writes all of `data` through a shared reference (the header is small: one write in practice).
async fn write_all(s: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Tries up to `connect_attempts` connects for a connection of type `routed` (`None`: its listener's) from
/// `client`, each to a backend not tried yet and, once all have been, to them again after
/// `connect_retry_delay_ms`; none of its bytes are read before one answers, so a retry is invisible to it.
/// When every backend is full, it waits for a place up to `queue_timeout_ms`. Else how the connection ends.
async fn connect(
    active: &mut Active,
    routed: Option<Arc<str>>,
    stream: &TcpStream,
    client: IpAddr,
    shared: &Shared,
    t: &Timeouts,
) -> Result<(TcpStream, SocketAddr, (Assigned, DownWatch)), End> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0;
    let mut wait = Wait::default();
    // Made the first time the connection waits; the queue rings it when its turn may have come.
    let mut bell: Option<Arc<Notify>> = None;
    loop {
        if wait.left(stream.as_fd()) {
            return Err(active.wait_left(&wait));
        }
        let l = &*active.l;
        let ty = routed.as_deref().unwrap_or(&l.cfg.request_type);
        let (addr, bm) = match shared.next_backend(l, ty, client, &tried, attempt, wait.ticket()) {
            Ok(pick) => pick,
            Err(NoBackend::Full)
                if shared.keep_waiting(l, ty, &mut wait, || {
                    Waker::Task(bell.get_or_insert_with(Arc::default).clone())
                }) =>
            {
                if !wait.just_joined()
                    && let Some(bell) = &bell
                {
                    // A ring that came while it asked is kept by the bell, so it is not missed here.
                    let _ = tokio::time::timeout(WAIT_BACKUP, bell.notified()).await;
                }
                continue;
            }
            Err(NoBackend::TurnAround) => {
                tried.clear();
                tokio::time::sleep(t.retry_delay).await;
                continue;
            }
            Err(why) => return Err(active.wait_failed(&wait, why)),
        };
        active.wait_served(&mut wait);
        attempt += 1;
        active.tried(addr);
        let down = watch_down(&bm);
        let t0 = Instant::now();
        match tokio::time::timeout(t.connect, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                shared.connected(addr, &bm, t0);
                active.connected_to(addr);
                let _ = s.set_nodelay(true);
                return Ok((s, addr, (bm, down)));
            }
            // No local port toward it: another backend is tried, and this one is not held out.
            Ok(Err(e)) if crate::proxy::listener::out_of_local_ports(&e) => {
                debug!(backend = %addr, error = %e, "no local port toward the backend");
                tried.push(addr);
                continue;
            }
            // Out of descriptors or memory here: not the backend's failure, so it is not held out.
            Ok(Err(e)) if crate::proxy::listener::is_resource_exhaustion(&e) => {
                debug!(backend = %addr, error = %e, "cannot open a socket");
                return Err(End::Error(Side::Backend, e.raw_os_error().unwrap_or(0)));
            }
            Ok(Err(e)) => debug!(backend = %addr, error = %e, "connect failed"),
            Err(_) => debug!(backend = %addr, timeout = ?t.connect, "connect timed out"),
        }
        shared.connect_failed(addr, &bm, &mut tried);
    }
}

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Error(Side, std::io::Error),
    Idle,
    /// Half-closed, and idle for `fin_timeout_ms`.
    FinTimeout,
    /// Its backend went down, which has `close_on_down`.
    BackendDown,
}

pin_project! {
    /// An established connection: both directions, and one timer for the idle timeout.
    pub struct Conn {
        client: TcpStream,
        backend: TcpStream,
        up: Direction,
        down: Direction,
        active: Active,
        start: Instant,
        // Milliseconds after `start` of the last byte moved either way.
        last_ms: u64,
        idle: Duration,
        // `fin_timeout_ms`, until the connection half-closes: then it replaces `idle` (and `finning` is set).
        fin: Option<Duration>,
        finning: bool,
        // Woken when health checks put the backend down, if it has `close_on_down` (else no allocation).
        backend_down: DownWatch,
        // Which direction goes first at the next poll: they take turns. Both spend the task's one
        // cooperative budget, so with `up` always first, an upload that never ran dry spent it all at every
        // poll, and the download read nothing for as long as the upload lasted.
        down_first: bool,
        // Pushed forward lazily: activity only stamps `last_ms`, and the timer, when it fires, re-arms itself
        // for `last + idle`. One timer for the connection's life, never one per read.
        #[pin]
        timer: Sleep,
    }
}

/// Wakes a connection whose backend health checks put down, if it has `close_on_down` (else no allocation).
type DownWatch = Option<Pin<Box<OwnedNotified>>>;

/// A [`DownWatch`] on `bm`, made at the pick: a `Notified` hears `notify_waiters` from its creation on, so a
/// fall while the connection connects (or sends its PROXY header) closes it too. Made once connected, it
/// missed that fall, and the connection stayed on the down backend until its idle timeout.
fn watch_down(bm: &Assigned) -> DownWatch {
    (bm.close_on_down.load(Ordering::Relaxed)).then(|| Box::pin(bm.down.clone().notified_owned()))
}

impl Conn {
    fn new(
        client: TcpStream,
        backend: TcpStream,
        (bm, backend_down): (Assigned, DownWatch),
        mut active: Active,
        (up, down): (Direction, Direction),
        (idle, fin): (Option<Duration>, Option<Duration>),
    ) -> Self {
        active.set_backend(bm);
        let start = Instant::now();
        let idle = idle.unwrap_or(NO_IDLE_TIMEOUT);
        Self {
            client,
            backend,
            up,
            down,
            active,
            start,
            last_ms: 0,
            idle,
            fin,
            finning: false,
            down_first: false,
            backend_down,
            timer: tokio::time::sleep_until(tokio::time::Instant::from_std(start + idle)),
        }
    }
}

impl Future for Conn {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut this = self.project();
        let (l, bm) = (&this.active.l.metrics, this.active.bm.as_deref());
        let (client_r, client_w) = this.client.split();
        let (backend_r, backend_w) = this.backend.split();
        let (mut up_halves, mut down_halves) = (Some((client_r, backend_w)), Some((backend_r, client_w)));
        let mut moved = false;
        let mut result = None;
        let down_first = std::mem::replace(this.down_first, !*this.down_first);
        // 0: up (client to backend), 1: down.
        for d in if down_first { [1, 0] } else { [0, 1] } {
            if result.is_some() {
                break;
            }
            let (dir, other, halves) = match d {
                0 => (&mut *this.up, &*this.down, up_halves.take()),
                _ => (&mut *this.down, &*this.up, down_halves.take()),
            };
            let Some((src, dst)) = halves.filter(|_| !dir.is_done()) else {
                continue;
            };
            let (listener, backend) = match d {
                0 => (&l.bytes_up, bm.map(|b| &b.bytes_up)),
                _ => (&l.bytes_down, bm.map(|b| &b.bytes_down)),
            };
            let logged = this.active.log.as_deref_mut().map(|g| &mut g.bytes[d]);
            let count = counting(&mut moved, listener, backend, logged);
            if let Poll::Ready(Err(f)) = dir.poll_forward(cx, src, dst, other.is_done(), count) {
                result = Some(Outcome::Error(f.side(d), f.error));
            }
        }
        if result.is_none() && this.up.is_done() && this.down.is_done() {
            result = Some(Outcome::Done);
        }
        if result.is_none() && moved {
            *this.last_ms = u64::try_from(this.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        if result.is_none()
            && (this.up.is_done() || this.down.is_done())
            && let Some(fin) = this.fin.take()
        {
            // Half-closed: from now on the fin timeout counts, from the last byte, sooner or later than the
            // timer is armed for.
            *this.idle = fin;
            *this.finning = true;
            let due = *this.start + Duration::from_millis(*this.last_ms) + fin;
            this.timer.as_mut().reset(tokio::time::Instant::from_std(due));
        }
        if result.is_none()
            && let Some(down) = this.backend_down.as_mut()
            && down.as_mut().poll(cx).is_ready()
        {
            result = Some(Outcome::BackendDown);
        }
        while result.is_none() && this.timer.as_mut().poll(cx).is_ready() {
            let due = *this.start + Duration::from_millis(*this.last_ms) + *this.idle;
            if due <= Instant::now() {
                result = Some(if *this.finning {
                    Outcome::FinTimeout
                } else {
                    Outcome::Idle
                });
            } else {
                this.timer.as_mut().reset(tokio::time::Instant::from_std(due));
            }
        }
        let Some(outcome) = result else {
            return Poll::Pending;
        };
        let end = match &outcome {
            Outcome::Done => End::Closed,
            Outcome::Error(side, e) => End::Error(*side, access::errno(e)),
            Outcome::Idle => End::Idle,
            Outcome::FinTimeout => End::FinTimeout,
            Outcome::BackendDown => End::BackendDown,
        };
        this.active.ended(end);
        Poll::Ready(outcome)
    }
}

/// Counts the bytes of each batch one way, on the listener's and the backend's counter and in the
/// connection's log record if it has one, and notes activity.
fn counting<'a>(
    moved: &'a mut bool,
    listener: &'a Counter,
    backend: Option<&'a Counter>,
    mut logged: Option<&'a mut u64>,
) -> impl FnMut(usize) + 'a {
    move |n| {
        *moved = true;
        // A write (`poll_forward` says 0): activity, its bytes counted at their read.
        if n == 0 {
            return;
        }
        listener.increment(n as u64);
        if let Some(b) = backend {
            b.increment(n as u64);
        }
        if let Some(g) = logged.as_deref_mut() {
            *g += n as u64;
        }
    }
}

/// Stands in for "no idle timeout": far enough never to fire, near enough not to overflow `Instant`.
const NO_IDLE_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 86_400);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The watch made at the pick hears a fall that comes before it is first polled (while the connection
    /// connects); one made after the fall does not.
    #[test]
    fn a_fall_while_connecting_is_heard() {
        let bm = Arc::new(crate::proxy::metrics::BackendMetrics::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            None,
        ));
        bm.close_on_down.store(true, Ordering::Relaxed);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let picked = Assigned::try_new(&bm).unwrap();
        let mut early = watch_down(&picked).unwrap();
        bm.went_down();
        let mut late = watch_down(&picked).unwrap();
        assert!(early.as_mut().poll(&mut cx).is_ready());
        assert!(late.as_mut().poll(&mut cx).is_pending());
    }

    /// The connection future is most of what an idle connection costs (the goal is under 2 KiB per idle
    /// connection, everything included); this guards against a change that silently doubles it.
    #[tokio::test]
    async fn connection_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let c = TcpStream::connect(a).await.unwrap();
        let cfg = crate::proxy::ProxyConfig::for_tests("");
        let shared = Arc::new(Shared::for_tests(&cfg));
        let state = ListenerState::new(&crate::proxy::config::ListenerConfig::for_tests(a), None);
        let all = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let place = state.limit.try_take().unwrap();
        let permit = Permit { all, place };
        let f = serve(c, a, state, shared, permit, None);
        let size = std::mem::size_of_val(&f);
        eprintln!("the connection future is {size} bytes");
        assert!(size <= 384, "the connection future grew to {size} bytes");
    }
}
