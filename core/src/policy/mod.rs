//! Replication policies: which regions may hold a keyspace, how urgently it
//! travels, and who may write it.
//!
//! A [`PolicySet`] maps key prefixes (keyspaces) to a [`Policy`]; the longest
//! matching prefix wins, and a key no policy matches is replicated
//! everywhere at `normal` priority. Sets are versioned: every node adopts
//! the highest `(version, digest)` it has seen, so two sets published with
//! the same version still converge to one. The [`audit`] module chains every
//! adoption into a tamper-evident log.
//!
//! The rule that decides what may travel is symmetric:
//! [`PolicySet::may_exchange`] says whether a key may pass between two
//! regions, in either direction. Both sides of an anti-entropy round
//! therefore digest exactly the same key set, and what one side may not send
//! the other may not accept.
//!
//! ```
//! use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
//! use lattice_core::proto::RegionId;
//! let set = PolicySet::new(1, vec![
//!     Policy::new("eu/", Regions::Only(vec!["eu".into(), "us".into()]), Priority::Critical),
//!     Policy::new("secret/", Regions::Local, Priority::Normal).writers(vec!["eu".into()]),
//! ]).unwrap();
//! let (eu, us, ap) = (RegionId::from("eu"), RegionId::from("us"), RegionId::from("ap"));
//! assert!(set.may_exchange("eu/users/1", &eu, &us));
//! assert!(!set.may_exchange("eu/users/1", &eu, &ap));
//! assert!(!set.may_exchange("secret/x", &eu, &us)); // quarantine: never leaves its region
//! assert!(set.check_read("secret/x", &us).is_err()); // and is not served elsewhere
//! ```

pub mod audit;
pub mod signed;

use crate::proto::RegionId;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Most policies in one set.
pub const MAX_POLICIES: usize = 256;

/// Largest policy set, in bytes of its strings plus a fixed charge per
/// policy and region: every adopted set is kept in full in the audit log,
/// so a set's size bounds the log's growth per adoption.
pub const MAX_POLICY_SET_BYTES: usize = 64 << 10;

/// Most regions one policy may name.
pub const MAX_POLICY_REGIONS: usize = 64;

/// Which regions may hold the keys of a keyspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RegionsRepr", into = "RegionsRepr")]
pub enum Regions {
    /// Every region.
    All,
    /// Only these regions.
    Only(Vec<RegionId>),
    /// Quarantine: a key stays in the region where it was written; it is
    /// replicated between that region's nodes and never across regions.
    /// With `writers`, only those regions may write (and so hold) it.
    Local,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RegionsRepr {
    Word(String),
    List(Vec<RegionId>),
}

impl TryFrom<RegionsRepr> for Regions {
    type Error = String;
    fn try_from(r: RegionsRepr) -> Result<Self, String> {
        match r {
            RegionsRepr::Word(w) if w == "all" => Ok(Regions::All),
            RegionsRepr::Word(w) if w == "local" => Ok(Regions::Local),
            RegionsRepr::Word(w) => Err(format!(
                "regions must be \"all\", \"local\" or a list of region names, not {w:?}"
            )),
            RegionsRepr::List(l) => Ok(Regions::Only(l)),
        }
    }
}

impl From<Regions> for RegionsRepr {
    fn from(r: Regions) -> Self {
        match r {
            Regions::All => RegionsRepr::Word("all".into()),
            Regions::Local => RegionsRepr::Word("local".into()),
            Regions::Only(l) => RegionsRepr::List(l),
        }
    }
}

impl fmt::Display for Regions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Regions::All => f.write_str("all"),
            Regions::Local => f.write_str("local"),
            Regions::Only(l) => {
                let names: Vec<&str> = l.iter().map(|r| r.0.as_str()).collect();
                write!(f, "[{}]", names.join(", "))
            }
        }
    }
}

/// How urgently a keyspace's deltas use a rate-limited link: `critical`
/// before `normal` before `bulk`, with aging so that none starves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Sent first.
    Critical,
    /// The default.
    #[default]
    Normal,
    /// Sent when nothing more urgent waits (or when it has waited too long).
    Bulk,
}

impl Priority {
    /// All classes, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Normal, Priority::Bulk];

