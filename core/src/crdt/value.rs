//! The keyspace value: one enum over every CRDT type, the operations on it,
//! and plain views for reading.

use super::ccounter::{counter_add, counter_value};
use super::mvreg::{clear, mv_write};
use super::ormap::{map_remove, map_update};
use super::orset::{set_add_all, set_remove_all};
use super::{
    Bytes, CCounter, Causal, CounterStore, Crdt, DotFun, DotMap, DotSet, DotStore, GCounter, LwwRegister, MvRegister,
    OrMap, OrSet, PNCounter,
};
use crate::clock::{CausalContext, Dot, HlcTimestamp, ReplicaId};
use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Maps nest less deep than this: a value holds at most `MAX_NESTING - 1`
/// levels of maps (the top-level map is level 1).
pub const MAX_NESTING: usize = 8;

/// The CRDT type of a top-level value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`GCounter`].
    GCounter,
    /// [`PNCounter`].
    PnCounter,
    /// [`CCounter`]: the resettable counter used by `incr`.
    Counter,
    /// [`LwwRegister`] of optional bytes (a delete writes `None`).
    Lww,
    /// [`MvRegister`].
    MvRegister,
    /// [`OrSet`].
    Set,
    /// [`OrMap`] of [`Field`]s.
    Map,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Kind::GCounter => "gcounter",
            Kind::PnCounter => "pncounter",
            Kind::Counter => "counter",
            Kind::Lww => "lww-register",
            Kind::MvRegister => "mv-register",
            Kind::Set => "set",
            Kind::Map => "map",
        };
        f.write_str(s)
    }
}

/// The type of a map field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FieldKind {
    /// A resettable counter.
    Counter,
    /// A multi-value register.
    Register,
    /// An add-wins set.
    Set,
    /// A nested map.
    Map,
}

/// A map field: a name and a type. As in Riak's maps, the type is part of the
/// field's identity, so two replicas that concurrently create `x` as a counter
/// and as a set get two fields rather than a conflict.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Field {
    /// The field name.
    pub name: String,
    /// The field type.
    pub kind: FieldKind,
}

impl Field {
    /// A field named `name` of type `kind`.
    pub fn new(name: impl Into<String>, kind: FieldKind) -> Self {
        Field {
            name: name.into(),
            kind,
        }
    }
}

/// The dot store of a map field: one variant per [`FieldKind`].
///
/// Encoded with one-letter variant tags (rmp-serde writes a variant's name
/// with every value); the long names still decode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Nested {
    /// A counter field.
    #[serde(rename = "c", alias = "Counter")]
    Counter(CounterStore),
    /// A register field.
    #[serde(rename = "r", alias = "Register")]
    Register(DotFun<Bytes>),
    /// A set field.
    #[serde(rename = "s", alias = "Set")]
    Set(DotMap<Bytes, DotSet>),
    /// A map field.
    #[serde(rename = "m", alias = "Map")]
    Map(DotMap<Field, Nested>),
}

impl Nested {
    fn rank(&self) -> u8 {
        match self {
            Nested::Counter(_) => 0,
            Nested::Register(_) => 1,
            Nested::Set(_) => 2,
            Nested::Map(_) => 3,
        }
    }

