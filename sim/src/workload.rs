//! Random client operations over every CRDT type, and the record of what
//! each one did, which the checkers compare with the final state.

use crate::config::SimConfig;
use lattice_core::clock::{CausalContext, HlcTimestamp, ReplicaId};
use lattice_core::crdt::{Bytes, Field, FieldKind, Op, Value, ValueView};
use lattice_core::Key;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The CRDT type a key is used as (keys are named by type: `c3`, `s0`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyKind {
    /// Grow-only counter.
    GCounter,
    /// Positive-negative counter.
    PnCounter,
    /// Resettable counter, never deleted in the workload.
    Counter,
    /// LWW register.
    Lww,
    /// Multi-value register.
    Mv,
    /// Add-wins set.
    Set,
    /// Map with a counter, a set and a nested map field.
    Map,
}

const KINDS: [KeyKind; 7] = [
    KeyKind::GCounter,
    KeyKind::PnCounter,
    KeyKind::Counter,
    KeyKind::Lww,
    KeyKind::Mv,
    KeyKind::Set,
    KeyKind::Map,
];

impl KeyKind {
    fn prefix(self) -> &'static str {
        match self {
            KeyKind::GCounter => "g",
            KeyKind::PnCounter => "n",
            KeyKind::Counter => "c",
            KeyKind::Lww => "l",
            KeyKind::Mv => "m",
            KeyKind::Set => "s",
            KeyKind::Map => "p",
        }
    }
}

/// One client operation and what became of it.
#[derive(Clone, Debug)]
pub struct OpRecord {
    /// Index in the run.
    pub id: usize,
    /// Node it was issued at.
    pub node: usize,
    /// Key.
    pub key: Key,
    /// Type of the key.
    pub kind: KeyKind,
    /// The operation.
    pub op: Op,
    /// Virtual time it was issued.
    pub issued_at: u64,
    /// The write was accepted by the engine.
    pub applied: bool,
    /// Deliberately of the wrong type: must be refused.
    pub expect_error: bool,
    /// Virtual time the node acknowledged it (durable).
    pub acked_at: Option<u64>,
    /// Dots the write created.
    pub dots: CausalContext,
    /// What the writing node had seen of the key when it wrote (the dots a
    /// register write replaces).
    pub observed: CausalContext,
    /// LWW stamp the write got.
    pub lww_stamp: Option<(HlcTimestamp, ReplicaId)>,
    /// For G- and PN-counters: the writer and its running totals after
    /// the write.
    pub counter_entry: Option<(ReplicaId, (u64, u64))>,
    /// The acked write's only copy was destroyed by a disk loss before it
    /// reached another node: it may legitimately be gone.
    pub exempt: bool,
    /// Nodes whose state includes the write (bit per node).
    pub seen_by: u64,
    /// Nodes the write must reach (bit per node): those whose region may
    /// exchange the key with the writer's.
    pub targets: u64,
    /// The version of the policy set the writing node held.
    pub policy_version: u64,
    /// When every node included it.
    pub reached_all_at: Option<u64>,
    /// The client write this op was part of, as (id of its first record,
    /// number of ops): `(id, 1)` for a single op. A write is atomic: the
    /// records of one batch are applied, acknowledged or refused together.
    pub batch: (usize, usize),
}

impl OpRecord {
    /// Whether `value` (a state of this record's key) includes the write.
    pub fn visible_in(&self, value: Option<&Value>) -> bool {
        let Some(v) = value else {
            return self.dots.is_empty() && self.lww_stamp.is_none() && self.counter_entry.is_none();
        };
        if let Some((replica, (inc, dec))) = self.counter_entry {
            return v.counter_entry(replica).is_some_and(|(i, d)| i >= inc && d >= dec);
        }
        if let Some(stamp) = self.lww_stamp {
            return v.lww_stamp().is_some_and(|s| s >= stamp);
        }
        v.context().includes(&self.dots)
    }

