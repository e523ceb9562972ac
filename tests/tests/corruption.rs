//! A node whose data dir holds a corrupt record refuses to start, naming the
//! key and telling the operator what to do (issue 13).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A std mutex held across awaits only serializes the tests (one cluster at a
// time on 2 cores), which is the intent.
#![allow(clippy::await_holding_lock)]

use lattice_core::crdt::{Bytes, Op};
use lattice_core::proto::client::RequestBody;
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::{serial, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Flips one bit of the body of `key`'s record through sled's own API, so
/// sled's log CRC covers the flipped bytes and only Lattice's record check
/// can see the change (a flip inside sled's log would be caught by sled
/// first, as a corrupt log, not by this check).
fn flip_stored_value(data_dir: &Path, key: &str) {
    let db = sled::open(data_dir).unwrap();
    let tree = db.open_tree("lattice").unwrap();
    let (k, v) = tree
        .scan_prefix(b"k")
        .map(|r| r.unwrap())
        .find(|(k, _)| k.ends_with(key.as_bytes()))
        .expect("the key's record");
    let mut v = v.to_vec();
    let last = v.len() - 1;
    v[last] ^= 0x04;
    tree.insert(k, v).unwrap();
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_with_a_corrupt_record_is_refused_at_start() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Sync).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let client = c.client(0).unwrap();
    for (k, v) in [("greeting", "hello"), ("motto", "carpe diem")] {
        client
            .request(RequestBody::Write {
                retry: false,
                op_id: lattice_client::Client::new_op_id(),
                ops: vec![(Key::new(k).unwrap(), Op::LwwSet(Bytes::from(v)))],
                concern: Default::default(),
                timeout_ms: 0,
            })
            .await
            .unwrap();
    }
    c.stop(0).unwrap();
    let config = c.config(0).unwrap();
    flip_stored_value(&config.data_dir, "motto");

    let out = std::process::Command::new(bin())
        .arg("run")
        .arg("--config")
        .arg(&c.configs[0])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = out.id();
    let waiter = std::thread::spawn(move || out.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("latticed (pid {pid}) started on a corrupt data dir");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refusing to start"), "{err}");
    assert!(err.contains("\"motto\""), "the message names the key: {err}");
    assert!(
        err.contains(&config.data_dir.display().to_string()),
        "the message names the data dir: {err}"
    );
    assert!(err.contains("new replica id") && err.contains("restore"), "{err}");
}
