//! Taking descriptor chains off a queue and checking them before anything reads or
//! writes their buffers.
//!
//! A [`Chain`] is a request whose every buffer lies inside one region of guest RAM, whose
//! device-readable buffers all come before its device-writable ones, and whose last
//! descriptor really ends the chain (so loops, next-indices outside the table and chains
//! longer than the queue are caught: virtio-queue's iterator stops after queue-size
//! descriptors, and we refuse a chain whose last descriptor still says "next").
//! virtio-queue bounds an indirect table only by its own length (up to 65535 entries), so
//! we also count every descriptor of the chain, direct and indirect, against the queue's
//! maximum size: the spec's limit is the driver's queue size, but Linux, when it had to
//! shrink a queue for lack of memory, still builds indirect tables up to the device's
//! segment limit (which our devices derive from the maximum size).
//! Devices then address the readable and writable parts as flat byte ranges.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use smallvec::SmallVec;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmon_memory::GuestMemory;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error(
        "the descriptor chain does not end (a loop, a bad next index, or longer than the queue)"
    )]
    Unterminated,
    #[error("the descriptor chain is empty")]
    Empty,
    #[error("buffer {addr:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam { addr: u64, len: u32 },
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request needs {need} bytes, the buffers hold {have}")]
    TooShort { need: u64, have: u64 },
}

/// The queue itself is unusable: the device must stop and wait for a reset.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueBroken {
    #[error("the available ring is unreadable or its index jumped by more than the queue size")]
    AvailRing,
    #[error("descriptor head {head} is outside a queue of {size}")]
    HeadIndex { head: u16, size: u16 },
    #[error("the used ring is not writable")]
    UsedRing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    addr: u64,
    len: u32,
}

/// A request's buffers on one side. Most requests have one to three (a block request's
/// header, data and status; a packet), so they live inline: a heap allocation per request
/// was a measurable part of serving a 4 KiB read.
type Segments = SmallVec<[Segment; 4]>;

/// Host iovecs over a chain's buffers, inline for the common few.
pub type IoVecs = SmallVec<[libc::iovec; 4]>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    readable: Segments,
    writable: Segments,
    readable_len: u64,
    writable_len: u64,
}

/// A chain taken off the available ring: its head (to return it with) and its buffers,
/// or why they are unusable.
pub struct Popped {
    pub head: u16,
    pub chain: Result<Chain, ChainError>,
}

/// Takes the next available chain, if any.
pub fn pop(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<Popped>, QueueBroken> {
    let size = queue.size();
    let max_descriptors = usize::from(queue.max_size());
    let mut iter = queue.iter(mem).map_err(|_| QueueBroken::AvailRing)?;
    let Some(descriptors) = iter.next() else {
        return Ok(None);
    };
    let head = descriptors.head_index();
    if head >= size {
        return Err(QueueBroken::HeadIndex { head, size });
    }
    let mut chain = Chain::default();
    let mut terminated = false;
    let mut any = false;
    let parse = || -> Result<(), ChainError> {
        for (i, d) in descriptors.enumerate() {
            if i == max_descriptors {
                return Err(ChainError::Unterminated);
            }
            any = true;
            terminated = !d.has_next();
            chain.push(mem, d.addr().0, d.len(), d.is_write_only())?;
        }
        Ok(())
    };
    let parsed = parse();
    let chain = match parsed {
        Err(e) => Err(e),
        Ok(()) if !any => Err(ChainError::Empty),
        Ok(()) if !terminated => Err(ChainError::Unterminated),
        Ok(()) => Ok(chain),
    };
    Ok(Some(Popped { head, chain }))
}

/// Returns a chain to the driver with `len` bytes written.
pub fn complete(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), QueueBroken> {
    queue
        .add_used(mem, head, len)
        .map_err(|_| QueueBroken::UsedRing)
}

/// Serves every chain the driver offers, re-arming driver notifications the way
/// VIRTIO_F_EVENT_IDX needs (so a chain added while we finish is never missed), and says
/// whether the driver wants an interrupt for what was used. `handle` returns the number of
/// bytes it wrote into the chain.
pub fn serve_all(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(Popped) -> u32,
) -> Result<bool, QueueBroken> {
    serve_some(queue, mem, |p| Taken::Used(handle(p))).map(|s| s.notify)
}

/// What a device's handler did with a chain [`serve_some`] gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Served: return it to the driver with this many bytes written.
    Used(u32),
    /// Started: the device returns it itself when it finishes ([`complete_together`]).
    Pending,
    /// Not now (a device waiting for a rate limit): it goes back on the available ring.
    Declined,
}

