//! Fabricated histories: the checker accepts a sound one and reports each
//! kind of violation.

#![allow(clippy::unwrap_used)]

use super::*;
use lattice_core::crdt::{Bytes, ValueView};
use std::collections::BTreeMap;
use std::time::Duration;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn enc(s: &str) -> Bytes {
    Bytes(rmp_serde::to_vec(s).unwrap())
}

fn acked(node: usize, sent: u64, at: u64, op: WriteOp) -> Write {
    Write {
        client: node,
        node,
        sent: ms(sent),
        op,
        outcome: Outcome::Acked { at: ms(at) },
    }
}

fn unknown(node: usize, sent: u64, op: WriteOp) -> Write {
    Write {
        client: node,
        node,
        sent: ms(sent),
        op,
        outcome: Outcome::Unknown {
            error: "timed out".into(),
        },
    }
}

fn incr(key: &str, by: u64) -> WriteOp {
    WriteOp::Incr { key: key.into(), by }
}

fn add(key: &str, elem: &str) -> WriteOp {
    WriteOp::Add {
        key: key.into(),
        elem: elem.into(),
    }
}

fn remove(key: &str, elem: &str) -> WriteOp {
    WriteOp::Remove {
        key: key.into(),
        elem: elem.into(),
    }
}

fn set(key: &str, value: &str) -> WriteOp {
    WriteOp::Set {
        key: key.into(),
        value: value.into(),
    }
}

/// Three nodes holding the same values.
fn everywhere(values: &[(&str, ValueView)]) -> Vec<BTreeMap<String, ValueView>> {
    let one: BTreeMap<String, ValueView> = values.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    vec![one.clone(), one.clone(), one]
}

