//! Every `schedules` row the engine knows, in 40 bytes each, and the heap of
//! their next fires.
//!
//! The rows sit in one vector sorted by id: a lookup is a binary search, the
//! load appends (rows come in id order, as new ids do later), and the
//! reconcile walks it beside the table's ids. A heap key is the fire instant
//! and the id, 16 bytes; a key whose instant is no longer its row's `next`
//! is stale and skipped, so an edit never searches the heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::exprs::ExprId;

/// `next` of a row that does not fire.
pub const NEVER: i64 = i64::MAX;

/// `expr` of a row without a valid expression (disabled or invalid).
pub const NO_EXPR: ExprId = ExprId::MAX;

/// One `schedules` row as the engine keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    pub id: i64,
    /// The next fire, in Unix seconds (fires are whole seconds), or
    /// [`NEVER`].
    pub next: i64,
    /// The row's `updated_at` in Unix microseconds, PostgreSQL's own
    /// resolution, for the reconcile: any edit changes it, so an edit whose
    /// notification was lost is always seen.
    pub stamp: i64,
    pub expr: ExprId,
    /// The connection's jitter offset, in seconds.
    pub jitter: u32,
    pub tz: Tz,
    /// `next` differs from the row's `next_fire_at`, or may.
    pub unwritten: bool,
}

impl Slot {
    /// A row that does not fire: disabled, or its expression or zone is bad.
    pub fn idle(id: i64, stamp: i64) -> Slot {
        Slot {
            id,
            next: NEVER,
            stamp,
            expr: NO_EXPR,
            jitter: 0,
            tz: Tz::UTC,
            unwritten: false,
        }
    }
}

/// `stamp` of a row the reconcile must re-read whatever its `updated_at`:
/// no timestamp PostgreSQL can hold is this many microseconds from 1970.
pub const STALE: i64 = i64::MIN;

/// An `updated_at` as a slot holds it, whole.
pub fn stamp(updated_at: DateTime<Utc>) -> i64 {
    updated_at.timestamp_micros()
}

/// An instant as a slot holds it.
pub fn to_secs(at: DateTime<Utc>) -> i64 {
    debug_assert_eq!(at.timestamp_subsec_nanos(), 0, "fires are whole seconds");
    at.timestamp()
}

