//! The policy audit log: one entry per policy set a node adopted, each
//! chained to the one before by a blake3 hash, so that editing, removing or
//! reordering any entry is detected by [`verify`].
//!
//! The log is data only: the server appends entries to a file and the CLI
//! verifies what a node returns (`lattice audit verify`).
//!
//! **Keyed logs.** Anyone who can write a node's data directory can
//! recompute an unkeyed chain and its head. A node given an [`AuditKey`]
//! (kept outside the data directory) writes keyed entries instead: each
//! hash is a blake3 `keyed_hash`, so rewriting the log needs the key too.
//! A verifier with the key accepts only keyed entries (an unkeyed entry,
//! or one flipped back to unkeyed and rehashed, is refused); a verifier
//! without it (the CLI) checks a keyed entry's links, digest and signature
//! but cannot recompute its hash.
//!
//! Each entry of a set from an admin or a peer also names the key that
//! signed it (`signer`) and carries the signature, which any verifier
//! checks against the set.

use super::signed::{hex, verify_any, PolicySignature};
use super::PolicySet;
use crate::Error;
use serde::{Deserialize, Serialize};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The key of a keyed audit log (see the module documentation).
#[derive(Clone)]
pub struct AuditKey(pub [u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

/// One adoption of a policy set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Position in the log, from 0.
    pub index: u64,
    /// The `hash` of the entry before (hex), [`GENESIS`] for the first.
    pub prev: String,
    /// Wall-clock time of adoption, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The node that adopted it.
    pub node: String,
    /// Where it came from: `config`, `admin`, or `peer <name>`.
    pub source: String,
    /// The policy set in force from this entry on.
    pub policy: PolicySet,
    /// Its digest (hex), for quick comparison across nodes.
    pub policy_digest: String,
    /// blake3 over every field above and `signer` and `signature` below
    /// (hex); keyed with the audit key when `keyed`.
    pub hash: String,
    // The fields below come after `hash` and are never skipped: served
    // entries travel as MessagePack arrays, where a missing trailing field
    // takes its default (entries and answers of older nodes still decode)
    // but a skipped one in the middle would shift the rest.
    /// The public key (hex) that signed the set; absent for a node's own
    /// unsigned configuration set (and in entries older than signing).
    #[serde(default)]
    pub signer: Option<String>,
    /// The ed25519 signature (hex) of the set by `signer`.
    #[serde(default)]
    pub signature: Option<String>,
    /// Whether `hash` is keyed with the node's audit key.
    #[serde(default)]
    pub keyed: bool,
}

impl AuditEntry {
    /// The entry that follows `prev` (or starts the log).
    pub fn next(
        prev: Option<&AuditEntry>,
        at_ms: u64,
        node: &str,
        source: &str,
        policy: PolicySet,
        signature: Option<PolicySignature>,
        key: Option<&AuditKey>,
    ) -> AuditEntry {
        let mut e = AuditEntry {
            index: prev.map_or(0, |p| p.index + 1),
            prev: prev.map_or_else(|| GENESIS.to_string(), |p| p.hash.clone()),
            at_ms,
            node: node.to_string(),
            source: source.to_string(),
            policy_digest: blake3::Hash::from(policy.digest()).to_hex().to_string(),
            policy,
            signer: signature.map(|s| hex(&s.signer)),
            signature: signature.map(|s| hex(&s.signature)),
            keyed: key.is_some(),
            hash: String::new(),
        };
        e.hash = e.compute_hash(key);
        e
    }

    /// The set's signature, if the entry carries a well-formed one.
    pub fn policy_signature(&self) -> Option<PolicySignature> {
        let signer = unhex::<32>(self.signer.as_deref()?)?;
        let signature = unhex::<64>(self.signature.as_deref()?)?;
        Some(PolicySignature { signer, signature })
    }

    fn compute_hash(&self, key: Option<&AuditKey>) -> String {
        let body = (
            self.index,
            &self.prev,
            self.at_ms,
            &self.node,
            &self.source,
            &self.policy,
            &self.policy_digest,
        );
        let mut bytes = crate::proto::to_bytes(&body).unwrap_or_default();
        // Entries without a signer hash exactly as before signing existed,
        // so older logs still verify.
        if self.signer.is_some() || self.signature.is_some() {
            bytes.extend(crate::proto::to_bytes(&(&self.signer, &self.signature)).unwrap_or_default());
        }
        match key {
            Some(k) => blake3::keyed_hash(&k.0, &bytes).to_hex().to_string(),
            None => blake3::hash(&bytes).to_hex().to_string(),
        }
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Checks a whole log: indices contiguous from 0, each `prev` the hash of
/// the entry before, each hash and policy digest recomputed, and versions
/// never going back. Returns the first broken entry.
pub fn verify(entries: &[AuditEntry], key: Option<&AuditKey>) -> Result<(), Error> {
    verify_from(None, entries, key)
}

/// [`verify`] for entries that follow `base` (the last entry of an archived
/// part of the log; `None`: they start the log). `base` itself is checked
/// too, except for its own `prev`.
pub fn verify_from(base: Option<&AuditEntry>, entries: &[AuditEntry], key: Option<&AuditKey>) -> Result<(), Error> {
    if let Some(b) = base {
        verify_entry(b, key)?;
    }
    let mut prev: Option<&AuditEntry> = base;
    for e in entries {
        verify_next(prev, e, key)?;
        prev = Some(e);
    }
    Ok(())
}

/// Checks `e` on its own: its hash and its policy digest recomputed. What
/// [`verify_next`] checks of an entry whose predecessor is not at hand
/// (the first entry of a part read on its own).
///
/// With `key`, the entry must be keyed with it. Without, a keyed entry's
/// hash cannot be recomputed: only its digest and signature are checked
/// (and, by [`verify_next`], its links).
pub fn verify_entry(e: &AuditEntry, key: Option<&AuditKey>) -> Result<(), Error> {
    let broken = |reason: &str| Error::AuditBroken {
        index: e.index,
        reason: reason.into(),
    };
    match (key, e.keyed) {
        (Some(_), false) => {
            return Err(broken(
                "it is not keyed, but this node has an audit key: an unkeyed log (or an entry rewritten without the key) is refused",
            ))
        }
        (None, true) => {}
        _ => {
            if e.hash != e.compute_hash(key) {
                return Err(broken("its contents do not match its hash"));
            }
        }
    }
    match (&e.signer, &e.signature, e.policy_signature()) {
        (None, None, _) => {}
        (_, _, Some(sig)) if verify_any(&e.policy, &sig) => {}
        _ => return Err(broken("its policy set's signature does not verify")),
    }
    let digest = blake3::Hash::from(e.policy.digest()).to_hex().to_string();
    if e.policy_digest != digest {
        return Err(broken("its policy does not match its policy digest"));
    }
    Ok(())
}

/// Checks that `e` follows `prev` (`None`: it starts the log): its index,
/// its `prev` hash, its own hash and digest, and a version that does not go
/// back. One step of [`verify_from`], for a log read one entry at a time.
pub fn verify_next(prev: Option<&AuditEntry>, e: &AuditEntry, key: Option<&AuditKey>) -> Result<(), Error> {
    let i = prev.map_or(0, |p| p.index + 1);
    let broken = |reason: String| Error::AuditBroken { index: i, reason };
    if e.index != i {
        return Err(broken(format!("entry says index {}, it is at position {i}", e.index)));
    }
    if e.prev != prev.map_or(GENESIS, |p| p.hash.as_str()) {
        return Err(broken("its prev is not the hash of the entry before".into()));
    }
    verify_entry(e, key)?;
    if let Some(p) = prev {
        if e.policy.version < p.policy.version {
            return Err(broken(format!(
                "version {} follows version {}",
                e.policy.version, p.policy.version
            )));
        }
    }
    Ok(())
}

/// Checks what a node returns for its log: from entry 0, or, once older
/// entries are archived on the node, from the entry before the current
/// part (which the node sends first). Returns the index of the first entry
/// that was checked against its predecessor's hash.
pub fn verify_served(entries: &[AuditEntry], key: Option<&AuditKey>) -> Result<u64, Error> {
    match entries.split_first() {
        Some((first, rest)) if first.index > 0 => verify_from(Some(first), rest, key).map(|()| first.index),
        _ => verify(entries, key).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, Priority, Regions};

    fn log() -> Vec<AuditEntry> {
        let a = AuditEntry::next(None, 1, "n1", "config", PolicySet::default(), None, None);
        let set = PolicySet::new(2, vec![Policy::new("x/", Regions::Local, Priority::Bulk)]).unwrap();
        let b = AuditEntry::next(Some(&a), 2, "n1", "admin", set, None, None);
        let c = AuditEntry::next(
            Some(&b),
            3,
            "n1",
            "peer n2",
            PolicySet::new(3, vec![]).unwrap(),
            None,
            None,
        );
        vec![a, b, c]
    }

    #[test]
    fn an_honest_log_verifies() {
        verify(&log(), None).unwrap();
        verify(&[], None).unwrap();
    }

    #[test]
    fn every_kind_of_tampering_is_detected() {
        let mut l = log();
        l[1].source = "config".into();
        assert!(matches!(verify(&l, None), Err(Error::AuditBroken { index: 1, .. })));

        let mut l = log();
        l[1].policy.policies[0].regions = Regions::All;
        assert!(matches!(verify(&l, None), Err(Error::AuditBroken { index: 1, .. })));

        let mut l = log();
        l.remove(1);
        assert!(verify(&l, None).is_err(), "a removed entry");

        let mut l = log();
        l.swap(1, 2);
        assert!(verify(&l, None).is_err(), "reordered entries");

        // Rewriting an entry and its own hash still breaks the next link.
        let mut l = log();
        l[1].at_ms = 99;
        l[1].hash = l[1].compute_hash(None);
        assert!(matches!(verify(&l, None), Err(Error::AuditBroken { index: 2, .. })));
    }

    #[test]
    fn a_keyed_log_needs_the_key_and_signers_are_checked() {
        use crate::policy::signed::SignedPolicySet;
        let key = AuditKey([5; 32]);
        let admin = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let signed = SignedPolicySet::sign(PolicySet::new(2, vec![]).unwrap(), &admin).unwrap();
        let a = AuditEntry::next(None, 1, "n1", "config", PolicySet::default(), None, Some(&key));
        let b = AuditEntry::next(Some(&a), 2, "n1", "admin", signed.set, signed.signature, Some(&key));
        assert_eq!(
            b.signer.as_deref(),
            Some(hex(&admin.verifying_key().to_bytes()).as_str())
        );
        let l = vec![a.clone(), b.clone()];
        verify(&l, Some(&key)).unwrap();
        verify(&l, None).unwrap(); // links, digests and signatures only
        assert!(verify(&l, Some(&AuditKey([6; 32]))).is_err(), "another key");
        // An attacker without the key rewrites an entry and rehashes the
        // chain unkeyed: a verifier with the key refuses it.
        let mut forged = l.clone();
        forged[1].at_ms = 99;
        for i in 0..2 {
            forged[i].keyed = false;
            if i > 0 {
                forged[i].prev = forged[i - 1].hash.clone();
            }
            forged[i].hash = forged[i].compute_hash(None);
        }
        verify(&forged, None).unwrap();
        assert!(matches!(
            verify(&forged, Some(&key)),
            Err(Error::AuditBroken { index: 0, .. })
        ));
        // A signer swapped for another key breaks the signature check.
        let mut swapped = l;
        swapped[1].signer = Some(hex(&[9; 32]));
        swapped[1].hash = swapped[1].compute_hash(Some(&key));
        assert!(verify(&swapped, Some(&key)).is_err());
    }
}
