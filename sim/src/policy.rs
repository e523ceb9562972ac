//! Replication policies in the simulator: random policy sets for swarm runs
//! and the leak checker, which inspects every message a node sends.
//!
//! The checker does not trust the engine: it decodes each frame itself and
//! checks every key a `Delta` or `AeStates` carries, every key hash an
//! `AeLeaves` lists, and recomputes every `AeTree` digest from the sender's
//! store over only the keys the receiver's region may hold. A digest that
//! differs can only mix in a key the receiver may not see (or be wrong), so
//! a node that leaks even the existence of a key is caught.

use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
use lattice_core::proto::{self, Message, RegionId};
use lattice_core::replica::item_hash;
use lattice_core::store::Store;
use lattice_core::{Key, KeyHash};
use rand::Rng;
use std::collections::BTreeMap;

/// The region name of region number `i`.
pub fn region_name(i: usize) -> RegionId {
    RegionId(format!("r{i}"))
}

/// A random policy set over the workload's key prefixes (`c`, `s`, `l`, ...
/// and single keys like `c1`), using regions `r0..r{regions}` and sometimes
/// a region with no nodes. Version 1; empty about a third of the time.
pub fn random_policy(rng: &mut impl Rng, regions: usize) -> PolicySet {
    if rng.gen_bool(0.3) {
        return PolicySet::default();
    }
    let names: Vec<RegionId> = (0..=regions).map(region_name).collect();
    let subset = |rng: &mut dyn rand::RngCore| -> Vec<RegionId> {
        let mut v: Vec<RegionId> = names.iter().filter(|_| rng.gen_bool(0.5)).cloned().collect();
        if v.is_empty() {
            v.push(names[rng.gen_range(0..regions.max(1))].clone());
        }
        v
    };
    let mut policies = Vec::new();
    for prefix in ["g", "n", "c", "l", "m", "s", "p", "c1", "s2", "broadcast"] {
        if !rng.gen_bool(0.45) {
            continue;
        }
        let priority = Priority::ALL[rng.gen_range(0..3)];
        let regions = match rng.gen_range(0..10) {
            0..=1 => Regions::All,
            2..=5 => Regions::Only(subset(rng)),
            _ => Regions::Local,
        };
        let mut p = Policy::new(prefix, regions, priority);
        if rng.gen_bool(0.3) {
            let holders: Vec<RegionId> = subset(rng).into_iter().filter(|r| p.may_hold(r)).collect();
            if !holders.is_empty() {
                p = p.writers(holders);
            }
        }
        policies.push(p);
    }
    PolicySet::new(1, policies).unwrap_or_default()
}

/// A compact description, e.g. ` policy=[c:[r0, r1]/critical s:local/bulk]`
/// (empty for the empty set).
pub fn describe(set: &PolicySet) -> String {
    if set.policies.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = set
        .policies
        .iter()
        .map(|p| {
            let w = p.writers.as_ref().map_or(String::new(), |w| {
                let names: Vec<&str> = w.iter().map(|r| r.0.as_str()).collect();
                format!(" writers={}", names.join("+"))
            });
            format!("{}:{}/{}{w}", p.keyspace, p.regions, p.priority.name())
        })
        .collect();
    format!(" policy=[{}]", parts.join(" "))
}

/// What a frame from a node in `from` to a node in `to` must not contain.
/// Returns a description of each leak found. With `scan` false, the
/// anti-entropy digests and leaf lists are not recomputed from the
/// sender's store (a scan of every key), only the keys the frame carries
/// checked.
pub fn leaks<S: Store>(
    policy: &PolicySet,
    sender: &S,
    from: &RegionId,
    to: &RegionId,
    frame: &[u8],
    scan: bool,
) -> Vec<String> {
    let Ok(msg) = proto::decode(frame, usize::MAX) else {
        return vec!["the frame does not decode".into()];
    };
    let mut out = Vec::new();
    let allowed = |k: &Key| policy.may_exchange(k.as_str(), from, to);
    for (k, _) in msg.entry_lists().into_iter().flatten() {
        if !allowed(k) {
            out.push(format!("{} carries key {k} from {from} to {to}", msg.kind()));
        }
    }
    match &msg {
        _ if !scan => {}
        Message::AeLeaves { items, .. } => {
            let mut by_hash: BTreeMap<u64, Vec<Key>> = BTreeMap::new();
            let _ = sender.scan_all(&mut |k, _| by_hash.entry(k.hash().0).or_default().push(k.clone()));
            for blob in items {
                for c in blob.as_slice().chunks_exact(16) {
                    let mut h = [0u8; 8];
                    h.copy_from_slice(&c[..8]);
                    let h = u64::from_le_bytes(h);
                    for k in by_hash.get(&h).into_iter().flatten() {
                        if !allowed(k) {
                            out.push(format!("ae_leaves lists key {k} from {from} to {to}"));
                        }
                    }
                }
            }
        }
        Message::AeTree {
            level,
            parents,
            digests,
            ..
        } => {
            let level = u32::from(*level);
            let mut expect: BTreeMap<u32, u128> = BTreeMap::new();
            let _ = sender.scan_all(&mut |k, v| {
                if allowed(k) {
                    let i = index_at(k.hash(), level);
                    if let Ok(h) = item_hash(k, v) {
                        *expect.entry(i).or_default() ^= h;
                    }
                }
            });
            let nodes = parents.iter().flat_map(|&p| (0..16u32).map(move |c| p * 16 + c));
            for (i, d) in nodes.zip(digests.as_slice().chunks_exact(16)) {
                let mut b = [0u8; 16];
                b.copy_from_slice(d);
                let got = u128::from_le_bytes(b);
                if got != expect.get(&i).copied().unwrap_or(0) {
                    out.push(format!(
                        "ae_tree digest of node {i} at level {level} from {from} to {to} covers keys the receiver may not hold"
                    ));
                }
            }
        }
        _ => {}
    }
    out
}

fn index_at(hash: KeyHash, level: u32) -> u32 {
    if level == 0 {
        0
    } else {
        hash.bucket() >> (32 - 4 * level)
    }
}
