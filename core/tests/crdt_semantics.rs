//! The merge semantics each CRDT documents, on hand-made scenarios: what
//! survives concurrent updates, how ties resolve, what an operation of the
//! wrong kind does, and the limits (map nesting, clock skew).

// Clippy's `allow-unwrap-in-tests` covers `#[test]` functions only, not
// the helpers of an integration test crate.
#![allow(clippy::unwrap_used)]

use lattice_core::clock::{ClockError, Hlc, HlcTimestamp, ReplicaId};
use lattice_core::crdt::{
    Bytes, CCounter, Crdt, DotMap, DotSet, DotStore, Field, FieldKind, GCounter, Kind, LwwRegister, MvRegister,
    NestedView, Op, OrMap, OrSet, PNCounter, Value, ValueView, WriteStamp, MAX_NESTING,
};
use lattice_core::Error;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

const R1: ReplicaId = ReplicaId(1);
const R2: ReplicaId = ReplicaId(2);
const R3: ReplicaId = ReplicaId(3);

fn t(wall_ms: u64) -> HlcTimestamp {
    HlcTimestamp { wall_ms, logical: 0 }
}

fn stamp(replica: ReplicaId, wall_ms: u64) -> WriteStamp {
    WriteStamp {
        replica,
        time: t(wall_ms),
    }
}

fn joined<S: Crdt>(a: &S, b: &S) -> S {
    let mut x = a.clone();
    x.join(b);
    x
}

/// Applies `op` to `v` (a key's value, `None` if absent) like a replica does.
fn apply(v: &mut Option<Value>, op: Op, s: WriteStamp) -> Value {
    let d = Value::apply(v.as_ref(), &op, s).unwrap();
    match v {
        Some(v) => v.join(&d),
        None => *v = Some(d.clone()),
    }
    d
}