/// The result of [`serve_some`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The driver wants an interrupt for the chains used.
    pub notify: bool,
    /// The handler declined a chain; it is back on the ring for later.
    pub stalled: bool,
}

/// Like [`serve_all`], but `handle` may also keep a chain to finish later
/// ([`Taken::Pending`]), or decline it ([`Taken::Declined`], a device waiting for a rate
/// limit): the chain goes back on the available ring and serving stops until the device
/// calls again. Driver notifications stay off while stalled; the device has its own
/// wake-up.
pub fn serve_some(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(Popped) -> Taken,
) -> Result<Served, QueueBroken> {
    let since = queue.next_used();
    let mut done: SmallVec<[(u16, u32); USED_BATCH]> = SmallVec::new();
    let mut stalled = false;
    'serve: loop {
        queue
            .disable_notification(mem)
            .map_err(|_| QueueBroken::UsedRing)?;
        loop {
            let p = match pop(queue, mem) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(broken) => {
                    // What was served before the ring broke still reaches the driver.
                    complete_together(queue, mem, &done)?;
                    return Err(broken);
                }
            };
            let head = p.head;
            let len = match handle(p) {
                Taken::Used(len) => len,
                Taken::Pending => continue,
                Taken::Declined => {
                    unpop(queue);
                    stalled = true;
                    break 'serve;
                }
            };
            done.push((head, len));
            if done.len() == USED_BATCH {
                complete_together(queue, mem, &done)?;
                done.clear();
            }
        }
        complete_together(queue, mem, &done)?;
        done.clear();
        if !queue
            .enable_notification(mem)
            .map_err(|_| QueueBroken::UsedRing)?
        {
            break;
        }
    }
    complete_together(queue, mem, &done)?;
    let notify = queue.next_used() != since && wants_interrupt(queue, mem, since)?;
    Ok(Served { notify, stalled })
}

/// Whether the driver has offered chains the device has not taken (or the ring is
/// unreadable, which serving will report).
pub fn offered(queue: &Queue, mem: &GuestMemory) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map_or(true, |idx| idx.0 != queue.next_avail())
}

/// Looks for the driver's next chain with `spin` (which calls its argument until it says
/// true or gives up) while asking the driver not to notify: a driver that honours the
/// request (Linux does) then skips its notify, and with it a VM exit, for every request
/// that arrives while the device is looking. Notifications are back on when this returns,
/// and a chain offered meanwhile is seen, so nothing waits for a notify that never came.
pub fn spin_for_more(
    queue: &mut Queue,
    mem: &GuestMemory,
    spin: impl FnOnce(&mut dyn FnMut() -> bool) -> bool,
) -> bool {
    if suppress_notifications(queue, mem).is_err() {
        return true; // serving will find the broken ring
    }
    let queue_ref = &*queue;
    if spin(&mut || offered(queue_ref, mem)) {
        // Left off: the pass that serves this chain turns them back on at its end.
        return true;
    }
    queue.enable_notification(mem).unwrap_or(true)
}

/// Asks the driver not to notify. Without VIRTIO_F_EVENT_IDX that is the used ring's
/// NO_NOTIFY flag. With it, virtio-queue leaves the ring alone, so this moves
/// `avail_event` just behind the index the driver has already passed: the driver notifies
/// when its index crosses `avail_event`, which it will not do again until the index wraps.
fn suppress_notifications(queue: &mut Queue, mem: &GuestMemory) -> Result<(), QueueBroken> {
    if !queue.event_idx_enabled() {
        return queue
            .disable_notification(mem)
            .map_err(|_| QueueBroken::UsedRing);
    }
    let avail_event = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(QueueBroken::UsedRing)?;
    let behind = Wrapping(queue.next_avail()) - Wrapping(1);
    mem.store(u16::to_le(behind.0), avail_event, Ordering::Relaxed)
        .map_err(|_| QueueBroken::UsedRing)
}

/// Chains [`serve_some`] returns to the driver with one move of the used index. Publishing
/// each chain on its own costs an index store and a barrier per request; publishing only
/// at the end of a pass would hold a long pass's first completions back from a driver that
/// polls the used ring.
const USED_BATCH: usize = 16;

