//! Delta propagation: the delta-interval protocol of Almeida et al. (2018)
//! with the back-propagation and redundancy optimisations of Enes et al.
//! (2019), cumulative acknowledgements and a bounded buffer.

use super::{Peer, Replica, Time};
use crate::crdt::{Crdt, Value};
use crate::key::Key;
use crate::proto::{Ack, Message, NodeId};
use crate::store::{Store, WriteBatch};
use crate::Error;
use std::collections::BTreeMap;

impl<S: Store> Replica<S> {
    fn front_seq(&self) -> u64 {
        self.buffer.front().map_or(self.next_seq, |b| b.group.seq)
    }

    /// Entries of group `seq` that may go to `p` (none from `p` itself).
    fn entries_for<'a>(&'a self, seq: u64, p: &'a Peer) -> impl Iterator<Item = &'a (Key, Value)> + 'a {
        let front = self.front_seq();
        let group = seq
            .checked_sub(front)
            .and_then(|i| self.buffer.get(i as usize))
            .map(|b| &b.group);
        group
            .filter(|g| g.origin.as_ref() != Some(&p.cfg.node))
            .into_iter()
            .flat_map(|g| g.entries.iter())
            .filter(move |(k, _)| self.filter.may_send(&p.cfg, k))
    }

    /// Advances `acked` over groups that carry nothing for the peer.
    fn skip_empty(&mut self, node: &NodeId) {
        let Some(p) = self.peers.get(node) else { return };
        let mut acked = p.acked;
        // Below the front nothing is known about a group: never skip there.
        while acked >= self.front_seq() && acked < p.sent_upto && self.entries_for(acked, p).next().is_none() {
            acked += 1;
        }
        if let Some(p) = self.peers.get_mut(node) {
            p.acked = acked;
        }
    }

    /// Sends each live peer the durable groups it has not been sent, at most
    /// one batch per sync interval, with a piggybacked acknowledgement; sends
    /// due stand-alone acknowledgements when `timer` is set.
    pub(super) fn send_deltas(&mut self, now: Time, timer: bool) -> Result<(), Error> {
        let nodes: Vec<NodeId> = self.peers.keys().cloned().collect();
        for node in nodes {
            let mut piggyback = None;
            if let Some(p) = self.peers.get(&node) {
                if let Some((a, _)) = p.ack_ready {
                    piggyback = Some(a);
                }
            }
            // One peer's failure must not stop the others.
            let sent_delta = match self.send_deltas_to(&node, now, piggyback) {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::warn!(peer = %node, error = %e, "sending deltas failed");
                    false
                }
            };
            let Some(p) = self.peers.get_mut(&node) else { continue };
            if sent_delta {
                p.ack_ready = None;
            } else if let Some((a, since)) = p.ack_ready {
                if timer && now.since(since) >= self.cfg.ack_delay_ms {
                    p.ack_ready = None;
                    self.queue(&node, &Message::Ack(a), now)?;
                }
            }
        }
        Ok(())
    }

    /// Returns whether a `Delta` was queued (carrying `ack`).
    fn send_deltas_to(&mut self, node: &NodeId, now: Time, ack: Option<Ack>) -> Result<bool, Error> {
        let front = self.front_seq();
        let (retransmit, sync, relay_budget) = (
            self.cfg.retransmit_ms,
            self.cfg.sync_interval_ms,
            self.cfg.max_message_bytes * 3 / 4,
        );
        let Some(p) = self.peers.get(node) else {
            return Ok(false);
        };
        if !self.is_alive(p, now) || p.last_delta.is_some_and(|t| now.since(t) < sync) {
            return Ok(false);
        }
        if p.acked < front {
            // Groups it may lack were dropped from the buffer (or we do not
            // know what it has, after a restart): deltas past that gap must
            // not be joined there, so repair first; a completed round moves
            // `acked` to where deltas resume.
            if p.repair_due.is_none() {
                self.schedule_repair(now, node);
            }
            return Ok(false);
        }
        let p = self
            .peers
            .get_mut(node)
            .ok_or_else(|| Error::UnknownPeer(node.0.clone()))?;
        if p.sent_upto > p.acked && now.since(p.last_progress) >= retransmit {
            p.sent_upto = p.acked;
            p.last_progress = now;
        }
        let start = p.sent_upto.max(p.acked);
        let (acked, end, base_from) = (p.acked, self.durable_seq, p.incarnation);
        if start >= end {
            return Ok(false);
        }
        // Join the groups into as few messages as the size limit allows.
        let p = &self.peers[node];
        let mut batches: Vec<(u64, u64, BTreeMap<Key, Value>)> = Vec::new();
        let (mut from, mut acc, mut acc_bytes) = (start, BTreeMap::<Key, Value>::new(), 0usize);
        for seq in start..end {
            let bytes = seq
                .checked_sub(front)
                .and_then(|i| self.buffer.get(i as usize))
                .map_or(0, |b| b.bytes);
            if acc_bytes + bytes > relay_budget && !acc.is_empty() {
                batches.push((from, seq, std::mem::take(&mut acc)));
                from = seq;
                acc_bytes = 0;
            }
            for (k, v) in self.entries_for(seq, p) {
                match acc.get_mut(k) {
                    Some(mine) => mine.join(v),
                    None => {
                        acc.insert(k.clone(), v.clone());
                    }
                }
            }
            acc_bytes += bytes;
        }
        if batches.is_empty() && acc.is_empty() && start == acked {
            // Nothing in these groups is for this peer: it is up to date.
            if let Some(p) = self.peers.get_mut(node) {
                p.acked = end;
                p.sent_upto = end;
                p.last_progress = now;
            }
            self.gc()?;
            return Ok(false);
        }
        batches.push((from, end, acc));
        let time = self.hlc.now(self.wall(now));
        let mut ack = ack;
        for (lo, hi, entries) in batches {
            let msg = Message::Delta {
                sender: self.id,
                base: acked,
                base_from,
                from: lo,
                to: hi,
                time,
                entries: entries.into_iter().collect(),
                ack: ack.take(),
            };
            self.queue(node, &msg, now)?;
        }
        if let Some(p) = self.peers.get_mut(node) {
            p.sent_upto = end;
            p.last_delta = Some(now);
        }
        Ok(true)
    }

    pub(super) fn send_heartbeats(&mut self, now: Time) -> Result<(), Error> {
        let due: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| p.last_sent.is_none_or(|t| now.since(t) >= self.cfg.heartbeat_ms))
            .map(|p| p.cfg.node.clone())
            .collect();
        for node in due {
            let time = self.hlc.now(self.wall(now));
            self.queue(&node, &Message::Heartbeat { sender: self.id, time }, now)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_delta(
        &mut self,
        _now: Time,
        from: &NodeId,
        sender: crate::clock::ReplicaId,
        base: u64,
        lo: u64,
        hi: u64,
        entries: Vec<(Key, Value)>,
        frame_len: usize,
    ) -> Result<(), Error> {
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        // Cumulative: we have every group below `have`. The sender's `base`
        // is something we acknowledged earlier, after it was durable here.
        let mut have = match p.recv {
            Some((incarnation, h)) if incarnation == sender => h,
            _ => {
                p.reorder.clear();
                0
            }
        };
        have = have.max(base);
        // The causal delta-merging condition (Almeida et al. 2018): a
        // delta-interval is joined only on top of every earlier one from the
        // same sender. Joining past a gap could keep a dot alive that the
        // missing interval retires (a counter would count twice). Intervals
        // that arrive early wait, a bounded number of them, for the gap.
        if lo > have {
            let held: usize = p.reorder.values().map(|(_, _, n)| n).sum();
            if p.reorder.len() < super::MAX_REORDER && held + frame_len <= super::MAX_REORDER_BYTES {
                p.reorder.insert(lo, (hi, entries, frame_len));
            } else {
                self.stats.out_of_order += 1;
            }
        } else {
            self.apply_remote(from, entries)?;
            have = have.max(hi);
        }
        loop {
            let Some(p) = self.peers.get_mut(from) else {
                return Ok(());
            };
            let Some((&start, _)) = p.reorder.first_key_value() else {
                break;
            };
            if start > have {
                break;
            }
            let Some((_, (end, held, _))) = p.reorder.pop_first() else {
                break;
            };
            if end > have {
                self.apply_remote(from, held)?;
                have = end;
            }
        }
        let self_id = self.id;
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        p.recv = Some((sender, have));
        p.ack_unflushed = Some(Ack {
            replica: sender,
            from: self_id,
            upto: have,
        });
        Ok(())
    }

    pub(super) fn on_ack(&mut self, now: Time, from: &NodeId, ack: Ack) {
        if ack.replica != self.id {
            return; // meant for an earlier incarnation of this node
        }
        if self
            .peers
            .get(from)
            .and_then(|p| p.incarnation)
            .is_some_and(|inc| inc != ack.from)
        {
            return; // sent by an earlier incarnation of the peer
        }
        let next = self.next_seq;
        let Some(p) = self.peers.get_mut(from) else { return };
        let upto = ack.upto.min(next);
        if upto > p.acked {
            p.acked = upto;
            p.last_progress = now;
        }
        p.sent_upto = p.sent_upto.max(p.acked);
        self.skip_empty(from);
        if let Err(e) = self.gc() {
            tracing::warn!(error = %e, "trimming the delta buffer failed");
        }
    }

    /// Drops buffered groups every peer has.
    pub(super) fn gc(&mut self) -> Result<(), Error> {
        let mut keep_from = self.peers.values().map(|p| p.acked).min().unwrap_or(self.next_seq);
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::BufferForgetsUnacked) {
            // Planted bug: treat "sent" as "acknowledged", silently.
            keep_from = self.peers.values().map(|p| p.sent_upto).min().unwrap_or(self.next_seq);
            for p in self.peers.values_mut() {
                p.acked = p.acked.max(keep_from.min(p.sent_upto));
            }
        }
        keep_from = keep_from.min(self.durable_seq);
        if self.front_seq() >= keep_from {
            return Ok(());
        }
        while self.buffer.front().is_some_and(|b| b.group.seq < keep_from) {
            if let Some(b) = self.buffer.pop_front() {
                self.buffer_bytes -= b.bytes;
            }
        }
        self.store.apply(WriteBatch {
            buffer_trim_below: Some(keep_from),
            ..WriteBatch::default()
        })?;
        self.dirty = true;
        Ok(())
    }

    /// Drops the oldest groups while the buffer is over its byte limit.
    pub(super) fn enforce_buffer_limit(&mut self) -> Result<(), Error> {
        let mut dropped = 0;
        while self.buffer_bytes > self.cfg.max_buffer_bytes && self.buffer.len() > 1 {
            if let Some(b) = self.buffer.pop_front() {
                self.buffer_bytes -= b.bytes;
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.stats.buffer_dropped += dropped;
            let front = self.front_seq();
            self.store.apply(WriteBatch {
                buffer_trim_below: Some(front),
                ..WriteBatch::default()
            })?;
            self.dirty = true;
        }
        Ok(())
    }
}
