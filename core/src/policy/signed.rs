//! Signed policy sets: who may change the replication policy.
//!
//! A policy set only spreads, and is only adopted from a client or a peer,
//! with an ed25519 signature by one of the keys a node trusts
//! ([`ReplicaConfig::policy_keys`](crate::replica::ReplicaConfig::policy_keys)).
//! The private key never lives on a node: an admin signs a set offline
//! (`lattice policy sign`) and any node can check it. The signature covers
//! [`SIGNING_DOMAIN`] followed by the set's canonical encoding (the bytes
//! its [`PolicySet::digest`] hashes), so a signature over anything else
//! (another protocol, another version of this one) never verifies here.
//!
//! This module only verifies and signs given a key; generating keys needs
//! randomness and happens in the client and server binaries.
//!
//! ```
//! use ed25519_dalek::SigningKey;
//! use lattice_core::policy::signed::{SignedPolicySet, TrustedKeys};
//! use lattice_core::policy::PolicySet;
//! let key = SigningKey::from_bytes(&[7; 32]);
//! let signed = SignedPolicySet::sign(PolicySet::new(2, vec![]).unwrap(), &key).unwrap();
//! let trusted = TrustedKeys::new(vec![key.verifying_key().to_bytes()]);
//! assert!(trusted.verify(&signed).is_ok());
//! assert!(TrustedKeys::new(vec![[9; 32]]).verify(&signed).is_err());
//! ```

use super::PolicySet;
use crate::Error;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Prefix of every signed message: a signature made for anything but a
/// Lattice policy set of this encoding version does not verify as one.
pub const SIGNING_DOMAIN: &[u8] = b"lattice policy set v1\0";

/// Most trusted policy keys a node takes (rotation needs two at a time).
pub const MAX_POLICY_KEYS: usize = 16;

/// Who signed a set, and the signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySignature {
    /// The signer's ed25519 public key.
    #[serde(with = "serde_bytes")]
    pub signer: [u8; 32],
    /// The ed25519 signature over [`SIGNING_DOMAIN`] and the set.
    #[serde(with = "serde_bytes")]
    pub signature: [u8; 64],
}

impl fmt::Debug for PolicySignature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicySignature(signer {})", self.signer_hex())
    }
}

impl PolicySignature {
    /// The signer's public key in hex, as `policy_keys` names it.
    pub fn signer_hex(&self) -> String {
        hex(&self.signer)
    }
}

/// A policy set as it travels between an admin and the nodes, and between
/// nodes: the set and, unless it came from a node's own configuration
/// file, its signature. An unsigned set is never sent and never adopted
/// from a client or a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPolicySet {
    /// The policy set.
    pub set: PolicySet,
    /// Its signature (`None`: unsigned, refused by every receiver).
    pub signature: Option<PolicySignature>,
}

impl SignedPolicySet {
    /// A set without a signature (a node's own configuration file).
    pub fn unsigned(set: PolicySet) -> SignedPolicySet {
        SignedPolicySet { set, signature: None }
    }

    /// Signs `set` (validated first, so what is signed is what every node
    /// checks) with `key`.
    pub fn sign(set: PolicySet, key: &SigningKey) -> Result<SignedPolicySet, Error> {
        let set = set.validated()?;
        let signature = key.sign(&signed_bytes(&set)?).to_bytes();
        Ok(SignedPolicySet {
            set,
            signature: Some(PolicySignature {
                signer: key.verifying_key().to_bytes(),
                signature,
            }),
        })
    }
}

impl SignedPolicySet {
    /// Signs `set` as it is, without validating it: only for testing that
    /// a node checks validity after the signature (an invalid signed set
    /// is still refused, as `InvalidPolicy`).
    pub fn sign_as_is(set: PolicySet, key: &SigningKey) -> Result<SignedPolicySet, Error> {
        let signature = key.sign(&signed_bytes(&set)?).to_bytes();
        Ok(SignedPolicySet {
            set,
            signature: Some(PolicySignature {
                signer: key.verifying_key().to_bytes(),
                signature,
            }),
        })
    }
}

/// The bytes a signature covers.
fn signed_bytes(set: &PolicySet) -> Result<Vec<u8>, Error> {
    let mut bytes = SIGNING_DOMAIN.to_vec();
    bytes.extend_from_slice(&crate::proto::to_bytes(set)?);
    Ok(bytes)
}

/// Why a policy set was refused for its signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// It carries no signature.
    Unsigned,
    /// Its signer is not one of the node's `policy_keys`.
    UntrustedKey,
    /// The signature does not verify (a forged or altered set).
    BadSignature,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 3] = [Refusal::Unsigned, Refusal::UntrustedKey, Refusal::BadSignature];

    /// Its name in metrics labels and messages.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::UntrustedKey => "untrusted_key",
            Refusal::BadSignature => "bad_signature",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Unsigned => "the policy set is not signed (sign it with `lattice policy sign`)",
            Refusal::UntrustedKey => "the policy set is signed by a key that is not in this node's policy_keys",
            Refusal::BadSignature => "the policy set's signature does not verify",
        })
    }
}

/// The public keys a node accepts policy sets from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys(Vec<[u8; 32]>);

impl TrustedKeys {
    /// These keys (empty: no set from a client or a peer is ever adopted).
    pub fn new(keys: Vec<[u8; 32]>) -> TrustedKeys {
        TrustedKeys(keys)
    }

    /// The keys.
    pub fn keys(&self) -> &[[u8; 32]] {
        &self.0
    }