/// Puts back the chain just popped (the device could not take it yet, e.g. no room).
pub fn unpop(queue: &mut Queue) {
    unpop_n(queue, 1);
}

/// Puts back the last `n` chains popped, which the driver offers again in the same order.
pub fn unpop_n(queue: &mut Queue, n: usize) {
    queue.set_next_avail((Wrapping(queue.next_avail()) - Wrapping(n as u16)).0);
}

/// Returns several chains to the driver at once: every used element is written first and
/// the used index moves once, so the driver never sees some of them without the others.
/// (A packet merged over several receive buffers must arrive whole: Linux drops it if the
/// used ring holds fewer buffers than the header announces.) virtio-queue's `add_used`
/// publishes each element as it goes, so this writes the ring itself, through the same
/// bounds-checked accesses; [`wants_interrupt`] then decides on the interrupt, since
/// virtio-queue's own decision does not count chains returned here.
pub fn complete_together(
    queue: &mut Queue,
    mem: &GuestMemory,
    used: &[(u16, u32)],
) -> Result<(), QueueBroken> {
    const RING_HEADER: u64 = 4;
    const ELEMENT: u64 = 8;
    if used.is_empty() {
        return Ok(());
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let next = Wrapping(queue.next_used());
    for (i, &(head, len)) in used.iter().enumerate() {
        if head >= size {
            return Err(QueueBroken::HeadIndex { head, size });
        }
        let slot = u64::from((next + Wrapping(i as u16)).0 % size);
        // virtq_used_elem: id and len, little-endian u32s.
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        let at = ring
            .checked_add(RING_HEADER + slot * ELEMENT)
            .ok_or(QueueBroken::UsedRing)?;
        mem.write_slice(&element, at)
            .map_err(|_| QueueBroken::UsedRing)?;
    }
    let published = next + Wrapping(used.len() as u16);
    queue.set_next_used(published.0);
    let index = ring.checked_add(2).ok_or(QueueBroken::UsedRing)?;
    mem.store(u16::to_le(published.0), index, Ordering::Release)
        .map_err(|_| QueueBroken::UsedRing)
}

/// Whether the driver wants an interrupt for what was used since the used index was
/// `since` (the index at the previous decision): the driver's `used_event` must lie in
/// that stretch when VIRTIO_F_EVENT_IDX is on, else its NO_INTERRUPT flag must be clear.
/// The same rule as virtio-queue's `needs_notification`, which only counts chains
/// returned through `add_used`.
pub fn wants_interrupt(queue: &Queue, mem: &GuestMemory, since: u16) -> Result<bool, QueueBroken> {
    const NO_INTERRUPT: u16 = 1;
    // The used elements and index must be visible before the driver's flags are read.
    std::sync::atomic::fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    let read = |offset: u64| -> Result<u16, QueueBroken> {
        let at = avail.checked_add(offset).ok_or(QueueBroken::AvailRing)?;
        mem.load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| QueueBroken::AvailRing)
    };
    if queue.event_idx_enabled() {
        let used_event = Wrapping(read(4 + 2 * u64::from(queue.size()))?);
        let new = Wrapping(queue.next_used());
        let old = Wrapping(since);
        Ok(new - used_event - Wrapping(1) < new - old)
    } else {
        Ok(read(0)? & NO_INTERRUPT == 0)
    }
}

