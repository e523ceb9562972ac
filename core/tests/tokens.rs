#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Causal tokens: read-your-writes must hold for every kind of value.

use lattice_core::clock::{HlcTimestamp, ReplicaId};
use lattice_core::crdt::{Crdt, Op, Value, WriteStamp};
use lattice_core::proto::client::CausalToken;

fn stamp(r: u64) -> WriteStamp {
    WriteStamp {
        replica: ReplicaId(r),
        time: HlcTimestamp { wall_ms: 1, logical: 0 },
    }
}

fn apply(v: Option<&Value>, op: Op, r: u64) -> Value {
    let d = Value::apply(v, &op, stamp(r)).unwrap();
    match v {
        Some(cur) => {
            let mut n = cur.clone();
            n.join(&d);
            n
        }
        None => d,
    }
}

/// From the review: the token of a G- or PN-counter was empty, so a read
/// at another node was answered before the write had arrived there.
#[test]
fn a_counter_token_waits_for_the_counted_increments() {
    for op in [Op::GCounterInc(5), Op::PnCounterAdd(-5)] {
        let older = apply(None, op.clone(), 1);
        let newer = apply(Some(&older), op.clone(), 1);
        let token = CausalToken::of(Some(&newer));
        assert!(!token.is_included_in(None), "{op:?}");
        assert!(
            !token.is_included_in(Some(&older)),
            "{op:?}: the second increment is missing"
        );
        assert!(token.is_included_in(Some(&newer)));
        // Another replica's increments do not stand in for ours.
        let elsewhere = apply(Some(&apply(None, op.clone(), 2)), op.clone(), 2);
        assert!(!token.is_included_in(Some(&elsewhere)), "{op:?}");
    }
}

/// From the review: the parts of a `Value::Conflict` number their dots
/// independently, so a set write's dot could look present because the
/// counter part had a dot with the same id.
#[test]
fn a_token_is_checked_part_by_part_in_a_conflict() {
    let set = apply(None, Op::SetAdd(vec!["x".into()]), 1);
    let token = CausalToken::of(Some(&set));
    // The same key written concurrently as a counter by replica 1 (dot r1.1)
    // and as a set by replica 2: the set write of replica 1 is absent.
    let counter = apply(None, Op::CounterAdd(1), 1);
    let other_set = apply(None, Op::SetAdd(vec!["y".into()]), 2);
    let mut conflict = counter.clone();
    conflict.join(&other_set);
    assert!(matches!(conflict, Value::Conflict(_)), "{conflict:?}");
    assert!(!token.is_included_in(Some(&conflict)), "the set write is not there");
    let mut with_it = conflict.clone();
    with_it.join(&set);
    assert!(token.is_included_in(Some(&with_it)));
}

/// Tokens join per kind, and a token of several keys' parts still works.
#[test]
fn joined_tokens_keep_every_part() {
    let a = apply(None, Op::GCounterInc(3), 1);
    let b = apply(None, Op::SetAdd(vec!["x".into()]), 1);
    let mut t = CausalToken::of(Some(&a));
    t.join(&CausalToken::of(Some(&b)));
    let mut both = a.clone();
    both.join(&b);
    assert!(t.is_included_in(Some(&both)));
    assert!(!t.is_included_in(Some(&a)));
    assert!(!t.is_included_in(Some(&b)));
}
