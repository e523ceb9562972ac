#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Replication policies across real `latticed` processes in three regions
//! (`cargo test -p lattice-tests policy`): residency, quarantine, write
//! concerns, distribution of a new set and the audit log.

use lattice_client::{Client, Error as ClientError, WriteConcern};
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::proto::RegionId;
use lattice_server::storage::Durability;
use lattice_tests::{key, serial, Cluster};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn r(s: &str) -> RegionId {
    RegionId::from(s)
}

/// A cluster of n1 (eu), n2 (us), n3 (ap) with `policies` as version 1,
/// anti-entropy every second (so the residency checks see rounds run soon).
fn cluster(policies: Vec<Policy>) -> Cluster {
    Cluster::start_with(bin(), &["eu", "us", "ap"], Durability::Group, |_, cfg| {
        cfg.policy_version = 1;
        cfg.policy = policies.clone();
        cfg.anti_entropy_ms = 1_000;
    })
    .unwrap()
}

/// Each node's count of anti-entropy rounds started.
fn ae_rounds(c: &Cluster) -> Vec<f64> {
    (0..3)
        .map(|i| c.metric(i, "lattice_anti_entropy_rounds").unwrap())
        .collect()
}

/// Waits until every node has started four more anti-entropy rounds (each
/// with a peer picked at random) than in `since`: rounds that began after
/// `since` have run.
async fn wait_for_ae_rounds(c: &Cluster, since: &[f64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, before) in since.iter().enumerate() {
        loop {
            let ran = c.metric(i, "lattice_anti_entropy_rounds").unwrap() - before;
            if ran >= 4.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n{} started {ran} anti-entropy rounds in 20 s",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn set(c: &Client, k: &str, v: &str) -> Result<(), ClientError> {
    c.write(vec![(key(k), Op::LwwSet(Bytes::from(v)))]).await.map(|_| ())
}

async fn get(c: &Client, k: &str) -> Result<Option<String>, ClientError> {
    match c.read(&key(k)).await? {
        Some(ValueView::Register(Some(b))) => Ok(Some(String::from_utf8_lossy(&b.0).into_owned())),
        _ => Ok(None),
    }
}

/// Waits until node `i` shows `k` = `v`.
async fn wait_for(c: &Cluster, i: usize, k: &str, v: &str) {
    let client = c.client(i).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if get(&client, k).await.ok().flatten().as_deref() == Some(v) {
            return;
        }
        assert!(Instant::now() < deadline, "n{} never got {k}={v}\n{}", i + 1, c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether any file under node `i`'s data dir contains `needle`.
fn data_dir_contains(c: &Cluster, i: usize, needle: &str) -> bool {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
    }
    let mut files = Vec::new();
    walk(&c.config(i).unwrap().data_dir, &mut files);
    assert!(!files.is_empty());
    files.iter().any(|f| {
        let bytes = std::fs::read(f).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

fn denied_regions(e: ClientError) -> Vec<String> {
    match e {
        ClientError::PolicyDenied { regions, .. } => regions,
        other => panic!("expected PolicyDenied, got {other:?}"),
    }
}

#[test]
fn policy_local_keyspace_stays_in_its_region_and_is_refused_elsewhere() {
    let _g = serial();
    let quarantine = Policy::new("secret/", Regions::Local, Priority::Critical).writers(vec![r("eu")]);
    let mut c = cluster(vec![quarantine]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let (eu, us, ap) = (c.client(0).unwrap(), c.client(1).unwrap(), c.client(2).unwrap());
        set(&eu, "secret/patient-7", "QUARANTINED-PAYLOAD-7").await.unwrap();
        let rounds = ae_rounds(&c);
        assert_eq!(
            get(&eu, "secret/patient-7").await.unwrap().as_deref(),
            Some("QUARANTINED-PAYLOAD-7")
        );
        // A global key written after it reaches every region: replication
        // ran, and the quarantined key still did not travel.
        set(&eu, "global/marker", "GLOBAL-MARKER-1").await.unwrap();
        wait_for(&c, 1, "global/marker", "GLOBAL-MARKER-1").await;
        wait_for(&c, 2, "global/marker", "GLOBAL-MARKER-1").await;
        for other in [&us, &ap] {
            let e = get(other, "secret/patient-7").await.unwrap_err();
            assert_eq!(denied_regions(e), vec!["eu".to_string()]);
            let e = set(other, "secret/patient-8", "x").await.unwrap_err();
            assert_eq!(denied_regions(e), vec!["eu".to_string()]);
        }
        // Anti-entropy would carry the key if its digests leaked it: let
        // rounds run after the write.
        wait_for_ae_rounds(&c, &rounds).await;
    });
    for i in 0..3 {
        c.stop(i).unwrap();
    }
    assert!(
        data_dir_contains(&c, 0, "QUARANTINED-PAYLOAD-7"),
        "the check must see the value where it is"
    );
    for i in 0..3 {
        assert!(
            data_dir_contains(&c, i, "GLOBAL-MARKER-1"),
            "n{} lacks the global key",
            i + 1
        );
    }
    assert!(
        !data_dir_contains(&c, 1, "QUARANTINED-PAYLOAD-7"),
        "the quarantined value reached us"
    );
    assert!(
        !data_dir_contains(&c, 2, "QUARANTINED-PAYLOAD-7"),
        "the quarantined value reached ap"
    );
}

#[test]
fn policy_region_list_reaches_eu_and_us_but_not_ap() {
    let _g = serial();
    let euus = Policy::new("euus/", Regions::Only(vec![r("eu"), r("us")]), Priority::Normal);
    let mut c = cluster(vec![euus]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let (eu, ap) = (c.client(0).unwrap(), c.client(2).unwrap());
        set(&eu, "euus/order-1", "EU-US-ONLY-91").await.unwrap();
        let rounds = ae_rounds(&c);
        wait_for(&c, 1, "euus/order-1", "EU-US-ONLY-91").await;
        set(&eu, "global/marker", "GLOBAL-MARKER-2").await.unwrap();
        wait_for(&c, 2, "global/marker", "GLOBAL-MARKER-2").await;
        let e = get(&ap, "euus/order-1").await.unwrap_err();
        assert_eq!(denied_regions(e), vec!["eu".to_string(), "us".to_string()]);
        // The status shows where the keyspace's copies are.
        let s = c.status(0).await.unwrap();
        let p = s.policies.iter().find(|p| p.keyspace == "euus/").unwrap();
        let holds: Vec<(&str, bool)> = p.copies.iter().map(|c| (c.region.0.as_str(), c.holds)).collect();
        assert_eq!(holds, vec![("ap", false), ("eu", true), ("us", true)], "{s:?}");
        wait_for_ae_rounds(&c, &rounds).await;
    });
    for i in 0..3 {
        c.stop(i).unwrap();
    }
    assert!(data_dir_contains(&c, 0, "EU-US-ONLY-91"));
    assert!(data_dir_contains(&c, 1, "EU-US-ONLY-91"));
    assert!(data_dir_contains(&c, 2, "GLOBAL-MARKER-2"));
    assert!(
        !data_dir_contains(&c, 2, "EU-US-ONLY-91"),
        "an eu/us keyspace reached ap"
    );
}

#[test]
fn policy_write_concern_regions_2_returns_only_once_a_second_region_has_it_durable() {
    let _g = serial();
    let mut c = cluster(Vec::new());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let eu = c.client(0).unwrap().with_timeout(Duration::from_secs(10));
        let write = |k: &'static str, v: &'static str, wait: u64| {
            let eu = &eu;
            async move {
                eu.write_with(
                    vec![(key(k), Op::LwwSet(Bytes::from(v)))],
                    WriteConcern::Regions(2),
                    Duration::from_millis(wait),
                )
                .await
            }
        };
        // No other region up: the concern cannot be met, and the error says
        // the write is durable here and still replicating.
        c.kill(1).unwrap();
        c.kill(2).unwrap();
        let started = Instant::now();
        let e = write("concern/a", "A", 1_500).await.unwrap_err();
        assert!(
            started.elapsed() >= Duration::from_millis(1_400),
            "answered before the timeout"
        );
        match &e {
            ClientError::ReplicationTimeout(m) => {
                assert!(m.contains("durable") && m.contains("not rolled back"), "{m}")
            }
            other => panic!("expected ReplicationTimeout, got {other:?}"),
        }
        assert_eq!(
            get(&c.client(0).unwrap(), "concern/a").await.unwrap().as_deref(),
            Some("A")
        );
        // It was not rolled back: once us is back, it gets there.
        c.restart(1).unwrap();
        wait_for(&c, 1, "concern/a", "A").await;
        // With us up, regions(2) succeeds; then kill eu at once (it cannot
        // resend) and crash us: us must still have the write on disk.
        write("concern/b", "B", 10_000).await.unwrap();
        c.kill(0).unwrap();
        c.kill(1).unwrap();
        c.restart(1).unwrap();
        let us = c.client(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match get(&us, "concern/b").await {
                Ok(v) => {
                    assert_eq!(v.as_deref(), Some("B"), "acknowledged with regions(2) but lost by us");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "us never answered: {e}\n{}", c.logs()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A concern no set of regions can meet is refused up front.
        c.restart(0).unwrap();
        c.wait_ready(Duration::from_secs(30)).await.ok();
        let e = c
            .client(0)
            .unwrap()
            .write_with(
                vec![(key("x"), Op::CounterAdd(1))],
                WriteConcern::Regions(4),
                Duration::ZERO,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::InvalidRequest(_)), "{e:?}");
    });
}

#[test]
fn policy_set_spreads_to_every_node_and_the_audit_log_detects_tampering() {
    let _g = serial();
    // The client token may not change policies; only the admin token may.
    let c = Cluster::start_with(bin(), &["eu", "us", "ap"], Durability::Group, |_, cfg| {
        cfg.policy_version = 1;
        cfg.admin_tokens = vec!["admin-secret-token".into()];
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let cli = Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
    let run = |node: usize, args: &[&str]| {
        let out = std::process::Command::new(cli)
            .arg("--config")
            .arg(c.dir.path().join("client.toml"))
            .arg("--endpoint")
            .arg(c.defaults.endpoints[node].to_string())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let file = c.dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "version = 2\n[[policy]]\nkeyspace = \"eu/\"\nregions = [\"eu\"]\npriority = \"critical\"\n",
    )
    .unwrap();
    // A key version 2 keeps in eu, written in us under version 1 and read
    // in ap: reads are served beside the engine, under the set it publishes.
    rt.block_on(async {
        c.client(1)
            .unwrap()
            .write(vec![(key("eu/x"), Op::CounterAdd(1))])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.client(2).unwrap().read(&key("eu/x")).await.ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "n3 never got eu/x\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (ok, _, err) = run(0, &["policy", "set", file.to_str().unwrap()]);
    assert!(!ok && err.contains("admin token"), "{err}");
    let admin = ["--token", "admin-secret-token", "policy", "set", file.to_str().unwrap()];
    let (ok, out, err) = run(0, &admin);
    assert!(ok, "{out}{err}");
    // An older or equal version is refused.
    let (ok, _, err) = run(1, &admin);
    assert!(!ok && err.contains("not newer"), "{err}");
    // Every node adopts it from n1 and records it.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        for i in 0..3 {
            while c.status(i).await.map(|s| s.policy_version).unwrap_or(0) != 2 {
                assert!(
                    Instant::now() < deadline,
                    "n{} never adopted version 2\n{}",
                    i + 1,
                    c.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let e = c
            .client(1)
            .unwrap()
            .write(vec![(key("eu/x"), Op::CounterAdd(1))])
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::PolicyDenied { .. }), "{e:?}");
        // Nor may us and ap read it any more (a set adopted at run time
        // reaches the reads beside the engine at most one step late).
        for i in 1..3 {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.client(i).unwrap().read(&key("eu/x")).await {
                    Err(ClientError::PolicyDenied { .. }) => break,
                    other => assert!(
                        Instant::now() < deadline,
                        "n{} still serves eu/x under version 2: {other:?}",
                        i + 1
                    ),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        match c.client(2).unwrap().request(RequestBody::Audit).await.unwrap() {
            Response::Audit(entries) => {
                // From n1, or from n2 if n2 passed it on first.
                let sources: Vec<&str> = entries.iter().map(|e| e.source.as_str()).collect();
                assert_eq!(sources.len(), 2, "{entries:?}");
                assert_eq!(sources[0], "config");
                assert!(sources[1] == "peer n1" || sources[1] == "peer n2", "{entries:?}");
                assert_eq!(entries[1].policy.version, 2);
            }
            other => panic!("{other:?}"),
        }
    });
    for i in 0..3 {
        let (ok, out, err) = run(i, &["audit", "verify"]);
        assert!(ok && out.contains("chain intact"), "n{}: {out}{err}", i + 1);
    }
    let (ok, out, _) = run(0, &["policy", "show"]);
    assert!(
        ok && out.contains("policy version 2") && out.contains("keyspace eu/"),
        "{out}"
    );
    // Rewrite history on n3: its first entry now claims another source.
    let log = c.config(2).unwrap().data_dir.join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"config\"", "\"admin\"", 1)).unwrap();
    let (ok, _, err) = run(2, &["audit", "verify"]);
    assert!(!ok && err.contains("audit log broken at entry 0"), "{err}");
    let out = std::process::Command::new(bin())
        .args(["audit", "verify", "--data-dir"])
        .arg(c.config(2).unwrap().data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "latticed audit verify missed the edit");
    // Removing the newest entry instead is caught through the head the
    // node keeps in sled.
    let first_line = format!("{}\n", text.lines().next().unwrap());
    std::fs::write(&log, first_line).unwrap();
    let (ok, _, err) = run(2, &["audit", "verify"]);
    assert!(!ok && err.contains("recorded head"), "{err}");
}
