//! Merkle anti-entropy: digests exchanged top-down, alternating sides, until
//! only differing leaves remain; then their items, then the differing states.
//!
//! Each message is self-contained (no session state), so loss or duplication
//! of any step only ends or repeats that round. A round with equal roots
//! costs one message; one differing key among a million costs
//! `depth + 4` messages of a few hundred bytes each.

use super::merkle::{item_hash, FANOUT};
use super::{Replica, Time};
use crate::crdt::{Bytes, Value};
use crate::key::Key;
use crate::proto::{Message, NodeId, RegionId, RoundId};
use crate::store::Store;
use crate::Error;
use std::collections::BTreeSet;

/// At most this many `AeStates` frames answer one anti-entropy step.
pub(crate) const AE_STATE_FRAMES: usize = 8;

impl<S: Store> Replica<S> {
    /// Starts a round with `peer` by sending the digests of the root's
    /// children: equal roots cost this one message and the answer, and a
    /// difference saves the round trip a root-only opening would take.
    pub(super) fn start_anti_entropy(&mut self, now: Time, peer: &NodeId) -> Result<(), Error> {
        let Some(p) = self.peers.get(peer) else {
            return Err(Error::UnknownPeer(peer.0.clone()));
        };
        // Not while the peer holds another policy set, nor while its link
        // owes more than a frame: the repair is retried later.
        if p.policy_seen != Some(self.policy_stamp) || self.link_deep_in_debt(peer, now) {
            return Ok(());
        }
        self.stats.ae_rounds += 1;
        if let Some(p) = self.peers.get_mut(peer) {
            p.rx_at_round = p.rx_bytes;
        }
        let round = RoundId {
            initiator: self.id,
            epoch: self.epoch,
            seq: self.next_round,
            through: self.durable_seq,
            partial: false,
        };
        self.next_round += 1;
        let region = self.peer_region(peer)?;
        let msg = Message::AeTree {
            round,
            depth: self.tree.depth(),
            level: 1,
            parents: vec![0],
            digests: self.children_digests(&region, 1, &[0]),
        };
        self.queue(peer, &msg, now)
    }

    fn peer_region(&self, peer: &NodeId) -> Result<RegionId, Error> {
        self.peers
            .get(peer)
            .map(|p| p.cfg.region.clone())
            .ok_or_else(|| Error::UnknownPeer(peer.0.clone()))
    }

