//! Benchmarks that run the real engine in-process, outside the swarm.

use lattice_core::clock::ReplicaId;
use lattice_core::crdt::Op;
use lattice_core::proto::{self, NodeId, RegionId};
use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
use lattice_core::store::{MemoryStore, Meta, Store, WriteBatch};
use lattice_core::{Error, Key};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// What one anti-entropy repair cost.
#[derive(Clone, Debug)]
pub struct RepairFigures {
    /// Keys on each node.
    pub keys: usize,
    /// Keys that differ.
    pub diff: usize,
    /// Anti-entropy rounds it took.
    pub rounds: u64,
    /// Anti-entropy messages exchanged (including the final confirmation).
    pub messages: usize,
    /// Sequential message hops until the states were equal, / 2.
    pub round_trips: f64,
    /// Bytes of anti-entropy frames.
    pub bytes: usize,
    /// Encoded size of the differing keys' final states.
    pub diff_state_bytes: usize,
    /// Encoded size of every state (what a full-state sync would send).
    pub full_state_bytes: usize,
    /// Wall time of the repair, in milliseconds.
    pub millis: f64,
}

impl RepairFigures {
    /// The line `lattice-sim bench repair` prints.
    pub fn line(&self) -> String {
        let ratio = if self.diff_state_bytes == 0 {
            0.0
        } else {
            self.bytes as f64 / self.diff_state_bytes as f64
        };
        format!(
            "keys={} diff={} rounds={} messages={} round_trips={} ae_bytes={} diff_state_bytes={} ae/diff={:.2} full_state_bytes={} full/ae={:.0} ms={:.1}",
            self.keys,
            self.diff,
            self.rounds,
            self.messages,
            self.round_trips,
            self.bytes,
            self.diff_state_bytes,
            ratio,
            self.full_state_bytes,
            self.full_state_bytes as f64 / self.bytes.max(1) as f64,
            self.millis
        )
    }
}

fn config(me: usize, depth: u8) -> ReplicaConfig {
    let other = 1 - me;
    let peer = PeerConfig::new(NodeId(format!("n{other}")), RegionId("r".into()));
    let mut c = ReplicaConfig::new(format!("n{me}"), "r", vec![peer]);
    c.tree_depth = depth;
    c.ae_interval_ms = 0;
    c.retransmit_ms = 3_600_000;
    c.max_pending_writes = usize::MAX;
    c
}

fn key(i: usize) -> Result<Key, Error> {
    Key::new(format!("key:{i:08}"))
}

