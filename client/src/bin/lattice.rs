//! `lattice`: the command-line client.

use clap::{Parser, Subcommand};
use lattice_client::{Client, Error};
use lattice_core::crdt::{Bytes, Op, ValueView};
use lattice_core::proto::client::{RequestBody, Response};
use lattice_core::Key;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Command-line client for Lattice. Defaults (endpoints, token, CA) come from
/// the file `latticed dev` writes (`.lattice-dev/client.toml`), or --config.
#[derive(Parser)]
#[command(name = "lattice", version, about)]
struct Cli {
    /// A node's QUIC address (repeatable; tried in order).
    #[arg(long = "endpoint", env = "LATTICE_ENDPOINTS", value_delimiter = ',')]
    endpoints: Vec<SocketAddr>,
    /// Client token.
    #[arg(long, env = "LATTICE_TOKEN")]
    token: Option<String>,
    /// Cluster CA certificate (PEM).
    #[arg(long, env = "LATTICE_CA")]
    ca: Option<PathBuf>,
    /// Defaults file.
    #[arg(long, env = "LATTICE_CLIENT_CONFIG", default_value = ".lattice-dev/client.toml")]
    config: PathBuf,
    /// Print JSON instead of human-readable output.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read a key.
    Get {
        /// The key.
        key: String,
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
    /// Follow changes to keys starting with a prefix (Ctrl-C to stop).
    Watch {
        /// The key prefix ("" for all keys).
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Regions, peers and replication lag as the first reachable node sees them.
    Status,
}

#[derive(Deserialize)]
struct Defaults {
    endpoints: Vec<SocketAddr>,
    token: String,
    ca: PathBuf,
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

async fn run(cli: Cli) -> Result<(), String> {
    let file: Option<Defaults> = std::fs::read_to_string(&cli.config)
        .ok()
        .and_then(|t| toml::from_str(&t).ok());
    let endpoints = if cli.endpoints.is_empty() {
        file.as_ref().map(|d| d.endpoints.clone()).unwrap_or_default()
    } else {
        cli.endpoints.clone()
    };
    let token = cli
        .token
        .clone()
        .or_else(|| file.as_ref().map(|d| d.token.clone()))
        .ok_or(
        "no token: pass --token, set LATTICE_TOKEN, or run `latticed dev` first (it writes .lattice-dev/client.toml)",
    )?;
    let ca_path = cli
        .ca
        .clone()
        .or_else(|| file.as_ref().map(|d| d.ca.clone()))
        .ok_or("no CA certificate: pass --ca")?;
    if endpoints.is_empty() {
        return Err("no endpoint: pass --endpoint HOST:PORT or run `latticed dev` first".into());
    }
    let ca = std::fs::read_to_string(&ca_path).map_err(|e| format!("reading {}: {e}", ca_path.display()))?;
    let client = Client::new(endpoints, token, &ca).map_err(|e| e.to_string())?;
    let write = |k: &str, op: Op| -> Result<RequestBody, String> {
        Ok(RequestBody::Write {
            op_id: Client::new_op_id(),
            ops: vec![(key(k)?, op)],
        })
    };
    let body = match &cli.cmd {
        Cmd::Get { key: k } => RequestBody::Read {
            key: key(k)?,
            after: None,
            wait_ms: 0,
        },
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
        Cmd::Status => RequestBody::Status,
        Cmd::Watch { prefix } => {
            let mut w = client.watch(0, prefix, None).await.map_err(|e| e.to_string())?;
            while let Some(change) = w.next().await.map_err(|e| e.to_string())? {
                if cli.json {
                    println!("{}", serde_json::to_string(&change).map_err(|e| e.to_string())?);
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
    if cli.json {
        println!("{}", serde_json::to_string(&response).map_err(|e| e.to_string())?);
        return Ok(());
    }
    match response {
        Response::Value { value, .. } => println!("{}", show(&value)),
        Response::Written { duplicate, .. } => println!("{}", if duplicate { "ok (already applied)" } else { "ok" }),
        Response::Status(s) => {
            println!(
                "node {} region {} replica {} digest {}",
                s.node, s.region, s.replica, s.digest
            );
            println!("buffer: {} groups, {} bytes", s.buffer.0, s.buffer.1);
            for p in s.peers {
                let heard = p.last_heard_ms_ago.map_or("never".into(), |ms| format!("{ms} ms ago"));
                println!(
                    "  peer {:<8} region {:<6} {:<5} lag {} groups, heard {}",
                    p.node,
                    p.region,
                    if p.alive { "up" } else { "down" },
                    p.unacked_groups,
                    heard
                );
            }
        }
        other => println!("{other:?}"),
    }
    Ok(())
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
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lattice: error: {e}");
            ExitCode::FAILURE
        }
    }
}
