//! One large set add on a real cluster (issue 14, "work per operation"):
//! three `latticed` processes in three regions on loopback; readers at
//! every node read a small key in a loop while one client adds `--elements`
//! elements to a set in one command, and writers at every node add 1 to a
//! counter of their own in a loop. Prints how long the add took, how long
//! until every node held the whole set, and the other clients' read and
//! write latencies during that time, against the same clients' latencies
//! before the add (the baseline, measured in the same run).
//!
//! `cargo build --release -p lattice-tests --bins && target/release/lattice-large-op-bench`
//! (needs the `latticed-test` binary built beside it, or `--latticed PATH`).

use anyhow::{bail, Result};
use clap::Parser;
use lattice_client::Client;
use lattice_core::crdt::{Bytes, Op};
use lattice_core::proto::client::{CausalToken, RequestBody, Response};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::Cluster;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "One large set add on a real 3-region cluster, with other clients' read and write latencies")]
struct Args {
    /// Elements in the one set add (8-byte elements; the request must fit
    /// one request frame of 1 MiB, about 110,000 elements, and the set's
    /// state the value limit of 4 MiB less 64 KiB, about 160,000).
    #[arg(long, default_value_t = 100_000)]
    elements: usize,
    /// Reader tasks per node.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Writer tasks per node (each adds 1 to its own counter, one write at
    /// a time).
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// How long the baseline readers run before the add.
    #[arg(long, default_value_t = 3)]
    baseline_secs: u64,
    /// The node binary (default: `latticed-test` or `latticed` beside this one).
    #[arg(long)]
    latticed: Option<PathBuf>,
}

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

fn key(s: &str) -> Result<Key> {
    Key::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads `probe` at `client` until `stop`, fresh each time (no session
/// token), returning each read's latency in milliseconds.
async fn read_loop(client: Arc<Client>, probe: Key, stop: Arc<AtomicBool>) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        client
            .request(RequestBody::Read {
                key: probe.clone(),
                after: None,
                wait_ms: 0,
            })
            .await?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Adds 1 to `counter` at `client` until `stop`, one write at a time
/// (acknowledged once durable there), returning each write's latency in
/// milliseconds.
async fn write_loop(client: Arc<Client>, counter: Key, stop: Arc<AtomicBool>) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        client.write(vec![(counter.clone(), Op::CounterAdd(1))]).await?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Runs the readers and writers on every node while `during` runs; their
/// latencies, sorted: (reads, writes).
async fn with_load<F: std::future::Future<Output = Result<()>>>(
    clients: &[Arc<Client>],
    args: &Args,
    during: F,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (mut readers, mut writers) = (Vec::new(), Vec::new());
    for (i, c) in clients.iter().enumerate() {
        for _ in 0..args.readers {
            readers.push(tokio::spawn(read_loop(c.clone(), key("probe")?, stop.clone())));
        }
        for w in 0..args.writers {
            writers.push(tokio::spawn(write_loop(
                c.clone(),
                key(&format!("w{i}-{w}"))?,
                stop.clone(),
            )));
        }
    }
    let outcome = during.await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for t in readers {
        reads.extend(t.await??);
    }
    for t in writers {
        writes.extend(t.await??);
    }
    outcome?;
    reads.sort_by(f64::total_cmp);
    writes.sort_by(f64::total_cmp);
    Ok((reads, writes))
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn summary(what: &str, v: &[f64]) -> String {
    format!(
        "{what}={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// Elements of the set `big` at `client`; with a token, once the node holds
/// what it names (waiting for it there).
async fn set_len(client: &Client, after: Option<CausalToken>) -> Result<usize> {
    match client
        .request(RequestBody::Read {
            key: key("big")?,
            after,
            wait_ms: 300_000,
        })
        .await?
    {
        Response::Value { value: Some(v), .. } => match v {
            lattice_core::crdt::ValueView::Set(e) => Ok(e.len()),
            other => bail!("big holds {other}"),
        },
        _ => Ok(0),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = lattice_tests::node_binary(args.latticed.clone())?;
    let mut cluster = Cluster::prepare(&bin, &REGIONS, Durability::Group)?;
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    let clients: Vec<Arc<Client>> = (0..REGIONS.len())
        .map(|i| cluster.client(i).map(Arc::new))
        .collect::<Result<_>>()?;
    clients[0]
        .write(vec![(key("probe")?, Op::LwwSet(b"x".to_vec().into()))])
        .await?;

    let secs = args.baseline_secs;
    let (reads, writes) = with_load(&clients, &args, async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Ok(())
    })
    .await?;
    println!(
        "baseline ({secs} s, no large operation): {}; {}",
        summary("reads", &reads),
        summary("writes", &writes)
    );

    let elements: Vec<Bytes> = (0..args.elements)
        .map(|i| format!("e{i:07}").into_bytes().into())
        .collect();
    let writer = cluster.client(0)?;
    let (n, mut add_ms, mut all_ms) = (args.elements, 0.0, 0.0);
    let (add_ms_ref, all_ms_ref) = (&mut add_ms, &mut all_ms);
    let (reads, writes) = with_load(&clients, &args, async {
        let t = Instant::now();
        let token = writer.write(vec![(key("big")?, Op::SetAdd(elements))]).await?;
        *add_ms_ref = t.elapsed().as_secs_f64() * 1e3;
        // Replicated: every node answers a read that must include the
        // write (its token), all three asked at once, each answered when
        // its node has applied the set (so the figure includes reading the
        // set back once per node; polling would read it many times).
        let reads: Vec<_> = clients
            .iter()
            .map(|c| {
                let (c, token) = (c.clone(), token.clone());
                tokio::spawn(async move { set_len(&c, Some(token)).await })
            })
            .collect();
        for read in reads {
            let got = read.await??;
            if got != n {
                bail!("a node holds {got} of the {n} elements");
            }
        }
        *all_ms_ref = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    })
    .await?;
    println!(
        "elements={n} sadd_ms={add_ms:.1} on_every_node_ms={all_ms:.1} (3 nodes, group durability, {} readers and {} writers per node)",
        args.readers, args.writers
    );
    println!(
        "during the add and its replication: {}; {}",
        summary("reads", &reads),
        summary("writes", &writes)
    );
    // Where the engines' time went: every step long enough to be logged.
    for line in cluster.log_lines("slow engine step") {
        println!("{line}");
    }
    drop(cluster);
    Ok(())
}
