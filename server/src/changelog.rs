//! The durable change log in sled (see `lattice_core::log` for what a
//! change is).
//!
//! | sled key | value |
//! |---|---|
//! | `c` + partition (2 bytes BE) + seq (8 bytes BE) | 8-byte blake3 check, then MessagePack `(gseq, Change)` |
//! | `mlog` | [`LogMeta`] |
//!
//! The engine's `WriteBatch` carries the changes beside the states they
//! produced; the store numbers them and writes them, and the log's
//! metadata, in the same sled batch as the states, so a change is in the
//! log exactly when its state is stored, with the same durability.
//!
//! Retention. After each flush's entries, the log drops its oldest changes
//! (the smallest node-wide number among the partitions' first ones) while it
//! holds more than `retention_bytes`, or while the oldest was applied more
//! than `retention_age` ago, at most [`TRIM_PER_FLUSH`] per flush, in the
//! same batch. A partition thus always holds a contiguous range of its
//! sequence numbers, `first..next`; `first` is how many it dropped.

use lattice_core::log::{partition_of, Change, LogCursor, Logged, MAX_PARTITIONS};
use lattice_core::proto::RegionId;
use lattice_core::proto::{from_bytes, to_bytes};
use lattice_core::{Error, Key};
use serde::{Deserialize, Serialize};

/// The change log's settings (`[log]` in the node's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// Partitions of a new log (an existing log keeps its own number).
    pub partitions: u16,
    /// Bytes of changes retained (sled keys and values, before sled's own
    /// overhead).
    pub retention_bytes: u64,
    /// Changes applied longer ago than this are dropped (0: no limit).
    pub retention_age_ms: u64,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            partitions: 16,
            retention_bytes: 256 << 20,
            retention_age_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// Most changes one flush drops for retention, so that a flush after a
/// retention change (or a long pause) does not stall the engine; the rest
/// goes in the next flushes.
pub const TRIM_PER_FLUSH: usize = 10_000;

/// The log's metadata, stored in every batch that changes the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    /// Random, drawn when the log was created: cursors name it.
    pub id: u64,
    /// The first retained sequence number of each partition.
    pub first: Vec<u64>,
    /// The next sequence number of each partition.
    pub next: Vec<u64>,
    /// The next node-wide number.
    pub next_gseq: u64,
    /// Bytes of the retained changes.
    pub bytes: u64,
}

impl LogMeta {
    /// How many partitions the log has.
    pub fn partitions(&self) -> u16 {
        self.next.len() as u16
    }

    /// Changes dropped by retention since the log was created.
    pub fn trimmed(&self) -> u64 {
        self.first.iter().sum()
    }

    /// The cursor after every retained change.
    pub fn end(&self) -> LogCursor {
        LogCursor {
            log: self.id,
            next: self.next.clone(),
        }
    }
}

