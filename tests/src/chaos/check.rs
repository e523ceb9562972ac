//! The checker: what a history and the final values must satisfy.

use super::history::{History, Seen, Write, WriteOp};
use lattice_core::crdt::ValueView;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// A register write acknowledged this long before another acknowledged
/// write to the same key was sent carries an older hybrid-logical-clock
/// stamp on every node (all nodes read one wall clock here), so it cannot be
/// the final value. The margin covers the clock's millisecond granularity
/// and the node's reading of it before answering.
pub const LWW_MARGIN: Duration = Duration::from_millis(100);

/// What the checker found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Node `node` holds another value than node 0.
    Diverged {
        /// The key.
        key: String,
        /// The node that differs.
        node: usize,
        /// Its value.
        got: String,
        /// Node 0's.
        first: String,
    },
    /// A key holds another kind than was written.
    WrongKind {
        /// The key.
        key: String,
        /// What it holds.
        seen: String,
    },
    /// A counter is below its acknowledged increments (less excused losses).
    LostIncrement {
        /// The counter.
        key: String,
        /// Its value.
        value: i128,
        /// The least it may hold.
        min: i128,
    },
    /// A counter is above every increment issued.
    UnissuedIncrement {
        /// The counter.
        key: String,
        /// Its value.
        value: i128,
        /// The most it may hold.
        max: i128,
    },
    /// An acknowledged add is missing, no remove of it was issued, and no
    /// crash excuses it.
    LostElement {
        /// The add.
        add: Write,
        /// Kills of its node, ms.
        kills: Vec<u128>,
    },
    /// A set holds an element no add issued.
    UnissuedElement {
        /// The set.
        key: String,
        /// The element.
        elem: String,
    },
    /// A register is empty though a write that cannot be lost was acknowledged.
    LostRegister {
        /// The acknowledged write.
        write: Write,
    },
    /// A register holds a value no write issued.
    UnwrittenValue {
        /// The register.
        key: String,
        /// The value.
        value: String,
    },
    /// A register holds the value of a write that a later acknowledged write
    /// (sent at least [`LWW_MARGIN`] after it was acknowledged) supersedes.
    Superseded {
        /// The write whose value the register holds.
        held: Write,
        /// The later acknowledged write.
        later: Write,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Diverged { key, node, got, first } => {
                write!(f, "replicas differ on {key}: node {node} holds {got}, node 0 {first}")
            }
            Violation::WrongKind { key, seen } => write!(f, "{key} holds another kind: {seen}"),
            Violation::LostIncrement { key, value, min } => write!(
                f,
                "lost acknowledged increment: {key} = {value}, acknowledged increments that no crash excuses sum to {min}"
            ),
            Violation::UnissuedIncrement { key, value, max } => write!(
                f,
                "increment never issued: {key} = {value}, but all increments issued (acknowledged or unknown) sum to {max}"
            ),
            Violation::LostElement { add, kills } => {
                write!(f, "lost acknowledged add: {add}; kills of its node (ms): {kills:?}")
            }
            Violation::UnissuedElement { key, elem } => {
                write!(f, "{key} holds {elem:?}, which no add issued")
            }
            Violation::LostRegister { write } => {
                write!(f, "register empty after an acknowledged write: {write}")
            }
            Violation::UnwrittenValue { key, value } => {
                write!(f, "{key} holds {value:?}, which no write issued")
            }
            Violation::Superseded { held, later } => write!(
                f,
                "register holds a superseded value: {held}; later write: {later}"
            ),
        }
    }
}

/// Checks a run: `finals[i]` is every key as node `i` read it after the heal
/// (keys a node lacks read as absent). Returns every violation found.
pub fn check(history: &History, finals: &[BTreeMap<String, ValueView>]) -> Vec<Violation> {
    let mut out = Vec::new();
    let Some(first) = finals.first() else {
        return out;
    };
    let mut keys: BTreeSet<&str> = finals.iter().flat_map(|f| f.keys().map(String::as_str)).collect();
    keys.extend(history.writes.iter().map(|w| w.op.key()));
    for &key in &keys {
        for (node, f) in finals.iter().enumerate().skip(1) {
            if f.get(key) != first.get(key) {
                out.push(Violation::Diverged {
                    key: key.to_string(),
                    node,
                    got: format!("{:?}", Seen::decode(f.get(key))),
                    first: format!("{:?}", Seen::decode(first.get(key))),
                });
            }
        }
    }
    // The replicas agree (or that is reported): judge node 0's values.
    let mut by_key: BTreeMap<&str, Vec<&Write>> = BTreeMap::new();
    for w in &history.writes {
        by_key.entry(w.op.key()).or_default().push(w);
    }
    for (key, writes) in by_key {
        let seen = Seen::decode(first.get(key));
        match writes[0].op {
            WriteOp::Incr { .. } => check_counter(history, key, &writes, &seen, &mut out),
            WriteOp::Add { .. } | WriteOp::Remove { .. } => check_set(history, key, &writes, &seen, &mut out),
            WriteOp::Set { .. } => check_register(history, key, &writes, &seen, &mut out),
        }
    }
    out
}

