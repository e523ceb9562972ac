//! The RabbitMQ exporter (`lattice-export`, issue 17) against real
//! `latticed` processes and a real broker: every change arrives, in each
//! key's order, across a SIGKILL of the exporter; duplicates are only
//! redeliveries of one position; and while the broker is unreachable the
//! node goes on writing and the exporter reports its lag.
//!
//! The broker is RabbitMQ at `LATTICE_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; `.ci/run` starts one). Without
//! a reachable broker the tests say so and pass, unless
//! `LATTICE_REQUIRE_RABBITMQ` is set (CI sets it), when they fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::await_holding_lock)]

use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use lattice_core::crdt::Op;
use lattice_core::log::{LogCursor, Logged};
use lattice_export::{ExportedChange, CHECKPOINT_PREFIX, PERSISTENT};
use lattice_server::storage::Durability;
use lattice_tests::{http_get, key, runtime, serial, Cluster};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn latticed() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

fn amqp_url() -> String {
    std::env::var("LATTICE_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A channel on the test broker, or `None` (after saying why) when there is
/// none and none is required.
async fn broker() -> Option<(Connection, Channel)> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    let conn = tokio::time::timeout(Duration::from_secs(10), Connection::connect(&amqp_url(), props)).await;
    match conn {
        Ok(Ok(conn)) => {
            let ch = conn.create_channel().await.expect("a channel on the test broker");
            Some((conn, ch))
        }
        Ok(Err(e)) => no_broker(&e.to_string()),
        Err(_) => no_broker("the connection timed out"),
    }
}

fn no_broker(why: &str) -> Option<(Connection, Channel)> {
    if std::env::var_os("LATTICE_REQUIRE_RABBITMQ").is_some() {
        panic!(
            "LATTICE_REQUIRE_RABBITMQ is set and no RabbitMQ answers at {}: {why}",
            amqp_url()
        );
    }
    eprintln!(
        "SKIPPED: no RabbitMQ at {} ({why}); install and start rabbitmq-server (as .ci/run does), \
         or set LATTICE_REQUIRE_RABBITMQ=1 to make this a failure",
        amqp_url()
    );
    None
}

/// A name no other run uses.
fn unique(what: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("lattice.test.{what}.{}.{t}", std::process::id())
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running `lattice-export`.
struct Exporter {
    child: Child,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Exporter {
    fn start(c: &Cluster, url: &str, exchange: &str, name: &str, extra: &[&str]) -> Exporter {
        let metrics = free_port();
        let log = c.dir.path().join(format!("export-{}.log", unique("run")));
        let child = Command::new(env!("CARGO_BIN_EXE_lattice-export-test"))
            .args(["--endpoint", &c.endpoint(0).to_string()])
            .args(["--token", &c.defaults.token])
            .arg("--ca")
            .arg(&c.defaults.ca)
            .args([
                "--amqp-url",
                url,
                "--exchange",
                exchange,
                "--queue",
                exchange,
                "--name",
                name,
            ])
            .args([
                "--metrics-addr",
                &metrics.to_string(),
                "--lag-interval-ms",
                "200",
                "--report-interval-s",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Exporter { child, metrics, log }
    }

    /// A metric's value (`None`: not serving yet).
    fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.metrics, "/metrics", None).ok()?.body;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until `ok` holds of metric `name`, or panics with the log.
    async fn wait_metric(&mut self, name: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let end = Instant::now() + within;
        loop {
            if let Some(v) = self.metric(name).filter(|&v| ok(v)) {
                return v;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the exporter exited ({status}) waiting on {name}:\n{}", self.logs());
            }
            if Instant::now() > end {
                panic!("{name} = {:?} after {within:?}:\n{}", self.metric(name), self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or checkpoint anything.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.logs()
    }
}

/// Every change of node 0's log the exporter would publish, in log order
/// per partition, with the log's id.
async fn whole_log(c: &Cluster) -> (u64, Vec<Logged>) {
    let client = c.client(0).unwrap();
    let (mut from, mut all) = (None::<LogCursor>, Vec::new());
    loop {
        let page = client
            .log_read(0, &[], from.clone(), "", 1_000, Duration::ZERO)
            .await
            .unwrap();
        let done = page.changes.is_empty() && from.as_ref() == Some(&page.next);
        all.extend(
            page.changes
                .into_iter()
                .filter(|l| !l.change.key.as_str().starts_with(CHECKPOINT_PREFIX)),
        );
        if done {
            return (page.next.log, all);
        }
        from = Some(page.next);
    }
}

/// Takes every message from `queue`, checking that its headers and
/// properties agree with its body.
async fn drain(ch: &Channel, queue: &str) -> Vec<ExportedChange> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(queue, BasicGetOptions { no_ack: true }).await.unwrap() {
        let d = &m.delivery;
        let change = ExportedChange::decode(&d.data).unwrap();
        let p = &d.properties;
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT), "a transient message");
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str().to_string()),
            Some(change.message_id())
        );
        let headers = p.headers().as_ref().expect("headers").inner();
        let text = |k: &str| match headers.get(k) {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            None => None,
            other => panic!("header {k} is {other:?}"),
        };
        assert_eq!(text("lattice-op"), change.op, "the op id header and the body disagree");
        assert_eq!(text("lattice-key").as_deref(), Some(change.key.as_str()));
        assert_eq!(
            headers.get("lattice-seq"),
            Some(&AMQPValue::LongLongInt(change.seq as i64))
        );
        assert_eq!(d.routing_key.as_str(), change.partition.to_string());
        out.push(change);
    }
    out
}

/// What the broker received, checked against the log.
#[derive(Debug)]
struct Verdict {
    messages: usize,
    distinct: usize,
    duplicates: usize,
}

/// The export's promise: every logged change arrived; each message is
/// exactly its position's change (so two messages of one position carry
/// the same op id and content); and, ignoring redeliveries, each key's and
/// each partition's changes arrived in log order.
fn check(log_id: u64, log: &[Logged], got: &[ExportedChange]) -> Result<Verdict, String> {
    let by_pos: BTreeMap<(u16, u64), ExportedChange> = log
        .iter()
        .map(|l| ((l.partition, l.seq), ExportedChange::new(log_id, l)))
        .collect();
    let mut seen = BTreeSet::new();
    let mut last_new: BTreeMap<u16, u64> = BTreeMap::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in got {
        let pos = (m.partition, m.seq);
        let Some(want) = by_pos.get(&pos) else {
            return Err(format!("{} is no exported position of the log", m.message_id()));
        };
        if want != m {
            return Err(format!(
                "{} differs from the log's change there (op {:?} vs {:?})",
                m.message_id(),
                m.op,
                want.op
            ));
        }
        if !seen.insert(pos) {
            continue; // A redelivery: its content was just checked.
        }
        if let Some(&prev) = last_new.get(&m.partition) {
            if m.seq <= prev {
                return Err(format!("partition {}: {} arrived after {prev}", m.partition, m.seq));
            }
        }
        last_new.insert(m.partition, m.seq);
        per_key.entry(m.key.clone()).or_default().push(m.seq);
    }
    if seen.len() != by_pos.len() {
        let missing: Vec<_> = by_pos.keys().filter(|p| !seen.contains(p)).take(5).collect();
        return Err(format!(
            "{} distinct positions arrived, the log has {} (missing e.g. {missing:?})",
            seen.len(),
            by_pos.len()
        ));
    }
    let mut want_per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut sorted: Vec<&Logged> = log.iter().collect();
    sorted.sort_by_key(|l| (l.partition, l.seq));
    for l in sorted {
        want_per_key
            .entry(l.change.key.as_str().to_string())
            .or_default()
            .push(l.seq);
    }
    if per_key != want_per_key {
        return Err("some key's changes arrived out of order".into());
    }
    Ok(Verdict {
        messages: got.len(),
        distinct: seen.len(),
        duplicates: got.len() - seen.len(),
    })
}

/// The checker catches a dropped message, a reordering within a key and a
/// redelivery whose op id changed.
fn checker_catches_planted_faults(log_id: u64, log: &[Logged], got: &[ExportedChange]) {
    let mut dropped = got.to_vec();
    let victim = dropped
        .iter()
        .rposition(|m| got.iter().filter(|o| o.message_id() == m.message_id()).count() == 1);
    dropped.remove(victim.expect("a message delivered once"));
    assert!(check(log_id, log, &dropped).is_err(), "a dropped message went unseen");

    let mut swapped = got.to_vec();
    let (i, j) = (0..swapped.len())
        .flat_map(|i| (i + 1..swapped.len()).map(move |j| (i, j)))
        .find(|&(i, j)| swapped[i].key == swapped[j].key && swapped[i].seq != swapped[j].seq)
        .expect("a key with two changes");
    swapped.swap(i, j);
    assert!(check(log_id, log, &swapped).is_err(), "a reordering went unseen");

    let mut relabelled = got.to_vec();
    let mut copy = relabelled[0].clone();
    copy.op = Some("ffffffffffffffffffffffffffffffff".into());
    relabelled.push(copy);
    assert!(
        check(log_id, log, &relabelled).is_err(),
        "a duplicate with another op id went unseen"
    );
}

/// Writes `n` changes from node `node` over 40 keys (counters and
/// registers), `tasks` writers at once.
async fn write_load(c: &Cluster, node: usize, n: usize, tag: &str) {
    let client = std::sync::Arc::new(c.client(node).unwrap());
    let tasks = 4;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (client, tag) = (client.clone(), tag.to_string());
        handles.push(tokio::spawn(async move {
            for i in (t..n).step_by(tasks) {
                let k = i % 40;
                let op = if k % 2 == 0 {
                    (key(&format!("c/{k}")), Op::CounterAdd(1))
                } else {
                    (
                        key(&format!("r/{k}")),
                        Op::LwwSet(format!("{tag}-{i}").into_bytes().into()),
                    )
                };
                client.write(vec![op]).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Messages waiting in `queue`.
async fn queued(ch: &Channel, queue: &str) -> usize {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue, passive, FieldTable::default())
        .await
        .unwrap()
        .message_count() as usize
}

async fn remove(ch: &Channel, name: &str) {
    let _ = ch.queue_delete(name, QueueDeleteOptions::default()).await;
    let _ = ch.exchange_delete(name, ExchangeDeleteOptions::default()).await;
}

#[test]
fn export_survives_sigkill_and_delivers_every_change_in_key_order() {
    let _g = serial();
    runtime().block_on(async {
        let Some((_conn, ch)) = broker().await else { return };
        let c = Cluster::start(latticed(), &["eu", "us"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let name = unique("export");
        // Some history before the exporter starts, some of it from the
        // other region (merged into node 0's log with origin us).
        write_load(&c, 0, 600, "a").await;
        write_load(&c, 1, 200, "b").await;

        let url = amqp_url();
        let mut first = Exporter::start(&c, &url, &name, &name, &["--batch", "25"]);
        let writing = write_load(&c, 0, 1_400, "c");
        let killed_at = {
            let kill_when_busy = first.wait_metric("lattice_export_confirmed_total", Duration::from_secs(60), |v| {
                v >= 300.0
            });
            let (_, at) = tokio::join!(writing, kill_when_busy);
            at
        };
        // The writes ran meanwhile; kill the exporter in the middle of its work.
        let log1 = first.kill();
        eprintln!("killed the exporter after {killed_at} confirmed");

        let mut second = Exporter::start(&c, &url, &name, &name, &["--batch", "25"]);
        write_load(&c, 1, 200, "d").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.wait_converged(Duration::from_secs(30)).await.unwrap();
        let (log_id, log) = whole_log(&c).await;
        let end = Instant::now() + Duration::from_secs(60);
        while queued(&ch, &name).await < log.len() {
            assert!(
                Instant::now() < end,
                "{} messages for {} changes:\n{}",
                queued(&ch, &name).await,
                log.len(),
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Lag 0: the checkpoint covers the log, everything was confirmed.
        second
            .wait_metric("lattice_export_lag_changes", Duration::from_secs(30), |v| v == 0.0)
            .await;
        let log2 = second.kill();
        let got = drain(&ch, &name).await;
        remove(&ch, &name).await;

        let verdict =
            check(log_id, &log, &got).unwrap_or_else(|e| panic!("{e}\nfirst run:\n{log1}\nsecond run:\n{log2}"));
        eprintln!("{verdict:?} (log: {} changes)", log.len());
        assert_eq!(verdict.distinct, log.len());
        assert_eq!(verdict.messages, verdict.distinct + verdict.duplicates);
        assert!(
            log.iter().any(|l| l.change.origin.0 == "us"),
            "no remote change in the log"
        );
        assert!(log.iter().any(|l| l.change.op.is_some()), "no op id in the log");
        assert!(
            log2.contains("checkpoint="),
            "the second run did not say where it resumed:\n{log2}"
        );
        assert!(
            !log2.contains("none (from the oldest retained)"),
            "the second run did not resume:\n{log2}"
        );
        checker_catches_planted_faults(log_id, &log, &got);
    });
}

#[test]
fn export_lags_and_reports_it_while_the_broker_is_down_and_the_node_never_waits() {
    let _g = serial();
    runtime().block_on(async {
        let Some((_conn, ch)) = broker().await else { return };
        let c = Cluster::start(latticed(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let name = unique("export-down");
        // A broker that accepts connections and never answers: connects time out.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
        let backoff = [
            "--confirm-timeout-ms",
            "300",
            "--min-backoff-ms",
            "50",
            "--max-backoff-ms",
            "200",
        ];
        let mut down = Exporter::start(&c, &dead, &name, &name, &backoff);

        let t = Instant::now();
        write_load(&c, 0, 300, "x").await;
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(20),
            "300 writes took {took:?} with the broker down"
        );
        down.wait_metric("lattice_export_lag_changes", Duration::from_secs(30), |v| v >= 300.0)
            .await;
        down.wait_metric("lattice_export_lag_ms", Duration::from_secs(30), |v| v >= 500.0)
            .await;
        down.wait_metric("lattice_export_retries_total", Duration::from_secs(30), |v| v >= 3.0)
            .await;
        assert_eq!(down.metric("lattice_export_broker_up"), Some(0.0));
        assert_eq!(down.metric("lattice_export_confirmed_total"), Some(0.0));
        let logs = down.kill();
        assert!(
            logs.contains("retrying from the checkpoint"),
            "no retry logged:\n{logs}"
        );
        assert!(logs.contains("export progress"), "no progress line logged:\n{logs}");
        drop(silent);

        // The broker is back: everything goes out and the lag returns to 0.
        let mut up = Exporter::start(&c, &amqp_url(), &name, &name, &[]);
        up.wait_metric("lattice_export_confirmed_total", Duration::from_secs(30), |v| {
            v >= 300.0
        })
        .await;
        up.wait_metric("lattice_export_lag_changes", Duration::from_secs(30), |v| v == 0.0)
            .await;
        up.wait_metric("lattice_export_broker_up", Duration::from_secs(5), |v| v == 1.0)
            .await;
        let (log_id, log) = whole_log(&c).await;
        up.kill();
        let got = drain(&ch, &name).await;
        remove(&ch, &name).await;
        let verdict = check(log_id, &log, &got).unwrap();
        assert_eq!((verdict.distinct, verdict.duplicates), (300, 0), "{verdict:?}");
    });
}

/// The export rate: changes published and confirmed per second, from a
/// backlog of `LATTICE_EXPORT_BENCH_CHANGES` (default 20,000) changes on one
/// node, with the default batch (500) or `LATTICE_EXPORT_BENCH_BATCH`.
/// Run: `cargo test --release -p lattice-tests --test export export_rate -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run it by name"]
fn export_rate() {
    let _g = serial();
    runtime().block_on(async {
        let Some((_conn, ch)) = broker().await else { return };
        let n: usize = std::env::var("LATTICE_EXPORT_BENCH_CHANGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let batch = std::env::var("LATTICE_EXPORT_BENCH_BATCH").unwrap_or_else(|_| "500".into());
        let c = Cluster::start(latticed(), &["eu"], Durability::Group).unwrap();
        c.wait_ready(Duration::from_secs(30)).await.unwrap();
        let name = unique("export-rate");
        write_load(&c, 0, n, "v").await;
        let (_, log) = whole_log(&c).await;
        let t = Instant::now();
        let mut e = Exporter::start(&c, &amqp_url(), &name, &name, &["--batch", &batch]);
        let started = e
            .wait_metric("lattice_export_confirmed_total", Duration::from_secs(60), |v| v > 0.0)
            .await;
        let first = t.elapsed();
        e.wait_metric("lattice_export_confirmed_total", Duration::from_secs(600), |v| {
            v >= log.len() as f64
        })
        .await;
        let all = t.elapsed();
        e.kill();
        let queued = queued(&ch, &name).await;
        remove(&ch, &name).await;
        let steady = (log.len() as f64 - started) / (all - first).as_secs_f64();
        eprintln!(
            "export rate: {} changes (batch {batch}) confirmed in {:.2} s from the exporter's start = {:.0} changes/s; \
             {:.0} changes/s after the first confirm; {queued} messages in the queue",
            log.len(),
            all.as_secs_f64(),
            log.len() as f64 / all.as_secs_f64(),
            steady
        );
    });
}
