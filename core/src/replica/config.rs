//! The replica's public vocabulary: time, configuration, outputs and counters.

use super::conflicts::Conflicts;
use crate::clock::HlcTimestamp;
use crate::key::Key;
use crate::policy::PolicySet;
use crate::proto::client::CausalToken;
use crate::proto::{self, NodeId, RegionId};
use std::collections::BTreeMap;

/// A point in time on the driving node's clock, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    /// `self + ms`.
    pub fn plus(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }
    /// Milliseconds from `earlier` to `self` (0 if negative).
    pub fn since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Identifies a local write until it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// A configured peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node name.
    pub node: NodeId,
    /// Its region.
    pub region: RegionId,
    /// Most bytes per second sent to it (`None`: unlimited). Under the
    /// limit, deltas go by priority class: `critical`, then `normal`, then
    /// `bulk`, with aging so none starves.
    pub rate_limit: Option<u64>,
}

impl PeerConfig {
    /// An unlimited peer.
    pub fn new(node: impl Into<NodeId>, region: impl Into<RegionId>) -> PeerConfig {
        PeerConfig {
            node: node.into(),
            region: region.into(),
            rate_limit: None,
        }
    }
}

/// Tunables of a replica. Every queue and message has a limit here.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This node's name.
    pub node: NodeId,
    /// This node's region.
    pub region: RegionId,
    /// The peers this node exchanges deltas and digests with.
    pub peers: Vec<PeerConfig>,
    /// Re-gossip deltas received from one peer to the others (for partial
    /// topologies: trees, partial meshes). In a full mesh every origin sends
    /// to everyone directly and relaying would only add redundant traffic.
    pub relay: bool,
    /// At most one `Delta` message per peer per this interval (batching).
    pub sync_interval_ms: u64,
    /// A stand-alone `Ack` waits this long for a delta to ride on.
    pub ack_delay_ms: u64,
    /// Unacknowledged groups are re-sent after this long without progress.
    pub retransmit_ms: u64,
    /// A heartbeat goes to a peer that has been sent nothing for this long.
    pub heartbeat_ms: u64,
    /// A peer not heard from for this long is considered down.
    pub peer_timeout_ms: u64,
    /// Interval between anti-entropy rounds with a random live peer
    /// (0 disables periodic rounds; lagging peers are still repaired).
    pub ae_interval_ms: u64,
    /// Levels of the anti-entropy tree below the root (fanout 16); must be
    /// equal across the cluster. 4 gives 65,536 leaves; at most 5.
    pub tree_depth: u8,
    /// Largest frame sent or accepted.
    pub max_message_bytes: usize,
    /// Largest encoded state a local write may leave a key with: writes
    /// past it fail with [`Error::ValueTooLarge`](crate::Error::ValueTooLarge).
    /// The engine also caps it at half a frame, so any state can be
    /// repaired. The default leaves room in a client's 1 MiB answer frame
    /// for the answer around the value, so every value can be read back.
    pub max_value_bytes: usize,
    /// Largest total size of buffered delta-groups; beyond it the oldest are
    /// dropped and lagging peers are repaired by anti-entropy.
    pub max_buffer_bytes: usize,
    /// Most writes waiting for durability; beyond it writes get `Overloaded`.
    pub max_pending_writes: usize,
    /// Remote clocks further ahead than this are not merged into ours.
    pub max_clock_ahead_ms: u64,
    /// Most tree nodes or leaves one anti-entropy message descends into.
    pub max_ae_fanout: usize,
    /// The replication policies in force at start (a newer set from a peer
    /// or [`Replica::set_policy`](crate::replica::Replica::set_policy)
    /// replaces it).
    pub policy: PolicySet,
    /// The signature of `policy`, if it has one (a set recorded from an
    /// admin or a peer). An unsigned set (a node's own configuration
    /// file) is in force here but never sent to peers.
    pub policy_signature: Option<crate::policy::signed::PolicySignature>,
    /// The admin public keys whose signed policy sets this node adopts,
    /// from a client ([`Replica::set_policy`](crate::replica::Replica::set_policy))
    /// or a peer. Empty: no set but the initial one is ever in force.
    pub policy_keys: crate::policy::signed::TrustedKeys,
    /// On a rate-limited link, a priority class held back this long is sent
    /// before more urgent ones, so nothing starves.
    pub starvation_ms: u64,
    /// Check, on every remote state applied, that joining only its novel
    /// part gives what the whole join gives, both ways round (join is
    /// commutative), and stop at the first break (the simulator turns it
    /// on: a broken join stops at the line that broke it). One extra join
    /// per remote entry.
    pub check_invariants: bool,
    /// After an unclean restart in `async` mode, how long retried writes
    /// with an unknown op id are answered `OutcomeUnknown` (the SDK retries
    /// within seconds).
    pub retry_window_ms: u64,
}

impl ReplicaConfig {
    /// Defaults for a node `node` in `region` with these peers.
    pub fn new(node: impl Into<NodeId>, region: impl Into<RegionId>, peers: Vec<PeerConfig>) -> Self {
        ReplicaConfig {
            node: node.into(),
            region: region.into(),
            peers,
            relay: false,
            sync_interval_ms: 20,
            ack_delay_ms: 50,
            retransmit_ms: 1_000,
            heartbeat_ms: 1_000,
            peer_timeout_ms: 5_000,
            ae_interval_ms: 5_000,
            tree_depth: 4,
            max_message_bytes: proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_value_bytes: proto::client::MAX_VALUE_BYTES,
            max_buffer_bytes: 64 << 20,
            max_pending_writes: 10_000,
            max_clock_ahead_ms: 60_000,
            max_ae_fanout: 4_096,
            policy: PolicySet::default(),
            policy_signature: None,
            policy_keys: Default::default(),
            starvation_ms: 2_000,
            check_invariants: false,
            retry_window_ms: 60_000,
        }
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s)
    }
}