    fn empty_of(kind: FieldKind) -> Nested {
        match kind {
            FieldKind::Counter => Nested::Counter(DotStore::empty()),
            FieldKind::Register => Nested::Register(DotStore::empty()),
            FieldKind::Set => Nested::Set(DotStore::empty()),
            FieldKind::Map => Nested::Map(DotStore::empty()),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Nested::Map(m) => 1 + m.0.values().map(Nested::depth).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl DotStore for Nested {
    fn empty() -> Self {
        Nested::Register(DotStore::empty())
    }
    fn is_empty(&self) -> bool {
        match self {
            Nested::Counter(s) => s.is_empty(),
            Nested::Register(s) => s.is_empty(),
            Nested::Set(s) => s.is_empty(),
            Nested::Map(s) => s.is_empty(),
        }
    }
    fn for_each_dot(&self, f: &mut dyn FnMut(Dot)) {
        match self {
            Nested::Counter(s) => s.for_each_dot(f),
            Nested::Register(s) => s.for_each_dot(f),
            Nested::Set(s) => s.for_each_dot(f),
            Nested::Map(s) => s.for_each_dot(f),
        }
    }
    fn join(&mut self, ctx: &CausalContext, other: &Self, other_ctx: &CausalContext) {
        match (&mut *self, other) {
            (Nested::Counter(a), Nested::Counter(b)) => a.join(ctx, b, other_ctx),
            (Nested::Register(a), Nested::Register(b)) => a.join(ctx, b, other_ctx),
            (Nested::Set(a), Nested::Set(b)) => a.join(ctx, b, other_ctx),
            (Nested::Map(a), Nested::Map(b)) => a.join(ctx, b, other_ctx),
            // Only a malformed peer sends a field whose store does not match
            // its kind (decoding rejects it); stay a lattice anyway: the
            // higher-ranked variant wins, independent of order.
            _ => {
                if other.rank() > self.rank() {
                    *self = other.unseen_by(ctx);
                }
            }
        }
    }
    fn unseen_by(&self, ctx: &CausalContext) -> Self {
        match self {
            Nested::Counter(s) => Nested::Counter(s.unseen_by(ctx)),
            Nested::Register(s) => Nested::Register(s.unseen_by(ctx)),
            Nested::Set(s) => Nested::Set(s.unseen_by(ctx)),
            Nested::Map(s) => Nested::Map(s.unseen_by(ctx)),
        }
    }
    fn retain_unseen_by(&mut self, ctx: &CausalContext) {
        match self {
            Nested::Counter(s) => s.retain_unseen_by(ctx),
            Nested::Register(s) => s.retain_unseen_by(ctx),
            Nested::Set(s) => s.retain_unseen_by(ctx),
            Nested::Map(s) => s.retain_unseen_by(ctx),
        }
    }
}

/// The value stored under a key: any CRDT type.
///
/// Merge semantics: values of the same [`Kind`] merge with that type's join.
/// If two replicas concurrently create the same key with different kinds,
/// the join keeps **both** as a [`Value::Conflict`] (the product lattice of
/// the kinds), so no write is silently dropped; an operation then applies to
/// the part of its own kind, and a delete clears them all.
///
/// Encoded with one-letter variant tags (rmp-serde writes a variant's name
/// with every value); the long names still decode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Value {
    /// A grow-only counter.
    #[serde(rename = "g", alias = "GCounter")]
    GCounter(GCounter),
    /// A positive-negative counter (cannot be deleted).
    #[serde(rename = "p", alias = "PnCounter")]
    PnCounter(PNCounter),
    /// A resettable counter.
    #[serde(rename = "c", alias = "Counter")]
    Counter(CCounter),
    /// A last-writer-wins register; `None` is a deleted value.
    #[serde(rename = "l", alias = "Lww")]
    Lww(LwwRegister<Option<Bytes>>),
    /// A multi-value register.
    #[serde(rename = "v", alias = "MvRegister")]
    MvRegister(MvRegister<Bytes>),
    /// An add-wins set.
    #[serde(rename = "s", alias = "Set")]
    Set(OrSet<Bytes>),
    /// A map of typed fields.
    #[serde(rename = "m", alias = "Map")]
    Map(OrMap<Field, Nested>),
    /// Concurrent creations of one key with different kinds: at least two
    /// values, of distinct kinds, in kind order, none a `Conflict`.
    #[serde(rename = "x", alias = "Conflict")]
    Conflict(Vec<Value>),
}

/// An operation on a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Add to a [`GCounter`].
    GCounterInc(u64),
    /// Add (or subtract) to a [`PNCounter`].
    PnCounterAdd(i64),
    /// Add (or subtract) to a resettable [`CCounter`] (`lattice incr`).
    CounterAdd(i64),
    /// Write an LWW register.
    LwwSet(Bytes),
    /// Write a multi-value register.
    MvSet(Bytes),
    /// Add elements to a set.
    SetAdd(Vec<Bytes>),
    /// Remove elements from a set (the adds observed here).
    SetRemove(Vec<Bytes>),
    /// Apply an operation to a field of a map: `CounterAdd`, `MvSet`,
    /// `SetAdd`, `SetRemove`, `MapApply`, `MapRemove` or `Delete` (removes the
    /// field), matching the field's kind.
    MapApply {
        /// The field.
        field: Field,
        /// The operation on it.
        op: Box<Op>,
    },
    /// Remove a field from a map.
    MapRemove(Field),
    /// Delete the value (observed-remove; an LWW register writes a tombstone).
    Delete,
}

impl Op {
    /// The kind of value this operation applies to (`None` for `Delete`).
    pub fn kind(&self) -> Option<Kind> {
        Some(match self {
            Op::GCounterInc(_) => Kind::GCounter,
            Op::PnCounterAdd(_) => Kind::PnCounter,
            Op::CounterAdd(_) => Kind::Counter,
            Op::LwwSet(_) => Kind::Lww,
            Op::MvSet(_) => Kind::MvRegister,
            Op::SetAdd(_) | Op::SetRemove(_) => Kind::Set,
            Op::MapApply { .. } | Op::MapRemove(_) => Kind::Map,
            Op::Delete => return None,
        })
    }