/// A history every check accepts, and the final state that goes with it.
fn sound() -> (History, Vec<(&'static str, ValueView)>) {
    let h = History {
        writes: vec![
            acked(0, 0, 5, incr("c", 2)),
            acked(1, 1, 6, incr("c", 3)),
            unknown(2, 2, incr("c", 4)),
            acked(0, 10, 12, add("s", "a")),
            acked(1, 11, 13, add("s", "b")),
            unknown(2, 12, add("s", "u")),
            acked(2, 20, 25, remove("s", "b")),
            acked(0, 30, 31, set("r", "x")),
            unknown(1, 500, set("r", "y")),
        ],
        kills: vec![],
        loss_window: None,
    };
    let values = vec![
        ("c", ValueView::Counter(5)),
        ("s", ValueView::Set(vec![enc("a"), enc("u")])),
        ("r", ValueView::Register(Some(enc("y")))),
    ];
    (h, values)
}

#[test]
fn chaos_checker_accepts_a_sound_history() {
    let (h, values) = sound();
    assert_eq!(check(&h, &everywhere(&values)), vec![]);
    // An unknown increment may be present too.
    let mut more = values.clone();
    more[0].1 = ValueView::Counter(9);
    assert_eq!(check(&h, &everywhere(&more)), vec![]);
}

#[test]
fn chaos_checker_reports_a_lost_acknowledged_increment() {
    let (h, mut values) = sound();
    values[0].1 = ValueView::Counter(3); // 2 + 3 were acknowledged
    let v = check(&h, &everywhere(&values));
    assert_eq!(
        v,
        vec![Violation::LostIncrement {
            key: "c".into(),
            value: 3,
            min: 5
        }]
    );
}

#[test]
fn chaos_checker_reports_an_increment_never_issued() {
    let (h, mut values) = sound();
    values[0].1 = ValueView::Counter(10); // at most 2 + 3 + 4
    let v = check(&h, &everywhere(&values));
    assert_eq!(
        v,
        vec![Violation::UnissuedIncrement {
            key: "c".into(),
            value: 10,
            max: 9
        }]
    );
}

#[test]
fn chaos_checker_reports_a_register_holding_an_unwritten_value() {
    let (h, mut values) = sound();
    values[2].1 = ValueView::Register(Some(enc("never")));
    let v = check(&h, &everywhere(&values));
    assert_eq!(
        v,
        vec![Violation::UnwrittenValue {
            key: "r".into(),
            value: "never".into()
        }]
    );
}

#[test]
fn chaos_checker_reports_all_three_at_once() {
    let (h, mut values) = sound();
    values[0].1 = ValueView::Counter(1);
    values[2].1 = ValueView::Register(Some(enc("never")));
    let mut more = h.clone();
    more.writes.push(acked(0, 40, 41, incr("d", 1)));
    values.push(("d", ValueView::Counter(2)));
    let v = check(&more, &everywhere(&values));
    assert_eq!(v.len(), 3, "{v:?}");
    assert!(matches!(v[0], Violation::LostIncrement { .. }), "{v:?}");
    assert!(matches!(v[1], Violation::UnissuedIncrement { .. }), "{v:?}");
    assert!(matches!(v[2], Violation::UnwrittenValue { .. }), "{v:?}");
}

#[test]
fn chaos_checker_reports_set_and_register_losses_and_divergence() {
    let (h, values) = sound();
    // "a" was acknowledged and never removed; "z" was never added.
    let mut lost = values.clone();
    lost[1].1 = ValueView::Set(vec![enc("z")]);
    let v = check(&h, &everywhere(&lost));
    assert!(
        matches!(&v[0], Violation::UnissuedElement { elem, .. } if elem == "z"),
        "{v:?}"
    );
    assert!(
        matches!(&v[1], Violation::LostElement { add, .. } if add.op == add_op("a")),
        "{v:?}"
    );
    assert_eq!(v.len(), 2, "{v:?}");
    // An empty register after an acknowledged write.
    let mut empty = values.clone();
    empty[2].1 = ValueView::Register(None);
    assert!(matches!(
        check(&h, &everywhere(&empty))[..],
        [Violation::LostRegister { .. }]
    ));
    // One node differs.
    let mut finals = everywhere(&values);
    finals[2].insert("c".into(), ValueView::Counter(6));
    assert!(matches!(&check(&h, &finals)[..], [Violation::Diverged { node: 2, .. }]));
}

fn add_op(e: &str) -> WriteOp {
    add("s", e)
}

#[test]
fn chaos_checker_reports_a_superseded_register_value() {
    let h = History {
        writes: vec![acked(0, 0, 5, set("r", "old")), acked(1, 200, 210, set("r", "new"))],
        kills: vec![],
        loss_window: None,
    };
    let v = check(&h, &everywhere(&[("r", ValueView::Register(Some(enc("old"))))]));
    assert!(matches!(v[..], [Violation::Superseded { .. }]), "{v:?}");
    // Written close together, either may win.
    let close = History {
        writes: vec![acked(0, 0, 5, set("r", "old")), acked(1, 50, 60, set("r", "new"))],
        ..h
    };
    assert_eq!(
        check(&close, &everywhere(&[("r", ValueView::Register(Some(enc("old"))))])),
        vec![]
    );
}

#[test]
fn chaos_checker_excuses_async_losses_only_inside_the_window() {
    let writes = vec![
        acked(0, 0, 10, incr("c", 1)),          // long before the kill
        acked(0, 4_000, 4_010, incr("c", 10)),  // 1 s before the kill
        acked(1, 4_000, 4_010, incr("c", 100)), // another node
        acked(0, 4_100, 4_110, add("s", "a")),  // 0.9 s before the kill
        acked(0, 4_200, 4_210, set("r", "x")),  // 0.8 s before the kill
    ];
    let kills = vec![(0, ms(5_000))];
    // Everything of node 0 near the kill lost.
    let values = [
        ("c", ValueView::Counter(101)),
        ("s", ValueView::Set(vec![])),
        ("r", ValueView::Register(None)),
    ];
    let asynch = History {
        writes: writes.clone(),
        kills: kills.clone(),
        loss_window: Some(ASYNC_LOSS_WINDOW),
    };
    assert_eq!(check(&asynch, &everywhere(&values)), vec![]);
    // The same losses are violations without a window (sync, group)...
    let durable = History {
        loss_window: None,
        ..asynch.clone()
    };
    assert_eq!(check(&durable, &everywhere(&values)).len(), 3);
    // ...and in async when the kill came later than the window.
    let late = History {
        kills: vec![(0, ms(6_000))],
        ..asynch
    };
    assert_eq!(check(&late, &everywhere(&values)).len(), 3);
    // The increment acknowledged long before the kill is never excused.
    let values = [("c", ValueView::Counter(100))];
    let v = check(
        &History {
            writes: writes[..3].to_vec(),
            kills,
            loss_window: Some(ASYNC_LOSS_WINDOW),
        },
        &everywhere(&values),
    );
    assert!(matches!(v[..], [Violation::LostIncrement { min: 101, .. }]), "{v:?}");
}
