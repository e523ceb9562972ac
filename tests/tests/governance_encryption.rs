//! Encryption at rest across real `latticed` processes (issue 18; `cargo
//! test -p lattice-tests --test governance_encryption`): no value is in the
//! data dir or a backup in plaintext (and the same search finds them on a
//! node without encryption); a missing or wrong key stops the node with a
//! clear error; a flipped byte is refused naming the key; a key rotation
//! and an online re-encryption under load keep every acknowledged write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A std mutex held across awaits only serializes the tests (one cluster at a
// time on 2 cores), which is the intent.
#![allow(clippy::await_holding_lock)]

use lattice_client::Client;
use lattice_core::crdt::{Bytes, Field, FieldKind, Op};
use lattice_server::crypt::Kek;
use lattice_server::storage::Durability;
use lattice_tests::{key, read_value, serial, Cluster};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Writes a fresh key file (0600) in the cluster's directory, outside the
/// node's data dir.
fn key_file(c: &Cluster, name: &str) -> PathBuf {
    let path = c.dir.path().join(name);
    lattice_server::files::create_secret(&path, Kek::generate().to_hex().as_bytes()).unwrap();
    path
}

fn set_keys(c: &Cluster, i: usize, current: Option<&Path>, old: &[&Path]) {
    c.edit_config(i, |cfg| {
        cfg.encryption.key_file = current.map(Path::to_path_buf);
        cfg.encryption.old_key_files = old.iter().map(|p| p.to_path_buf()).collect();
    })
    .unwrap();
}

/// Distinctive values: a register, a set element, a map field, and one
/// large value (over 128 KiB: sled writes it to a blob file). Returns the
/// byte strings that must not be found on disk.
async fn write_distinctive(client: &Client) -> Vec<Vec<u8>> {
    let reg = b"REG-9f3a-distinctive-register".to_vec();
    let elem = b"SET-77c1-distinctive-element".to_vec();
    let field = b"MAP-41d2-distinctive-field-value".to_vec();
    let big_marker = b"BIG-0b5e-distinctive-large-".to_vec();
    let big: Vec<u8> = big_marker.iter().copied().cycle().take(200 << 10).collect();
    client
        .write(vec![(key("reg"), Op::LwwSet(Bytes(reg.clone())))])
        .await
        .unwrap();
    client
        .write(vec![(key("set"), Op::SetAdd(vec![Bytes(elem.clone())]))])
        .await
        .unwrap();
    client
        .write(vec![(
            key("map"),
            Op::MapApply {
                field: Field::new("f", FieldKind::Register),
                op: Box::new(Op::MvSet(Bytes(field.clone()))),
            },
        )])
        .await
        .unwrap();
    client.write(vec![(key("big"), Op::LwwSet(Bytes(big)))]).await.unwrap();
    vec![reg, elem, field, big_marker]
}

/// Every (file, needle) such that the file under `dir` holds the needle.
fn found_in(dir: &Path, needles: &[Vec<u8>]) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for n in needles {
                if bytes.windows(n.len()).any(|w| w == &n[..]) {
                    out.push((path.clone(), String::from_utf8_lossy(n).into_owned()));
                }
            }
        }
    }
    out
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Starts node `i` expecting it to fail: whether it succeeded, and its
/// stderr (a failure must exit with status 1).
fn start_failing(c: &Cluster, i: usize, env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&c.configs[i])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("latticed (pid {pid}) started when it should have refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(1), "exit status: {err}");
    }
    (out.status.success(), err)
}

