//! Moving bytes between the client and the backend socket, one [`Direction`] each way, with half-close.
//!
//! Three strategies, chosen by `proxy.forwarding`:
//! - `splice`: data goes socket → pipe → socket inside the kernel (`splice(2)`), never through user space.
//! - `copy`: `read`/`write` through a user-space buffer. A short read clears the socket's readiness (tokio's
//!   `poll_read` does this), so a small message costs one `read` and one `write`, where splice needs a third
//!   call that returns EAGAIN (a short splice does not prove the socket is empty: the pipe may be out of
//!   slots).
//! - `auto` (the default): per direction, copy while messages are small and switch to splice once a read fills the whole
//!   buffer (a bulk stream); back to copy when a splice moves less than `SPLICE_MIN`. Toward a peer on this
//!   host too: ARCHITECTURE.md has the measurements, which once said otherwise.
//!
//! Either way a connection holds **no pipe and no buffer while idle**: a direction waits for readiness first,
//! then borrows a pipe or buffer from a per-thread pool, moves what is there, and gives it back as soon as
//! everything read has been written. A direction is a poll function over a few words of state rather than
//! an `async fn`: the compiler's state machine for the same loop kept every argument twice and a slot for
//! each await, five times the size — and this state is what every idle connection costs.

use nix::fcntl::{OFlag, SpliceFFlags};
use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::access::Side;
use super::config::Forwarding;

/// Bytes moved per `splice` call: the default pipe capacity.
pub(super) const PIPE_CHUNK: usize = 64 * 1024;
/// Size of a pooled copy buffer.
const BUF_SIZE: usize = 16 * 1024;
/// In `auto`, a splice that moves less than this goes back to copying.
pub(super) const SPLICE_MIN: usize = 16 * 1024;
/// Spare pipes and buffers kept per thread; more are closed or freed.
const POOL_MAX: usize = 64;
/// Pipes the process lends out at once (two descriptors and up to 64 KiB of pages each). A direction keeps
/// its pipe while the destination cannot take what it holds, so without a bound many slow peers could run
/// the process out of descriptors; past it a batch copies instead, through buffers. Counted for the whole
/// process, not per thread: on the `shared` runtime a connection, and its pipe, can move between threads.
const LENT_MAX: usize = 1024;
static LENT: AtomicUsize = AtomicUsize::new(0);

/// An in-kernel pipe used as the splice bounce buffer, lent out of this thread's pool.
#[derive(Debug)]
pub(super) struct Pipe {
    pub(super) r: OwnedFd,
    pub(super) w: OwnedFd,
    _lent: Lent,
}

/// Counts a lent pipe in `LENT` until it is given back or dropped (with bytes still in it, when its
/// connection ends).
#[derive(Debug)]
struct Lent;

impl Drop for Lent {
    fn drop(&mut self) {
        LENT.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    static PIPES: RefCell<Vec<(OwnedFd, OwnedFd)>> = const { RefCell::new(Vec::new()) };
    static BUFS: RefCell<Vec<Box<Buf>>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe from this thread's pool, or a new one; `None` when `LENT_MAX` are out already or no pipe
/// can be made (out of descriptors): the caller copies instead.
pub(super) fn take_pipe() -> Option<Pipe> {
    // Counted first, so that threads racing for the last places cannot all pass.
    let lent = Lent;
    if LENT.fetch_add(1, Ordering::Relaxed) >= LENT_MAX {
        return None;
    }
    let (r, w) = match PIPES.with_borrow_mut(Vec::pop) {
        Some(p) => p,
        None => nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?,
    };
    Some(Pipe { r, w, _lent: lent })
}

/// Returns an **empty** pipe to the pool (a pipe with bytes left in it is dropped instead).
pub(super) fn give_pipe(p: Pipe) {
    let Pipe { r, w, _lent } = p;
    PIPES.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push((r, w));
        }
    });
}

/// A copy buffer, page-aligned.
#[derive(Debug)]
#[repr(C, align(4096))]
struct Buf([u8; BUF_SIZE]);

fn take_buf() -> Box<Buf> {
    BUFS.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Box::new(Buf([0u8; BUF_SIZE])))
}

