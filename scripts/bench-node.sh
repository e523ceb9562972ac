#!/usr/bin/env bash
# Node throughput and latency (issue #7, section 1), in one run:
#   - Lattice: a `latticed dev` cluster (3 processes, 3 regions, loopback) per durability mode,
#     driven by `lattice bench` on node n1 with $SESSIONS concurrent sessions of SET-like writes;
#   - raw sled on the same disk, $SESSIONS threads, same key and value sizes, with and without a
#     flush + fsync per insert (`latticed bench-sled`);
#   - Redis (`redis-server`, installed with apt-get if missing and INSTALL_REDIS=1, started on
#     127.0.0.1 without persistence and stopped after) with `redis-benchmark -c $SESSIONS -t set`.
# Prints one line per measurement and the ratios. Knobs: SESSIONS SECS VALUE KEYS INSTALL_REDIS.
set -euo pipefail
SESSIONS=${SESSIONS:-50}
SECS=${SECS:-10}
VALUE=${VALUE:-100}
KEYS=${KEYS:-100000}
INSTALL_REDIS=${INSTALL_REDIS:-1}
cd "$(dirname "$0")/.."
cargo build --release -q -p lattice-server -p lattice-client
BIN=$PWD/target/release
work=$(mktemp -d)
cleanup() {
    jobs -p | xargs -r kill 2>/dev/null || true
    [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
declare -A rate

measure() { # name, command...
    local name=$1
    shift
    local line
    line=$("$@" | tail -1)
    echo "$name $line"
    rate[$name]=$(sed -n 's/.*ops_per_sec=\([0-9.]*\).*/\1/p' <<<"$line")
}

# name, durability, regions[, sessions]
run_lattice() {
    local name=$1 mode=$2 regions=$3 sessions=${4:-$SESSIONS}
    "$BIN/latticed" dev --dir "$work/$name" --base-port 17401 --durability "$mode" --regions "$regions" \
        >"$work/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 150); do
        "$BIN/lattice" --config "$work/$name/client.toml" status >/dev/null 2>&1 && break
        sleep 0.2
    done
    measure "$name" "$BIN/lattice" --config "$work/$name/client.toml" bench \
        --sessions "$sessions" --secs "$SECS" --value-size "$VALUE" --keys "$KEYS" --op set
    kill -INT "$pid"
    wait "$pid" || true
}
for mode in sync group async; do
    run_lattice "lattice_$mode" "$mode" eu,us,ap
done
# One node alone (no replication sharing the cores), group durability.
run_lattice lattice_group_1node group eu
# Latency without queueing: one session, three nodes, group durability.
run_lattice lattice_group_1session group eu,us,ap 1

measure sled_noflush "$BIN/latticed" bench-sled --dir "$work/sled" --threads "$SESSIONS" --secs "$SECS" \
    --value-size "$VALUE" --keys "$KEYS"
measure sled_flush "$BIN/latticed" bench-sled --dir "$work/sled" --threads "$SESSIONS" --secs "$SECS" \
    --value-size "$VALUE" --keys "$KEYS" --flush

if ! command -v redis-server >/dev/null && [ "$INSTALL_REDIS" = 1 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq redis-server || (apt-get update -qq && apt-get install -y -qq redis-server)) >/dev/null 2>&1 || true
fi
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    redis-server --port 16379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
        --pidfile "$work/redis.pid" --dir "$work" >/dev/null
    for _ in $(seq 50); do redis-cli -p 16379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    n=$((SECS * 40000))
    line=$(redis-benchmark -p 16379 -c "$SESSIONS" -n "$n" -t set -d "$VALUE" -r "$KEYS" -q | tr '\r' '\n' | grep 'SET:' | tail -1)
    echo "redis_set $line"
    rate[redis_set]=$(sed -n 's/.*SET: \([0-9.]*\) requests.*/\1/p' <<<"$line")
    redis-cli -p 16379 shutdown nosave >/dev/null 2>&1 || true
else
    echo "redis_set skipped: redis-server not installed (INSTALL_REDIS=1 with apt-get installs it)"
fi

ratio() { awk -v a="${rate[$1]:-0}" -v b="${rate[$2]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
echo "ratios (ops/s): sessions=$SESSIONS value=${VALUE}B keys=$KEYS secs=$SECS"
for mode in sync group async group_1node; do
    echo "  lattice_$mode / sled_flush = $(ratio "lattice_$mode" sled_flush)" \
        " / sled_noflush = $(ratio "lattice_$mode" sled_noflush)" \
        " / redis_set = $(ratio "lattice_$mode" redis_set)"
done
