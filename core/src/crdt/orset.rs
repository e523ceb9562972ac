//! Add-wins observed-remove set without tombstones (ORSWOT).

use super::{Causal, Crdt, DotMap, DotSet, DotStore};
use crate::clock::{CausalContext, Dot, ReplicaId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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

/// The delta of adding `elems`, in order, to the set store `store`: what
/// folding [`set_add`] over them gives (each add seeing the ones before it),
/// built in one pass, O(n log n) for n elements.
///
/// The i-th element gets the dot `next_dot + i`; an element repeated within
/// `elems` keeps the dot of its last occurrence, since each later add
/// observed and replaced the earlier one. The context is every new dot (one
/// range) and the dots `store` held for the elements added.
pub(crate) fn set_add_all<T: Ord + Clone + Debug>(
    store: &DotMap<T, DotSet>,
    ctx: &CausalContext,
    replica: ReplicaId,
    elems: &[T],
) -> Causal<DotMap<T, DotSet>> {
    crate::work::visit(elems.len());
    let first = ctx.next_dot(replica);
    let mut added = BTreeMap::new();
    let mut counter = first.counter;
    for e in elems {
        // A later occurrence overwrites an earlier one: last dot wins.
        added.insert(e.clone(), DotSet(BTreeSet::from([Dot::new(replica, counter)])));
        counter = counter.saturating_add(1);
    }
    let mut seen = CausalContext::from_dots(
        added
            .keys()
            .filter_map(|e| store.get(e))
            .flat_map(|s| s.0.iter().copied()),
    );
    seen.insert_run(first, elems.len() as u64);
    Causal {
        store: DotMap(added),
        ctx: seen,
    }
}

/// The delta of removing `elems` from the set store `store`: the dots it
/// holds for them, observed and dropped. O(n log n) for n elements.
pub(crate) fn set_remove_all<T: Ord + Clone + Debug>(
    store: &DotMap<T, DotSet>,
    elems: &[T],
) -> Causal<DotMap<T, DotSet>> {
    crate::work::visit(elems.len());
    Causal {
        store: DotMap::empty(),
        ctx: CausalContext::from_dots(
            elems
                .iter()
                .filter_map(|e| store.get(e))
                .flat_map(|s| s.0.iter().copied()),
        ),
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The element-by-element fold that built a set operation's delta
    /// before [`set_add_all`]: each add sees the ones before it. Kept as
    /// the reference the one-pass delta must equal.
    pub(crate) fn set_add_fold<T: Ord + Clone + Debug>(
        store: &DotMap<T, DotSet>,
        ctx: &CausalContext,
        replica: ReplicaId,
        elems: &[T],
    ) -> Causal<DotMap<T, DotSet>> {
        let mut view = Causal {
            store: store.clone(),
            ctx: ctx.clone(),
        };
        let mut acc = Causal::default();
        for e in elems {
            let d = set_add(&view.store, &view.ctx, replica, e.clone());
            view.join(&d);
            acc.join(&d);
        }
        acc
    }

    /// The fold that built a removal's delta before [`set_remove_all`].
    pub(crate) fn set_remove_fold<T: Ord + Clone + Debug>(
        store: &DotMap<T, DotSet>,
        elems: &[T],
    ) -> Causal<DotMap<T, DotSet>> {
        let mut acc = Causal::default();
        for e in elems {
            acc.join(&set_remove(store, e));
        }
        acc
    }

    /// A set built by a few replicas adding and removing small elements,
    /// so elements hold several dots and contexts have gaps.
    pub(crate) fn small_set() -> impl Strategy<Value = OrSet<u8>> {
        proptest::collection::vec((0u64..3, 0u8..12, any::<bool>()), 0..30).prop_map(|steps| {
            let mut replicas = vec![OrSet::default(); 3];
            for (i, (r, e, add)) in steps.into_iter().enumerate() {
                let at = r as usize;
                let d = if add {
                    replicas[at].add(ReplicaId(r), e)
                } else {
                    replicas[at].remove(&e)
                };
                replicas[at].join(&d);
                // Share now and then, so replicas observe each other's dots.
                if i % 4 == 3 {
                    let shared = replicas[at].clone();
                    replicas[(at + 1) % 3].join(&shared);
                }
            }
            let mut out = replicas[0].clone();
            out.join(&replicas[1]);
            out
        })
    }

    /// Elements to add or remove: small, so repeats and present elements
    /// are common.
    pub(crate) fn some_elems() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..16, 0..12)
    }

    proptest! {
        #[test]
        fn one_pass_add_equals_the_fold(s in small_set(), elems in some_elems(), r in 0u64..4) {
            let (store, ctx) = (&s.0.store, &s.0.ctx);
            let fast = set_add_all(store, ctx, ReplicaId(r), &elems);
            prop_assert_eq!(&fast, &set_add_fold(store, ctx, ReplicaId(r), &elems));
            prop_assert!(fast.is_well_formed());
        }

        #[test]
        fn one_pass_remove_equals_the_fold(s in small_set(), elems in some_elems()) {
            let store = &s.0.store;
            prop_assert_eq!(set_remove_all(store, &elems), set_remove_fold(store, &elems));
        }
    }

    #[test]
    fn a_repeated_element_keeps_its_last_dot() {
        let r = ReplicaId(1);
        let mut s = OrSet::default();
        s.join(&s.add(r, 'a'));
        let d = set_add_all(&s.0.store, &s.0.ctx, r, &['a', 'b', 'a']);
        assert_eq!(d, set_add_fold(&s.0.store, &s.0.ctx, r, &['a', 'b', 'a']));
        assert_eq!(d.store.get(&'a'), Some(&DotSet(BTreeSet::from([Dot::new(r, 4)]))));
        assert_eq!(d.ctx, CausalContext::from_dots((1..=4).map(|c| Dot::new(r, c))));
    }
}
