//! Hostile clients with a valid token against a real `latticed` (issue 14):
//! watchers that never read, subscribe/reset loops, impossible and many
//! waiting reads, oversized values. After each, a normal read on a fresh
//! connection must be answered within 1 s and the node's RSS must stay
//! under the bound the test states. Each test runs in a few seconds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Error};
use lattice_core::clock::{HlcTimestamp, ReplicaId};
use lattice_core::crdt::Op;
use lattice_core::proto::client::{CausalToken, ErrorKind, RequestBody, Response, WriteConcern};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::{key, read_value, runtime, serial, Cluster};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The node binary: this build's, or `LATTICE_HOSTILE_BIN` (to measure
/// another build, e.g. an older one, under the same attacks).
fn bin() -> std::path::PathBuf {
    std::env::var_os("LATTICE_HOSTILE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_latticed-test")).to_path_buf())
}

async fn one_node() -> Cluster {
    let c = Cluster::start(&bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(20)).await.unwrap();
    c
}

/// A normal read on a fresh connection to node 0 is answered within 1 s.
async fn assert_responsive(c: &Cluster, what: &str) {
    assert_responsive_on(c, 0, what).await;
}

/// A normal read on a fresh connection to node `i` is answered within 1 s.
async fn assert_responsive_on(c: &Cluster, i: usize, what: &str) {
    let client = c.client(i).unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(1), read_value(&client, &Key::new("probe").unwrap())).await;
    assert!(
        matches!(r, Ok(Ok(_))),
        "after {what}: a normal read was not answered within 1 s ({:?}): {r:?}\n{}",
        started.elapsed(),
        c.logs()
    );
}

/// Node 0's RSS grew by less than `bound_mib` since `base_kib`.
fn assert_rss(c: &Cluster, base_kib: u64, bound_mib: u64, what: &str) -> u64 {
    assert_rss_on(c, 0, base_kib, bound_mib, what)
}

/// Node `i`'s RSS grew by less than `bound_mib` since `base_kib`.
fn assert_rss_on(c: &Cluster, i: usize, base_kib: u64, bound_mib: u64, what: &str) -> u64 {
    let now = c.rss_kib(i).unwrap();
    let grown = now.saturating_sub(base_kib) / 1024;
    eprintln!("{what}: RSS {} MiB (+{grown} MiB, bound +{bound_mib} MiB)", now / 1024);
    assert!(
        grown < bound_mib,
        "after {what}: RSS grew by {grown} MiB, bound {bound_mib} MiB"
    );
    now
}

async fn write(client: &Client, key: &str, bytes: usize, fill: u8) -> Result<Response, Error> {
    client
        .request(RequestBody::Write {
            op_id: Client::new_op_id(),
            retry: false,
            ops: vec![(Key::new(key).unwrap(), Op::LwwSet(vec![fill; bytes].into()))],
            concern: WriteConcern::Local,
            timeout_ms: 0,
        })
        .await
}

/// A token no state will include within a short wait: a stamp `ahead_ms`
/// past now.
fn token_at(wall_ms: u64) -> CausalToken {
    CausalToken {
        stamp: Some((HlcTimestamp { wall_ms, logical: 0 }, ReplicaId(7))),
        ..CausalToken::default()
    }
}

fn wall_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// 20 watchers of every key that never read, then 60 changes of 512 KiB
/// values. Before, each watcher queued every whole value (20 × 30 MiB)
/// and the feed kept them all again; now the feed and the queues hold keys
/// and tokens, and a stream holds at most one batch of values that QUIC
/// flow control keeps from leaving.
#[test]
fn hostile_watchers_that_never_read() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let base = c.rss_kib(0).unwrap();
        let watchers_conn = c.client(0).unwrap();
        let mut watches = Vec::new();
        for _ in 0..20 {
            watches.push(watchers_conn.watch(0, "", None).await.unwrap());
        }
        let writer = c.client(0).unwrap();
        for i in 0..60 {
            write(&writer, &format!("big/{i}"), 512 << 10, i as u8).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_responsive(&c, "never-reading watchers").await;
        assert_rss(&c, base, 200, "20 never-reading watchers and 60 × 512 KiB changes");
        // A watcher that reads still sees every change, with the value.
        let mut w = watches.pop().unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.key.as_str(), "big/0");
        assert!(first.value.is_some());
    });
}

/// Waits (up to 3 s) until node 0 reports `n` watchers.
async fn wait_watchers(c: &Cluster, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = c.metric(0, "lattice_watchers").unwrap();
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{now} watchers, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watch with a prefix that never matches and reset the stream, over and
/// over on one connection: 10 rounds of 64 (the per-connection cap), each
/// confirmed subscribed, then reset. Before, every one stayed subscribed
/// until a matching change failed to send (memory and the per-change scan
/// grew without bound); now each is dropped once its stream resets.
#[test]
fn hostile_subscribe_reset_loop() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let base = c.rss_kib(0).unwrap();
        let client = c.client(0).unwrap();
        let started = Instant::now();
        for _ in 0..10 {
            let mut round = Vec::new();
            for _ in 0..64 {
                round.push(client.watch(0, "never/matches/", None).await.unwrap());
            }
            wait_watchers(&c, 64.0).await;
            drop(round);
            wait_watchers(&c, 0.0).await;
        }
        eprintln!("640 subscribe/reset cycles in {:?}", started.elapsed());
        // Live watchers are capped per connection, with a clear error.
        let mut live = Vec::new();
        for _ in 0..64 {
            live.push(client.watch(0, "", None).await.unwrap());
        }
        wait_watchers(&c, 64.0).await;
        let mut extra = client.watch(0, "", None).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(2), extra.next())
            .await
            .unwrap()
        {
            Err(Error::Overloaded(m)) => assert!(m.contains("watch_max_per_connection"), "{m}"),
            r => panic!("expected Overloaded for the 65th watcher, got {r:?}"),
        }
        // And prefixes are capped at the longest key.
        let mut long = client.watch(0, &"p".repeat(2_000), None).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(2), long.next()).await.unwrap() {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("prefix"), "{m}"),
            r => panic!("expected InvalidRequest for a 2,000-byte prefix, got {r:?}"),
        }
        assert_responsive(&c, "subscribe/reset loops").await;
        assert_rss(&c, base, 50, "640 subscribe/reset cycles and 64 live watchers");
    });
}

