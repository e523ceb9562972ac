//! Work prepared beside the engine (`Prepared`) must change nothing: a run
//! whose engines take half their writes and frames with prepared results
//! (half of those stale) is event for event the run without them.
//! (Issue 14: results tied to a key but not to the remote state they merged
//! were once taken for another state of the key, from a section held back
//! for its order; no checker saw it, as anti-entropy repaired the loss, but
//! the runs differed.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use lattice_sim::{Sim, SimConfig};

#[test]
fn prepared_results_change_no_run() {
    let (mut taken, mut stale) = (0, 0);
    for seed in 0..40 {
        let with = Sim::new(SimConfig::swarm(seed)).run();
        let mut cfg = SimConfig::swarm(seed);
        cfg.prepare = 0.0;
        let without = Sim::new(cfg).run();
        assert!(with.violations.is_empty(), "seed {seed}: {:?}", with.violations);
        assert_eq!(
            with.trace, without.trace,
            "seed {seed}: prepared results changed the run"
        );
        assert_eq!(
            (with.events, with.acked),
            (without.events, without.acked),
            "seed {seed}"
        );
        assert_eq!(without.prepared, (0, 0));
        taken += with.prepared.0;
        stale += with.prepared.1;
    }
    assert!(
        taken > 1_000 && stale > 100,
        "taken {taken}, stale {stale}: the runs must use both paths"
    );
}