    /// The index of the class (0 = critical).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class with this index.
    pub fn from_index(i: usize) -> Option<Priority> {
        Priority::ALL.get(i).copied()
    }

    /// Its name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }
}

/// The rules for one keyspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The key prefix this policy covers (`""` covers every key).
    pub keyspace: String,
    /// The regions that may hold its keys.
    pub regions: Regions,
    /// Its class on rate-limited links.
    #[serde(default)]
    pub priority: Priority,
    /// The regions that may accept writes (default: every region that may
    /// hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writers: Option<Vec<RegionId>>,
}

impl Policy {
    /// A policy with no writer restriction.
    pub fn new(keyspace: impl Into<String>, regions: Regions, priority: Priority) -> Policy {
        Policy {
            keyspace: keyspace.into(),
            regions,
            priority,
            writers: None,
        }
    }

    /// Restricts writes to these regions.
    pub fn writers(mut self, writers: Vec<RegionId>) -> Policy {
        self.writers = Some(writers);
        self
    }

    /// Whether `region` may hold keys of this keyspace.
    pub fn may_hold(&self, region: &RegionId) -> bool {
        match &self.regions {
            Regions::All => true,
            Regions::Only(l) => l.contains(region),
            Regions::Local => self.writers.as_ref().is_none_or(|w| w.contains(region)),
        }
    }

    /// Whether a key may pass between `a` and `b` (either way).
    pub fn may_exchange(&self, a: &RegionId, b: &RegionId) -> bool {
        self.may_hold(a) && self.may_hold(b) && (self.regions != Regions::Local || a == b)
    }

    /// Whether `region` may accept writes.
    pub fn may_write(&self, region: &RegionId) -> bool {
        self.may_hold(region) && self.writers.as_ref().is_none_or(|w| w.contains(region))
    }

    /// The regions that may hold the keyspace, when it is a fixed list.
    pub fn holders(&self) -> Option<Vec<RegionId>> {
        match &self.regions {
            Regions::All => None,
            Regions::Only(l) => Some(l.clone()),
            Regions::Local => self.writers.clone(),
        }
    }

    /// What this policy counts towards [`MAX_POLICY_SET_BYTES`].
    fn size_bytes(&self) -> usize {
        let list = |l: &[RegionId]| l.iter().map(|r| r.0.len() + 8).sum::<usize>();
        let regions = match &self.regions {
            Regions::Only(l) => list(l),
            _ => 0,
        };
        32 + self.keyspace.len() + regions + self.writers.as_deref().map_or(0, list)
    }

    fn validate(&self) -> Result<(), String> {
        let check_list = |what: &str, l: &[RegionId]| {
            if l.is_empty() {
                return Err(format!(
                    "keyspace {:?}: {what} must name at least one region",
                    self.keyspace
                ));
            }
            if l.len() > MAX_POLICY_REGIONS {
                return Err(format!(
                    "keyspace {:?}: {what} names more than {MAX_POLICY_REGIONS} regions",
                    self.keyspace
                ));
            }
            if let Some(r) = l.iter().find(|r| r.0.is_empty()) {
                return Err(format!("keyspace {:?}: empty region name {r:?}", self.keyspace));
            }
            Ok(())
        };
        if let Regions::Only(l) = &self.regions {
            check_list("regions", l)?;
        }
        if let Some(w) = &self.writers {
            check_list("writers", w)?;
            if let Some(r) = w.iter().find(|r| !self.may_hold(r)) {
                return Err(format!(
                    "keyspace {:?}: writer region {r} may not hold the keyspace ({})",
                    self.keyspace, self.regions
                ));
            }
        }
        Ok(())
    }
}

/// The policy for keys no other policy matches.
static DEFAULT_POLICY: Policy = Policy {
    keyspace: String::new(),
    regions: Regions::All,
    priority: Priority::Normal,
    writers: None,
};

/// A versioned set of policies, as distributed to every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    /// Higher versions replace lower ones everywhere. Version 0 is the
    /// empty set every node starts with.
    pub version: u64,
    /// The policies, sorted by keyspace.
    pub policies: Vec<Policy>,
}

