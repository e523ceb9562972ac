//! Times the core of large set operations (issue 14): one `SetAdd` of n
//! elements, into an empty set and into a set that already holds n; a
//! `SetRemove` of n; a set add nested in a map; and the merge of two remote
//! n-element sets. Prints milliseconds per step.
//!
//! ```sh
//! cargo run --release -p lattice-core --example bench_large_ops            # n = 100,000
//! cargo run --release -p lattice-core --example bench_large_ops -- 20000   # another n
//! ```
//!
//! This is the driver side of the engine, so it reads the clock itself.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

use lattice_core::clock::{HlcTimestamp, ReplicaId};
use lattice_core::crdt::{Bytes, Crdt, Field, FieldKind, Kind, Op, Value, WriteStamp};
use lattice_core::proto::to_bytes;
use std::time::Instant;

fn stamp(r: u64) -> WriteStamp {
    WriteStamp {
        replica: ReplicaId(r),
        time: HlcTimestamp::default(),
    }
}

fn elems(prefix: char, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("{prefix}{i:07}").as_str()))
        .collect()
}

/// Runs `f` once and returns its result and the wall time in milliseconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1e3)
}

fn row(what: &str, steps: &[(&str, f64)]) {
    let total: f64 = steps.iter().map(|(_, ms)| ms).sum();
    let parts: Vec<String> = steps.iter().map(|(s, ms)| format!("{s} {ms:.1}")).collect();
    println!("{what:<40} {total:>9.1} ms   ({})", parts.join(", "));
}

/// What a local write does in the core: the delta, then the new state.
fn write(current: Option<&Value>, op: &Op, r: u64) -> (Value, Value, f64, f64) {
    let (delta, apply_ms) = timed(|| Value::apply(current, op, stamp(r)).unwrap());
    let (next, join_ms) = timed(|| {
        let mut next = current.cloned().unwrap_or_else(|| Value::empty(op.kind().unwrap()));
        next.join(&delta);
        next
    });
    (delta, next, apply_ms, join_ms)
}

fn main() {
    let n: usize = std::env::args().nth(1).map_or(100_000, |s| s.parse().unwrap());
    println!("n = {n}");

    let (_, one, apply_ms, join_ms) = write(None, &Op::SetAdd(elems('e', n)), 1);
    let (bytes, enc_ms) = timed(|| to_bytes(&one).unwrap().len());
    row(
        "sadd n into an empty set",
        &[("apply", apply_ms), ("join", join_ms), ("encode", enc_ms)],
    );
    println!("{:<40} {bytes} bytes encoded", "");

    let (_, two, apply_ms, join_ms) = write(Some(&one), &Op::SetAdd(elems('f', n)), 1);
    row("sadd n into a set of n", &[("apply", apply_ms), ("join", join_ms)]);

    let (_, readd, apply_ms, join_ms) = write(Some(&one), &Op::SetAdd(elems('e', n)), 1);
    row("sadd the n present (re-add)", &[("apply", apply_ms), ("join", join_ms)]);
    assert_eq!(readd.view(), one.view());

    let (_, left, apply_ms, join_ms) = write(Some(&two), &Op::SetRemove(elems('e', n)), 1);
    row("srem n from a set of 2n", &[("apply", apply_ms), ("join", join_ms)]);
    assert_eq!(left.view(), one_view_of('f', n));

    // Every other element: the removed dots do not compact into one range.
    let odd: Vec<Bytes> = elems('e', n).into_iter().step_by(2).collect();
    let (_, _, apply_ms, join_ms) = write(Some(&one), &Op::SetRemove(odd), 1);
    row("srem every other of n", &[("apply", apply_ms), ("join", join_ms)]);

    let field = Field::new("tags", FieldKind::Set);
    let map_add = |prefix| Op::MapApply {
        field: field.clone(),
        op: Box::new(Op::SetAdd(elems(prefix, n))),
    };
    let (_, map1, apply_ms, join_ms) = write(None, &map_add('e'), 1);
    row(
        "map field sadd n into an empty map",
        &[("apply", apply_ms), ("join", join_ms)],
    );
    let (_, _, apply_ms, join_ms) = write(Some(&map1), &map_add('f'), 1);
    row(
        "map field sadd n into a field of n",
        &[("apply", apply_ms), ("join", join_ms)],
    );

    // Two replicas each add n elements, half of them the same.
    let (_, a, _, _) = write(None, &Op::SetAdd(elems('e', n)), 1);
    let mut b_elems = elems('e', n / 2);
    b_elems.extend(elems('g', n - n / 2));
    let (_, b, _, _) = write(None, &Op::SetAdd(b_elems), 2);
    let (novel, novel_ms) = timed(|| a.novel(&b).unwrap());
    let (merged, njoin_ms) = timed(|| {
        let mut m = a.clone();
        m.join(&novel);
        m
    });
    row("remote merge: novel + join", &[("novel", novel_ms), ("join", njoin_ms)]);
    let (direct, join_ms) = timed(|| {
        let mut m = a.clone();
        m.join(&b);
        m
    });
    row("remote merge: join of full states", &[("join", join_ms)]);
    assert_eq!(merged, direct);
    let (_, none_ms) = timed(|| assert!(merged.novel(&b).is_none()));
    row("remote merge: novel of a seen state", &[("novel", none_ms)]);

    // A remote state that removed every other element, whose dots run
    // opposite to the element order (added last to first).
    let mut rev = elems('r', n);
    rev.reverse();
    let (_, a, _, _) = write(None, &Op::SetAdd(rev.clone()), 1);
    let odd: Vec<Bytes> = rev.into_iter().step_by(2).collect();
    let (_, b, _, _) = write(Some(&a), &Op::SetRemove(odd), 2);
    let (novel, novel_ms) = timed(|| a.novel(&b).unwrap());
    let (_, njoin_ms) = timed(|| {
        let mut m = a.clone();
        m.join(&novel);
        assert_eq!(m, b);
    });
    row(
        "remote merge: n/2 scattered removals",
        &[("novel", novel_ms), ("join", njoin_ms)],
    );
}

fn one_view_of(prefix: char, n: usize) -> lattice_core::crdt::ValueView {
    let mut v = Value::empty(Kind::Set);
    v.join(&Value::apply(None, &Op::SetAdd(elems(prefix, n)), stamp(9)).unwrap());
    v.view()
}
