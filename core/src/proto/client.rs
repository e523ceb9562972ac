//! The client protocol: requests and responses between an application (the
//! SDK or the `lattice` CLI) and a node. Shared by server and client, so the
//! two cannot drift. Framed like peer messages: one version byte, then
//! MessagePack, with the same size limit and validation.

use super::{from_bytes, to_bytes, RegionId, PROTOCOL_VERSION};
use crate::clock::{CausalContext, HlcTimestamp, ReplicaId};
use crate::crdt::{Kind, Op, Value, ValueView};
use crate::key::Key;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// ALPN of node-to-node gossip connections.
pub const PEER_ALPN: &[u8] = b"lattice-peer/1";
/// ALPN of client connections.
pub const CLIENT_ALPN: &[u8] = b"lattice-client/1";

/// Largest request frame (client to node), in bytes. A node reads at most
/// this much of one request, so it is also what one client stream can make
/// a node hold before the token is checked.
pub const MAX_CLIENT_FRAME: usize = 1 << 20;

/// Largest answer frame (node to client), in bytes: an answer carries at
/// most one value and its causal token, so it is sized by the value limit.
/// A node holds an answer until the client has read it, under its answer
/// budget (`[memory] answer_bytes`).
pub const MAX_ANSWER_FRAME: usize = 4 << 20;

/// Largest encoded state a key may hold by default: an answer frame less
/// room for the answer around the value (its causal token and framing), so
/// that every value a node accepts can be read back in one answer.
pub const MAX_VALUE_BYTES: usize = MAX_ANSWER_FRAME - (64 << 10);

/// A client-chosen id for one write, so a retried write is applied once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub u128);

/// What a reader has seen of one key: every dot (and the LWW stamp) of the
/// state it was shown. A node answers a read that carries a token only once
/// its own state includes it (read-your-writes, monotonic reads).
///
/// Dots are numbered per key and, inside a [`Value::Conflict`], per part,
/// and G- and PN-counters have totals instead of dots, so the token records
/// what was seen per kind of part: a token is included in a state only when
/// each of its parts is included in the state's part of the same kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalToken {
    /// Dots seen, all parts together (what tokens of earlier versions
    /// carried; checked only when `parts` is empty).
    pub context: CausalContext,
    /// LWW stamp seen.
    pub stamp: Option<(HlcTimestamp, ReplicaId)>,
    /// What was seen of each part, by kind.
    #[serde(default)]
    pub parts: BTreeMap<Kind, PartSeen>,
}

/// What a reader has seen of one part of a value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSeen {
    /// The part's dots.
    pub dots: CausalContext,
    /// Each replica's running totals (added, subtracted), for G- and
    /// PN-counters.
    pub totals: BTreeMap<ReplicaId, (u64, u64)>,
}

impl CausalToken {
    /// The token of a state.
    pub fn of(value: Option<&Value>) -> CausalToken {
        let Some(v) = value else {
            return CausalToken::default();
        };
        let parts = v
            .kind_parts()
            .into_iter()
            .map(|(kind, p)| {
                let seen = PartSeen {
                    dots: p.context(),
                    totals: p.counter_totals(),
                };
                (kind, seen)
            })
            .collect();
        CausalToken {
            context: v.context(),
            stamp: v.lww_stamp(),
            parts,
        }
    }

    /// Whether a state includes everything this token has seen.
    pub fn is_included_in(&self, value: Option<&Value>) -> bool {
        CausalToken::of(value).includes(self)
    }

    /// Whether a state whose token is `self` includes everything `seen`
    /// has seen: what [`CausalToken::is_included_in`] decides, from the
    /// state's token alone (a driver can keep tokens of states it does not
    /// want to read and decode again).
    pub fn includes(&self, seen: &CausalToken) -> bool {
        let stamp_ok = seen.stamp.is_none_or(|s| self.stamp.is_some_and(|t| t >= s));
        if seen.parts.is_empty() {
            return stamp_ok && self.context.includes(&seen.context);
        }
        stamp_ok
            && seen.parts.iter().all(|(kind, mine)| {
                let empty = PartSeen::default();
                let other = self.parts.get(kind).unwrap_or(&empty);
                other.dots.includes(&mine.dots)
                    && mine.totals.iter().all(|(r, &(a, s))| {
                        let (oa, os) = other.totals.get(r).copied().unwrap_or((0, 0));
                        oa >= a && os >= s
                    })
            })
    }

