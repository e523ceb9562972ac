//! A key's next state, computed from its current one: by the engine, or
//! beside it ([`Prepared`]).
//!
//! Every write and every merge of remote state works on the key's whole
//! state: decode it, join, hash the old and the new state, encode the new
//! one as its record. For a set of 10^5 elements that is tens of
//! milliseconds, during which the engine serves nothing else. A driver can
//! do that work on another thread, against the record the store holds, and
//! hand the result to the engine with its input. The engine takes a
//! prepared result only if the key's record is still the one it was
//! computed from (the blake3 digest of its bytes, compared with the store's
//! record before anything is applied) and it was computed under the
//! engine's replica id; otherwise it does the work itself, as without
//! preparation. A prepared result is thus never a different outcome, only
//! the same outcome computed elsewhere.
//!
//! Only what is a function of the current state alone is prepared: a
//! write's operations on a key that do not read the write's timestamp
//! ([`Op::uses_clock`]), and merges of remote states. The checks that depend
//! on the engine's other state (policy, key validity, sizes against its
//! limits, clock bounds) stay in the engine and run either way.

use super::conflicts::{Before, Conflicts};
use super::merkle::item_hash;
use super::MAX_DOT_COUNTER;
use crate::clock::{HlcTimestamp, ReplicaId};
use crate::crdt::{Crdt, Op, Value, WriteStamp};
use crate::key::Key;
use crate::proto::client::CausalToken;
use crate::proto::{self, Message};
use crate::store::{open_record, Record};
use crate::Error;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The digest that ties a prepared result to the record it was computed
/// from: blake3 of the record's bytes, its integrity check included.
pub type RecordDigest = [u8; 32];

/// The [`RecordDigest`] of a stored record's bytes.
pub fn record_digest(record: &[u8]) -> RecordDigest {
    *blake3::hash(record).as_bytes()
}

/// A key's next state and what the engine records of the change.
#[derive(Clone, Debug)]
pub(crate) struct Next {
    /// The item hash of the state before (`None`: the key was absent).
    pub old_h: Option<u128>,
    /// The new state, sealed as its record.
    pub record: Record,
    /// The item hash of the new state.
    pub new_h: u128,
    /// The new state's causal token.
    pub token: CausalToken,
    /// What travels to peers: a write's delta, or a merge's novel part.
    pub delta: Value,
    /// The encoded size of `(key, delta)` as a delta-group entry (0 when
    /// not measured: a merge on a node that does not relay).
    pub delta_size: usize,
    /// The conflicts a merge resolved (none for a local write).
    pub conflicts: Conflicts,
}

/// What merging a remote state into a key does.
#[derive(Clone, Debug)]
pub(crate) enum Merge {
    /// No honest peer sends it (see [`impossible`]): refused.
    Impossible(&'static str),
    /// It brings nothing new (a remote LWW write that arrives superseded
    /// still resolved a conflict).
    Redundant(Conflicts),
    /// It changes the key.
    Changed(Box<Next>),
}

fn entry_size(key: &Key, delta: &Value) -> Result<usize, Error> {
    Ok(proto::to_bytes(&(key, delta))?.len())
}

/// A write's operations on one key, applied one by one to its state.
pub(crate) struct Applying {
    /// The item hash of the state before.
    old_h: Option<u128>,
    /// The state so far. It is moved, not copied; a key written for the
    /// first time has its delta as its state (`next` stays `None` until a
    /// second operation needs both): at 10^5 set elements a copy or a join
    /// of the whole state is a sizeable part of the write.
    next: Option<Value>,
    /// The joined deltas so far.
    delta: Option<Value>,
}

impl Applying {
    /// Starts from `key`'s current state.
    pub(crate) fn start(key: &Key, current: Option<Value>) -> Result<Applying, Error> {
        Ok(Applying {
            old_h: current.as_ref().map(|v| item_hash(key, v)).transpose()?,
            next: current,
            delta: None,
        })
    }

