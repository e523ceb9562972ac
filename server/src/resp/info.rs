//! The connection-level commands that describe the node and the server
//! to clients and tools: `INFO`, `CLIENT`, `COMMAND`, `CONFIG GET`.

use super::commands::error_reply;
use super::wire::Reply;
use super::{arity, shown, upper, Conn};
use crate::net::{serve, Request};
use lattice_core::proto::client::{NodeStatus, RequestBody, Response};

impl Conn<'_> {
    /// `CLIENT` subcommands: what client libraries send on connect.
    pub(super) fn client(&mut self, args: &[Vec<u8>]) -> Reply {
        let Some(sub) = args.first() else {
            return arity("CLIENT");
        };
        match (upper(sub).as_str(), &args[1..]) {
            ("SETNAME", [name]) => {
                self.name = Some(String::from_utf8_lossy(name).into_owned());
                Reply::ok()
            }
            ("GETNAME", []) => self.name.clone().map_or(Reply::Null, Reply::text),
            ("ID", []) => Reply::Int((self.id & !(1 << 63)) as i64),
            // Library name and version (redis-py, go-redis send them); also
            // the eviction and LRU hints, which mean nothing here.
            ("SETINFO", [_, _]) | ("NO-EVICT", [_]) | ("NO-TOUCH", [_]) => Reply::ok(),
            ("INFO", []) => Reply::text(format!(
                "id={} name={} resp={}\n",
                self.id & !(1 << 63),
                self.name.as_deref().unwrap_or(""),
                if self.resp3 { 3 } else { 2 }
            )),
            (s, _) => Reply::error(
                "ERR",
                format!(
                    "unknown subcommand or wrong number of arguments for 'CLIENT {}'",
                    shown(s.as_bytes(), 64)
                ),
            ),
        }
    }

    /// `INFO [section]`: server, clients and replication (from the node's
    /// status, as `lattice status` shows it).
    pub(super) async fn info(&mut self, args: &[Vec<u8>], bytes: usize) -> Reply {
        let token = self.token.clone().unwrap_or_default();
        let meta = Request { bytes, conn: self.id };
        let status = match serve(&token, RequestBody::Status, meta, &self.resp.inbound, &self.session).await {
            Response::Status(s) => s,
            Response::Error(e) => return error_reply(&e),
            _ => return Reply::error("ERR", "internal error: unexpected answer to a status request"),
        };
        let want: Vec<String> = args.iter().map(|a| upper(a)).collect();
        let all = want.is_empty()
            || want
                .iter()
                .any(|w| matches!(w.as_str(), "ALL" | "EVERYTHING" | "DEFAULT"));
        let mut text = String::new();
        let sections: [(&str, String); 3] = [
            ("SERVER", self.server_info(&status)),
            (
                "CLIENTS",
                format!("# Clients\r\nconnected_clients:{}\r\n", self.resp.connected()),
            ),
            ("REPLICATION", replication_info(&status)),
        ];
        for (name, body) in sections {
            if all || want.iter().any(|w| w == name) {
                if !text.is_empty() {
                    text.push_str("\r\n");
                }
                text.push_str(&body);
            }
        }
        Reply::text(text)
    }

    fn server_info(&self, s: &NodeStatus) -> String {
        format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\nlattice_version:{}\r\n\
             lattice_node:{}\r\nlattice_region:{}\r\nlattice_replica:{}\r\nresp_tls:{}\r\n",
            env!("CARGO_PKG_VERSION"),
            s.node,
            s.region.0,
            s.replica,
            u8::from(self.resp.tls.is_some()),
        )
    }
}

/// The Redis version HELLO and INFO claim: the command set clients may
/// assume is 7.0's (for the commands listed in the README).
pub(super) const REDIS_VERSION: &str = "7.0.0";

/// `# Replication`: every node takes writes (`role:master`, no Redis
/// replicas), then whatever the node's status holds besides its identity,
/// rendered from its fields as `lattice_NAME:VALUE` (a list, such as
/// `buffer`, as `a,b`), and each entry of a list of records (peers and
/// their lag, keyspace policies and their copies' lag, conflicts) as
/// `NAMEi:field=value,...` (a nested list of records as
/// `field/value:field/value|...`). Rendered from the
/// status's fields rather than named ones, so fields added to
/// `NodeStatus` show up here without a change.
fn replication_info(s: &NodeStatus) -> String {
    use serde_json::Value;
    use std::fmt::Write;
    fn scalar(v: &Value) -> Option<String> {
        let text = match v {
            Value::Null => "none".to_string(),
            Value::Bool(b) => u8::from(*b).to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            Value::Array(_) | Value::Object(_) => return None,
        };
        // One line, and no separator of the INFO format inside a value.
        Some(text.replace(['\r', '\n', ','], " "))
    }
    fn flat(v: &Value) -> String {
        match v {
            Value::Array(items) => items.iter().map(flat).collect::<Vec<_>>().join("|"),
            Value::Object(fields) => fields
                .iter()
                .map(|(k, v)| format!("{k}/{}", flat(v)))
                .collect::<Vec<_>>()
                .join(":"),
            v => scalar(v).unwrap_or_default(),
        }
    }
    let mut t = String::from("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n");
    let alive = s.peers.iter().filter(|p| p.alive).count();
    let _ = write!(t, "lattice_peers_alive:{alive}\r\n");
    let Ok(Value::Object(fields)) = serde_json::to_value(s) else {
        return t;
    };
    for (name, value) in &fields {
        if matches!(name.as_str(), "node" | "region" | "replica") {
            continue; // in # Server
        }
        match value {
            Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
                let entry = match name.as_str() {
                    "peers" => "peer",
                    "policies" => "policy",
                    other => other,
                };
                for (i, item) in items.iter().enumerate() {
                    let Value::Object(record) = item else { continue };
                    let parts: Vec<String> = record
                        .iter()
                        .map(|(k, v)| format!("{k}={}", scalar(v).unwrap_or_else(|| flat(v))))
                        .collect();
                    let _ = write!(t, "{entry}{i}:{}\r\n", parts.join(","));
                }
                if name == "peers" {
                    let _ = write!(t, "lattice_peers:{}\r\n", items.len());
                }
            }
            Value::Array(items) => {
                let joined: Vec<String> = items.iter().map(flat).collect();
                let _ = write!(t, "lattice_{name}:{}\r\n", joined.join(","));
            }
            Value::Object(_) => {
                let _ = write!(t, "lattice_{name}:{}\r\n", flat(value));
            }
            v => {
                let _ = write!(t, "lattice_{name}:{}\r\n", scalar(v).unwrap_or_default());
            }
        }
    }
    t
}

