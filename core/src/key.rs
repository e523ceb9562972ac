//! Keys of the keyspace and where they fall in the anti-entropy hash space.

use crate::Error;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// A key: a non-empty UTF-8 string of at most [`MAX_KEY_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    /// Validates and wraps a key.
    pub fn new(s: impl Into<String>) -> Result<Key, Error> {
        let s = s.into();
        if s.is_empty() {
            return Err(Error::InvalidKey("empty key".into()));
        }
        if s.len() > MAX_KEY_LEN {
            return Err(Error::InvalidKey(format!("{} bytes, limit {MAX_KEY_LEN}", s.len())));
        }
        Ok(Key(s))
    }

    pub(crate) fn new_unchecked(s: String) -> Key {
        Key(s)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where the key falls in the hash space the anti-entropy tree covers.
    pub fn hash(&self) -> KeyHash {
        let h = blake3::hash(self.0.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        KeyHash(u64::from_be_bytes(b))
    }

    /// True when the key satisfies the rules of [`Key::new`] (for decoded input).
    pub fn is_valid(&self) -> bool {
        !self.0.is_empty() && self.0.len() <= MAX_KEY_LEN
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 64-bit hash of a key. Its top 32 bits (the bucket) order keys in the
/// store so that each anti-entropy leaf is one contiguous range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyHash(pub u64);

impl KeyHash {
    /// The 32-bit bucket: the unit of store ordering.
    pub fn bucket(self) -> u32 {
        (self.0 >> 32) as u32
    }
}