    /// How many elements the operation carries (a set operation's
    /// elements, through map fields; 1 for any other): what its work on a
    /// large state grows with.
    pub fn elements(&self) -> usize {
        match self {
            Op::SetAdd(v) | Op::SetRemove(v) => v.len(),
            Op::MapApply { op, .. } => op.elements(),
            _ => 1,
        }
    }

    /// Whether applying the operation reads the write's timestamp (LWW
    /// registers; `Delete`, which may meet one). The others depend only on
    /// the current state and the writing replica, so their deltas can be
    /// computed before the engine stamps the write
    /// ([`Prepared`](crate::replica::Prepared)).
    pub fn uses_clock(&self) -> bool {
        match self {
            Op::LwwSet(_) | Op::Delete => true,
            Op::MapApply { op, .. } => op.uses_clock(),
            _ => false,
        }
    }

    fn field_kind(&self) -> Option<FieldKind> {
        match self {
            Op::CounterAdd(_) => Some(FieldKind::Counter),
            Op::MvSet(_) => Some(FieldKind::Register),
            Op::SetAdd(_) | Op::SetRemove(_) => Some(FieldKind::Set),
            Op::MapApply { .. } | Op::MapRemove(_) => Some(FieldKind::Map),
            _ => None,
        }
    }
}

/// What a write needs from its replica: who writes, and when.
#[derive(Clone, Copy, Debug)]
pub struct WriteStamp {
    /// The writing replica (dots are created under it).
    pub replica: ReplicaId,
    /// A fresh hybrid logical timestamp (LWW registers).
    pub time: HlcTimestamp,
}

/// Applies a nested op to a field store, returning the field's delta.
fn apply_nested(
    field: &Field,
    current: &Nested,
    ctx: &CausalContext,
    op: &Op,
    stamp: WriteStamp,
    depth: usize,
) -> Result<Causal<Nested>, Error> {
    if matches!(op, Op::Delete) {
        let mut d = DotMap::empty();
        d.0.insert(field.clone(), current.clone());
        let rm = map_remove(&d, field);
        return Ok(Causal {
            store: Nested::empty(),
            ctx: rm.ctx,
        });
    }
    let Some(want) = op.field_kind() else {
        return Err(Error::InvalidOp(format!("{op:?} cannot be applied to a map field")));
    };
    if want != field.kind {
        return Err(Error::FieldTypeMismatch {
            field: field.name.clone(),
            expected: field.kind,
            found: want,
        });
    }
    let r = stamp.replica;
    Ok(match (current, op) {
        (Nested::Counter(s), Op::CounterAdd(n)) => {
            let d = counter_add(s, ctx, r, *n).ok_or(Error::CounterOverflow)?;
            Causal {
                store: Nested::Counter(d.store),
                ctx: d.ctx,
            }
        }
        (Nested::Register(s), Op::MvSet(v)) => {
            let d = mv_write(s, ctx, r, v.clone());
            Causal {
                store: Nested::Register(d.store),
                ctx: d.ctx,
            }
        }
        (Nested::Set(s), Op::SetAdd(elems)) => {
            let d = set_add_all(s, ctx, r, elems);
            Causal {
                store: Nested::Set(d.store),
                ctx: d.ctx,
            }
        }
        (Nested::Set(s), Op::SetRemove(elems)) => {
            let d = set_remove_all(s, elems);
            Causal {
                store: Nested::Set(d.store),
                ctx: d.ctx,
            }
        }
        (
            Nested::Map(s),
            Op::MapApply {
                field: inner,
                op: inner_op,
            },
        ) => {
            if depth + 1 >= MAX_NESTING {
                return Err(Error::NestingTooDeep { limit: MAX_NESTING });
            }
            let d = map_update(s, ctx, inner.clone(), |cur, c| {
                let cur = if cur.is_empty() {
                    Nested::empty_of(inner.kind)
                } else {
                    cur.clone()
                };
                apply_nested(inner, &cur, c, inner_op, stamp, depth + 1)
            })?;
            Causal {
                store: Nested::Map(d.store),
                ctx: d.ctx,
            }
        }
        (Nested::Map(s), Op::MapRemove(inner)) => {
            let d = map_remove(s, inner);
            Causal {
                store: Nested::Map(d.store),
                ctx: d.ctx,
            }
        }
        // The store's variant always matches field.kind (it was created
        // from it, and decoding checks it).
        _ => {
            return Err(Error::InvalidOp(format!(
                "field {} holds a mismatched store",
                field.name
            )))
        }
    })
}

impl Value {
    /// The kind of this value (`None` for a conflict of several kinds).
    pub fn kind(&self) -> Option<Kind> {
        Some(match self {
            Value::GCounter(_) => Kind::GCounter,
            Value::PnCounter(_) => Kind::PnCounter,
            Value::Counter(_) => Kind::Counter,
            Value::Lww(_) => Kind::Lww,
            Value::MvRegister(_) => Kind::MvRegister,
            Value::Set(_) => Kind::Set,
            Value::Map(_) => Kind::Map,
            Value::Conflict(_) => return None,
        })
    }

