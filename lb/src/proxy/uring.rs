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

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, error, warn};
use xcluster_proto::proxy_header::Addresses;
use xcluster_runtime::net::Closing;

use super::access::{End, Side};
use super::clients::ClientSlot;
use super::config::Forwarding;
use super::conn::Active;
use super::forward::{self, Pipe};
use super::inbound::Inbound;
use super::limit::Permit;
use super::listener::{BACKOFF_MAX, BACKOFF_MIN, Close, is_resource_exhaustion};
use super::metrics::{Assigned, BUFFER_WAITS_TOTAL, BUFFERS_HELD, RECEIVE_PAUSES_TOTAL, SPLICED_BYTES_TOTAL};
use super::queue::{RingDoor, WAIT_BACKUP, Wait, Waker, poke};
use super::service::{Admit, ListenerState, LiveListener, NoBackend, Shared};
use super::sni::Hello;
use super::spin::Spin;

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

/// The ring of provided buffers: `count` buffers of `BUF_LEN` bytes, and the ring of entries through which
/// they are handed to the kernel; and `spares(count)` more, with ids from `count` on, that this code lends
/// itself.
struct Bufs {
    entries: *mut BufRingEntry,
    mem: *mut u8,
    count: u16,
    /// The spare buffers' memory, and the ids of those free: a stack, so the one lent next is the one last
    /// given back, still in the cache.
    spare_mem: *mut u8,
    spares: Vec<u16>,
    /// Buffer ids `0..given` have been handed to the kernel; the rest of `mem` is untouched.
    given: u16,
    tail: u16,
    /// Per buffer id, while it is queued: the bytes received into it, and the next buffer of its queue.
    len: Vec<u32>,
    next: Vec<u16>,
}

impl Bufs {
    fn entries_layout(count: u16) -> Layout {
        // The ring must be page-aligned; 16 bytes per entry.
        Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
            .unwrap_or(Layout::new::<u8>())
    }

    fn mem_layout(count: u16) -> Layout {
        Layout::from_size_align(usize::from(count) * BUF_LEN as usize, 4096).unwrap_or(Layout::new::<u8>())
    }

    fn spares(count: u16) -> u16 {
        (count / SPARE_RATIO).clamp(1, SPARES_MAX)
    }

    /// Ids of buffers in the ring and spare ones alike.
    fn ids(count: u16) -> usize {
        usize::from(count) + usize::from(Self::spares(count))
    }

