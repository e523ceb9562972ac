//! Chaos against real `latticed` processes (issue 13), once per durability
//! mode: three nodes whose peer links run through relays, two SDK clients
//! per node incrementing counters, adding and removing set elements and
//! writing registers, while a nemesis kills (SIGKILL) and restarts nodes,
//! pauses them (SIGSTOP/SIGCONT), isolates them and cuts single links. Then
//! everything heals, the nodes must report equal digests within
//! [`CONVERGE_WITHIN`], every key is read on every node, and
//! `lattice_tests::chaos::check` judges the history (what it demands is
//! documented there).
//!
//! The short run (CI) lasts [`CI_SECS`] of chaos per mode. The long run:
//! `LATTICE_CHAOS_SECS=600 cargo test -p lattice-tests --test chaos -- --nocapture`.
//! Every run prints its seed; `LATTICE_CHAOS_SEED=N` replays the same
//! nemesis schedule and client choices (the processes' timing still varies).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Each test owns its runtime; the std mutex only serializes the tests.
#![allow(clippy::await_holding_lock)]

use anyhow::{bail, Context, Result};
use lattice_client::Client;
use lattice_core::crdt::ValueView;
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::chaos::{
    check, excused_losses, History, Outcome, Seen, Violation, Write, WriteOp, ASYNC_LOSS_WINDOW,
};
use lattice_tests::relay::Mesh;
use lattice_tests::{serial, Cluster};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds of chaos per mode in the short run.
const CI_SECS: u64 = 20;
/// After the heal, the nodes must report equal digests within this.
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);
/// Counter keys: many, so that an increment applied twice is rarely masked
/// by an excused `async` loss on the same counter.
const COUNTERS: usize = 16;
/// Set keys and register keys.
const KEYS: usize = 4;
/// Adds go to a fresh generation of set keys this often, so that in a long
/// run no set outgrows a client frame (1 MiB) while its elements are read.
const SET_GENERATION: Duration = Duration::from_secs(30);
/// SDK clients per node.
const CLIENTS_PER_NODE: usize = 2;
/// Each call's timeout; a write retries on its node up to three times.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// One-way delay of every peer link.
const LINK_DELAY: Duration = Duration::from_millis(2);
const REGIONS: [&str; 3] = ["eu", "us", "ap"];

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_latticed-test"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sync() {
    chaos(Durability::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_group() {
    chaos(Durability::Group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_async() {
    chaos(Durability::Async).await;
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// What happened when, for the failure report.
#[derive(Default)]
struct Timeline(Vec<(Duration, String)>);

impl Timeline {
    fn note(&mut self, start: Instant, what: String) {
        self.0.push((start.elapsed(), what));
    }
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (at, what) in &self.0 {
            writeln!(f, "  {:6} ms  {what}", at.as_millis())?;
        }
        Ok(())
    }
}

async fn chaos(mode: Durability) {
    let _g = serial();
    let seed = env_u64("LATTICE_CHAOS_SEED").unwrap_or_else(rand::random);
    let secs = env_u64("LATTICE_CHAOS_SECS").unwrap_or(CI_SECS);
    let name = format!("{mode:?}").to_lowercase();
    println!("chaos {name}: seed={seed} secs={secs}");
    let t = Instant::now();
    let mut timeline = Timeline::default();
    match run(mode, seed, Duration::from_secs(secs), &mut timeline).await {
        Ok(summary) => println!(
            "chaos {name}: ok in {:.1} s; {summary}\ntimeline:\n{timeline}",
            t.elapsed().as_secs_f64()
        ),
        Err(e) => panic!(
            "chaos {name} failed (reproduce the schedule: LATTICE_CHAOS_SEED={seed} LATTICE_CHAOS_SECS={secs} \
             cargo test -p lattice-tests --test chaos chaos_{name}):\n{e:#}\ntimeline:\n{timeline}"
        ),
    }
}

/// One run; returns a summary line, or the failure with what it found.
async fn run(mode: Durability, seed: u64, secs: Duration, timeline: &mut Timeline) -> Result<String> {
    let mut cluster = Cluster::prepare(bin(), &REGIONS, mode)?;
    let mesh = Mesh::install(&cluster, LINK_DELAY).await?;
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = spawn_clients(&cluster, seed, start, &stop)?;
    let mut kills = Vec::new();
    let faults = nemesis(&mut cluster, &mesh, &mut rng, start, secs, timeline, &mut kills).await;
    stop.store(true, Ordering::SeqCst);
    let mut writes = Vec::new();
    for w in workers {
        writes.extend(w.await?);
    }
    timeline.note(start, format!("clients stopped after {} writes", writes.len()));
    faults?;

    // Heal: every link up, every node running and thawed.
    mesh.heal();
    for i in 0..REGIONS.len() {
        if cluster.is_running(i) {
            cluster.resume(i)?;
        }
    }
    cluster.start_all()?;
    timeline.note(start, "healed".into());
    let healed = Instant::now();
    let ran = start.elapsed();
    let finals = converge_and_read(&cluster, ran).await?;
    let converged = healed.elapsed();
    timeline.note(start, "converged and read".into());

    let history = History {
        writes,
        kills,
        loss_window: (mode == Durability::Async).then_some(ASYNC_LOSS_WINDOW),
    };
    let violations = check(&history, &finals);
    let stats = Stats::of(&history, &finals[0]);
    if !violations.is_empty() {
        bail!("{}", report(&violations, &stats, &finals[0]));
    }
    Ok(format!(
        "{stats}; converged and read {} ms after the heal",
        converged.as_millis()
    ))
}

/// Starts [`CLIENTS_PER_NODE`] writing clients per node; each returns its
/// writes once `stop` is set.
fn spawn_clients(
    cluster: &Cluster,
    seed: u64,
    start: Instant,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<tokio::task::JoinHandle<Vec<Write>>>> {
    let acked_adds = Arc::new(Mutex::new(Vec::new()));
    let ca = std::fs::read_to_string(&cluster.defaults.ca)?;
    let mut workers = Vec::new();
    for node in 0..REGIONS.len() {
        for k in 0..CLIENTS_PER_NODE {
            let id = node * CLIENTS_PER_NODE + k;
            let client = Client::new(
                vec![cluster.defaults.endpoints[node]],
                cluster.defaults.token.clone(),
                &ca,
            )?
            .with_timeout(CALL_TIMEOUT);
            let w = Worker {
                id,
                node,
                client,
                rng: ChaCha8Rng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                start,
                acked_adds: acked_adds.clone(),
            };
            workers.push(tokio::spawn(w.run(stop.clone())));
        }
    }
    Ok(workers)
}

/// The failure message: every violation (the first 30), and the final
/// counters and registers (sets by size).
fn report(violations: &[Violation], stats: &Stats, values: &BTreeMap<String, ValueView>) -> String {
    let mut report = format!("{} violations ({stats}):\n", violations.len());
    for v in violations.iter().take(30) {
        report.push_str(&format!("  {v}\n"));
    }
    report.push_str("final values at node 0:\n");
    for (k, v) in values {
        match Seen::decode(Some(v)) {
            Seen::Set(s) => report.push_str(&format!("  {k} = a set of {} elements\n", s.len())),
            seen => report.push_str(&format!("  {k} = {seen:?}\n")),
        }
    }
    report
}

/// Counts for the summary.
struct Stats {
    acked: usize,
    unknown: usize,
    kills: usize,
    excusable: usize,
    /// Acknowledged adds absent, and counters' shortfall, within the window.
    lost: (usize, i128),
}

impl Stats {
    fn of(h: &History, values: &BTreeMap<String, ValueView>) -> Stats {
        let acked = h
            .writes
            .iter()
            .filter(|w| matches!(w.outcome, Outcome::Acked { .. }))
            .count();
        Stats {
            acked,
            unknown: h.writes.len() - acked,
            kills: h.kills.len(),
            excusable: h.writes.iter().filter(|w| h.may_be_lost(w)).count(),
            lost: excused_losses(h, values),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writes acknowledged={} unknown={} kills={}; acknowledged within the async loss window={}, \
             of them lost: adds={} increments={}",
            self.acked, self.unknown, self.kills, self.excusable, self.lost.0, self.lost.1
        )
    }
}

/// One SDK client, bound to one node (so every acknowledgement names its
/// node), writing until told to stop.
struct Worker {
    id: usize,
    node: usize,
    client: Client,
    rng: ChaCha8Rng,
    start: Instant,
    /// `(set, element)` of acknowledged adds not yet chosen for a remove,
    /// shared by every worker.
    acked_adds: Arc<Mutex<Vec<(String, String)>>>,
}

impl Worker {
    async fn run(mut self, stop: Arc<AtomicBool>) -> Vec<Write> {
        let mut writes = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let op = self.next_op(n);
            let sent = self.start.elapsed();
            let result = match &op {
                WriteOp::Incr { key, by } => self.client.counter(key).incr(*by as i64).await,
                WriteOp::Add { key, elem } => self.client.set::<String>(key).add(elem).await,
                WriteOp::Remove { key, elem } => self.client.set::<String>(key).remove(elem).await,
                WriteOp::Set { key, value } => self.client.register::<String>(key).set(value).await,
            };
            let outcome = match result {
                Ok(()) => {
                    if let WriteOp::Add { key, elem } = &op {
                        self.acked_adds.lock().unwrap().push((key.clone(), elem.clone()));
                    }
                    Outcome::Acked {
                        at: self.start.elapsed(),
                    }
                }
                // Any error may come after the write left: its outcome is unknown.
                Err(e) => Outcome::Unknown { error: e.to_string() },
            };
            let failed = matches!(outcome, Outcome::Unknown { .. });
            writes.push(Write {
                client: self.id,
                node: self.node,
                sent,
                op,
                outcome,
            });
            if failed {
                // The node is down, paused or cut off: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        writes
    }

    /// The `n`th write: 40% increments, 25% adds, 10% removes of an
    /// acknowledged element (an add when there is none), 25% register writes.
    fn next_op(&mut self, n: u64) -> WriteOp {
        let tag = format!("w{}-{n}", self.id);
        let roll = self.rng.gen_range(0..100);
        if (65..75).contains(&roll) {
            let mut adds = self.acked_adds.lock().unwrap();
            if !adds.is_empty() {
                let i = self.rng.gen_range(0..adds.len());
                let (key, elem) = adds.swap_remove(i);
                return WriteOp::Remove { key, elem };
            }
        }
        match roll {
            0..40 => WriteOp::Incr {
                key: format!("chaos/c/{}", self.rng.gen_range(0..COUNTERS)),
                by: self.rng.gen_range(1..=5),
            },
            40..75 => WriteOp::Add {
                key: format!(
                    "chaos/s/{}-{}",
                    self.start.elapsed().as_secs() / SET_GENERATION.as_secs(),
                    self.rng.gen_range(0..KEYS)
                ),
                elem: tag,
            },
            _ => WriteOp::Set {
                key: format!("chaos/r/{}", self.rng.gen_range(0..KEYS)),
                value: tag,
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL a node, restart it after the hold.
    Kill,
    /// SIGSTOP a node, SIGCONT after the hold.
    Pause,
    /// Cut every link of a node.
    Isolate,
    /// Cut the link between two nodes.
    CutLink,
    /// Isolate a node so that its writes stay its own, kill it, restart it
    /// still isolated, then heal: what a crash loses cannot be on a peer.
    KillIsolated,
}

/// Injects faults one after another (each kind once per round, in a
/// shuffled order, a random node, held 0.5 to 2.5 s) for `secs`, healing
/// each before the next. Records every kill in `kills`. A fault takes at
/// most 2.5 s plus a 0.8 s gap (`KillIsolated` holds twice, plus 0.3 s), so
/// the fifth fault of the first round starts within about 16 s: the short
/// run's 20 s see every kind.
async fn nemesis(
    cluster: &mut Cluster,
    mesh: &Mesh,
    rng: &mut ChaCha8Rng,
    start: Instant,
    secs: Duration,
    timeline: &mut Timeline,
    kills: &mut Vec<(usize, Duration)>,
) -> Result<()> {
    let mut round = Vec::new();
    while start.elapsed() < secs {
        if round.is_empty() {
            round = vec![
                Fault::Kill,
                Fault::Pause,
                Fault::Isolate,
                Fault::CutLink,
                Fault::KillIsolated,
            ];
            round.shuffle(rng);
        }
        let fault = round.pop().context("a round has faults")?;
        let n = rng.gen_range(0..REGIONS.len());
        let hold = Duration::from_millis(rng.gen_range(500..=2_500));
        let sleep = tokio::time::sleep;
        match fault {
            Fault::Kill => {
                kill(cluster, n, start, timeline, kills)?;
                sleep(hold).await;
                cluster.restart(n)?;
                timeline.note(start, format!("restart n{n}"));
            }
            Fault::Pause => {
                cluster.pause(n)?;
                timeline.note(start, format!("pause n{n}"));
                sleep(hold).await;
                cluster.resume(n)?;
                timeline.note(start, format!("resume n{n}"));
            }
            Fault::Isolate => {
                mesh.isolate(n, true);
                timeline.note(start, format!("isolate n{n}"));
                sleep(hold).await;
                mesh.isolate(n, false);
                timeline.note(start, format!("heal n{n}"));
            }
            Fault::CutLink => {
                let m = (n + rng.gen_range(1..REGIONS.len())) % REGIONS.len();
                mesh.cut(n, m, true);
                timeline.note(start, format!("cut n{n}-n{m}"));
                sleep(hold).await;
                mesh.cut(n, m, false);
                timeline.note(start, format!("heal n{n}-n{m}"));
            }
            Fault::KillIsolated => {
                mesh.isolate(n, true);
                timeline.note(start, format!("isolate n{n}"));
                sleep(hold).await;
                kill(cluster, n, start, timeline, kills)?;
                sleep(Duration::from_millis(300)).await;
                cluster.restart(n)?;
                timeline.note(start, format!("restart n{n} (still isolated)"));
                sleep(hold).await;
                mesh.isolate(n, false);
                timeline.note(start, format!("heal n{n}"));
            }
        }
        sleep(Duration::from_millis(rng.gen_range(200..=800))).await;
    }
    Ok(())
}

fn kill(
    cluster: &mut Cluster,
    n: usize,
    start: Instant,
    timeline: &mut Timeline,
    kills: &mut Vec<(usize, Duration)>,
) -> Result<()> {
    cluster.kill(n)?;
    // After the process is reaped: no acknowledgement can come later.
    kills.push((n, start.elapsed()));
    timeline.note(start, format!("kill -9 n{n}"));
    Ok(())
}

/// Every key the clients may have written in a run of `ran`: all they chose
/// from, with every set generation the run reached.
fn all_keys(ran: Duration) -> Vec<String> {
    let c = (0..COUNTERS).map(|k| format!("chaos/c/{k}"));
    let generations = ran.as_secs() / SET_GENERATION.as_secs() + 1;
    let s = (0..generations).flat_map(|g| (0..KEYS).map(move |k| format!("chaos/s/{g}-{k}")));
    let r = (0..KEYS).map(|k| format!("chaos/r/{k}"));
    c.chain(s).chain(r).collect()
}

async fn digests(cluster: &Cluster) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for i in 0..REGIONS.len() {
        out.push(cluster.status(i).await?.digest);
    }
    Ok(out)
}

/// Waits (at most [`CONVERGE_WITHIN`]) until every node reports the same
/// digest, reads every key on every node, and keeps the reads only if the
/// digests did not move meanwhile (a write that timed out at a paused node
/// may still land after the heal).
async fn converge_and_read(cluster: &Cluster, ran: Duration) -> Result<Vec<BTreeMap<String, ValueView>>> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let mut last = Vec::new();
    loop {
        match digests(cluster).await {
            Ok(before) if before.iter().all(|d| *d == before[0]) => {
                let finals = read_everything(cluster, ran).await?;
                if digests(cluster).await? == before {
                    return Ok(finals);
                }
            }
            Ok(d) => last = d,
            Err(e) => last = vec![format!("a node did not answer: {e}")],
        }
        if Instant::now() > deadline {
            bail!(
                "the nodes did not converge within {CONVERGE_WITHIN:?} of the heal; last digests {last:?}\n{}",
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn read_everything(cluster: &Cluster, ran: Duration) -> Result<Vec<BTreeMap<String, ValueView>>> {
    let mut finals = Vec::new();
    for i in 0..REGIONS.len() {
        let client = cluster.client(i)?;
        let mut values = BTreeMap::new();
        for key in all_keys(ran) {
            let body = RequestBody::Read {
                key: Key::new(key.as_str()).map_err(|e| anyhow::anyhow!("{e}"))?,
                after: None,
                wait_ms: 0,
            };
            match client.request_to(0, body).await? {
                Response::Value { value: Some(v), .. } => {
                    values.insert(key, v);
                }
                Response::Value { value: None, .. } => {}
                r => bail!("node {i} answered a read of {key} with {r:?}"),
            }
        }
        finals.push(values);
    }
    Ok(finals)
}