impl PolicySet {
    /// Validates and builds a set: keyspaces unique, lists non-empty,
    /// writers a subset of the holders, at most [`MAX_POLICIES`].
    pub fn new(version: u64, mut policies: Vec<Policy>) -> Result<PolicySet, Error> {
        if policies.len() > MAX_POLICIES {
            return Err(Error::InvalidPolicy(format!(
                "{} policies, at most {MAX_POLICIES}",
                policies.len()
            )));
        }
        let bytes: usize = policies.iter().map(Policy::size_bytes).sum();
        if bytes > MAX_POLICY_SET_BYTES {
            return Err(Error::InvalidPolicy(format!(
                "the set is {bytes} bytes, at most {MAX_POLICY_SET_BYTES}"
            )));
        }
        policies.sort_by(|a, b| a.keyspace.cmp(&b.keyspace));
        for w in policies.windows(2) {
            if w[0].keyspace == w[1].keyspace {
                return Err(Error::InvalidPolicy(format!(
                    "keyspace {:?} appears twice",
                    w[0].keyspace
                )));
            }
        }
        for p in &policies {
            p.validate().map_err(Error::InvalidPolicy)?;
        }
        Ok(PolicySet { version, policies })
    }

    /// Re-validates a set that came from the network or a file.
    pub fn validated(self) -> Result<PolicySet, Error> {
        PolicySet::new(self.version, self.policies)
    }

    /// The index of the policy that governs `key` (`None`: the default).
    pub fn lookup_index(&self, key: &str) -> Option<usize> {
        self.policies
            .iter()
            .enumerate()
            .filter(|(_, p)| key.starts_with(p.keyspace.as_str()))
            .max_by_key(|(_, p)| p.keyspace.len())
            .map(|(i, _)| i)
    }

    /// The policy that governs `key`: the longest matching keyspace.
    pub fn lookup(&self, key: &str) -> &Policy {
        self.lookup_index(key).map_or(&DEFAULT_POLICY, |i| &self.policies[i])
    }

    /// The policy with this index (`None`: the default).
    pub fn by_index(&self, index: Option<usize>) -> &Policy {
        index.and_then(|i| self.policies.get(i)).unwrap_or(&DEFAULT_POLICY)
    }

    /// Whether `key` may pass between regions `a` and `b`.
    pub fn may_exchange(&self, key: &str, a: &RegionId, b: &RegionId) -> bool {
        self.lookup(key).may_exchange(a, b)
    }

    /// Whether `region` may hold `key`.
    pub fn may_hold(&self, key: &str, region: &RegionId) -> bool {
        self.lookup(key).may_hold(region)
    }

    /// `Ok` if `region` may accept a write of `key`, else `PolicyDenied`
    /// naming the regions that may.
    pub fn check_write(&self, key: &str, region: &RegionId) -> Result<(), Error> {
        let p = self.lookup(key);
        if p.may_write(region) {
            return Ok(());
        }
        let may: Vec<RegionId> = match (&p.writers, p.holders()) {
            (Some(w), _) => w.clone(),
            (None, Some(h)) => h,
            (None, None) => Vec::new(),
        };
        Err(denied(key, p, region, may, "written"))
    }

    /// `Ok` if `region` may serve a read of `key`, else `PolicyDenied`.
    pub fn check_read(&self, key: &str, region: &RegionId) -> Result<(), Error> {
        let p = self.lookup(key);
        if p.may_hold(region) {
            return Ok(());
        }
        Err(denied(key, p, region, p.holders().unwrap_or_default(), "read"))
    }

    /// A blake3 digest of the set's canonical encoding: two nodes hold the
    /// same policies exactly when digests are equal.
    pub fn digest(&self) -> [u8; 32] {
        let bytes = crate::proto::to_bytes(self).unwrap_or_default();
        *blake3::hash(&bytes).as_bytes()
    }

    /// Whether `other` replaces this set: a higher version, or the same
    /// version with a higher digest (so conflicting publications converge).
    pub fn is_superseded_by(&self, other: &PolicySet) -> bool {
        (other.version, other.digest()) > (self.version, self.digest())
    }
}

