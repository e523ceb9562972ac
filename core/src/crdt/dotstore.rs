//! Dot stores and the causal CRDT kernel shared by the observed-remove types.
//!
//! A causal CRDT is a pair (dot store, causal context). The store holds the
//! dots that are still *live*; the context holds every dot ever *seen*. The
//! join keeps a dot when both sides have it, or when one side has it and the
//! other has never seen it; a dot that one side has seen but dropped is a
//! removal and stays removed. That is why removals need no tombstones.

use super::Crdt;
use crate::clock::{CausalContext, Dot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

/// A store of live dots whose join is driven by the causal contexts of both
/// sides. Implemented by [`DotSet`], [`DotFun`], [`DotMap`] and, for nested
/// map values, [`Nested`](super::Nested).
pub trait DotStore: Clone + PartialEq + Debug {
    /// The empty store (bottom).
    fn empty() -> Self;
    /// True when no dot is live.
    fn is_empty(&self) -> bool;
    /// Calls `f` with each live dot.
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot));
    /// Joins `other` into `self`; `ctx` is the context of `self` (before the
    /// join) and `other_ctx` that of `other`.
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext);
    /// The part of `self` whose dots are not in `ctx`.
    fn unseen_by(&self, ctx: &CausalContext) -> Self;
    /// Keeps only the dots not in `ctx`, in place: [`DotStore::unseen_by`]
    /// without building a copy when nothing or little is dropped.
    fn retain_unseen_by(&mut self, ctx: &CausalContext) {
        *self = self.unseen_by(ctx);
    }
}

/// Collects the live dots of a store.
pub(crate) fn dots_of<S: DotStore>(s: &S) -> BTreeSet<Dot> {
    let mut out = BTreeSet::new();
    s.for_each_dot(&mut |d| {
        out.insert(d);
    });
    out
}

/// A set of dots: the presence of one element (see [`OrSet`](super::OrSet)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotSet(pub(crate) BTreeSet<Dot>);

impl DotStore for DotSet {
    fn empty() -> Self {
        DotSet::default()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        self.0.iter().copied().for_each(f);
    }
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::JoinDropsDot) && !other.0.is_empty() {
            // Planted bug: forget the newest dot the other side brings.
            let mut o = other.0.clone();
            o.pop_last();
            self.0.retain(|d| o.contains(d) || !other_ctx.contains(*d));
            self.0.extend(o.iter().copied().filter(|d| !ctx.contains(*d)));
            return;
        }
        self.0.retain(|d| other.0.contains(d) || !other_ctx.contains(*d));
        self.0.extend(other.0.iter().copied().filter(|d| !ctx.contains(*d)));
    }
    fn unseen_by(&self, ctx: &CausalContext) -> Self {
        DotSet(self.0.iter().copied().filter(|d| !ctx.contains(*d)).collect())
    }
    fn retain_unseen_by(&mut self, ctx: &CausalContext) {
        self.0.retain(|d| !ctx.contains(*d));
    }
}

/// A map from dots to values: each write is a dot carrying its value (the
/// store of [`MvRegister`](super::MvRegister) and [`CCounter`](super::CCounter)).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotFun<T: Ord>(pub(crate) BTreeMap<Dot, T>);

impl<T: Ord> Default for DotFun<T> {
    fn default() -> Self {
        DotFun(BTreeMap::new())
    }
}

impl<T: Ord> DotFun<T> {
    /// The live dots and their values, in dot order.
    pub fn iter_dots(&self) -> impl Iterator<Item = (Dot, &T)> {
        self.0.iter().map(|(d, v)| (*d, v))
    }
}

impl<T: Clone + Ord + Debug> DotStore for DotFun<T> {
    fn empty() -> Self {
        DotFun(BTreeMap::new())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        self.0.keys().copied().for_each(f);
    }
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        self.0.retain(|d, _| other.0.contains_key(d) || !other_ctx.contains(*d));
        for (d, v) in &other.0 {
            match self.0.get_mut(d) {
                // A dot names one write, so both values are equal between
                // correct replicas; max keeps the join deterministic anyway.
                Some(mine) if *v > *mine => *mine = v.clone(),
                Some(_) => {}
                None if !ctx.contains(*d) => {
                    self.0.insert(*d, v.clone());
                }
                #[cfg(feature = "planted-bugs")]
                None if crate::planted::active(crate::planted::PlantedBug::DotFunNoGuard) => {
                    self.0.insert(*d, v.clone());
                }
                None => {}
            }
        }
    }
    fn unseen_by(&self, ctx: &CausalContext) -> Self {
        DotFun(
            self.0
                .iter()
                .filter(|(d, _)| !ctx.contains(**d))
                .map(|(d, v)| (*d, v.clone()))
                .collect(),
        )
    }
    fn retain_unseen_by(&mut self, ctx: &CausalContext) {
        self.0.retain(|d, _| !ctx.contains(*d));
    }
}

