//! The client SDK and the CLI against real `latticed` processes (issue #5).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Error};
use lattice_core::crdt::{Field, FieldKind, NestedView, Op, ValueView};
use lattice_core::proto::client::{OpId, RequestBody, Response};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::{serial, Cluster};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

async fn client(c: &Cluster, order: &[usize]) -> Client {
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    Client::builder()
        .endpoints(order.iter().map(|&i| c.defaults.endpoints[i].to_string()))
        .token(c.defaults.token.clone())
        .ca_cert(&ca)
        .timeout(Duration::from_secs(5))
        .read_wait(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Profile {
    name: String,
    age: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handle_type_end_to_end() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Concurrent multi-value writes in two regions are both kept. Made
    // concurrent for certain, not by timing: eu writes while us and ap are
    // down, then us writes while eu and ap are down.
    let (v_eu, v_us) = ("from eu".to_string(), "from us".to_string());
    c.stop(1).unwrap();
    c.stop(2).unwrap();
    client(&c, &[0])
        .await
        .mv_register::<String>("doc")
        .set(&v_eu)
        .await
        .unwrap();
    c.stop(0).unwrap();
    c.restart(1).unwrap();
    c.wait_serving(1, Duration::from_secs(30)).await.unwrap();
    client(&c, &[1])
        .await
        .mv_register::<String>("doc")
        .set(&v_us)
        .await
        .unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let eu = client(&c, &[0]).await;
    let us = client(&c, &[1]).await;
    eu.counter("visits").incr(5).await.unwrap();
    us.counter("visits").decr(2).await.unwrap();
    let alice = Profile {
        name: "alice".into(),
        age: 30,
    };
    eu.register::<Profile>("profile").set(&alice).await.unwrap();
    assert_eq!(
        eu.register::<Profile>("profile").get().await.unwrap(),
        Some(alice.clone())
    );
    eu.set::<u32>("primes").add(&2).await.unwrap();
    us.set::<u32>("primes").add(&3).await.unwrap();
    eu.set::<u32>("primes").add(&4).await.unwrap();
    eu.set::<u32>("primes").remove(&4).await.unwrap();
    eu.map("cart").incr("items", 3).await.unwrap();
    us.map("cart").add_to("skus", &"sku-1").await.unwrap();
    eu.batch()
        .incr("a", 1)
        .incr("b", 2)
        .set("c", &"three")
        .commit()
        .await
        .unwrap();
    eu.counter("gone").incr(1).await.unwrap();
    eu.delete("gone").await.unwrap();
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let ap = client(&c, &[2]).await;
    assert_eq!(ap.counter("visits").get().await.unwrap(), 3);
    assert_eq!(ap.register::<Profile>("profile").get().await.unwrap(), Some(alice));
    let mut docs = ap.mv_register::<String>("doc").get().await.unwrap();
    docs.sort();
    assert_eq!(docs, vec![v_eu, v_us], "both concurrent values are kept");
    let mut primes = ap.set::<u32>("primes").get().await.unwrap();
    primes.sort();
    assert_eq!(primes, vec![2, 3]);
    let cart = ap.map("cart").get().await.unwrap();
    assert_eq!(
        cart.get(&Field::new("items", FieldKind::Counter)),
        Some(&NestedView::Counter(3))
    );
    assert!(matches!(cart.get(&Field::new("skus", FieldKind::Set)), Some(NestedView::Set(s)) if s.len() == 1));
    assert_eq!(
        (
            ap.counter("a").get().await.unwrap(),
            ap.counter("b").get().await.unwrap()
        ),
        (1, 2)
    );
    assert_eq!(ap.register::<String>("c").get().await.unwrap(), Some("three".into()));
    assert_eq!(ap.counter("gone").get().await.unwrap(), 0);
    // A type mismatch is a typed error and changes nothing.
    assert!(matches!(
        ap.set::<u32>("visits").add(&1).await,
        Err(Error::TypeMismatch(_))
    ));
    assert_eq!(ap.counter("visits").get().await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_increment_counts_once_even_after_a_restart() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let cl = client(&c, &[0]).await;
    // The same request sent again, as after a response lost in transit.
    let body = RequestBody::Write {
        retry: false,
        op_id: OpId(42),
        ops: vec![(Key::new("hits").unwrap(), Op::CounterAdd(1))],
        concern: Default::default(),
        timeout_ms: 0,
    };
    let first = cl.request_to(0, body.clone()).await.unwrap();
    let again = cl.request_to(0, body.clone()).await.unwrap();
    assert!(matches!(first, Response::Written { duplicate: false, .. }), "{first:?}");
    assert!(matches!(again, Response::Written { duplicate: true, .. }), "{again:?}");
    c.kill(0).unwrap();
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let cl = client(&c, &[0]).await;
    let after_restart = cl.request_to(0, body).await.unwrap();
    assert!(
        matches!(after_restart, Response::Written { duplicate: true, .. }),
        "{after_restart:?}"
    );
    assert_eq!(cl.counter("hits").get().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_after_failover_to_a_lagging_region() {
    let _g = serial();
    // Anti-entropy every second, so that ap catches up from us in time.
    let mut c = Cluster::start_with(bin(), &["eu", "us", "ap"], Durability::Group, |_, cfg| {
        cfg.anti_entropy_ms = 1_000
    })
    .unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    // ap is down while the session writes at eu.
    c.kill(2).unwrap();
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let session = Client::builder()
        .endpoints([0, 2].map(|i| c.defaults.endpoints[i].to_string()))
        .token(c.defaults.token.clone())
        .ca_cert(&ca)
        .timeout(Duration::from_secs(3))
        .read_wait(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    for i in 0..20 {
        session.counter("balance").incr(1).await.unwrap();
        session.set::<u32>("items").add(&i).await.unwrap();
    }
    // us has them, so ap can catch up from us alone.
    let us = c.client(1).unwrap();
    let balance = Key::new("balance").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lattice_tests::read_value(&us, &balance).await.unwrap() != Some(ValueView::Counter(20)) {
        assert!(std::time::Instant::now() < deadline, "us never got the writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // eu fails and us is down: ap comes back lagging, with nobody to catch
    // up from.
    c.kill(0).unwrap();
    c.stop(1).unwrap();
    c.restart(2).unwrap();
    c.wait_serving(2, Duration::from_secs(30)).await.unwrap();
    let ap = c.client(2).unwrap();
    let stale = lattice_tests::read_value(&ap, &balance).await.unwrap();
    assert_ne!(stale, Some(ValueView::Counter(20)), "ap is not lagging");
    // The session does not read ap's stale state: it waits, then fails.
    match session.counter("balance").get().await {
        Err(Error::NotCaughtUp(_) | Error::Unavailable(_) | Error::Timeout(_)) => {}
        r => panic!("the session read ap's stale state {stale:?}: {r:?}"),
    }
    // us returns, ap catches up from it, and the session reads its writes
    // there.
    c.restart(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match session.counter("balance").get().await {
            Ok(n) => {
                assert_eq!(n, 20, "read-your-writes after failover");
                break;
            }
            Err(Error::NotCaughtUp(_) | Error::Unavailable(_) | Error::Timeout(_))
                if std::time::Instant::now() < deadline => {}
            Err(e) => panic!("ap never caught up: {e:?}\n{}", c.logs()),
        }
    }
    assert_eq!(session.set::<u32>("items").get().await.unwrap().len(), 20);
}

#[test]
fn the_cli_commands_and_json_output() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu", "us", "ap"], Durability::Group).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let cli = Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
    let config = c.dir.path().join("client.toml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(cli)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The load generator, a tiny run.
    let (ok, out, err) = run(&["bench", "--sessions", "2", "--secs", "1", "--keys", "10", "--op", "mix"]);
    assert!(
        ok && out.contains("ops_per_sec=") && out.contains("errors=0"),
        "{out}{err}"
    );
    assert_eq!(run(&["incr", "visits", "5"]).1, "ok");
    assert_eq!(run(&["incr", "visits", "-2"]).1, "ok");
    assert_eq!(run(&["get", "visits"]).1, "3");
    assert_eq!(run(&["set", "greeting", "hello"]).1, "ok");
    assert_eq!(run(&["get", "greeting"]).1, "hello");
    assert_eq!(run(&["sadd", "tags", "a", "b"]).1, "ok");
    assert_eq!(run(&["srem", "tags", "a"]).1, "ok");
    assert_eq!(run(&["get", "tags"]).1, "b");
    assert_eq!(run(&["del", "tags"]).1, "ok");
    assert_eq!(run(&["get", "tags"]).1, "(empty)");
    let (ok, json, _) = run(&["--json", "get", "visits"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (&v["key"], &v["type"], &v["value"]),
        (&"visits".into(), &"counter".into(), &3.into()),
        "{json}"
    );
    let (ok, status, _) = run(&["status"]);
    assert!(
        ok && status.contains("peer n2") && status.contains("region"),
        "{status}"
    );
    // Errors: plain message, non-zero exit.
    let (ok, _, err) = run(&["incr", "greeting", "1"]);
    assert!(!ok && err.contains("type mismatch"), "{err}");
    let (ok, _, err) = run(&["--token", "wrong", "get", "visits"]);
    assert!(!ok && err.contains("nauthorized"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_remote_writes_and_resumes_after_the_node_restarts_or_crashes() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let watcher = client(&c, &[0]).await;
    let writer = client(&c, &[1]).await;
    let mut feed = watcher.follow(0, "o/").await.unwrap();
    writer.counter("o/1").incr(1).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.key.as_str(), first.origin.0.as_str()), ("o/1", "us"));
    // The watched node restarts (gracefully) while a remote write happens.
    c.stop(0).unwrap();
    writer.counter("o/2").incr(1).await.unwrap();
    c.restart(0).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), feed.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next.key.as_str(),
        "o/2",
        "resumed after the restart without loss or repeat"
    );
    // After a crash (group durability) too: every change a watcher was told
    // of is in the change log, which the feed is rebuilt from.
    c.kill(0).unwrap();
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    writer.counter("o/3").incr(1).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), feed.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.key.as_str(), "o/3", "resumed after a crash without loss or repeat");
}

/// An `async` node's crash can lose flushes its watchers were told of: the
/// feed takes a new epoch and a resume fails loudly rather than skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_an_async_node_is_lost_after_a_crash() {
    let _g = serial();
    let mut c = Cluster::start(bin(), &["eu"], Durability::Async).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    let watcher = client(&c, &[0]).await;
    let mut feed = watcher.follow(0, "o/").await.unwrap();
    watcher.counter("o/1").incr(1).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap()
        .unwrap();
    c.kill(0).unwrap();
    c.restart(0).unwrap();
    c.wait_ready(Duration::from_secs(30)).await.unwrap();
    client(&c, &[0]).await.counter("o/2").incr(1).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), feed.next())
        .await
        .unwrap()
    {
        Err(Error::WatchLost(_)) => {}
        r => panic!("expected WatchLost after an async crash, got {r:?}"),
    }
}

/// A node whose certificate serial is revoked gets no client's token: the
/// SDK (and the CLI, by flag or defaults file) refuses it in the handshake,
/// after the CA and name checks, with an error naming revocation. An empty
/// or non-matching list changes nothing, and the CA and name checks still
/// apply when a list is set.
#[test]
fn a_node_whose_serial_is_revoked_is_refused_by_the_sdk_and_the_cli() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.wait_ready(Duration::from_secs(30))).unwrap();
    let pem = std::fs::read_to_string(c.config(0).unwrap().cert).unwrap();
    let der = lattice_server::certs::certs_from_pem(&pem).unwrap().remove(0);
    let serial = lattice_server::certs::info_of(&der).unwrap().serial;
    // As `certs show` prints it or in capitals with colons: the same serial.
    let spelled: String = serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let status = |endpoint: lattice_client::Endpoint, revoked: Vec<String>| {
        let ca = ca.clone();
        let token = c.defaults.token.clone();
        rt.block_on(async move {
            let client = Client::new(vec![endpoint], token, &ca)?
                .with_revoked_serials(&revoked)?
                .with_timeout(Duration::from_secs(5));
            client.request(RequestBody::Status).await
        })
    };
    assert!(matches!(status(c.endpoint(0), vec![]), Ok(Response::Status(_))));
    assert!(matches!(
        status(c.endpoint(0), vec!["0102".into()]),
        Ok(Response::Status(_))
    ));
    for listed in [serial.clone(), spelled] {
        match status(c.endpoint(0), vec!["0102".into(), listed]) {
            Err(Error::Unreachable(m)) => assert!(m.contains("revoked") && m.contains(&serial), "{m}"),
            r => panic!("a revoked node was not refused: {r:?}"),
        }
    }
    // With a list, the name check still holds.
    let wrong = lattice_client::Endpoint::named("n9", c.defaults.endpoints[0]);
    match status(wrong, vec!["0102".into()]) {
        Err(Error::Unreachable(m)) => assert!(!m.contains("revoked"), "{m}"),
        r => panic!("a node under another name was not refused: {r:?}"),
    }
    assert!(matches!(
        Client::new(vec![c.endpoint(0)], "t", &ca).and_then(|c| c.with_revoked_serials(&["xyz"])),
        Err(Error::Config(_))
    ));
    // The CLI: by flag, and from the defaults file.
    let cli = Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
    let config = c.dir.path().join("client.toml");
    let run = |config: &Path, args: &[&str]| {
        let out = std::process::Command::new(cli)
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    assert!(run(&config, &["get", "k"]).0);
    let (ok, err) = run(&config, &["--revoked-serial", &serial, "get", "k"]);
    assert!(!ok && err.contains("revoked"), "{err}");
    let revoking = c.dir.path().join("client-revoking.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&revoking, format!("{text}\nrevoked_serials = [\"{serial}\"]\n")).unwrap();
    let (ok, err) = run(&revoking, &["get", "k"]);
    assert!(!ok && err.contains("revoked"), "{err}");
}