impl Chain {
    /// Appends one descriptor's buffer after checking it lies inside one RAM region.
    pub fn push(
        &mut self,
        mem: &GuestMemory,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<(), ChainError> {
        if !writable && !self.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        if len == 0 {
            return Ok(());
        }
        if mem.get_slice(GuestAddress(addr), len as usize).is_err() {
            return Err(ChainError::OutsideRam { addr, len });
        }
        let seg = Segment { addr, len };
        if writable {
            self.writable.push(seg);
            self.writable_len += u64::from(len);
        } else {
            self.readable.push(seg);
            self.readable_len += u64::from(len);
        }
        Ok(())
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Copies readable bytes `offset..offset + buf.len()` into `buf`.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in pieces(&self.readable, offset, buf.len() as u64, self.readable_len)? {
            mem.read_slice(&mut buf[done..done + len], GuestAddress(addr))
                .map_err(|_| ChainError::OutsideRam {
                    addr,
                    len: len as u32,
                })?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into the writable bytes starting at `offset`.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for (addr, len) in pieces(&self.writable, offset, data.len() as u64, self.writable_len)? {
            mem.write_slice(&data[done..done + len], GuestAddress(addr))
                .map_err(|_| ChainError::OutsideRam {
                    addr,
                    len: len as u32,
                })?;
            done += len;
        }
        Ok(())
    }

    /// Writes one byte at writable offset `offset` with a single store: every block request
    /// ends with its status byte, and a byte needs none of the copy machinery of
    /// [`Self::write_at`].
    pub fn write_byte_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        value: u8,
    ) -> Result<(), ChainError> {
        let (addr, _) = pieces(&self.writable, offset, 1, self.writable_len)?
            .next()
            .ok_or(ChainError::TooShort {
                need: offset + 1,
                have: self.writable_len,
            })?;
        mem.store(value, GuestAddress(addr), Ordering::Relaxed)
            .map_err(|_| ChainError::OutsideRam { addr, len: 1 })
    }

    /// Host iovecs for readable bytes `offset..offset + len`.
    pub fn readable_iovecs(
        &self,
        mem: &GuestMemory,
        offset: u64,
        len: u64,
    ) -> Result<IoVecs, ChainError> {
        iovecs(mem, pieces(&self.readable, offset, len, self.readable_len)?)
    }

    /// Host iovecs for writable bytes `offset..offset + len`.
    pub fn writable_iovecs(
        &self,
        mem: &GuestMemory,
        offset: u64,
        len: u64,
    ) -> Result<IoVecs, ChainError> {
        iovecs(mem, pieces(&self.writable, offset, len, self.writable_len)?)
    }
}

/// The (guest address, length) pieces covering bytes `offset..offset + len` of `segments`,
/// once that range is known to lie inside them.
fn pieces(
    segments: &[Segment],
    offset: u64,
    len: u64,
    total: u64,
) -> Result<Pieces<'_>, ChainError> {
    let need = offset.checked_add(len).ok_or(ChainError::TooShort {
        need: u64::MAX,
        have: total,
    })?;
    if need > total {
        return Err(ChainError::TooShort { need, have: total });
    }
    Ok(Pieces {
        segments: segments.iter(),
        skip: offset,
        left: len,
    })
}

/// Walks the segments lazily rather than collecting the pieces: every request reads its
/// header and writes its status through here.
struct Pieces<'a> {
    segments: std::slice::Iter<'a, Segment>,
    skip: u64,
    left: u64,
}

impl Iterator for Pieces<'_> {
    type Item = (u64, usize);

    fn next(&mut self) -> Option<(u64, usize)> {
        while self.left > 0 {
            let s = self.segments.next()?;
            let seg_len = u64::from(s.len);
            if self.skip >= seg_len {
                self.skip -= seg_len;
                continue;
            }
            let take = (seg_len - self.skip).min(self.left);
            let piece = (s.addr + self.skip, take as usize);
            self.left -= take;
            self.skip = 0;
            return Some(piece);
        }
        None
    }
}

