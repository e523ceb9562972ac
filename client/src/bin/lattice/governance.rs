//! Signed policy sets and the cross-node audit check: `lattice policy
//! keygen | sign | set --key` and `lattice audit verify`.

use lattice_client::Client;
use lattice_core::policy::audit::{self, AuditEntry};
use lattice_core::policy::signed::{self, hex, PolicySignature, SignedPolicySet};
use lattice_core::policy::{Policy, PolicySet};
use lattice_core::proto::client::{RequestBody, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The file `lattice policy sign` reads and writes, and `lattice policy
/// set` sends: a version, `[[policy]]` tables and, once signed, the
/// signer's public key and the signature (hex).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    #[serde(default)]
    policy: Vec<Policy>,
}

fn unhex<const N: usize>(s: &str, what: &str) -> Result<[u8; N], String> {
    let s = s.trim();
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} is {} hex digits", 2 * N));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| format!("{what} is not hex"))?;
    }
    Ok(out)
}

fn read_key(path: &Path) -> Result<ed25519_dalek::SigningKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    signed::parse_key_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a policy file; with `key`, signs it (replacing any signature it
/// carries), else takes its own signature; an unsigned file is signed with
/// `fallback` (the defaults file's `policy_key`) if there is one, or sent
/// unsigned (and nodes refuse it).
pub fn load(file: &Path, key: Option<&Path>, fallback: Option<&Path>) -> Result<SignedPolicySet, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let f: PolicyFile = toml::from_str(&text).map_err(|e| format!("parsing {}: {e}", file.display()))?;
    let set = PolicySet::new(f.version, f.policy).map_err(|e| format!("{}: {e}", file.display()))?;
    if let Some(k) = key {
        return SignedPolicySet::sign(set, &read_key(k)?).map_err(|e| e.to_string());
    }
    let signature = match (f.signer, f.signature) {
        (Some(s), Some(sig)) => Some(PolicySignature {
            signer: unhex::<32>(&s, "signer")?,
            signature: unhex::<64>(&sig, "signature")?,
        }),
        (None, None) => match fallback {
            Some(k) => return SignedPolicySet::sign(set, &read_key(k)?).map_err(|e| e.to_string()),
            None => None,
        },
        _ => return Err(format!("{}: signer and signature go together", file.display())),
    };
    Ok(SignedPolicySet { set, signature })
}

/// `lattice policy keygen OUT`: a new admin key, written 0600 with
/// O_CREAT|O_EXCL (an existing file is never replaced); prints the public
/// key every node lists in `policy_keys`.
pub fn keygen(out: &Path) -> Result<(), String> {
    use rand::RngCore;
    use std::io::Write;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(out)
        .map_err(|e| format!("creating {} (an existing key is never overwritten): {e}", out.display()))?;
    f.write_all(signed::key_file_text(&seed).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", out.display()))?;
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    println!("{}", hex(&public));
    Ok(())
}

/// `lattice policy sign FILE --key KEY [-o OUT]`: the file with its
/// signature, to OUT (created, never overwritten) or standard output.
pub fn sign(file: &Path, key: &Path, out: Option<&Path>) -> Result<(), String> {
    let s = load(file, Some(key), None)?;
    let sig = s.signature.ok_or("signing produced no signature")?;
    let f = PolicyFile {
        version: s.set.version,
        signer: Some(hex(&sig.signer)),
        signature: Some(hex(&sig.signature)),
        policy: s.set.policies,
    };
    let text = toml::to_string(&f).map_err(|e| e.to_string())?;
    match out {
        Some(o) => {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(o)
                .and_then(|mut w| w.write_all(text.as_bytes()))
                .map_err(|e| format!("writing {}: {e}", o.display()))?;
            eprintln!("signed by {}", hex(&sig.signer));
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// What one node's log says of one version: its last entry for it.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    digest: String,
    signer: String,
}

/// `lattice audit verify`: every node's log is fetched and verified (chain,
/// digests, signatures), then the nodes are compared version by version:
/// a version whose set digest or signer differs between two nodes is a
/// mismatch. Any broken chain, unreachable node or mismatch is an error.
pub async fn verify_all(client: &Client, names: &[String], json: bool) -> Result<(), String> {
    let mut failures = Vec::new();
    let mut by_version: BTreeMap<u64, BTreeMap<String, Seen>> = BTreeMap::new();
    let mut per_node = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let entries: Vec<AuditEntry> = match client.request_to(i, RequestBody::Audit).await {
            Ok(Response::Audit(e)) => e,
            Ok(other) => {
                failures.push(format!("{name}: unexpected answer {other:?}"));
                continue;
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        match audit::verify_served(&entries, None) {
            Ok(from) => {
                let head = entries.last().map_or("(empty)".to_string(), |e| e.hash.clone());
                per_node.push(
                    serde_json::json!({"node": name, "entries": entries.len(), "head": head, "archived_before": from}),
                );
                if !json {
                    println!("{name}: ok: {} entries, chain intact, head {head}", entries.len());
                }
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        }
        for e in &entries {
            let seen = Seen {
                digest: e.policy_digest.clone(),
                signer: e.signer.clone().unwrap_or_else(|| "-".into()),
            };
            by_version
                .entry(e.policy.version)
                .or_default()
                .insert(name.clone(), seen);
        }
    }
    let mut mismatches = Vec::new();
    for (version, nodes) in &by_version {
        let mut it = nodes.iter();
        let Some((first_node, first)) = it.next() else { continue };
        for (node, s) in it {
            if s != first {
                mismatches.push(format!(
                    "version {version}: {first_node} has digest {} signer {}, {node} has digest {} signer {}",
                    first.digest, first.signer, s.digest, s.signer
                ));
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": failures.is_empty() && mismatches.is_empty(), "nodes": per_node, "failures": failures, "mismatches": mismatches})
        );
    } else {
        for m in &mismatches {
            println!("MISMATCH {m}");
        }
        for f in &failures {
            println!("FAILED {f}");
        }
    }
    if !failures.is_empty() || !mismatches.is_empty() {
        return Err(format!(
            "audit verify: {} node(s) failed, {} version(s) differ between nodes: {}",
            failures.len(),
            mismatches.len(),
            failures
                .iter()
                .chain(&mismatches)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !json {
        println!("ok: {} node(s) agree on every version they share", names.len());
    }
    Ok(())
}