/// `COMMAND` and its subcommands: enough for redis-cli and client
/// libraries, which ask on connect (for hints) and cope with empty answers.
pub(super) fn command_info(args: &[Vec<u8>]) -> Reply {
    match args.first().map(|a| upper(a)).as_deref() {
        Some("COUNT") => Reply::Int(0),
        Some("DOCS") => Reply::Map(Vec::new()),
        Some("INFO") => Reply::Array(args[1..].iter().map(|_| Reply::Null).collect()),
        _ => Reply::Array(Vec::new()),
    }
}

/// `CONFIG GET`, for tools that ask (redis-benchmark asks `save` and
/// `appendonly`): Lattice's durability is its own (`durability` in the
/// node's configuration), so snapshots and the append-only file read as
/// off. Nothing can be set.
pub(super) fn config_get(args: &[Vec<u8>]) -> Reply {
    match (args.first().map(|a| upper(a)).as_deref(), &args[1.min(args.len())..]) {
        (Some("GET"), params) if !params.is_empty() => {
            let mut pairs = Vec::new();
            for p in params {
                let answer = match upper(p).as_str() {
                    "SAVE" => "",
                    "APPENDONLY" => "no",
                    "DATABASES" => "1",
                    _ => continue,
                };
                pairs.push((
                    Reply::text(String::from_utf8_lossy(p).to_lowercase()),
                    Reply::text(answer),
                ));
            }
            Reply::Map(pairs)
        }
        _ => Reply::error("ERR", "only CONFIG GET is served (the node is configured by its file)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::proto::client::{CopyInfo, PeerInfo, PolicyInfo};
    use lattice_core::proto::RegionId;

    #[test]
    // The struct updates fill fields other branches add to these types
    // (the test then still compiles, and shows them rendered).
    #[allow(clippy::needless_update)]
    fn replication_info_renders_every_status_field() {
        let status = NodeStatus {
            node: "n1".into(),
            region: RegionId("eu".into()),
            replica: "r".into(),
            digest: "abc".into(),
            buffer: (3, 133),
            peers: vec![PeerInfo {
                node: "n2".into(),
                region: RegionId("us".into()),
                alive: true,
                unacked_groups: 4,
                last_heard_ms_ago: None,
                ..serde_json::from_str(
                    r#"{"node":"","region":"","alive":false,"unacked_groups":0,"last_heard_ms_ago":null}"#,
                )
                .unwrap()
            }],
            policy_version: 2,
            policies: vec![PolicyInfo {
                keyspace: "a,b".into(),
                regions: "all".into(),
                priority: "normal".into(),
                copies: vec![CopyInfo {
                    region: RegionId("us".into()),
                    holds: true,
                    lag_groups: 4,
                    lag_ms: 9,
                }],
            }],
            ..serde_json::from_str(r#"{"node":"","region":"","replica":"","digest":"","buffer":[0,0],"peers":[]}"#)
                .unwrap()
        };
        let t = replication_info(&status);
        for line in [
            "role:master",
            "lattice_peers_alive:1",
            "lattice_peers:1",
            "lattice_buffer:3,133",
            "lattice_digest:abc",
            "lattice_policy_version:2",
        ] {
            assert!(t.contains(&format!("{line}\r\n")), "{line} in {t}");
        }
        let peer = t.lines().find(|l| l.starts_with("peer0:")).unwrap();
        for part in [
            "node=n2",
            "region=us",
            "alive=1",
            "unacked_groups=4",
            "last_heard_ms_ago=none",
        ] {
            assert!(peer.contains(part), "{part} in {peer}");
        }
        let policy = t.lines().find(|l| l.starts_with("policy0:")).unwrap();
        assert!(
            policy.contains("keyspace=a b") && policy.contains("copies=holds/1:lag_groups/4:lag_ms/9:region/us"),
            "{policy}"
        );
        assert!(!t.contains("lattice_node") && !t.contains("lattice_replica"), "{t}");
    }
}