    /// Digests over the keys `region` may hold only: no other key's
    /// existence or change shows in them.
    fn children_digests(&self, region: &RegionId, level: u8, parents: &[u32]) -> Bytes {
        let mut out = Vec::with_capacity(parents.len() * FANOUT as usize * 16);
        for &p in parents {
            for c in 0..FANOUT {
                out.extend_from_slice(&self.tree.digest_for(region, level, p * FANOUT + c).to_le_bytes());
            }
        }
        Bytes(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_ae_tree(
        &mut self,
        now: Time,
        from: &NodeId,
        round: RoundId,
        depth: u8,
        level: u8,
        parents: &[u32],
        digests: &Bytes,
    ) -> Result<(), Error> {
        if depth != self.tree.depth() {
            return Err(Error::Codec(format!(
                "anti-entropy tree depth {depth}, ours is {}",
                self.tree.depth()
            )));
        }
        let region = self.peer_region(from)?;
        let theirs = digests.as_slice().chunks_exact(16).map(|c| {
            let mut b = [0u8; 16];
            b.copy_from_slice(c);
            u128::from_le_bytes(b)
        });
        // The nodes at `level` whose digests differ.
        let mut differing: Vec<u32> = Vec::new();
        if level == 0 {
            if theirs.clone().next() != Some(self.tree.digest_for(&region, 0, 0)) {
                differing.push(0);
            }
        } else {
            if level > depth || digests.as_slice().len() != parents.len() * FANOUT as usize * 16 {
                return Err(Error::Codec("malformed anti-entropy digests".into()));
            }
            let width = self.tree.width(level);
            let indices = parents
                .iter()
                .flat_map(|&p| (0..FANOUT).map(move |c| p.wrapping_mul(FANOUT).wrapping_add(c)));
            for (i, d) in indices.zip(theirs) {
                if i < width && self.tree.digest_for(&region, level, i) != d {
                    differing.push(i);
                }
            }
        }
        let mut round = round;
        // The next level's digests (16 bytes for each of a node's FANOUT
        // children) must fit half a frame, whatever the frame size. At the
        // leaves, what must fit is their items (the byte budget below): a
        // leaf holds a few keys, and a wiped peer differs in every leaf, so
        // a digest-sized limit there would repair a handful of keys a round.
        let limit = if level < depth {
            let fits = (self.cfg.max_message_bytes / 2 / (FANOUT as usize * 16 + 8)).max(1);
            self.cfg.max_ae_fanout.min(fits)
        } else {
            self.cfg.max_ae_fanout
        };
        if differing.len() > limit {
            differing.truncate(limit);
            round.partial = true;
        }
        if differing.is_empty() {
            // A round opens at level 1: nothing differs there, roots are equal.
            return if level <= 1 {
                // Equal here means equal as applied: confirm once durable.
                self.queue_durable(from, &Message::AeInSync { round }, now)
            } else {
                Ok(())
            };
        }
        if level < depth {
            let msg = Message::AeTree {
                round,
                depth,
                level: level + 1,
                parents: differing.clone(),
                digests: self.children_digests(&region, level + 1, &differing),
            };
            return self.queue(from, &msg, now);
        }
        let mut items = Vec::with_capacity(differing.len());
        let (budget, mut bytes) = (self.cfg.max_message_bytes / 2, 0);
        for (n, &leaf) in differing.iter().enumerate() {
            let mut blob: Vec<u8> = self
                .leaf_items(from, leaf)?
                .into_iter()
                .flat_map(|(k, h)| k.to_le_bytes().into_iter().chain(h.to_le_bytes()))
                .collect();
            if blob.len() > budget {
                // One leaf with more keys than a frame lists: the rest of
                // it waits for a later round (keys left out only make the
                // peer send states we may already have).
                blob.truncate(budget / 16 * 16);
                round.partial = true;
            }
            bytes += blob.len() + 8;
            if bytes > budget && n > 0 {
                // The rest waits for the next round.
                round.partial = true;
                break;
            }
            items.push(Bytes(blob));
        }
        differing.truncate(items.len());
        self.queue(
            from,
            &Message::AeLeaves {
                round,
                leaves: differing,
                items,
            },
            now,
        )
    }

    /// `(key hash, item hash)` of every key in a leaf that may go to `peer`.
    fn leaf_items(&self, peer: &NodeId, leaf: u32) -> Result<Vec<(u64, u64)>, Error> {
        let (lo, hi) = self.tree.leaf_buckets(leaf);
        let cfg = &self
            .peers
            .get(peer)
            .ok_or_else(|| Error::UnknownPeer(peer.0.clone()))?
            .cfg;
        let mut out = Vec::new();
        for (k, v) in self.store.scan_buckets(lo, hi)? {
            if self.may_send(cfg, &k) {
                out.push((k.hash().0, item_hash(&k, &v)? as u64));
            }
        }
        Ok(out)
    }

    pub(super) fn on_ae_leaves(
        &mut self,
        now: Time,
        from: &NodeId,
        round: RoundId,
        leaves: &[u32],
        items: &[Bytes],
    ) -> Result<(), Error> {
        if leaves.len() != items.len() || leaves.len() > self.cfg.max_ae_fanout {
            return Err(Error::Codec("malformed anti-entropy leaves".into()));
        }
        if leaves.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Codec("anti-entropy leaves must be strictly increasing".into()));
        }
        let width = self.tree.width(self.tree.depth());
        let mut send: Vec<(Key, Value)> = Vec::new();
        let mut want: Vec<u64> = Vec::new();
        for (&leaf, blob) in leaves.iter().zip(items) {
            if leaf >= width || blob.as_slice().len() % 16 != 0 {
                return Err(Error::Codec("malformed anti-entropy leaf".into()));
            }
            let theirs: BTreeSet<(u64, u64)> = blob
                .as_slice()
                .chunks_exact(16)
                .map(|c| {
                    let mut k = [0u8; 8];
                    let mut h = [0u8; 8];
                    k.copy_from_slice(&c[..8]);
                    h.copy_from_slice(&c[8..]);
                    (u64::from_le_bytes(k), u64::from_le_bytes(h))
                })
                .collect();
            let (lo, hi) = self.tree.leaf_buckets(leaf);
            let cfg = self
                .peers
                .get(from)
                .ok_or_else(|| Error::UnknownPeer(from.0.clone()))?
                .cfg
                .clone();
            let mut mine = BTreeSet::new();
            for (k, v) in self.store.scan_buckets(lo, hi)? {
                if !self.may_send(&cfg, &k) {
                    continue;
                }
                let item = (k.hash().0, item_hash(&k, &v)? as u64);
                mine.insert(item);
                if !theirs.contains(&item) {
                    send.push((k, v));
                }
            }
            want.extend(theirs.difference(&mine).map(|(k, _)| *k));
        }
        want.sort_unstable();
        want.dedup();
        self.send_states(now, from, round, send, want, true)
    }

