//! Scans and multi-key reads against real nodes: every key of a prefix comes
//! back exactly once across pages (with the cursor carried from one node to
//! another), deleted keys and keys the region may not read are left out,
//! an mget answers each key or says why not, and over-limit requests are
//! refused with a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::{Entry, Error, ErrorKind, ScanCursor, MGET_MAX_KEYS};
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::policy::{Policy, Priority, Regions};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::proto::RegionId;
use lattice_server::storage::Durability;
use lattice_tests::{key, request_frame, runtime, serial, Cluster};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn reg(s: &str) -> Op {
    Op::LwwSet(Bytes::from(s))
}

fn text(v: &Option<ValueView>) -> Option<String> {
    match v {
        Some(ValueView::Register(Some(b))) => Some(String::from_utf8_lossy(&b.0).into_owned()),
        _ => None,
    }
}

/// Every page of a scan of `prefix`, alternating between the nodes of
/// `clients`: the keys in order of arrival, with their values.
async fn scan_all(
    clients: &[lattice_client::Client],
    prefix: &str,
    limit: u32,
) -> (Vec<(String, Option<String>)>, usize) {
    let mut cursor: Option<ScanCursor> = None;
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let c = &clients[pages % clients.len()];
        let (entries, next) = c.scan(prefix, cursor, limit, true).await.unwrap();
        pages += 1;
        assert!(
            entries.len() <= limit as usize,
            "a page of {} keys over the limit {limit}",
            entries.len()
        );
        out.extend(
            entries
                .into_iter()
                .map(|e| (e.key.as_str().to_string(), text(&e.value))),
        );
        match next {
            Some(c) => cursor = Some(c),
            None => return (out, pages),
        }
        assert!(pages < 10_000, "the scan does not end");
    }
}

