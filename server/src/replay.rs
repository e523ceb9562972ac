//! Offline tools over a stopped node's data dir: rebuilding state from the
//! change log into a fresh store (`latticed replay`), and a digest of every
//! key's state (`latticed digest`) to compare two stores with.

use crate::changelog::LogReader;
use crate::crypt::{Crypt, Keys};
use crate::storage::{Durability, SledStore};
use lattice_core::crdt::Crdt;
use lattice_core::proto::from_bytes;
use lattice_core::replica::item_hash;
use lattice_core::store::{Record, Store, WriteBatch};
use lattice_core::Key;
use std::collections::HashSet;
use std::path::Path;

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Changes joined into the new store.
    pub changes: u64,
    /// Keys rebuilt.
    pub keys: u64,
    /// Keys left out because the log no longer holds their first change.
    pub incomplete: u64,
}

/// Why a tool could not run.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The data dir could not be opened (missing, or a node runs on it).
    #[error("opening {path}: {source} (is a node still running on it?)")]
    Open {
        /// The dir.
        path: String,
        /// Why.
        source: sled::Error,
    },
    /// The target exists.
    #[error("{0} exists: replay writes a new store, it never overwrites one")]
    Exists(String),
    /// The data dir has no change log.
    #[error("{0} has no change log (written by a build before the log existed)")]
    NoLog(String),
    /// Reading or writing failed.
    #[error(transparent)]
    Store(#[from] lattice_core::Error),
    /// The data dir is encrypted and the key is missing or wrong.
    #[error(transparent)]
    Encryption(#[from] crate::crypt::CryptError),
    /// The target store could not be created.
    #[error("creating the new store: {0}")]
    Create(String),
}

fn open_tree(dir: &Path) -> Result<sled::Tree, ToolError> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(ToolError::Open {
            path: dir.display().to_string(),
            source: sled::Error::Unsupported("not a Lattice data dir".into()),
        });
    }
    let open_err = |source| ToolError::Open {
        path: dir.display().to_string(),
        source,
    };
    let db = sled::Config::new().path(dir).open().map_err(open_err)?;
    db.open_tree("lattice").map_err(open_err)
}

/// The node name a data dir belongs to.
fn node_of(tree: &sled::Tree) -> Result<String, ToolError> {
    let raw = tree
        .get(b"iidentity")
        .map_err(|e| lattice_core::Error::Store(e.to_string()))?
        .ok_or_else(|| lattice_core::Error::Store("the data dir has no identity".into()))?;
    let id: crate::storage::Identity = from_bytes(&raw)?;
    Ok(id.node)
}

/// Rebuilds the states of the keys starting with `prefix` from the change
/// log of the stopped node's `data_dir` into a new store at `to` (for the
/// same node name), joining every change applied by `until_ms` (`None`:
/// all). Keys whose first change the log no longer holds are left out and
/// counted: their state cannot be rebuilt from the log alone.
pub fn replay(
    data_dir: &Path,
    to: &Path,
    until_ms: Option<u64>,
    prefix: &str,
    keys: &Keys,
) -> Result<ReplaySummary, ToolError> {
    if to.exists() {
        return Err(ToolError::Exists(to.display().to_string()));
    }
    let tree = open_tree(data_dir)?;
    let crypt = Crypt::open(&tree, keys, data_dir, false)?;
    let log = LogReader {
        tree: &tree,
        crypt: &crypt,
    };
    let meta = log
        .meta()?
        .ok_or_else(|| ToolError::NoLog(data_dir.display().to_string()))?;
    let node = node_of(&tree)?;
    let mut out = SledStore::open_with(to, &node, Durability::Sync, Default::default(), keys)
        .map_err(|e| ToolError::Create(e.to_string()))?;
    let mut summary = ReplaySummary::default();
    let mut seen: HashSet<Key> = HashSet::new();
    let mut incomplete: HashSet<Key> = HashSet::new();
    let mut pending = 0usize;
    for p in 0..meta.partitions() {
        let mut failed = None;
        log.scan(p, meta.first[p as usize], &mut |e, _| {
            let c = e.change;
            if !c.key.as_str().starts_with(prefix) {
                return Ok(true);
            }
            if seen.insert(c.key.clone()) && !c.first {
                incomplete.insert(c.key.clone());
            }
            if incomplete.contains(&c.key) || until_ms.is_some_and(|u| c.applied.wall_ms > u) {
                return Ok(true);
            }
            let state = match out.get(&c.key)? {
                Some(mut s) => {
                    s.join(&c.delta);
                    s
                }
                None => {
                    summary.keys += 1;
                    (*c.delta).clone()
                }
            };
            let record = Record::seal(&c.key, &state)?;
            out.apply(WriteBatch {
                values: vec![(c.key, record)],
                ..WriteBatch::default()
            })?;
            summary.changes += 1;
            pending += 1;
            if pending >= 10_000 {
                pending = 0;
                if let Err(e) = out.flush() {
                    failed = Some(e);
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    out.sync()?;
    summary.incomplete = incomplete.len() as u64;
    Ok(summary)
}

/// A digest of every key's state in a stopped node's data dir: blake3 over
/// each key's canonical item hash (the one anti-entropy compares), in
/// storage order, and the number of keys. Two stores with equal states have
/// equal digests, however their values were encoded. Keys starting with
/// `prefix` only.
pub fn digest(data_dir: &Path, prefix: &str, keys: &Keys) -> Result<(String, u64), ToolError> {
    let tree = open_tree(data_dir)?;
    let crypt = Crypt::open(&tree, keys, data_dir, false)?;
    let reader = crate::storage::StoreReader::from_tree(tree, std::sync::Arc::new(crypt));
    let mut h = blake3::Hasher::new();
    let mut keys = 0u64;
    reader.records_after(None, &mut |key, _, record| {
        if !key.as_str().starts_with(prefix) {
            return Ok(true);
        }
        let value = lattice_core::store::open_record(&key, &record)?;
        h.update(&item_hash(&key, &value)?.to_le_bytes());
        keys += 1;
        Ok(true)
    })?;
    Ok((h.finalize().to_hex().to_string(), keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::LogSettings;
    use lattice_core::crdt::Op;
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;

    /// A key whose first changes retention dropped cannot be rebuilt from
    /// the log: replay leaves it out and counts it, rather than writing the
    /// join of the changes that are left (a state the key never had).
    #[test]
    fn replay_leaves_out_keys_whose_first_change_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let settings = LogSettings {
                partitions: 1,
                retention_bytes: 4_096,
                retention_age_ms: 0,
            };
            let store = SledStore::open_with_log(&data, "n1", Durability::Sync, settings).unwrap();
            let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
            let mut r = Replica::open(ReplicaConfig::new("n1", "eu", vec![]), store, rng, Time(1)).unwrap();
            let mut write = |k: &str, t: u64| {
                r.write(Time(t), vec![(Key::new(k).unwrap(), Op::CounterAdd(1))])
                    .unwrap();
                r.flush(Time(t)).unwrap();
            };
            for t in 0..200 {
                write("old", 10 + t);
            }
            for t in 0..3 {
                write("new", 300 + t);
            }
            r.close(Time(400)).unwrap();
        }
        let to = dir.path().join("to");
        let s = replay(&data, &to, None, "", &Keys::none()).unwrap();
        assert_eq!(s.incomplete, 1, "{s:?}");
        let (_, keys) = digest(&to, "", &Keys::none()).unwrap();
        assert_eq!(keys, 1, "only the key whose whole history is retained");
    }
}
