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
use lattice_tests::{key, runtime, serial, Cluster};
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
