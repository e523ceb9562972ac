//! What a simulation run is made of: sizes, the network, the fault mix and
//! the engine's tunables. `SimConfig::swarm(seed)` draws all of it from a seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The frame limit of a seed that does not draw a small one: the engine's
/// default when the swarm's seeds were chosen (a larger default since, for
/// 4 MiB values, changes nothing the simulator's workloads reach, and
/// keeping it keeps every recorded seed's run as it was).
pub const DEFAULT_FRAME: usize = 4 << 20;

/// Share of swarm seeds (among those not in the 5,000..=20,000 key
/// profile) whose key space is 20,000..=100,000 keys per type.
pub const HUGE_KEYS_SHARE: f64 = 0.004;

/// The expected number of mixed batches in a swarm run is kept under this
/// (the batch share shrinks in runs of many ops).
pub const MAX_BATCHES: f64 = 600.0;

/// Which faults a run injects while the workload runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultMix {
    /// Symmetric partitions between random groups of nodes.
    pub partitions: bool,
    /// One-way partitions (a link drops in one direction only).
    pub one_way: bool,
    /// Isolate one whole region.
    pub isolate_region: bool,
    /// Links that go down and up quickly.
    pub flapping: bool,
    /// Node crashes (losing what was not flushed) and restarts.
    pub crashes: bool,
    /// Restarts with an empty store (a lost disk).
    pub disk_loss: bool,
    /// Per-node clock skew, from milliseconds to minutes.
    pub clock_skew: bool,
    /// Nodes that stop processing for a while (GC pause, overload).
    pub pauses: bool,
    /// Restarts from an older copy of the disk (a restored backup, a
    /// snapshot of the volume): the node crashes and its disk is replaced
    /// by the image it had some time before.
    pub rollback: bool,
    /// Authenticated peers that send hostile values now and then: dots of
    /// the receiver it never created or past the dot limit, counter totals
    /// of the receiver above its own, LWW stamps a day ahead.
    pub hostile: bool,
    /// Message loss probability (0..1) while faults run.
    pub loss: f64,
    /// Message duplication probability (0..1) while faults run.
    pub duplication: f64,
    /// Probability (0..1) that a delivered frame has one random bit
    /// flipped while faults run: it must be refused, never merged.
    pub bit_flips: f64,
    /// Bit rot: a crashed node may find one stored record with a flipped
    /// bit when it restarts; the open must refuse it, and the node comes
    /// back empty, as after a lost disk.
    pub bit_rot: bool,
}

impl FaultMix {
    /// No faults at all.
    pub fn none() -> Self {
        FaultMix::default()
    }

    /// Every fault, at moderate rates.
    pub fn all() -> Self {
        FaultMix {
            partitions: true,
            one_way: true,
            isolate_region: true,
            flapping: true,
            crashes: true,
            disk_loss: true,
            clock_skew: true,
            pauses: true,
            rollback: true,
            hostile: true,
            loss: 0.05,
            duplication: 0.05,
            bit_flips: 0.01,
            bit_rot: true,
        }
    }

    /// A short description, e.g. `part,crash,loss=0.05`.
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        for (on, name) in [
            (self.partitions, "part"),
            (self.one_way, "oneway"),
            (self.isolate_region, "isolate"),
            (self.flapping, "flap"),
            (self.crashes, "crash"),
            (self.disk_loss, "diskloss"),
            (self.clock_skew, "skew"),
            (self.pauses, "pause"),
            (self.rollback, "rollback"),
            (self.hostile, "hostile"),
            (self.bit_rot, "rot"),
        ] {
            if on {
                v.push(name.to_string());
            }
        }
        if self.loss > 0.0 {
            v.push(format!("loss={:.2}", self.loss));
        }
        if self.duplication > 0.0 {
            v.push(format!("dup={:.2}", self.duplication));
        }
        if self.bit_flips > 0.0 {
            v.push(format!("flip={:.3}", self.bit_flips));
        }
        if v.is_empty() {
            "none".into()
        } else {
            v.join(",")
        }
    }
}

