//! Reads that wait for a causal token, against real processes: the engine
//! decides them from the tokens of recent changes (`waits::Recent`) and the
//! read is served beside the engine. A read must be woken by the remote
//! change that meets its token, also when the key changed here before (its
//! kept token is older) and when its last change here was forgotten since
//! (more than `RECENT_KEYS` keys changed after it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use lattice_client::Client;
use lattice_core::clock::{CausalContext, Dot, ReplicaId};
use lattice_core::crdt::Op;
use lattice_core::proto::client::{CausalToken, ErrorKind, RequestBody, Response, WriteConcern};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::relay::Mesh;
use lattice_tests::{key, read_value, runtime, serial, Cluster};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

/// Writes `ops` at `client` and returns the token of `want`.
async fn write(client: &Client, ops: Vec<(Key, Op)>, want: &Key) -> CausalToken {
    match client
        .request(RequestBody::Write {
            op_id: Client::new_op_id(),
            retry: false,
            ops,
            concern: WriteConcern::Local,
            timeout_ms: 0,
        })
        .await
    {
        Ok(Response::Written { keys, .. }) => keys
            .into_iter()
            .find(|(k, _)| k == want)
            .map(|(_, t)| t)
            .unwrap_or_default(),
        r => panic!("write failed: {r:?}"),
    }
}

/// Reads `k` at `client` after `token`, waiting up to 4 s; returns how
/// long the answer took. Fails unless it is a value.
async fn read_after(client: &Client, k: &Key, token: CausalToken, what: &str) -> Duration {
    let started = Instant::now();
    let r = client
        .request(RequestBody::Read {
            key: k.clone(),
            after: Some(token),
            wait_ms: 4_000,
        })
        .await;
    let took = started.elapsed();
    assert!(
        matches!(r, Ok(Response::Value { value: Some(_), .. })),
        "{what}: a read waiting for a remote change was answered {r:?} after {took:?}"
    );
    took
}

/// eu writes, us reads with eu's token at once: the change reaches us
/// 300 ms later (a delayed link), so the read waits for it, and must be
/// answered when us stores it, not at its 4 s deadline. First on a key us
/// wrote itself (the engine keeps us's older token for it), then after
/// 17,000 other keys changed at us (the engine forgot the key's token).
#[test]
fn reads_waiting_for_remote_changes_are_woken_when_they_are_stored() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::prepare(bin(), &["eu", "us"], Durability::Group).unwrap();
        let _mesh = Mesh::install(&c, Duration::from_millis(300)).await.unwrap();
        let mut c = c;
        c.start_all().unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let (eu, us) = (c.client(0).unwrap(), c.client(1).unwrap());
        let k = key("k");
        // us changed `k` itself: the engine keeps a token of `k` that does
        // not include eu's next writes.
        write(&us, vec![(k.clone(), Op::LwwSet(vec![0u8].into()))], &k).await;
        for i in 1..=3u8 {
            let token = write(&eu, vec![(k.clone(), Op::LwwSet(vec![i].into()))], &k).await;
            let took = read_after(&us, &k, token, "a key us changed before").await;
            eprintln!("read {i} after a remote change: {took:?}");
            assert!(took >= Duration::from_millis(100), "the read did not wait ({took:?})");
            assert!(took < Duration::from_secs(3), "woken late: {took:?}\n{}", c.logs());
        }
        // 17,000 other keys change at us, in separate flushes: `k`'s token
        // is forgotten.
        for b in 0..17 {
            let ops = (0..1000)
                .map(|i| (key(&format!("f/{b}/{i}")), Op::LwwSet(vec![1u8].into())))
                .collect::<Vec<_>>();
            let first = key(&format!("f/{b}/0"));
            write(&us, ops, &first).await;
        }
        for i in 4..=5u8 {
            let token = write(&eu, vec![(k.clone(), Op::LwwSet(vec![i].into()))], &k).await;
            let took = read_after(&us, &k, token, "a key whose token us forgot").await;
            eprintln!("read {i} after forgetting: {took:?}");
            assert!(took >= Duration::from_millis(100), "the read did not wait ({took:?})");
            assert!(took < Duration::from_secs(3), "woken late: {took:?}\n{}", c.logs());
        }
    });
}