    /// Applies the next operation.
    pub(crate) fn apply(&mut self, op: &Op, stamp: WriteStamp) -> Result<(), Error> {
        let state = match (&mut self.next, &self.delta) {
            (Some(n), _) => Some(&*n),
            (None, Some(d)) => {
                self.next = Some(d.clone());
                self.next.as_ref()
            }
            (None, None) => None,
        };
        let d = Value::apply(state, op, stamp)?;
        if let Some(n) = &mut self.next {
            n.join(&d);
        }
        match &mut self.delta {
            Some(acc) => acc.join(&d),
            None => self.delta = Some(d),
        }
        Ok(())
    }

    /// The new state, sealed, with what the engine records of the change.
    pub(crate) fn finish(self, key: &Key) -> Result<Next, Error> {
        let delta = self
            .delta
            .ok_or_else(|| Error::InvalidOp("a write with no operation on a key".into()))?;
        let new = self.next.as_ref().unwrap_or(&delta);
        debug_assert!(new.is_well_formed(), "a local write broke a CRDT invariant on {key:?}");
        Ok(Next {
            old_h: self.old_h,
            // Sealed once here, the record is what the store writes.
            record: Record::seal(key, new)?,
            new_h: item_hash(key, new)?,
            token: CausalToken::of(Some(new)),
            delta_size: entry_size(key, &delta)?,
            delta,
            conflicts: Conflicts::default(),
        })
    }
}

/// A key of a write being applied by the engine: its own work, or a result
/// prepared beside it.
pub(crate) enum Slot {
    /// Applied here, operation by operation.
    Applying(Applying),
    /// Taken from [`Prepared`]: every operation on the key is in it.
    Prepared(Box<Next>),
}

/// Applies a write's operations on one key, in order, to its current state.
fn local_next(key: &Key, current: Option<Value>, ops: &[&Op], stamp: WriteStamp) -> Result<Next, Error> {
    let mut a = Applying::start(key, current)?;
    for op in ops {
        a.apply(op, stamp)?;
    }
    a.finish(key)
}

/// Merges a remote state into a key's current state, keeping only its
/// novel part. `measure`: size the novel part as a delta-group entry (for
/// relaying); `check_whole`: assert that joining the novel part equals
/// joining the whole state (a test and simulator check).
pub(crate) fn remote_next(
    id: ReplicaId,
    key: &Key,
    current: Option<Value>,
    remote: Arc<Value>,
    measure: bool,
    check_whole: bool,
) -> Result<Merge, Error> {
    if let Some(why) = impossible(id, &remote, current.as_ref()) {
        return Ok(Merge::Impossible(why));
    }
    let whole = check_whole.then(|| {
        let mut w = (*remote).clone();
        if let Some(c) = &current {
            w.join(c);
        }
        w
    });
    let novel = current.as_ref().and_then(|c| c.novel(&remote));
    let before = Before::of(current.as_ref(), &remote, novel.as_ref());
    let novel = match current {
        Some(_) => novel,
        // A received entry is usually its value's only holder: no copy.
        None => Some(Arc::unwrap_or_clone(remote)),
    };
    let Some(novel) = novel else {
        return Ok(Merge::Redundant(before.redundant()));
    };
    // Whether the join changed the state is told by its digest (a 128-bit
    // hash of the value's canonical form, which the anti-entropy tree
    // compares the same way).
    let old_h = current.as_ref().map(|v| item_hash(key, v)).transpose()?;
    // The state is moved into the join, not copied; a key new here takes
    // the novel part itself as its state.
    let joined = current.map(|mut c| {
        c.join(&novel);
        c
    });
    let next = joined.as_ref().unwrap_or(&novel);
    debug_assert!(next.is_well_formed(), "a remote join broke a CRDT invariant on {key:?}");
    if let Some(whole) = whole {
        assert!(
            whole == *next,
            "joining the novel part of {key:?} differs from the whole join: {next:?} vs {whole:?}"
        );
    }
    let new_h = item_hash(key, next)?;
    if old_h == Some(new_h) {
        return Ok(Merge::Redundant(before.redundant()));
    }
    Ok(Merge::Changed(Box::new(Next {
        old_h,
        record: Record::seal(key, next)?,
        new_h,
        token: CausalToken::of(Some(next)),
        delta_size: if measure { entry_size(key, &novel)? } else { 0 },
        conflicts: before.after(next),
        delta: novel,
    })))
}

/// Why no honest peer could have sent `remote` to replica `id`, whose state
/// of the key is `current`: a dot of `id` it never created, a dot counter
/// past the limit, or a counter total of `id` above its own. Such entries
/// are dropped and counted; the rest of the frame is applied.
pub(crate) fn impossible(id: ReplicaId, remote: &Value, current: Option<&Value>) -> Option<&'static str> {
    #[cfg(feature = "planted-bugs")]
    if crate::planted::active(crate::planted::PlantedBug::HostileAccepted) {
        return None;
    }
    let mine = current.map(Value::context).unwrap_or_default();
    let my_max = mine.next_dot(id).counter - 1;
    for (r, hi) in remote.context().maxima() {
        if hi > MAX_DOT_COUNTER {
            return Some("dot counter past the limit");
        }
        if r == id && hi > my_max {
            return Some("a dot of this replica that it never created");
        }
    }
    if let Some((inc, dec)) = remote.counter_entry(id) {
        let (my_inc, my_dec) = current.and_then(|c| c.counter_entry(id)).unwrap_or((0, 0));
        if inc > my_inc || dec > my_dec {
            return Some("a counter total of this replica above its own");
        }
    }
    None
}