/// Two replicas with `keys` equal keys, `diff` of which are then changed on
/// one side only; one repair round from the other side. Deterministic.
pub fn repair(keys: usize, diff: usize, depth: u8) -> Result<RepairFigures, Error> {
    let rng = |s: u64| Box::new(ChaCha8Rng::seed_from_u64(s));
    let mut a = Replica::open(config(0, depth), MemoryStore::new(), rng(1), Time(0))?;
    let batch = 1_000;
    for start in (0..keys).step_by(batch) {
        let ops = (start..(start + batch).min(keys))
            .map(|i| Ok((key(i)?, Op::CounterAdd(1))))
            .collect::<Result<Vec<_>, Error>>()?;
        a.write(Time(0), ops)?;
        a.flush(Time(0))?;
        while a.poll_event().is_some() {}
        while a.poll_transmit().is_some() {}
    }
    // B holds everything A wrote so far: A's buffer may go.
    let groups = keys.div_ceil(batch) as u64;
    let ack = proto::encode(&proto::Message::Ack(proto::Ack {
        replica: a.id(),
        from: ReplicaId(0xb),
        upto: [groups; proto::CLASSES],
    }))?;
    let hb = proto::encode(&proto::Message::Heartbeat {
        sender: ReplicaId(0xb),
        time: Default::default(),
        policy: proto::PolicyStamp::of(&Default::default()),
        hello: false,
    })?;
    a.handle(Time(0), &NodeId("n1".into()), &hb)?;
    a.handle(Time(0), &NodeId("n1".into()), &ack)?;
    a.flush(Time(0))?;
    while a.poll_transmit().is_some() {}
    // B starts as an exact copy of A's state under its own identity.
    let mut store_b = a.store().clone();
    store_b.apply(WriteBatch {
        meta: Some(Meta {
            replica: ReplicaId(0xb),
            next_seq: 0,
            clean: false,
            async_life: false,
        }),
        ..WriteBatch::default()
    })?;
    store_b.flush()?;
    let mut b = Replica::open(config(1, depth), store_b, rng(2), Time(0))?;
    // The difference: writes on A whose deltas never reach B.
    for start in (0..diff).step_by(batch) {
        let ops = (start..(start + batch).min(diff))
            .map(|i| Ok((key(i * (keys / diff.max(1)).max(1) % keys.max(1))?, Op::CounterAdd(1))))
            .collect::<Result<Vec<_>, Error>>()?;
        a.write(Time(0), ops)?;
    }
    a.flush(Time(0))?;
    while a.poll_event().is_some() {}
    while a.poll_transmit().is_some() {}
    while b.poll_transmit().is_some() {}
    let full_state_bytes = {
        let mut total = 0usize;
        let mut err = None;
        a.store().scan_all(&mut |k, v| match proto::to_bytes(v) {
            Ok(e) => total += e.len() + k.as_str().len(),
            Err(e) => err = Some(e),
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        total
    };
    // Heartbeats both ways, so each side sees the other live.
    let (na, nb) = (NodeId("n0".into()), NodeId("n1".into()));
    let hb_a = proto::encode(&proto::Message::Heartbeat {
        sender: a.id(),
        time: Default::default(),
        policy: proto::PolicyStamp::of(&Default::default()),
        hello: false,
    })?;
    b.handle(Time(1), &na, &hb_a)?;
    b.repair_with(Time(1), &na)?;
    let started = Instant::now();
    let (mut messages, mut bytes, mut hops, mut converged_hops) = (0usize, 0usize, 0usize, None);
    let mut now = 1;
    // Each round repairs at most `max_ae_fanout` leaves; a repair repeats
    // every `retransmit_ms` until one round completes after the need.
    b.handle_timeout(Time(now))?;
    for _ in 0..10_000 {
        let mut moved = false;
        for from_b in [true, false] {
            let (src, dst, from) = if from_b {
                (&mut b, &mut a, &nb)
            } else {
                (&mut a, &mut b, &na)
            };
            src.flush(Time(now))?;
            let mut frames = Vec::new();
            while let Some(t) = src.poll_transmit() {
                if t.kind.starts_with("ae_") {
                    frames.push(t);
                }
            }
            if !frames.is_empty() {
                hops += 1;
                moved = true;
            }
            for t in frames {
                messages += 1;
                bytes += t.payload.len();
                dst.handle(Time(now), from, &t.payload)?;
            }
        }
        if converged_hops.is_none() && a.digest() == b.digest() {
            converged_hops = Some(hops);
        }
        now += 1;
        if !moved {
            if converged_hops.is_some() {
                break;
            }
            // The round ended short of convergence: the next one starts.
            now += 3_600_000;
            b.handle(Time(now), &na, &hb_a)?; // still live
            b.handle_timeout(Time(now))?;
        }
    }
    let rounds = b.stats().ae_rounds;
    let millis = started.elapsed().as_secs_f64() * 1_000.0;
    if a.digest() != b.digest() {
        return Err(Error::Store("the repair did not converge".into()));
    }
    let mut diff_state_bytes = 0;
    for i in 0..diff {
        let k = key(i * (keys / diff.max(1)).max(1) % keys.max(1))?;
        if let Some(v) = a.read(&k)? {
            diff_state_bytes += proto::to_bytes(&v)?.len() + k.as_str().len();
        }
    }
    let round_trips = converged_hops.unwrap_or(hops) as f64 / 2.0;
    Ok(RepairFigures {
        keys,
        diff,
        rounds,
        messages,
        round_trips,
        bytes,
        diff_state_bytes,
        full_state_bytes,
        millis,
    })
}

/// Gossip efficiency under the Gossip Glomers broadcast conditions: `nodes`
/// nodes, `latency_ms` one-way latency on every link, `rate` unique
/// broadcasts per second for `secs` seconds, no faults. A star: node 0
/// relays, batching what it forwards every `hub_ms`. Returns the run (whose
/// checkers must pass) and `(messages per op, median ms, max ms)`.
pub fn gossip(nodes: usize, latency_ms: u64, rate: f64, secs: u64, hub_ms: u64) -> (crate::Report, (f64, u64, u64)) {
    let mut c = crate::SimConfig::new(7);
    c.nodes = nodes;
    c.regions = 1;
    c.ops = (rate * secs as f64).round() as usize;
    c.rate = rate;
    c.intra_ms = (latency_ms, latency_ms);
    c.inter_ms = (latency_ms, latency_ms);
    c.faults = crate::FaultMix::none();
    c.broadcast = true;
    c.topology = crate::config::Topology::Star;
    c.ae_interval_ms = 0;
    c.sync_interval_ms = 1;
    c.hub_sync_interval_ms = hub_ms;
    c.ack_delay_ms = 1_000;
    c.heartbeat_ms = 1_000;
    c.flush_ms = 1;
    let report = crate::Sim::new(c.clone()).run();
    let per_op = report.messages as f64 / c.ops.max(1) as f64;
    let (median, max) = report.propagation.map_or((0, 0), |(p50, _, max)| (p50, max));
    (report, (per_op, median, max))
}

/// Convergence after a partition heals (issue #7, section 5): one node per
/// region, `latency_ms` one way between regions, region 0 cut off from the
/// others for `partition_ms` while every node takes writes at `rate` per
/// second (cluster-wide), then the heal. Returns the run and
/// `(converged ms after the heal, the physical floor in ms, bytes that had
/// to cross)`. The floor is one round trip plus the differing states at
/// `link_rate` bytes per second (unlimited: the round trip alone).
pub fn heal(
    regions: usize,
    latency_ms: u64,
    partition_ms: u64,
    rate: f64,
    link_rate: Option<u64>,
) -> (crate::Report, (Option<u64>, u64, u64)) {
    let mut c = crate::SimConfig::new(11);
    c.nodes = regions.max(2);
    c.regions = regions.max(2);
    c.rate = rate;
    c.ops = (rate * partition_ms as f64 / 1_000.0).round() as usize;
    c.inter_ms = (latency_ms, latency_ms);
    c.intra_ms = (1, 1);
    c.faults = crate::FaultMix::none();
    c.link_rate = link_rate;
    let others: Vec<usize> = (1..c.nodes).collect();
    let mut cut = Vec::new();
    for &o in &others {
        cut.push((0, o));
        cut.push((o, 0));
    }
    c.script = vec![(0, crate::faults::FaultAction::Block(cut))];
    let report = crate::Sim::new(c).run();
    let transfer_ms = link_rate.map_or(0, |r| report.diff_bytes_at_heal * 1_000 / r.max(1));
    let floor = 2 * latency_ms + transfer_ms;
    let figures = (report.converged_ms, floor, report.diff_bytes_at_heal);
    (report, figures)
}
