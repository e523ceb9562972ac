//! `lattice`: the command-line client.

#[path = "lattice/governance.rs"]
mod governance;

use clap::{Parser, Subcommand};
use lattice_client::{json, Client, Endpoint, Entry, Error};
use lattice_core::crdt::{Bytes, Field, FieldKind, NestedView, Op, ValueView};
use lattice_core::proto::client::{NodeStatus, RequestBody, Response, WriteConcern};
use lattice_core::Key;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Command-line client for Lattice. Defaults (endpoints, token, CA) come from
/// the file `latticed dev` writes (`.lattice-dev/client.toml`), or --config.
#[derive(Parser)]
#[command(name = "lattice", version, about)]
struct Cli {
    /// A node as NAME@HOST:PORT: its certificate must name NAME
    /// (repeatable; tried in order). A bare HOST:PORT takes the name the
    /// defaults file gives that address, else `localhost` (dev only).
    #[arg(long = "endpoint", env = "LATTICE_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<Endpoint>,
    /// Client token.
    #[arg(long, env = "LATTICE_TOKEN")]
    token: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "LATTICE_CA")]
    ca: Option<PathBuf>,
    /// A client certificate of the cluster CA to present (PEM; `latticed
    /// certs client NAME`). A node whose `[[access]]` names it serves this
    /// client with that entry's grants; no token is then needed.
    #[arg(long, env = "LATTICE_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key of `--client-cert` (PEM).
    #[arg(long, env = "LATTICE_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Refuse nodes whose certificate has this serial (hex as `latticed
    /// certs show` prints it; repeatable, or comma-separated). Added to
    /// `revoked_serials` in the defaults file.
    #[arg(long = "revoked-serial", env = "LATTICE_REVOKED_SERIALS", value_delimiter = ',')]
    revoked_serials: Vec<String>,
    /// Defaults file.
    #[arg(long, env = "LATTICE_CLIENT_CONFIG", default_value = ".lattice-dev/client.toml")]
    config: PathBuf,
    /// Print JSON instead of human-readable output.
    #[arg(long)]
    json: bool,
    /// Write concern of writes: `local` (durable on the node, the default),
    /// `regions(N)` (durable in N distinct regions) or `all`.
    #[arg(long, default_value = "local")]
    concern: WriteConcern,
    /// How long a write waits for its concern, milliseconds (0: the node's
    /// `write_concern_timeout_ms`). On timeout the write stays durable in
    /// the first region and keeps replicating.
    #[arg(long, default_value_t = 0)]
    concern_timeout_ms: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read a key.
    Get {
        /// The key.
        key: String,
        /// Read the key's value as of this time on the node's clock
        /// instead: RFC 3339 (`2026-11-29T07:40:00Z`), milliseconds since
        /// the Unix epoch, or `-DURATION` (`-90s`, `-5m`, `-2h`) before now.
        /// Needs the key's whole history in the node's change log.
        #[arg(long, allow_hyphen_values = true)]
        at: Option<String>,
    },
    /// Add to a counter (negative to subtract).
    Incr {
        /// The key.
        key: String,
        /// The amount.
        #[arg(allow_negative_numbers = true, default_value_t = 1)]
        by: i64,
    },
    /// Write a last-writer-wins register.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Add elements to a set.
    Sadd {
        /// The key.
        key: String,
        /// The elements.
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Remove elements from a set.
    Srem {
        /// The key.
        key: String,
        /// The elements.
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
    },
    /// Write a multi-value register: concurrent writes are all kept (read
    /// back as several values) until a write that saw them replaces them.
    Mvset {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Write a register field of a map (a multi-value register).
    Hset {
        /// The map's key.
        key: String,
        /// The field.
        field: String,
        /// The value.
        value: String,
    },
    /// Read the fields of a map named FIELD (of any type).
    Hget {
        /// The map's key.
        key: String,
        /// The field.
        field: String,
    },
    /// Remove fields of a map (each of any type it holds under that name).
    Hdel {
        /// The map's key.
        key: String,
        /// The fields.
        #[arg(required = true)]
        fields: Vec<String>,
    },
    /// Add to a counter field of a map (negative to subtract).
    Hincr {
        /// The map's key.
        key: String,
        /// The field.
        field: String,
        /// The amount.
        #[arg(allow_negative_numbers = true, default_value_t = 1)]
        by: i64,
    },
    /// Read every field of a map.
    Hgetall {
        /// The map's key.
        key: String,
    },
    /// Read several keys at once (at most 1,000).
    Mget {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// List the keys starting with PREFIX (in storage order, not sorted),
    /// page by page until done or --max keys were printed.
    Scan {
        /// The key prefix ("" for every key).
        #[arg(default_value = "")]
        prefix: String,
        /// Print each key's value too.
        #[arg(long)]
        values: bool,
        /// Keys per page asked of the node (at most 1,000).
        #[arg(long, default_value_t = 500)]
        page: u32,
        /// Stop after this many keys (0: no limit).
        #[arg(long, default_value_t = 0)]
        max: usize,
    },
    /// Print the first node's change log: every change applied there (local
    /// writes and merges of remote ones), each partition's in order, with
    /// its position; then the cursor to go on from (`--from`).
    Log {
        /// Only keys starting with this prefix ("" for all keys).
        #[arg(default_value = "")]
        prefix: String,
        /// Only this partition (repeatable; default: all).
        #[arg(long = "partition")]
        partitions: Vec<u16>,
        /// Go on from this cursor (as a previous `lattice log` printed it);
        /// default: the oldest change retained.
        #[arg(long)]
        from: Option<String>,
        /// Keep waiting for new changes (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Stop after this many changes (0: no limit).
        #[arg(long, default_value_t = 0)]
        max: usize,
    },
    /// Follow changes to keys starting with a prefix (Ctrl-C to stop).
    Watch {
        /// The key prefix ("" for all keys).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Regions, peers, replication lag and per-keyspace copies as the first
    /// reachable node sees them.
    Status,
    /// Replication policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The policy audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Have the first endpoint's node write a consistent backup of its state
    /// into DIR on its own host (an absolute path that must not exist yet;
    /// needs an admin token). Restore it with `latticed restore`.
    Backup {
        /// The backup directory, on the node's host.
        dir: String,
    },
    /// Have the first endpoint's node re-encrypt every value it stores
    /// (states and change log) under its newest data key, online, then
    /// drop its older data keys (needs an admin token and encryption at
    /// rest on the node).
    Reencrypt {
        /// Make a new data key first (a data key rotation).
        #[arg(long)]
        rotate: bool,
    },
    /// Load generator: C concurrent sessions send one operation at a time
    /// to the first endpoint for --secs seconds; prints ops/s and latency
    /// percentiles (`ops_per_sec=... p50_us=... p99_us=... p999_us=...`).
    Bench {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: usize,
        /// Value size of `set`, bytes.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Operation: set, incr, get or mix (50% set, 30% get, 20% incr).
        #[arg(long, value_enum, default_value = "set")]
        op: lattice_client::bench::BenchOp,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Put a policy set in force: a TOML file with `version = N` (higher
    /// than the version in force) and `[[policy]]` tables, each with
    /// `keyspace`, `regions` ("all", "local" or a list), `priority`
    /// (critical, normal, bulk) and optional `writers`. The node spreads it
    /// to every other node; each records it in its audit log.
    ///
    /// Nodes adopt only sets signed by a key in their `policy_keys`: with
    /// --key the file is signed here; without, a file from `lattice policy
    /// sign` is sent as it is, and an unsigned one is signed with
    /// `policy_key` from the defaults file, if it names one.
    Set {
        /// The file.
        file: PathBuf,
        /// The admin's private key file (from `lattice policy keygen`).
        #[arg(long, env = "LATTICE_POLICY_KEY")]
        key: Option<PathBuf>,
    },
    /// Sign a policy file offline with an admin key: writes the file with
    /// `signer` and `signature` added, for `lattice policy set`.
    Sign {
        /// The policy file.
        file: PathBuf,
        /// The admin's private key file.
        #[arg(long, env = "LATTICE_POLICY_KEY")]
        key: PathBuf,
        /// Where to write the signed file (created, never overwritten;
        /// default: standard output).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Make a new admin policy key: writes the private key to OUT (0600,
    /// never overwriting) and prints the public key, which every node
    /// lists in `policy_keys`. Keep the private key off the nodes.
    Keygen {
        /// The private key file to create.
        out: PathBuf,
    },
    /// The policy set in force and where each keyspace's copies are.
    Show,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Fetch every node's audit log (every endpoint), verify each chain
    /// and the signature of each set, and compare the nodes version by
    /// version; exits non-zero if an entry was edited, removed or
    /// reordered, a node cannot be asked, or a version's set digest or
    /// signer differs between nodes.
    Verify,
    /// Print the node's audit log.
    Show,
}

#[derive(Deserialize)]
struct Defaults {
    endpoints: Vec<SocketAddr>,
    /// The token (may be left out when a client certificate is given).
    #[serde(default)]
    token: String,
    ca: PathBuf,
    /// A client certificate and its key (paths), as --client-cert/--client-key.
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    /// Node name of each endpoint (absent in files from before names).
    #[serde(default)]
    names: Vec<String>,
    /// Certificate serials to refuse (the nodes' `revoked_serials`).
    #[serde(default)]
    revoked_serials: Vec<String>,
    /// The admin's policy signing key, used by `lattice policy set`
    /// without --key.
    #[serde(default)]
    policy_key: Option<PathBuf>,
}

impl Defaults {
    /// The node name the file gives `addr`.
    fn name_of(&self, addr: SocketAddr) -> Option<String> {
        let i = self.endpoints.iter().position(|e| *e == addr)?;
        self.names.get(i).cloned()
    }
}

fn text(b: &Bytes) -> String {
    String::from_utf8(b.0.clone()).unwrap_or_else(|_| format!("{b:?}"))
}

fn show(v: &Option<ValueView>) -> String {
    match v {
        None => "(absent)".into(),
        Some(ValueView::Counter(n)) => n.to_string(),
        Some(ValueView::Register(Some(b))) => text(b),
        Some(ValueView::Register(None)) => "(deleted)".into(),
        Some(ValueView::Values(vs)) | Some(ValueView::Set(vs)) if vs.is_empty() => "(empty)".into(),
        Some(ValueView::Values(vs)) | Some(ValueView::Set(vs)) => vs.iter().map(text).collect::<Vec<_>>().join("\n"),
        Some(other) => other.to_string(),
    }
}

fn key(s: &str) -> Result<Key, String> {
    Key::new(s).map_err(|e| e.to_string())
}

/// [`run`], then closes the client's connections (see [`Client::close`]).
async fn run_and_close(cli: Cli) -> Result<(), String> {
    let mut client = None;
    let result = run(cli, &mut client).await;
    if let Some(c) = client {
        c.close().await;
    }
    result
}

async fn run(cli: Cli, slot: &mut Option<std::sync::Arc<Client>>) -> Result<(), String> {
    // Offline: no node, token or CA needed.
    match &cli.cmd {
        Cmd::Policy(PolicyCmd::Keygen { out }) => return governance::keygen(out),
        Cmd::Policy(PolicyCmd::Sign { file, key, out }) => return governance::sign(file, key, out.as_deref()),
        _ => {}
    }
    let file: Option<Defaults> = std::fs::read_to_string(&cli.config)
        .ok()
        .and_then(|t| toml::from_str(&t).ok());
    let endpoints: Vec<Endpoint> = if cli.endpoints.is_empty() {
        file.as_ref()
            .map(|d| {
                d.endpoints
                    .iter()
                    .map(|&addr| Endpoint {
                        name: d.name_of(addr),
                        addr,
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        cli.endpoints
            .iter()
            .map(|e| Endpoint {
                name: e.name.clone().or_else(|| file.as_ref().and_then(|d| d.name_of(e.addr))),
                addr: e.addr,
            })
            .collect()
    };
    let identity = match (&cli.client_cert, &cli.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ => file
            .as_ref()
            .and_then(|d| Some((d.client_cert.clone()?, d.client_key.clone()?))),
    };
    let token = cli
        .token
        .clone()
        .or_else(|| file.as_ref().map(|d| d.token.clone()).filter(|t| !t.is_empty()))
        .or_else(|| identity.as_ref().map(|_| String::new()))
        .ok_or(
            "no token: pass --token (or --client-cert and --client-key), set LATTICE_TOKEN, or run `latticed dev` first (it writes .lattice-dev/client.toml)",
        )?;
    let ca_path = cli
        .ca
        .clone()
        .or_else(|| file.as_ref().map(|d| d.ca.clone()))
        .ok_or("no CA certificate: pass --ca")?;
    if endpoints.is_empty() {
        return Err("no endpoint: pass --endpoint NAME@HOST:PORT or run `latticed dev` first".into());
    }
    let ca = std::fs::read_to_string(&ca_path).map_err(|e| format!("reading {}: {e}", ca_path.display()))?;
    let node_names: Vec<String> = endpoints
        .iter()
        .map(|e| {
            e.name
                .as_ref()
                .map_or_else(|| e.addr.to_string(), |n| format!("{n}@{}", e.addr))
        })
        .collect();
    let revoked: Vec<&String> = cli
        .revoked_serials
        .iter()
        .chain(file.iter().flat_map(|d| &d.revoked_serials))
        .collect();
    let file_key = file.as_ref().and_then(|d| d.policy_key.clone());
    let mut client = Client::new(endpoints, token, &ca)
        .and_then(|c| c.with_revoked_serials(&revoked))
        .map_err(|e| e.to_string())?;
    if let Some((cert, key)) = &identity {
        let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()));
        client = client
            .with_client_cert(&read(cert)?, &read(key)?)
            .map_err(|e| e.to_string())?;
    }
    let shared = slot.insert(std::sync::Arc::new(client)).clone();
    let client = &*shared;
    let write = |k: &str, op: Op| -> Result<RequestBody, String> {
        Ok(RequestBody::Write {
            retry: false,
            op_id: Client::new_op_id(),
            ops: vec![(key(k)?, op)],
            concern: cli.concern,
            timeout_ms: cli.concern_timeout_ms,
        })
    };
    let json = cli.json;
    let body = match &cli.cmd {
        Cmd::Mvset { key: k, value } => write(k, Op::MvSet(Bytes::from(value.as_str())))?,
        Cmd::Hset { key: k, field, value } => write(
            k,
            Op::MapApply {
                field: Field::new(field.as_str(), FieldKind::Register),
                op: Box::new(Op::MvSet(Bytes::from(value.as_str()))),
            },
        )?,
        Cmd::Hincr { key: k, field, by } => write(
            k,
            Op::MapApply {
                field: Field::new(field.as_str(), FieldKind::Counter),
                op: Box::new(Op::CounterAdd(*by)),
            },
        )?,
        Cmd::Hdel { key: k, fields } => {
            // Removes what this read saw of each name (an observed remove:
            // a concurrent update elsewhere survives it).
            let present = match client.read(&key(k)?).await.map_err(|e| e.to_string())? {
                Some(ValueView::Map(m)) => m.into_keys().collect::<Vec<Field>>(),
                None => Vec::new(),
                Some(other) => return Err(format!("{k} holds a {}, not a map", json::type_name(&other))),
            };
            let ops: Vec<(Key, Op)> = present
                .into_iter()
                .filter(|f| fields.contains(&f.name))
                .map(|f| Ok((key(k)?, Op::MapRemove(f))))
                .collect::<Result<_, String>>()?;
            if ops.is_empty() {
                if json {
                    println!("{}", serde_json::json!({"ok": true, "removed": 0}));
                } else {
                    println!("ok (no such field)");
                }
                return Ok(());
            }
            RequestBody::Write {
                retry: false,
                op_id: Client::new_op_id(),
                ops,
                concern: cli.concern,
                timeout_ms: cli.concern_timeout_ms,
            }
        }
        Cmd::Mget { keys } => return mget(client, keys, json).await,
        Cmd::Scan {
            prefix,
            values,
            page,
            max,
        } => return scan(client, prefix, *values, *page, *max, json).await,
        Cmd::Hget { key: k, field } => return hget(client, k, field, json).await,
        Cmd::Hgetall { key: k } => return hgetall(client, k, json).await,
        Cmd::Get { key: k, at: Some(at) } => RequestBody::ReadAt {
            key: key(k)?,
            at_ms: parse_time(at)?,
        },
        Cmd::Get { key: k, at: None } => RequestBody::Read {
            key: key(k)?,
            after: None,
            wait_ms: 0,
        },
        Cmd::Log {
            prefix,
            partitions,
            from,
            follow,
            max,
        } => return log(client, prefix, partitions, from.as_deref(), *follow, *max, json).await,
        Cmd::Incr { key: k, by } => write(k, Op::CounterAdd(*by))?,
        Cmd::Set { key: k, value } => write(k, Op::LwwSet(Bytes::from(value.as_str())))?,
        Cmd::Sadd { key: k, elements } => write(
            k,
            Op::SetAdd(elements.iter().map(|e| Bytes::from(e.as_str())).collect()),
        )?,
        Cmd::Srem { key: k, elements } => write(
            k,
            Op::SetRemove(elements.iter().map(|e| Bytes::from(e.as_str())).collect()),
        )?,
        Cmd::Del { key: k } => write(k, Op::Delete)?,
        Cmd::Status | Cmd::Policy(PolicyCmd::Show) => RequestBody::Status,
        Cmd::Policy(PolicyCmd::Set { file, key }) => {
            RequestBody::SetPolicy(governance::load(file, key.as_deref(), file_key.as_deref())?)
        }
        Cmd::Policy(PolicyCmd::Sign { .. } | PolicyCmd::Keygen { .. }) => return Ok(()),
        Cmd::Audit(AuditCmd::Verify) => return governance::verify_all(client, &node_names, json).await,
        Cmd::Audit(_) => RequestBody::Audit,
        Cmd::Reencrypt { rotate } => {
            let s = client.reencrypt(0, *rotate).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "rewritten": s.rewritten, "raced": s.raced, "passes": s.passes,
                        "retired": s.retired, "current": s.current, "complete": s.complete})
                );
            } else {
                println!(
                    "ok: {} values re-encrypted under data key {} ({} changed meanwhile) in {} passes; {} old data keys dropped{}",
                    s.rewritten,
                    s.current,
                    s.raced,
                    s.passes,
                    s.retired,
                    if s.complete { "" } else { "; NOT complete: old keys kept, run it again" }
                );
            }
            return Ok(());
        }
        Cmd::Backup { dir } => {
            let s = client.backup(0, dir).await.map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "dir": s.dir, "keys": s.keys, "bytes": s.bytes, "as_of_ms": s.as_of_ms})
                );
            } else {
                println!(
                    "ok: backed up {} keys ({} bytes) into {} as of {} ms",
                    s.keys, s.bytes, s.dir, s.as_of_ms
                );
            }
            return Ok(());
        }
        Cmd::Bench {
            sessions,
            secs,
            keys,
            value_size,
            op,
        } => {
            let cfg = lattice_client::bench::BenchConfig {
                sessions: *sessions,
                duration: std::time::Duration::from_secs(*secs),
                keys: *keys,
                value_size: *value_size,
                op: *op,
                node: 0,
            };
            let report = lattice_client::bench::run(shared.clone(), cfg)
                .await
                .map_err(|e| e.to_string())?;
            println!("{}", report.line());
            return Ok(());
        }
        Cmd::Watch { prefix } => {
            let mut w = client.watch(0, prefix, None).await.map_err(|e| e.to_string())?;
            while let Some(change) = w.next().await.map_err(|e| e.to_string())? {
                if cli.json {
                    let mut o = json::entry(change.key.as_str(), change.value.as_ref(), None);
                    o["origin"] = serde_json::Value::String(change.origin.to_string());
                    println!("{o}");
                } else {
                    println!(
                        "{} [{}] {}",
                        change.key,
                        change.origin,
                        show(&change.value).replace('\n', ", ")
                    );
                }
            }
            return Ok(());
        }
    };
    let response = client.request(body).await.map_err(|e: Error| e.to_string())?;
    if json {
        println!("{}", json_of(&cli.cmd, &response)?);
        return Ok(());
    }
    match response {
        Response::Value { value, .. } => println!("{}", show(&value)),
        Response::Written { duplicate, .. } => println!("{}", if duplicate { "ok (already applied)" } else { "ok" }),
        Response::Status(s) if matches!(cli.cmd, Cmd::Policy(PolicyCmd::Show)) => print_policies(&s),
        Response::Status(s) => {
            println!(
                "node {} region {} replica {} digest {}",
                s.node, s.region, s.replica, s.digest
            );
            println!("buffer: {} groups, {} bytes", s.buffer.0, s.buffer.1);
            for p in &s.peers {
                let heard = p.last_heard_ms_ago.map_or("never".into(), |ms| format!("{ms} ms ago"));
                println!(
                    "  peer {:<8} region {:<6} {:<5} lag {} groups ({} ms), heard {}",
                    p.node,
                    p.region,
                    if p.alive { "up" } else { "down" },
                    p.unacked_groups,
                    p.lag_ms,
                    heard
                );
            }
            print_policies(&s);
            print_conflicts(&s);
            print_access(&s);
        }
        Response::PolicySet { version } => println!("ok: policy version {version} in force"),
        Response::Audit(entries) => {
            for e in entries {
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
            }
        }
        other => println!("{other:?}"),
    }
    Ok(())
}

