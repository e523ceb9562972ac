//! End-of-run checkers: convergence is checked by the runner; this module
//! checks that no acknowledged write is lost and that values are sane.

use crate::workload::{KeyKind, OpRecord};
use lattice_core::crdt::{Bytes, Op, Value, ValueView};
use lattice_core::Key;
use std::collections::{BTreeMap, BTreeSet};

/// A broken invariant, with enough detail to debug it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which checker.
    pub check: &'static str,
    /// What it saw.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

fn v(check: &'static str, detail: String) -> Violation {
    Violation { check, detail }
}

/// Checks the converged final state against every operation's record.
pub fn no_lost_writes(records: &[OpRecord], final_state: &BTreeMap<Key, Value>) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut by_key: BTreeMap<&Key, Vec<&OpRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.applied) {
        by_key.entry(&r.key).or_default().push(r);
    }
    for (key, recs) in by_key {
        let value = final_state.get(key);
        let kind = recs[0].kind;
        // 1. Every acknowledged write is included in the final state.
        for r in recs.iter().filter(|r| r.acked_at.is_some() && !r.exempt) {
            if !r.visible_in(value) {
                out.push(v(
                    "lost-ack",
                    format!(
                        "op {} ({:?} on {key} at node {}) was acknowledged but is not in the final state",
                        r.id, r.op, r.node
                    ),
                ));
            }
        }
        // 2. Set elements: an acknowledged add never removed is present; an
        //    acknowledged remove (of an element added once, observed by the
        //    remover) is absent.
        let present: BTreeSet<Bytes> = crate::workload::visible_elems(value).into_iter().collect();
        let removed: BTreeSet<Bytes> = recs.iter().flat_map(|r| r.removed_elems()).collect();
        for r in recs.iter().filter(|r| r.acked_at.is_some() && !r.exempt) {
            for e in r.added_elems() {
                if !removed.contains(&e) && !present.contains(&e) {
                    out.push(v(
                        "lost-add",
                        format!(
                            "element {e:?} of op {} on {key} was acknowledged, never removed, and is missing",
                            r.id
                        ),
                    ));
                }
            }
            for e in r.removed_elems() {
                if present.contains(&e) {
                    out.push(v(
                        "lost-remove",
                        format!("element {e:?} removed by acknowledged op {} on {key} is present", r.id),
                    ));
                }
            }
        }
        // 3. Values are ones that were written.
        let written: BTreeSet<Bytes> = recs
            .iter()
            .filter_map(|r| match &r.op {
                Op::LwwSet(b) | Op::MvSet(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        match (kind, value.map(Value::view)) {
            (KeyKind::Counter | KeyKind::GCounter | KeyKind::PnCounter, Some(ValueView::Counter(n))) => {
                let acked: i128 = recs
                    .iter()
                    .filter(|r| r.acked_at.is_some() && !r.exempt)
                    .map(|r| delta(&r.op))
                    .sum();
                let others = recs
                    .iter()
                    .filter(|r| r.acked_at.is_none() || r.exempt)
                    .map(|r| delta(&r.op));
                let (lo, hi) = others.fold(
                    (acked, acked),
                    |(lo, hi), d| if d < 0 { (lo + d, hi) } else { (lo, hi + d) },
                );
                if n < lo || n > hi {
                    out.push(v(
                        "counter",
                        format!("{key} = {n}, acknowledged increments allow only {lo}..={hi}; state {value:?}"),
                    ));
                }
            }
            (KeyKind::Lww, Some(ValueView::Register(val))) => {
                let stamp = value.and_then(Value::lww_stamp);
                let winner = recs.iter().find(|r| r.lww_stamp.is_some() && r.lww_stamp == stamp);
                match winner {
                    None => out.push(v("lww", format!("{key}: final stamp {stamp:?} belongs to no write"))),
                    Some(w) => {
                        let expect = match &w.op {
                            Op::LwwSet(b) => Some(b.clone()),
                            _ => None,
                        };
                        if expect != val {
                            out.push(v(
                                "lww",
                                format!("{key}: final value {val:?} is not that of the winning write {}", w.id),
                            ));
                        }
                    }
                }
            }
            (KeyKind::Mv, Some(ValueView::Values(vals))) => {
                for x in vals {
                    if !written.contains(&x) {
                        out.push(v("mv", format!("{key}: value {x:?} was never written")));
                    }
                }
                // An acknowledged value stays until a write that had seen it
                // (an overwrite or a delete, acknowledged or not) replaced
                // it: a merge never drops a concurrent value.
                let live: Vec<lattice_core::clock::Dot> = match value {
                    Some(Value::MvRegister(r)) => r.causal().store().iter_dots().map(|(d, _)| d).collect(),
                    _ => Vec::new(),
                };
                for r in recs.iter().filter(|r| r.acked_at.is_some() && !r.exempt) {
                    if !matches!(r.op, Op::MvSet(_)) || r.dots.is_empty() {
                        continue;
                    }
                    let replaced = recs
                        .iter()
                        .any(|o| o.id != r.id && o.applied && o.observed.includes(&r.dots));
                    if !replaced && !live.iter().any(|d| r.dots.contains(*d)) {
                        out.push(v(
                            "lost-value",
                            format!(
                                "{key}: the value of acknowledged op {} ({:?} at node {}) is gone, though no write saw it",
                                r.id, r.op, r.node
                            ),
                        ));
                    }
                }
            }
            (_, Some(ValueView::Conflict(_))) => out.push(v(
                "kind",
                format!("{key} became a type conflict although every write was of its kind"),
            )),
            _ => {}
        }
    }
    out
}

fn delta(op: &Op) -> i128 {
    match op {
        Op::CounterAdd(n) | Op::PnCounterAdd(n) => i128::from(*n),
        Op::GCounterInc(n) => i128::from(*n),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::clock::{HlcTimestamp, ReplicaId};
    use lattice_core::crdt::{Crdt, WriteStamp};

    fn stamp(r: u64) -> WriteStamp {
        WriteStamp {
            replica: ReplicaId(r),
            time: HlcTimestamp::default(),
        }
    }

    /// The record of an acknowledged `MvSet` of `v` by replica `r` onto
    /// `before`, and the state after it.
    fn mv_write(id: usize, r: u64, v: &str, before: Option<&Value>) -> (OpRecord, Value) {
        let op = Op::MvSet(v.into());
        let d = Value::apply(before, &op, stamp(r)).unwrap();
        let mut after = before.cloned().unwrap_or_else(|| d.clone());
        after.join(&d);
        let observed = before.map(Value::context).unwrap_or_default();
        let rec = OpRecord {
            id,
            node: r as usize,
            key: Key::new("m0").unwrap(),
            kind: KeyKind::Mv,
            op,
            issued_at: 0,
            applied: true,
            expect_error: false,
            acked_at: Some(1),
            dots: after.context().difference(&observed),
            observed,
            lww_stamp: None,
            counter_entry: None,
            exempt: false,
            seen_by: 0,
            targets: 0,
            policy_version: 0,
            reached_all_at: None,
            batch: (id, 1),
        };
        (rec, after)
    }

    fn lost(recs: &[OpRecord], v: Value) -> Vec<&'static str> {
        let state: BTreeMap<Key, Value> = [(Key::new("m0").unwrap(), v)].into_iter().collect();
        no_lost_writes(recs, &state)
            .into_iter()
            .map(|x| x.check)
            .filter(|c| *c == "lost-value")
            .collect()
    }

    /// The checker can fail: a concurrent value dropped while others
    /// survive is reported, and the same state is legal once a write that
    /// had seen the value replaced it.
    #[test]
    fn a_concurrent_value_dropped_while_another_survives_is_lost() {
        let (a, va) = mv_write(0, 1, "a", None);
        let (b, vb) = mv_write(1, 2, "b", None);
        let (c, vc) = mv_write(2, 3, "c", None);
        let mut all = va.clone();
        all.join(&vb);
        all.join(&vc);
        assert!(lost(&[a.clone(), b.clone(), c.clone()], all).is_empty());
        // c's dot in the context without its value: "seen and gone".
        let mut dropped = va;
        dropped.join(&vb);
        dropped.join(&Value::apply(Some(&vc), &Op::Delete, stamp(3)).unwrap());
        assert_eq!(
            lost(&[a.clone(), b.clone(), c.clone()], dropped.clone()),
            vec!["lost-value"]
        );
        let (mut d, _) = mv_write(3, 4, "d", Some(&vc));
        d.acked_at = None; // replacing counts even unacknowledged
        assert!(lost(&[a, b, c, d], dropped).is_empty());
    }
}
