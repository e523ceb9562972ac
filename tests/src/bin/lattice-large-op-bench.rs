//! One large set add on a real cluster (issue 14, "work per operation"):
//! three `latticed` processes in three regions on loopback; readers at
//! every node read a small key in a loop while one client adds `--elements`
//! elements to a set in one command. Prints how long the add took, how long
//! until every node held the whole set, and the other clients' read
//! latencies during that time, against the same readers' latencies before
//! the add (the baseline, measured in the same run).
//!
//! `cargo build --release -p lattice-tests --bins && target/release/lattice-large-op-bench`
//! (needs the `latticed-test` binary built beside it, or `--latticed PATH`).

use anyhow::{bail, Result};
use clap::Parser;
use lattice_client::Client;
use lattice_core::crdt::{Bytes, Op};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::Key;
use lattice_server::storage::Durability;
use lattice_tests::Cluster;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "One large set add on a real 3-region cluster, with other clients' read latencies")]
struct Args {
    /// Elements in the one set add (8-byte elements; the request must fit
    /// one request frame of 1 MiB, about 110,000 elements, and the set's
    /// state the value limit of 4 MiB less 64 KiB, about 160,000).
    #[arg(long, default_value_t = 100_000)]
    elements: usize,
    /// Reader tasks per node.
    #[arg(long, default_value_t = 2)]
    readers: usize,
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

/// Runs the readers on every node while `during` runs; their latencies.
async fn with_readers<F: std::future::Future<Output = Result<()>>>(
    clients: &[Arc<Client>],
    per_node: usize,
    during: F,
) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in clients {
        for _ in 0..per_node {
            tasks.push(tokio::spawn(read_loop(c.clone(), key("probe")?, stop.clone())));
        }
    }
    let outcome = during.await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    outcome?;
    all.sort_by(f64::total_cmp);
    Ok(all)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn summary(v: &[f64]) -> String {
    format!(
        "reads={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// Elements of the set `big` at `client` (a fresh read).
async fn set_len(client: &Client) -> Result<usize> {
    match client
        .request(RequestBody::Read {
            key: key("big")?,
            after: None,
            wait_ms: 0,
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
    let bin = lattice_tests::node_binary(args.latticed)?;
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
    let baseline = with_readers(&clients, args.readers, async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Ok(())
    })
    .await?;
    println!("baseline ({secs} s, no large operation): {}", summary(&baseline));

    let elements: Vec<Bytes> = (0..args.elements)
        .map(|i| format!("e{i:07}").into_bytes().into())
        .collect();
    let writer = cluster.client(0)?;
    let (n, mut add_ms, mut all_ms) = (args.elements, 0.0, 0.0);
    let (add_ms_ref, all_ms_ref) = (&mut add_ms, &mut all_ms);
    let during = with_readers(&clients, args.readers, async {
        let t = Instant::now();
        writer.write(vec![(key("big")?, Op::SetAdd(elements))]).await?;
        *add_ms_ref = t.elapsed().as_secs_f64() * 1e3;
        // Replicated: every node holds all of it.
        for c in &clients {
            while set_len(c).await? < n {
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("the set did not reach every node within 300 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        *all_ms_ref = t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    })
    .await?;
    println!(
        "elements={n} sadd_ms={add_ms:.1} on_every_node_ms={all_ms:.1} (3 nodes, group durability, {} readers per node)",
        args.readers
    );
    println!("reads during the add and its replication: {}", summary(&during));
    drop(cluster);
    Ok(())
}
