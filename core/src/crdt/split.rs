//! Join-decompositions: a state cut into pieces whose join is the state.
//!
//! Anti-entropy ships whole states, but a merged state can outgrow a frame
//! (three concurrent 6 KB values of a multi-value register against 16 KiB
//! frames; a set that grew by many small adds). Such a state is sent in
//! pieces, each a state of the same type in its own right, so a receiver may
//! join any subset of them, in any order, any number of times, and holds the
//! whole state once it has joined them all.
//!
//! For a causal state `(store, ctx)` the pieces are
//! - chunks of the store, each with exactly its own dots as context (like the
//!   delta of an add: it says "these are live" and nothing about other dots);
//! - the rest of the context, `ctx` minus every live dot, with an empty store
//!   (like the delta of a remove: it says "these dots are gone").
//!
//! No piece claims to have seen a dot that it drops unless the whole state
//! dropped it too, so joining a piece never removes what the whole would keep.
//! Cost: one encoding of each entry per nesting level, O(n · depth).

use super::{Causal, CounterStore, DotFun, DotMap, DotSet, DotStore, Nested, Value};
use super::{MvRegister, OrMap, OrSet};
use crate::clock::{CausalContext, Dot};
use crate::crdt::dotstore::dots_of;
use serde::Serialize;
use std::fmt::Debug;

/// The encoded size of `v` in bytes (an estimate of 0 for the impossible
/// encoding failure: the caller re-encodes what it sends anyway).
fn size_of<T: Serialize + ?Sized>(v: &T) -> usize {
    rmp_serde::to_vec(v).map(|b| b.len()).unwrap_or(0)
}

/// Stores that can be cut into stores whose join is the whole.
pub(crate) trait Split: DotStore + Serialize {
    /// Appends to `out` non-empty stores whose join is `self`, each
    /// encoding to at most about `max` bytes where a single entry allows
    /// (one entry that is larger on its own, such as one large register
    /// value, is a piece by itself).
    fn split_into(&self, max: usize, out: &mut Vec<Self>);
}