/// `--json` output of the commands answered by one request.
fn json_of(cmd: &Cmd, response: &Response) -> Result<serde_json::Value, String> {
    Ok(match response {
        Response::Value { value, token } => {
            let k = match cmd {
                Cmd::Get { key, .. } => key.as_str(),
                _ => "",
            };
            json::entry(k, value.as_ref(), Some(token))
        }
        Response::Written { token, duplicate, .. } => {
            serde_json::json!({"ok": true, "duplicate": duplicate, "token": json::token(token)})
        }
        Response::Status(s) if matches!(cmd, Cmd::Policy(PolicyCmd::Show)) => {
            serde_json::json!({"version": s.policy_version, "policies": serde_json::to_value(&s.policies).map_err(|e| e.to_string())?})
        }
        Response::Status(s) => serde_json::to_value(s).map_err(|e| e.to_string())?,
        Response::PolicySet { version } => serde_json::json!({"ok": true, "version": version}),
        Response::Audit(entries) => serde_json::to_value(entries).map_err(|e| e.to_string())?,
        other => return Err(format!("unexpected answer {other:?}")),
    })
}

fn print_entry_line(key: &str, value: &Option<ValueView>) {
    println!("{key} = {}", show(value).replace('\n', ", "));
}

async fn mget(client: &Client, keys: &[String], json: bool) -> Result<(), String> {
    let keys: Vec<Key> = keys.iter().map(|k| key(k)).collect::<Result<_, _>>()?;
    let entries = client.mget(&keys).await.map_err(|e| e.to_string())?;
    if json {
        let out: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
        println!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    for e in &entries {
        match &e.error {
            Some(err) => println!("{}: error: {}", e.key, err.message),
            None => print_entry_line(e.key.as_str(), &e.value),
        }
    }
    Ok(())
}

/// A scan or mget entry as `--json` prints it: the key's object, with
/// `"error": {"kind", "message"}` when it was not read.
fn entry_json(e: &Entry) -> serde_json::Value {
    let mut o = json::entry(e.key.as_str(), e.value.as_ref(), e.token.as_ref());
    if let Some(err) = &e.error {
        o["error"] = serde_json::json!({"kind": format!("{:?}", err.kind), "message": err.message});
    }
    o
}

async fn scan(client: &Client, prefix: &str, values: bool, page: u32, max: usize, json: bool) -> Result<(), String> {
    let mut cursor = None;
    let mut printed = 0;
    loop {
        let (entries, next) = client
            .scan(prefix, cursor, page, values)
            .await
            .map_err(|e| e.to_string())?;
        for e in &entries {
            if max > 0 && printed >= max {
                return Ok(());
            }
            printed += 1;
            if json {
                let mut o = entry_json(e);
                if !values {
                    if let Some(o) = o.as_object_mut() {
                        o.remove("type");
                        o.remove("value");
                    }
                }
                println!("{o}");
            } else if values {
                print_entry_line(e.key.as_str(), &e.value);
            } else {
                println!("{}", e.key);
            }
        }
        match next {
            Some(c) => cursor = Some(c),
            None => return Ok(()),
        }
    }
}

/// Milliseconds since the Unix epoch of `--at`'s TIME.
fn parse_time(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    lattice_core::log::parse_time(s, now).map_err(|e| format!("--at: {e}"))
}

/// `lattice log`: pages of the first node's change log.
async fn log(
    client: &Client,
    prefix: &str,
    partitions: &[u16],
    from: Option<&str>,
    follow: bool,
    max: usize,
    json: bool,
) -> Result<(), String> {
    let mut cursor = from
        .map(lattice_core::log::LogCursor::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let mut printed = 0;
    loop {
        let wait = if follow {
            std::time::Duration::from_secs(2)
        } else {
            std::time::Duration::ZERO
        };
        let page = client
            .log_read(0, partitions, cursor.clone(), prefix, 1_000, wait)
            .await
            .map_err(|e| e.to_string())?;
        let mut next = page.next.clone();
        let mut unprinted = std::collections::BTreeSet::new();
        for c in &page.changes {
            if max > 0 && printed >= max {
                // Go on from the first change of each partition not printed.
                if unprinted.insert(c.partition) {
                    next.set(c.partition, c.seq);
                }
                continue;
            }
            printed += 1;
            if json {
                println!("{}", json::logged(c));
            } else {
                let delta = c.change.delta.view();
                let op = c.change.op.map(|o| format!(" op={:032x}", o.0)).unwrap_or_default();
                println!(
                    "{}/{} {} [{}] {}{op} at {}",
                    c.partition,
                    c.seq,
                    c.change.key,
                    c.change.origin,
                    show(&Some(delta)).replace('\n', ", "),
                    c.change.applied.wall_ms
                );
            }
        }
        let moved = cursor.as_ref() != Some(&next);
        cursor = Some(next);
        if (max > 0 && printed >= max) || (!follow && page.changes.is_empty() && !moved) {
            break;
        }
    }
    let text = cursor.map(|c| c.to_text()).unwrap_or_default();
    if json {
        println!("{}", serde_json::json!({ "next": text }));
    } else {
        println!("-- next: {text}");
    }
    Ok(())
}

/// The map at `k`, or why not.
async fn read_map(client: &Client, k: &str) -> Result<Option<BTreeMap<Field, NestedView>>, String> {
    match client.read(&key(k)?).await.map_err(|e| e.to_string())? {
        Some(ValueView::Map(m)) => Ok(Some(m)),
        None => Ok(None),
        Some(other) => Err(format!("{k} holds a {}, not a map", json::type_name(&other))),
    }
}

fn show_nested(v: &NestedView) -> String {
    match v {
        NestedView::Counter(n) => n.to_string(),
        NestedView::Values(vs) | NestedView::Set(vs) => vs.iter().map(text).collect::<Vec<_>>().join(", "),
        NestedView::Map(m) => json::map(m).to_string(),
    }
}

async fn hget(client: &Client, k: &str, field: &str, json: bool) -> Result<(), String> {
    let m = read_map(client, k).await?.unwrap_or_default();
    let found: BTreeMap<Field, NestedView> = m.into_iter().filter(|(f, _)| f.name == field).collect();
    if json {
        let value = match found.len() {
            0 => serde_json::Value::Null,
            1 => found.values().next().map(json::nested).unwrap_or_default(),
            _ => json::map(&found),
        };
        println!("{}", serde_json::json!({"key": k, "field": field, "value": value}));
        return Ok(());
    }
    if found.is_empty() {
        println!("(absent)");
    }
    for (f, v) in &found {
        if found.len() > 1 {
            println!("{} ({:?}) = {}", f.name, f.kind, show_nested(v));
        } else {
            println!("{}", show_nested(v));
        }
    }
    Ok(())
}

async fn hgetall(client: &Client, k: &str, json: bool) -> Result<(), String> {
    let m = read_map(client, k).await?;
    if json {
        let v = m.map(ValueView::Map);
        println!("{}", json::entry(k, v.as_ref(), None));
        return Ok(());
    }
    match m {
        None => println!("(absent)"),
        Some(m) if m.is_empty() => println!("(empty)"),
        Some(m) => {
            for (f, v) in &m {
                println!("{} = {}", f.name, show_nested(v));
            }
        }
    }
    Ok(())
}

fn print_policies(s: &NodeStatus) {
    println!("policy version {}", s.policy_version);
    for p in &s.policies {
        let name = if p.keyspace.is_empty() {
            "(default)"
        } else {
            p.keyspace.as_str()
        };
        println!(
            "  keyspace {name:<12} regions {:<12} priority {}",
            p.regions, p.priority
        );
        for c in &p.copies {
            if c.holds {
                println!(
                    "    {:<8} holds a copy, lag {} groups ({} ms)",
                    c.region, c.lag_groups, c.lag_ms
                );
            } else {
                println!("    {:<8} no copy (policy)", c.region);
            }
        }
    }
}

/// The credentials the node accepts (all for an admin, else the asker's
/// own), without secrets.
fn print_access(s: &NodeStatus) {
    if s.access.is_empty() {
        return;
    }
    println!("access:");
    for a in &s.access {
        let grants: Vec<String> = a
            .grants
            .iter()
            .map(|(prefix, perms)| format!("{prefix:?}: {}", perms.join(",")))
            .collect();
        println!("  {:<16} {:<11} {}", a.name, a.via, grants.join("; "));
    }
}

/// Conflicts resolved by merges since the node started, per keyspace.
fn print_conflicts(s: &NodeStatus) {
    if s.conflicts.is_empty() {
        println!("conflicts: none");
        return;
    }
    println!("conflicts (since start):");
    for c in &s.conflicts {
        let name = if c.keyspace.is_empty() {
            "(default)"
        } else {
            c.keyspace.as_str()
        };
        println!(
            "  keyspace {name:<12} lww {} ({} values lost), mv siblings {}, kind clashes {}, remove vs update {}",
            c.lww_resolved, c.lww_values_lost, c.mv_siblings, c.kind_clashes, c.remove_update
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lattice: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_and_close(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice: error: {e}");
            ExitCode::FAILURE
        }
    }
}