    /// Sends the states of one anti-entropy answer (with `want` in the
    /// first frame): up to [`AE_STATE_FRAMES`] `AeStates` frames of at most
    /// 3/4 of a frame each. What does not fit waits for the next round,
    /// which follows soon because the round is then marked partial (see
    /// `repair_done`). A state larger than a frame travels in pieces of a
    /// join-decomposition ([`Value::split`]); each round starts from
    /// another piece, so every piece arrives within a few rounds. A piece
    /// that fits no frame on its own (writes refuse to build one, so only a
    /// hostile or misconfigured peer can cause it) is counted and logged.
    ///
    /// Frames after the first are sent as the round's last states (no
    /// answer but an `AeDone`), and all frames of a multi-frame answer mark
    /// the round partial: it never moves `acked` before every frame landed.
    fn send_states(
        &mut self,
        now: Time,
        to: &NodeId,
        round: RoundId,
        entries: Vec<(Key, Value)>,
        want: Vec<u64>,
        reply: bool,
    ) -> Result<(), Error> {
        let mut round = round;
        let frame_budget = self.cfg.max_message_bytes * 3 / 4;
        // The hashes wanted take at most a quarter of the first frame (9
        // bytes each); the rest waits for a later round.
        let mut want = want;
        let max_want = (frame_budget / 4 / 9).max(1);
        if want.len() > max_want {
            want.truncate(max_want);
            round.partial = true;
        }
        // Frames after the first only while the link's rate budget lasts:
        // the first always goes (as every answer does), the rest must not
        // put a slow link into a debt that holds back later rounds.
        let mut extra_bytes = self.link_budget(to, now).unwrap_or(usize::MAX);
        let mut frames: Vec<Vec<(Key, Value)>> = vec![Vec::new()];
        let mut budget = frame_budget.saturating_sub(want.len() * 9 + 64);
        let fresh = frame_budget.saturating_sub(64);
        for (k, v) in entries {
            let size = crate::proto::to_bytes(&v)?.len() + k.as_str().len() + 8;
            // Whole only if it fits the room of an empty frame: a state
            // between that and the frame budget fitted no frame and was not
            // cut either, so it never travelled (swarm seed 1087: two nodes
            // never converged on a set grown by concurrent adds).
            let parts = if size <= fresh {
                vec![(v, size)]
            } else {
                // Larger than any frame (a join of large concurrent states).
                round.partial = true;
                self.state_pieces(&k, &v, round, fresh)?
            };
            for (part, size) in parts {
                if size > budget && frames.len() < AE_STATE_FRAMES && extra_bytes >= fresh {
                    frames.push(Vec::new());
                    budget = fresh;
                    extra_bytes -= fresh;
                }
                if size > budget {
                    // Waits for a round with room.
                    round.partial = true;
                    continue;
                }
                budget -= size;
                if let Some(f) = frames.last_mut() {
                    // One entry per key and frame (decoding refuses a
                    // repeated key): pieces that share a frame travel joined.
                    match f.last_mut() {
                        Some((last, acc)) if *last == k => crate::crdt::Crdt::join(acc, &part),
                        _ => f.push((k.clone(), part)),
                    }
                }
            }
        }
        if frames.len() > 1 {
            round.partial = true;
        }
        let mut want = Some(want);
        for (i, batch) in frames.into_iter().enumerate() {
            if i > 0 && batch.is_empty() {
                continue;
            }
            let msg = Message::AeStates {
                round,
                entries: batch,
                want: want.take().unwrap_or_default(),
                reply: reply && i == 0,
            };
            self.queue_durable(to, &msg, now)?;
        }
        Ok(())
    }