/// Greedy chunking of sorted entries: `cut` is asked to split an entry that
/// alone exceeds `max` (and returns the entry whole when it cannot).
fn chunk<K: Clone + Ord, V: Clone>(
    entries: impl Iterator<Item = (K, V)>,
    max: usize,
    size: impl Fn(&K, &V) -> usize,
    cut: impl Fn(&K, &V, usize) -> Vec<V>,
) -> Vec<Vec<(K, V)>> {
    let (mut out, mut cur, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for (k, v) in entries {
        let n = size(&k, &v) + 2;
        if n > max {
            for piece in cut(&k, &v, max) {
                out.push(vec![(k.clone(), piece)]);
            }
            continue;
        }
        if bytes + n > max && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += n;
        cur.push((k, v));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl<T: Clone + Ord + Debug + Serialize> Split for DotFun<T> {
    fn split_into(&self, max: usize, out: &mut Vec<Self>) {
        let chunks = chunk(
            self.0.iter().map(|(d, v)| (*d, v.clone())),
            max,
            |d, v| size_of(d) + size_of(v),
            |_, v, _| vec![v.clone()],
        );
        out.extend(chunks.into_iter().map(|c| DotFun(c.into_iter().collect())));
    }
}

impl Split for DotSet {
    fn split_into(&self, max: usize, out: &mut Vec<Self>) {
        let per = (max / 16).max(1);
        let dots: Vec<Dot> = self.0.iter().copied().collect();
        out.extend(dots.chunks(per).map(|c| DotSet(c.iter().copied().collect())));
    }
}

impl<K: Ord + Clone + Debug + Serialize, S: Split> Split for DotMap<K, S> {
    fn split_into(&self, max: usize, out: &mut Vec<Self>) {
        let chunks = chunk(
            self.0.iter().map(|(k, s)| (k.clone(), s.clone())),
            max,
            |k, s| size_of(k) + size_of(s),
            |k, s, max| {
                let mut parts = Vec::new();
                s.split_into(max.saturating_sub(size_of(k) + 8).max(1), &mut parts);
                parts
            },
        );
        out.extend(chunks.into_iter().map(|c| DotMap(c.into_iter().collect())));
    }
}

impl Split for Nested {
    fn split_into(&self, max: usize, out: &mut Vec<Self>) {
        fn wrap<S: Split>(s: &S, max: usize, f: fn(S) -> Nested, out: &mut Vec<Nested>) {
            let mut parts = Vec::new();
            s.split_into(max, &mut parts);
            out.extend(parts.into_iter().map(f));
        }
        match self {
            Nested::Counter(s) => wrap::<CounterStore>(s, max, Nested::Counter, out),
            Nested::Register(s) => wrap(s, max, Nested::Register, out),
            Nested::Set(s) => wrap(s, max, Nested::Set, out),
            Nested::Map(s) => wrap(s, max, Nested::Map, out),
        }
    }
}

/// The context of `c` without the dots in `live`, cut into contexts of at
/// most about `max` bytes (a fragmented context is many ranges).
fn context_pieces(ctx: &CausalContext, live: &CausalContext, max: usize) -> Vec<CausalContext> {
    let rest = ctx.difference(live);
    if rest.is_empty() {
        return Vec::new();
    }
    if size_of(&rest) <= max {
        return vec![rest];
    }
    // About 20 bytes a range in the encoding; 40 replica bytes each.
    let per = (max / 24).max(1);
    let (mut out, mut cur, mut n) = (Vec::new(), CausalContext::default(), 0usize);
    for (r, ranges) in rest.ranges() {
        for &(lo, hi) in ranges {
            if n == per {
                out.push(std::mem::take(&mut cur));
                n = 0;
            }
            cur.insert_run(Dot::new(r, lo), hi - lo + 1);
            n += 1;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A join-decomposition of a causal state into pieces of at most about
/// `max` encoded bytes (see the module documentation). A state that fits is
/// its own single piece.
fn split_causal<S: Split>(c: &Causal<S>, max: usize) -> Vec<Causal<S>> {
    if size_of(c) <= max {
        return vec![c.clone()];
    }
    let mut stores = Vec::new();
    c.store.split_into(max, &mut stores);
    let live = CausalContext::from_dots(dots_of(&c.store));
    let mut out: Vec<Causal<S>> = stores
        .into_iter()
        .map(|s| {
            let ctx = CausalContext::from_dots(dots_of(&s));
            #[cfg(feature = "planted-bugs")]
            let ctx = if crate::planted::active(crate::planted::PlantedBug::SplitWholeContext) {
                c.ctx.clone()
            } else {
                ctx
            };
            Causal { store: s, ctx }
        })
        .collect();
    out.extend(
        context_pieces(&c.ctx, &live, max)
            .into_iter()
            .map(|ctx| Causal { store: S::empty(), ctx }),
    );
    out
}

impl Value {
    /// A join-decomposition of this value into pieces of at most about
    /// `max` encoded bytes each, so that a state larger than a frame can
    /// travel in several: joining every piece, in any order, gives `self`
    /// back, and joining any subset gives a state that `self` includes.
    ///
    /// One entry that alone is larger than `max` (one register value) is a
    /// piece by itself; G-, PN-counters and LWW registers are one piece
    /// (their size is bounded by the number of replica ids and by the value
    /// limit).
    pub fn split(&self, max: usize) -> Vec<Value> {
        match self {
            Value::Counter(c) => split_causal(&c.0, max)
                .into_iter()
                .map(|p| Value::Counter(super::CCounter(p)))
                .collect(),
            Value::MvRegister(r) => split_causal(&r.0, max)
                .into_iter()
                .map(|p| Value::MvRegister(MvRegister(p)))
                .collect(),
            Value::Set(s) => split_causal(&s.0, max)
                .into_iter()
                .map(|p| Value::Set(OrSet(p)))
                .collect(),
            Value::Map(m) => split_causal(&m.0, max)
                .into_iter()
                .map(|p| Value::Map(OrMap(p)))
                .collect(),
            Value::Conflict(parts) => parts.iter().flat_map(|p| p.split(max)).collect(),
            Value::GCounter(_) | Value::PnCounter(_) | Value::Lww(_) => vec![self.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{HlcTimestamp, ReplicaId};
    use crate::crdt::{Crdt, Field, FieldKind, Op, WriteStamp};
    use proptest::prelude::*;

    fn stamp(r: u64) -> WriteStamp {
        WriteStamp {
            replica: ReplicaId(r),
            time: HlcTimestamp::default(),
        }
    }

    fn apply(v: &mut Option<Value>, op: Op, r: u64) {
        if let Ok(d) = Value::apply(v.as_ref(), &op, stamp(r)) {
            match v {
                Some(cur) => cur.join(&d),
                None => *v = Some(d),
            }
        }
    }

    fn joined(pieces: &[Value]) -> Option<Value> {
        let mut it = pieces.iter();
        let mut acc = it.next()?.clone();
        for p in it {
            acc.join(p);
        }
        Some(acc)
    }

    fn big(tag: u64, n: usize) -> crate::crdt::Bytes {
        let mut b = format!("{tag}-").into_bytes();
        b.resize(n, b'x');
        b.into()
    }

    /// Three concurrent 6 KB register values and a removed one: the state
    /// that one frame of 16 KiB could not carry (swarm seed 1091).
    fn wide_register() -> Value {
        let mut a = None;
        apply(&mut a, Op::MvSet(big(0, 100)), 4);
        let mut parts = Vec::new();
        for r in 1..=3 {
            let mut v = a.clone();
            apply(&mut v, Op::MvSet(big(r, 6000)), r);
            parts.push(v.expect("written"));
        }
        joined(&parts).expect("three")
    }

    #[test]
    fn an_oversized_register_splits_into_pieces_that_fit_and_join_back() {
        let v = wide_register();
        let max = 8 * 1024;
        assert!(size_of(&v) > 16 * 1024);
        let pieces = v.split(max);
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        for p in &pieces {
            assert!(size_of(p) <= max, "a piece of {} bytes", size_of(p));
            assert!(p.is_well_formed());
        }
        assert_eq!(joined(&pieces).as_ref(), Some(&v));
    }

    #[test]
    fn a_piece_never_removes_what_the_whole_keeps() {
        // The receiver holds the old value and one of the three new ones;
        // each piece alone must move it toward the whole, never drop a
        // value that the whole keeps.
        let v = wide_register();
        let keep: Vec<_> = match &v {
            Value::MvRegister(r) => r.values().into_iter().cloned().collect(),
            _ => unreachable!(),
        };
        for p in v.split(8 * 1024) {
            let mut r = v.clone();
            r.join(&p);
            assert_eq!(r, v, "a piece changed the whole it came from");
        }
        assert_eq!(keep.len(), 3);
    }

    #[test]
    fn a_large_set_and_map_split_and_join_back() {
        let mut s = None;
        apply(&mut s, Op::SetAdd((0..2000).map(|i| big(i, 20)).collect()), 1);
        apply(
            &mut s,
            Op::SetRemove((0..2000).step_by(3).map(|i| big(i, 20)).collect()),
            1,
        );
        apply(&mut s, Op::SetAdd((0..500).map(|i| big(i, 20)).collect()), 2);
        let s = s.expect("set");
        let pieces = s.split(4096);
        assert!(pieces.len() > 5);
        assert!(pieces.iter().all(|p| size_of(p) <= 4096 && p.is_well_formed()));
        assert_eq!(joined(&pieces).as_ref(), Some(&s));

        let mut m = None;
        for i in 0..300 {
            let f = Field::new(format!("f{i}"), FieldKind::Register);
            apply(
                &mut m,
                Op::MapApply {
                    field: f,
                    op: Box::new(Op::MvSet(big(i, 100))),
                },
                1 + i % 3,
            );
        }
        let m = m.expect("map");
        let pieces = m.split(4096);
        assert!(pieces.len() > 5);
        assert!(pieces.iter().all(|p| size_of(p) <= 4096 && p.is_well_formed()));
        assert_eq!(joined(&pieces).as_ref(), Some(&m));
    }

    proptest! {
        /// Any subset of the pieces, joined in any order into any state the
        /// whole includes, stays below the whole; all of them reach it.
        #[test]
        fn pieces_are_a_join_decomposition(
            ops in proptest::collection::vec((0u64..3, 0usize..4, 0u64..40), 1..60),
            max in 64usize..2048,
            order in proptest::collection::vec(any::<u16>(), 0..40),
        ) {
            let mut reps: Vec<Option<Value>> = vec![None, None, None];
            for (r, kind, x) in ops {
                let op = match kind {
                    0 => Op::SetAdd(vec![big(x, 30)]),
                    1 => Op::SetRemove(vec![big(x, 30)]),
                    2 => Op::MvSet(big(x, 200)),
                    _ => Op::CounterAdd(x as i64 - 20),
                };
                apply(&mut reps[r as usize], op, r + 1);
                if x % 7 == 0 {
                    let from = reps[((r + 1) % 3) as usize].clone();
                    if let (Some(me), Some(f)) = (&mut reps[r as usize], from) { me.join(&f) }
                }
            }
            let Some(whole) = joined(&reps.into_iter().flatten().collect::<Vec<_>>()) else { return Ok(()) };
            let pieces = whole.split(max);
            let all = joined(&pieces);
            prop_assert_eq!(all.as_ref(), Some(&whole));
            let mut acc: Option<Value> = None;
            for i in order {
                let p = &pieces[i as usize % pieces.len()];
                match &mut acc { Some(a) => a.join(p), None => acc = Some(p.clone()) }
                let mut w = whole.clone();
                w.join(acc.as_ref().unwrap());
                prop_assert_eq!(&w, &whole);
            }
        }
    }
}
