//! Hostile tests of issue 18 (governance) in real processes: `kill -9` of
//! an encrypted node during acknowledged writes and during an online
//! re-encryption, and a node with many scoped credentials (`cargo test -p
//! lattice-tests --test governance_attack`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A std mutex held across awaits only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::Client;
use lattice_core::crdt::{Bytes, Op};
use lattice_server::config::{AccessEntry, GrantEntry, Perm};
use lattice_server::crypt::Kek;
use lattice_server::storage::Durability;
use lattice_tests::{key, read_value, serial, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn key_file(c: &Cluster, name: &str) -> PathBuf {
    let path = c.dir.path().join(name);
    lattice_server::files::create_secret(&path, Kek::generate().to_hex().as_bytes()).unwrap();
    path
}

fn encrypted(name: &str) -> (Cluster, PathBuf) {
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    let k = key_file(&c, name);
    c.edit_config(0, |cfg| cfg.encryption.key_file = Some(k.clone()))
        .unwrap();
    c.start_all().unwrap();
    (c, k)
}

/// Writes `c/<i>` counters until told to stop; the acknowledged count per key.
async fn writer(client: Client, stop: Arc<AtomicBool>) -> Vec<i64> {
    let mut acked = vec![0i64; 20];
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let i = round % 20;
        if client
            .write(vec![(key(&format!("c/{i}")), Op::CounterAdd(1))])
            .await
            .is_ok()
        {
            acked[i] += 1;
        }
        round += 1;
    }
    acked
}

