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
    /// Bearer token required on `/metrics` and `/status`
    /// (`Authorization: Bearer TOKEN`). Without one the HTTP listener must
    /// bind a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<String>,
    /// Serial numbers (hex, as `latticed certs` prints them) of revoked
    /// certificates: a peer or client presenting one is refused, and a peer
    /// answering with one is not sent anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_serials: Vec<String>,
    /// Limits of the network edge (the `[limits]` table).
    #[serde(default, skip_serializing_if = "NetLimits::is_default")]
    pub limits: NetLimits,
    /// Byte budgets of queues, the watch feed and waiting reads (`[memory]`).
    #[serde(default, skip_serializing_if = "crate::limits::MemoryConfig::is_default")]
    pub memory: crate::limits::MemoryConfig,
    /// The durable change log (`[log]`).
    #[serde(default, skip_serializing_if = "LogConfig::is_default")]
    pub log: LogConfig,
    /// TCP address of the Redis-protocol (RESP2/RESP3) listener (omit:
    /// none). Clients authenticate with `AUTH <token>`, a token of
    /// `tokens` or `admin_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<SocketAddr>,
    /// Serve the RESP listener over TLS, with this node's certificate and
    /// key (signed by the cluster CA: clients verify it with `ca`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resp_tls: bool,
    /// Most RESP connections open at once; past it a new one is answered
    /// `-ERR max number of clients reached` and closed.
    #[serde(
        default = "default_resp_connections",
        skip_serializing_if = "is_default_resp_connections"
    )]
    pub resp_max_connections: usize,
    /// Scoped credentials (`[[access]]`): each a token (or the name of a
    /// client certificate of the cluster CA) with per-prefix permissions.
    /// See `crate::access` and README "Scoped tokens and client
    /// certificates".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessEntry>,
    /// Encryption at rest (`[encryption]`; off when absent).
    #[serde(default, skip_serializing_if = "EncryptionConfig::is_default")]
    pub encryption: EncryptionConfig,
    // -- Policy governance (issue 18): who may change a policy, keyed audit.
    /// ed25519 public keys (64 hex digits) whose signed policy sets this
    /// node adopts from `lattice policy set` and from peers. Empty: no set
    /// but this file's own is ever put in force. To rotate, add the new
    /// key on every node, sign with it, then remove the old one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_keys: Vec<String>,
    /// A file (outside the data directory) holding the audit log's key:
    /// 64 hex digits. With it, every new audit entry is keyed and the log
    /// must be keyed throughout (see SECURITY.md). `LATTICE_AUDIT_KEY`
    /// gives the key itself instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_key_file: Option<PathBuf>,
}

/// A permission of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// Reads, scans, point-in-time reads and change-log reads.
    Read,
    /// Writes.
    Write,
    /// Watches (needs `read` in the same grant).
    Watch,
    /// Policy changes, backups, the full credential list (only on the
    /// prefix `""`).
    Admin,
}

impl Perm {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Perm::Read => "read",
            Perm::Write => "write",
            Perm::Watch => "watch",
            Perm::Admin => "admin",
        }
    }
}

/// One grant of an `[[access]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantEntry {
    /// The key prefix it covers (`""`: every key).
    pub prefix: String,
    /// What it allows on those keys.
    pub allow: Vec<Perm>,
}

/// A scoped credential (`[[access]]` in the TOML file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessEntry {
    /// Its name (in logs, errors and `lattice status`; never the secret).
    pub name: String,
    /// The bearer token (16 to 1,024 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The environment variable holding the token instead (read at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// The name (CN) of a client certificate of the cluster CA
    /// (`latticed certs client NAME`) that authenticates as this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// What it may do.
    pub grants: Vec<GrantEntry>,
}

