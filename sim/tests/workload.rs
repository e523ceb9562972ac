#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The workload reaches what issue 13 asked of it: multi-key batches of
//! mixed sizes (one large value beside small counters and registers, in
//! one `Replica::write`), and key spaces of 10^5 keys, both drawn by swarm
//! seeds and both checked by every checker.

use lattice_sim::swarm::run_seed;
use lattice_sim::{FaultMix, Sim, SimConfig};

#[test]
fn swarm_seeds_write_mixed_size_batches_and_pass_every_checker() {
    let seeds: Vec<u64> = (0..100)
        .filter(|&s| {
            let c = SimConfig::swarm(s);
            c.batches > 0.0 && c.max_message_bytes <= 1 << 16
        })
        .take(5)
        .collect();
    assert!(seeds.len() >= 3, "too few batch seeds in small frames: {seeds:?}");
    let mut mixed = 0;
    for seed in seeds {
        let frame = SimConfig::swarm(seed).max_message_bytes;
        let r = run_seed(seed);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert!(r.summary().contains("batches=mixed("), "{}", r.summary());
        assert!(r.batches.0 >= 5 && r.batches.1 >= 1, "seed {seed}: {:?}", r.batches);
        // Ops count one by one: a batch adds several to `applied`.
        assert!(r.applied > r.batches.1 as usize * 3, "seed {seed}: {}", r.summary());
        // A value near the room half a frame leaves, not just a few bytes.
        assert!(
            r.batch_largest >= frame / 8,
            "seed {seed}: {} in {frame}B frames",
            r.batch_largest
        );
        mixed += r.mixed_batches;
    }
    assert!(mixed >= 10, "only {mixed} accepted mixed batches");
}

#[test]
fn the_reviews_shape_runs_clean_in_16_kib_frames() {
    // One large value beside several small counters per batch, 16 KiB
    // frames, three regions, no faults: everything is acknowledged and
    // converges, and every batch the engine refused left its keys as they
    // were (the `atomic`, `policy` and `type-check` checks).
    let mut cfg = SimConfig::new(13);
    cfg.faults = FaultMix::none();
    cfg.max_message_bytes = 16 << 10;
    cfg.batches = 0.5;
    cfg.ops = 400;
    let r = Sim::new(cfg).run();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(r.batches.1 >= 100 && r.mixed_batches >= 100, "{}", r.summary());
    assert!(
        r.batch_largest > 6_000 && r.batch_largest < 8 << 10,
        "{}",
        r.batch_largest
    );
    assert_eq!(r.applied, r.acked, "{}", r.summary());
}

#[test]
fn a_swarm_seed_with_100_000_keys_runs_and_passes() {
    let seed = (0..1_000)
        .find(|&s| SimConfig::swarm(s).keys == 100_000)
        .expect("a seed of the 10^5-key profile");
    let r = run_seed(seed);
    assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    assert!(r.summary().contains("keys=100000"), "{}", r.summary());
    assert!(r.applied > 2_000 && r.keys_held > 1_000, "{}", r.summary());
}