/// A token with `wall_ms` = u64::MAX can never be met. Before, the read
/// held its slot for its whole wait (up to 30 s); now it is refused at once.
#[test]
fn hostile_impossible_waits() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let client = c.client(0).unwrap();
        let started = Instant::now();
        for _ in 0..50 {
            let r = client
                .request(RequestBody::Read {
                    key: Key::new("k").unwrap(),
                    after: Some(token_at(u64::MAX)),
                    wait_ms: 30_000,
                })
                .await;
            match r {
                Err(Error::InvalidRequest(m)) => assert!(m.contains("future"), "{m}"),
                r => panic!("expected a refusal, got {r:?}"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "50 impossible waits took {:?}",
            started.elapsed()
        );
        assert_responsive(&c, "impossible waits").await;
    });
}

/// 300 reads on one connection wait for a token 10 s in the future (within
/// the allowed skew, so accepted). Before, all of them waited, each re-read
/// on every engine turn; now 128 wait (the per-connection cap) and the rest
/// are refused `Overloaded` at once, and the node stays responsive.
#[test]
fn hostile_many_waiting_reads() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let base = c.rss_kib(0).unwrap();
        let client = Arc::new(c.client(0).unwrap());
        let token = token_at(wall_now_ms() + 10_000);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..300 {
            let (client, token) = (client.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                client
                    .request(RequestBody::Read {
                        key: Key::new(format!("w/{}", i % 10)).unwrap(),
                        after: Some(token),
                        wait_ms: 2_000,
                    })
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_responsive(&c, "300 waiting reads").await;
        assert!(c.metric(0, "lattice_waiting_reads").unwrap() <= 128.0);
        let (mut overloaded, mut not_caught_up) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(Response::Error(e)) if e.kind == ErrorKind::Overloaded => overloaded += 1,
                Ok(Response::Error(e)) if e.kind == ErrorKind::NotCaughtUp => not_caught_up += 1,
                Err(Error::Overloaded(_)) => overloaded += 1,
                Err(Error::NotCaughtUp(_)) => not_caught_up += 1,
                r => panic!("unexpected answer {r:?}"),
            }
        }
        eprintln!(
            "300 waiting reads: {not_caught_up} waited, {overloaded} refused, in {:?}",
            started.elapsed()
        );
        assert_eq!(not_caught_up, 128, "the per-connection cap");
        assert_eq!(overloaded, 172);
        assert_rss(&c, base, 50, "300 waiting reads");
    });
}

/// Requests over the request frame are refused before they are read, a
/// value grown past the value limit is refused before it is stored, and 60
/// writes of 900 KiB values (near the largest request) to distinct keys
/// keep the node within a stated bound: before, the feed kept each whole
/// value in memory and in sled as well as the store.
#[test]
fn hostile_oversized_values() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let base = c.rss_kib(0).unwrap();
        let client = c.client(0).unwrap();
        match write(&client, "too/big", 1_100_000, 1).await {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("over the limit"), "{m}"),
            r => panic!("expected a refusal of a 1,100,000-byte request, got {r:?}"),
        }
        // A set grown by requests that each fit, up to the value limit.
        let mut refused = None;
        for i in 0..8 {
            let elements = (0..900).map(|j| format!("{i}-{j:03}-{}", "z".repeat(1_000)).as_str().into());
            let r = client
                .request(RequestBody::Write {
                    op_id: Client::new_op_id(),
                    retry: false,
                    ops: vec![(Key::new("too/big/set").unwrap(), Op::SetAdd(elements.collect()))],
                    concern: WriteConcern::Local,
                    timeout_ms: 0,
                })
                .await;
            match r {
                Ok(Response::Written { .. }) => {}
                Err(Error::InvalidRequest(m)) => {
                    refused = Some((i, m));
                    break;
                }
                r => panic!("set add {i}: {r:?}"),
            }
        }
        let (i, m) = refused.expect("a set grown past the value limit is refused");
        assert!(i >= 4, "four adds of ~0.9 MB fit under the limit of 4 MiB");
        assert!(m.contains("\"too/big/set\"") && m.contains("limit"), "{m}");
        // What was accepted (about 4 MB) reads back in one answer.
        match client.read(&Key::new("too/big/set").unwrap()).await.unwrap() {
            Some(lattice_core::crdt::ValueView::Set(s)) => assert_eq!(s.len(), 900 * i),
            v => panic!("{v:?}"),
        }
        let started = Instant::now();
        for i in 0..60 {
            match write(&client, &format!("large/{i}"), 900 << 10, i as u8).await.unwrap() {
                Response::Written { .. } => {}
                r => panic!("write {i}: {r:?}"),
            }
        }
        eprintln!("60 × 900 KiB writes in {:?}", started.elapsed());
        assert_responsive(&c, "oversized values").await;
        // The store itself holds ~53 MiB of values, in sled's cache and log
        // buffers as well (measured +186 MiB; before, the feed's ring and its
        // sled tree held every value again).
        assert_rss(&c, base, 280, "60 × 900 KiB values");
        assert!(c.metric(0, "lattice_feed_retained_bytes").unwrap() < 64.0 * 1024.0);
    });
}