impl AccessEntry {
    /// Takes the token from `token_env`, if named.
    fn resolve(&mut self) -> Result<()> {
        if let Some(var) = &self.token_env {
            if self.token.is_some() {
                bail!("[[access]] {:?}: set token or token_env, not both", self.name);
            }
            let t = std::env::var(var)
                .with_context(|| format!("[[access]] {:?}: environment variable {var} (token_env)", self.name))?;
            self.token = Some(t);
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let name = &self.name;
        if name.is_empty() || name.len() > 128 {
            bail!("[[access]] name must be 1 to 128 bytes");
        }
        if let Some(cn) = &self.client_cert {
            if cn.is_empty() || cn.len() > 128 || cn.chars().any(char::is_control) {
                bail!("[[access]] {name:?}: client_cert must be a certificate name of 1 to 128 printable characters");
            }
        }
        if self.token.is_none() && self.client_cert.is_none() {
            bail!("[[access]] {name:?}: needs a token, token_env or client_cert");
        }
        if let Some(t) = &self.token {
            check_tokens(&format!("[[access]] {name:?} token"), std::slice::from_ref(t))?;
        }
        if self.grants.is_empty() {
            bail!("[[access]] {name:?}: no grants");
        }
        for g in &self.grants {
            if g.prefix.len() > lattice_core::MAX_KEY_LEN {
                bail!("[[access]] {name:?}: a grant's prefix is longer than a key may be");
            }
            if g.allow.is_empty() {
                bail!("[[access]] {name:?}: the grant of {:?} allows nothing", g.prefix);
            }
            if g.allow.contains(&Perm::Admin) && !g.prefix.is_empty() {
                bail!(
                    "[[access]] {name:?}: admin may only be granted on the prefix \"\" (it changes the policy of every keyspace), not {:?}",
                    g.prefix
                );
            }
            if g.allow.contains(&Perm::Watch) && !g.allow.contains(&Perm::Read) {
                bail!(
                    "[[access]] {name:?}: the grant of {:?} allows watch without read (a change carries its value)",
                    g.prefix
                );
            }
        }
        Ok(())
    }
}

/// Encryption at rest (`[encryption]` in the TOML file). The key (KEK) is
/// 64 hex digits in `key_file`, or in `LATTICE_ENCRYPTION_KEY`, which wins;
/// it must not be kept in the data dir. Older keys, only to unwrap data
/// keys wrapped before a rotation: `old_key_files`, or
/// `LATTICE_ENCRYPTION_OLD_KEYS` (comma-separated hex). See `crate::crypt`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// The file holding the current key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Files holding older keys.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub old_key_files: Vec<PathBuf>,
}

impl EncryptionConfig {
    fn is_default(&self) -> bool {
        *self == EncryptionConfig::default()
    }

    /// The keys this section and the environment give (none: no
    /// encryption). A key file inside `data_dir` is refused: the data dir
    /// must not hold the key that protects it.
    pub fn keys(&self, data_dir: &Path) -> Result<crate::crypt::Keys> {
        use crate::crypt::{Kek, Keys, KEY_ENV, OLD_KEYS_ENV};
        let inside = |p: &Path| {
            let abs = |q: &Path| std::fs::canonicalize(q).unwrap_or_else(|_| q.to_path_buf());
            abs(p).starts_with(abs(data_dir))
        };
        let mut keys = Keys::none();
        let env = std::env::var(KEY_ENV).ok().filter(|v| !v.trim().is_empty());
        keys.current = match (env, &self.key_file) {
            (Some(hex), _) => Some(Kek::from_hex(&hex, KEY_ENV)?),
            (None, Some(f)) => {
                if inside(f) {
                    bail!(
                        "[encryption] key_file {} is inside the data dir {}: keep the key elsewhere",
                        f.display(),
                        data_dir.display()
                    );
                }
                Some(Kek::from_file(f)?)
            }
            (None, None) => None,
        };
        for f in &self.old_key_files {
            keys.old.push(Kek::from_file(f)?);
        }
        if let Ok(list) = std::env::var(OLD_KEYS_ENV) {
            for hex in list.split(',').filter(|h| !h.trim().is_empty()) {
                keys.old.push(Kek::from_hex(hex, OLD_KEYS_ENV)?);
            }
        }
        Ok(keys)
    }
}