    /// The bottom value of a kind.
    pub fn empty(kind: Kind) -> Value {
        match kind {
            Kind::GCounter => Value::GCounter(GCounter::default()),
            Kind::PnCounter => Value::PnCounter(PNCounter::default()),
            Kind::Counter => Value::Counter(CCounter::default()),
            Kind::Lww => Value::Lww(LwwRegister::default()),
            Kind::MvRegister => Value::MvRegister(MvRegister::default()),
            Kind::Set => Value::Set(OrSet::default()),
            Kind::Map => Value::Map(OrMap::default()),
        }
    }

    fn parts(self) -> Vec<Value> {
        match self {
            Value::Conflict(v) => v,
            v => vec![v],
        }
    }

    fn from_parts(mut parts: Vec<Value>) -> Value {
        if parts.len() == 1 {
            if let Some(v) = parts.pop() {
                return v;
            }
        }
        Value::Conflict(parts)
    }

    /// Computes the delta of `op` on `current` (the key's value, `None` if
    /// absent). Errors, never panics, on a type mismatch.
    ///
    /// ```
    /// use lattice_core::clock::{HlcTimestamp, ReplicaId};
    /// use lattice_core::crdt::{Crdt, Op, Value, WriteStamp};
    /// let stamp = WriteStamp { replica: ReplicaId(1), time: HlcTimestamp::default() };
    /// let d = Value::apply(None, &Op::CounterAdd(3), stamp).unwrap();
    /// let mut v = d.clone();
    /// assert!(Value::apply(Some(&v), &Op::SetAdd(vec!["x".into()]), stamp).is_err()); // TypeMismatch
    /// let d2 = Value::apply(Some(&v), &Op::CounterAdd(4), stamp).unwrap();
    /// v.join(&d2);
    /// assert_eq!(v.view().to_string(), "7");
    /// ```
    pub fn apply(current: Option<&Value>, op: &Op, stamp: WriteStamp) -> Result<Value, Error> {
        let Some(kind) = op.kind() else {
            return match current {
                None => Err(Error::NotFound),
                Some(v) => v.delete_delta(stamp),
            };
        };
        let part = match current {
            None => None,
            // A conflict takes operations of the kinds it holds, and no new one.
            Some(Value::Conflict(parts)) => match parts.iter().find(|p| p.kind() == Some(kind)) {
                Some(p) => Some(p),
                None => {
                    let expected = parts.first().and_then(Value::kind).unwrap_or(kind);
                    return Err(Error::TypeMismatch { expected, found: kind });
                }
            },
            Some(v) if v.kind() == Some(kind) => Some(v),
            Some(v) => {
                return Err(Error::TypeMismatch {
                    expected: v.kind().unwrap_or(kind),
                    found: kind,
                });
            }
        };
        let empty;
        let cur = match part {
            Some(p) => p,
            None => {
                empty = Value::empty(kind);
                &empty
            }
        };
        let r = stamp.replica;
        Ok(match (cur, op) {
            (Value::GCounter(c), Op::GCounterInc(n)) => {
                c.get(r).checked_add(*n).ok_or(Error::CounterOverflow)?;
                Value::GCounter(c.inc(r, *n))
            }
            (Value::PnCounter(c), Op::PnCounterAdd(n)) => {
                let (inc, dec) = c.entry(r);
                let half = if *n >= 0 { inc } else { dec };
                half.checked_add(n.unsigned_abs()).ok_or(Error::CounterOverflow)?;
                Value::PnCounter(c.add(r, *n))
            }
            (Value::Counter(c), Op::CounterAdd(n)) => Value::Counter(c.try_add(r, *n).ok_or(Error::CounterOverflow)?),
            (Value::Lww(reg), Op::LwwSet(v)) => Value::Lww(reg.set(reg.stamp_after(stamp.time), r, Some(v.clone()))),
            (Value::MvRegister(reg), Op::MvSet(v)) => Value::MvRegister(reg.write(r, v.clone())),
            // One pass over the elements, O(n log n): folding one add at a
            // time joined each into the whole set, O(n^2) (issue 14).
            (Value::Set(s), Op::SetAdd(elems)) => Value::Set(OrSet(set_add_all(&s.0.store, &s.0.ctx, r, elems))),
            (Value::Set(s), Op::SetRemove(elems)) => Value::Set(OrSet(set_remove_all(&s.0.store, elems))),
            (Value::Map(m), Op::MapApply { field, op }) => {
                let d = map_update(&m.0.store, &m.0.ctx, field.clone(), |cur, c| {
                    let cur = if cur.is_empty() {
                        Nested::empty_of(field.kind)
                    } else {
                        cur.clone()
                    };
                    apply_nested(field, &cur, c, op, stamp, 1)
                })?;
                Value::Map(OrMap(d))
            }
            (Value::Map(m), Op::MapRemove(field)) => Value::Map(m.remove(field)),
            _ => return Err(Error::InvalidOp(format!("{op:?} on {kind}"))),
        })
    }

