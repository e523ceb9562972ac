//! A positive-negative counter that can be reset (deleted), built on dots.

use super::{Causal, Crdt, DotFun, DotStore};
use crate::clock::{CausalContext, ReplicaId};
use serde::{Deserialize, Serialize};

/// Increments and decrements of one replica, as of one of its dots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PnPair {
    /// Total added.
    pub inc: u64,
    /// Total subtracted.
    pub dec: u64,
}

/// The dot store of a [`CCounter`]: each replica's running totals under its
/// latest dot.
pub type CounterStore = DotFun<PnPair>;

/// A causal counter (the "ccounter" of Almeida et al.): a PN-counter whose
/// per-replica totals live under dots, so that it can be reset.
///
/// Each update by a replica writes its new running totals under a fresh dot
/// and drops its previous dot. Merge semantics: concurrent updates by
/// different replicas all count, as in [`PNCounter`](super::PNCounter). A reset
/// (delete) removes the totals it has observed; an update concurrent with a
/// reset survives carrying **its replica's whole running total** (the reset
/// had not seen that dot), which is the documented behaviour of this design:
/// reset wins over what it saw, updates it did not see are kept whole.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Crdt, CCounter}};
/// let mut c = CCounter::default();
/// let d = c.add(ReplicaId(1), 5);
/// c.join(&d);
/// let d = c.add(ReplicaId(2), -2);
/// c.join(&d);
/// assert_eq!(c.value(), 3);
/// let r = c.reset();
/// c.join(&r);
/// assert_eq!(c.value(), 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CCounter(pub(crate) Causal<CounterStore>);

/// The delta of adding `delta` at `replica` to the counter store `store`.
/// `None` if the replica's running total would overflow `u64`.
pub(crate) fn counter_add(
    store: &CounterStore,
    ctx: &CausalContext,
    replica: ReplicaId,
    delta: i64,
) -> Option<Causal<CounterStore>> {
    let mut base = PnPair::default();
    let mut seen = CausalContext::default();
    for (dot, pair) in store.0.iter().filter(|(d, _)| d.replica == replica) {
        base.inc = base.inc.checked_add(pair.inc)?;
        base.dec = base.dec.checked_add(pair.dec)?;
        seen.insert(*dot);
    }
    if delta >= 0 {
        base.inc = base.inc.checked_add(delta.unsigned_abs())?;
    } else {
        base.dec = base.dec.checked_add(delta.unsigned_abs())?;
    }
    let dot = ctx.next_dot(replica);
    seen.insert(dot);
    let mut d = CounterStore::empty();
    d.0.insert(dot, base);
    Some(Causal { store: d, ctx: seen })
}

/// The value of a counter store: increments minus decrements.
pub(crate) fn counter_value(store: &CounterStore) -> i128 {
    store.0.values().map(|p| i128::from(p.inc) - i128::from(p.dec)).sum()
}

impl CCounter {
    /// The delta of adding `delta` at `replica`; `None` on overflow of the
    /// replica's running total.
    pub fn try_add(&self, replica: ReplicaId, delta: i64) -> Option<CCounter> {
        counter_add(&self.0.store, &self.0.ctx, replica, delta).map(CCounter)
    }

    /// The delta of adding `delta` at `replica`.
    ///
    /// # Panics
    /// If the replica's running total overflows `u64` (use [`CCounter::try_add`]).
    #[allow(clippy::expect_used)]
    pub fn add(&self, replica: ReplicaId, delta: i64) -> CCounter {
        self.try_add(replica, delta).expect("counter total overflows u64")
    }

    /// The delta of resetting the counter to zero (observed-remove).
    pub fn reset(&self) -> CCounter {
        CCounter(super::mvreg::clear(&self.0.store))
    }

    /// Increments minus decrements.
    pub fn value(&self) -> i128 {
        counter_value(&self.0.store)
    }

    /// The underlying causal state.
    pub fn causal(&self) -> &Causal<CounterStore> {
        &self.0
    }
}

impl Crdt for CCounter {
    fn join(&mut self, other: &Self) {
        self.0.join(&other.0);
    }
    fn novel(&self, other: &Self) -> Option<Self> {
        self.0.novel(&other.0).map(CCounter)
    }
}