/// The change log's settings (`[log]` in the TOML file; every field
/// optional). See `crate::changelog`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Partitions of the log, fixed when the data dir is created (a node
    /// whose data dir has another number refuses to start).
    pub partitions: u16,
    /// Bytes of changes retained; past it the oldest are dropped.
    pub retention_bytes: u64,
    /// Changes older than this (seconds) are dropped (0: no limit).
    pub retention_secs: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        let d = crate::changelog::LogSettings::default();
        LogConfig {
            partitions: d.partitions,
            retention_bytes: d.retention_bytes,
            retention_secs: d.retention_age_ms / 1000,
        }
    }
}

impl LogConfig {
    /// All defaults (a written config then leaves the table out).
    pub fn is_default(&self) -> bool {
        *self == LogConfig::default()
    }

    /// Refuses a partition count the log cannot have here, naming the
    /// setting (the store would refuse it too, but as a damaged data dir).
    fn validate(&self) -> Result<()> {
        let max = lattice_core::log::MAX_PARTITIONS;
        if self.partitions == 0 || self.partitions > max {
            bail!("[log] partitions must be 1 to {max}, not {}", self.partitions);
        }
        Ok(())
    }

    /// The store's settings.
    pub fn settings(&self) -> crate::changelog::LogSettings {
        crate::changelog::LogSettings {
            partitions: self.partitions,
            retention_bytes: self.retention_bytes,
            retention_age_ms: self.retention_secs.saturating_mul(1000),
        }
    }
}

fn default_resp_connections() -> usize {
    1_024
}

fn is_default_resp_connections(n: &usize) -> bool {
    *n == default_resp_connections()
}

/// Shortest accepted client, admin or metrics token, in bytes: a token is a
/// password an attacker may guess online.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest accepted token, in bytes (the node reads at most this much of a
/// request before it checks the token).
pub const MAX_TOKEN_BYTES: usize = 1_024;

/// What the network edge lets a connection hold before it has shown a token
/// (the `[limits]` table of the config file; every field has a default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetLimits {
    /// Connections open or in their handshake, in all.
    pub max_connections: usize,
    /// Connections open or in their handshake from one source address (an
    /// IPv6 source counts by its /64).
    pub max_connections_per_ip: usize,
    /// Above this many handshakes in progress, a new connection from an
    /// address not yet validated gets a QUIC Retry first (it must prove it
    /// receives at its source address; costs it one round trip).
    pub retry_above_handshakes: usize,
    /// A client stream's request must start (its length prefix arrive)
    /// within this many milliseconds of the stream opening; the same holds
    /// for a peer stream's first frame.
    pub first_frame_ms: u64,
    /// A client frame, once its length prefix arrived, must be complete
    /// within this many milliseconds.
    pub frame_ms: u64,
    /// A client connection that has not sent a request with a valid token
    /// within this many milliseconds of its handshake is closed.
    pub auth_ms: u64,
    /// Bytes of client request bodies being read at once, all connections
    /// together. A request waits for its share (up to `frame_ms`), then
    /// gets `Overloaded`.
    pub read_budget_bytes: usize,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_connections: 2_048,
            max_connections_per_ip: 64,
            retry_above_handshakes: 64,
            first_frame_ms: 5_000,
            frame_ms: 10_000,
            auth_ms: 5_000,
            read_budget_bytes: 64 << 20,
        }
    }
}

impl NetLimits {
    fn is_default(&self) -> bool {
        *self == NetLimits::default()
    }

