//! The engine thread: owns the replica (and sled, whose calls block), fed by
//! a bounded channel from the network and API tasks. It decides when to
//! flush (the durability mode), hands frames to the per-peer queues and
//! answers clients once their writes are durable.

use crate::changelog::LogMeta;
use crate::feed::{Feed, Notice, WatchTx};
use crate::metrics::Metrics;
use crate::queue::{EngineRx, PeerTx, RecvError};
use crate::storage::{Durability, SledStore, StoreReader};
use crate::waits::{Recent, Refused, Seen, WaitLimits, Waits};
use lattice_core::clock::ReplicaId;
use lattice_core::crdt::{Op, Value};
use lattice_core::log::{LogCursor, Logged};
use lattice_core::policy::audit::AuditEntry;
use lattice_core::policy::PolicySet;
use lattice_core::proto::client::{
    encode_answer, CausalToken, Change, ClientError, Entry, ErrorKind, KeyspaceConflicts, NodeStatus, OpId, PeerInfo,
    Response, ScanCursor, WatchToken, WriteConcern, ENTRIES_MAX_BYTES, LOG_MAX_CHANGES, SCAN_MAX_EXAMINED,
    SCAN_MAX_KEYS,
};
use lattice_core::proto::{NodeId, RegionId};
use lattice_core::replica::{Decoded, Event, Prepared, Replica, Time, WriteId};
use lattice_core::{Error, Key};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Where a write's answer goes: its token and whether it was a retry.
pub type WriteReply = oneshot::Sender<Result<(Vec<(Key, CausalToken)>, bool), Error>>;
/// Where a read's answer goes (`Err(None)` = not caught up in time).
pub type ReadReply = oneshot::Sender<Result<ReadAnswer, Option<Error>>>;

/// The engine's answer to a read: the engine never reads a value for a
/// client (a large one takes a few hundred ms to decode, and every input
/// queued behind would wait for it); the read is served beside the engine
/// from [`Reads`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The store beside the engine includes what the read asks for now.
    Ready,
    /// The engine cannot tell (the read saw the store before changes the
    /// engine no longer remembers): read beside the engine again, and send
    /// the read again if its token is still missing.
    Recheck,
}

/// What the engine thread is asked to do.
pub enum Input {
    /// This node's connection to a peer just came up.
    Reachable(NodeId),
    /// A frame from a peer, decoded (or refused) beside the engine.
    Frame {
        /// The authenticated peer.
        from: NodeId,
        /// The frame.
        frame: Decoded,
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
        /// Their work on large states, done beside the engine (taken where
        /// still current: see [`Prepared`]).
        prepared: Prepared,
        /// How many regions must hold it before the answer.
        concern: WriteConcern,
        /// How long to wait for them (0: the configured default).
        timeout_ms: u64,
        /// The client connection it came on (writes waiting for their
        /// concern are capped per connection).
        conn: u64,
        /// Where the answer goes.
        reply: WriteReply,
    },
    /// Put a newer policy set in force.
    SetPolicy {
        /// The set and its signature.
        set: lattice_core::policy::signed::SignedPolicySet,
        /// The version in force afterwards, or why the set was refused.
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// Read the audit log.
    Audit {
        /// Its entries, read back from disk.
        reply: oneshot::Sender<Result<Vec<AuditEntry>, Error>>,
    },
    /// A client read whose token the store beside the engine lacked;
    /// answered once a flushed state includes it, or at the deadline.
    Read {
        /// The key.
        key: Key,
        /// What the answer must include (shared with the connection, which
        /// keeps it to check the value it reads: a token may be large).
        after: Option<Arc<CausalToken>>,
        /// The flush after which the read found the token missing
        /// ([`Reads::epoch`] before it read).
        seen: u64,
        /// The longest wait.
        deadline: Instant,
        /// The client connection it came on (waiting reads are capped per
        /// connection).
        conn: u64,
        /// Where the answer goes.
        reply: ReadReply,
    },
    /// Start a change feed: replay from `from` (if retained), then live.
    Watch {
        /// Key prefix.
        prefix: String,
        /// Resume point.
        from: Option<WatchToken>,
        /// The client connection it came on (watchers are capped per
        /// connection).
        conn: u64,
        /// Where notices go; a full queue ends the feed (the client resumes).
        tx: WatchTx,
    },
    /// Status request.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<NodeStatus>,
    },
    /// Flush, then stop.
    Shutdown,
}

/// Most bytes of value frames one [`watch_frames`] answer carries.
pub const WATCH_BATCH_BYTES: usize = 1 << 20;

