//! `latticed`: the regional Lattice node.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use lattice_server::config::{Config, RunArgs};
use lattice_server::{certs, dev};
use std::path::PathBuf;
use std::process::ExitCode;

/// The regional Lattice node: CRDT state in sled, deltas gossiped to the
/// other regions over QUIC, a client API on the same endpoint.
#[derive(Parser)]
#[command(name = "latticed", version, about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `lattice_server=debug`.
    #[arg(long, global = true, env = "LATTICE_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(long, global = true, env = "LATTICE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (configuration from --config, flags and LATTICE_* variables).
    Run(Box<RunArgs>),
    /// Start a local cluster of three nodes in three regions on loopback:
    /// separate processes, data dirs and ports, real QUIC, generated dev
    /// certificates and a client token. Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Create the cluster CA and node or client certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Check a node's policy audit log on disk (DIR/audit.log): every entry
    /// chained to the one before by blake3. Exits 1 if it was tampered with.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Baseline for `lattice bench`: raw sled inserts of the same key and
    /// value sizes from --threads threads for --secs seconds, optionally
    /// with a flush after every insert. Prints ops/s and latency percentiles.
    BenchSled {
        /// A scratch directory (created; its contents are replaced).
        #[arg(long)]
        dir: PathBuf,
        /// Concurrent writer threads.
        #[arg(long, default_value_t = 50)]
        threads: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Value size, bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Flush sled and fsync its log after every insert (what `sync` and
        /// `group` durability do per batch).
        #[arg(long)]
        flush: bool,
    },
    /// Footprint: writes --keys keys of one CRDT type through the real
    /// engine and sled store (no peers), then prints disk bytes per key
    /// (the data dir after a flush) and resident memory per key (the
    /// process's RSS growth, which includes sled's page cache).
    BenchFootprint {
        /// A scratch directory (created; its contents are replaced).
        #[arg(long)]
        dir: PathBuf,
        /// Keys to write.
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// CRDT type: counter, register, set or map.
        #[arg(long, default_value = "counter")]
        kind: String,
        /// Keys per write batch.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
    },
    /// Memory while a peer is down: the real engine and sled store with one
    /// peer that never answers take --rate writes per second (100-byte
    /// values over 100,000 keys) for --minutes of engine time, as fast as
    /// the disk allows; prints RSS and the delta buffer every simulated
    /// minute. The buffer must stop at --max-buffer-mb.
    BenchPeerDown {
        /// A scratch directory (created; its contents are replaced).
        #[arg(long)]
        dir: PathBuf,
        /// Minutes of engine time.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Writes per second of engine time.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// The delta buffer's limit, MiB.
        #[arg(long, default_value_t = 64)]
        max_buffer_mb: usize,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the chain and print one line per entry.
    Verify {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Cluster name, recorded in the CA's name.
        #[arg(long, default_value = "lattice")]
        cluster: String,
    },
    /// Create a node certificate signed by the CA: DIR/NAME.pem, DIR/NAME.key.
    Node {
        /// Directory with ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node name (a DNS label; the certificate's name).
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a client certificate signed by the CA.
    Client {
        /// Directory with ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Client name.
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn certs_cmd(cmd: CertsCmd) -> Result<()> {
    match cmd {
        CertsCmd::Ca { out, cluster } => {
            certs::write_pem(&out, "ca", &certs::new_ca(&cluster)?)?;
            println!("wrote {0}/ca.pem and {0}/ca.key (keep ca.key secret)", out.display());
        }
        CertsCmd::Node { ca_dir, name, out } => {
            let ca = certs::read_pem(&ca_dir, "ca")?;
            certs::write_pem(&out, &name, &certs::new_node_cert(&ca, &name)?)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
        }
        CertsCmd::Client { ca_dir, name, out } => {
            let ca = certs::read_pem(&ca_dir, "ca")?;
            certs::write_pem(&out, &name, &certs::new_client_cert(&ca, &name)?)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
        }
    }
    Ok(())
}

fn audit_verify(data_dir: &std::path::Path) -> Result<()> {
    let path = data_dir.join("audit.log");
    let entries = lattice_server::audit::read_entries(&path)?;
    for e in &entries {
        println!(
            "{} version={} source={:?} node={} at_ms={} hash={}",
            e.index, e.policy.version, e.source, e.node, e.at_ms, e.hash
        );
    }
    lattice_core::policy::audit::verify(&entries)?;
    println!("ok: {} entries, chain intact", entries.len());
    Ok(())
}

fn bench_sled(
    dir: &std::path::Path,
    threads: usize,
    secs: u64,
    keys: usize,
    value_size: usize,
    flush: bool,
) -> Result<()> {
    use anyhow::Context;
    use rand::{Rng, SeedableRng};
    if threads == 0 || keys == 0 {
        anyhow::bail!("--threads and --keys must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let db = sled::open(dir).with_context(|| format!("opening sled at {}", dir.display()))?;
    let tree = db.open_tree("bench")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let started = std::time::Instant::now();
    let results: Vec<Result<(u64, hdrhistogram::Histogram<u64>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (db, tree) = (&db, &tree);
                scope.spawn(move || -> Result<(u64, hdrhistogram::Histogram<u64>)> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                    let value = vec![b'v'; value_size];
                    let mut n = 0;
                    while std::time::Instant::now() < deadline {
                        let key = format!("bench/{:08}", rng.gen_range(0..keys));
                        let t0 = std::time::Instant::now();
                        tree.insert(key.as_bytes(), value.as_slice())?;
                        if flush {
                            // As latticed's sync and group modes do: sled's
                            // flush, then an fsync of its log.
                            db.flush()?;
                            std::fs::File::open(dir.join("db"))?.sync_data()?;
                        }
                        hist.record(t0.elapsed().as_micros().clamp(1, 60_000_000) as u64)?;
                        n += 1;
                    }
                    Ok((n, hist))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a writer thread panicked"))?)
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut total = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ops = 0;
    for r in results {
        let (n, h) = r?;
        ops += n;
        total.add(&h)?;
    }
    println!(
        "sled flush={flush} threads={threads} ops={ops} secs={elapsed:.1} ops_per_sec={:.0} p50_us={} p99_us={} p999_us={} max_us={}",
        ops as f64 / elapsed.max(1e-9),
        total.value_at_quantile(0.5),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max()
    );
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p).map_or(0, |rd| {
        rd.flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    dir_bytes(&path)
                } else {
                    e.metadata().map_or(0, |m| m.len())
                }
            })
            .sum()
    })
}

fn bench_footprint(dir: &std::path::Path, keys: usize, kind: &str, batch: usize) -> Result<()> {
    use anyhow::Context;
    use lattice_core::crdt::{Bytes, Field, FieldKind, Op};
    use lattice_core::replica::{Replica, ReplicaConfig, Time};
    use rand::SeedableRng;
    let op = |i: usize| -> Result<Op> {
        Ok(match kind {
            "counter" => Op::CounterAdd(1),
            "register" => Op::LwwSet(Bytes(format!("value-{i:010}").into_bytes())),
            "set" => Op::SetAdd(vec![Bytes(format!("e{i:08}").into_bytes())]),
            "map" => Op::MapApply {
                field: Field::new("visits", FieldKind::Counter),
                op: Box::new(Op::CounterAdd(1)),
            },
            other => anyhow::bail!("--kind must be counter, register, set or map, not {other:?}"),
        })
    };
    op(0)?;
    if batch == 0 {
        anyhow::bail!("--batch must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let before = rss_bytes();
    let store = lattice_server::storage::SledStore::open(dir, "footprint", lattice_server::storage::Durability::Group)?;
    let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let mut r = Replica::open(ReplicaConfig::new("footprint", "r", vec![]), store, rng, Time(0))?;
    let started = std::time::Instant::now();
    for start in (0..keys).step_by(batch) {
        let ops = (start..(start + batch).min(keys))
            .map(|i| Ok((lattice_core::Key::new(format!("key:{i:08}"))?, op(i)?)))
            .collect::<Result<Vec<_>>>()?;
        r.write(Time(0), ops)?;
        r.flush(Time(0))?;
        while r.poll_event().is_some() {}
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = rss_bytes();
    drop(r);
    let disk = dir_bytes(dir);
    println!(
        "kind={kind} keys={keys} disk_bytes={disk} disk_per_key={:.1} rss_growth_bytes={} rss_per_key={:.1} secs={elapsed:.1}",
        disk as f64 / keys.max(1) as f64,
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / keys.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn bench_peer_down(dir: &std::path::Path, minutes: u64, rate: u64, max_buffer_mb: usize) -> Result<()> {
    use anyhow::Context;
    use lattice_core::crdt::{Bytes, Op};
    use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
    use rand::SeedableRng;
    if rate == 0 || minutes == 0 {
        anyhow::bail!("--rate and --minutes must be positive");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let store = lattice_server::storage::SledStore::open(dir, "up", lattice_server::storage::Durability::Group)?;
    let mut cfg = ReplicaConfig::new("up", "eu", vec![PeerConfig::new("down", "us")]);
    cfg.max_buffer_bytes = max_buffer_mb << 20;
    let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let mut r = Replica::open(cfg, store, rng, Time(0))?;
    let value = Bytes(vec![b'v'; 100]);
    // 10 ms of engine time per batch.
    let per_batch = (rate / 100).max(1);
    let mut i = 0u64;
    println!("minute rss_mb buffer_groups buffer_mb dropped_groups");
    for tick in 0..minutes * 6_000 {
        let now = Time(tick * 10);
        let ops = (0..per_batch)
            .map(|_| {
                i += 1;
                Ok((
                    lattice_core::Key::new(format!("k{:06}", i % 100_000))?,
                    Op::LwwSet(value.clone()),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        r.write(now, ops)?;
        r.handle_timeout(now)?;
        r.flush(now)?;
        while r.poll_event().is_some() {}
        while r.poll_transmit().is_some() {}
        if (tick + 1) % 6_000 == 0 {
            let (groups, bytes) = r.buffer_usage();
            println!(
                "{} {} {groups} {} {}",
                (tick + 1) / 6_000,
                rss_bytes() >> 20,
                bytes >> 20,
                r.stats().buffer_dropped
            );
        }
    }
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let result = match cli.cmd {
        Cmd::Certs(c) => certs_cmd(c),
        Cmd::Dev(args) => dev::run(args),
        Cmd::Audit(AuditCmd::Verify { data_dir }) => audit_verify(&data_dir),
        Cmd::BenchSled {
            dir,
            threads,
            secs,
            keys,
            value_size,
            flush,
        } => bench_sled(&dir, threads, secs, keys, value_size, flush),
        Cmd::BenchFootprint { dir, keys, kind, batch } => bench_footprint(&dir, keys, &kind, batch),
        Cmd::BenchPeerDown {
            dir,
            minutes,
            rate,
            max_buffer_mb,
        } => bench_peer_down(&dir, minutes, rate, max_buffer_mb),
        Cmd::Run(args) => Config::load(&args).and_then(|config| {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(lattice_server::run(config, lattice_server::shutdown_signal()))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latticed: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