/// A map from keys to nested dot stores (the store of [`OrSet`](super::OrSet)
/// and [`OrMap`](super::OrMap)). Keys whose store becomes empty disappear.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DotMap<K: Ord, S>(pub(crate) BTreeMap<K, S>);

impl<K: Ord, S> Default for DotMap<K, S> {
    fn default() -> Self {
        DotMap(BTreeMap::new())
    }
}

impl<K: Ord, S> DotMap<K, S> {
    /// The store under `key`.
    pub fn get(&self, key: &K) -> Option<&S> {
        self.0.get(key)
    }
    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &S)> {
        self.0.iter()
    }
    /// Number of keys present.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no key is present.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Ord + Clone + Debug, S: DotStore> DotStore for DotMap<K, S> {
    fn empty() -> Self {
        DotMap(BTreeMap::new())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        for s in self.0.values() {
            s.for_each_dot(f);
        }
    }
    /// One ordered walk over both maps, in place: O(n + m) entries visited
    /// for n keys here and m there, plus O(m log n) to insert a few new keys
    /// (or O(n + m) to merge many in at once).
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        crate::work::visit(self.0.len() + other.0.len());
        // Keys only `other` has, with what `self` has not seen of them, in order.
        let mut fresh: Vec<(K, S)> = Vec::new();
        let mut add_fresh = |k: &K, theirs: &S| {
            let s = theirs.unseen_by(ctx);
            if !s.is_empty() {
                fresh.push((k.clone(), s));
            }
        };
        let mut emptied = false;
        let mut theirs = other.0.iter().peekable();
        for (k, mine) in self.0.iter_mut() {
            while let Some((tk, ts)) = theirs.next_if(|(tk, _)| *tk < k) {
                add_fresh(tk, ts);
            }
            match theirs.next_if(|(tk, _)| *tk == k) {
                Some((_, ts)) => mine.join(ctx, ts, other_ctx),
                None => mine.retain_unseen_by(other_ctx),
            }
            emptied |= mine.is_empty();
        }
        theirs.for_each(|(tk, ts)| add_fresh(tk, ts));
        if emptied {
            self.0.retain(|_, s| !s.is_empty());
        }
        if fresh.len() < self.0.len() / 8 {
            for (k, s) in fresh {
                self.0.insert(k, s);
            }
        } else {
            // Sorted and disjoint from `self`: a linear merge.
            self.0.append(&mut fresh.into_iter().collect());
        }
    }
    fn retain_unseen_by(&mut self, ctx: &CausalContext) {
        for s in self.0.values_mut() {
            s.retain_unseen_by(ctx);
        }
        self.0.retain(|_, s| !s.is_empty());
    }
    fn unseen_by(&self, ctx: &CausalContext) -> Self {
        DotMap(
            self.0
                .iter()
                .map(|(k, s)| (k.clone(), s.unseen_by(ctx)))
                .filter(|(_, s)| !s.is_empty())
                .collect(),
        )
    }
}

/// A causal CRDT: a dot store and the causal context of everything seen.
///
/// Invariant: every live dot of `store` is in `ctx`.
///
/// Encoding: `(store, ctx)`, where `ctx` is nil when it holds exactly the
/// store's live dots. That is every delta of additions (an add's delta is its
/// new dots, with those dots as context), so a replicated add carries each
/// dot once instead of twice. Decoding rebuilds the context from the dots;
/// an explicit context (every older encoding) still decodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Causal<S> {
    pub(crate) store: S,
    pub(crate) ctx: CausalContext,
}