    fn delete_delta(&self, stamp: WriteStamp) -> Result<Value, Error> {
        Ok(match self {
            Value::GCounter(_) | Value::PnCounter(_) => {
                return Err(Error::Unsupported {
                    op: "delete",
                    kind: self.kind().unwrap_or(Kind::GCounter),
                })
            }
            Value::Counter(c) => Value::Counter(c.reset()),
            Value::Lww(reg) => Value::Lww(reg.set(reg.stamp_after(stamp.time), stamp.replica, None)),
            Value::MvRegister(reg) => Value::MvRegister(MvRegister(clear(&reg.0.store))),
            Value::Set(s) => Value::Set(s.clear()),
            Value::Map(m) => Value::Map(OrMap(clear(&m.0.store))),
            Value::Conflict(parts) => {
                let ds = parts
                    .iter()
                    .filter(|p| !matches!(p, Value::GCounter(_) | Value::PnCounter(_)))
                    .map(|p| p.delete_delta(stamp))
                    .collect::<Result<Vec<_>, _>>()?;
                if ds.is_empty() {
                    // Only counters that cannot be deleted: `Conflict([])` is
                    // not a value (peers reject it as malformed).
                    let kind = parts.first().and_then(Value::kind).unwrap_or(Kind::GCounter);
                    return Err(Error::Unsupported { op: "delete", kind });
                }
                Value::from_parts(ds)
            }
        })
    }

    /// A plain, readable view of the value.
    pub fn view(&self) -> ValueView {
        match self {
            Value::GCounter(c) => ValueView::Counter(c.value() as i128),
            Value::PnCounter(c) => ValueView::Counter(c.value()),
            Value::Counter(c) => ValueView::Counter(c.value()),
            Value::Lww(r) => ValueView::Register(r.get().cloned().flatten()),
            Value::MvRegister(r) => ValueView::Values(r.values().into_iter().cloned().collect()),
            Value::Set(s) => ValueView::Set(s.iter().cloned().collect()),
            Value::Map(m) => ValueView::Map(m.iter().map(|(f, n)| (f.clone(), NestedView::of(n))).collect()),
            Value::Conflict(parts) => ValueView::Conflict(parts.iter().map(Value::view).collect()),
        }
    }

