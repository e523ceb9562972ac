#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The checkers must be able to fail: with a deliberately broken engine the
//! swarm has to report violations. Runs only with the `planted-bugs`
//! feature (`cargo test -p lattice-sim --features planted-bugs`, which the
//! README's test command enables).
#![cfg(feature = "planted-bugs")]

use lattice_core::planted::{self, PlantedBug};
use lattice_sim::swarm::{run_seed, SwarmTotals};

fn swarm_with(bug: PlantedBug, seeds: u64) -> SwarmTotals {
    planted::set(bug);
    let mut totals = SwarmTotals::default();
    for seed in 0..seeds {
        totals.add(run_seed(seed));
    }
    planted::set(PlantedBug::None);
    totals
}

#[test]
fn a_join_that_drops_a_dot_is_caught() {
    let t = swarm_with(PlantedBug::JoinDropsDot, 30);
    assert!(
        !t.failed.is_empty(),
        "the swarm missed a join that drops dots: {}",
        t.last_line()
    );
    let checks: Vec<&str> = t
        .failed
        .iter()
        .flat_map(|r| r.violations.iter().map(|v| v.check))
        .collect();
    assert!(
        checks
            .iter()
            .any(|c| *c == "lost-ack" || *c == "lost-add" || *c == "convergence"),
        "{checks:?}"
    );
}

#[test]
fn acknowledging_before_durable_is_caught() {
    let t = swarm_with(PlantedBug::AckBeforeDurable, 100);
    assert!(
        !t.failed.is_empty(),
        "the swarm missed acknowledgements sent before the flush: {}",
        t.last_line()
    );
}

#[test]
fn a_buffer_that_forgets_unacked_groups_is_caught() {
    let t = swarm_with(PlantedBug::BufferForgetsUnacked, 100);
    assert!(
        !t.failed.is_empty(),
        "the swarm missed a buffer that drops unacknowledged groups: {}",
        t.last_line()
    );
}

#[test]
fn the_same_seeds_pass_without_a_planted_bug() {
    let t = swarm_with(PlantedBug::None, 30);
    assert!(t.failed.is_empty(), "{}", t.last_line());
}

/// The checks a set of failed runs reported.
fn checks(t: &SwarmTotals) -> Vec<&'static str> {
    t.failed
        .iter()
        .flat_map(|r| r.violations.iter().map(|v| v.check))
        .collect()
}

#[test]
fn an_engine_that_ignores_the_policy_is_caught_by_the_leak_checker() {
    let t = swarm_with(PlantedBug::PolicyLeak, 40);
    let c = checks(&t);
    assert!(
        c.contains(&"policy-leak"),
        "the leak checker missed deltas and states sent against policy: {c:?}"
    );
}

#[test]
fn digests_that_reveal_excluded_keys_are_caught_by_the_leak_checker() {
    // Keys and states still obey the policy here: only the digests leak.
    let t = swarm_with(PlantedBug::DigestLeak, 40);
    let c = checks(&t);
    assert!(
        c.contains(&"policy-leak"),
        "the leak checker missed digests over excluded keys: {c:?}"
    );
}

#[test]
fn a_write_concern_met_too_early_is_caught() {
    let t = swarm_with(PlantedBug::ConcernEarly, 60);
    let c = checks(&t);
    assert!(
        c.contains(&"write-concern"),
        "the checker missed regions(2) acknowledged at one region: {c:?}"
    );
}

/// Each planted bug with a swarm seed that catches it and the checks that
/// may report it: fixed seeds, so CI proves every one is still caught.
const CAUGHT_BY: &[(PlantedBug, u64, &[&str])] = &[
    // Review finding 1: a crashed `async` node reused its dots.
    (PlantedBug::AsyncReusesId, 94, &["convergence"]),
    (PlantedBug::AsyncReusesId, 213, &["counter"]),
];

#[test]
fn every_planted_bug_is_caught_by_its_listed_seed() {
    for &(bug, seed, expected) in CAUGHT_BY {
        planted::set(PlantedBug::None);
        let clean = run_seed(seed);
        assert!(
            clean.violations.is_empty(),
            "seed {seed} fails without a bug: {:?}",
            clean.violations
        );
        planted::set(bug);
        let r = run_seed(seed);
        planted::set(PlantedBug::None);
        let got: Vec<&str> = r.violations.iter().map(|v| v.check).collect();
        assert!(
            got.iter().any(|c| expected.contains(c)),
            "{bug:?} at seed {seed}: expected one of {expected:?}, got {got:?}"
        );
    }
}
