//! Last-writer-wins register ordered by hybrid logical clock timestamps.

use super::Crdt;
use crate::clock::{HlcTimestamp, ReplicaId};
use serde::{Deserialize, Serialize};

/// A last-writer-wins register.
///
/// Merge semantics: the write with the greatest `(timestamp, replica)` wins;
/// the timestamp is a hybrid logical clock value, so a write that has seen
/// another (through the clock) always wins over it, and concurrent writes are
/// resolved the same way at every replica, by timestamp, then replica id, then
/// value (the last only matters for a misbehaving peer that reuses a stamp).
/// The losing concurrent write is discarded: use [`MvRegister`](super::MvRegister)
/// to keep it.
///
/// ```
/// use lattice_core::{clock::{HlcTimestamp, ReplicaId}, crdt::{Crdt, LwwRegister}};
/// let t = |ms| HlcTimestamp { wall_ms: ms, logical: 0 };
/// let mut a = LwwRegister::default();
/// let da = a.set(t(10), ReplicaId(1), "a");
/// let db = a.set(t(10), ReplicaId(2), "b"); // same time, higher replica id
/// a.join(&db);
/// a.join(&da);
/// assert_eq!(a.get(), Some(&"b"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwRegister<T> {
    entry: Option<(HlcTimestamp, ReplicaId, T)>,
}

impl<T> Default for LwwRegister<T> {
    fn default() -> Self {
        LwwRegister { entry: None }
    }
}

impl<T: Clone + Ord> LwwRegister<T> {
    /// The delta of writing `value` at `stamp` by `replica`.
    ///
    /// The caller supplies a fresh stamp from its [`Hlc`](crate::clock::Hlc);
    /// [`LwwRegister::stamp_after`] makes sure it supersedes the current value.
    pub fn set(&self, stamp: HlcTimestamp, replica: ReplicaId, value: T) -> LwwRegister<T> {
        LwwRegister {
            entry: Some((stamp, replica, value)),
        }
    }

    /// `stamp`, raised if needed so that a write with it supersedes the
    /// current value (a local write must win over what its writer has read).
    pub fn stamp_after(&self, stamp: HlcTimestamp) -> HlcTimestamp {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::StampAfterOnEqual) {
            return match &self.entry {
                Some((t, _, _)) if *t == stamp => t.successor(),
                _ => stamp,
            };
        }
        match &self.entry {
            Some((t, _, _)) if *t >= stamp => t.successor(),
            _ => stamp,
        }
    }

    /// The current value.
    pub fn get(&self) -> Option<&T> {
        self.entry.as_ref().map(|(_, _, v)| v)
    }

    /// The current write: its timestamp, writer and value.
    pub(crate) fn entry(&self) -> Option<&(HlcTimestamp, ReplicaId, T)> {
        self.entry.as_ref()
    }

    /// The timestamp and writer of the current value.
    pub fn stamp(&self) -> Option<(HlcTimestamp, ReplicaId)> {
        self.entry.as_ref().map(|(t, r, _)| (*t, *r))
    }
}

impl<T: Clone + Ord> Crdt for LwwRegister<T> {
    fn join(&mut self, other: &Self) {
        if let Some(o) = &other.entry {
            match &self.entry {
                Some(s) if s >= o => {}
                _ => self.entry = Some(o.clone()),
            }
        }
    }

    fn novel(&self, other: &Self) -> Option<Self> {
        match (&self.entry, &other.entry) {
            (_, None) => None,
            (Some(s), Some(o)) if s >= o => None,
            _ => Some(other.clone()),
        }
    }
}
