//! Bytes on the wire against the state of the art (Enes et al., "Efficient
//! Synchronization of State-based CRDTs", ICDE 2019): 15 nodes in a partial
//! mesh (4 neighbours each) or a binary tree, each doing one update per
//! second for 100 s with a 1 s sync interval.
//!
//! Lattice runs as the real engine (delta-interval with BP+RR, relaying on
//! the partial topology, acks and heartbeats counted). The two baselines run
//! in the same call on the same updates, as synchronous 1 s rounds over the
//! same CRDT values: a state-based sync (every node sends its whole state to
//! every neighbour each round) and a classic delta sync (each node sends the
//! join of everything it created or received since the last round to every
//! neighbour, without removing what a neighbour sent it or what it already
//! had).

use lattice_core::crdt::{Bytes, Crdt, Op, Value, WriteStamp};
use lattice_core::proto::{self, NodeId};
use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
use lattice_core::store::MemoryStore;
use lattice_core::{Error, Key};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};

/// Who talks to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncTopology {
    /// A ring lattice: node i talks to i±1 and i±2.
    Mesh,
    /// A binary tree: node i talks to 2i+1, 2i+2 and its parent.
    Tree,
}

/// What every update does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncWorkload {
    /// One set, every update adds a unique element.
    Gset,
    /// One grow-only counter, every update increments it.
    Gcounter,
    /// 1,000 counters, every update increments 10% of them.
    Gmap10,
    /// 1,000 counters, every update increments all of them.
    Gmap100,
}

/// Bytes each protocol put on the wire.
#[derive(Clone, Debug)]
pub struct SyncFigures {
    /// The setup.
    pub topology: SyncTopology,
    /// The workload.
    pub workload: SyncWorkload,
    /// Lattice: every frame (deltas, acks, heartbeats, anti-entropy).
    pub lattice: u64,
    /// Of which `Delta` frames.
    pub lattice_deltas: u64,
    /// State-based full sync.
    pub state: u64,
    /// Classic delta sync (no BP, no RR).
    pub classic_delta: u64,
}

impl SyncFigures {
    /// The line `lattice-sim bench sync` prints.
    pub fn line(&self) -> String {
        let r = |x: u64| x as f64 / self.lattice.max(1) as f64;
        format!(
            "topology={:?} workload={:?} lattice_bytes={} lattice_delta_bytes={} state_bytes={} classic_delta_bytes={} state/lattice={:.1} classic_delta/lattice={:.1}",
            self.topology,
            self.workload,
            self.lattice,
            self.lattice_deltas,
            self.state,
            self.classic_delta,
            r(self.state),
            r(self.classic_delta)
        )
    }
}

const NODES: usize = 15;

fn neighbours(t: SyncTopology, i: usize) -> Vec<usize> {
    let mut v: Vec<usize> = match t {
        SyncTopology::Mesh => [1, 2, NODES - 1, NODES - 2].iter().map(|d| (i + d) % NODES).collect(),
        SyncTopology::Tree => {
            let mut v: Vec<usize> = [2 * i + 1, 2 * i + 2].into_iter().filter(|&c| c < NODES).collect();
            if i > 0 {
                v.push((i - 1) / 2);
            }
            v
        }
    };
    v.sort_unstable();
    v.dedup();
    v
}

/// The batch of operations of node `i`'s `n`th update.
fn update(w: SyncWorkload, i: usize, n: usize, rng: &mut ChaCha8Rng) -> Result<Vec<(Key, Op)>, Error> {
    Ok(match w {
        SyncWorkload::Gset => vec![(
            Key::new("set")?,
            Op::SetAdd(vec![Bytes(format!("{i}-{n}").into_bytes())]),
        )],
        SyncWorkload::Gcounter => vec![(Key::new("ctr")?, Op::GCounterInc(1))],
        SyncWorkload::Gmap10 | SyncWorkload::Gmap100 => {
            let share = if w == SyncWorkload::Gmap10 { 0.1 } else { 1.0 };
            (0..1_000)
                .filter(|_| rng.gen_bool(share))
                .map(|k| Ok((Key::new(format!("m/{k:03}"))?, Op::GCounterInc(1))))
                .collect::<Result<_, Error>>()?
        }
    })
}

type State = BTreeMap<Key, Value>;

fn join_into(s: &mut State, other: &State) {
    for (k, v) in other {
        match s.get_mut(k) {
            Some(mine) => mine.join(v),
            None => {
                s.insert(k.clone(), v.clone());
            }
        }
    }
}

fn size(s: &State) -> Result<u64, Error> {
    if s.is_empty() {
        return Ok(0);
    }
    let entries: Vec<(&Key, &Value)> = s.iter().collect();
    Ok(proto::to_bytes(&entries)?.len() as u64)
}

/// Runs Lattice and both baselines for `secs` updates per node.
pub fn sync(t: SyncTopology, w: SyncWorkload, secs: usize) -> Result<SyncFigures, Error> {
    let (state, classic) = baselines(t, w, secs)?;
    let (lattice, deltas) = lattice(t, w, secs)?;
    Ok(SyncFigures {
        topology: t,
        workload: w,
        lattice,
        lattice_deltas: deltas,
        state,
        classic_delta: classic,
    })
}