/// Runs `latticed ARGS`: (success, stdout and stderr).
fn latticed(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One node, encrypted or not: writes the distinctive values, backs up
/// online, stops; returns what was found in its data dir and its backup,
/// and the needles.
async fn write_backup_stop(encrypt: bool) -> (Cluster, Vec<(PathBuf, String)>, Vec<(PathBuf, String)>, PathBuf) {
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    if encrypt {
        let k = key_file(&c, "kek-1");
        set_keys(&c, 0, Some(&k), &[]);
    }
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    let needles = write_distinctive(&client).await;
    let backup = c.dir.path().join("backup");
    let s = client.backup(0, backup.to_str().unwrap()).await.unwrap();
    assert_eq!(s.keys, 4, "{s:?}");
    c.stop(0).unwrap();
    let data = c.config(0).unwrap().data_dir;
    assert!(
        files_under(&data.join("blobs")) > 0,
        "the large value is in a blob file"
    );
    let in_data = found_in(&data, &needles);
    let in_backup = found_in(&backup, &needles);
    (c, in_data, in_backup, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_an_encrypted_node_keeps_no_value_in_plaintext_on_disk_or_in_backups() {
    let _g = serial();
    // The control: the search finds every value on a node without it.
    let (_plain, in_data, in_backup, _) = write_backup_stop(false).await;
    for n in ["REG-9f3a", "SET-77c1", "MAP-41d2", "BIG-0b5e"] {
        assert!(
            in_data.iter().any(|(_, f)| f.starts_with(n)),
            "{n} not found in a plain data dir: the search cannot fail ({in_data:?})"
        );
        assert!(
            in_backup.iter().any(|(_, f)| f.starts_with(n)),
            "{n} not found in a plain backup ({in_backup:?})"
        );
    }
    let (c, in_data, in_backup, backup) = write_backup_stop(true).await;
    assert!(
        in_data.is_empty(),
        "plaintext values in an encrypted data dir: {in_data:?}"
    );
    assert!(
        in_backup.is_empty(),
        "plaintext values in an encrypted backup: {in_backup:?}"
    );
    assert!(backup.join("keys").exists(), "the backup carries the wrapped data keys");
    // Restore needs the key: without it, refused; with it, every value.
    let fresh = c.dir.path().join("restored");
    let fresh_s = fresh.to_str().unwrap().to_string();
    let config = c.configs[0].to_str().unwrap().to_string();
    let key = c.config(0).unwrap().encryption.key_file.unwrap();
    set_keys(&c, 0, None, &[]);
    let (ok, out) = latticed(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--config",
        &config,
        "--data-dir",
        &fresh_s,
    ]);
    assert!(!ok && out.contains("is encrypted"), "{out}");
    set_keys(&c, 0, Some(&key), &[]);
    let (ok, out) = latticed(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--config",
        &config,
        "--data-dir",
        &fresh_s,
    ]);
    assert!(ok && out.contains("restored 4 keys"), "{out}");
    let needles: Vec<Vec<u8>> = ["REG-9f3a", "SET-77c1", "MAP-41d2", "BIG-0b5e"]
        .iter()
        .map(|n| n.as_bytes().to_vec())
        .collect();
    let found = found_in(&fresh, &needles);
    assert!(found.is_empty(), "a restored data dir holds plaintext: {found:?}");
    let (ok, out) = latticed(&["digest", "--data-dir", &fresh_s, "--key-file", key.to_str().unwrap()]);
    assert!(ok && out.contains(" 4 keys"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_a_missing_or_wrong_key_stops_the_node_with_a_clear_error() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    let good = key_file(&c, "kek-good");
    set_keys(&c, 0, Some(&good), &[]);
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    client
        .write(vec![(key("motto"), Op::LwwSet(Bytes(b"carpe diem".to_vec())))])
        .await
        .unwrap();
    c.stop(0).unwrap();

    set_keys(&c, 0, None, &[]);
    let (ok, err) = start_failing(&c, 0, &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("is encrypted; set [encryption] key_file or LATTICE_ENCRYPTION_KEY"),
        "{err}"
    );

    let wrong = key_file(&c, "kek-wrong");
    set_keys(&c, 0, Some(&wrong), &[]);
    let (ok, err) = start_failing(&c, 0, &[]);
    assert!(!ok, "{err}");
    assert!(err.contains("the encryption key does not open the data keys"), "{err}");

    // The environment wins over the file; a malformed key is named, not printed.
    set_keys(&c, 0, Some(&good), &[]);
    let (ok, err) = start_failing(&c, 0, &[("LATTICE_ENCRYPTION_KEY", "0123abcd")]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("LATTICE_ENCRYPTION_KEY") && err.contains("64 hex digits"),
        "{err}"
    );
    assert!(!err.contains("0123abcd"), "the key is printed: {err}");

    // A key file inside the data dir is refused.
    let data = c.config(0).unwrap().data_dir;
    let inside = data.join("kek");
    std::fs::copy(&good, &inside).unwrap();
    set_keys(&c, 0, Some(&inside), &[]);
    let (ok, err) = start_failing(&c, 0, &[]);
    assert!(!ok && err.contains("inside the data dir"), "{err}");
    std::fs::remove_file(&inside).unwrap();

    set_keys(&c, 0, Some(&good), &[]);
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let v = read_value(&c.client(0).unwrap(), &key("motto")).await.unwrap();
    assert!(v.is_some_and(|v| v.to_string().contains("carpe diem")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_a_flipped_byte_in_an_encrypted_record_is_refused_naming_its_key() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Sync).unwrap();
    let k = key_file(&c, "kek");
    set_keys(&c, 0, Some(&k), &[]);
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for (name, v) in [("greeting", "hello"), ("motto", "carpe diem")] {
        client
            .write(vec![(key(name), Op::LwwSet(Bytes(v.as_bytes().to_vec())))])
            .await
            .unwrap();
    }
    c.stop(0).unwrap();
    let data = c.config(0).unwrap().data_dir;
    {
        // Through sled's API, so sled's own CRC covers the flipped byte and
        // only the AEAD tag can see it.
        let db = sled::open(&data).unwrap();
        let tree = db.open_tree("lattice").unwrap();
        let (key, v) = tree
            .scan_prefix(b"k")
            .map(|r| r.unwrap())
            .find(|(k, _)| k.ends_with(b"motto"))
            .expect("the record");
        assert!(!v.windows(5).any(|w| w == b"carpe"), "the record is ciphertext");
        let mut v = v.to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0x01;
        tree.insert(key, v).unwrap();
        db.flush().unwrap();
    }
    let (ok, err) = start_failing(&c, 0, &[]);
    assert!(!ok, "{err}");
    assert!(err.contains("refusing to start") && err.contains("\"motto\""), "{err}");
}

/// Writes `c/<i>` counters (+1 each) until told to stop; returns how many
/// writes were acknowledged per key.
async fn writer(client: Client, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<i64> {
    let mut acked = vec![0i64; 50];
    let mut round = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let i = round % 50;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_key_rotation_and_online_reencryption_keep_every_acknowledged_write() {
    let _g = serial();
    let mut c = Cluster::prepare(bin(), &["eu"], Durability::Group).unwrap();
    let k1 = key_file(&c, "kek-1");
    set_keys(&c, 0, Some(&k1), &[]);
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in 0..100 {
        client
            .write(vec![(
                key(&format!("old/{i}")),
                Op::LwwSet(Bytes(format!("<v{i}>").into_bytes())),
            )])
            .await
            .unwrap();
    }
    c.stop(0).unwrap();

    // A new KEK, the old one kept for unwrapping: old values read, and new
    // writes go under a new data key (re-encrypted in the background).
    let k2 = key_file(&c, "kek-2");
    set_keys(&c, 0, Some(&k2), &[&k1]);
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in [0, 42, 99] {
        let v = read_value(&client, &key(&format!("old/{i}"))).await.unwrap();
        assert!(v.is_some_and(|v| v.to_string().contains(&format!("<v{i}>"))), "old/{i}");
    }

    // A data key rotation and a re-encryption while a writer runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::spawn(writer(c.client(0).unwrap(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = Command::new(env!("CARGO_BIN_EXE_lattice-test-cli"))
        .arg("--config")
        .arg(c.dir.path().join("client.toml"))
        .args(["--json", "reencrypt", "--rotate"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(s["complete"], true, "{s}");
    assert!(s["retired"].as_u64().unwrap() >= 1, "{s}");
    // The node says it holds one data key again (the gauge is sampled
    // by the engine: wait for a sample after the pass).
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.metric(0, "lattice_encryption_data_keys").unwrap() != 1.0 {
        assert!(Instant::now() < deadline, "lattice_encryption_data_keys stays above 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = task.await.unwrap();
    assert!(acked.iter().sum::<i64>() > 0, "the writer wrote nothing");
    c.stop(0).unwrap();

    // Every state and log entry on disk is under one data key, a newer
    // one than the first node life's and the KEK rotation's.
    {
        let db = sled::open(c.config(0).unwrap().data_dir).unwrap();
        let tree = db.open_tree("lattice").unwrap();
        let mut ids = std::collections::BTreeSet::new();
        for prefix in [&b"k"[..], b"c"] {
            for e in tree.scan_prefix(prefix) {
                let (_, v) = e.unwrap();
                ids.insert(lattice_server::crypt::data_key_of(&v));
            }
        }
        assert_eq!(ids.len(), 1, "values under several data keys: {ids:?}");
        assert!(ids.iter().all(|id| id.is_some_and(|id| id >= 3)), "{ids:?}");
    }
    // The old KEK alone opens nothing now; the new one alone, everything.
    set_keys(&c, 0, Some(&k1), &[]);
    let (ok, err) = start_failing(&c, 0, &[]);
    assert!(!ok && err.contains("does not open the data keys"), "{err}");
    set_keys(&c, 0, Some(&k2), &[]);
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in 0..100 {
        let v = read_value(&client, &key(&format!("old/{i}"))).await.unwrap();
        assert!(v.is_some_and(|v| v.to_string().contains(&format!("<v{i}>"))), "old/{i}");
    }
    for (i, n) in acked.iter().enumerate() {
        let v = read_value(&client, &key(&format!("c/{i}"))).await.unwrap();
        let got: i64 = v.map_or(0, |v| v.to_string().parse().unwrap());
        assert!(got >= *n, "c/{i}: {got} < {n} acknowledged");
    }
}

/// Turning encryption on for a data dir with unencrypted values: they stay
/// readable, a background pass re-encrypts them at start (every value on
/// disk is then under the data key), and the values read after a restart
/// with the key. sled may still hold old plaintext pages in log segments it
/// has not reused: SECURITY.md says so, and this test does not claim more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_turning_encryption_on_reencrypts_the_old_values_in_the_background() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in 0..50 {
        client
            .write(vec![(
                key(&format!("p/{i}")),
                Op::LwwSet(Bytes(format!("<p{i}>").into_bytes())),
            )])
            .await
            .unwrap();
    }
    c.stop(0).unwrap();
    let k = key_file(&c, "kek");
    set_keys(&c, 0, Some(&k), &[]);
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.log_lines("background re-encryption done").is_empty() {
        assert!(Instant::now() < deadline, "no background re-encryption: {}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = c.log_lines("background re-encryption done").join("\n");
    assert!(done.contains("complete=true"), "{done}");
    let client = c.client(0).unwrap();
    client
        .write(vec![(key("new"), Op::LwwSet(Bytes(b"<new>".to_vec())))])
        .await
        .unwrap();
    c.stop(0).unwrap();
    {
        let db = sled::open(c.config(0).unwrap().data_dir).unwrap();
        let tree = db.open_tree("lattice").unwrap();
        for prefix in [&b"k"[..], b"c"] {
            for e in tree.scan_prefix(prefix) {
                let (k, v) = e.unwrap();
                assert!(
                    lattice_server::crypt::data_key_of(&v).is_some(),
                    "an unencrypted value left at {k:?}"
                );
            }
        }
    }
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for i in 0..50 {
        let v = read_value(&client, &key(&format!("p/{i}"))).await.unwrap();
        assert!(v.is_some_and(|v| v.to_string().contains(&format!("<p{i}>"))), "p/{i}");
    }
    let v = read_value(&client, &key("new")).await.unwrap();
    assert!(v.is_some_and(|v| v.to_string().contains("<new>")));
}
