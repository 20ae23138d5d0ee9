//! Moving bytes between the client and the backend socket, one direction per future, with half-close.
//!
//! Three strategies, chosen by `proxy.forwarding`:
//! - `splice`: data goes socket → pipe → socket inside the kernel (`splice(2)`), never through user space.
//! - `copy`: `read`/`write` through a user-space buffer. A short read clears the socket's readiness (tokio's
//!   `poll_read` does this), so a small message costs one `read` and one `write`, where splice needs a third
//!   call that returns EAGAIN (a short splice does not prove the socket is empty: the pipe may be out of
//!   slots).
//! - `auto`: per direction, copy while messages are small and switch to splice once a read fills the whole
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
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWriteExt, Interest, ReadBuf};
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

/// What one read-write exchange did.
enum Step {
    Moved(usize),
    /// Not readable after all (readiness was stale): wait again.
    Again,
    Eof,
}

/// Moves bytes from `src` to `dst` until `src` ends, then half-closes `dst`.
pub async fn one_way(
    mode: Forwarding,
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    m: Meter<'_>,
) -> io::Result<()> {
    let mut splicing = mode == Forwarding::Splice;
    loop {
        // `readable()` does not count against tokio's cooperative budget: without this, a bulk stream that is
        // always ready would never yield and would starve the other connections of a per-core worker.
        tokio::task::consume_budget().await;
        // Wait with nothing borrowed: an idle direction holds no pipe and no buffer.
        src.as_ref().readable().await?;
        let step = if splicing {
            splice_step(src.as_ref(), dst.as_ref()).await?
        } else {
            copy_step(&mut src, &mut dst).await?
        };
        match step {
            Step::Moved(n) => {
                m.moved(n);
                if mode == Forwarding::Auto {
                    splicing = if splicing { n >= SPLICE_MIN } else { n == BUF_SIZE };
                }
            }
            // Stale readiness, or `poll_read` ran out of budget (it then wakes us at once): yield so the
            // loop cannot spin inside one poll.
            Step::Again => tokio::task::yield_now().await,
            Step::Eof => {
                half_close(dst.as_ref());
                return Ok(());
            }
        }
    }
}

/// socket → pooled pipe → socket.
async fn splice_step(src: &TcpStream, dst: &TcpStream) -> io::Result<Step> {
    let pipe = take_pipe()?;
    let n = match src.try_io(Interest::READABLE, || splice(src, &pipe.w, PIPE_CHUNK)) {
        Ok(0) => {
            give_pipe(pipe);
            return Ok(Step::Eof);
        }
        Ok(n) => n,
        Err(e) => {
            give_pipe(pipe);
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(Step::Again)
            } else {
                Err(e)
            };
        }
    };
    let mut left = n;
    while left > 0 {
        // The pipe holds `left` bytes, so WouldBlock can only come from the socket.
        match dst.try_io(Interest::WRITABLE, || splice(&pipe.r, dst, left)) {
            Ok(k) => left -= k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            // The pipe still holds bytes: drop it rather than pool it.
            Err(e) => return Err(e),
        }
    }
    give_pipe(pipe);
    Ok(Step::Moved(n))
}

/// socket → pooled buffer → socket.
async fn copy_step(src: &mut ReadHalf<'_>, dst: &mut WriteHalf<'_>) -> io::Result<Step> {
    let mut buf = take_buf();
    let mut rb = ReadBuf::new(&mut buf);
    // One non-blocking attempt: `Pending` means the readiness was stale; give the buffer back and wait.
    let read = std::future::poll_fn(|cx| match Pin::new(&mut *src).poll_read(cx, &mut rb) {
        Poll::Pending => Poll::Ready(None),
        Poll::Ready(r) => Poll::Ready(Some(r)),
    })
    .await;
    let n = rb.filled().len();
    let step = match read {
        None => Step::Again,
        Some(Err(e)) => {
            give_buf(buf);
            return Err(e);
        }
        Some(Ok(())) if n == 0 => Step::Eof,
        Some(Ok(())) => {
            if let Err(e) = dst.write_all(&buf[..n]).await {
                give_buf(buf);
                return Err(e);
            }
            Step::Moved(n)
        }
    };
    give_buf(buf);
    Ok(step)
}