fn iovecs(mem: &GuestMemory, pieces: Pieces<'_>) -> Result<IoVecs, ChainError> {
    pieces
        .map(|(addr, len)| {
            let slice =
                mem.get_slice(GuestAddress(addr), len)
                    .map_err(|_| ChainError::OutsideRam {
                        addr,
                        len: len as u32,
                    })?;
            Ok(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestMemoryMmap};

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const F_INDIRECT: u16 = 4;

    pub fn memory() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// One chain made of `descs` (indices 0..n) offered on a 16-entry queue.
    fn offer(mem: &GuestMemory, descs: &[RawDescriptor]) -> Queue {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).ok();
        // build_desc_chain rewrites next/flags; write the table raw for hostile shapes.
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(*d, vq.desc_table_addr().unchecked_add(16 * i as u64))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        vq.create_queue().unwrap()
    }

    fn pop_one(mem: &GuestMemory, descs: &[RawDescriptor]) -> Result<Chain, ChainError> {
        let mut q = offer(mem, descs);
        pop(&mut q, mem).unwrap().unwrap().chain
    }

    #[test]
    fn well_formed_chain_is_split_into_readable_then_writable() {
        let mem = memory();
        let c = pop_one(
            &mem,
            &[
                desc(0x1_0000, 16, F_NEXT, 1),
                desc(0x2_0000, 512, F_NEXT | F_WRITE, 2),
                desc(0x3_0000, 1, F_WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(c.readable_len(), 16);
        assert_eq!(c.writable_len(), 513);
        c.write_at(&mem, 512, &[7]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3_0000)).unwrap(), 7);
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x1_000C))
            .unwrap();
        let mut b = [0u8; 4];
        c.read_at(&mem, 12, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        let io = c.writable_iovecs(&mem, 510, 3).unwrap();
        assert_eq!(io.iter().map(|v| v.iov_len).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn loops_are_unterminated() {
        let mem = memory();
        let r = pop_one(
            &mem,
            &[desc(0x1_0000, 16, F_NEXT, 1), desc(0x2_0000, 16, F_NEXT, 0)],
        );
        assert_eq!(r, Err(ChainError::Unterminated));
        let r = pop_one(&mem, &[desc(0x1_0000, 16, F_NEXT, 0)]);
        assert_eq!(r, Err(ChainError::Unterminated), "self loop");
    }

    #[test]
    fn next_index_outside_the_table_is_unterminated() {
        let mem = memory();
        let r = pop_one(&mem, &[desc(0x1_0000, 16, F_NEXT, 200)]);
        assert_eq!(r, Err(ChainError::Unterminated));
    }

    #[test]
    fn buffers_outside_ram_are_refused() {
        let mem = memory();
        let r = pop_one(&mem, &[desc(0xC000_0000, 16, 0, 0)]);
        assert_eq!(
            r,
            Err(ChainError::OutsideRam {
                addr: 0xC000_0000,
                len: 16
            })
        );
        // Starts inside RAM, ends outside.
        let r = pop_one(&mem, &[desc(0xF_FFF0, 32, 0, 0)]);
        assert!(matches!(r, Err(ChainError::OutsideRam { .. })));
        let r = pop_one(&mem, &[desc(u64::MAX - 4, 16, 0, 0)]);
        assert!(matches!(r, Err(ChainError::OutsideRam { .. })));
        let r = pop_one(&mem, &[desc(0x1000, u32::MAX, F_WRITE, 0)]);
        assert!(matches!(r, Err(ChainError::OutsideRam { .. })));
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let mem = memory();
        let r = pop_one(
            &mem,
            &[
                desc(0x1_0000, 16, F_NEXT | F_WRITE, 1),
                desc(0x2_0000, 16, 0, 0),
            ],
        );
        assert_eq!(r, Err(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn zero_length_buffers_are_skipped_and_ranges_checked() {
        let mem = memory();
        let c = pop_one(
            &mem,
            &[desc(0x1_0000, 0, F_NEXT, 1), desc(0x2_0000, 4, 0, 0)],
        )
        .unwrap();
        assert_eq!(c.readable_len(), 4);
        let mut b = [0u8; 8];
        assert_eq!(
            c.read_at(&mem, 0, &mut b),
            Err(ChainError::TooShort { need: 8, have: 4 })
        );
        assert!(c.write_at(&mem, 0, &[1]).is_err());
        assert!(c.readable_iovecs(&mem, u64::MAX, 2).is_err());
    }

    #[test]
    fn indirect_tables_are_followed_and_checked() {
        let mem = memory();
        let table = 0x5_0000;
        mem.write_obj(desc(0x1_0000, 8, F_NEXT, 1), GuestAddress(table))
            .unwrap();
        mem.write_obj(desc(0x2_0000, 8, F_WRITE, 0), GuestAddress(table + 16))
            .unwrap();
        let c = pop_one(&mem, &[desc(table, 32, F_INDIRECT, 0)]).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (8, 8));
        // An indirect table whose entries loop.
        mem.write_obj(desc(0x2_0000, 8, F_NEXT, 0), GuestAddress(table + 16))
            .unwrap();
        mem.write_obj(desc(0x1_0000, 8, F_NEXT, 1), GuestAddress(table))
            .unwrap();
        assert_eq!(
            pop_one(&mem, &[desc(table, 32, F_INDIRECT, 0)]),
            Err(ChainError::Unterminated)
        );
        // An indirect table outside RAM.
        assert!(pop_one(&mem, &[desc(0xC000_0000, 32, F_INDIRECT, 0)]).is_err());
    }

    #[test]
    fn indirect_chains_longer_than_the_queue_are_unterminated() {
        let mem = memory();
        let table = 0x5_0000;
        // The mock queue's maximum (and size) is 16: a chained table of 32 is too long.
        let write_table = |n: u16| {
            for i in 0..n {
                let (flags, next) = if i + 1 == n {
                    (F_WRITE, 0)
                } else {
                    (F_WRITE | F_NEXT, i + 1)
                };
                mem.write_obj(
                    desc(0x1_0000, 8, flags, next),
                    GuestAddress(table + 16 * u64::from(i)),
                )
                .unwrap();
            }
        };
        write_table(32);
        assert_eq!(
            pop_one(&mem, &[desc(table, 32 * 16, F_INDIRECT, 0)]),
            Err(ChainError::Unterminated)
        );
        write_table(17);
        assert_eq!(
            pop_one(&mem, &[desc(table, 17 * 16, F_INDIRECT, 0)]),
            Err(ChainError::Unterminated)
        );
        // Exactly 16 is fine...
        write_table(16);
        let c = pop_one(&mem, &[desc(table, 16 * 16, F_INDIRECT, 0)]).unwrap();
        assert_eq!(c.writable_len(), 16 * 8);
        // ...but not behind a direct descriptor: the chain counts both.
        assert_eq!(
            pop_one(
                &mem,
                &[
                    desc(0x2_0000, 8, F_NEXT, 1),
                    desc(table, 16 * 16, F_INDIRECT, 0)
                ]
            ),
            Err(ChainError::Unterminated)
        );
    }

    #[test]
    fn avail_index_jumping_past_the_queue_breaks_it() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.avail().idx().store(17u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(pop(&mut q, &mem).err(), Some(QueueBroken::AvailRing));
    }

    #[test]
    fn head_index_outside_the_queue_breaks_it() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.avail().ring().ref_at(0).unwrap().store(16u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(
            pop(&mut q, &mem).err(),
            Some(QueueBroken::HeadIndex { head: 16, size: 16 })
        );
    }

    #[test]
    fn unpop_offers_the_same_chain_again() {
        let mem = memory();
        let mut q = offer(&mem, &[desc(0x1_0000, 8, 0, 0)]);
        let a = pop(&mut q, &mem).unwrap().unwrap();
        unpop(&mut q);
        let b = pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(a.head, b.head);
        assert!(pop(&mut q, &mem).unwrap().is_none());
        complete(&mut q, &mem, b.head, 0).unwrap();
    }

    /// `n` one-descriptor chains (heads 0..n) offered on a 64-entry queue.
    fn offer_many(mem: &GuestMemory, n: u16, event_idx: bool) -> (Queue, GuestAddress) {
        let vq = MockSplitQueue::new(mem, 64);
        for i in 0..n {
            let d = desc(0x1_0000 + 0x100 * u64::from(i), 16, F_WRITE, 0);
            mem.write_obj(d, vq.desc_table_addr().unchecked_add(16 * u64::from(i)))
                .unwrap();
            vq.avail()
                .ring()
                .ref_at(usize::from(i))
                .unwrap()
                .store(i.to_le());
        }
        vq.avail().idx().store(n.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        // The mock puts its used ring over the end of its avail ring (it sizes the avail
        // ring in entries, not bytes), harmless for one chain but not for 64.
        let used = GuestAddress(0x8000);
        q.set_ready(false);
        q.try_set_used_ring_address(used).unwrap();
        q.set_ready(true);
        q.set_event_idx(event_idx);
        (q, used)
    }

    #[test]
    fn served_chains_reach_the_used_ring_in_order_whatever_the_batching() {
        let mem = memory();
        // More chains than one batch of used entries, and not a multiple of it.
        let n = 2 * USED_BATCH as u16 + 5;
        let (mut q, used) = offer_many(&mem, n, false);
        let served = serve_some(&mut q, &mem, |p| Taken::Used(u32::from(p.head) + 100)).unwrap();
        assert_eq!(
            served,
            Served {
                notify: true,
                stalled: false
            }
        );
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        assert_eq!(idx, n);
        for i in 0..u64::from(n) {
            let id: u32 = mem.read_obj(used.unchecked_add(4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(used.unchecked_add(8 + 8 * i)).unwrap();
            assert_eq!((id, len), (i as u32, i as u32 + 100));
        }
    }

    #[test]
    fn chains_served_before_the_ring_breaks_are_still_used() {
        let mem = memory();
        let (mut q, used) = offer_many(&mem, 3, false);
        // The third head is outside the queue.
        let ring = q.avail_ring() + 4;
        mem.write_obj(64u16.to_le(), GuestAddress(ring + 4))
            .unwrap();
        let broken = serve_some(&mut q, &mem, |_| Taken::Used(1));
        assert_eq!(broken, Err(QueueBroken::HeadIndex { head: 64, size: 64 }));
        assert_eq!(mem.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 2);
    }

    #[test]
    fn a_declined_chain_stays_offered_and_those_before_it_are_used() {
        let mem = memory();
        let (mut q, used) = offer_many(&mem, 30, false);
        let served = serve_some(&mut q, &mem, |p| {
            if p.head < 20 {
                Taken::Used(1)
            } else {
                Taken::Declined
            }
        })
        .unwrap();
        assert_eq!(
            served,
            Served {
                notify: true,
                stalled: true
            }
        );
        assert_eq!(mem.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 20);
        assert_eq!(pop(&mut q, &mem).unwrap().unwrap().head, 20);
        // Declining the very first chain uses nothing and asks for no interrupt.
        let mem = memory();
        let (mut q, used) = offer_many(&mem, 3, false);
        let served = serve_some(&mut q, &mem, |_| Taken::Declined).unwrap();
        assert_eq!(
            served,
            Served {
                notify: false,
                stalled: true
            }
        );
        assert_eq!(mem.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 0);
    }

    #[test]
    fn interrupts_follow_the_drivers_used_event() {
        let mem = memory();
        // used_event sits after the avail ring's 64 entries.
        let used_event_at = |q: &Queue| GuestAddress(q.avail_ring() + 4 + 2 * 64);
        let (mut q, _) = offer_many(&mem, 10, true);
        mem.write_obj(4u16.to_le(), used_event_at(&q)).unwrap();
        let served = serve_some(&mut q, &mem, |_| Taken::Used(0)).unwrap();
        assert!(served.notify, "used_event 4 lies in 0..10");
        let (mut q, _) = offer_many(&mem, 10, true);
        mem.write_obj(10u16.to_le(), used_event_at(&q)).unwrap();
        let served = serve_some(&mut q, &mem, |_| Taken::Used(0)).unwrap();
        assert!(!served.notify, "used_event 10 is not reached by 0..10");
    }

    #[test]
    fn spinning_for_more_suppresses_notifications_and_restores_them() {
        for event_idx in [false, true] {
            let mem = memory();
            let (mut q, used) = offer_many(&mem, 2, event_idx);
            serve_some(&mut q, &mem, |_| Taken::Used(0)).unwrap();
            let flags = |mem: &GuestMemory| mem.read_obj::<u16>(used).unwrap();
            let avail_event = used.unchecked_add(4 + 8 * 64);
            let event = |mem: &GuestMemory| mem.read_obj::<u16>(avail_event).unwrap();
            let mut seen = None;
            let found = spin_for_more(&mut q, &mem, |ready| {
                seen = Some((flags(&mem), event(&mem)));
                ready()
            });
            assert!(!found);
            if event_idx {
                // Behind the driver's index (2): no notify until it wraps.
                assert_eq!(seen, Some((0, 1)));
                assert_eq!(event(&mem), 2, "notify again from the next chain");
            } else {
                assert_eq!(seen, Some((1, 0)), "NO_NOTIFY while spinning");
                assert_eq!(flags(&mem), 0);
            }
        }
    }

    #[test]
    fn a_chain_offered_while_spinning_is_found() {
        let mem = memory();
        let (mut q, _) = offer_many(&mem, 2, true);
        serve_some(&mut q, &mem, |_| Taken::Used(0)).unwrap();
        let avail_idx = GuestAddress(q.avail_ring() + 2);
        // Offered during the spin and seen by it.
        let found = spin_for_more(&mut q, &mem, |ready| {
            mem.write_obj(3u16.to_le(), avail_idx).unwrap();
            ready()
        });
        assert!(found);
        // Offered as the spin gave up: re-enabling notifications still sees it.
        serve_some(&mut q, &mem, |_| Taken::Used(0)).unwrap();
        let found = spin_for_more(&mut q, &mem, |_| {
            mem.write_obj(4u16.to_le(), avail_idx).unwrap();
            false
        });
        assert!(found);
    }
}
