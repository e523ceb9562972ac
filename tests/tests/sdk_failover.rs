//! The SDK's retry and failover loop (`client/src/lib.rs`) against real
//! nodes that freeze (SIGSTOP: the socket stays, nothing is answered) or
//! die (SIGKILL), and write concerns that cannot be met in time. The README
//! promises: a write that may have reached a node is never sent to another
//! node (it could apply twice) and is applied once when that node comes
//! back; a read moves on to the next node, and a node that failed waits out
//! a backoff before it is tried first again; a node that cannot be reached
//! at all is skipped by writes too; a concern not met in time fails with a
//! replication timeout while the write stays durable where it was made.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Error};
use lattice_core::crdt::{Op, ValueView};
use lattice_core::proto::client::WriteConcern;
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::{key, read_value, runtime, serial, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// A client of every node, in `order` (the first is its home node), each
/// call allowed `timeout`.
async fn client(c: &Cluster, order: &[usize], timeout: Duration) -> Client {
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    Client::builder()
        .endpoints(order.iter().map(|&i| c.defaults.endpoints[i].to_string()))
        .token(c.defaults.token.clone())
        .ca_cert(&ca)
        .timeout(timeout)
        .read_wait(Duration::from_millis(500))
        .connect()
        .await
        .unwrap()
}

/// The counter at `k` on node `i`, as that node alone answers.
async fn counter_on(c: &Cluster, i: usize, k: &Key) -> Option<i128> {
    match read_value(&c.client(i).unwrap(), k).await.unwrap() {
        Some(ValueView::Counter(n)) => Some(n),
        None => None,
        other => panic!("{k} holds {other:?}"),
    }
}

/// Polls until node `i` holds `want` at `k`, for up to 20 s.
async fn wait_counter(c: &Cluster, i: usize, k: &Key, want: i128) {
    let started = Instant::now();
    loop {
        let got = counter_on(c, i, k).await;
        if got == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "node {i} holds {got:?} at {k}, want {want}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The home node freezes after the client connected. The write reaches its
/// socket and gets no answer: the client retries it there (same op id) and
/// then gives up with a timeout, without sending it to the other node,
/// which never sees it from the client. Thawed, the home node applies the
/// three attempts at most once (the timeout said "may have been applied":
/// a thawed node whose connection timed out while it was frozen drops the
/// requests with it), and both nodes agree.
#[test]
fn a_write_to_a_frozen_node_is_not_sent_elsewhere_and_lands_once() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let client = client(&c, &[0, 1], Duration::from_millis(800)).await;
        let k = key("visits");
        client.write(vec![(k.clone(), Op::CounterAdd(1))]).await.unwrap();
        wait_counter(&c, 1, &k, 1).await;
        c.pause(0).unwrap();
        let started = Instant::now();
        let r = client.write(vec![(k.clone(), Op::CounterAdd(10))]).await;
        let took = started.elapsed();
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        // Three attempts of 0.8 s with 50 and 100 ms between them: the
        // client waited on the home node, it did not move on at once.
        assert!(took >= Duration::from_millis(2_400), "gave up after {took:?}");
        // The other node never got it from the client (nor from the frozen
        // home node).
        assert_eq!(counter_on(&c, 1, &k).await, Some(1));
        c.resume(0).unwrap();
        // Applied once or not at all, the same on both nodes, once the
        // thawed node has answered a request (so it has read its socket).
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        c.wait_converged(Duration::from_secs(20)).await.unwrap();
        let (a, b) = (counter_on(&c, 0, &k).await, counter_on(&c, 1, &k).await);
        eprintln!("after the thaw: {a:?} and {b:?}");
        assert_eq!(a, b);
        assert!(matches!(a, Some(1 | 11)), "the write was applied more than once: {a:?}");
    });
}

