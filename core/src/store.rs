//! The storage trait the engine writes through, and an in-memory store.
//!
//! A store applies atomic batches that are *written* at once and *durable*
//! only after [`Store::flush`]: the engine acknowledges writes, acknowledges
//! peers and sends deltas only for what is durable. Keys are ordered by
//! `(key hash bucket, key)`, so one anti-entropy leaf is one range scan.

use crate::clock::ReplicaId;
use crate::crdt::Value;
use crate::key::Key;
use crate::proto::client::OpId;
use crate::proto::DeltaGroup;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// The engine's own durable metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The replica identity dots are created under.
    pub replica: ReplicaId,
    /// The sequence number the next delta group gets.
    pub next_seq: u64,
}

/// One atomic change: values, buffer changes and metadata together, so the
/// state, the delta buffer and the counters can never disagree on disk.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// New full states of keys.
    pub values: Vec<(Key, Value)>,
    /// Delta groups to append to the durable buffer.
    pub buffer_append: Vec<DeltaGroup>,
    /// Drop buffered groups with a smaller sequence number.
    pub buffer_trim_below: Option<u64>,
    /// New metadata.
    pub meta: Option<Meta>,
    /// Client operation ids this batch applies (for idempotent retries).
    pub op_ids: Vec<OpId>,
}

/// How many recent client operation ids a store remembers.
pub const OP_ID_RETENTION: usize = 100_000;

impl WriteBatch {
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.buffer_append.is_empty()
            && self.buffer_trim_below.is_none()
            && self.meta.is_none()
            && self.op_ids.is_empty()
    }
}

/// Where the engine keeps its state. Implemented in memory here and on sled
/// by the server.
pub trait Store {
    /// The current state of a key (written, durable or not).
    fn get(&self, key: &Key) -> Result<Option<Value>, Error>;
    /// Keys whose hash bucket is in `lo..=hi`, in store order.
    fn scan_buckets(&self, lo: u32, hi: u32) -> Result<Vec<(Key, Value)>, Error>;
    /// Every key, in store order (used once at start-up).
    fn scan_all(&self, f: &mut dyn FnMut(&Key, &Value)) -> Result<(), Error>;
    /// The engine's metadata, if this store has been used before.
    fn meta(&self) -> Result<Option<Meta>, Error>;
    /// The durable delta buffer, in sequence order.
    fn buffer(&self) -> Result<Vec<DeltaGroup>, Error>;
    /// Whether a client operation id was applied (among the last
    /// [`OP_ID_RETENTION`]).
    fn has_op(&self, op: OpId) -> Result<bool, Error>;
    /// Applies a batch atomically (written, not yet durable).
    fn apply(&mut self, batch: WriteBatch) -> Result<(), Error>;
    /// Makes everything applied so far durable.
    fn flush(&mut self) -> Result<(), Error>;
}

type Ordered = BTreeMap<(u32, Key), Value>;

#[derive(Clone, Debug, Default)]
struct Image {
    values: Ordered,
    buffer: VecDeque<DeltaGroup>,
    meta: Option<Meta>,
    ops: std::collections::BTreeSet<OpId>,
    op_order: VecDeque<OpId>,
}

impl Image {
    fn apply(&mut self, batch: &WriteBatch) {
        for (k, v) in &batch.values {
            self.values.insert((k.hash().bucket(), k.clone()), v.clone());
        }
        if let Some(below) = batch.buffer_trim_below {
            while self.buffer.front().is_some_and(|g| g.seq < below) {
                self.buffer.pop_front();
            }
        }
        self.buffer.extend(batch.buffer_append.iter().cloned());
        if let Some(m) = &batch.meta {
            self.meta = Some(m.clone());
        }
        for op in &batch.op_ids {
            if self.ops.insert(*op) {
                self.op_order.push_back(*op);
            }
        }
        while self.op_order.len() > OP_ID_RETENTION {
            if let Some(old) = self.op_order.pop_front() {
                self.ops.remove(&old);
            }
        }
    }
}

/// An in-memory store that models durability: batches applied since the
/// last [`Store::flush`] are lost by [`MemoryStore::crash`]. The simulator
/// runs every node on one.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    current: Image,
    pending: Vec<WriteBatch>,
    durable: Image,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a process crash: what was not flushed is gone.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.current = self.durable.clone();
    }

    /// The durable state of a key: what a crash would leave.
    pub fn get_durable(&self, key: &Key) -> Option<Value> {
        self.durable.values.get(&(key.hash().bucket(), key.clone())).cloned()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.current.values.len()
    }

    /// True when no key is stored.
    pub fn is_empty(&self) -> bool {
        self.current.values.is_empty()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &Key) -> Result<Option<Value>, Error> {
        Ok(self.current.values.get(&(key.hash().bucket(), key.clone())).cloned())
    }

    fn scan_buckets(&self, lo: u32, hi: u32) -> Result<Vec<(Key, Value)>, Error> {
        Ok(self
            .current
            .values
            .range((lo, Key::min())..)
            .take_while(|((b, _), _)| *b <= hi)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn scan_all(&self, f: &mut dyn FnMut(&Key, &Value)) -> Result<(), Error> {
        for ((_, k), v) in &self.current.values {
            f(k, v);
        }
        Ok(())
    }

    fn meta(&self) -> Result<Option<Meta>, Error> {
        Ok(self.current.meta.clone())
    }

    fn buffer(&self) -> Result<Vec<DeltaGroup>, Error> {
        Ok(self.current.buffer.iter().cloned().collect())
    }

    fn has_op(&self, op: OpId) -> Result<bool, Error> {
        Ok(self.current.ops.contains(&op))
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), Error> {
        self.current.apply(&batch);
        self.pending.push(batch);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        for b in self.pending.drain(..) {
            self.durable.apply(&b);
        }
        Ok(())
    }
}

impl Key {
    /// The smallest key, for range bounds (not a valid key itself).
    fn min() -> Key {
        Key::new_unchecked(String::new())
    }
}