    /// Checks that `s` is signed by one of these keys.
    pub fn verify(&self, s: &SignedPolicySet) -> Result<PolicySignature, Refusal> {
        let sig = s.signature.ok_or(Refusal::Unsigned)?;
        if !self.0.contains(&sig.signer) {
            return Err(Refusal::UntrustedKey);
        }
        let key = VerifyingKey::from_bytes(&sig.signer).map_err(|_| Refusal::BadSignature)?;
        let bytes = signed_bytes(&s.set).map_err(|_| Refusal::BadSignature)?;
        key.verify_strict(&bytes, &Signature::from_bytes(&sig.signature))
            .map_err(|_| Refusal::BadSignature)?;
        Ok(sig)
    }
}

/// Checks that `sig` is a valid signature of `set` by its stated signer,
/// whoever that is (what the CLI checks of audit entries it has no trust
/// list for).
pub fn verify_any(set: &PolicySet, sig: &PolicySignature) -> bool {
    TrustedKeys::new(vec![sig.signer])
        .verify(&SignedPolicySet {
            set: set.clone(),
            signature: Some(*sig),
        })
        .is_ok()
}

/// An admin's private key file: 64 hex digits (the ed25519 seed) and a
/// newline. `seed` comes from the caller's OS randomness.
pub fn key_file_text(seed: &[u8; 32]) -> String {
    format!("{}\n", hex(seed))
}

/// The signing key in a file written by [`key_file_text`].
pub fn parse_key_file(text: &str) -> Result<SigningKey, String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a policy key file holds 64 hex digits (made by `lattice policy keygen`)".into());
    }
    let mut seed = [0u8; 32];
    for (i, o) in seed.iter_mut().enumerate() {
        *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
            .map_err(|_| "a policy key file holds hex digits".to_string())?;
    }
    Ok(SigningKey::from_bytes(&seed))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A 32-byte public key from 64 hex digits (any case).
pub fn parse_public_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a policy key is 64 hex digits, got {} characters{}",
            s.len(),
            if s.len() == 64 {
                " that are not all hex digits"
            } else {
                ""
            }
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| format!("{s:?} is not hex"))?;
    }
    VerifyingKey::from_bytes(&out).map_err(|_| format!("{s} is not a valid ed25519 public key"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_only_hex_digits() {
        let good = hex(&[7u8; 32]);
        // `u8::from_str_radix` alone takes a leading '+' ("+7" is 7).
        let plus = format!("+7{}", &good[2..]);
        assert!(parse_key_file(&plus).is_err() && parse_key_file(&good).is_ok());
        let public = hex(&parse_key_file(&good).unwrap().verifying_key().to_bytes());
        assert!(parse_public_key(&public).is_ok());
        assert!(parse_public_key(&format!("+{}", &public[1..])).is_err());
    }

    use super::*;
    use crate::policy::{Policy, Priority, Regions};

    fn set(v: u64) -> PolicySet {
        PolicySet::new(v, vec![Policy::new("patients/", Regions::Local, Priority::Normal)]).unwrap()
    }

    #[test]
    fn only_a_trusted_valid_signature_passes() {
        let (a, b) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let trusted = TrustedKeys::new(vec![a.verifying_key().to_bytes()]);
        let good = SignedPolicySet::sign(set(2), &a).unwrap();
        assert_eq!(
            trusted.verify(&good).map(|s| s.signer),
            Ok(a.verifying_key().to_bytes())
        );
        assert_eq!(
            trusted.verify(&SignedPolicySet::unsigned(set(2))),
            Err(Refusal::Unsigned)
        );
        let other = SignedPolicySet::sign(set(2), &b).unwrap();
        assert_eq!(trusted.verify(&other), Err(Refusal::UntrustedKey));
        // Altering the set, or claiming a trusted signer for another's
        // signature, breaks it.
        let mut altered = good.clone();
        altered.set.version = u64::MAX;
        assert_eq!(trusted.verify(&altered), Err(Refusal::BadSignature));
        let mut claimed = other.clone();
        if let Some(s) = claimed.signature.as_mut() {
            s.signer = a.verifying_key().to_bytes();
        }
        assert_eq!(trusted.verify(&claimed), Err(Refusal::BadSignature));
        assert!(verify_any(&good.set, &good.signature.unwrap()));
        assert!(!verify_any(&altered.set, &good.signature.unwrap()));
    }

    #[test]
    fn the_encoding_round_trips_and_keys_parse() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let good = SignedPolicySet::sign(set(3), &a).unwrap();
        let bytes = crate::proto::to_bytes(&good).unwrap();
        let back: SignedPolicySet = crate::proto::from_bytes(&bytes).unwrap();
        assert_eq!(back, good);
        let h = hex(&a.verifying_key().to_bytes());
        assert_eq!(parse_public_key(&h.to_uppercase()), Ok(a.verifying_key().to_bytes()));
        assert!(parse_public_key("abc").is_err());
        // Sizes are exact on the wire: a 31-byte key or 63-byte signature
        // does not decode.
        #[derive(Serialize)]
        struct Loose {
            #[serde(with = "serde_bytes")]
            signer: Vec<u8>,
            #[serde(with = "serde_bytes")]
            signature: Vec<u8>,
        }
        for (k, s) in [(31, 64), (33, 64), (32, 63), (32, 65)] {
            let bytes = crate::proto::to_bytes(&Loose {
                signer: vec![1; k],
                signature: vec![2; s],
            })
            .unwrap();
            assert!(crate::proto::from_bytes::<PolicySignature>(&bytes).is_err(), "{k}/{s}");
        }
        let ok = crate::proto::to_bytes(&Loose {
            signer: vec![1; 32],
            signature: vec![2; 64],
        })
        .unwrap();
        assert!(crate::proto::from_bytes::<PolicySignature>(&ok).is_ok());
        assert!(parse_public_key(&"zz".repeat(32)).is_err());
    }
}
