//! Moving bytes between the client and the backend socket, one direction per future, with half-close.
//!
//! Three strategies, chosen by `proxy.forwarding`:
//! - `splice`: data goes socket → pipe → socket inside the kernel (`splice(2)`), never through user space.
//! - `copy`: `read`/`write` through a user-space buffer. A short read clears the socket's readiness (tokio's
//!   `poll_read` does this), so a small message costs one `read` and one `write`, where splice needs a third
//!   call that returns EAGAIN (a short splice does not prove the socket is empty: the pipe may be out of
//!   slots).
//! - `auto` (the default): per direction, copy while messages are small and switch to splice once a read fills the whole
//!   buffer (a bulk stream); back to copy when a splice moves less than `SPLICE_MIN`.
//!
//! Either way a connection holds **no pipe and no buffer while idle**: a direction waits for readiness first,
//! then borrows a pipe or buffer from a per-thread pool, moves what is there, and gives it back as soon as
//! everything read has been written. Memory per idle connection is the task's own state, a few hundred bytes.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::Counter;
use nix::fcntl::{OFlag, SpliceFFlags};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::config::Forwarding;

/// Bytes moved per `splice` call: the default pipe capacity.
const PIPE_CHUNK: usize = 64 * 1024;
/// Size of a pooled copy buffer.
const BUF_SIZE: usize = 16 * 1024;
/// In `auto`, a splice that moves less than this goes back to copying.
const SPLICE_MIN: usize = 16 * 1024;
/// Spare pipes and buffers kept per thread; more are closed or freed.
const POOL_MAX: usize = 64;

/// An in-kernel pipe used as the splice bounce buffer.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    if let Some(p) = PIPES.with_borrow_mut(Vec::pop) {
        return Ok(p);
    }
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    Ok(Pipe { r, w })
}

/// Returns an **empty** pipe to the pool (a pipe with bytes left in it is dropped instead).
fn give_pipe(p: Pipe) {
    PIPES.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push(p);
        }
    });
}

fn take_buf() -> Box<[u8]> {
    BUFS.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    BUFS.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push(b);
        }
    });
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// What a direction counts into, and where it stamps its last activity (for the idle timeout).
#[derive(Debug)]
pub struct Meter<'a> {
    pub listener_bytes: &'a Counter,
    pub backend_bytes: &'a Counter,
    /// Milliseconds after `start` of the last byte moved in either direction.
    pub last: &'a AtomicU64,
    pub start: Instant,
}

impl Meter<'_> {
    fn moved(&self, n: usize) {
        let n = n as u64;
        self.listener_bytes.increment(n);
        self.backend_bytes.increment(n);
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

/// Propagates end-of-stream: the peer that sent FIN sees its half closed on the other side.
fn half_close(dst: &TcpStream) {
    // ENOTCONN when the other side already reset: nothing left to tell it.
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
}

/// Moves bytes from `src` to `dst` until `src` ends, then half-closes `dst`.
///
/// Written as one flat loop rather than nested async steps so that the compiler overlays the read and write
/// waits in one slot: this future is most of what an idle connection costs.
pub async fn one_way(
    mode: Forwarding,
    mut src: ReadHalf<'_>,
    dst: WriteHalf<'_>,
    m: Meter<'_>,
) -> io::Result<()> {
    let mut splicing = mode == Forwarding::Splice;
    loop {
        // Wait with nothing borrowed: an idle direction holds no pipe and no buffer. The poll form keeps the
        // wait to one pointer of state (`readable()` is a 150-byte future), and it spends tokio's cooperative
        // budget, so an always-ready bulk stream still yields to the other connections of its worker.
        std::future::poll_fn(|cx| src.as_ref().poll_read_ready(cx)).await?;
        let n = if splicing {
            // socket → pooled pipe → socket.
            let pipe = take_pipe()?;
            let (s, d) = (src.as_ref(), dst.as_ref());
            let n = match s.try_io(Interest::READABLE, || splice(s, &pipe.w, PIPE_CHUNK)) {
                Ok(n) => n,
                Err(e) => {
                    give_pipe(pipe);
                    if e.kind() == io::ErrorKind::WouldBlock {
                        continue;
                    }
                    return Err(e);
                }
            };
            let mut left = n;
            while left > 0 {
                // The pipe holds `left` bytes, so WouldBlock can only come from the socket.
                match d.try_io(Interest::WRITABLE, || splice(&pipe.r, d, left)) {
                    Ok(k) => left -= k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::future::poll_fn(|cx| d.poll_write_ready(cx)).await?
                    }
                    // The pipe still holds bytes: drop it rather than pool it.
                    Err(e) => return Err(e),
                }
            }
            give_pipe(pipe);
            n
        } else {
            // socket → pooled buffer → socket.
            let mut buf = take_buf();
            // One non-blocking attempt through `poll_read`, which clears readiness after a short read. A noop
            // waker is enough: on `Pending` (stale readiness, or no budget left) we yield and wait again.
            let (read, n) = {
                let mut rb = ReadBuf::new(&mut buf);
                let mut cx = Context::from_waker(Waker::noop());
                let read = Pin::new(&mut src).poll_read(&mut cx, &mut rb);
                (read, rb.filled().len())
            };
            match read {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    give_buf(buf);
                    return Err(e);
                }
                Poll::Pending => {
                    give_buf(buf);
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            let d = dst.as_ref();
            let mut off = 0;
            while off < n {
                match d.try_write(&buf[off..n]) {
                    Ok(k) => off += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::future::poll_fn(|cx| d.poll_write_ready(cx)).await?
                    }
                    Err(e) => {
                        give_buf(buf);
                        return Err(e);
                    }
                }
            }
            give_buf(buf);
            n
        };
        if n == 0 {
            half_close(dst.as_ref());
            return Ok(());
        }
        m.moved(n);
        if mode == Forwarding::Auto {
            splicing = if splicing { n >= SPLICE_MIN } else { n == BUF_SIZE };
        }
    }
}