    /// Reserves `count` buffers (a power of two: config validation checks it, and the kernel refuses a ring
    /// of any other size) and registers their ring with `ring`, `BUF_INITIAL` of them handed out.
    fn new(ring: &IoUring, count: u16) -> io::Result<Self> {
        // SAFETY: both layouts have a non-zero size. The buffer memory is not zeroed: the kernel writes a
        // buffer before this code reads any of it, and only the bytes it wrote are read.
        let (entries, mem, spare_mem) = unsafe {
            (
                alloc_zeroed(Self::entries_layout(count)),
                alloc(Self::mem_layout(count)),
                alloc(Self::mem_layout(Self::spares(count))),
            )
        };
        let mut b = Self {
            entries: entries.cast(),
            mem,
            count,
            spare_mem,
            // Popped from the end: `count` first.
            spares: (count..count + Self::spares(count)).rev().collect(),
            given: 0,
            tail: 0,
            len: vec![0; Self::ids(count)],
            next: vec![NO_BUF; Self::ids(count)],
        };
        if entries.is_null() || mem.is_null() || spare_mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        // SAFETY: `entries` holds `count` entries and stays allocated until `Bufs` is dropped, after the ring
        // it is registered with (the loop unregisters it first, see `Loop::drop`).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(b.entries as u64, count, BUF_GROUP, 0)?;
        }
        b.grow(BUF_INITIAL);
        Ok(b)
    }

    /// Hands up to `n` more buffers to the kernel; false when all `count` are out already.
    fn grow(&mut self, n: u16) -> bool {
        let to = self.given.saturating_add(n).min(self.count);
        if to == self.given {
            return false;
        }
        for bid in self.given..to {
            self.give(bid);
        }
        self.given = to;
        true
    }

    fn addr(&self, bid: u16) -> *mut u8 {
        // SAFETY: `bid` < `count + spares(count)` (the kernel returns only ids this code gave it, and spare ids
        // come from `spares`), so the offset is in the allocation.
        unsafe {
            match bid.checked_sub(self.count) {
                None => self.mem.add(usize::from(bid) * BUF_LEN as usize),
                Some(spare) => self.spare_mem.add(usize::from(spare) * BUF_LEN as usize),
            }
        }
    }

    /// Takes buffer `bid` back: to the kernel's ring, or to the spare stack.
    fn put(&mut self, bid: u16) {
        if bid >= self.count {
            self.spares.push(bid);
        } else {
            self.give(bid);
        }
    }

    /// Hands buffer `bid` (back) to the kernel.
    fn give(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        let addr = self.addr(bid) as u64;
        // SAFETY: `idx` < `count`. The entry at the tail is not in the kernel's part of the ring (head to
        // tail) until the tail is published below, so nothing reads it while it is written.
        unsafe {
            let e = &mut *self.entries.add(idx);
            e.set_addr(addr);
            e.set_len(BUF_LEN);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 the kernel reads in the first entry; it is published with release
        // order so the entry written above is visible first.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for Bufs {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts (unless the allocation failed: null); the ring no
        // longer uses them (see `Loop::drop`).
        unsafe {
            if !self.entries.is_null() {
                dealloc(self.entries.cast(), Self::entries_layout(self.count));
            }
            if !self.mem.is_null() {
                dealloc(self.mem, Self::mem_layout(self.count));
            }
            if !self.spare_mem.is_null() {
                dealloc(self.spare_mem, Self::mem_layout(Self::spares(self.count)));
            }
        }
    }
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
const QUEUE_MAX: u8 = 4;
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
    queued: u8,
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
    /// Its backend's [`super::metrics::BackendMetrics::downs`] when it connected (the low byte).
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
            self.now_ms = u32::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u32::MAX);
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

    fn on_wake(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Add { id, socket, state } => {
                    let l = Lst {
                        id,
                        socket,
                        state,
                        permit: None,
                        armed: false,
                        ready: false,
                        removed: false,
                        not_before: None,
                        backoff: BACKOFF_MIN,
                        peer: Box::new((SockAddrStorage::zeroed(), 0)),
                        closing: None,
                    };
                    let i = match self.listeners.iter().position(Option::is_none) {
                        Some(i) => i,
                        None => {
                            self.listeners.push(None);
                            self.listeners.len() - 1
                        }
                    };
                    self.listeners[i] = Some(l);
                    self.arm_accept(i);
                }
                Msg::Remove { id, how, closing } => {
                    let open =
                        |l: &Option<Lst>| l.as_ref().is_some_and(|l| l.id == id && l.closing.is_none());
                    let Some(i) = self.listeners.iter().position(open) else {
                        continue;
                    };
                    if let Some(l) = self.listeners[i].as_mut() {
                        let c = how.begin(l.socket.as_fd(), &l.state.load().cfg.name);
                        l.closing = Some((c, closing));
                    }
                    if how.hand_over {
                        // Cancels what is in flight on the socket; that completion closes it.
                        self.remove_listener(i);
                    }
                }
                Msg::Finish => {
                    self.finishing = Some(Instant::now() + FINISH_WAIT);
                    for i in 0..self.listeners.len() {
                        self.remove_listener(i);
                    }
                    for slot in 0..self.conns.len() {
                        self.close(slot as u32);
                    }
                    return;
                }
            }
        }
        // Waiting connections whose turn may have come: their backup timer ends now, and they ask again.
        for slot in self.door.take() {
            let waiting = self.conn(slot).is_some_and(|c| {
                !c.closing && c.connecting.as_ref().is_some_and(|k| k.wait.ticket().is_some())
            });
            if waiting {
                let e = opcode::AsyncCancel::new(user_data(Op::Queue, slot, 0))
                    .build()
                    .user_data(user_data(Op::Cancel, slot, 0));
                self.push(&e);
            }
        }
        self.arm_wake();
    }

    fn on_tick(&mut self) {
        if self.finishing.is_some() {
            self.arm_tick();
            return;
        }
        // `busy_poll_us` reloads live.
        let busy_poll = self.shared.timeouts.load().busy_poll;
        if busy_poll != self.spin.max() {
            self.spin = Spin::new(busy_poll);
        }
        // Accepts that wait for a permit freed on another worker, or for the end of a back-off; closing
        // listeners whose queue is empty.
        for i in 0..self.listeners.len() {
            let closed = self.listeners[i].as_mut().is_some_and(|l| match &mut l.closing {
                Some((c, _)) => c.done(l.socket.as_fd(), &l.state.load().cfg.name),
                None => false,
            });
            if closed {
                self.remove_listener(i);
            } else {
                self.arm_accept(i);
            }
        }
        // One pass over the connections: byte counters and buffers held every tick; the idle and fin timeouts
        // often enough that a connection outlives its timeout by at most a quarter of the shortest of its
        // listeners' (and a second at most; a removed listener's are not counted). 8,000 connections take
        // some tens of microseconds.
        let shortest = (self.listeners.iter().flatten())
            .flat_map(|l| {
                let cfg = &l.state.load().cfg;
                [cfg.idle, cfg.fin]
            })
            .flatten()
            .min();
        let scan = shortest.is_some_and(|d| {
            let every = (millis(d) / 4).clamp(1, 1_000);
            self.now_ms.wrapping_sub(self.last_scan_ms) >= every
        });
        if scan {
            self.last_scan_ms = self.now_ms;
        }
        let mut held = 0;
        for slot in 0..self.conns.len() {
            let Some(c) = &mut self.conns[slot] else { continue };
            c.flush_bytes();
            // Half-closed once either source has ended: then `fin_timeout_ms` counts, if set.
            let half = c.dirs[0].eof || c.dirs[1].eof;
            let cfg = &c.active.l.cfg;
            let (limit, end) = match cfg.fin {
                Some(fin) if half => (Some(fin), End::FinTimeout),
                _ => (cfg.idle, End::Idle),
            };
            let expired = scan && limit.is_some_and(|d| self.now_ms.wrapping_sub(c.last_ms) >= millis(d));
            // One load per connection and tick: with `close_on_down`, checks that put its backend down close it.
            let down = (c.active.bm.as_deref())
                .is_some_and(|bm| bm.downs.load(Ordering::Relaxed) as u8 != c.downs_seen);
            if down && !c.closing {
                debug!(listener = %c.active.l.cfg.name, "backend down");
                c.active.ended(End::BackendDown);
                self.close(slot as u32);
            } else if expired && !c.closing && c.connecting.is_none() {
                debug!(listener = %c.active.l.cfg.name, "{end}");
                c.active.ended(end);
                self.close(slot as u32);
            }
            // Counted after a close, which may have freed the slot and its buffers.
            if let Some(c) = &self.conns[slot] {
                held += u32::from(c.dirs[0].queued) + u32::from(c.dirs[1].queued);
            }
        }
        self.show_held(held);
        self.arm_tick();
    }

    /// Brings the held-buffers gauge (summed over workers) from this worker's last count to `held`.
    fn show_held(&mut self, held: u32) {
        if held != self.held_shown {
            let g = metrics::gauge!(BUFFERS_HELD);
            g.increment(f64::from(held));
            g.decrement(f64::from(self.held_shown));
            self.held_shown = held;
        }
    }

    fn remove_listener(&mut self, i: usize) {
        // Removed already: its cancel is in flight (a handed-over listener's tick comes here again).
        let Some(l) = self
            .listeners
            .get_mut(i)
            .and_then(Option::as_mut)
            .filter(|l| !l.removed)
        else {
            return;
        };
        l.removed = true;
        if l.armed {
            // The completion (cancelled, or a client accepted just before) closes the socket.
            let armed = user_data(Op::Accept, i as u32, usize::from(!l.ready));
            let e = opcode::AsyncCancel::new(armed)
                .build()
                .user_data(user_data(Op::Cancel, 0, 0));
            self.push(&e);
        } else {
            self.listeners[i] = None;
        }
    }

    /// Submits what listener `i` waits for next, if nothing is in flight: an accept when a client is queued
    /// and a permit is free, else a poll for a client, which takes no permit.
    fn arm_accept(&mut self, i: usize) {
        let Some(l) = self.listeners.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if l.armed || l.removed || self.finishing.is_some() {
            return;
        }
        if let Some(t) = l.not_before {
            if Instant::now() < t {
                return;
            }
            l.not_before = None;
        }
        let fd = Fd(l.socket.as_raw_fd());
        if !l.ready {
            l.permit = None;
            l.armed = true;
            let e = opcode::PollAdd::new(fd, libc::POLLIN as u32)
                .build()
                .user_data(user_data(Op::Accept, i as u32, 1));
            self.push(&e);
            return;
        }
        if l.permit.is_none() {
            // Its own place and its turn at the rate first, as the tokio accept loop does. A wait for the
            // rate ends on the tick after it is up (the place goes back meanwhile); one for a place or a
            // permit is re-armed when a connection here ends, or by the tick.
            let state = l.state.load();
            let Some(place) = state.limit.try_take() else {
                return;
            };
            if let Err(wait) = state.rate.try_take() {
                state.metrics.rate_waits.increment(1);
                l.not_before = Some(Instant::now() + wait);
                return;
            }
            match self.shared.permits.clone().try_acquire_owned() {
                Ok(all) => l.permit = Some(Permit { all, place }),
                Err(_) => return,
            }
        }
        l.armed = true;
        let peer = &mut *l.peer;
        peer.1 = peer.0.size_of();
        let addr: *mut SockAddrStorage = &mut peer.0;
        let e = opcode::Accept::new(fd, addr.cast(), &mut peer.1)
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data(Op::Accept, i as u32, 0));
        self.push(&e);
    }

    /// The completion of listener `i`'s accept, or of its poll for a client (`dir` 1).
    fn on_accept(&mut self, i: u32, dir: usize, res: i32, flags: u32) {
        let Some(l) = self.listeners.get_mut(i as usize).and_then(Option::as_mut) else {
            return;
        };
        l.armed = false;
        if dir == 1 {
            // Readable; or in error, which the accept then reports (and backs off on).
            l.ready = res != -libc::ECANCELED;
        } else if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that nothing else owns.
            let client = unsafe { OwnedFd::from_raw_fd(res) };
            l.backoff = BACKOFF_MIN;
            // Without the flag (before Linux 6.10, or none queued) the next client is waited for by a poll.
            l.ready = cqueue::sock_nonempty(flags);
            let (storage, len) = std::mem::replace(&mut *l.peer, (SockAddrStorage::zeroed(), 0));
            // SAFETY: the kernel wrote a socket address of `len` bytes into `storage`.
            let peer = unsafe { SockAddr::new(storage, len) }.as_socket();
            let state = l.state.load_full();
            let permit = l.permit.take();
            if let (Some(peer), Some(permit)) = (peer, permit) {
                // Rejected: the socket and the permit drop here.
                if let Admit::Open(slot) = state.admit(peer) {
                    self.start_conn(client, peer, state, permit, slot);
                }
            }
        } else if res != -libc::ECANCELED {
            // Whether a client is left is for a poll to say: an accept on an empty queue would wait holding
            // its permit.
            l.ready = false;
            let e = io::Error::from_raw_os_error(-res);
            let state = l.state.load();
            state.metrics.accept_errors.increment(1);
            if is_resource_exhaustion(&e) {
                warn!(listener = %state.cfg.name, error = %e, backoff = ?l.backoff, "accept failed; backing off");
                l.not_before = Some(Instant::now() + l.backoff);
                l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
            } else {
                // Per-connection errors (ECONNABORTED and the like): the next accept is fine.
                debug!(listener = %state.cfg.name, error = %e, "accept failed");
            }
        }
        if self.listeners[i as usize].as_ref().is_some_and(|l| l.removed) {
            self.listeners[i as usize] = None;
        } else {
            self.arm_accept(i as usize);
        }
    }

    fn start_conn(
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
    fn read_preamble(&mut self, slot: u32) {
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
    fn on_header(&mut self, slot: u32, res: i32) {
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
    fn preamble_failed(&mut self, slot: u32, e: io::Error) {
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
    fn header_read(&mut self, slot: u32, read: io::Result<Addresses>) {
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
    fn hello_read(&mut self, slot: u32, name: Option<String>) {
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

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// Submits a connect to the next backend, with its timeout linked; when every backend is full, a timer
    /// to try again while `queue_timeout_ms` allows; when every backend has been tried, a timer to try them
    /// again (`connect_retry_delay_ms`); closes the client when no attempt is left (none of its bytes were
    /// read, so a retry is invisible to it).
    fn connect_next(&mut self, slot: u32) {
        let t = self.shared.timeouts.load_full();
        let shared = self.shared.clone();
        loop {
            // The field, not `conn()`, so that the queue's waker below may borrow `door` beside it.
            let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
                return;
            };
            let l = c.active.l.clone();
            let Some(k) = c.connecting.as_mut() else { return };
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
                        self.no_backend(slot, end);
                        return;
                    }
                };
            c.active.wait_served(&mut k.wait);
            k.attempt += 1;
            c.active.tried(addr);
            let socket = match backend_socket(addr) {
                Ok(s) => s,
                Err(e) => {
                    debug!(backend = %addr, error = %e, "cannot open a socket");
                    shared.connect_failed(addr, &bm, &mut k.tried);
                    continue;
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

    /// Closes a client no backend can take, and counts it.
    fn no_backend(&mut self, slot: u32, end: End) {
        let Some(c) = self.conn(slot) else { return };
        c.active.l.metrics.failed.increment(1);
        if let Some(k) = &c.connecting {
            debug!(listener = %c.active.l.cfg.name, peer = %k.peer, why = %end, "no backend reachable; closing the client");
        }
        c.active.ended(end);
        self.close(slot);
    }

    fn on_connect(&mut self, slot: u32, res: i32) {
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
        // Its count, low byte: a change of it is the tick's sign that checks put the backend down since.
        c.downs_seen = bm.downs.load(Ordering::Acquire) as u8;
        c.active.set_backend(bm);
        c.last_ms = now_ms;
        self.arm_recv(slot, 0);
        self.arm_recv(slot, 1);
    }

    /// Starts the multishot receive of direction `d`, unless one is live or the source has ended; a bulk
    /// direction pumps instead, once its queue is sent.
    fn arm_recv(&mut self, slot: u32, d: usize) {
        let splice = self.shared.forwarding != Forwarding::Copy;
        let Some(c) = self.conn(slot) else { return };
        let dir = &mut c.dirs[d];
        if c.closing || dir.armed || dir.eof || dir.done {
            return;
        }
        if dir.bulk {
            if dir.head == NO_BUF && !dir.polling {
                if splice {
                    self.pump_splice(slot, d);
                } else {
                    self.pump(slot, d);
                }
            }
            return;
        }
        dir.armed = true;
        c.ops += 1;
        let (src, _) = c.fds(d);
        // One request for the life of the stream: it stays armed and posts a completion, with a buffer
        // taken from the ring, for each batch of bytes that arrives.
        let e = opcode::RecvMulti::new(Fd(src), BUF_GROUP)
            .build()
            .user_data(user_data(Op::Recv, slot, d));
        self.push(&e);
    }

    /// Resumes a receive that was paused (full queue), or that ended on its own, once the queue has room.
    fn maybe_resume(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conn(slot) else { return };
        let dir = c.dirs[d];
        if !dir.armed && !dir.pausing && !dir.starved && dir.queued <= QUEUE_MAX / 2 {
            self.arm_recv(slot, d);
        }
    }

    /// Pushes the first send of each queue that filled during the batch just reaped. A slot listed twice
    /// (closed and reused within the batch) or closed since is skipped by the `unsent` flag.
    fn push_unsent(&mut self) {
        let mut unsent = std::mem::take(&mut self.unsent);
        for &(slot, d) in &unsent {
            let d = usize::from(d);
            let Some(c) = self.conn(slot) else { continue };
            if c.closing || !c.dirs[d].unsent {
                continue;
            }
            c.dirs[d].unsent = false;
            self.push_send(slot, d);
        }
        unsent.clear();
        self.unsent = unsent;
    }

    /// Sends the rest of the head of direction `d`'s queue.
    fn push_send(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let dir = c.dirs[d];
        if dir.head == NO_BUF {
            return;
        }
        c.ops += 1;
        let (_, dst) = c.fds(d);
        let len = self.bufs.len[usize::from(dir.head)];
        // The last bytes before an end of stream already seen: MSG_MORE holds them in the socket until the
        // half-close or close that follows this send's completion, which then leaves as one segment with
        // the FIN. A short request-response connection then costs its client one segment and one wake-up
        // fewer (the client answers data and FIN together with its own FIN instead of an ACK first).
        let last = dir.eof && self.bufs.next[usize::from(dir.head)] == NO_BUF;
        let flags = libc::MSG_NOSIGNAL | if last { libc::MSG_MORE } else { 0 };
        // SAFETY: `off` < `len` <= BUF_LEN, inside buffer `head`.
        let ptr = unsafe { self.bufs.addr(dir.head).add(usize::from(dir.off)) };
        let e = opcode::Send::new(Fd(dst), ptr, len - u32::from(dir.off))
            .flags(flags)
            .build()
            .user_data(user_data(Op::Send, slot, d));
        self.push(&e);
    }

    fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        // Only the last completion of a multishot receive ends the operation.
        let live = if more {
            self.conns
                .get(slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|c| !c.closing)
        } else {
            self.finish_op(slot)
        };
        if !live {
            if let Some(b) = bid {
                self.give_buf(b);
            }
            return;
        }
        let now_ms = self.now_ms;
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let dir = &mut c.dirs[d];
        if !more {
            dir.armed = false;
            dir.pausing = false;
        }
        if res > 0 {
            let Some(bid) = bid else {
                self.close(slot);
                return;
            };
            let n = res.unsigned_abs();
            c.unflushed[d] += n;
            if c.unflushed[d] >= 1 << 30 {
                c.flush_bytes();
            }
            c.last_ms = now_ms;
            let dir = &mut c.dirs[d];
            self.bufs.len[usize::from(bid)] = n;
            self.bufs.next[usize::from(bid)] = NO_BUF;
            dir.queued += 1;
            let first = dir.head == NO_BUF;
            if first {
                dir.head = bid;
                dir.off = 0;
            } else {
                self.bufs.next[usize::from(dir.tail)] = bid;
            }
            dir.tail = bid;
            if first {
                dir.unsent = true;
                self.unsent.push((slot, d as u8));
            }
            // A whole buffer: more is likely waiting. The multishot receive ends here, and the direction
            // pumps once this queue is sent (see `pump` for why).
            let to_bulk = n == BUF_LEN && !dir.bulk;
            dir.bulk |= to_bulk;
            let full = dir.queued >= QUEUE_MAX;
            if (to_bulk || full) && dir.armed && !dir.pausing {
                if !to_bulk {
                    metrics::counter!(RECEIVE_PAUSES_TOTAL).increment(1);
                }
                dir.pausing = true;
                let e = opcode::AsyncCancel::new(user_data(Op::Recv, slot, d))
                    .build()
                    .user_data(user_data(Op::Cancel, slot, d));
                self.push(&e);
            }
            if !more {
                self.maybe_resume(slot, d);
            }
            return;
        }
        match res {
            0 => {
                dir.eof = true;
                if dir.head == NO_BUF {
                    self.end_direction(slot, d);
                }
            }
            e if e == -libc::ENOBUFS => {
                if self.bufs.grow(BUF_GROW) {
                    self.arm_recv(slot, d);
                } else {
                    metrics::counter!(BUFFER_WAITS_TOTAL).increment(1);
                    dir.starved = true;
                    self.starved.push_back((slot, d));
                }
            }
            // The pause asked for above; the receive resumes when the queue drains.
            e if e == -libc::ECANCELED => self.maybe_resume(slot, d),
            e => self.fail(slot, Side::source_of(d), -e),
        }
    }

    /// Moves a bulk direction's bytes with plain `recv` and `send` through one spare buffer, as a
    /// buffer-at-a-time proxy does, for up to `PUMP_MAX` buffers, then waits for more with a poll. This is
    /// the bulk path of `forwarding = "copy"` (the others splice, [`Loop::pump_splice`]), and of a turn that
    /// finds no pipe.
    ///
    /// Why: a multishot receive fills several ring buffers in one go before their sends copy them out, and
    /// the ring hands buffers out in turn, so on a bulk stream the send copies from memory that has left
    /// the core's L1 cache. That cost the proxy about 1.2 times HAProxy's CPU per GB, where the `per_core`
    /// runtime, a `recv` then its `send` through one buffer, was level with HAProxy.
    ///
    /// Called only with the direction's queue empty and no receive or poll in flight, so its bytes cannot
    /// overtake earlier ones; and only between two submissions, when no completion can appear.
    fn pump(&mut self, slot: u32, d: usize) {
        let now_ms = self.now_ms;
        for turn in 0..PUMP_MAX {
            let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
                return;
            };
            let Some(bid) = self.bufs.spares.pop() else {
                // Every spare is held by a stalled send: back to the ring's receive, which is bounded.
                c.dirs[d].bulk = false;
                self.arm_recv(slot, d);
                return;
            };
            let (src, dst) = c.fds(d);
            let buf = self.bufs.addr(bid);
            // SAFETY: `buf` is a spare buffer of BUF_LEN bytes that nothing else uses until it is put back.
            let n = unsafe { libc::recv(src, buf.cast(), BUF_LEN as usize, libc::MSG_DONTWAIT) };
            if n <= 0 {
                self.bufs.put(bid);
                let err = io::Error::last_os_error();
                match n {
                    0 => {
                        c.dirs[d].eof = true;
                        self.end_direction(slot, d);
                    }
                    _ if err.kind() == io::ErrorKind::WouldBlock => self.arm_ready(slot, d),
                    _ if err.kind() == io::ErrorKind::Interrupted => continue,
                    _ => self.fail(slot, Side::source_of(d), err.raw_os_error().unwrap_or(libc::EIO)),
                }
                return;
            }
            let n = n.unsigned_abs() as u32;
            c.unflushed[d] += n;
            if c.unflushed[d] >= 1 << 30 {
                c.flush_bytes();
            }
            c.last_ms = now_ms;
            // SAFETY: as above; `n` bytes of it were just received.
            let sent = unsafe {
                libc::send(
                    dst,
                    buf.cast(),
                    n as usize,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            let sent = if sent < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::WouldBlock {
                    self.bufs.put(bid);
                    self.fail(
                        slot,
                        Side::destination_of(d),
                        err.raw_os_error().unwrap_or(libc::EIO),
                    );
                    return;
                }
                0
            } else {
                sent.unsigned_abs() as u32
            };
            if sent < n {
                // The destination is full: the rest waits as the queue's head, sent by io_uring, and the pump
                // resumes once it is gone (`on_send`).
                self.bufs.len[usize::from(bid)] = n;
                self.bufs.next[usize::from(bid)] = NO_BUF;
                let dir = &mut c.dirs[d];
                // `sent` < `n` <= BUF_LEN.
                (dir.head, dir.tail, dir.off, dir.queued) = (bid, bid, sent as u16, 1);
                self.push_send(slot, d);
                return;
            }
            self.bufs.put(bid);
            if n < BUF_LEN {
                if turn == 0 {
                    // A turn that starts short: the stream no longer keeps a buffer full.
                    c.dirs[d].bulk = false;
                    self.arm_recv(slot, d);
                } else {
                    self.arm_ready(slot, d);
                }
                return;
            }
        }
        // More may be waiting; the poll lets the worker's other connections go first.
        self.arm_ready(slot, d);
    }

    /// Polls direction `d`'s source for readable bytes, to pump when they come.
    fn arm_ready(&mut self, slot: u32, d: usize) {
        self.arm_poll(slot, d, Op::Ready);
    }

    /// Polls direction `d`'s destination for room, while a pipe holds its bytes.
    fn arm_writable(&mut self, slot: u32, d: usize) {
        self.arm_poll(slot, d, Op::Writable);
    }

    /// The one-shot poll of a bulk direction: `Op::Ready` on its source, `Op::Writable` on its destination.
    fn arm_poll(&mut self, slot: u32, d: usize, op: Op) {
        let Some(c) = self.conn(slot) else { return };
        if c.closing || c.dirs[d].polling {
            return;
        }
        c.dirs[d].polling = true;
        c.ops += 1;
        let (src, dst) = c.fds(d);
        let (fd, mask) = if op == Op::Writable {
            (dst, libc::POLLOUT)
        } else {
            (src, libc::POLLIN | libc::POLLRDHUP)
        };
        let e = opcode::PollAdd::new(Fd(fd), mask as u32)
            .build()
            .user_data(user_data(op, slot, d));
        self.push(&e);
    }

    /// The poll of a bulk direction: bytes, an end of stream or an error wait; the pump finds which. A
    /// poll that fails itself ends the connection (pumping again would poll again, in a loop).
    fn on_ready(&mut self, slot: u32, d: usize, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let Some(c) = self.conn(slot) else { return };
        c.dirs[d].polling = false;
        if res < 0 {
            self.fail(slot, Side::source_of(d), -res);
            return;
        }
        self.arm_recv(slot, d);
    }

    /// [`Loop::pump`] through a pipe: a bulk direction's bytes go socket → pipe → socket with `splice`,
    /// never through this process, for up to `PUMP_BYTES`, then it waits for more with a poll.
    fn pump_splice(&mut self, slot: u32, d: usize) {
        let moved = self.splice_turn(slot, d);
        if moved > 0 {
            metrics::counter!(SPLICED_BYTES_TOTAL).increment(moved as u64);
        }
    }

    /// One turn of [`Loop::pump_splice`]; returns the bytes spliced in.
    ///
    /// The pipe comes from the thread's pool (shared with [`super::forward`]) and goes back empty; when the
    /// destination takes only part of it, the direction keeps it in `Loop::pipes` and polls for room.
    /// Called, as `pump`, only with the queue empty and nothing of the direction's in flight.
    fn splice_turn(&mut self, slot: u32, d: usize) -> usize {
        let now_ms = self.now_ms;
        let mut moved = 0;
        loop {
            let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
                return moved;
            };
            let (src, dst) = c.fds(d);
            let Some(pipe) = forward::take_pipe() else {
                // Too many pipes held by stalled directions, or out of descriptors: this turn copies instead,
                // through the spares and then the ring, which `io_uring_buffers` bounds.
                self.pump(slot, d);
                return moved;
            };
            // SAFETY: `src` and `dst` are this connection's open sockets for as long as it is in its slot.
            let (src, dst) = unsafe { (BorrowedFd::borrow_raw(src), BorrowedFd::borrow_raw(dst)) };
            let n = match forward::splice(src, &pipe.w, forward::PIPE_CHUNK) {
                Ok(0) => {
                    forward::give_pipe(pipe);
                    c.dirs[d].eof = true;
                    self.end_direction(slot, d);
                    return moved;
                }
                Ok(n) => n,
                Err(e) => {
                    forward::give_pipe(pipe);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => self.arm_ready(slot, d),
                        io::ErrorKind::Interrupted => continue,
                        _ => self.fail(slot, Side::source_of(d), e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                    return moved;
                }
            };
            // `n` <= PIPE_CHUNK.
            c.unflushed[d] += n as u32;
            if c.unflushed[d] >= 1 << 30 {
                c.flush_bytes();
            }
            c.last_ms = now_ms;
            let first = moved == 0;
            moved += n;
            let sent = match forward::splice(&pipe.r, dst, n) {
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => {
                    self.fail(
                        slot,
                        Side::destination_of(d),
                        e.raw_os_error().unwrap_or(libc::EIO),
                    );
                    return moved;
                }
            };
            if sent < n {
                // The destination is full: the rest waits in the pipe until it has room (`on_writable`).
                self.pipes.insert(pipe_key(slot, d), (pipe, (n - sent) as u32));
                self.arm_writable(slot, d);
                return moved;
            }
            forward::give_pipe(pipe);
            if first && n < forward::SPLICE_MIN {
                // A turn that starts short: the stream no longer fills a pipe; back to the multishot receive.
                c.dirs[d].bulk = false;
                self.arm_recv(slot, d);
                return moved;
            }
            // A short splice most likely emptied the socket (the pipe may also have run out of slots): the
            // poll tells which, and lets the worker's other connections go first, as does a full turn.
            if n < forward::PIPE_CHUNK || moved >= PUMP_BYTES {
                self.arm_ready(slot, d);
                return moved;
            }
        }
    }

    /// Room on a spliced direction's destination: passes on what its pipe holds, then pumps again.
    fn on_writable(&mut self, slot: u32, d: usize, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        c.dirs[d].polling = false;
        if res < 0 {
            self.fail(slot, Side::destination_of(d), -res);
            return;
        }
        let key = pipe_key(slot, d);
        let Some((pipe, left)) = self.pipes.get_mut(&key) else {
            self.arm_recv(slot, d);
            return;
        };
        let dst = c.fds(d).1;
        // SAFETY: `dst` is this connection's open socket for as long as it is in its slot.
        let dst = unsafe { BorrowedFd::borrow_raw(dst) };
        match forward::splice(&pipe.r, dst, *left as usize) {
            // At most `left`.
            Ok(k) => *left -= k as u32,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                self.fail(
                    slot,
                    Side::destination_of(d),
                    e.raw_os_error().unwrap_or(libc::EIO),
                );
                return;
            }
        }
        if *left > 0 {
            self.arm_writable(slot, d);
            return;
        }
        if let Some((pipe, _)) = self.pipes.remove(&key) {
            forward::give_pipe(pipe);
        }
        self.arm_recv(slot, d);
    }

    /// Ends a connection on a socket error (`errno`) on `side`'s socket.
    fn fail(&mut self, slot: u32, side: Side, errno: i32) {
        debug!(%side, error = %io::Error::from_raw_os_error(errno), "connection ended");
        if let Some(c) = self.conn(slot) {
            c.active.ended(End::Error(side, errno));
        }
        self.close(slot);
    }

    /// Passes on the end of direction `d`'s source: a half-close, or the close of the connection when the
    /// other direction has ended already (both sockets were read to their end, so `close` sends a FIN).
    fn end_direction(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conn(slot) else { return };
        c.dirs[d].done = true;
        if c.dirs[1 - d].done {
            c.active.ended(End::Closed);
            self.close(slot);
        } else {
            // ENOTCONN when the peer already reset: nothing left to tell it.
            // SAFETY: plain syscall on a descriptor this connection owns.
            let _ = unsafe { libc::shutdown(c.fds(d).1, libc::SHUT_WR) };
        }
    }

    fn on_send(&mut self, slot: u32, d: usize, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        if res < 0 {
            self.fail(slot, Side::destination_of(d), -res);
            return;
        }
        if res == 0 {
            c.active.ended(End::Closed);
            self.close(slot);
            return;
        }
        let dir = &mut c.dirs[d];
        let head = dir.head;
        // A send moves at most what is left of its buffer, so the sum is at most BUF_LEN.
        dir.off += res.unsigned_abs() as u16;
        if u32::from(dir.off) < self.bufs.len[usize::from(head)] {
            self.push_send(slot, d);
            return;
        }
        // The head is sent: the next buffer, if any, goes now.
        dir.head = self.bufs.next[usize::from(head)];
        dir.off = 0;
        dir.queued -= 1;
        if dir.head == NO_BUF {
            dir.tail = NO_BUF;
        }
        let (more_queued, eof) = (dir.head != NO_BUF, dir.eof);
        self.give_buf(head);
        if more_queued {
            self.push_send(slot, d);
        } else if eof {
            self.end_direction(slot, d);
        }
        self.maybe_resume(slot, d);
    }

    /// Gives a buffer back to the kernel (or a spare to its stack), and lets one direction that found the
    /// ring empty try again.
    fn give_buf(&mut self, bid: u16) {
        self.bufs.put(bid);
        if bid >= self.bufs.count {
            return;
        }
        while let Some((slot, d)) = self.starved.pop_front() {
            let Some(c) = self.conn(slot) else { continue };
            if c.closing || !c.dirs[d].starved {
                continue;
            }
            c.dirs[d].starved = false;
            self.arm_recv(slot, d);
            return;
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

/// A non-blocking socket for a connect to `addr`, with TCP_NODELAY.
/// `d` in the loop's milliseconds (a u32: the timeouts are at most a day).
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

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