    /// Elements a set add (top level or in a map's `tags` field) adds.
    pub fn added_elems(&self) -> Vec<Bytes> {
        match &self.op {
            Op::SetAdd(e) => e.clone(),
            Op::MapApply { op, .. } => match op.as_ref() {
                Op::SetAdd(e) => e.clone(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    /// Elements a set remove removes.
    pub fn removed_elems(&self) -> Vec<Bytes> {
        match &self.op {
            Op::SetRemove(e) => e.clone(),
            Op::MapApply { op, .. } => match op.as_ref() {
                Op::SetRemove(e) => e.clone(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        }
    }
}

/// Draws operations.
pub struct Workload {
    broadcast: bool,
    keys: usize,
    weights: Vec<f64>,
    /// The sum of `weights`, summed once (the same sum `pick_key` used to
    /// compute on every call, so the draws are bit for bit the same).
    total: f64,
    /// Every weight is 1: a key is the integer part of the draw, found
    /// without a walk over 10^5 weights.
    uniform: bool,
    next_unique: u64,
    /// Share of large register values, and their largest size.
    large: (f64, usize),
    /// Largest frame: a batch's deltas together must fit half of one.
    frame: usize,
}

/// One operation of a client write.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Key.
    pub key: Key,
    /// Type of the key.
    pub kind: KeyKind,
    /// The operation.
    pub op: Op,
    /// Deliberately of the wrong type: the write must be refused.
    pub expect_error: bool,
}

/// The largest value a mixed batch carries when frames are the default
/// 4 MiB: several KB is the shape of interest, megabytes only slow the run.
const BATCH_LARGE_CAP: usize = 16 << 10;

/// Bytes of payload (register values, set elements) an op carries.
pub fn op_payload(op: &Op) -> usize {
    match op {
        Op::LwwSet(b) | Op::MvSet(b) => b.as_slice().len(),
        Op::SetAdd(e) | Op::SetRemove(e) => e.iter().map(|b| b.as_slice().len()).sum(),
        Op::MapApply { op, .. } => op_payload(op),
        _ => 0,
    }
}

/// The set elements visible in a value (top-level set or a map's `tags`).
pub fn visible_elems(v: Option<&Value>) -> Vec<Bytes> {
    match v.map(Value::view) {
        Some(ValueView::Set(e)) => e,
        Some(ValueView::Map(m)) => match m.get(&tags_field()) {
            Some(lattice_core::crdt::NestedView::Set(e)) => e.clone(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The set field of workload maps.
pub fn tags_field() -> Field {
    Field::new("tags", FieldKind::Set)
}

impl Workload {
    /// A workload for `cfg`.
    pub fn new(cfg: &SimConfig) -> Self {
        let keys = cfg.keys.max(1);
        let weights: Vec<f64> = (0..keys).map(|i| 1.0 / ((i + 1) as f64).powf(cfg.key_skew)).collect();
        let total = weights.iter().sum();
        Workload {
            broadcast: cfg.broadcast,
            keys,
            uniform: weights.iter().all(|w| *w == 1.0),
            weights,
            total,
            next_unique: 0,
            large: (cfg.large_values, cfg.max_message_bytes / 3),
            frame: cfg.max_message_bytes,
        }
    }

    /// A unique register value, now and then padded to a large size.
    fn value(&mut self, rng: &mut ChaCha8Rng, node: usize) -> Bytes {
        let v = self.unique(node);
        let (share, max) = self.large;
        if share > 0.0 && rng.gen_bool(share.clamp(0.0, 1.0)) {
            let mut b = v.as_slice().to_vec();
            b.push(b'-');
            b.resize(rng.gen_range(b.len()..max.max(b.len() + 1)), b'x');
            return Bytes::from(b);
        }
        v
    }

    fn unique(&mut self, node: usize) -> Bytes {
        self.next_unique += 1;
        Bytes::from(format!("n{node}-{}", self.next_unique).as_str())
    }

    fn pick_key(&self, rng: &mut ChaCha8Rng) -> usize {
        let mut x = rng.gen_range(0.0..self.total);
        if self.uniform {
            // Subtracting 1.0 at a time is exact, so the walk below would
            // stop at the integer part.
            return (x as usize).min(self.keys - 1);
        }
        for (i, w) in self.weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        self.keys - 1
    }

    /// The next operation for a client at `node`; `read` gives the node's
    /// current state of a key (to remove elements it has observed).
    /// Returns the key, its kind, the op, and whether it is a deliberate
    /// type mismatch.
    pub fn next(
        &mut self,
        rng: &mut ChaCha8Rng,
        node: usize,
        read: impl Fn(&Key) -> Option<Value>,
    ) -> (Key, KeyKind, Op, bool) {
        if self.broadcast {
            let key = Key::new("broadcast").unwrap_or_else(|_| unreachable_key());
            return (key, KeyKind::Set, Op::SetAdd(vec![self.unique(node)]), false);
        }
        let kind = KINDS[rng.gen_range(0..KINDS.len())];
        let i = self.pick_key(rng);
        let key = Key::new(format!("{}{i}", kind.prefix())).unwrap_or_else(|_| unreachable_key());
        let current = read(&key);
        // Now and then, an operation of the wrong type on an existing key.
        if current.is_some() && rng.gen_bool(0.03) {
            let wrong = match kind {
                KeyKind::Set => Op::CounterAdd(1),
                _ => Op::SetAdd(vec![self.unique(node)]),
            };
            return (key, kind, wrong, true);
        }
        let op = match kind {
            KeyKind::GCounter => Op::GCounterInc(rng.gen_range(1..=10)),
            KeyKind::PnCounter => {
                let n = rng.gen_range(-5i64..=10);
                Op::PnCounterAdd(if n == 0 { 1 } else { n })
            }
            KeyKind::Counter => {
                let n = rng.gen_range(-5i64..=10);
                Op::CounterAdd(if n == 0 { 1 } else { n })
            }
            KeyKind::Lww => {
                if current.is_some() && rng.gen_bool(0.1) {
                    Op::Delete
                } else {
                    Op::LwwSet(self.value(rng, node))
                }
            }
            KeyKind::Mv => {
                if current.is_some() && rng.gen_bool(0.1) {
                    Op::Delete
                } else {
                    Op::MvSet(self.value(rng, node))
                }
            }
            KeyKind::Set => {
                let elems = visible_elems(current.as_ref());
                if !elems.is_empty() && rng.gen_bool(0.3) {
                    Op::SetRemove(vec![elems[rng.gen_range(0..elems.len())].clone()])
                } else {
                    Op::SetAdd(vec![self.unique(node)])
                }
            }
            KeyKind::Map => {
                let elems = visible_elems(current.as_ref());
                match rng.gen_range(0..10) {
                    0..=3 => Op::MapApply {
                        field: Field::new("hits", FieldKind::Counter),
                        op: Box::new(Op::CounterAdd(rng.gen_range(1..=5))),
                    },
                    4..=6 => Op::MapApply {
                        field: tags_field(),
                        op: Box::new(Op::SetAdd(vec![self.unique(node)])),
                    },
                    7 if !elems.is_empty() => Op::MapApply {
                        field: tags_field(),
                        op: Box::new(Op::SetRemove(vec![elems[rng.gen_range(0..elems.len())].clone()])),
                    },
                    8 => Op::MapApply {
                        field: Field::new("sub", FieldKind::Map),
                        op: Box::new(Op::MapApply {
                            field: Field::new("x", FieldKind::Register),
                            op: Box::new(Op::MvSet(self.unique(node))),
                        }),
                    },
                    9 if current.is_some() => Op::MapRemove(Field::new("sub", FieldKind::Map)),
                    _ => Op::MapApply {
                        field: Field::new("hits", FieldKind::Counter),
                        op: Box::new(Op::CounterAdd(1)),
                    },
                }
            }
        };
        (key, kind, op, false)
    }

    /// The other ops of a mixed batch around `first` (the op drawn as
    /// usual): one large value (an LWW or multi-value register, or a set
    /// element) of a size up to what half a frame leaves beside the rest,
    /// and 2..=9 small counters and registers, each in a key of its own,
    /// of other types (and so other policies and priority classes). Draws
    /// from `rng`, a stream of its own, so the usual ops stay as they were.
    /// Keys `may_write` refuses are left out, as a client that knows the
    /// policy would (only `first` may then make the policy refuse the
    /// whole batch).
    pub fn batch_extras(
        &mut self,
        rng: &mut ChaCha8Rng,
        node: usize,
        first: &Planned,
        read: impl Fn(&Key) -> Option<Value>,
        may_write: impl Fn(&Key) -> bool,
    ) -> Vec<Planned> {
        let mut out: Vec<Planned> = Vec::new();
        let small = rng.gen_range(2..=9usize);
        let taken =
            |out: &[Planned], key: &Key| *key == first.key || out.iter().any(|p| p.key == *key) || !may_write(key);
        // Small ones first, so the large one can take what half a frame
        // leaves (the review's shape: one 7 KB value and nine counters
        // in 16 KiB frames).
        for _ in 0..small {
            let kind = [
                KeyKind::GCounter,
                KeyKind::PnCounter,
                KeyKind::Counter,
                KeyKind::Lww,
                KeyKind::Mv,
                KeyKind::Map,
            ][rng.gen_range(0..6)];
            let key = self.key_of(kind, rng);
            if taken(&out, &key) {
                continue;
            }
            let op = match kind {
                KeyKind::GCounter => Op::GCounterInc(rng.gen_range(1..=10)),
                KeyKind::PnCounter => Op::PnCounterAdd(rng.gen_range(1..=10)),
                KeyKind::Counter => Op::CounterAdd(rng.gen_range(1..=10)),
                KeyKind::Lww => Op::LwwSet(self.unique(node)),
                KeyKind::Mv => Op::MvSet(self.unique(node)),
                _ => Op::MapApply {
                    field: Field::new("hits", FieldKind::Counter),
                    op: Box::new(Op::CounterAdd(rng.gen_range(1..=5))),
                },
            };
            out.push(Planned {
                key,
                kind,
                op,
                expect_error: false,
            });
        }
        let kind = match rng.gen_range(0..20) {
            0..=11 => KeyKind::Lww,
            12..=16 => KeyKind::Set,
            _ => KeyKind::Mv,
        };
        let key = self.key_of(kind, rng);
        if taken(&out, &key) {
            return out;
        }
        // Room beside the other ops: their payloads and, per entry, a
        // generous allowance for its key, dots and stamp.
        let others: usize = out.iter().map(|p| op_payload(&p.op)).sum::<usize>() + op_payload(&first.op);
        let room = (self.frame / 2).saturating_sub(others + 96 * (out.len() + 2) + 256);
        let cap = room.min(BATCH_LARGE_CAP);
        let base = self.unique(node);
        let size = if cap <= base.as_slice().len() + 1 {
            base.as_slice().len()
        } else if rng.gen_bool(0.3) {
            // At the edge: the last few hundred bytes below the room.
            rng.gen_range(cap.saturating_sub(400).max(base.as_slice().len() + 1)..=cap)
        } else {
            rng.gen_range(cap / 4..=cap).max(base.as_slice().len() + 1)
        };
        let mut b = base.as_slice().to_vec();
        b.push(b'-');
        b.resize(size.max(b.len()), b'x');
        let large = Bytes::from(b);
        let op = match kind {
            KeyKind::Lww => Op::LwwSet(large),
            KeyKind::Mv => Op::MvSet(large),
            _ => {
                // A set holds every large element added: past the value
                // limit the write is refused whole, which is checked too;
                // drop one now and then to make room.
                let elems = visible_elems(read(&key).as_ref());
                if !elems.is_empty() && rng.gen_bool(0.2) {
                    Op::SetRemove(vec![elems[rng.gen_range(0..elems.len())].clone()])
                } else {
                    Op::SetAdd(vec![large])
                }
            }
        };
        out.push(Planned {
            key,
            kind,
            op,
            expect_error: false,
        });
        out
    }

    fn key_of(&self, kind: KeyKind, rng: &mut ChaCha8Rng) -> Key {
        let i = self.pick_key(rng);
        Key::new(format!("{}{i}", kind.prefix())).unwrap_or_else(|_| unreachable_key())
    }
}

#[allow(clippy::panic)]
fn unreachable_key() -> Key {
    panic!("workload key names are short and non-empty")
}