fn give_buf(b: Box<Buf>) {
    BUFS.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push(b);
        }
    });
}

/// Moves up to `len` bytes between a socket and a pipe, without blocking — provided the socket is
/// non-blocking: `SPLICE_F_NONBLOCK` covers only the pipe, and a splice out of a blocking TCP socket with
/// nothing in it waits (`tcp_splice_read` reads the socket's own `O_NONBLOCK`).
pub(super) fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// Propagates end-of-stream: the peer that sent FIN sees its half closed on the other side.
fn half_close(dst: &TcpStream) {
    // ENOTCONN when the other side already reset: nothing left to tell it.
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
}

/// A socket error while forwarding one direction, and which of its two sockets it came from.
#[derive(Debug)]
pub struct Fault {
    /// From the destination (a write), not the source (a read or a wait for bytes).
    pub at_destination: bool,
    pub error: io::Error,
}

impl Fault {
    fn source(error: io::Error) -> Self {
        Self {
            at_destination: false,
            error,
        }
    }

    fn destination(error: io::Error) -> Self {
        Self {
            at_destination: true,
            error,
        }
    }

    /// The side it came from, on direction `d` (0: up, client to backend; 1: down).
    pub fn side(&self, d: usize) -> Side {
        if self.at_destination {
            Side::destination_of(d)
        } else {
            Side::source_of(d)
        }
    }
}

/// One direction of a connection: whether it splices, whether it has ended, and what it holds between polls.
#[derive(Debug)]
pub struct Direction {
    mode: Forwarding,
    splicing: bool,
    done: bool,
    held: Held,
    /// Reading straight from the socket, past tokio's readiness, until it runs dry: set when `splice` moved
    /// nothing from a socket that polled readable, which at TCP's urgent mark it does for good
    /// (`tcp_read_sock` stops there, while a read passes it). The splice's `WouldBlock` cleared the
    /// readiness, so waiting on it, the bytes past the mark waited for more to come (a direction stalled
    /// until its idle timeout, or its end read as the stream's with the bytes before it dropped).
    raw_reads: bool,
}

/// Bytes read but not yet written, in the pipe or buffer they were read into. `Nothing` while idle.
#[derive(Debug, Default)]
enum Held {
    #[default]
    Nothing,
    /// A pipe holding `left` bytes.
    Pipe { pipe: Pipe, left: usize },
    /// A buffer whose bytes `off..len` are still to be written.
    Buf { buf: Box<Buf>, off: u32, len: u32 },
}

impl Direction {
    /// A direction forwarding with `mode`.
    pub fn new(mode: Forwarding) -> Self {
        Self {
            mode,
            splicing: mode == Forwarding::Splice,
            done: false,
            held: Held::Nothing,
            raw_reads: false,
        }
    }