#[test]
fn a_scan_returns_each_key_of_its_prefix_once_and_mget_answers_each_key() {
    let _g = serial();
    runtime().block_on(async {
        let eu_only = Policy::new("eu/", Regions::Only(vec![RegionId::from("eu")]), Priority::Normal);
        let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
            cfg.policy_version = 1;
            cfg.policy = vec![eu_only.clone()];
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let us = c.client(1).unwrap();
        // 1,200 users and 300 orders, in batches; a deleted user; an eu-only key.
        let mut want = BTreeMap::new();
        for batch in 0..12 {
            let ops: Vec<_> = (0..100)
                .map(|i| {
                    let n = batch * 100 + i;
                    want.insert(format!("user:{n:04}"), format!("u{n}"));
                    (key(&format!("user:{n:04}")), reg(&format!("u{n}")))
                })
                .collect();
            eu.write(ops).await.unwrap();
        }
        let orders: Vec<_> = (0..300).map(|n| (key(&format!("order:{n}")), reg("o"))).collect();
        eu.write(orders).await.unwrap();
        eu.write(vec![(key("user:0007"), Op::Delete)]).await.unwrap();
        want.remove("user:0007");
        eu.write(vec![(key("eu/secret"), reg("s"))]).await.unwrap();
        // The nodes never agree on one digest (eu alone holds eu/): wait
        // for a last write to reach us (one origin's deltas arrive in order).
        eu.write(vec![(key("zz-last"), reg("x"))]).await.unwrap();
        let started = std::time::Instant::now();
        while text(&lattice_tests::read_value(&us, &key("zz-last")).await.unwrap()).is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "us never got zz-last\n{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Pages of 97 keys, alternating between the two nodes.
        let (got, pages) = scan_all(&[c.client(0).unwrap(), c.client(1).unwrap()], "user:", 97).await;
        let mut seen = BTreeMap::new();
        for (k, v) in got {
            assert!(seen.insert(k.clone(), v).is_none(), "{k} came back twice");
        }
        let want: BTreeMap<String, Option<String>> = want.into_iter().map(|(k, v)| (k, Some(v))).collect();
        assert_eq!(seen, want, "the scan of user: differs from what was written");
        assert!(pages >= 1_199 / 97, "{pages} pages for 1,199 keys of at most 97");

        // Everything: the orders too, but never the eu-only key on us.
        let (all, _) = scan_all(&[c.client(1).unwrap()], "", 1_000).await;
        assert_eq!(all.len(), 1_199 + 300 + 1);
        assert!(
            all.iter().all(|(k, _)| !k.starts_with("eu/")),
            "us listed an eu-only key"
        );
        let (eu_all, _) = scan_all(&[c.client(0).unwrap()], "", 1_000).await;
        assert_eq!(eu_all.len(), 1_199 + 300 + 2);

        // Keys only: no values, no tokens.
        let (entries, _) = us.scan("order:", None, 5, false).await.unwrap();
        assert_eq!(entries.len(), 5);
        assert!(entries.iter().all(|e| e.value.is_none() && e.token.is_none()));

        // mget: values in order, an absent key, a deleted one, a refused one.
        let keys = [
            key("user:0001"),
            key("nope"),
            key("user:0007"),
            key("eu/secret"),
            key("order:3"),
        ];
        let entries: Vec<Entry> = us.mget(&keys).await.unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(names, ["user:0001", "nope", "user:0007", "eu/secret", "order:3"]);
        assert_eq!(text(&entries[0].value).as_deref(), Some("u1"));
        assert!(entries[1].value.is_none() && entries[1].error.is_none());
        assert_eq!(
            entries[2].value,
            Some(ValueView::Register(None)),
            "a deleted register reads as deleted"
        );
        let refused = entries[3].error.as_ref().expect("us may not read eu/secret");
        assert_eq!(refused.kind, ErrorKind::PolicyDenied, "{refused:?}");
        assert_eq!(text(&entries[4].value).as_deref(), Some("o"));
        // The same keys from eu: the secret is there.
        let entries = eu.mget(&keys).await.unwrap();
        assert_eq!(text(&entries[3].value).as_deref(), Some("s"));

        // Over the limits: refused, with the limit named.
        let many: Vec<_> = (0..=MGET_MAX_KEYS).map(|i| key(&format!("k{i}"))).collect();
        match us.mget(&many).await {
            Err(Error::InvalidRequest(m)) => assert!(m.contains(&MGET_MAX_KEYS.to_string()), "{m}"),
            other => panic!("an mget of {} keys: {other:?}", many.len()),
        }
        let long = "p".repeat(2_000);
        match us.scan(&long, None, 10, false).await {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("prefix"), "{m}"),
            other => panic!("a 2,000-byte prefix: {other:?}"),
        }
        // A cursor the client made up: a position like any other, no harm.
        for junk in [vec![], vec![0xff; 64], b"k\x00\x00".to_vec(), vec![b'a']] {
            let r = us
                .request_to(
                    0,
                    RequestBody::Scan {
                        prefix: String::new(),
                        cursor: Some(ScanCursor(junk.clone())),
                        limit: 0,
                        values: true,
                    },
                )
                .await
                .unwrap();
            assert!(matches!(r, Response::Scanned { .. }), "{junk:?}: {r:?}");
        }
        assert!(c.wait_ready(Duration::from_secs(5)).await.is_ok());
    });
}