/// What the crashes of a run visibly lost, within what [`check`] excuses:
/// acknowledged adds that are absent though no remove named them, and how
/// far counters fall short of their acknowledged increments. For the run's
/// summary: it shows whether the loss window was used, not just allowed.
pub fn excused_losses(history: &History, values: &BTreeMap<String, ValueView>) -> (usize, i128) {
    let removed: BTreeSet<(&str, &str)> = history
        .writes
        .iter()
        .filter_map(|w| match &w.op {
            WriteOp::Remove { key, elem } => Some((key.as_str(), elem.as_str())),
            _ => None,
        })
        .collect();
    let mut adds = 0;
    let mut acked_sums: BTreeMap<&str, i128> = BTreeMap::new();
    for w in history.writes.iter().filter(|w| w.acked().is_some()) {
        match &w.op {
            WriteOp::Incr { key, by } => *acked_sums.entry(key).or_default() += i128::from(*by),
            WriteOp::Add { key, elem } if !removed.contains(&(key.as_str(), elem.as_str())) => {
                let present = matches!(Seen::decode(values.get(key)), Seen::Set(s) if s.contains(elem));
                adds += usize::from(!present);
            }
            _ => {}
        }
    }
    let shortfall = acked_sums
        .into_iter()
        .map(|(key, sum)| match Seen::decode(values.get(key)) {
            Seen::Counter(n) => (sum - n).max(0),
            _ => sum,
        })
        .sum();
    (adds, shortfall)
}

fn wrong_kind(key: &str, seen: &Seen) -> Violation {
    Violation::WrongKind {
        key: key.to_string(),
        seen: format!("{seen:?}"),
    }
}

fn check_counter(h: &History, key: &str, writes: &[&Write], seen: &Seen, out: &mut Vec<Violation>) {
    let value = match seen {
        Seen::Absent => 0,
        Seen::Counter(n) => *n,
        other => return out.push(wrong_kind(key, other)),
    };
    let (mut min, mut max) = (0i128, 0i128);
    for w in writes {
        let WriteOp::Incr { by, .. } = w.op else {
            return out.push(wrong_kind(key, seen));
        };
        max += i128::from(by);
        if w.acked().is_some() && !h.may_be_lost(w) {
            min += i128::from(by);
        }
    }
    let key = key.to_string();
    if value < min {
        out.push(Violation::LostIncrement { key, value, min });
    } else if value > max {
        out.push(Violation::UnissuedIncrement { key, value, max });
    }
}

fn check_set(h: &History, key: &str, writes: &[&Write], seen: &Seen, out: &mut Vec<Violation>) {
    let empty = BTreeSet::new();
    let present = match seen {
        Seen::Absent => &empty,
        Seen::Set(s) => s,
        other => return out.push(wrong_kind(key, other)),
    };
    let (mut added, mut removed) = (BTreeSet::new(), BTreeSet::new());
    for w in writes {
        match &w.op {
            WriteOp::Add { elem, .. } => added.insert(elem.as_str()),
            WriteOp::Remove { elem, .. } => removed.insert(elem.as_str()),
            _ => return out.push(wrong_kind(key, seen)),
        };
    }
    for elem in present {
        if !added.contains(elem.as_str()) {
            out.push(Violation::UnissuedElement {
                key: key.to_string(),
                elem: elem.clone(),
            });
        }
    }
    for w in writes {
        if let WriteOp::Add { elem, .. } = &w.op {
            if w.acked().is_some() && !removed.contains(elem.as_str()) && !present.contains(elem) && !h.may_be_lost(w) {
                out.push(Violation::LostElement {
                    add: (*w).clone(),
                    kills: h.kills_of(w.node),
                });
            }
        }
    }
}

fn check_register(h: &History, key: &str, writes: &[&Write], seen: &Seen, out: &mut Vec<Violation>) {
    let held = match seen {
        Seen::Absent | Seen::Register(None) => None,
        Seen::Register(Some(v)) => Some(v),
        other => return out.push(wrong_kind(key, other)),
    };
    let value_of = |w: &Write| match &w.op {
        WriteOp::Set { value, .. } => Some(value.clone()),
        _ => None,
    };
    if writes.iter().any(|w| value_of(w).is_none()) {
        return out.push(wrong_kind(key, seen));
    }
    // Acknowledged writes that no crash may undo.
    let durable: Vec<&Write> = writes
        .iter()
        .copied()
        .filter(|w| w.acked().is_some() && !h.may_be_lost(w))
        .collect();
    let Some(value) = held else {
        if let Some(w) = durable.first() {
            out.push(Violation::LostRegister { write: (*w).clone() });
        }
        return;
    };
    let Some(writer) = writes.iter().find(|w| value_of(w).as_ref() == Some(value)) else {
        return out.push(Violation::UnwrittenValue {
            key: key.to_string(),
            value: value.clone(),
        });
    };
    if let Some(acked) = writer.acked() {
        if let Some(later) = durable.iter().find(|l| l.sent > acked + LWW_MARGIN) {
            out.push(Violation::Superseded {
                held: (*writer).clone(),
                later: (*later).clone(),
            });
        }
    }
}
