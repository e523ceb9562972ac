//! The conflicts a merge of remote state resolved: concurrent writes that
//! met at this replica, and what the join decided between them.
//!
//! Classified where remote state is merged ([`remote_next`]), as a pure
//! function of the key's local state, the received one and the merge's
//! result, so a merge prepared beside the engine counts the same. Each
//! definition is dot- or stamp-precise, and says what it over- or
//! under-counts:
//!
//! - **LWW resolved** ([`Conflicts::lww_resolved`]): a remote LWW write that
//!   arrives where a *different* write with a higher `(stamp, replica)`
//!   already holds the key lost on arrival. The HLC stamps a write made
//!   after seeing another higher than it, so the lower-stamped arrival had
//!   not seen the winner: they were concurrent. Over-count: a write
//!   overwritten in causal order that reaches a replica after its successor
//!   by another path (a relay) is counted too. A remote write that wins over
//!   the local one is never counted (sequential or concurrent cannot be
//!   told apart by stamps); so each concurrent pair is counted where the
//!   loser arrives after the winner: on the winner's writer, and on every
//!   replica that got the winner first.
//! - **LWW values lost** ([`Conflicts::lww_values_lost`]): those of the
//!   above whose value differs from the winner's (a concurrent write of the
//!   same bytes loses nothing a reader would see).
//! - **MV siblings** ([`Conflicts::mv_siblings`]): a merge of a top-level
//!   multi-value register whose result holds more values than either side
//!   held: `result - max(local, remote)` siblings created; the same for
//!   each register field at the top level of a map the remote state holds
//!   (fields of nested maps are not counted).
//! - **Kind clashes** ([`Conflicts::kind_clashes`]): a merge whose result is
//!   a [`Value::Conflict`] with more kinds than either side held: the number
//!   of kinds so added (two replicas creating a key as a set and as a
//!   counter count 1).
//! - **Remove vs update** ([`Conflicts::remove_update`]): an element of a
//!   top-level set (or a top-level field of a map) held here, absent from
//!   the remote store, whose dots the remote context covers partly but not
//!   wholly: the remote removed what it had seen of it, and an add (update)
//!   it had not seen survives (add-wins, update-wins). Under-count: an add
//!   or update by a replica that already held the element *replaces* the
//!   element's earlier dots with its own (an observed-remove set keeps one
//!   dot per concurrent adder), so when it meets a remove that saw only the
//!   earlier dots, no dot of the element is covered and the merge cannot
//!   tell it from a remove that came first; it is counted only when the
//!   surviving element also still holds a dot the remover saw (a concurrent
//!   add by another replica, a field updated by one replica and removed by
//!   another that saw only the first's dots, a counter field's other
//!   replicas). Over-count: an add made after seeing the remove that
//!   reaches a replica before the remove, by another path.
//!
//! Cost: the LWW, register and kind checks are O(1) beyond the merge. The
//! remove-versus-update check walks the local store only when the merge
//! removes something here (its novel part holds dots this replica has
//! seen); a merge that only adds, the common case on a large set, costs
//! one walk of the novel context's ranges.
//!
//! [`remote_next`]: super::prepare

use crate::clock::CausalContext;
use crate::crdt::{Causal, DotMap, DotStore, Field, Nested, Value};
use std::fmt::Debug;

/// The conflicts merges resolved, by kind (see the module documentation
/// for the exact definitions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// Remote LWW writes that arrived already superseded by a different,
    /// higher-stamped write: concurrent writes resolved by last-writer-wins.
    pub lww_resolved: u64,
    /// Of those, the ones whose value differed from the winner's.
    pub lww_values_lost: u64,
    /// Multi-value register siblings created by merges (values beyond the
    /// larger side's count).
    pub mv_siblings: u64,
    /// Kinds added to a key's [`Value::Conflict`] by merges.
    pub kind_clashes: u64,
    /// Set elements and map fields kept by an add or update that a
    /// concurrent remove did not see (add-wins, update-wins).
    pub remove_update: u64,
}

