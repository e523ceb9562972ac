//! The network model: per-link latency with jitter (which also reorders),
//! loss, duplication and directed link blocking for partitions.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// Link state of the simulated network.
#[derive(Clone, Debug, Default)]
pub struct Network {
    /// Directed links `(from, to)` that drop everything, with a count of the
    /// faults holding them down (overlapping partitions nest).
    blocked: BTreeMap<(usize, usize), u32>,
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplication: f64,
    /// Probability a delivered message has one bit flipped.
    pub bit_flips: f64,
}

impl Network {
    /// A network with no link down and the given loss and duplication.
    pub fn new(loss: f64, duplication: f64, bit_flips: f64) -> Self {
        Network {
            blocked: BTreeMap::new(),
            loss,
            duplication,
            bit_flips,
        }
    }

    /// Flips one random bit of `payload` with probability `bit_flips`
    /// (drawn from `rng`, the corruption stream, so runs without flips
    /// draw nothing). Returns whether it did.
    pub fn maybe_flip(&self, rng: &mut ChaCha8Rng, payload: &mut [u8]) -> bool {
        if self.bit_flips <= 0.0 || payload.is_empty() || !rng.gen_bool(self.bit_flips.min(1.0)) {
            return false;
        }
        let bit = rng.gen_range(0..payload.len() * 8);
        payload[bit / 8] ^= 1 << (bit % 8);
        true
    }

    /// Takes the directed link down (once more).
    pub fn block(&mut self, from: usize, to: usize) {
        *self.blocked.entry((from, to)).or_insert(0) += 1;
    }

    /// Releases one hold on the directed link.
    pub fn unblock(&mut self, from: usize, to: usize) {
        if let Some(n) = self.blocked.get_mut(&(from, to)) {
            *n -= 1;
            if *n == 0 {
                self.blocked.remove(&(from, to));
            }
        }
    }

    /// Whether the directed link is down.
    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains_key(&(from, to))
    }

    /// Heals everything.
    pub fn heal(&mut self) {
        self.blocked.clear();
        self.loss = 0.0;
        self.duplication = 0.0;
        self.bit_flips = 0.0;
    }

    /// Delivery delays for one message: empty if lost, two if duplicated.
    pub fn delays(&self, rng: &mut ChaCha8Rng, from: usize, to: usize, base: (u64, u64)) -> Vec<u64> {
        if self.is_blocked(from, to) || (self.loss > 0.0 && rng.gen_bool(self.loss.min(1.0))) {
            return Vec::new();
        }
        let mut out = vec![rng.gen_range(base.0..=base.1.max(base.0))];
        if self.duplication > 0.0 && rng.gen_bool(self.duplication.min(1.0)) {
            out.push(rng.gen_range(base.0..=base.1.max(base.0) * 3));
        }
        out
    }
}