fn baselines(t: SyncTopology, w: SyncWorkload, secs: usize) -> Result<(u64, u64), Error> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut states: Vec<State> = vec![State::new(); NODES];
    let mut classic: Vec<State> = vec![State::new(); NODES];
    let mut buffers: Vec<State> = vec![State::new(); NODES];
    let (mut state_bytes, mut classic_bytes) = (0u64, 0u64);
    // Random 64-bit replica ids, as the engine draws them (small ids would
    // encode in one byte and flatter the baselines).
    let mut id_rng = ChaCha8Rng::seed_from_u64(99);
    let ids: Vec<u64> = (0..NODES).map(|_| id_rng.gen()).collect();
    let rounds = secs + 2 * NODES; // at most; it stops once converged
    for round in 0..rounds {
        if round >= secs && states.windows(2).all(|w| w[0] == w[1]) && classic.windows(2).all(|w| w[0] == w[1]) {
            break; // converged: a state-based sync would go on, but we stop counting
        }
        if round < secs {
            for i in 0..NODES {
                let stamp = WriteStamp {
                    replica: lattice_core::clock::ReplicaId(ids[i]),
                    time: Default::default(),
                };
                for (k, op) in update(w, i, round, &mut rng)? {
                    let d = Value::apply(states[i].get(&k), &op, stamp)?;
                    join_into(&mut states[i], &BTreeMap::from([(k.clone(), d.clone())]));
                    let d2 = Value::apply(classic[i].get(&k), &op, stamp)?;
                    join_into(&mut classic[i], &BTreeMap::from([(k.clone(), d2.clone())]));
                    join_into(&mut buffers[i], &BTreeMap::from([(k, d2)]));
                }
            }
        }
        // State-based: everyone sends its whole state to every neighbour.
        let snapshot = states.clone();
        for (i, s) in snapshot.iter().enumerate() {
            for j in neighbours(t, i) {
                state_bytes += size(s)?;
                join_into(&mut states[j], s);
            }
        }
        // Classic delta: everyone sends its buffer to every neighbour; what
        // arrives is buffered whole for the next round.
        let sent: Vec<State> = buffers.iter_mut().map(std::mem::take).collect();
        for (i, b) in sent.iter().enumerate() {
            for j in neighbours(t, i) {
                classic_bytes += size(b)?;
                join_into(&mut classic[j], b);
                join_into(&mut buffers[j], b);
            }
        }
    }
    if states.windows(2).any(|w| w[0] != w[1]) || classic.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Codec("a baseline did not converge".into()));
    }
    Ok((state_bytes, classic_bytes))
}

fn lattice(t: SyncTopology, w: SyncWorkload, secs: usize) -> Result<(u64, u64), Error> {
    let name = |i: usize| NodeId(format!("n{i:02}"));
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let peers = neighbours(t, i)
            .into_iter()
            .map(|j| PeerConfig::new(name(j), "r"))
            .collect();
        let mut c = ReplicaConfig::new(name(i), "r", peers);
        c.relay = true;
        c.sync_interval_ms = 1_000;
        c.ack_delay_ms = 1_000;
        c.heartbeat_ms = 1_000;
        c.ae_interval_ms = 0;
        c.retransmit_ms = 5_000;
        c.peer_timeout_ms = 10_000;
        let rng = Box::new(ChaCha8Rng::seed_from_u64(i as u64 + 100));
        nodes.push(Replica::open(c, MemoryStore::new(), rng, Time(0))?);
    }
    let index: BTreeMap<NodeId, usize> = (0..NODES).map(|i| (name(i), i)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut wire: VecDeque<(u64, usize, usize, Vec<u8>)> = VecDeque::new();
    let (mut bytes, mut delta_bytes) = (0u64, 0u64);
    let latency = 10;
    let end = (secs as u64 + 2 * NODES as u64) * 1_000;
    for now in 0..end {
        // Updates: node i at second s + i ms, so nodes are not in lockstep.
        for (i, r) in nodes.iter_mut().enumerate() {
            if now % 1_000 == i as u64 && ((now / 1_000) as usize) < secs {
                r.write(Time(now), update(w, i, (now / 1_000) as usize, &mut rng)?)?;
            }
        }
        while wire.front().is_some_and(|(at, ..)| *at <= now) {
            if let Some((_, from, to, frame)) = wire.pop_front() {
                nodes[to].handle(Time(now), &name(from), &frame)?;
            }
        }
        for (i, r) in nodes.iter_mut().enumerate() {
            if r.poll_timeout().is_some_and(|d| d <= Time(now)) {
                r.handle_timeout(Time(now))?;
            }
            if r.needs_flush() {
                r.flush(Time(now))?;
            }
            while r.poll_event().is_some() {}
            while let Some(tx) = r.poll_transmit() {
                bytes += tx.payload.len() as u64;
                if std::env::var_os("SYNC_TRACE").is_some() {
                    eprintln!("{now} n{i} -> {} {} {}", tx.to, tx.kind, tx.payload.len());
                }
                if tx.kind == "delta" {
                    delta_bytes += tx.payload.len() as u64;
                }
                if let Some(&to) = index.get(&tx.to) {
                    wire.push_back((now + latency, i, to, tx.payload));
                }
            }
        }
    }
    let digests: Vec<u128> = nodes.iter().map(Replica::digest).collect();
    if digests.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Codec("Lattice did not converge".into()));
    }
    Ok((bytes, delta_bytes))
}
