//! The one error type of `lattice-core`.

use crate::clock::ClockError;
use crate::crdt::{FieldKind, Kind};

/// Everything that can go wrong in the core. Variants are meant to be acted
/// on: a driver maps them to client errors or peer disconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The key holds a value of another type.
    #[error("type mismatch: the key holds a {expected}, the operation is for a {found}")]
    TypeMismatch {
        /// The kind the key holds.
        expected: Kind,
        /// The kind the operation is for.
        found: Kind,
    },
    /// A map field was addressed with an operation of another type.
    #[error("type mismatch on field {field:?}: it is a {expected:?}, the operation is for a {found:?}")]
    FieldTypeMismatch {
        /// The field name.
        field: String,
        /// Its kind.
        expected: FieldKind,
        /// The operation's kind.
        found: FieldKind,
    },
    /// The operation does not exist for this type (e.g. deleting a G-counter).
    #[error("{op} is not supported on a {kind}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The value's kind.
        kind: Kind,
    },
    /// An operation that makes no sense where it was used.
    #[error("invalid operation: {0}")]
    InvalidOp(String),
    /// A counter's running total would overflow.
    #[error("counter overflow")]
    CounterOverflow,
    /// Maps nest deeper than allowed.
    #[error("maps may nest fewer than {limit} levels")]
    NestingTooDeep {
        /// The limit.
        limit: usize,
    },
    /// The key does not exist.
    #[error("key not found")]
    NotFound,
    /// A key is empty or too long.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// A clock error (a remote timestamp too far ahead).
    #[error(transparent)]
    Clock(#[from] ClockError),
    /// A message could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// A message is larger than allowed.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A write would leave a key with a state larger than a value may be.
    #[error("the write would make {key:?} {size} bytes, over the limit of {limit} bytes for one value")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The state's encoded size after the write.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A read's causal token carries a timestamp further ahead of this
    /// node's clock than the allowed clock skew: no state will include it
    /// in time, so the read is refused instead of waiting.
    #[error("the token's timestamp ({wall_ms} ms) is more than the allowed clock skew ahead of this node's clock ({now_ms} ms): a token from the future is refused")]
    TokenFromFuture {
        /// The token's wall time.
        wall_ms: u64,
        /// This node's wall time.
        now_ms: u64,
    },
    /// A retried write whose first attempt this node may have applied and
    /// then lost its record of: it restarted less than `retry_window_ms`
    /// ago (after any restart, since a crash, an `async` life or a disk
    /// that lied about its flushes can lose op ids).
    #[error("the write's outcome is unknown: this node restarted since its first attempt, which it may have applied and lost the record of; read the key before writing again")]
    OutcomeUnknown,
    /// A peer frame whose integrity check does not match its contents: it
    /// was corrupted on the way. Refused whole, like a lost frame (the
    /// protocol repairs loss).
    #[error("a frame of {len} bytes fails its integrity check: it was corrupted in transit and is dropped")]
    CorruptFrame {
        /// The frame's length.
        len: usize,
    },
    /// A stored record whose integrity check does not match its bytes: the
    /// disk (or something below the store) changed it. Its value is never
    /// returned.
    #[error("the stored record of key {key:?} fails its integrity check: the data on disk is corrupt")]
    Corrupt {
        /// The key whose record is corrupt.
        key: String,
    },
    /// A message of a protocol version this node does not speak.
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// A peer sent a value that violates a CRDT invariant.
    #[error("malformed value for key {0:?}")]
    Malformed(String),
    /// The node cannot take more writes right now.
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The storage layer failed.
    #[error("storage: {0}")]
    Store(String),
    /// The change log no longer holds what was asked.
    #[error("trimmed: {0}")]
    Trimmed(String),
    /// A message from a node that is not a configured peer.
    #[error("unknown peer {0}")]
    UnknownPeer(String),
    /// A replication policy (set) is not valid.
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    /// A policy set was refused for its signature (unsigned, signed by a
    /// key this node does not trust, or not verifying).
    #[error("policy set refused: {0}")]
    PolicySignature(crate::policy::signed::Refusal),
    /// The key's replication policy does not allow this region to serve it.
    #[error(
        "policy denied: {key:?} (keyspace {keyspace:?}) may not be {action} in region {region}; regions that may: {}",
        fmt_regions(regions)
    )]
    PolicyDenied {
        /// The key (at most 64 characters of it).
        key: String,
        /// The keyspace of the governing policy.
        keyspace: String,
        /// The region that refused.
        region: crate::proto::RegionId,
        /// The regions that may (empty: none named, e.g. quarantine data
        /// of whichever region wrote it).
        regions: Vec<crate::proto::RegionId>,
        /// `read` or `written`.
        action: String,
    },
    /// A write is durable on this node but its write concern was not met in
    /// time: it is still replicating and is not rolled back.
    #[error("write concern {concern} not met within {timeout_ms} ms: the write is durable in this region and still replicating (it is not rolled back)")]
    ReplicationTimeout {
        /// The concern asked for, e.g. `regions(2)`.
        concern: String,
        /// How long the node waited.
        timeout_ms: u64,
    },
    /// An audit log entry does not verify.
    #[error("audit log broken at entry {index}: {reason}")]
    AuditBroken {
        /// The first entry that fails.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
}

fn fmt_regions(r: &[crate::proto::RegionId]) -> String {
    if r.is_empty() {
        "none named".into()
    } else {
        r.iter().map(|x| x.0.as_str()).collect::<Vec<_>>().join(", ")
    }
}
