//! Who a client is and what it may do: scoped credentials.
//!
//! A credential is a bearer token or a client certificate of the cluster
//! CA (OU `client`, the name in its CN). Each maps to a [`Principal`]: a
//! name and a list of grants, each a key prefix and the permissions on the
//! keys under it:
//!
//! | permission | allows |
//! |---|---|
//! | `read` | `get`, `mget`, `get --at`, scans and change-log reads of those keys |
//! | `write` | writes (every key of a write must be granted) |
//! | `watch` | watching those keys; a grant with `watch` must also hold `read` (a change carries its value) |
//! | `admin` | on the prefix `""` only: putting a policy set in force, backups, and seeing every credential in `lattice status` |
//!
//! A key is allowed when some grant's prefix is a prefix of it. Scans,
//! log reads and watches of a prefix wider than the grants are served and
//! filtered to the keys the principal may read; a prefix no grant
//! overlaps is refused. Refusals are `ErrorKind::PermissionDenied`,
//! counted by `lattice_permission_denied_total`.
//!
//! The older settings stay: a token of `tokens` is a principal with
//! `read`, `write` and `watch` on every key, one of `admin_tokens` has
//! `admin` too.

use crate::config::{AccessEntry, Perm};
use lattice_core::proto::client::{AccessInfo, ErrorKind};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A set of permissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    /// Every permission.
    pub const ALL: Perms = Perms(0b1111);
    /// Read, write and watch (a plain `tokens` entry).
    pub const DATA: Perms = Perms(0b0111);

    fn bit(p: Perm) -> u8 {
        match p {
            Perm::Read => 1,
            Perm::Write => 2,
            Perm::Watch => 4,
            Perm::Admin => 8,
        }
    }

    /// The set of `perms`.
    pub fn of(perms: &[Perm]) -> Perms {
        Perms(perms.iter().fold(0, |b, p| b | Perms::bit(*p)))
    }

    /// Whether it holds `p`.
    pub fn has(self, p: Perm) -> bool {
        self.0 & Perms::bit(p) != 0
    }

    /// The names of what it holds.
    pub fn names(self) -> Vec<String> {
        [Perm::Read, Perm::Write, Perm::Watch, Perm::Admin]
            .into_iter()
            .filter(|p| self.has(*p))
            .map(|p| p.name().to_string())
            .collect()
    }
}

/// One grant: the keys under `prefix`, and what may be done with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The key prefix (`""`: every key).
    pub prefix: String,
    /// The permissions.
    pub perms: Perms,
}

/// An authenticated client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Its name (the access entry's, or `tokens[i]`).
    pub name: String,
    /// How it authenticated: `token` or `certificate`.
    pub via: &'static str,
    /// What it may do.
    pub grants: Vec<Grant>,
}

impl Principal {
    /// Whether `perm` is granted on `key`.
    pub fn allows(&self, perm: Perm, key: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.has(perm) && key.starts_with(g.prefix.as_str()))
    }

    /// Whether `perm` is granted on some key under `prefix`: a scan, log
    /// read or watch of `prefix` may return something.
    pub fn overlaps(&self, perm: Perm, prefix: &str) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.has(perm) && (prefix.starts_with(g.prefix.as_str()) || g.prefix.starts_with(prefix)))
    }

    /// Whether it may administer the node (`admin` on the prefix `""`).
    pub fn is_admin(&self) -> bool {
        self.grants
            .iter()
            .any(|g| g.perms.has(Perm::Admin) && g.prefix.is_empty())
    }

    /// It, without secrets, as `lattice status` shows it.
    pub fn info(&self) -> AccessInfo {
        AccessInfo {
            name: self.name.clone(),
            via: self.via.to_string(),
            grants: self
                .grants
                .iter()
                .map(|g| (g.prefix.clone(), g.perms.names()))
                .collect(),
        }
    }
}

/// The refusal of `what` for `principal`.
pub fn denied(principal: &Principal, what: impl std::fmt::Display) -> lattice_core::proto::client::ClientError {
    lattice_core::proto::client::ClientError {
        kind: ErrorKind::PermissionDenied,
        message: format!("{} may not {what}", principal.name),
        regions: Vec::new(),
    }
}

/// Every credential the node accepts. Tokens are kept and looked up by
/// their blake3 hash: one lookup whatever the number of tokens (a linear
/// constant-time scan cost 1.4 ms per request at 10,000 of them, wrong
/// tokens included), and what a lookup's timing can reveal is where the
/// hash of the caller's own guess sorts, nothing of a configured token.
#[derive(Debug, Default)]
pub struct Access {
    tokens: BTreeMap<[u8; 32], Arc<Principal>>,
    certs: BTreeMap<String, Arc<Principal>>,
}

fn token_hash(token: &[u8]) -> [u8; 32] {
    *blake3::hash(token).as_bytes()
}

