//! Who may change a policy, and a keyed audit log (issue 18), against real
//! `latticed` processes: a peer with a valid node certificate cannot put a
//! set in force that no trusted admin key signed; `lattice policy set
//! --key` spreads a signed set that every audit log attributes to its
//! signer; keys rotate; and an audit log rewritten without the audit key,
//! or differing between nodes, is caught. Run: `cargo test -p
//! lattice-tests governance`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::Error as ClientError;
use lattice_core::policy::audit::{AuditEntry, AuditKey};
use lattice_core::policy::signed::{hex, SignedPolicySet};
use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
use lattice_core::proto::client::{RequestBody, Response, PEER_ALPN};
use lattice_core::proto::Message;
use lattice_server::certs;
use lattice_server::storage::Durability;
use lattice_tests::{serial, Cluster};
use quinn::crypto::rustls::QuicClientConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn cli_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
}

/// Runs the CLI against the cluster (every node, from its client.toml):
/// success, stdout, stderr.
fn cli(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(cli_bin())
        .arg("--config")
        .arg(c.dir.path().join("client.toml"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `patients/` opened to every region: what a rogue wants.
fn open_patients(version: u64) -> PolicySet {
    PolicySet::new(
        version,
        vec![Policy::new("patients/", Regions::All, Priority::Critical)],
    )
    .unwrap()
}

fn write_policy_file(c: &Cluster, name: &str, version: u64) -> std::path::PathBuf {
    let file = c.dir.path().join(name);
    std::fs::write(
        &file,
        format!(
            "version = {version}\n[[policy]]\nkeyspace = \"patients/\"\nregions = \"local\"\npriority = \"normal\"\n"
        ),
    )
    .unwrap();
    file
}

fn refused(c: &Cluster, i: usize, reason: &str) -> f64 {
    c.metric(i, &format!("lattice_policy_sets_refused_total{{reason=\"{reason}\"}}"))
        .unwrap_or(0.0)
}

async fn wait_version(c: &Cluster, nodes: &[usize], version: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &i in nodes {
        while c.status(i).await.map(|s| s.policy_version).unwrap_or(0) != version {
            assert!(
                Instant::now() < deadline,
                "n{} never adopted version {version}\n{}",
                i + 1,
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn audit_of(c: &Cluster, i: usize) -> Vec<AuditEntry> {
    match c.client(i).unwrap().request(RequestBody::Audit).await.unwrap() {
        Response::Audit(e) => e,
        other => panic!("{other:?}"),
    }
}

/// Sends `msg` to node `to` as node `as_node` would, on the peer protocol
/// with that node's own (valid) certificate.
async fn send_as_peer(c: &Cluster, as_node: &str, to: usize, msg: &Message) {
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let identity = certs::read_pem(&c.dir.path().join("certs"), as_node).unwrap();
    let tls = certs::client_tls(&ca, Some(&identity), PEER_ALPN).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let name = format!("n{}", to + 1);
    let conn = e.connect(c.defaults.endpoints[to], &name).unwrap().await.unwrap();
    let mut send = conn.open_uni().await.unwrap();
    // The first frame is the sender's boot id, then messages.
    lattice_server::net::write_frame(&mut send, &7u64.to_be_bytes())
        .await
        .unwrap();
    let frame = lattice_core::proto::encode(msg).unwrap();
    lattice_server::net::write_frame(&mut send, &frame).await.unwrap();
    send.finish().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.close(0u32.into(), b"done");
    e.wait_idle().await;
}

async fn wait_refused(c: &Cluster, i: usize, reason: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused(c, i, reason) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "n{} never counted a {reason} refusal\n{}",
            i + 1,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (a) Holders of node certificates cannot change the policy: n3 trusts a
/// rogue key as well, so a rogue set of version 50 is put in force there,
/// and n3 spreads it; n1 and n2 refuse it (`untrusted_key`). A raw peer
/// connection with n3's own certificate sends n1 an unsigned set of
/// version u64::MAX: refused (`unsigned`). n2 bootstraps an unsigned set of
/// version 7 from its own file: in force there only, it never spreads.
/// Clients get the typed error for unsigned and untrusted sets.
#[test]
fn governance_a_peer_cannot_change_the_policy_without_a_trusted_signature() {
    let _g = serial();
    let rogue = ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]);
    let rogue_pub = hex(&rogue.verifying_key().to_bytes());
    let c = Cluster::start_with(bin(), &["eu", "us", "ap"], Durability::Group, |i, cfg| {
        if i == 1 {
            cfg.policy_version = 7;
            cfg.policy = vec![Policy::new("patients/", Regions::All, Priority::Normal)];
        }
        if i == 2 {
            cfg.policy_keys.push(rogue_pub.clone());
        }
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for i in 0..3 {
            c.wait_serving(i, Duration::from_secs(30)).await.unwrap();
        }
        assert_eq!(
            c.status(1).await.unwrap().policy_version,
            7,
            "n2's own file is in force there"
        );
        let admin = c.client(2).unwrap();
        let r = admin
            .request(RequestBody::SetPolicy(
                SignedPolicySet::sign(open_patients(50), &rogue).unwrap(),
            ))
            .await
            .unwrap();
        assert!(matches!(r, Response::PolicySet { version: 50 }), "{r:?}");
        wait_refused(&c, 0, "untrusted_key").await;
        wait_refused(&c, 1, "untrusted_key").await;

        let unsigned = SignedPolicySet::unsigned(open_patients(u64::MAX));
        send_as_peer(&c, "n3", 0, &Message::Policy(unsigned.clone())).await;
        wait_refused(&c, 0, "unsigned").await;
        // A set claiming a trusted signer with another key's signature.
        let mut forged = SignedPolicySet::sign(open_patients(u64::MAX), &rogue).unwrap();
        if let Some(s) = forged.signature.as_mut() {
            s.signer = c.policy_key().unwrap().verifying_key().to_bytes();
        }
        send_as_peer(&c, "n3", 0, &Message::Policy(forged)).await;
        wait_refused(&c, 0, "bad_signature").await;

        // Clients, even with the admin token, get the typed error.
        match c.client(0).unwrap().request(RequestBody::SetPolicy(unsigned)).await {
            Err(ClientError::PolicySignature(m)) => assert!(m.contains("not signed"), "{m}"),
            other => panic!("an unsigned set from a client: {other:?}"),
        }
        let by_rogue = SignedPolicySet::sign(open_patients(60), &rogue).unwrap();
        match c.client(0).unwrap().request(RequestBody::SetPolicy(by_rogue)).await {
            Err(ClientError::PolicySignature(m)) => assert!(m.contains("policy_keys"), "{m}"),
            other => panic!("a set by an untrusted key from a client: {other:?}"),
        }
        // Time for any spreading to happen: none did.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(c.status(0).await.unwrap().policy_version, 0);
        assert_eq!(c.status(1).await.unwrap().policy_version, 7);
        for e in audit_of(&c, 0).await {
            assert!(e.policy.version == 0, "n1 recorded {e:?}");
        }
    });
}

/// (b) `lattice policy set FILE --key KEY` signs and sends; every node
/// adopts it, and every audit log names the signer. A file signed with
/// `lattice policy sign` is sent as it is; the dev client.toml's
/// `policy_key` signs without --key. `lattice audit verify` checks every
/// node and they agree.
#[test]
fn governance_a_signed_set_is_adopted_everywhere_and_the_audit_log_names_the_signer() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let key = c.dir.path().join("policy.key");
    let signer = hex(&c.policy_key().unwrap().verifying_key().to_bytes());
    let v2 = write_policy_file(&c, "v2.toml", 2);
    let (ok, out, err) = cli(
        &c,
        &["policy", "set", v2.to_str().unwrap(), "--key", key.to_str().unwrap()],
    );
    assert!(ok && out.contains("version 2"), "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1, 2], 2));
    rt.block_on(async {
        for i in 0..3 {
            let entries = audit_of(&c, i).await;
            let last = entries.last().unwrap();
            assert_eq!(last.policy.version, 2);
            assert_eq!(last.signer.as_deref(), Some(signer.as_str()), "n{}: {last:?}", i + 1);
        }
    });
    // Signed offline, then sent without a key.
    let v3 = write_policy_file(&c, "v3.toml", 3);
    let signed = c.dir.path().join("v3.signed.toml");
    let (ok, _, err) = cli(
        &c,
        &[
            "policy",
            "sign",
            v3.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-o",
            signed.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(std::fs::read_to_string(&signed).unwrap().contains(&signer));
    let (ok, out, err) = cli(&c, &["policy", "set", signed.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1, 2], 3));
    // The signed file altered after signing is refused.
    let tampered = c.dir.path().join("v4.tampered.toml");
    let text = std::fs::read_to_string(&signed).unwrap();
    std::fs::write(&tampered, text.replace("version = 3", "version = 4")).unwrap();
    let (ok, _, err) = cli(&c, &["policy", "set", tampered.to_str().unwrap()]);
    assert!(!ok && err.contains("does not verify"), "{err}");
    // Without --key, the dev client.toml's policy_key signs.
    let v5 = write_policy_file(&c, "v5.toml", 5);
    let (ok, out, err) = cli(&c, &["policy", "set", v5.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1, 2], 5));
    let (ok, out, err) = cli(&c, &["audit", "verify"]);
    assert!(ok && out.contains("3 node(s) agree"), "{out}{err}");
    let (ok, out, _) = cli(&c, &["audit", "show"]);
    assert!(ok && out.contains(&format!("signer={signer}")), "{out}");
}

/// (c) Rotation: a new key is added to every node's `policy_keys`, a set
/// signed with it is adopted everywhere; the old key is removed, and a set
/// signed with it is refused.
#[test]
fn governance_a_rotated_out_key_is_refused() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let old_key = c.dir.path().join("policy.key");
    let new_key = c.dir.path().join("policy-2026.key");
    let (ok, out, err) = cli(&c, &["policy", "keygen", new_key.to_str().unwrap()]);
    assert!(ok, "{err}");
    let new_pub = out.trim().to_string();
    assert_eq!(new_pub.len(), 64, "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&new_key).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, _, err) = cli(&c, &["policy", "keygen", new_key.to_str().unwrap()]);
    assert!(!ok && err.contains("never overwritten"), "{err}");
    let old_pub = c.config(0).unwrap().policy_keys[0].clone();
    let restart_with = |c: &mut Cluster, keys: Vec<String>| {
        for i in 0..2 {
            c.stop(i).unwrap();
            c.edit_config(i, |cfg| cfg.policy_keys = keys.clone()).unwrap();
        }
        c.start_all().unwrap();
    };
    // Step 1: both keys trusted.
    restart_with(&mut c, vec![old_pub.clone(), new_pub.clone()]);
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let v2 = write_policy_file(&c, "v2.toml", 2);
    let (ok, out, err) = cli(
        &c,
        &[
            "policy",
            "set",
            v2.to_str().unwrap(),
            "--key",
            new_key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1], 2));
    // Step 2: the old key removed everywhere.
    restart_with(&mut c, vec![new_pub.clone()]);
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let v3 = write_policy_file(&c, "v3.toml", 3);
    let (ok, _, err) = cli(
        &c,
        &[
            "policy",
            "set",
            v3.to_str().unwrap(),
            "--key",
            old_key.to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("policy_keys"), "{err}");
    rt.block_on(wait_refused(&c, 0, "untrusted_key"));
    let (ok, out, err) = cli(
        &c,
        &[
            "policy",
            "set",
            v3.to_str().unwrap(),
            "--key",
            new_key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1], 3));
    // A bad policy_keys entry stops the node, naming the setting.
    c.stop(1).unwrap();
    c.edit_config(1, |cfg| cfg.policy_keys = vec!["not-a-key".into()])
        .unwrap();
    let err = start_fails(&c, 1);
    assert!(err.contains("policy_keys (LATTICE_POLICY_KEYS"), "{err}");
}

/// Starts node `i` (stopped) by hand and returns what it printed when it
/// exited, which it must do within 20 s.
fn start_fails(c: &Cluster, i: usize) -> String {
    use std::io::Read;
    let mut child = std::process::Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&c.configs[i])
        .env_remove("LATTICE_AUDIT_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("n{} started", i + 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

/// Rewrites node `i`'s audit log (the node stopped) as `edit` says, then
/// rebuilds every hash and the head kept in sled, keyed with `key` or
/// not: what someone with the data directory can do.
fn rewrite_log(c: &Cluster, i: usize, key: Option<&AuditKey>, edit: impl Fn(&mut Vec<AuditEntry>)) {
    let cfg = c.config(i).unwrap();
    let path = cfg.data_dir.join("audit.log");
    let mut entries: Vec<AuditEntry> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    edit(&mut entries);
    let mut out = String::new();
    let mut prev: Option<AuditEntry> = None;
    for e in entries {
        let next = AuditEntry::next(
            prev.as_ref(),
            e.at_ms,
            &e.node,
            &e.source,
            e.policy.clone(),
            e.policy_signature(),
            key,
        );
        out.push_str(&serde_json::to_string(&next).unwrap());
        out.push('\n');
        prev = Some(next);
    }
    std::fs::write(&path, out).unwrap();
    let store = lattice_server::storage::SledStore::open(&cfg.data_dir, &cfg.node, Durability::Group).unwrap();
    let head = store.audit_tree().unwrap();
    let last = prev.unwrap();
    head.insert(b"head", format!("{} {}", last.index, last.hash).as_bytes())
        .unwrap();
    head.flush().unwrap();
}

/// (d) Keyed audit: with `audit_key_file`, a log edited and rehashed
/// without the key (chain and head recomputed, as an attacker with the
/// data dir can) is refused at start and by `latticed audit verify`,
/// which passes the same log without the key (the checker fails only
/// through the key). And `lattice audit verify` reports a version whose
/// signer differs between nodes, exiting non-zero.
#[test]
fn governance_a_keyed_audit_log_detects_rewrites_and_nodes_are_cross_checked() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
    let key_file = c.dir.path().join("audit.key");
    std::fs::write(&key_file, format!("{}\n", hex(&[0x42; 32]))).unwrap();
    for i in 0..2 {
        c.edit_config(i, |cfg| cfg.audit_key_file = Some(key_file.clone()))
            .unwrap();
    }
    c.start_all().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let v2 = write_policy_file(&c, "v2.toml", 2);
    let (ok, out, err) = cli(&c, &["policy", "set", v2.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    rt.block_on(wait_version(&c, &[0, 1], 2));
    rt.block_on(async {
        assert!(audit_of(&c, 1).await.iter().all(|e| e.keyed));
    });
    let (ok, out, err) = cli(&c, &["audit", "verify"]);
    assert!(ok && out.contains("2 node(s) agree"), "{out}{err}");

    // An attacker without the key: opens patients/ to every region in the
    // recorded history of n2, and rehashes the chain and the head unkeyed.
    c.stop(1).unwrap();
    let data_dir = c.config(1).unwrap().data_dir;
    rewrite_log(&c, 1, None, |entries| {
        let last = entries.last_mut().unwrap();
        last.source = "config".into();
        last.policy = open_patients(2);
        last.signer = None;
        last.signature = None;
    });
    let verify = |key: Option<&Path>| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["audit", "verify", "--data-dir"]).arg(&data_dir);
        if let Some(k) = key {
            cmd.arg("--audit-key-file").arg(k);
        }
        let out = cmd.env_remove("LATTICE_AUDIT_KEY").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    assert!(
        verify(None).0,
        "without the key the forged chain verifies: the key is what catches it"
    );
    let (ok, err) = verify(Some(&key_file));
    assert!(!ok && err.contains("not keyed"), "{err}");
    // The node refuses to start on it.
    let err = start_fails(&c, 1);
    assert!(err.contains("not keyed"), "{err}");

    // A planted difference between nodes: n2's log (rewritten with the key,
    // so it verifies) says another key signed version 2.
    let other = ed25519_dalek::SigningKey::from_bytes(&[0x77; 32]);
    let audit_key = AuditKey([0x42; 32]);
    rewrite_log(&c, 1, Some(&audit_key), |entries| {
        entries.pop();
        let v2 = SignedPolicySet::sign(
            PolicySet::new(2, vec![Policy::new("patients/", Regions::Local, Priority::Normal)]).unwrap(),
            &other,
        )
        .unwrap();
        let prev = entries.last().cloned();
        entries.push(AuditEntry::next(
            prev.as_ref(),
            1,
            "n2",
            "admin",
            v2.set,
            v2.signature,
            None,
        ));
    });
    assert!(verify(Some(&key_file)).0, "{}", verify(Some(&key_file)).1);
    c.restart(1).unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let (ok, out, err) = cli(&c, &["audit", "verify"]);
    assert!(!ok && out.contains("MISMATCH version 2"), "{out}{err}");
    assert!(err.contains("1 version(s) differ"), "{err}");
}
