//! Backups and restore across real `latticed` processes (`cargo test -p
//! lattice-tests backup`): a node that loses its disk comes back from an
//! older backup and its peers; a cross-region restore keeps residency; a
//! damaged backup is refused; an online backup is consistent while the
//! node takes atomic writes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, WriteConcern};
use lattice_core::crdt::Op;
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::RegionId;
use lattice_server::backup;
use lattice_server::storage::{Durability, StoreReader};
use lattice_tests::{key, read_value, serial, Cluster};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Every state in the backup in `dir`, as text, after checking its manifest.
fn backup_states(dir: &Path) -> BTreeMap<String, String> {
    let meta = backup::verify(dir).unwrap();
    let mut out = BTreeMap::new();
    backup::read_states(dir, &meta, &lattice_server::crypt::Keys::none(), &mut |k, v| {
        out.insert(k.as_str().to_string(), v.view().to_string());
        Ok(())
    })
    .unwrap();
    out
}

/// Every state in the data dir of a stopped node, as text.
fn data_dir_states(dir: &Path) -> BTreeMap<String, String> {
    let (_db, reader) = StoreReader::open_stopped(dir, &lattice_server::crypt::Keys::none()).unwrap();
    let mut out = BTreeMap::new();
    reader
        .records_after(None, &mut |k, _, rec| {
            let v = lattice_core::store::open_record(&k, &rec)?;
            out.insert(k.as_str().to_string(), v.view().to_string());
            Ok(true)
        })
        .unwrap();
    out
}

/// Runs `latticed ARGS`; returns (success, stdout and stderr).
fn latticed(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn restore(c: &Cluster, from: &Path, node: usize, data_dir: Option<&Path>) -> (bool, String) {
    let (from, config) = (from.to_str().unwrap(), c.configs[node].to_str().unwrap());
    let mut args = vec!["restore", "--from", from, "--config", config];
    let d;
    if let Some(dir) = data_dir {
        d = dir.to_str().unwrap().to_string();
        args.extend(["--data-dir", d.as_str()]);
    }
    latticed(&args)
}

async fn counter(client: &Client, k: &str) -> i64 {
    match read_value(client, &key(k)).await.unwrap() {
        Some(v) => v.to_string().parse().unwrap(),
        None => 0,
    }
}

/// The lost-disk test (issue 17): n1 is backed up online, both nodes take
/// more acknowledged writes (n1's in two regions, so that its loss cannot
/// take them), n1 is killed and its data dir deleted, restored from the
/// older backup and restarted: it ends with every acknowledged write (those
/// after the backup from n2), under a fresh replica id, converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_lost_disk_restore_brings_back_every_acknowledged_write() {
    let _g = serial();
    let mut c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
        cfg.anti_entropy_ms = 1_000;
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let (n1, n2) = (c.client(0).unwrap(), c.client(1).unwrap());
    let mut expect: BTreeMap<String, i64> = BTreeMap::new();
    for chunk in 0..10 {
        let ops = (chunk * 10..chunk * 10 + 10)
            .map(|i| (key(&format!("c/{i}")), Op::CounterAdd(i + 1)))
            .collect();
        n1.write(ops).await.unwrap();
    }
    for i in 0..100 {
        expect.insert(format!("c/{i}"), i + 1);
    }
    let dir = c.dir.path().join("backup-1");
    let summary = n1.backup(0, dir.to_str().unwrap()).await.unwrap();
    assert_eq!(summary.keys, 100, "{summary:?}");
    let in_backup = backup_states(&dir);
    let as_text: BTreeMap<String, String> = expect.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
    assert_eq!(in_backup, as_text, "the backup holds the state at the backup");
    // After the backup: n2 adds to every counter, n1 writes new keys,
    // acknowledged once durable in both regions.
    for chunk in 0..10 {
        let ops = (chunk * 10..chunk * 10 + 10)
            .map(|i| (key(&format!("c/{i}")), Op::CounterAdd(1_000)))
            .collect();
        n2.write(ops).await.unwrap();
        let ops = (chunk * 10..chunk * 10 + 10)
            .map(|i| (key(&format!("late/{i}")), Op::CounterAdd(7)))
            .collect();
        n1.write_with(ops, WriteConcern::Regions(2), Duration::from_secs(10))
            .await
            .unwrap();
    }
    for i in 0..100 {
        *expect.get_mut(&format!("c/{i}")).unwrap() += 1_000;
        expect.insert(format!("late/{i}"), 7);
    }
    let before = c.status(0).await.unwrap().replica;
    c.kill(0).unwrap();
    let data = c.config(0).unwrap().data_dir;
    std::fs::remove_dir_all(&data).unwrap();
    let (ok, out) = restore(&c, &dir, 0, None);
    assert!(ok, "{out}");
    assert!(out.contains("restored 100 keys"), "{out}");
    assert!(out.contains("0 keys not restored"), "{out}");
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    c.wait_converged(Duration::from_secs(60)).await.unwrap();
    assert_ne!(c.status(0).await.unwrap().replica, before, "a fresh replica id");
    let n1 = c.client(0).unwrap();
    for (k, v) in &expect {
        assert_eq!(counter(&n1, k).await, *v, "{k} on the restored node");
        assert_eq!(counter(&n2, k).await, *v, "{k} on its peer");
    }
}

