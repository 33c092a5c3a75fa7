//! The entries a slot keeps in memory to resend to a receiver that falls a little behind (its
//! ring), and the node-wide budget all rings share.
//!
//! Each ring holds at most [`RING_ENTRIES`] entries and [`RING_BYTES`]. A colo has 1,024 slots
//! by default, and a node may follow or own every one of them (of several colos), so those limits
//! alone would let its rings grow to 4 GiB and more. So the node's rings share
//! [`NODE_RING_BYTES`]:
//! - a ring that gains an entry while the rings together are over the budget drops its oldest
//!   entries until they are not, but never below an equal share of the budget;
//! - the periodic sweep of every slot trims each ring to that share while the rings together
//!   hold more than three quarters of the budget, so rings of slots gone quiet give their bytes
//!   to busy ones;
//! - a ring always keeps its newest entry, so an owner can resend the entry in flight to a
//!   follower that reconnects, even when one entry is larger than a share.
//!
//! A receiver further behind than its slot's ring reaches is sent a snapshot instead.

use super::wire::Frame;
use crate::storage::record::SlotPos;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most entries a slot keeps to resend.
pub const RING_ENTRIES: usize = crate::storage::recovery::RECENT_ENTRIES;
/// Most bytes of entries a slot keeps to resend.
pub const RING_BYTES: usize = crate::storage::recovery::RECENT_BYTES;
/// Most bytes of entries all rings of a node keep together (a share each once over it).
pub const NODE_RING_BYTES: usize = 128 << 20;

/// What the rings of a node hold together.
#[derive(Debug)]
pub struct RingBudget {
    limit: usize,
    bytes: AtomicUsize,
    /// Rings holding at least one entry.
    holders: AtomicUsize,
}

impl RingBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(RingBudget {
            limit,
            bytes: AtomicUsize::new(0),
            holders: AtomicUsize::new(0),
        })
    }

    /// Bytes all rings hold.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// An equal share of the budget among the rings holding entries.
    fn share(&self) -> usize {
        self.limit / self.holders.load(Ordering::Relaxed).max(1)
    }
}

struct RingEntry {
    frame: Frame,
    pos: SlotPos,
    bytes: usize,
}

/// One slot's entries to resend, oldest first, after `base`.
pub struct Ring {
    entries: VecDeque<RingEntry>,
    bytes: usize,
    /// Position just before the oldest entry.
    base: SlotPos,
    budget: Arc<RingBudget>,
}

impl Ring {
    pub fn new(base: SlotPos, budget: Arc<RingBudget>) -> Self {
        Ring {
            entries: VecDeque::new(),
            bytes: 0,
            base,
            budget,
        }
    }

    /// Adds the newest entry, at `pos`, then drops the oldest beyond the ring's limits, or all of
    /// them when `keep` is false (see [`Ring::trim`]); over the node's budget, only as many as
    /// bring the node back within it, and not below the ring's share.
    pub fn push(&mut self, frame: Frame, pos: SlotPos, keep: bool) {
        if !keep {
            self.reset(pos);
            return;
        }
        let bytes = match &frame {
            Frame::Append { entry, .. } => entry.len(),
            _ => 0,
        };
        if self.entries.is_empty() {
            self.budget.holders.fetch_add(1, Ordering::Relaxed);
        }
        self.entries.push_back(RingEntry { frame, pos, bytes });
        self.bytes += bytes;
        self.budget.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.trim_over(keep, self.budget.limit);
    }

    /// The sweep: drops the oldest entries beyond the ring's share while the node's rings hold
    /// more than three quarters of the budget; all of them when `keep` is false (a standalone
    /// node, which nothing will ever receive from). The base moves to the newest entry dropped,
    /// so [`Ring::index_after`] stays true to the slot's history.
    pub fn trim(&mut self, keep: bool) {
        self.trim_over(keep, self.budget.limit / 4 * 3);
    }

