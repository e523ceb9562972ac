//! Wire messages between nodes and their codec.
//!
//! A peer frame is one version byte ([`PEER_PROTOCOL_VERSION`]), an 8-byte
//! integrity check ([`FRAME_CHECK_BYTES`]: the first bytes of a blake3 hash
//! of the version byte and the body), then a MessagePack (rmp-serde)
//! encoding of [`Message`]. Decoding checks the size limit before anything
//! else, rejects unknown versions, refuses a frame whose check does not
//! match (`CorruptFrame`: a bit flipped in transit is never merged), bounds
//! the nesting depth, refuses trailing bytes and validates every CRDT value
//! it carries. Client frames ([`client`]) keep their own version,
//! [`PROTOCOL_VERSION`], and no check.

use crate::clock::{HlcTimestamp, ReplicaId};
use crate::crdt::{Bytes, Value};
use crate::key::Key;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

pub mod client;

/// The client protocol version this build speaks (client frames).
pub const PROTOCOL_VERSION: u8 = 1;

/// The peer protocol version this build speaks. Version 2 added the
/// integrity check; a version-1 peer's frames are refused as
/// `UnknownVersion`.
pub const PEER_PROTOCOL_VERSION: u8 = 2;

/// Bytes of the integrity check after a peer frame's version byte.
pub const FRAME_CHECK_BYTES: usize = 8;

/// Default largest peer frame accepted, in bytes. A key's state may take at
/// most half a frame, so this admits every value a client may write
/// ([`client::MAX_VALUE_BYTES`]).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8 << 20;
const _: () = assert!(client::MAX_VALUE_BYTES <= DEFAULT_MAX_MESSAGE_BYTES / 2);

/// The decoder's nesting bound: MessagePack containers nest less deep
/// than this (127 nested arrays decode, 128 are refused; rmp-serde counts
/// the level that reaches the bound as over it).
pub const MAX_DECODE_DEPTH: usize = 128;

/// A node's stable name (from configuration), as used to address messages.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_string())
    }
}

/// A region name (from configuration).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegionId(pub String);

impl fmt::Debug for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for RegionId {
    fn from(s: &str) -> Self {
        RegionId(s.to_string())
    }
}

/// A delta-group: the joined effect of one local batch (or the novel part of
/// one received message), buffered until every peer has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaGroup {
    /// Position in this replica's buffer.
    pub seq: u64,
    /// The peer it came from (`None` for local writes): never sent back there.
    pub origin: Option<NodeId>,
    /// Per-key deltas, in key order. Shared: the buffer, the store's batch
    /// and every peer's section hold the same delta, not copies of it.
    pub entries: Vec<(Key, Arc<Value>)>,
    /// The HLC stamp of its write (a received group: of the oldest write
    /// its section carried), for the propagation latency a receiver
    /// observes. `None` in groups written before it was recorded.
    #[serde(default)]
    pub written: Option<HlcTimestamp>,
}

/// Names one anti-entropy round: who started it, and its number there.
/// Every message of the round carries it, so the initiator can tell that a
/// round it started after some event has completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundId {
    /// The replica that started the round.
    pub initiator: ReplicaId,
    /// A random number drawn when the initiator opened its store: rounds
    /// from an earlier process life never complete anything.
    pub epoch: u64,
    /// Its sequence number at the initiator.
    pub seq: u64,
    /// The initiator's durable delta-groups when the round started: once
    /// the round completes, the other side holds the initiator's state with
    /// every group below this, so deltas can resume from here.
    pub through: u64,
    /// Some step of the round was cut short by a limit (fanout, frame
    /// size): its completion repairs only part of the difference.
    pub partial: bool,
}

/// Number of priority classes: each has its own delta stream per peer.
pub const CLASSES: usize = 3;