/// One simulation's parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed of every random choice in the run.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Number of regions (nodes are spread round-robin).
    pub regions: usize,
    /// Client operations issued.
    pub ops: usize,
    /// Keys per CRDT type.
    pub keys: usize,
    /// Skew of key choice: 0 uniform, larger is hotter (probability of key i
    /// proportional to 1 / (i + 1)^skew).
    pub key_skew: f64,
    /// Client operations per second of virtual time, across the cluster.
    pub rate: f64,
    /// One-way latency inside a region, milliseconds (min, max).
    pub intra_ms: (u64, u64),
    /// One-way latency between regions, milliseconds (min, max).
    pub inter_ms: (u64, u64),
    /// Faults injected while the workload runs.
    pub faults: FaultMix,
    /// Group-commit delay: a node flushes this long after its first
    /// unflushed change.
    pub flush_ms: u64,
    /// After the heal, how long the cluster has to converge, before the
    /// time its links need to carry the difference at the heal (see
    /// [`SimConfig::transfer_ms`]) is added.
    pub converge_within_ms: u64,
    /// Engine: sync interval.
    pub sync_interval_ms: u64,
    /// Engine: anti-entropy interval.
    pub ae_interval_ms: u64,
    /// Engine: anti-entropy tree depth.
    pub tree_depth: u8,
    /// Engine: delta buffer limit in bytes.
    pub max_buffer_bytes: usize,
    /// Engine: relay received deltas.
    pub relay: bool,
    /// Who gossips with whom.
    pub topology: Topology,
    /// Engine: how long a stand-alone ack waits for a delta to ride on.
    pub ack_delay_ms: u64,
    /// Engine: heartbeat interval.
    pub heartbeat_ms: u64,
    /// Engine: the hub's sync interval in a star (others use `sync_interval_ms`).
    pub hub_sync_interval_ms: u64,
    /// Workload: only unique set adds to one key (the Gossip Glomers
    /// broadcast workload) instead of every CRDT type.
    pub broadcast: bool,
    /// Replication policies in force on every node (regions are `r0`,
    /// `r1`, ...). The leak checker runs whenever the set is not empty.
    pub policy: lattice_core::policy::PolicySet,
    /// Bytes per second each node may send to each peer in another region
    /// (`None`: unlimited).
    pub link_rate: Option<u64>,
    /// Fault actions at fixed times, on top of the random ones (scenarios
    /// such as a partition for the whole workload).
    pub script: Vec<(u64, crate::faults::FaultAction)>,
    /// A newer policy set put in force at one node at this time (as
    /// `lattice policy set` does); it spreads by gossip.
    pub policy_change: Option<(u64, lattice_core::policy::PolicySet)>,
    /// Share of writes (0..1) sent with write concern `regions(2)`.
    pub concern_share: f64,
    /// `async` durability: a flush returns at once and the disk gets what
    /// was flushed only every this many milliseconds (sled's background
    /// writer), so a crash loses a tail the node already acknowledged and
    /// sent. `None`: a flush is durable (`sync`/`group`).
    pub async_disk_ms: Option<u64>,
    /// A crash keeps a random prefix of the batches not yet on disk (a torn
    /// log tail) instead of none of them.
    pub torn_writes: bool,
    /// With `async_disk_ms`: the disk lies, claiming every flush durable
    /// (the engine then runs as in `sync` mode) while it writes only every
    /// `async_disk_ms`, as a write cache that ignores flushes does.
    pub lying_flush: bool,
    /// Engine: largest frame (small frames put every size edge in reach).
    pub max_message_bytes: usize,
    /// Share of register writes (0..1) whose value is large: a size drawn
    /// up to `max_message_bytes / 3`, so groups, sections, relayed deltas
    /// and anti-entropy states meet the frame limits.
    pub large_values: f64,
    /// Share of client writes (0..1) sent as one multi-key batch of mixed
    /// sizes: the usual op, 2..=9 small counters and registers and one
    /// large value (up to what half a frame leaves beside them) in keys of
    /// other types, so other policies and priority classes.
    pub batches: f64,
    /// Share of writes and delivered frames (0..1) handed to the engine
    /// with results prepared beside it (`Prepared`), as `latticed` does for
    /// large ones: half of those against the key's current record, half
    /// against the record before the key's last write here, which the
    /// engine must find stale. Drawn from a stream of its own; a correct
    /// engine ends every run exactly as without them.
    pub prepare: f64,
}

/// Who gossips with whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Everyone with everyone; no relaying needed.
    Mesh,
    /// Node 0 is a hub that relays; the others talk only to it.
    Star,
}