/// Answers are bounded in bytes: three sets of about 1.5 MiB each do not
/// fit in one 4 MiB answer. An mget answers the two that fit and marks the
/// third, and every key after it, instead of reading them; a scan with
/// values splits them across pages.
#[test]
fn mget_and_scan_answers_stop_at_their_byte_limit() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let client = c.client(0).unwrap();
        // 2 writes of 12,000 elements of 60 bytes: about 1.5 MiB a set.
        for name in ["big/a", "big/b", "big/c"] {
            for half in 0..2 {
                let elements = (0..12_000)
                    .map(|i| Bytes::from(format!("{half}-{i:08}-{}", "x".repeat(48)).as_str()))
                    .collect();
                client.write(vec![(key(name), Op::SetAdd(elements))]).await.unwrap();
            }
        }
        client.write(vec![(key("big/small"), reg("s"))]).await.unwrap();
        let keys = [key("big/a"), key("big/b"), key("big/c"), key("big/small")];
        let entries = client.mget(&keys).await.unwrap();
        let read: Vec<bool> = entries.iter().map(|e| e.value.is_some()).collect();
        assert_eq!(
            read,
            [true, true, false, false],
            "{:?}",
            entries.iter().map(|e| &e.error).collect::<Vec<_>>()
        );
        let third = entries[2].error.as_ref().unwrap();
        assert!(third.message.contains("does not fit"), "{third:?}");
        let fourth = entries[3].error.as_ref().unwrap();
        assert!(fourth.message.contains("filled up"), "{fourth:?}");
        for e in &entries[..2] {
            match &e.value {
                Some(ValueView::Set(s)) => assert_eq!(s.len(), 24_000),
                other => panic!("{}: {other:?}", e.key),
            }
        }
        // A scan with values: every key, none twice, no page over the limit.
        let mut cursor = None;
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let (entries, next) = client.scan("big/", cursor, 100, true).await.unwrap();
            pages += 1;
            let sets = entries
                .iter()
                .filter(|e| matches!(e.value, Some(ValueView::Set(_))))
                .count();
            assert!(sets <= 2, "a page held {sets} sets of 1.5 MiB");
            seen.extend(entries.into_iter().map(|e| e.key.as_str().to_string()));
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["big/a", "big/b", "big/c", "big/small"]);
        assert!(pages >= 2, "four keys of 4.5 MiB in {pages} page");
    });
}

/// A key named `{prefix}{n}` for the first n whose hash bucket is in the
/// top 1/64 of the bucket space: it sorts after almost every other key.
fn late_key(prefix: &str) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|s| key(s).hash().bucket() > u32::MAX - u32::MAX / 64)
        .unwrap()
}

