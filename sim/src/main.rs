//! `lattice-sim`: run one seeded simulation, or a swarm of them.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lattice_sim::swarm::{run_seed, SwarmTotals};
use lattice_sim::{FaultMix, Sim, SimConfig};
use std::process::ExitCode;

/// Deterministic simulator for Lattice: many nodes, one thread, virtual
/// time, injected faults, and checkers for convergence and lost writes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one simulation and print its summary; exit 1 on a violation.
    Run(RunArgs),
    /// Benchmarks of the real engine (figures, not tests).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run many seeds, each drawing its own sizes and fault mix (swarm
    /// testing); exit 1 if any seed finds a violation.
    Swarm {
        /// Number of seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Gossip efficiency under the Gossip Glomers broadcast conditions: prints
    /// `msgs_per_op=X median_ms=Y max_ms=Z` (messages between nodes per client
    /// write; time from a write until every node has it).
    Gossip {
        /// Nodes.
        #[arg(long, default_value_t = 25)]
        nodes: usize,
        /// One-way latency of every link, milliseconds.
        #[arg(long, default_value_t = 100)]
        latency_ms: u64,
        /// Client writes per second (cluster-wide).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds of writes.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// How often the hub forwards what it batched, milliseconds.
        #[arg(long, default_value_t = 150)]
        hub_ms: u64,
    },
    /// Anti-entropy cost: two nodes share `--keys` keys, `--diff` of them
    /// differ; one repair round. Prints messages, round trips and bytes
    /// against the size of the differing states and of a full-state sync.
    Repair {
        /// Keys on each node.
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// Differing keys, comma separated.
        #[arg(long, default_value = "0,1,1000,100000", value_delimiter = ',')]
        diff: Vec<usize>,
        /// Anti-entropy tree depth (fanout 16).
        #[arg(long, default_value_t = 4)]
        depth: u8,
    },
    /// Bytes on the wire against Enes et al. (ICDE 2019): 15 nodes, a
    /// partial mesh (4 neighbours) and a tree, one update per node per second
    /// for --secs seconds, 1 s sync. Prints Lattice's bytes (every frame),
    /// a state-based sync's and a classic delta sync's, and the ratios.
    Sync {
        /// Topologies (default both).
        #[arg(long, value_enum, value_delimiter = ',', default_value = "mesh,tree")]
        topology: Vec<lattice_sim::bench_sync::SyncTopology>,
        /// Workloads (default all).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "gset,gcounter,gmap10,gmap100"
        )]
        workload: Vec<lattice_sim::bench_sync::SyncWorkload>,
        /// Updates per node (one per second).
        #[arg(long, default_value_t = 100)]
        secs: usize,
    },
    /// Convergence after a partition heals: one node per region, region 0
    /// cut off for --partition-secs while every node takes writes, then the
    /// heal. Prints the time until all replicas are identical and the
    /// physical floor (one round trip plus the differing states at
    /// --link-rate).
    Heal {
        /// Regions (one node each).
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// One-way latency between regions, milliseconds.
        #[arg(long, default_value_t = 40)]
        latency_ms: u64,
        /// Length of the partition, seconds.
        #[arg(long, default_value_t = 30)]
        partition_secs: u64,
        /// Client writes per second, cluster-wide.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Bytes per second between regions (omit: unlimited).
        #[arg(long)]
        link_rate: Option<u64>,
    },
    /// Priorities on a congested link: 50 writes/s each of 100 B `critical`,
    /// 1 KB `normal` and 4 KB `bulk` values (255 KB/s offered) from region
    /// eu to us over a link limited to `--rate`. Prints each class's
    /// propagation latency, then the same run with one priority for all
    /// (the FIFO baseline).
    Priority {
        /// The link's limit, bytes per second.
        #[arg(long, default_value_t = 160_000)]
        rate: u64,
        /// Seconds of writes.
        #[arg(long, default_value_t = 20)]
        secs: u64,
        /// Seconds allowed afterwards for the backlog to drain.
        #[arg(long, default_value_t = 60)]
        drain_secs: u64,
        /// One-way latency, milliseconds.
        #[arg(long, default_value_t = 50)]
        latency_ms: u64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Draw sizes and faults from the seed exactly as `swarm` does (the
    /// other options are then ignored).
    #[arg(long)]
    swarm_config: bool,
    /// Number of nodes (at most 64).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Number of regions.
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Client operations.
    #[arg(long, default_value_t = 1_000)]
    ops: usize,
    /// Keys per CRDT type.
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Client operations per second (virtual).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Faults: `all`, `none`, or a comma list of part,oneway,isolate,flap,crash,diskloss,skew,pause,rot,flip.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Message loss probability while faults run.
    #[arg(long)]
    loss: Option<f64>,
    /// Message duplication probability while faults run.
    #[arg(long)]
    dup: Option<f64>,
    /// Relay received deltas to other peers.
    #[arg(long)]
    relay: bool,
    /// Engine sync interval (ms).
    #[arg(long, default_value_t = 20)]
    sync_ms: u64,
    /// Engine anti-entropy interval (ms).
    #[arg(long, default_value_t = 2_000)]
    ae_ms: u64,
    /// Print every violation, not just the first ten.
    #[arg(long)]
    verbose: bool,
}

fn parse_faults(s: &str) -> Result<FaultMix, String> {
    match s {
        "all" => return Ok(FaultMix::all()),
        "none" => return Ok(FaultMix::none()),
        _ => {}
    }
    let mut f = FaultMix::none();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "part" => f.partitions = true,
            "oneway" => f.one_way = true,
            "isolate" => f.isolate_region = true,
            "flap" => f.flapping = true,
            "crash" => f.crashes = true,
            "diskloss" => f.disk_loss = true,
            "skew" => f.clock_skew = true,
            "pause" => f.pauses = true,
            "rot" => f.bit_rot = true,
            "flip" => f.bit_flips = 0.01,
            other => {
                return Err(format!(
                "unknown fault {other:?} (expected all, none, or part,oneway,isolate,flap,crash,diskloss,skew,pause,rot,flip)"
            ))
            }
        }
    }
    Ok(f)
}

