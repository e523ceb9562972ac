//! Multi-value register.

use super::{Causal, Crdt, DotFun, DotStore};
use crate::clock::{CausalContext, ReplicaId};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

/// A multi-value register: keeps every value written concurrently.
///
/// Merge semantics: a write supersedes exactly the values its writer had
/// seen (their dots go into the delta's context); values written concurrently
/// are all kept, and [`MvRegister::values`] returns them in a deterministic
/// order. The next write at any replica that has seen them replaces them all.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Crdt, MvRegister}};
/// let base = MvRegister::default();
/// let a = base.write(ReplicaId(1), "a");
/// let b = base.write(ReplicaId(2), "b");
/// let mut x = a.clone();
/// x.join(&b);
/// assert_eq!(x.values(), vec![&"a", &"b"]); // concurrent: both kept
/// let c = x.write(ReplicaId(1), "c");
/// x.join(&c);
/// assert_eq!(x.values(), vec![&"c"]); // a later write supersedes what it saw
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "T: Serialize + Clone + Ord + std::fmt::Debug",
    deserialize = "T: Deserialize<'de> + Clone + Ord + std::fmt::Debug"
))]
pub struct MvRegister<T: Ord>(pub(crate) Causal<DotFun<T>>);

impl<T: Ord + Clone + Debug> Default for MvRegister<T> {
    fn default() -> Self {
        MvRegister(Causal::default())
    }
}

/// The delta of writing `value` over the register store `store`.
pub(crate) fn mv_write<T: Ord + Clone + Debug>(
    store: &DotFun<T>,
    ctx: &CausalContext,
    replica: ReplicaId,
    value: T,
) -> Causal<DotFun<T>> {
    let dot = ctx.next_dot(replica);
    let mut seen = CausalContext::from_dots(store.0.keys().copied());
    seen.insert(dot);
    let mut d = DotFun::empty();
    d.0.insert(dot, value);
    Causal { store: d, ctx: seen }
}

/// The delta that clears a dot store: its live dots, observed and dropped.
pub(crate) fn clear<S: DotStore>(store: &S) -> Causal<S> {
    Causal {
        store: S::empty(),
        ctx: CausalContext::from_dots(super::dotstore::dots_of(store)),
    }
}

impl<T: Ord + Clone + Debug> MvRegister<T> {
    /// The delta of writing `value` at `replica`.
    pub fn write(&self, replica: ReplicaId, value: T) -> MvRegister<T> {
        MvRegister(mv_write(&self.0.store, &self.0.ctx, replica, value))
    }

    /// The delta of clearing the register (observed-remove: a concurrent
    /// write survives).
    pub fn clear(&self) -> MvRegister<T> {
        MvRegister(clear(&self.0.store))
    }

    /// The current values, in dot order (deterministic at every replica).
    pub fn values(&self) -> Vec<&T> {
        self.0.store.0.values().collect()
    }

    /// The underlying causal state.
    pub fn causal(&self) -> &Causal<DotFun<T>> {
        &self.0
    }
}

impl<T: Ord + Clone + Debug> Crdt for MvRegister<T> {
    fn join(&mut self, other: &Self) {
        self.0.join(&other.0);
    }
    fn novel(&self, other: &Self) -> Option<Self> {
        self.0.novel(&other.0).map(MvRegister)
    }
}