fn denied(key: &str, p: &Policy, region: &RegionId, may: Vec<RegionId>, what: &str) -> Error {
    Error::PolicyDenied {
        key: key.chars().take(64).collect(),
        keyspace: p.keyspace.clone(),
        region: region.clone(),
        regions: may,
        action: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        RegionId::from(s)
    }

    #[test]
    fn longest_prefix_wins_and_default_is_global() {
        let set = PolicySet::new(
            1,
            vec![
                Policy::new("a/", Regions::Only(vec![r("eu")]), Priority::Bulk),
                Policy::new("a/b/", Regions::All, Priority::Critical),
            ],
        )
        .unwrap();
        assert_eq!(set.lookup("a/b/c").priority, Priority::Critical);
        assert_eq!(set.lookup("a/c").priority, Priority::Bulk);
        assert_eq!(set.lookup("z").regions, Regions::All);
        assert!(!set.may_exchange("a/c", &r("eu"), &r("us")));
        assert!(set.may_exchange("a/c", &r("eu"), &r("eu")));
    }

    #[test]
    fn exchange_is_symmetric() {
        let set = PolicySet::new(
            1,
            vec![
                Policy::new("l/", Regions::Local, Priority::Normal),
                Policy::new("o/", Regions::Only(vec![r("eu"), r("us")]), Priority::Normal),
                Policy::new("w/", Regions::Local, Priority::Normal).writers(vec![r("eu")]),
            ],
        )
        .unwrap();
        let regions = [r("eu"), r("us"), r("ap")];
        for k in ["l/x", "o/x", "w/x", "x"] {
            for a in &regions {
                for b in &regions {
                    assert_eq!(set.may_exchange(k, a, b), set.may_exchange(k, b, a), "{k} {a} {b}");
                }
            }
        }
        assert!(set.may_exchange("l/x", &r("us"), &r("us")));
        assert!(!set.may_exchange("l/x", &r("us"), &r("eu")));
        assert!(!set.may_exchange("w/x", &r("us"), &r("us")));
        assert!(set.check_write("w/x", &r("us")).is_err());
        assert!(
            set.check_read("l/x", &r("ap")).is_ok(),
            "unrestricted local keys are per region"
        );
        match set.check_read("o/x", &r("ap")) {
            Err(Error::PolicyDenied { regions, .. }) => assert_eq!(regions, vec![r("eu"), r("us")]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_sets_are_refused() {
        let dup = vec![
            Policy::new("a", Regions::All, Priority::Normal),
            Policy::new("a", Regions::Local, Priority::Normal),
        ];
        assert!(PolicySet::new(1, dup).is_err());
        // A set is capped in bytes, not only in policies.
        let long = |i: usize| Policy::new(format!("{i:0>1000}"), Regions::All, Priority::Normal);
        let big: Vec<Policy> = (0..100).map(long).collect();
        assert!(matches!(PolicySet::new(1, big), Err(Error::InvalidPolicy(m)) if m.contains("bytes")));
        assert!(PolicySet::new(1, vec![Policy::new("a", Regions::Only(vec![]), Priority::Normal)]).is_err());
        let bad_writer = Policy::new("a", Regions::Only(vec![r("eu")]), Priority::Normal).writers(vec![r("us")]);
        assert!(PolicySet::new(1, vec![bad_writer]).is_err());
    }

    #[test]
    fn superseded_by_version_then_digest() {
        let a = PolicySet::new(2, vec![Policy::new("a", Regions::All, Priority::Normal)]).unwrap();
        let b = PolicySet::new(2, vec![Policy::new("b", Regions::All, Priority::Normal)]).unwrap();
        assert_ne!(a.is_superseded_by(&b), b.is_superseded_by(&a));
        let c = PolicySet::new(3, vec![]).unwrap();
        assert!(a.is_superseded_by(&c) && !c.is_superseded_by(&a));
        assert!(!a.is_superseded_by(&a));
    }

    #[test]
    fn toml_like_shapes_decode() {
        let p: Policy = crate::proto::from_bytes(
            &crate::proto::to_bytes(&Policy::new("x", Regions::Only(vec![r("eu")]), Priority::Bulk)).unwrap(),
        )
        .unwrap();
        assert_eq!(p.regions, Regions::Only(vec![r("eu")]));
        assert!(Regions::try_from(RegionsRepr::Word("everywhere".into())).is_err());
    }
}