/// Clients flood a node with 256 KiB writes (144 at a time, on three
/// connections) while its peer replicates small writes to it, with
/// `engine_queue = 16` so the flood fills the queue. Before, peers and
/// clients shared one queue and the flood made the node drop peer frames;
/// now each class has its own budget and the engine takes them in turn:
/// clients get `Overloaded`, no peer frame is dropped, and the small writes
/// arrive.
#[test]
fn hostile_client_flood_does_not_starve_peers() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(&bin(), &["eu", "us"], Durability::Group, |_, cfg| cfg.engine_queue = 16).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let base = c.rss_kib(1).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, overloaded) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let client = Arc::new(c.client(1).unwrap());
            for t in 0..48 {
                let (client, stop, ok, overloaded) = (client.clone(), stop.clone(), ok.clone(), overloaded.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        match write(&client, &format!("flood/{t}/{}", i % 4), 256 << 10, i as u8).await {
                            Ok(Response::Written { .. }) => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(Response::Error(e)) if e.kind == ErrorKind::Overloaded => {
                                overloaded.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(Error::Overloaded(_)) => overloaded.fetch_add(1, Ordering::Relaxed),
                            r => panic!("flood write: {r:?}"),
                        };
                        i += 1;
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let writer = c.client(0).unwrap();
        let started = Instant::now();
        for i in 0..50 {
            write(&writer, &format!("peer/{i}"), 16, 1).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reader = c.client(1).unwrap();
        let last = Key::new("peer/49").unwrap();
        while read_value(&reader, &last).await.ok().flatten().is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "peer writes did not arrive\n{}", c.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let arrived = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        // During the flood other clients share the full client budget
        // (Overloaded is the defined answer); after it, reads are served.
        assert_responsive_on(&c, 1, "a client flood").await;
        let dropped = c.metric(1, "lattice_peer_frames_dropped_total").unwrap();
        let (ok, overloaded) = (ok.load(Ordering::Relaxed), overloaded.load(Ordering::Relaxed));
        eprintln!("flood: {ok} writes taken, {overloaded} Overloaded; peer writes arrived in {arrived:?}; {dropped} peer frames dropped");
        assert!(overloaded > 0, "the flood never filled the client budget: the test proves nothing");
        assert_eq!(dropped, 0.0, "peer frames dropped under a client flood");
        // Measured +171 MiB: the writes taken (55 MiB) in sled, the client
        // budget (32 MiB) and three connections' QUIC receive windows.
        assert_rss_on(&c, 1, base, 300, "a client flood of 256 KiB writes");
    });
}

/// The peak resident memory (`VmHWM`) of node `i`, in KiB.
fn peak_kib(c: &Cluster, i: usize) -> u64 {
    let pid = c.pid(i).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A policy set whose audit entry is near the largest a node writes
/// (64 KiB of keyspace strings of control characters, 6 bytes each in JSON).
fn large_policy_set(version: u64) -> lattice_core::policy::PolicySet {
    use lattice_core::policy::{Policy, PolicySet, Priority, Regions, MAX_POLICY_SET_BYTES};
    let n = (MAX_POLICY_SET_BYTES - 1_000) / (900 + 32);
    let policies = (0..n)
        .map(|i| Policy::new(format!("{i:\u{1}>900}"), Regions::All, Priority::Normal))
        .collect();
    PolicySet::new(version, policies).unwrap()
}

/// A data directory whose `audit.log` is past the 64 MiB read limit (what
/// a node that never archived, or whose archiving failed, leaves; written
/// here by the node's own append code). Before, such a node refused to
/// start ("larger than 67108864 bytes"); now it streams the part, starts
/// with its peak memory far below the part's size, archives it, and the
/// archive still chains. An edit in the middle of the part still keeps the
/// node from starting.
#[test]
fn hostile_audit_log_past_the_read_limit_at_start() {
    use lattice_server::audit::{archived_parts, AuditLog, MAX_AUDIT_BYTES};
    let _g = serial();
    runtime().block_on(async {
        let mut c = one_node().await;
        c.stop(0).unwrap();
        let cfg = c.config(0).unwrap();
        let path = cfg.data_dir.join("audit.log");
        {
            let store = lattice_server::storage::SledStore::open(&cfg.data_dir, &cfg.node, Durability::Group).unwrap();
            let head = store.audit_tree().unwrap();
            let mut log = AuditLog::open(&cfg.data_dir, Some(head), None)
                .unwrap()
                .with_checkpoint(u64::MAX);
            let mut v = 0;
            while std::fs::metadata(&path).map_or(0, |m| m.len()) <= MAX_AUDIT_BYTES + (1 << 20) {
                v += 1;
                log.append(&cfg.node, "admin", large_policy_set(v), None).unwrap();
            }
        }
        let size = std::fs::metadata(&path).unwrap().len();
        // A keyspace's \u0001 becomes \u0002: still JSON, no longer the entry hashed.
        let edit = |chunk: &mut [u8]| {
            let at = chunk.windows(6).position(|w| w == b"\\u0001").unwrap() + 5;
            chunk[at] = b'2';
        };
        // One byte changed in the middle: the node must not start.
        let original = {
            use std::io::{Read, Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut chunk = vec![0; 4096];
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.read_exact(&mut chunk).unwrap();
            let original = chunk.clone();
            edit(&mut chunk);
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.write_all(&chunk).unwrap();
            original
        };
        c.restart(0).unwrap();
        assert!(
            c.wait_ready(Duration::from_secs(5)).await.is_err(),
            "a tampered log must keep the node closed"
        );
        assert!(c.logs().contains("does not verify"), "{}", c.logs());
        c.kill(0).unwrap();
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            f.write_all(&original).unwrap();
        }
        let started = Instant::now();
        c.restart(0).unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let peak = peak_kib(&c, 0) / 1024;
        eprintln!(
            "audit.log of {} MiB at start: ready in {:?}, peak RSS {peak} MiB",
            size >> 20,
            started.elapsed()
        );
        assert!(
            peak < 48,
            "the node's peak RSS was {peak} MiB for a {} MiB log",
            size >> 20
        );
        assert_responsive(&c, "an oversized audit log at start").await;
        assert_eq!(archived_parts(&cfg.data_dir).unwrap().len(), 1, "archived at start");
        // What the node serves verifies from the archived base.
        let served = match c.client(0).unwrap().request(RequestBody::Audit).await.unwrap() {
            Response::Audit(entries) => entries,
            r => panic!("{r:?}"),
        };
        assert!(lattice_core::policy::audit::verify_served(&served, None).unwrap() > 0);
        // And the whole directory verifies as one chain, streamed.
        c.stop(0).unwrap();
        let verify = |what: &str| {
            let out = std::process::Command::new(bin())
                .args(["audit", "verify", "--data-dir"])
                .arg(&cfg.data_dir)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .to_string();
            eprintln!(
                "latticed audit verify ({what}): {said} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            out.status.success()
        };
        assert!(verify("as left"));
        let archive = archived_parts(&cfg.data_dir).unwrap().remove(0);
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&archive).unwrap();
            f.seek(SeekFrom::Start(size / 2)).unwrap();
            let mut tampered = original.clone();
            edit(&mut tampered);
            f.write_all(&tampered).unwrap();
        }
        assert!(!verify("an archived entry edited"));
    });
}

/// A client fills the node's waiting-read capacity (128 here) with reads
/// for a token 20 s ahead, then goes away: its reads are dropped at once
/// (the stream tasks see the streams stopped, the engine prunes replies
/// nobody waits for), so the gauge falls to 0 within a second and a new
/// client can use the whole capacity. Before, the departed client's reads
/// held every slot until their deadline and the new client got
/// `Overloaded`.
#[test]
fn hostile_waiting_reads_of_a_client_that_left() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(&bin(), &["eu"], Durability::Group, |_, cfg| {
            cfg.memory.max_waiting_reads = 128;
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let reads = |client: Arc<Client>, wait_ms: u64| {
            let token = token_at(wall_now_ms() + 20_000);
            (0..128)
                .map(|i| {
                    let (client, token) = (client.clone(), token.clone());
                    tokio::spawn(async move {
                        client
                            .request(RequestBody::Read {
                                key: Key::new(format!("w/{}", i % 10)).unwrap(),
                                after: Some(token),
                                wait_ms,
                            })
                            .await
                    })
                })
                .collect::<Vec<_>>()
        };
        let gauge_reaches = |want: f64, within: Duration| gauge_reaches(&c, "lattice_waiting_reads", want, within);
        let leaving = Arc::new(c.client(0).unwrap());
        let tasks = reads(leaving.clone(), 20_000);
        assert!(
            gauge_reaches(128.0, Duration::from_secs(5)).await.is_some(),
            "the reads wait"
        );
        tasks.iter().for_each(|t| t.abort());
        drop((tasks, leaving));
        let freed = gauge_reaches(0.0, Duration::from_secs(1)).await;
        eprintln!("128 waiting reads of a client that left: dropped in {freed:?}");
        assert!(
            freed.is_some(),
            "the reads of a client that left are dropped within 1 s"
        );
        // A new client has the whole capacity: every read waits its 1 s.
        let (mut waited, mut refused) = (0, 0);
        for t in reads(Arc::new(c.client(0).unwrap()), 1_000) {
            match t.await.unwrap() {
                Ok(Response::Error(e)) if e.kind == ErrorKind::NotCaughtUp => waited += 1,
                Err(Error::NotCaughtUp(_)) => waited += 1,
                Ok(Response::Error(e)) if e.kind == ErrorKind::Overloaded => refused += 1,
                Err(Error::Overloaded(_)) => refused += 1,
                r => panic!("unexpected answer {r:?}"),
            }
        }
        assert_eq!((waited, refused), (128, 0));
        assert_responsive(&c, "a departed client's waiting reads").await;
    });
}

