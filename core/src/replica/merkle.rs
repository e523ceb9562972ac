//! The anti-entropy hash tree: a fixed-shape tree of fanout 16 over the key
//! hash space, whose node digests are XORs of 128-bit item hashes, so a key
//! change updates one path in O(depth) without rereading any other key.

use crate::crdt::Value;
use crate::key::{Key, KeyHash};
use crate::policy::PolicySet;
use crate::proto::RegionId;
use crate::Error;

/// Children per tree node.
pub(crate) const FANOUT: u32 = 16;
const BITS_PER_LEVEL: u32 = 4;

/// The hash of one `(key, state)` pair, as the anti-entropy trees XOR them
/// (public so the simulator can recompute digests independently). It hashes
/// the value itself, not its encoding (`crdt::canon`): an encoding change
/// must not make equal states look different between two versions.
pub fn item_hash(key: &Key, value: &Value) -> Result<u128, Error> {
    use crate::crdt::canon::Canon;
    let mut h = blake3::Hasher::new();
    h.update(&(key.as_str().len() as u64).to_le_bytes());
    h.update(key.as_str().as_bytes());
    value.canon(&mut h);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    Ok(u128::from_le_bytes(b))
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

    /// A tree with no levels allocated: only its shape is usable.
    fn new_shape(depth: u8) -> Self {
        MerkleTree {
            depth: depth.clamp(1, 5),
            levels: Vec::new(),
        }
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
    #[cfg(test)]
    pub(crate) fn width(&self, level: u8) -> u32 {
        1u32 << (BITS_PER_LEVEL * u32::from(level))
    }
}

/// One tree per *audience*: the set of regions a key may be exchanged with
/// from this node under the policy in force. A round with a peer compares
/// the XOR of the trees whose audience includes the peer's region, so a
/// digest never mixes in a key the peer may not hold: its existence, even
/// its changes, stay invisible there. XOR makes the combination free.
#[derive(Clone, Debug)]
pub(crate) struct Forest {
    depth: u8,
    /// Per audience: its regions and its tree (allocated on first use).
    trees: Vec<(Vec<RegionId>, Option<MerkleTree>)>,
    /// The audience of each policy (index `policies.len()`: the default).
    by_policy: Vec<usize>,
}

impl Forest {
    /// Empty trees for `policy` as seen from `region`, whose peers are in
    /// `regions`.
    pub(crate) fn new(depth: u8, policy: &PolicySet, region: &RegionId, regions: &[RegionId]) -> Forest {
        let mut trees: Vec<(Vec<RegionId>, Option<MerkleTree>)> = Vec::new();
        let mut by_policy = Vec::new();
        let indices = (0..policy.policies.len()).map(Some).chain([None]);
        for i in indices {
            let p = policy.by_index(i);
            let audience: Vec<RegionId> = regions.iter().filter(|r| p.may_exchange(region, r)).cloned().collect();
            let t = match trees.iter().position(|(a, _)| *a == audience) {
                Some(t) => t,
                None => {
                    trees.push((audience, None));
                    trees.len() - 1
                }
            };
            by_policy.push(t);
        }
        Forest {
            depth: depth.clamp(1, 5),
            trees,
            by_policy,
        }
    }

    pub(crate) fn depth(&self) -> u8 {
        self.depth
    }

    /// Replaces the item of a key governed by policy `policy` (`None`: the
    /// default policy).
    pub(crate) fn update(&mut self, policy: Option<usize>, hash: KeyHash, old: Option<u128>, new: Option<u128>) {
        let i = policy.unwrap_or(self.by_policy.len() - 1);
        let t = self.by_policy.get(i).copied().unwrap_or(0);
        let depth = self.depth;
        if let Some((_, tree)) = self.trees.get_mut(t) {
            tree.get_or_insert_with(|| MerkleTree::new(depth))
                .update(hash, old, new);
        }
    }

    fn visible_to<'a>(&'a self, region: &'a RegionId) -> impl Iterator<Item = &'a MerkleTree> + 'a {
        self.trees
            .iter()
            .filter(move |(a, _)| a.contains(region))
            .filter_map(|(_, t)| t.as_ref())
    }

    /// The digest of one node over the keys `region` may hold.
    pub(crate) fn digest_for(&self, region: &RegionId, level: u8, index: u32) -> u128 {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::DigestLeak) {
            // Planted bug: digests cover every key, whatever the policy.
            return self
                .trees
                .iter()
                .filter_map(|(_, t)| t.as_ref())
                .fold(0, |d, t| d ^ t.digest(level, index));
        }
        self.visible_to(region).fold(0, |d, t| d ^ t.digest(level, index))
    }

    /// The root over every key held.
    pub(crate) fn root(&self) -> u128 {
        self.trees
            .iter()
            .filter_map(|(_, t)| t.as_ref())
            .fold(0, |d, t| d ^ t.root())
    }

    /// The inclusive bucket range a leaf covers.
    pub(crate) fn leaf_buckets(&self, leaf: u32) -> (u32, u32) {
        MerkleTree::new_shape(self.depth).leaf_buckets(leaf)
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
