//! The anti-entropy hash tree: a fixed-shape tree of fanout 16 over the key
//! hash space, whose node digests are XORs of 128-bit item hashes, so a key
//! change updates one path in O(depth) without rereading any other key.

use crate::crdt::Value;
use crate::key::{Key, KeyHash};
use crate::Error;

/// Children per tree node.
pub(crate) const FANOUT: u32 = 16;
const BITS_PER_LEVEL: u32 = 4;

/// The hash of one `(key, state)` pair.
pub(crate) fn item_hash(key: &Key, value: &Value) -> Result<u128, Error> {
    Ok(item_hash_of(key, &crate::proto::to_bytes(value)?))
}

/// [`item_hash`] of an already encoded state.
pub(crate) fn item_hash_of(key: &Key, encoded: &[u8]) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&(key.as_str().len() as u64).to_le_bytes());
    h.update(key.as_str().as_bytes());
    h.update(encoded);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    u128::from_le_bytes(b)
}

/// Digests of every node of the tree, level by level.
#[derive(Clone, Debug)]
pub(crate) struct MerkleTree {
    depth: u8,
    levels: Vec<Vec<u128>>,
}

impl MerkleTree {
    /// An empty tree with `depth` levels below the root (1..=5; depth 5 is
    /// a million leaves, 17 MB of digests).
    pub(crate) fn new(depth: u8) -> Self {
        let depth = depth.clamp(1, 5);
        let levels = (0..=u32::from(depth))
            .map(|l| vec![0u128; 1usize << (BITS_PER_LEVEL * l)])
            .collect();
        MerkleTree { depth, levels }
    }

    pub(crate) fn depth(&self) -> u8 {
        self.depth
    }

    /// Index of the node covering `hash` at `level`.
    pub(crate) fn index_at(&self, hash: KeyHash, level: u8) -> u32 {
        if level == 0 {
            0
        } else {
            hash.bucket() >> (32 - BITS_PER_LEVEL * u32::from(level))
        }
    }

    /// Replaces the item of a key (`old`/`new` are `None` when absent).
    pub(crate) fn update(&mut self, hash: KeyHash, old: Option<u128>, new: Option<u128>) {
        let delta = old.unwrap_or(0) ^ new.unwrap_or(0);
        if delta == 0 {
            return;
        }
        for level in 0..=self.depth {
            let i = self.index_at(hash, level) as usize;
            self.levels[usize::from(level)][i] ^= delta;
        }
    }

    pub(crate) fn root(&self) -> u128 {
        self.levels[0][0]
    }

    /// The digest of one node (0 when out of range).
    pub(crate) fn digest(&self, level: u8, index: u32) -> u128 {
        self.levels
            .get(usize::from(level))
            .and_then(|l| l.get(index as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The inclusive bucket range a leaf covers.
    pub(crate) fn leaf_buckets(&self, leaf: u32) -> (u32, u32) {
        let shift = 32 - BITS_PER_LEVEL * u32::from(self.depth);
        let lo = leaf << shift;
        (lo, lo | ((1u64 << shift) - 1) as u32)
    }

    /// Number of nodes at `level`.
    pub(crate) fn width(&self, level: u8) -> u32 {
        1u32 << (BITS_PER_LEVEL * u32::from(level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_order_independent_and_updatable() {
        let keys: Vec<Key> = (0..200).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
        let v = Value::empty(crate::crdt::Kind::Counter);
        let mut a = MerkleTree::new(3);
        let mut b = MerkleTree::new(3);
        for k in &keys {
            a.update(k.hash(), None, Some(item_hash(k, &v).unwrap()));
        }
        for k in keys.iter().rev() {
            b.update(k.hash(), None, Some(item_hash(k, &v).unwrap()));
        }
        assert_eq!(a.root(), b.root());
        assert_ne!(a.root(), 0);
        let k = &keys[7];
        a.update(k.hash(), Some(item_hash(k, &v).unwrap()), None);
        assert_ne!(a.root(), b.root());
        // Only the path of that key differs.
        let leaf = a.index_at(k.hash(), 3);
        let differing: Vec<u32> = (0..a.width(3)).filter(|&i| a.digest(3, i) != b.digest(3, i)).collect();
        assert_eq!(differing, vec![leaf]);
        let (lo, hi) = a.leaf_buckets(leaf);
        assert!(lo <= k.hash().bucket() && k.hash().bucket() <= hi);
    }
}