    /// The latest wall-clock time this token carries (its LWW stamp's), in
    /// milliseconds: a node whose clock is far behind it cannot include it.
    pub fn wall_ms(&self) -> Option<u64> {
        self.stamp.as_ref().map(|(t, _)| t.wall_ms)
    }

    /// Joins another token into this one.
    pub fn join(&mut self, other: &CausalToken) {
        self.context.join(&other.context);
        self.stamp = self.stamp.max(other.stamp);
        for (kind, seen) in &other.parts {
            let mine = self.parts.entry(*kind).or_default();
            mine.dots.join(&seen.dots);
            for (r, &(a, s)) in &seen.totals {
                let t = mine.totals.entry(*r).or_insert((0, 0));
                *t = (t.0.max(a), t.1.max(s));
            }
        }
    }
}

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    /// The client's bearer token.
    pub token: String,
    /// What it asks.
    pub body: RequestBody,
}

/// The kinds of request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Read one key; with `after`, wait (up to `wait_ms`) until the node's
    /// state includes that token.
    Read {
        /// The key.
        key: Key,
        /// A token the answer must include.
        after: Option<CausalToken>,
        /// How long the node may wait for it.
        wait_ms: u64,
    },
    /// Apply operations atomically, as one delta-group.
    Write {
        /// Identifies the write across retries.
        op_id: OpId,
        /// Set when the client resends a write whose answer it did not
        /// get: a node that may have lost its record of op ids in a crash
        /// then answers `OutcomeUnknown` instead of applying it again.
        #[serde(default)]
        retry: bool,
        /// The operations.
        ops: Vec<(Key, Op)>,
        /// When to answer: once durable here (`Local`), or once durable in
        /// this many distinct regions.
        #[serde(default)]
        concern: WriteConcern,
        /// How long to wait for the concern before answering
        /// `ReplicationTimeout` (0: the node's default).
        #[serde(default)]
        timeout_ms: u64,
    },
    /// Put a newer policy set in force on this node; it spreads to every
    /// other node from there.
    SetPolicy(crate::policy::signed::SignedPolicySet),
    /// The node's policy audit log.
    Audit,
    /// Cluster status as this node sees it.
    Status,
    /// A change feed of local and replicated changes to keys starting with
    /// `prefix`, answered with a stream of `Response::Change` frames; with
    /// `from`, it resumes after that change.
    Watch {
        /// Key prefix ("" for every key).
        prefix: String,
        /// Resume after this change.
        from: Option<WatchToken>,
    },
    /// Several requests in one frame, each tagged by the client, on a
    /// *pipeline* stream: a stream whose first frame is a `Pipeline` carries
    /// only `Pipeline` frames from the client, and the node answers every
    /// tagged request once, in a [`Response::Pipeline`] frame, in the order
    /// they complete, several to a frame. The requests of one stream run
    /// concurrently, like requests on separate streams: two writes sent
    /// together may apply in either order (a client that needs an order
    /// awaits the first answer). Each entry is an encoded request body (a
    /// version byte, then MessagePack, as [`encode_client`] makes it); at
    /// most [`PIPELINE_MAX_REQUESTS`] per frame. `Watch` and nested
    /// `Pipeline` requests are answered with an error.
    Pipeline(Vec<Tagged>),
    /// A page of the keys starting with `prefix` (and their values, with
    /// `values`), answered with [`Response::Scanned`]. Keys come in
    /// storage order (by key hash, then name: the same on every node, so a
    /// cursor from one node is good on another); a page holds at
    /// most `limit` keys (at most [`SCAN_MAX_KEYS`]) and examines at most
    /// [`SCAN_MAX_EXAMINED`] keys, so a page may be empty while the scan
    /// goes on. Pass the answer's cursor to get the next page; a key that
    /// exists for the whole scan is returned exactly once; one written or
    /// deleted meanwhile may or may not be. Keys this region may not read
    /// under the policy in force are left out.
    Scan {
        /// Key prefix (`""`: every key).
        prefix: String,
        /// Where the previous page stopped (`None`: from the start).
        cursor: Option<ScanCursor>,
        /// Most keys in the page.
        limit: u32,
        /// Whether to return each key's value.
        values: bool,
    },
    /// Several keys read at once, answered with [`Response::Values`] in the
    /// same order: each read as [`RequestBody::Read`] reads it (each entry
    /// carries the token of what it saw), at most [`MGET_MAX_KEYS`] keys. A
    /// key this region may not read, whose token the node has not caught up
    /// with within `wait_ms` (all keys together), or whose value does not
    /// fit in the answer beside the ones before it ([`ENTRIES_MAX_BYTES`]),
    /// carries an error instead of a value, and so does every key after
    /// one that did not fit (unread); the others are answered.
    MGet {
        /// The keys, each with a token its answer must include.
        keys: Vec<(Key, Option<CausalToken>)>,
        /// How long the node may wait for the tokens, all keys together.
        wait_ms: u64,
    },
    /// A page of the node's change log (see [`crate::log`]), answered with
    /// [`Response::Log`]: the changes after `from` of keys starting with
    /// `prefix`, in the `partitions` asked (empty: every partition), each
    /// partition's in order, at most `limit` changes (at most
    /// [`LOG_MAX_CHANGES`]) and [`ENTRIES_MAX_BYTES`]; with `wait_ms`, an
    /// empty page waits that long for a change. A position retention has
    /// dropped is refused with [`ErrorKind::Trimmed`]. Changes to keys this
    /// region may not read under the policy in force are left out.
    LogRead {
        /// The partitions to read (empty: all).
        #[serde(default)]
        partitions: Vec<u16>,
        /// Where to go on from (`None`: the oldest retained change).
        from: Option<crate::log::LogCursor>,
        /// Key prefix (`""`: every key).
        prefix: String,
        /// Most changes in the page.
        limit: u32,
        /// How long an empty page may wait for a change.
        wait_ms: u64,
    },
    /// A key's value as of `at_ms` (milliseconds since the Unix epoch, on
    /// the node's hybrid logical clock): every logged change the node had
    /// applied by then, joined. Answered with [`Response::Value`] (its
    /// token empty); [`ErrorKind::Trimmed`] when retention dropped part of
    /// the key's history.
    ReadAt {
        /// The key.
        key: Key,
        /// The time.
        at_ms: u64,
    },
    /// Write a consistent backup of the node's state into `dir`, a
    /// directory on the node's host that must not exist yet (admin token).
    /// Answered with [`Response::BackedUp`].
    Backup {
        /// Where to write it.
        dir: String,
    },
    /// Re-encrypt every value the node stores (states and change log)
    /// under its newest data key, online; with `rotate`, make a new data
    /// key first (admin token; the node must have encryption at rest on).
    /// Answered with [`Response::Reencrypted`].
    Reencrypt {
        /// Make a new data key first.
        rotate: bool,
    },
}