/// Every key of a scan of `prefix` with pages of `limit`, on one node.
async fn scan_keys(client: &lattice_client::Client, prefix: &str, limit: u32) -> Vec<String> {
    let mut cursor = None;
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let (entries, next) = client.scan(prefix, cursor, limit, false).await.unwrap();
        assert!(entries.len() <= 1_000, "a page of {} keys", entries.len());
        out.extend(entries.into_iter().map(|e| e.key.as_str().to_string()));
        match next {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
    panic!("a scan of {prefix:?} does not end");
}

/// The edges of a page: a prefix whose only key lies past the first
/// SCAN_MAX_EXAMINED keys (a page that finds nothing must still move the
/// cursor, not end the scan), 11,000 deleted keys before a live one, a
/// limit of 0 and of u32::MAX, prefixes of 1,024 and 1,025 bytes, hostile
/// cursors, an mget over the request frame limit, duplicate keys, and
/// tokens the node can never catch up with (the wait is for all keys
/// together, not per key).
#[test]
fn scan_and_mget_edges() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let client = c.client(0).unwrap();
        for batch in 0..11 {
            let ops: Vec<_> = (0..1_000)
                .map(|i| (key(&format!("gone:{}", batch * 1_000 + i)), reg("x")))
                .collect();
            client.write(ops).await.unwrap();
            let dels: Vec<_> = (0..1_000)
                .map(|i| (key(&format!("gone:{}", batch * 1_000 + i)), Op::Delete))
                .collect();
            client.write(dels).await.unwrap();
        }
        let needle = late_key("gone:needle");
        client.write(vec![(key(&needle), reg("n"))]).await.unwrap();
        // Only deleted keys before the needle: a page of 10,000 deleted
        // keys must move the cursor.
        assert_eq!(scan_keys(&client, "gone:", 1_000).await, vec![needle.clone()]);
        assert_eq!(scan_keys(&client, "", 1_000).await, vec![needle.clone()]);
        for batch in 0..2 {
            let ops: Vec<_> = (0..1_000)
                .map(|i| (key(&format!("live:{}", batch * 1_000 + i)), reg("v")))
                .collect();
            client.write(ops).await.unwrap();
        }
        let solo = late_key("solo:");
        client.write(vec![(key(&solo), reg("s"))]).await.unwrap();

        // One matching key past the first 10,000 examined: found.
        assert_eq!(scan_keys(&client, "solo:", 1_000).await, vec![solo.clone()]);
        // Past 11,000 deleted keys of its prefix: found.
        assert_eq!(scan_keys(&client, "gone:", 1_000).await, vec![needle.clone()]);
        // A limit of 0 is a limit of 1, not an empty page that ends the scan.
        assert_eq!(scan_keys(&client, "gone:", 0).await, vec![needle.clone()]);
        assert_eq!(scan_keys(&client, "solo:", 0).await, vec![solo.clone()]);
        // u32::MAX: at most 1,000 a page (checked in scan_keys), each once.
        let mut live = scan_keys(&client, "live:", u32::MAX).await;
        live.sort();
        live.dedup();
        assert_eq!(live.len(), 2_000);

        // Prefixes: a key's length is fine, one byte more is refused.
        let (entries, _) = client.scan(&"p".repeat(1_024), None, 10, false).await.unwrap();
        assert!(entries.is_empty());
        match client.scan(&"p".repeat(1_025), None, 10, false).await {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("prefix"), "{m}"),
            other => panic!("a 1,025-byte prefix: {other:?}"),
        }

        // Hostile cursors: an answer, never an error or a hang.
        for junk in [
            vec![],
            vec![b'a'],
            b"iidentity".to_vec(),
            vec![b'j'; 1_000],
            b"k".to_vec(),
            vec![b'k', 0xff, 0xff, 0xff, 0xff, 0xff],
            b"mmeta".to_vec(),
            vec![b'p'; 100],
            vec![0xff; 512 << 10],
        ] {
            let r = client
                .request_to(
                    0,
                    RequestBody::Scan {
                        prefix: String::new(),
                        cursor: Some(ScanCursor(junk.clone())),
                        limit: 10,
                        values: true,
                    },
                )
                .await;
            let head = &junk[..junk.len().min(8)];
            assert!(matches!(r, Ok(Response::Scanned { .. })), "{head:?}: {r:?}");
        }
        // A cursor over the 1 MiB request frame: refused by the client.
        let r = client.scan("", Some(ScanCursor(vec![b'k'; 1 << 20])), 10, false).await;
        assert!(r.is_err(), "a 1 MiB cursor: {r:?}");
        println!("a 1 MiB cursor: {r:?}");

        // 1,000 keys of 1,024 bytes (the most an mget may ask): within the
        // 1 MiB request frame, each answered.
        let long: Vec<_> = (0..MGET_MAX_KEYS)
            .map(|i| key(&format!("{i:04}{}", "x".repeat(1_020))))
            .collect();
        let started = std::time::Instant::now();
        let entries = client.mget(&long).await.unwrap();
        println!("an mget of 1,000 keys of 1 KiB took {:?}", started.elapsed());
        assert_eq!(entries.len(), MGET_MAX_KEYS);
        assert!(entries.iter().all(|e| e.error.is_none() && e.value.is_none()));
        // Duplicates: one entry each, in order.
        let dup = [key("live:1"), key("live:1"), key("nope"), key("live:1")];
        let entries = client.mget(&dup).await.unwrap();
        let got: Vec<_> = entries.iter().map(|e| (e.key.as_str(), text(&e.value))).collect();
        let v = Some("v".to_string());
        assert_eq!(
            got,
            [
                ("live:1", v.clone()),
                ("live:1", v.clone()),
                ("nope", None),
                ("live:1", v)
            ]
        );

        // Tokens naming 3,000 events the node never saw: 10 keys, 1 s to
        // wait for all of them, answered within about 1 s, each key
        // NotCaughtUp.
        let dots = (0..3_000u64).map(|i| lattice_core::clock::Dot {
            replica: lattice_core::clock::ReplicaId(0xdead_0000 + i % 7),
            counter: 1_000_000_000 + 2 * i,
        });
        let hostile = lattice_core::proto::client::CausalToken {
            context: lattice_core::clock::CausalContext::from_dots(dots),
            ..Default::default()
        };
        let keys: Vec<_> = (0..10)
            .map(|i| (key(&format!("live:{i}")), Some(hostile.clone())))
            .collect();
        let started = std::time::Instant::now();
        let r = client
            .request_to(0, RequestBody::MGet { keys, wait_ms: 1_000 })
            .await
            .unwrap();
        let took = started.elapsed();
        println!("an mget of 10 keys with hostile tokens took {took:?}");
        let Response::Values(entries) = r else { panic!("{r:?}") };
        assert_eq!(entries.len(), 10);
        for e in &entries {
            assert_eq!(e.error.as_ref().map(|e| e.kind), Some(ErrorKind::NotCaughtUp), "{e:?}");
        }
        assert!(took < Duration::from_secs(3), "10 hostile tokens waited {took:?}");
        // The node still answers at once.
        assert!(c.wait_ready(Duration::from_secs(5)).await.is_ok());
    });
}

