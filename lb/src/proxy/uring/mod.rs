//! The `io_uring` runtime of the proxy (`proxy.runtime = "io_uring"`): each worker thread runs its own event
//! loop over one io_uring, with its own SO_REUSEPORT socket per listener, and no tokio.
//!
//! Why a loop of its own: under epoll a message costs a readiness wakeup, a re-poll of the socket
//! (`tcp_poll`) and a syscall for each `recv` and `send`. Here one `io_uring_enter` submits every receive and
//! send the last batch of completions asked for and reaps the next batch. Driving a ring from inside tokio
//! (an eventfd and a driver task) was measured and kept little of the gain; see ARCHITECTURE.md.
//!
//! What it keeps from the tokio runtimes: a permit of `max_connections` is taken before each `accept`, once a
//! client is queued (a poll says so, or the last accept's `IORING_CQE_F_SOCK_NONEMPTY`);
//! accept errors back off; connects time out (a linked timeout) and redispatch; the idle timeout; PROXY
//! protocol v2; half-close both ways; the same metrics; removed listeners accept what is queued on them and
//! leave their connections alone;
//! drain is counted on the same [`TaskTracker`](tokio_util::task::TaskTracker).
//!
//! Bulk streams leave the ring: once a receive fills a whole buffer, the direction pumps with plain syscalls
//! (`Loop::pump_splice`: socket → pooled pipe → socket, never through this process; or `Loop::pump`, one hot
//! buffer at a time, with `forwarding = "copy"`), and goes back to the ring when a turn starts short.
//!
//! Memory: a receive picks its buffer from a ring of provided buffers (`IORING_REGISTER_PBUF_RING`) only
//! when data arrives, so an idle connection holds no buffer, only its slot here (about 100 bytes) and its
//! two pending receives in the kernel. When the ring is empty the pool grows, up to `io_uring_buffers`;
//! beyond that a receive ends with ENOBUFS and waits in a queue for the next buffer given back.
//!
//! Soundness rests on one rule: every operation in flight is counted on its connection, and a slot (its
//! descriptors, and the buffers the kernel may still write through) is freed only when none is left.
//! Closing a connection cancels what is pending on its descriptors and waits for those completions.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, Timespec};
use io_uring::{IoUring, opcode, squeue};
use socket2::{SockAddr, SockAddrStorage};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::error;
use xcluster_runtime::net::Closing;

use super::conn::Active;
use super::forward::Pipe;
use super::inbound::Inbound;
use super::limit::Permit;
use super::listener::Close;
use super::metrics::Assigned;
use super::queue::{RingDoor, WAIT_BACKUP, Wait, poke};
use super::service::{LiveListener, Shared};
use super::sni::Hello;
use super::spin::Spin;

mod bufs;
mod connect;
mod control;
mod flow;

use bufs::Bufs;

/// Submission queue size; the completion queue is twice that, and overflow is kept by the kernel.
const RING_ENTRIES: u32 = 4096;
/// The size of a provided buffer. Their number per worker is at most `proxy.io_uring_buffers` (a power of
/// two, as the buffer ring requires); only directions with bytes in flight hold one.
const BUF_LEN: u32 = 16 * 1024;
/// Buffers handed to the kernel at start. Their memory is reserved for `io_uring_buffers` but touched only
/// once a buffer is handed out, so a worker's resident buffers follow its peak of bytes in flight.
const BUF_INITIAL: u16 = 256;
/// Buffers added at once when a receive finds the ring empty, until `io_uring_buffers` are out. A direction
/// whose destination stalls holds more than `QUEUE_MAX` (a multishot receive takes several buffers in one
/// go before its pause takes effect: measured 4 to 7, and 20 with 200 such streams pushing megabytes), so
/// the pool grows rather than let a few slow peers starve the rest.
const BUF_GROW: u16 = 64;
const BUF_GROUP: u16 = 0;
/// Buffers outside the ring for bulk directions (`Loop::pump`), which receive and send with plain syscalls
/// through one buffer while it is hot in the cache; only a send that would block keeps one. There is one per
/// `SPARE_RATIO` buffers of the ring (at least one, at most `SPARES_MAX`).
const SPARE_RATIO: u16 = 16;
const SPARES_MAX: u16 = 256;
/// Receives a bulk direction makes in one turn before it lets the other connections of its worker go
/// (256 KiB).
const PUMP_MAX: u32 = 16;
/// The same for a direction that splices, in bytes.
const PUMP_BYTES: usize = PUMP_MAX as usize * BUF_LEN as usize;
/// How often the loop wakes on its own: re-arming accepts that wait for a permit or a back-off, and the
/// idle-timeout scan.
const TICK: Duration = Duration::from_millis(50);
/// [`WAIT_BACKUP`] for the ring, which reads it when the timeout is submitted.
static WAIT_BACKUP_TS: Timespec = Timespec::new()
    .sec(WAIT_BACKUP.as_secs())
    .nsec(WAIT_BACKUP.subsec_nanos());