impl Access {
    /// The credentials of the node's configuration: `tokens`,
    /// `admin_tokens` and the `[[access]]` entries (their tokens already
    /// resolved from `token_env`).
    pub fn new(tokens: &[String], admin_tokens: &[String], entries: &[AccessEntry]) -> Access {
        let mut access = Access::default();
        let all = |name: String, perms: Perms| {
            Arc::new(Principal {
                name,
                via: "token",
                grants: vec![Grant {
                    prefix: String::new(),
                    perms,
                }],
            })
        };
        for (i, t) in admin_tokens.iter().enumerate() {
            access
                .tokens
                .entry(token_hash(t.as_bytes()))
                .or_insert_with(|| all(format!("admin_tokens[{i}]"), Perms::ALL));
        }
        // A token that is also an admin token is the admin's.
        for (i, t) in tokens.iter().enumerate() {
            access
                .tokens
                .entry(token_hash(t.as_bytes()))
                .or_insert_with(|| all(format!("tokens[{i}]"), Perms::DATA));
        }
        for e in entries {
            let grants: Vec<Grant> = e
                .grants
                .iter()
                .map(|g| Grant {
                    prefix: g.prefix.clone(),
                    perms: Perms::of(&g.allow),
                })
                .collect();
            if let Some(t) = &e.token {
                let p = Principal {
                    name: e.name.clone(),
                    via: "token",
                    grants: grants.clone(),
                };
                // Distinct from every other token (the configuration
                // checks): never replaces one.
                access
                    .tokens
                    .entry(token_hash(t.as_bytes()))
                    .or_insert_with(|| Arc::new(p));
            }
            if let Some(cn) = &e.client_cert {
                let p = Principal {
                    name: e.name.clone(),
                    via: "certificate",
                    grants,
                };
                access.certs.insert(cn.clone(), Arc::new(p));
            }
        }
        access
    }

    /// The principal of `token` (an empty token has none).
    pub fn by_token(&self, token: &[u8]) -> Option<Arc<Principal>> {
        if token.is_empty() {
            return None;
        }
        self.tokens.get(&token_hash(token)).cloned()
    }

    /// The principal of a client certificate named `cn` (an empty name,
    /// as a certificate without a readable CN gives, has none).
    pub fn by_cert(&self, cn: &str) -> Option<Arc<Principal>> {
        if cn.is_empty() {
            return None;
        }
        self.certs.get(cn).cloned()
    }

    /// Whether any credential at all is configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.certs.is_empty()
    }

    /// Every principal, without secrets.
    pub fn infos(&self) -> Vec<AccessInfo> {
        self.tokens
            .values()
            .chain(self.certs.values())
            .map(|p| p.info())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GrantEntry;

    fn entry(name: &str, token: &str, grants: &[(&str, &[Perm])]) -> AccessEntry {
        AccessEntry {
            name: name.into(),
            token: Some(token.into()),
            token_env: None,
            client_cert: None,
            grants: grants
                .iter()
                .map(|(p, a)| GrantEntry {
                    prefix: p.to_string(),
                    allow: a.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn grants_allow_their_prefix_only() {
        let a = Access::new(
            &["plain-token-0123456789".into()],
            &["admin-token-0123456789".into()],
            &[
                entry("eu-app", "eu-token-0123456789", &[("eu/", &[Perm::Read, Perm::Write])]),
                entry("reader", "ro-token-0123456789", &[("", &[Perm::Read])]),
            ],
        );
        let eu = a.by_token(b"eu-token-0123456789").unwrap();
        assert!(eu.allows(Perm::Read, "eu/1") && eu.allows(Perm::Write, "eu/1"));
        assert!(!eu.allows(Perm::Read, "patients/1"), "another keyspace");
        assert!(!eu.allows(Perm::Read, "eu"), "the prefix itself is not under it");
        assert!(!eu.allows(Perm::Watch, "eu/1"), "not granted");
        assert!(eu.overlaps(Perm::Read, "") && eu.overlaps(Perm::Read, "eu/x"));
        assert!(!eu.overlaps(Perm::Read, "patients/"));
        assert!(!eu.is_admin());
        let ro = a.by_token(b"ro-token-0123456789").unwrap();
        assert!(ro.allows(Perm::Read, "anything") && !ro.allows(Perm::Write, "anything"));
        assert!(a.by_token(b"admin-token-0123456789").unwrap().is_admin());
        let both = Access::new(
            &["same-token-0123456789".into()],
            &["same-token-0123456789".into()],
            &[],
        );
        assert!(
            both.by_token(b"same-token-0123456789").unwrap().is_admin(),
            "the admin's"
        );
        assert_eq!(both.infos().len(), 1);
        let plain = a.by_token(b"plain-token-0123456789").unwrap();
        assert!(!plain.is_admin() && plain.allows(Perm::Watch, "x"));
        assert!(a.by_token(b"eu-token-012345678").is_none(), "a prefix of a token");
        assert!(a.by_token(b"").is_none());
        assert_eq!(a.infos().len(), 4);
        assert!(
            !format!("{:?}", a.infos()).contains("token-0123456789"),
            "the infos carry no secret"
        );
    }
}