/// Most changes one [`RequestBody::LogRead`] page returns.
pub const LOG_MAX_CHANGES: u32 = 1_000;

/// Most keys one [`RequestBody::Scan`] page returns.
pub const SCAN_MAX_KEYS: u32 = 1_000;

/// Most keys one [`RequestBody::Scan`] page examines (matching the prefix
/// or not): what bounds a page's work on a node holding many keys.
pub const SCAN_MAX_EXAMINED: usize = 10_000;

/// Most keys of one [`RequestBody::MGet`].
pub const MGET_MAX_KEYS: usize = 1_000;

/// Where a scan stopped: opaque to the client (the node's storage position).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanCursor(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// One key of a [`Response::Scanned`] or [`Response::Values`] answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: Key,
    /// Its value (`None` when absent, not asked for, or refused).
    pub value: Option<ValueView>,
    /// What the read saw (`None` when values were not asked for).
    pub token: Option<CausalToken>,
    /// Why this key was not read.
    pub error: Option<ClientError>,
}

/// How many bytes `entry` adds to an answer frame, as encoded.
pub fn entry_size(entry: &Entry) -> Result<usize, Error> {
    Ok(to_bytes(entry)?.len())
}

/// The bytes of entries one [`Response::Scanned`] or [`Response::Values`]
/// answer carries at most (the rest of the frame is room for framing).
pub const ENTRIES_MAX_BYTES: usize = MAX_ANSWER_FRAME - (64 << 10);

