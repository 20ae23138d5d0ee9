//! Bytes both ways: the multishot receives, the queues of received buffers and their sends, and the pumps a
//! bulk direction moves by (splice through a pipe, or a hot buffer), with half-close.

use std::io;
use std::os::fd::BorrowedFd;

use io_uring::types::Fd;
use io_uring::{cqueue, opcode};
use tracing::debug;

use crate::proxy::access::{End, Side};
use crate::proxy::config::Forwarding;
use crate::proxy::forward;
use crate::proxy::metrics::{BUFFER_WAITS_TOTAL, RECEIVE_PAUSES_TOTAL, SPLICED_BYTES_TOTAL};

use super::{
    BUF_GROUP, BUF_GROW, BUF_LEN, Loop, NO_BUF, Op, PUMP_BYTES, PUMP_MAX, QUEUE_MAX, pipe_key, user_data,
};

impl Loop {
    /// Starts the multishot receive of direction `d`, unless one is live or the source has ended; a bulk
    /// direction pumps instead, once its queue is sent.
    pub(super) fn arm_recv(&mut self, slot: u32, d: usize) {
        self.arm_recv_after(slot, d, false);
    }

    /// [`Loop::arm_recv`]; `polled`: the source has just polled readable ([`Loop::on_ready`]).
    fn arm_recv_after(&mut self, slot: u32, d: usize, polled: bool) {
        let splice = self.shared.forwarding != Forwarding::Copy;
        let Some(c) = self.conn(slot) else { return };
        let dir = &mut c.dirs[d];
        if c.closing || dir.armed || dir.eof || dir.done {
            return;
        }
        if dir.bulk {
            if dir.head == NO_BUF && !dir.polling {
                if splice {
                    self.pump_splice(slot, d, polled);
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
    pub(super) fn maybe_resume(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conn(slot) else { return };
        let dir = c.dirs[d];
        if !dir.armed && !dir.pausing && !dir.starved && dir.queued <= QUEUE_MAX / 2 {
            self.arm_recv(slot, d);
        }
    }

    /// Pushes the first send of each queue that filled during the batch just reaped. A slot listed twice
    /// (closed and reused within the batch) or closed since is skipped by the `unsent` flag.
    pub(super) fn push_unsent(&mut self) {
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

    /// Sends the rest of the head of direction `d`'s queue (not on a closing connection: a send submitted
    /// after its close's cancels is not cancelled, and toward a peer that reads nothing it waited for good,
    /// holding the slot, its descriptors and its permit).
    pub(super) fn push_send(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        if c.closing {
            return;
        }
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

    pub(super) fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        if let Some(b) = bid {
            self.bufs.taken(b);
        }
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
                // A buffer given back since the kernel found the ring empty (a send completed earlier in
                // this batch) woke no one, as this direction was not waiting yet: it tries again at once.
                if self.bufs.in_ring() > 0 || self.bufs.grow(BUF_GROW) {
                    self.maybe_resume(slot, d);
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
    pub(super) fn pump(&mut self, slot: u32, d: usize) {
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
    pub(super) fn arm_ready(&mut self, slot: u32, d: usize) {
        self.arm_poll(slot, d, Op::Ready);
    }

    /// Polls direction `d`'s destination for room, while a pipe holds its bytes.
    pub(super) fn arm_writable(&mut self, slot: u32, d: usize) {
        self.arm_poll(slot, d, Op::Writable);
    }

    /// The one-shot poll of a bulk direction: `Op::Ready` on its source, `Op::Writable` on its destination.
    pub(super) fn arm_poll(&mut self, slot: u32, d: usize, op: Op) {
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
    pub(super) fn on_ready(&mut self, slot: u32, d: usize, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let Some(c) = self.conn(slot) else { return };
        c.dirs[d].polling = false;
        if res < 0 {
            self.fail(slot, Side::source_of(d), -res);
            return;
        }
        self.arm_recv_after(slot, d, true);
    }

    /// [`Loop::pump`] through a pipe: a bulk direction's bytes go socket → pipe → socket with `splice`,
    /// never through this process, for up to `PUMP_BYTES`, then it waits for more with a poll.
    pub(super) fn pump_splice(&mut self, slot: u32, d: usize, polled: bool) {
        let moved = self.splice_turn(slot, d, polled);
        if moved > 0 {
            metrics::counter!(SPLICED_BYTES_TOTAL).increment(moved as u64);
        }
    }

    /// One turn of [`Loop::pump_splice`]; returns the bytes spliced in. `polled`: the source has just polled
    /// readable, so a first splice that moves nothing is at TCP's urgent mark, which `splice` never passes
    /// (`tcp_read_sock` stops there): the turn copies instead, whose `recv` passes it. Polling again, the
    /// poll answered at once and the splice moved nothing again: a worker spun at 100% until the idle
    /// timeout, on any client's urgent byte.
    ///
    /// The pipe comes from the thread's pool (shared with [`super::forward`]) and goes back empty; when the
    /// destination takes only part of it, the direction keeps it in `Loop::pipes` and polls for room.
    /// Called, as `pump`, only with the queue empty and nothing of the direction's in flight.
    pub(super) fn splice_turn(&mut self, slot: u32, d: usize, polled: bool) -> usize {
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
                // The end, or the urgent mark with the peer's FIN behind it (splice says 0 there too): the
                // copy's `recv` tells, 0 at the real end. Taken for the end, the bytes past the mark were
                // dropped and the backend half-closed.
                Ok(0) => {
                    forward::give_pipe(pipe);
                    self.pump(slot, d);
                    return moved;
                }
                Ok(n) => n,
                Err(e) => {
                    forward::give_pipe(pipe);
                    match e.kind() {
                        io::ErrorKind::WouldBlock if polled && moved == 0 => self.pump(slot, d),
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
    pub(super) fn on_writable(&mut self, slot: u32, d: usize, res: i32) {
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
            // At most `left`. Bytes moved, as a send's (`on_send`).
            Ok(k) => {
                *left -= k as u32;
                if k > 0 {
                    c.last_ms = self.now_ms;
                }
            }
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
    pub(super) fn fail(&mut self, slot: u32, side: Side, errno: i32) {
        debug!(%side, error = %io::Error::from_raw_os_error(errno), "connection ended");
        if let Some(c) = self.conn(slot) {
            c.active.ended(End::Error(side, errno));
        }
        self.close(slot);
    }

    /// Passes on the end of direction `d`'s source: a half-close, or the close of the connection when the
    /// other direction has ended already (both sockets were read to their end, so `close` sends a FIN).
    pub(super) fn end_direction(&mut self, slot: u32, d: usize) {
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

    pub(super) fn on_send(&mut self, slot: u32, d: usize, res: i32) {
        if !self.finish_op(slot) {
            return;
        }
        let now_ms = self.now_ms;
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
        // Bytes moved: a slow reader draining what is queued for it is activity too, as in the tokio runtime.
        // Stamped on receives only, a download to a client reading slower than the queue (4 buffers, and the
        // socket's own buffer) drains was cut at the idle timeout while it still moved.
        c.last_ms = now_ms;
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
}
