//! The sled implementation of the engine's `Store`.
//!
//! One sled tree holds everything, under one-byte prefixes, so that a
//! `WriteBatch` (states, metadata, client op ids) is one atomic
//! `apply_batch`: the states and the counters cannot disagree.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `k` | bucket (4 bytes BE) + key | `Value` as a sealed record (8-byte blake3 check, then the body) |
//! | `m` | `meta` | `Meta` |
//! | `i` | `identity` | node name and format version |
//! | `p` | chunk number (8 bytes BE) | the op ids one flush applied, 16 bytes BE each |
//! | `i` | `keyring` | the data keys wrapped under the encryption key, when encrypted (`crate::crypt`) |
//!
//! Encryption at rest. With a key configured, `k` and `c` values are
//! encrypted (`crate::crypt`) where they enter sled, in [`SledStore`]'s
//! flush, and decrypted where they leave it (every read of sled: the
//! engine's, [`StoreReader`]'s, the log reader's). What the engine, the
//! pending changes and the record cache hold is plaintext, so a value
//! re-encrypted under another data key behind the engine's back (the
//! re-encryption pass) never leaves stale ciphertext in memory.
//!
//! Client op ids. A write's op id is what makes its retry idempotent, so
//! it is stored in the same batch as the write. One sled entry per flush
//! holds the ids of every write it stores (a chunk), not two index entries
//! per write: the ids are looked up in memory (a hash set of the last
//! [`OP_ID_RETENTION`], loaded from the chunks at open), and a chunk is
//! removed once the chunks after it hold that many ids. Written by older
//! builds, and migrated at open: a delta-group per write under `b` (the
//! buffer is no longer stored; see `lattice_core::store::WriteBatch`), and
//! `o` (op id to order) and `q` (order to op id) per op id.
//!
//! Integrity. sled checks its own log with CRCs, but a bit that flips in a
//! page after sled verified it, or in a page sled does not re-verify, would
//! be read back as a different value and replicated. So every state is a
//! sealed record (`lattice_core::store::seal_record`) verified on every
//! read: a corrupt record is `Error::Corrupt { key }`, never a value. The
//! engine reads every key at open, so a node with a corrupt record refuses
//! to start (see `main.rs` for what the operator is told).
//!
//! Batching. sled's `apply_batch` writes out its in-memory log buffer on
//! every call (it rolls the I/O buffer to pin the batch: one `pwrite`, one
//! `sync_file_range` and a thread-pool wake-up), which made every client
//! write cost a disk write even in `async` mode. So `apply` only records the
//! batch's changes in memory, where reads see them, and `flush` joins
//! everything since the last flush into one `apply_batch`. A joined batch is
//! as atomic as its parts, and nothing applied is durable before `flush`
//! either way. The pending changes are bounded by what the engine writes
//! between two flushes (one engine step, or at most `group_commit_ms`).
//!
//! Durability. sled's `flush` writes its buffers and calls
//! `sync_file_range` on Linux (sled issues #928, #1452), which survives a
//! process crash but does not flush a volatile disk write cache, so it is
//! not power-loss safe. In `sync` and `group` modes this store therefore
//! also `fsync`s sled's log file after the flush.
//!
//! Blobs. sled 0.34 stores a log message larger than its segment size
//! over `MINIMUM_ITEMS_PER_SEGMENT`, less the segment header (512 KiB / 4,
//! less 20 bytes: just under 128 KiB; `pagecache/logger.rs`,
//! `reserve_inner`), in a file of its own, `DIR/blobs/<lsn>`, written by
//! `write_blob` (`pagecache/blob_io.rs`) with `write_all` and never synced;
//! nor is the `blobs` directory. A message is a page: one value's update,
//! or a consolidated leaf of up to 17 entries, so values far below 128 KiB
//! can end up in a blob too, and keeping values small does not avoid them.
//! So the durable flush also `fsync`s every blob file created since the
//! last one, and the `blobs` directory, before the log's `fsync`: an
//! acknowledged write never points at a blob a power loss can take away.
//! A blob sled writes between two flushes (a consolidation) is synced by
//! the next one. The data directory itself (and its parent) is synced
//! when it is created.

use crate::changelog::{ChangeLog, LogMeta, LogReader, LogSettings};
use crate::crypt::{Crypt, Keys};
use lattice_core::crdt::Value;
use lattice_core::proto::client::OpId;
use lattice_core::proto::{from_bytes, to_bytes, RegionId};
use lattice_core::replica::{record_digest, RecordDigest};
use lattice_core::store::{open_record, seal_record, Meta, Store, WriteBatch, OP_ID_RETENTION};
use lattice_core::{Error, Key};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// On-disk format version of this store. Version 2 sealed the states with
/// an integrity check; version 3 stores a write as one entry (op ids in
/// chunks, no delta buffer: issue 15). Older directories are migrated at
/// open (a version-1 one has its states sealed one by one; then the per-
/// write entries are rewritten), and the version raised, so that an older
/// build refuses a migrated directory (`WrongFormat`) rather than opening
/// it without the op ids it would no longer find. Any other is refused.
pub const FORMAT_VERSION: u32 = 3;

/// When a write is acknowledged relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Flush and fsync at the end of every engine step, before the writes
    /// taken in that step (up to 1,024 inputs) are acknowledged.
    Sync,
    /// Acknowledge after a shared flush + fsync (the default): as soon as
    /// the engine has taken every queued input, or, while input keeps
    /// queueing, at the latest `group_commit_ms` after the first unflushed
    /// write.
    Group,
    /// Acknowledge before the flush; sled writes its log in the background
    /// every 500 ms. A process crash can lose acknowledged writes.
    Async,
}

/// Whose a data dir is, and its format version (`iidentity`).
#[derive(Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) node: String,
    pub(crate) format: u32,
}

