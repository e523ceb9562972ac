//! The discrete-event runner: one thread, virtual time, one seeded random
//! source. Every node is the real engine on a [`MemoryStore`]; every message
//! goes through the real codec.

use crate::check::{self, Violation};
use crate::config::SimConfig;
use crate::faults::{schedule, FaultAction};
use crate::net::Network;
use crate::workload::{OpRecord, Planned, Workload};
use lattice_core::crdt::{Op, Value, ValueView};
use lattice_core::proto::NodeId;
use lattice_core::replica::{Decoded, Event, PeerConfig, Prepared, Replica, ReplicaConfig, Time, WriteId};
use lattice_core::store::{MemoryStore, Store};
use lattice_core::Key;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

/// How long the cluster idles after converging before buffers are checked.
const QUIET_MS: u64 = 10_000;

/// Up to this many keys in a sender's store, the leak checker recomputes
/// every anti-entropy digest it sends.
const LEAK_SCAN_KEYS: usize = 2_000;

/// Over `LEAK_SCAN_KEYS`, the least time between two such recomputations
/// for one sender.
const LEAK_SCAN_EVERY_MS: u64 = 1_000;

#[derive(Debug)]
enum Ev {
    Deliver {
        from: usize,
        to: usize,
        payload: Vec<u8>,
        /// A bit of the payload was flipped on the way.
        flipped: bool,
    },
    Timer {
        node: usize,
        token: u64,
    },
    Flush {
        node: usize,
        token: u64,
    },
    /// The `async` store's background writer.
    DiskSync {
        node: usize,
        token: u64,
    },
    Client,
    Fault(FaultAction),
    Heal,
    Check,
    PolicyChange,
}

impl Ev {
    fn code(&self) -> u8 {
        match self {
            Ev::Deliver { .. } => 1,
            Ev::Timer { .. } => 2,
            Ev::Flush { .. } => 3,
            Ev::Client => 4,
            Ev::Fault(_) => 5,
            Ev::Heal => 6,
            Ev::Check => 7,
            Ev::PolicyChange => 8,
            Ev::DiskSync { .. } => 10,
        }
    }
    fn node(&self) -> Option<usize> {
        match self {
            Ev::Deliver { to, .. } => Some(*to),
            Ev::Timer { node, .. } | Ev::Flush { node, .. } | Ev::DiskSync { node, .. } => Some(*node),
            _ => None,
        }
    }
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct SimNode {
    cfg: ReplicaConfig,
    replica: Option<Replica<MemoryStore>>,
    /// The store while the node is down.
    parked: Option<MemoryStore>,
    /// A copy of its disk taken earlier, for a rollback, with the key of a
    /// record that had rotted on it (a copy of a down node's disk).
    snapshot: Option<(MemoryStore, Option<Key>)>,
    token: u64,
    paused_until: u64,
    skew_ms: i64,
    timer_at: Option<u64>,
    flush_scheduled: bool,
    /// When the node last started (its current life).
    life_start: u64,
    /// When it last lost its disk.
    wiped_at: Option<u64>,
    /// The key whose stored record rotted while the node was down: its
    /// next open must refuse the store.
    rotted: Option<Key>,
    /// Per key, the value a client last read here in this life (for the
    /// monotonic-reads check).
    last_read: BTreeMap<Key, Value>,
    /// Per key, the records of writes made here (for read-your-writes on
    /// every later read).
    writes: BTreeMap<Key, Vec<usize>>,
    /// Per key, its record before the last write made here in this life
    /// (`None`: absent): what a stale prepared result is computed from.
    old_records: BTreeMap<Key, Option<Arc<[u8]>>>,
}

/// The outcome of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Nodes, regions and fault mix.
    pub setup: String,
    /// Events processed.
    pub events: u64,
    /// Messages sent between nodes.
    pub messages: u64,
    /// Bytes sent between nodes.
    pub bytes: u64,
    /// Messages and bytes by kind.
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Client operations attempted.
    pub ops: usize,
    /// Writes the engine accepted.
    pub applied: usize,
    /// Writes acknowledged (durable).
    pub acked: usize,
    /// Multi-key client writes issued, and how many the engine accepted
    /// (their ops count one by one in `applied` and `acked`).
    pub batches: (u64, u64),
    /// Accepted batches of mixed sizes: a value of at least 1 KiB (or an
    /// eighth of a frame, in smaller frames) beside at least two small ops
    /// (at most 64 bytes of payload) in other keys.
    pub mixed_batches: u64,
    /// The largest value (bytes of payload) one of those batches carried.
    pub batch_largest: usize,
    /// Why the batches the engine refused were refused (each refusal is
    /// checked to have changed none of the batch's keys).
    pub batch_refusals: BTreeMap<&'static str, u64>,
    /// Distinct keys held at the end (the largest store of any node).
    pub keys_held: usize,
    /// Crashes, disk losses (including stores refused for bit rot).
    pub crashes: (u64, u64),
    /// Restarts from an older disk image (counted among disk losses too).
    pub rollbacks: u64,
    /// Hostile values peers sent (each must be refused).
    pub hostile_sent: u64,
    /// Frames delivered with a flipped bit, and how many of them the
    /// receiver refused (must be all).
    pub flipped_frames: (u64, u64),
    /// Stored records rotted while their node was down, and how many
    /// reopens refused them (must be all).
    pub rotted_records: (u64, u64),
    /// Prepared results the engines took as their own, and those they
    /// found stale and computed again.
    pub prepared: (u64, u64),
    /// Time from the heal until all replicas were identical.
    pub converged_ms: Option<u64>,
    /// Write-to-everywhere latency: p50, p99, max (ms), over writes that
    /// reached every node.
    pub propagation: Option<(u64, u64, u64)>,
    /// Encoded size of the joined states of every key on which live nodes
    /// differed when the network healed: what must cross at least once.
    pub diff_bytes_at_heal: u64,
    /// Writes acknowledged with `regions(2)` whose copies were checked.
    pub concerns_checked: usize,
    /// Hash of the whole event trace: equal for equal seeds.
    pub trace: String,
    /// Broken invariants.
    pub violations: Vec<Violation>,
}

impl Report {
    /// The one-paragraph summary `lattice-sim run` prints.
    pub fn summary(&self) -> String {
        let per = |x: u64| {
            if self.applied == 0 {
                0.0
            } else {
                x as f64 / self.applied as f64
            }
        };
        let prop = self
            .propagation
            .map_or("n/a".into(), |(a, b, c)| format!("{a}/{b}/{c}"));
        let conv = self.converged_ms.map_or("never".into(), |c| format!("{c}ms"));
        format!(
            "seed={} {}\nevents={} ops={} applied={} acked={} batches={}/{} accepted{} mixed={} largest_batch_value={}B keys_held={} crashes={} disk_losses={} rollbacks={} hostile={} flipped_frames={}/{} refused, rotted_records={}/{} refused prepared={}/{} stale\nmessages={} bytes={} msgs_per_write={:.2} bytes_per_write={:.0}\npropagation_ms p50/p99/max={} converged_after_heal={}\ntrace={}\nverdict={}",
            self.seed,
            self.setup,
            self.events,
            self.ops,
            self.applied,
            self.acked,
            self.batches.1,
            self.batches.0,
            if self.batch_refusals.is_empty() {
                String::new()
            } else {
                let r: Vec<String> = self.batch_refusals.iter().map(|(k, n)| format!("{k}:{n}")).collect();
                format!(" (refused {})", r.join(","))
            },
            self.mixed_batches,
            self.batch_largest,
            self.keys_held,
            self.crashes.0,
            self.crashes.1,
            self.rollbacks,
            self.hostile_sent,
            self.flipped_frames.1,
            self.flipped_frames.0,
            self.rotted_records.1,
            self.rotted_records.0,
            self.prepared.0,
            self.prepared.1,
            self.messages,
            self.bytes,
            per(self.messages),
            per(self.bytes),
            prop,
            conv,
            self.trace,
            if self.violations.is_empty() { "ok".to_string() } else { format!("{} violation(s)", self.violations.len()) }
        )
    }
}

