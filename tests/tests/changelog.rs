//! The durable change log against real nodes: local writes and merges of
//! remote ones are logged with their origin, op id and stamps; a reader
//! resumes from a cursor without gaps or repeats, across a crash; joining a
//! key's logged deltas gives its state; retention drops the oldest changes
//! and a reader of a dropped position is told so; point-in-time reads; and
//! `latticed replay` rebuilds a store whose digest equals the live one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lattice_client::{Client, Error, LogConsumer};
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::log::{LogCursor, Logged};
use lattice_core::proto::client::WriteConcern;
use lattice_server::storage::Durability;
use lattice_tests::{key, read_value, runtime, serial, Cluster};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn reg(s: &str) -> Op {
    Op::LwwSet(Bytes::from(s))
}

/// Every change of node `i`'s log after `from`, page by page (`limit` per
/// page), and the cursor after them.
async fn read_all(c: &Client, i: usize, from: Option<LogCursor>, prefix: &str, limit: u32) -> (Vec<Logged>, LogCursor) {
    let mut cursor = from;
    let mut out = Vec::new();
    loop {
        let page = c
            .log_read(i, &[], cursor.clone(), prefix, limit, Duration::ZERO)
            .await
            .unwrap();
        assert!(page.changes.len() <= limit as usize);
        let moved = cursor.as_ref() != Some(&page.next);
        let empty = page.changes.is_empty();
        out.extend(page.changes);
        cursor = Some(page.next);
        if empty && !moved {
            return (out, cursor.unwrap_or_default());
        }
    }
}

/// Each partition's changes are numbered without gaps or repeats from
/// where the reader started.
fn assert_contiguous(changes: &[Logged]) {
    let mut last: BTreeMap<u16, u64> = BTreeMap::new();
    for c in changes {
        if let Some(prev) = last.insert(c.partition, c.seq) {
            assert_eq!(
                c.seq,
                prev + 1,
                "partition {} jumps from {prev} to {}",
                c.partition,
                c.seq
            );
        }
    }
}

/// Joins each key's logged deltas and compares with what the node reads.
async fn assert_replays_to_state(c: &Client, changes: &[Logged]) {
    let mut by_key: BTreeMap<String, Vec<lattice_core::log::Change>> = BTreeMap::new();
    for l in changes {
        by_key
            .entry(l.change.key.as_str().to_string())
            .or_default()
            .push(l.change.clone());
    }
    for (k, cs) in by_key {
        assert!(cs[0].first, "{k}'s first logged change is not marked first");
        let replayed = lattice_core::log::replay(&cs).map(|v| v.view());
        let live = read_value(c, &key(&k)).await.unwrap();
        assert_eq!(replayed, live, "{k}: joining its {} logged deltas", cs.len());
    }
}

