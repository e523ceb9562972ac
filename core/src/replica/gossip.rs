//! Delta propagation: the delta-interval protocol of Almeida et al. (2018)
//! with the back-propagation and redundancy optimisations of Enes et al.
//! (2019), cumulative acknowledgements and a bounded buffer.
//!
//! Each peer gets one delta stream per priority class: a class's section of
//! a `Delta` carries the class's entries of a range of groups, and is
//! acknowledged on its own. Every key belongs to exactly one class (its
//! keyspace's priority), so the per-key causal order the join needs holds
//! inside each stream; on a rate-limited link a `critical` section can go
//! while `bulk` ones wait.

use super::{Peer, Replica, Time};
use crate::clock::HlcTimestamp;
use crate::crdt::{Crdt, Value};
use crate::key::Key;
use crate::proto::{Ack, Message, NodeId, Section, CLASSES};
use crate::store::Store;
use crate::Error;
use std::collections::BTreeMap;
use std::sync::Arc;

impl<S: Store> Replica<S> {
    pub(super) fn front_seq(&self) -> u64 {
        self.buffer.front().map_or(self.next_seq, |b| b.group.seq)
    }

    /// Whether `key` may go to `peer` under the policy in force.
    pub(super) fn may_send(&self, peer: &crate::replica::PeerConfig, key: &Key) -> bool {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::PolicyLeak) {
            return true;
        }
        self.cfg
            .policy
            .may_exchange(key.as_str(), &self.cfg.region, &peer.region)
    }

    /// The priority class of `key`.
    pub(super) fn class_of(&self, key: &Key) -> usize {
        self.cfg.policy.lookup(key.as_str()).priority.index()
    }

    /// Entries of group `seq` in class `class` that may go to `p` (none
    /// from `p` itself), each with its encoded size.
    fn entries_for<'a>(
        &'a self,
        seq: u64,
        p: &'a Peer,
        class: usize,
    ) -> impl Iterator<Item = (&'a (Key, Arc<Value>), usize)> + 'a {
        let front = self.front_seq();
        seq.checked_sub(front)
            .and_then(|i| self.buffer.get(i as usize))
            .filter(|b| b.group.origin.as_ref() != Some(&p.cfg.node))
            .into_iter()
            .flat_map(|b| b.group.entries.iter().zip(b.sizes.iter().copied()))
            .filter(move |((k, _), _)| self.class_of(k) == class && self.may_send(&p.cfg, k))
    }

    /// Advances each stream's `acked` over groups that carry nothing for
    /// the peer in that class.
    fn skip_empty(&mut self, node: &NodeId) {
        let Some(p) = self.peers.get(node) else { return };
        let front = self.front_seq();
        let mut acked = [0u64; CLASSES];
        for (c, a) in acked.iter_mut().enumerate() {
            let s = &p.streams[c];
            *a = s.acked;
            // Below the front nothing is known about a group: never skip there.
            while *a >= front && *a < s.sent_upto && self.entries_for(*a, p, c).next().is_none() {
                *a += 1;
            }
        }
        if let Some(p) = self.peers.get_mut(node) {
            for (s, a) in p.streams.iter_mut().zip(acked) {
                s.acked = a;
            }
        }
    }

    /// Sends each live peer the durable groups it has not been sent, at most
    /// one `Delta` per sync interval, with a piggybacked acknowledgement;
    /// sends due stand-alone acknowledgements when `timer` is set.
    pub(super) fn send_deltas(&mut self, now: Time, timer: bool) -> Result<(), Error> {
        let nodes: Vec<NodeId> = self.peers.keys().cloned().collect();
        for node in nodes {
            let piggyback = self.peers.get(&node).and_then(|p| p.ack_ready.map(|(a, _)| a));
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

    /// Refills the peer's token bucket; `None` when its link is unlimited,
    /// otherwise the bytes that may be sent now.
    pub(super) fn link_budget(&mut self, node: &NodeId, now: Time) -> Option<usize> {
        let p = self.peers.get_mut(node)?;
        let rate = p.cfg.rate_limit?;
        p.tokens = refill(p.tokens, rate, now.since(p.tokens_at));
        p.tokens_at = now;
        Some(p.tokens.max(0) as usize)
    }

    /// Whether the link to `node` owes more than one frame: deltas keep a
    /// busy link's bucket near zero, so "no tokens left" would keep a
    /// repair round (cheap, and able to make a whole backlog unneeded)
    /// from ever starting behind them.
    pub(super) fn link_deep_in_debt(&mut self, node: &NodeId, now: Time) -> bool {
        let frame = self.cfg.max_message_bytes as i64;
        self.link_budget(node, now);
        self.peers
            .get(node)
            .is_some_and(|p| p.cfg.rate_limit.is_some() && p.tokens < -frame)
    }

    /// Returns whether a `Delta` was queued (carrying `ack`). Classes go in
    /// priority order, except that one held back longer than
    /// `starvation_ms` goes first with a quarter of the budget; on a
    /// rate-limited link the sections stop at the link's budget and the rest
    /// waits for the next interval.
    fn send_deltas_to(&mut self, node: &NodeId, now: Time, ack: Option<Ack>) -> Result<bool, Error> {
        let front = self.front_seq();
        let (retransmit, sync, frame_budget, starvation) = (
            self.cfg.retransmit_ms,
            self.cfg.sync_interval_ms,
            self.cfg.max_message_bytes * 3 / 4,
            self.cfg.starvation_ms,
        );
        let Some(p) = self.peers.get(node) else {
            return Ok(false);
        };
        if !self.is_alive(p, now)
            || p.last_delta.is_some_and(|t| now.since(t) < sync)
            || p.policy_seen != Some(self.policy_stamp)
        {
            return Ok(false);
        }
        if p.min_acked() < front || p.awaiting_repair {
            // Groups it may lack were dropped from the buffer (or we do not
            // know what it has, after a restart): deltas past that gap must
            // not be joined there, so repair first; a completed round moves
            // `acked` to where deltas resume.
            if p.repair_due.is_none() {
                self.schedule_repair(now, node);
            }
            return Ok(false);
        }
        let end = self.durable_seq;
        let budget = self.link_budget(node, now);
        if budget == Some(0) {
            self.stats.rate_limited += 1;
            if let Some(p) = self.peers.get_mut(node) {
                for s in p.streams.iter_mut().filter(|s| s.sent_upto.max(s.acked) < end) {
                    s.waiting_since.get_or_insert(now);
                }
            }
            return Ok(false);
        }
        let mut remaining = budget.unwrap_or(usize::MAX).min(frame_budget);
        // Strict priority, except that the class held back longest, once
        // past `starvation_ms`, earns a quarter of each interval's budget as
        // credit and goes first with it (deficit round robin): it always
        // moves, and the more urgent classes keep three quarters.
        let aged = {
            let p = &self.peers[node];
            (0..CLASSES)
                .filter(|&c| p.streams[c].waiting_since.is_some_and(|t| now.since(t) >= starvation))
                .min_by_key(|&c| p.streams[c].waiting_since)
        };
        let mut order: Vec<(usize, Option<usize>)> = Vec::new();
        if let Some(p) = self.peers.get_mut(node) {
            for (c, s) in p.streams.iter_mut().enumerate() {
                if Some(c) == aged {
                    s.credit = s.credit.saturating_add(remaining / 4).min(frame_budget);
                    order.push((c, Some(s.credit)));
                } else {
                    s.credit = 0;
                }
            }
        }
        order.extend((0..CLASSES).map(|c| (c, None)));
        let mut sections = Vec::new();
        let mut trimmed = false;
        for (c, cap) in order {
            let Some(p) = self.peers.get_mut(node) else { break };
            let s = &mut p.streams[c];
            if s.sent_upto > s.acked && now.since(s.last_progress) >= retransmit {
                s.sent_upto = s.acked;
                s.last_progress = now;
            }
            let (start, acked) = (s.sent_upto.max(s.acked), s.acked);
            if start >= end {
                s.waiting_since = None;
                continue;
            }
            // Join the class's entries of the groups, up to the budget.
            let p = &self.peers[node];
            // Shared with the buffer: a key's delta is copied only when a
            // later group's delta for the same key is joined into it.
            let (mut acc, mut bytes, mut hi) = (BTreeMap::<Key, Arc<Value>>::new(), 0usize, start);
            // The stamp of the oldest write whose entries the section carries.
            let mut written: Option<HlcTimestamp> = None;
            for seq in start..end {
                let entries: Vec<(&(Key, Arc<Value>), usize)> = self.entries_for(seq, p, c).collect();
                let est: usize = entries.iter().map(|(_, n)| n).sum();
                #[cfg(feature = "planted-bugs")]
                let est = if crate::planted::active(crate::planted::PlantedBug::SizeByAverage) {
                    let b = &self.buffer[(seq - self.front_seq()) as usize];
                    b.bytes / b.group.entries.len().max(1) * entries.len()
                } else {
                    est
                };
                let over = match cap {
                    // The credit may overdraw the bucket: a group larger
                    // than a burst must still go once its share is earned.
                    Some(credit) => bytes + est > credit,
                    None => bytes + est > remaining && (bytes > 0 || !sections.is_empty()),
                };
                if est > 0 && over {
                    break;
                }
                if !entries.is_empty() {
                    let w = self
                        .buffer
                        .get((seq - self.front_seq()) as usize)
                        .and_then(|b| b.group.written);
                    written = oldest(written, w);
                }
                for ((k, v), _) in entries {
                    match acc.get_mut(k) {
                        Some(mine) => Arc::make_mut(mine).join(v),
                        None => {
                            acc.insert(k.clone(), Arc::clone(v));
                        }
                    }
                }
                bytes += est;
                hi = seq + 1;
            }
            let Some(p) = self.peers.get_mut(node) else { break };
            let s = &mut p.streams[c];
            if hi < end {
                s.waiting_since.get_or_insert(now);
            } else {
                s.waiting_since = None;
            }
            if hi == start {
                continue; // nothing fitted: this class waits
            }
            if acc.is_empty() && start == acked {
                // Nothing in these groups is for this peer in this class.
                s.acked = hi;
                s.sent_upto = hi;
                s.last_progress = now;
                trimmed = true;
                continue;
            }
            // An empty section still moves the interval on, so the peer's
            // cumulative position does not wait on a gap.
            s.sent_upto = hi;
            if cap.is_some() {
                s.credit = s.credit.saturating_sub(bytes);
            }
            remaining = remaining.saturating_sub(bytes);
            if let Some(sec) = sections.iter_mut().find(|x: &&mut Section| usize::from(x.class) == c) {
                // The class's second turn this interval continues its first.
                sec.to = hi;
                sec.written = oldest(sec.written, written);
                let mut joined: BTreeMap<Key, Arc<Value>> = std::mem::take(&mut sec.entries).into_iter().collect();
                for (k, v) in acc {
                    match joined.get_mut(&k) {
                        Some(mine) => Arc::make_mut(mine).join(&v),
                        None => {
                            joined.insert(k, v);
                        }
                    }
                }
                sec.entries = joined.into_iter().collect();
                continue;
            }
            sections.push(Section {
                class: c as u8,
                base: acked,
                from: start,
                to: hi,
                entries: acc.into_iter().collect(),
                written,
            });
        }
        if trimmed {
            self.gc();
        }
        if sections.is_empty() {
            return Ok(false);
        }
        sections.sort_by_key(|s| s.class);
        let base_from = self.peers.get(node).and_then(|p| p.incarnation);
        let msg = Message::Delta {
            sender: self.id,
            base_from,
            time: self.hlc.now(self.wall(now)),
            policy: self.policy_stamp,
            sections,
            ack,
        };
        if let Err(e) = self.queue(node, &msg, now) {
            // Sizes are exact per entry, so only one group too large for a
            // frame on its own gets here. Never stall silently: count it,
            // and let a repair round carry the states (the stream resumes
            // past the group once a round completes).
            self.stats.oversized_deltas += 1;
            tracing::warn!(peer = %node, error = %e, "a delta did not fit a frame: repairing instead");
            self.schedule_repair(now, node);
            return Ok(false);
        }
        if let Some(p) = self.peers.get_mut(node) {
            p.last_delta = Some(now);
        }
        Ok(true)
    }

    pub(super) fn send_heartbeats(&mut self, now: Time) -> Result<(), Error> {
        let due: Vec<(NodeId, bool)> = self
            .peers
            .values()
            .filter(|p| p.last_sent.is_none_or(|t| now.since(t) >= self.cfg.heartbeat_ms))
            // A hello asks for a heartbeat back: the first after a start,
            // and every one while we have not seen the peer's policy stamp.
            // Without it we ignore the peer's anti-entropy frames, and a
            // peer that sends only those (a repair of what we lost) never
            // sends the heartbeat that would carry it.
            .map(|p| (p.cfg.node.clone(), p.last_sent.is_none() || p.policy_seen.is_none()))
            .collect();
        for (node, hello) in due {
            self.send_heartbeat(now, &node, hello)?;
        }
        Ok(())
    }

    pub(super) fn send_heartbeat(&mut self, now: Time, node: &NodeId, hello: bool) -> Result<(), Error> {
        let msg = Message::Heartbeat {
            sender: self.id,
            time: self.hlc.now(self.wall(now)),
            policy: self.policy_stamp,
            hello,
        };
        self.queue(node, &msg, now)
    }

    /// Joins the sections of a `Delta` (bases already checked against our
    /// incarnation) and prepares the acknowledgement for the next flush.
    pub(super) fn on_delta(
        &mut self,
        from: &NodeId,
        sender: crate::clock::ReplicaId,
        sections: Vec<Section>,
        frame_len: usize,
    ) -> Result<(), Error> {
        for sec in sections {
            self.on_section(from, sender, sec, frame_len)?;
        }
        let self_id = self.id;
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        let mut upto = [0u64; CLASSES];
        for (u, s) in upto.iter_mut().zip(&p.streams) {
            *u = s.recv.filter(|(inc, _)| *inc == sender).map_or(0, |(_, h)| h);
        }
        p.ack_unflushed = Some(Ack {
            replica: sender,
            from: self_id,
            upto,
        });
        Ok(())
    }

    fn on_section(
        &mut self,
        from: &NodeId,
        sender: crate::clock::ReplicaId,
        sec: Section,
        frame_len: usize,
    ) -> Result<(), Error> {
        let now = self.now;
        let c = usize::from(sec.class);
        let Some(p) = self.peers.get_mut(from) else {
            return Ok(());
        };
        let Some(s) = p.streams.get_mut(c) else {
            return Ok(());
        };
        // Cumulative: we have every group below `have` (in this class). The
        // sender's `base` is something we acknowledged earlier, after it
        // was durable here.
        let mut have = match s.recv {
            Some((incarnation, h)) if incarnation == sender => h,
            _ => {
                s.reorder.clear();
                0
            }
        };
        have = have.max(sec.base);
        // The causal delta-merging condition (Almeida et al. 2018): a
        // delta-interval is joined only on top of every earlier one from the
        // same sender. Joining past a gap could keep a dot alive that the
        // missing interval retires (a counter would count twice). Intervals
        // that arrive early wait, a bounded number of them, for the gap.
        if sec.from > have {
            let held: usize = s.reorder.values().map(|e| e.2).sum();
            if s.reorder.len() < super::MAX_REORDER && held + frame_len <= super::MAX_REORDER_BYTES {
                s.reorder
                    .insert(sec.from, (sec.to, sec.entries, frame_len, now, sec.written));
            } else {
                self.stats.out_of_order += 1;
            }
        } else {
            self.apply_remote(from, sec.entries, sec.written)?;
            have = have.max(sec.to);
        }
        loop {
            let Some(s) = self.peers.get_mut(from).and_then(|p| p.streams.get_mut(c)) else {
                return Ok(());
            };
            let Some((&start, _)) = s.reorder.first_key_value() else {
                break;
            };
            if start > have {
                break;
            }
            let Some((_, (end, held, _, _, written))) = s.reorder.pop_first() else {
                break;
            };
            if end > have {
                self.apply_remote(from, held, written)?;
                have = end;
            }
        }
        if let Some(s) = self.peers.get_mut(from).and_then(|p| p.streams.get_mut(c)) {
            s.recv = Some((sender, have));
        }
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
        if p.awaiting_repair {
            return; // may predate the policy in force: only a repair counts
        }
        for (s, upto) in p.streams.iter_mut().zip(ack.upto) {
            let upto = upto.min(next);
            if upto > s.acked {
                s.acked = upto;
                s.last_progress = now;
            }
            s.sent_upto = s.sent_upto.max(s.acked);
        }
        self.skip_empty(from);
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::AckNoTrim) {
            self.check_concerns(now);
            return;
        }
        self.gc();
        self.check_concerns(now);
    }

    /// Drops buffered groups every peer has, in every class.
    pub(super) fn gc(&mut self) {
        let mut keep_from = self.peers.values().map(Peer::min_acked).min().unwrap_or(self.next_seq);
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::BufferForgetsUnacked) {
            // Planted bug: treat "sent" as "acknowledged", silently.
            keep_from = self
                .peers
                .values()
                .flat_map(|p| p.streams.iter().map(|s| s.sent_upto))
                .min()
                .unwrap_or(self.next_seq);
            for p in self.peers.values_mut() {
                for s in p.streams.iter_mut() {
                    s.acked = s.acked.max(keep_from.min(s.sent_upto));
                }
            }
        }
        keep_from = keep_from.min(self.durable_seq);
        while self.buffer.front().is_some_and(|b| b.group.seq < keep_from) {
            if let Some(b) = self.buffer.pop_front() {
                self.buffer_bytes -= b.bytes;
            }
        }
    }

    /// Drops the oldest groups while the buffer is over its byte limit.
    pub(super) fn enforce_buffer_limit(&mut self) {
        let mut dropped = 0;
        while self.buffer_bytes > self.cfg.max_buffer_bytes && self.buffer.len() > 1 {
            if let Some(b) = self.buffer.pop_front() {
                self.buffer_bytes -= b.bytes;
                dropped += 1;
            }
        }
        self.stats.buffer_dropped += dropped;
    }
}

