//! `latticed`: the regional Lattice node.

use anyhow::{Context, Result};
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
    /// Rebuild state from a stopped node's change log into a new store at
    /// --to: every change of each key joined, in log order. Keys whose
    /// first change retention has dropped cannot be rebuilt and are left
    /// out (counted). The new store is for the same node name.
    Replay {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The new store's directory (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// Only changes applied by then: RFC 3339, milliseconds since the
        /// epoch, or -DURATION before now.
        #[arg(long, allow_hyphen_values = true)]
        until: Option<String>,
        /// Only keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The encryption key of an encrypted data dir (64 hex digits; or
        /// LATTICE_ENCRYPTION_KEY, and LATTICE_ENCRYPTION_OLD_KEYS).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print a digest of every key's state in a stopped node's data dir
    /// (blake3 over each key's canonical hash, in storage order) and the
    /// number of keys: equal states give equal digests.
    Digest {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Only keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// The encryption key of an encrypted data dir (64 hex digits; or
        /// LATTICE_ENCRYPTION_KEY, and LATTICE_ENCRYPTION_OLD_KEYS).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Back up a stopped node's data dir into a new directory: every key's
    /// sealed state, the op ids, metadata and a blake3 manifest. (A running
    /// node holds the data dir's lock: use `lattice backup` for it.)
    Backup {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup directory (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// The node's region, recorded in the backup's metadata.
        #[arg(long)]
        region: Option<String>,
        /// The encryption key of an encrypted data dir (64 hex digits; or
        /// LATTICE_ENCRYPTION_KEY, and LATTICE_ENCRYPTION_OLD_KEYS).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Create a node's data dir from a backup: verifies the manifest, then
    /// writes every state this node's region may hold under its policy (the
    /// rest is counted, not restored). Node name, region, policy and the
    /// new --data-dir come from --config and the usual flags. Start the
    /// node afterwards: it takes a fresh replica id and its peers bring
    /// back what was written after the backup.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        args: Box<RunArgs>,
    },
    /// Backup cost: writes --keys counters through the real engine into a
    /// store under --dir, then times an offline backup and a restore and
    /// prints their sizes (`keys=... backup_bytes=... backup_secs=...
    /// restore_secs=...`). The directory is cleared first and removed after.
    BenchBackup {
        /// A scratch directory.
        #[arg(long)]
        dir: PathBuf,
        /// Keys to write.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
    },
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
        /// Leave the change log out (a baseline for what it costs; a node
        /// always logs).
        #[arg(long)]
        no_log: bool,
        /// Encrypt values and log entries at rest (a fresh random key).
        #[arg(long)]
        encrypt: bool,
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
        /// The audit key file of a keyed log (or LATTICE_AUDIT_KEY): with
        /// it every entry must be keyed with that key.
        #[arg(long, env = "LATTICE_AUDIT_KEY_FILE")]
        audit_key_file: Option<PathBuf>,
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
    /// Create a node certificate signed by the CA: DIR/NAME.pem, DIR/NAME.key
    /// (never overwritten; see `renew`). It names only the node: clients
    /// name the node in each endpoint (NAME@HOST:PORT).
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
        /// Days of validity (at most 365).
        #[arg(long, default_value_t = certs::MAX_LEAF_DAYS)]
        days: u32,
    },
    /// Replace a node certificate and key before they expire: a new key and
    /// certificate for the same name, written next to the old ones and
    /// renamed over them. Restart the node to use them; once every node
    /// runs its new certificate, revoke the old serial (printed) with
    /// `revoked_serials` if the old key may have leaked.
    Renew {
        /// Directory with ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node name.
        #[arg(long)]
        name: String,
        /// Directory with NAME.pem and NAME.key.
        #[arg(long)]
        out: PathBuf,
        /// Days of validity (at most 365).
        #[arg(long, default_value_t = certs::MAX_LEAF_DAYS)]
        days: u32,
    },
    /// Print a certificate's name, serial, DNS names and expiry.
    Show {
        /// The certificate (PEM).
        cert: PathBuf,
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
        CertsCmd::Node {
            ca_dir,
            name,
            out,
            days,
        } => {
            let ca = certs::read_pem(&ca_dir, "ca")?;
            let pem = certs::new_node_cert_for(&ca, &name, days)?;
            certs::write_pem(&out, &name, &pem)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
            show(&pem.cert)?;
        }
        CertsCmd::Renew {
            ca_dir,
            name,
            out,
            days,
        } => {
            let ca = certs::read_pem(&ca_dir, "ca")?;
            let old = certs::read_pem(&out, &name).context("reading the certificate to renew")?;
            let old = certs::info_of(certs::certs_from_pem(&old.cert)?.first().context("no certificate")?)?;
            if old.cn != name || old.ou != certs::NODE_OU {
                anyhow::bail!("{}/{name}.pem is not the node certificate of {name}", out.display());
            }
            let pem = certs::new_node_cert_for(&ca, &name, days)?;
            certs::replace_pem(&out, &name, &pem)?;
            println!(
                "renewed {0}/{name}.pem and {0}/{name}.key; restart {name} to use them",
                out.display()
            );
            show(&pem.cert)?;
            println!(
                "old serial {} (revoke it with revoked_serials once no node uses it)",
                old.serial
            );
        }
        CertsCmd::Show { cert } => {
            let text = std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
            show(&text)?;
        }
        CertsCmd::Client { ca_dir, name, out } => {
            let ca = certs::read_pem(&ca_dir, "ca")?;
            certs::write_pem(&out, &name, &certs::new_client_cert(&ca, &name)?)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
        }
    }
    Ok(())
}

fn show(pem: &str) -> Result<()> {
    for der in certs::certs_from_pem(pem)? {
        let i = certs::info_of(&der)?;
        let days = (i.not_after
            - std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64))
            / 86_400;
        println!(
            "name {} role {} serial {} dns [{}] expires in {days} days (unix {})",
            i.cn,
            if i.ou.is_empty() { "ca" } else { &i.ou },
            i.serial,
            i.dns.join(", "),
            i.not_after
        );
    }
    Ok(())
}

