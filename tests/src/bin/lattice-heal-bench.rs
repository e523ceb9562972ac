//! Convergence after a partition heals, on a real cluster (issue #7,
//! section 5): three `latticed` processes in three regions on loopback,
//! every peer link through a relay ([`Mesh`]) that adds `--latency-ms` one way.
//! Region 0 is cut off for `--partition-secs` while every node takes
//! writes, then the links heal; the run prints the time until every node
//! reports the same anti-entropy digest, against the floor of one round
//! trip. In the same run it measures the steady-state propagation of a
//! write between two connected nodes, as the baseline.
//!
//! `cargo build --release -p lattice-tests --bins && target/release/lattice-heal-bench`
//! (or `scripts/bench-heal.sh`). Needs the `latticed-test` binary built
//! beside it, or `--latticed PATH`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use lattice_client::Client;
use lattice_core::crdt::{Op, ValueView};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::relay::Mesh;
use lattice_tests::{status_of, Cluster};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Time for a real 3-region cluster to converge after a partition heals")]
struct Args {
    /// One-way latency of every link between nodes.
    #[arg(long, default_value_t = 40)]
    latency_ms: u64,
    /// How long region 0 is cut off.
    #[arg(long, default_value_t = 30)]
    partition_secs: u64,
    /// Writes per second at each node during the partition.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Give up waiting for convergence after this long.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// After the heal, print each poll to stderr: per node its digest and,
    /// per peer, alive (1/0) and unacknowledged groups.
    #[arg(long)]
    trace: bool,
    /// The node binary (default: `latticed-test` or `latticed` beside this one).
    #[arg(long)]
    latticed: Option<PathBuf>,
}

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

fn key(s: String) -> Result<Key> {
    Key::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The `n`th write of node `node`: every CRDT kind in turn over 1,000 keys
/// per kind. Returns the write and whether it increments the shared counter
/// total that the final check sums.
fn nth_write(node: usize, n: u64) -> Result<(Vec<(Key, Op)>, bool)> {
    let k = n % 1_000;
    let tag = format!("{}-{n}", REGIONS[node]).into_bytes();
    Ok(match n % 4 {
        0 => (vec![(key(format!("heal/c/{k}"))?, Op::CounterAdd(1))], true),
        1 => (vec![(key(format!("heal/s/{k}"))?, Op::SetAdd(vec![tag.into()]))], false),
        2 => (vec![(key(format!("heal/r/{k}"))?, Op::LwwSet(tag.into()))], false),
        _ => (
            vec![(
                key(format!("heal/m/{k}"))?,
                Op::MapApply {
                    field: lattice_core::crdt::Field::new(REGIONS[node], lattice_core::crdt::FieldKind::Counter),
                    op: Box::new(Op::CounterAdd(1)),
                },
            )],
            false,
        ),
    })
}

/// Writes at `rate` per second for `secs`; returns the acknowledged
/// counter increments.
async fn write_for(client: &Client, node: usize, rate: u64, secs: u64) -> Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut n, mut incs) = (0u64, 0u64);
    while Instant::now() < end {
        tick.tick().await;
        let (ops, inc) = nth_write(node, n)?;
        client
            .write(ops)
            .await
            .with_context(|| format!("write {n} at {}", REGIONS[node]))?;
        incs += u64::from(inc);
        n += 1;
    }
    Ok(incs)
}