/// The sled key of change `seq` of `partition`.
pub fn entry_key(partition: u16, seq: u64) -> [u8; 11] {
    let mut k = [0u8; 11];
    k[0] = b'c';
    k[1..3].copy_from_slice(&partition.to_be_bytes());
    k[3..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The sled key of the log's metadata.
pub const META_KEY: &[u8] = b"mlog";

fn check(key: &[u8], body: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(body);
    let mut out = [0; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// Encodes a change for sled key `key`: its check, then its body.
fn seal(key: &[u8], gseq: u64, change: &Change) -> Result<Vec<u8>, Error> {
    let body = to_bytes(&(gseq, change))?;
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&check(key, &body));
    out.extend_from_slice(&body);
    let c = check(key, &out[8..]);
    out[..8].copy_from_slice(&c);
    Ok(out)
}

/// Decodes the entry at sled key `key`; a changed byte is `Error::Corrupt`.
pub fn open_entry(key: &[u8], value: &[u8]) -> Result<Logged, Error> {
    let corrupt = || Error::Corrupt {
        key: format!("change log entry {key:?}"),
    };
    if key.len() != 11 || key[0] != b'c' || value.len() < 8 || value[..8] != check(key, &value[8..]) {
        return Err(corrupt());
    }
    let partition = u16::from_be_bytes([key[1], key[2]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[3..]);
    let (gseq, change): (u64, Change) = from_bytes(&value[8..])?;
    Ok(Logged {
        partition,
        seq: u64::from_be_bytes(seq),
        gseq,
        change,
    })
}

/// The first retained change of a partition, as retention needs it.
#[derive(Clone, Copy, Debug)]
struct Front {
    gseq: u64,
    bytes: u64,
    applied_ms: u64,
}

/// The engine side of the log: numbers new changes and trims old ones.
pub struct ChangeLog {
    settings: LogSettings,
    meta: LogMeta,
    /// The log's metadata as of the last write (entries below its `next`
    /// are in sled).
    stored_next: Vec<u64>,
    /// Entries of changes applied since the last flush.
    pending: Vec<([u8; 11], Vec<u8>)>,
    /// The node-wide number, key and origin of each pending change.
    pending_notices: Vec<(u64, Key, RegionId)>,
    /// The same, of changes written since the driver last took them (only
    /// kept when `collect` is on).
    flushed: Vec<(u64, Key, RegionId)>,
    collect: bool,
    dirty: bool,
    fronts: Vec<Option<Front>>,
}

impl ChangeLog {
    /// The log stored in `tree`, or a new one with `settings.partitions`
    /// partitions and id `new_id`. A stored log with another partition
    /// count is refused (its keys would change partition). With
    /// `lost_tail`, a stored log takes id `new_id` (written at once): its
    /// last life may have lost changes readers had seen, whose positions
    /// now number other changes, so cursors of the old id must fail.
    pub fn load(tree: &sled::Tree, settings: LogSettings, new_id: u64, lost_tail: bool) -> Result<ChangeLog, String> {
        if settings.partitions == 0 || settings.partitions > MAX_PARTITIONS {
            return Err(format!(
                "log partitions must be 1 to {MAX_PARTITIONS}, not {}",
                settings.partitions
            ));
        }
        let stored = tree.get(META_KEY).map_err(|e| e.to_string())?;
        let fresh = stored.is_none();
        let meta = match stored {
            Some(raw) => {
                let mut m: LogMeta = from_bytes(&raw).map_err(|e| format!("the change log's metadata: {e}"))?;
                if m.partitions() != settings.partitions {
                    return Err(format!(
                        "the change log has {} partitions and the configuration says {}: \
                         the partition count is fixed when a data dir is created",
                        m.partitions(),
                        settings.partitions
                    ));
                }
                if m.first.len() != m.next.len() || m.first.iter().zip(&m.next).any(|(f, n)| f > n) {
                    return Err("the change log's metadata is inconsistent".into());
                }
                if lost_tail {
                    let old = m.id;
                    m.id = if new_id.max(1) == old {
                        old.wrapping_add(1).max(1)
                    } else {
                        new_id.max(1)
                    };
                    tree.insert(META_KEY, to_bytes(&m).map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?;
                    tracing::info!(old = %format!("{old:016x}"), new = %format!("{:016x}", m.id), "the last life was asynchronous and crashed: the change log takes a new id");
                }
                m
            }
            None => LogMeta {
                id: new_id.max(1),
                first: vec![0; settings.partitions as usize],
                next: vec![0; settings.partitions as usize],
                next_gseq: 0,
                bytes: 0,
            },
        };
        Ok(ChangeLog {
            settings,
            stored_next: meta.next.clone(),
            fronts: vec![None; meta.next.len()],
            dirty: fresh,
            meta,
            pending: Vec::new(),
            pending_notices: Vec::new(),
            flushed: Vec::new(),
            collect: false,
        })
    }

    /// The log's metadata, pending changes included.
    pub fn meta(&self) -> &LogMeta {
        &self.meta
    }

    /// Numbers and encodes `changes`; nothing changes if one fails to encode.
    pub fn append(&mut self, changes: &[Change]) -> Result<(), Error> {
        let parts = self.meta.partitions();
        let mut next = self.meta.next.clone();
        let mut gseq = self.meta.next_gseq;
        let mut out = Vec::with_capacity(changes.len());
        let mut bytes = 0;
        for c in changes {
            let p = partition_of(&c.key, parts);
            let key = entry_key(p, next[p as usize]);
            let value = seal(&key, gseq, c)?;
            bytes += (key.len() + value.len()) as u64;
            next[p as usize] += 1;
            out.push((key, value));
            if self.collect {
                self.pending_notices.push((gseq, c.key.clone(), c.origin.clone()));
            }
            gseq += 1;
        }
        if !out.is_empty() {
            self.meta.next = next;
            self.meta.next_gseq = gseq;
            self.meta.bytes += bytes;
            self.pending.extend(out);
            self.dirty = true;
        }
        Ok(())
    }

    /// Adds the pending entries, the dropped ones and the metadata to `b`.
    /// `tree` holds the entries written before; `now_ms` is the wall clock.
    /// Call [`ChangeLog::written`] once `b` is applied.
    pub fn write(
        &mut self,
        tree: &sled::Tree,
        sealer: &crate::crypt::Sealer<'_>,
        now_ms: u64,
        b: &mut sled::Batch,
    ) -> Result<(), Error> {
        for (k, v) in &self.pending {
            b.insert(&k[..], sealer.seal(k, v)?);
        }
        let min_age_ms = now_ms.saturating_sub(self.settings.retention_age_ms);
        for _ in 0..TRIM_PER_FLUSH {
            // The oldest stored front among the partitions.
            let mut oldest: Option<(u16, Front)> = None;
            for p in 0..self.meta.partitions() {
                let i = p as usize;
                if self.meta.first[i] >= self.stored_next[i] {
                    continue;
                }
                let front = match self.fronts[i] {
                    Some(f) => f,
                    None => {
                        let key = entry_key(p, self.meta.first[i]);
                        let raw = tree.get(key).map_err(|e| Error::Store(e.to_string()))?.ok_or_else(|| {
                            Error::Store(format!("change log entry {p}/{} is missing", self.meta.first[i]))
                        })?;
                        // Counted at its plaintext size, as `append` did.
                        let raw = sealer.open(&key, raw)?;
                        let e = open_entry(&key, &raw)?;
                        let f = Front {
                            gseq: e.gseq,
                            bytes: (key.len() + raw.len()) as u64,
                            applied_ms: e.change.applied.wall_ms,
                        };
                        self.fronts[i] = Some(f);
                        f
                    }
                };
                if oldest.is_none_or(|(_, o)| front.gseq < o.gseq) {
                    oldest = Some((p, front));
                }
            }
            let Some((p, front)) = oldest else { break };
            let too_big = self.meta.bytes > self.settings.retention_bytes;
            let too_old = self.settings.retention_age_ms > 0 && front.applied_ms < min_age_ms;
            if !too_big && !too_old {
                break;
            }
            let i = p as usize;
            b.remove(&entry_key(p, self.meta.first[i])[..]);
            self.meta.first[i] += 1;
            self.meta.bytes = self.meta.bytes.saturating_sub(front.bytes);
            self.fronts[i] = None;
            self.dirty = true;
        }
        if self.dirty {
            b.insert(META_KEY, to_bytes(&self.meta)?);
        }
        Ok(())
    }

    /// `write`'s batch was applied.
    pub fn written(&mut self) {
        self.pending.clear();
        self.flushed.append(&mut self.pending_notices);
        self.stored_next.clone_from(&self.meta.next);
        self.dirty = false;
    }

    /// Keeps the node-wide number, key and origin of every change written
    /// from now on, for [`ChangeLog::take_written`] (the watch feed).
    pub fn collect_written(&mut self) {
        self.collect = true;
    }

    /// The changes written since the last call, in order.
    pub fn take_written(&mut self) -> Vec<(u64, Key, RegionId)> {
        std::mem::take(&mut self.flushed)
    }

    /// True when changes wait for the next write.
    pub fn has_pending(&self) -> bool {
        self.dirty || !self.pending.is_empty()
    }
}

/// Reads the log as flushed, from any thread.
pub struct LogReader<'a> {
    /// The tree holding the log.
    pub tree: &'a sled::Tree,
    /// The data keys its entries are encrypted with.
    pub crypt: &'a crate::crypt::Crypt,
}

impl LogReader<'_> {
    /// The newest changes' node-wide numbers, keys and origins, newest
    /// first, for as long as `take` accepts them (the watch feed's ring
    /// after a restart). Merges the partitions' newest entries.
    pub fn newest(&self, take: &mut dyn FnMut(u64, Key, RegionId) -> bool) -> Result<(), Error> {
        let Some(meta) = self.meta()? else { return Ok(()) };
        let crypt = self.crypt;
        let mut iters: Vec<_> = (0..meta.partitions())
            .map(|p| self.tree.range(entry_key(p, 0)..entry_key(p, u64::MAX)).rev())
            .collect();
        let mut heads: std::collections::BinaryHeap<(u64, usize, Key, RegionId)> = Default::default();
        let pull = |i: usize, iters: &mut Vec<_>, heads: &mut std::collections::BinaryHeap<_>| -> Result<(), Error> {
            let it: &mut std::iter::Rev<sled::Iter> = &mut iters[i];
            if let Some(item) = it.next() {
                let (k, v) = item.map_err(|e| Error::Store(e.to_string()))?;
                let v = crypt.sealer().open(&k, v)?;
                let e = open_entry(&k, &v)?;
                heads.push((e.gseq, i, e.change.key, e.change.origin));
            }
            Ok(())
        };
        for i in 0..iters.len() {
            pull(i, &mut iters, &mut heads)?;
        }
        while let Some((gseq, i, key, origin)) = heads.pop() {
            if !take(gseq, key, origin) {
                break;
            }
            pull(i, &mut iters, &mut heads)?;
        }
        Ok(())
    }

    /// The log's metadata as of the last flush (`None`: no log yet).
    pub fn meta(&self) -> Result<Option<LogMeta>, Error> {
        match self.tree.get(META_KEY).map_err(|e| Error::Store(e.to_string()))? {
            Some(raw) => from_bytes(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// Hands `visit` the changes of `partition` from `from` on, in order,
    /// with their stored size, until it returns false. Returns how far it read: the sequence number
    /// after the last change visited.
    pub fn scan(
        &self,
        partition: u16,
        from: u64,
        visit: &mut dyn FnMut(Logged, usize) -> Result<bool, Error>,
    ) -> Result<u64, Error> {
        let start = entry_key(partition, from);
        let end = entry_key(partition, u64::MAX);
        let mut at = from;
        for item in self.tree.range(start..end) {
            let (k, v) = item.map_err(|e| Error::Store(e.to_string()))?;
            let size = k.len() + v.len();
            let v = self.crypt.sealer().open(&k, v)?;
            let e = open_entry(&k, &v)?;
            let seq = e.seq;
            if !visit(e, size)? {
                return Ok(at);
            }
            at = seq + 1;
        }
        Ok(at)
    }
}