/// The keys a tool on a stopped data dir is given: `--key-file` or the
/// environment (see `[encryption]`).
fn tool_keys(data_dir: &std::path::Path, key_file: Option<PathBuf>) -> Result<lattice_server::crypt::Keys> {
    lattice_server::config::EncryptionConfig {
        key_file,
        old_key_files: Vec::new(),
    }
    .keys(data_dir)
}

fn replay_cmd(
    data_dir: &std::path::Path,
    to: &std::path::Path,
    until: Option<&str>,
    prefix: &str,
    key_file: Option<PathBuf>,
) -> Result<()> {
    let keys = tool_keys(data_dir, key_file)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let until = until
        .map(|u| lattice_core::log::parse_time(u, now))
        .transpose()
        .context("--until")?;
    let s = lattice_server::replay::replay(data_dir, to, until, prefix, &keys)
        .with_context(|| format!("replaying {} into {}", data_dir.display(), to.display()))?;
    println!(
        "rebuilt {} keys from {} changes into {}; {} keys left out (their first change is no longer in the log)",
        s.keys,
        s.changes,
        to.display(),
        s.incomplete
    );
    Ok(())
}

fn audit_verify(data_dir: &std::path::Path, key_file: Option<&std::path::Path>) -> Result<()> {
    let key = lattice_server::config::load_audit_key(key_file, data_dir)?;
    // Archived parts (audit.<first index>.log) first, then audit.log.
    let n = lattice_server::audit::verify_dir(data_dir, key.as_ref(), |e| {
        println!(
            "{} version={} source={:?} node={} signer={} at_ms={} hash={}",
            e.index,
            e.policy.version,
            e.source,
            e.node,
            e.signer.as_deref().unwrap_or("-"),
            e.at_ms,
            e.hash
        );
    })?;
    let keyed = if key.is_some() { ", keyed" } else { "" };
    println!("ok: {n} entries, chain intact{keyed}");
    Ok(())
}