    fn validate(&self) -> Result<()> {
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            bail!("[limits] max_connections and max_connections_per_ip must be positive");
        }
        if self.first_frame_ms == 0 || self.frame_ms == 0 || self.auth_ms == 0 {
            bail!("[limits] first_frame_ms, frame_ms and auth_ms must be positive");
        }
        if self.read_budget_bytes < lattice_core::proto::client::MAX_CLIENT_FRAME + 4 {
            bail!(
                "[limits] read_budget_bytes must hold at least one client frame ({} bytes)",
                lattice_core::proto::client::MAX_CLIENT_FRAME + 4
            );
        }
        if self.read_budget_bytes > u32::MAX as usize {
            bail!("[limits] read_budget_bytes must be under 4 GiB");
        }
        Ok(())
    }
}

/// Refuses empty, short and overlong tokens, naming the setting (never the
/// token itself, which would end up in logs).
fn check_tokens(setting: &str, tokens: &[String]) -> Result<()> {
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            bail!(
                "{setting}: entry {} is empty (a trailing comma in a list?); an empty token is never accepted",
                i + 1
            );
        }
        if t.len() < MIN_TOKEN_BYTES {
            bail!(
                "{setting}: entry {} has {} bytes; tokens need at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 16`)",
                i + 1,
                t.len()
            );
        }
        if t.len() > MAX_TOKEN_BYTES {
            bail!(
                "{setting}: entry {} has {} bytes, more than {MAX_TOKEN_BYTES}",
                i + 1,
                t.len()
            );
        }
    }
    Ok(())
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
    /// Bearer token required on /metrics and /status (required when the
    /// HTTP address is not loopback).
    #[arg(long, env = "LATTICE_METRICS_TOKEN")]
    pub metrics_token: Option<String>,
    /// A revoked certificate serial, hex (repeatable; replaces the file's list).
    #[arg(long = "revoked-serial", env = "LATTICE_REVOKED_SERIALS", value_delimiter = ',')]
    pub revoked_serials: Vec<String>,
    /// TCP address of the Redis-protocol (RESP) listener, e.g. 127.0.0.1:6379.
    #[arg(long, env = "LATTICE_RESP")]
    pub resp: Option<SocketAddr>,
    /// A trusted policy public key, hex (repeatable; replaces the file's list).
    #[arg(long = "policy-key", env = "LATTICE_POLICY_KEYS", value_delimiter = ',')]
    pub policy_keys: Vec<String>,
    /// File holding the audit log key (64 hex digits), outside the data dir.
    #[arg(long, env = "LATTICE_AUDIT_KEY_FILE")]
    pub audit_key_file: Option<PathBuf>,
}

