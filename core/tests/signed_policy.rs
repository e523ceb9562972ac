#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Who may change a policy, at the engine: only sets signed by a trusted
//! key are adopted, from a client or a peer, and an unsigned set from a
//! node's own configuration never leaves it.

use lattice_core::policy::signed::{Refusal, SignedPolicySet, TrustedKeys};
use lattice_core::policy::{Policy, PolicySet, Priority, Regions};
use lattice_core::proto::{NodeId, RegionId};
use lattice_core::replica::{PeerConfig, Replica, ReplicaConfig, Time};
use lattice_core::store::MemoryStore;
use lattice_core::Error;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn admin() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9; 32])
}

fn set(version: u64, regions: Regions) -> PolicySet {
    PolicySet::new(version, vec![Policy::new("patients/", regions, Priority::Normal)]).unwrap()
}

fn open(me: usize, policy: PolicySet) -> Replica<MemoryStore> {
    let other = 1 - me;
    let peers = vec![PeerConfig::new(
        NodeId(format!("n{other}")),
        RegionId(format!("r{other}")),
    )];
    let mut c = ReplicaConfig::new(format!("n{me}"), format!("r{me}"), peers);
    c.policy = policy;
    c.policy_keys = TrustedKeys::new(vec![admin().verifying_key().to_bytes()]);
    let rng = Box::new(ChaCha8Rng::seed_from_u64(me as u64 + 1));
    Replica::open(c, MemoryStore::new(), rng, Time(0)).unwrap()
}

/// Runs both for `ms`, delivering everything; returns the kinds sent.
fn run(nodes: &mut [Replica<MemoryStore>; 2], now: &mut u64, ms: u64) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    let end = *now + ms;
    while *now < end {
        *now += 10;
        for r in nodes.iter_mut() {
            r.handle_timeout(Time(*now)).unwrap();
            r.flush(Time(*now)).unwrap();
        }
        loop {
            let mut frames = Vec::new();
            for (i, r) in nodes.iter_mut().enumerate() {
                while let Some(t) = r.poll_transmit() {
                    frames.push((i, t));
                }
                while r.poll_event().is_some() {}
            }
            if frames.is_empty() {
                break;
            }
            for (from, t) in frames {
                kinds.push(t.kind);
                nodes[1 - from]
                    .handle(Time(*now), &NodeId(format!("n{from}")), &t.payload)
                    .unwrap();
            }
        }
    }
    kinds
}

#[test]
fn an_unsigned_set_stays_home_and_only_a_trusted_signature_is_adopted() {
    let mut now = 0;
    // n1's own file opens patients/ at version 5, unsigned.
    let mut nodes = [open(0, PolicySet::default()), open(1, set(5, Regions::All))];
    let kinds = run(&mut nodes, &mut now, 3_000);
    assert!(!kinds.contains(&"policy"), "an unsigned set was sent: {kinds:?}");
    assert_eq!(nodes[0].policy().version, 0);
    assert_eq!(nodes[1].policy().version, 5);

    // A client's unsigned or untrusted set is refused with the reason.
    let rogue = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
    let r = nodes[0].set_policy(Time(now), SignedPolicySet::unsigned(set(9, Regions::All)));
    assert!(matches!(r, Err(Error::PolicySignature(Refusal::Unsigned))), "{r:?}");
    let r = nodes[0].set_policy(Time(now), SignedPolicySet::sign(set(9, Regions::All), &rogue).unwrap());
    assert!(matches!(r, Err(Error::PolicySignature(Refusal::UntrustedKey))), "{r:?}");
    assert_eq!(nodes[0].stats().policy_sets_refused, [1, 1, 0]);

    // A signed set spreads, and replaces n1's own.
    let signed = SignedPolicySet::sign(set(6, Regions::Local), &admin()).unwrap();
    assert!(nodes[0].set_policy(Time(now), signed.clone()).unwrap());
    run(&mut nodes, &mut now, 3_000);
    assert_eq!(nodes[1].policy(), &signed.set);
    assert_eq!(nodes[1].policy_signature(), signed.signature.as_ref());
}