impl<S: DotStore> Causal<S> {
    /// True when the context is exactly the live dots of the store.
    fn context_is_implied(&self) -> bool {
        // Cheap rejection first: a context with more dots than the store
        // has (duplicates counted) cannot be equal (removals, full states).
        let mut n = 0u64;
        self.store.for_each_dot(&mut |_| n += 1);
        if n < self.ctx.dot_count() {
            return false;
        }
        // The usual case (a delta, a set that never removed), without
        // building a context from 10^5 dots each time the state is encoded.
        if self.ctx.holds_exactly(n, |f| self.store.for_each_dot(f)) {
            return true;
        }
        CausalContext::from_dots(dots_of(&self.store)) == self.ctx
    }
}

#[derive(Serialize)]
struct CausalOut<'a, S> {
    store: &'a S,
    ctx: Option<&'a CausalContext>,
}

#[derive(Deserialize)]
struct CausalIn<S> {
    store: S,
    ctx: Option<CausalContext>,
}

impl<S: DotStore + Serialize> Serialize for Causal<S> {
    fn serialize<Se: serde::Serializer>(&self, s: Se) -> Result<Se::Ok, Se::Error> {
        let ctx = (!self.context_is_implied()).then_some(&self.ctx);
        CausalOut {
            store: &self.store,
            ctx,
        }
        .serialize(s)
    }
}

impl<'de, S: DotStore + Deserialize<'de>> Deserialize<'de> for Causal<S> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = CausalIn::<S>::deserialize(d)?;
        let ctx = w.ctx.unwrap_or_else(|| CausalContext::from_dots(dots_of(&w.store)));
        Ok(Causal { store: w.store, ctx })
    }
}

impl<S: DotStore> Default for Causal<S> {
    fn default() -> Self {
        Causal {
            store: S::empty(),
            ctx: CausalContext::default(),
        }
    }
}

impl<S: DotStore> Causal<S> {
    /// A causal state from its parts.
    pub fn from_parts(store: S, ctx: CausalContext) -> Self {
        Causal { store, ctx }
    }
    /// The live dots.
    pub fn store(&self) -> &S {
        &self.store
    }
    /// Everything seen.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }
    /// True when every live dot is covered by the context (checked on input
    /// from the network).
    pub fn is_well_formed(&self) -> bool {
        let mut ok = self.ctx.is_canonical();
        self.store.for_each_dot(&mut |d| ok &= self.ctx.contains(d));
        ok
    }
}

impl<S: DotStore> Crdt for Causal<S> {
    fn join(&mut self, other: &Self) {
        self.store.join(&self.ctx, &other.store, &other.ctx);
        self.ctx.join(&other.ctx);
    }