/// Errors opening a data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// sled failed.
    #[error("opening sled at {path}: {source}")]
    Sled {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: sled::Error,
    },
    /// The directory belongs to another node.
    #[error("the data dir {path} belongs to node {found:?}, not {expected:?}")]
    WrongNode {
        /// The directory.
        path: PathBuf,
        /// Who owns it.
        found: String,
        /// Who tried to open it.
        expected: String,
    },
    /// The directory has another format version.
    #[error("the data dir {path} has format version {found}, this build reads version {FORMAT_VERSION}")]
    WrongFormat {
        /// The directory.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The identity record is unreadable.
    #[error("the data dir {path} has a corrupt identity record: {reason}")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The change log cannot be opened as configured (another partition
    /// count) or its metadata is unreadable.
    #[error("the change log in {path}: {reason}")]
    Log {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data dir is encrypted and the key is missing or wrong, or a
    /// key does not parse.
    #[error("{0}")]
    Encryption(crate::crypt::CryptError),
}

impl From<crate::crypt::CryptError> for OpenError {
    fn from(e: crate::crypt::CryptError) -> OpenError {
        OpenError::Encryption(e)
    }
}

/// A `Store` on sled.
pub struct SledStore {
    /// The data keys (off without encryption).
    crypt: Arc<Crypt>,
    db: sled::Db,
    tree: sled::Tree,
    dir: PathBuf,
    durability: Durability,
    /// Changes applied since the last flush, by sled key (`None`: removed).
    pending: BTreeMap<Vec<u8>, Option<sled::IVec>>,
    /// Records the engine read or wrote lately (see [`RecordCache`]).
    cache: std::cell::RefCell<RecordCache>,
    /// sled's log file, opened at the first fsync.
    log: Option<std::fs::File>,
    /// The client op ids remembered, pending ones included.
    ops: OpIds,
    /// The newest blob file (by its lsn name) already fsynced.
    blobs_synced: Option<u64>,
    /// Blob files fsynced since open.
    blob_syncs: u64,
    /// The change log.
    changelog: ChangeLog,
    /// False only in benchmarks that measure the log's cost
    /// ([`SledStore::without_log`]).
    logging: bool,
    /// Each log partition's next position as of the last flush that
    /// reached the disk, shared with the readers ([`StoreReader::log_durable_end`]).
    durable_log: std::sync::Arc<std::sync::RwLock<Vec<u64>>>,
}

/// Default bound of the engine's cache of hot records (`[memory]
/// record_cache_bytes`).
pub const RECORD_CACHE_BYTES: usize = 64 << 20;

/// Records (by sled key) the engine read from sled or wrote to it lately,
/// so that a write to a hot key does not look its state up in sled again
/// (a sled lookup was a quarter of the engine's work per write). Only the
/// engine writes records, through [`SledStore::apply_pending`], which puts
/// each one here once sled holds it: the cache never holds a record sled
/// does not. Records are still opened (checksum and decode) on each use.
/// Bounded by bytes (each entry charged its key, its record and 64 bytes):
/// past the bound, every other entry is dropped.
struct RecordCache {
    map: std::collections::HashMap<Vec<u8>, sled::IVec>,
    bytes: usize,
    limit: usize,
    hits: u64,
    misses: u64,
}

impl RecordCache {
    fn new(limit: usize) -> Self {
        RecordCache {
            map: Default::default(),
            bytes: 0,
            limit,
            hits: 0,
            misses: 0,
        }
    }

    fn cost(k: &[u8], v: &[u8]) -> usize {
        k.len() + v.len() + 64
    }

    fn get(&mut self, k: &[u8]) -> Option<sled::IVec> {
        let v = self.map.get(k).cloned();
        match v {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        v
    }

    fn put(&mut self, k: &[u8], v: sled::IVec) {
        let cost = Self::cost(k, &v);
        if cost > self.limit / 4 {
            self.remove(k);
            return;
        }
        self.bytes += cost;
        if let Some(old) = self.map.insert(k.to_vec(), v) {
            self.bytes -= Self::cost(k, &old);
        }
        if self.bytes > self.limit {
            let mut keep = false;
            self.map.retain(|_, _| {
                keep = !keep;
                keep
            });
            self.bytes = self.map.iter().map(|(k, v)| Self::cost(k, v)).sum();
        }
    }

    fn remove(&mut self, k: &[u8]) {
        if let Some(old) = self.map.remove(k) {
            self.bytes -= Self::cost(k, &old);
        }
    }
}

/// Reads the values the last flush put in sled, from any thread, so that a
/// read need not wait for the engine (which may be busy with a large
/// operation for a second). It sees the engine's changes once flushed:
/// every acknowledged write, never one still pending.
#[derive(Clone)]
pub struct StoreReader {
    tree: sled::Tree,
    crypt: Arc<Crypt>,
    /// The data dir (`None`: a tool's reader made from a tree).
    dir: Option<PathBuf>,
    /// The store's durable log end (`None`: a tool's reader of a stopped
    /// node, whose whole log is on disk).
    durable_log: Option<std::sync::Arc<std::sync::RwLock<Vec<u64>>>>,
}

impl StoreReader {
    /// A reader of the store in `tree` (the `lattice` tree of a data dir
    /// opened by a tool while no node runs on it).
    pub fn from_tree(tree: sled::Tree, crypt: Arc<Crypt>) -> StoreReader {
        StoreReader {
            tree,
            crypt,
            dir: None,
            durable_log: None,
        }
    }

    /// The data dir, when known.
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The data keys the store's values are encrypted with.
    pub fn crypt(&self) -> &Arc<Crypt> {
        &self.crypt
    }

    /// The sled tree (what the re-encryption pass rewrites).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The value of `key` as of the last flush.
    pub fn get(&self, key: &Key) -> Result<Option<Value>, Error> {
        match self.record(key)? {
            Some(v) => open_record(key, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The stored record of `key` as of the last flush, undecoded (what
    /// [`Prepared`](lattice_core::replica::Prepared) results are computed from).
    pub fn record(&self, key: &Key) -> Result<Option<sled::IVec>, Error> {
        let k = value_key(key);
        match self.tree.get(&k).map_err(store_err)? {
            Some(v) => self.crypt.sealer().open(&k, v).map(Some),
            None => Ok(None),
        }
    }

    /// Each log partition's next position as of the last flush that
    /// reached the disk (`None`: no bound). A flush is visible in sled
    /// before its fsync ends, and a crash in between loses changes a
    /// reader could have read, whose positions the next life numbers
    /// again: log readers stop here (an asynchronous node's flushes never
    /// reach the disk; its log takes a new id after a crash instead).
    pub fn log_durable_end(&self) -> Option<Vec<u64>> {
        self.durable_log.as_ref().map(|d| match d.read() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }

    /// The change log as of the last flush.
    pub fn log(&self) -> LogReader<'_> {
        LogReader {
            tree: &self.tree,
            crypt: &self.crypt,
        }
    }

    /// Opens the data dir `dir` of a stopped node for reading (what
    /// `latticed backup` does): sled locks the directory, so this fails
    /// while a node runs on it. Keep the `sled::Db` as long as the reader.
    pub fn open_stopped(dir: &Path, keys: &Keys) -> Result<(sled::Db, StoreReader), OpenError> {
        let sled_err = |source| OpenError::Sled {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.join("conf").exists() || !dir.join("db").exists() {
            return Err(OpenError::Corrupt {
                path: dir.to_path_buf(),
                reason: "this is not a node's data directory (no sled files in it)".into(),
            });
        }
        let db = sled::Config::new().path(dir).open().map_err(sled_err)?;
        let tree = db.open_tree("lattice").map_err(sled_err)?;
        let crypt = Arc::new(Crypt::open(&tree, keys, dir, false)?);
        Ok((
            db,
            StoreReader {
                tree,
                crypt,
                dir: Some(dir.to_path_buf()),
                durable_log: None,
            },
        ))
    }

    /// The name of the node the store belongs to (`None`: a new store).
    pub fn node_name(&self) -> Result<Option<String>, Error> {
        match self.tree.get(b"iidentity").map_err(store_err)? {
            Some(raw) => Ok(Some(from_bytes::<Identity>(&raw)?.node)),
            None => Ok(None),
        }
    }

    /// The client op ids the store remembers as of the last flush, oldest
    /// first (at most about twice [`OP_ID_RETENTION`]: the chunks on disk).
    pub fn op_ids(&self) -> Result<Vec<OpId>, Error> {
        let mut out = Vec::new();
        for r in self.tree.scan_prefix(b"p") {
            let (_, v) = r.map_err(store_err)?;
            for id in v.chunks_exact(16) {
                let mut b = [0u8; 16];
                b.copy_from_slice(id);
                out.push(OpId(u128::from_be_bytes(b)));
            }
        }
        Ok(out)
    }

    /// The storage position of `key` (what [`StoreReader::records_after`]
    /// hands out and orders by).
    pub fn position(key: &Key) -> Vec<u8> {
        value_key(key)
    }

    /// Stored records after `after` (a position this returned before;
    /// `None`: from the first), in storage order (by key hash), handed to
    /// `visit` with their key and position until it returns false or every
    /// record was visited. Returns whether every record was visited.
    pub fn records_after(&self, after: Option<&[u8]>, visit: &mut RecordVisitor<'_>) -> Result<bool, Error> {
        use std::ops::Bound;
        let start = match after {
            Some(pos) => Bound::Excluded(pos.to_vec()),
            None => Bound::Included(b"k".to_vec()),
        };
        for item in self.tree.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(store_err)?;
            if k.first() != Some(&b'k') {
                break;
            }
            let name = std::str::from_utf8(k.get(5..).unwrap_or_default()).map_err(store_err)?;
            let v = self.crypt.sealer().open(&k, v)?;
            if !visit(Key::new(name)?, &k, v)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// What [`StoreReader::records_after`] hands each record to: its key, its
/// position, the record; returns whether to go on.
pub type RecordVisitor<'a> = dyn FnMut(Key, &[u8], sled::IVec) -> Result<bool, Error> + 'a;

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

fn value_key(key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + key.as_str().len());
    k.push(b'k');
    k.extend_from_slice(&key.hash().bucket().to_be_bytes());
    k.extend_from_slice(key.as_str().as_bytes());
    k
}

fn bucket_bound(bucket: u32) -> Vec<u8> {
    let mut k = vec![b'k'];
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

fn decode_entry(k: &[u8], v: &[u8]) -> Result<(Key, Value), Error> {
    let name = std::str::from_utf8(k.get(5..).unwrap_or_default()).map_err(store_err)?;
    let key = Key::new(name)?;
    let value = open_record(&key, v)?;
    Ok((key, value))
}

/// Seals every state of a format-1 directory (written before records had
/// an integrity check), then raises its version. A crash midway leaves the
/// version at 1 and the next open finishes: a record already sealed is
/// recognised by its check. States that do not decode are refused as
/// corrupt, as any unreadable record is.
fn migrate_v1(db: &sled::Db, tree: &sled::Tree, mut id: Identity, dir: &Path) -> Result<(), OpenError> {
    let sled_err = |source| OpenError::Sled {
        path: dir.to_path_buf(),
        source,
    };
    let corrupt = |reason: String| OpenError::Corrupt {
        path: dir.to_path_buf(),
        reason,
    };
    let mut sealed = 0u64;
    for item in tree.scan_prefix(b"k") {
        let (k, v) = item.map_err(sled_err)?;
        let name = std::str::from_utf8(k.get(5..).unwrap_or_default()).map_err(|e| corrupt(e.to_string()))?;
        let key = Key::new(name).map_err(|e| corrupt(e.to_string()))?;
        if open_record(&key, &v).is_ok() {
            continue; // sealed by an interrupted migration
        }
        let value: Value = from_bytes(&v).map_err(|e| corrupt(format!("state of {key}: {e}")))?;
        let record = seal_record(&key, &value).map_err(|e| corrupt(e.to_string()))?;
        tree.insert(k, record).map_err(sled_err)?;
        sealed += 1;
    }
    db.flush().map_err(sled_err)?;
    id.format = 2;
    let raw = to_bytes(&id).map_err(|e| corrupt(e.to_string()))?;
    tree.insert(b"iidentity", raw).map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    tracing::info!(dir = %dir.display(), sealed, "data dir migrated from format 1 to 2");
    Ok(())
}

impl SledStore {
    /// A reader of what this store has flushed, for other threads.
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            tree: self.tree.clone(),
            crypt: self.crypt.clone(),
            dir: Some(self.dir.clone()),
            durable_log: Some(self.durable_log.clone()),
        }
    }

    /// Opens (or creates) the store of node `node` in `dir`, with the
    /// change log's default settings.
    pub fn open(dir: &Path, node: &str, durability: Durability) -> Result<SledStore, OpenError> {
        Self::open_with_log(dir, node, durability, LogSettings::default())
    }

    /// Opens (or creates) the store of node `node` in `dir`.
    pub fn open_with_log(
        dir: &Path,
        node: &str,
        durability: Durability,
        log: LogSettings,
    ) -> Result<SledStore, OpenError> {
        Self::open_with(dir, node, durability, log, &Keys::none())
    }

    /// Opens (or creates) the store of node `node` in `dir`, encrypted
    /// with `keys` (see `crate::crypt`: an encrypted dir without the key
    /// or with a wrong one is refused here).
    pub fn open_with(
        dir: &Path,
        node: &str,
        durability: Durability,
        log: LogSettings,
        keys: &Keys,
    ) -> Result<SledStore, OpenError> {
        let sled_err = |source| OpenError::Sled {
            path: dir.to_path_buf(),
            source,
        };
        let created = !dir.exists();
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(500))
            .open()
            .map_err(sled_err)?;
        if created {
            // A new directory's entry (and sled's files in it) must survive
            // a power loss as well as the data written into them.
            let io = |e: std::io::Error| OpenError::Sled {
                path: dir.to_path_buf(),
                source: sled::Error::Io(e),
            };
            for d in [Some(dir), dir.parent(), Some(&dir.join("blobs"))]
                .into_iter()
                .flatten()
            {
                if d.as_os_str().is_empty() {
                    continue;
                }
                sync_dir(d).map_err(io)?;
            }
        }
        let tree = db.open_tree("lattice").map_err(sled_err)?;
        // The directory's format version (0: a new directory).
        let format = match tree.get(b"iidentity").map_err(sled_err)? {
            Some(raw) => {
                let id: Identity = from_bytes(&raw).map_err(|e| OpenError::Corrupt {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                })?;
                if !(1..=FORMAT_VERSION).contains(&id.format) {
                    return Err(OpenError::WrongFormat {
                        path: dir.to_path_buf(),
                        found: id.format,
                    });
                }
                if id.node != node {
                    return Err(OpenError::WrongNode {
                        path: dir.to_path_buf(),
                        found: id.node,
                        expected: node.to_string(),
                    });
                }
                if id.format == 1 {
                    migrate_v1(&db, &tree, id, dir)?;
                    2
                } else {
                    id.format
                }
            }
            // A new directory: its identity is written below.
            None => 0,
        };
        migrate_per_write_entries(&db, &tree).map_err(sled_err)?;
        if format < FORMAT_VERSION {
            let id = Identity {
                node: node.to_string(),
                format: FORMAT_VERSION,
            };
            let raw = to_bytes(&id).map_err(|e| OpenError::Corrupt {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
            tree.insert(b"iidentity", raw).map_err(sled_err)?;
            db.flush().map_err(sled_err)?;
            if format > 0 {
                tracing::info!(dir = %dir.display(), from = format, to = FORMAT_VERSION, "data dir migrated");
            }
        }
        let crypt = Arc::new(Crypt::open(&tree, keys, dir, true)?);
        let ops = OpIds::load(&tree).map_err(|reason| OpenError::Corrupt {
            path: dir.to_path_buf(),
            reason,
        })?;
        // A life whose flushes did not reach the disk and that did not
        // close may have lost a tail of the log that readers had read (a
        // read sees a flush before the disk has it); those positions now
        // number other changes. A new log id makes the old cursors fail
        // (re-read the state) instead of silently skipping those changes.
        let lost_tail = tree
            .get(b"mmeta")
            .map_err(sled_err)?
            .and_then(|raw| from_bytes::<Meta>(&raw).ok())
            .is_some_and(|m| !m.clean && m.async_life);
        let changelog = ChangeLog::load(&tree, log, rand::random(), lost_tail).map_err(|reason| OpenError::Log {
            path: dir.to_path_buf(),
            reason,
        })?;
        Ok(SledStore {
            crypt,
            logging: true,
            durable_log: std::sync::Arc::new(std::sync::RwLock::new(changelog.meta().next.clone())),
            changelog,
            db,
            tree,
            dir: dir.to_path_buf(),
            durability,
            pending: BTreeMap::new(),
            cache: std::cell::RefCell::new(RecordCache::new(RECORD_CACHE_BYTES)),
            log: None,
            ops,
            blobs_synced: None,
            blob_syncs: 0,
        })
    }

    /// The sled tree holding the states and the log (tests change it
    /// behind the engine's back).
    #[cfg(test)]
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Writes the pending changes into sled without syncing (what a flush
    /// looks like to readers before its fsync ends).
    #[cfg(test)]
    pub(crate) fn apply_without_sync(&mut self) -> Result<(), Error> {
        self.apply_pending()
    }

    /// Bounds the cache of hot records to `bytes` (default
    /// [`RECORD_CACHE_BYTES`]; 0 turns it off).
    pub fn set_cache_bytes(&mut self, bytes: usize) {
        self.cache = std::cell::RefCell::new(RecordCache::new(bytes));
    }

    /// The data keys the store's values are encrypted with.
    pub fn crypt(&self) -> &Arc<Crypt> {
        &self.crypt
    }

    /// The record cache's hits and misses since open.
    pub fn cache_stats(&self) -> (u64, u64) {
        let c = self.cache.borrow();
        (c.hits, c.misses)
    }

    /// Blob files fsynced since open (see the module documentation).
    pub fn blob_syncs(&self) -> u64 {
        self.blob_syncs
    }

    /// fsyncs the blob files sled created since the last call, then the
    /// `blobs` directory. Blob names are their log sequence numbers, which
    /// only grow, so the newest synced name is all there is to remember.
    fn fsync_blobs(&mut self) -> Result<(), Error> {
        let dir = self.dir.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(store_err(e)),
        };
        let mut newest = self.blobs_synced;
        for entry in entries {
            let entry = entry.map_err(store_err)?;
            let Some(lsn) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if self.blobs_synced.is_some_and(|s| lsn <= s) {
                continue;
            }
            match std::fs::File::open(entry.path()) {
                Ok(f) => f.sync_all().map_err(store_err)?,
                // Collected by sled since it was listed: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(store_err(e)),
            }
            self.blob_syncs += 1;
            newest = newest.max(Some(lsn));
        }
        if newest != self.blobs_synced {
            sync_dir(&dir).map_err(store_err)?;
            self.blobs_synced = newest;
        }
        Ok(())
    }

    /// The change log's metadata, pending changes included.
    pub fn log_meta(&self) -> &LogMeta {
        self.changelog.meta()
    }

    /// Stops logging changes: for benchmarks that measure what the log
    /// costs, never for a node (its watch feed publishes what the log holds).
    pub fn without_log(mut self) -> SledStore {
        self.logging = false;
        self
    }

    /// Keeps the node-wide number, key and origin of every change written
    /// from now on, for [`SledStore::take_written`].
    pub fn collect_written(&mut self) {
        self.changelog.collect_written();
    }

    /// The changes written (flushed) since the last call, in order: what
    /// the watch feed publishes.
    pub fn take_written(&mut self) -> Vec<(u64, Key, RegionId)> {
        self.changelog.take_written()
    }

    /// The durability mode.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The tree that keeps the watch feed (separate from the replica's
    /// state: it is a cache of recent changes, not a source of truth).
    pub fn feed_tree(&self) -> Result<sled::Tree, sled::Error> {
        self.db.open_tree("feed")
    }

    /// The tree that records the head of the policy audit log.
    pub fn audit_tree(&self) -> Result<sled::Tree, sled::Error> {
        self.db.open_tree("audit")
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// `f` of the value at sled key `k`, pending changes first.
    fn read_raw<T>(&self, k: &[u8], f: impl FnOnce(&[u8]) -> Result<T, Error>) -> Result<Option<T>, Error> {
        match self.pending.get(k) {
            Some(Some(v)) => f(v).map(Some),
            Some(None) => Ok(None),
            None => {
                let cached = self.cache.borrow_mut().get(k);
                if let Some(v) = cached {
                    return f(&v).map(Some);
                }
                let Some(v) = self.tree.get(k).map_err(store_err)? else {
                    return Ok(None);
                };
                let v = self.crypt.sealer().open(k, v)?;
                // Only a record that opened is cached (in plaintext): a bad
                // one is found bad on every read.
                let opened = f(&v)?;
                self.cache.borrow_mut().put(k, v);
                Ok(Some(opened))
            }
        }
    }

    /// Calls `f` on every entry with a sled key in `start..end`, in key
    /// order: sled's entries merged with the pending changes.
    fn scan_raw(&self, start: &[u8], end: &[u8], f: &mut RawVisitor<'_>) -> Result<(), Error> {
        let mut pending = self.pending.range(start.to_vec()..end.to_vec()).peekable();
        // The key ring is taken per entry, never across `f` (which may read
        // again: a nested read lock can deadlock behind a waiting rotation).
        for r in self.tree.range(start..end) {
            let (k, v) = r.map_err(store_err)?;
            // Pending entries before this one, then this one or its
            // pending replacement.
            while let Some((pk, pv)) = pending.next_if(|(pk, _)| pk.as_slice() < &k[..]) {
                if let Some(pv) = pv {
                    f(pk, pv)?;
                }
            }
            match pending.next_if(|(pk, _)| pk.as_slice() == &k[..]) {
                Some((_, Some(pv))) => f(&k, pv)?,
                Some((_, None)) => {}
                None => {
                    let v = self.crypt.sealer().open(&k, v)?;
                    f(&k, &v)?
                }
            }
        }
        for (pk, pv) in pending {
            if let Some(pv) = pv {
                f(pk, pv)?;
            }
        }
        Ok(())
    }

    fn fsync_log(&mut self) -> Result<(), Error> {
        if self.log.is_none() {
            let path = self.dir.join("db");
            if !path.exists() {
                return Ok(());
            }
            self.log = Some(std::fs::File::open(&path).map_err(store_err)?);
        }
        match &self.log {
            Some(f) => f.sync_data().map_err(store_err),
            None => Ok(()),
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// fsyncs a directory, so the entries created or renamed in it persist.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A visitor of raw (sled key, value) entries.
type RawVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), Error> + 'a;

impl Drop for SledStore {
    /// Writes pending changes to sled (not durably: that is `flush`'s job),
    /// so a store dropped without a last flush behaves as before batching.
    fn drop(&mut self) {
        if let Err(e) = self.apply_pending() {
            tracing::warn!(error = %e, "writing pending changes at close failed");
        }
    }
}

/// The last [`OP_ID_RETENTION`] client op ids, in memory, and the chunks
/// on disk that hold them (see the module documentation).
#[derive(Default)]
struct OpIds {
    /// Oldest first, pending ones included; exactly the ids in `set`.
    order: VecDeque<OpId>,
    set: HashSet<OpId>,
    /// Applied since the last flush: the next chunk.
    pending: Vec<OpId>,
    /// The chunks on disk, oldest first: number and count of ids.
    chunks: VecDeque<(u64, usize)>,
    /// Ids in `chunks`.
    on_disk: usize,
}

impl OpIds {
    /// Remembers `op` (once), forgetting the oldest past the retention.
    fn add(&mut self, op: OpId) {
        if self.set.insert(op) {
            self.order.push_back(op);
            self.pending.push(op);
        }
        while self.order.len() > OP_ID_RETENTION {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Adds to `b` the chunk of the pending ids and the removal of the
    /// oldest chunks the others make unneeded; returns what
    /// [`OpIds::written`] needs once `b` is applied.
    fn write(&self, b: &mut sled::Batch) -> (Option<(u64, usize)>, usize) {
        let chunk = (!self.pending.is_empty()).then(|| {
            let n = self.chunks.back().map_or(0, |c| c.0 + 1);
            let bytes: Vec<u8> = self.pending.iter().flat_map(|o| o.0.to_be_bytes()).collect();
            b.insert(&chunk_key(n)[..], bytes);
            (n, self.pending.len())
        });
        let mut left = self.on_disk + chunk.map_or(0, |c| c.1);
        let mut dropped = 0;
        for &(n, count) in &self.chunks {
            if left - count < OP_ID_RETENTION {
                break;
            }
            b.remove(&chunk_key(n)[..]);
            left -= count;
            dropped += 1;
        }
        (chunk, dropped)
    }

    /// The batch [`OpIds::write`] filled was applied.
    fn written(&mut self, (chunk, dropped): (Option<(u64, usize)>, usize)) {
        for _ in 0..dropped {
            if let Some((_, count)) = self.chunks.pop_front() {
                self.on_disk -= count;
            }
        }
        if let Some(c) = chunk {
            self.chunks.push_back(c);
            self.on_disk += c.1;
        }
        self.pending.clear();
    }

    /// Reads the chunks at open.
    fn load(tree: &sled::Tree) -> Result<OpIds, String> {
        let mut ids = OpIds::default();
        for r in tree.scan_prefix(b"p") {
            let (k, v) = r.map_err(|e| e.to_string())?;
            let n = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .filter(|_| k.len() == 9 && v.len() % 16 == 0)
                .ok_or_else(|| format!("an op id chunk of {} bytes under a key of {} bytes", v.len(), k.len()))?;
            for id in v.chunks_exact(16) {
                let mut b = [0u8; 16];
                b.copy_from_slice(id);
                ids.add(OpId(u128::from_be_bytes(b)));
            }
            ids.chunks.push_back((n, v.len() / 16));
            ids.on_disk += v.len() / 16;
        }
        ids.pending.clear();
        Ok(ids)
    }
}

fn chunk_key(n: u64) -> [u8; 9] {
    let mut k = [b'p'; 9];
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

/// Rewrites what builds before format 3 stored per write (see the module
/// documentation): drops the delta-groups under `b`, and turns the op ids
/// under `o` and `q` into chunks after the existing ones, oldest first.
/// In batches of [`MIGRATE_BATCH`] entries, each atomic (a chunk with the
/// removal of its ids' index entries), so memory stays bounded whatever
/// the data dir holds, and a migration cut short resumes where it stopped.
/// Nothing to do (three empty scans) on a migrated dir.
fn migrate_per_write_entries(db: &sled::Db, tree: &sled::Tree) -> Result<(), sled::Error> {
    let mut next = match tree.scan_prefix(b"p").keys().next_back() {
        Some(k) => k?
            .get(1..9)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |n| u64::from_be_bytes(n) + 1),
        None => 0,
    };
    let mut found = false;
    loop {
        let mut b = sled::Batch::default();
        let mut ids = Vec::new();
        let mut taken = 0;
        // In order of application (the key is the order number).
        for r in tree.scan_prefix(b"q").take(MIGRATE_BATCH) {
            let (k, v) = r?;
            if v.len() == 16 {
                ids.extend_from_slice(&v);
                b.remove([&b"o"[..], &v[..]].concat());
            }
            b.remove(k);
            taken += 1;
        }
        if taken == 0 {
            break;
        }
        found = true;
        if !ids.is_empty() {
            b.insert(&chunk_key(next)[..], ids);
            next += 1;
        }
        tree.apply_batch(b)?;
    }
    // Index entries without their order entry, and the delta-groups.
    for prefix in [&b"o"[..], b"b"] {
        loop {
            let keys = tree
                .scan_prefix(prefix)
                .keys()
                .take(MIGRATE_BATCH)
                .collect::<Result<Vec<_>, _>>()?;
            if keys.is_empty() {
                break;
            }
            found = true;
            let mut b = sled::Batch::default();
            keys.into_iter().for_each(|k| b.remove(k));
            tree.apply_batch(b)?;
        }
    }
    if found {
        db.flush()?;
    }
    Ok(())
}

/// Entries one migration batch touches ([`migrate_per_write_entries`]).
const MIGRATE_BATCH: usize = 10_000;

impl SledStore {
    /// Lets log readers read up to the log's end as written (call once it
    /// is on disk).
    fn publish_durable_log(&mut self) {
        let next = self.changelog.meta().next.clone();
        match self.durable_log.write() {
            Ok(mut d) => *d = next,
            Err(p) => *p.into_inner() = next,
        }
    }

    fn apply_pending(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() && self.ops.pending.is_empty() && !self.changelog.has_pending() {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        // Held until the batch is in sled: a data key is retired only
        // after a pass found nothing under it, so nothing sealed under it
        // may land after that pass.
        let crypt = self.crypt.clone();
        let sealer = crypt.sealer();
        for (k, v) in &self.pending {
            match v {
                Some(v) => b.insert(k.as_slice(), sealer.seal(k, v)?),
                None => b.remove(k.as_slice()),
            }
        }
        let ops = self.ops.write(&mut b);
        self.changelog.write(&self.tree, &sealer, wall_ms(), &mut b)?;
        // On failure the changes stay pending (and unacknowledged).
        self.tree.apply_batch(b).map_err(store_err)?;
        drop(sealer);
        self.changelog.written();
        let cache = self.cache.get_mut();
        for (k, v) in std::mem::take(&mut self.pending) {
            match v {
                Some(v) => cache.put(&k, v),
                None => cache.remove(&k),
            }
        }
        self.ops.written(ops);
        Ok(())
    }
}

impl Store for SledStore {
    fn get(&self, key: &Key) -> Result<Option<Value>, Error> {
        self.read_raw(&value_key(key), |r| open_record(key, r))
    }

    fn scan_buckets(&self, lo: u32, hi: u32) -> Result<Vec<(Key, Value)>, Error> {
        let start = bucket_bound(lo);
        let end = match hi.checked_add(1) {
            Some(h) => bucket_bound(h),
            None => vec![b'l'],
        };
        let mut out = Vec::new();
        self.scan_raw(&start, &end, &mut |k, v| {
            out.push(decode_entry(k, v)?);
            Ok(())
        })?;
        Ok(out)
    }

    fn scan_all(&self, f: &mut dyn FnMut(&Key, &Value)) -> Result<(), Error> {
        self.scan_raw(b"k", b"l", &mut |k, v| {
            let (key, value) = decode_entry(k, v)?;
            f(&key, &value);
            Ok(())
        })
    }

    fn meta(&self) -> Result<Option<Meta>, Error> {
        self.read_raw(b"mmeta", from_bytes)
    }

    fn record_digest(&self, key: &Key) -> Result<Option<RecordDigest>, Error> {
        self.read_raw(&value_key(key), |r| Ok(record_digest(r)))
    }

    fn has_op(&self, op: OpId) -> Result<bool, Error> {
        Ok(self.ops.set.contains(&op))
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), Error> {
        // Encode first, so a failure changes nothing.
        let meta = batch.meta.as_ref().map(to_bytes).transpose()?;
        if self.logging {
            self.changelog.append(&batch.changes)?;
        }
        for (k, r) in batch.values {
            self.pending.insert(value_key(&k), Some(r.into_bytes().into()));
        }
        if let Some(m) = meta {
            self.pending.insert(b"mmeta".to_vec(), Some(m.into()));
        }
        for op in batch.op_ids {
            self.ops.add(op);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        match self.durability {
            Durability::Async => {
                self.apply_pending()?;
                self.publish_durable_log();
                Ok(())
            }
            Durability::Sync | Durability::Group => self.sync(),
        }
    }

    fn flush_is_durable(&self) -> bool {
        self.durability != Durability::Async
    }

    fn sync(&mut self) -> Result<(), Error> {
        self.apply_pending()?;
        self.db.flush().map_err(store_err)?;
        // Blobs first, so the log never durably points at a missing one.
        self.fsync_blobs()?;
        // sled's flush is sync_file_range: make it an fsync.
        self.fsync_log()?;
        self.publish_durable_log();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::crdt::Op;
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use lattice_core::store::Record;
    use rand::SeedableRng;

    fn rng() -> Box<rand_chacha::ChaCha8Rng> {
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1))
    }

    #[test]
    fn state_meta_and_op_ids_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (id, digest) = {
            let store = open_as(dir.path(), "n1", Durability::Sync);
            let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(0)).unwrap();
            for i in 0..50 {
                r.write(
                    Time(i),
                    vec![(Key::new(format!("k{i}")).unwrap(), Op::CounterAdd(i as i64))],
                )
                .unwrap();
            }
            r.write_once(
                Time(60),
                Some(OpId(7)),
                vec![(Key::new("x").unwrap(), Op::CounterAdd(1))],
            )
            .unwrap();
            r.flush(Time(61)).unwrap();
            (r.id(), r.digest())
        };
        let store = open_as(dir.path(), "n1", Durability::Sync);
        assert!(store.has_op(OpId(7)).unwrap());
        let again = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(2));
        let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, again, Time(100)).unwrap();
        assert_ne!(r.id(), id, "every life takes a fresh replica id");
        assert_eq!(r.digest(), digest);
        let (_, dup) = r
            .write_once(
                Time(101),
                Some(OpId(7)),
                vec![(Key::new("x").unwrap(), Op::CounterAdd(1))],
            )
            .unwrap();
        assert!(dup, "a retried op id is recognised after a restart");
        assert_eq!(
            r.read(&Key::new("x").unwrap()).unwrap().unwrap().view().to_string(),
            "1"
        );
    }

    /// Every single bit of a stored record, flipped under sled (through its
    /// API, so sled's own CRC is satisfied), makes reads of that key fail
    /// with `Corrupt` naming it, and the reopen of the replica fail too.
    #[test]
    fn a_record_with_a_flipped_bit_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("fruit").unwrap();
        {
            let store = open_as(dir.path(), "n1", Durability::Sync);
            let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(0)).unwrap();
            r.write(Time(1), vec![(key.clone(), Op::LwwSet(b"apple".to_vec().into()))])
                .unwrap();
            r.write(Time(1), vec![(Key::new("other").unwrap(), Op::CounterAdd(3))])
                .unwrap();
            r.flush(Time(2)).unwrap();
        }
        let store = open_as(dir.path(), "n1", Durability::Sync);
        let good = store.tree.get(value_key(&key)).unwrap().unwrap().to_vec();
        let corrupt = Error::Corrupt { key: "fruit".into() };
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            store.tree.insert(value_key(&key), bad).unwrap();
            assert_eq!(store.get(&key), Err(corrupt.clone()), "bit {bit}");
            assert_eq!(store.scan_all(&mut |_, _| {}), Err(corrupt.clone()), "bit {bit}");
        }
        store.db.flush().unwrap();
        drop(store);
        let store = open_as(dir.path(), "n1", Durability::Sync);
        let opened = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(3));
        assert_eq!(opened.err(), Some(Error::Corrupt { key: "fruit".into() }));
    }

    /// A data dir written before records were sealed (format 1) is
    /// migrated at open, also when an earlier migration was cut short
    /// (some records sealed, the version still 1); its states read back.
    #[test]
    fn a_format_1_data_dir_is_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Key> = (0..40).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
        let digest = {
            let store = open_as(dir.path(), "n1", Durability::Sync);
            let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(0)).unwrap();
            for (i, k) in keys.iter().enumerate() {
                r.write(Time(1), vec![(k.clone(), Op::CounterAdd(i as i64 + 1))])
                    .unwrap();
            }
            r.flush(Time(2)).unwrap();
            r.digest()
        };
        {
            // Back to format 1: plain states, except the first ten, as a
            // migration that crashed midway leaves them.
            let mut store = open_as(dir.path(), "n1", Durability::Sync);
            // Reads here must see what this test writes past the store.
            store.set_cache_bytes(0);
            for k in &keys[10..] {
                let v = store.get(k).unwrap().unwrap();
                store.tree.insert(value_key(k), to_bytes(&v).unwrap()).unwrap();
            }
            let id = Identity {
                node: "n1".into(),
                format: 1,
            };
            store.tree.insert(b"iidentity", to_bytes(&id).unwrap()).unwrap();
            store.db.flush().unwrap();
            assert!(
                store.get(&keys[20]).is_err(),
                "a format-1 record does not pass as sealed"
            );
        }
        let store = open_as(dir.path(), "n1", Durability::Sync);
        let raw = store.tree.get(b"iidentity").unwrap().unwrap();
        assert_eq!(from_bytes::<Identity>(&raw).unwrap().format, FORMAT_VERSION);
        let r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(3)).unwrap();
        assert_eq!(r.digest(), digest);
        assert_eq!(r.read(&keys[39]).unwrap().unwrap().view().to_string(), "40");
    }

    #[test]
    fn blob_files_of_large_values_are_fsynced_before_the_flush_returns() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_as(&dir.path().join("d"), "n1", Durability::Group);
        let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(0)).unwrap();
        // 200 KiB: over sled's ~128 KiB blob threshold.
        let big = "x".repeat(200 << 10);
        r.write(
            Time(1),
            vec![(Key::new("big").unwrap(), Op::LwwSet(big.into_bytes().into()))],
        )
        .unwrap();
        r.flush(Time(2)).unwrap();
        let blobs = std::fs::read_dir(dir.path().join("d").join("blobs")).unwrap().count();
        assert!(blobs >= 1, "sled put the value in a blob file, as its source says");
        assert!(r.store().blob_syncs() >= 1, "and the flush fsynced it");
    }

    #[test]
    fn a_changed_partition_count_is_refused_as_a_log_error() {
        let dir = tempfile::tempdir().unwrap();
        let settings = |partitions| LogSettings {
            partitions,
            ..LogSettings::default()
        };
        drop(SledStore::open_with_log(dir.path(), "n1", Durability::Sync, settings(16)).unwrap());
        let e = loop {
            match SledStore::open_with_log(dir.path(), "n1", Durability::Sync, settings(8)) {
                Err(OpenError::Sled { .. }) => std::thread::sleep(std::time::Duration::from_millis(10)),
                other => break other.err().unwrap(),
            }
        };
        assert!(matches!(e, OpenError::Log { .. }), "{e}");
        assert!(
            e.to_string().contains("16 partitions and the configuration says 8"),
            "{e}"
        );
    }

    #[test]
    fn a_data_dir_of_another_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_as(dir.path(), "n1", Durability::Group));
        // Past the lock a just-dropped store may still hold, the node check.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = loop {
            let e = SledStore::open(dir.path(), "n2", Durability::Group).err().unwrap();
            if !e.to_string().contains("could not acquire lock") || std::time::Instant::now() >= deadline {
                break e;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(matches!(err, OpenError::WrongNode { .. }), "{err}");
        assert!(err.to_string().contains("belongs to node \"n1\""), "{err}");
    }

    /// Reopens a store just dropped: sled's background flusher can hold the
    /// directory's lock for a moment after the drop, so wait for it (up to
    /// 5 s) instead of failing on `WouldBlock`.
    fn reopen(dir: &Path) -> SledStore {
        open_as(dir, "n1", Durability::Group)
    }

    /// [`SledStore::open`], waiting for the lock a just-dropped store's
    /// background thread may still hold.
    fn open_as(dir: &Path, node: &str, mode: Durability) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledStore::open(dir, node, mode) {
                Ok(s) => return s,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    /// Pending changes (applied, not flushed) must read exactly like sled's:
    /// random batches, flushes and reopens against the engine's in-memory
    /// store as the model.
    #[test]
    fn pending_changes_read_like_the_in_memory_model() {
        use lattice_core::crdt::Kind;
        use lattice_core::store::MemoryStore;
        use rand::Rng;
        let kinds = [Kind::Counter, Kind::Set, Kind::Lww, Kind::Map];
        let keys: Vec<Key> = (0..24).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
        let mut total = (0, 0);
        for seed in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            // Odd seeds with a record cache of a few entries (evicting
            // often), even ones with the default.
            let cache = if seed % 2 == 1 { 700 } else { RECORD_CACHE_BYTES };
            let open = |dir: &Path, first: bool| {
                let mut s = if first {
                    open_as(dir, "n1", Durability::Group)
                } else {
                    reopen(dir)
                };
                s.set_cache_bytes(cache);
                s
            };
            let mut s = open(dir.path(), true);
            let mut m = MemoryStore::new();
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (mut seq, mut ops) = (0u64, Vec::new());
            for step in 0..150 {
                match r.gen_range(0..10) {
                    0 => s.flush().unwrap(),
                    1 => {
                        s.flush().unwrap();
                        drop(s);
                        s = open(dir.path(), false);
                    }
                    _ => {
                        let mut b = WriteBatch::default();
                        for _ in 0..r.gen_range(0..4) {
                            let k = keys[r.gen_range(0..keys.len())].clone();
                            let v = Value::empty(kinds[r.gen_range(0..kinds.len())]);
                            b.values.push((k.clone(), Record::seal(&k, &v).unwrap()));
                        }
                        seq += 1;
                        if r.gen_bool(0.3) {
                            b.meta = Some(Meta {
                                replica: lattice_core::clock::ReplicaId(r.gen()),
                                next_seq: seq,
                                clean: false,
                                async_life: false,
                            });
                        }
                        if r.gen_bool(0.3) {
                            let op = OpId(r.gen());
                            ops.push(op);
                            b.op_ids.push(op);
                        }
                        s.apply(b.clone()).unwrap();
                        m.apply(b).unwrap();
                    }
                }
                let at = format!("seed {seed} step {step}");
                for k in &keys {
                    assert_eq!(s.get(k).unwrap(), m.get(k).unwrap(), "{at}: {k}");
                }
                assert_eq!(
                    s.scan_buckets(0, u32::MAX).unwrap(),
                    m.scan_buckets(0, u32::MAX).unwrap(),
                    "{at}"
                );
                let mut all = Vec::new();
                s.scan_all(&mut |k, v| all.push((k.clone(), v.clone()))).unwrap();
                assert_eq!(all.len(), m.scan_buckets(0, u32::MAX).unwrap().len(), "{at}");
                assert_eq!(s.meta().unwrap(), m.meta().unwrap(), "{at}");
                for op in &ops {
                    assert!(s.has_op(*op).unwrap(), "{at}");
                }
                assert!(!s.has_op(OpId(u128::MAX)).unwrap());
                assert!(
                    s.cache.borrow().bytes <= cache,
                    "{at}: the record cache is over its bound"
                );
            }
            let (hits, misses) = s.cache_stats();
            total.0 += hits;
            total.1 += misses;
        }
        assert!(total.0 > 0 && total.1 > 0, "the record cache was used: {total:?}");
    }

    /// README, "Retries": a node recognises a retried op id among its last
    /// 100,000, also after a restart. The store on sled keeps exactly that
    /// many across reopens: the oldest of 100,000 is known, one id more
    /// forgets it and only it.
    #[test]
    fn exactly_the_last_op_id_retention_ids_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids = |r: std::ops::Range<usize>| r.map(|i| OpId(i as u128)).collect::<Vec<_>>();
        {
            let mut s = open_as(dir.path(), "n1", Durability::Group);
            for start in (0..OP_ID_RETENTION).step_by(10_000) {
                let op_ids = ids(start..start + 10_000);
                s.apply(WriteBatch {
                    op_ids,
                    ..WriteBatch::default()
                })
                .unwrap();
                s.flush().unwrap();
            }
        }
        let mut s = open_as(dir.path(), "n1", Durability::Group);
        assert!(s.has_op(OpId(0)).unwrap(), "the oldest of 100,000 ids, after a reopen");
        s.apply(WriteBatch {
            op_ids: ids(OP_ID_RETENTION..OP_ID_RETENTION + 1),
            ..WriteBatch::default()
        })
        .unwrap();
        s.flush().unwrap();
        drop(s);
        let s = open_as(dir.path(), "n1", Durability::Group);
        assert!(!s.has_op(OpId(0)).unwrap(), "the 100,001st id back is forgotten");
        for i in [1, OP_ID_RETENTION / 2, OP_ID_RETENTION] {
            assert!(s.has_op(OpId(i as u128)).unwrap(), "id {i} is among the last 100,000");
        }
    }

    /// One chunk per flush, and the chunks on disk never hold more than
    /// the retention plus the ids of the oldest chunk kept: older ones are
    /// removed in the flush that makes them unneeded.
    #[test]
    fn op_id_chunks_are_one_per_flush_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open_as(dir.path(), "n1", Durability::Async);
        let per_flush = 7_000;
        for f in 0..40u128 {
            for i in 0..per_flush {
                s.apply(WriteBatch {
                    op_ids: vec![OpId(f * per_flush as u128 + i as u128)],
                    ..WriteBatch::default()
                })
                .unwrap();
            }
            s.flush().unwrap();
            let chunks = s.tree.scan_prefix(b"p").count();
            let ids: usize = s.tree.scan_prefix(b"p").values().map(|v| v.unwrap().len() / 16).sum();
            assert_eq!(
                chunks,
                (f as usize + 1).min(OP_ID_RETENTION / per_flush + 1),
                "flush {f}"
            );
            assert!(ids < OP_ID_RETENTION + per_flush, "flush {f}: {ids} ids on disk");
            assert!(ids >= (per_flush * (f as usize + 1)).min(OP_ID_RETENTION), "flush {f}");
        }
        assert_eq!(s.ops.set.len(), OP_ID_RETENTION);
        assert_eq!(s.ops.order.len(), OP_ID_RETENTION);
        // Nothing pending, nothing written.
        let before: Vec<_> = s.tree.scan_prefix(b"p").keys().collect();
        s.flush().unwrap();
        assert_eq!(before.len(), s.tree.scan_prefix(b"p").count());
    }

    /// A data dir of an older build (a delta-group per write under `b`, two
    /// index entries per op id under `o` and `q`) opens with every op id
    /// known, in order, and none of those entries left.
    #[test]
    fn per_write_entries_of_older_builds_are_migrated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_as(dir.path(), "n1", Durability::Sync);
            for (order, id) in [(5u64, 50u128), (6, 60), (7, 70)] {
                s.tree
                    .insert([&b"o"[..], &id.to_be_bytes()].concat(), &order.to_be_bytes()[..])
                    .unwrap();
                s.tree
                    .insert([&b"q"[..], &order.to_be_bytes()].concat(), &id.to_be_bytes()[..])
                    .unwrap();
            }
            s.tree
                .insert([&b"b"[..], &3u64.to_be_bytes()].concat(), &b"a group"[..])
                .unwrap();
            let id = Identity {
                node: "n1".into(),
                format: 2,
            };
            s.tree.insert(b"iidentity", to_bytes(&id).unwrap()).unwrap();
            s.db.flush().unwrap();
        }
        let s = open_as(dir.path(), "n1", Durability::Sync);
        let raw = s.tree.get(b"iidentity").unwrap().unwrap();
        assert_eq!(
            from_bytes::<Identity>(&raw).unwrap().format,
            3,
            "an older build refuses it now"
        );
        for id in [50, 60, 70] {
            assert!(s.has_op(OpId(id)).unwrap(), "{id}");
        }
        assert!(!s.has_op(OpId(5)).unwrap());
        assert_eq!(s.ops.order, [OpId(50), OpId(60), OpId(70)]);
        for prefix in [b"b", b"o", b"q"] {
            assert_eq!(s.tree.scan_prefix(prefix).count(), 0);
        }
        assert_eq!(s.tree.scan_prefix(b"p").count(), 1);
        drop(s);
        let s = open_as(dir.path(), "n1", Durability::Sync);
        assert!(s.has_op(OpId(70)).unwrap(), "and after another reopen");
    }

    /// Attack: a reopen remembers exactly the ids (and their order) the
    /// store remembered before it, also at the exact retention boundary
    /// (chunks of 1, RETENTION - 2 and 1 ids: the first chunk is still
    /// needed), and a life after a reopen keeps the chunks bounded.
    /// Applies `count` op ids numbered from `next` on, a batch each.
    fn apply_one_by_one(s: &mut SledStore, next: &mut u128, count: u128) {
        for _ in 0..count {
            s.apply(WriteBatch {
                op_ids: vec![OpId(*next)],
                ..WriteBatch::default()
            })
            .unwrap();
            *next += 1;
        }
    }

    #[test]
    fn attack_reopen_remembers_exactly_what_was_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let r = OP_ID_RETENTION as u128;
        let mut next = 0u128;
        let before = {
            let mut s = open_as(dir.path(), "n1", Durability::Sync);
            for size in [1u128, r - 2, 1] {
                apply_one_by_one(&mut s, &mut next, size);
                s.flush().unwrap();
            }
            assert_eq!(s.ops.order.len(), OP_ID_RETENTION);
            s.ops.order.clone()
        };
        let after = open_as(dir.path(), "n1", Durability::Sync).ops.order.clone();
        assert_eq!(before.len(), after.len(), "ids forgotten by a reopen at the boundary");
        assert!(before == after, "a reopen changed the remembered ids or their order");
        // A life after the reopen: its chunks come after the old ones, and
        // the old ones are removed once unneeded.
        let before = {
            let mut s = open_as(dir.path(), "n1", Durability::Sync);
            for _ in 0..25 {
                apply_one_by_one(&mut s, &mut next, 10_000);
                s.flush().unwrap();
                let ids: usize = s.tree.scan_prefix(b"p").values().map(|v| v.unwrap().len() / 16).sum();
                // The oldest chunk kept may be large (99,998 ids here): it goes
                // once the chunks after it hold the retention.
                assert!(ids < 2 * OP_ID_RETENTION, "{ids} ids on disk");
            }
            s.ops.order.clone()
        };
        let after = open_as(dir.path(), "n1", Durability::Sync).ops.order.clone();
        assert!(
            before == after,
            "a second reopen changed the remembered ids or their order"
        );
    }

    /// Attack: a migration next to existing chunks keeps them (and puts
    /// the migrated ids after them).
    #[test]
    fn attack_migration_keeps_existing_chunks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_as(dir.path(), "n1", Durability::Sync);
            let chunk: Vec<u8> = [1u128, 2].iter().flat_map(|i| i.to_be_bytes()).collect();
            s.tree.insert(&chunk_key(0)[..], chunk).unwrap();
            s.tree
                .insert([&b"o"[..], &3u128.to_be_bytes()].concat(), &9u64.to_be_bytes()[..])
                .unwrap();
            s.tree
                .insert([&b"q"[..], &9u64.to_be_bytes()].concat(), &3u128.to_be_bytes()[..])
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = open_as(dir.path(), "n1", Durability::Sync);
        assert_eq!(s.ops.order, [OpId(1), OpId(2), OpId(3)]);
    }

    /// A chunk whose length is not a whole number of ids fails the open
    /// with what is wrong, not a panic or silently fewer ids.
    #[test]
    fn a_torn_op_id_chunk_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_as(dir.path(), "n1", Durability::Sync);
            s.tree.insert(&chunk_key(0)[..], &[1u8; 17][..]).unwrap();
            s.db.flush().unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let err = loop {
            match SledStore::open(dir.path(), "n1", Durability::Sync) {
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => break e,
                Ok(_) => panic!("a torn chunk was accepted"),
            }
        };
        assert!(err.to_string().contains("op id chunk of 17 bytes"), "{err}");
    }

    #[test]
    fn bucket_scans_see_exactly_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open_as(dir.path(), "n1", Durability::Async);
        let keys: Vec<Key> = (0..300).map(|i| Key::new(format!("key-{i}")).unwrap()).collect();
        let v = Value::empty(lattice_core::crdt::Kind::Counter);
        s.apply(WriteBatch {
            values: keys.iter().map(|k| (k.clone(), Record::seal(k, &v).unwrap())).collect(),
            ..WriteBatch::default()
        })
        .unwrap();
        let mid = u32::MAX / 2;
        let low = s.scan_buckets(0, mid).unwrap();
        let high = s.scan_buckets(mid + 1, u32::MAX).unwrap();
        assert_eq!(low.len() + high.len(), 300);
        assert!(low.iter().all(|(k, _)| k.hash().bucket() <= mid));
        assert!(high.iter().all(|(k, _)| k.hash().bucket() > mid));
    }
}