/// One encoded frame of a watch stream.
pub struct WatchFrame {
    /// A `Response::Change`, or the `Response::Error` that ends the feed.
    pub bytes: Vec<u8>,
    /// This frame ends the feed.
    pub last: bool,
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
    /// Wall-clock milliseconds since the Unix epoch, as the replica's
    /// hybrid clock reads them.
    fn wall_ms(&self) -> u64 {
        (self.wall_offset_ms.max(0) as u64).saturating_add(self.now().0)
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

/// What serves reads beside the engine: the store as of the last flush and
/// the policy in force, published by the engine after each step. A read
/// then waits for nobody: not for a large operation the engine is applying
/// (a 100,000-element add holds it for about a second), nor for a merge.
pub struct Reads {
    store: StoreReader,
    policy: std::sync::RwLock<Arc<PolicySet>>,
    region: RegionId,
    /// Flushes so far ([`Recent::epoch`]), published after each.
    epoch: std::sync::atomic::AtomicU64,
    /// The engine's replica id (one per process: a life).
    replica: ReplicaId,
}

/// The error for a log position retention has dropped.
fn trimmed(partition: u16, at: u64, first: u64, meta: &LogMeta) -> Error {
    Error::Trimmed(format!(
        "position {at} of partition {partition} was dropped by the log's retention (it now starts at {first}): \
         re-read the state and read on from the log's end, {}",
        meta.end().to_text()
    ))
}

impl Reads {
    /// Reads of `replica`'s store, under its policy as it is now.
    pub fn new(replica: &Replica<SledStore>) -> Reads {
        Reads {
            store: replica.store().reader(),
            policy: std::sync::RwLock::new(Arc::new(replica.policy().clone())),
            region: replica.config().region.clone(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            replica: replica.id(),
        }
    }

    /// Prepares the work of a large write beside the engine ([`Prepared`]):
    /// its keys whose operations carry at least [`PREPARE_MIN_ELEMENTS`]
    /// elements, against their flushed records. Runs for as long as the
    /// engine would (tens of ms at 10^5 elements): call it off the async
    /// workers.
    pub fn prepare_write(&self, ops: &[(Key, Op)]) -> Prepared {
        Prepared::write(self.replica, ops, PREPARE_MIN_ELEMENTS, PREPARE_MAX_BYTES, |k| {
            self.store.record(k)
        })
    }

    /// Prepares the merges of a decoded peer frame beside the engine, like
    /// [`Reads::prepare_write`].
    pub fn prepare_frame(&self, frame: &mut Decoded) {
        frame.prepare(self.replica, PREPARE_MAX_BYTES, |k| self.store.record(k));
    }

    /// The flushes the store holds: a read that starts after this call
    /// sees every change the engine made before the last of them.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// One page of a scan ([`RequestBody::Scan`](lattice_core::proto::client::RequestBody::Scan)) as of the last flush:
    /// the keys after `cursor` starting with `prefix` that this region may
    /// read and that hold something (a deleted key is left out), at most
    /// `limit` of them, examining at most [`SCAN_MAX_EXAMINED`] keys and
    /// [`SCAN_MAX_RECORD_BYTES`] of records, with their values when asked
    /// (within [`ENTRIES_MAX_BYTES`]). Only keys `may_read` allows are
    /// returned (the asker's grants).
    ///
    /// The cursor never names a key the page did not return: it is the
    /// position of the last key returned, or, past keys left out, the end
    /// of the last hash bucket the page saw whole (`k`, the bucket, then
    /// 0xFF, which no UTF-8 key byte reaches), whichever is later; only if
    /// a page saw neither (one bucket's colliding keys filled it) is it the
    /// last examined position, so that paging still moves on. Decodes
    /// records: call it off the async workers.
    pub fn scan(
        &self,
        prefix: &str,
        cursor: Option<&ScanCursor>,
        limit: u32,
        values: bool,
        may_read: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(Vec<Entry>, Option<ScanCursor>), Error> {
        let policy = self
            .policy
            .read()
            .map(|p| p.clone())
            .map_err(|_| Error::Store("policy lock poisoned".into()))?;
        let limit = limit.clamp(1, SCAN_MAX_KEYS) as usize;
        let (mut entries, mut bytes, mut examined, mut record_bytes) = (Vec::new(), 0, 0, 0);
        // The last position examined, the last returned, and the end of the
        // last bucket seen whole.
        let mut last: Option<Vec<u8>> = None;
        let mut returned: Option<Vec<u8>> = None;
        let mut bucket_done: Option<Vec<u8>> = None;
        let bucket_of = |pos: &[u8]| pos.get(..5).map(<[u8]>::to_vec);
        let complete = self
            .store
            .records_after(cursor.map(|c| c.0.as_slice()), &mut |key, pos, record| {
                if let Some(prev) = last.as_deref() {
                    let b = bucket_of(prev);
                    if b.is_some() && b != bucket_of(pos) {
                        bucket_done = b.map(|mut b| {
                            b.push(0xFF);
                            b
                        });
                    }
                }
                if entries.len() >= limit || examined >= SCAN_MAX_EXAMINED || record_bytes >= SCAN_MAX_RECORD_BYTES {
                    return Ok(false);
                }
                examined += 1;
                // Every record sled loaded counts, matching or not.
                record_bytes += record.len();
                if !key.as_str().starts_with(prefix)
                    || policy.check_read(key.as_str(), &self.region).is_err()
                    || !may_read(key.as_str())
                {
                    last = Some(pos.to_vec());
                    return Ok(true);
                }
                let value = lattice_core::store::open_record(&key, &record)?;
                if value.is_empty() {
                    last = Some(pos.to_vec());
                    return Ok(true);
                }
                let entry = Entry {
                    token: values.then(|| CausalToken::of(Some(&value))),
                    value: values.then(|| value.view()),
                    key,
                    error: None,
                };
                let size = lattice_core::proto::client::entry_size(&entry)?;
                // A value that does not fit beside the page's others starts the
                // next page (alone, it fits: values are at most MAX_VALUE_BYTES).
                if !entries.is_empty() && bytes + size > ENTRIES_MAX_BYTES {
                    return Ok(false);
                }
                bytes += size;
                entries.push(entry);
                last = Some(pos.to_vec());
                returned = last.clone();
                Ok(true)
            })?;
        let next = if complete {
            None
        } else {
            // The later of the two positions that name no hidden key (a
            // bucket end sorts after every key of its bucket); else the
            // last examined, so that the scan moves on.
            returned
                .max(bucket_done)
                .or(last)
                .or_else(|| cursor.map(|c| c.0.clone()))
        };
        Ok((entries, next.map(ScanCursor)))
    }

    /// One page of the change log ([`RequestBody::LogRead`](lattice_core::proto::client::RequestBody::LogRead))
    /// as of the last flush: the changes after `from` in `partitions`
    /// (empty: all) of keys starting with `prefix` that this region may
    /// read, at most `limit` (at most [`LOG_MAX_CHANGES`]) within
    /// [`ENTRIES_MAX_BYTES`], examining at most [`SCAN_MAX_EXAMINED`]
    /// changes and [`SCAN_MAX_RECORD_BYTES`]. Partitions are read one after
    /// the other, starting at one that rotates with the cursor so that no
    /// partition starves. Decodes entries: call it off the async workers.
    pub fn log_page(
        &self,
        partitions: &[u16],
        from: Option<&LogCursor>,
        prefix: &str,
        limit: u32,
    ) -> Result<(Vec<Logged>, LogCursor, u16), Error> {
        let policy = self.policy()?;
        let log = self.store.log();
        let Some(meta) = log.meta()? else {
            return Ok((Vec::new(), from.cloned().unwrap_or_default(), 0));
        };
        let n = meta.partitions();
        let mut cursor = match from {
            Some(c) if c.log != 0 && c.log != meta.id => {
                return Err(Error::Trimmed(format!(
                    "the cursor is for log {:016x}, and this node's log is {:016x} (another node, or its data was rebuilt): \
                     re-read the state and read on from the log's end",
                    c.log, meta.id
                )))
            }
            Some(c) => c.clone(),
            None => LogCursor::default(),
        };
        cursor.log = meta.id;
        // The client's positions beyond the log's partitions mean nothing.
        cursor.next.truncate(n as usize);
        let asked: Vec<u16> = if partitions.is_empty() {
            (0..n).collect()
        } else {
            partitions.to_vec()
        };
        for &p in &asked {
            if p >= n {
                return Err(Error::InvalidOp(format!(
                    "partition {p} does not exist: the log has {n}"
                )));
            }
            let (first, next) = (meta.first[p as usize], meta.next[p as usize]);
            let at = match from {
                Some(_) => cursor.get(p),
                None => first,
            };
            if at < first {
                return Err(trimmed(p, at, first, &meta));
            }
            if at > next {
                return Err(Error::InvalidOp(format!(
                    "partition {p} position {at} is past the log's end ({next})"
                )));
            }
            cursor.set(p, at);
        }
        let limit = limit.clamp(1, LOG_MAX_CHANGES) as usize;
        let durable = self.store.log_durable_end();
        let (mut out, mut bytes, mut examined, mut raw_bytes) = (Vec::new(), 0, 0, 0);
        // Positions of partitions not asked for may be anything (u64::MAX):
        // summed, they must not overflow.
        let rotate = (cursor.next.iter().fold(0u64, |s, &n| s.wrapping_add(n)) % asked.len().max(1) as u64) as usize;
        let mut full = false;
        for &p in asked.iter().cycle().skip(rotate).take(asked.len()) {
            if full {
                break;
            }
            let mut expect = cursor.get(p);
            let durable_end = durable.as_ref().and_then(|d| d.get(p as usize).copied());
            let end = log.scan(p, expect, &mut |e, raw_len| {
                if durable_end.is_some_and(|d| e.seq >= d) {
                    // In sled but not yet on disk: a crash could give its
                    // position to another change.
                    return Ok(false);
                }
                if out.len() >= limit || examined >= SCAN_MAX_EXAMINED || raw_bytes >= SCAN_MAX_RECORD_BYTES {
                    full = true;
                    return Ok(false);
                }
                if e.seq != expect {
                    // Retention dropped it since the metadata was read.
                    return Err(trimmed(p, expect, e.seq, &meta));
                }
                expect += 1;
                examined += 1;
                // The entry's stored size, near its encoded size in the answer.
                let size = raw_len + 32;
                raw_bytes += size;
                let key = e.change.key.as_str();
                if !key.starts_with(prefix) || policy.check_read(key, &self.region).is_err() {
                    return Ok(true);
                }
                if !out.is_empty() && bytes + size > ENTRIES_MAX_BYTES {
                    full = true;
                    return Ok(false);
                }
                bytes += size;
                out.push(e);
                Ok(true)
            })?;
            cursor.set(p, end.max(cursor.get(p)));
        }
        Ok((out, cursor, n))
    }

    /// `key` as of `at_ms` on this node's hybrid logical clock: its logged
    /// changes applied by then, joined. Fails with `Error::Trimmed` unless
    /// the log holds the key's whole history here (its oldest retained
    /// change is its first). Reads the key's whole partition: call it off
    /// the async workers.
    pub fn read_at(&self, key: &Key, at_ms: u64) -> Result<Option<Value>, Error> {
        let policy = self.policy()?;
        policy.check_read(key.as_str(), &self.region)?;
        let log = self.store.log();
        let history_lost = || {
            Error::Trimmed(format!(
                "the change log no longer holds the whole history of {key} on this node, so its value at {at_ms} is unknown"
            ))
        };
        let Some(meta) = log.meta()? else {
            return match self.store.get(key)? {
                Some(_) => Err(history_lost()),
                None => Ok(None),
            };
        };
        let p = lattice_core::log::partition_of(key, meta.partitions());
        // Joined as they come: memory is one value, not the key's history.
        let mut state: Option<Value> = None;
        let mut complete = None;
        log.scan(p, meta.first[p as usize], &mut |e, _| {
            if e.change.key == *key {
                if complete.is_none() {
                    complete = Some(e.change.first);
                }
                if e.change.applied.wall_ms <= at_ms {
                    match &mut state {
                        Some(s) => lattice_core::crdt::Crdt::join(s, &e.change.delta),
                        None => state = Some((*e.change.delta).clone()),
                    }
                }
            }
            Ok(true)
        })?;
        match complete {
            Some(true) => Ok(state),
            Some(false) => Err(history_lost()),
            None if self.store.get(key)?.is_some() => Err(history_lost()),
            None => Ok(None),
        }
    }

    /// What a backup of this node reads: its store, its region and the
    /// policy set in force.
    pub fn backup_source(&self) -> Result<(StoreReader, RegionId, Arc<PolicySet>), Error> {
        Ok((self.store.clone(), self.region.clone(), self.policy()?))
    }

    fn policy(&self) -> Result<Arc<PolicySet>, Error> {
        self.policy
            .read()
            .map(|p| p.clone())
            .map_err(|_| Error::Store("policy lock poisoned".into()))
    }

    /// `key` as of the last flush, if the policy lets this region read it.
    /// Every write acknowledged before the read started is in it (writes
    /// are acknowledged after their flush).
    pub fn read(&self, key: &Key) -> Result<Option<Value>, Error> {
        match self.read_record(key)? {
            Some(r) => lattice_core::store::open_record(key, &r).map(Some),
            None => Ok(None),
        }
    }

    /// [`Reads::read`] without decoding: the key's stored record (checked
    /// and decoded by `lattice_core::store::open_record`), so a caller can
    /// decide by the record's length where to decode it. One sled lookup:
    /// cheap when its page is in sled's cache (1 GiB by default); a record
    /// not in it is read from the disk on the calling thread.
    pub fn read_record(&self, key: &Key) -> Result<Option<sled::IVec>, Error> {
        let policy = self
            .policy
            .read()
            .map(|p| p.clone())
            .map_err(|_| Error::Store("policy lock poisoned".into()))?;
        policy.check_read(key.as_str(), &self.region)?;
        self.store.record(key)
    }

    /// Publishes that `epoch` flushes are in the store.
    fn flushed(&self, epoch: u64) {
        self.epoch.store(epoch, std::sync::atomic::Ordering::Release);
    }

    /// Publishes the engine's policy, if it changed. Compared whole, not
    /// by version: a set of the same version with a higher digest replaces
    /// the one in force (conflicting publications converge on it).
    fn publish(&self, now: &PolicySet) {
        let stale = self.policy.read().map_or(true, |p| **p != *now);
        if stale {
            if let Ok(mut p) = self.policy.write() {
                *p = Arc::new(now.clone());
            }
        }
    }
}

/// Most bytes of stored records one scan page decodes.
pub const SCAN_MAX_RECORD_BYTES: usize = 16 << 20;

/// A write whose operations on a key carry at least this many elements
/// ([`Op::elements`]) has that key's work prepared beside the engine: below
/// it the work is cheaper than reading the record a second time.
pub const PREPARE_MIN_ELEMENTS: usize = 1_024;

/// One input's prepared results stop growing at this many bytes
/// ([`Prepared::bytes`]); the rest of its work is left to the engine. With
/// at most [`PREPARING`] writes and one frame per peer stream prepared at
/// once, this bounds the memory preparation holds before the queue charges
/// it (a key's result is at most about 3 x 4 MiB past the cap).
pub const PREPARE_MAX_BYTES: usize = 16 << 20;

/// Writes prepared at once (the others go to the engine unprepared).
pub const PREPARING: usize = 2;

/// Most inputs one engine step takes before it flushes and answers.
const MAX_STEP_INPUTS: usize = 1_024;

/// A step takes no more inputs once it has worked this long: the inputs
/// it took are flushed and answered, and the rest wait for the next step.
/// One input may take longer (a large add or merge, bounded by the value
/// and frame limits); no input waits for more than one such input of each
/// other client connection and peer ahead of it.
const STEP_BUDGET: Duration = Duration::from_millis(20);

/// Nor does it take an input that would bring the bytes it took (requests'
/// and peer frames' lengths) past this: a large write or frame starts a
/// step of its own, so the small inputs before it are answered without
/// waiting for it. Checked before the work, as a time budget cannot be.
const STEP_BYTES: usize = 256 << 10;

/// An engine step at least this long is logged (`slow engine step`, with
/// where its time went): every input queued behind it waited as long.
const SLOW_STEP_MS: u64 = 100;

/// Runs the engine until `Shutdown` or until every sender is gone. Each
/// turn is the same four steps: take inputs (as many as one step may),
/// flush when the durability mode says so, route what the replica
/// produced (frames to peers, answers to clients, notices to watchers),
/// and keep house.
#[allow(clippy::too_many_arguments)]
pub fn run(
    mut replica: Replica<SledStore>,
    clock: Clock,
    durability: Durability,
    group_commit: Duration,
    rx: EngineRx,
    peers: BTreeMap<NodeId, PeerTx>,
    metrics: Arc<Metrics>,
    node: String,
    feed: Feed,
    audit: crate::audit::AuditLog,
    concern_ms: u64,
    wait_limits: WaitLimits,
    reads: Arc<Reads>,
) {
    replica.set_wall_offset(clock.wall_offset_ms);
    let own_region = replica.config().region.clone();
    let mut e = Engine {
        replica,
        clock,
        durability,
        group_commit,
        peers,
        metrics,
        node,
        feed,
        audit,
        concern_ms,
        reads,
        waiting_writes: WaitingWrites::new(wait_limits.concerns_per_conn),
        own_region,
        waits: Waits::new(wait_limits),
        recent: Recent::new(),
        touched: BTreeSet::new(),
        first_unflushed: None,
        stopping: false,
        last_stats: Instant::now(),
    };
    loop {
        let mut step = e.take_inputs(&rx);
        let flushed = e.flush_if_due(&mut step);
        e.route_outputs(flushed);
        e.end_step(&step, &rx);
        if e.stopping && !e.replica.needs_flush() {
            e.close(step.now);
            return;
        }
    }
}

/// What one engine step took.
struct Step {
    /// When it started (its work is measured from here).
    started: Instant,
    /// The engine's time for the inputs it took.
    now: Time,
    /// Inputs taken.
    taken: usize,
    /// The queue was empty when the step stopped taking inputs.
    drained: bool,
    /// The step's work or bytes, not its count, ended it with input still
    /// queued: it is flushed at once (waiting would hold what it took
    /// behind work that is not in it).
    full: bool,
    /// Milliseconds spent on the inputs (before timers and the flush).
    inputs_ms: u64,
    /// ... and up to the end of the flush.
    flushed_ms: u64,
}

/// The engine thread's state: the replica and what the driver keeps
/// around it (waiting writes and reads, the change feed, the tokens of
/// recent changes).
struct Engine {
    replica: Replica<SledStore>,
    clock: Clock,
    durability: Durability,
    group_commit: Duration,
    peers: BTreeMap<NodeId, PeerTx>,
    metrics: Arc<Metrics>,
    node: String,
    feed: Feed,
    audit: crate::audit::AuditLog,
    concern_ms: u64,
    reads: Arc<Reads>,
    waiting_writes: WaitingWrites,
    own_region: RegionId,
    waits: Waits<ReadReply>,
    /// The tokens of keys changed lately, by the flush that stored them.
    recent: Recent,
    /// Keys changed since the last flush: reads waiting on them are checked
    /// once it stored them.
    touched: BTreeSet<Key>,
    first_unflushed: Option<Instant>,
    stopping: bool,
    last_stats: Instant,
}

impl Engine {
    /// Sleeps until the engine's next timer, a group-commit deadline or a
    /// read deadline, unless input arrives first; then takes what else is
    /// queued, so one flush covers a batch. The queue hands out peer frames
    /// and client requests in turn, and each client connection and peer in
    /// turn. Bounded by count, bytes and time: once a step has worked
    /// [`STEP_BUDGET`], what is queued waits for the next step, and what
    /// this step took is flushed and answered now rather than after
    /// everything queued behind it. Then runs the replica's timers.
    fn take_inputs(&mut self, rx: &EngineRx) -> Step {
        let now = self.clock.now();
        let mut wake = self
            .replica
            .poll_timeout()
            .map_or(Instant::now() + Duration::from_millis(100), |t| self.clock.at(t));
        if let Some(t) = self.first_unflushed {
            wake = wake.min(t + self.group_commit);
        }
        if let Some(d) = self.waits.next_deadline() {
            wake = wake.min(d);
        }
        let timeout = wake
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        let mut step_bytes = 0;
        let mut next = match rx.recv_timeout_sized(timeout) {
            Ok((i, size)) => {
                step_bytes = size;
                Some(i)
            }
            Err(RecvError::Timeout) => None,
            Err(RecvError::Disconnected) => {
                self.stopping = true;
                None
            }
        };
        let mut step = Step {
            started: Instant::now(),
            now: self.clock.now().max(now),
            taken: 0,
            drained: next.is_none(),
            full: false,
            inputs_ms: 0,
            flushed_ms: 0,
        };
        loop {
            // The first input was taken above; each next one only after the
            // one before it was worked, so the clock check sees its cost.
            let input = if step.taken == 0 {
                match next.take() {
                    Some(i) => i,
                    None => break,
                }
            } else if step.taken >= MAX_STEP_INPUTS {
                break;
            } else if step.started.elapsed() >= STEP_BUDGET {
                step.drained = rx.is_empty();
                step.full = !step.drained;
                break;
            } else {
                match rx.try_recv_within(STEP_BYTES.saturating_sub(step_bytes)) {
                    Some((i, size)) => {
                        step_bytes += size;
                        i
                    }
                    None => {
                        step.drained = rx.is_empty();
                        step.full = !step.drained;
                        break;
                    }
                }
            };
            step.taken += 1;
            self.handle(step.now, input);
        }
        self.metrics.engine_queue.set(step.taken as i64);
        step.inputs_ms = step.started.elapsed().as_millis() as u64;
        if let Err(e) = self.replica.handle_timeout(step.now) {
            tracing::error!(error = %e, "engine timer failed");
        }
        step
    }

    /// Works one input.
    fn handle(&mut self, now: Time, input: Input) {
        match input {
            Input::Frame { from, frame } => self.on_frame(now, from, frame),
            input @ Input::Write { .. } => self.on_write(now, input),
            Input::Reachable(peer) => {
                if let Err(e) = self.replica.handle_reachable(now, &peer) {
                    tracing::warn!(peer = %peer, error = %e, "reachable: not a peer");
                }
            }
            Input::SetPolicy { set, reply } => {
                let version = set.set.version;
                let result = match self.replica.set_policy(now, set) {
                    Ok(true) => Ok(version),
                    Ok(false) => Err(Error::InvalidPolicy(format!(
                        "version {version} is not newer than the set in force (version {})",
                        self.replica.policy().version
                    ))),
                    Err(e) => Err(e),
                };
                // In force for the reads beside the engine before the
                // admin hears it is: a read sent after the answer must
                // not be served under the set it replaced.
                self.reads.publish(self.replica.policy());
                let _ = reply.send(result);
            }
            Input::Audit { reply } => {
                let _ = reply.send(self.audit.entries());
            }
            Input::Read {
                key,
                after,
                seen,
                deadline,
                conn,
                reply,
            } => self.on_read(key, after, seen, deadline, conn, reply),
            Input::Watch { prefix, from, conn, tx } => self.feed.subscribe(prefix, from, conn, tx),
            Input::Status { reply } => {
                let _ = reply.send(status(&self.replica, now, &self.node));
            }
            Input::Shutdown => self.stopping = true,
        }
    }

    fn on_frame(&mut self, now: Time, from: NodeId, frame: Decoded) {
        self.metrics.peer_frames_in.inc_by(1);
        self.metrics.peer_bytes_in.inc_by(frame.len() as u64);
        if let Err(e) = self.replica.handle_decoded(now, &from, frame) {
            self.metrics.peer_frames_rejected.inc_by(1);
            if matches!(e, Error::CorruptFrame { .. }) {
                // Dropped like a lost frame: retransmission and
                // anti-entropy repair it. Many of these point at
                // faulty hardware on one of the two hosts.
                self.metrics.peer_frames_corrupt.inc_by(1);
            }
            tracing::warn!(peer = %from, error = %e, "refused a peer frame");
        }
    }

    /// Works an [`Input::Write`] (any other input is ignored).
    fn on_write(&mut self, now: Time, input: Input) {
        let Input::Write {
            op_id,
            retry,
            ops,
            prepared,
            concern,
            timeout_ms,
            conn,
            reply,
        } = input
        else {
            return;
        };
        if retry && self.replica.retry_outcome_unknown(now, op_id).unwrap_or(true) {
            let _ = reply.send(Err(Error::OutcomeUnknown));
            return;
        }
        // Before the work: a connection may hold only so many writes
        // waiting for their concern (up to an hour each).
        if concern != WriteConcern::Local && self.waiting_writes.concerns_full(conn) {
            self.metrics.overloaded.inc();
            let _ = reply.send(Err(Error::Overloaded(
                "too many writes of this connection are waiting for their write concern (max_concern_waits_per_connection)",
            )));
            return;
        }
        let timeout_ms = if timeout_ms == 0 {
            self.concern_ms
        } else {
            timeout_ms.min(3_600_000)
        };
        match self
            .replica
            .write_prepared(now, Some(op_id), ops, concern, timeout_ms, prepared)
        {
            Ok((id, duplicate)) => {
                // From the states the write made: no key is read (and
                // decoded) again.
                let token = self.replica.write_tokens().to_vec();
                for (k, t) in &token {
                    self.recent.changed(k.clone(), t.clone());
                    self.touched.insert(k.clone());
                }
                self.metrics.writes.inc_by(1);
                self.waiting_writes.insert(
                    id,
                    WaitingWrite {
                        token,
                        duplicate,
                        reply: Some(reply),
                        concern: (concern != WriteConcern::Local).then_some((concern, timeout_ms)),
                        conn,
                        durable: false,
                        timed_out: None,
                    },
                );
                self.first_unflushed.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                match e {
                    Error::Overloaded(_) => self.metrics.overloaded.inc_by(1),
                    Error::PolicyDenied { .. } => self.metrics.policy_denied.inc_by(1),
                    _ => 0,
                };
                let _ = reply.send(Err(e));
            }
        }
    }

    fn on_read(
        &mut self,
        key: Key,
        after: Option<Arc<CausalToken>>,
        seen: u64,
        deadline: Instant,
        conn: u64,
        reply: ReadReply,
    ) {
        if let Err(e) = self.replica.policy().check_read(key.as_str(), &self.own_region) {
            self.metrics.policy_denied.inc_by(1);
            let _ = reply.send(Err(Some(e)));
            return;
        }
        let Some(token) = after else {
            let _ = reply.send(Ok(ReadAnswer::Ready));
            return;
        };
        let ahead = self.replica.config().max_clock_ahead_ms;
        let read = Waiting {
            key,
            token,
            seen,
            deadline,
            conn,
        };
        wait_for(
            &self.recent,
            &mut self.waits,
            &self.clock,
            ahead,
            &self.metrics,
            read,
            reply,
        );
    }

    /// Flushes when the durability mode says the step's changes are due
    /// (or the engine is stopping); returns whether everything applied is
    /// now stored.
    fn flush_if_due(&mut self, step: &mut Step) -> bool {
        if self.replica.needs_flush() {
            self.first_unflushed.get_or_insert_with(Instant::now);
        }
        let due = match self.durability {
            Durability::Sync | Durability::Async => true,
            // Self-clocking: everything that arrived during the last flush
            // was taken in this step and shares the next one, so waiting
            // longer would only add latency; the same when the step's work
            // or bytes ended it. Only while input keeps queueing past a
            // step's count limit does the flush wait, up to `group_commit`,
            // to cover more.
            Durability::Group => {
                step.drained || step.full || self.first_unflushed.is_some_and(|t| t.elapsed() >= self.group_commit)
            }
        };
        let mut flushed = false;
        if self.replica.needs_flush() && (due || self.stopping) {
            let started = Instant::now();
            let result = self.replica.flush(step.now);
            // The store's flush may have succeeded and only sending the
            // deltas after it failed: then everything is stored (and its
            // writes acknowledged), and the reads and watchers waiting for
            // it must hear so now, not after some later flush.
            flushed = !self.replica.needs_flush();
            if flushed {
                self.metrics.flushes.inc_by(1);
                self.metrics.flush_micros.inc_by(started.elapsed().as_micros() as u64);
                self.first_unflushed = None;
            }
            match result {
                Ok(()) => {}
                Err(e) if flushed => tracing::error!(error = %e, "sending deltas after a flush failed"),
                Err(e) => tracing::error!(error = %e, "flush failed; writes stay unacknowledged"),
            }
        }
        step.flushed_ms = step.started.elapsed().as_millis() as u64;
        flushed
    }

    /// Frames to the peers' queues, events to the clients and watchers
    /// waiting for them, and, after a flush, the reads and watchers that
    /// wait for what it stored.
    fn route_outputs(&mut self, flushed: bool) {
        while let Some(t) = self.replica.poll_transmit() {
            let Some(q) = self.peers.get(&t.to) else { continue };
            self.metrics.peer_frames_out.inc_by(1);
            self.metrics.peer_bytes_out.inc_by(t.payload.len() as u64);
            if !q.try_send(t.payload) {
                // A slow or absent peer: drop, retransmission and
                // anti-entropy repair it; memory stays bounded.
                self.metrics.peer_frames_dropped.inc_by(1);
            }
        }
        while let Some(ev) = self.replica.poll_event() {
            self.on_event(ev);
        }
        if flushed {
            self.recent.flushed();
            self.reads.flushed(self.recent.epoch());
            for (seq, key, origin) in self.replica.store_mut().take_written() {
                self.feed.publish_at(seq, key, origin);
            }
            answer_reads(&self.recent, &mut self.waits, &mut self.touched);
            self.recent.forget_old();
        }
        for reply in self.waits.expired(Instant::now()) {
            let _ = reply.send(Err(None));
        }
        self.reads.publish(self.replica.policy());
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::WriteDurable(id) => {
                let Some(w) = self.waiting_writes.get_mut(&id) else {
                    return;
                };
                w.durable = true;
                if w.concern.is_none() {
                    w.answer(Ok(()));
                } else if let Some(e) = w.timed_out.take() {
                    w.answer(Err(e));
                }
                if w.reply.is_none() {
                    self.waiting_writes.remove(&id);
                }
            }
            Event::WriteReplicated(id) => {
                if let Some(mut w) = self.waiting_writes.remove(&id) {
                    w.answer(Ok(()));
                }
            }
            Event::WriteConcernTimeout(id) => {
                self.metrics.concern_timeouts.inc_by(1);
                let Some(w) = self.waiting_writes.get_mut(&id) else {
                    return;
                };
                let (concern, timeout_ms) = w.concern.unwrap_or((WriteConcern::Local, 0));
                let e = Error::ReplicationTimeout {
                    concern: concern.to_string(),
                    timeout_ms,
                };
                if w.durable {
                    w.answer(Err(e));
                    self.waiting_writes.remove(&id);
                } else {
                    // Answered once durable here: the error says so.
                    w.timed_out = Some(e);
                }
            }
            Event::PolicyAdopted {
                policy,
                signature,
                from,
            } => {
                let source = from.map_or_else(|| "admin".to_string(), |p| format!("peer {p}"));
                if let Err(e) = self.audit.append(&self.node, &source, policy, signature) {
                    tracing::error!(error = %e, "could not append to the policy audit log");
                }
            }
            Event::RemoteApplied {
                key,
                from: _,
                token,
                written,
            } => {
                self.metrics.remote_updates.inc_by(1);
                if let Some(w) = written {
                    // Clamped at 0: a writer whose clock runs ahead of ours
                    // would otherwise give a negative latency.
                    let ms = self.clock.wall_ms().saturating_sub(w.wall_ms);
                    self.metrics.propagation.observe(ms as f64 / 1000.0);
                }
                // Applied before this step's flush, if it had one: the
                // flush is counted once every change it stored is
                // recorded (`route_outputs`).
                self.recent.changed(key.clone(), token);
                self.touched.insert(key.clone());
            }
        }
    }

    /// Logs a slow step, and every 200 ms records the gauges and drops
    /// what waits for clients that went away.
    fn end_step(&mut self, step: &Step, rx: &EngineRx) {
        let step_ms = step.started.elapsed().as_millis() as u64;
        self.metrics
            .engine_busy_micros
            .inc_by(step.started.elapsed().as_micros() as u64);
        if step_ms >= SLOW_STEP_MS {
            self.metrics.engine_slow_steps.inc();
            // Everything queued behind this step waited this long.
            tracing::info!(
                step_ms,
                inputs = step.taken,
                inputs_ms = step.inputs_ms,
                timers_and_flush_ms = step.flushed_ms.saturating_sub(step.inputs_ms),
                "slow engine step"
            );
        }
        if self.last_stats.elapsed() < Duration::from_millis(200) {
            return;
        }
        let m = &self.metrics;
        m.record_engine(&self.replica, step.now);
        for (peer, q) in &self.peers {
            m.record_queue(&peer.0, q.queued_bytes());
        }
        // Watchers whose client went away, even if nothing they watch
        // changes again.
        self.feed.prune();
        // And reads whose client went away (the stream task dropped its
        // reply channel), rather than at their deadline.
        self.waits.prune(|r| r.is_closed());
        // And writes waiting for their concern whose client went away (up
        // to an hour each otherwise): the writes stay durable here and keep
        // replicating; only the wait ends.
        for id in self.waiting_writes.departed() {
            self.replica.forget_concern(id);
        }
        m.concern_waits.set(self.waiting_writes.concern_waits() as i64);
        m.waiting_writes.set(self.waiting_writes.writes.len() as i64);
        m.watchers.set(self.feed.watchers() as i64);
        m.waiting_reads.set(self.waits.len() as i64);
        m.waiting_read_bytes.set(self.waits.bytes() as i64);
        m.feed_bytes.set(self.feed.retained_bytes() as i64);
        let log = self.replica.store().log_meta();
        m.log_bytes.set(log.bytes as i64);
        m.log_changes
            .set(log.next.iter().zip(&log.first).map(|(n, f)| n - f).sum::<u64>() as i64);
        m.log_trimmed.inc_by(log.trimmed().saturating_sub(m.log_trimmed.get()));
        let (peer_bytes, client_bytes) = rx.queued_bytes();
        m.engine_peer_bytes.set(peer_bytes as i64);
        m.engine_client_bytes.set(client_bytes as i64);
        self.last_stats = Instant::now();
    }

    /// After the last flush: a clean close (an `async` store keeps its
    /// replica id) and the feed written for the next start.
    fn close(self, now: Time) {
        self.metrics.record_engine(&self.replica, now);
        if let Err(e) = self.replica.close(now) {
            tracing::error!(error = %e, "closing the store failed; the next start takes a new replica id");
        }
        self.feed.close_marker();
        tracing::info!("engine stopped");
    }
}

/// A read whose token the store beside the engine lacked.
struct Waiting {
    key: Key,
    token: Arc<CausalToken>,
    /// The flush after which it read the store.
    seen: u64,
    deadline: Instant,
    conn: u64,
}

/// A read with a token: sent back to the store beside the engine if a
/// change since it read includes the token, refused if the token is from
/// the future or a limit is reached, otherwise waiting. Decided from the
/// tokens of recent changes, without reading the value.
fn wait_for(
    recent: &Recent,
    waits: &mut Waits<ReadReply>,
    clock: &Clock,
    max_ahead_ms: u64,
    metrics: &Metrics,
    read: Waiting,
    reply: ReadReply,
) {
    // No clock here will reach a timestamp further ahead than the allowed
    // skew within a read's wait: refuse it rather than hold a slot.
    let now_ms = clock.wall_ms();
    if let Some(wall_ms) = read
        .token
        .wall_ms()
        .filter(|w| *w > now_ms.saturating_add(max_ahead_ms))
    {
        let _ = reply.send(Err(Some(Error::TokenFromFuture { wall_ms, now_ms })));
        return;
    }
    match recent.check(&read.key, &read.token, read.seen) {
        Seen::Ready => {
            let _ = reply.send(Ok(ReadAnswer::Ready));
        }
        Seen::Recheck => {
            let _ = reply.send(Ok(ReadAnswer::Recheck));
        }
        // A change not flushed yet includes it: the key is among those
        // checked after the flush.
        Seen::AfterFlush | Seen::Wait => {
            // At a limit, reads whose client went away since the last
            // prune give their slots up first.
            let added = waits.add_or_prune(read.key, read.token, read.deadline, read.conn, reply, |r| r.is_closed());
            if let Err((refused, reply)) = added {
                metrics.overloaded.inc();
                let why = match refused {
                    Refused::Total(_) => "too many reads are waiting for their causal token on this node (max_waiting_reads): retry later or elsewhere",
                    Refused::PerConn(_) => "too many reads of this connection are waiting for their causal token (max_waiting_reads_per_connection)",
                    Refused::Bytes(_) => "the reads waiting for their causal token hold too many bytes on this node (waiting_read_bytes): retry later or elsewhere",
                };
                let _ = reply.send(Err(Some(Error::Overloaded(why))));
            }
        }
    }
}

/// After a flush: tells the reads waiting on the keys it stored whose
/// tokens their states now include to read them beside the engine.
fn answer_reads(recent: &Recent, waits: &mut Waits<ReadReply>, touched: &mut BTreeSet<Key>) {
    for key in std::mem::take(touched) {
        if !waits.waits_on(&key) {
            continue;
        }
        let ready = match recent.token(&key) {
            Some(now) => waits.ready(&key, |t| now.includes(t)),
            // Not kept (cannot happen before `forget_old`): let them look.
            None => waits.ready(&key, |_| true),
        };
        for reply in ready {
            let _ = reply.send(Ok(ReadAnswer::Ready));
        }
    }
}

/// The frames of the first of `notices`, each with its key's value as of
/// the last flush (which stored the change the notice is for), up to about
/// [`WATCH_BATCH_BYTES`] (at least one frame), and how many notices they
/// cover. Served beside the engine. A key this region may no longer read
/// (the policy changed since) is left out.
pub fn watch_frames(reads: &Reads, notices: &[Notice]) -> (Vec<WatchFrame>, usize) {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut used = 0;
    for n in notices {
        if bytes >= WATCH_BATCH_BYTES {
            break;
        }
        used += 1;
        let (response, last) = match reads.read(&n.key) {
            Ok(v) => (
                Response::Change(Change {
                    key: n.key.clone(),
                    value: v.as_ref().map(Value::view),
                    origin: n.origin.clone(),
                    token: n.token,
                }),
                false,
            ),
            Err(Error::PolicyDenied { .. }) => continue,
            Err(e) => (Response::Error(ClientError::from(&e)), true),
        };
        // Never skip a change silently: the watcher is told, and stops.
        let frame = match encode_answer(&response) {
            Ok(bytes) => WatchFrame { bytes, last },
            Err(e) => match encode_answer(&Response::Error(ClientError {
                kind: ErrorKind::InvalidRequest,
                message: format!("a change is too large for one client frame: {e}"),
                regions: Vec::new(),
            })) {
                Ok(bytes) => WatchFrame { bytes, last: true },
                Err(_) => break,
            },
        };
        bytes += frame.bytes.len();
        let last = frame.last;
        out.push(frame);
        if last {
            break;
        }
    }
    (out, used)
}

/// The client writes waiting for their answers, and how many writes of each
/// connection wait for their concern.
struct WaitingWrites {
    writes: BTreeMap<WriteId, WaitingWrite>,
    /// Writes waiting for their concern, per connection (none at 0).
    concerns: BTreeMap<u64, usize>,
    concerns_per_conn: usize,
}

impl WaitingWrites {
    fn new(concerns_per_conn: usize) -> Self {
        WaitingWrites {
            writes: BTreeMap::new(),
            concerns: BTreeMap::new(),
            concerns_per_conn,
        }
    }

    /// `conn` holds as many writes waiting for their concern as it may.
    fn concerns_full(&self, conn: u64) -> bool {
        self.concerns.get(&conn).is_some_and(|n| *n >= self.concerns_per_conn)
    }

    /// Writes waiting for their concern, all connections.
    fn concern_waits(&self) -> usize {
        self.concerns.values().sum()
    }

    fn insert(&mut self, id: WriteId, w: WaitingWrite) {
        if w.concern.is_some() {
            *self.concerns.entry(w.conn).or_default() += 1;
        }
        if let Some(old) = self.writes.insert(id, w) {
            self.released(&old);
        }
    }

    fn get_mut(&mut self, id: &WriteId) -> Option<&mut WaitingWrite> {
        self.writes.get_mut(id)
    }

    fn remove(&mut self, id: &WriteId) -> Option<WaitingWrite> {
        let w = self.writes.remove(id)?;
        self.released(&w);
        Some(w)
    }

    fn released(&mut self, w: &WaitingWrite) {
        if w.concern.is_none() {
            return;
        }
        if let Some(n) = self.concerns.get_mut(&w.conn) {
            *n -= 1;
            if *n == 0 {
                self.concerns.remove(&w.conn);
            }
        }
    }

    /// Drops the writes durable here that wait only for their concern and
    /// whose client went away; returns their ids. (One not yet durable is
    /// kept: its flush still publishes it to watchers.)
    fn departed(&mut self) -> Vec<WriteId> {
        let gone: Vec<WriteId> = self
            .writes
            .iter()
            .filter(|(_, w)| w.durable && w.concern.is_some() && w.reply.as_ref().is_some_and(|r| r.is_closed()))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }
}

/// A client write waiting for its answer.
struct WaitingWrite {
    token: Vec<(Key, CausalToken)>,
    duplicate: bool,
    /// Taken when answered.
    reply: Option<WriteReply>,
    /// Its write concern beyond `local`, and its timeout.
    concern: Option<(WriteConcern, u64)>,
    /// The client connection it came on.
    conn: u64,
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
                lag_ms: p.lag_ms,
            })
            .collect(),
        policy_version: replica.policy().version,
        policies: replica.policy_status(now),
        conflicts: replica
            .stats()
            .conflicts
            .iter()
            .map(|(keyspace, c)| KeyspaceConflicts::of(keyspace, c))
            .collect(),
        access: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::policy::{Policy, Priority, Regions};
    use lattice_core::replica::ReplicaConfig;
    use rand::SeedableRng;

    /// Conflicting publications of one version converge on the set with the
    /// higher digest (`PolicySet::is_superseded_by`). The reads beside the
    /// engine took a new set only when its version changed, so a node that
    /// adopted the winning set of the same version kept serving, for ever,
    /// keys that set quarantines away from its region.
    /// A client write for [`WaitingWrites`], with the receiver of its answer.
    #[allow(clippy::type_complexity)]
    fn waiting_write(
        conn: u64,
        concern: bool,
    ) -> (
        WaitingWrite,
        oneshot::Receiver<Result<(Vec<(Key, CausalToken)>, bool), Error>>,
    ) {
        let (tx, rx) = oneshot::channel();
        let w = WaitingWrite {
            token: Vec::new(),
            duplicate: false,
            reply: Some(tx),
            concern: concern.then_some((WriteConcern::All, 60_000)),
            conn,
            durable: false,
            timed_out: None,
        };
        (w, rx)
    }

    /// Writes waiting for their concern are counted per connection, and
    /// every way a write leaves (answered and dropped, removed, departed)
    /// gives its count back; writes without a concern are not counted.
    #[test]
    fn concern_waits_are_counted_per_connection_and_given_back() {
        let mut ws = WaitingWrites::new(2);
        let mut rxs = Vec::new();
        for (id, conn, concern) in [(1, 7, true), (2, 7, false), (3, 7, true), (4, 8, true)] {
            let (w, rx) = waiting_write(conn, concern);
            ws.insert(WriteId(id), w);
            rxs.push(rx);
        }
        assert!(ws.concerns_full(7), "two concern writes of connection 7 wait");
        assert!(!ws.concerns_full(8));
        assert!(!ws.concerns_full(9));
        assert_eq!(ws.concern_waits(), 3);
        // Answered (a timeout once durable) and dropped.
        let w = ws.get_mut(&WriteId(1)).unwrap();
        w.durable = true;
        w.answer(Err(Error::Overloaded("x")));
        ws.remove(&WriteId(1));
        assert!(!ws.concerns_full(7));
        assert_eq!(ws.concern_waits(), 2);
        // The write without a concern leaves: nothing changes.
        ws.get_mut(&WriteId(2)).unwrap().answer(Ok(()));
        ws.remove(&WriteId(2));
        assert_eq!(ws.concern_waits(), 2);
        // Replicated.
        assert!(ws.remove(&WriteId(3)).is_some());
        assert!(ws.remove(&WriteId(3)).is_none());
        assert_eq!(ws.concern_waits(), 1);
        assert!(!ws.concerns.contains_key(&7), "no entry at 0");
        ws.remove(&WriteId(4));
        assert_eq!(ws.concern_waits(), 0);
        assert!(ws.writes.is_empty() && ws.concerns.is_empty());
    }

    /// Only writes durable here, with a concern, whose client went away end
    /// with their client: one not durable yet must stay, as its flush still
    /// publishes its keys to watchers (and answers nobody); one whose client
    /// still waits must stay.
    #[test]
    fn departed_drops_only_durable_concern_waits_of_clients_that_left() {
        let mut ws = WaitingWrites::new(10);
        let (durable_gone, rx1) = waiting_write(1, true);
        let (unflushed_gone, rx2) = waiting_write(1, true);
        let (durable_here, _rx3) = waiting_write(1, true);
        ws.insert(WriteId(1), durable_gone);
        ws.insert(WriteId(2), unflushed_gone);
        ws.insert(WriteId(3), durable_here);
        ws.get_mut(&WriteId(1)).unwrap().durable = true;
        ws.get_mut(&WriteId(3)).unwrap().durable = true;
        assert!(ws.departed().is_empty(), "every client still waits");
        drop((rx1, rx2));
        assert_eq!(ws.departed(), vec![WriteId(1)]);
        assert_eq!(ws.concern_waits(), 2);
        assert!(ws.get_mut(&WriteId(2)).is_some());
        assert!(ws.get_mut(&WriteId(3)).is_some());
        // Once durable, the one whose client left goes too.
        ws.get_mut(&WriteId(2)).unwrap().durable = true;
        assert_eq!(ws.departed(), vec![WriteId(2)]);
        assert_eq!(ws.concern_waits(), 1);
        assert!(!ws.concerns_full(1));
    }

    #[test]
    fn reads_beside_the_engine_take_a_set_of_the_same_version_with_a_higher_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), "n1", Durability::Sync).unwrap();
        let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let admin = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let mut rc = ReplicaConfig::new("n1", "us", vec![]);
        rc.policy_keys = lattice_core::policy::signed::TrustedKeys::new(vec![admin.verifying_key().to_bytes()]);
        let mut r = Replica::open(rc, store, rng, Time(0)).unwrap();
        let sign = |s| lattice_core::policy::signed::SignedPolicySet::sign(s, &admin).unwrap();
        let key = Key::new("q/x").unwrap();
        r.write(Time(1), vec![(key.clone(), Op::CounterAdd(1))]).unwrap();
        r.flush(Time(2)).unwrap();
        let reads = Reads::new(&r);
        // Two sets of version 2: one lets every region hold `q/`, the other
        // keeps it in eu. Adopt the lower first, then the higher.
        let open = PolicySet::new(2, vec![Policy::new("q/", Regions::All, Priority::Bulk)]).unwrap();
        let quarantine = PolicySet::new(
            2,
            vec![Policy::new("q/", Regions::Local, Priority::Normal).writers(vec![RegionId::from("eu")])],
        )
        .unwrap();
        let (first, second, forbids) = if open.is_superseded_by(&quarantine) {
            (open, quarantine, true)
        } else {
            (quarantine, open, false)
        };
        assert!(r.set_policy(Time(3), sign(first)).unwrap());
        reads.publish(r.policy());
        assert_eq!(reads.read(&key).is_err(), !forbids, "the first set is in force");
        assert!(r.set_policy(Time(4), sign(second)).unwrap(), "the higher digest wins");
        reads.publish(r.policy());
        assert_eq!(
            reads.read(&key).is_err(),
            forbids,
            "the second set is in force beside the engine"
        );
        assert_eq!(
            r.policy().check_read(key.as_str(), &RegionId::from("us")).is_err(),
            forbids,
            "as in the engine"
        );
    }

    /// A node's store with `n` counters written one change each, in one
    /// log partition, as the reads beside the engine see it.
    fn one_partition_replica(dir: &std::path::Path, n: usize) -> Replica<SledStore> {
        // No age limit: the changes are stamped with the test's clock (1970).
        let settings = crate::changelog::LogSettings {
            partitions: 1,
            retention_age_ms: 0,
            ..Default::default()
        };
        let store = SledStore::open_with_log(dir, "n1", Durability::Sync, settings).unwrap();
        let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let mut r = Replica::open(ReplicaConfig::new("n1", "us", vec![]), store, rng, Time(0)).unwrap();
        for start in (0..n).step_by(1_000) {
            let ops = (start..(start + 1_000).min(n))
                .map(|i| (Key::new(format!("l/{i}")).unwrap(), Op::CounterAdd(1)))
                .collect();
            r.write(Time(1), ops).unwrap();
            r.flush(Time(2)).unwrap();
        }
        r
    }

    /// Retention may drop a partition's oldest changes between the page's
    /// read of the log's metadata and its scan: the reader is told its
    /// position is gone instead of being handed the changes after the gap
    /// as if nothing were missing.
    #[test]
    fn a_log_page_whose_start_was_dropped_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let r = one_partition_replica(dir.path(), 10);
        let reads = Reads::new(&r);
        let (all, _, _) = reads.log_page(&[], None, "l/", 100).unwrap();
        assert_eq!(all.len(), 10);
        // What a trim does to the entries, without its metadata: as if it
        // ran after the page read the metadata.
        r.store()
            .tree()
            .remove(crate::changelog::entry_key(0, all[0].seq))
            .unwrap();
        let e = reads.log_page(&[], None, "l/", 100).unwrap_err();
        assert!(matches!(e, Error::Trimmed(_)), "{e}");
    }

    /// A key whose oldest changes retention dropped has no point-in-time
    /// value (joining what is left would be a state it never had); a key
    /// whose whole history is retained has one.
    #[test]
    fn read_at_refuses_a_key_whose_first_change_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::changelog::LogSettings {
            partitions: 1,
            retention_bytes: 4_096,
            retention_age_ms: 0,
        };
        let store = SledStore::open_with_log(dir.path(), "n1", Durability::Sync, settings).unwrap();
        let rng = Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let mut r = Replica::open(ReplicaConfig::new("n1", "us", vec![]), store, rng, Time(0)).unwrap();
        let (old, new) = (Key::new("old").unwrap(), Key::new("new").unwrap());
        for t in 1..200 {
            r.write(Time(t), vec![(old.clone(), Op::CounterAdd(1))]).unwrap();
            r.flush(Time(t)).unwrap();
        }
        for t in 200..203 {
            r.write(Time(t), vec![(new.clone(), Op::CounterAdd(1))]).unwrap();
            r.flush(Time(t)).unwrap();
        }
        let reads = Reads::new(&r);
        let e = reads.read_at(&old, u64::MAX).unwrap_err();
        assert!(matches!(e, Error::Trimmed(_)), "{e}");
        assert_eq!(
            reads.read_at(&new, u64::MAX).unwrap().map(|v| v.view()),
            Some(lattice_core::crdt::ValueView::Counter(3))
        );
    }

    /// A point-in-time read scans its key's whole partition: how long it
    /// takes at 100,000 changes in one partition (run with --ignored
    /// --nocapture; see the report).
    #[test]
    #[ignore]
    fn read_at_cost_of_a_partition_of_100k_changes() {
        let dir = tempfile::tempdir().unwrap();
        let r = one_partition_replica(dir.path(), 100_000);
        let reads = Reads::new(&r);
        let started = std::time::Instant::now();
        let v = reads.read_at(&Key::new("l/5").unwrap(), u64::MAX).unwrap();
        eprintln!("read_at over 100,000 changes: {:?} ({v:?})", started.elapsed());
    }

    /// A cursor is the client's: positions of partitions it does not ask
    /// for, or past the log's partitions, may be anything (u64::MAX), and
    /// are neither summed into an overflow nor handed back.
    #[test]
    fn a_log_page_takes_a_hostile_cursor_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let r = one_partition_replica(dir.path(), 10);
        let reads = Reads::new(&r);
        let (_, end, n) = reads.log_page(&[], None, "", 100).unwrap();
        assert_eq!(n, 1);
        let mut hostile = LogCursor {
            log: end.log,
            next: vec![u64::MAX; lattice_core::log::MAX_PARTITIONS as usize],
        };
        hostile.next[0] = 0;
        let (page, next, _) = reads.log_page(&[0], Some(&hostile), "", 100).unwrap();
        assert_eq!(page.len(), end.next[0] as usize);
        assert_eq!(next.next, end.next, "only the log's own partitions come back");
        // Past the end of an asked partition: refused, not a panic.
        hostile.next[0] = u64::MAX;
        let e = reads.log_page(&[0], Some(&hostile), "", 100).unwrap_err();
        assert!(matches!(e, Error::InvalidOp(_)), "{e}");
    }

    /// A flush is in sled, where readers see it, before its fsync ends; a
    /// crash in between loses changes whose positions the next life
    /// numbers again. A log page holds only changes on disk.
    #[test]
    fn a_log_page_stops_at_the_changes_on_disk() {
        use lattice_core::store::{Store as _, WriteBatch};
        let dir = tempfile::tempdir().unwrap();
        let mut r = one_partition_replica(dir.path(), 10);
        let reads = Reads::new(&r);
        let (all, end, _) = reads.log_page(&[], None, "", 100).unwrap();
        assert_eq!(all.len(), 10);
        let again = WriteBatch {
            changes: vec![all[0].change.clone()],
            ..WriteBatch::default()
        };
        r.store_mut().apply(again).unwrap();
        r.store_mut().apply_without_sync().unwrap();
        let (more, at, _) = reads.log_page(&[], Some(&end), "", 100).unwrap();
        assert!(more.is_empty(), "a change not on disk yet was read");
        assert_eq!(at, end);
        r.store_mut().sync().unwrap();
        let (more, _, _) = reads.log_page(&[], Some(&end), "", 100).unwrap();
        assert_eq!(more.len(), 1);
    }
}
