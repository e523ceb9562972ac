//! The storage trait the engine writes through, and an in-memory store.
//!
//! A store applies atomic batches that are *written* at once and *durable*
//! only after [`Store::flush`]: the engine acknowledges writes, acknowledges
//! peers and sends deltas only for what is durable. Keys are ordered by
//! `(key hash bucket, key)`, so one anti-entropy leaf is one range scan.
//!
//! Every stored state is a *record* ([`seal_record`]): an 8-byte integrity
//! check (blake3 over the key and the body, truncated) followed by the
//! MessagePack body. [`open_record`] verifies it on every read and refuses a
//! record whose bytes changed on disk with `Error::Corrupt { key }`, so a
//! flipped bit is never read back (or replicated) as a value. The check
//! names the key, so a record that landed under another key fails too.

use crate::clock::ReplicaId;
use crate::crdt::Value;
use crate::key::Key;
use crate::log::Change;
use crate::proto::client::OpId;
use crate::replica::{record_digest, RecordDigest};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Bytes of the integrity check that begins every stored record.
pub const RECORD_CHECK_BYTES: usize = 8;

fn record_check(key: &Key, body: &[u8]) -> [u8; RECORD_CHECK_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(&(key.as_str().len() as u64).to_le_bytes());
    h.update(key.as_str().as_bytes());
    h.update(body);
    let mut out = [0; RECORD_CHECK_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..RECORD_CHECK_BYTES]);
    out
}

/// Encodes `key`'s state as a stored record: its integrity check, then its
/// MessagePack body.
pub fn seal_record(key: &Key, value: &Value) -> Result<Vec<u8>, Error> {
    let mut out = vec![0; RECORD_CHECK_BYTES];
    rmp_serde::encode::write(&mut out, value).map_err(|e| Error::Codec(e.to_string()))?;
    let check = record_check(key, &out[RECORD_CHECK_BYTES..]);
    out[..RECORD_CHECK_BYTES].copy_from_slice(&check);
    Ok(out)
}

/// A state sealed as its stored record ([`seal_record`]), ready for a
/// [`WriteBatch`]: the engine seals a state once, checks its size on the
/// record and hands the same bytes to the store, rather than encoding a
/// large state once to measure it and again to store it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record(Vec<u8>);

impl Record {
    /// Seals `key`'s state.
    pub fn seal(key: &Key, value: &Value) -> Result<Record, Error> {
        seal_record(key, value).map(Record)
    }

    /// The record's bytes, check included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The record's bytes, check included, without a copy.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The encoded state's length (the record without its check).
    pub fn body_len(&self) -> usize {
        self.0.len() - RECORD_CHECK_BYTES
    }
}

/// Decodes a record of `key` written by [`seal_record`]. A record whose
/// check does not match its bytes is refused with `Error::Corrupt`, naming
/// the key; its value is never returned.
pub fn open_record(key: &Key, record: &[u8]) -> Result<Value, Error> {
    let corrupt = || Error::Corrupt {
        key: key.as_str().chars().take(256).collect(),
    };
    if record.len() < RECORD_CHECK_BYTES {
        return Err(corrupt());
    }
    let (check, body) = record.split_at(RECORD_CHECK_BYTES);
    #[cfg(feature = "planted-bugs")]
    let ignored = crate::planted::active(crate::planted::PlantedBug::RecordCheckIgnored);
    #[cfg(not(feature = "planted-bugs"))]
    let ignored = false;
    if !ignored && check != record_check(key, body) {
        return Err(corrupt());
    }
    crate::proto::from_bytes(body)
}

/// The engine's own durable metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The replica identity the current life creates dots under (a fresh
    /// one each life, see [`Replica::open`](crate::replica::Replica::open)).
    pub replica: ReplicaId,
    /// The sequence number the next delta group gets.
    pub next_seq: u64,
    /// Set only by [`Replica::close`](crate::replica::Replica::close), in
    /// the last batch a life writes: the store then holds every change that
    /// life made, its client op ids included, so the next life answers
    /// retries from them without an `OutcomeUnknown` window.
    #[serde(default)]
    pub clean: bool,
    /// Written by a life whose flushes did not reach the disk (`async`).
    /// Kept in the on-disk format; nothing decides on it any more, since
    /// every life takes a fresh replica id.
    #[serde(default)]
    pub async_life: bool,
}

/// One atomic change: values, metadata and op ids together, so the states
/// and the counters can never disagree on disk. (The delta buffer is not
/// stored: it lives in memory, bounded by `max_buffer_bytes`, and what a
/// crash takes from it is repaired by the anti-entropy round every restart
/// begins with each peer.)
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    /// New full states of keys, sealed.
    pub values: Vec<(Key, Record)>,
    /// New metadata.
    pub meta: Option<Meta>,
    /// Client operation ids this batch applies (for idempotent retries).
    pub op_ids: Vec<OpId>,
    /// The changes that produced `values`, for the change log (see
    /// [`crate::log`]): stored in the same batch, or not at all by a store
    /// without a log.
    pub changes: Vec<Change>,
}

