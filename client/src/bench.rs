//! The load generator behind `lattice bench`: C concurrent sessions drive a
//! node through the SDK with a mix of operations for a fixed time, and the
//! latencies go into an HDR histogram (bounded memory, exact to 0.1%).

use crate::{Client, Error};
use lattice_core::crdt::{Bytes, Op};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::Key;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What each operation of the run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// LWW register writes of `value_size` bytes (like Redis `SET`).
    Set,
    /// Counter increments.
    Incr,
    /// Reads of keys written first.
    Get,
    /// 50% set, 30% get, 20% incr.
    Mix,
}

/// The run's parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Concurrent sessions (each one request at a time).
    pub sessions: usize,
    /// How long to run.
    pub duration: Duration,
    /// Distinct keys.
    pub keys: usize,
    /// Bytes per `Set` value.
    pub value_size: usize,
    /// The operation mix.
    pub op: BenchOp,
    /// The node every session talks to (index into the client's endpoints).
    pub node: usize,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Operations that succeeded.
    pub ops: u64,
    /// Operations that failed (by any error).
    pub errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency p50, p99, p99.9 and max, microseconds.
    pub latency_us: (u64, u64, u64, u64),
}

impl BenchReport {
    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The line `lattice bench` prints.
    pub fn line(&self) -> String {
        let (p50, p99, p999, max) = self.latency_us;
        format!(
            "ops={} errors={} secs={:.1} ops_per_sec={:.0} p50_us={p50} p99_us={p99} p999_us={p999} max_us={max}",
            self.ops,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec()
        )
    }
}

fn key(i: usize) -> Result<Key, Error> {
    Key::new(format!("bench/{i:08}")).map_err(|e| Error::InvalidRequest(e.to_string()))
}

fn request(op: BenchOp, k: Key, value: &Bytes) -> RequestBody {
    let write = |o: Op| RequestBody::Write {
        retry: false,
        op_id: Client::new_op_id(),
        ops: vec![(k.clone(), o)],
        concern: Default::default(),
        timeout_ms: 0,
    };
    match op {
        BenchOp::Set | BenchOp::Mix => write(Op::LwwSet(value.clone())),
        BenchOp::Incr => write(Op::CounterAdd(1)),
        BenchOp::Get => RequestBody::Read {
            key: k,
            after: None,
            wait_ms: 0,
        },
    }
}

/// Runs the load. For `Get` (and `Mix`, whose reads should find values)
/// every key is written once first, outside the measurement. Key kinds do
/// not mix: `Mix` sets and increments distinct halves of the key range.
pub async fn run(client: Arc<Client>, cfg: BenchConfig) -> Result<BenchReport, Error> {
    if cfg.sessions == 0 || cfg.keys == 0 {
        return Err(Error::Config("--sessions and --keys must be positive".into()));
    }
    let value = Bytes(vec![b'v'; cfg.value_size]);
    if matches!(cfg.op, BenchOp::Get | BenchOp::Mix) {
        for chunk in (0..cfg.keys).collect::<Vec<_>>().chunks(500) {
            let ops = chunk
                .iter()
                .map(|&i| Ok((key(i)?, Op::LwwSet(value.clone()))))
                .collect::<Result<Vec<_>, Error>>()?;
            client.write(ops).await?;
        }
    }
    let deadline = Instant::now() + cfg.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..cfg.sessions {
        let (client, value, cfg) = (client.clone(), value.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64);
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| Error::Config(e.to_string()))?;
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let op = match cfg.op {
                    BenchOp::Mix => match rng.gen_range(0..10) {
                        0..=4 => BenchOp::Set,
                        5..=7 => BenchOp::Get,
                        _ => BenchOp::Incr,
                    },
                    o => o,
                };
                let i = rng.gen_range(0..cfg.keys);
                // In a mix, counters live above the registers' key range.
                let i = if cfg.op == BenchOp::Mix && op == BenchOp::Incr {
                    cfg.keys + i
                } else {
                    i
                };
                let req = request(op, key(i)?, &value);
                let t = Instant::now();
                match client.request_to(cfg.node, req).await {
                    Ok(Response::Error(_)) | Err(_) => errors += 1,
                    Ok(_) => {
                        ok += 1;
                        let us = t.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                        let _ = hist.record(us);
                    }
                }
            }
            Ok::<_, Error>((ok, errors, hist))
        }));
    }
    let mut total =
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| Error::Config(e.to_string()))?;
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        let (o, e, h) = t.await.map_err(|e| Error::Internal(e.to_string()))??;
        ops += o;
        errors += e;
        total.add(&h).map_err(|e| Error::Internal(e.to_string()))?;
    }
    Ok(BenchReport {
        ops,
        errors,
        elapsed: started.elapsed(),
        latency_us: (
            total.value_at_quantile(0.5),
            total.value_at_quantile(0.99),
            total.value_at_quantile(0.999),
            total.max(),
        ),
    })
}
