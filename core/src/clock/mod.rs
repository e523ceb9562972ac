//! Causal clocks: replica identities, dots, version vectors, causal contexts
//! and the hybrid logical clock.

mod context;
mod hlc;

pub use context::CausalContext;
pub use hlc::{ClockError, Hlc, HlcTimestamp};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The identity under which a replica creates dots.
///
/// A node draws a fresh `ReplicaId` from its injected random source whenever
/// it starts with an empty store, so a node that lost its disk can never
/// reuse a dot it handed out before (see `replica` for the argument).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{:x}", self.0)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One event of one replica: the `counter`-th event created by `replica`.
///
/// Counters start at 1; a dot is never reused by the same replica.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// Who created the event.
    pub replica: ReplicaId,
    /// Its position in that replica's sequence of events, from 1.
    pub counter: u64,
}

impl Dot {
    /// The dot `(replica, counter)`.
    pub fn new(replica: ReplicaId, counter: u64) -> Self {
        Dot { replica, counter }
    }
}

impl fmt::Debug for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}.{}", self.replica, self.counter)
    }
}

/// A version vector: for each replica, how many of its events are included.
///
/// ```
/// use lattice_core::clock::{ReplicaId, VersionVector};
/// let (a, b) = (ReplicaId(1), ReplicaId(2));
/// let mut x = VersionVector::default();
/// x.advance(a, 3);
/// let mut y = VersionVector::default();
/// y.advance(b, 1);
/// assert!(x.concurrent_with(&y));
/// let mut z = x.clone();
/// z.join(&y);
/// assert!(z.dominates(&x) && z.dominates(&y));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<ReplicaId, u64>);

impl VersionVector {
    /// The number of events of `replica` included (0 if none).
    pub fn get(&self, replica: ReplicaId) -> u64 {
        self.0.get(&replica).copied().unwrap_or(0)
    }

    /// Raises the entry of `replica` to at least `counter`.
    pub fn advance(&mut self, replica: ReplicaId, counter: u64) {
        if counter == 0 {
            return;
        }
        let e = self.0.entry(replica).or_insert(0);
        *e = (*e).max(counter);
    }

    /// Whether this vector includes `dot`.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.counter <= self.get(dot.replica)
    }

    /// Pointwise maximum.
    pub fn join(&mut self, other: &VersionVector) {
        for (r, c) in &other.0 {
            self.advance(*r, *c);
        }
    }

    /// True when every entry of `other` is at most the entry here.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(r, c)| self.get(*r) >= *c)
    }

    /// True when neither vector dominates the other.
    pub fn concurrent_with(&self, other: &VersionVector) -> bool {
        !self.dominates(other) && !other.dominates(self)
    }

    /// The entries, in replica order.
    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0.iter().map(|(r, c)| (*r, *c))
    }

    /// True when no event is included.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