#[test]
fn log_holds_local_and_remote_changes_and_a_cursor_resumes_without_gaps() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let us = c.client(1).unwrap();
        for i in 0..30 {
            eu.write(vec![(key(&format!("log/r{}", i % 7)), reg(&format!("v{i}")))])
                .await
                .unwrap();
            eu.write(vec![(key("log/count"), Op::CounterAdd(i))]).await.unwrap();
        }
        let set = key("log/set");
        eu.write(vec![(
            set.clone(),
            Op::SetAdd(vec![Bytes::from("a"), Bytes::from("b")]),
        )])
        .await
        .unwrap();
        eu.write(vec![(set.clone(), Op::SetRemove(vec![Bytes::from("a")]))])
            .await
            .unwrap();
        us.write_with(
            vec![(key("log/from-us"), reg("x"))],
            WriteConcern::Regions(2),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        c.wait_converged(Duration::from_secs(30)).await.unwrap();

        // eu's log: its 62 local writes, with op ids, and us's one, merged.
        let (all, end) = read_all(&eu, 0, None, "log/", 7).await;
        assert_contiguous(&all);
        let local: Vec<_> = all.iter().filter(|l| l.change.origin.0 == "eu").collect();
        assert_eq!(local.len(), 62, "eu's local changes");
        assert!(local
            .iter()
            .all(|l| l.change.op.is_some() && l.change.written.is_some()));
        let remote: Vec<_> = all.iter().filter(|l| l.change.origin.0 == "us").collect();
        assert_eq!(remote.len(), 1, "{remote:?}");
        assert!(remote[0].change.op.is_none());
        let gseqs: HashSet<u64> = all.iter().map(|l| l.gseq).collect();
        assert_eq!(gseqs.len(), all.len(), "node-wide numbers repeat");
        assert_replays_to_state(&eu, &all).await;

        // us's log has eu's changes as merges (maybe joined into fewer).
        let (us_all, _) = read_all(&us, 0, None, "log/", 1_000).await;
        assert!(us_all.iter().any(|l| l.change.origin.0 == "eu"));
        assert_replays_to_state(&us, &us_all).await;

        // A reader resuming from a cursor in the middle sees exactly the rest.
        let page = eu.log_read(0, &[], None, "log/", 20, Duration::ZERO).await.unwrap();
        let (rest, _) = read_all(&eu, 0, Some(page.next.clone()), "log/", 9).await;
        let mut seen: Vec<(u16, u64)> = page.changes.iter().chain(&rest).map(|l| (l.partition, l.seq)).collect();
        let mut want: Vec<(u16, u64)> = all.iter().map(|l| (l.partition, l.seq)).collect();
        seen.sort();
        want.sort();
        assert_eq!(seen, want, "first page and the rest differ from the whole log");

        // A prefix filter, one partition, and a wait for the next change.
        let (only, _) = read_all(&eu, 0, None, "log/set", 1_000).await;
        assert_eq!(only.len(), 2);
        let p = only[0].partition;
        let part = eu.log_read(0, &[p], None, "", 1_000, Duration::ZERO).await.unwrap();
        assert!(part.changes.iter().all(|l| l.partition == p));
        let waiter = {
            let end = end.clone();
            let eu = c.client(0).unwrap();
            tokio::spawn(async move { eu.log_read(0, &[], Some(end), "log/", 10, Duration::from_secs(4)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        eu.write(vec![(key("log/late"), reg("z"))]).await.unwrap();
        let late = waiter.await.unwrap().unwrap();
        assert_eq!(late.changes.len(), 1, "the waiting read did not get the new change");
        assert_eq!(late.changes[0].change.key.as_str(), "log/late");

        // Bad cursors are refused with a clear error.
        let other = LogCursor { log: 42, next: vec![] };
        let e = eu
            .log_read(0, &[], Some(other), "", 10, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Trimmed(ref m) if m.contains("another node")), "{e}");
        let e = eu.log_read(0, &[999], None, "", 10, Duration::ZERO).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
    });
}

#[test]
fn log_keeps_every_acknowledged_write_across_a_crash_and_a_consumer_resumes() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let mut acked = Vec::new();
        for i in 0..200 {
            let k = key(&format!("crash/{}", i % 13));
            eu.write(vec![(k, reg(&format!("{i}")))]).await.unwrap();
            acked.push(i);
        }
        // A consumer reads half and commits its checkpoint.
        {
            let mut consumer = LogConsumer::open(&eu, 0, "crash-test", "crash/", &[]).await.unwrap();
            consumer.page = 10;
            for _ in 0..100 {
                consumer.next().await.unwrap().unwrap();
            }
            consumer.commit().await.unwrap();
        }
        c.kill(0).unwrap();
        c.restart(0).unwrap();
        c.wait_serving(0, Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let (all, _) = read_all(&eu, 0, None, "crash/", 1_000).await;
        assert_contiguous(&all);
        assert_eq!(all.len(), 200, "acknowledged writes missing from the log after a crash");
        assert_replays_to_state(&eu, &all).await;
        // Resumed after the restart, the consumer gets exactly the second half.
        let mut consumer = LogConsumer::open(&eu, 0, "crash-test", "crash/", &[]).await.unwrap();
        consumer.wait = Duration::ZERO;
        let mut rest = Vec::new();
        while let Some(l) = consumer.next().await.unwrap() {
            rest.push(l);
        }
        assert_eq!(rest.len(), 100, "the consumer did not resume at its checkpoint");
        let first_half: HashSet<(u16, u64)> = all.iter().map(|l| (l.partition, l.seq)).collect();
        assert!(rest.iter().all(|l| first_half.contains(&(l.partition, l.seq))));
    });
}