    /// Drops the oldest entries beyond the ring's own limits, and those beyond its share while
    /// the node's rings hold more than `node_mark` bytes, always keeping the newest.
    fn trim_over(&mut self, keep: bool, node_mark: usize) {
        loop {
            let len = self.entries.len();
            let excess = if keep {
                len > RING_ENTRIES
                    || (len > 1
                        && (self.bytes > RING_BYTES
                            || (self.budget.bytes() > node_mark
                                && self.bytes > self.budget.share())))
            } else {
                len > 0
            };
            if !excess {
                break;
            }
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.bytes;
            self.budget.bytes.fetch_sub(old.bytes, Ordering::Relaxed);
            self.base = old.pos;
            if self.entries.is_empty() {
                self.budget.holders.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Drops every entry; the history starts again after `base`.
    pub fn reset(&mut self, base: SlotPos) {
        self.release();
        self.base = base;
    }

    /// Index of the first entry after `pos`, if `pos` is in the ring's history.
    pub fn index_after(&self, pos: SlotPos) -> Option<usize> {
        if pos == self.base {
            return Some(0);
        }
        self.entries
            .iter()
            .position(|r| r.pos == pos)
            .map(|i| i + 1)
    }

    /// Whether `pos` is in the ring's history (its base or one of its entries).
    pub fn has(&self, pos: SlotPos) -> bool {
        pos == self.base || self.entries.iter().any(|r| r.pos == pos)
    }

    /// The frames after index `from`, oldest first.
    pub fn frames_from(&self, from: usize) -> impl Iterator<Item = &Frame> {
        self.entries.iter().skip(from).map(|r| &r.frame)
    }

    pub fn base(&self) -> SlotPos {
        self.base
    }

    /// Sets the base of an empty ring (one seeded from recovered entries).
    pub fn set_base(&mut self, base: SlotPos) {
        debug_assert!(self.entries.is_empty());
        self.base = base;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Positions of the entries, oldest first.
    pub fn positions(&self) -> impl Iterator<Item = SlotPos> + '_ {
        self.entries.iter().map(|r| r.pos)
    }

    fn release(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        self.budget.holders.fetch_sub(1, Ordering::Relaxed);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.entries.clear();
        self.bytes = 0;
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::append_frame;
    use crate::id::ObjectId;
    use crate::lsn::Lsn;
    use crate::storage::record::{Entry, ObjectKey, SlotKey};

    /// `n` entries of one slot, each placed after the one before, with their frames.
    fn chain(n: u64) -> Vec<(Frame, SlotPos)> {
        let object = ObjectKey::new(Arc::from("ns"), ObjectId::from_bytes([3; 32]));
        let slot = SlotKey::new("c", 0);
        let mut prev = SlotPos::START;
        (0..n)
            .map(|i| {
                let mut e = Entry::delete(&object, &slot);
                prev = e.place_after(prev, Lsn::new(1, i + 1));
                (append_frame(&e, 1), prev)
            })
            .collect()
    }

    fn fill(ring: &mut Ring, entries: &[(Frame, SlotPos)], keep: bool) {
        for (frame, pos) in entries {
            ring.push(frame.clone(), *pos, keep);
        }
    }

    /// What one entry counts in a ring.
    fn entry_bytes(entry: &(Frame, SlotPos)) -> usize {
        let mut ring = Ring::new(SlotPos::START, RingBudget::new(NODE_RING_BYTES));
        fill(&mut ring, std::slice::from_ref(entry), true);
        ring.bytes()
    }

    #[test]
    fn a_standalone_node_keeps_nothing_and_its_base_follows_its_history() {
        let entries = chain(6);
        let budget = RingBudget::new(NODE_RING_BYTES);
        let mut ring = Ring::new(SlotPos::START, budget.clone());
        fill(&mut ring, &entries[..5], true);
        assert_eq!(ring.len(), 5);
        assert_eq!(ring.base(), SlotPos::START);
        assert_eq!(ring.index_after(entries[1].1), Some(2));
        // Standalone: the ring empties, and its base is the newest entry, so a receiver at it
        // needs nothing and one further behind gets a snapshot.
        ring.trim(false);
        assert_eq!((ring.len(), ring.bytes(), budget.bytes()), (0, 0, 0));
        assert_eq!(ring.base(), entries[4].1);
        ring.push(entries[5].0.clone(), entries[5].1, false);
        assert_eq!((ring.len(), budget.bytes()), (0, 0));
        assert_eq!(ring.index_after(entries[5].1), Some(0));
        assert_eq!(ring.index_after(entries[4].1), None);
        assert!(ring.has(entries[5].1) && !ring.has(entries[4].1));
    }

    #[test]
    fn a_ring_keeps_at_most_its_entry_limit() {
        let entries = chain(RING_ENTRIES as u64 + 3);
        let budget = RingBudget::new(NODE_RING_BYTES);
        let mut ring = Ring::new(SlotPos::START, budget.clone());
        fill(&mut ring, &entries, true);
        assert_eq!(ring.len(), RING_ENTRIES);
        assert_eq!(ring.base(), entries[2].1);
        assert_eq!(budget.bytes(), ring.bytes());
    }

    #[test]
    fn rings_over_the_node_budget_give_way_down_to_an_equal_share() {
        let entries = chain(12);
        let size = entry_bytes(&entries[0]);
        assert!(size > 0);
        let budget = RingBudget::new(10 * size);
        let mut quiet = Ring::new(SlotPos::START, budget.clone());
        let mut busy = Ring::new(SlotPos::START, budget.clone());
        // Within the budget one ring keeps everything.
        fill(&mut quiet, &entries[..8], true);
        assert_eq!(quiet.len(), 8);
        // Over it, a ring that gains entries keeps up to its share (half: two rings hold
        // entries), then drops only what it adds: the node stays over, as the quiet ring holds
        // more than its share.
        fill(&mut busy, &entries[..7], true);
        assert_eq!(busy.len(), 5);
        assert_eq!(busy.base(), entries[1].1);
        assert_eq!(budget.bytes(), 13 * size);
        // The sweep trims the quiet ring to its share; the busy one is within its own.
        quiet.trim(true);
        busy.trim(true);
        assert_eq!((quiet.len(), busy.len()), (5, 5));
        assert_eq!(quiet.base(), entries[2].1);
        assert_eq!(budget.bytes(), 10 * size);
        // Within the budget again, the busy ring grows past its share into what is free.
        quiet.reset(entries[7].1);
        fill(&mut busy, &entries[7..12], true);
        assert_eq!(busy.len(), 10);
        busy.trim(true);
        assert_eq!(
            busy.len(),
            10,
            "one ring alone: its share is the whole budget"
        );
        // A dropped ring gives its bytes back.
        drop(busy);
        assert_eq!(budget.bytes(), 0);
        assert_eq!(budget.holders.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_ring_keeps_its_newest_entry_even_beyond_its_share() {
        let entries = chain(3);
        let size = entry_bytes(&entries[0]);
        let budget = RingBudget::new(size);
        let mut a = Ring::new(SlotPos::START, budget.clone());
        let mut b = Ring::new(SlotPos::START, budget.clone());
        fill(&mut a, &entries[..2], true);
        fill(&mut b, &entries[..2], true);
        a.trim(true);
        b.trim(true);
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(a.index_after(entries[0].1), Some(0));
        assert_eq!(budget.bytes(), 2 * size);
    }
}