/// "I have every delta-group of `replica` below `upto[c]`, as far as keys
/// of priority class `c` are concerned."
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The incarnation whose sequence numbers are meant.
    pub replica: ReplicaId,
    /// The incarnation that acknowledges. Like a heartbeat's sender, it
    /// tells the receiver which life of the peer is current (a node that
    /// only acknowledges sends no heartbeats): an ack from a life other
    /// than the one known makes it the known one, streams restart and the
    /// peer is repaired.
    pub from: ReplicaId,
    /// Exclusive upper bound, per priority class.
    pub upto: [u64; CLASSES],
}

/// One priority class's part of a `Delta`: the class-`class` entries of
/// the sender's groups `from..to`, joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The priority class (0 = critical).
    pub class: u8,
    /// The sender believes the receiver has every group below this (for
    /// this class), because the receiver acknowledged it.
    pub base: u64,
    /// First group included.
    pub from: u64,
    /// One past the last group included.
    pub to: u64,
    /// Joined per-key deltas (shared with the sender's buffer; a received
    /// entry is the only holder of its value).
    pub entries: Vec<(Key, Arc<Value>)>,
    /// The HLC stamp of the oldest write among the groups joined
    /// ([`DeltaGroup::written`]). Absent from older senders' frames.
    #[serde(default)]
    pub written: Option<HlcTimestamp>,
}

/// Which policy set a node has in force: peers with an older one are sent
/// the newer set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyStamp {
    /// The set's version.
    pub version: u64,
    /// The first 8 bytes of its digest (breaks ties between equal versions).
    pub digest: u64,
}

impl PolicyStamp {
    /// The stamp of a set.
    pub fn of(set: &crate::policy::PolicySet) -> PolicyStamp {
        let d = set.digest();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        PolicyStamp {
            version: set.version,
            digest: u64::from_be_bytes(b),
        }
    }
}

/// A message between two nodes.
///
/// Encoded with one-letter variant tags (rmp-serde writes a variant's name
/// with every value); the long names still decode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Liveness, sent to a peer that has heard nothing else for a while.
    #[serde(rename = "h", alias = "Heartbeat")]
    Heartbeat {
        /// The sender's incarnation: a change tells the receiver the sender
        /// lost its state and must be resent and repaired.
        sender: ReplicaId,
        /// The sender's clock.
        time: HlcTimestamp,
        /// The sender's policy set.
        policy: PolicyStamp,
        /// The sender's first message to the receiver since it started:
        /// answer with a heartbeat at once, so it learns our incarnation and
        /// policy without waiting a heartbeat interval.
        hello: bool,
    },
    /// The joined delta-groups `from..to` of `sender` (less what came from
    /// the receiver and what policy keeps from it).
    #[serde(rename = "d", alias = "Delta")]
    Delta {
        /// The sender's incarnation.
        sender: ReplicaId,
        /// The receiver's incarnation that acknowledged the sections' bases.
        base_from: Option<ReplicaId>,
        /// The sender's clock.
        time: HlcTimestamp,
        /// The sender's policy set.
        policy: PolicyStamp,
        /// One section per priority class that has something to say.
        sections: Vec<Section>,
        /// A piggybacked acknowledgement of the receiver's groups.
        ack: Option<Ack>,
    },
    /// A stand-alone acknowledgement.
    #[serde(rename = "a", alias = "Ack")]
    Ack(Ack),
    /// Anti-entropy: the sender's digests of the children (at `level`) of
    /// each node in `parents` (at `level - 1`); at level 0, just the root.
    #[serde(rename = "t", alias = "AeTree")]
    AeTree {
        /// The round.
        round: RoundId,
        /// Depth of the sender's tree (must match).
        depth: u8,
        /// Level of the digests carried.
        level: u8,
        /// Parent node indices.
        parents: Vec<u32>,
        /// 16 bytes per digest: 16 children per parent in order (1 at level 0).
        digests: Bytes,
    },
    /// Anti-entropy: the sender's items in leaves whose digests differed.
    #[serde(rename = "l", alias = "AeLeaves")]
    AeLeaves {
        /// The round.
        round: RoundId,
        /// Leaf indices.
        leaves: Vec<u32>,
        /// Per leaf, 16 bytes per key: 8 of key hash, 8 of item hash.
        items: Vec<Bytes>,
    },
    /// Anti-entropy: the root digests are equal.
    #[serde(rename = "i", alias = "AeInSync")]
    AeInSync {
        /// The round.
        round: RoundId,
    },
    /// Anti-entropy: the states of the round's last `AeStates` are durable
    /// here. Completes the round for its initiator.
    #[serde(rename = "e", alias = "AeDone")]
    AeDone {
        /// The round.
        round: RoundId,
    },
    /// A policy set, sent to a peer whose stamp is older than ours.
    #[serde(rename = "p", alias = "Policy")]
    Policy(crate::policy::signed::SignedPolicySet),
    /// Anti-entropy: states of differing keys, and the key hashes wanted back.
    #[serde(rename = "S", alias = "AeStates")]
    AeStates {
        /// The round.
        round: RoundId,
        /// Full states to join.
        entries: Vec<(Key, Value)>,
        /// Key hashes whose states the sender wants.
        want: Vec<u64>,
        /// Answer with one `AeStates` holding the wanted states (possibly
        /// none), so both sides see the round complete. Set on the last
        /// message of the comparing side only.
        reply: bool,
    },
}

