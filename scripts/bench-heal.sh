#!/usr/bin/env bash
# Convergence after a partition heals on a real cluster (issue #7, section 5): builds the node and
# the benchmark, then runs `lattice-heal-bench` with the given arguments (see its --help).
# Example: bash scripts/bench-heal.sh --latency-ms 40 --partition-secs 30 --rate 100
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p lattice-tests --bins
exec target/release/lattice-heal-bench "$@"