/// Paging while keys are written, rewritten and deleted between pages:
/// every key that exists throughout comes back exactly once, and no key
/// comes back twice.
#[test]
fn a_scan_interleaved_with_writes_returns_each_lasting_key_once() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let client = c.client(0).unwrap();
        for batch in 0..3 {
            let ops: Vec<_> = (0..1_000)
                .map(|i| (key(&format!("mix:{}", batch * 1_000 + i)), reg("v0")))
                .collect();
            client.write(ops).await.unwrap();
        }
        let mut cursor = None;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let (mut doomed, mut stable, mut fresh) = (1usize, 0usize, 0usize);
        for page in 0.. {
            assert!(page < 10_000, "the scan does not end");
            let (entries, next) = client.scan("mix:", cursor, 50, true).await.unwrap();
            for e in entries {
                *seen.entry(e.key.as_str().to_string()).or_default() += 1;
            }
            let Some(next) = next else { break };
            cursor = Some(next);
            // Between pages: 5 deletes, 5 rewrites, 5 new keys.
            let mut ops = Vec::new();
            for _ in 0..5 {
                if doomed < 3_000 {
                    ops.push((key(&format!("mix:{doomed}")), Op::Delete));
                    doomed += 4;
                }
                ops.push((key(&format!("mix:{}", stable % 3_000)), reg(&format!("v{page}"))));
                stable += 4;
                ops.push((key(&format!("mix:new{fresh}")), reg("n")));
                fresh += 1;
            }
            client.write(ops).await.unwrap();
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "keys returned twice: {twice:?}");
        let missing: Vec<_> = (0..3_000)
            .filter(|n| n % 4 != 1)
            .map(|n| format!("mix:{n}"))
            .filter(|k| !seen.contains_key(k))
            .collect();
        assert!(
            missing.is_empty(),
            "keys that existed throughout were skipped: {missing:?}"
        );
    });
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// Writes `big/0`..`big/79`: 80 sets of 3,000 elements of 64 bytes,
/// about 16 MiB of records, what one page (keys only) decodes.
async fn write_big_sets(client: &lattice_client::Client) {
    for k in 0..80 {
        let elements = (0..3_000)
            .map(|i| Bytes::from(format!("{i:08}-{}", "x".repeat(55)).as_str()))
            .collect();
        client
            .write(vec![(key(&format!("big/{k}")), Op::SetAdd(elements))])
            .await
            .unwrap();
    }
}

/// A client that sends scans and gives up on them at once (stops reading
/// its streams) must not get more scan pages decoding at once than the
/// node's read slots: the page's blocking work must keep its slot until it
/// ends, not just until the request is dropped. Counted as the node's
/// threads (each page decoding at once is a blocking-pool thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_scans_do_not_pile_up_past_the_read_slots() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(20)).await.unwrap();
    let client = c.client(0).unwrap();
    write_big_sets(&client).await;
    let started = std::time::Instant::now();
    let (entries, _) = client.scan("big/", None, 1_000, false).await.unwrap();
    println!("a page of {} keys took {:?}", entries.len(), started.elapsed());
    let pid = c.pid(0).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = threads_of(pid);

    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let tls = lattice_server::certs::client_tls(&ca, None, lattice_core::proto::client::CLIENT_ALPN).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = e.connect(c.defaults.endpoints[0], "n1").unwrap().await.unwrap();
    let frame = request_frame(
        &c.defaults.token,
        RequestBody::Scan {
            prefix: "big/".into(),
            cursor: None,
            limit: 1_000,
            values: false,
        },
    );
    let mut most = baseline;
    for _ in 0..30 {
        let mut streams = Vec::new();
        for _ in 0..8 {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();
            let _ = send.finish();
            streams.push((send, recv));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        // Gives up: the node sees its answers stopped.
        drop(streams);
        most = most.max(threads_of(pid));
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        most = most.max(threads_of(pid));
    }
    println!("node threads: {baseline} before, at most {most} during");
    conn.close(0u32.into(), b"");
    assert!(
        most <= baseline + 6,
        "abandoned scans ran past the read slots: {most} threads, {baseline} before"
    );
}