    /// True when the value holds nothing a reader would see (a deleted key).
    pub fn is_empty(&self) -> bool {
        match self {
            Value::GCounter(c) => c.value() == 0,
            Value::PnCounter(_) => false,
            Value::Counter(c) => c.0.store.is_empty(),
            Value::Lww(r) => r.get().is_none_or(Option::is_none),
            Value::MvRegister(r) => r.0.store.is_empty(),
            Value::Set(s) => s.is_empty(),
            Value::Map(m) => m.is_empty(),
            Value::Conflict(parts) => parts.iter().all(Value::is_empty),
        }
    }

    /// Checks what decoding alone cannot: causal states keep their live dots
    /// inside their context, contexts are canonical, map fields hold stores
    /// of their declared kind, nesting is bounded, conflicts are normalised.
    pub fn is_well_formed(&self) -> bool {
        fn fields_ok(m: &DotMap<Field, Nested>, depth: usize) -> bool {
            depth < MAX_NESTING
                && m.0.iter().all(|(f, n)| {
                    let kind_ok = matches!(
                        (f.kind, n),
                        (FieldKind::Counter, Nested::Counter(_))
                            | (FieldKind::Register, Nested::Register(_))
                            | (FieldKind::Set, Nested::Set(_))
                            | (FieldKind::Map, Nested::Map(_))
                    );
                    kind_ok
                        && !n.is_empty()
                        && if let Nested::Map(inner) = n {
                            fields_ok(inner, depth + 1)
                        } else {
                            true
                        }
                })
        }
        match self {
            Value::GCounter(_) | Value::PnCounter(_) | Value::Lww(_) => true,
            Value::Counter(c) => c.0.is_well_formed(),
            Value::MvRegister(r) => r.0.is_well_formed(),
            Value::Set(s) => s.0.is_well_formed() && s.0.store.0.values().all(|d| !d.is_empty()),
            Value::Map(m) => m.0.is_well_formed() && fields_ok(&m.0.store, 1),
            Value::Conflict(parts) => {
                parts.len() >= 2
                    && parts.windows(2).all(|w| w[0].kind() < w[1].kind())
                    && parts.iter().all(|p| p.kind().is_some() && p.is_well_formed())
            }
        }
    }

    /// Every dot this value has seen (empty for the non-causal kinds). A
    /// write is included in a state exactly when its dots are in here.
    pub fn context(&self) -> CausalContext {
        match self {
            Value::Counter(c) => c.0.ctx.clone(),
            Value::MvRegister(r) => r.0.ctx.clone(),
            Value::Set(s) => s.0.ctx.clone(),
            Value::Map(m) => m.0.ctx.clone(),
            Value::Conflict(parts) => parts.iter().fold(CausalContext::default(), |mut acc, p| {
                acc.join(&p.context());
                acc
            }),
            Value::GCounter(_) | Value::PnCounter(_) | Value::Lww(_) => CausalContext::default(),
        }
    }

    /// This value's parts, each with its kind: one for a plain value, one
    /// per kind for a [`Value::Conflict`]. Dots are numbered per part, so
    /// what a reader has seen must be compared part by part.
    pub fn kind_parts(&self) -> Vec<(Kind, &Value)> {
        match self {
            Value::Conflict(parts) => parts.iter().filter_map(|p| p.kind().map(|k| (k, p))).collect(),
            v => v.kind().map(|k| (k, v)).into_iter().collect(),
        }
    }

    /// Every replica's running totals (added, subtracted) in a G- or
    /// PN-counter (empty for other kinds and for conflicts).
    pub fn counter_totals(&self) -> BTreeMap<ReplicaId, (u64, u64)> {
        match self {
            Value::GCounter(c) => c.entries().map(|(r, n)| (r, (n, 0))).collect(),
            Value::PnCounter(c) => c.entries(),
            _ => BTreeMap::new(),
        }
    }

    /// The running totals (added, subtracted) of `replica` in a G- or
    /// PN-counter: a write is included when these reach what it wrote.
    pub fn counter_entry(&self, replica: ReplicaId) -> Option<(u64, u64)> {
        match self {
            Value::GCounter(c) => Some((c.get(replica), 0)),
            Value::PnCounter(c) => Some(c.entry(replica)),
            Value::Conflict(parts) => parts.iter().find_map(|p| p.counter_entry(replica)),
            _ => None,
        }
    }

