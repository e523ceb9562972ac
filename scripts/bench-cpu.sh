#!/usr/bin/env bash
# CPU per request of one `lattice bench` run against a fresh one-node `latticed dev` (loopback):
# prints the bench line (ops/s, latencies), the node's CPU time per op (user + system, from
# /proc/PID/stat) and the load generator's (from GNU time). Used to compare two builds by
# alternating runs on a noisy machine, e.g.
#   bash scripts/bench-cpu.sh target/release async 50 set
#   bash scripts/bench-cpu.sh /path/to/other/target/release async 50 set
# usage: bench-cpu.sh BIN_DIR DURABILITY SESSIONS OP [SECS=8]
set -euo pipefail
BIN=$1 mode=$2 sessions=$3 op=$4 secs=${5:-8}
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
work=$(mktemp -d)
"$BIN/latticed" dev --dir "$work/d" --base-port 17401 --durability "$mode" --regions eu >"$work/log" 2>&1 &
dev=$!
cleanup() { kill -INT "$dev" 2>/dev/null || true; wait "$dev" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 150); do "$BIN/lattice" --config "$work/d/client.toml" status >/dev/null 2>&1 && break; sleep 0.2; done
node=$(pgrep -f "latticed run --config $work/d/" | head -1)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
t0=$(ticks "$node")
/usr/bin/time -f "%U %S" -o "$work/time" "$BIN/lattice" --config "$work/d/client.toml" bench \
    --sessions "$sessions" --secs "$secs" --value-size 100 --keys 100000 --op "$op" >"$work/out"
t1=$(ticks "$node")
line=$(tail -1 "$work/out")
ops=$(sed -n 's/^ops=\([0-9]*\).*/\1/p' <<<"$line")
awk -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" -v ops="$ops" -v line="$line" \
    -v gen="$(cat "$work/time")" 'BEGIN {
        split(gen, g, " ");
        printf "%s node_cpu_us_per_op=%.1f bench_cpu_us_per_op=%.1f\n", line,
            (t1 - t0) * 1e6 / hz / ops, (g[1] + g[2]) * 1e6 / ops }'