/// One request or answer of a pipeline frame: the client's tag and the
/// encoded request body or answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tagged {
    /// Chosen by the client, unique among its requests in flight on the stream.
    pub tag: u32,
    /// The encoded request body or answer.
    #[serde(with = "serde_bytes")]
    pub frame: Vec<u8>,
}

/// Most requests in one pipeline frame. A node that reads more resets the
/// stream.
pub const PIPELINE_MAX_REQUESTS: usize = 256;

/// How many regions must hold a write durably before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteConcern {
    /// Durable on the node that took it (the default).
    #[default]
    Local,
    /// Durable in this many distinct regions, the writing one included.
    Regions(u8),
    /// Durable in every region that may hold the keys.
    All,
}

impl std::fmt::Display for WriteConcern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteConcern::Local => f.write_str("local"),
            WriteConcern::Regions(n) => write!(f, "regions({n})"),
            WriteConcern::All => f.write_str("all"),
        }
    }
}

impl std::str::FromStr for WriteConcern {
    type Err = String;
    /// Parses `local`, `all` or `regions(N)`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "local" => return Ok(WriteConcern::Local),
            "all" => return Ok(WriteConcern::All),
            _ => {}
        }
        s.strip_prefix("regions(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|n| n.trim().parse::<u8>().ok())
            .filter(|n| *n >= 1)
            .map(WriteConcern::Regions)
            .ok_or_else(|| format!("write concern must be local, all or regions(N) with N >= 1, not {s:?}"))
    }
}

/// Where a change feed is: the node's life (random per start) and the
/// change's number in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WatchToken {
    /// The node's life.
    pub epoch: u64,
    /// The change's number.
    pub seq: u64,
}

/// One change of a watched key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: Key,
    /// Its new value.
    pub value: Option<ValueView>,
    /// The region the change came from (this node's for local writes).
    pub origin: RegionId,
    /// Resume after this change with this token.
    pub token: WatchToken,
}

/// What a client can act on when a request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bad or missing token.
    Unauthorized,
    /// The node's write queue is full: retry later or elsewhere.
    Overloaded,
    /// The key holds another type.
    TypeMismatch,
    /// The request is malformed or invalid (bad key, bad op, too large).
    InvalidRequest,
    /// The key does not exist (delete of an absent key).
    NotFound,
    /// The node has not caught up with the token in time.
    NotCaughtUp,
    /// The node is shutting down or cannot serve.
    Unavailable,
    /// Something failed inside the node.
    Internal,
    /// A watch cannot resume from its token (the node restarted or the
    /// change is no longer retained): read the keys again and watch anew.
    WatchLost,
    /// The watcher fell further behind than the node queues for one
    /// watcher and was cut off: resume from the last change received (or,
    /// if that fails with `WatchLost`, read the keys again).
    WatchLagged,
    /// The key's replication policy does not allow this region to serve
    /// the request; `regions` names the regions that may.
    PolicyDenied,
    /// The write is durable on the node that took it and is still
    /// replicating, but the requested write concern was not met in time.
    /// It is not rolled back.
    ReplicationTimeout,
    /// A policy set was refused (invalid, or not newer than the one in force).
    InvalidPolicy,
    /// A policy set was refused for its signature: unsigned, signed by a
    /// key the node does not trust (`policy_keys`), or not verifying.
    PolicySignature,
    /// A retried write reached a node that restarted since its first
    /// attempt (within `retry_window_ms` of the restart): the first attempt
    /// may or may not have taken effect, and applying it again could count
    /// it twice. Read the key to find out.
    OutcomeUnknown,
    /// The change log no longer holds what was asked (retention dropped
    /// it): a log reader must re-read state and go on from the log's
    /// current end; a point-in-time read is not possible for that key.
    Trimmed,
    /// The credential (token or client certificate) is valid but not
    /// granted this permission on this key or prefix.
    PermissionDenied,
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A human-readable explanation.
    pub message: String,
    /// For `PolicyDenied`: the regions that may serve the key.
    #[serde(default)]
    pub regions: Vec<RegionId>,
}

