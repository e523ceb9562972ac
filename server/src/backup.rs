//! Backups of a node's states, and restore into a new data dir.
//!
//! A backup is a directory:
//!
//! | file | what |
//! |---|---|
//! | `states-NNNNNN` | sealed records (`lattice_core::store::seal_record`), each framed as key length (u32 BE), key, record length (u32 BE), record; at most [`CHUNK_BYTES`] a file, in storage order |
//! | `keys` | only for an encrypted node: its data keys, wrapped under its encryption key (as in its data dir) |
//! | `ops` | the client op ids the node remembered, 16 bytes BE each, oldest first |
//! | `backup.json` | [`BackupMeta`]: source node and region, the policy set in force, the log id and cursor the states are as of, the time, the key count, the state files |
//! | `manifest` | one line per other file: blake3 hex, size, name; written last |
//!
//! Consistency. Online, the node keeps writing while its records are
//! copied, so a plain copy would hold each key at another moment. Instead:
//! note the log's end `E0` (as flushed), copy every record, note the end
//! `E1`, then join every change logged between `E0` and `E1` into the
//! copied states. A key copied at any moment between `E0` and `E1` holds
//! its state at `E0` joined with some of those deltas; joining all of them
//! gives its state at `E1` (joins are idempotent, and a logged delta joined
//! into a key's state gives its next state: `lattice_core::log`). A key
//! created after the copy passed it has its whole history in those
//! deltas. So every key is as of the one point `E1`. If retention dropped
//! a change after `E0` meanwhile, the backup fails (the catch-up is
//! incomplete) rather than write a fuzzy copy.
//!
//! Memory. Records stream to the state files; the catch-up deltas are
//! joined in memory up to [`CATCHUP_BYTES`] (their stored size), past which
//! the backup fails and asks for a quieter moment or an offline backup.
//! Then only the state files holding a changed key are rewritten.
//!
//! Encryption. A backup of an encrypted node (`crate::crypt`) holds each
//! record encrypted under the node's newest data key, with its storage
//! position as associated data, and the wrapped data keys in `keys`: never
//! a plaintext value. Restoring it needs the node's encryption key (or an
//! old one that wrapped those data keys); the restored data dir is
//! encrypted under the restoring node's key, with new data keys.
//!
//! Restore verifies the manifest first (every file listed, present, of its
//! size and hash, and no other file), then writes the states a new data dir
//! under the restoring node's policy: keys its region may not hold are
//! left out and counted (a cross-region restore keeps residency). The
//! store is marked as not closed cleanly, so the node that opens it treats
//! op ids as possibly lost (as after a crash); it opens under a fresh
//! replica id (every life does) and anti-entropy brings back from its
//! peers what was written after the backup.

use crate::changelog::LogMeta;
use crate::crypt::{Crypt, Keys};
use crate::storage::{Durability, SledStore, StoreReader};
use lattice_core::clock::ReplicaId;
use lattice_core::crdt::{Crdt, Value};
use lattice_core::log::LogCursor;
use lattice_core::policy::PolicySet;
use lattice_core::proto::client::{BackupSummary, OpId};
use lattice_core::proto::RegionId;
use lattice_core::store::{open_record, seal_record, Meta, Record, Store, WriteBatch};
use lattice_core::Key;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Version of the backup format.
pub const FORMAT: u32 = 1;

/// Most bytes of one state file.
pub const CHUNK_BYTES: u64 = 64 << 20;

/// Most bytes of logged changes (as stored) an online backup joins in
/// memory after its copy.
pub const CATCHUP_BYTES: u64 = 256 << 20;

/// Largest record a state file may frame (a bound checked before the
/// allocation, far above any value a node accepts).
const MAX_RECORD_BYTES: u64 = 1 << 30;

/// Most bytes of records one restore batch writes.
const RESTORE_BATCH_BYTES: usize = 8 << 20;

/// The metadata file's name.
pub const META_FILE: &str = "backup.json";
/// The manifest's name.
pub const MANIFEST: &str = "manifest";
/// The op ids' file name.
pub const OPS_FILE: &str = "ops";
/// The wrapped data keys' file name (encrypted backups).
pub const KEYS_FILE: &str = "keys";