async fn counter(client: &Client, k: &str) -> i64 {
    read_value(client, &key(k))
        .await
        .unwrap()
        .map_or(0, |v| v.to_string().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_attack_kill_9_during_encrypted_group_writes_keeps_every_acknowledged_write() {
    let _g = serial();
    let (mut c, _) = encrypted("kek");
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..4)
            .map(|_| tokio::spawn(writer(c.client(0).unwrap(), stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        c.kill(0).unwrap();
        stop.store(true, Ordering::Relaxed);
        let mut acked = [0i64; 20];
        for t in tasks {
            for (i, n) in t.await.unwrap().into_iter().enumerate() {
                acked[i] += n;
            }
        }
        assert!(acked.iter().sum::<i64>() > 0, "nothing written");
        c.restart(0).unwrap();
        c.wait_serving(0, Duration::from_secs(60)).await.unwrap();
        let client = c.client(0).unwrap();
        for (i, n) in acked.iter().enumerate() {
            let got = counter(&client, &format!("c/{i}")).await;
            // Counters accumulate over rounds: each round's acks add up.
            assert!(got >= *n, "round {round}: c/{i} reads {got} < {n} acknowledged");
        }
    }
}

fn reencrypt(c: &Cluster) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
    cmd.arg("--config")
        .arg(c.dir.path().join("client.toml"))
        .args(["--json", "reencrypt", "--rotate"]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_attack_kill_9_during_reencrypt_then_restart_reads_everything_and_reencrypts() {
    let _g = serial();
    let (mut c, _) = encrypted("kek");
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    let value = |i: usize| format!("<v{i}>{}", "x".repeat(2_000));
    for b in 0..40 {
        let ops = (0..100)
            .map(|j| {
                let i = b * 100 + j;
                (key(&format!("v/{i}")), Op::LwwSet(Bytes(value(i).into_bytes())))
            })
            .collect();
        client.write(ops).await.unwrap();
    }
    for delay in [50u64, 200, 600] {
        let mut child = reencrypt(&c).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        c.kill(0).unwrap();
        let _ = child.wait();
        c.restart(0).unwrap();
        c.wait_serving(0, Duration::from_secs(60)).await.unwrap();
        let client = c.client(0).unwrap();
        for i in (0..4_000).step_by(37).chain([3_999]) {
            let v = read_value(&client, &key(&format!("v/{i}"))).await;
            let v = v.unwrap_or_else(|e| panic!("after a kill at {delay} ms: v/{i}: {e}\n{}", c.logs()));
            assert!(
                v.is_some_and(|v| v.to_string().contains(&format!("<v{i}>"))),
                "after a kill at {delay} ms: v/{i}"
            );
        }
    }
    let out = reencrypt(&c).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(s["complete"], true, "{s}");
    c.stop(0).unwrap();
    c.restart(0).unwrap();
    c.wait_serving(0, Duration::from_secs(60)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in (0..4_000).step_by(101) {
        let v = read_value(&client, &key(&format!("v/{i}"))).await.unwrap();
        assert!(v.is_some_and(|v| v.to_string().contains(&format!("<v{i}>"))), "v/{i}");
    }
}

/// 10,000 `[[access]]` entries, one of them with a token of the largest
/// length (1,024 bytes): the node starts, and a request of the last
/// entry's token is answered in reasonable time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_attack_ten_thousand_access_entries_and_a_longest_token() {
    let _g = serial();
    let long = "L".repeat(1_024);
    let mut entries: Vec<AccessEntry> = (0..10_000)
        .map(|i| AccessEntry {
            name: format!("app-{i}"),
            token: Some(format!("attack-token-{i:08}-{}", "t".repeat(200))),
            token_env: None,
            client_cert: None,
            grants: vec![GrantEntry {
                prefix: format!("app{i}/"),
                allow: vec![Perm::Read, Perm::Write],
            }],
        })
        .collect();
    entries.push(AccessEntry {
        name: "longest".into(),
        token: Some(long.clone()),
        token_env: None,
        client_cert: None,
        grants: vec![GrantEntry {
            prefix: "long/".into(),
            allow: vec![Perm::Read, Perm::Write],
        }],
    });
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    c.edit_config(0, |cfg| cfg.access = entries).unwrap();
    let started = Instant::now();
    c.start_all().unwrap();
    c.wait_serving(0, Duration::from_secs(120)).await.unwrap();
    eprintln!("10,001 [[access]] entries: serving after {:?}", started.elapsed());

    let last = c
        .client_with_token(0, &format!("attack-token-{:08}-{}", 9_999, "t".repeat(200)))
        .unwrap();
    last.write(vec![(key("app9999/a"), Op::LwwSet(Bytes(b"x".to_vec())))])
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..100 {
        last.read(&key("app9999/a")).await.unwrap();
    }
    let per = t.elapsed() / 100;
    let plain = c.client(0).unwrap();
    let t = Instant::now();
    for _ in 0..100 {
        plain.read(&key("app9999/a")).await.unwrap();
    }
    eprintln!(
        "a read with 10,001 tokens: {per:?} per request (last entry), {:?} (dev token)",
        t.elapsed() / 100
    );
    assert!(per < Duration::from_millis(50), "{per:?} per read");

    let l = c.client_with_token(0, &long).unwrap();
    l.write(vec![(key("long/1"), Op::LwwSet(Bytes(b"y".to_vec())))])
        .await
        .unwrap();
    assert!(l.read(&key("long/1")).await.unwrap().is_some());
}

/// A certificate of the cluster CA with OU `node` (a node's, or a stolen
/// one) presented by a client is no principal, even when an `[[access]]`
/// entry's `client_cert` is that node's name. (Planting `ou != CLIENT_OU`
/// out of `net::client_principal` survived governance_access.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_attack_a_node_certificate_is_not_a_client_principal() {
    use lattice_client::Error;
    use lattice_server::certs;
    let _g = serial();
    let c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
        cfg.access = vec![AccessEntry {
            name: "looks-like-a-node".into(),
            token: None,
            token_env: None,
            client_cert: Some("n9".into()),
            grants: vec![GrantEntry {
                prefix: String::new(),
                allow: vec![Perm::Read, Perm::Write],
            }],
        }];
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let ca_dir = c.defaults.ca.parent().unwrap().to_path_buf();
    let ca = certs::read_pem(&ca_dir, "ca").unwrap();
    let node = certs::new_node_cert(&ca, "n9").unwrap();
    let ca_pem = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let client = Client::new(vec![c.endpoint(0)], "", &ca_pem)
        .unwrap()
        .with_client_cert(&node.cert, &node.key)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    match client.read(&key("any")).await {
        Err(Error::Unauthorized(_)) => {}
        Err(e) if !matches!(e, Error::PermissionDenied(_)) => {}
        r => panic!("a node certificate acted as a client principal: {r:?}"),
    }
    let named = certs::new_client_cert(&ca, "n9").unwrap();
    let ok = Client::new(vec![c.endpoint(0)], "", &ca_pem)
        .unwrap()
        .with_client_cert(&named.cert, &named.key)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    ok.read(&key("any")).await.unwrap();
}

/// A sealed value is bound to its sled key (its associated data): a
/// change-log entry or state moved to another key does not open, and two
/// seals of the same bytes differ (a fresh nonce each). (Planting empty
/// associated data in `crypt::Sealer` survived the storage
/// `encryption_tests`, whose swapped state is also caught by the record's
/// own check.)
#[test]
fn governance_attack_a_sealed_value_is_bound_to_its_key_and_never_repeats() {
    use lattice_server::crypt::{Crypt, Keys};
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let tree = db.open_tree("lattice").unwrap();
    let crypt = Crypt::open(&tree, &Keys::with(Kek::generate()), dir.path(), true).unwrap();
    let sealer = crypt.sealer();
    for (k1, k2) in [(&b"c\0\0\0\x01"[..], &b"c\0\0\0\x02"[..]), (b"kaaaaeu/1", b"kaaaaeu/2")] {
        let sealed = sealer.seal(k1, b"a record").unwrap();
        assert_eq!(&sealer.open(k1, sealed.clone().into()).unwrap()[..], b"a record");
        assert!(
            sealer.open(k2, sealed.clone().into()).is_err(),
            "{k1:?}'s sealed value opened at {k2:?}"
        );
        assert_ne!(sealer.seal(k1, b"a record").unwrap(), sealed, "a repeated nonce");
    }
}

/// A principal that may read only `eu/` scans `""`: the entries are
/// filtered, but each page's cursor is the node's storage position of the
/// last key the page examined (`'k'`, a 4-byte bucket, the key name in
/// plaintext), which may be a key it may not read. Paging with a small
/// limit then lists every key name of the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_attack_scan_cursors_do_not_leak_key_names_outside_the_grants() {
    const ADMIN: &str = "attack-admin-token-00000001";
    const EU_APP: &str = "attack-eu-app-token-0000001";
    let _g = serial();
    let c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
        cfg.admin_tokens = vec![ADMIN.into()];
        cfg.access = vec![AccessEntry {
            name: "eu-app".into(),
            token: Some(EU_APP.into()),
            token_env: None,
            client_cert: None,
            grants: vec![GrantEntry {
                prefix: "eu/".into(),
                allow: vec![Perm::Read],
            }],
        }];
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let admin = c.client_with_token(0, ADMIN).unwrap();
    for i in 0..20 {
        admin
            .write(vec![
                (
                    key(&format!("patients/alice-smith-{i}")),
                    Op::LwwSet(Bytes(b"s".to_vec())),
                ),
                (key(&format!("eu/{i}")), Op::LwwSet(Bytes(b"e".to_vec()))),
            ])
            .await
            .unwrap();
    }
    let eu = c.client_with_token(0, EU_APP).unwrap();
    let (mut cursor, mut leaked, mut seen) = (None, Vec::new(), 0);
    loop {
        let (page, next) = eu.scan("", cursor, 1, false).await.unwrap();
        seen += page.len();
        assert!(page.iter().all(|e| e.key.as_str().starts_with("eu/")));
        match next {
            Some(n) => {
                let text = String::from_utf8_lossy(&n.0).into_owned();
                if text.contains("patients/") {
                    leaked.push(text);
                }
                cursor = Some(n);
            }
            None => break,
        }
    }
    assert_eq!(seen, 20);
    assert!(
        leaked.is_empty(),
        "{} scan cursors given to eu-app name keys it may not read, e.g. {:?}",
        leaked.len(),
        leaked.first()
    );
}