impl Message {
    /// A short name, for metrics and traces.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Heartbeat { .. } => "heartbeat",
            Message::Delta { .. } => "delta",
            Message::Ack(_) => "ack",
            Message::AeTree { .. } => "ae_tree",
            Message::AeLeaves { .. } => "ae_leaves",
            Message::AeStates { .. } => "ae_states",
            Message::AeInSync { .. } => "ae_in_sync",
            Message::AeDone { .. } => "ae_done",
            Message::Policy(_) => "policy",
        }
    }

    /// Whether the message carries keys, states or digests of them (every
    /// kind but heartbeats, acknowledgements and policy sets).
    pub fn is_state_carrying(&self) -> bool {
        !matches!(self, Message::Heartbeat { .. } | Message::Ack(_) | Message::Policy(_))
    }

    /// Every key and state the message carries, section by section.
    pub fn entry_lists(&self) -> Vec<Vec<(&Key, &Value)>> {
        match self {
            Message::Delta { sections, .. } => sections
                .iter()
                .map(|s| s.entries.iter().map(|(k, v)| (k, &**v)).collect())
                .collect(),
            Message::AeStates { entries, .. } => vec![entries.iter().map(|(k, v)| (k, v)).collect()],
            _ => Vec::new(),
        }
    }
}

/// Encodes a message into one frame.
pub fn encode(msg: &Message) -> Result<Vec<u8>, Error> {
    let mut out = vec![PEER_PROTOCOL_VERSION];
    out.extend_from_slice(&[0; FRAME_CHECK_BYTES]);
    rmp_serde::encode::write(&mut out, msg).map_err(|e| Error::Codec(e.to_string()))?;
    let check = frame_check(PEER_PROTOCOL_VERSION, &out[1 + FRAME_CHECK_BYTES..]);
    out[1..1 + FRAME_CHECK_BYTES].copy_from_slice(&check);
    Ok(out)
}

/// Builds a peer frame around an already encoded body (version byte and
/// check added): for tests and tools that hand-craft frames, e.g. to feed
/// the decoder bodies that are corrupt but correctly checked.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + FRAME_CHECK_BYTES + body.len());
    out.push(PEER_PROTOCOL_VERSION);
    out.extend_from_slice(&frame_check(PEER_PROTOCOL_VERSION, body));
    out.extend_from_slice(body);
    out
}