/// sled writes a value above ~128 KiB to its own file `blobs/<lsn>` and
/// never syncs it; the store fsyncs those files and the `blobs` directory
/// before the log. Watched at the system-call level on a real node (strace
/// attached to every thread): every blob file of an acknowledged 200 KiB
/// write was fsynced, so was the directory, and both before the log's
/// `fdatasync` that made the write durable. Unlike the unit test's counter,
/// this fails if the `fsync` itself is removed. Skipped (with a message)
/// where strace is missing or ptrace is not allowed.
#[test]
fn blob_files_are_fsynced_before_the_log_on_a_real_node() {
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let data_dir = c.config(0).unwrap().data_dir;
        let trace = c.dir.path().join("fsyncs.trace");
        let pid = c.pid(0).unwrap().to_string();
        let strace = std::process::Command::new("strace")
            .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&trace)
            .args(["-p", &pid])
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut strace) = strace else {
            eprintln!("skipped: no strace");
            return;
        };
        // strace attaches to every thread within this second.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        if let Ok(Some(status)) = strace.try_wait() {
            eprintln!("skipped: strace could not attach ({status})");
            return;
        }
        let client = c.client(0).unwrap();
        for i in 0..3 {
            match write(&client, &format!("blob/{i}"), 200 << 10, i as u8).await.unwrap() {
                Response::Written { .. } => {}
                r => panic!("write {i}: {r:?}"),
            }
        }
        // The blob files as the writes were acknowledged (a consolidation
        // sled starts later is synced by the next flush, not this one).
        let blobs_dir = data_dir.join("blobs");
        let blobs: Vec<String> = std::fs::read_dir(&blobs_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(strace.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        strace.wait().unwrap();
        let text = std::fs::read_to_string(&trace).unwrap();
        assert!(!blobs.is_empty(), "sled put the 200 KiB values in blob files");
        let lines: Vec<&str> = text.lines().collect();
        let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
        let log_sync = |from: usize| {
            lines[from..]
                .iter()
                .position(|l| l.contains("fdatasync(") && l.contains(&format!("{}>", data_dir.join("db").display())))
                .map(|p| p + from)
        };
        for blob in &blobs {
            let synced = at(&|l: &str| {
                l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(" fsync(") && l.contains(&format!("<{blob}>"))
            });
            let synced = synced.unwrap_or_else(|| panic!("blob file {blob} was never fsynced:\n{text}"));
            let dir = lines[synced..]
                .iter()
                .position(|l| l.contains(" fsync(") && l.contains(&format!("<{}>", blobs_dir.display())))
                .unwrap_or_else(|| panic!("the blobs directory was not fsynced after {blob}:\n{text}"));
            let log = log_sync(synced).unwrap_or_else(|| panic!("no log fdatasync after {blob}:\n{text}"));
            assert!(
                synced + dir < log,
                "the blobs directory is synced before the log:\n{text}"
            );
        }
        eprintln!("{} blob files, each fsynced before the log's fdatasync", blobs.len());
    });
}

