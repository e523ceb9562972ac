//! The engine thread: owns the replica (and sled, whose calls block), fed by
//! a bounded channel from the network and API tasks. It decides when to
//! flush (the durability mode), hands frames to the per-peer queues and
//! answers clients once their writes are durable.

use crate::metrics::Metrics;
use crate::storage::{Durability, SledStore};
use lattice_core::crdt::{Op, Value};
use lattice_core::policy::audit::AuditEntry;
use lattice_core::policy::PolicySet;
use lattice_core::proto::client::{
    CausalToken, Change, ClientError, ErrorKind, NodeStatus, OpId, PeerInfo, WatchToken, WriteConcern,
};
use lattice_core::proto::{NodeId, RegionId};
use lattice_core::replica::{Event, Replica, Time, WriteId};
use lattice_core::{Error, Key};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a write's answer goes: its token and whether it was a retry.
pub type WriteReply = oneshot::Sender<Result<(Vec<(Key, CausalToken)>, bool), Error>>;
/// Where a read's answer goes (`Err(None)` = not caught up in time).
pub type ReadReply = oneshot::Sender<Result<Option<Value>, Option<Error>>>;

/// What the engine thread is asked to do.
pub enum Input {
    /// This node's connection to a peer just came up.
    Reachable(NodeId),
    /// A frame from a peer.
    Frame {
        /// The authenticated peer.
        from: NodeId,
        /// The frame.
        bytes: Vec<u8>,
    },
    /// A client write; answered once durable (and, with a write concern,
    /// once durable in enough regions or at its timeout).
    Write {
        /// Client operation id.
        op_id: OpId,
        /// The client resends a write whose answer it did not get.
        retry: bool,
        /// Operations.
        ops: Vec<(Key, Op)>,
        /// How many regions must hold it before the answer.
        concern: WriteConcern,
        /// How long to wait for them (0: the configured default).
        timeout_ms: u64,
        /// Where the answer goes.
        reply: WriteReply,
    },
    /// Put a newer policy set in force.
    SetPolicy {
        /// The set.
        set: PolicySet,
        /// The version in force afterwards, or why the set was refused.
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Read the audit log.
    Audit {
        /// Its entries, read back from disk.
        reply: oneshot::Sender<Result<Vec<AuditEntry>, Error>>,
    },
    /// A client read; with a token, answered once the state includes it or
    /// at the deadline.
    Read {
        /// The key.
        key: Key,
        /// What the answer must include.
        after: Option<CausalToken>,
        /// The longest wait.
        deadline: Instant,
        /// Where the answer goes.
        reply: ReadReply,
    },
    /// Start a change feed: replay from `from` (if retained), then live.
    Watch {
        /// Key prefix.
        prefix: String,
        /// Resume point.
        from: Option<WatchToken>,
        /// Where changes go; a full queue ends the feed (the client resumes).
        tx: mpsc::Sender<Result<Change, ClientError>>,
    },
    /// Status request.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<NodeStatus>,
    },
    /// Flush, then stop.
    Shutdown,
}

/// Changes retained for watches to resume from.
pub const WATCH_RETAINED: usize = 16_384;

/// The change feed: a bounded ring of recent changes (kept in memory and in
/// sled) and the subscribers.
pub struct Feed {
    epoch: u64,
    next: u64,
    ring: VecDeque<Change>,
    subscribers: Vec<(String, mpsc::Sender<Result<Change, ClientError>>)>,
    tree: Option<sled::Tree>,
}

