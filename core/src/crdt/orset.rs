//! Add-wins observed-remove set without tombstones (ORSWOT).

use super::{Causal, Crdt, DotMap, DotSet, DotStore};
use crate::clock::{CausalContext, ReplicaId};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

/// An add-wins observed-remove set.
///
/// Each add of an element creates a fresh dot; a remove drops the dots its
/// replica has observed for that element. Merge semantics: an add concurrent
/// with a remove of the same element wins (its dot was not observed by the
/// remove), and a re-add after a remove works. Removed elements leave no
/// tombstone: the causal context records the dots, compacted into ranges.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Crdt, OrSet}};
/// let mut a = OrSet::default();
/// let d = a.add(ReplicaId(1), "x");
/// a.join(&d);
/// let mut b = a.clone();
/// let rm = b.remove(&"x");       // b removes what it has seen...
/// b.join(&rm);
/// let add = a.add(ReplicaId(1), "x"); // ...while a adds "x" again
/// a.join(&add);
/// a.join(&rm);
/// b.join(&add);
/// assert!(a.contains(&"x") && b.contains(&"x")); // add wins
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "T: Serialize + Clone + Ord + std::fmt::Debug",
    deserialize = "T: Deserialize<'de> + Clone + Ord + std::fmt::Debug"
))]
pub struct OrSet<T: Ord>(pub(crate) Causal<DotMap<T, DotSet>>);

impl<T: Ord + Clone + Debug> Default for OrSet<T> {
    fn default() -> Self {
        OrSet(Causal::default())
    }
}

/// The delta of adding `elem` to the set store `store`.
pub(crate) fn set_add<T: Ord + Clone + Debug>(
    store: &DotMap<T, DotSet>,
    ctx: &CausalContext,
    replica: ReplicaId,
    elem: T,
) -> Causal<DotMap<T, DotSet>> {
    let dot = ctx.next_dot(replica);
    // The new dot replaces the element's observed dots, so an element costs
    // one dot per concurrent adder, however often it is re-added.
    let mut seen = store.get(&elem).map_or_else(CausalContext::default, |s| {
        CausalContext::from_dots(s.0.iter().copied())
    });
    seen.insert(dot);
    let mut m = DotMap::empty();
    m.0.insert(elem, DotSet([dot].into_iter().collect()));
    Causal { store: m, ctx: seen }
}

/// The delta of removing `elem` from the set store `store`.
pub(crate) fn set_remove<T: Ord + Clone + Debug>(store: &DotMap<T, DotSet>, elem: &T) -> Causal<DotMap<T, DotSet>> {
    let seen = store.get(elem).map_or_else(CausalContext::default, |s| {
        CausalContext::from_dots(s.0.iter().copied())
    });
    Causal {
        store: DotMap::empty(),
        ctx: seen,
    }
}

impl<T: Ord + Clone + Debug> OrSet<T> {
    /// The delta of adding `elem` at `replica`.
    pub fn add(&self, replica: ReplicaId, elem: T) -> OrSet<T> {
        OrSet(set_add(&self.0.store, &self.0.ctx, replica, elem))
    }

    /// The delta of removing `elem` (the adds observed here).
    pub fn remove(&self, elem: &T) -> OrSet<T> {
        OrSet(set_remove(&self.0.store, elem))
    }

    /// [`OrSet::add`] on a set stored inside an [`OrMap`](super::OrMap):
    /// `store` is the nested set, `ctx` the map's context.
    pub fn add_to(
        store: &DotMap<T, DotSet>,
        ctx: &CausalContext,
        replica: ReplicaId,
        elem: T,
    ) -> Causal<DotMap<T, DotSet>> {
        set_add(store, ctx, replica, elem)
    }

    /// The delta of removing every element observed here.
    pub fn clear(&self) -> OrSet<T> {
        OrSet(super::mvreg::clear(&self.0.store))
    }

    /// Whether `elem` is in the set.
    pub fn contains(&self, elem: &T) -> bool {
        self.0.store.get(elem).is_some()
    }

    /// The elements, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.store.0.keys()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.store.len()
    }

    /// True when the set has no element.
    pub fn is_empty(&self) -> bool {
        self.0.store.is_empty()
    }

    /// The underlying causal state.
    pub fn causal(&self) -> &Causal<DotMap<T, DotSet>> {
        &self.0
    }
}

impl<T: Ord + Clone + Debug> Crdt for OrSet<T> {
    fn join(&mut self, other: &Self) {
        self.0.join(&other.0);
    }
    fn novel(&self, other: &Self) -> Option<Self> {
        self.0.novel(&other.0).map(OrSet)
    }
}