impl From<String> for RegionId {
    fn from(s: String) -> Self {
        RegionId(s)
    }
}

/// A frame to send to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The destination.
    pub to: NodeId,
    /// The encoded frame.
    pub payload: Vec<u8>,
    /// The message kind (for metrics).
    pub kind: &'static str,
}

/// Something the driver should act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The write is durable: acknowledge it to the client.
    WriteDurable(WriteId),
    /// The write's concern is met: it is durable in enough regions.
    WriteReplicated(WriteId),
    /// The write's concern was not met in time. It is durable here and
    /// still replicating; nothing is rolled back.
    WriteConcernTimeout(WriteId),
    /// A new policy set is in force: record it in the audit log.
    PolicyAdopted {
        /// The set.
        policy: PolicySet,
        /// Its signature (always present for a set from a client or peer).
        signature: Option<crate::policy::signed::PolicySignature>,
        /// The peer it came from (`None`: set locally).
        from: Option<NodeId>,
    },
    /// A key changed because of a peer's delta or anti-entropy.
    RemoteApplied {
        /// The key.
        key: Key,
        /// The peer it came from.
        from: NodeId,
        /// The token of the key's state after the change: a driver can
        /// tell which waiting reads it satisfies without reading it.
        token: CausalToken,
        /// The HLC stamp of the oldest write the delta carried (`None`: an
        /// anti-entropy repair, or a sender from before stamps were
        /// carried). Wall-clock now minus its `wall_ms` is the write's
        /// end-to-end propagation latency, clocks permitting.
        written: Option<HlcTimestamp>,
    },
}

/// Counters a driver exports as metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames queued for sending, by kind.
    pub sent: BTreeMap<&'static str, (u64, u64)>,
    /// Frames received (count, bytes).
    pub received: (u64, u64),
    /// Frames refused by the codec or validation.
    pub rejected: u64,
    /// Of those, frames whose integrity check failed (corrupted in
    /// transit); dropped like lost frames.
    pub corrupt_frames: u64,
    /// Local writes accepted.
    pub writes: u64,
    /// Writes refused with `Overloaded`.
    pub overloaded: u64,
    /// Keys changed by remote state.
    pub remote_updates: u64,
    /// Remote entries that brought nothing new.
    pub redundant_entries: u64,
    /// Delta messages dropped because an earlier interval was missing.
    pub out_of_order: u64,
    /// Anti-entropy rounds started.
    pub ae_rounds: u64,
    /// Keys repaired by anti-entropy.
    pub ae_keys_repaired: u64,
    /// States too large for any anti-entropy frame, skipped.
    pub ae_oversized: u64,
    /// Deltas that did not fit a frame (a repair round carried them).
    pub oversized_deltas: u64,
    /// Remote entries refused as impossible or hostile (a dot of this
    /// replica it never created, a dot counter past
    /// [`MAX_DOT_COUNTER`](crate::replica::MAX_DOT_COUNTER), a counter total
    /// of this replica above its own), and frames held back for an LWW
    /// stamp further ahead of the wall clock than `max_clock_ahead_ms`.
    pub hostile_refused: u64,
    /// Buffered groups dropped because the buffer was full.
    pub buffer_dropped: u64,
    /// Remote clocks not merged because too far ahead.
    pub clock_rejections: u64,
    /// Remote entries refused because policy keeps them from this region.
    pub policy_refused: u64,
    /// Local writes refused by policy (`PolicyDenied`).
    pub policy_denied: u64,
    /// Policy sets adopted since start.
    pub policy_adopted: u64,
    /// Policy sets refused for their signature, from clients or peers, by
    /// reason (indexed as [`Refusal::ALL`](crate::policy::signed::Refusal::ALL)).
    pub policy_sets_refused: [u64; 3],
    /// Sync intervals in which a peer's deltas waited for its rate limit.
    pub rate_limited: u64,
    /// Writes whose concern was not met in time.
    pub concern_timeouts: u64,
    /// Keys whose write or merge was prepared beside the engine and taken
    /// ([`Prepared`](crate::replica::Prepared)).
    pub prepared_used: u64,
    /// Prepared results dropped because their key's record had changed
    /// since (the engine did the work itself).
    pub prepared_stale: u64,
    /// Conflicts resolved by merges of remote state, by the keyspace of
    /// the policy governing the key (`""`: the default policy). See
    /// [`Conflicts`] for the exact definitions.
    pub conflicts: BTreeMap<String, Conflicts>,
}

impl Stats {
    /// Total frames and bytes sent.
    pub fn sent_total(&self) -> (u64, u64) {
        self.sent.values().fold((0, 0), |(m, b), (m2, b2)| (m + m2, b + b2))
    }
}

/// A peer as seen from this node, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its name.
    pub node: NodeId,
    /// Its region.
    pub region: RegionId,
    /// Heard from within the peer timeout.
    pub alive: bool,
    /// Local delta-groups it has not acknowledged.
    pub unacked_groups: u64,
    /// Age of the oldest of them, milliseconds (0 when it has them all):
    /// how far behind this node's writes the peer's copy is, in time.
    pub lag_ms: u64,
    /// How long ago it was last heard from.
    pub last_heard_ms_ago: Option<u64>,
}
