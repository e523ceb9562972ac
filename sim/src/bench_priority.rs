//! The priority scenario: one rate-limited link between two regions, a
//! workload of `critical`, `normal` and `bulk` keyspaces that together
//! offer more than the link carries, and the propagation latency of each
//! class. The same run with every keyspace at one priority is the FIFO
//! baseline.

use lattice_core::crdt::{Bytes, Op};
use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
use lattice_core::proto::NodeId;
use lattice_core::replica::{Event, PeerConfig, Replica, ReplicaConfig, Time};
use lattice_core::store::MemoryStore;
use lattice_core::{Error, Key};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};

/// Writes per second per class, and value sizes per class.
const WRITES_PER_SEC: u64 = 50;
const SIZES: [usize; 3] = [100, 1_000, 4_000];

/// Latency of one class.
#[derive(Clone, Debug, Default)]
pub struct ClassFigures {
    /// Writes issued.
    pub writes: usize,
    /// Writes that reached the other region before the run ended.
    pub delivered: usize,
    /// Propagation latency p50, p99, max (ms) over delivered writes.
    pub latency: (u64, u64, u64),
}

/// One run of the scenario.
#[derive(Clone, Debug)]
pub struct PriorityFigures {
    /// Whether keyspaces had their priorities (false: all `normal`).
    pub prioritized: bool,
    /// The link's limit, bytes per second.
    pub rate: u64,
    /// Offered load, bytes of values per second.
    pub offered: u64,
    /// Bytes the sender put on the link per second of the write phase.
    pub sent_per_sec: u64,
    /// Per class: critical, normal, bulk.
    pub classes: [ClassFigures; 3],
}

impl PriorityFigures {
    /// The lines `lattice-sim bench priority` prints.
    pub fn lines(&self) -> Vec<String> {
        let mode = if self.prioritized {
            "priorities"
        } else {
            "fifo-baseline"
        };
        Priority::ALL
            .iter()
            .zip(&self.classes)
            .map(|(p, c)| {
                format!(
                    "mode={mode} link={}B/s offered={}B/s sent={}B/s class={} writes={} delivered={} p50_ms={} p99_ms={} max_ms={}",
                    self.rate,
                    self.offered,
                    self.sent_per_sec,
                    p.name(),
                    c.writes,
                    c.delivered,
                    c.latency.0,
                    c.latency.1,
                    c.latency.2
                )
            })
            .collect()
    }
}

fn replica(
    me: &str,
    region: &str,
    other: &str,
    other_region: &str,
    rate: u64,
    policy: &PolicySet,
) -> Result<Replica<MemoryStore>, Error> {
    let mut peer = PeerConfig::new(other, other_region);
    peer.rate_limit = Some(rate);
    let mut c = ReplicaConfig::new(me, region, vec![peer]);
    c.policy = policy.clone();
    c.ae_interval_ms = 0;
    c.sync_interval_ms = 20;
    c.max_buffer_bytes = 1 << 30;
    let seed = u64::from(me.as_bytes()[0]);
    Replica::open(
        c,
        MemoryStore::new(),
        Box::new(ChaCha8Rng::seed_from_u64(seed)),
        Time(0),
    )
}

/// Runs `secs` seconds of writes from region `eu` to `us` over a link of
/// `rate` bytes per second with `latency_ms` one way, then up to `drain_secs`
/// more for the backlog. Deterministic (virtual time, 1 ms steps).
pub fn priority(
    rate: u64,
    secs: u64,
    drain_secs: u64,
    latency_ms: u64,
    prioritized: bool,
) -> Result<PriorityFigures, Error> {
    let classes = ["crit/", "norm/", "bulk/"];
    let policies = classes
        .iter()
        .zip(Priority::ALL)
        .map(|(ks, p)| Policy::new(*ks, Regions::All, if prioritized { p } else { Priority::Normal }))
        .collect();
    let policy = PolicySet::new(1, policies)?;
    let mut a = replica("eu-1", "eu", "us-1", "us", rate, &policy)?;
    let mut b = replica("us-1", "us", "eu-1", "eu", rate, &policy)?;
    let (na, nb) = (NodeId::from("eu-1"), NodeId::from("us-1"));
    let mut to_b: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut to_a: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut written: BTreeMap<Key, (usize, u64)> = BTreeMap::new();
    let mut figures: [Vec<u64>; 3] = Default::default();
    let mut writes = [0usize; 3];
    let mut sent_bytes = 0u64;
    let end_writes = secs * 1_000;
    let end = end_writes + drain_secs * 1_000;
    let period = 1_000 / WRITES_PER_SEC;
    for t in 0..end {
        let now = Time(t);
        if t < end_writes && t % period == 0 {
            for (c, ks) in classes.iter().enumerate() {
                let key = Key::new(format!("{ks}{t:09}"))?;
                let mut value = vec![b'x'; SIZES[c]];
                value[..8].copy_from_slice(&t.to_be_bytes());
                a.write(now, vec![(key.clone(), Op::LwwSet(Bytes(value)))])?;
                written.insert(key, (c, t));
                writes[c] += 1;
            }
            a.flush(now)?;
        }
        while to_b.front().is_some_and(|(at, _)| *at <= t) {
            if let Some((_, f)) = to_b.pop_front() {
                b.handle(now, &na, &f)?;
            }
        }
        while to_a.front().is_some_and(|(at, _)| *at <= t) {
            if let Some((_, f)) = to_a.pop_front() {
                a.handle(now, &nb, &f)?;
            }
        }
        for r in [&mut a, &mut b] {
            if r.poll_timeout().is_some_and(|d| d <= now) {
                r.handle_timeout(now)?;
            }
            if r.needs_flush() {
                r.flush(now)?;
            }
        }
        while let Some(tx) = a.poll_transmit() {
            if t < end_writes {
                sent_bytes += tx.payload.len() as u64;
            }
            to_b.push_back((t + latency_ms, tx.payload));
        }
        while let Some(tx) = b.poll_transmit() {
            to_a.push_back((t + latency_ms, tx.payload));
        }
        while a.poll_event().is_some() {}
        while let Some(e) = b.poll_event() {
            if let Event::RemoteApplied { key, .. } = e {
                if let Some((c, at)) = written.remove(&key) {
                    figures[c].push(t - at);
                }
            }
        }
        if t >= end_writes && written.is_empty() {
            break;
        }
    }
    let mut out: [ClassFigures; 3] = Default::default();
    for c in 0..3 {
        let lat = &mut figures[c];
        lat.sort_unstable();
        let q = |p: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        out[c] = ClassFigures {
            writes: writes[c],
            delivered: lat.len(),
            latency: (q(0.5), q(0.99), lat.last().copied().unwrap_or(0)),
        };
    }
    Ok(PriorityFigures {
        prioritized,
        rate,
        offered: WRITES_PER_SEC * SIZES.iter().sum::<usize>() as u64,
        sent_per_sec: sent_bytes / secs.max(1),
        classes: out,
    })
}