/// One simulation.
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    /// Draws bit flips and bit rot: a stream of its own, so runs without
    /// corruption faults replay exactly as before they existed.
    corrupt_rng: ChaCha8Rng,
    /// Draws which writes are mixed batches and what they carry: a stream
    /// of its own, so seeds without batches replay exactly as before.
    batch_rng: ChaCha8Rng,
    /// Draws which writes and frames come with prepared results, and from
    /// which record: a stream of its own, so runs replay as before.
    prepare_rng: ChaCha8Rng,
    /// Per node, when the leak checker last scanned its store.
    leak_scan_at: Vec<Option<u64>>,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    now: u64,
    net: Network,
    nodes: Vec<SimNode>,
    ids: BTreeMap<NodeId, usize>,
    workload: Workload,
    records: Vec<OpRecord>,
    /// Writes waiting for durability, with the records of their ops.
    pending: BTreeMap<(usize, u64, WriteId), Vec<usize>>,
    /// Writes sent with write concern `regions(2)`, until replicated.
    concerned: BTreeMap<(usize, u64, WriteId), Vec<usize>>,
    /// When a disk was last destroyed.
    last_wipe: Option<u64>,
    /// When a node last crashed (or lost its disk).
    last_crash: Option<u64>,
    /// When the replicas converged after the heal (the quiet phase began).
    quiet_since: Option<u64>,
    unseen: BTreeMap<Key, BTreeSet<usize>>,
    healed_at: Option<u64>,
    /// How long after the heal the replicas have to converge.
    converge_deadline_ms: u64,
    done: bool,
    trace: blake3::Hasher,
    /// Print every delivered frame, write and crash (`LATTICE_SIM_TRACE=1`).
    trace_log: bool,
    report: Report,
}

/// An empty store of the run's durability mode.
fn new_store(cfg: &SimConfig) -> MemoryStore {
    if cfg.async_disk_ms.is_some() && cfg.lying_flush {
        MemoryStore::new_lying()
    } else if cfg.async_disk_ms.is_some() {
        MemoryStore::new_async()
    } else {
        MemoryStore::new()
    }
}

/// A short name for why a write was refused.
fn refusal_name(e: &lattice_core::Error) -> &'static str {
    use lattice_core::Error as E;
    match e {
        E::PolicyDenied { .. } => "policy",
        E::TypeMismatch { .. } | E::FieldTypeMismatch { .. } => "type",
        E::ValueTooLarge { .. } => "value_too_large",
        E::MessageTooLarge { .. } => "batch_too_large",
        E::Overloaded(_) => "overloaded",
        _ => "other",
    }
}

/// A write's ops, for a violation's detail.
fn describe_write(recs: &[OpRecord]) -> String {
    let ops: Vec<String> = recs
        .iter()
        .map(|r| {
            let op: String = format!("{:?}", r.op).chars().take(120).collect();
            format!("{op} on {}", r.key)
        })
        .collect();
    ops.join(", ")
}

fn node_name(i: usize) -> NodeId {
    NodeId(format!("n{i}"))
}