#[test]
fn log_retention_drops_the_oldest_and_a_reader_of_a_dropped_position_is_told() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start_with(bin(), &["eu"], Durability::Group, |_, cfg| {
            cfg.log.retention_bytes = 64 << 10;
        })
        .unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let start = eu.log_read(0, &[], None, "", 1, Duration::ZERO).await.unwrap();
        let value = "x".repeat(500);
        for i in 0..400 {
            eu.write(vec![(key(&format!("ret/{i}")), reg(&value))]).await.unwrap();
        }
        let first = LogCursor {
            log: start.next.log,
            next: vec![0; start.partitions as usize],
        };
        let e = eu
            .log_read(0, &[], Some(first), "", 10, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Trimmed(ref m) if m.contains("retention")), "{e}");
        // From the start of what is retained: about 64 KiB of changes.
        let (kept, _) = read_all(&eu, 0, None, "ret/", 1_000).await;
        assert!((60..200).contains(&kept.len()), "{} changes kept", kept.len());
        // The metrics are refreshed every engine tick.
        let mut trimmed = 0.0;
        for _ in 0..50 {
            trimmed = c.metric(0, "lattice_log_trimmed_total").unwrap();
            if trimmed >= 200.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(trimmed >= 200.0, "{trimmed} trimmed");
        let bytes = c.metric(0, "lattice_log_bytes").unwrap();
        assert!(bytes <= (64 << 10) as f64 + 4_096.0, "{bytes} bytes retained");
        // A key whose first change was dropped has no point-in-time value.
        let e = eu.get_at(0, &key("ret/0"), u64::MAX / 2).await.unwrap_err();
        assert!(matches!(e, Error::Trimmed(_)), "{e}");
    });
}