impl Feed {
    /// Loads the feed. After a clean shutdown the epoch and the retained
    /// changes carry over, so watchers resume across the restart; after a
    /// crash the newest changes may be missing from the feed, so a new epoch
    /// makes old tokens fail loudly (`WatchLost`) instead of skipping them.
    pub fn open(tree: Option<sled::Tree>) -> Feed {
        let mut f = Feed {
            epoch: rand::random(),
            next: 0,
            ring: VecDeque::new(),
            subscribers: Vec::new(),
            tree: None,
        };
        let Some(t) = tree else { return f };
        let clean = t.remove(b"clean").ok().flatten().is_some();
        let epoch = t
            .get(b"epoch")
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes));
        match (clean, epoch) {
            (true, Some(e)) => {
                f.epoch = e;
                for (_, v) in t.scan_prefix(b"c").flatten() {
                    if let Ok(c) = lattice_core::proto::from_bytes::<Change>(&v) {
                        f.next = c.token.seq + 1;
                        f.ring.push_back(c);
                    }
                }
            }
            _ => {
                // A fresh epoch: nothing retained can be trusted to be complete.
                let old: Vec<sled::IVec> = t.scan_prefix(b"c").keys().flatten().collect();
                for k in old {
                    let _ = t.remove(k);
                }
                let _ = t.insert(b"epoch", &f.epoch.to_be_bytes()[..]);
            }
        }
        f.tree = Some(t);
        f
    }

    /// Marks a clean shutdown (after the last flush).
    pub fn close(&self) {
        if let Some(t) = &self.tree {
            let _ = t.insert(b"clean", &[1u8][..]);
            let _ = t.flush();
        }
    }

    fn publish(&mut self, key: Key, value: Option<&Value>, origin: RegionId) {
        let change = Change {
            key,
            value: value.map(Value::view),
            origin,
            token: WatchToken {
                epoch: self.epoch,
                seq: self.next,
            },
        };
        self.next += 1;
        // A subscriber that cannot keep up is cut off; it resumes from its
        // last token while the ring still holds it.
        self.subscribers.retain(|(prefix, tx)| {
            !change.key.as_str().starts_with(prefix.as_str()) || tx.try_send(Ok(change.clone())).is_ok()
        });
        if let Some(t) = &self.tree {
            let key = [&b"c"[..], &change.token.seq.to_be_bytes()].concat();
            if let Ok(bytes) = lattice_core::proto::to_bytes(&change) {
                let _ = t.insert(key, bytes);
            }
        }
        if self.ring.len() == WATCH_RETAINED {
            if let (Some(old), Some(t)) = (self.ring.pop_front(), &self.tree) {
                let _ = t.remove([&b"c"[..], &old.token.seq.to_be_bytes()].concat());
            }
        }
        self.ring.push_back(change);
    }

    fn subscribe(&mut self, prefix: String, from: Option<WatchToken>, tx: mpsc::Sender<Result<Change, ClientError>>) {
        if let Some(t) = from {
            let oldest = self.ring.front().map_or(self.next, |c| c.token.seq);
            if t.epoch != self.epoch || t.seq + 1 < oldest || t.seq >= self.next {
                let _ = tx.try_send(Err(ClientError {
                    kind: ErrorKind::WatchLost,
                    message: "cannot resume from this token (node restarted or change no longer retained): read again and watch anew".into(),
                    regions: Vec::new(),
                }));
                return;
            }
            for c in self
                .ring
                .iter()
                .filter(|c| c.token.seq > t.seq && c.key.as_str().starts_with(prefix.as_str()))
            {
                if tx.try_send(Ok(c.clone())).is_err() {
                    return;
                }
            }
        }
        self.subscribers.push((prefix, tx));
    }
}

/// The node's clock: monotonic milliseconds since start, and the wall clock
/// offset for the hybrid logical clock.
pub struct Clock {
    start: Instant,
    wall_offset_ms: i64,
}