impl From<&Error> for ClientError {
    fn from(e: &Error) -> Self {
        let kind = match e {
            Error::TypeMismatch { .. } | Error::FieldTypeMismatch { .. } => ErrorKind::TypeMismatch,
            Error::Overloaded(_) => ErrorKind::Overloaded,
            Error::Trimmed(_) => ErrorKind::Trimmed,
            Error::NotFound => ErrorKind::NotFound,
            Error::InvalidKey(_)
            | Error::InvalidOp(_)
            | Error::Unsupported { .. }
            | Error::NestingTooDeep { .. }
            | Error::CounterOverflow
            | Error::MessageTooLarge { .. }
            | Error::ValueTooLarge { .. }
            | Error::Codec(_)
            | Error::UnknownVersion(_)
            | Error::CorruptFrame { .. }
            | Error::Malformed(_)
            | Error::TokenFromFuture { .. } => ErrorKind::InvalidRequest,
            Error::PolicyDenied { .. } => ErrorKind::PolicyDenied,
            Error::ReplicationTimeout { .. } => ErrorKind::ReplicationTimeout,
            Error::InvalidPolicy(_) => ErrorKind::InvalidPolicy,
            Error::PolicySignature(_) => ErrorKind::PolicySignature,
            Error::OutcomeUnknown => ErrorKind::OutcomeUnknown,
            Error::Clock(_)
            | Error::Store(_)
            | Error::Corrupt { .. }
            | Error::UnknownPeer(_)
            | Error::AuditBroken { .. } => ErrorKind::Internal,
        };
        let regions = match e {
            Error::PolicyDenied { regions, .. } => regions.clone(),
            _ => Vec::new(),
        };
        ClientError {
            kind,
            message: e.to_string(),
            regions,
        }
    }
}

/// A peer as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Node name.
    pub node: String,
    /// Region.
    pub region: RegionId,
    /// Heard from recently.
    pub alive: bool,
    /// Delta-groups of ours it has not acknowledged (replication lag).
    pub unacked_groups: u64,
    /// How long ago it was last heard from.
    pub last_heard_ms_ago: Option<u64>,
    /// Age of the oldest delta-group of ours it has not acknowledged,
    /// milliseconds (0: it has them all): replication lag as time.
    #[serde(default)]
    pub lag_ms: u64,
}

/// The conflicts merges resolved on one node for one keyspace policy,
/// since the node started (see
/// [`Conflicts`](crate::replica::Conflicts) for the exact definitions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyspaceConflicts {
    /// The policy's key prefix (`""`: the default policy).
    pub keyspace: String,
    /// Concurrent LWW writes resolved (a remote write that arrived
    /// superseded by a different, higher-stamped one).
    pub lww_resolved: u64,
    /// Of those, writes whose value differed from the winner's: lost.
    pub lww_values_lost: u64,
    /// Multi-value register siblings created.
    pub mv_siblings: u64,
    /// Kinds added to a key's kind clash (`Value::Conflict`).
    pub kind_clashes: u64,
    /// Set elements and map fields kept by an add or update a concurrent
    /// remove had not seen (add-wins, update-wins).
    pub remove_update: u64,
}

impl KeyspaceConflicts {
    /// A keyspace's counts.
    pub fn of(keyspace: &str, c: &crate::replica::Conflicts) -> KeyspaceConflicts {
        KeyspaceConflicts {
            keyspace: keyspace.to_string(),
            lww_resolved: c.lww_resolved,
            lww_values_lost: c.lww_values_lost,
            mv_siblings: c.mv_siblings,
            kind_clashes: c.kind_clashes,
            remove_update: c.remove_update,
        }
    }
}

