//! Set operations of many elements (issue 14): their one-pass deltas equal
//! the element-by-element fold they replaced, and their cost, counted in
//! entries visited rather than timed, grows linearly with their size.

use super::orset::tests::{set_add_fold, set_remove_fold, small_set, some_elems};
use super::{Bytes, Causal, Crdt, DotMap, DotSet, Field, FieldKind, Nested, Op, OrMap, OrSet, Value, WriteStamp};
use crate::clock::{HlcTimestamp, ReplicaId};
use crate::work::visits_of;
use proptest::prelude::*;

fn stamp(r: u64) -> WriteStamp {
    WriteStamp {
        replica: ReplicaId(r),
        time: HlcTimestamp::default(),
    }
}

fn tags() -> Field {
    Field::new("tags", FieldKind::Set)
}

fn bytes_set(s: OrSet<u8>) -> OrSet<Bytes> {
    let store = s.0.store.0.into_iter().map(|(k, v)| (Bytes(vec![k]), v)).collect();
    OrSet(Causal {
        store: DotMap(store),
        ctx: s.0.ctx,
    })
}

/// A map whose `tags` field is the set `s` (absent when `s` is empty).
fn map_holding(s: Causal<DotMap<Bytes, DotSet>>) -> Value {
    let mut store = DotMap::default();
    if !s.store.0.is_empty() {
        store.0.insert(tags(), Nested::Set(s.store));
    }
    Value::Map(OrMap(Causal { store, ctx: s.ctx }))
}

fn elems_of(v: &[u8]) -> Vec<Bytes> {
    v.iter().map(|e| Bytes(vec![*e])).collect()
}

/// What `Value::apply` gave for a set op before the one-pass deltas.
fn reference(s: &OrSet<Bytes>, op: &Op, r: u64) -> Causal<DotMap<Bytes, DotSet>> {
    match op {
        Op::SetAdd(elems) => set_add_fold(&s.0.store, &s.0.ctx, ReplicaId(r), elems),
        Op::SetRemove(elems) => set_remove_fold(&s.0.store, elems),
        _ => unreachable!("a set op"),
    }
}

proptest! {
    #[test]
    fn set_ops_equal_the_fold(s in small_set(), elems in some_elems(), add in any::<bool>(), r in 0u64..4) {
        let s = bytes_set(s);
        let elems = elems_of(&elems);
        let op = if add { Op::SetAdd(elems) } else { Op::SetRemove(elems) };
        let want = reference(&s, &op, r);

        let got = Value::apply(Some(&Value::Set(s.clone())), &op, stamp(r)).unwrap();
        prop_assert_eq!(got, Value::Set(OrSet(want.clone())));

        // The same op on a set nested in a map field.
        let map = map_holding(s.0.clone());
        let nested = Op::MapApply { field: tags(), op: Box::new(op) };
        let got = Value::apply(Some(&map), &nested, stamp(r)).unwrap();
        prop_assert_eq!(got, map_holding(want));
    }
}

#[test]
fn a_ten_element_add_is_the_fold() {
    let r = 1;
    let mut s = Value::Set(OrSet::default());
    let first = Value::apply(Some(&s), &Op::SetAdd(elems_of(&[1, 2, 3])), stamp(r)).unwrap();
    s.join(&first);
    let Value::Set(set) = &s else { unreachable!() };
    let op = Op::SetAdd(elems_of(&[0, 1, 2, 2, 5, 6, 7, 8, 9, 1]));
    let got = Value::apply(Some(&s), &op, stamp(r)).unwrap();
    assert_eq!(got, Value::Set(OrSet(reference(set, &op, r))));
}

fn elems(prefix: u8, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes(format!("{}{i:06}", prefix as char).into_bytes()))
        .collect()
}

/// Entries visited by a local write: the delta, then joining it.
fn write_visits(current: &Value, op: &Op) -> u64 {
    visits_of(|| {
        let d = Value::apply(Some(current), op, stamp(1)).unwrap();
        let mut next = current.clone();
        next.join(&d);
    })
    .1
}

const N: usize = 1000;
/// Entries a near-linear operation of `N` elements may visit: a few passes
/// over the operation and the set. The quadratic fold visits ~N^2 / 2.
const BOUND: u64 = 10 * N as u64;

fn set_of_n() -> Value {
    let mut v = Value::Set(OrSet::default());
    let d = Value::apply(Some(&v), &Op::SetAdd(elems(b'e', N)), stamp(1)).unwrap();
    v.join(&d);
    v
}

#[test]
fn large_set_ops_visit_linearly_many_entries() {
    let set = set_of_n();
    let every_other: Vec<Bytes> = elems(b'e', N).into_iter().step_by(2).collect();
    let map = match &set {
        Value::Set(s) => map_holding(s.0.clone()),
        _ => unreachable!(),
    };
    let in_map = |op| Op::MapApply {
        field: tags(),
        op: Box::new(op),
    };
    let cases = [
        ("sadd n into n", &set, Op::SetAdd(elems(b'f', N))),
        ("sadd n present", &set, Op::SetAdd(elems(b'e', N))),
        ("srem every other", &set, Op::SetRemove(every_other.clone())),
        ("map sadd n into n", &map, in_map(Op::SetAdd(elems(b'f', N)))),
        ("map srem every other", &map, in_map(Op::SetRemove(every_other.clone()))),
    ];
    for (what, current, op) in cases {
        let visits = write_visits(current, &op);
        assert!(visits <= BOUND, "{what}: {visits} entries visited for {N} elements");
    }

    // The bound catches the fold this replaced.
    let Value::Set(s) = &set else { unreachable!() };
    for op in [Op::SetAdd(elems(b'f', N)), Op::SetRemove(every_other)] {
        let (_, visits) = visits_of(|| reference(s, &op, 1));
        assert!(visits > BOUND, "the reference fold visited only {visits}");
    }
}

#[test]
fn merging_large_states_visits_linearly_many_entries() {
    let a = set_of_n();
    let mut b = Value::Set(OrSet::default());
    let mut b_elems = elems(b'e', N / 2);
    b_elems.extend(elems(b'g', N / 2));
    let d = Value::apply(Some(&b), &Op::SetAdd(b_elems), stamp(2)).unwrap();
    b.join(&d);
    let (novel, visits) = visits_of(|| {
        let novel = a.novel(&b).unwrap();
        let mut m = a.clone();
        m.join(&novel);
        m.join(&b);
        novel
    });
    assert!(visits <= BOUND, "{visits} entries visited merging two sets of {N}");
    let mut m = a.clone();
    m.join(&novel);
    assert!(m.novel(&b).is_none());
}

#[test]
fn scattered_removals_merge_in_linearly_many_steps() {
    // Dots run opposite to the element order: elements added last to first.
    let mut rev = elems(b'r', N);
    rev.reverse();
    let mut a = Value::Set(OrSet::default());
    a.join(&Value::apply(Some(&a), &Op::SetAdd(rev.clone()), stamp(1)).unwrap());
    let odd: Vec<Bytes> = rev.into_iter().step_by(2).collect();
    let mut b = a.clone();
    b.join(&Value::apply(Some(&b), &Op::SetRemove(odd), stamp(2)).unwrap());
    let (novel, visits) = visits_of(|| a.novel(&b).unwrap());
    assert!(visits <= BOUND, "{visits} entries visited for {} removals", N / 2);
    a.join(&novel);
    assert_eq!(a, b);
}
