//! Delta-state CRDTs (Almeida, Shoker and Baquero, "Delta State Replicated
//! Data Types", 2018).
//!
//! Every mutator takes `&self` and returns a **delta**: a state of the same
//! type holding just the effect of the operation, to be joined locally and
//! shipped to other replicas. [`Crdt::join`] is the least upper bound, so
//! deltas may be delivered in any order, any number of times.
//!
//! Two families live here:
//! - plain lattices: [`GCounter`], [`PNCounter`], [`LwwRegister`];
//! - causal CRDTs built on a dot store plus a [`CausalContext`](crate::clock::CausalContext)
//!   ([`Causal`]): [`MvRegister`], [`OrSet`], [`OrMap`] and the resettable
//!   [`CCounter`]. Their removals need no tombstones: the context records
//!   what was seen, and a dot that was seen but is no longer present is gone.

mod bytes;
pub(crate) mod canon;
mod ccounter;
mod counter;
mod dotstore;
#[cfg(test)]
mod large_ops_tests;
mod lww;
mod mvreg;
mod ormap;
mod orset;
mod split;
mod value;

pub use bytes::Bytes;
pub use ccounter::{CCounter, CounterStore, PnPair};
pub use counter::{GCounter, PNCounter};
pub use dotstore::{Causal, DotFun, DotMap, DotSet, DotStore};
pub use lww::LwwRegister;
pub use mvreg::MvRegister;
pub use ormap::OrMap;
pub use orset::OrSet;
pub use value::{Field, FieldKind, Kind, Nested, NestedView, Op, Value, ValueView, WriteStamp, MAX_NESTING};

/// A join-semilattice: the state of a state-based CRDT.
pub trait Crdt: Clone + PartialEq {
    /// Replaces `self` by the least upper bound of `self` and `other`.
    /// Commutative, associative and idempotent.
    fn join(&mut self, other: &Self);

    /// The part of `other` that `self` has not seen yet, or `None` when
    /// `other` is already included in `self`.
    ///
    /// Law: `self.join(&d)` for `d = self.novel(other)` gives the same state
    /// as `self.join(other)`. The replication engine stores and forwards only
    /// this part (the "remove redundancy" optimisation of Enes et al. 2019).
    fn novel(&self, other: &Self) -> Option<Self> {
        let mut joined = self.clone();
        joined.join(other);
        (joined != *self).then(|| other.clone())
    }
}