fn map_apply(name: &str, kind: FieldKind, op: Op) -> Op {
    Op::MapApply {
        field: Field::new(name, kind),
        op: Box::new(op),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::from(s)
}

// ------------------------------------------------------------------ OrSet

#[test]
fn orset_concurrent_add_and_remove_add_wins() {
    let mut a = OrSet::default();
    let d = a.add(R1, 7u8);
    a.join(&d);
    let mut b = a.clone();
    // b removes the 7 it has seen while a adds 7 again.
    let rm = b.remove(&7);
    b.join(&rm);
    assert!(!b.contains(&7));
    let add = a.add(R1, 7);
    a.join(&add);
    // Delivered either way round, the concurrent add wins.
    let (mut x, mut y) = (a.clone(), b.clone());
    x.join(&rm);
    y.join(&add);
    assert!(x.contains(&7) && y.contains(&7));
    assert_eq!(x, y);
    // Concurrent add by a different replica also wins over the remove.
    let add3 = OrSet::default().add(R3, 7u8);
    let mut z = b.clone();
    z.join(&add3);
    assert!(z.contains(&7));
}

#[test]
fn orset_remove_of_observed_adds_removes_and_readd_works() {
    let mut a = OrSet::default();
    for (r, e) in [(R1, 1u8), (R2, 1), (R1, 2)] {
        let d = a.add(r, e);
        a.join(&d);
    }
    let rm = a.remove(&1);
    let mut b = a.clone();
    b.join(&rm);
    assert_eq!(b.iter().copied().collect::<Vec<_>>(), vec![2]);
    // A stale delivery of the old adds does not resurrect the element.
    let stale = OrSet::default().add(R2, 1u8);
    let mut c = OrSet::default();
    c.join(&stale);
    c.join(&rm);
    b.join(&c);
    assert!(!b.contains(&1));
    // Re-adding after the remove works.
    let re = b.add(R2, 1);
    b.join(&re);
    assert!(b.contains(&1));
    let clear = b.clear();
    b.join(&clear);
    assert!(b.is_empty());
}

// ------------------------------------------------------------- MvRegister

#[test]
fn mvregister_keeps_concurrent_writes_and_a_later_write_replaces_them() {
    let base = MvRegister::default();
    let a = base.write(R1, 10u8);
    let b = base.write(R2, 20u8);
    let c = base.write(R3, 30u8);
    let mut x = joined(&joined(&a, &b), &c);
    let y = joined(&c, &joined(&b, &a));
    assert_eq!(x, y);
    assert_eq!(x.values(), vec![&10, &20, &30]);
    // A replica that has seen all three writes replaces them all.
    let w = x.write(R2, 40);
    x.join(&w);
    assert_eq!(x.values(), vec![&40]);
    // A replica that has seen only `a` replaces only `a`.
    let partial = a.write(R1, 11);
    let mut z = joined(&joined(&a, &b), &partial);
    assert_eq!(z.values(), vec![&11, &20]);
    // `w` saw a, b and c but not `partial`: those two are concurrent.
    z.join(&w);
    assert_eq!(z.values(), vec![&11, &40]);
}

#[test]
fn mvregister_clear_keeps_a_concurrent_write() {
    let mut x = MvRegister::default();
    let d = x.write(R1, 1u8);
    x.join(&d);
    let clear = x.clear();
    let w = x.write(R2, 2);
    let mut y = joined(&x, &clear);
    assert!(y.values().is_empty());
    y.join(&w);
    assert_eq!(y.values(), vec![&2]);
}

// ------------------------------------------------------------ LwwRegister

#[test]
fn lww_higher_timestamp_wins_in_any_order() {
    let base = LwwRegister::default();
    let old = base.set(t(10), R3, "old");
    let new = base.set(t(11), R1, "new");
    assert_eq!(joined(&old, &new).get(), Some(&"new"));
    assert_eq!(joined(&new, &old).get(), Some(&"new"));
    assert_eq!(joined(&new, &old), joined(&old, &new));
    // The logical component counts too.
    let later = base.set(
        HlcTimestamp {
            wall_ms: 11,
            logical: 1,
        },
        R1,
        "later",
    );
    assert_eq!(joined(&later, &new).get(), Some(&"later"));
    assert_eq!(joined(&new, &later).get(), Some(&"later"));
}

#[test]
fn lww_timestamp_tie_is_broken_by_replica_id() {
    let base = LwwRegister::default();
    let writes = [
        base.set(t(5), R2, "two"),
        base.set(t(5), R3, "three"),
        base.set(t(5), R1, "one"),
    ];
    // Every delivery order gives the same winner: the highest replica id.
    for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
        let mut r = LwwRegister::default();
        for i in order {
            r.join(&writes[i]);
        }
        assert_eq!(r.get(), Some(&"three"), "order {order:?}");
        assert_eq!(r.stamp(), Some((t(5), R3)));
    }
}

#[test]
fn lww_local_write_supersedes_what_it_read() {
    let mut r = LwwRegister::default();
    let d = r.set(t(100), R3, 1u8);
    r.join(&d);
    // A writer with a clock behind the stored stamp still wins locally.
    let s = r.stamp_after(t(50));
    assert!(s > t(100));
    let d = r.set(s, R1, 2);
    r.join(&d);
    assert_eq!(r.get(), Some(&2));
    // A fresh stamp ahead of the stored one is kept as is.
    assert_eq!(r.stamp_after(t(500)), t(500));
}

// --------------------------------------------------------------- counters

