#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The node benchmarks of `latticed` complete a tiny run (their figures are
//! in BENCHMARKS.md; CI only checks that they work).

use std::path::Path;

fn latticed(args: &[&str]) -> String {
    let out = std::process::Command::new(Path::new(env!("CARGO_BIN_EXE_latticed-test")))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_node_benchmarks_complete_a_tiny_run() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let s = scratch.to_str().unwrap();
    let out = latticed(&[
        "bench-sled",
        "--dir",
        s,
        "--threads",
        "2",
        "--secs",
        "1",
        "--keys",
        "100",
        "--flush",
    ]);
    assert!(out.contains("ops_per_sec="), "{out}");
    for kind in ["counter", "register", "set", "map"] {
        let out = latticed(&[
            "bench-footprint",
            "--dir",
            s,
            "--keys",
            "2000",
            "--kind",
            kind,
            "--batch",
            "500",
        ]);
        assert!(out.contains("disk_per_key="), "{out}");
    }
    let out = latticed(&[
        "bench-peer-down",
        "--dir",
        s,
        "--minutes",
        "1",
        "--rate",
        "100",
        "--max-buffer-mb",
        "1",
    ]);
    assert!(out.lines().count() == 2, "{out}");
}

#[test]
fn the_real_cluster_heal_benchmark_completes_a_tiny_run() {
    let _serial = lattice_tests::serial();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lattice-heal-bench"))
        .args(["--partition-secs", "2", "--rate", "20", "--latency-ms", "10"])
        .args(["--latticed", env!("CARGO_BIN_EXE_latticed-test")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("converged_ms="), "{text}");
}