/// The audit log's key: `LATTICE_AUDIT_KEY` (64 hex digits) if set, else
/// the contents of `file`; `None` without either. A key file inside
/// `data_dir` is refused: whoever can rewrite the log could read the key
/// next to it.
pub fn load_audit_key(file: Option<&Path>, data_dir: &Path) -> Result<Option<lattice_core::policy::audit::AuditKey>> {
    let parse = |text: &str, what: &str| -> Result<lattice_core::policy::audit::AuditKey> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{what}: the audit key is 64 hex digits");
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                .map_err(|_| anyhow::anyhow!("{what}: the audit key is not hex"))?;
        }
        Ok(lattice_core::policy::audit::AuditKey(k))
    };
    if let Ok(v) = std::env::var("LATTICE_AUDIT_KEY") {
        return parse(&v, "LATTICE_AUDIT_KEY").map(Some);
    }
    let Some(path) = file else { return Ok(None) };
    let what = format!("audit_key_file {}", path.display());
    if let (Ok(f), Ok(d)) = (path.canonicalize(), data_dir.canonicalize()) {
        if f.starts_with(&d) {
            bail!("{what} is inside the data directory: keep the audit key elsewhere");
        }
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {what}"))?;
    parse(&text, &what).map(Some)
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
    /// `policy_keys` parsed: at most
    /// [`MAX_POLICY_KEYS`](lattice_core::policy::signed::MAX_POLICY_KEYS),
    /// each a valid ed25519 public key.
    pub fn trusted_policy_keys(&self) -> Result<lattice_core::policy::signed::TrustedKeys> {
        use lattice_core::policy::signed::{parse_public_key, MAX_POLICY_KEYS};
        const SETTING: &str = "policy_keys (LATTICE_POLICY_KEYS, --policy-key)";
        if self.policy_keys.len() > MAX_POLICY_KEYS {
            bail!("{SETTING}: at most {MAX_POLICY_KEYS} keys");
        }
        let keys = self
            .policy_keys
            .iter()
            .enumerate()
            .map(|(i, k)| parse_public_key(k).map_err(|e| anyhow::anyhow!("{SETTING}: entry {}: {e}", i + 1)))
            .collect::<Result<Vec<_>>>()?;
        Ok(lattice_core::policy::signed::TrustedKeys::new(keys))
    }

    /// The audit log's key (see [`load_audit_key`]).
    pub fn audit_key(&self) -> Result<Option<lattice_core::policy::audit::AuditKey>> {
        load_audit_key(self.audit_key_file.as_deref(), &self.data_dir)
    }

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
            metrics_token: args
                .metrics_token
                .clone()
                .or(c.as_ref().and_then(|c| c.metrics_token.clone())),
            revoked_serials: if args.revoked_serials.is_empty() {
                c.as_ref().map(|c| c.revoked_serials.clone()).unwrap_or_default()
            } else {
                args.revoked_serials.clone()
            },
            limits: c.as_ref().map(|c| c.limits.clone()).unwrap_or_default(),
            memory: c.as_ref().map(|c| c.memory.clone()).unwrap_or_default(),
            log: c.as_ref().map(|c| c.log.clone()).unwrap_or_default(),
            resp: args.resp.or(c.as_ref().and_then(|c| c.resp)),
            resp_tls: c.as_ref().is_some_and(|c| c.resp_tls),
            resp_max_connections: c
                .as_ref()
                .map_or(default_resp_connections(), |c| c.resp_max_connections),
            access: c.as_ref().map(|c| c.access.clone()).unwrap_or_default(),
            encryption: c.as_ref().map(|c| c.encryption.clone()).unwrap_or_default(),
            policy_keys: if args.policy_keys.is_empty() {
                c.as_ref().map(|c| c.policy_keys.clone()).unwrap_or_default()
            } else {
                args.policy_keys.clone()
            },
            audit_key_file: args
                .audit_key_file
                .clone()
                .or(c.as_ref().and_then(|c| c.audit_key_file.clone())),
        };
        let mut config = config;
        for e in &mut config.access {
            e.resolve()?;
        }
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
        check_tokens("tokens (LATTICE_TOKENS, --token)", &self.tokens)?;
        check_tokens("admin_tokens (LATTICE_ADMIN_TOKENS, --admin-token)", &self.admin_tokens)?;
        let mut names = std::collections::BTreeSet::new();
        let mut certs = std::collections::BTreeSet::new();
        for e in &self.access {
            e.validate()?;
            if !names.insert(&e.name) {
                bail!("[[access]] {:?} is named twice", e.name);
            }
            if let Some(cn) = &e.client_cert {
                if !certs.insert(cn) {
                    bail!("[[access]]: client_cert {cn:?} is given to two entries");
                }
            }
        }
        // A token in both `tokens` and `admin_tokens` is an admin's (as
        // `latticed dev` writes it); an `[[access]]` token must be its own.
        let mut all: Vec<&String> = self.access.iter().filter_map(|e| e.token.as_ref()).collect();
        let scoped = all.len();
        all.sort();
        all.dedup();
        if all.len() != scoped
            || all
                .iter()
                .any(|t| self.tokens.contains(t) || self.admin_tokens.contains(t))
        {
            bail!("an [[access]] token is configured twice (in [[access]], tokens or admin_tokens): each scoped credential must be distinct");
        }
        if let Some(t) = &self.metrics_token {
            check_tokens("metrics_token (LATTICE_METRICS_TOKEN)", std::slice::from_ref(t))?;
        }
        if let Some(addr) = self.metrics {
            if !addr.ip().is_loopback() && self.metrics_token.is_none() {
                bail!(
                    "metrics address {addr} is not loopback: /metrics and /status would be open to the network; \
                     set metrics_token (LATTICE_METRICS_TOKEN) or bind 127.0.0.1"
                );
            }
        }
        for s in &self.revoked_serials {
            crate::certs::normalize_serial(s).with_context(|| format!("revoked_serials entry {s:?}"))?;
        }
        self.limits.validate()?;
        self.log.validate()?;
        if self.resp_tls && self.resp.is_none() {
            bail!("resp_tls is set but resp (the RESP listen address) is not");
        }
        if self.resp_max_connections == 0 {
            bail!("resp_max_connections must be positive");
        }
        self.trusted_policy_keys()?;
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

    /// Loads `base` followed by `extra` (TOML), returning the error text.
    fn load_error(extra: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        let base = "node = \"n1\"\nregion = \"eu\"\nlisten = \"127.0.0.1:7401\"\ndata_dir = \"d\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\ntokens = [\"0123456789abcdef\"]\n";
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let args = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        };
        match Config::load(&args) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn access_entries_are_checked_at_start() {
        let ok = "[[access]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa1\"\ngrants = [{ prefix = \"eu/\", allow = [\"read\", \"watch\"] }]\n";
        assert_eq!(load_error(ok), "");
        for (extra, says) in [
            (
                "[[access]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa1\"\ngrants = [{ prefix = \"eu/\", allow = [\"admin\"] }]\n",
                "admin may only be granted on the prefix",
            ),
            (
                "[[access]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa1\"\ngrants = [{ prefix = \"\", allow = [\"watch\"] }]\n",
                "watch without read",
            ),
            (
                "[[access]]\nname = \"a\"\ntoken = \"short\"\ngrants = [{ prefix = \"\", allow = [\"read\"] }]\n",
                "tokens need at least 16",
            ),
            (
                "[[access]]\nname = \"a\"\ngrants = [{ prefix = \"\", allow = [\"read\"] }]\n",
                "needs a token, token_env or client_cert",
            ),
            ("[[access]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa1\"\ngrants = []\n", "no grants"),
            (
                "[[access]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\ngrants = [{ prefix = \"\", allow = [\"read\"] }]\n",
                "configured twice",
            ),
            (
                "[[access]]\nname = \"a\"\ntoken_env = \"LATTICE_TEST_SURELY_UNSET_VARIABLE\"\ngrants = [{ prefix = \"\", allow = [\"read\"] }]\n",
                "LATTICE_TEST_SURELY_UNSET_VARIABLE",
            ),
            (
                "[[access]]\nname = \"a\"\ntoken = \"aaaaaaaaaaaaaaaa1\"\ngrants = [{ prefix = \"\", allow = [\"fly\"] }]\n",
                "unknown variant",
            ),
        ] {
            let e = load_error(extra);
            assert!(e.contains(says), "{extra}: {e:?} should say {says:?}");
            assert!(!e.contains("aaaaaaaaaaaaaaaa1"), "the token is never printed: {e}");
        }
    }

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
tokens = ["0123456789abcdef"]
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

    #[test]
    fn log_partitions_out_of_range_are_refused_as_a_setting() {
        let dir = tempfile::tempdir().unwrap();
        for (n, ok) in [(0, false), (1, true), (1_024, true), (1_025, false), (2_000, false)] {
            let path = dir.path().join(format!("p{n}.toml"));
            let text = std::fs::read_to_string(base(dir.path())).unwrap();
            std::fs::write(
                &path,
                format!("{text}tokens = [\"0123456789abcdef\"]\n[log]\npartitions = {n}\n"),
            )
            .unwrap();
            let r = Config::load(&RunArgs {
                config: Some(path),
                ..RunArgs::default()
            });
            match (r, ok) {
                (Ok(_), true) => {}
                (Err(e), false) => assert!(format!("{e:#}").contains("[log] partitions"), "{e:#}"),
                (r, _) => panic!("partitions = {n}: {:?}", r.map(|_| ())),
            }
        }
    }

    fn base(dir: &Path) -> PathBuf {
        let path = dir.join("n1.toml");
        std::fs::write(
            &path,
            "node = \"n1\"\nregion = \"eu\"\nlisten = \"127.0.0.1:7401\"\ndata_dir = \"d\"\n\
             ca = \"ca.pem\"\ncert = \"n1.pem\"\nkey = \"n1.key\"\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn empty_and_short_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(dir.path());
        let load = |tokens: &[&str], admin: &[&str]| {
            Config::load(&RunArgs {
                config: Some(path.clone()),
                tokens: tokens.iter().map(|t| t.to_string()).collect(),
                admin_tokens: admin.iter().map(|t| t.to_string()).collect(),
                ..RunArgs::default()
            })
        };
        // LATTICE_ADMIN_TOKENS="s3cret," splits into a short and an empty token.
        let e = format!("{:#}", load(&[], &["s3cret", ""]).unwrap_err());
        assert!(e.contains("admin_tokens") && e.contains("at least 16"), "{e}");
        let e = format!("{:#}", load(&[], &["0123456789abcdef", ""]).unwrap_err());
        assert!(e.contains("empty"), "{e}");
        let e = format!("{:#}", load(&["short"], &[]).unwrap_err());
        assert!(
            e.contains("tokens") && !e.contains("short"),
            "the token itself is not printed: {e}"
        );
        assert!(load(&[&"x".repeat(MAX_TOKEN_BYTES + 1)], &[]).is_err());
        assert!(load(&["0123456789abcdef"], &["fedcba9876543210"]).is_ok());
        assert!(load(&[], &[]).is_ok(), "no token at all starts (with a warning)");
    }

    #[test]
    fn an_open_metrics_address_needs_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(dir.path());
        let load = |metrics: &str, token: Option<&str>| {
            Config::load(&RunArgs {
                config: Some(path.clone()),
                metrics: Some(metrics.parse().unwrap()),
                metrics_token: token.map(str::to_string),
                ..RunArgs::default()
            })
        };
        assert!(load("127.0.0.1:7501", None).is_ok());
        let e = format!("{:#}", load("0.0.0.0:7501", None).unwrap_err());
        assert!(e.contains("metrics_token"), "{e}");
        assert!(load("0.0.0.0:7501", Some("0123456789abcdef0123")).is_ok());
        assert!(load("0.0.0.0:7501", Some("short")).is_err());
    }

    #[test]
    fn the_resp_listener_is_optional_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(dir.path());
        let load = || {
            Config::load(&RunArgs {
                config: Some(path.clone()),
                ..RunArgs::default()
            })
        };
        let c = load().unwrap();
        assert_eq!((c.resp, c.resp_tls, c.resp_max_connections), (None, false, 1_024));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("resp_tls = true\n{text}")).unwrap();
        assert!(format!("{:#}", load().unwrap_err()).contains("resp_tls"));
        std::fs::write(&path, format!("resp = \"127.0.0.1:6379\"\nresp_tls = true\n{text}")).unwrap();
        let c = load().unwrap();
        assert_eq!(c.resp, Some("127.0.0.1:6379".parse().unwrap()));
        // Written back (as latticed dev does), the keys survive.
        let again: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn limits_table_is_optional_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = base(dir.path());
        let c = Config::load(&RunArgs {
            config: Some(path.clone()),
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(c.limits, NetLimits::default());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}[limits]\nmax_connections_per_ip = 0\n")).unwrap();
        assert!(Config::load(&RunArgs {
            config: Some(path),
            ..RunArgs::default()
        })
        .is_err());
    }
}
