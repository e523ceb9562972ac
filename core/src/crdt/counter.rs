//! Grow-only and positive-negative counters.

use super::Crdt;
use crate::clock::ReplicaId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A grow-only counter: one monotonic entry per replica.
///
/// Merge semantics: pointwise maximum of the entries. Concurrent increments
/// at different replicas all count; the value is the sum of all increments.
/// A replica only ever raises its own entry, so the delta of an increment is
/// the single new entry.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Crdt, GCounter}};
/// let mut a = GCounter::default();
/// let mut b = GCounter::default();
/// let da = a.inc(ReplicaId(1), 2);
/// a.join(&da);
/// let db = b.inc(ReplicaId(2), 3);
/// b.join(&db);
/// a.join(&db);
/// b.join(&da);
/// assert_eq!((a.value(), b.value()), (5, 5));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GCounter(BTreeMap<ReplicaId, u64>);

impl GCounter {
    /// The delta of adding `n` at `replica`. Saturates at `u64::MAX`.
    pub fn inc(&self, replica: ReplicaId, n: u64) -> GCounter {
        let mut d = GCounter::default();
        if n > 0 {
            d.0.insert(replica, self.get(replica).saturating_add(n));
        }
        d
    }

    /// Every replica's total.
    pub fn entries(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.0.iter().map(|(r, n)| (*r, *n))
    }

    /// The entry of one replica.
    pub fn get(&self, replica: ReplicaId) -> u64 {
        self.0.get(&replica).copied().unwrap_or(0)
    }

    /// The sum of all entries.
    pub fn value(&self) -> u128 {
        self.0.values().map(|&v| u128::from(v)).sum()
    }
}

impl Crdt for GCounter {
    fn join(&mut self, other: &Self) {
        for (r, v) in &other.0 {
            let e = self.0.entry(*r).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    fn novel(&self, other: &Self) -> Option<Self> {
        let d: BTreeMap<_, _> = other
            .0
            .iter()
            .filter(|(r, v)| **v > self.get(**r))
            .map(|(r, v)| (*r, *v))
            .collect();
        (!d.is_empty()).then_some(GCounter(d))
    }
}

/// A counter that goes up and down: a pair of [`GCounter`]s.
///
/// Merge semantics: each half merges by pointwise maximum; the value is
/// increments minus decrements, so every concurrent update counts.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Crdt, PNCounter}};
/// let mut c = PNCounter::default();
/// let d = c.add(ReplicaId(1), -4);
/// c.join(&d);
/// let d = c.add(ReplicaId(1), 10);
/// c.join(&d);
/// assert_eq!(c.value(), 6);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PNCounter {
    p: GCounter,
    n: GCounter,
}

impl PNCounter {
    /// The delta of adding `delta` (negative to decrement) at `replica`.
    /// Each half saturates at `u64::MAX` (`Value::apply` refuses an
    /// overflowing add with `CounterOverflow` instead).
    pub fn add(&self, replica: ReplicaId, delta: i64) -> PNCounter {
        if delta >= 0 {
            PNCounter {
                p: self.p.inc(replica, delta.unsigned_abs()),
                n: GCounter::default(),
            }
        } else {
            PNCounter {
                p: GCounter::default(),
                n: self.n.inc(replica, delta.unsigned_abs()),
            }
        }
    }

    /// Every replica's running totals (added, subtracted).
    pub fn entries(&self) -> std::collections::BTreeMap<ReplicaId, (u64, u64)> {
        let mut out = std::collections::BTreeMap::new();
        for (r, n) in self.p.entries() {
            out.entry(r).or_insert((0, 0)).0 = n;
        }
        for (r, n) in self.n.entries() {
            out.entry(r).or_insert((0, 0)).1 = n;
        }
        out
    }

    /// The running totals (added, subtracted) of one replica.
    pub fn entry(&self, replica: ReplicaId) -> (u64, u64) {
        (self.p.get(replica), self.n.get(replica))
    }

    /// Increments minus decrements.
    pub fn value(&self) -> i128 {
        self.p.value() as i128 - self.n.value() as i128
    }
}

impl Crdt for PNCounter {
    fn join(&mut self, other: &Self) {
        self.p.join(&other.p);
        self.n.join(&other.n);
    }

    fn novel(&self, other: &Self) -> Option<Self> {
        let p = self.p.novel(&other.p);
        let n = self.n.novel(&other.n);
        (p.is_some() || n.is_some()).then(|| PNCounter {
            p: p.unwrap_or_default(),
            n: n.unwrap_or_default(),
        })
    }
}