/// Errors of a backup or a restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store failed (a corrupt record, sled).
    #[error("{0}")]
    Store(#[from] lattice_core::Error),
    /// The backup is encrypted and the key is missing or wrong.
    #[error(transparent)]
    Encryption(#[from] crate::crypt::CryptError),
    /// The backup is damaged: a hash, size or file does not match its
    /// manifest, or a file does not decode.
    #[error("the backup in {dir} is damaged or incomplete: {reason}")]
    Damaged {
        /// The backup.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The backup was not made or the restore refused, for `0`.
    #[error("{0}")]
    Refused(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `backup.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    /// [`FORMAT`].
    pub format: u32,
    /// The node backed up.
    pub node: String,
    /// Its region (unknown for an offline backup made without `--region`).
    pub region: Option<String>,
    /// The policy set in force on it.
    pub policy: PolicySet,
    /// Its change log's id (0: it had none).
    pub log_id: u64,
    /// The log position the states are as of ([`LogCursor::to_text`]).
    pub cursor: String,
    /// Wall-clock and hybrid-clock time (ms) the states are as of: the
    /// later of the clock when the end of the log was read and the newest
    /// change joined in.
    pub as_of_ms: u64,
    /// Keys in the state files.
    pub keys: u64,
    /// The state files, in order.
    pub states: Vec<String>,
    /// Client op ids in the `ops` file.
    pub op_ids: u64,
    /// Whether it was made by a running node (`lattice backup`).
    pub online: bool,
    /// Its records are encrypted; `keys` holds the wrapped data keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

/// Who is backed up: what the store does not say about itself.
pub struct Source {
    /// The node's region, when known.
    pub region: Option<RegionId>,
    /// The policy set in force.
    pub policy: PolicySet,
    /// Made by a running node.
    pub online: bool,
}

/// One backup at a time per process: two would double the I/O and memory.
static RUNNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A state file being written.
struct Chunk {
    name: String,
    /// The storage position of its last record.
    last: Vec<u8>,
}

/// Writes the state files of `reader` into `dir` (created; it must not
/// exist): records stream out, a new file after [`CHUNK_BYTES`].
struct ChunkWriter<'a> {
    dir: &'a Path,
    /// Encrypts the records (off for an unencrypted node).
    crypt: &'a Crypt,
    chunks: Vec<Chunk>,
    out: Option<(BufWriter<std::fs::File>, u64)>,
    keys: u64,
}

impl ChunkWriter<'_> {
    fn push(&mut self, key: &Key, pos: &[u8], record: &[u8]) -> Result<(), BackupError> {
        let frame = 8 + key.as_str().len() as u64 + record.len() as u64;
        if self.out.as_ref().is_none_or(|(_, n)| *n > 0 && n + frame > CHUNK_BYTES) {
            self.finish()?;
            let name = format!("states-{:06}", self.chunks.len());
            let path = self.dir.join(&name);
            let f = std::fs::File::create_new(&path).map_err(io(&path))?;
            self.out = Some((BufWriter::new(f), 0));
            self.chunks.push(Chunk { name, last: Vec::new() });
        }
        let (w, n) = self
            .out
            .as_mut()
            .ok_or_else(|| BackupError::Refused("no state file open".into()))?;
        let path = self.dir.to_path_buf();
        let sealed = self.crypt.sealer().seal(pos, record)?;
        write_frame(w, key.as_str().as_bytes(), &sealed).map_err(io(&path))?;
        *n += frame;
        if let Some(c) = self.chunks.last_mut() {
            c.last = pos.to_vec();
        }
        self.keys += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), BackupError> {
        if let Some((w, _)) = self.out.take() {
            let f = w.into_inner().map_err(|e| BackupError::Io {
                path: self.dir.to_path_buf(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io(self.dir))?;
        }
        Ok(())
    }
}

fn write_frame(w: &mut impl Write, key: &[u8], record: &[u8]) -> std::io::Result<()> {
    w.write_all(&(key.len() as u32).to_be_bytes())?;
    w.write_all(key)?;
    w.write_all(&(record.len() as u32).to_be_bytes())?;
    w.write_all(record)
}

/// Reads the next frame of a state file (`None` at its end). Lengths are
/// bounded before anything is allocated.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut len = [0u8; 4];
    // The file may end only between frames.
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let bad = |what| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let klen = u32::from_be_bytes(len) as usize;
    if klen > lattice_core::MAX_KEY_LEN {
        return Err(bad("a key longer than a key may be"));
    }
    let mut key = vec![0; klen];
    r.read_exact(&mut key)?;
    r.read_exact(&mut len)?;
    let rlen = u32::from_be_bytes(len) as u64;
    if rlen > MAX_RECORD_BYTES {
        return Err(bad("a record larger than a state file"));
    }
    // Grown as the bytes arrive: a cut file claiming a 1 GiB record must
    // not make restore allocate 1 GiB first.
    let mut record = Vec::with_capacity(rlen.min(1 << 20) as usize);
    r.by_ref().take(rlen).read_to_end(&mut record)?;
    if record.len() as u64 != rlen {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some((key, record)))
}

/// Writes a consistent backup of the store `reader` reads into `dir`,
/// which must not exist (its parent must). See the module documentation
/// for how the states are made consistent while the node writes.
pub fn write(reader: &StoreReader, source: &Source, dir: &Path) -> Result<BackupSummary, BackupError> {
    let _one = RUNNING
        .try_lock()
        .map_err(|_| BackupError::Refused("another backup of this node is running".into()))?;
    let node = reader
        .node_name()?
        .ok_or_else(|| BackupError::Refused("the store has no identity: the node never started".into()))?;
    std::fs::create_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => BackupError::Refused(format!(
            "{} already exists: a backup goes into a new directory",
            dir.display()
        )),
        _ => BackupError::Io {
            path: dir.to_path_buf(),
            source: e,
        },
    })?;
    let result = write_into(reader, source, &node, dir, &mut Hooks::default());
    if result.is_err() {
        // Leave no half backup that looks like one (it has no manifest
        // anyway, so restore would refuse it).
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// What tests do inside a backup: act after each record copied (write to
/// the node while it is copied), or skip the catch-up (the mutant the
/// consistency tests must catch).
#[derive(Default)]
struct Hooks<'a> {
    after_record: Option<&'a mut dyn FnMut(&Key)>,
    #[cfg(test)]
    skip_catch_up: bool,
}

fn write_into(
    reader: &StoreReader,
    source: &Source,
    node: &str,
    dir: &Path,
    hooks: &mut Hooks<'_>,
) -> Result<BackupSummary, BackupError> {
    let log = reader.log();
    let e0 = log.meta()?;
    // Read after E0: every op id of a write in the state as of E0, and
    // only ids of writes applied before E1 (added from the log below).
    let mut ops = reader.op_ids()?;
    let crypt = reader.crypt().clone();
    let keys_file = crypt.stored()?;
    if let Some(raw) = &keys_file {
        write_synced(&dir.join(KEYS_FILE), raw)?;
    }
    let mut w = ChunkWriter {
        dir,
        crypt: &crypt,
        chunks: Vec::new(),
        out: None,
        keys: 0,
    };
    reader.records_after(None, &mut |key, pos, record| {
        // A corrupt record fails the backup instead of being copied.
        open_record(&key, &record)?;
        w.push(&key, pos, &record)
            .map_err(|e| lattice_core::Error::Store(e.to_string()))?;
        if let Some(f) = hooks.after_record.as_mut() {
            f(&key);
        }
        Ok(true)
    })?;
    w.finish()?;
    let e1 = log.meta()?;
    let mut as_of_ms = wall_ms();
    let cursor = match (&e0, &e1) {
        #[cfg(test)]
        (Some(_), Some(e1)) if hooks.skip_catch_up => e1.end(),
        (Some(e0), Some(e1)) => {
            let (deltas, newest, logged_ops) = catch_up(reader, e0, e1)?;
            as_of_ms = as_of_ms.max(newest);
            ops.extend(logged_ops);
            join_into_chunks(dir, &mut w, deltas)?;
            e1.end()
        }
        (None, Some(e1)) => {
            return Err(BackupError::Refused(format!(
                "the node's change log was created during the backup (log {:016x}): try again",
                e1.id
            )))
        }
        _ => LogCursor::default(),
    };
    let ops_path = dir.join(OPS_FILE);
    let ops_written;
    {
        let mut seen = BTreeSet::new();
        let mut f = BufWriter::new(std::fs::File::create_new(&ops_path).map_err(io(&ops_path))?);
        for op in &ops {
            if seen.insert(*op) {
                f.write_all(&op.0.to_be_bytes()).map_err(io(&ops_path))?;
            }
        }
        let f = f.into_inner().map_err(|e| BackupError::Io {
            path: ops_path.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io(&ops_path))?;
        ops_written = seen.len() as u64;
    }
    let meta = BackupMeta {
        format: FORMAT,
        node: node.to_string(),
        region: source.region.as_ref().map(|r| r.0.clone()),
        policy: source.policy.clone(),
        log_id: cursor.log,
        cursor: cursor.to_text(),
        as_of_ms,
        keys: w.keys,
        states: w.chunks.iter().map(|c| c.name.clone()).collect(),
        op_ids: ops_written,
        online: source.online,
        encrypted: keys_file.is_some(),
    };
    let meta_path = dir.join(META_FILE);
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| BackupError::Refused(e.to_string()))?;
    write_synced(&meta_path, &text)?;
    let bytes = write_manifest(dir, &meta)?;
    Ok(BackupSummary {
        dir: dir.display().to_string(),
        keys: meta.keys,
        bytes,
        as_of_ms,
    })
}

type Deltas = BTreeMap<Vec<u8>, (Key, Value)>;

/// Joins every change logged from `e0` to `e1` by key (keyed by storage
/// position). Fails if the log changed identity or retention dropped one.
fn catch_up(reader: &StoreReader, e0: &LogMeta, e1: &LogMeta) -> Result<(Deltas, u64, Vec<OpId>), BackupError> {
    if e0.id != e1.id || e0.partitions() != e1.partitions() {
        return Err(BackupError::Refused(
            "the node's change log was replaced during the backup: try again".into(),
        ));
    }
    let trimmed = || {
        BackupError::Refused(
            "the change log's retention dropped changes made during the backup before they were joined in \
             (raise [log] retention_bytes, back up at a quieter time, or stop the node and use `latticed backup`)"
                .into(),
        )
    };
    let log = reader.log();
    let (mut deltas, mut newest, mut ops, mut bytes) = (Deltas::new(), 0, Vec::new(), 0u64);
    for p in 0..e1.partitions() {
        let (from, to) = (e0.next[p as usize], e1.next[p as usize]);
        if from >= to {
            continue;
        }
        if e1.first[p as usize] > from {
            return Err(trimmed());
        }
        let mut expect = from;
        let mut failed = None;
        log.scan(p, from, &mut |e, size| {
            if e.seq >= to {
                return Ok(false);
            }
            if e.seq != expect {
                failed = Some(trimmed());
                return Ok(false);
            }
            expect += 1;
            bytes += size as u64;
            if bytes > CATCHUP_BYTES {
                failed = Some(BackupError::Refused(format!(
                    "more than {} MiB of changes were made during the backup: back up at a quieter time, \
                     or stop the node and use `latticed backup`",
                    CATCHUP_BYTES >> 20
                )));
                return Ok(false);
            }
            newest = newest.max(e.change.applied.wall_ms);
            ops.extend(e.change.op);
            let c = e.change;
            match deltas.entry(StoreReader::position(&c.key)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((c.key, (*c.delta).clone()));
                }
                std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().1.join(&c.delta),
            }
            Ok(true)
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if expect != to {
            return Err(trimmed());
        }
    }
    Ok((deltas, newest, ops))
}

/// Joins `deltas` into the state files (rewriting only those holding a
/// changed key), and writes the keys no file holds into the file their
/// position falls in (or a new last one).
fn join_into_chunks(dir: &Path, w: &mut ChunkWriter<'_>, mut deltas: Deltas) -> Result<(), BackupError> {
    for i in 0..w.chunks.len() {
        let lo = if i == 0 {
            Vec::new()
        } else {
            w.chunks[i - 1].last.clone()
        };
        let last = i + 1 == w.chunks.len();
        // The deltas whose position falls in this file: after the previous
        // file's last record, up to this one's (or beyond, for the last).
        let mut mine: Deltas = if last {
            std::mem::take(&mut deltas)
        } else {
            let rest = deltas.split_off(&successor(&w.chunks[i].last));
            std::mem::replace(&mut deltas, rest)
        };
        debug_assert!(mine.keys().all(|k| i == 0 || *k > lo));
        if mine.is_empty() {
            continue;
        }
        let path = dir.join(&w.chunks[i].name);
        let tmp = dir.join(format!("{}.tmp", w.chunks[i].name));
        {
            let mut r = BufReader::new(std::fs::File::open(&path).map_err(io(&path))?);
            let mut out = BufWriter::new(std::fs::File::create_new(&tmp).map_err(io(&tmp))?);
            let sealer = w.crypt.sealer();
            while let Some((k, record)) = read_frame(&mut r).map_err(io(&path))? {
                let key = Key::new(String::from_utf8_lossy(&k).into_owned())?;
                let pos = StoreReader::position(&key);
                match mine.remove(&pos) {
                    Some((_, delta)) => {
                        let record = sealer.open(&pos, record.into())?;
                        let mut v = open_record(&key, &record)?;
                        v.join(&delta);
                        let sealed = sealer.seal(&pos, &seal_record(&key, &v)?)?;
                        write_frame(&mut out, &k, &sealed).map_err(io(&tmp))?;
                    }
                    None => write_frame(&mut out, &k, &record).map_err(io(&tmp))?,
                }
            }
            // Keys created after the copy passed them: their whole history
            // is in the deltas.
            for (pos, (key, v)) in std::mem::take(&mut mine) {
                let sealed = sealer.seal(&pos, &seal_record(&key, &v)?)?;
                write_frame(&mut out, key.as_str().as_bytes(), &sealed).map_err(io(&tmp))?;
                w.keys += 1;
            }
            let f = out.into_inner().map_err(|e| BackupError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    // No state file at all (the store was empty when copied).
    for (_, (key, v)) in deltas {
        let pos = StoreReader::position(&key);
        w.push(&key, &pos, &seal_record(&key, &v)?)?;
    }
    w.finish()
}

/// The smallest byte string after `pos`.
fn successor(pos: &[u8]) -> Vec<u8> {
    let mut s = pos.to_vec();
    s.push(0);
    s
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut f = std::fs::File::create_new(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// The blake3 hash (hex) and size of a file, read in 1 MiB pieces.
fn hash_file(path: &Path) -> Result<(String, u64), BackupError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finalize().to_hex().to_string(), size))
}

/// Writes the manifest of every file of the backup; returns their bytes.
fn write_manifest(dir: &Path, meta: &BackupMeta) -> Result<u64, BackupError> {
    let mut text = String::new();
    let mut total = 0;
    let keys = meta.encrypted.then_some(KEYS_FILE);
    let names = meta
        .states
        .iter()
        .map(String::as_str)
        .chain([OPS_FILE, META_FILE])
        .chain(keys);
    for name in names {
        let (hash, size) = hash_file(&dir.join(name))?;
        text.push_str(&format!("{hash} {size} {name}\n"));
        total += size;
    }
    write_synced(&dir.join(MANIFEST), text.as_bytes())?;
    total += text.len() as u64;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(total)
}

/// Checks every file of the backup in `dir` against its manifest (and that
/// the manifest lists every file, and the metadata's state files), then
/// returns the metadata.
pub fn verify(dir: &Path) -> Result<BackupMeta, BackupError> {
    let damaged = |reason: String| BackupError::Damaged {
        dir: dir.to_path_buf(),
        reason,
    };
    let manifest = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(damaged(
                "it has no manifest (an interrupted backup, or not a backup)".into(),
            ))
        }
        Err(e) => return Err(damaged(format!("the manifest does not read: {e}"))),
    };
    let mut listed = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        let [hash, size, name] = parts[..] else {
            return Err(damaged(format!("manifest line {} is malformed", n + 1)));
        };
        if name.contains('/') || name == MANIFEST || !listed.insert(name.to_string()) {
            return Err(damaged(format!("manifest line {} names {name:?}", n + 1)));
        }
        let path = dir.join(name);
        if !path.exists() {
            return Err(damaged(format!("{name} is missing")));
        }
        let (found, len) = hash_file(&path)?;
        if size.parse::<u64>().ok() != Some(len) {
            return Err(damaged(format!("{name} has {len} bytes, the manifest says {size}")));
        }
        if found != hash {
            return Err(damaged(format!(
                "{name} does not match its blake3 hash in the manifest (it changed after the backup)"
            )));
        }
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
        if name != MANIFEST && !listed.contains(&name) {
            return Err(damaged(format!("{name} is not in the manifest")));
        }
    }
    let raw = std::fs::read(dir.join(META_FILE)).map_err(|e| damaged(format!("{META_FILE}: {e}")))?;
    let meta: BackupMeta = serde_json::from_slice(&raw).map_err(|e| damaged(format!("{META_FILE}: {e}")))?;
    if meta.format != FORMAT {
        return Err(BackupError::Refused(format!(
            "the backup has format {}, this build reads format {FORMAT}",
            meta.format
        )));
    }
    let keys = meta.encrypted.then_some(KEYS_FILE);
    for name in meta.states.iter().map(String::as_str).chain([OPS_FILE]).chain(keys) {
        if !listed.contains(name) {
            return Err(damaged(format!("{name} is missing from the manifest")));
        }
    }
    Ok(meta)
}

/// Calls `visit` on every state of a verified backup, in file order. Each
/// record is checked (`open_record`) and decoded; an encrypted backup's
/// records are decrypted with its data keys, unwrapped with `keys`.
pub fn read_states(
    dir: &Path,
    meta: &BackupMeta,
    keys: &Keys,
    visit: &mut dyn FnMut(Key, Value) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let crypt = if meta.encrypted {
        let raw = std::fs::read(dir.join(KEYS_FILE)).map_err(io(dir))?;
        Crypt::open_backup(&raw, keys, dir)?
    } else {
        Crypt::off()
    };
    let sealer = crypt.sealer();
    for name in &meta.states {
        let path = dir.join(name);
        let mut r = BufReader::new(std::fs::File::open(&path).map_err(io(&path))?);
        while let Some((k, record)) = read_frame(&mut r).map_err(|e| BackupError::Damaged {
            dir: dir.to_path_buf(),
            reason: format!("{name}: {e}"),
        })? {
            let key = Key::new(String::from_utf8_lossy(&k).into_owned())?;
            let record = sealer.open(&StoreReader::position(&key), record.into())?;
            let value = open_record(&key, &record)?;
            visit(key, value)?;
        }
    }
    Ok(())
}

/// What [`restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Keys written into the new data dir.
    pub keys: u64,
    /// Keys left out: the restoring node's region may not hold them.
    pub not_allowed: u64,
    /// Client op ids restored.
    pub op_ids: u64,
    /// The backup's metadata.
    pub meta: BackupMeta,
    /// The policy set the restored node starts under.
    pub policy: PolicySet,
}

/// Where and as whom [`restore`] writes.
pub struct Target<'a> {
    /// The new data dir (absent or empty).
    pub data_dir: &'a Path,
    /// The node that will run on it.
    pub node: &'a str,
    /// Its region.
    pub region: &'a RegionId,
    /// The policy set its configuration has.
    pub policy: PolicySet,
    /// Its change log's settings.
    pub log: crate::changelog::LogSettings,
    /// Its encryption keys: the new data dir is encrypted under them, and
    /// they open an encrypted backup.
    pub keys: Keys,
    /// Its audit key (`audit_key_file`): the new log is keyed with it.
    pub audit_key: Option<lattice_core::policy::audit::AuditKey>,
}

/// Restores the backup in `from` into a new data dir for `target`: checks
/// the manifest, then writes every state the target's region may hold
/// under the policy it will start with (the newer of its configuration's
/// and the backup's), and the op ids, and records that policy in the new
/// data dir's audit log.
pub fn restore(from: &Path, target: &Target<'_>) -> Result<Restored, BackupError> {
    let meta = verify(from)?;
    let dir = target.data_dir;
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
        if entries.next().is_some() {
            return Err(BackupError::Refused(format!(
                "{} is not empty: restore writes a new data dir (move the old one aside first)",
                dir.display()
            )));
        }
    }
    let policy = if meta.policy.is_superseded_by(&target.policy) {
        target.policy.clone()
    } else {
        meta.policy.clone()
    };
    let existed = dir.exists();
    let result = restore_into(from, target, meta, policy);
    if result.is_err() {
        // Leave no half-restored data dir a node could start on.
        let _ = std::fs::remove_dir_all(dir);
        if existed {
            let _ = std::fs::create_dir(dir);
        }
    }
    result
}

fn restore_into(
    from: &Path,
    target: &Target<'_>,
    meta: BackupMeta,
    policy: PolicySet,
) -> Result<Restored, BackupError> {
    let dir = target.data_dir;
    let mut store = SledStore::open_with(dir, target.node, Durability::Sync, target.log, &target.keys)
        .map_err(|e| BackupError::Refused(e.to_string()))?;
    let (mut keys, mut not_allowed) = (0u64, 0u64);
    let mut batch = WriteBatch::default();
    let mut batch_bytes = 0;
    read_states(from, &meta, &target.keys, &mut |key, value| {
        if !policy.may_hold(key.as_str(), target.region) {
            not_allowed += 1;
            return Ok(());
        }
        let record = Record::seal(&key, &value)?;
        batch_bytes += record.as_bytes().len() + key.as_str().len();
        batch.values.push((key, record));
        keys += 1;
        if batch_bytes >= RESTORE_BATCH_BYTES {
            store.apply(std::mem::take(&mut batch))?;
            store.flush()?;
            batch_bytes = 0;
        }
        Ok(())
    })?;
    let raw = std::fs::read(from.join(OPS_FILE)).map_err(io(from))?;
    if raw.len() % 16 != 0 {
        return Err(BackupError::Damaged {
            dir: from.to_path_buf(),
            reason: format!("{OPS_FILE} is not a whole number of op ids"),
        });
    }
    batch.op_ids = raw
        .chunks_exact(16)
        .map(|c| {
            let mut b = [0u8; 16];
            b.copy_from_slice(c);
            OpId(u128::from_be_bytes(b))
        })
        .collect();
    let op_ids = batch.op_ids.len() as u64;
    // Not closed cleanly: the node that opens it treats op ids of writes
    // after the backup as possibly applied (it answers their retries
    // OutcomeUnknown for the retry window), as after a crash.
    batch.meta = Some(Meta {
        replica: ReplicaId(rand::random()),
        next_seq: 0,
        clean: false,
        async_life: false,
    });
    store.apply(batch)?;
    store.sync()?;
    let mut audit = crate::audit::AuditLog::open(
        dir,
        Some(store.audit_tree().map_err(store_err)?),
        target.audit_key.clone(),
    )?;
    audit.append(target.node, "restore", policy.clone(), None)?;
    drop(store);
    Ok(Restored {
        keys,
        not_allowed,
        op_ids,
        meta,
        policy,
    })
}

/// `latticed bench-backup`: writes `keys` counters (batches of 1,000)
/// through the real engine into a store in `dir` (cleared first), then
/// times an offline backup of it and a restore into a new data dir, and
/// prints both with the sizes.
pub fn bench(dir: &Path, keys: usize) -> anyhow::Result<()> {
    use lattice_core::crdt::Op;
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let data = dir.join("data");
    let now = wall_ms();
    {
        let store = SledStore::open(&data, "bench", Durability::Group)?;
        let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let mut r = Replica::open(ReplicaConfig::new("bench", "eu", vec![]), store, rng, Time(now))?;
        for start in (0..keys).step_by(1_000) {
            let ops = (start..(start + 1_000).min(keys))
                .map(|i| Ok((Key::new(format!("bench/{i}"))?, Op::CounterAdd(1))))
                .collect::<Result<Vec<_>, lattice_core::Error>>()?;
            r.write(Time(now), ops)?;
            r.flush(Time(now))?;
        }
    }
    let (db, reader) = open_stopped_waiting(&data)?;
    let started = std::time::Instant::now();
    let source = Source {
        region: Some(RegionId::from("eu")),
        policy: PolicySet::default(),
        online: false,
    };
    let s = write(&reader, &source, &dir.join("backup"))?;
    let backup_secs = started.elapsed().as_secs_f64();
    drop((db, reader));
    let started = std::time::Instant::now();
    let r = restore(
        &dir.join("backup"),
        &Target {
            data_dir: &dir.join("restored"),
            node: "bench2",
            region: &RegionId::from("eu"),
            policy: PolicySet::default(),
            log: Default::default(),
            keys: Keys::none(),
            audit_key: None,
        },
    )?;
    let restore_secs = started.elapsed().as_secs_f64();
    println!(
        "keys={} backup_bytes={} backup_bytes_per_key={:.1} backup_secs={backup_secs:.2} restore_keys={} restore_secs={restore_secs:.2}",
        s.keys,
        s.bytes,
        s.bytes as f64 / s.keys.max(1) as f64,
        r.keys
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// [`StoreReader::open_stopped`], waiting (up to 5 s) for the lock a store
/// just dropped in this process may still hold.
fn open_stopped_waiting(dir: &Path) -> anyhow::Result<(sled::Db, StoreReader)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match StoreReader::open_stopped(dir, &Keys::none()) {
            Ok(x) => return Ok(x),
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn store_err(e: impl std::fmt::Display) -> lattice_core::Error {
    lattice_core::Error::Store(e.to_string())
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::crdt::Op;
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;

    fn replica(dir: &Path) -> Replica<SledStore> {
        replica_with(dir, &Keys::none())
    }

    fn replica_with(dir: &Path, keys: &Keys) -> Replica<SledStore> {
        let store = SledStore::open_with(dir, "n1", Durability::Group, Default::default(), keys).unwrap();
        let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng, Time(now())).unwrap()
    }

    /// Engine time near the wall clock: the log's retention by age goes by it.
    fn now() -> u64 {
        wall_ms()
    }

    fn source() -> Source {
        Source {
            region: Some(RegionId::from("eu")),
            policy: PolicySet::default(),
            online: true,
        }
    }

    fn states_with(dir: &Path, keys: &Keys) -> BTreeMap<String, String> {
        let meta = verify(dir).unwrap();
        let mut out = BTreeMap::new();
        read_states(dir, &meta, keys, &mut |k, v| {
            out.insert(k.as_str().to_string(), v.view().to_string());
            Ok(())
        })
        .unwrap();
        out
    }

    /// A node writes while its records are copied: after each record, an
    /// atomic write adds 1 to both `a` and `b` (and creates a new key).
    /// The backup must hold every key as of one point: `a == b`, and the
    /// values the store has when the copy ended (nothing is written after).
    /// The same copy without the catch-up (the mutant `skip_catch_up`) is
    /// fuzzy, and the check sees it: this is what the real-process test
    /// `backup_is_consistent_under_concurrent_atomic_writes` relies on.
    #[test]
    fn writes_during_the_copy_are_joined_in_and_a_copy_without_them_is_caught() {
        // The catch-up rewrites encrypted state files too.
        for (skip, encrypt) in [(false, false), (true, false), (false, true)] {
            let tmp = tempfile::tempdir().unwrap();
            let keys = if encrypt {
                Keys::with(crate::crypt::Kek::generate())
            } else {
                Keys::none()
            };
            let mut r = replica_with(&tmp.path().join("d"), &keys);
            // Pairs of counters, every one of them added to in each write.
            let pairs: Vec<(Key, Key)> = (0..20)
                .map(|j| {
                    (
                        Key::new(format!("p{j}/a")).unwrap(),
                        Key::new(format!("p{j}/b")).unwrap(),
                    )
                })
                .collect();
            let both = |extra: Option<Key>| {
                let mut ops: Vec<(Key, Op)> = pairs
                    .iter()
                    .flat_map(|(a, b)| [(a.clone(), Op::CounterAdd(1)), (b.clone(), Op::CounterAdd(1))])
                    .collect();
                ops.extend(extra.map(|k| (k, Op::CounterAdd(1))));
                ops
            };
            for i in 0..300 {
                let k = Key::new(format!("filler/{i}")).unwrap();
                r.write(Time(now()), vec![(k, Op::CounterAdd(1))]).unwrap();
            }
            r.write(Time(now()), both(None)).unwrap();
            r.flush(Time(now())).unwrap();
            let reader = r.store().reader();
            let mut n = 0u64;
            let mut write = |_: &Key| {
                n += 1;
                if n % 5 == 0 {
                    let new = Key::new(format!("new/{n}")).unwrap();
                    r.write(Time(now() + n), both(Some(new))).unwrap();
                    r.flush(Time(now() + n)).unwrap();
                }
            };
            let out = tmp.path().join("backup");
            std::fs::create_dir(&out).unwrap();
            let mut hooks = Hooks {
                after_record: Some(&mut write),
                skip_catch_up: skip,
            };
            write_into(&reader, &source(), "n1", &out, &mut hooks).unwrap();
            let got = states_with(&out, &keys);
            if encrypt {
                let e = read_states(&out, &verify(&out).unwrap(), &Keys::none(), &mut |_, _| Ok(())).unwrap_err();
                assert!(e.to_string().contains("is encrypted"), "{e}");
                let wrong = Keys::with(crate::crypt::Kek::generate());
                let e = read_states(&out, &verify(&out).unwrap(), &wrong, &mut |_, _| Ok(())).unwrap_err();
                assert!(e.to_string().contains("does not open"), "{e}");
            }
            let live: BTreeMap<String, String> = {
                let mut m = BTreeMap::new();
                reader
                    .records_after(None, &mut |k, _, rec| {
                        m.insert(k.as_str().to_string(), open_record(&k, &rec)?.view().to_string());
                        Ok(true)
                    })
                    .unwrap();
                m
            };
            assert!(
                live["p0/a"].parse::<u64>().unwrap() > 20,
                "writes happened during the copy"
            );
            let unequal = (0..20)
                .filter(|j| got.get(&format!("p{j}/a")) != got.get(&format!("p{j}/b")))
                .count();
            if skip {
                assert!(
                    unequal > 0,
                    "the copy without the catch-up is fuzzy, and the check sees it"
                );
            } else {
                assert_eq!(unequal, 0, "every pair as of one point");
                assert_eq!(got, live, "every key as of the end of the copy");
            }
        }
    }

    /// A state file ends only between frames: a cut anywhere inside one
    /// (also inside its first length) is an error, not a shorter file; a
    /// length past its bound is refused before anything is allocated.
    #[test]
    fn state_frames_refuse_a_cut_and_an_absurd_length() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"k1", b"record").unwrap();
        write_frame(&mut buf, b"k2", b"other").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap().unwrap().0, b"k1");
        assert_eq!(read_frame(&mut r).unwrap().unwrap().1, b"other");
        assert!(read_frame(&mut r).unwrap().is_none());
        let one = 4 + 2 + 4 + 6;
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            let outcome = read_frame(&mut r).and_then(|_| read_frame(&mut r));
            if cut == one {
                assert!(outcome.unwrap().is_none(), "cut {cut}: between frames");
            } else {
                assert!(outcome.is_err(), "cut {cut}");
            }
        }
        let mut huge = Vec::new();
        huge.extend_from_slice(&1u32.to_be_bytes());
        huge.push(b'k');
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_frame(&mut &huge[..]).is_err());
        let mut long_key = Vec::new();
        long_key.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_frame(&mut &long_key[..]).is_err());
    }

    /// Restore refuses a flipped byte in any file, a missing file, an extra
    /// one and a non-empty target; an intact backup restores every key,
    /// and the store opens under the op ids it had.
    #[test]
    fn an_encrypted_backup_restores_with_its_key_only_and_can_leave_encryption() {
        use crate::crypt::Kek;
        let tmp = tempfile::tempdir().unwrap();
        let backup = tmp.path().join("b");
        let kek = Kek::generate();
        {
            let mut r = replica_with(&tmp.path().join("d"), &Keys::with(kek.clone()));
            r.write(
                Time(now()),
                vec![(Key::new("secret").unwrap(), Op::LwwSet(b"PLAIN-1234".to_vec().into()))],
            )
            .unwrap();
            r.flush(Time(now())).unwrap();
            // Not `write`: its one-backup-per-process lock would make this
            // test and the others fail each other when run in parallel.
            std::fs::create_dir(&backup).unwrap();
            write_into(&r.store().reader(), &source(), "n1", &backup, &mut Hooks::default()).unwrap();
        }
        let target = |name: &str, keys: Keys| {
            restore(
                &backup,
                &Target {
                    data_dir: &tmp.path().join(name),
                    node: "n2",
                    region: &RegionId::from("eu"),
                    policy: PolicySet::default(),
                    log: Default::default(),
                    keys,
                    audit_key: None,
                },
            )
        };
        let e = target("none", Keys::none()).unwrap_err().to_string();
        assert!(e.contains("is encrypted"), "{e}");
        let e = target("wrong", Keys::with(Kek::generate())).unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
        // Under another node's key: encrypted under it, readable with it only.
        let other = Kek::generate();
        let keys = Keys {
            current: Some(other.clone()),
            old: vec![kek.clone()],
        };
        assert_eq!(target("other", keys).unwrap().keys, 1);
        let (_db, reader) = StoreReader::open_stopped(&tmp.path().join("other"), &Keys::with(other)).unwrap();
        assert!(reader.get(&Key::new("secret").unwrap()).unwrap().is_some());
        drop((_db, reader));
        // With the key only as an old one: a plaintext data dir (how to
        // leave encryption at rest).
        let keys = Keys {
            current: None,
            old: vec![kek],
        };
        assert_eq!(target("plain", keys).unwrap().keys, 1);
        let (_db, reader) = StoreReader::open_stopped(&tmp.path().join("plain"), &Keys::none()).unwrap();
        assert!(!reader.crypt().is_on());
        assert!(reader.get(&Key::new("secret").unwrap()).unwrap().is_some());
    }

    #[test]
    fn restore_verifies_the_manifest_and_refuses_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let backup = tmp.path().join("b");
        {
            let mut r = replica(&tmp.path().join("d"));
            for i in 0..50 {
                r.write_once(
                    Time(now()),
                    Some(OpId(i)),
                    vec![(Key::new(format!("k{i}")).unwrap(), Op::CounterAdd(i as i64 + 1))],
                )
                .unwrap();
            }
            r.flush(Time(now())).unwrap();
            write(&r.store().reader(), &source(), &backup).unwrap();
            let again = write(&r.store().reader(), &source(), &backup).unwrap_err();
            assert!(again.to_string().contains("already exists"), "{again}");
        }
        let target = |d: &Path| {
            restore(
                d,
                &Target {
                    data_dir: &tmp.path().join(format!("r-{}", rand::random::<u32>())),
                    node: "n2",
                    region: &RegionId::from("eu"),
                    policy: PolicySet::default(),
                    log: Default::default(),
                    keys: Keys::none(),
                    audit_key: None,
                },
            )
        };
        let copy = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            for e in std::fs::read_dir(&backup).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
            d
        };
        let files: Vec<String> = std::fs::read_dir(&backup)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != MANIFEST)
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        for f in &files {
            let d = copy(&format!("flip-{f}"));
            let mut bytes = std::fs::read(d.join(f)).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 1;
            std::fs::write(d.join(f), bytes).unwrap();
            let e = target(&d).unwrap_err().to_string();
            assert!(e.contains(&format!("{f} does not match its blake3 hash")), "{e}");
            let d = copy(&format!("gone-{f}"));
            std::fs::remove_file(d.join(f)).unwrap();
            let e = target(&d).unwrap_err().to_string();
            assert!(e.contains(&format!("{f} is missing")), "{e}");
        }
        let d = copy("extra");
        std::fs::write(d.join("states-000009"), b"x").unwrap();
        let e = target(&d).unwrap_err().to_string();
        assert!(e.contains("states-000009 is not in the manifest"), "{e}");
        let d = copy("no-manifest");
        std::fs::remove_file(d.join(MANIFEST)).unwrap();
        assert!(target(&d).unwrap_err().to_string().contains("no manifest"));
        let full = tmp.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"x").unwrap();
        let e = restore(
            &backup,
            &Target {
                data_dir: &full,
                node: "n2",
                region: &RegionId::from("eu"),
                policy: PolicySet::default(),
                log: Default::default(),
                keys: Keys::none(),
                audit_key: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not empty"), "{e}");
        let r = target(&backup).unwrap();
        assert_eq!((r.keys, r.not_allowed, r.op_ids), (50, 0, 50));
    }
}