    /// The pieces of `v` (see [`Value::split`]), each with its size in a
    /// frame, joined into groups of about a quarter frame, starting from a
    /// group chosen by the round. Pieces larger than `room` (what an empty
    /// frame holds) fit no frame: they are left out, counted and logged.
    fn state_pieces(&mut self, k: &Key, v: &Value, round: RoundId, room: usize) -> Result<Vec<(Value, usize)>, Error> {
        let frame_budget = self.cfg.max_message_bytes * 3 / 4;
        let overhead = k.as_str().len() + 8;
        let mut out = Vec::new();
        for p in v.split(frame_budget / 4) {
            let size = crate::proto::to_bytes(&p)?.len() + overhead;
            if size > room {
                tracing::warn!(key = %k, size, "a piece of a state too large for an anti-entropy frame: skipped");
                self.stats.ae_oversized += 1;
                continue;
            }
            out.push((p, size));
        }
        // Rounds with one peer are not consecutive numbers (they alternate
        // with other peers' rounds): mix the number before taking it modulo.
        if !out.is_empty() {
            let start = (round.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % out.len();
            out.rotate_left(start);
        }
        Ok(out)
    }

    pub(super) fn on_ae_states(
        &mut self,
        now: Time,
        from: &NodeId,
        round: RoundId,
        entries: Vec<(Key, Value)>,
        want: &[u64],
        reply: bool,
    ) -> Result<(), Error> {
        let refused_before = self.stats.policy_refused + self.stats.hostile_refused;
        let entries = entries.into_iter().map(|(k, v)| (k, std::sync::Arc::new(v))).collect();
        let repaired = self.apply_remote(from, entries, None)?;
        self.stats.ae_keys_repaired += repaired as u64;
        let mut round = round;
        // States refused by policy are not held here: the round proves nothing.
        round.partial |= self.stats.policy_refused + self.stats.hostile_refused > refused_before;
        if !reply {
            // The round's last states: confirm once they are durable here.
            return self.queue_durable(from, &Message::AeDone { round }, now);
        }
        let cfg = self
            .peers
            .get(from)
            .ok_or_else(|| Error::UnknownPeer(from.0.clone()))?
            .cfg
            .clone();
        let mut send = Vec::new();
        let limit = self.cfg.max_ae_fanout * 64;
        round.partial |= want.len() > limit;
        let want: std::collections::BTreeSet<u64> = want.iter().take(limit).copied().collect();
        for &h in &want {
            let bucket = (h >> 32) as u32;
            for (k, v) in self.store.scan_buckets(bucket, bucket)? {
                if k.hash().0 == h && self.may_send(&cfg, &k) {
                    send.push((k, v));
                }
            }
        }
        self.send_states(now, from, round, send, Vec::new(), false)
    }
}