/// A link's token balance after `elapsed_ms` at `rate` bytes/s: up to a
/// burst of a quarter second (at least 4 KiB), from wherever it stood. A
/// debt is paid off at the link's rate however rarely this is called
/// (capping the refill itself at a burst kept a link that was asked once a
/// second, by the repair rounds of a peer that gets no deltas, in debt for
/// many seconds: swarm seed 6147).
fn refill(tokens: i64, rate: u64, elapsed_ms: u64) -> i64 {
    let burst = i128::from((rate / 4).max(4_096).min(i64::MAX as u64));
    let add = u128::from(rate) * u128::from(elapsed_ms) / 1_000;
    let add = add.min(u128::from(u64::MAX)) as i128;
    (i128::from(tokens) + add).min(burst) as i64
}

/// The earlier of two optional stamps (a known one over none).
fn oldest(a: Option<HlcTimestamp>, b: Option<HlcTimestamp>) -> Option<HlcTimestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::refill;

    #[test]
    fn a_debt_is_paid_off_at_the_link_rate_however_rarely_asked() {
        // 52 KB of debt at 12.6 KB/s: one call a second pays 12.6 KB each.
        assert_eq!(refill(-52_000, 12_600, 1_000), -39_400);
        assert_eq!(refill(-52_000, 12_600, 5_000), 4_096);
        // Never above the burst, however long it waited.
        assert_eq!(refill(0, 1_000_000, 60_000), 250_000);
        assert_eq!(refill(4_096, 8_000, 10), 4_096);
        // No overflow at the extremes.
        assert_eq!(refill(i64::MIN, u64::MAX, u64::MAX), (u64::MAX / 4) as i64);
    }
}