/// Three replicas apply random updates; deltas travel in a random order.
/// Returns the replicas' states after every delta reached every replica.
fn exchange<S: Crdt>(mut replicas: Vec<S>, deltas: &[S], rng: &mut ChaCha8Rng) -> Vec<S> {
    for r in replicas.iter_mut() {
        let mut order: Vec<usize> = (0..deltas.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for i in order {
            r.join(&deltas[i]);
        }
    }
    replicas
}

#[test]
fn gcounter_value_is_the_sum_of_all_increments() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut reps = vec![GCounter::default(); 3];
    let (mut deltas, mut sum) = (Vec::new(), 0u128);
    for _ in 0..200 {
        let i = (rng.next_u64() % 3) as usize;
        let n = rng.next_u64() % 1000;
        let d = reps[i].inc(ReplicaId(i as u64), n);
        reps[i].join(&d);
        deltas.push(d);
        sum += u128::from(n);
    }
    let reps = exchange(reps, &deltas, &mut rng);
    for r in &reps {
        assert_eq!(r.value(), sum);
        assert_eq!(r, &reps[0]);
    }
}

#[test]
fn pncounter_value_is_increments_minus_decrements() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut reps = vec![PNCounter::default(); 3];
    let (mut deltas, mut sum) = (Vec::new(), 0i128);
    for _ in 0..200 {
        let i = (rng.next_u64() % 3) as usize;
        let n = (rng.next_u64() % 2001) as i64 - 1000;
        let d = reps[i].add(ReplicaId(i as u64), n);
        reps[i].join(&d);
        deltas.push(d);
        sum += i128::from(n);
    }
    let reps = exchange(reps, &deltas, &mut rng);
    for r in &reps {
        assert_eq!(r.value(), sum);
    }
    // Extremes count fully.
    let c = PNCounter::default();
    let mut c2 = c.clone();
    c2.join(&c.add(R1, i64::MIN));
    let d = c2.add(R2, i64::MAX);
    c2.join(&d);
    assert_eq!(c2.value(), -1);
}

#[test]
fn ccounter_value_is_increments_minus_decrements() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut reps = vec![CCounter::default(); 3];
    let (mut deltas, mut sum) = (Vec::new(), 0i128);
    for _ in 0..200 {
        let i = (rng.next_u64() % 3) as usize;
        let n = (rng.next_u64() % 2001) as i64 - 1000;
        let d = reps[i].add(ReplicaId(i as u64), n);
        reps[i].join(&d);
        deltas.push(d);
        sum += i128::from(n);
    }
    let reps = exchange(reps, &deltas, &mut rng);
    for r in &reps {
        assert_eq!(r.value(), sum);
        assert_eq!(r, &reps[0]);
    }
    // Each replica keeps one live dot: its running totals.
    let mut live = 0;
    reps[0].causal().store().for_each_dot(&mut |_| live += 1);
    assert_eq!(live, 3);
}

#[test]
fn ccounter_overflow_is_refused() {
    let mut c = CCounter::default();
    let d = c.add(R1, i64::MAX);
    c.join(&d);
    let d = c.add(R1, i64::MAX);
    c.join(&d);
    // R1's total is now u64::MAX - 1.
    assert_eq!(c.try_add(R1, 2), None);
    let d = c.try_add(R1, 1).unwrap();
    c.join(&d);
    assert_eq!(c.try_add(R1, 1), None);
    // Other replicas and the other direction are unaffected.
    assert!(c.try_add(R2, 1).is_some());
    assert!(c.try_add(R1, -1).is_some());
}

#[test]
fn ccounter_reset_concurrent_with_increment_keeps_the_running_total() {
    // R1 has counted 5 and R2 has counted 10; both replicas have seen both.
    let mut a = CCounter::default();
    let d = a.add(R1, 5);
    a.join(&d);
    let d = a.add(R2, 10);
    a.join(&d);
    let mut b = a.clone();
    // b resets (observing both totals) while a increments by 3.
    let reset = b.reset();
    b.join(&reset);
    assert_eq!(b.value(), 0);
    let inc = a.add(R1, 3);
    a.join(&inc);
    assert_eq!(a.value(), 18);
    // After the exchange, R2's observed total is gone, but R1's increment
    // survives carrying R1's whole running total (5 + 3), not just the 3:
    // the documented semantics of ccounter.rs.
    a.join(&reset);
    b.join(&inc);
    assert_eq!(a, b);
    assert_eq!(a.value(), 8);
    // A reset that has seen the increment removes everything.
    let reset2 = a.reset();
    a.join(&reset2);
    assert_eq!(a.value(), 0);
    // Counting starts from zero again.
    let d = a.add(R1, 2);
    a.join(&d);
    assert_eq!(a.value(), 2);
}