/// One key's prepared result.
#[derive(Clone, Debug)]
struct PreparedKey {
    /// Computed under this replica id.
    replica: ReplicaId,
    /// From this record (`None`: the key was absent).
    base: Option<RecordDigest>,
    /// What it was computed for.
    source: Source,
    merge: Merge,
}

/// What a prepared result was computed for.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A write with this many operations on the key.
    Write(usize),
    /// Merging this remote state (the very one the message holds: a state
    /// of the same key from another message, e.g. an earlier section held
    /// back for its order, is another input).
    Merge(Arc<Value>),
}

/// What the engine is about to do to a key: what a prepared result must
/// have been computed for ([`Source`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Want<'a> {
    /// A write with this many operations on the key.
    Write(usize),
    /// Merging this remote state.
    Merge(&'a Arc<Value>),
}

impl Source {
    /// Whether a result for `self` is one for `want`.
    fn is(&self, want: Want<'_>) -> bool {
        match (self, want) {
            (Source::Write(a), Want::Write(b)) => *a == b,
            (Source::Merge(a), Want::Merge(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Results computed beside the engine for one input: a write
/// ([`Prepared::write`], handed to
/// [`Replica::write_prepared`](super::Replica::write_prepared)) or a peer
/// frame ([`Decoded::prepare`](super::Decoded::prepare)). See the module
/// documentation for when the engine uses them.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    keys: BTreeMap<Key, PreparedKey>,
    bytes: usize,
}

impl Prepared {
    /// Prepares the keys of a write whose operations carry at least
    /// `min_elements` elements between them ([`Op::elements`]) and none of
    /// which reads the clock, against their records as `record` returns
    /// them. A key whose work fails (a type mismatch, a decode error) is
    /// left to the engine, which then fails the write the same way. Once the
    /// results hold `max_bytes` ([`Prepared::bytes`]), the rest are left to
    /// the engine too.
    pub fn write<R: AsRef<[u8]>>(
        replica: ReplicaId,
        ops: &[(Key, Op)],
        min_elements: usize,
        max_bytes: usize,
        mut record: impl FnMut(&Key) -> Result<Option<R>, Error>,
    ) -> Prepared {
        let mut by_key: BTreeMap<&Key, Vec<&Op>> = BTreeMap::new();
        for (k, op) in ops {
            by_key.entry(k).or_default().push(op);
        }
        // The engine stamps the write; these operations do not read it.
        let stamp = WriteStamp {
            replica,
            time: HlcTimestamp::default(),
        };
        let mut out = Prepared::default();
        for (key, kops) in by_key {
            if out.bytes >= max_bytes {
                break;
            }
            if kops.iter().any(|op| op.uses_clock())
                || kops.iter().map(|op| op.elements()).sum::<usize>() < min_elements
                || !key.is_valid()
            {
                continue;
            }
            let prepared = (|| {
                let base = record(key)?;
                let current = base.as_ref().map(|r| open_record(key, r.as_ref())).transpose()?;
                let next = local_next(key, current, &kops, stamp)?;
                Ok::<_, Error>((base.map(|r| record_digest(r.as_ref())), next))
            })();
            if let Ok((base, next)) = prepared {
                out.insert(
                    key.clone(),
                    replica,
                    base,
                    Source::Write(kops.len()),
                    Merge::Changed(Box::new(next)),
                );
            }
        }
        out
    }

    /// Prepares merges of remote states into their keys' records (each
    /// novel part measured for relaying).
    fn merges<R: AsRef<[u8]>>(
        replica: ReplicaId,
        entries: impl Iterator<Item = (Key, Arc<Value>)>,
        max_bytes: usize,
        mut record: impl FnMut(&Key) -> Result<Option<R>, Error>,
    ) -> Prepared {
        let mut out = Prepared::default();
        for (key, remote) in entries {
            if out.bytes >= max_bytes {
                break;
            }
            if out.keys.contains_key(&key) {
                // A second state of the key in the frame is merged after the
                // first, into a record not stored yet: the engine does it.
                continue;
            }
            let prepared = (|| {
                let base = record(&key)?;
                let current = base.as_ref().map(|r| open_record(&key, r.as_ref())).transpose()?;
                let merge = remote_next(replica, &key, current, remote.clone(), true, false)?;
                Ok::<_, Error>((base.map(|r| record_digest(r.as_ref())), merge))
            })();
            if let Ok((base, merge)) = prepared {
                out.insert(key, replica, base, Source::Merge(remote), merge);
            }
        }
        out
    }

    /// Prepares the merges of a peer message's delta entries. (Anti-entropy
    /// states are merged by the engine: they are not shared values a
    /// result could be tied to.)
    pub(crate) fn message<R: AsRef<[u8]>>(
        replica: ReplicaId,
        msg: &Message,
        max_bytes: usize,
        record: impl FnMut(&Key) -> Result<Option<R>, Error>,
    ) -> Prepared {
        match msg {
            Message::Delta { sections, .. } => Prepared::merges(
                replica,
                sections
                    .iter()
                    .flat_map(|s| s.entries.iter().map(|(k, v)| (k.clone(), v.clone()))),
                max_bytes,
                record,
            ),
            _ => Prepared::default(),
        }
    }

    fn insert(&mut self, key: Key, replica: ReplicaId, base: Option<RecordDigest>, source: Source, merge: Merge) {
        self.bytes += key.as_str().len() + 128;
        if let Merge::Changed(n) = &merge {
            // The token is the state's context: within the record's size.
            self.bytes += 2 * n.record.as_bytes().len() + n.delta_size;
        }
        self.keys.insert(
            key,
            PreparedKey {
                replica,
                base,
                source,
                merge,
            },
        );
    }

    /// How many keys were prepared.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when nothing was prepared.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// About how much memory the results hold (records, deltas, tokens):
    /// what a driver charges its queues for them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the result prepared for `key` and `want`, if any: fresh if
    /// it was computed under `replica` from the record whose digest
    /// `stored` returns; stale otherwise (dropped). A result for another
    /// remote state of the key stays for that one.
    pub(crate) fn take(
        &mut self,
        key: &Key,
        replica: ReplicaId,
        want: Want<'_>,
        stored: impl FnOnce() -> Result<Option<RecordDigest>, Error>,
    ) -> Result<Taken, Error> {
        match self.keys.get(key) {
            None => return Ok(Taken::Absent),
            Some(p) if matches!(want, Want::Merge(_)) && !p.source.is(want) => return Ok(Taken::Absent),
            Some(_) => {}
        }
        let Some(p) = self.keys.remove(key) else {
            return Ok(Taken::Absent);
        };
        if p.replica != replica || !p.source.is(want) {
            return Ok(Taken::Stale);
        }
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::PreparedBaseUnchecked) {
            return Ok(Taken::Fresh(p.merge));
        }
        if stored()? != p.base {
            return Ok(Taken::Stale);
        }
        Ok(Taken::Fresh(p.merge))
    }
}

/// What [`Prepared::take`] found for a key.
pub(crate) enum Taken {
    /// Nothing was prepared for it.
    Absent,
    /// A result computed from another record, or for other operations.
    Stale,
    /// A result the engine can take as its own.
    Fresh(Merge),
}