    /// The source has ended and the end was passed on.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Moves bytes from `src` to `dst` until `src` has nothing more for now (`Pending`, with `cx` woken when
    /// either socket is ready again) or has ended (`Ready(Ok)`). `moved` is told the size of every batch read,
    /// and 0 for every write that moved bytes: a write is activity too. Stamped at reads alone, a download to
    /// a client reading slowly (a batch written over seconds, the next read only then) was cut by the idle or
    /// fin timeout while its bytes kept arriving; the io_uring runtime stamps its sends.
    ///
    /// At the end `dst` is half-closed, unless `last` says the other direction has ended already: the
    /// connection is then closed next, and `close` sends the FIN itself (both receive queues were read to
    /// their end, so it is a FIN, not a reset). That saves a `shutdown` per short-lived connection.
    pub fn poll_forward(
        &mut self,
        cx: &mut Context<'_>,
        mut src: ReadHalf<'_>,
        dst: WriteHalf<'_>,
        last: bool,
        mut moved: impl FnMut(usize),
    ) -> Poll<Result<(), Fault>> {
        let d = dst.as_ref();
        loop {
            ready!(self.poll_flush(cx, d, &mut moved)).map_err(Fault::destination)?;
            let n = if self.raw_reads {
                // Not through tokio: budgeted here, as `poll_read_ready` budgets the other reads.
                let coop = ready!(tokio::task::coop::poll_proceed(cx));
                let mut buf = take_buf();
                match io::Read::read(&mut &*socket2::SockRef::from(src.as_ref()), &mut buf.0) {
                    Ok(n) => {
                        coop.made_progress();
                        self.hold(buf, n);
                        n
                    }
                    Err(e) => {
                        give_buf(buf);
                        match e.kind() {
                            // Dry: readiness (cleared) says when more comes.
                            io::ErrorKind::WouldBlock => self.raw_reads = false,
                            io::ErrorKind::Interrupted => {}
                            _ => return Poll::Ready(Err(Fault::source(e))),
                        }
                        continue;
                    }
                }
            } else {
                // Wait with nothing borrowed: an idle direction holds no pipe and no buffer. This spends
                // tokio's cooperative budget, so an always-ready bulk stream still yields to the other
                // connections.
                ready!(src.as_ref().poll_read_ready(cx)).map_err(Fault::source)?;
                // No pipe to be had (see `take_pipe`): this batch copies instead.
                let pipe = if self.splicing { take_pipe() } else { None };
                if let Some(pipe) = pipe {
                    // socket → pooled pipe; the pipe → socket half is `poll_flush`.
                    let s = src.as_ref();
                    match s.try_io(Interest::READABLE, || splice(s, &pipe.w, PIPE_CHUNK)) {
                        // The end, or the urgent mark with the peer's FIN behind it (splice says 0 there
                        // too): a plain read tells, 0 at the real end. Taken for the end, the bytes past the
                        // mark were dropped and the backend half-closed.
                        Ok(0) => {
                            give_pipe(pipe);
                            self.raw_reads = true;
                            continue;
                        }
                        Ok(n) => {
                            self.held = Held::Pipe { pipe, left: n };
                            n
                        }
                        Err(e) => {
                            give_pipe(pipe);
                            if e.kind() == io::ErrorKind::WouldBlock {
                                // Readable, yet nothing spliced: the urgent mark (see `raw_reads`), or
                                // readiness gone stale, which the first read finds.
                                self.raw_reads = true;
                                continue;
                            }
                            return Poll::Ready(Err(Fault::source(e)));
                        }
                    }
                } else {
                    // socket → pooled buffer through `poll_read`, which clears readiness after a short
                    // read.
                    let mut buf = take_buf();
                    let mut rb = ReadBuf::new(&mut buf.0);
                    let read = Pin::new(&mut src).poll_read(cx, &mut rb);
                    let n = rb.filled().len();
                    match read {
                        Poll::Ready(Ok(())) => self.hold(buf, n),
                        Poll::Ready(Err(e)) => {
                            give_buf(buf);
                            return Poll::Ready(Err(Fault::source(e)));
                        }
                        // Stale readiness (now cleared and the waker registered), or no budget
                        // left.
                        Poll::Pending => {
                            give_buf(buf);
                            return Poll::Pending;
                        }
                    }
                    n
                }
            };
            if n == 0 {
                if !last {
                    half_close(d);
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            moved(n);
            if self.mode == Forwarding::Auto {
                self.splicing = if self.splicing {
                    n >= SPLICE_MIN
                } else {
                    n == BUF_SIZE
                };
            }
        }
    }

    /// Holds the `n` bytes read into `buf` until they are written; none (the end): `buf` goes back to its
    /// pool.
    fn hold(&mut self, buf: Box<Buf>, n: usize) {
        if n == 0 {
            give_buf(buf);
        } else {
            // `n` is at most BUF_SIZE, far below u32::MAX.
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            self.held = Held::Buf { buf, off: 0, len };
        }
    }

    /// Writes what is held to `dst`; once it is all written, the pipe or buffer goes back to its pool.
    fn poll_flush(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        wrote_some: &mut impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        loop {
            let wrote = match &mut self.held {
                Held::Nothing => return Poll::Ready(Ok(())),
                // The pipe holds `left` bytes, so WouldBlock can only come from the socket.
                Held::Pipe { pipe, left } if *left > 0 => dst
                    .try_io(Interest::WRITABLE, || splice(&pipe.r, dst, *left))
                    .map(|k| *left -= k),
                Held::Buf { buf, off, len } if *off < *len => {
                    let (from, to) = (*off as usize, *len as usize);
                    dst.try_write(&buf.0[from..to]).map(|k| {
                        *off += u32::try_from(k).unwrap_or(u32::MAX);
                    })
                }
                // Everything written: return the pipe (now empty) or buffer to its pool.
                Held::Pipe { .. } | Held::Buf { .. } => {
                    match std::mem::take(&mut self.held) {
                        Held::Pipe { pipe, .. } => give_pipe(pipe),
                        Held::Buf { buf, .. } => give_buf(buf),
                        Held::Nothing => {}
                    }
                    return Poll::Ready(Ok(()));
                }
            };
            match wrote {
                Ok(()) => wrote_some(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(dst.poll_write_ready(cx))?,
                // A pipe that still holds bytes is dropped with `self`, never pooled.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (the end a test writes to or reads from, the end the proxy holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (inner, _) = l.accept().await.unwrap();
        (outer, inner)
    }

    /// Forwards `len` bytes through one direction in `mode`; returns the largest batch moved at once, after
    /// checking the bytes arrived intact.
    async fn largest_batch(mode: Forwarding, len: usize) -> usize {
        let (mut client, mut from_client) = pair().await;
        let (mut backend, mut to_backend) = pair().await;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut dir = Direction::new(mode);
        let mut largest = 0;
        std::future::poll_fn(|cx| {
            let (src, _) = from_client.split();
            let (_, dst) = to_backend.split();
            dir.poll_forward(cx, src, dst, false, |n| largest = largest.max(n))
        })
        .await
        .unwrap();
        assert!(dir.is_done());
        drop(to_backend);
        let got = reader.await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "{mode:?}: the bytes came through altered");
        largest
    }

    /// The tests that take pipes, one at a time: the count of pipes lent is the process's.
    static PIPES_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[test]
    fn at_most_lent_max_pipes_are_lent() {
        let _one = PIPES_LOCK.blocking_lock();
        let mut out: Vec<Pipe> = (0..LENT_MAX).map(|_| take_pipe().unwrap()).collect();
        assert!(take_pipe().is_none(), "a pipe past LENT_MAX");
        // One given back, and one dropped (as with bytes still in it): each frees a place.
        give_pipe(out.pop().unwrap());
        let again = take_pipe().unwrap();
        drop(out.pop());
        out.push(take_pipe().unwrap());
        assert!(take_pipe().is_none());
        drop(again);
        drop(out);
        assert_eq!(LENT.load(Ordering::Relaxed), 0);
    }

    /// A write that moves bytes is told as activity (`moved(0)`), not only a read: stamped at reads alone, a
    /// download to a slow reader was cut by the idle timeout while its bytes kept arriving.
    #[tokio::test]
    async fn a_write_is_told_as_activity() {
        let _one = PIPES_LOCK.lock().await;
        for mode in [Forwarding::Copy, Forwarding::Splice] {
            let (mut client, mut from_client) = pair().await;
            let (_backend, mut to_backend) = pair().await;
            client.write_all(&[7u8; 1000]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut dir = Direction::new(mode);
            let mut told = Vec::new();
            std::future::poll_fn(|cx| {
                let (src, _) = from_client.split();
                let (_, dst) = to_backend.split();
                dir.poll_forward(cx, src, dst, false, |n| told.push(n))
            })
            .await
            .unwrap();
            assert_eq!(told.iter().sum::<usize>(), 1000, "{mode:?}: {told:?}");
            let first_write = told.iter().position(|n| *n == 0);
            assert!(first_write.is_some_and(|at| at > 0), "{mode:?}: {told:?}");
        }
    }

    #[tokio::test]
    async fn auto_splices_a_bulk_stream_and_copy_never_does() {
        let _one = PIPES_LOCK.lock().await;
        let bulk = 4 * 1024 * 1024;
        // Auto turns to splice once a read fills the buffer: batches beyond it.
        assert!(largest_batch(Forwarding::Auto, bulk).await > BUF_SIZE);
        assert!(largest_batch(Forwarding::Splice, bulk).await > BUF_SIZE);
        assert!(largest_batch(Forwarding::Copy, bulk).await <= BUF_SIZE);
    }
}