/// Reads `key` on node `i` in a loop until `stop`, noting each read's
/// latency with the time it was sent.
fn probe_reads(
    c: &Cluster,
    i: usize,
    key: &Key,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Duration)>> {
    let client = c.client(i).unwrap();
    let key = key.clone();
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let sent = Instant::now();
            read_value(&client, &key).await.unwrap();
            out.push((sent, sent.elapsed()));
        }
        out
    })
}

/// Adds 1 to `key` through `client` in a loop until `stop`, noting each
/// write's latency with the time it was sent.
fn probe_writes(
    client: Client,
    key: Key,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Duration)>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let sent = Instant::now();
            client.write(vec![(key.clone(), Op::CounterAdd(1))]).await.unwrap();
            out.push((sent, sent.elapsed()));
        }
        out
    })
}

/// How long node 0's gauge `metric` took to read `want`, or `None` if it
/// did not within `within`.
async fn gauge_reaches(c: &Cluster, metric: &str, want: f64, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let now = c.metric(0, metric).unwrap_or(-1.0);
        if now == want {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            eprintln!("{metric} is {now}, not {want}, after {within:?}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The slowest read of `lat` sent in `from..to`, and how many there were.
fn slowest(lat: &[(Instant, Duration)], from: Instant, to: Instant) -> (Duration, usize) {
    let during: Vec<Duration> = lat
        .iter()
        .filter(|(s, _)| *s >= from && *s < to)
        .map(|(_, d)| *d)
        .collect();
    (during.iter().copied().max().unwrap_or_default(), during.len())
}

/// One client adds 60,000 elements to a set in one command while others
/// read a small key on both nodes. Before, every read went through the
/// engine and waited for the whole add on the writer's node, and for the
/// whole merge on its peer (a 20,000-element add once kept every region
/// from answering a read for minutes). Reads are now served beside the
/// engine, from the store as of its last flush: the add and its merge delay
/// none of them by more than a fraction of the add.
#[test]
fn hostile_a_huge_set_add_does_not_stall_reads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(&bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let writer = c.client(0).unwrap();
        let probe = Key::new("probe").unwrap();
        writer.write(vec![(probe.clone(), Op::CounterAdd(1))]).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2).map(|i| probe_reads(&c, i, &probe, stop.clone())).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let big = Key::new("huge/set").unwrap();
        let elements = (0..60_000).map(|i| format!("e{i:07}").as_str().into()).collect();
        let started = Instant::now();
        writer.write(vec![(big.clone(), Op::SetAdd(elements))]).await.unwrap();
        let add = started.elapsed();
        let peer = c.client(1).unwrap();
        loop {
            match read_value(&peer, &big).await.unwrap() {
                Some(lattice_core::crdt::ValueView::Set(s)) if s.len() == 60_000 => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the set never reached node 2"
            );
        }
        let replicated = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for (i, r) in readers.into_iter().enumerate() {
            let lat = r.await.unwrap();
            let (max, n) = slowest(&lat, started, started + replicated);
            eprintln!(
                "node {i}: {n} reads during the add ({add:?}) and its replication ({replicated:?}), slowest {max:?}"
            );
            assert!(n >= 10, "node {i}: only {n} reads during the add");
            assert!(
                max < add / 3,
                "node {i}: a read waited {max:?} during an add of {add:?}"
            );
        }
        assert_responsive_on(&c, 1, "a huge set add").await;
    });
}

