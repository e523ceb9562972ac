//! Encryption at rest: data keys (DEKs) wrapped by a key-encryption key
//! (KEK), and the envelope of an encrypted sled value.
//!
//! What is encrypted: the values of the states (`k` entries) and of the
//! change log (`c` entries), in sled and in backups. Not encrypted: the
//! sled keys (so key *names* are readable), op id chunks, metadata, the
//! identity, the watch feed's tree and the audit log (SECURITY.md).
//!
//! An encrypted value is `MAGIC`, the DEK's id (u32 BE), a random 24-byte
//! nonce, then XChaCha20-Poly1305 of the plaintext record with the sled key
//! as associated data: a value moved to another key, or a flipped byte,
//! fails the tag and is `Error::Corrupt` naming the key. The plaintext is
//! the sealed record as before (its blake3 check inside).
//!
//! The DEKs (random 32 bytes each) are stored wrapped under the KEK in the
//! data dir's identity entry `ikeyring`, each with the KEK's id (a blake3
//! fingerprint, never the KEK); the KEK comes from `[encryption] key_file`
//! or `LATTICE_ENCRYPTION_KEY` and never enters the data dir. New values
//! use the newest DEK; the older ones stay until a re-encryption pass
//! (`crate::reencrypt`) finds nothing under them.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use lattice_core::proto::{from_bytes, to_bytes};
use lattice_core::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

/// The environment variable holding the KEK (64 hex digits).
pub const KEY_ENV: &str = "LATTICE_ENCRYPTION_KEY";
/// The environment variable holding older KEKs, comma-separated hex,
/// kept only to unwrap data keys wrapped before a KEK rotation.
pub const OLD_KEYS_ENV: &str = "LATTICE_ENCRYPTION_OLD_KEYS";
/// The sled key (in the `lattice` tree) of the wrapped data keys.
pub const KEYRING_KEY: &[u8] = b"ikeyring";

/// The first bytes of an encrypted value.
const MAGIC: &[u8; 3] = b"LE\x01";
/// Magic, DEK id, nonce.
const HEADER: usize = 3 + 4 + 24;
/// The AEAD tag.
const TAG: usize = 16;

/// Errors of the keys.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// A KEK does not parse or read.
    #[error("the encryption key {what}: {reason}")]
    BadKey {
        /// Where it came from.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The data dir is encrypted and no KEK was given.
    #[error("the data dir {0} is encrypted; set [encryption] key_file or LATTICE_ENCRYPTION_KEY")]
    NoKey(PathBuf),
    /// No given KEK opens a stored data key.
    #[error(
        "the encryption key does not open the data keys of {dir} ({reason}); \
         after a key rotation, keep the old key in [encryption] old_key_files or LATTICE_ENCRYPTION_OLD_KEYS"
    )]
    WrongKey {
        /// The data dir (or backup).
        dir: PathBuf,
        /// Which data key failed.
        reason: String,
    },
    /// sled failed, or the key ring does not decode.
    #[error("the data keys of {dir}: {reason}")]
    Store {
        /// The data dir.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// A key-encryption key. Its `Debug` shows its id only.
#[derive(Clone)]
pub struct Kek {
    key: [u8; 32],
    id: [u8; 8],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", hex(&self.id))
    }
}