/// How many recent client operation ids a store remembers.
pub const OP_ID_RETENTION: usize = 100_000;

impl WriteBatch {
    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.meta.is_none() && self.op_ids.is_empty() && self.changes.is_empty()
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
    /// Whether a client operation id was applied (among the last
    /// [`OP_ID_RETENTION`]).
    fn has_op(&self, op: OpId) -> Result<bool, Error>;
    /// The [`RecordDigest`] of a key's current record (written, durable or
    /// not): what a [`Prepared`](crate::replica::Prepared) result is
    /// checked against.
    fn record_digest(&self, key: &Key) -> Result<Option<RecordDigest>, Error>;
    /// Applies a batch atomically (written, not yet durable).
    fn apply(&mut self, batch: WriteBatch) -> Result<(), Error>;
    /// Makes everything applied so far durable, or, where
    /// [`Store::flush_is_durable`] is false, hands it to the disk to be
    /// written later.
    fn flush(&mut self) -> Result<(), Error>;
    /// False when [`Store::flush`] returns before the data is on disk (the
    /// `async` durability mode): a crash can then lose changes that were
    /// flushed, and the engine must never hand out their dots or sequence
    /// numbers again.
    fn flush_is_durable(&self) -> bool {
        true
    }
    /// Makes everything applied so far durable, whatever the mode.
    fn sync(&mut self) -> Result<(), Error> {
        self.flush()
    }
}

/// Sealed records by (bucket, key). Shared between the images: a record's
/// bytes are written once.
type Ordered = BTreeMap<(u32, Key), Arc<[u8]>>;

/// A batch as the store keeps it: states as sealed records.
#[derive(Clone, Debug)]
struct Sealed {
    values: Vec<(Key, Arc<[u8]>)>,
    rest: WriteBatch,
}

#[derive(Clone, Debug, Default)]
struct Image {
    values: Ordered,
    meta: Option<Meta>,
    ops: std::collections::BTreeSet<OpId>,
    op_order: VecDeque<OpId>,
    /// The change log, modelled by what checking it needs: each key's
    /// logged deltas joined, and whether its first logged change was marked
    /// `first`.
    log: BTreeMap<Key, (bool, Value)>,
}

impl Image {
    fn apply(&mut self, sealed: &Sealed) {
        for (k, v) in &sealed.values {
            self.values.insert((k.hash().bucket(), k.clone()), v.clone());
        }
        for c in &sealed.rest.changes {
            match self.log.get_mut(&c.key) {
                Some((_, joined)) => crate::crdt::Crdt::join(joined, &c.delta),
                None => {
                    self.log.insert(c.key.clone(), (c.first, (*c.delta).clone()));
                }
            }
        }
        let batch = &sealed.rest;
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
///
/// In `async` mode ([`MemoryStore::new_async`]) it behaves like sled with
/// its background log writer: `flush` returns at once and only
/// [`MemoryStore::sync_disk`] (a timer of the driver's) puts what was
/// flushed on the disk. Crashes may keep a prefix of what was not yet on
/// disk ([`MemoryStore::crash_keeping`]), as a log written in order would.
///
/// States are kept as sealed records ([`seal_record`]) and verified on every
/// read, like sled's; [`MemoryStore::rot`] flips a bit of one on the disk.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    current: Image,
    /// Applied, not yet flushed.
    pending: Vec<Sealed>,
    /// Flushed, not yet on disk (`async` only).
    written: Vec<Sealed>,
    durable: Image,
    is_async: bool,
    /// A disk whose flush lies: it reports flushes as durable
    /// ([`Store::flush_is_durable`]) but behaves as `async` does.
    lying: bool,
}

impl MemoryStore {
    /// Checks the modelled change log against the states: joining each
    /// key's logged deltas gives its stored state, every stored key was
    /// logged, and each key's first logged change is marked first. Returns
    /// the first keys that break it.
    pub fn check_log(&self) -> Vec<String> {
        let mut out = Vec::new();
        for ((_, key), record) in &self.current.values {
            let state = match open_record(key, record) {
                Ok(v) => v,
                Err(e) => {
                    out.push(format!("{key}: {e}"));
                    continue;
                }
            };
            match self.current.log.get(key) {
                None => out.push(format!("{key} is stored but never logged")),
                Some((first, joined)) => {
                    if !first {
                        out.push(format!("{key}'s first logged change is not marked first"));
                    }
                    let same =
                        crate::replica::item_hash(key, joined).ok() == crate::replica::item_hash(key, &state).ok();
                    if !same {
                        out.push(format!(
                            "{key}: its logged deltas join to {joined:?}, its state is {state:?}"
                        ));
                    }
                }
            }
            if out.len() >= 3 {
                break;
            }
        }
        out
    }