/// A node's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Region.
    pub region: RegionId,
    /// Current replica identity.
    pub replica: String,
    /// Anti-entropy root digest (equal on converged nodes).
    pub digest: String,
    /// Buffered delta-groups and their bytes.
    pub buffer: (usize, usize),
    /// Peers.
    pub peers: Vec<PeerInfo>,
    /// The version of the policy set in force.
    #[serde(default)]
    pub policy_version: u64,
    /// Per keyspace policy (the default policy last): which regions get
    /// copies from this node and their lag.
    #[serde(default)]
    pub policies: Vec<PolicyInfo>,
    /// Conflicts resolved by merges since the node started, per keyspace
    /// policy that had any.
    #[serde(default)]
    pub conflicts: Vec<KeyspaceConflicts>,
    /// The credentials the node accepts, without secrets: every one for
    /// an admin, only the asker's own otherwise.
    #[serde(default)]
    pub access: Vec<AccessInfo>,
}

/// A credential a node accepts, without its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessInfo {
    /// Its name.
    pub name: String,
    /// `token` or `certificate`.
    pub via: String,
    /// Per key prefix, the permissions granted.
    pub grants: Vec<(String, Vec<String>)>,
}

/// One region's copy of a keyspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyInfo {
    /// The region.
    pub region: RegionId,
    /// Whether the policy lets this node's writes of the keyspace reach it.
    pub holds: bool,
    /// Delta-groups of this node not yet acknowledged there (this
    /// keyspace's priority class).
    pub lag_groups: u64,
    /// Age of the oldest of them, milliseconds.
    pub lag_ms: u64,
}

/// A keyspace policy and its copies, as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The key prefix (`""`: every key no other policy matches).
    pub keyspace: String,
    /// `all`, `local` or a region list.
    pub regions: String,
    /// `critical`, `normal` or `bulk`.
    pub priority: String,
    /// Per known region.
    pub copies: Vec<CopyInfo>,
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A key's value (`None` when absent) and its causal token.
    Value {
        /// The value.
        value: Option<ValueView>,
        /// What the read saw.
        token: CausalToken,
    },
    /// A durable write and the token of what it wrote.
    Written {
        /// The keys' tokens joined.
        token: CausalToken,
        /// Each key's own token (dots are numbered per key, so a session
        /// must not wait on one key for the dots of another).
        #[serde(default)]
        keys: Vec<(Key, CausalToken)>,
        /// The write had already been applied (a retry).
        duplicate: bool,
    },
    /// Status.
    Status(NodeStatus),
    /// The answer to `SetPolicy`: the version now in force.
    PolicySet {
        /// The version in force.
        version: u64,
    },
    /// The node's policy audit log, oldest first.
    Audit(Vec<crate::policy::audit::AuditEntry>),
    /// One change of a watch.
    Change(Change),
    /// The request failed.
    Error(ClientError),
    /// Answers on a pipeline stream (see [`RequestBody::Pipeline`]): each
    /// an encoded answer frame, under the tag of its request.
    Pipeline(Vec<Tagged>),
    /// A page of a [`RequestBody::Scan`].
    Scanned {
        /// The keys found, in storage order.
        entries: Vec<Entry>,
        /// Where to go on from (`None`: the scan is complete).
        cursor: Option<ScanCursor>,
    },
    /// The answer to [`RequestBody::MGet`], one entry per key asked, in order.
    Values(Vec<Entry>),
    /// A page of the change log.
    Log {
        /// The changes, each partition's in order.
        changes: Vec<crate::log::Logged>,
        /// Where to go on from: every partition read moved past what the
        /// page holds (and past changes the prefix or the policy left out).
        next: crate::log::LogCursor,
        /// How many partitions the log has.
        partitions: u16,
    },
    /// A backup was written.
    BackedUp(BackupSummary),
    /// A re-encryption ran.
    Reencrypted(ReencryptSummary),
}