fn backup_offline(
    data_dir: &std::path::Path,
    to: &std::path::Path,
    region: Option<String>,
    key_file: Option<PathBuf>,
) -> Result<()> {
    use lattice_server::storage::StoreReader;
    let started = std::time::Instant::now();
    let keys = tool_keys(data_dir, key_file)?;
    let (db, reader) = StoreReader::open_stopped(data_dir, &keys).map_err(|e| {
        let hint = if e.to_string().contains("could not acquire lock") {
            " (is the node still running on it? stop it first, or back it up online with `lattice backup`)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    let head = db.open_tree("audit").context("opening the audit head")?;
    let key = lattice_server::config::load_audit_key(None, data_dir)?;
    let audit = lattice_server::audit::AuditLog::open(data_dir, Some(head), key)
        .context("the policy audit log of the data dir does not verify")?;
    let source = lattice_server::backup::Source {
        region: region.map(lattice_core::proto::RegionId),
        policy: audit.last_policy().cloned().unwrap_or_default(),
        online: false,
    };
    let s = lattice_server::backup::write(&reader, &source, to)?;
    println!(
        "backed up {} keys ({} bytes) into {} as of {} ms, in {:.2} s",
        s.keys,
        s.bytes,
        s.dir,
        s.as_of_ms,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn restore(from: &std::path::Path, args: &RunArgs) -> Result<()> {
    let config = Config::load(args)?;
    let region = lattice_core::proto::RegionId(config.region.clone());
    let target = lattice_server::backup::Target {
        data_dir: &config.data_dir,
        node: &config.node,
        region: &region,
        policy: config.policy_set()?,
        log: config.log.settings(),
        keys: config.encryption.keys(&config.data_dir)?,
        audit_key: config.audit_key()?,
    };
    let r = lattice_server::backup::restore(from, &target)?;
    println!(
        "restored {} keys and {} op ids of node {} (region {}) into {} for node {} (region {}); \
         {} keys not restored: region {} may not hold them under policy version {}",
        r.keys,
        r.op_ids,
        r.meta.node,
        r.meta.region.as_deref().unwrap_or("unknown"),
        config.data_dir.display(),
        config.node,
        config.region,
        r.not_allowed,
        config.region,
        r.policy.version
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let result = match cli.cmd {
        Cmd::Certs(c) => certs_cmd(c),
        Cmd::Dev(args) => dev::run(args),
        Cmd::Audit(AuditCmd::Verify {
            data_dir,
            audit_key_file,
        }) => audit_verify(&data_dir, audit_key_file.as_deref()),
        Cmd::Backup {
            data_dir,
            to,
            region,
            key_file,
        } => backup_offline(&data_dir, &to, region, key_file),
        Cmd::Restore { from, args } => restore(&from, &args),
        Cmd::BenchBackup { dir, keys } => lattice_server::backup::bench(&dir, keys),
        Cmd::BenchSled {
            dir,
            threads,
            secs,
            keys,
            value_size,
            flush,
        } => lattice_server::bench::sled(&dir, threads, secs, keys, value_size, flush),
        Cmd::BenchFootprint {
            dir,
            keys,
            kind,
            batch,
            no_log,
            encrypt,
        } => lattice_server::bench::footprint(&dir, keys, &kind, batch, !no_log, encrypt),
        Cmd::BenchPeerDown {
            dir,
            minutes,
            rate,
            max_buffer_mb,
        } => lattice_server::bench::peer_down(&dir, minutes, rate, max_buffer_mb),
        Cmd::Replay {
            data_dir,
            to,
            until,
            prefix,
            key_file,
        } => replay_cmd(&data_dir, &to, until.as_deref(), &prefix, key_file),
        Cmd::Digest {
            data_dir,
            prefix,
            key_file,
        } => tool_keys(&data_dir, key_file)
            .and_then(|keys| Ok(lattice_server::replay::digest(&data_dir, &prefix, &keys)?))
            .map(|(digest, keys)| println!("{digest} {keys} keys"))
            .with_context(|| format!("digest of {}", data_dir.display())),
        Cmd::Run(args) => Config::load(&args).and_then(|config| {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async { lattice_server::run(config, lattice_server::shutdown_signal()).await })
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