    /// A key's current record (written, durable or not), as
    /// [`Store::get`] would decode it.
    pub fn record(&self, key: &Key) -> Option<Arc<[u8]>> {
        self.current.values.get(&(key.hash().bucket(), key.clone())).cloned()
    }

    /// An empty store whose flush is durable.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose flush returns before the data is on disk.
    pub fn new_async() -> Self {
        MemoryStore {
            is_async: true,
            ..Self::default()
        }
    }

    /// An empty store on a disk that lies: `flush` and `sync` report
    /// success and the store claims its flushes are durable, but the data
    /// reaches the disk only at [`MemoryStore::sync_disk`], as with a write
    /// cache that ignores flush requests.
    pub fn new_lying() -> Self {
        MemoryStore {
            is_async: true,
            lying: true,
            ..Self::default()
        }
    }

    /// Switches the durability mode, as a node restarted with another
    /// `durability` setting does (between lives only).
    pub fn set_async(&mut self, on: bool) {
        self.is_async = on;
    }

    /// Simulates a process crash: what was not on disk is gone.
    pub fn crash(&mut self) {
        self.crash_keeping(0);
    }

    /// Simulates a crash in the middle of writing: the first `keep` of the
    /// batches not yet on disk (in the order they were applied) survive,
    /// the rest is gone.
    pub fn crash_keeping(&mut self, keep: usize) {
        let mut batches = std::mem::take(&mut self.written);
        batches.append(&mut self.pending);
        for b in batches.iter().take(keep) {
            self.durable.apply(b);
        }
        self.current = self.durable.clone();
    }

    /// Batches not yet on disk (what a crash may lose).
    pub fn unsynced(&self) -> usize {
        self.written.len() + self.pending.len()
    }

    /// The background writer: what was flushed reaches the disk.
    pub fn sync_disk(&mut self) {
        for b in self.written.drain(..) {
            self.durable.apply(&b);
        }
    }

    /// The durable state of a key: what a crash would leave (`None` also
    /// when its record is corrupt: the disk no longer holds the value).
    pub fn get_durable(&self, key: &Key) -> Option<Value> {
        let r = self.durable.values.get(&(key.hash().bucket(), key.clone()))?;
        open_record(key, r).ok()
    }

    /// Bit rot while the process is down: flips bit `bit` (modulo the
    /// record's length in bits) of the `pick`-th (modulo their number)
    /// stored record on the disk, and returns its key. Only for a crashed
    /// store (nothing unsynced): the next life reads what the disk holds.
    /// `None` when there is no record, or the store still has unsynced
    /// batches.
    pub fn rot(&mut self, pick: u64, bit: u64) -> Option<Key> {
        if self.unsynced() > 0 || self.durable.values.is_empty() {
            return None;
        }
        let n = self.durable.values.len() as u64;
        let (slot, bytes) = self.durable.values.iter_mut().nth((pick % n) as usize)?;
        let mut flipped = bytes.to_vec();
        let bit = bit % (flipped.len() as u64 * 8);
        flipped[(bit / 8) as usize] ^= 1 << (bit % 8);
        *bytes = flipped.into();
        let key = slot.1.clone();
        self.current = self.durable.clone();
        Some(key)
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
        match self.current.values.get(&(key.hash().bucket(), key.clone())) {
            Some(r) => open_record(key, r).map(Some),
            None => Ok(None),
        }
    }

    fn record_digest(&self, key: &Key) -> Result<Option<RecordDigest>, Error> {
        Ok(self.record(key).map(|r| record_digest(&r)))
    }

    fn scan_buckets(&self, lo: u32, hi: u32) -> Result<Vec<(Key, Value)>, Error> {
        self.current
            .values
            .range((lo, Key::min())..)
            .take_while(|((b, _), _)| *b <= hi)
            .map(|((_, k), r)| Ok((k.clone(), open_record(k, r)?)))
            .collect()
    }

    fn scan_all(&self, f: &mut dyn FnMut(&Key, &Value)) -> Result<(), Error> {
        for ((_, k), r) in &self.current.values {
            f(k, &open_record(k, r)?);
        }
        Ok(())
    }

    fn meta(&self) -> Result<Option<Meta>, Error> {
        Ok(self.current.meta.clone())
    }

    fn has_op(&self, op: OpId) -> Result<bool, Error> {
        Ok(self.current.ops.contains(&op))
    }

    fn apply(&mut self, mut batch: WriteBatch) -> Result<(), Error> {
        let values = std::mem::take(&mut batch.values)
            .into_iter()
            .map(|(k, r)| (k, Arc::from(r.0)))
            .collect();
        let sealed = Sealed { values, rest: batch };
        self.current.apply(&sealed);
        self.pending.push(sealed);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.written.append(&mut self.pending);
        if !self.is_async {
            self.sync_disk();
        }
        Ok(())
    }

    fn flush_is_durable(&self) -> bool {
        !self.is_async || self.lying
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.written.append(&mut self.pending);
        if !self.lying {
            self.sync_disk();
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