/// A backup of eu holding a region-local keyspace, restored into a node of
/// us, holds none of its keys (counted as not restored); restored into eu
/// it holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restored_into_another_region_holds_none_of_its_local_keys() {
    let _g = serial();
    let local = Policy::new("secret/", Regions::Local, Priority::Critical).writers(vec![RegionId::from("eu")]);
    let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
        cfg.policy_version = 1;
        cfg.policy = vec![local.clone()];
        cfg.tokens.push("plain-client-token-0001".into());
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let eu = c.client(0).unwrap();
    for i in 0..10 {
        eu.write(vec![
            (key(&format!("secret/{i}")), Op::CounterAdd(1)),
            (key(&format!("pub/{i}")), Op::CounterAdd(1)),
        ])
        .await
        .unwrap();
    }
    let dir = c.dir.path().join("backup-eu");
    // A client token may not back up; nor may a relative path be given.
    let plain = c.client_with_token(0, "plain-client-token-0001").unwrap();
    let e = plain.backup(0, dir.to_str().unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("needs an admin token"), "{e}");
    let e = eu.backup(0, "relative/dir").await.unwrap_err();
    assert!(e.to_string().contains("absolute path"), "{e}");
    assert!(!dir.exists());
    // The CLI, with the admin token.
    let endpoint = format!("n1@{}", c.defaults.endpoints[0]);
    let out = Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
        .args(["--endpoint", &endpoint, "--token", &c.defaults.token, "--ca"])
        .arg(&c.defaults.ca)
        .args(["backup", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("ok: backed up 20 keys"), "{text}");
    let held = backup_states(&dir);
    assert_eq!(held.keys().filter(|k| k.starts_with("secret/")).count(), 10);
    assert_eq!(held.len(), 20);
    let meta = backup::verify(&dir).unwrap();
    assert_eq!(meta.region.as_deref(), Some("eu"));
    assert_eq!(meta.policy.version, 1);

    let us_dir = c.dir.path().join("restored-us");
    let (ok, out) = restore(&c, &dir, 1, Some(&us_dir));
    assert!(ok, "{out}");
    assert!(out.contains("restored 10 keys"), "{out}");
    assert!(
        out.contains("10 keys not restored: region us may not hold them"),
        "{out}"
    );
    let restored = data_dir_states(&us_dir);
    assert_eq!(restored.len(), 10, "{restored:?}");
    assert!(restored.keys().all(|k| k.starts_with("pub/")), "{restored:?}");

    let eu_dir = c.dir.path().join("restored-eu");
    let (ok, out) = restore(&c, &dir, 0, Some(&eu_dir));
    assert!(ok, "{out}");
    assert_eq!(
        data_dir_states(&eu_dir),
        held,
        "restored into its own region, every key"
    );
}

/// `latticed backup` refuses a running node's data dir; stopped, it backs
/// it up. Restore refuses a backup with a flipped byte or a missing file
/// and a data dir that is not empty; the intact backup restores, and the
/// node starts on it with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_offline_and_restore_refuse_a_running_node_and_damage() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let n1 = c.client(0).unwrap();
    for i in 0..50 {
        n1.write(vec![(key(&format!("k/{i}")), Op::CounterAdd(i + 1))])
            .await
            .unwrap();
    }
    let data = c.config(0).unwrap().data_dir;
    let dir = c.dir.path().join("offline");
    let (d, to) = (data.to_str().unwrap(), dir.to_str().unwrap());
    let (ok, out) = latticed(&["backup", "--data-dir", d, "--to", to]);
    assert!(!ok && out.contains("is the node still running"), "{out}");
    assert!(!dir.exists(), "nothing written");
    c.stop(0).unwrap();
    let (ok, out) = latticed(&["backup", "--data-dir", d, "--to", to, "--region", "eu"]);
    assert!(ok && out.contains("backed up 50 keys"), "{out}");
    let (ok, out) = latticed(&["backup", "--data-dir", d, "--to", to]);
    assert!(!ok && out.contains("already exists"), "{out}");

    let copy = |name: &str| -> PathBuf {
        let to = c.dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
        to
    };
    let flipped = copy("flipped");
    let state = flipped.join("states-000000");
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x20;
    std::fs::write(&state, bytes).unwrap();
    let fresh = c.dir.path().join("never");
    let (ok, out) = restore(&c, &flipped, 0, Some(&fresh));
    assert!(!ok, "{out}");
    assert!(
        out.contains("damaged or incomplete: states-000000 does not match its blake3 hash"),
        "{out}"
    );
    let missing = copy("missing");
    std::fs::remove_file(missing.join("ops")).unwrap();
    let (ok, out) = restore(&c, &missing, 0, Some(&fresh));
    assert!(!ok && out.contains("ops is missing"), "{out}");
    assert!(
        std::fs::read_dir(&fresh).map_or(true, |mut d| d.next().is_none()),
        "nothing restored"
    );
    let (ok, out) = restore(&c, &dir, 0, None);
    assert!(!ok && out.contains("is not empty"), "{out}");

    std::fs::remove_dir_all(&data).unwrap();
    let (ok, out) = restore(&c, &dir, 0, None);
    assert!(ok && out.contains("restored 50 keys"), "{out}");
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let n1 = c.client(0).unwrap();
    for i in 0..50 {
        assert_eq!(counter(&n1, &format!("k/{i}")).await, i + 1);
    }
}