    fn novel(&self, other: &Self) -> Option<Self> {
        // New information is (a) dots `self` has never seen, live or not, and
        // (b) dots live here that `other` has seen and dropped: removals.
        let mut ctx = other.ctx.difference(&self.ctx);
        let other_live = dots_of(&other.store);
        // Collected, then added in one sorted batch: the store yields dots in
        // key order, not dot order, and inserting scattered dots one by one
        // shifts the context's range list each time (quadratic).
        let mut removed = Vec::new();
        self.store.for_each_dot(&mut |d| {
            if other.ctx.contains(d) && !other_live.contains(&d) {
                removed.push(d);
            }
        });
        ctx.extend(removed);
        if ctx.is_empty() {
            return None;
        }
        Some(Causal {
            store: other.store.unseen_by(&self.ctx),
            ctx,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{DotMap, DotSet, DotStore};
    use crate::clock::{CausalContext, Dot, ReplicaId};
    use crate::crdt::{Crdt, OrSet};
    use crate::proto::{from_bytes, to_bytes};
    use proptest::prelude::*;

    /// `DotMap::join` as it was before the ordered walk: the reference.
    fn dotmap_join_reference(
        this: &mut DotMap<u8, DotSet>,
        ctx: &CausalContext,
        other: &DotMap<u8, DotSet>,
        other_ctx: &CausalContext,
    ) {
        for (k, mine) in this.0.iter_mut() {
            match other.0.get(k) {
                Some(theirs) => mine.join(ctx, theirs, other_ctx),
                None => *mine = mine.unseen_by(other_ctx),
            }
        }
        for (k, theirs) in &other.0 {
            if !this.0.contains_key(k) {
                this.0.insert(*k, theirs.unseen_by(ctx));
            }
        }
        this.0.retain(|_, s| !s.is_empty());
    }

    /// A set store of up to 64 elements and a context that covers it and
    /// some more: small and large against each other take both of the
    /// join's ways of adding new keys.
    fn state() -> impl Strategy<Value = (DotMap<u8, DotSet>, CausalContext)> {
        let dot = (0u64..2, 1u64..80).prop_map(|(r, c)| Dot::new(ReplicaId(r), c));
        let elem = proptest::collection::btree_set(dot.clone(), 1..3).prop_map(DotSet);
        (
            proptest::collection::btree_map(0u8..96, elem, 0..64),
            proptest::collection::vec(dot, 0..40),
        )
            .prop_map(|(m, extra)| {
                let store = DotMap(m);
                let mut ctx = CausalContext::from_dots(super::dots_of(&store));
                ctx.extend(extra);
                (store, ctx)
            })
    }

    proptest! {
        #[test]
        fn dotmap_join_equals_the_reference((a, actx) in state(), (b, bctx) in state()) {
            let mut got = a.clone();
            got.join(&actx, &b, &bctx);
            let mut want = a;
            dotmap_join_reference(&mut want, &actx, &b, &bctx);
            prop_assert_eq!(got, want);
        }

        /// Any state, hostile ones included (a dot live under two elements,
        /// a dot with counter 0, empty elements, a context that is not
        /// canonical or misses live dots), decodes to the state encoded: the
        /// context is left out only when rebuilding it gives it back.
        #[test]
        fn any_state_round_trips(
            m in proptest::collection::btree_map(
                0u8..8,
                proptest::collection::btree_set(
                    (0u64..3, 0u64..10).prop_map(|(r, c)| Dot::new(ReplicaId(r), c)),
                    0..4,
                ).prop_map(DotSet),
                0..6,
            ),
            raw in proptest::collection::btree_map(0u64..4, proptest::collection::vec((0u64..12, 0u64..12), 0..4), 0..4),
            mode in 0u8..3,
        ) {
            let store = DotMap(m);
            let ctx = match mode {
                0 => CausalContext::from_dots(super::dots_of(&store)),
                1 => {
                    let raw: std::collections::BTreeMap<ReplicaId, Vec<(u64, u64)>> =
                        raw.into_iter().map(|(r, v)| (ReplicaId(r), v)).collect();
                    from_bytes::<CausalContext>(&to_bytes(&raw).unwrap()).unwrap()
                }
                _ => {
                    let mut c = CausalContext::from_dots(super::dots_of(&store));
                    c.extend(raw.keys().map(|&r| Dot::new(ReplicaId(r), 1)));
                    c
                }
            };
            let state = super::Causal { store, ctx };
            let back: super::Causal<DotMap<u8, DotSet>> = from_bytes(&to_bytes(&state).unwrap()).unwrap();
            prop_assert_eq!(back, state);
        }
    }

    #[test]
    fn an_implied_context_is_left_out_and_rebuilt() {
        let s = OrSet::<String>::default();
        let add = s.add(ReplicaId(7), "x".to_string());
        let bytes = to_bytes(&add).unwrap();
        // The encoding before the context could be left out: (store, ctx).
        let explicit = to_bytes(&(&add.0.store, &add.0.ctx)).unwrap();
        assert!(bytes.len() < explicit.len(), "{} vs {}", bytes.len(), explicit.len());
        assert_eq!(from_bytes::<OrSet<String>>(&bytes).unwrap(), add);
        assert_eq!(from_bytes::<OrSet<String>>(&explicit).unwrap(), add);

        // A removal's context is not its (empty) store's dots, nor is a
        // state's after a removal: both keep it.
        let mut full = s.clone();
        full.join(&add);
        full.join(&full.add(ReplicaId(8), "y".to_string()));
        let remove = full.remove(&"x".to_string());
        assert_eq!(
            from_bytes::<OrSet<String>>(&to_bytes(&remove).unwrap()).unwrap(),
            remove
        );
        full.join(&remove);
        assert!(!full.contains(&"x".to_string()));
        let back: OrSet<String> = from_bytes(&to_bytes(&full).unwrap()).unwrap();
        assert_eq!(back, full);
        assert!(!back.contains(&"x".to_string()), "a removed element came back");
    }
}