/// Encryption at rest through the store (see `crate::crypt`).
#[cfg(test)]
mod encryption_tests {
    use super::*;
    use crate::crypt::{Kek, Keys};
    use lattice_core::crdt::Op;
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;

    const SECRET: &[u8] = b"sEcReT-pLaInTeXt-4711";

    fn rng() -> Box<rand_chacha::ChaCha8Rng> {
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1))
    }

    fn open(dir: &Path, keys: &Keys) -> Result<SledStore, OpenError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledStore::open_with(dir, "n1", Durability::Sync, LogSettings::default(), keys) {
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    /// Writes `n` registers holding SECRET and a big one (a sled blob).
    fn write(store: SledStore, from: u32, n: u32) -> SledStore {
        let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(0)).unwrap();
        for i in from..from + n {
            let mut v = SECRET.to_vec();
            if i == from {
                v = SECRET.repeat(200_000 / SECRET.len());
            }
            r.write(
                Time(1),
                vec![(Key::new(format!("k{i}")).unwrap(), Op::LwwSet(v.into()))],
            )
            .unwrap();
        }
        r.flush(Time(2)).unwrap();
        r.into_store()
    }

    fn raw_values_hold(store: &SledStore, needle: &[u8]) -> bool {
        store.tree.iter().any(|e| {
            let (_, v) = e.unwrap();
            v.windows(needle.len()).any(|w| w == needle)
        })
    }

    fn read(store: &SledStore, i: u32) -> Vec<u8> {
        let v = store.get(&Key::new(format!("k{i}")).unwrap()).unwrap().unwrap();
        v.view().to_string().into_bytes()
    }

    #[test]
    fn states_and_log_entries_are_ciphertext_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::with(Kek::generate());
        let store = write(open(dir.path(), &keys).unwrap(), 0, 20);
        assert!(!raw_values_hold(&store, SECRET), "a plaintext value in sled");
        assert!(store.tree.scan_prefix(b"c").next().is_some(), "no log entries");
        assert!(String::from_utf8_lossy(&read(&store, 3)).contains("sEcReT"));
        drop(store);
        let store = open(dir.path(), &keys).unwrap();
        assert!(String::from_utf8_lossy(&read(&store, 3)).contains("sEcReT"));
        let mut n = 0;
        store
            .reader()
            .log()
            .scan(0, 0, &mut |_, _| {
                n += 1;
                Ok(true)
            })
            .unwrap();
        assert!(n > 0, "the log reader decrypts");
        // The control: the same writes without a key are found.
        let plain = tempfile::tempdir().unwrap();
        let store = write(open(plain.path(), &Keys::none()).unwrap(), 0, 20);
        assert!(raw_values_hold(&store, SECRET), "the search cannot fail");
    }

    #[test]
    fn a_missing_or_wrong_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(open(dir.path(), &Keys::with(Kek::generate())).unwrap(), 0, 3));
        let e = open(dir.path(), &Keys::none()).err().unwrap().to_string();
        assert!(
            e.contains("is encrypted; set [encryption] key_file or LATTICE_ENCRYPTION_KEY"),
            "{e}"
        );
        let e = open(dir.path(), &Keys::with(Kek::generate()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not open the data keys"), "{e}");
    }

    #[test]
    fn a_flipped_byte_or_a_swapped_record_is_corrupt_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::with(Kek::generate());
        let store = write(open(dir.path(), &keys).unwrap(), 0, 3);
        drop(store);
        let store = open(dir.path(), &keys).unwrap();
        let (k1, k2) = (Key::new("k1").unwrap(), Key::new("k2").unwrap());
        let good = store.tree.get(value_key(&k1)).unwrap().unwrap().to_vec();
        for byte in [0, 5, 10, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[byte] ^= 0x20;
            store.tree.insert(value_key(&k1), bad).unwrap();
            assert_eq!(store.get(&k1), Err(Error::Corrupt { key: "k1".into() }), "byte {byte}");
            assert_eq!(
                store.reader().get(&k1),
                Err(Error::Corrupt { key: "k1".into() }),
                "byte {byte}"
            );
        }
        // k2's ciphertext under k1's key: its associated data differs.
        let other = store.tree.get(value_key(&k2)).unwrap().unwrap();
        store.tree.insert(value_key(&k1), other).unwrap();
        assert_eq!(store.reader().get(&k1), Err(Error::Corrupt { key: "k1".into() }));
        store.db.flush().unwrap();
        drop(store);
        let store = open(dir.path(), &keys).unwrap();
        let opened = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng(), Time(3));
        assert_eq!(opened.err(), Some(Error::Corrupt { key: "k1".into() }));
    }

    #[test]
    fn turning_encryption_on_keeps_old_values_readable_until_reencrypted() {
        let dir = tempfile::tempdir().unwrap();
        drop(write(open(dir.path(), &Keys::none()).unwrap(), 0, 10));
        let keys = Keys::with(Kek::generate());
        let store = write(open(dir.path(), &keys).unwrap(), 10, 10);
        assert!(store.crypt.has_old());
        assert!(raw_values_hold(&store, SECRET), "the old values are still plaintext");
        let s = crate::reencrypt::run(&store.reader(), dir.path(), false).unwrap();
        assert!(s.complete && s.rewritten > 0, "{s:?}");
        assert!(!store.crypt.has_old());
        assert!(!raw_values_hold(&store, SECRET), "a plaintext value left");
        for i in 0..20 {
            assert!(String::from_utf8_lossy(&read(&store, i)).contains("sEcReT"), "k{i}");
        }
        // Plaintext is no longer accepted once converted.
        let k = value_key(&Key::new("k1").unwrap());
        let plain = store
            .crypt
            .sealer()
            .open(&k, store.tree.get(&k).unwrap().unwrap())
            .unwrap();
        store.tree.insert(&k, plain).unwrap();
        assert_eq!(
            store.reader().get(&Key::new("k1").unwrap()),
            Err(Error::Corrupt { key: "k1".into() })
        );
    }

    #[test]
    fn a_rotated_key_encryption_key_rewraps_and_old_data_keys_are_retired() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (Kek::generate(), Kek::generate());
        drop(write(open(dir.path(), &Keys::with(old.clone())).unwrap(), 0, 10));
        // The new key alone cannot open the data keys yet.
        assert!(open(dir.path(), &Keys::with(new.clone())).is_err());
        let rotated = Keys {
            current: Some(new.clone()),
            old: vec![old.clone()],
        };
        let store = write(open(dir.path(), &rotated).unwrap(), 10, 10);
        assert_eq!(store.crypt.data_keys().0, vec![1, 2], "a new data key on a new KEK");
        let s = crate::reencrypt::run(&store.reader(), dir.path(), true).unwrap();
        assert!(s.complete && s.retired == 2 && s.current == 3, "{s:?}");
        drop(store);
        // The old KEK is no longer needed, and no longer opens anything.
        let store = open(dir.path(), &Keys::with(new)).unwrap();
        for i in 0..20 {
            assert!(String::from_utf8_lossy(&read(&store, i)).contains("sEcReT"), "k{i}");
        }
        drop(store);
        assert!(open(dir.path(), &Keys::with(old)).is_err());
    }
}