fn run(a: RunArgs) -> Result<bool, String> {
    let cfg = if a.swarm_config {
        SimConfig::swarm(a.seed)
    } else {
        if a.nodes == 0 || a.nodes > 64 {
            return Err(format!("--nodes must be 1..=64, got {}", a.nodes));
        }
        if a.regions == 0 {
            return Err("--regions must be at least 1".into());
        }
        if a.rate.is_nan() || a.rate <= 0.0 {
            return Err("--rate must be positive".into());
        }
        for (name, p) in [("--loss", a.loss), ("--dup", a.dup)] {
            if p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
                return Err(format!("{name} must be a probability in 0..=1"));
            }
        }
        let mut c = SimConfig::new(a.seed);
        c.nodes = a.nodes;
        c.regions = a.regions;
        c.ops = a.ops;
        c.keys = a.keys.max(1);
        c.rate = a.rate;
        c.faults = parse_faults(&a.faults)?;
        if let Some(l) = a.loss {
            c.faults.loss = l;
        }
        if let Some(d) = a.dup {
            c.faults.duplication = d;
        }
        c.relay = a.relay;
        c.sync_interval_ms = a.sync_ms.max(1);
        c.ae_interval_ms = a.ae_ms;
        c
    };
    let report = Sim::new(cfg).run();
    let limit = if a.verbose { usize::MAX } else { 10 };
    for v in report.violations.iter().take(limit) {
        println!("violation: {v}");
    }
    if report.violations.len() > limit {
        println!("... and {} more (--verbose shows all)", report.violations.len() - limit);
    }
    println!("{}", report.summary());
    if a.verbose {
        for (kind, (n, b)) in &report.by_kind {
            println!("  {kind}: {n} messages, {b} bytes");
        }
    }
    Ok(report.violations.is_empty())
}