/// An online backup holds every key as of one point while the node takes
/// writes: a writer adds 1 to twenty pairs of counters in one atomic write,
/// over and over, while the node is backed up four times; in every backup
/// both counters of every pair are equal. The pairs are spread among 3,000
/// other keys, so the copy passes them at different moments: a backup that
/// copied the records without joining in the changes logged meanwhile
/// (`skip_catch_up` in `server/src/backup.rs`'s unit test, which shows that
/// copy unequal) fails here too; tried once by hand, it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_consistent_under_concurrent_atomic_writes() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for chunk in 0..30 {
        let ops = (chunk * 100..chunk * 100 + 100)
            .map(|i| (key(&format!("filler/{i}")), Op::LwwSet(vec![b'x'; 200].into())))
            .collect();
        client.write(ops).await.unwrap();
    }
    let pairs = |i: i64| -> Vec<(lattice_core::Key, Op)> {
        (0..20)
            .flat_map(|j| {
                [
                    (key(&format!("pair/{j}/a")), Op::CounterAdd(i)),
                    (key(&format!("pair/{j}/b")), Op::CounterAdd(i)),
                ]
            })
            .collect()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (c.client(0).unwrap(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.write(pairs(1)).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let mut seen = Vec::new();
    for b in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dir = c.dir.path().join(format!("b{b}"));
        client.backup(0, dir.to_str().unwrap()).await.unwrap();
        let s = backup_states(&dir);
        for j in 0..20 {
            let (a, bb) = (&s[&format!("pair/{j}/a")], &s[&format!("pair/{j}/b")]);
            assert_eq!(a, bb, "backup {b}: pair {j} copied at two moments");
            assert_eq!(a, &s["pair/0/a"], "backup {b}: pairs {j} and 0 at two moments");
        }
        seen.push(s["pair/0/a"].parse::<u64>().unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 20, "the writer kept writing: {writes}");
    assert!(
        seen.windows(2).any(|w| w[0] != w[1]),
        "the backups saw the writes go on: {seen:?}"
    );
}

/// kill -9 of the node during an online backup: what it leaves behind is
/// never taken for a backup (no manifest: verify and restore refuse it),
/// unless the backup had finished, in which case it restores whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_interrupted_by_kill_is_refused_by_restore() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let n1 = c.client(0).unwrap();
    for chunk in 0..40 {
        let ops = (chunk * 1_000..chunk * 1_000 + 1_000)
            .map(|i| (key(&format!("k/{i}")), Op::CounterAdd(1)))
            .collect();
        n1.write(ops).await.unwrap();
    }
    let dir = c.dir.path().join("backup-killed");
    let d = dir.to_str().unwrap().to_string();
    let running = tokio::spawn(async move { n1.backup(0, &d).await });
    tokio::time::sleep(Duration::from_millis(40)).await;
    c.kill(0).unwrap();
    let answered = running.await.unwrap();
    let target = c.dir.path().join("restored-from-killed");
    let (ok, said) = restore(&c, &dir, 0, Some(&target));
    if dir.join(backup::MANIFEST).exists() {
        assert!(ok, "a finished backup must restore: {said}");
        assert_eq!(data_dir_states(&target).len(), 40_000);
    } else {
        assert!(answered.is_err(), "the backup was answered but has no manifest");
        assert!(!ok, "a backup cut by kill -9 was restored: {said}");
        assert!(said.contains("manifest") || !dir.exists(), "{said}");
    }
    eprintln!("backup answered {answered:?}; restore: {ok} {said}");
}
