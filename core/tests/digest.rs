#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Anti-entropy item hashes depend on the value, not on its encoding (issue
//! 13: two encoding changes altered every digest without a protocol version
//! change, so a mixed-version cluster would repair equal states for ever).

use lattice_core::clock::{HlcTimestamp, ReplicaId};
use lattice_core::crdt::{Crdt, Field, FieldKind, Op, Value, WriteStamp};
use lattice_core::proto;
use lattice_core::replica::item_hash;
use lattice_core::Key;

fn stamp(r: u64, ms: u64) -> WriteStamp {
    WriteStamp {
        replica: ReplicaId(r),
        time: HlcTimestamp {
            wall_ms: ms,
            logical: 0,
        },
    }
}

fn apply(v: Option<&Value>, op: Op, r: u64) -> Value {
    let d = Value::apply(v, &op, stamp(r, 1_000 + r)).unwrap();
    match v {
        Some(cur) => {
            let mut n = cur.clone();
            n.join(&d);
            n
        }
        None => d,
    }
}

/// One value of every kind, with some history.
fn samples() -> Vec<(&'static str, Value)> {
    let set = apply(
        Some(&apply(None, Op::SetAdd(vec!["a".into(), "b".into()]), 1)),
        Op::SetRemove(vec!["a".into()]),
        2,
    );
    let map = apply(
        None,
        Op::MapApply {
            field: Field::new("hits", FieldKind::Counter),
            op: Box::new(Op::CounterAdd(3)),
        },
        1,
    );
    let mut conflict = apply(None, Op::CounterAdd(1), 1);
    conflict.join(&apply(None, Op::SetAdd(vec!["x".into()]), 2));
    vec![
        (
            "g",
            apply(Some(&apply(None, Op::GCounterInc(5), 1)), Op::GCounterInc(2), 2),
        ),
        ("p", apply(None, Op::PnCounterAdd(-4), 1)),
        (
            "c",
            apply(Some(&apply(None, Op::CounterAdd(7), 1)), Op::CounterAdd(-2), 2),
        ),
        ("l", apply(None, Op::LwwSet("hello".into()), 1)),
        (
            "v",
            apply(
                Some(&apply(None, Op::MvSet("one".into()), 1)),
                Op::MvSet("two".into()),
                2,
            ),
        ),
        ("s", set),
        ("m", map),
        ("x", conflict),
    ]
}

/// The digests of fixed values, pinned: an encoding change leaves them as
/// they are; a change here is a protocol change (nodes of two versions
/// would disagree on every digest) and must come with a version bump.
#[test]
fn item_hashes_are_pinned() {
    let got: Vec<String> = samples()
        .iter()
        .map(|(k, v)| format!("{k}:{:032x}", item_hash(&Key::new(*k).unwrap(), v).unwrap()))
        .collect();
    let pinned = [
        "g:3300fb507ead6ce50fdb9d77ad26d9b6",
        "p:3a9bc8d41d79ceb9508783d3a0168459",
        "c:510221528288e6202b87416deeff35d4",
        "l:a022bed2ef480146e6c66c9b711a94a7",
        "v:1d5d8d63d079a7ab56c865ecce8d4803",
        "s:78ad54113e6227d51c283feaaebc743c",
        "m:eb4e154090c4f2932574a28d2947d235",
        "x:893cc48621463d010fb1ec940ed82796",
    ];
    assert_eq!(got, pinned);
}

/// Values that decode equal hash equal, whatever bytes carried them: a
/// causal value with its implied context left out and with it written out.
#[test]
fn equal_values_hash_equal_and_different_ones_differ() {
    let all = samples();
    for (k, v) in &all {
        let key = Key::new(*k).unwrap();
        let again: Value = proto::from_bytes(&proto::to_bytes(v).unwrap()).unwrap();
        assert_eq!(item_hash(&key, v).unwrap(), item_hash(&key, &again).unwrap());
    }
    let key = Key::new("k").unwrap();
    let mut hashes: Vec<u128> = all.iter().map(|(_, v)| item_hash(&key, v).unwrap()).collect();
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), all.len(), "distinct values, distinct hashes");
    // Same view, different causal history: different states, different hashes.
    let once = apply(None, Op::SetAdd(vec!["a".into()]), 1);
    let twice = apply(Some(&once), Op::SetAdd(vec!["a".into()]), 1);
    assert_ne!(item_hash(&key, &once).unwrap(), item_hash(&key, &twice).unwrap());
}
