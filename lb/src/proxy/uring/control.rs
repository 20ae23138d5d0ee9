//! Messages from the manager (listeners added and removed), the tick (timeouts, back-offs, byte counters),
//! and accepts.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use io_uring::types::Fd;
use io_uring::{cqueue, opcode};
use socket2::{SockAddr, SockAddrStorage};
use tracing::{debug, warn};

use crate::proxy::access::End;
use crate::proxy::limit::Permit;
use crate::proxy::listener::{BACKOFF_MAX, BACKOFF_MIN, is_resource_exhaustion};
use crate::proxy::metrics::BUFFERS_HELD;
use crate::proxy::service::Admit;
use crate::proxy::spin::Spin;

use super::{FINISH_WAIT, Loop, Lst, Msg, Op, millis, user_data};

impl Loop {
    pub(super) fn on_wake(&mut self) {
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

    pub(super) fn on_tick(&mut self) {
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
        // often enough that a connection outlives its timeout by at most a quarter of the shortest of the open
        // listeners' and a second at most. A second at most also when no open listener has one: a removed
        // listener's connections keep theirs (they were never looked at once the last listener with a
        // timeout had gone, or while every listener closed for a drain). 8,000 connections take some tens of
        // microseconds.
        let shortest = (self.listeners.iter().flatten())
            .flat_map(|l| {
                let cfg = &l.state.load().cfg;
                [cfg.idle, cfg.fin]
            })
            .flatten()
            .min();
        let every = shortest.map_or(1_000, |d| (millis(d) / 4).clamp(1, 1_000));
        let scan = self.now_ms.wrapping_sub(self.last_scan_ms) >= every;
        if scan {
            self.last_scan_ms = self.now_ms;
            // Directions that closed while they waited for a buffer: left in the queue until a buffer came
            // back, it grew with every connection that closed through a long shortage.
            let conns = &self.conns;
            self.starved.retain(|(slot, d)| {
                (conns.get(*slot as usize).and_then(Option::as_ref))
                    .is_some_and(|c| !c.closing && c.dirs[*d].starved)
            });
        }
        let mut held = 0;
        for slot in 0..self.conns.len() {
            let Some(c) = &mut self.conns[slot] else { continue };
            c.flush_bytes();
            // Half-closed once either end has been passed on (after every byte before it), as the tokio
            // runtime's `is_done`: then `fin_timeout_ms` counts, if set. From the source's end (`eof`), a
            // response whose last buffers waited for a slow client's window was cut by the fin timeout.
            let half = c.dirs[0].done || c.dirs[1].done;
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
    pub(super) fn show_held(&mut self, held: u32) {
        if held != self.held_shown {
            let g = metrics::gauge!(BUFFERS_HELD);
            g.increment(f64::from(held));
            g.decrement(f64::from(self.held_shown));
            self.held_shown = held;
        }
    }

    pub(super) fn remove_listener(&mut self, i: usize) {
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
    pub(super) fn arm_accept(&mut self, i: usize) {
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
    pub(super) fn on_accept(&mut self, i: u32, dir: usize, res: i32, flags: u32) {
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
            // Accepted as the worker was told to finish (its accepts cancelled, its connections closed):
            // served, it would hold the worker its whole wait and be cut at its end.
            let finishing = self.finishing.is_some();
            if let (Some(peer), Some(permit), false) = (peer, permit, finishing) {
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
}