// ------------------------------------------------------------------ OrMap

type Tags = DotMap<String, DotSet>;

fn tags_of(m: &OrMap<String, Tags>, key: &str) -> Option<Vec<String>> {
    m.get(&key.to_string())
        .map(|s| s.iter().map(|(e, _)| e.clone()).collect())
}

/// Semantics asserted: removing a key removes exactly the dots of its value
/// that the remover observed. An update concurrent with the remove keeps
/// the key, holding only what the remover had not observed (here: the
/// concurrently added element), not the value from before the remove.
#[test]
fn ormap_update_concurrent_with_remove_keeps_only_the_unseen_update() {
    let k = "tags".to_string();
    let add = |m: &OrMap<String, Tags>, r, e: &str| {
        m.update(k.clone(), |set, ctx| {
            OrSet::<String>::add_to(set, ctx, r, e.to_string())
        })
    };
    let mut a: OrMap<String, Tags> = OrMap::default();
    for e in ["red", "green"] {
        let d = add(&a, R1, e);
        a.join(&d);
    }
    let other = a.update("other".to_string(), |set, ctx| {
        OrSet::<String>::add_to(set, ctx, R1, "x".into())
    });
    a.join(&other);
    let mut b = a.clone();
    let rm = b.remove(&k);
    b.join(&rm);
    assert_eq!(tags_of(&b, "tags"), None);
    // Concurrently: a adds "blue" and re-adds "green" under "tags".
    let blue = add(&a, R2, "blue");
    a.join(&blue);
    let green = add(&a, R1, "green");
    a.join(&green);
    let (x, y) = (joined(&a, &rm), joined(&b, &joined(&blue, &green)));
    assert_eq!(x, y);
    assert_eq!(tags_of(&x, "tags"), Some(vec!["blue".to_string(), "green".to_string()]));
    // "red", observed by the remover and not re-added, is gone; the other
    // key is untouched.
    assert_eq!(tags_of(&x, "other"), Some(vec!["x".to_string()]));
    // A remove that observed everything removes the key for good.
    let rm2 = x.remove(&k);
    let z = joined(&x, &rm2);
    assert_eq!(tags_of(&z, "tags"), None);
    assert_eq!(z.len(), 1);
}

#[test]
fn value_map_field_update_concurrent_with_field_removal() {
    let counter = Field::new("n", FieldKind::Counter);
    let reg = Field::new("r", FieldKind::Register);
    let mut a = None;
    apply(
        &mut a,
        map_apply("n", FieldKind::Counter, Op::CounterAdd(5)),
        stamp(R1, 1),
    );
    apply(
        &mut a,
        map_apply("r", FieldKind::Register, Op::MvSet(b("v1"))),
        stamp(R1, 1),
    );
    let mut b_ = a.clone();
    let rm_n = apply(&mut b_, Op::MapRemove(counter.clone()), stamp(R2, 2));
    let rm_r = apply(&mut b_, Op::MapRemove(reg.clone()), stamp(R2, 2));
    let inc = apply(
        &mut a,
        map_apply("n", FieldKind::Counter, Op::CounterAdd(2)),
        stamp(R1, 3),
    );
    let mut x = a.clone().unwrap();
    x.join(&rm_n);
    x.join(&rm_r);
    let mut y = b_.clone().unwrap();
    y.join(&inc);
    assert_eq!(x, y);
    let ValueView::Map(m) = x.view() else {
        panic!("not a map: {x:?}")
    };
    // The counter field survives with the incrementing replica's running
    // total (5 + 2) under its unseen dot; the register, removed without a
    // concurrent update, is gone.
    assert_eq!(m.get(&counter), Some(&NestedView::Counter(7)));
    assert!(!m.contains_key(&reg));
    assert!(x.is_well_formed());
}