/// A frozen home node: a read waits out its timeout there, then is
/// answered by the other node; the next read skips the home node (it is in
/// its backoff) and is answered at once.
#[test]
fn a_read_fails_over_from_a_frozen_node_and_the_backoff_skips_it() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let timeout = Duration::from_millis(800);
        let client = client(&c, &[0, 1], timeout).await;
        let k = key("visits");
        client.write(vec![(k.clone(), Op::CounterAdd(3))]).await.unwrap();
        wait_counter(&c, 1, &k, 3).await;
        // Both connections open, so the second read needs no handshake.
        assert_eq!(counter_on(&c, 1, &k).await, Some(3));
        c.pause(0).unwrap();
        let started = Instant::now();
        let v = client.read(&k).await.unwrap();
        let first = started.elapsed();
        assert_eq!(v, Some(ValueView::Counter(3)));
        assert!(
            first >= timeout,
            "the first read did not wait for the home node: {first:?}"
        );
        let started = Instant::now();
        let v = client.read(&k).await.unwrap();
        let second = started.elapsed();
        assert_eq!(v, Some(ValueView::Counter(3)));
        assert!(
            second < timeout / 2,
            "the second read tried the frozen node again: {second:?}"
        );
        c.resume(0).unwrap();
    });
}

/// A home node that is gone (killed before the client connected) cannot
/// have received anything: the write goes to the next node at once.
#[test]
fn a_write_moves_on_when_its_node_cannot_be_reached() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        c.kill(0).unwrap();
        let client = client(&c, &[0, 1], Duration::from_secs(2)).await;
        let k = key("visits");
        let started = Instant::now();
        client.write(vec![(k.clone(), Op::CounterAdd(4))]).await.unwrap();
        eprintln!("the write moved on after {:?}", started.elapsed());
        assert_eq!(counter_on(&c, 1, &k).await, Some(4));
        // A read too, from the same client, with its session's token.
        assert_eq!(client.read(&k).await.unwrap(), Some(ValueView::Counter(4)));
    });
}

/// `all` while a region is frozen: the write fails with a replication
/// timeout after the wait asked for, or the node's default
/// (`write_concern_timeout_ms`) when none is; it stays durable where it
/// was made, and reaches the frozen region once it thaws. With every region
/// up, `all` succeeds. The CLI's `--concern` does the same.
#[test]
fn concern_all_times_out_while_a_region_is_frozen_and_the_write_stays() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
            cfg.write_concern_timeout_ms = 700;
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let client = client(&c, &[0], Duration::from_secs(5)).await;
        let k = key("orders");
        client
            .write_with(vec![(k.clone(), Op::CounterAdd(1))], WriteConcern::All, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(counter_on(&c, 1, &k).await, Some(1), "`all` returned before us had it");
        c.pause(1).unwrap();
        // The wait asked for.
        let started = Instant::now();
        let r = client
            .write_with(
                vec![(k.clone(), Op::CounterAdd(1))],
                WriteConcern::All,
                Duration::from_millis(300),
            )
            .await;
        let took = started.elapsed();
        assert!(
            matches!(&r, Err(Error::ReplicationTimeout(m)) if m.contains("300")),
            "{r:?}"
        );
        assert!(took >= Duration::from_millis(295), "{took:?}");
        // The node's default.
        let started = Instant::now();
        let r = client
            .write_with(vec![(k.clone(), Op::CounterAdd(1))], WriteConcern::All, Duration::ZERO)
            .await;
        let took = started.elapsed();
        assert!(
            matches!(&r, Err(Error::ReplicationTimeout(m)) if m.contains("700")),
            "{r:?}"
        );
        // The node's timers count whole milliseconds.
        assert!(took >= Duration::from_millis(695), "{took:?}");
        // Durable where it was made, not rolled back.
        assert_eq!(counter_on(&c, 0, &k).await, Some(3));
        // The CLI, with the concern and its wait as flags.
        let cli = Path::new(env!("CARGO_BIN_EXE_lattice-test-cli"));
        let config = c.dir.path().join("client.toml");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(cli)
                .arg("--config")
                .arg(&config)
                .args(args)
                .output()
                .unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
        };
        let (ok, err) = run(&["--concern", "all", "--concern-timeout-ms", "400", "incr", "orders", "1"]);
        assert!(!ok && err.contains("400"), "the CLI's `all` while us is frozen: {err}");
        c.resume(1).unwrap();
        wait_counter(&c, 1, &k, 4).await;
        let (ok, err) = run(&["--concern", "all", "incr", "orders", "1"]);
        assert!(ok, "the CLI's `all` with every region up: {err}");
        assert_eq!(counter_on(&c, 1, &k).await, Some(5), "`all` returned before us had it");
    });
}
