//! The ring of provided buffers the kernel receives into, and the spare buffers the pumps use.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

use super::{BUF_GROUP, BUF_INITIAL, BUF_LEN, NO_BUF, SPARE_RATIO, SPARES_MAX};

/// The ring of provided buffers: `count` buffers of `BUF_LEN` bytes, and the ring of entries through which
/// they are handed to the kernel; and `spares(count)` more, with ids from `count` on, that this code lends
/// itself.
pub(super) struct Bufs {
    pub(super) entries: *mut BufRingEntry,
    pub(super) mem: *mut u8,
    pub(super) count: u16,
    /// The spare buffers' memory, and the ids of those free: a stack, so the one lent next is the one last
    /// given back, still in the cache.
    pub(super) spare_mem: *mut u8,
    pub(super) spares: Vec<u16>,
    /// Buffer ids `0..given` have been handed to the kernel; the rest of `mem` is untouched.
    pub(super) given: u16,
    /// Ring buffers the kernel has handed to this code (their completions seen) and not yet given back.
    out: u16,
    pub(super) tail: u16,
    /// Per buffer id, while it is queued: the bytes received into it, and the next buffer of its queue.
    pub(super) len: Vec<u32>,
    pub(super) next: Vec<u16>,
}

impl Bufs {
    pub(super) fn entries_layout(count: u16) -> Layout {
        // The ring must be page-aligned; 16 bytes per entry.
        Layout::from_size_align(usize::from(count) * size_of::<BufRingEntry>(), 4096)
            .unwrap_or(Layout::new::<u8>())
    }

    pub(super) fn mem_layout(count: u16) -> Layout {
        Layout::from_size_align(usize::from(count) * BUF_LEN as usize, 4096).unwrap_or(Layout::new::<u8>())
    }

    pub(super) fn spares(count: u16) -> u16 {
        (count / SPARE_RATIO).clamp(1, SPARES_MAX)
    }

    /// Ids of buffers in the ring and spare ones alike.
    pub(super) fn ids(count: u16) -> usize {
        usize::from(count) + usize::from(Self::spares(count))
    }

    /// Reserves `count` buffers (a power of two: config validation checks it, and the kernel refuses a ring
    /// of any other size) and registers their ring with `ring`, `BUF_INITIAL` of them handed out.
    pub(super) fn new(ring: &IoUring, count: u16) -> io::Result<Self> {
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
            out: 0,
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
    pub(super) fn grow(&mut self, n: u16) -> bool {
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

    pub(super) fn addr(&self, bid: u16) -> *mut u8 {
        // SAFETY: `bid` < `count + spares(count)` (the kernel returns only ids this code gave it, and spare ids
        // come from `spares`), so the offset is in the allocation.
        unsafe {
            match bid.checked_sub(self.count) {
                None => self.mem.add(usize::from(bid) * BUF_LEN as usize),
                Some(spare) => self.spare_mem.add(usize::from(spare) * BUF_LEN as usize),
            }
        }
    }

    /// Notes that a completion brought ring buffer `bid` to this code.
    pub(super) fn taken(&mut self, bid: u16) {
        if bid < self.count {
            self.out += 1;
        }
    }

    /// Ring buffers the kernel can hand out, as far as the completions seen so far tell: more than it had
    /// when a completion reaped since reports the ring empty, if a buffer was given back in between.
    pub(super) fn in_ring(&self) -> u16 {
        self.given.saturating_sub(self.out)
    }

    /// Takes buffer `bid` back: to the kernel's ring, or to the spare stack.
    pub(super) fn put(&mut self, bid: u16) {
        if bid >= self.count {
            self.spares.push(bid);
        } else {
            self.out = self.out.saturating_sub(1);
            self.give(bid);
        }
    }

    /// Hands buffer `bid` (back) to the kernel.
    pub(super) fn give(&mut self, bid: u16) {
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