/// Milliseconds from a write at node `from` until node `to` reads it, for
/// `n` writes; sorted.
async fn propagation(clients: &[Client], from: usize, to: usize, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for i in 0..n {
        let k = key(format!("heal/probe/{from}/{i}"))?;
        clients[from]
            .write(vec![(k.clone(), Op::LwwSet(b"x".to_vec().into()))])
            .await?;
        let t = Instant::now();
        loop {
            // A fresh read each time: the session token would make the node wait.
            if let lattice_core::proto::client::Response::Value { value: Some(_), .. } = clients[to]
                .request(lattice_core::proto::client::RequestBody::Read {
                    key: k.clone(),
                    after: None,
                    wait_ms: 0,
                })
                .await?
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("a write did not propagate within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = lattice_tests::node_binary(args.latticed)?;
    let delay = Duration::from_millis(args.latency_ms);
    let mut cluster = Cluster::prepare(&bin, &REGIONS, Durability::Group)?;
    // Every peer link through a delaying relay.
    let mesh = Mesh::install(&cluster, delay).await?;
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let clients: Vec<Client> = (0..REGIONS.len()).map(|i| cluster.client(i)).collect::<Result<_>>()?;

    let probe = propagation(&clients, 1, 2, 20).await?;
    let p50 = probe[probe.len() / 2];
    println!(
        "baseline: a write at us is readable at ap after p50 {p50:.1} ms, max {:.1} ms (20 writes, {} ms one way)",
        probe[probe.len() - 1],
        args.latency_ms
    );

    // Region 0 cut off from both others.
    let cut = |on: bool| mesh.isolate(0, on);
    cut(true);
    println!(
        "partition: eu cut off for {} s, {} writes/s at each node",
        args.partition_secs, args.rate
    );
    let (secs, rate) = (args.partition_secs, args.rate);
    let (a, b, c) = tokio::join!(
        write_for(&clients[0], 0, rate, secs),
        write_for(&clients[1], 1, rate, secs),
        write_for(&clients[2], 2, rate, secs)
    );
    let incs = a? + b? + c?;
    let mut before = std::collections::BTreeSet::new();
    for c in &clients {
        before.insert(status_of(c).await?.digest);
    }
    if before.len() < 2 {
        bail!("the replicas did not differ at the heal: the partition did not hold ({before:?})");
    }

    cut(false);
    let healed = Instant::now();

    let mut reconnected = None;
    let converged = loop {
        // One status per node per poll: digests, liveness and the trace.
        let mut statuses = Vec::new();
        for c in &clients {
            statuses.push(status_of(c).await.ok());
        }
        let d: Vec<Option<&str>> = statuses.iter().map(|s| s.as_ref().map(|s| s.digest.as_str())).collect();
        if args.trace {
            let mut line = format!("{:5} ms", healed.elapsed().as_millis());
            for s in statuses.iter().flatten() {
                line.push_str(&format!(" | {} {}", s.node, s.digest.get(..6).unwrap_or(&s.digest)));
                for p in &s.peers {
                    line.push_str(&format!(" {}:{}/{}", p.node, u8::from(p.alive), p.unacked_groups));
                }
            }
            eprintln!("{line}");
        }
        if reconnected.is_none() && statuses[0].as_ref().is_some_and(|s| s.peers.iter().all(|p| p.alive)) {
            reconnected = Some(healed.elapsed());
        }
        if d.iter().all(|x| x.is_some() && *x == d[0]) {
            break healed.elapsed();
        }
        if healed.elapsed() > Duration::from_secs(args.timeout_secs) {
            bail!(
                "no convergence {} s after the heal: {d:?}\n{}",
                args.timeout_secs,
                cluster.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    // No acknowledged write lost: every node's counters sum to every
    // acknowledged increment.
    for (i, c) in clients.iter().enumerate() {
        let mut total = 0i128;
        for k in 0..1_000 {
            let body = lattice_core::proto::client::RequestBody::Read {
                key: key(format!("heal/c/{k}"))?,
                after: None,
                wait_ms: 0,
            };
            if let lattice_core::proto::client::Response::Value {
                value: Some(ValueView::Counter(v)),
                ..
            } = c.request(body).await?
            {
                total += v;
            }
        }
        if total != i128::from(incs) {
            bail!(
                "{} sums its counters to {total}, but {incs} increments were acknowledged",
                REGIONS[i]
            );
        }
    }
    let floor = 2 * args.latency_ms;
    let ms = converged.as_secs_f64() * 1e3;
    println!(
        "heal: reconnected_ms={:.0} converged_ms={ms:.0} floor_ms={floor} ratio={:.1} increments={incs} relayed_bytes={}",
        reconnected.map_or(f64::NAN, |r| r.as_secs_f64() * 1e3),
        ms / floor as f64,
        mesh.bytes()
    );
    Ok(())
}