#[test]
fn log_point_in_time_reads_and_replay_rebuild_the_live_state() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(bin(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let k = key("pit/greeting");
        let before = now_ms();
        tokio::time::sleep(Duration::from_millis(20)).await;
        eu.write(vec![(k.clone(), reg("hello"))]).await.unwrap();
        eu.write(vec![(key("pit/n"), Op::CounterAdd(5))]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let middle = now_ms();
        tokio::time::sleep(Duration::from_millis(50)).await;
        eu.write(vec![(k.clone(), reg("goodbye"))]).await.unwrap();
        eu.write(vec![(key("pit/n"), Op::CounterAdd(-2))]).await.unwrap();
        let text = |v: Option<ValueView>| match v {
            Some(ValueView::Register(Some(b))) => String::from_utf8_lossy(&b.0).into_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(eu.get_at(0, &k, before).await.unwrap(), None);
        assert_eq!(text(eu.get_at(0, &k, middle).await.unwrap()), "hello");
        assert_eq!(text(eu.get_at(0, &k, now_ms() + 1_000).await.unwrap()), "goodbye");
        assert_eq!(
            eu.get_at(0, &key("pit/n"), middle).await.unwrap(),
            Some(ValueView::Counter(5))
        );
        assert_eq!(
            eu.get_at(0, &key("pit/n"), now_ms()).await.unwrap(),
            Some(ValueView::Counter(3))
        );
        assert_eq!(eu.get_at(0, &key("pit/never"), now_ms()).await.unwrap(), None);
        // On us, the same history arrived by replication.
        c.wait_converged(Duration::from_secs(30)).await.unwrap();
        let us = c.client(1).unwrap();
        assert_eq!(text(us.get_at(0, &k, now_ms() + 1_000).await.unwrap()), "goodbye");
        let e = us.get_at(1, &k, 0).await.unwrap_err();
        assert!(matches!(e, Error::Config(ref m) if m.contains("node index 1")), "{e}");

        // More keys of every kind, then replay the stopped node's log.
        for i in 0..50 {
            eu.write(vec![
                (
                    key(&format!("pit/s{}", i % 5)),
                    Op::SetAdd(vec![Bytes::from(format!("e{i}").as_str())]),
                ),
                (
                    key(&format!("pit/m{}", i % 3)),
                    Op::MvSet(Bytes::from(format!("m{i}").as_str())),
                ),
            ])
            .await
            .unwrap();
            if i % 7 == 0 {
                eu.write(vec![(
                    key(&format!("pit/s{}", i % 5)),
                    Op::SetRemove(vec![Bytes::from(format!("e{i}").as_str())]),
                )])
                .await
                .unwrap();
            }
        }
        c.wait_converged(Duration::from_secs(30)).await.unwrap();
        c.stop(0).unwrap();
        let data = c.config(0).unwrap().data_dir;
        let rebuilt = data.with_file_name("rebuilt");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(bin()).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let d = data.to_str().unwrap();
        let r = rebuilt.to_str().unwrap();
        let said = run(&["replay", "--data-dir", d, "--to", r]);
        assert!(said.contains("0 keys left out"), "{said}");
        let live = run(&["digest", "--data-dir", d]);
        let replayed = run(&["digest", "--data-dir", r]);
        assert_eq!(live, replayed, "the replayed store differs from the live one");
        assert!(live.contains(" 10 keys"), "{live}");
        // Replaying up to the middle gives the state then.
        let early = data.with_file_name("early");
        run(&[
            "replay",
            "--data-dir",
            d,
            "--to",
            early.to_str().unwrap(),
            "--until",
            &middle.to_string(),
            "--prefix",
            "pit/",
        ]);
        let early_digest = run(&["digest", "--data-dir", early.to_str().unwrap()]);
        assert!(early_digest.contains(" 2 keys"), "{early_digest}");
        // An existing target is refused.
        let out = std::process::Command::new(bin())
            .args(["replay", "--data-dir", d, "--to", r])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    });
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The largest and most hostile log reads a client may send are answered
/// or refused, and the node serves on: a huge limit and wait, every
/// partition listed over and over (1,024 entries), a cursor of 1,024
/// positions at u64::MAX, a prefix of the longest key, and pages of
/// changes of nearly 1 MiB each stay within the answer frame.
#[test]
fn log_hostile_reads_are_answered_or_refused_and_the_node_serves_on() {
    let _g = serial();
    runtime().block_on(async {
        let c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        for i in 0..50 {
            eu.write(vec![(key(&format!("hostile/{i}")), reg("v"))]).await.unwrap();
        }
        // A huge limit is clamped; a huge wait is not waited on a log with changes.
        let page = eu
            .log_read(0, &[], None, "hostile/", u32::MAX, Duration::MAX)
            .await
            .unwrap();
        assert_eq!(page.changes.len(), 50);
        let n = page.partitions;
        // Every partition, listed again and again: no change twice.
        let many: Vec<u16> = (0..1_024u16).map(|i| i % n).collect();
        let again = eu
            .log_read(0, &many, None, "hostile/", 1_000, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(again.changes.len(), 50);
        assert_eq!(again.next, page.next);
        let too_many: Vec<u16> = vec![0; 1_025];
        let e = eu
            .log_read(0, &too_many, None, "", 1, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
        // A cursor of 1,024 positions at u64::MAX: past the end where asked,
        // ignored where not.
        let mut hostile = LogCursor {
            log: page.next.log,
            next: vec![u64::MAX; 1_024],
        };
        let e = eu
            .log_read(0, &[], Some(hostile.clone()), "", 10, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
        hostile.next[0] = 0;
        let one = eu
            .log_read(0, &[0], Some(hostile), "", 1_000, Duration::ZERO)
            .await
            .unwrap();
        assert!(one.changes.iter().all(|l| l.partition == 0));
        assert_eq!(one.next.next.len(), n as usize);
        // The longest prefix a key may have, and one byte more.
        let longest = "p".repeat(lattice_core::MAX_KEY_LEN);
        let empty = eu
            .log_read(0, &[], None, &longest, 1_000, Duration::ZERO)
            .await
            .unwrap();
        assert!(empty.changes.is_empty());
        let e = eu
            .log_read(0, &[], None, &format!("{longest}p"), 1, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
        // Changes of nearly 1 MiB each: pages stay within the answer frame.
        let big = "b".repeat(1_000_000);
        for i in 0..12 {
            eu.write(vec![(key(&format!("big/{i}")), reg(&big))]).await.unwrap();
        }
        let (all, _) = read_all(&eu, 0, None, "big/", 1_000).await;
        assert_eq!(all.len(), 12);
        eu.write(vec![(key("hostile/after"), reg("still serving"))])
            .await
            .unwrap();
    });
}

/// An asynchronous node acknowledges and logs a change before it reaches
/// the disk, and a reader may see it: a crash can lose that tail of the
/// log, and the positions it held then number other changes. A cursor of
/// the old numbering must be refused (re-read the state), never resume at
/// positions that now hold other changes and skip the ones before them.
#[test]
fn log_of_an_async_node_that_crashed_refuses_cursors_of_its_last_life() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(bin(), &["eu"], Durability::Async).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        for i in 0..100 {
            eu.write(vec![(key(&format!("acrash/{i}")), reg("before"))])
                .await
                .unwrap();
        }
        let (seen, cursor) = read_all(&eu, 0, None, "", 1_000).await;
        assert!(seen.len() >= 100);
        c.kill(0).unwrap();
        c.restart(0).unwrap();
        c.wait_serving(0, Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        for i in 0..100 {
            eu.write(vec![(key(&format!("acrash2/{i}")), reg("after"))])
                .await
                .unwrap();
        }
        match eu
            .log_read(0, &[], Some(cursor.clone()), "", 1_000, Duration::ZERO)
            .await
        {
            Err(Error::Trimmed(m)) => assert!(m.contains("re-read the state"), "{m}"),
            Ok(_) => {
                let (after, _) = read_all(&eu, 0, Some(cursor), "acrash2/", 1_000).await;
                panic!(
                    "the cursor of the crashed life was taken: {} of 100 changes after the crash read from it",
                    after.len()
                );
            }
            Err(e) => panic!("{e}"),
        }
        // Read from the start, the log holds every change of the new life.
        let (all, _) = read_all(&eu, 0, None, "acrash2/", 1_000).await;
        assert_eq!(all.len(), 100);
    });
}

/// kill -9 while writes are in flight, under group commit: after the
/// restart every acknowledged write is in the log, and `latticed replay`
/// of the log rebuilds a store whose digest equals the live one.
#[test]
fn log_replay_matches_the_live_store_after_a_kill_mid_write() {
    let _g = serial();
    runtime().block_on(async {
        let mut c = Cluster::start(bin(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let acked = acked.clone();
            tokio::spawn(async move {
                for i in 0..100_000u64 {
                    let k = format!("mid/{}", i % 97);
                    match eu.write(vec![(key(&k), Op::CounterAdd(1))]).await {
                        Ok(_) => acked.lock().unwrap().push(k),
                        Err(_) => return,
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.kill(0).unwrap();
        let _ = writer.await;
        let acked = acked.lock().unwrap().clone();
        assert!(acked.len() > 10, "{} writes acknowledged", acked.len());
        c.restart(0).unwrap();
        c.wait_serving(0, Duration::from_secs(20)).await.unwrap();
        let eu = c.client(0).unwrap();
        let (all, _) = read_all(&eu, 0, None, "mid/", 1_000).await;
        assert!(
            all.len() >= acked.len(),
            "{} logged, {} acknowledged",
            all.len(),
            acked.len()
        );
        c.stop(0).unwrap();
        let data = c.config(0).unwrap().data_dir;
        let rebuilt = data.with_file_name("mid-rebuilt");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(bin()).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let (d, r) = (data.to_str().unwrap(), rebuilt.to_str().unwrap());
        let said = run(&["replay", "--data-dir", d, "--to", r, "--prefix", "mid/"]);
        assert!(said.contains("0 keys left out"), "{said}");
        assert_eq!(
            run(&["digest", "--data-dir", d, "--prefix", "mid/"]),
            run(&["digest", "--data-dir", r, "--prefix", "mid/"]),
            "the replayed store differs from the live one after a crash"
        );
    });
}