impl Sim {
    /// Builds the cluster and the schedule for `cfg`.
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let region = |i: usize| lattice_core::proto::RegionId(format!("r{}", cfg.region_of(i)));
        let mut nodes = Vec::new();
        let mut ids = BTreeMap::new();
        for i in 0..cfg.nodes {
            let star = cfg.topology == crate::config::Topology::Star;
            let hub = star && i == 0;
            let peers = (0..cfg.nodes)
                .filter(|&j| j != i && (!star || hub || j == 0))
                .map(|j| PeerConfig::new(node_name(j), region(j)))
                .collect();
            let mut rc = ReplicaConfig::new(node_name(i), region(i), peers);
            rc.policy = cfg.policy.clone();
            rc.policy_keys =
                lattice_core::policy::signed::TrustedKeys::new(vec![admin_key().verifying_key().to_bytes()]);
            for p in rc.peers.iter_mut().filter(|p| p.region != region(i)) {
                p.rate_limit = cfg.link_rate;
            }
            rc.sync_interval_ms = if hub {
                cfg.hub_sync_interval_ms
            } else {
                cfg.sync_interval_ms
            };
            rc.ae_interval_ms = cfg.ae_interval_ms;
            rc.max_message_bytes = cfg.max_message_bytes;
            rc.check_invariants = true;
            rc.tree_depth = cfg.tree_depth;
            rc.max_buffer_bytes = cfg.max_buffer_bytes;
            rc.relay = cfg.relay || hub;
            rc.heartbeat_ms = cfg.heartbeat_ms;
            rc.peer_timeout_ms = (cfg.heartbeat_ms * 5).max(1_500);
            rc.retransmit_ms = 400.max(cfg.ack_delay_ms * 2);
            rc.ack_delay_ms = cfg.ack_delay_ms;
            ids.insert(node_name(i), i);
            nodes.push(SimNode {
                cfg: rc,
                replica: None,
                parked: Some(new_store(&cfg)),
                snapshot: None,
                token: 0,
                paused_until: 0,
                skew_ms: 0,
                timer_at: None,
                flush_scheduled: false,
                life_start: 0,
                wiped_at: None,
                rotted: None,
                last_read: BTreeMap::new(),
                writes: BTreeMap::new(),
                old_records: BTreeMap::new(),
            });
        }
        let workload = Workload::new(&cfg);
        let report = Report {
            seed: cfg.seed,
            setup: format!(
                "nodes={} regions={} ops={} rate={:.0}/s sync={}ms ae={}ms buffer={}B faults={}{}{}{} relay={}{}{}{}{}{}",
                cfg.nodes,
                cfg.regions,
                cfg.ops,
                cfg.rate,
                cfg.sync_interval_ms,
                cfg.ae_interval_ms,
                cfg.max_buffer_bytes,
                cfg.faults.describe(),
                cfg.async_disk_ms.map_or(String::new(), |ms| format!(",async={ms}ms")),
                if cfg.torn_writes { ",torn" } else { "" },
                if cfg.lying_flush { ",lying" } else { "" },
                cfg.relay,
                if cfg.max_message_bytes < crate::config::DEFAULT_FRAME {
                    format!(
                        " frame={}B large={:.2}{} keys={}",
                        cfg.max_message_bytes,
                        cfg.large_values,
                        if cfg.topology == crate::config::Topology::Star {
                            " star"
                        } else {
                            ""
                        },
                        cfg.keys
                    )
                } else {
                    format!(" keys={}", cfg.keys)
                },
                if cfg.batches > 0.0 {
                    format!(" batches=mixed({:.2})", cfg.batches)
                } else {
                    String::new()
                },
                crate::policy::describe(&cfg.policy),
                cfg.link_rate.map_or(String::new(), |r| format!(" link_rate={r}B/s")),
                cfg.policy_change.as_ref().map_or(String::new(), |(at, p)| format!(
                    " policy_change@{at}ms{}",
                    crate::policy::describe(p)
                )),
            ),
            ..Report::default()
        };
        let mut sim = Sim {
            net: Network::new(cfg.faults.loss, cfg.faults.duplication, cfg.faults.bit_flips),
            corrupt_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x524f_5400_0000_0000),
            batch_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x4241_5443_4852_0000),
            prepare_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5052_4550_0000_0000),
            leak_scan_at: vec![None; cfg.nodes],
            rng: ChaCha8Rng::seed_from_u64(rng.gen()),
            cfg,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            nodes,
            ids,
            workload,
            records: Vec::new(),
            pending: BTreeMap::new(),
            concerned: BTreeMap::new(),
            last_wipe: None,
            last_crash: None,
            quiet_since: None,
            unseen: BTreeMap::new(),
            healed_at: None,
            converge_deadline_ms: 0,
            done: false,
            trace: blake3::Hasher::new(),
            trace_log: std::env::var_os("LATTICE_SIM_TRACE").is_some(),
            report,
        };
        for i in 0..sim.cfg.nodes {
            sim.start_node(i, false);
        }
        let w = sim.cfg.workload_ms();
        if let Some((at, _)) = &sim.cfg.policy_change {
            let at = *at;
            sim.push(at, Ev::PolicyChange);
        }
        for (at, action) in sim.cfg.script.clone() {
            sim.push(at, Ev::Fault(action));
        }
        for (at, action) in schedule(&sim.cfg, &mut rng, w) {
            sim.push(at, Ev::Fault(action));
        }
        sim.push(0, Ev::Client);
        sim.push(w, Ev::Heal);
        sim
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq: self.seq, ev }));
    }

    fn violation(&mut self, check: &'static str, detail: String) {
        self.report.violations.push(Violation { check, detail });
    }

    fn start_node(&mut self, i: usize, wipe: bool) {
        let store = match self.nodes[i].parked.take() {
            Some(s) if !wipe => s,
            _ => new_store(&self.cfg),
        };
        let n = &mut self.nodes[i];
        n.parked = None;
        n.life_start = self.now;
        n.last_read.clear();
        n.old_records.clear();
        if wipe {
            n.wiped_at = Some(self.now);
        }
        n.token += 1;
        n.timer_at = None;
        n.flush_scheduled = false;
        let seed = self.cfg.seed ^ ((i as u64) << 40) ^ (n.token << 20);
        let rng = Box::new(ChaCha8Rng::seed_from_u64(seed));
        let rotted = n.rotted.take();
        match Replica::open(n.cfg.clone(), store, rng, Time(self.now)) {
            Ok(mut r) => {
                if let Some(key) = rotted {
                    self.violation(
                        "bit-rot",
                        format!("node {i} reopened a store whose record of {key} has a flipped bit"),
                    );
                }
                let n = &mut self.nodes[i];
                r.set_wall_offset(n.skew_ms);
                n.replica = Some(r);
                if let Some(ms) = self.cfg.async_disk_ms {
                    let token = n.token;
                    self.push(self.now + ms, Ev::DiskSync { node: i, token });
                }
            }
            Err(lattice_core::Error::Corrupt { key }) if rotted.as_ref().is_some_and(|k| k.as_str() == key) => {
                // What an operator does when latticed refuses to start: wipe
                // the data dir and start fresh (a lost disk).
                self.report.rotted_records.1 += 1;
                if self.trace_log {
                    eprintln!("{} ROT n{i} refused {key}: wiping", self.now);
                }
                self.lose_disk(i);
                self.start_node(i, true);
                return;
            }
            Err(e) => {
                self.violation("restart", format!("node {i} failed to reopen its store: {e}"));
                return;
            }
        }
        self.recheck_node(i);
        self.after(i);
    }

    fn stop_node(&mut self, i: usize, wipe: bool) {
        if self.trace_log {
            eprintln!(
                "{} STOP n{i} wipe={wipe} up={}",
                self.now,
                self.nodes[i].replica.is_some()
            );
        }
        let Some(r) = self.nodes[i].replica.take() else { return };
        self.last_crash = Some(self.now);
        let mut store = r.into_store();
        // A log written in order keeps a prefix of what was in flight.
        let keep = if self.cfg.torn_writes {
            self.rng.gen_range(0..=store.unsynced())
        } else {
            0
        };
        store.crash_keeping(keep);
        self.nodes[i].parked = Some(store);
        self.pending.retain(|(n, _, _), _| *n != i);
        // What this node had seen may have been lost with its unflushed state.
        let bit = 1u64 << i;
        for (key, set) in self.unseen.iter_mut() {
            let _ = key;
            for &ri in set.iter() {
                self.records[ri].seen_by &= !bit;
            }
        }
        if wipe {
            self.lose_disk(i);
        } else {
            self.report.crashes.0 += 1;
            if self.cfg.async_disk_ms.is_some() {
                // `async` may lose the acknowledged writes the disk had not
                // yet received, unless another node holds them.
                self.exempt_lost_with_disk(i, false);
            }
            if self.cfg.faults.bit_rot && self.corrupt_rng.gen_bool(0.5) {
                self.rot(i);
            }
        }
    }

    /// Node `i` (down) loses its disk: whatever only it held is exempt.
    fn lose_disk(&mut self, i: usize) {
        self.last_wipe = Some(self.now);
        self.nodes[i].wiped_at = Some(self.now);
        self.report.crashes.1 += 1;
        self.exempt_lost_with_disk(i, true);
        self.nodes[i].parked = Some(new_store(&self.cfg));
    }

    /// Flips one bit of one record on the disk of node `i` (down).
    fn rot(&mut self, i: usize) {
        let (pick, bit) = (self.corrupt_rng.gen(), self.corrupt_rng.gen());
        let Some(store) = self.nodes[i].parked.as_mut() else {
            return;
        };
        if let Some(key) = store.rot(pick, bit) {
            if self.trace_log {
                eprintln!("{} ROT n{i} flipped a bit of {key}", self.now);
            }
            self.report.rotted_records.0 += 1;
            self.nodes[i].rotted = Some(key);
        }
    }

    /// Acknowledged writes that no node but `i` holds durably are
    /// legitimately lost with `i`'s disk. (Re-evaluated at every wipe, since
    /// a second wipe can destroy the last other copy.)
    fn exempt_lost_with_disk(&mut self, i: usize, wiped: bool) {
        // The dots of each element's (single) add, to tell "the remove took
        // effect here" from "the add never arrived here".
        let mut add_dots: BTreeMap<lattice_core::crdt::Bytes, lattice_core::clock::CausalContext> = BTreeMap::new();
        for r in self.records.iter().filter(|r| r.applied) {
            for e in r.added_elems() {
                add_dots.insert(e, r.dots.clone());
            }
        }
        for ri in 0..self.records.len() {
            let r = &self.records[ri];
            if r.acked_at.is_none() || r.exempt {
                continue;
            }
            // Only nodes the write may reach can hold a copy of it. In
            // `async` runs every crash re-evaluates this, so the state a
            // running node holds counts (its own crash would come here);
            // and the crashed node's own surviving disk counts too.
            let targets = r.targets;
            let live = self.cfg.async_disk_ms.is_some();
            let held_elsewhere = (0..self.nodes.len())
                .filter(|&j| (j != i || (live && !wiped)) && targets & (1 << j) != 0)
                .any(|j| {
                    let n = &self.nodes[j];
                    let store = n.replica.as_ref().map(|r| r.store()).or(n.parked.as_ref());
                    store.is_some_and(|s| {
                        let v = if live {
                            s.get(&r.key).ok().flatten()
                        } else {
                            s.get_durable(&r.key)
                        };
                        let elems = crate::workload::visible_elems(v.as_ref());
                        let ctx = v.as_ref().map(Value::context).unwrap_or_default();
                        r.visible_in(v.as_ref())
                            && r.removed_elems()
                                .iter()
                                .all(|e| !elems.contains(e) && add_dots.get(e).is_none_or(|d| ctx.includes(d)))
                    })
                });
            if !held_elsewhere {
                self.records[ri].exempt = true;
            }
        }
    }

    fn read(&self, i: usize, key: &Key) -> Option<Value> {
        self.nodes[i].replica.as_ref().and_then(|r| r.read(key).ok().flatten())
    }

    /// Marks the writes to `key` that node `i` now includes.
    fn key_changed(&mut self, i: usize, key: &Key) {
        let Some(set) = self.unseen.get(key) else { return };
        let value = self.read(i, key);
        let mut done = Vec::new();
        for &ri in set {
            let r = &mut self.records[ri];
            if r.seen_by & (1 << i) == 0 && r.visible_in(value.as_ref()) {
                r.seen_by |= 1 << i;
                if r.seen_by == r.targets {
                    r.reached_all_at = Some(self.now);
                    done.push(ri);
                }
            }
        }
        if let Some(set) = self.unseen.get_mut(key) {
            for ri in done {
                set.remove(&ri);
            }
        }
    }

    fn recheck_node(&mut self, i: usize) {
        let keys: Vec<Key> = self.unseen.keys().cloned().collect();
        for k in keys {
            self.key_changed(i, &k);
        }
    }

    /// Drains a node's outputs after any input.
    fn after(&mut self, i: usize) {
        let now = self.now;
        let Some(r) = self.nodes[i].replica.as_mut() else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = r.poll_transmit() {
            sends.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = r.poll_event() {
            events.push(e);
        }
        let needs_flush = r.needs_flush();
        let timeout = r.poll_timeout();
        let (groups, bytes) = r.buffer_usage();
        let limit = r.config().max_buffer_bytes;
        // The buffer keeps at least its newest group, whatever its size.
        let over = groups > 1 && bytes > limit;
        // Sections are sized exactly and every group fits half a frame: a
        // delta that does not fit a frame means the sizing is wrong (the
        // engine recovers by a repair, which would hide it).
        let oversized = r.stats().oversized_deltas;
        for t in sends {
            self.report.messages += 1;
            self.report.bytes += t.payload.len() as u64;
            let e = self.report.by_kind.entry(t.kind).or_default();
            e.0 += 1;
            e.1 += t.payload.len() as u64;
            self.trace.update(&[9]);
            self.trace.update(&(i as u64).to_le_bytes());
            self.trace.update(&t.payload);
            let Some(&to) = self.ids.get(&t.to) else { continue };
            if self.has_policies() {
                self.check_leaks(i, to, t.kind, &t.payload);
            }
            let same_region = self.cfg.region_of(i) == self.cfg.region_of(to);
            let base = if same_region {
                self.cfg.intra_ms
            } else {
                self.cfg.inter_ms
            };
            for d in self.net.delays(&mut self.rng, i, to, base) {
                let mut payload = t.payload.clone();
                let flipped = self.net.maybe_flip(&mut self.corrupt_rng, &mut payload);
                self.push(
                    now + d,
                    Ev::Deliver {
                        from: i,
                        to,
                        payload,
                        flipped,
                    },
                );
            }
        }
        if over {
            self.violation(
                "bounds",
                format!("node {i} buffers {bytes} bytes, over its limit of {limit}"),
            );
        }
        if oversized > 0 && !self.report.violations.iter().any(|v| v.check == "frame-size") {
            self.violation(
                "frame-size",
                format!("node {i} built {oversized} deltas too large for a frame"),
            );
        }
        for e in events {
            match e {
                Event::WriteDurable(id) => self.on_durable(i, id),
                Event::RemoteApplied { key, .. } => self.key_changed(i, &key),
                Event::WriteReplicated(id) => self.on_replicated(i, id),
                Event::WriteConcernTimeout(id) => {
                    let token = self.nodes[i].token;
                    self.concerned.remove(&(i, token, id));
                }
                // The adopted set survives a restart (latticed keeps it in
                // its audit log) and, here, a lost disk too (as if the
                // operator's configuration had been updated).
                // Kept with its signature, as latticed's audit log keeps
                // it: a restarted node must still be able to pass it on.
                Event::PolicyAdopted { policy, signature, .. } => {
                    self.nodes[i].cfg.policy = policy;
                    self.nodes[i].cfg.policy_signature = signature;
                }
            }
        }
        let token = self.nodes[i].token;
        if needs_flush && !self.nodes[i].flush_scheduled {
            self.nodes[i].flush_scheduled = true;
            self.push(now + self.cfg.flush_ms, Ev::Flush { node: i, token });
        }
        if let Some(t) = timeout {
            let at = t.0.max(now);
            if self.nodes[i].timer_at.is_none_or(|cur| at < cur) {
                self.nodes[i].timer_at = Some(at);
                self.push(at, Ev::Timer { node: i, token });
            }
        }
    }

    /// Session guarantees on a client's read of `key` at node `i`:
    /// - read-your-writes on every later read: each write acknowledged here
    ///   shows, in this life, and after restarts too unless the node runs
    ///   `async` (which may lose its last acknowledged writes) or lost its
    ///   disk since the acknowledgement;
    /// - monotonic reads: within a life, a read includes the one before it
    ///   (skipped while policies run: a policy change may take a key away
    ///   from a region).
    fn check_session(&mut self, i: usize, key: &Key, read: Option<&Value>) {
        let n = &self.nodes[i];
        let durable = self.cfg.async_disk_ms.is_none();
        for &ri in n.writes.get(key).map(Vec::as_slice).unwrap_or(&[]) {
            let r = &self.records[ri];
            let Some(acked) = r.acked_at else { continue };
            let this_life = acked >= n.life_start;
            let survives = durable && n.wiped_at.is_none_or(|w| w < acked);
            if r.exempt || !(this_life || survives) {
                continue;
            }
            if !r.visible_in(read) {
                let detail = format!(
                    "node {i} acknowledged op {} ({:?} on {key}) at {acked} ms, but a read there at {} ms does not show it",
                    r.id, r.op, self.now
                );
                self.violation("read-your-writes", detail);
                return;
            }
        }
        if !self.has_policies() {
            if let Some(prev) = n.last_read.get(key) {
                let grown = read.is_some_and(|now| {
                    let mut j = now.clone();
                    lattice_core::crdt::Crdt::join(&mut j, prev);
                    j == *now
                });
                if !grown {
                    let detail = format!("a read of {key} at node {i} does not include the read before it there");
                    self.violation("monotonic-reads", detail);
                }
            }
        }
        if let Some(v) = read {
            self.nodes[i].last_read.insert(key.clone(), v.clone());
        }
    }

    fn on_durable(&mut self, i: usize, id: WriteId) {
        let token = self.nodes[i].token;
        let Some(ids) = self.pending.remove(&(i, token, id)) else {
            return;
        };
        // A batch is acknowledged whole: every one of its ops, at once.
        for ri in ids {
            self.on_durable_op(i, ri);
        }
    }

    fn on_durable_op(&mut self, i: usize, ri: usize) {
        self.records[ri].acked_at = Some(self.now);
        self.report.acked += 1;
        // Read-your-writes: the node that acknowledged a write shows it.
        let key = self.records[ri].key.clone();
        let value = self.read(i, &key);
        let r = &self.records[ri];
        let removed_back = r
            .removed_elems()
            .into_iter()
            .any(|e| crate::workload::visible_elems(value.as_ref()).contains(&e));
        if !r.visible_in(value.as_ref()) || removed_back {
            let detail = format!(
                "node {i} acknowledged op {} ({:?} on {key}) but a read there does not show it",
                r.id, r.op
            );
            self.violation("read-your-writes", detail);
        }
    }

    fn client_op(&mut self) {
        if self.report.ops >= self.cfg.ops {
            return;
        }
        self.report.ops += 1;
        let gap = -(1.0 - self.rng.gen::<f64>()).ln() * 1_000.0 / self.cfg.rate.max(0.001);
        self.push(self.now + gap.round() as u64, Ev::Client);
        let i = self.rng.gen_range(0..self.nodes.len());
        if self.nodes[i].replica.is_none() || self.nodes[i].paused_until > self.now {
            return; // the client finds the node unavailable
        }
        let plan = self.plan_write(i);
        let before: Vec<Option<Value>> = plan.iter().map(|p| self.read(i, &p.key)).collect();
        for (p, b) in plan.iter().zip(&before) {
            self.check_session(i, &p.key, b.as_ref());
        }
        self.issue(i, plan, before);
        self.after(i);
    }

    /// The ops of the next client write at node `i`: the usual single op,
    /// and in a share of writes (`SimConfig::batches`, drawn from a stream
    /// of its own) a mixed batch around it.
    fn plan_write(&mut self, i: usize) -> Vec<Planned> {
        let nodes = &self.nodes;
        let read = |k: &Key| nodes[i].replica.as_ref().and_then(|r| r.read(k).ok().flatten());
        let (key, kind, op, expect_error) = self.workload.next(&mut self.rng, i, read);
        let first = Planned {
            key,
            kind,
            op,
            expect_error,
        };
        let batch = self.cfg.batches > 0.0 && self.batch_rng.gen_bool(self.cfg.batches.clamp(0.0, 1.0));
        let region = self.region(i);
        let policy = nodes[i]
            .replica
            .as_ref()
            .map(|r| r.policy().clone())
            .unwrap_or_default();
        let may_write = |k: &Key| policy.check_write(k.as_str(), &region).is_ok();
        let mut plan = if batch {
            self.workload
                .batch_extras(&mut self.batch_rng, i, &first, read, may_write)
        } else {
            Vec::new()
        };
        plan.insert(0, first);
        plan
    }

    /// Sends one write (a single op or a batch) to node `i` and records
    /// what became of each of its ops. `before` is each key's state there.
    fn issue(&mut self, i: usize, plan: Vec<Planned>, before: Vec<Option<Value>>) {
        let token = self.nodes[i].token;
        let node = &mut self.nodes[i];
        let Some(r) = node.replica.as_mut() else {
            return;
        };
        let policy = r.policy().clone();
        let own = crate::policy::region_name(self.cfg.region_of(i));
        // A concern needs a region that may hold every key of the write.
        let reach = (0..self.cfg.regions)
            .map(crate::policy::region_name)
            .filter(|g| *g != own && plan.iter().all(|p| policy.may_exchange(p.key.as_str(), &own, g)))
            .count();
        let concern = reach >= 1 && self.rng.gen_bool(self.cfg.concern_share.clamp(0.0, 1.0));
        let ops: Vec<(Key, Op)> = plan.iter().map(|p| (p.key.clone(), p.op.clone())).collect();
        let old_records = &mut node.old_records;
        let stale = self.prepare_rng.gen_bool(0.5);
        let prepared = if self.prepare_rng.gen_bool(self.cfg.prepare.clamp(0.0, 1.0)) {
            let store = r.store();
            Prepared::write(r.id(), &ops, 0, usize::MAX, |k| {
                Ok(match old_records.get(k) {
                    Some(old) if stale => old.clone(),
                    _ => store.record(k),
                })
            })
        } else {
            Prepared::default()
        };
        for (k, _) in &ops {
            old_records.insert(k.clone(), r.store().record(k));
        }
        let (c, timeout) = if concern {
            (lattice_core::proto::client::WriteConcern::Regions(2), 3_000)
        } else {
            (lattice_core::proto::client::WriteConcern::Local, 0)
        };
        let counts = (r.stats().prepared_used, r.stats().prepared_stale);
        let result = r
            .write_prepared(Time(self.now), None, ops, c, timeout, prepared)
            .map(|(id, _)| id);
        self.report.prepared.0 += r.stats().prepared_used - counts.0;
        self.report.prepared.1 += r.stats().prepared_stale - counts.1;
        let r_id = r.id();
        let first = self.records.len();
        let n = plan.len();
        if n > 1 {
            self.report.batches.0 += 1;
            let large = plan
                .iter()
                .map(|p| crate::workload::op_payload(&p.op))
                .max()
                .unwrap_or(0);
            self.report.batch_largest = self.report.batch_largest.max(large);
        }
        let mut recs: Vec<OpRecord> = plan
            .into_iter()
            .enumerate()
            .map(|(k, p)| OpRecord {
                id: first + k,
                node: i,
                targets: self.targets(i, &p.key),
                key: p.key,
                kind: p.kind,
                op: p.op,
                issued_at: self.now,
                applied: false,
                expect_error: p.expect_error,
                acked_at: None,
                dots: Default::default(),
                observed: Default::default(),
                lww_stamp: None,
                counter_entry: None,
                exempt: false,
                seen_by: 0,
                policy_version: policy.version,
                reached_all_at: None,
                batch: (first, n),
            })
            .collect();
        let denied = recs
            .iter()
            .any(|r| policy.check_write(r.key.as_str(), &self.region(i)).is_err());
        let expect_error = recs.iter().any(|r| r.expect_error);
        let what = describe_write(&recs);
        if let (Err(e), true) = (&result, n > 1) {
            *self.report.batch_refusals.entry(refusal_name(e)).or_default() += 1;
        }
        match (result, expect_error) {
            (Err(lattice_core::Error::PolicyDenied { .. }), _) if denied => {
                self.check_unchanged("policy", i, &recs, &before)
            }
            // In a batch a wrong-typed op before the denied key is met first.
            (Err(lattice_core::Error::TypeMismatch { .. } | lattice_core::Error::FieldTypeMismatch { .. }), true)
                if denied && n > 1 =>
            {
                self.check_unchanged("type-check", i, &recs, &before)
            }
            (_, _) if denied => {
                self.violation(
                    "policy",
                    format!(
                        "op {first} ({what}) in region {} should have been refused by policy",
                        self.region(i)
                    ),
                );
            }
            (Ok(wid), false) => {
                for (rec, b) in recs.iter_mut().zip(&before) {
                    self.applied(i, r_id, rec, b.as_ref());
                }
                if n > 1 {
                    self.report.batches.1 += 1;
                    let sizes: Vec<usize> = recs.iter().map(|r| crate::workload::op_payload(&r.op)).collect();
                    let big = 1_024.min(self.cfg.max_message_bytes / 8);
                    if sizes.iter().any(|&b| b >= big) && sizes.iter().filter(|&&b| b <= 64).count() >= 2 {
                        self.report.mixed_batches += 1;
                    }
                }
                let ids: Vec<usize> = (first..first + n).collect();
                self.pending.insert((i, token, wid), ids.clone());
                if concern {
                    self.concerned.insert((i, token, wid), ids);
                }
                for rec in recs.drain(..) {
                    self.accept(i, rec);
                }
            }
            (Ok(_), true) => {
                self.violation(
                    "type-check",
                    format!("op {first} of the wrong type ({what}) was accepted"),
                );
            }
            (Err(e), true) => {
                if !matches!(
                    e,
                    lattice_core::Error::TypeMismatch { .. } | lattice_core::Error::FieldTypeMismatch { .. }
                ) {
                    self.violation(
                        "type-check",
                        format!("op {first} ({what}): expected a type mismatch, got {e}"),
                    );
                }
                self.check_unchanged("type-check", i, &recs, &before);
            }
            // Refused whole with a clear error: large register values can
            // push a multi-value register (or a map) past the value limit,
            // and a batch's deltas together past half a frame.
            (Err(lattice_core::Error::Overloaded(_) | lattice_core::Error::ValueTooLarge { .. }), false) => {
                self.check_unchanged("atomic", i, &recs, &before)
            }
            (Err(lattice_core::Error::MessageTooLarge { .. }), false) if n > 1 => {
                self.check_unchanged("atomic", i, &recs, &before)
            }
            (Err(e), false) => {
                self.violation("write", format!("op {first} ({what}) failed: {e}"));
            }
        }
        self.records.extend(recs);
    }

    /// A refused write is refused whole: none of its keys changed.
    fn check_unchanged(&mut self, check: &'static str, i: usize, recs: &[OpRecord], before: &[Option<Value>]) {
        for (r, b) in recs.iter().zip(before) {
            if self.read(i, &r.key) != *b {
                let detail = format!(
                    "refused op {} ({:?} on {}, in a write of {}) changed its key",
                    r.id, r.op, r.key, r.batch.1
                );
                self.violation(check, detail);
                return;
            }
        }
    }

    /// Fills in what an accepted op did to its key at node `i` (replica
    /// `me`): its dots, stamp or counter total, after checking a read shows
    /// it at once.
    fn applied(&mut self, i: usize, me: lattice_core::clock::ReplicaId, rec: &mut OpRecord, before: Option<&Value>) {
        let key = rec.key.clone();
        let after = self.read(i, &key);
        // Read-your-writes by value: a register write shows its own value
        // at once (its stamp or dots must supersede whatever the node had
        // read, however far ahead that was stamped).
        let own = match (&rec.op, after.as_ref().map(Value::view)) {
            (Op::LwwSet(v), Some(ValueView::Register(Some(got)))) => got == *v,
            (Op::MvSet(v), Some(ValueView::Values(got))) => got == vec![v.clone()],
            (Op::LwwSet(_) | Op::MvSet(_), _) => false,
            _ => true,
        };
        if !own {
            self.violation(
                "read-your-writes",
                format!(
                    "op {} ({:?} on {key}) at node {i} is not what a read right after it shows",
                    rec.id, rec.op
                ),
            );
        }
        let before_ctx = before.map(Value::context).unwrap_or_default();
        rec.observed = before_ctx.clone();
        rec.dots = after
            .as_ref()
            .map(Value::context)
            .unwrap_or_default()
            .difference(&before_ctx);
        if matches!(rec.op, Op::LwwSet(_))
            || (rec.kind == crate::workload::KeyKind::Lww && matches!(rec.op, Op::Delete))
        {
            rec.lww_stamp = after.as_ref().and_then(Value::lww_stamp);
        }
        if matches!(rec.op, Op::GCounterInc(_) | Op::PnCounterAdd(_)) {
            rec.counter_entry = after.as_ref().and_then(|v| v.counter_entry(me)).map(|e| (me, e));
        }
        rec.applied = true;
        if self.trace_log {
            eprintln!(
                "{} WRITE #{} n{i} {key} {:?} entry={:?} batch={:?}",
                self.now, rec.id, rec.op, rec.counter_entry, rec.batch
            );
        }
        self.report.applied += 1;
    }

    /// Files an applied op's record: the node's session remembers it, and
    /// propagation is measured for writes with something to see (dots, a
    /// stamp, a counter total): not for removes.
    fn accept(&mut self, i: usize, rec: OpRecord) {
        let id = rec.id;
        let key = rec.key.clone();
        debug_assert_eq!(id, self.records.len());
        self.nodes[i].writes.entry(key.clone()).or_default().push(id);
        let visible = !rec.dots.is_empty() || rec.lww_stamp.is_some() || rec.counter_entry.is_some();
        self.records.push(rec);
        if visible {
            self.unseen.entry(key.clone()).or_default().insert(id);
        }
        self.key_changed(i, &key);
    }

    fn fault(&mut self, action: FaultAction) {
        match action {
            FaultAction::Block(links) => links.iter().for_each(|&(a, b)| self.net.block(a, b)),
            FaultAction::Unblock(links) => links.iter().for_each(|&(a, b)| self.net.unblock(a, b)),
            FaultAction::Crash(i) => self.stop_node(i, false),
            FaultAction::Wipe(i) => self.stop_node(i, true),
            FaultAction::Restart(i) => {
                if self.nodes[i].replica.is_none() {
                    self.start_node(i, false);
                }
            }
            FaultAction::Skew(i, ms) => {
                self.nodes[i].skew_ms = ms;
                if let Some(r) = self.nodes[i].replica.as_mut() {
                    r.set_wall_offset(ms);
                }
            }
            FaultAction::Pause(i, ms) => self.nodes[i].paused_until = self.nodes[i].paused_until.max(self.now + ms),
            FaultAction::Hostile { from, to, kind } => self.inject_hostile(from, to, kind),
            FaultAction::Snapshot(i) => {
                let n = &mut self.nodes[i];
                let store = n.replica.as_ref().map(|r| r.store()).or(n.parked.as_ref());
                // What the disk holds: a crash's view of the store (a down
                // node's disk may hold a rotted record: the copy does too).
                let rotted = n.replica.is_none().then(|| n.rotted.clone()).flatten();
                n.snapshot = store.map(|s| {
                    let mut disk = s.clone();
                    disk.crash();
                    (disk, rotted)
                });
            }
            FaultAction::Rollback(i) => {
                // Only a running node (the accounting of a lost disk runs
                // as it stops).
                if self.nodes[i].replica.is_none() {
                    return;
                }
                let Some(image) = self.nodes[i].snapshot.take() else {
                    return;
                };
                // Writes since the image are gone from this node's disk, as
                // with a lost disk (the accounting treats it as one).
                self.stop_node(i, true);
                if self.trace_log {
                    eprintln!("{} ROLLBACK n{i}", self.now);
                }
                self.report.rollbacks += 1;
                let (image, rotted) = image;
                self.nodes[i].parked = Some(image);
                self.nodes[i].rotted = rotted;
            }
        }
    }

    /// Peer `from`, authenticated but hostile, sends `to` a value that
    /// only a broken or malicious peer could: `to` must refuse it (count it
    /// in `hostile_refused`, or refuse the frame for a stamp too far
    /// ahead). What `to` cannot tell from honest traffic (dots of a third
    /// replica a little ahead) is not sent: SECURITY.md says what a node
    /// with a certificate can do.
    fn inject_hostile(&mut self, from: usize, to: usize, kind: u8) {
        use lattice_core::clock::{CausalContext, Dot, HlcTimestamp};
        use lattice_core::crdt::{Bytes, Causal, DotMap, DotSet, GCounter, LwwRegister, OrSet};
        use lattice_core::proto::{Message, PolicyStamp, Section};
        let (Some(sender), Some(policy)) = (
            self.nodes[from].replica.as_ref().map(|r| r.id()),
            self.nodes[from]
                .replica
                .as_ref()
                .map(|r| PolicyStamp::of(&r.config().policy)),
        ) else {
            return;
        };
        // Only from a peer that is up: a frame from a crashed one would
        // make the receiver hear from it.
        self.inject_rogue_policy(from, to);
        let (now, skew) = (self.now, self.nodes[to].skew_ms);
        let Some(r) = self.nodes[to].replica.as_mut() else {
            return;
        };
        if !r.config().peers.iter().any(|p| p.node == node_name(from)) {
            return;
        }
        let victim = r.id();
        let set_with = |ctx: CausalContext| -> Option<Value> {
            let causal: Causal<DotMap<Bytes, DotSet>> = Causal::from_parts(DotMap::default(), ctx);
            let bytes = lattice_core::proto::to_bytes(&causal).ok()?;
            lattice_core::proto::from_bytes::<OrSet<Bytes>>(&bytes)
                .ok()
                .map(Value::Set)
        };
        let key = |p: &str| Key::new(format!("{p}0")).ok();
        let wall = now.saturating_add_signed(skew);
        let entry = match kind {
            // A dot of the receiver past the dot limit: accepted, its next
            // dot for the key would saturate and its writes vanish.
            0 => key("s").zip(set_with(CausalContext::from_dots([Dot::new(victim, u64::MAX)]))),
            // A dot of the receiver it never created.
            1 => {
                let k = key("s");
                let next = k
                    .as_ref()
                    .and_then(|k| r.read(k).ok().flatten())
                    .map_or(1, |v| v.context().next_dot(victim).counter);
                k.zip(set_with(CausalContext::from_dots([Dot::new(victim, next + 5)])))
            }
            // A counter total of the receiver above its own.
            2 => key("g").map(|k| (k, Value::GCounter(GCounter::default().inc(victim, 1 << 40)))),
            // An LWW stamp a day past the receiver's clock bound.
            _ => key("l").map(|k| {
                let stamp = HlcTimestamp {
                    wall_ms: wall + r.config().max_clock_ahead_ms + 86_400_000,
                    logical: 0,
                };
                (
                    k,
                    Value::Lww(LwwRegister::default().set(stamp, sender, Some(Bytes::from("hostile")))),
                )
            }),
        };
        let Some(entry) = entry else { return };
        let msg = Message::Delta {
            sender,
            base_from: None,
            time: HlcTimestamp {
                wall_ms: wall,
                logical: 0,
            },
            policy,
            sections: vec![Section {
                class: 1,
                base: 0,
                from: 0,
                to: 0,
                entries: vec![(entry.0.clone(), std::sync::Arc::new(entry.1.clone()))],
                written: None,
            }],
            ack: None,
        };
        let Ok(frame) = lattice_core::proto::encode(&msg) else {
            return;
        };
        // Whether the node's state already holds the hostile value.
        let holds = |r: &Replica<MemoryStore>| {
            r.read(&entry.0).ok().flatten().is_some_and(|v| {
                let mut joined = v.clone();
                lattice_core::crdt::Crdt::join(&mut joined, &entry.1);
                joined == v
            })
        };
        let held_before = holds(r);
        let result = r.handle(Time(now), &node_name(from), &frame);
        // Refused as hostile, or before that by residency or a policy
        // mismatch: either way, not in the state.
        let refused = held_before || !holds(r);
        if self.trace_log {
            eprintln!("{now} HOSTILE n{from}->n{to} kind={kind} refused={refused} {result:?}");
        }
        self.report.hostile_sent += 1;
        if !refused {
            self.violation(
                "hostile",
                format!(
                    "node {to} accepted a hostile value from node {from}: {:?} ({result:?})",
                    entry
                ),
            );
        }
        self.after(to);
    }

    /// Peer `from` also tries to take over the policy: it sends `to` a set
    /// of version `u64::MAX` that opens every keyspace to every region,
    /// unsigned and then signed by a key nobody trusts. `to` must adopt
    /// neither (and count both).
    fn inject_rogue_policy(&mut self, from: usize, to: usize) {
        use lattice_core::policy::signed::SignedPolicySet;
        use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
        use lattice_core::proto::Message;
        let Ok(set) = PolicySet::new(u64::MAX, vec![Policy::new("", Regions::All, Priority::Critical)]) else {
            return;
        };
        let rogue = ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]);
        let Ok(signed) = SignedPolicySet::sign(set.clone(), &rogue) else {
            return;
        };
        let now = self.now;
        let Some(r) = self.nodes[to].replica.as_mut() else {
            return;
        };
        if !r.config().peers.iter().any(|p| p.node == node_name(from)) {
            return;
        }
        let before = (r.policy().clone(), r.stats().policy_sets_refused);
        for msg in [Message::Policy(SignedPolicySet::unsigned(set)), Message::Policy(signed)] {
            if let Ok(frame) = lattice_core::proto::encode(&msg) {
                let _ = r.handle(Time(now), &node_name(from), &frame);
            }
        }
        let refused: u64 = r.stats().policy_sets_refused.iter().sum::<u64>() - before.1.iter().sum::<u64>();
        if *r.policy() != before.0 || refused != 2 {
            let v = r.policy().version;
            self.violation(
                "policy",
                format!("node {to} took a rogue policy set from node {from} (version now {v}, {refused} of 2 refused)"),
            );
        }
        self.after(to);
    }

    fn heal(&mut self) {
        self.net.heal();
        self.report.diff_bytes_at_heal = self.diff_bytes();
        self.converge_deadline_ms = self.cfg.converge_within_ms + self.cfg.transfer_ms(self.report.diff_bytes_at_heal);
        for i in 0..self.nodes.len() {
            self.nodes[i].paused_until = self.now;
            if self.nodes[i].replica.is_none() {
                self.start_node(i, false);
            }
        }
        self.healed_at = Some(self.now);
        self.push(self.now, Ev::Check);
    }

    fn diff_bytes(&self) -> u64 {
        use lattice_core::crdt::Crdt;
        let mut states: Vec<BTreeMap<Key, Value>> = Vec::new();
        for n in self.nodes.iter().filter_map(|n| n.replica.as_ref()) {
            let mut m = BTreeMap::new();
            let _ = n.store().scan_all(&mut |k, v| {
                m.insert(k.clone(), v.clone());
            });
            states.push(m);
        }
        let keys: BTreeSet<&Key> = states.iter().flat_map(|s| s.keys()).collect();
        let mut total = 0;
        for k in keys {
            let vs: Vec<Option<&Value>> = states.iter().map(|s| s.get(k)).collect();
            if vs.windows(2).any(|w| w[0] != w[1]) {
                let mut joined: Option<Value> = None;
                for v in vs.into_iter().flatten() {
                    match &mut joined {
                        Some(j) => j.join(v),
                        None => joined = Some(v.clone()),
                    }
                }
                let size = joined.map_or(0, |j| lattice_core::proto::to_bytes(&j).map_or(0, |b| b.len()));
                total += (size + k.as_str().len()) as u64;
            }
        }
        total
    }

    fn region(&self, i: usize) -> lattice_core::proto::RegionId {
        crate::policy::region_name(self.cfg.region_of(i))
    }

    /// Whether any policy is in force during the run.
    fn has_policies(&self) -> bool {
        !self.cfg.policy.policies.is_empty() || self.cfg.policy_change.is_some()
    }

    /// The policy set in force at the end of the run.
    fn final_policy(&self) -> &lattice_core::policy::PolicySet {
        self.cfg.policy_change.as_ref().map_or(&self.cfg.policy, |(_, p)| p)
    }

    /// The nodes a write of `key` at node `i` must reach: those its policy
    /// at the time and the final one both let it reach.
    fn targets(&self, i: usize, key: &Key) -> u64 {
        let from = self.region(i);
        let now = self.nodes[i].replica.as_ref().map_or(&self.cfg.policy, |r| r.policy());
        (0..self.nodes.len())
            .filter(|&j| {
                let to = self.region(j);
                now.may_exchange(key.as_str(), &from, &to) && self.final_policy().may_exchange(key.as_str(), &from, &to)
            })
            .fold(0, |m, j| m | (1 << j))
    }

    /// Puts the scripted policy change in force at the first node that is up.
    fn change_policy(&mut self) {
        let Some((_, set)) = self.cfg.policy_change.clone() else {
            return;
        };
        let Some(i) = (0..self.nodes.len()).find(|&i| self.nodes[i].replica.is_some()) else {
            self.push(self.now + 100, Ev::PolicyChange);
            return;
        };
        if let Some(r) = self.nodes[i].replica.as_mut() {
            let signed = match lattice_core::policy::signed::SignedPolicySet::sign(set, &admin_key()) {
                Ok(s) => s,
                Err(e) => return self.violation("policy", format!("the scripted policy set does not sign: {e}")),
            };
            if let Err(e) = r.set_policy(Time(self.now), signed) {
                self.violation("policy", format!("node {i} refused a valid policy set: {e}"));
            }
        }
        self.after(i);
    }

    /// A write acknowledged with `regions(2)` must be durable in two regions.
    fn on_replicated(&mut self, i: usize, id: WriteId) {
        let token = self.nodes[i].token;
        let Some(ids) = self.concerned.remove(&(i, token, id)) else {
            return;
        };
        // Every key of a batch must be durable in two regions.
        for ri in ids {
            self.check_concern(ri);
        }
    }

    fn check_concern(&mut self, ri: usize) {
        let r = &self.records[ri];
        if self.last_wipe.is_some_and(|t| t >= r.issued_at) {
            // A disk destroyed since the write may have held one of the
            // copies the acknowledgement counted: nothing to check.
            return;
        }
        // `async`: the peers acknowledged what they applied, not what their
        // disks hold; any crash since the write may have taken a copy.
        let live = self.cfg.async_disk_ms.is_some();
        if live && self.last_crash.is_some_and(|t| t >= r.issued_at) {
            return;
        }
        let regions: BTreeSet<usize> = (0..self.nodes.len())
            .filter(|&j| {
                let n = &self.nodes[j];
                let store = n.replica.as_ref().map(|r| r.store()).or(n.parked.as_ref());
                store.is_some_and(|s| {
                    let v = if live {
                        s.get(&r.key).ok().flatten()
                    } else {
                        s.get_durable(&r.key)
                    };
                    r.visible_in(v.as_ref())
                })
            })
            .map(|j| self.cfg.region_of(j))
            .collect();
        self.report.concerns_checked += 1;
        if regions.len() < 2 {
            let detail = format!(
                "op {} ({:?} on {}) was acknowledged with regions(2) but is durable only in {regions:?}",
                r.id, r.op, r.key
            );
            self.violation("write-concern", detail);
        }
    }

    /// The leak checker: see [`crate::policy`]. A frame is judged by the
    /// policy its sender held when it sent it.
    ///
    /// Recomputing an anti-entropy digest scans the sender's whole store:
    /// over `LEAK_SCAN_KEYS` keys, a sender's digests are recomputed at
    /// most once per `LEAK_SCAN_EVERY_MS` (a leaking digest leaks in every
    /// round, so it is still caught; every key a frame carries is always
    /// checked). A scan per frame made swarm seed 70 (13,590 keys, 7 nodes)
    /// take 83 s; it takes 8 s so.
    fn check_leaks(&mut self, from: usize, to: usize, kind: &str, frame: &[u8]) {
        let found = {
            let Some(r) = self.nodes[from].replica.as_ref() else {
                return;
            };
            let last = self.leak_scan_at[from];
            let scan = r.store().len() <= LEAK_SCAN_KEYS || last.is_none_or(|t| self.now >= t + LEAK_SCAN_EVERY_MS);
            if scan && matches!(kind, "ae_tree" | "ae_leaves") {
                self.leak_scan_at[from] = Some(self.now);
            }
            crate::policy::leaks(r.policy(), r.store(), &self.region(from), &self.region(to), frame, scan)
        };
        for leak in found.into_iter().take(3) {
            self.violation("policy-leak", format!("n{from} -> n{to}: {leak}"));
        }
    }

    /// Pairs of live nodes whose shared state differs (by digest).
    fn differing_pairs(&self) -> usize {
        let mut n = 0;
        for i in 0..self.nodes.len() {
            for j in i + 1..self.nodes.len() {
                let (Some(a), Some(b)) = (&self.nodes[i].replica, &self.nodes[j].replica) else {
                    continue;
                };
                // Digests are kept per audience a node knows of: only peers
                // compare them (in a star, leaf pairs are compared through
                // the hub, and state by state when the run finishes).
                if !a.config().peers.iter().any(|p| p.node == b.config().node) {
                    continue;
                }
                if a.digest_shared_with(&self.region(j)) != b.digest_shared_with(&self.region(i)) {
                    n += 1;
                }
            }
        }
        n
    }

    fn check(&mut self) {
        let Some(healed) = self.healed_at else { return };
        let differing = self.differing_pairs();
        let final_policy = self.final_policy().clone();
        let all_up = self
            .nodes
            .iter()
            .all(|n| n.replica.as_ref().is_some_and(|r| *r.policy() == final_policy));
        let quiet = self.report.ops >= self.cfg.ops;
        if let Some(since) = self.quiet_since {
            // After convergence, a quiet phase: every acknowledgement and
            // trim has had time to happen, so every delta buffer and
            // reorder buffer must be empty, and the replicas still equal.
            // On a rate-limited link, a repair round waits until the link's
            // debt (at most about a frame or two of answers) is paid off.
            // The quiet phase lasts QUIET_MS, longer only while a buffer is
            // not yet empty on a link that may still be paying off debt, or
            // still carrying the groups buffered when the phase began (a
            // node wiped late, e.g. for bit rot, is repaired by
            // anti-entropy while the deltas it missed still queue behind a
            // slow link's budget: swarm seed 6147).
            let quiet_ms = QUIET_MS + self.cfg.transfer_ms(2 * self.cfg.max_message_bytes as u64);
            let drained = self
                .nodes
                .iter()
                .filter_map(|n| n.replica.as_ref())
                .all(|r| r.buffer_usage().0 == 0 && r.reorder_usage() == 0);
            if self.now < since + QUIET_MS || (!drained && self.now < since + quiet_ms) {
                self.push(self.now + 100, Ev::Check);
                return;
            }
            if differing != 0 {
                self.violation(
                    "convergence",
                    format!("{differing} pairs of nodes differ again after the quiet phase"),
                );
            }
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(r) = &n.replica else { continue };
                let (groups, bytes) = r.buffer_usage();
                let early = r.reorder_usage();
                if groups > 0 || early > 0 {
                    let detail = format!(
                        "node {i} still buffers {groups} delta groups ({bytes} bytes) and {early} early intervals {}ms after convergence ({})",
                        self.now - since,
                        r.stream_summary(Time(self.now))
                    );
                    self.report.violations.push(Violation {
                        check: "quiet-buffers",
                        detail,
                    });
                }
            }
            self.finish();
            return;
        }
        if all_up && quiet && differing == 0 {
            self.report.converged_ms = Some(self.now - healed);
            self.quiet_since = Some(self.now);
            self.push(self.now + 100, Ev::Check);
            return;
        }
        if self.now - healed > self.converge_deadline_ms {
            let detail = format!(
                "replicas still differ {}ms after the heal (bound {}ms for {} bytes of difference; {differing} pairs of nodes differ){}",
                self.now - healed,
                self.converge_deadline_ms,
                self.report.diff_bytes_at_heal,
                self.describe_divergence()
            );
            self.violation("convergence", detail);
            self.done = true;
            return;
        }
        self.push(self.now + 20, Ev::Check);
    }

    /// The first keys on which nodes disagree, for debugging.
    fn describe_divergence(&self) -> String {
        let states: Vec<BTreeMap<Key, Value>> = self
            .nodes
            .iter()
            .map(|n| {
                let mut m = BTreeMap::new();
                if let Some(r) = &n.replica {
                    let _ = r.store().scan_all(&mut |k, v| {
                        m.insert(k.clone(), v.clone());
                    });
                }
                m
            })
            .collect();
        let keys: BTreeSet<&Key> = states.iter().flat_map(|s| s.keys()).collect();
        let mut out = String::new();
        for k in keys
            .into_iter()
            .filter(|k| states.windows(2).any(|w| w[0].get(*k) != w[1].get(*k)))
            .take(3)
        {
            out.push_str(&format!("\n  key {k}:"));
            for (i, s) in states.iter().enumerate() {
                out.push_str(&format!("\n    n{i}: {:?}", s.get(k)));
            }
        }
        out
    }

    fn finish(&mut self) {
        self.done = true;
        // The change log: every node's logged deltas join to its states.
        let mut bad = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(r) = &n.replica {
                bad.extend(r.store().check_log().into_iter().map(|b| format!("n{i}: {b}")));
            }
        }
        for b in bad.into_iter().take(3) {
            self.violation("change-log", b);
        }
        let mut states: Vec<BTreeMap<Key, Value>> = Vec::new();
        for n in &self.nodes {
            let mut m = BTreeMap::new();
            if let Some(r) = &n.replica {
                let _ = r.store().scan_all(&mut |k, v| {
                    m.insert(k.clone(), v.clone());
                });
            }
            states.push(m);
        }
        self.report.keys_held = states.iter().map(BTreeMap::len).max().unwrap_or(0);
        let policy = self.final_policy().clone();
        let first = self.cfg.policy.clone();
        let regions: Vec<_> = (0..self.nodes.len()).map(|i| self.region(i)).collect();
        // Every pair of nodes holds the same state for every key the two
        // regions may exchange.
        let mut found = Vec::new();
        for i in 0..states.len() {
            for j in i + 1..states.len() {
                let keys: BTreeSet<&Key> = states[i].keys().chain(states[j].keys()).collect();
                for k in keys {
                    if policy.may_exchange(k.as_str(), &regions[i], &regions[j]) && states[i].get(k) != states[j].get(k)
                    {
                        found.push(format!("n{i} and n{j} differ on {k} although their digests agree"));
                    }
                }
            }
        }
        // Residency at rest: no node holds a key its region may not (under
        // either set, when one replaced the other: keys stay where they were
        // held), and a quarantined key only where its region wrote it.
        for (i, st) in states.iter().enumerate() {
            for k in st.keys() {
                let written_here = || {
                    self.records
                        .iter()
                        .any(|r| r.applied && r.key == *k && regions[r.node] == regions[i])
                };
                let allowed = |set: &lattice_core::policy::PolicySet| {
                    let p = set.lookup(k.as_str());
                    p.may_hold(&regions[i]) && (p.regions != lattice_core::policy::Regions::Local || written_here())
                };
                if !allowed(&first) && !allowed(&policy) {
                    found.push(format!("n{i} in {} holds {k}, which policy keeps from it", regions[i]));
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.violation(
                if f.contains("holds") {
                    "policy-residency"
                } else {
                    "convergence"
                },
                f,
            );
        }
        // No acknowledged write lost, at every node it must reach.
        if !self.has_policies() {
            if let Some(first) = states.first() {
                let found = check::no_lost_writes(&self.records, first);
                self.report.violations.extend(found);
            }
        } else {
            for (j, st) in states.iter().enumerate() {
                // A write must be at j if the set it was written under and
                // the final one both let it reach j. When the key's policy
                // changed, any write of it may be there (state travels by
                // key, so through third regions): counted in the bounds,
                // not required.
                let mut mine: Vec<OpRecord> = Vec::new();
                for r in &self.records {
                    let (a, b, k) = (&regions[r.node], &regions[j], r.key.as_str());
                    let at_write = if r.policy_version == policy.version {
                        &policy
                    } else {
                        &first
                    };
                    let required = at_write.may_exchange(k, a, b) && policy.may_exchange(k, a, b);
                    let changed = first.lookup(k) != policy.lookup(k);
                    if required || changed {
                        let mut r = r.clone();
                        r.exempt |= !required;
                        mine.push(r);
                    }
                }
                let found = check::no_lost_writes(&mine, st);
                self.report.violations.extend(found.into_iter().map(|mut v| {
                    v.detail = format!("at n{j}: {}", v.detail);
                    v
                }));
            }
        }
    }

    /// Runs to the end and returns the report.
    pub fn run(mut self) -> Report {
        // A hard bound on events, so a livelock is a violation, not a hang.
        let max_events = 20_000_000u64;
        while let Some(Reverse(s)) = self.queue.pop() {
            if self.done {
                break;
            }
            self.report.events += 1;
            if self.report.events > max_events {
                self.violation("liveness", format!("more than {max_events} events"));
                break;
            }
            self.now = s.at;
            // A paused node handles nothing until its pause ends.
            if let Some(n) = s.ev.node() {
                if self.nodes[n].paused_until > self.now {
                    let at = self.nodes[n].paused_until;
                    // A deferred timer stays the node's current timer.
                    if matches!(s.ev, Ev::Timer { .. }) && self.nodes[n].timer_at == Some(s.at) {
                        self.nodes[n].timer_at = Some(at);
                    }
                    self.push(at, s.ev);
                    continue;
                }
            }
            self.trace.update(&s.at.to_le_bytes());
            self.trace.update(&[s.ev.code()]);
            match s.ev {
                Ev::Deliver {
                    from,
                    to,
                    payload,
                    flipped,
                } => {
                    if self.trace_log {
                        if let Ok(m) = lattice_core::proto::decode(&payload, usize::MAX) {
                            if std::env::var_os("LATTICE_SIM_TRACE_HB").is_some()
                                || !matches!(m, lattice_core::proto::Message::Heartbeat { .. })
                            {
                                eprintln!("{} n{from}->n{to} {:?}", self.now, m);
                            }
                        }
                    }
                    let name = node_name(from);
                    let node = &mut self.nodes[to];
                    if let Some(r) = node.replica.as_mut() {
                        let corrupt_before = r.stats().corrupt_frames;
                        let mut frame = Decoded::new(&payload, r.config().max_message_bytes);
                        if self.prepare_rng.gen_bool(self.cfg.prepare.clamp(0.0, 1.0)) {
                            let stale = self.prepare_rng.gen_bool(0.5);
                            let (store, old_records) = (r.store(), &node.old_records);
                            frame.prepare(r.id(), usize::MAX, |k| {
                                Ok(match old_records.get(k) {
                                    Some(old) if stale => old.clone(),
                                    _ => store.record(k),
                                })
                            });
                        }
                        let counts = (r.stats().prepared_used, r.stats().prepared_stale);
                        let result = r.handle_decoded(Time(self.now), &name, frame);
                        self.report.prepared.0 += r.stats().prepared_used - counts.0;
                        self.report.prepared.1 += r.stats().prepared_stale - counts.1;
                        let counted = r.stats().corrupt_frames - corrupt_before;
                        if flipped {
                            // A flipped frame is refused, and counted as
                            // corrupt unless the flip hit the version byte.
                            self.report.flipped_frames.0 += 1;
                            match result {
                                Err(lattice_core::Error::CorruptFrame { .. }) if counted == 1 => {
                                    self.report.flipped_frames.1 += 1
                                }
                                Err(lattice_core::Error::UnknownVersion(_)) if counted == 0 => {
                                    self.report.flipped_frames.1 += 1
                                }
                                other => self.violation(
                                    "bit-flip",
                                    format!("node {to} took a frame from {from} with a flipped bit: {other:?} (counted {counted})"),
                                ),
                            }
                        } else if let Err(e) = result {
                            // The simulator only sends well-formed frames.
                            self.violation("codec", format!("node {to} refused a frame from {from}: {e}"));
                        }
                        self.after(to);
                    }
                }
                Ev::Timer { node, token } => {
                    let n = &mut self.nodes[node];
                    if n.token != token || n.timer_at != Some(self.now) {
                        continue;
                    }
                    n.timer_at = None;
                    if let Some(r) = n.replica.as_mut() {
                        if let Err(e) = r.handle_timeout(Time(self.now)) {
                            self.violation("engine", format!("node {node} timer: {e}"));
                        }
                    }
                    self.after(node);
                }
                Ev::Flush { node, token } => {
                    let n = &mut self.nodes[node];
                    if n.token != token {
                        continue;
                    }
                    n.flush_scheduled = false;
                    if let Some(r) = n.replica.as_mut() {
                        if let Err(e) = r.flush(Time(self.now)) {
                            self.violation("engine", format!("node {node} flush: {e}"));
                        }
                    }
                    self.after(node);
                }
                Ev::DiskSync { node, token } => {
                    let n = &mut self.nodes[node];
                    if n.token != token {
                        continue;
                    }
                    if let (Some(r), Some(ms)) = (n.replica.as_mut(), self.cfg.async_disk_ms) {
                        r.store_mut().sync_disk();
                        self.push(self.now + ms, Ev::DiskSync { node, token });
                    }
                }
                Ev::Client => self.client_op(),
                Ev::Fault(a) => self.fault(a),
                Ev::Heal => self.heal(),
                Ev::Check => self.check(),
                Ev::PolicyChange => self.change_policy(),
            }
        }
        if self.trace_log {
            let slowest = self
                .records
                .iter()
                .filter(|r| r.reached_all_at.is_some())
                .max_by_key(|r| r.reached_all_at.map(|t| t - r.issued_at));
            if let Some(r) = slowest {
                eprintln!(
                    "slowest write: #{} n{} {:?} on {} issued {} reached all {:?}",
                    r.id, r.node, r.op, r.key, r.issued_at, r.reached_all_at
                );
            }
        }
        let mut lat: Vec<u64> = self
            .records
            .iter()
            .filter_map(|r| r.reached_all_at.map(|t| t - r.issued_at))
            .collect();
        lat.sort_unstable();
        if !lat.is_empty() {
            let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
            self.report.propagation = Some((q(0.5), q(0.99), lat[lat.len() - 1]));
        }
        let h = self.trace.finalize();
        self.report.trace = h.to_hex()[..16].to_string();
        self.report
    }
}

/// The simulated cluster's admin policy key (fixed: runs replay bit for
/// bit). Every node trusts its public key.
fn admin_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[0x5a; 32])
}