fn swarm(seeds: u64, from: u64, quiet: bool) -> bool {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(seeds)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} seeds {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut totals = SwarmTotals::default();
    for seed in from..from.saturating_add(seeds) {
        let r = run_seed(seed);
        if let Some(v) = r.violations.first() {
            bar.suspend(|| {
                println!("FAIL seed={seed} ({}): {v}", r.setup);
                println!("  reproduce: cargo run --release -p lattice-sim -- run --seed {seed} --swarm-config");
            });
        }
        totals.add(r);
        bar.set_message(format!("violations={}", totals.failed.len()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{}", totals.last_line());
    totals.failed.is_empty()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.cmd {
        Cmd::Run(a) => match run(a) {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        Cmd::Swarm { seeds, from, quiet } => swarm(seeds, from, quiet),
        Cmd::Bench(BenchCmd::Gossip {
            nodes,
            latency_ms,
            rate,
            secs,
            hub_ms,
        }) => {
            if !(2..=64).contains(&nodes) || rate.is_nan() || rate <= 0.0 || secs == 0 {
                eprintln!("error: --nodes must be 2..=64, --rate positive, --secs at least 1");
                return ExitCode::from(2);
            }
            let (report, (per_op, median, max)) = lattice_sim::bench::gossip(nodes, latency_ms, rate, secs, hub_ms);
            println!("msgs_per_op={per_op:.2} median_ms={median} max_ms={max}");
            println!(
                "  messages={} ops={} acked={} converged={:?} violations={}",
                report.messages,
                report.ops,
                report.acked,
                report.converged_ms,
                report.violations.len()
            );
            for (kind, (n, _)) in &report.by_kind {
                println!("  {kind}: {n}");
            }
            report.violations.is_empty()
        }
        Cmd::Bench(BenchCmd::Sync {
            topology,
            workload,
            secs,
        }) => {
            for t in &topology {
                for w in &workload {
                    match lattice_sim::bench_sync::sync(*t, *w, secs) {
                        Ok(f) => println!("{}", f.line()),
                        Err(e) => {
                            eprintln!("error: {e}");
                            return ExitCode::from(1);
                        }
                    }
                }
            }
            true
        }
        Cmd::Bench(BenchCmd::Heal {
            regions,
            latency_ms,
            partition_secs,
            rate,
            link_rate,
        }) => {
            if !(2..=16).contains(&regions) || rate.is_nan() || rate <= 0.0 || partition_secs == 0 {
                eprintln!("error: --regions must be 2..=16, --rate positive, --partition-secs at least 1");
                return ExitCode::from(2);
            }
            let (report, (converged, floor, bytes)) =
                lattice_sim::bench::heal(regions, latency_ms, partition_secs * 1_000, rate, link_rate);
            let conv = converged.map_or("never".into(), |c| c.to_string());
            println!(
                "converged_ms={conv} floor_ms={floor} differing_bytes={bytes} writes={}",
                report.applied
            );
            println!("  violations={}", report.violations.len());
            report.violations.is_empty()
        }
        Cmd::Bench(BenchCmd::Priority {
            rate,
            secs,
            drain_secs,
            latency_ms,
        }) => {
            if rate < 1_000 || secs == 0 {
                eprintln!("error: --rate must be at least 1000 bytes/s and --secs at least 1");
                return ExitCode::from(2);
            }
            for prioritized in [true, false] {
                match lattice_sim::bench_priority::priority(rate, secs, drain_secs, latency_ms, prioritized) {
                    Ok(f) => f.lines().iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            true
        }
        Cmd::Bench(BenchCmd::Repair { keys, diff, depth }) => {
            for d in diff {
                if d > keys {
                    eprintln!("error: --diff {d} is larger than --keys {keys}");
                    return ExitCode::from(2);
                }
                match lattice_sim::bench::repair(keys, d, depth) {
                    Ok(f) => println!("{}", f.line()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            true
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
