//! `latticed dev`: a local cluster of real processes on loopback.

use crate::config::{Config, PeerEntry};
use crate::storage::Durability;
use crate::{certs, files};
use anyhow::{bail, Context, Result};
use clap::Args;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of `latticed dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Where certificates, configs, data and logs go.
    #[arg(long, default_value = ".lattice-dev")]
    pub dir: PathBuf,
    /// QUIC port of the first node; node i listens on base+i and serves
    /// HTTP (metrics, status) on base+100+i.
    #[arg(long, default_value_t = 7401)]
    pub base_port: u16,
    /// Regions, one node each.
    #[arg(long, default_value = "eu,us,ap", value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Durability mode of every node.
    #[arg(long, value_enum, default_value = "group")]
    pub durability: Durability,
    /// Only write the files, do not start the nodes.
    #[arg(long)]
    pub prepare_only: bool,
    /// Open no Redis-protocol (RESP) listeners (by default node i has one
    /// on base+200+i).
    #[arg(long)]
    pub no_resp: bool,
    /// Encrypt every node's values at rest, under a key in DIR/encryption.key
    /// (0600, outside the nodes' data dirs; made once and reused).
    #[arg(long)]
    pub encrypt: bool,
}

/// What `lattice` (the CLI) reads to reach a dev cluster: written to
/// `DIR/client.toml` by `latticed dev`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientDefaults {
    /// Node addresses, one per region.
    pub endpoints: Vec<SocketAddr>,
    /// A client token.
    pub token: String,
    /// The cluster CA.
    pub ca: PathBuf,
    /// Region of each endpoint, in the same order.
    pub regions: Vec<String>,
    /// Node name of each endpoint, in the same order: the name its
    /// certificate must carry. Files from before names existed have none,
    /// and then the CLI checks `localhost`, which only dev certificates carry.
    #[serde(default)]
    pub names: Vec<String>,
    /// Redis-protocol (RESP) address of each endpoint, in the same order
    /// (`redis-cli -p PORT`, then `AUTH <token>`). Files from before the
    /// RESP listener existed have none.
    #[serde(default)]
    pub resp: Vec<SocketAddr>,
    /// The admin's policy signing key (`lattice policy set` signs with it).
    /// In the dev directory, never inside a node's data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_key: Option<PathBuf>,
}

/// The dev cluster's admin policy key, `DIR/policy.key` (made once, 0600):
/// its path and its public key in hex, which every dev node trusts.
fn dev_policy_key(dir: &Path) -> Result<(PathBuf, String)> {
    use lattice_core::policy::signed::{hex, key_file_text, parse_key_file};
    let path = dir.join("policy.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => parse_key_file(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e} (delete it to get a new one)", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed = crate::policy_key::random_seed();
            files::create_secret(&path, key_file_text(&seed).as_bytes())?;
            ed25519_dalek::SigningKey::from_bytes(&seed)
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    Ok((path, hex(&key.verifying_key().to_bytes())))
}

/// Writes (or reuses) certificates, a token and one config per node.
/// Returns the config paths and the client defaults.
pub fn prepare(args: &DevArgs) -> Result<(Vec<PathBuf>, ClientDefaults)> {
    if args.regions.is_empty() || args.regions.len() > 50 {
        bail!("--regions needs 1 to 50 names");
    }
    let dir = absolute(&args.dir)?;
    let certs_dir = dir.join("certs");
    if !certs_dir.join("ca.pem").exists() {
        certs::write_pem(&certs_dir, "ca", &certs::new_ca("dev")?)?;
    }
    let ca = certs::read_pem(&certs_dir, "ca")?;
    let token_path = dir.join("token");
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) if t.trim().len() >= crate::config::MIN_TOKEN_BYTES => t.trim().to_string(),
        Ok(_) => bail!(
            "{} holds an empty or short token (under {} bytes): delete it to get a new one",
            token_path.display(),
            crate::config::MIN_TOKEN_BYTES
        ),
        Err(_) => {
            let t: String = (0..32)
                .map(|_| format!("{:x}", rand::thread_rng().gen_range(0..16u8)))
                .collect();
            files::create_secret(&token_path, t.as_bytes())?;
            t
        }
    };
    let key_file = if args.encrypt {
        let path = dir.join("encryption.key");
        if !path.exists() {
            let kek = crate::crypt::Kek::generate();
            files::create_secret(&path, format!("{}\n", kek.to_hex()).as_bytes())?;
        }
        // Refuse a file that is not a key now, not at each node's start.
        crate::crypt::Kek::from_file(&path)?;
        Some(path)
    } else {
        None
    };
    let (policy_key, policy_public) = dev_policy_key(&dir)?;
    let n = args.regions.len();
    let name = |i: usize| format!("n{}", i + 1);
    let addr = |i: usize| -> Result<SocketAddr> {
        let port = args.base_port.checked_add(i as u16).context("port out of range")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let resp_addr = |i: usize| -> Result<Option<SocketAddr>> {
        if args.no_resp {
            return Ok(None);
        }
        let port = args
            .base_port
            .checked_add(200 + i as u16)
            .context("port out of range")?;
        Ok(Some(SocketAddr::from(([127, 0, 0, 1], port))))
    };
    let mut paths = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..n {
        if !certs_dir.join(format!("{}.pem", name(i))).exists() {
            certs::write_pem(&certs_dir, &name(i), &certs::new_dev_node_cert(&ca, &name(i))?)?;
        }
        let peers = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                Ok(PeerEntry {
                    name: name(j),
                    region: args.regions[j].clone(),
                    address: addr(j)?,
                    rate_limit: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let http_port = args
            .base_port
            .checked_add(100 + i as u16)
            .context("port out of range")?;
        let config = Config {
            node: name(i),
            region: args.regions[i].clone(),
            listen: addr(i)?,
            data_dir: dir.join("data").join(name(i)),
            durability: args.durability,
            group_commit_ms: 2,
            tokens: vec![token.clone()],
            // The local cluster's one token is also its admin token.
            admin_tokens: vec![token.clone()],
            ca: certs_dir.join("ca.pem"),
            cert: certs_dir.join(format!("{}.pem", name(i))),
            key: certs_dir.join(format!("{}.key", name(i))),
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], http_port))),
            peers,
            peer_queue: 1_024,
            engine_queue: 8_192,
            anti_entropy_ms: 5_000,
            max_buffer_bytes: 64 << 20,
            policy_version: 0,
            policy: Vec::new(),
            write_concern_timeout_ms: 10_000,
            metrics_token: None,
            revoked_serials: Vec::new(),
            limits: Default::default(),
            memory: Default::default(),
            log: Default::default(),
            resp: resp_addr(i)?,
            resp_tls: false,
            resp_max_connections: 1_024,
            access: Vec::new(),
            encryption: crate::config::EncryptionConfig {
                key_file: key_file.clone(),
                old_key_files: Vec::new(),
            },
            policy_keys: vec![policy_public.clone()],
            audit_key_file: None,
        };
        config.validate()?;
        let path = dir.join(format!("{}.toml", name(i)));
        // It holds the token.
        files::replace_secret(&path, toml::to_string(&config)?.as_bytes())?;
        paths.push(path);
        endpoints.push(addr(i)?);
    }
    let defaults = ClientDefaults {
        endpoints,
        token,
        ca: certs_dir.join("ca.pem"),
        regions: args.regions.clone(),
        names: (0..n).map(name).collect(),
        resp: (0..n).filter_map(|i| resp_addr(i).transpose()).collect::<Result<_>>()?,
        policy_key: Some(policy_key),
    };
    let client = dir.join("client.toml");
    files::replace_secret(&client, toml::to_string(&defaults)?.as_bytes())?;
    Ok((paths, defaults))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    files::private_dir(p)?;
    p.canonicalize().with_context(|| format!("resolving {}", p.display()))
}

/// Runs `latticed dev`.
pub fn run(args: DevArgs) -> Result<()> {
    let (configs, defaults) = prepare(&args)?;
    let dir = absolute(&args.dir)?;
    if args.prepare_only {
        println!(
            "wrote {} node configs and {}",
            configs.len(),
            dir.join("client.toml").display()
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating latticed")?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        // Before any node starts: Ctrl-C from now on stops them all.
        let stop = crate::shutdown_signal();
        let mut children = Vec::new();
        for (i, cfg) in configs.iter().enumerate() {
            let log_path = dir.join(format!("n{}.log", i + 1));
            let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
            let child = tokio::process::Command::new(&exe)
                .arg("run")
                .arg("--config")
                .arg(cfg)
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting node n{}", i + 1))?;
            children.push((format!("n{}", i + 1), log_path, child));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (name, log, child) in &mut children {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(log.as_path()).unwrap_or_default();
                bail!("node {name} exited at start ({status}):\n{tail}");
            }
        }
        println!("Lattice dev cluster: {} nodes on loopback", children.len());
        for (i, ((name, log, _), addr)) in children.iter().zip(&defaults.endpoints).enumerate() {
            let resp = defaults.resp.get(i).map_or_else(String::new, |a| format!("  resp {a}"));
            println!(
                "  {name}  region {:<4} quic {addr}  http 127.0.0.1:{}{resp}  log {}",
                defaults.regions[i],
                args.base_port + 100 + i as u16,
                log.display()
            );
        }
        println!();
        println!(
            "Reach it with the lattice CLI (it reads {}):",
            dir.join("client.toml").display()
        );
        println!("  cargo run -p lattice-client -- incr visits 5");
        println!("  cargo run -p lattice-client -- get visits");
        println!("Client token: {}   CA: {}", defaults.token, defaults.ca.display());
        if let Some(k) = &defaults.policy_key {
            println!(
                "Policy admin key: {} (every node trusts it; `lattice policy set FILE` signs with it)",
                k.display()
            );
        }
        if let Some(resp) = defaults.resp.first() {
            println!(
                "Redis protocol: redis-cli -p {} --user default --pass {} (or AUTH <token>)",
                resp.port(),
                defaults.token
            );
        }
        println!(
            "Metrics: curl http://127.0.0.1:{}/metrics   Status: curl http://127.0.0.1:{}/status",
            args.base_port + 100,
            args.base_port + 100
        );
        println!(
            "Ctrl-C stops the cluster (data stays in {}).",
            dir.join("data").display()
        );
        let died = async {
            loop {
                for (name, _, child) in children.iter_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return (name.clone(), status);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            () = stop => {
                println!("stopping the cluster");
            }
            (name, status) = died => {
                eprintln!("node {name} exited ({status}); stopping the others");
            }
        }
        for (_, _, child) in &mut children {
            if let Some(pid) = child.id() {
                terminate(pid);
            }
        }
        for (name, _, child) in &mut children {
            match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("node {name} did not stop in time: killing it");
                    let _ = child.kill().await;
                }
            }
        }
        Ok(())
    })
}

/// Asks a child process to stop gracefully (SIGTERM).
fn terminate(pid: u32) {
    #[cfg(unix)]
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    #[cfg(not(unix))]
    let _ = pid;
}
