//! Observed-remove map of nested causal CRDTs.

use super::{Causal, Crdt, DotMap, DotStore};
use crate::clock::CausalContext;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

/// An observed-remove map whose values are causal CRDTs ([`DotStore`]s)
/// sharing the map's causal context, so maps nest.
///
/// Merge semantics:
/// - updates to the same key merge with the value type's own join;
/// - removing a key removes exactly the value's dots the remover observed
///   (its whole observed content);
/// - **a concurrent update to a removed key keeps the key**, holding only the
///   effects the remover had not observed (the concurrent update's dots). So
///   remove-then-concurrent-add of a set element leaves `{element}`, not the
///   old set, and a remove never loses an update it did not see.
///
/// ```
/// use lattice_core::{clock::ReplicaId, crdt::{Causal, Crdt, DotMap, DotSet, OrMap}};
/// type Tags = DotMap<String, DotSet>; // a set as a map value
/// let r1 = ReplicaId(1);
/// let mut m: OrMap<String, Tags> = OrMap::default();
/// let d = m.update("tags".to_string(), |set, ctx| lattice_core::crdt::OrSet::<String>::add_to(set, ctx, r1, "red".into()));
/// m.join(&d);
/// let rm = m.remove(&"tags".to_string());
/// let concurrent = m.update("tags".to_string(), |set, ctx| lattice_core::crdt::OrSet::<String>::add_to(set, ctx, r1, "blue".into()));
/// m.join(&rm);
/// m.join(&concurrent);
/// let tags: Vec<_> = m.get(&"tags".to_string()).unwrap().iter().map(|(k, _)| k.clone()).collect();
/// assert_eq!(tags, vec!["blue".to_string()]); // the key survives with the unseen add only
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "K: Serialize + Clone + Ord + std::fmt::Debug, V: Serialize + DotStore",
    deserialize = "K: Deserialize<'de> + Clone + Ord + std::fmt::Debug, V: Deserialize<'de> + DotStore"
))]
pub struct OrMap<K: Ord, V>(pub(crate) Causal<DotMap<K, V>>);

impl<K: Ord + Clone + Debug, V: DotStore> Default for OrMap<K, V> {
    fn default() -> Self {
        OrMap(Causal::default())
    }
}

/// The delta of updating `key` of the map store `store` with `f`, which gets
/// the key's current value (or the empty store) and the map's context and
/// returns the value's delta.
pub(crate) fn map_update<K, V, E>(
    store: &DotMap<K, V>,
    ctx: &CausalContext,
    key: K,
    f: impl FnOnce(&V, &CausalContext) -> Result<Causal<V>, E>,
) -> Result<Causal<DotMap<K, V>>, E>
where
    K: Ord + Clone + Debug,
    V: DotStore,
{
    let empty = V::empty();
    let current = store.get(&key).unwrap_or(&empty);
    let d = f(current, ctx)?;
    let mut m = DotMap::empty();
    if !d.store.is_empty() {
        m.0.insert(key, d.store);
    }
    Ok(Causal { store: m, ctx: d.ctx })
}

/// The delta of removing `key` from the map store `store`.
pub(crate) fn map_remove<K: Ord + Clone + Debug, V: DotStore>(store: &DotMap<K, V>, key: &K) -> Causal<DotMap<K, V>> {
    match store.get(key) {
        Some(v) => Causal {
            store: DotMap::empty(),
            ctx: CausalContext::from_dots(super::dotstore::dots_of(v)),
        },
        None => Causal::default(),
    }
}

impl<K: Ord + Clone + Debug, V: DotStore> OrMap<K, V> {
    /// The delta of updating `key` with `f`: `f` gets the
    /// current value and the map's context and returns the value's delta.
    pub fn update(&self, key: K, f: impl FnOnce(&V, &CausalContext) -> Causal<V>) -> OrMap<K, V> {
        let r: Result<_, std::convert::Infallible> = map_update(&self.0.store, &self.0.ctx, key, |v, c| Ok(f(v, c)));
        match r {
            Ok(c) => OrMap(c),
            Err(never) => match never {},
        }
    }

    /// The delta of removing `key` (observed-remove).
    pub fn remove(&self, key: &K) -> OrMap<K, V> {
        OrMap(map_remove(&self.0.store, key))
    }

    /// The value under `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.0.store.get(key)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.store.iter()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.store.len()
    }

    /// True when the map has no key.
    pub fn is_empty(&self) -> bool {
        self.0.store.is_empty()
    }

    /// The underlying causal state.
    pub fn causal(&self) -> &Causal<DotMap<K, V>> {
        &self.0
    }
}

impl<K: Ord + Clone + Debug, V: DotStore> Crdt for OrMap<K, V> {
    fn join(&mut self, other: &Self) {
        self.0.join(&other.0);
    }
    fn novel(&self, other: &Self) -> Option<Self> {
        self.0.novel(&other.0).map(OrMap)
    }
}