impl Conflicts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Conflicts) {
        self.lww_resolved += other.lww_resolved;
        self.lww_values_lost += other.lww_values_lost;
        self.mv_siblings += other.mv_siblings;
        self.kind_clashes += other.kind_clashes;
        self.remove_update += other.remove_update;
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == Conflicts::default()
    }
}

/// What is classified before the join (the local state is moved into it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Before {
    counted: Conflicts,
    /// The larger side's multi-value register values.
    mv_max: usize,
    /// Per register field of a map the remote state holds (top level),
    /// the larger side's values.
    field_max: Vec<(Field, usize)>,
    /// The larger side's kinds.
    kinds_max: usize,
}

impl Before {
    /// Classifies merging `remote` into `current`, whose novel part is
    /// `novel` (`None`: it brings nothing).
    pub(crate) fn of(current: Option<&Value>, remote: &Value, novel: Option<&Value>) -> Before {
        let mut counted = Conflicts::default();
        if let (Some(c), Some(r)) = (current.and_then(lww_entry), lww_entry(remote)) {
            if c > r && (c.0, c.1) != (r.0, r.1) {
                counted.lww_resolved = 1;
                counted.lww_values_lost = u64::from(c.2 != r.2);
            }
        }
        counted.remove_update = match (current, remote, novel) {
            (Some(Value::Set(l)), Value::Set(r), Some(Value::Set(n))) => lost_removes(&l.0, &r.0, &n.0.ctx),
            (Some(Value::Map(l)), Value::Map(r), Some(Value::Map(n))) => lost_removes(&l.0, &r.0, &n.0.ctx),
            _ => 0,
        };
        // The remote state's register fields: a delta's few, so this is
        // the size of the merge, not of the local map.
        let field_max = match (current, remote) {
            (None | Some(Value::Map(_)), Value::Map(r)) => {
                r.0.store
                    .iter()
                    .filter_map(|(f, n)| {
                        let theirs = register_len(Some(n))?;
                        let mine = match current {
                            Some(Value::Map(l)) => register_len(l.0.store.get(f)).unwrap_or(0),
                            _ => 0,
                        };
                        Some((f.clone(), mine.max(theirs)))
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Before {
            counted,
            field_max,
            mv_max: current.map_or(0, mv_len).max(mv_len(remote)),
            kinds_max: current.map_or(0, kinds).max(kinds(remote)),
        }
    }

    /// The conflicts of a merge that changed nothing.
    pub(crate) fn redundant(self) -> Conflicts {
        self.counted
    }

    /// The conflicts of a merge whose result is `next`.
    pub(crate) fn after(self, next: &Value) -> Conflicts {
        let mut c = self.counted;
        c.mv_siblings = mv_len(next).saturating_sub(self.mv_max) as u64;
        if let Value::Map(m) = next {
            for (f, max) in &self.field_max {
                let now = register_len(m.0.store.get(f)).unwrap_or(0);
                c.mv_siblings += now.saturating_sub(*max) as u64;
            }
        }
        if matches!(next, Value::Conflict(_)) {
            c.kind_clashes = kinds(next).saturating_sub(self.kinds_max) as u64;
        }
        c
    }
}

type LwwEntry = (
    crate::clock::HlcTimestamp,
    crate::clock::ReplicaId,
    Option<crate::crdt::Bytes>,
);

fn lww_entry(v: &Value) -> Option<&LwwEntry> {
    match v {
        Value::Lww(r) => r.entry(),
        Value::Conflict(parts) => parts.iter().find_map(lww_entry),
        _ => None,
    }
}

fn mv_len(v: &Value) -> usize {
    match v {
        Value::MvRegister(r) => r.0.store.0.len(),
        Value::Conflict(parts) => parts.iter().map(mv_len).sum(),
        _ => 0,
    }
}

/// The values of a register field (`None`: not a register field).
fn register_len(n: Option<&Nested>) -> Option<usize> {
    match n {
        Some(Nested::Register(r)) => Some(r.0.len()),
        _ => None,
    }
}

fn kinds(v: &Value) -> usize {
    match v {
        Value::Conflict(parts) => parts.len(),
        _ => 1,
    }
}

/// Elements of `local` absent from `remote`'s store whose dots `remote`'s
/// context covers partly but not wholly. `novel_ctx` is the merge's novel
/// context: it holds dots this replica has seen exactly when the merge
/// drops some of its live dots ([`Crdt::novel`](crate::crdt::Crdt::novel)
/// adds those to the remote's unseen ones), and only then is the local
/// store walked.
fn lost_removes<K: Ord + Clone + Debug, S: DotStore>(
    local: &Causal<DotMap<K, S>>,
    remote: &Causal<DotMap<K, S>>,
    novel_ctx: &CausalContext,
) -> u64 {
    if novel_ctx.difference(&local.ctx).dot_count() == novel_ctx.dot_count() {
        return 0;
    }
    crate::work::visit(local.store.len());
    let mut n = 0;
    for (k, s) in local.store.iter() {
        if remote.store.get(k).is_some() {
            continue;
        }
        let (mut seen, mut unseen) = (false, false);
        s.for_each_dot(&mut |d| {
            if remote.ctx.contains(d) {
                seen = true;
            } else {
                unseen = true;
            }
        });
        n += u64::from(seen && unseen);
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::Conflicts;
    use crate::clock::{HlcTimestamp, ReplicaId};
    use crate::crdt::{Crdt, Field, FieldKind, Op, Value, WriteStamp};
    use crate::key::Key;
    use crate::replica::prepare::{remote_next, Merge};
    use std::sync::Arc;

    /// The merging replica: no dot of the tests is its own.
    const HERE: ReplicaId = ReplicaId(99);

    fn at(replica: u64, ms: u64) -> WriteStamp {
        WriteStamp {
            replica: ReplicaId(replica),
            time: HlcTimestamp {
                wall_ms: ms,
                logical: 0,
            },
        }
    }

    /// `op` by `replica` on `state`, joined in; returns the delta.
    fn write(state: &mut Option<Value>, replica: u64, ms: u64, op: Op) -> Value {
        let d = Value::apply(state.as_ref(), &op, at(replica, ms)).unwrap();
        match state {
            Some(s) => s.join(&d),
            None => *state = Some(d.clone()),
        }
        d
    }

    /// Merges `remote` into `local`: what was counted, and whether it
    /// changed the key.
    fn merge(local: Option<Value>, remote: Value) -> (Conflicts, bool) {
        match remote_next(HERE, &Key::new("k").unwrap(), local, Arc::new(remote), false, true).unwrap() {
            Merge::Changed(n) => (n.conflicts, true),
            Merge::Redundant(c) => (c, false),
            Merge::Impossible(why) => panic!("impossible: {why}"),
        }
    }

    fn only(f: impl FnOnce(&mut Conflicts)) -> Conflicts {
        let mut c = Conflicts::default();
        f(&mut c);
        c
    }

    #[test]
    fn a_concurrent_lww_write_that_arrives_superseded_is_resolved_and_lost() {
        let (mut here, mut there) = (None, None);
        write(&mut here, 2, 20, Op::LwwSet("b".into()));
        let loser = write(&mut there, 1, 10, Op::LwwSet("a".into()));
        let (c, changed) = merge(here.clone(), loser);
        assert!(!changed, "the loser changed the key");
        assert_eq!(c, only(|c| (c.lww_resolved, c.lww_values_lost) = (1, 1)));
        // The same bytes written concurrently: resolved, nothing lost.
        let same = Value::apply(None, &Op::LwwSet("b".into()), at(1, 10)).unwrap();
        assert_eq!(merge(here, same).0, only(|c| c.lww_resolved = 1));
    }

    #[test]
    fn a_sequential_lww_overwrite_or_a_duplicate_is_no_conflict() {
        let mut here = None;
        let first = write(&mut here, 1, 10, Op::LwwSet("a".into()));
        // Written after seeing "a": stamped higher, it wins on arrival.
        let mut there = here.clone();
        let second = write(&mut there, 2, 20, Op::LwwSet("b".into()));
        assert_eq!(merge(here.clone(), second), (Conflicts::default(), true));
        // The write the key holds, received again.
        assert_eq!(merge(here, first), (Conflicts::default(), false));
    }

    #[test]
    fn concurrent_mv_writes_create_siblings_and_a_seen_overwrite_does_not() {
        let mut here = None;
        write(&mut here, 1, 0, Op::MvSet("a".into()));
        let mut there = None;
        let concurrent = write(&mut there, 2, 0, Op::MvSet("b".into()));
        assert_eq!(merge(here.clone(), concurrent).0, only(|c| c.mv_siblings = 1));
        let mut after = here.clone();
        let overwrite = write(&mut after, 2, 0, Op::MvSet("b".into()));
        assert_eq!(merge(here.clone(), overwrite), (Conflicts::default(), true));
        // A state that already holds both siblings creates none here.
        let mut both = here.clone();
        both.as_mut().unwrap().join(there.as_ref().unwrap());
        assert_eq!(merge(here, both.unwrap()), (Conflicts::default(), true));
    }

    #[test]
    fn concurrent_writes_of_a_register_field_create_siblings() {
        let f = Field::new("r", FieldKind::Register);
        let set = |v: &str| Op::MapApply {
            field: f.clone(),
            op: Box::new(Op::MvSet(v.into())),
        };
        let (mut here, mut there) = (None, None);
        write(&mut here, 1, 0, set("a"));
        let concurrent = write(&mut there, 2, 0, set("b"));
        assert_eq!(merge(here.clone(), concurrent).0, only(|c| c.mv_siblings = 1));
        let mut after = here.clone();
        let overwrite = write(&mut after, 2, 0, set("b"));
        assert_eq!(merge(here, overwrite), (Conflicts::default(), true));
    }

    #[test]
    fn a_kind_clash_counts_the_kinds_it_adds() {
        let mut here = None;
        write(&mut here, 1, 0, Op::SetAdd(vec!["x".into()]));
        let mut there = None;
        let counter = write(&mut there, 2, 0, Op::CounterAdd(1));
        let (c, _) = merge(here.clone(), counter);
        assert_eq!(c, only(|c| c.kind_clashes = 1));
        // More of a kind the clash already holds: no new clash.
        let mut clash = here;
        clash.as_mut().unwrap().join(there.as_ref().unwrap());
        let more = write(&mut there, 2, 0, Op::CounterAdd(1));
        assert_eq!(merge(clash, more), (Conflicts::default(), true));
    }

    #[test]
    fn a_remove_that_did_not_see_a_concurrent_add_loses_to_it() {
        // x added by replicas 1 and 2 concurrently; replica 3 saw only 1's
        // add and removed x.
        let (mut one, mut two) = (None, None);
        let add1 = write(&mut one, 1, 0, Op::SetAdd(vec!["x".into(), "y".into()]));
        let add2 = write(&mut two, 2, 0, Op::SetAdd(vec!["x".into()]));
        let mut three = Some(add1.clone());
        let remove = write(&mut three, 3, 0, Op::SetRemove(vec!["x".into()]));
        let mut here = Some(add1);
        here.as_mut().unwrap().join(&add2);
        let (c, changed) = merge(here.clone(), remove.clone());
        assert!(changed);
        assert_eq!(c, only(|c| c.remove_update = 1));
        // The same remove once more: applied, nothing counted again.
        let mut after = here.clone();
        after.as_mut().unwrap().join(&remove);
        assert_eq!(merge(after, remove).0, Conflicts::default());
        // Replica 3's whole state (x removed, y kept) counts the same.
        assert_eq!(merge(here, three.unwrap()).0, only(|c| c.remove_update = 1));
    }

    #[test]
    fn a_remove_after_seeing_the_add_is_no_conflict() {
        let mut here = None;
        let add = write(&mut here, 1, 0, Op::SetAdd(vec!["x".into()]));
        let mut there = Some(add);
        let remove = write(&mut there, 2, 0, Op::SetRemove(vec!["x".into()]));
        assert_eq!(merge(here.clone(), remove), (Conflicts::default(), true));
        // Adds alone never walk into a remove count.
        let more = write(&mut there, 2, 0, Op::SetAdd(vec!["z".into()]));
        assert_eq!(merge(here, more), (Conflicts::default(), true));
    }

    /// The cost the module documentation states: a merge that only adds
    /// never walks the local set; one that removes walks it once.
    #[test]
    fn only_a_merge_that_removes_walks_the_local_set() {
        let n = 10_000;
        let elems: Vec<crate::crdt::Bytes> = (0..n)
            .map(|i| crate::crdt::Bytes(format!("e{i}").into_bytes()))
            .collect();
        let mut here = None;
        write(&mut here, 1, 0, Op::SetAdd(elems));
        let here = here.unwrap();
        let classify = |remote: &Value| {
            let novel = here.novel(remote);
            crate::work::visits_of(|| super::Before::of(Some(&here), remote, novel.as_ref())).1
        };
        let mut there = Some(here.clone());
        let add = write(&mut there, 2, 0, Op::SetAdd(vec!["new".into()]));
        assert_eq!(classify(&add), 0);
        let remove = write(&mut there, 2, 0, Op::SetRemove(vec!["e7".into()]));
        assert_eq!(classify(&remove), n as u64);
    }

    /// The classification's share of a merge into a set of 10^5 elements,
    /// timed (BENCHMARKS.md, "Large set operations"):
    /// `cargo test --release -p lattice-core --lib classification_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing that prints figures, not a check"]
    // A timing reads the clock, as a driver does: not engine code.
    #[allow(clippy::disallowed_methods)]
    fn classification_cost() {
        let n = 100_000;
        let elems: Vec<crate::crdt::Bytes> = (0..n)
            .map(|i| crate::crdt::Bytes(format!("e{i}").into_bytes()))
            .collect();
        let mut here = None;
        write(&mut here, 1, 0, Op::SetAdd(elems));
        let here = here.unwrap();
        let mut there = Some(here.clone());
        let add = write(&mut there, 2, 0, Op::SetAdd(vec!["new".into()]));
        let remove = write(&mut there, 2, 0, Op::SetRemove(vec!["e7".into()]));
        let k = Key::new("k").unwrap();
        for (what, remote) in [("sadd 1", add), ("srem 1", remove)] {
            let novel = here.novel(&remote);
            let (mut classify, mut merge) = (f64::MAX, f64::MAX);
            for _ in 0..10 {
                let t = std::time::Instant::now();
                std::hint::black_box(super::Before::of(Some(&here), &remote, novel.as_ref()));
                classify = classify.min(t.elapsed().as_secs_f64() * 1e3);
                let current = here.clone();
                let t = std::time::Instant::now();
                std::hint::black_box(
                    remote_next(HERE, &k, Some(current), Arc::new(remote.clone()), true, false).unwrap(),
                );
                merge = merge.min(t.elapsed().as_secs_f64() * 1e3);
            }
            println!("{what} into a set of {n}: whole merge (remote_next) {merge:.2} ms, of which classification {classify:.3} ms");
        }
    }

    #[test]
    fn a_field_removed_while_another_replica_updated_it_survives_and_counts() {
        let f = Field::new("n", FieldKind::Counter);
        let inc = || Op::MapApply {
            field: f.clone(),
            op: Box::new(Op::CounterAdd(1)),
        };
        let mut one = None;
        let first = write(&mut one, 1, 0, inc());
        // Replica 2 saw 1's update and updates the field too; replica 3
        // saw only 1's and removes the field.
        let mut two = Some(first.clone());
        let update = write(&mut two, 2, 0, inc());
        let mut three = Some(first);
        let remove = write(&mut three, 3, 0, Op::MapRemove(f.clone()));
        let (c, _) = merge(two.clone(), remove);
        assert_eq!(c, only(|c| c.remove_update = 1));
        // The remover receiving the update: the field is absent there, so
        // nothing is counted on that side (one count per conflict here).
        assert_eq!(merge(three, update).0, Conflicts::default());
    }
}