// ------------------------------------------------------------------ Value

#[test]
fn value_op_of_the_wrong_type_is_refused_without_effect() {
    let mut v = None;
    apply(&mut v, Op::CounterAdd(3), stamp(R1, 1));
    let before = v.clone();
    let cur = v.as_ref().unwrap();
    let r = Value::apply(Some(cur), &Op::SetAdd(vec![b("x")]), stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::TypeMismatch {
            expected: Kind::Counter,
            found: Kind::Set
        })
    );
    let r = Value::apply(Some(cur), &Op::LwwSet(b("x")), stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::TypeMismatch {
            expected: Kind::Counter,
            found: Kind::Lww
        })
    );
    let r = Value::apply(Some(cur), &Op::GCounterInc(1), stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::TypeMismatch {
            expected: Kind::Counter,
            found: Kind::GCounter
        })
    );
    assert_eq!(v, before);
    assert_eq!(v.unwrap().view(), ValueView::Counter(3));

    // A map field addressed with an op of another kind.
    let mut m = None;
    apply(
        &mut m,
        map_apply("f", FieldKind::Set, Op::SetAdd(vec![b("a")])),
        stamp(R1, 1),
    );
    let r = Value::apply(
        m.as_ref(),
        &map_apply("f", FieldKind::Set, Op::CounterAdd(1)),
        stamp(R1, 2),
    );
    assert_eq!(
        r,
        Err(Error::FieldTypeMismatch {
            field: "f".into(),
            expected: FieldKind::Set,
            found: FieldKind::Counter
        })
    );
    // An op that no map field supports.
    let r = Value::apply(
        m.as_ref(),
        &map_apply("f", FieldKind::Set, Op::LwwSet(b("a"))),
        stamp(R1, 2),
    );
    assert!(matches!(r, Err(Error::InvalidOp(_))), "{r:?}");
}

#[test]
fn value_delete_of_a_grow_only_counter_is_unsupported() {
    let mut g = None;
    apply(&mut g, Op::GCounterInc(4), stamp(R1, 1));
    let r = Value::apply(g.as_ref(), &Op::Delete, stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::Unsupported {
            op: "delete",
            kind: Kind::GCounter
        })
    );
    let mut p = None;
    apply(&mut p, Op::PnCounterAdd(-4), stamp(R1, 1));
    let r = Value::apply(p.as_ref(), &Op::Delete, stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::Unsupported {
            op: "delete",
            kind: Kind::PnCounter
        })
    );
    // Deleting a key that does not exist.
    assert_eq!(Value::apply(None, &Op::Delete, stamp(R1, 2)), Err(Error::NotFound));
}

#[test]
fn value_concurrent_creation_with_different_kinds_is_a_conflict() {
    let (mut a, mut c) = (None, None);
    let da = apply(&mut a, Op::CounterAdd(2), stamp(R1, 1));
    let dc = apply(&mut c, Op::SetAdd(vec![b("s")]), stamp(R2, 1));
    let mut x = a.unwrap();
    x.join(&dc);
    let mut y = c.unwrap();
    y.join(&da);
    assert_eq!(x, y);
    assert_eq!(x.kind(), None);
    assert_eq!(
        x.view(),
        ValueView::Conflict(vec![ValueView::Counter(2), ValueView::Set(vec![b("s")])])
    );
    assert!(x.is_well_formed());
    // An op applies to the part of its kind.
    let mut v = Some(x);
    apply(&mut v, Op::CounterAdd(5), stamp(R1, 2));
    apply(&mut v, Op::SetAdd(vec![b("t")]), stamp(R1, 2));
    assert_eq!(
        v.as_ref().unwrap().view(),
        ValueView::Conflict(vec![ValueView::Counter(7), ValueView::Set(vec![b("s"), b("t")])])
    );
    // A delete clears every part.
    apply(&mut v, Op::Delete, stamp(R1, 3));
    let v = v.unwrap();
    assert!(v.is_empty());
    assert_eq!(
        v.view(),
        ValueView::Conflict(vec![ValueView::Counter(0), ValueView::Set(vec![])])
    );
}