/// After `Finish`, how long the loop waits for cancelled operations to complete before it exits anyway.
const FINISH_WAIT: Duration = Duration::from_millis(500);

/// What the manager tells a worker; each message is followed by a write to the worker's eventfd.
#[derive(Debug)]
pub enum Msg {
    /// Start accepting on `socket`, this worker's SO_REUSEPORT socket of a listener.
    Add {
        id: u64,
        socket: std::net::TcpListener,
        state: LiveListener,
    },
    /// Close listener `id`'s socket as `how` says ([`Closing`]); its connections run on. `closing` keeps the
    /// drain waiting until the socket is closed.
    Remove {
        id: u64,
        how: Close,
        closing: TaskTrackerToken,
    },
    /// Close every connection and end the thread.
    Finish,
}

/// The manager's side of one io_uring worker.
#[derive(Debug)]
pub struct Remote {
    tx: mpsc::Sender<Msg>,
    wake: Arc<OwnedFd>,
}

impl Remote {
    pub fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_ok() {
            poke(&self.wake);
        }
    }
}

/// Starts worker `index`; fails (and starts nothing) when this kernel or its settings refuse io_uring, so
/// the caller can fall back to the tokio runtime.
pub fn spawn(
    index: usize,
    shared: Arc<Shared>,
    buffers: u16,
) -> io::Result<(Remote, std::thread::JoinHandle<()>)> {
    // SAFETY: plain syscall; the result is checked before it is wrapped.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let w = wake.clone();
    let thread = std::thread::Builder::new()
        .name(format!("lb-proxy-{index}"))
        .spawn(move || {
            // The ring is built on the thread that submits to it (SINGLE_ISSUER).
            match Loop::new(shared, rx, w, buffers) {
                Ok(mut l) => {
                    let _ = ready_tx.send(Ok(()));
                    l.run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((Remote { tx, wake }, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(io::Error::other("the io_uring worker ended while starting")),
    }
}

/// What a completion is for: the low 8 bits of its user data; the direction is the next 8, the slot (of a
/// connection or a listener) the top 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Accept = 1,
    /// A poll for the rest of a client's PROXY header (`accept_proxy`) or TLS hello (`sni`).
    Header,
    Connect,
    LinkTimeout,
    Recv,
    Send,
    /// A one-shot poll for readable bytes on a bulk direction's source.
    Ready,
    /// A one-shot poll for room on a spliced direction's destination, while a pipe holds its bytes.
    Writable,
    Cancel,
    Wake,
    Tick,
    /// The wait of a connection that found every backend full, or its pause before it tries again the
    /// backends it has all tried; either ends in a pick.
    Queue,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        [
            Self::Accept,
            Self::Header,
            Self::Connect,
            Self::LinkTimeout,
            Self::Recv,
            Self::Send,
            Self::Ready,
            Self::Writable,
            Self::Cancel,
            Self::Wake,
            Self::Tick,
            Self::Queue,
        ]
        .into_iter()
        .find(|op| *op as u8 == v)
    }
}

fn user_data(op: Op, slot: u32, dir: usize) -> u64 {
    (u64::from(slot) << 32) | ((dir as u64 & 0xff) << 8) | op as u64
}

/// One listener's socket on this worker.
struct Lst {
    id: u64,
    socket: std::net::TcpListener,
    state: LiveListener,
    /// The permit (and place on a limited listener) held by the pending accept: taken before it is
    /// submitted.
    permit: Option<Permit>,
    /// An accept (with `ready`) or a poll for a client (without) is in flight; `ready` changes only at its
    /// completion.
    armed: bool,
    /// A client is queued, as the last accept (`IORING_CQE_F_SOCK_NONEMPTY`) or poll said: only then is a
    /// permit taken and an accept submitted, so a socket with nobody to accept holds no permit.
    ready: bool,
    removed: bool,
    not_before: Option<Instant>,
    backoff: Duration,
    /// Where the pending accept writes the client's address.
    peer: Box<(SockAddrStorage, libc::socklen_t)>,
    /// Set once the listener is removed: it accepts what is queued, then closes.
    closing: Option<(Closing, TaskTrackerToken)>,
}

/// Buffers one direction may hold before its receive is paused (64 KiB in flight, as a socket buffer would
/// hold); it resumes once its sends have brought the queue down to half of that.
const QUEUE_MAX: u16 = 4;
/// "No buffer" in the queue links; buffer ids stay below 32,768.
const NO_BUF: u16 = u16::MAX;

/// One direction of a connection: its multishot receive, and the queue of buffers it received, sent in order
/// one `send` at a time. A non-empty queue always has the send of its head in flight, or listed in
/// `Loop::unsent` until the end of the batch of completions.
#[derive(Debug, Clone, Copy)]
struct Dir {
    /// The buffer being sent, its bytes from `off` on still to go; `NO_BUF` when the queue is empty.
    head: u16,
    /// The last buffer queued; buffers link through `Bufs::next`.
    tail: u16,
    /// At most `BUF_LEN`, so a u16: it keeps the slot small.
    off: u16,
    /// A u16: a multishot receive may take buffers past `QUEUE_MAX` before its cancel lands.
    queued: u16,
    /// A multishot receive is live (until a completion without `IORING_CQE_F_MORE`).
    armed: bool,
    /// The queue is full and a cancel of the receive was submitted.
    pausing: bool,
    /// The source ended; the end is passed on once the queue is sent.
    eof: bool,
    /// The end was passed on.
    done: bool,
    /// Its receive ended with ENOBUFS; it waits in `Loop::starved` for a buffer.
    starved: bool,
    /// The head's first send waits in `Loop::unsent` for the end of the batch.
    unsent: bool,
    /// A bulk stream: a receive filled a whole buffer. It moves its bytes with `Loop::pump` instead of the
    /// multishot receive, until a turn starts with less than a buffer.
    bulk: bool,
    /// Its poll (`Op::Ready` for readable bytes, or `Op::Writable` while a pipe holds its bytes) is in flight.
    polling: bool,
}

const DIR: Dir = Dir {
    head: NO_BUF,
    tail: NO_BUF,
    off: 0,
    queued: 0,
    armed: false,
    pausing: false,
    eof: false,
    done: false,
    starved: false,
    unsent: false,
    bulk: false,
    polling: false,
};

/// What a connection needs only until its backend answers.
struct Connecting {
    /// The client: the socket's peer, or what its PROXY header names (`accept_proxy`).
    peer: SocketAddr,
    /// The address the client connected to, as its PROXY header names it; `None`: the socket's own.
    to: Option<SocketAddr>,
    /// The client's PROXY header while it is being read (`accept_proxy`).
    header: Option<Box<Inbound>>,
    /// The client's TLS hello while it is being waited for (`sni`).
    hello: Option<Hello>,
    /// The request type its hello routes to; `None`: its listener's.
    routed: Option<Arc<str>>,
    tried: Vec<SocketAddr>,
    attempt: u32,
    /// Its wait for a place when every backend is full (`queue_timeout_ms`).
    wait: Wait,
    addr: SocketAddr,
    bm: Option<Assigned>,
    // Read by the kernel when the connect and its linked timeout are submitted.
    sockaddr: SockAddr,
    timeout: Timespec,
    started: Instant,
}

struct Conn {
    client: OwnedFd,
    backend: Option<OwnedFd>,
    active: Active,
    _token: TaskTrackerToken,
    connecting: Option<Box<Connecting>>,
    /// `[up, down]`: client to backend, backend to client.
    dirs: [Dir; 2],
    /// Operations in flight that name this slot.
    ops: u16,
    /// Milliseconds after the loop's epoch of the last byte received either way.
    last_ms: u32,
    /// Bytes received each way and not yet added to the byte counters: they are added on the tick and at
    /// close, not per receive (two atomic adds per message were 1.4% of the proxy's CPU).
    unflushed: [u32; 2],
    closing: bool,
    /// Its backend's [`super::metrics::BackendMetrics::downs`] when it was picked (the low byte).
    downs_seen: u8,
}

impl Conn {
    /// Adds the bytes received since the last flush to the listener's and the backend's counters.
    fn flush_bytes(&mut self) {
        let [up, down] = std::mem::take(&mut self.unflushed);
        if let Some(g) = self.active.log.as_deref_mut() {
            g.bytes[0] += u64::from(up);
            g.bytes[1] += u64::from(down);
        }
        let (l, bm) = (&self.active.l.metrics, self.active.bm.as_deref());
        for (n, lc, bc) in [
            (up, &l.bytes_up, bm.map(|b| &b.bytes_up)),
            (down, &l.bytes_down, bm.map(|b| &b.bytes_down)),
        ] {
            if n > 0 {
                lc.increment(u64::from(n));
                if let Some(b) = bc {
                    b.increment(u64::from(n));
                }
            }
        }
    }

    /// (source, destination) of direction `d`.
    fn fds(&self, d: usize) -> (RawFd, RawFd) {
        let b = self.backend.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let c = self.client.as_raw_fd();
        if d == 0 { (c, b) } else { (b, c) }
    }
}

struct Loop {
    ring: IoUring,
    bufs: Bufs,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    wake: Arc<OwnedFd>,
    /// Where the queue knocks for this worker's waiting connections; behind `wake`'s eventfd.
    door: Arc<RingDoor>,
    wake_buf: Box<u64>,
    tick: Box<Timespec>,
    listeners: Vec<Option<Lst>>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    starved: VecDeque<(u32, usize)>,
    epoch: Instant,
    now_ms: u32,
    last_scan_ms: u32,
    /// Set by `Finish`: the deadline for cancelled operations to complete.
    finishing: Option<Instant>,
    cqes: Vec<(u64, i32, u32)>,
    /// Directions whose queue went from empty to not during this batch: their send is pushed after the
    /// batch, so that an end of stream reaped in the same batch can ride on the last bytes (`push_send`).
    unsent: Vec<(u32, u8)>,
    /// Buffers queued in connections' directions as the held-buffers gauge last counted them (on the tick).
    held_shown: u32,
    /// Pipes holding bytes a spliced direction could not pass on yet (its destination is full), by
    /// `pipe_key(slot, d)`, with how many bytes are left in each. A direction has one at most, and has a
    /// poll for room in flight while it does.
    pipes: HashMap<u64, (Pipe, u32)>,
    /// How long to busy-poll the ring before sleeping.
    spin: Spin,
}

fn pipe_key(slot: u32, d: usize) -> u64 {
    (u64::from(slot) << 1) | (d as u64 & 1)
}

impl Loop {
    fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Msg>,
        wake: Arc<OwnedFd>,
        buffers: u16,
    ) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)?;
        let bufs = Bufs::new(&ring, buffers)?;
        let spin = Spin::new(shared.timeouts.load().busy_poll);
        Ok(Self {
            ring,
            bufs,
            shared,
            rx,
            door: Arc::new(RingDoor::new(wake.clone())),
            wake,
            wake_buf: Box::new(0),
            tick: Box::new(Timespec::from(TICK)),
            listeners: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            starved: VecDeque::new(),
            epoch: Instant::now(),
            now_ms: 0,
            last_scan_ms: 0,
            finishing: None,
            cqes: Vec::with_capacity(1024),
            unsent: Vec::with_capacity(1024),
            held_shown: 0,
            pipes: HashMap::new(),
            spin,
        })
    }

    fn run(&mut self) {
        self.arm_wake();
        self.arm_tick();
        loop {
            let want = usize::from(!self.poll_ring());
            let slept_from = (want == 1 && self.spin.enabled()).then(Instant::now);
            if let Err(e) = self.ring.submit_and_wait(want) {
                // EBUSY: the completion queue overflowed; reaping below makes room.
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) {
                    error!(error = %e, "io_uring proxy worker cannot submit; closing its connections");
                    return;
                }
            }
            if let Some(t) = slept_from {
                self.spin.slept(t.elapsed());
            }
            // Wraps every 49.7 days, on purpose: every comparison is a `wrapping_sub` of spans of at most a
            // day. (It stuck at u32::MAX once, and no idle or fin timeout fired again.)
            self.now_ms = self.epoch.elapsed().as_millis() as u32;
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &cqes {
                self.complete(ud, res, flags);
            }
            cqes.clear();
            self.cqes = cqes;
            self.push_unsent();
            if let Some(deadline) = self.finishing {
                let quiet =
                    self.conns.iter().all(Option::is_none) && self.listeners.iter().all(Option::is_none);
                if quiet || Instant::now() >= deadline {
                    return;
                }
            }
        }
    }

    /// Busy-polls the ring for up to the spin window ([`Spin`]) after submitting what is queued; true when a
    /// completion, or deferred work that makes one, is there (then the caller must not wait for one).
    fn poll_ring(&mut self) -> bool {
        let window = self.spin.window();
        if window.is_zero() {
            return false;
        }
        if !self.ring.submission().is_empty() {
            // An error here is met again, and handled, by the wait that follows.
            let _ = self.ring.submit();
        }
        let until = Instant::now() + window;
        loop {
            // TASKRUN: deferred work is queued (`setup_taskrun_flag`), which the next enter turns into
            // completions; nothing wakes a worker that is not waiting, so none is sent.
            if !self.ring.completion().is_empty() || self.ring.submission().taskrun() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Queues `e`, submitting first when the queue is full.
    fn push(&mut self, e: &squeue::Entry) {
        self.push_all(std::slice::from_ref(e));
    }

    /// Queues `entries` together (a linked chain must not be split across submissions).
    fn push_all(&mut self, entries: &[squeue::Entry]) {
        loop {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() >= entries.len() {
                for e in entries {
                    // SAFETY: every buffer, address and timespec an entry points to lives in this loop's
                    // heap (`Bufs`, `Lst::peer`, `Connecting`, `wake_buf`, `tick`) until its completion
                    // is reaped, or, for what the kernel reads at submission, until the next submit.
                    // Room was checked above.
                    let _ = unsafe { sq.push(e) };
                }
                return;
            }
            drop(sq);
            if let Err(e) = self.ring.submit()
                && !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN))
            {
                // Not expected of a live ring; dropping the entries beats spinning on it.
                error!(error = %e, "io_uring proxy worker cannot submit");
                return;
            }
        }
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let e = opcode::Read::new(Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.push(&e);
    }

    fn arm_tick(&mut self) {
        let ts: *const Timespec = &*self.tick;
        let e = opcode::Timeout::new(ts)
            .build()
            .user_data(user_data(Op::Tick, 0, 0));
        self.push(&e);
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let slot = (ud >> 32) as u32;
        let dir = ((ud >> 8) & 0xff) as usize & 1;
        match Op::from_u8(ud as u8) {
            Some(Op::Wake) => self.on_wake(),
            Some(Op::Tick) => self.on_tick(),
            Some(Op::Accept) => self.on_accept(slot, dir, res, flags),
            Some(Op::Header) => self.on_header(slot, res),
            Some(Op::Connect) => self.on_connect(slot, res),
            Some(Op::LinkTimeout) => {
                self.finish_op(slot);
            }
            Some(Op::Queue) => {
                if self.finish_op(slot) {
                    self.connect_next(slot);
                }
            }
            Some(Op::Recv) => self.on_recv(slot, dir, res, flags),
            Some(Op::Send) => self.on_send(slot, dir, res),
            Some(Op::Ready) => self.on_ready(slot, dir, res),
            Some(Op::Writable) => self.on_writable(slot, dir, res),
            Some(Op::Cancel) | None => {}
        }
    }

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Gives a buffer back to the kernel (or a spare to its stack), and lets directions that found the ring
    /// empty try again: as many whose receive is armed again as the ring holds buffers. A woken direction may
    /// take no ring buffer (a bulk one pumps through a spare; one whose queue is still sending resumes as it
    /// drains), and then the buffer is still for the next: a wake spent on it would leave the buffer in the
    /// ring and the others waiting for a give that may not come. Nor does an armed receive take one until
    /// its bytes come (the kernel puts back the buffer it picked when the socket is empty): one armed wake
    /// per give left a direction with bytes waiting behind one that had none, while the buffer sat in the
    /// ring. Waking too many costs a direction that misses out an ENOBUFS and its place at the queue's end.
    fn give_buf(&mut self, bid: u16) {
        self.bufs.put(bid);
        if bid >= self.bufs.count {
            return;
        }
        let mut armed = 0;
        while armed < self.bufs.in_ring() {
            let Some((slot, d)) = self.starved.pop_front() else {
                return;
            };
            let Some(c) = self.conn(slot) else { continue };
            if c.closing || !c.dirs[d].starved {
                continue;
            }
            c.dirs[d].starved = false;
            self.maybe_resume(slot, d);
            if self.conn(slot).is_some_and(|c| c.dirs[d].armed) {
                armed += 1;
            }
        }
    }

    /// Counts one of `slot`'s operations as completed. False when the connection is closing (its slot is
    /// freed once nothing is in flight) or gone.
    fn finish_op(&mut self, slot: u32) -> bool {
        let Some(c) = self.conn(slot) else { return false };
        c.ops = c.ops.saturating_sub(1);
        if !c.closing {
            return true;
        }
        if c.ops == 0 {
            self.free_conn(slot);
        }
        false
    }

    /// Ends a connection: at once if nothing is in flight, else after cancelling what is pending.
    fn close(&mut self, slot: u32) {
        let Some(c) = self.conn(slot) else { return };
        if c.closing {
            return;
        }
        c.closing = true;
        if c.ops == 0 {
            self.free_conn(slot);
            return;
        }
        let fds = [
            Some(c.client.as_raw_fd()),
            c.backend.as_ref().map(AsRawFd::as_raw_fd),
        ];
        let connecting = c.connecting.is_some();
        for fd in fds.into_iter().flatten() {
            let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
                .build()
                .user_data(user_data(Op::Cancel, slot, 0));
            self.push(&e);
        }
        if connecting {
            // A wait for a place, or a pause before trying the backends again (up to a second), is on no
            // socket: ended here, so the close (a drain's, say) need not wait it out. None: ENOENT, harmless.
            let e = opcode::AsyncCancel::new(user_data(Op::Queue, slot, 0))
                .build()
                .user_data(user_data(Op::Cancel, slot, 0));
            self.push(&e);
        }
    }

    /// Drops the connection in `slot` (closing both sockets; with both ends read to their end the close
    /// sends a FIN) and lets the listeners use the permit it frees.
    fn free_conn(&mut self, slot: u32) {
        let Some(mut c) = self.conns.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        // Nothing is in flight, so no send still reads these buffers.
        for d in c.dirs {
            let mut b = d.head;
            while b != NO_BUF {
                let next = self.bufs.next[usize::from(b)];
                self.give_buf(b);
                b = next;
            }
        }
        // Almost always empty: no hashing per closed connection unless some direction is stalled.
        if !self.pipes.is_empty() {
            for d in 0..2 {
                // Bytes still in it go nowhere: the pipe is closed, not pooled.
                self.pipes.remove(&pipe_key(slot, d));
            }
        }
        c.flush_bytes();
        drop(c);
        self.free.push(slot);
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Connections still open at the end of the drain: their last bytes counted before they close.
        for c in self.conns.iter_mut().flatten() {
            c.flush_bytes();
        }
        // Taken back before the buffers are freed (fields drop after this).
        let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
        self.show_held(0);
    }
}

/// `d` in the loop's milliseconds (a u32: the timeouts are at most a day).
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection costs its slot; this guards against a change that silently grows it.
    #[test]
    fn connection_slot_stays_small() {
        let size = size_of::<Option<Conn>>();
        eprintln!("a connection slot is {size} bytes");
        assert!(size <= 120, "the connection slot grew to {size} bytes");
    }

    #[test]
    fn user_data_round_trips() {
        for op in [Op::Accept, Op::Recv, Op::Send, Op::Tick] {
            let ud = user_data(op, u32::MAX - 1, 1);
            assert_eq!(Op::from_u8(ud as u8), Some(op));
            assert_eq!((ud >> 32) as u32, u32::MAX - 1);
            assert_eq!((ud >> 8) & 0xff, 1);
        }
    }
}