impl Clock {
    /// Starts the clock now.
    pub fn new() -> Clock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Clock {
            start: Instant::now(),
            wall_offset_ms: wall,
        }
    }
    fn now(&self) -> Time {
        Time(self.start.elapsed().as_millis() as u64)
    }
    fn at(&self, t: Time) -> Instant {
        self.start + Duration::from_millis(t.0)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Most inputs one engine step takes before it flushes and answers.
const MAX_STEP_INPUTS: usize = 1_024;

/// Runs the engine until `Shutdown` or until every sender is gone.
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut replica: Replica<SledStore>,
    clock: Clock,
    durability: Durability,
    group_commit: Duration,
    rx: Receiver<Input>,
    peers: BTreeMap<NodeId, mpsc::Sender<Vec<u8>>>,
    metrics: Arc<Metrics>,
    node: String,
    feed: Feed,
    audit: crate::audit::AuditLog,
    concern_ms: u64,
) {
    replica.set_wall_offset(clock.wall_offset_ms);
    let mut audit = audit;
    let mut waiting_writes: BTreeMap<WriteId, WaitingWrite> = BTreeMap::new();
    let mut feed = feed;
    let regions: BTreeMap<NodeId, RegionId> = replica
        .config()
        .peers
        .iter()
        .map(|p| (p.node.clone(), p.region.clone()))
        .collect();
    let own_region = replica.config().region.clone();
    let mut waiting_reads: Vec<(Key, CausalToken, Instant, ReadReply)> = Vec::new();
    let mut first_unflushed: Option<Instant> = None;
    let mut stopping = false;
    let mut last_stats = Instant::now();
    loop {
        // Sleep until the engine's next timer, a group-commit deadline or a
        // read deadline, unless input arrives first.
        let now = clock.now();
        let mut wake = replica
            .poll_timeout()
            .map_or(Instant::now() + Duration::from_millis(100), |t| clock.at(t));
        if let Some(t) = first_unflushed {
            wake = wake.min(t + group_commit);
        }
        for (_, _, d, _) in &waiting_reads {
            wake = wake.min(*d);
        }
        let timeout = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        let mut inputs = Vec::new();
        match rx.recv_timeout(timeout) {
            Ok(i) => inputs.push(i),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => stopping = true,
        }
        // Take what else is queued, bounded, so one flush covers a batch.
        let mut drained = false;
        while inputs.len() < MAX_STEP_INPUTS {
            match rx.try_recv() {
                Ok(i) => inputs.push(i),
                Err(_) => {
                    drained = true;
                    break;
                }
            }
        }
        metrics.engine_queue.set(inputs.len() as i64);
        let now = clock.now().max(now);
        for input in inputs {
            match input {
                Input::Frame { from, bytes } => {
                    metrics.peer_frames_in.inc_by(1);
                    metrics.peer_bytes_in.inc_by(bytes.len() as u64);
                    if let Err(e) = replica.handle(now, &from, &bytes) {
                        metrics.peer_frames_rejected.inc_by(1);
                        tracing::warn!(peer = %from, error = %e, "refused a peer frame");
                    }
                }
                Input::Write {
                    op_id,
                    retry,
                    ops,
                    concern,
                    timeout_ms,
                    reply,
                } => {
                    if retry && replica.retry_outcome_unknown(now, op_id).unwrap_or(true) {
                        let _ = reply.send(Err(Error::OutcomeUnknown));
                        continue;
                    }
                    let keys: Vec<Key> = ops.iter().map(|(k, _)| k.clone()).collect();
                    let timeout_ms = if timeout_ms == 0 {
                        concern_ms
                    } else {
                        timeout_ms.min(3_600_000)
                    };
                    match replica.write_with(now, Some(op_id), ops, concern, timeout_ms) {
                        Ok((id, duplicate)) => {
                            let mut token: Vec<(Key, CausalToken)> = Vec::new();
                            for k in &keys {
                                let t = CausalToken::of(replica.read(k).ok().flatten().as_ref());
                                match token.iter_mut().find(|(key, _)| key == k) {
                                    Some((_, mine)) => mine.join(&t),
                                    None => token.push((k.clone(), t)),
                                }
                            }
                            metrics.writes.inc_by(1);
                            let changed = if duplicate { Vec::new() } else { keys };
                            waiting_writes.insert(
                                id,
                                WaitingWrite {
                                    token,
                                    duplicate,
                                    reply: Some(reply),
                                    changed,
                                    concern: (concern != WriteConcern::Local).then_some((concern, timeout_ms)),
                                    durable: false,
                                    timed_out: None,
                                },
                            );
                            first_unflushed.get_or_insert_with(Instant::now);
                        }
                        Err(e) => {
                            match e {
                                Error::Overloaded(_) => metrics.overloaded.inc_by(1),
                                Error::PolicyDenied { .. } => metrics.policy_denied.inc_by(1),
                                _ => 0,
                            };
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Input::Reachable(peer) => {
                    if let Err(e) = replica.handle_reachable(now, &peer) {
                        tracing::warn!(peer = %peer, error = %e, "reachable: not a peer");
                    }
                }
                Input::SetPolicy { set, reply } => {
                    let version = set.version;
                    let result = match replica.set_policy(now, set) {
                        Ok(true) => Ok(version),
                        Ok(false) => Err(Error::InvalidPolicy(format!(
                            "version {version} is not newer than the set in force (version {})",
                            replica.policy().version
                        ))),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(result);
                }
                Input::Audit { reply } => {
                    let _ = reply.send(audit.entries());
                }
                Input::Read {
                    key,
                    after,
                    deadline,
                    reply,
                } => {
                    metrics.reads.inc_by(1);
                    if let Err(e) = replica.policy().check_read(key.as_str(), &own_region) {
                        metrics.policy_denied.inc_by(1);
                        let _ = reply.send(Err(Some(e)));
                        continue;
                    }
                    match after {
                        None => {
                            let _ = reply.send(replica.read(&key).map_err(Some));
                        }
                        Some(token) => waiting_reads.push((key, token, deadline, reply)),
                    }
                }
                Input::Watch { prefix, from, tx } => feed.subscribe(prefix, from, tx),
                Input::Status { reply } => {
                    let _ = reply.send(status(&replica, now, &node));
                }
                Input::Shutdown => stopping = true,
            }
        }
        if let Err(e) = replica.handle_timeout(now) {
            tracing::error!(error = %e, "engine timer failed");
        }
        if replica.needs_flush() {
            first_unflushed.get_or_insert_with(Instant::now);
        }
        let due = match durability {
            Durability::Sync | Durability::Async => true,
            // Self-clocking: everything that arrived during the last flush
            // was taken in this step and shares the next one, so waiting
            // longer would only add latency. Only while input keeps
            // queueing past a step's limit does the flush wait, up to
            // `group_commit`, to cover more.
            Durability::Group => drained || first_unflushed.is_some_and(|t| t.elapsed() >= group_commit),
        };
        if replica.needs_flush() && (due || stopping) {
            let started = Instant::now();
            match replica.flush(now) {
                Ok(()) => {
                    metrics.flushes.inc_by(1);
                    metrics.flush_micros.inc_by(started.elapsed().as_micros() as u64);
                    first_unflushed = None;
                }
                Err(e) => tracing::error!(error = %e, "flush failed; writes stay unacknowledged"),
            }
        }
        while let Some(t) = replica.poll_transmit() {
            let Some(q) = peers.get(&t.to) else { continue };
            metrics.peer_frames_out.inc_by(1);
            metrics.peer_bytes_out.inc_by(t.payload.len() as u64);
            if q.try_send(t.payload).is_err() {
                // A slow or absent peer: drop, retransmission and
                // anti-entropy repair it; memory stays bounded.
                metrics.peer_frames_dropped.inc_by(1);
            }
        }
        while let Some(e) = replica.poll_event() {
            match e {
                Event::WriteDurable(id) => {
                    if let Some(w) = waiting_writes.get_mut(&id) {
                        w.durable = true;
                        for k in std::mem::take(&mut w.changed) {
                            let v = replica.read(&k).ok().flatten();
                            feed.publish(k, v.as_ref(), own_region.clone());
                        }
                        if w.concern.is_none() {
                            w.answer(Ok(()));
                        } else if let Some(e) = w.timed_out.take() {
                            w.answer(Err(e));
                        }
                    }
                    waiting_writes.retain(|_, w| w.reply.is_some());
                }
                Event::WriteReplicated(id) => {
                    if let Some(mut w) = waiting_writes.remove(&id) {
                        w.answer(Ok(()));
                    }
                }
                Event::WriteConcernTimeout(id) => {
                    metrics.concern_timeouts.inc_by(1);
                    if let Some(w) = waiting_writes.get_mut(&id) {
                        let (concern, timeout_ms) = w.concern.unwrap_or((WriteConcern::Local, 0));
                        let e = Error::ReplicationTimeout {
                            concern: concern.to_string(),
                            timeout_ms,
                        };
                        if w.durable {
                            w.answer(Err(e));
                        } else {
                            // Answered once durable here: the error says so.
                            w.timed_out = Some(e);
                        }
                    }
                    waiting_writes.retain(|_, w| w.reply.is_some());
                }
                Event::PolicyAdopted { policy, from } => {
                    let source = from.map_or_else(|| "admin".to_string(), |p| format!("peer {p}"));
                    if let Err(e) = audit.append(&node, &source, policy) {
                        tracing::error!(error = %e, "could not append to the policy audit log");
                    }
                }
                Event::RemoteApplied { key, from } => {
                    metrics.remote_updates.inc_by(1);
                    let v = replica.read(&key).ok().flatten();
                    let origin = regions.get(&from).cloned().unwrap_or_else(|| RegionId(from.0.clone()));
                    feed.publish(key, v.as_ref(), origin);
                }
            }
        }
        // Reads waiting for a token: answer when included, or at the deadline.
        let mut i = 0;
        while i < waiting_reads.len() {
            let (key, token, deadline, _) = &waiting_reads[i];
            let value = replica.read(key);
            let ready = match &value {
                Ok(v) => token.is_included_in(v.as_ref()),
                Err(_) => true,
            };
            if ready || Instant::now() >= *deadline {
                let (_, _, _, reply) = waiting_reads.swap_remove(i);
                let _ = reply.send(if ready { value.map_err(Some) } else { Err(None) });
            } else {
                i += 1;
            }
        }
        if last_stats.elapsed() >= Duration::from_millis(200) {
            metrics.record_engine(&replica, now);
            for (peer, q) in &peers {
                metrics.record_queue(&peer.0, q.max_capacity() - q.capacity());
            }
            last_stats = Instant::now();
        }
        if stopping && !replica.needs_flush() {
            metrics.record_engine(&replica, now);
            // A clean close lets an `async` store keep its replica id.
            if let Err(e) = replica.close(now) {
                tracing::error!(error = %e, "closing the store failed; the next start takes a new replica id");
            }
            feed.close();
            tracing::info!("engine stopped");
            return;
        }
    }
}

/// A client write waiting for its answer.
struct WaitingWrite {
    token: Vec<(Key, CausalToken)>,
    duplicate: bool,
    /// Taken when answered.
    reply: Option<WriteReply>,
    /// Keys to publish to watchers once durable.
    changed: Vec<Key>,
    /// Its write concern beyond `local`, and its timeout.
    concern: Option<(WriteConcern, u64)>,
    durable: bool,
    /// The concern timed out before the write was durable here.
    timed_out: Option<Error>,
}

impl WaitingWrite {
    fn answer(&mut self, result: Result<(), Error>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result.map(|()| (self.token.clone(), self.duplicate)));
        }
    }
}

fn status(replica: &Replica<SledStore>, now: Time, node: &str) -> NodeStatus {
    NodeStatus {
        node: node.to_string(),
        region: replica.config().region.clone(),
        replica: replica.id().to_string(),
        digest: format!("{:032x}", replica.digest()),
        buffer: replica.buffer_usage(),
        peers: replica
            .peer_status(now)
            .into_iter()
            .map(|p| PeerInfo {
                node: p.node.0,
                region: p.region,
                alive: p.alive,
                unacked_groups: p.unacked_groups,
                last_heard_ms_ago: p.last_heard_ms_ago,
            })
            .collect(),
        policy_version: replica.policy().version,
        policies: replica.policy_status(now),
    }
}
