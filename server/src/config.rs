//! `latticed` configuration: a TOML file, overridden by flags and
//! `LATTICE_*` environment variables (see `latticed run --help`).

use crate::storage::Durability;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A peer node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// Its node name (its certificate's name).
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its QUIC address.
    pub address: SocketAddr,
    /// Most bytes per second sent to it (omit: unlimited). Under the limit
    /// deltas go by keyspace priority: critical, normal, then bulk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u64>,
}

/// The node's configuration, as the TOML file spells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name: a DNS label, unique in the cluster.
    pub node: String,
    /// Region name.
    pub region: String,
    /// QUIC listen address (peers and clients).
    pub listen: SocketAddr,
    /// Data directory (sled).
    pub data_dir: PathBuf,
    /// When writes are acknowledged relative to the disk.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// In `group` mode, the longest a write waits for the shared flush while
    /// input keeps queueing (otherwise the flush starts as soon as the
    /// engine has taken every queued input).
    #[serde(default = "default_group_ms")]
    pub group_commit_ms: u64,
    /// Bearer tokens accepted from clients.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Tokens that may also put a new policy set in force
    /// (`lattice policy set`); they are accepted as client tokens too.
    #[serde(default)]
    pub admin_tokens: Vec<String>,
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// HTTP address for /metrics, /healthz and /status.
    pub metrics: Option<SocketAddr>,
    /// The other nodes.
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// No longer used: the frames queued per peer are bounded by bytes
    /// (`memory.peer_queue_bytes`). Accepted so that older files still load.
    #[serde(default = "default_peer_queue")]
    pub peer_queue: usize,
    /// Inputs of each class (client requests, peer frames) queued for the
    /// engine; the byte budgets in `[memory]` bound them by size.
    #[serde(default = "default_engine_queue")]
    pub engine_queue: usize,
    /// Anti-entropy interval, milliseconds.
    #[serde(default = "default_ae_ms")]
    pub anti_entropy_ms: u64,
    /// Largest total size of delta-groups buffered for peers; past it the
    /// oldest are dropped and lagging peers are repaired by anti-entropy.
    #[serde(default = "default_buffer")]
    pub max_buffer_bytes: usize,
    /// Version of the `[[policy]]` list below. A node adopts the highest
    /// version it sees (from its file, a peer or `lattice policy set`).
    #[serde(default)]
    pub policy_version: u64,
    /// Replication policies, one per keyspace (key prefix).
    #[serde(default)]
    pub policy: Vec<lattice_core::policy::Policy>,
    /// Default time a write with a write concern waits for other regions.
    #[serde(default = "default_concern_ms")]
    pub write_concern_timeout_ms: u64,
    /// Byte budgets of queues, the watch feed and waiting reads (`[memory]`).
    #[serde(default, skip_serializing_if = "crate::limits::MemoryConfig::is_default")]
    pub memory: crate::limits::MemoryConfig,
}

fn default_concern_ms() -> u64 {
    10_000
}

fn default_durability() -> Durability {
    Durability::Group
}
fn default_group_ms() -> u64 {
    2
}
fn default_peer_queue() -> usize {
    1_024
}
fn default_engine_queue() -> usize {
    8_192
}
fn default_ae_ms() -> u64 {
    5_000
}
fn default_buffer() -> usize {
    64 << 20
}

/// Flags and environment variables of `latticed run`; each overrides the
/// same setting of the file.
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short, env = "LATTICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node name (a DNS label, unique in the cluster).
    #[arg(long, env = "LATTICE_NODE")]
    pub node: Option<String>,
    /// Region name.
    #[arg(long, env = "LATTICE_REGION")]
    pub region: Option<String>,
    /// QUIC listen address, e.g. 127.0.0.1:7401.
    #[arg(long, env = "LATTICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "LATTICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Durability: sync (flush + fsync per batch), group (shared flush + fsync, default), async (acknowledge before flush: a crash can lose acknowledged writes).
    #[arg(long, env = "LATTICE_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// In `group` mode, the longest a write waits for the shared flush while
    /// input keeps queueing, in milliseconds.
    #[arg(long, env = "LATTICE_GROUP_COMMIT_MS")]
    pub group_commit_ms: Option<u64>,
    /// A client token (repeatable; replaces the file's list).
    #[arg(long = "token", env = "LATTICE_TOKENS", value_delimiter = ',')]
    pub tokens: Vec<String>,
    /// An admin token, which may also change the policy set (repeatable;
    /// replaces the file's list).
    #[arg(long = "admin-token", env = "LATTICE_ADMIN_TOKENS", value_delimiter = ',')]
    pub admin_tokens: Vec<String>,
    /// Cluster CA certificate.
    #[arg(long, env = "LATTICE_CA")]
    pub ca: Option<PathBuf>,
    /// Node certificate.
    #[arg(long, env = "LATTICE_CERT")]
    pub cert: Option<PathBuf>,
    /// Node key.
    #[arg(long, env = "LATTICE_KEY")]
    pub key: Option<PathBuf>,
    /// HTTP address for /metrics, /healthz and /status.
    #[arg(long, env = "LATTICE_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// A peer as NAME=REGION@HOST:PORT (repeatable; replaces the file's list).
    #[arg(long = "peer", env = "LATTICE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
}

