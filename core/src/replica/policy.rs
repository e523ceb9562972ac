//! The engine's side of replication policies: adopting a new set, telling
//! peers about it, write concerns, and per-policy status.

use super::merkle::{item_hash, Forest};
use super::{ConcernWait, Event, Prepared, Replica, ReplicaConfig, Time, WriteId};
use crate::crdt::Op;
use crate::key::Key;
use crate::policy::signed::{PolicySignature, Refusal, SignedPolicySet};
use crate::policy::PolicySet;
use crate::proto::client::{CopyInfo, OpId, PolicyInfo, WriteConcern};
use crate::proto::{Message, NodeId, PolicyStamp, RegionId};
use crate::store::Store;
use crate::Error;
use std::collections::BTreeSet;

/// The anti-entropy trees of everything in `store`, split by audience
/// under `cfg.policy`.
pub(super) fn build_forest<S: Store>(cfg: &ReplicaConfig, regions: &[RegionId], store: &S) -> Result<Forest, Error> {
    let mut tree = Forest::new(cfg.tree_depth, &cfg.policy, &cfg.region, regions);
    let mut err = None;
    store.scan_all(&mut |k, v| match item_hash(k, v) {
        Ok(h) => tree.update(cfg.policy.lookup_index(k.as_str()), k.hash(), None, Some(h)),
        Err(e) => err = Some(e),
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(tree),
    }
}

impl<S: Store> Replica<S> {
    /// The policy set in force.
    pub fn policy(&self) -> &PolicySet {
        &self.cfg.policy
    }

    /// The signature of the policy set in force (`None`: the unsigned set
    /// of the node's own configuration, which is never sent to peers).
    pub fn policy_signature(&self) -> Option<&PolicySignature> {
        self.cfg.policy_signature.as_ref()
    }

    /// Puts `set` in force if it is signed by one of
    /// [`ReplicaConfig::policy_keys`] and newer than the current one (higher
    /// version, or equal version and higher digest), and sends it to every
    /// peer. Returns whether it was adopted; an invalid set is an error,
    /// and so is one whose signature is missing, untrusted or wrong
    /// ([`Error::PolicySignature`], counted in `policy_sets_refused`).
    ///
    /// Adoption rebuilds the anti-entropy trees for the new audiences and
    /// restarts every peer's delta streams behind a repair round, so that a
    /// keyspace moving to another priority class never has its deltas
    /// joined out of order, and regions that may now hold a keyspace get it.
    /// Keys this region may no longer hold stay on disk (removing them could
    /// let their dots be reused) but are neither served nor sent.
    pub fn set_policy(&mut self, now: Time, set: SignedPolicySet) -> Result<bool, Error> {
        self.adopt(now, set, None)
    }

    /// Checks the signature before anything else: the validity and the
    /// version of a set nobody trusted signed are nobody's business.
    fn check_signature(&mut self, set: &SignedPolicySet) -> Result<PolicySignature, Error> {
        #[cfg(feature = "planted-bugs")]
        if crate::planted::active(crate::planted::PlantedBug::PolicySignatureIgnored) {
            return Ok(set.signature.unwrap_or(PolicySignature {
                signer: [0; 32],
                signature: [0; 64],
            }));
        }
        match self.cfg.policy_keys.verify(set) {
            Ok(sig) => Ok(sig),
            Err(r) => {
                let i = Refusal::ALL.iter().position(|x| *x == r).unwrap_or(0);
                self.stats.policy_sets_refused[i] += 1;
                Err(Error::PolicySignature(r))
            }
        }
    }

    fn adopt(&mut self, now: Time, signed: SignedPolicySet, from: Option<NodeId>) -> Result<bool, Error> {
        let signature = self.check_signature(&signed)?;
        let set = signed.set.validated()?;
        if !self.cfg.policy.is_superseded_by(&set) {
            return Ok(false);
        }
        let mut cfg = self.cfg.clone();
        cfg.policy = set;
        cfg.policy_signature = Some(signature);
        self.tree = build_forest(&cfg, &self.regions, &self.store)?;
        self.cfg = cfg;
        self.policy_stamp = PolicyStamp::of(&self.cfg.policy);
        let front = self.front_seq();
        for p in self.peers.values_mut() {
            p.reset_streams(front, now);
            p.policy_sent = None;
            p.awaiting_repair = true;
        }
        if let Some(p) = from.as_ref().and_then(|f| self.peers.get_mut(f)) {
            p.policy_seen = Some(self.policy_stamp);
        }
        // Frames built under the old set must not go out under the new one.
        self.held.clear();
        self.outbox.retain(|t| {
            !matches!(
                t.kind,
                "delta" | "ae_tree" | "ae_leaves" | "ae_states" | "ae_in_sync" | "ae_done"
            )
        });
        // Which regions count for a pending write concern may have changed:
        // end them (the writes stay durable here and keep replicating).
        let pending: Vec<WriteId> = self.concerns.drain(..).map(|c| c.id).collect();
        self.stats.concern_timeouts += pending.len() as u64;
        self.events.extend(pending.into_iter().map(Event::WriteConcernTimeout));
        let nodes: Vec<NodeId> = self.peers.keys().cloned().collect();
        for node in &nodes {
            self.schedule_repair(now, node);
            self.send_policy(now, node)?;
        }
        self.stats.policy_adopted += 1;
        tracing::info!(version = self.cfg.policy.version, from = ?from, "adopted a policy set");
        self.events.push_back(Event::PolicyAdopted {
            policy: self.cfg.policy.clone(),
            signature: self.cfg.policy_signature,
            from,
        });
        Ok(true)
    }

    /// Sends the set in force to `node`, if it is signed: an unsigned set
    /// (a node's own configuration file) is trusted here only and never
    /// spreads; peers would refuse it anyway.
    fn send_policy(&mut self, now: Time, node: &NodeId) -> Result<(), Error> {
        let Some(signature) = self.cfg.policy_signature else {
            return Ok(());
        };
        if let Some(p) = self.peers.get_mut(node) {
            p.policy_sent = Some(now);
        }
        let msg = Message::Policy(SignedPolicySet {
            set: self.cfg.policy.clone(),
            signature: Some(signature),
        });
        self.queue(node, &msg, now)
    }

    /// A peer told us its policy stamp: if ours is newer, send it our set
    /// (at most once per heartbeat interval).
    pub(super) fn observe_policy(&mut self, now: Time, from: &NodeId, stamp: PolicyStamp) -> Result<(), Error> {
        if stamp >= self.policy_stamp {
            return Ok(());
        }
        let due = self
            .peers
            .get(from)
            .is_some_and(|p| p.policy_sent.is_none_or(|t| now.since(t) >= self.cfg.heartbeat_ms));
        if due {
            self.send_policy(now, from)?;
        }
        Ok(())
    }

    /// A peer sent its set. One that is not signed by a trusted key is
    /// refused and counted, but is not the peer's fault enough to drop the
    /// frame's connection: a peer whose operator bootstrapped a set of its
    /// own, or trusts a key we do not, still replicates data.
    pub(super) fn on_policy(&mut self, now: Time, from: &NodeId, set: SignedPolicySet) -> Result<(), Error> {
        match self.adopt(now, set, Some(from.clone())) {
            Ok(_) => Ok(()),
            Err(Error::PolicySignature(r)) => {
                // The peer holds another set until an admin signs one both
                // trust: no state passes between us meanwhile (`policy_seen`
                // stays its own stamp), and it re-sends at most once per
                // heartbeat interval, each refusal counted.
                tracing::warn!(peer = %from.0, reason = r.name(), "refused a policy set from a peer");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// [`Replica::write_with`] with results prepared beside the engine
    /// ([`Prepared::write`] over the same `ops`): keys whose record is
    /// still the one a result was computed from take it; the others are
    /// computed here. The outcome is the same as without them.
    pub fn write_prepared(
        &mut self,
        now: Time,
        op_id: Option<OpId>,
        ops: Vec<(Key, Op)>,
        concern: WriteConcern,
        timeout_ms: u64,
        prepared: Prepared,
    ) -> Result<(WriteId, bool), Error> {
        self.prepared = prepared;
        let result = self.write_with(now, op_id, ops, concern, timeout_ms);
        self.prepared = Prepared::default();
        result
    }

    /// [`Replica::write_once`] with a write concern: besides
    /// [`Event::WriteDurable`], [`Event::WriteReplicated`] follows once the
    /// write is durable in enough distinct regions (acknowledged by a node
    /// there), or [`Event::WriteConcernTimeout`] after `timeout_ms`.
    /// A concern no set of regions could meet (more regions than may hold
    /// the keys) is refused before anything is written.
    pub fn write_with(
        &mut self,
        now: Time,
        op_id: Option<OpId>,
        ops: Vec<(Key, Op)>,
        concern: WriteConcern,
        timeout_ms: u64,
    ) -> Result<(WriteId, bool), Error> {
        let own = &self.cfg.region;
        let eligible: Vec<RegionId> = self
            .regions
            .iter()
            .filter(|r| {
                *r != own
                    && ops
                        .iter()
                        .all(|(k, _)| self.cfg.policy.may_exchange(k.as_str(), own, r))
            })
            .cloned()
            .collect();
        let need = match concern {
            WriteConcern::Local => 1,
            WriteConcern::Regions(n) => usize::from(n).max(1),
            WriteConcern::All => eligible.len() + 1,
        };
        if need > eligible.len() + 1 {
            let mut may: Vec<&str> = eligible.iter().map(|r| r.0.as_str()).collect();
            may.insert(0, own.0.as_str());
            return Err(Error::InvalidOp(format!(
                "write concern regions({need}) cannot be met: these keys may be held in {} region(s) ({})",
                may.len(),
                may.join(", ")
            )));
        }
        let waits = concern != WriteConcern::Local;
        if waits && self.concerns.len() >= self.cfg.max_pending_writes {
            self.stats.overloaded += 1;
            return Err(Error::Overloaded("too many writes waiting for their write concern"));
        }
        let mut classes: Vec<usize> = ops.iter().map(|(k, _)| self.class_of(k)).collect();
        classes.sort_unstable();
        classes.dedup();
        let (id, dup) = self.write_once(now, op_id, ops)?;
        if waits {
            // With `need == 1` it is met at local durability, and answered then.
            self.concerns.push(ConcernWait {
                id,
                // A retry's original group is somewhere below: wait for all.
                seq_end: self.next_seq,
                need,
                eligible,
                classes,
                durable: false,
                deadline: now.plus(timeout_ms),
            });
        }
        Ok((id, dup))
    }

    /// Stops waiting for the write concern of `id`: nobody waits for its
    /// answer any more (the client went away). The write itself is not
    /// touched: it stays durable here and keeps replicating. No event for
    /// it follows. Returns whether it was waiting.
    pub fn forget_concern(&mut self, id: WriteId) -> bool {
        let before = self.concerns.len();
        self.concerns.retain(|c| c.id != id);
        self.concerns.len() != before
    }

    /// Emits `WriteReplicated` for every durable write whose concern is met.
    pub(super) fn check_concerns(&mut self, _now: Time) {
        let peers = &self.peers;
        let mut met = Vec::new();
        self.concerns.retain(|c| {
            if !c.durable {
                return true;
            }
            let regions: BTreeSet<&RegionId> = peers
                .values()
                .filter(|p| {
                    !p.awaiting_repair
                        && c.eligible.contains(&p.cfg.region)
                        && c.classes.iter().all(|&k| p.streams[k].acked >= c.seq_end)
                })
                .map(|p| &p.cfg.region)
                .collect();
            #[cfg(feature = "planted-bugs")]
            if crate::planted::active(crate::planted::PlantedBug::ConcernEarly) {
                met.push(c.id);
                return false;
            }
            if regions.len() + 1 >= c.need {
                met.push(c.id);
                false
            } else {
                true
            }
        });
        self.events.extend(met.into_iter().map(Event::WriteReplicated));
    }

    pub(super) fn expire_concerns(&mut self, now: Time) {
        let mut late = Vec::new();
        self.concerns.retain(|c| {
            if c.deadline <= now {
                late.push(c.id);
                false
            } else {
                true
            }
        });
        self.stats.concern_timeouts += late.len() as u64;
        self.events.extend(late.into_iter().map(Event::WriteConcernTimeout));
    }

    /// The root digest over the keys this node may exchange with `region`:
    /// two nodes hold the same shared state exactly when each one's digest
    /// for the other's region is equal.
    pub fn digest_shared_with(&self, region: &RegionId) -> u128 {
        self.tree.digest_for(region, 0, 0)
    }

    /// Per policy (and the default policy last), which regions get copies
    /// from this node and how far behind they are.
    pub fn policy_status(&self, now: Time) -> Vec<PolicyInfo> {
        let policy = &self.cfg.policy;
        let indices = (0..policy.policies.len()).map(Some).chain([None]);
        indices
            .map(|i| {
                let p = policy.by_index(i);
                let class = p.priority.index();
                let copies = self
                    .regions
                    .iter()
                    .map(|r| {
                        let holds = p.may_exchange(&self.cfg.region, r);
                        let (mut lag_groups, mut lag_ms) = (0, 0);
                        for peer in self.peers.values().filter(|x| x.cfg.region == *r && holds) {
                            let acked = peer.streams[class].acked;
                            lag_groups = lag_groups.max(self.next_seq.saturating_sub(acked));
                            lag_ms = lag_ms.max(self.group_age(acked, now));
                        }
                        CopyInfo {
                            region: r.clone(),
                            holds,
                            lag_groups,
                            lag_ms,
                        }
                    })
                    .collect();
                PolicyInfo {
                    keyspace: p.keyspace.clone(),
                    regions: p.regions.to_string(),
                    priority: p.priority.name().to_string(),
                    copies,
                }
            })
            .collect()
    }
}