/// A slot's instant back as a time.
pub fn from_secs(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

type HeapKey = Reverse<(i64, i64)>;

#[derive(Default)]
pub struct Slots {
    rows: Vec<Slot>,
    heap: BinaryHeap<HeapKey>,
    /// Rows added below the largest id, until [`Slots::settle`] merges
    /// them in: inserting each in place would move the rows above it.
    staged: Vec<Slot>,
}

impl Slots {
    pub fn rows(&self) -> &[Slot] {
        &self.rows
    }

    pub fn get(&self, id: i64) -> Option<Slot> {
        let at = self.rows.binary_search_by_key(&id, |s| s.id).ok()?;
        Some(self.rows[at])
    }

    /// How many rows fire.
    pub fn firing(&self) -> usize {
        self.rows.iter().filter(|s| s.next != NEVER).count()
    }

    /// The rows whose `next` is not written yet, from position `from` on,
    /// with their positions.
    pub fn unwritten(&self, from: usize) -> impl Iterator<Item = (usize, &Slot)> {
        self.rows
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, slot)| slot.unwritten)
    }

    /// Marks the rows at `positions` (from [`Slots::unwritten`], with no
    /// change in between) written.
    pub fn mark_written(&mut self, positions: &[usize]) {
        for &at in positions {
            if let Some(slot) = self.rows.get_mut(at) {
                slot.unwritten = false;
            }
        }
    }

    /// Puts `slot` in place of the row with its id, returning the old one.
    /// A new row below the largest id is staged: call [`Slots::settle`]
    /// after a batch.
    pub fn upsert(&mut self, slot: Slot) -> Option<Slot> {
        // The load reads rows in id order, and new ids are the largest:
        // nearly always a push, seen without a search.
        let old = if self.rows.last().is_none_or(|last| last.id < slot.id) {
            self.rows.push(slot);
            None
        } else {
            match self.rows.binary_search_by_key(&slot.id, |s| s.id) {
                Ok(at) => Some(std::mem::replace(&mut self.rows[at], slot)),
                Err(_) => {
                    self.staged.push(slot);
                    None
                }
            }
        };
        if slot.next != NEVER && old.is_none_or(|old| old.next != slot.next) {
            self.push_key(slot.next, slot.id);
        }
        old
    }

    /// Merges the rows [`Slots::upsert`] staged; until then they cannot be
    /// looked up. Callers stage rows in id order, so the sort merges two
    /// sorted runs, in linear time.
    pub fn settle(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        self.rows.append(&mut self.staged);
        self.rows.sort_by_key(|slot| slot.id);
        self.staged = Vec::new();
    }

    /// Makes the reconcile re-read the rows `ids` (sorted): their stamps no
    /// longer match any `updated_at`.
    pub fn mark_stale(&mut self, ids: &[i64]) {
        for slot in &mut self.rows {
            if ids.binary_search(&slot.id).is_ok() {
                slot.stamp = STALE;
            }
        }
    }

    /// Sets the next fire of row `id`.
    pub fn reschedule(&mut self, id: i64, next: i64) {
        let Ok(at) = self.rows.binary_search_by_key(&id, |s| s.id) else {
            return;
        };
        let slot = &mut self.rows[at];
        if slot.next == next {
            return;
        }
        slot.next = next;
        if next != NEVER {
            self.push_key(next, id);
        }
    }

    /// Removes the rows whose ids are in `ids` (sorted), returning them.
    pub fn remove_sorted(&mut self, ids: &[i64]) -> Vec<Slot> {
        let mut removed = Vec::new();
        if ids.is_empty() {
            return removed;
        }
        self.rows.retain(|slot| {
            let gone = ids.binary_search(&slot.id).is_ok();
            if gone {
                removed.push(*slot);
            }
            !gone
        });
        // Their heap keys are stale now, and dropped as they surface.
        removed
    }

    /// Pops the earliest key due at `now` (Unix seconds) whose row still
    /// fires then: the row's id and the instant.
    pub fn pop_due(&mut self, now: i64) -> Option<(i64, i64)> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if self.get(id).is_some_and(|slot| slot.next == at) {
                return Some((id, at));
            }
        }
        None
    }

    /// The earliest instant a row fires, dropping stale keys on the way.
    pub fn next_due(&mut self) -> Option<i64> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if self.get(id).is_some_and(|slot| slot.next == at) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    fn push_key(&mut self, at: i64, id: i64) {
        self.heap.push(Reverse((at, id)));
        // Edits leave stale keys behind; rebuild before they outnumber the rows.
        if self.heap.len() > 2 * self.rows.len() + 1024 {
            self.compact();
        }
    }

    /// Drops spare capacity and stale heap keys: after the load, a large
    /// table must not leave the growth of its vectors in memory.
    pub fn compact(&mut self) {
        self.settle();
        self.rows.shrink_to_fit();
        let keys: Vec<HeapKey> = self
            .rows
            .iter()
            .filter(|s| s.next != NEVER)
            .map(|s| Reverse((s.next, s.id)))
            .collect();
        self.heap = BinaryHeap::from(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: i64, next: i64) -> Slot {
        Slot {
            next,
            expr: 0,
            ..Slot::idle(id, 0)
        }
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn per_schedule_footprint() {
        // The figures the comments and ARCHITECTURE.md quote.
        assert_eq!(std::mem::size_of::<Slot>(), 40);
        assert_eq!(std::mem::size_of::<HeapKey>(), 16);
    }

    #[test]
    fn due_rows_pop_in_order_and_edits_make_old_keys_stale() {
        let mut slots = Slots::default();
        for (id, next) in [(3, 30), (1, 10), (2, 20), (4, NEVER)] {
            slots.upsert(slot(id, next));
        }
        slots.settle();
        assert_eq!(
            slots.rows().iter().map(|s| s.id).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "kept sorted by id"
        );
        assert_eq!(slots.next_due(), Some(10));
        // Row 1 is edited to fire later, row 3 to fire never.
        slots.upsert(slot(1, 25));
        slots.upsert(slot(3, NEVER));
        assert_eq!(slots.pop_due(100), Some((2, 20)));
        assert_eq!(slots.pop_due(100), Some((1, 25)));
        assert_eq!(slots.pop_due(100), None, "row 3's key is stale");
        slots.reschedule(2, 40);
        assert_eq!(slots.pop_due(39), None);
        assert_eq!(slots.next_due(), Some(40));
        let removed = slots.remove_sorted(&[2, 4]);
        assert_eq!(removed.len(), 2);
        assert_eq!(slots.next_due(), None, "a removed row's key is stale");
        assert_eq!(slots.get(3).map(|s| s.next), Some(NEVER));
    }

    #[test]
    fn rows_added_below_the_largest_id_are_merged_in_order() {
        let mut slots = Slots::default();
        for id in [10, 20, 30] {
            slots.upsert(slot(id, id));
        }
        for id in [5, 15, 25] {
            assert_eq!(slots.upsert(slot(id, id)), None);
        }
        assert_eq!(slots.upsert(slot(20, 21)).map(|old| old.next), Some(20));
        slots.settle();
        assert_eq!(
            slots.rows().iter().map(|s| s.id).collect::<Vec<_>>(),
            [5, 10, 15, 20, 25, 30]
        );
        let due: Vec<(i64, i64)> = std::iter::from_fn(|| slots.pop_due(100)).collect();
        assert_eq!(
            due,
            [(5, 5), (10, 10), (15, 15), (20, 21), (25, 25), (30, 30)]
        );
    }

    #[test]
    fn stale_keys_are_bounded() {
        let mut slots = Slots::default();
        slots.upsert(slot(1, 0));
        for next in 1..10_000 {
            slots.reschedule(1, next);
        }
        assert!(slots.heap.len() <= 2 * slots.rows.len() + 1024);
        assert_eq!(slots.pop_due(i64::MAX - 1), Some((1, 9_999)));
    }

    #[test]
    fn instants_round_trip_and_stamps_see_a_microsecond() {
        let at = DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        assert_eq!(from_secs(to_secs(at)), at);
        let later = at + chrono::TimeDelta::microseconds(1);
        assert_ne!(stamp(at), stamp(later));
        // These two differ in bit 0 and bit 32, which a fold of the high
        // half into the low half would cancel out.
        let far = later + chrono::TimeDelta::microseconds(1 << 32);
        assert_ne!(stamp(at), stamp(far));
        let marked = {
            let mut slots = Slots::default();
            slots.upsert(Slot::idle(1, stamp(at)));
            slots.mark_stale(&[1]);
            slots.get(1).map(|slot| slot.stamp)
        };
        assert_eq!(marked, Some(STALE));
        assert_ne!(stamp(DateTime::<Utc>::MIN_UTC), STALE);
    }
}