#[test]
fn value_delete_of_a_conflict_of_undeletable_counters_is_unsupported() {
    let (mut a, mut c) = (None, None);
    let dg = apply(&mut a, Op::GCounterInc(1), stamp(R1, 1));
    apply(&mut c, Op::PnCounterAdd(1), stamp(R2, 1));
    let mut v = c.unwrap();
    v.join(&dg);
    assert_eq!(
        v.view(),
        ValueView::Conflict(vec![ValueView::Counter(1), ValueView::Counter(1)])
    );
    // There is nothing to delete: an error, not an empty (malformed) delta.
    let r = Value::apply(Some(&v), &Op::Delete, stamp(R1, 2));
    assert_eq!(
        r,
        Err(Error::Unsupported {
            op: "delete",
            kind: Kind::GCounter
        })
    );
    // With a deletable part, only that part is cleared.
    let ds = Value::apply(None, &Op::SetAdd(vec![b("s")]), stamp(R3, 1)).unwrap();
    v.join(&ds);
    let d = Value::apply(Some(&v), &Op::Delete, stamp(R1, 2)).unwrap();
    assert!(d.is_well_formed());
    v.join(&d);
    assert_eq!(
        v.view(),
        ValueView::Conflict(vec![
            ValueView::Counter(1),
            ValueView::Counter(1),
            ValueView::Set(vec![])
        ])
    );
}

#[test]
fn value_map_field_identity_includes_its_kind() {
    let (mut a, mut c) = (None, None);
    let da = apply(
        &mut a,
        map_apply("x", FieldKind::Counter, Op::CounterAdd(1)),
        stamp(R1, 1),
    );
    let dc = apply(
        &mut c,
        map_apply("x", FieldKind::Set, Op::SetAdd(vec![b("e")])),
        stamp(R2, 1),
    );
    let mut v = a.unwrap();
    v.join(&dc);
    let ValueView::Map(m) = v.view() else {
        panic!("not a map")
    };
    let want: BTreeMap<Field, NestedView> = [
        (Field::new("x", FieldKind::Counter), NestedView::Counter(1)),
        (Field::new("x", FieldKind::Set), NestedView::Set(vec![b("e")])),
    ]
    .into_iter()
    .collect();
    assert_eq!(m, want);
    let mut w = c.unwrap();
    w.join(&da);
    assert_eq!(v, w);
}

/// `levels` nested `MapApply`s (`levels` map levels, the top one
/// included) around a counter increment at the innermost level.
fn deep_op(levels: usize) -> Op {
    let mut op = map_apply("leaf", FieldKind::Counter, Op::CounterAdd(1));
    for i in (1..levels).rev() {
        op = map_apply(&format!("m{i}"), FieldKind::Map, op);
    }
    op
}