/// A token no state holds: 30,000 dots of 3,000 replicas (no two in a
/// row, so the context cannot compress them).
fn huge_token() -> CausalToken {
    CausalToken {
        context: CausalContext::from_dots((0..30_000u64).map(|i| Dot {
            replica: ReplicaId(1_000_000 + i % 3_000),
            counter: 2 * (i / 3_000) + 2,
        })),
        ..CausalToken::default()
    }
}

/// 100 reads with huge tokens that can never be met wait on a key another
/// client keeps writing (each flush re-checks them): the writes stay fast,
/// and the reads hold at most `waiting_read_bytes` (16 MiB here): about 24
/// of them wait and end `NotCaughtUp` at their deadline, the rest are
/// refused `Overloaded` naming the budget. Before the budget, all 100
/// waited, each token held twice (about 1.5 MiB per read: +155-159 MiB).
#[test]
fn hostile_reads_with_huge_tokens_do_not_stall_writes() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
            cfg.memory.waiting_read_bytes = 16 << 20;
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let base = c.rss_kib(0).unwrap();
        let k = key("hot");
        let writer = c.client(0).unwrap();
        write(&writer, vec![(k.clone(), Op::LwwSet(vec![0u8].into()))], &k).await;
        let reader = Arc::new(c.client(0).unwrap().with_timeout(Duration::from_secs(30)));
        let token = huge_token();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (reader, token, k) = (reader.clone(), token.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                reader
                    .request(RequestBody::Read {
                        key: k,
                        after: Some(token),
                        wait_ms: 15_000,
                    })
                    .await
            }));
        }
        // The 100 requests carry about 40 MB of tokens between them; on a
        // loaded machine they take a while to arrive. Wait until every one
        // has been either refused or taken in, whatever the time it takes
        // (the deadline of 15 s leaves the waiting ones waiting meanwhile).
        let arrived = Instant::now();
        let (mut held, mut last, mut steady) = (0.0, -1.0, 0);
        while steady < 3 {
            assert!(arrived.elapsed() < Duration::from_secs(10), "the reads never settled");
            tokio::time::sleep(Duration::from_millis(200)).await;
            held = c.metric(0, "lattice_waiting_read_bytes").unwrap();
            let finished = tasks.iter().filter(|t| t.is_finished()).count();
            assert!(held <= (16 << 20) as f64, "{held} bytes held");
            steady = if held > 0.0 && held == last && finished > 0 {
                steady + 1
            } else {
                0
            };
            last = held;
        }
        eprintln!("the waiting reads hold {held} bytes after {:?}", arrived.elapsed());
        let mut slowest = Duration::ZERO;
        for i in 0..40u8 {
            let started = Instant::now();
            write(&writer, vec![(k.clone(), Op::LwwSet(vec![i].into()))], &k).await;
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        eprintln!("slowest write while 100 huge-token reads wait: {slowest:?}");
        assert!(slowest < Duration::from_millis(500), "a write took {slowest:?}");
        let (mut not_caught_up, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(Response::Error(e)) if e.kind == ErrorKind::NotCaughtUp => not_caught_up += 1,
                Ok(Response::Error(e))
                    if e.kind == ErrorKind::Overloaded && e.message.contains("waiting_read_bytes") =>
                {
                    refused += 1
                }
                Err(lattice_client::Error::NotCaughtUp(_)) => not_caught_up += 1,
                Err(lattice_client::Error::Overloaded(m)) if m.contains("waiting_read_bytes") => refused += 1,
                r => panic!("unexpected answer {r:?}"),
            }
        }
        eprintln!("{not_caught_up} of 100 huge-token reads waited to their deadline, {refused} refused");
        assert_eq!(not_caught_up + refused, 100);
        assert!(
            (10..=40).contains(&not_caught_up),
            "{not_caught_up} waited within 16 MiB"
        );
        let now = c.rss_kib(0).unwrap();
        eprintln!("RSS {} MiB (+{} MiB)", now / 1024, now.saturating_sub(base) / 1024);
        assert!(now.saturating_sub(base) / 1024 < 100, "RSS grew too much");
        let r = tokio::time::timeout(Duration::from_secs(1), read_value(&writer, &k)).await;
        assert!(matches!(r, Ok(Ok(Some(_)))), "node unresponsive: {r:?}");
    });
}
