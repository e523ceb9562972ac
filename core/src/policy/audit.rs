//! The policy audit log: one entry per policy set a node adopted, each
//! chained to the one before by a blake3 hash, so that editing, removing or
//! reordering any entry is detected by [`verify`].
//!
//! The log is data only: the server appends entries to a file and the CLI
//! verifies what a node returns (`lattice audit verify`).

use super::PolicySet;
use crate::Error;
use serde::{Deserialize, Serialize};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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
    /// blake3 over every field above (hex).
    pub hash: String,
}

impl AuditEntry {
    /// The entry that follows `prev` (or starts the log).
    pub fn next(prev: Option<&AuditEntry>, at_ms: u64, node: &str, source: &str, policy: PolicySet) -> AuditEntry {
        let mut e = AuditEntry {
            index: prev.map_or(0, |p| p.index + 1),
            prev: prev.map_or_else(|| GENESIS.to_string(), |p| p.hash.clone()),
            at_ms,
            node: node.to_string(),
            source: source.to_string(),
            policy_digest: blake3::Hash::from(policy.digest()).to_hex().to_string(),
            policy,
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        e
    }

    fn compute_hash(&self) -> String {
        let body = (
            self.index,
            &self.prev,
            self.at_ms,
            &self.node,
            &self.source,
            &self.policy,
            &self.policy_digest,
        );
        let bytes = crate::proto::to_bytes(&body).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Checks a whole log: indices contiguous from 0, each `prev` the hash of
/// the entry before, each hash and policy digest recomputed, and versions
/// never going back. Returns the first broken entry.
pub fn verify(entries: &[AuditEntry]) -> Result<(), Error> {
    verify_from(None, entries)
}

/// [`verify`] for entries that follow `base` (the last entry of an archived
/// part of the log; `None`: they start the log). `base` itself is checked
/// too, except for its own `prev`.
pub fn verify_from(base: Option<&AuditEntry>, entries: &[AuditEntry]) -> Result<(), Error> {
    if let Some(b) = base {
        verify_entry(b)?;
    }
    let mut prev: Option<&AuditEntry> = base;
    for e in entries {
        verify_next(prev, e)?;
        prev = Some(e);
    }
    Ok(())
}

/// Checks `e` on its own: its hash and its policy digest recomputed. What
/// [`verify_next`] checks of an entry whose predecessor is not at hand
/// (the first entry of a part read on its own).
pub fn verify_entry(e: &AuditEntry) -> Result<(), Error> {
    let broken = |reason: &str| Error::AuditBroken {
        index: e.index,
        reason: reason.into(),
    };
    if e.hash != e.compute_hash() {
        return Err(broken("its contents do not match its hash"));
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
pub fn verify_next(prev: Option<&AuditEntry>, e: &AuditEntry) -> Result<(), Error> {
    let i = prev.map_or(0, |p| p.index + 1);
    let broken = |reason: String| Error::AuditBroken { index: i, reason };
    if e.index != i {
        return Err(broken(format!("entry says index {}, it is at position {i}", e.index)));
    }
    if e.prev != prev.map_or(GENESIS, |p| p.hash.as_str()) {
        return Err(broken("its prev is not the hash of the entry before".into()));
    }
    verify_entry(e)?;
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
pub fn verify_served(entries: &[AuditEntry]) -> Result<u64, Error> {
    match entries.split_first() {
        Some((first, rest)) if first.index > 0 => verify_from(Some(first), rest).map(|()| first.index),
        _ => verify(entries).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, Priority, Regions};

    fn log() -> Vec<AuditEntry> {
        let a = AuditEntry::next(None, 1, "n1", "config", PolicySet::default());
        let set = PolicySet::new(2, vec![Policy::new("x/", Regions::Local, Priority::Bulk)]).unwrap();
        let b = AuditEntry::next(Some(&a), 2, "n1", "admin", set);
        let c = AuditEntry::next(Some(&b), 3, "n1", "peer n2", PolicySet::new(3, vec![]).unwrap());
        vec![a, b, c]
    }

    #[test]
    fn an_honest_log_verifies() {
        verify(&log()).unwrap();
        verify(&[]).unwrap();
    }

    #[test]
    fn every_kind_of_tampering_is_detected() {
        let mut l = log();
        l[1].source = "config".into();
        assert!(matches!(verify(&l), Err(Error::AuditBroken { index: 1, .. })));

        let mut l = log();
        l[1].policy.policies[0].regions = Regions::All;
        assert!(matches!(verify(&l), Err(Error::AuditBroken { index: 1, .. })));

        let mut l = log();
        l.remove(1);
        assert!(verify(&l).is_err(), "a removed entry");

        let mut l = log();
        l.swap(1, 2);
        assert!(verify(&l).is_err(), "reordered entries");

        // Rewriting an entry and its own hash still breaks the next link.
        let mut l = log();
        l[1].at_ms = 99;
        l[1].hash = l[1].compute_hash();
        assert!(matches!(verify(&l), Err(Error::AuditBroken { index: 2, .. })));
    }
}