impl Kek {
    /// A KEK of 32 bytes.
    pub fn new(key: [u8; 32]) -> Kek {
        let d = blake3::derive_key("lattice 2026-11 encryption key id", &key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        Kek { key, id }
    }

    /// A fresh random KEK (from the OS).
    pub fn generate() -> Kek {
        Kek::new(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// Parses 64 hex digits (surrounding whitespace ignored); `what` names
    /// the source in errors (never the key).
    pub fn from_hex(text: &str, what: &str) -> Result<Kek, CryptError> {
        let bad = |reason: &str| CryptError::BadKey {
            what: what.to_string(),
            reason: reason.to_string(),
        };
        let t = text.trim().as_bytes();
        if t.len() != 64 {
            return Err(bad("must be 64 hex digits (32 bytes)"));
        }
        let mut key = [0u8; 32];
        for (i, pair) in t.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).ok_or_else(|| bad("is not hex"));
            key[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Kek::new(key))
    }

    /// Reads a key file (64 hex digits). A file others may read is
    /// accepted with a warning (a mounted secret may carry any mode).
    pub fn from_file(path: &Path) -> Result<Kek, CryptError> {
        let what = format!("file {}", path.display());
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %path.display(), mode = %format!("{:o}", m.permissions().mode() & 0o777), "the encryption key file is readable by others than its owner: make it 0600");
                }
            }
        }
        let text = std::fs::read_to_string(path).map_err(|e| CryptError::BadKey {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Kek::from_hex(&text, &what)
    }

    /// The key as 64 hex digits (what a key file holds).
    pub fn to_hex(&self) -> String {
        hex(&self.key)
    }

    /// Its id, as stored beside the data keys it wraps.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The KEKs a node is given: the current one (`None`: no encryption) and
/// older ones to unwrap data keys wrapped before a rotation.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    /// Wraps new data keys; data keys under an older KEK are re-wrapped.
    pub current: Option<Kek>,
    /// Only for unwrapping.
    pub old: Vec<Kek>,
}

impl Keys {
    /// No encryption.
    pub fn none() -> Keys {
        Keys::default()
    }

    /// Encryption under `kek`.
    pub fn with(kek: Kek) -> Keys {
        Keys {
            current: Some(kek),
            old: Vec::new(),
        }
    }

    fn find(&self, id: &[u8; 8]) -> Option<&Kek> {
        self.current.iter().chain(&self.old).find(|k| &k.id == id)
    }
}

/// A data key as stored: wrapped under a KEK.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WrappedDek {
    id: u32,
    kek: [u8; 8],
    nonce: [u8; 24],
    wrapped: Vec<u8>,
}

/// The stored key ring (`ikeyring`): its presence marks the data dir as
/// encrypted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredRing {
    deks: Vec<WrappedDek>,
    /// The DEK new values use.
    current: u32,
    /// The dir held unencrypted values when encryption was turned on, and
    /// no re-encryption pass has finished since: a value without the
    /// envelope is read as a plain sealed record.
    legacy_plaintext: bool,
}

struct Ring {
    on: bool,
    kek: Option<Kek>,
    deks: BTreeMap<u32, ([u8; 32], XChaCha20Poly1305)>,
    current: u32,
    legacy: bool,
}

/// The data keys in use (shared by the engine's store, its readers and the
/// re-encryption pass). Off (values pass through) without a KEK.
pub struct Crypt {
    ring: RwLock<Ring>,
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Crypt")
    }
}

fn wrap_aad(id: u32) -> Vec<u8> {
    [&b"lattice dek "[..], &id.to_be_bytes()].concat()
}