    /// The timestamp and writer of an LWW register's current value.
    pub fn lww_stamp(&self) -> Option<(HlcTimestamp, ReplicaId)> {
        match self {
            Value::Lww(r) => r.stamp(),
            Value::Conflict(parts) => parts.iter().find_map(Value::lww_stamp),
            _ => None,
        }
    }

    /// Nesting depth of maps (0 for non-map values).
    pub fn depth(&self) -> usize {
        match self {
            Value::Map(m) => 1 + m.0.store.0.values().map(Nested::depth).max().unwrap_or(0),
            Value::Conflict(p) => p.iter().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl Crdt for Value {
    fn join(&mut self, other: &Self) {
        match (&mut *self, other) {
            (Value::GCounter(a), Value::GCounter(b)) => a.join(b),
            (Value::PnCounter(a), Value::PnCounter(b)) => a.join(b),
            (Value::Counter(a), Value::Counter(b)) => a.join(b),
            (Value::Lww(a), Value::Lww(b)) => a.join(b),
            (Value::MvRegister(a), Value::MvRegister(b)) => a.join(b),
            (Value::Set(a), Value::Set(b)) => a.join(b),
            (Value::Map(a), Value::Map(b)) => a.join(b),
            _ => {
                // Different kinds: join pointwise over kinds.
                let mut merged: BTreeMap<Kind, Value> = BTreeMap::new();
                let mine = std::mem::replace(self, Value::Conflict(Vec::new()));
                for p in mine.parts().into_iter().chain(other.clone().parts()) {
                    let Some(k) = p.kind() else { continue };
                    match merged.get_mut(&k) {
                        Some(m) => m.join(&p),
                        None => {
                            merged.insert(k, p);
                        }
                    }
                }
                *self = Value::from_parts(merged.into_values().collect());
            }
        }
    }

    fn novel(&self, other: &Self) -> Option<Self> {
        match (self, other) {
            (Value::GCounter(a), Value::GCounter(b)) => a.novel(b).map(Value::GCounter),
            (Value::PnCounter(a), Value::PnCounter(b)) => a.novel(b).map(Value::PnCounter),
            (Value::Counter(a), Value::Counter(b)) => a.novel(b).map(Value::Counter),
            (Value::Lww(a), Value::Lww(b)) => a.novel(b).map(Value::Lww),
            (Value::MvRegister(a), Value::MvRegister(b)) => a.novel(b).map(Value::MvRegister),
            (Value::Set(a), Value::Set(b)) => a.novel(b).map(Value::Set),
            (Value::Map(a), Value::Map(b)) => a.novel(b).map(Value::Map),
            _ => {
                let mut joined = self.clone();
                joined.join(other);
                (joined != *self).then(|| other.clone())
            }
        }
    }
}

/// A readable view of a [`Value`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueView {
    /// A counter's value.
    Counter(i128),
    /// An LWW register's value (`None` when deleted).
    Register(Option<Bytes>),
    /// A multi-value register's concurrent values.
    Values(Vec<Bytes>),
    /// A set's elements.
    Set(Vec<Bytes>),
    /// A map's fields.
    Map(BTreeMap<Field, NestedView>),
    /// Concurrently created kinds.
    Conflict(Vec<ValueView>),
}

/// A readable view of a map field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NestedView {
    /// A counter field.
    Counter(i128),
    /// A register field's concurrent values.
    Values(Vec<Bytes>),
    /// A set field's elements.
    Set(Vec<Bytes>),
    /// A nested map.
    Map(BTreeMap<Field, NestedView>),
}

impl NestedView {
    fn of(n: &Nested) -> NestedView {
        match n {
            Nested::Counter(s) => NestedView::Counter(counter_value(s)),
            Nested::Register(s) => NestedView::Values(s.0.values().cloned().collect()),
            Nested::Set(s) => NestedView::Set(s.0.keys().cloned().collect()),
            Nested::Map(m) => NestedView::Map(m.0.iter().map(|(f, n)| (f.clone(), NestedView::of(n))).collect()),
        }
    }
}

impl fmt::Display for ValueView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueView::Counter(n) => write!(f, "{n}"),
            ValueView::Register(Some(b)) => write!(f, "{b:?}"),
            ValueView::Register(None) => write!(f, "(deleted)"),
            ValueView::Values(v) | ValueView::Set(v) => write!(f, "{v:?}"),
            ValueView::Map(m) => write!(f, "{m:?}"),
            ValueView::Conflict(v) => write!(f, "conflict {v:?}"),
        }
    }
}
