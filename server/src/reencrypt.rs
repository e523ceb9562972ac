//! Re-encryption of a running node's values under its newest data key
//! (`crate::crypt`), online: after a key rotation, or when encryption was
//! turned on for a data dir that held unencrypted values.
//!
//! A pass walks the states (`k`) and the change log (`c`) as sled holds
//! them; each value not under the newest data key is decrypted, encrypted
//! under it and written back with `compare_and_swap` against the bytes it
//! read. A concurrent engine write wins (it is already under the newest
//! key, since the engine seals at flush with the key in force, holding the
//! key ring still until its batch is in sled), and so does retention
//! dropping a log entry: the swap then fails and nothing is resurrected.
//! The engine's record cache holds plaintext, so it never serves stale
//! ciphertext. Passes repeat until one finds nothing left (at most
//! [`MAX_PASSES`]); only then, with the data dir synced, are the older data
//! keys dropped from the key ring.

use crate::storage::StoreReader;
use lattice_core::Error;
use std::path::Path;

/// Most passes one run makes before it gives up retiring the old keys
/// (they stay, and a later run finishes).
pub const MAX_PASSES: u32 = 4;

/// One run at a time per process (a second waits for the first).
static RUNNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Values rewritten under the newest data key.
    pub rewritten: u64,
    /// Values a concurrent write or trim changed first (left as they are).
    pub raced: u64,
    /// Passes made.
    pub passes: u32,
    /// Older data keys dropped (0 when none were left, or when the last
    /// pass still found old values).
    pub retired: usize,
    /// The data key new values use.
    pub current: u32,
    /// True when no value is left under an older key.
    pub complete: bool,
}

/// Re-encrypts every value of the store `reader` reads (data dir `dir`)
/// under the newest data key, making a new one first with `rotate`.
pub fn run(reader: &StoreReader, dir: &Path, rotate: bool) -> Result<Summary, Error> {
    let _one = match RUNNING.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let crypt = reader.crypt().clone();
    if !crypt.is_on() {
        return Err(Error::Store(
            "encryption at rest is off on this node (set [encryption] key_file)".into(),
        ));
    }
    let tree = reader.tree();
    if rotate {
        crypt.rotate(tree)?;
    }
    let mut s = Summary::default();
    while s.passes < MAX_PASSES {
        s.passes += 1;
        let mut left = 0u64;
        for prefix in [&b"k"[..], b"c"] {
            for item in tree.scan_prefix(prefix) {
                let (k, v) = item.map_err(store_err)?;
                let new = {
                    let sealer = crypt.sealer();
                    if !sealer.is_old(&k, &v) {
                        continue;
                    }
                    let plain = sealer.open(&k, v.clone())?;
                    sealer.seal(&k, &plain)?
                };
                left += 1;
                match tree.compare_and_swap(&k, Some(&v), Some(new)).map_err(store_err)? {
                    Ok(()) => s.rewritten += 1,
                    Err(_) => s.raced += 1,
                }
            }
        }
        if left == 0 {
            // The rewritten values must be on disk before the keys that
            // could read their old copies are forgotten.
            sync(tree, dir)?;
            s.retired = crypt.retire_old(tree)?;
            s.complete = true;
            break;
        }
    }
    s.current = crypt.data_keys().1;
    Ok(s)
}

/// Flushes sled, then fsyncs its blob files and log (as a durable flush
/// of the store does).
fn sync(tree: &sled::Tree, dir: &Path) -> Result<(), Error> {
    tree.flush().map_err(store_err)?;
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        for e in entries.flatten() {
            match std::fs::File::open(e.path()) {
                Ok(f) => f.sync_all().map_err(store_err)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        std::fs::File::open(&blobs)
            .and_then(|d| d.sync_all())
            .map_err(store_err)?;
    }
    let db = dir.join("db");
    if db.exists() {
        std::fs::File::open(&db)
            .and_then(|f| f.sync_data())
            .map_err(store_err)?;
    }
    Ok(())
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}