fn wrap(kek: &Kek, id: u32, dek: &[u8; 32]) -> Result<WrappedDek, Error> {
    let c = XChaCha20Poly1305::new(&kek.key.into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let wrapped = c
        .encrypt(
            &nonce,
            Payload {
                msg: dek,
                aad: &wrap_aad(id),
            },
        )
        .map_err(|_| Error::Store("wrapping a data key failed".into()))?;
    Ok(WrappedDek {
        id,
        kek: kek.id,
        nonce: nonce.into(),
        wrapped,
    })
}

fn unwrap_dek(keys: &Keys, w: &WrappedDek, dir: &Path) -> Result<[u8; 32], CryptError> {
    let wrong = |reason: String| CryptError::WrongKey {
        dir: dir.to_path_buf(),
        reason,
    };
    let kek = keys.find(&w.kek).ok_or_else(|| {
        wrong(format!(
            "data key {} is wrapped under key {}, which was not given",
            w.id,
            hex(&w.kek)
        ))
    })?;
    let c = XChaCha20Poly1305::new(&kek.key.into());
    let plain = c
        .decrypt(
            &w.nonce.into(),
            Payload {
                msg: &w.wrapped,
                aad: &wrap_aad(w.id),
            },
        )
        .map_err(|_| wrong(format!("data key {} does not unwrap under key {}", w.id, hex(&w.kek))))?;
    plain
        .try_into()
        .map_err(|_| wrong(format!("data key {} is not 32 bytes", w.id)))
}

/// The data key a stored value is encrypted under (`None`: it has no
/// envelope), for tools and tests that check what a pass left on disk.
pub fn data_key_of(stored: &[u8]) -> Option<u32> {
    (stored.len() >= HEADER + TAG && &stored[..3] == MAGIC)
        .then(|| u32::from_be_bytes([stored[3], stored[4], stored[5], stored[6]]))
}

/// Whether values under sled key `k` are encrypted (states and log entries).
fn covers(k: &[u8]) -> bool {
    matches!(k.first(), Some(b'k') | Some(b'c'))
}

/// How an error names the entry at sled key `k`.
fn describe(k: &[u8]) -> String {
    match k.first() {
        Some(b'k') => String::from_utf8_lossy(k.get(5..).unwrap_or_default()).into_owned(),
        Some(b'c') => format!("change log entry {k:?}"),
        _ => format!("{k:?}"),
    }
}

impl Crypt {
    /// No encryption: values pass through.
    pub fn off() -> Crypt {
        Crypt {
            ring: RwLock::new(Ring {
                on: false,
                kek: None,
                deks: BTreeMap::new(),
                current: 0,
                legacy: false,
            }),
        }
    }

    fn from_stored(stored: &StoredRing, keys: &Keys, dir: &Path) -> Result<Crypt, CryptError> {
        let mut deks = BTreeMap::new();
        for w in &stored.deks {
            let k = unwrap_dek(keys, w, dir)?;
            deks.insert(w.id, (k, XChaCha20Poly1305::new(&k.into())));
        }
        if !deks.contains_key(&stored.current) {
            return Err(CryptError::Store {
                dir: dir.to_path_buf(),
                reason: format!("the current data key {} is missing", stored.current),
            });
        }
        Ok(Crypt {
            ring: RwLock::new(Ring {
                on: true,
                kek: keys.current.clone(),
                deks,
                current: stored.current,
                legacy: stored.legacy_plaintext,
            }),
        })
    }

    /// The data keys of the `lattice` tree `tree` of data dir `dir`, opened
    /// with `keys`. An unencrypted dir given a KEK becomes encrypted (new
    /// values encrypted, old ones readable until re-encrypted); data keys
    /// wrapped under an old KEK are re-wrapped under the current one, and a
    /// new data key is made for new values. With `write` false (tools on a
    /// stopped node) nothing is stored.
    pub fn open(tree: &sled::Tree, keys: &Keys, dir: &Path, write: bool) -> Result<Crypt, CryptError> {
        let store = |e: String| CryptError::Store {
            dir: dir.to_path_buf(),
            reason: e,
        };
        let stored = tree.get(KEYRING_KEY).map_err(|e| store(e.to_string()))?;
        let stored: Option<StoredRing> = stored
            .map(|raw| from_bytes(&raw))
            .transpose()
            .map_err(|e| store(e.to_string()))?;
        let Some(kek) = keys.current.clone() else {
            return match stored {
                Some(_) => Err(CryptError::NoKey(dir.to_path_buf())),
                None => Ok(Crypt::off()),
            };
        };
        let mut ring = match stored {
            Some(r) => r,
            None => {
                let legacy = tree.scan_prefix(b"k").next().is_some() || tree.scan_prefix(b"c").next().is_some();
                let dek: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
                let w = wrap(&kek, 1, &dek).map_err(|e| store(e.to_string()))?;
                if legacy && write {
                    tracing::info!(dir = %dir.display(), "encryption turned on for a data dir with unencrypted values: they are re-encrypted in the background");
                }
                StoredRing {
                    deks: vec![w],
                    current: 1,
                    legacy_plaintext: legacy,
                }
            }
        };
        let crypt = Crypt::from_stored(&ring, keys, dir)?;
        let stale = ring.deks.iter().any(|w| w.kek != kek.id);
        if stale && write {
            // A rotated KEK: re-wrap every data key under it, and make a new
            // data key that the old KEK never wrapped.
            let mut r = crypt.write_ring();
            let next = r.deks.keys().next_back().map_or(1, |k| k + 1);
            let dek: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
            r.deks.insert(next, (dek, XChaCha20Poly1305::new(&dek.into())));
            r.current = next;
            ring = r.to_stored().map_err(|e| store(e.to_string()))?;
            tracing::info!(dir = %dir.display(), kek = %kek.id_hex(), dek = next, "data keys re-wrapped under a new encryption key; a new data key is in use");
        }
        if write {
            let raw = to_bytes(&ring).map_err(|e| store(e.to_string()))?;
            tree.insert(KEYRING_KEY, raw).map_err(|e| store(e.to_string()))?;
            tree.flush().map_err(|e| store(e.to_string()))?;
        }
        Ok(crypt)
    }

    /// The data keys of a backup (its `keys` file), opened with `keys`.
    pub fn open_backup(raw: &[u8], keys: &Keys, dir: &Path) -> Result<Crypt, CryptError> {
        let stored: StoredRing = from_bytes(raw).map_err(|e| CryptError::Store {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        if keys.current.is_none() && keys.old.is_empty() {
            return Err(CryptError::NoKey(dir.to_path_buf()));
        }
        Crypt::from_stored(&stored, keys, dir)
    }

    fn read_ring(&self) -> RwLockReadGuard<'_, Ring> {
        match self.ring.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write_ring(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        match self.ring.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Holds the data keys still while values are sealed and written, so
    /// no value sealed under a data key lands after that key is retired.
    pub fn sealer(&self) -> Sealer<'_> {
        Sealer(self.read_ring())
    }

    /// Whether values are encrypted.
    pub fn is_on(&self) -> bool {
        self.read_ring().on
    }

    /// The stored key ring (wrapped data keys), for a backup's `keys` file
    /// (`None`: not encrypted).
    pub fn stored(&self) -> Result<Option<Vec<u8>>, Error> {
        let r = self.read_ring();
        if !r.on {
            return Ok(None);
        }
        Ok(Some(to_bytes(&r.to_stored()?)?))
    }

    /// Whether some value may still be under another data key than the
    /// newest, or unencrypted: what a re-encryption pass is for.
    pub fn has_old(&self) -> bool {
        let r = self.read_ring();
        r.on && (r.legacy || r.deks.len() > 1)
    }

    /// The data key ids (the newest last) and whether unencrypted values
    /// are still read.
    pub fn data_keys(&self) -> (Vec<u32>, u32, bool) {
        let r = self.read_ring();
        (r.deks.keys().copied().collect(), r.current, r.legacy)
    }

    /// Makes a new data key the one new values use (stored in `tree`,
    /// flushed, before any value uses it). Returns its id.
    pub fn rotate(&self, tree: &sled::Tree) -> Result<u32, Error> {
        let mut r = self.write_ring();
        if !r.on {
            return Err(Error::Store("encryption is off".into()));
        }
        let next = r.deks.keys().next_back().map_or(1, |k| k + 1);
        let dek: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
        let mut stored = r.to_stored()?;
        let kek = r.kek.clone().ok_or_else(|| Error::Store("no encryption key".into()))?;
        stored.deks.push(wrap(&kek, next, &dek)?);
        stored.current = next;
        tree.insert(KEYRING_KEY, to_bytes(&stored)?)
            .map_err(|e| Error::Store(e.to_string()))?;
        tree.flush().map_err(|e| Error::Store(e.to_string()))?;
        r.deks.insert(next, (dek, XChaCha20Poly1305::new(&dek.into())));
        r.current = next;
        Ok(next)
    }

    /// Forgets every data key but the newest, and the unencrypted values:
    /// call only after a complete pass found no value under them, with the
    /// pass's writes on disk.
    pub fn retire_old(&self, tree: &sled::Tree) -> Result<usize, Error> {
        let mut r = self.write_ring();
        let current = r.current;
        let before = r.deks.len();
        let mut next = Ring {
            on: r.on,
            kek: r.kek.clone(),
            deks: r
                .deks
                .iter()
                .filter(|(id, _)| **id == current)
                .map(|(i, k)| (*i, k.clone()))
                .collect(),
            current,
            legacy: false,
        };
        tree.insert(KEYRING_KEY, to_bytes(&next.to_stored()?)?)
            .map_err(|e| Error::Store(e.to_string()))?;
        tree.flush().map_err(|e| Error::Store(e.to_string()))?;
        std::mem::swap(&mut *r, &mut next);
        Ok(before - r.deks.len())
    }
}

impl Ring {
    fn to_stored(&self) -> Result<StoredRing, Error> {
        let kek = self
            .kek
            .as_ref()
            .ok_or_else(|| Error::Store("no encryption key".into()))?;
        let deks = self
            .deks
            .iter()
            .map(|(id, (k, _))| wrap(kek, *id, k))
            .collect::<Result<_, _>>()?;
        Ok(StoredRing {
            deks,
            current: self.current,
            legacy_plaintext: self.legacy,
        })
    }
}

/// The data keys, held still (see [`Crypt::sealer`]).
pub struct Sealer<'a>(RwLockReadGuard<'a, Ring>);

impl Sealer<'_> {
    /// The stored form of `plain` at sled key `k`: encrypted under the
    /// newest data key when encryption is on and `k` is a state or a log
    /// entry, else `plain` itself.
    pub fn seal(&self, k: &[u8], plain: &[u8]) -> Result<Vec<u8>, Error> {
        let r = &self.0;
        if !r.on || !covers(k) {
            return Ok(plain.to_vec());
        }
        let (_, c) = r
            .deks
            .get(&r.current)
            .ok_or_else(|| Error::Store("the current data key is missing".into()))?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = c
            .encrypt(&nonce, Payload { msg: plain, aad: k })
            .map_err(|_| Error::Store("encryption failed".into()))?;
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&r.current.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// The plaintext of the stored value `v` at sled key `k`. A value that
    /// does not open (a flipped byte, another key's value, an unknown data
    /// key) is `Error::Corrupt` naming the key.
    pub fn open(&self, k: &[u8], v: sled::IVec) -> Result<sled::IVec, Error> {
        let r = &self.0;
        if !r.on || !covers(k) {
            return Ok(v);
        }
        let corrupt = || Error::Corrupt { key: describe(k) };
        let enveloped = v.len() >= HEADER + TAG && &v[..3] == MAGIC;
        if enveloped {
            let mut id = [0u8; 4];
            id.copy_from_slice(&v[3..7]);
            let id = u32::from_be_bytes(id);
            if let Some((_, c)) = r.deks.get(&id) {
                let nonce = chacha20poly1305::XNonce::from_slice(&v[7..HEADER]);
                if let Ok(p) = c.decrypt(
                    nonce,
                    Payload {
                        msg: &v[HEADER..],
                        aad: k,
                    },
                ) {
                    return Ok(p.into());
                }
            }
        }
        // Not (or not validly) encrypted: only a dir that still holds
        // values from before encryption reads it, as a sealed record (whose
        // check then fails on garbage).
        if r.legacy {
            Ok(v)
        } else {
            Err(corrupt())
        }
    }

    /// Whether `v` (at `k`) is not under the newest data key.
    pub fn is_old(&self, k: &[u8], v: &[u8]) -> bool {
        let r = &self.0;
        if !r.on || !covers(k) {
            return false;
        }
        !(v.len() >= HEADER + TAG && &v[..3] == MAGIC && v[3..7] == r.current.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_parse_and_bad_ones_say_why_without_the_key() {
        let k = Kek::generate();
        assert_eq!(Kek::from_hex(&format!(" {}\n", k.to_hex()), "x").unwrap().id, k.id);
        let e = Kek::from_hex("abcd", "env X").unwrap_err().to_string();
        assert!(e.contains("env X") && e.contains("64 hex"), "{e}");
        let e = Kek::from_hex(&"zz".repeat(32), "f").unwrap_err().to_string();
        assert!(e.contains("not hex"), "{e}");
    }
}