/// What a re-encryption did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptSummary {
    /// Values rewritten under the newest data key.
    pub rewritten: u64,
    /// Values a concurrent write changed first (already under the newest key).
    pub raced: u64,
    /// Passes over the store.
    pub passes: u32,
    /// Older data keys dropped.
    pub retired: u32,
    /// The data key new values use.
    pub current: u32,
    /// No value is left under an older key.
    pub complete: bool,
}

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// The directory it was written to.
    pub dir: String,
    /// Keys in it.
    pub keys: u64,
    /// Bytes of its files.
    pub bytes: u64,
    /// The HLC time (ms) its state is as of.
    pub as_of_ms: u64,
}

/// Encodes a request frame (at most [`MAX_CLIENT_FRAME`] bytes).
pub fn encode_client<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    encode_within(msg, MAX_CLIENT_FRAME)
}

/// Encodes an answer frame (at most [`MAX_ANSWER_FRAME`] bytes).
pub fn encode_answer(msg: &Response) -> Result<Vec<u8>, Error> {
    encode_within(msg, MAX_ANSWER_FRAME)
}

fn encode_within<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, Error> {
    let mut out = vec![PROTOCOL_VERSION];
    out.extend(to_bytes(msg)?);
    if out.len() > limit {
        return Err(Error::MessageTooLarge { size: out.len(), limit });
    }
    Ok(out)
}

/// Largest pipeline answer frame: answer frames of at most
/// [`PIPELINE_PACK_BYTES`] together, or one of up to [`MAX_ANSWER_FRAME`],
/// with their tags.
pub const MAX_PIPELINE_ANSWER_FRAME: usize = MAX_ANSWER_FRAME + (64 << 10);

/// A pipeline answer frame takes answers until they hold this many bytes;
/// a larger answer goes alone.
pub const PIPELINE_PACK_BYTES: usize = 32 << 10;

/// Packs a pipeline stream's answers into frames: answers are added as they
/// complete, and a frame is sent when the next answer would take the pack
/// past [`PIPELINE_PACK_BYTES`] (or when no other answer is ready). Every
/// pack it makes encodes within [`MAX_PIPELINE_ANSWER_FRAME`].
#[derive(Debug, Default)]
pub struct AnswerPack {
    answers: Vec<Tagged>,
    bytes: usize,
}

impl AnswerPack {
    /// What an answer costs in a pack: its frame and room for its tag and
    /// framing (bounding the tags a pack holds too).
    fn cost(answer: &Tagged) -> usize {
        answer.frame.len() + 16
    }

    /// Adds an answer; returns the pack to send before it, when the answer
    /// does not fit with the ones already packed.
    pub fn push(&mut self, answer: Tagged) -> Option<Vec<Tagged>> {
        let cost = Self::cost(&answer);
        let full = (!self.answers.is_empty() && self.bytes + cost > PIPELINE_PACK_BYTES).then(|| self.take());
        self.bytes += cost;
        self.answers.push(answer);
        full
    }

    /// The answers packed so far, leaving the pack empty.
    pub fn take(&mut self) -> Vec<Tagged> {
        self.bytes = 0;
        std::mem::take(&mut self.answers)
    }

    /// Whether no answer is packed.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// Encodes a pipeline answer frame (at most [`MAX_PIPELINE_ANSWER_FRAME`]
/// bytes).
pub fn encode_pipeline_answers(answers: Vec<Tagged>) -> Result<Vec<u8>, Error> {
    encode_within(&Response::Pipeline(answers), MAX_PIPELINE_ANSWER_FRAME)
}

/// Decodes an answer frame read on a pipeline stream: a
/// [`Response::Pipeline`], or the error that refused the stream.
pub fn decode_pipeline_answers(frame: &[u8]) -> Result<Response, Error> {
    let body = super::frame_body(frame, MAX_PIPELINE_ANSWER_FRAME)?;
    from_bytes(body)
}

/// Decodes a request frame, checking size, version and depth.
pub fn decode_client<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, Error> {
    let body = super::frame_body(frame, MAX_CLIENT_FRAME)?;
    from_bytes(body)
}

/// Decodes an answer frame, checking size, version and depth.
pub fn decode_answer(frame: &[u8]) -> Result<Response, Error> {
    let body = super::frame_body(frame, MAX_ANSWER_FRAME)?;
    from_bytes(body)
}