impl SimConfig {
    /// The defaults of `lattice-sim run`: 5 nodes in 3 regions, all faults.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 5,
            regions: 3,
            ops: 1_000,
            keys: 8,
            key_skew: 0.8,
            rate: 200.0,
            intra_ms: (1, 5),
            inter_ms: (30, 80),
            faults: FaultMix::all(),
            flush_ms: 2,
            converge_within_ms: 30_000,
            sync_interval_ms: 20,
            ae_interval_ms: 2_000,
            tree_depth: 3,
            max_buffer_bytes: 1 << 20,
            relay: false,
            topology: Topology::Mesh,
            ack_delay_ms: 50,
            heartbeat_ms: 300,
            hub_sync_interval_ms: 20,
            broadcast: false,
            policy: Default::default(),
            link_rate: None,
            script: Vec::new(),
            policy_change: None,
            concern_share: 0.0,
            async_disk_ms: None,
            torn_writes: true,
            lying_flush: false,
            max_message_bytes: DEFAULT_FRAME,
            large_values: 0.0,
            batches: 0.0,
            prepare: 0.5,
        }
    }

    /// Swarm testing: the seed also draws sizes, rates and the fault mix,
    /// so different seeds explore different corners.
    pub fn swarm(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5157_4152_4d00_0000);
        let mut c = SimConfig::new(seed);
        c.nodes = rng.gen_range(2..=7);
        c.regions = rng.gen_range(1..=c.nodes.min(4));
        c.ops = rng.gen_range(50..=600);
        c.keys = rng.gen_range(1..=10);
        c.key_skew = rng.gen_range(0.0..1.5);
        c.rate = rng.gen_range(20.0..400.0);
        c.relay = rng.gen_bool(0.3);
        c.sync_interval_ms = rng.gen_range(5..=100);
        // A quarter of the seeds run without periodic anti-entropy, so the
        // delta path alone must deliver everything (lagging, restarted and
        // wiped peers are still repaired on demand).
        c.ae_interval_ms = if rng.gen_bool(0.25) {
            0
        } else {
            rng.gen_range(500..=5_000)
        };
        c.flush_ms = rng.gen_range(0..=10);
        // Sometimes a tiny buffer, so lagging peers need anti-entropy.
        c.max_buffer_bytes = if rng.gen_bool(0.2) {
            rng.gen_range(256..4_096)
        } else {
            1 << 20
        };
        let mut on = || rng.gen_bool(0.5);
        c.faults = FaultMix {
            partitions: on(),
            one_way: on(),
            isolate_region: on(),
            flapping: on(),
            crashes: on(),
            disk_loss: on(),
            clock_skew: on(),
            pauses: on(),
            rollback: false,
            hostile: false,
            loss: 0.0,
            duplication: 0.0,
            bit_flips: 0.0,
            bit_rot: false,
        };
        if rng.gen_bool(0.5) {
            c.faults.loss = rng.gen_range(0.0..0.3);
        }
        if rng.gen_bool(0.5) {
            c.faults.duplication = rng.gen_range(0.0..0.2);
        }
        // Drawn from their own stream, so adding them left every earlier
        // seed's sizes and faults as they were.
        let mut prng = ChaCha8Rng::seed_from_u64(seed ^ 0x504f_4c49_4359_0000);
        c.policy = crate::policy::random_policy(&mut prng, c.regions);
        if prng.gen_bool(0.2) {
            c.link_rate = Some(prng.gen_range(2_000..200_000));
        }
        if prng.gen_bool(0.3) {
            let next = crate::policy::random_policy(&mut prng, c.regions);
            let at = prng.gen_range(0..c.workload_ms().max(1));
            if let Ok(v2) = lattice_core::policy::PolicySet::new(2, next.policies) {
                c.policy_change = Some((at, v2));
            }
        }
        if c.regions >= 2 && prng.gen_bool(0.3) {
            c.concern_share = prng.gen_range(0.05..0.5);
        }
        // Storage faults, from a stream of their own as well.
        let mut drng = ChaCha8Rng::seed_from_u64(seed ^ 0x4449_534b_0000_0000);
        if drng.gen_bool(0.4) {
            c.async_disk_ms = Some(drng.gen_range(5..=800));
        }
        c.torn_writes = drng.gen_bool(0.7);
        if c.async_disk_ms.is_some() {
            c.lying_flush = drng.gen_bool(0.4);
        }
        c.faults.rollback = drng.gen_bool(0.25);
        let mut hrng = ChaCha8Rng::seed_from_u64(seed ^ 0x484f_5354_0000_0000);
        c.faults.hostile = hrng.gen_bool(0.3);
        // Corruption on the wire and on the disk, from its own stream too.
        let mut crng = ChaCha8Rng::seed_from_u64(seed ^ 0x464c_4950_0000_0000);
        if crng.gen_bool(0.3) {
            c.faults.bit_flips = crng.gen_range(0.001..0.05);
        }
        c.faults.bit_rot = c.faults.crashes && crng.gen_bool(0.4);
        // Sizes at the frame limits: small frames and large register values
        // mixed with small ones, in a mesh or a relaying star; now and then
        // thousands of keys, so repair rounds go partial.
        let mut srng = ChaCha8Rng::seed_from_u64(seed ^ 0x5349_5a45_0000_0000);
        if srng.gen_bool(0.35) {
            c.max_message_bytes = 1 << srng.gen_range(12..=16);
            c.large_values = srng.gen_range(0.05..0.5);
            if c.nodes >= 3 && srng.gen_bool(0.4) {
                c.topology = Topology::Star;
                // Leaves hear each other only through the hub: without
                // relaying, their writes would pass by anti-entropy alone.
                c.relay = true;
                // A leaf knows only the hub and its region: no regions(2)
                // there, and no policies (a key the hub's region may not
                // hold could never pass between two leaves).
                c.concern_share = 0.0;
                c.policy = Default::default();
                c.policy_change = None;
            }
        }
        if srng.gen_bool(0.1) {
            c.keys = srng.gen_range(200..=2_000);
            c.ops = srng.gen_range(600..=2_500);
            c.rate = srng.gen_range(200.0..1_000.0);
        }
        // Now and then tens of thousands of keys (the key space a repair
        // round must search), from a stream of its own; rarer still, up to
        // 10^5 keys per type (drawn only by seeds the first profile left
        // alone, so those kept their runs).
        let mut krng = ChaCha8Rng::seed_from_u64(seed ^ 0x4b45_5953_0000_0000);
        if krng.gen_bool(0.01) {
            c.keys = krng.gen_range(5_000..=20_000);
            c.key_skew = 0.0;
            c.ops = krng.gen_range(10_000..=20_000);
            c.rate = krng.gen_range(1_000.0..3_000.0);
        } else if krng.gen_bool(HUGE_KEYS_SHARE) {
            c.keys = if krng.gen_bool(0.5) {
                100_000
            } else {
                krng.gen_range(20_000..100_000)
            };
            c.key_skew = 0.0;
            c.ops = krng.gen_range(10_000..=20_000);
            c.rate = krng.gen_range(1_000.0..3_000.0);
        }
        // Multi-key batches of mixed sizes in a share of the seeds, from a
        // stream of their own: the shape that once broke section sizing
        // (one 7 KB `bulk` value beside nine small `crit` counters in 16 KiB
        // frames). Half of them in small frames, so the large value is at
        // a frame's edge.
        let mut brng = ChaCha8Rng::seed_from_u64(seed ^ 0x4241_5443_4800_0000);
        if brng.gen_bool(0.25) {
            c.batches = brng.gen_range(0.1..0.6);
            if c.max_message_bytes == DEFAULT_FRAME && brng.gen_bool(0.5) {
                c.max_message_bytes = 1 << brng.gen_range(13..=16);
            }
            // About `MAX_BATCHES` batches a run at most: their large values
            // are most of its bytes, and in the 10^4-op profiles a share of
            // a third made one seed carry 600 MB and take a minute.
            c.batches = c.batches.min(MAX_BATCHES / c.ops.max(1) as f64);
        }
        c
    }

    /// The liveness allowance for moving `bytes` of difference: four times
    /// what one link carries in that time at its slowest, the lower of its
    /// rate limit and the delta path's (3/4 of a frame per sync interval).
    /// A run whose offered load exceeds what its links carry ends with a
    /// backlog; the allowance lets it drain at a bounded, stated speed.
    pub fn transfer_ms(&self, bytes: u64) -> u64 {
        let sync = self.sync_interval_ms.max(self.hub_sync_interval_ms).max(1);
        let delta_path = (self.max_message_bytes as u64 * 3 / 4) * 1_000 / sync;
        let per_s = self.link_rate.map_or(delta_path, |r| r.min(delta_path)).max(1);
        4 * bytes.saturating_mul(1_000) / per_s
    }

    /// The region of node `i`.
    pub fn region_of(&self, node: usize) -> usize {
        node % self.regions.max(1)
    }

    /// How long the workload phase lasts, in virtual milliseconds.
    pub fn workload_ms(&self) -> u64 {
        ((self.ops as f64 / self.rate.max(0.001)) * 1_000.0).ceil() as u64
    }
}