/// One client adds 100,000 elements to a set in one command while other
/// clients make small writes on both nodes. The add's work on the set's
/// whole state (apply, join, hash, encode: O(n log n)) is done beside the
/// engine, against the stored record (`Prepared`), on the writer's node for
/// the write and on its peer for the merge; each engine takes the result
/// as its own (`lattice_prepared_keys_taken`), since nothing else changed
/// the set meanwhile, and its step is left with the O(bytes) part. Before,
/// each engine did all of it in one step and the small writes queued
/// behind it: with `LATTICE_HOSTILE_BIN` set to the binary of `982f93b`,
/// the slowest small write on the writer's node took 207-255 ms of an add
/// of 207-276 ms (79-102 ms on the peer); then 52-81 ms of 233-302 ms
/// (48-66 ms on the peer). Since the change log (issue 17) the add's delta
/// is stored a second time, as a log entry, in the same flush: the flush
/// of a 1.2 MB delta writes and fsyncs two sled blobs, and the engine's
/// step holding it took 298 ms in CI (a small write waited 381 ms of a
/// 476 ms add). The writer's node is therefore held to the suite's bound of
/// a second, like the peer, until the log's write leaves the engine's flush
/// (issue 17's note).
#[test]
fn hostile_a_huge_set_add_is_worked_beside_the_engines() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const ELEMENTS: usize = 100_000;
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(&bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let probe = Key::new("probe").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for i in 0..2 {
            let client = c.client(i).unwrap();
            client.write(vec![(probe.clone(), Op::CounterAdd(1))]).await.unwrap();
            writers.push(probe_writes(client, probe.clone(), stop.clone()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let big = Key::new("huge/prepared").unwrap();
        let elements = (0..ELEMENTS).map(|i| format!("e{i:07}").as_str().into()).collect();
        let writer = c.client(0).unwrap();
        let started = Instant::now();
        writer.write(vec![(big.clone(), Op::SetAdd(elements))]).await.unwrap();
        let add = started.elapsed();
        let peer = c.client(1).unwrap();
        loop {
            match read_value(&peer, &big).await.unwrap() {
                Some(lattice_core::crdt::ValueView::Set(s)) if s.len() == ELEMENTS => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the set never reached node 2");
        }
        let replicated = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for (i, w) in writers.into_iter().enumerate() {
            let lat = w.await.unwrap();
            let (max, n) = slowest(&lat, started, started + replicated);
            eprintln!(
                "node {i}: {n} small writes during the add ({add:?}) and its replication ({replicated:?}), slowest {max:?}"
            );
            assert!(n >= 5, "node {i}: only {n} small writes during the add");
            // The add's work is done beside both engines; what is left in
            // their steps (the flush of the state and its log entry) is held
            // to the suite's bound.
            let bound = Duration::from_secs(1);
            assert!(max < bound, "node {i}: a small write waited {max:?} (add: {add:?})\n{}", c.logs());
        }
        // Both engines took the work done beside them. (A second copy of the
        // delta, retransmitted before the first was acknowledged, may be
        // prepared before the first copy's flush: stale, so merged by the
        // engine, as every copy was before.) The gauges are sampled every
        // 200 ms.
        for i in 0..2 {
            let taken = tokio::time::timeout(
                Duration::from_secs(5),
                metric_at_least(&c, i, "lattice_prepared_keys_taken", 1.0),
            )
            .await;
            assert!(taken.is_ok(), "node {i} never took a prepared add or merge\n{}", c.logs());
            eprintln!(
                "node {i}: prepared keys taken {}, stale {}",
                c.metric(i, "lattice_prepared_keys_taken").unwrap(),
                c.metric(i, "lattice_prepared_keys_stale").unwrap()
            );
        }
        assert_responsive_on(&c, 1, "a huge set add worked beside the engines").await;
    });
}

/// Until metric `name` of node `i` is at least `want`.
async fn metric_at_least(c: &Cluster, i: usize, name: &str, want: f64) {
    while c.metric(i, name).unwrap_or(0.0) < want {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One connection pipelines twelve adds of 40,000 elements each while
/// another connection makes small writes. Before, the engine took its queue
/// in arrival order and all of it in one step: a small write queued behind
/// the adds waited for all of them, and for the flush after them. Now
/// connections take turns, a large input starts a step of its own, and a
/// step that its work or bytes ended is flushed at once, so a small write
/// waits for about one add (measured: 0.72-0.78 s of 0.91-0.96 s before,
/// 0.18-0.27 s of 0.74-1.0 s with eight adds).
#[test]
fn hostile_pipelined_huge_adds_do_not_stall_another_clients_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let hog = Arc::new(c.client(0).unwrap());
        let other = c.client(0).unwrap();
        let probe = Key::new("probe").unwrap();
        other.write(vec![(probe.clone(), Op::CounterAdd(1))]).await.unwrap();
        hog.write(vec![(Key::new("hog/warm").unwrap(), Op::CounterAdd(1))])
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = probe_writes(other, probe.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let adds: Vec<_> = (0..12)
            .map(|n| {
                let hog = hog.clone();
                tokio::spawn(async move {
                    let elements = (0..40_000).map(|i| format!("e{i:07}").as_str().into()).collect();
                    let key = Key::new(format!("hog/{n}")).unwrap();
                    hog.write(vec![(key, Op::SetAdd(elements))]).await
                })
            })
            .collect();
        for a in adds {
            a.await.unwrap().unwrap();
        }
        let all = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lat = writes.await.unwrap();
        let (max, n) = slowest(&lat, started, started + all);
        eprintln!("{n} small writes during 12 pipelined adds ({all:?}), slowest {max:?}");
        assert!(n >= 4, "only {n} small writes during the adds ({all:?})");
        assert!(
            max < all / 3,
            "a small write waited {max:?} behind another connection's adds ({all:?} in all)\n{}",
            c.logs()
        );
        assert_responsive(&c, "pipelined huge adds").await;
    });
}

/// 100 reads wait on one connection for the next write to a set of 20,000
/// elements, and that write (one element) answers them all at once, while
/// another connection makes small writes. Before, the engine read and
/// decoded the set for each read that came to wait, and to answer them it
/// decoded it again and copied it once per read: the small writes queued
/// behind all of that. Now the engine only keeps the reads' tokens and
/// tells each read when the flushed store includes its token; the read is
/// served beside the engine.
#[test]
fn hostile_reads_waiting_on_a_huge_set_do_not_stall_writes() {
    use lattice_core::crdt::Kind;
    use std::sync::atomic::{AtomicBool, Ordering};
    const READS: usize = 100;
    const ELEMENTS: usize = 20_000;
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let writer = c.client(0).unwrap();
        let big = Key::new("huge/waited").unwrap();
        let elements = (0..ELEMENTS).map(|i| format!("e{i:07}").as_str().into()).collect();
        let first = writer.write(vec![(big.clone(), Op::SetAdd(elements))]).await.unwrap();
        // The token of the next write to the set: its writer's next dot.
        let mut next = first.clone();
        let part = next.parts.get_mut(&Kind::Set).expect("a set part");
        let (replica, _) = part.dots.maxima().next().expect("the writer's dots");
        let dot = part.dots.next_dot(replica);
        part.dots.insert(dot);
        let other = c.client(0).unwrap();
        let probe = Key::new("probe").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = probe_writes(other, probe.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        // The reads' own timeout is not what this measures: on a loaded
        // machine, answering 100 copies of the set can take longer than
        // the harness's 5 s (CI once failed so while other builds ran).
        let readers = Arc::new(c.client(0).unwrap().with_timeout(Duration::from_secs(60)));
        let waiting: Vec<_> = (0..READS)
            .map(|_| {
                let (readers, big, next) = (readers.clone(), big.clone(), next.clone());
                tokio::spawn(async move {
                    readers
                        .request(RequestBody::Read {
                            key: big,
                            after: Some(next),
                            wait_ms: 30_000,
                        })
                        .await
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.metric(0, "lattice_waiting_reads").unwrap() < READS as f64 {
            assert!(
                Instant::now() < deadline,
                "the reads never waited ({} waiting)\n{}",
                c.metric(0, "lattice_waiting_reads").unwrap(),
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waited = started.elapsed();
        writer
            .write(vec![(big.clone(), Op::SetAdd(vec!["last".into()]))])
            .await
            .unwrap();
        for w in waiting {
            match w.await.unwrap().unwrap() {
                Response::Value {
                    value: Some(lattice_core::crdt::ValueView::Set(s)),
                    ..
                } => assert_eq!(s.len(), ELEMENTS + 1, "a waiting read missed the write it waited for"),
                r => panic!("a waiting read was answered {r:?}"),
            }
        }
        let answered = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lat = writes.await.unwrap();
        let (max, n) = slowest(&lat, started, started + answered);
        let (before, _) = slowest(&lat, started - Duration::from_millis(300), started);
        eprintln!(
            "{n} small writes while {READS} reads of a {ELEMENTS}-element set came to wait ({waited:?}) \
             and were answered ({answered:?} in all): slowest {max:?} (before: {before:?})"
        );
        assert!(n >= 4, "only {n} small writes while the reads waited");
        assert!(
            max < Duration::from_millis(250),
            "a small write waited {max:?} while reads waited on a huge set\n{}",
            c.logs()
        );
        assert_responsive(&c, "reads waiting on a huge set").await;
    });
}

/// One connection pipelines 30 one-element adds to a set of 20,000
/// elements (each a small request, but each costs the engine a decode and
/// an encode of the whole set) while another connection makes small
/// writes. The step's byte room never stops such inputs; its work budget
/// does: without it, one step would take every queued add, and a small
/// write taken early in that step would be answered only after all of
/// them (measured with that check planted away: the slowest small write
/// waited 0.59-0.70 s, the whole run; with it, 80-104 ms of 0.6-0.8 s).
#[test]
fn hostile_pipelined_small_adds_to_a_huge_set_do_not_stall_another_clients_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _g = serial();
    runtime().block_on(async {
        let c = one_node().await;
        let hog = Arc::new(c.client(0).unwrap());
        let big = Key::new("huge/hot").unwrap();
        let elements = (0..20_000).map(|i| format!("e{i:07}").as_str().into()).collect();
        hog.write(vec![(big.clone(), Op::SetAdd(elements))]).await.unwrap();
        let other = c.client(0).unwrap();
        let probe = Key::new("probe").unwrap();
        other.write(vec![(probe.clone(), Op::CounterAdd(1))]).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = probe_writes(other, probe.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let adds: Vec<_> = (0..30)
            .map(|n| {
                let (hog, big) = (hog.clone(), big.clone());
                tokio::spawn(async move {
                    hog.write(vec![(big, Op::SetAdd(vec![format!("x{n}").as_str().into()]))])
                        .await
                })
            })
            .collect();
        for a in adds {
            a.await.unwrap().unwrap();
        }
        let all = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lat = writes.await.unwrap();
        let (max, n) = slowest(&lat, started, started + all);
        eprintln!(
            "{n} small writes during 30 pipelined one-element adds to a 20,000-element set ({all:?}), slowest {max:?}"
        );
        assert!(
            max < all / 3,
            "a small write waited {max:?} behind another connection's adds ({all:?} in all)\n{}",
            c.logs()
        );
        assert!(n >= 4, "only {n} small writes during the adds ({all:?})");
        assert_responsive(&c, "pipelined small adds to a huge set").await;
    });
}

/// Writes that wait for a write concern another region cannot meet (its
/// node is down) hold their answer up to their timeout, an hour at most.
/// One connection may hold 128 such writes (`max_concern_waits_per_
/// connection`); more are refused `Overloaded` before they are applied,
/// while another connection's still wait. When the client goes away, the
/// waits of its writes end within a second (the writes stay durable and
/// keep replicating). Before, one connection could hold all 10,000 of the
/// node's slots for an hour, and every other client's concern writes were
/// refused. Plain writes of a connection at its cap still go through.
#[test]
fn hostile_concern_waits_are_capped_per_connection_and_end_with_the_client() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(&bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        c.stop(1).unwrap();
        let writes = |client: Arc<Client>, n: usize, prefix: &'static str| {
            (0..n)
                .map(|i| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        client
                            .request(RequestBody::Write {
                                op_id: Client::new_op_id(),
                                retry: false,
                                ops: vec![(Key::new(format!("{prefix}/{i}")).unwrap(), Op::CounterAdd(1))],
                                concern: WriteConcern::All,
                                timeout_ms: 60_000,
                            })
                            .await
                    })
                })
                .collect::<Vec<_>>()
        };
        let gauge_reaches = |want: f64, within: Duration| gauge_reaches(&c, "lattice_concern_waits", want, within);
        // The client's own timeout must outlast the writes' 60 s.
        let client = || c.client(0).unwrap().with_timeout(Duration::from_secs(120));
        let hog = Arc::new(client());
        let mut tasks = writes(hog.clone(), 140, "hog");
        // The twelve past the cap are answered at once, and refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refused = 0;
        while refused < 12 && Instant::now() < deadline {
            let mut waiting = Vec::new();
            for t in tasks {
                if t.is_finished() {
                    match t.await.unwrap() {
                        Ok(Response::Error(e)) if e.kind == ErrorKind::Overloaded => {
                            assert!(e.message.contains("max_concern_waits_per_connection"), "{e:?}");
                            refused += 1;
                        }
                        Err(Error::Overloaded(m)) => {
                            assert!(m.contains("max_concern_waits_per_connection"), "{m}");
                            refused += 1;
                        }
                        r => panic!("a concern write was answered {r:?} while region us is down"),
                    }
                } else {
                    waiting.push(t);
                }
            }
            tasks = waiting;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((refused, tasks.len()), (12, 128), "128 wait, the rest are refused");
        assert!(gauge_reaches(128.0, Duration::from_secs(2)).await.is_some());
        // The cap is on waiting for a concern: the same connection's plain
        // writes still go through.
        hog.write(vec![(key("hog/local"), Op::CounterAdd(1))])
            .await
            .expect("a local write of a connection at its concern cap");
        // Another connection's concern write still waits.
        let other = writes(Arc::new(client()), 1, "other");
        assert!(gauge_reaches(129.0, Duration::from_secs(2)).await.is_some());
        assert!(!other[0].is_finished(), "another connection's concern write waits");
        // The hog leaves: its waits end, the other's stays.
        tasks.iter().for_each(|t| t.abort());
        drop((tasks, hog));
        let freed = gauge_reaches(1.0, Duration::from_secs(1)).await;
        eprintln!("128 concern waits of a client that left: ended in {freed:?}");
        assert!(
            freed.is_some(),
            "the concern waits of a client that left end within 1 s"
        );
        // The 128 that waited were applied and stay (durable here, and
        // replicating); the refused ones were not applied.
        let reader = c.client(0).unwrap();
        let mut present = 0;
        for i in 0..140 {
            if read_value(&reader, &Key::new(format!("hog/{i}")).unwrap())
                .await
                .unwrap()
                .is_some()
            {
                present += 1;
            }
        }
        assert_eq!(
            present, 128,
            "the writes that waited are there, the refused ones are not"
        );
        assert_responsive(&c, "concern waits of a departed client").await;
    });
}