fn parse_peer(s: &str) -> Result<PeerEntry> {
    let (name, rest) = s.split_once('=').context("a peer is NAME=REGION@HOST:PORT")?;
    let (region, addr) = rest.split_once('@').context("a peer is NAME=REGION@HOST:PORT")?;
    Ok(PeerEntry {
        name: name.to_string(),
        region: region.to_string(),
        address: addr.parse().with_context(|| format!("peer address {addr:?}"))?,
        rate_limit: None,
    })
}

impl Config {
    /// The file's policies as a validated set.
    pub fn policy_set(&self) -> Result<lattice_core::policy::PolicySet> {
        lattice_core::policy::PolicySet::new(self.policy_version, self.policy.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("the [[policy]] list")
    }

    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The file (if any) with flags and environment applied, validated.
    pub fn load(args: &RunArgs) -> Result<Config> {
        let c = match &args.config {
            Some(p) => Some(Config::from_file(p)?),
            None => None,
        };
        macro_rules! required {
            ($field:ident, $flag:literal) => {
                match (&args.$field, c.as_ref().map(|c| c.$field.clone())) {
                    (Some(v), _) => v.clone(),
                    (None, Some(v)) => v,
                    (None, None) => bail!(concat!("missing ", $flag, " (flag, environment or config file)")),
                }
            };
        }
        let config = Config {
            node: required!(node, "--node"),
            region: required!(region, "--region"),
            listen: required!(listen, "--listen"),
            data_dir: required!(data_dir, "--data-dir"),
            ca: required!(ca, "--ca"),
            cert: required!(cert, "--cert"),
            key: required!(key, "--key"),
            durability: args
                .durability
                .or(c.as_ref().map(|c| c.durability))
                .unwrap_or(Durability::Group),
            group_commit_ms: args
                .group_commit_ms
                .or(c.as_ref().map(|c| c.group_commit_ms))
                .unwrap_or(2),
            tokens: if args.tokens.is_empty() {
                c.as_ref().map(|c| c.tokens.clone()).unwrap_or_default()
            } else {
                args.tokens.clone()
            },
            admin_tokens: if args.admin_tokens.is_empty() {
                c.as_ref().map(|c| c.admin_tokens.clone()).unwrap_or_default()
            } else {
                args.admin_tokens.clone()
            },
            metrics: args.metrics.or(c.as_ref().and_then(|c| c.metrics)),
            peers: if args.peers.is_empty() {
                c.as_ref().map(|c| c.peers.clone()).unwrap_or_default()
            } else {
                args.peers.iter().map(|p| parse_peer(p)).collect::<Result<_>>()?
            },
            peer_queue: c.as_ref().map_or(default_peer_queue(), |c| c.peer_queue),
            engine_queue: c.as_ref().map_or(default_engine_queue(), |c| c.engine_queue),
            anti_entropy_ms: c.as_ref().map_or(default_ae_ms(), |c| c.anti_entropy_ms),
            max_buffer_bytes: c.as_ref().map_or(default_buffer(), |c| c.max_buffer_bytes),
            policy_version: c.as_ref().map_or(0, |c| c.policy_version),
            policy: c.as_ref().map(|c| c.policy.clone()).unwrap_or_default(),
            write_concern_timeout_ms: c.as_ref().map_or(default_concern_ms(), |c| c.write_concern_timeout_ms),
            memory: c.as_ref().map(|c| c.memory.clone()).unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks names, limits and peers.
    pub fn validate(&self) -> Result<()> {
        crate::certs::check_node_name(&self.node)?;
        if self.region.is_empty() {
            bail!("region must not be empty");
        }
        if self.group_commit_ms > 1_000 {
            bail!("group_commit_ms {} is more than a second", self.group_commit_ms);
        }
        if self.peer_queue == 0 || self.engine_queue == 0 {
            bail!("queue sizes must be positive");
        }
        self.policy_set()?;
        self.memory.validate()?;
        if self.write_concern_timeout_ms == 0 || self.write_concern_timeout_ms > 3_600_000 {
            bail!("write_concern_timeout_ms must be between 1 and 3600000");
        }
        if self.peers.iter().any(|p| p.rate_limit.is_some_and(|r| r < 1_024)) {
            bail!("a peer's rate_limit must be at least 1024 bytes per second");
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.peers {
            crate::certs::check_node_name(&p.name)?;
            if p.name == self.node {
                bail!("peer {} is this node", p.name);
            }
            if !names.insert(&p.name) {
                bail!("peer {} is listed twice", p.name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        std::fs::write(
            &path,
            r#"
node = "n1"
region = "eu"
listen = "127.0.0.1:7401"
data_dir = "data/n1"
ca = "ca.pem"
cert = "n1.pem"
key = "n1.key"
tokens = ["a"]
[[peers]]
name = "n2"
region = "us"
address = "127.0.0.1:7402"
"#,
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            region: Some("ap".into()),
            ..RunArgs::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!((c.node.as_str(), c.region.as_str()), ("n1", "ap"));
        assert_eq!(c.durability, Durability::Group);
        assert_eq!(c.peers.len(), 1);
        let bad = RunArgs {
            config: Some(path),
            peers: vec!["n1=eu@127.0.0.1:1".into()],
            ..RunArgs::default()
        };
        assert!(Config::load(&bad).unwrap_err().to_string().contains("is this node"));
        std::fs::write(dir.path().join("x.toml"), "node = \"n1\"\nbogus = 1\n").unwrap();
        let unknown = RunArgs {
            config: Some(dir.path().join("x.toml")),
            ..RunArgs::default()
        };
        assert!(format!("{:#}", Config::load(&unknown).unwrap_err()).contains("bogus"));
    }
}