/// The integrity check of a peer frame: blake3 over the version byte and
/// the body, truncated. It covers accidents (a flipped bit on a path that
/// TLS does not protect, a memory or NIC fault before encryption), not an
/// attacker, who could recompute it: peers are authenticated by mTLS.
fn frame_check(version: u8, body: &[u8]) -> [u8; FRAME_CHECK_BYTES] {
    let mut h = blake3::Hasher::new();
    h.update(&[version]);
    h.update(body);
    let mut out = [0; FRAME_CHECK_BYTES];
    out.copy_from_slice(&h.finalize().as_bytes()[..FRAME_CHECK_BYTES]);
    out
}

/// Encodes any serde value the way frames carry it (no version byte).
pub fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec(v).map_err(|e| Error::Codec(e.to_string()))
}

/// Decodes a value encoded by [`to_bytes`], with the depth bound and the
/// trailing-bytes check of [`decode`].
pub fn from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    de.set_max_depth(MAX_DECODE_DEPTH);
    let v = T::deserialize(&mut de).map_err(|e| Error::Codec(e.to_string()))?;
    if !de.get_ref().is_empty() {
        return Err(Error::Codec(format!("{} trailing bytes", de.get_ref().len())));
    }
    Ok(v)
}

/// Checks a client frame's size and version and returns its body.
pub(crate) fn frame_body(frame: &[u8], max_bytes: usize) -> Result<&[u8], Error> {
    if frame.len() > max_bytes {
        return Err(Error::MessageTooLarge {
            size: frame.len(),
            limit: max_bytes,
        });
    }
    let (&version, body) = frame.split_first().ok_or_else(|| Error::Codec("empty frame".into()))?;
    if version != PROTOCOL_VERSION {
        return Err(Error::UnknownVersion(version));
    }
    Ok(body)
}

/// Checks a peer frame's size, version and integrity and returns its body.
/// The version comes before the check, so a peer of another version is
/// told apart from a corrupted frame (a flip in the version byte itself
/// shows as `UnknownVersion`, and is refused all the same).
fn peer_frame_body(frame: &[u8], max_bytes: usize) -> Result<&[u8], Error> {
    if frame.len() > max_bytes {
        return Err(Error::MessageTooLarge {
            size: frame.len(),
            limit: max_bytes,
        });
    }
    let (&version, rest) = frame.split_first().ok_or_else(|| Error::Codec("empty frame".into()))?;
    if version != PEER_PROTOCOL_VERSION {
        return Err(Error::UnknownVersion(version));
    }
    if rest.len() < FRAME_CHECK_BYTES {
        return Err(Error::CorruptFrame { len: frame.len() });
    }
    let (check, body) = rest.split_at(FRAME_CHECK_BYTES);
    #[cfg(feature = "planted-bugs")]
    if crate::planted::active(crate::planted::PlantedBug::FrameCheckIgnored) {
        return Ok(body);
    }
    if check != frame_check(version, body) {
        return Err(Error::CorruptFrame { len: frame.len() });
    }
    Ok(body)
}

/// Decodes one frame of at most `max_bytes`, validating what it carries.
pub fn decode(frame: &[u8], max_bytes: usize) -> Result<Message, Error> {
    let body = peer_frame_body(frame, max_bytes)?;
    let msg: Message = from_bytes(body)?;
    if let Message::Delta { sections, .. } = &msg {
        let mut classes = [false; CLASSES];
        for sec in sections {
            let c = usize::from(sec.class);
            if c >= CLASSES || std::mem::replace(&mut classes[c], true) || sec.from > sec.to {
                return Err(Error::Malformed("bad delta section".into()));
            }
        }
    }
    for list in msg.entry_lists() {
        let mut keys = std::collections::BTreeSet::new();
        for (k, v) in list {
            if !keys.insert(k) {
                return Err(Error::Malformed(format!("key {k:?} appears twice in one message")));
            }
            if !k.is_valid() || !v.is_well_formed() {
                return Err(Error::Malformed(k.as_str().chars().take(64).collect()));
            }
        }
    }
    Ok(msg)
}