#[test]
fn value_map_nesting_is_bounded() {
    // The deepest accepted nesting: MAX_NESTING - 1 map levels.
    let ok = MAX_NESTING - 1;
    let d = Value::apply(None, &deep_op(ok), stamp(R1, 1)).unwrap();
    assert_eq!(d.depth(), ok);
    assert!(d.is_well_formed());
    // One level more is refused, on a fresh key and on an existing map.
    for levels in [MAX_NESTING, MAX_NESTING + 1, 3 * MAX_NESTING] {
        let r = Value::apply(None, &deep_op(levels), stamp(R1, 1));
        assert_eq!(r, Err(Error::NestingTooDeep { limit: MAX_NESTING }), "{levels} levels");
        let r = Value::apply(Some(&d), &deep_op(levels), stamp(R1, 2));
        assert_eq!(r, Err(Error::NestingTooDeep { limit: MAX_NESTING }), "{levels} levels");
    }
    // Updating the deepest accepted level still works.
    let mut v = d.clone();
    let d2 = Value::apply(Some(&v), &deep_op(ok), stamp(R1, 2)).unwrap();
    v.join(&d2);
    assert_eq!(v.depth(), ok);
    let mut view = v.view();
    for i in 1..ok {
        let ValueView::Map(m) = view else {
            panic!("level {i} is not a map")
        };
        let inner = m.get(&Field::new(format!("m{i}"), FieldKind::Map)).cloned().unwrap();
        view = match inner {
            NestedView::Map(m) => ValueView::Map(m),
            other => panic!("level {i}: {other:?}"),
        };
    }
    let ValueView::Map(m) = view else {
        panic!("innermost is not a map")
    };
    assert_eq!(
        m.get(&Field::new("leaf", FieldKind::Counter)),
        Some(&NestedView::Counter(2))
    );
}

#[test]
fn value_lww_delete_writes_a_tombstone_that_a_later_write_overrides() {
    let mut v = None;
    apply(&mut v, Op::LwwSet(b("a")), stamp(R1, 10));
    let del = apply(&mut v, Op::Delete, stamp(R2, 5)); // clock behind: still wins locally
    assert!(v.as_ref().unwrap().is_empty());
    assert_eq!(v.as_ref().unwrap().view(), ValueView::Register(None));
    // A concurrent write with a higher stamp beats the tombstone.
    let mut w = None;
    let late = apply(&mut w, Op::LwwSet(b("b")), stamp(R1, 1000));
    let mut x = v.clone().unwrap();
    x.join(&late);
    let mut y = w.unwrap();
    y.join(&del);
    assert_eq!(x, y);
    assert_eq!(x.view(), ValueView::Register(Some(b("b"))));
}

// -------------------------------------------------------------------- Hlc

#[test]
fn hlc_rejects_remote_timestamps_beyond_its_bound() {
    let mut hlc = Hlc::new(1_000);
    let t0 = hlc.now(5_000);
    // Exactly at the bound: accepted, and the clock moves past it.
    let at = HlcTimestamp {
        wall_ms: 6_000,
        logical: 7,
    };
    let t1 = hlc.observe(5_000, at).unwrap();
    assert!(t1 > at && t1 > t0);
    // One millisecond beyond: refused, and the clock is unchanged.
    let beyond = HlcTimestamp {
        wall_ms: 6_001,
        logical: 0,
    };
    assert_eq!(
        hlc.observe(5_000, beyond),
        Err(ClockError::TooFarAhead {
            remote_ms: 6_001,
            ahead_ms: 1_001,
            limit_ms: 1_000
        })
    );
    assert_eq!(hlc.last(), t1);
    // Far beyond (and the maximum representable time) as well.
    assert!(hlc
        .observe(
            5_000,
            HlcTimestamp {
                wall_ms: u64::MAX,
                logical: u32::MAX
            }
        )
        .is_err());
    assert_eq!(hlc.last(), t1);
    // The error converts into the crate's error.
    let e: Error = hlc.observe(0, beyond).unwrap_err().into();
    assert!(matches!(e, Error::Clock(ClockError::TooFarAhead { .. })));
    // Once local time catches up, the same timestamp is accepted.
    assert!(hlc.observe(5_001, beyond).unwrap() > beyond);
}

#[test]
fn hlc_is_monotonic_when_wall_time_goes_backwards() {
    let mut hlc = Hlc::new(10);
    let a = hlc.now(100);
    let b = hlc.now(90);
    let c = hlc
        .observe(
            80,
            HlcTimestamp {
                wall_ms: 85,
                logical: 9,
            },
        )
        .unwrap();
    assert!(a < b && b < c);
    assert_eq!(c.wall_ms, 100);
    let max = HlcTimestamp {
        wall_ms: 7,
        logical: u32::MAX,
    };
    assert_eq!(max.successor(), t(8));
}
