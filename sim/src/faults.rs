//! Fault schedules: what breaks, when, and when it mends, drawn from the seed.

use crate::config::SimConfig;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One scheduled fault action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Take directed links down.
    Block(Vec<(usize, usize)>),
    /// Bring directed links back.
    Unblock(Vec<(usize, usize)>),
    /// Crash a node (it loses what it had not flushed).
    Crash(usize),
    /// Crash a node and destroy its disk.
    Wipe(usize),
    /// Restart a crashed node on what its disk holds.
    Restart(usize),
    /// Set a node's wall clock offset (ms).
    Skew(usize, i64),
    /// Stop a node from processing anything for a while (ms).
    Pause(usize, u64),
    /// Keep a copy of what a node's disk holds now.
    Snapshot(usize),
    /// Crash a node and put back the disk copy its last `Snapshot` took.
    Rollback(usize),
    /// Peer `from` sends node `to` a hostile value of the given kind (see
    /// `Sim::inject_hostile`), which `to` must refuse.
    Hostile {
        /// The hostile peer.
        from: usize,
        /// The node it sends to.
        to: usize,
        /// Which hostile value (below [`HOSTILE_KINDS`]).
        kind: u8,
    },
}

fn both_ways(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for &x in a {
        for &y in b {
            v.push((x, y));
            v.push((y, x));
        }
    }
    v
}

/// Draws the fault schedule for a workload phase of `w` ms. Every fault
/// that starts also ends by `w`, when the runner heals whatever is left.
pub fn schedule(cfg: &SimConfig, rng: &mut ChaCha8Rng, w: u64) -> Vec<(u64, FaultAction)> {
    let mut out = Vec::new();
    let n = cfg.nodes;
    let f = &cfg.faults;
    if w == 0 || n == 0 {
        return out;
    }
    let episodes = 1 + (w / 4_000) as usize;
    let window = |rng: &mut ChaCha8Rng, max: u64| {
        let start = rng.gen_range(0..w);
        (start, (start + rng.gen_range(100..=max)).min(w))
    };
    let all: Vec<usize> = (0..n).collect();
    if f.partitions && n >= 2 {
        for _ in 0..episodes {
            let (s, e) = window(rng, 5_000);
            let mut nodes = all.clone();
            nodes.shuffle(rng);
            let cut = rng.gen_range(1..n);
            let links = both_ways(&nodes[..cut], &nodes[cut..]);
            out.push((s, FaultAction::Block(links.clone())));
            out.push((e, FaultAction::Unblock(links)));
        }
    }
    if f.one_way && n >= 2 {
        for _ in 0..episodes {
            let (s, e) = window(rng, 5_000);
            let a = rng.gen_range(0..n);
            let b = (a + rng.gen_range(1..n)) % n;
            out.push((s, FaultAction::Block(vec![(a, b)])));
            out.push((e, FaultAction::Unblock(vec![(a, b)])));
        }
    }
    if f.isolate_region && cfg.regions >= 2 {
        let (s, e) = window(rng, 8_000);
        let r = rng.gen_range(0..cfg.regions);
        let (inside, outside): (Vec<usize>, Vec<usize>) = all.iter().partition(|&&i| cfg.region_of(i) == r);
        let links = both_ways(&inside, &outside);
        out.push((s, FaultAction::Block(links.clone())));
        out.push((e, FaultAction::Unblock(links)));
    }
    if f.flapping && n >= 2 {
        let (s, e) = window(rng, 4_000);
        let a = rng.gen_range(0..n);
        let b = (a + rng.gen_range(1..n)) % n;
        let links = both_ways(&[a], &[b]);
        let mut t = s;
        while t < e {
            let up = (t + rng.gen_range(30..300)).min(e);
            out.push((t, FaultAction::Block(links.clone())));
            out.push((up, FaultAction::Unblock(links.clone())));
            t = up + rng.gen_range(30..300);
        }
    }
    for (enabled, wipe) in [(f.crashes, false), (f.disk_loss, true)] {
        if !enabled {
            continue;
        }
        for _ in 0..episodes {
            let (s, e) = window(rng, 3_000);
            let i = rng.gen_range(0..n);
            out.push((
                s,
                if wipe {
                    FaultAction::Wipe(i)
                } else {
                    FaultAction::Crash(i)
                },
            ));
            out.push((e, FaultAction::Restart(i)));
        }
    }
    if f.clock_skew {
        for i in 0..n {
            if rng.gen_bool(0.5) {
                // From a few milliseconds to 25 s, either way: two nodes
                // then differ by at most 50 s, inside the engine's 60 s
                // bound. (Beyond it, a node's LWW writes wait at its peers
                // until their clocks catch up: an operating limit, tested
                // in core, not a fault the cluster can converge through.)
                let magnitude = 10f64.powf(rng.gen_range(0.0..4.4)) as i64;
                let sign = if rng.gen_bool(0.5) { 1 } else { -1 };
                out.push((rng.gen_range(0..w), FaultAction::Skew(i, sign * magnitude)));
            }
        }
    }
    if f.pauses {
        for _ in 0..episodes {
            let at = rng.gen_range(0..w);
            out.push((at, FaultAction::Pause(rng.gen_range(0..n), rng.gen_range(50..3_000))));
        }
    }
    if f.rollback {
        for _ in 0..episodes {
            let (s, e) = window(rng, 3_000);
            let i = rng.gen_range(0..n);
            out.push((rng.gen_range(0..=s), FaultAction::Snapshot(i)));
            out.push((s, FaultAction::Rollback(i)));
            out.push((e, FaultAction::Restart(i)));
        }
    }
    if f.hostile && n >= 2 {
        for _ in 0..episodes * 3 {
            let at = rng.gen_range(0..w);
            let from = rng.gen_range(0..n);
            let to = (from + rng.gen_range(1..n)) % n;
            let kind = rng.gen_range(0..HOSTILE_KINDS);
            out.push((at, FaultAction::Hostile { from, to, kind }));
        }
    }
    out
}

/// How many kinds of hostile value `FaultAction::Hostile` sends.
pub const HOSTILE_KINDS: u8 = 4;