/// Scans queued by one client must not hold up the ordinary reads of
/// another: 48 scans in flight (each page decoding about 16 MiB of
/// records) and a read of a small key from a second client is still
/// answered within 1 s (the standard of the hostile tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_scans_do_not_starve_ordinary_reads() {
    let _g = serial();
    let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
    c.wait_ready(Duration::from_secs(20)).await.unwrap();
    let client = c.client(0).unwrap();
    write_big_sets(&client).await;
    client.write(vec![(key("small"), reg("s"))]).await.unwrap();
    let ca = std::fs::read_to_string(&c.defaults.ca).unwrap();
    let tls = lattice_server::certs::client_tls(&ca, None, lattice_core::proto::client::CLIENT_ALPN).unwrap();
    let mut e = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    e.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = e.connect(c.defaults.endpoints[0], "n1").unwrap().await.unwrap();
    let frame = request_frame(
        &c.defaults.token,
        RequestBody::Scan {
            prefix: "big/".into(),
            cursor: None,
            limit: 1_000,
            values: false,
        },
    );
    let mut scans = Vec::new();
    for _ in 0..48 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let _ = send.finish();
        scans.push(tokio::spawn(async move {
            let _ = recv.read_to_end(8 << 20).await;
            drop(send);
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reader = c.client(0).unwrap();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        lattice_tests::read_value(&reader, &key("small")),
    )
    .await;
    let took = started.elapsed();
    println!("a read behind 48 scans took {took:?}");
    assert!(matches!(r, Ok(Ok(Some(_)))), "{r:?}");
    for s in scans {
        s.await.unwrap();
    }
    conn.close(0u32.into(), b"");
    assert!(
        took < Duration::from_secs(1),
        "a small read waited {took:?} behind scans"
    );
}

/// A node that held keys before a policy put them out of its region's
/// reach (it keeps the data) must leave them out of scans, as it refuses
/// to read them.
#[test]
fn a_scan_leaves_out_keys_a_new_policy_put_out_of_reach() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(bin(), &["eu", "us"], Durability::Group, |_, cfg| {
            cfg.policy_version = 1;
            cfg.admin_tokens = vec!["admin-secret-token".into()];
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let us = c.client(1).unwrap();
        eu.write(vec![(key("eu/x"), reg("x")), (key("open"), reg("o"))])
            .await
            .unwrap();
        let started = std::time::Instant::now();
        while text(&lattice_tests::read_value(&us, &key("eu/x")).await.unwrap()).is_none() {
            assert!(started.elapsed() < Duration::from_secs(30), "us never got eu/x");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let admin = c.client_with_token(0, "admin-secret-token").unwrap();
        let v2 = lattice_core::policy::PolicySet::new(
            2,
            vec![Policy::new(
                "eu/",
                Regions::Only(vec![RegionId::from("eu")]),
                Priority::Normal,
            )],
        )
        .unwrap();
        let r = admin
            .request(RequestBody::SetPolicy(c.sign(v2).unwrap()))
            .await
            .unwrap();
        assert!(matches!(r, Response::PolicySet { version: 2 }), "{r:?}");
        let started = std::time::Instant::now();
        while c.status(1).await.map(|s| s.policy_version).unwrap_or(0) != 2 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "us never adopted version 2"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            lattice_tests::read_value(&us, &key("eu/x")).await.is_err(),
            "us reads eu/x"
        );
        let (all, _) = scan_all(std::slice::from_ref(&us), "", 1_000).await;
        let keys: Vec<_> = all.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["open"], "us scanned a key it may not read");
    });
}
