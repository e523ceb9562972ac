#!/usr/bin/env bash
# The write path against Redis with the same durability (issue #15), in one run:
#   - Lattice: a `latticed dev` cluster per row (loopback, embedded defaults), driven by
#     `lattice bench` on node n1 with $SESSIONS concurrent sessions (one request at a time each):
#     1 node `sync`, `group`, `async`; 3 nodes `group` (replicating to the other two on the same
#     cores); 1 node `group` with one session; reads (`--op get`) on 1 node;
#   - Redis (`redis-server`, installed with apt-get if missing and INSTALL_REDIS=1, on 127.0.0.1,
#     stopped after) with `redis-benchmark -c $SESSIONS`: SET with `appendfsync always`, with
#     `appendfsync everysec`, without persistence, and GET;
#   - raw sled on the same disk, $SESSIONS threads, with and without a flush + fsync per insert
#     (`latticed bench-sled`): what the store alone costs.
# Prints one line per measurement, then each target with its measured ratio and `met`/`MISSED`.
# Knobs: SESSIONS SECS VALUE KEYS INSTALL_REDIS. Exit status 0 whether or not targets are met.
set -euo pipefail
SESSIONS=${SESSIONS:-50}
SECS=${SECS:-10}
VALUE=${VALUE:-100}
KEYS=${KEYS:-100000}
INSTALL_REDIS=${INSTALL_REDIS:-1}
cd "$(dirname "$0")/.."
cargo build --release -q -p lattice-server -p lattice-client
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
work=$(mktemp -d)
cleanup() {
    jobs -p | xargs -r kill 2>/dev/null || true
    [ -f "$work/redis.pid" ] && kill "$(cat "$work/redis.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
declare -A rate p50 p99

# name, command...: runs a `lattice bench`-style command, keeps ops/s, p50 and p99 (µs).
measure() {
    local name=$1
    shift
    local line
    line=$("$@" | tail -1)
    echo "$name $line"
    rate[$name]=$(sed -n 's/.*ops_per_sec=\([0-9.]*\).*/\1/p' <<<"$line")
    p50[$name]=$(sed -n 's/.*p50_us=\([0-9]*\).*/\1/p' <<<"$line")
    p99[$name]=$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' <<<"$line")
}

# name, durability, regions, sessions, op
run_lattice() {
    local name=$1 mode=$2 regions=$3 sessions=$4 op=$5
    "$BIN/latticed" dev --dir "$work/$name" --base-port 17401 --durability "$mode" --regions "$regions" \
        >"$work/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 150); do
        "$BIN/lattice" --config "$work/$name/client.toml" status >/dev/null 2>&1 && break
        sleep 0.2
    done
    measure "$name" "$BIN/lattice" --config "$work/$name/client.toml" bench \
        --sessions "$sessions" --secs "$SECS" --value-size "$VALUE" --keys "$KEYS" --op "$op"
    kill -INT "$pid"
    wait "$pid" || true
}
run_lattice lattice_sync sync eu "$SESSIONS" set
run_lattice lattice_group group eu "$SESSIONS" set
run_lattice lattice_async async eu "$SESSIONS" set
run_lattice lattice_group_3nodes group eu,us,ap "$SESSIONS" set
run_lattice lattice_group_1session group eu 1 set
run_lattice lattice_get group eu "$SESSIONS" get

measure sled_noflush "$BIN/latticed" bench-sled --dir "$work/sled" --threads "$SESSIONS" --secs "$SECS" \
    --value-size "$VALUE" --keys "$KEYS"
measure sled_flush "$BIN/latticed" bench-sled --dir "$work/sled" --threads "$SESSIONS" --secs "$SECS" \
    --value-size "$VALUE" --keys "$KEYS" --flush

if ! command -v redis-server >/dev/null && [ "$INSTALL_REDIS" = 1 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq redis-server || (apt-get update -qq && apt-get install -y -qq redis-server)) >/dev/null 2>&1 || true
fi
# name, test (set|get), redis-server options...: one redis-benchmark run against a fresh server.
run_redis() {
    local name=$1 test=$2
    shift 2
    rm -rf "$work/redis" && mkdir -p "$work/redis"
    redis-server --port 16379 --bind 127.0.0.1 --save '' --daemonize yes \
        --pidfile "$work/redis.pid" --dir "$work/redis" "$@" >/dev/null
    for _ in $(seq 50); do redis-cli -p 16379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    # About $SECS seconds at Redis's speed on these machines.
    local n=$((SECS * 60000)) line upper
    upper=$(tr '[:lower:]' '[:upper:]' <<<"$test")
    line=$(redis-benchmark -p 16379 -c "$SESSIONS" -n "$n" -t "$test" -d "$VALUE" -r "$KEYS" -q |
        tr '\r' '\n' | grep "^$upper: [0-9]" | tail -1)
    echo "$name $line"
    rate[$name]=$(sed -n "s/.*$upper: \([0-9.]*\) requests.*/\1/p" <<<"$line")
    redis-cli -p 16379 shutdown nosave >/dev/null 2>&1 || true
    rm -f "$work/redis.pid"
}
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
    run_redis redis_always set --appendonly yes --appendfsync always
    run_redis redis_everysec set --appendonly yes --appendfsync everysec
    run_redis redis_none set --appendonly no
    # Against an empty keyspace, as `redis-benchmark -t get` runs (a miss costs Redis what a hit does).
    run_redis redis_get get --appendonly no
else
    echo "redis skipped: redis-server not installed (INSTALL_REDIS=1 with apt-get installs it)"
fi

ratio() { awk -v a="${rate[$1]:-0}" -v b="${rate[$2]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
# description, measured, op, target: prints `met` when `measured op target` holds.
target() {
    local ok
    ok=$(awk -v m="$2" -v t="$4" -v op="$3" 'BEGIN { if (m == "n/a" || m == "") print "n/a";
        else if ((op == ">=" && m + 0 >= t + 0) || (op == "<" && m + 0 < t + 0)) print "met"; else print "MISSED" }')
    printf '  %-58s %8s  (target %s %s)  %s\n' "$1" "$2" "$3" "$4" "$ok"
}
ms() { awk -v us="${1:-}" 'BEGIN { if (us == "") print "n/a"; else printf "%.2f", us / 1000 }'; }
echo "targets (issue #15): sessions=$SESSIONS value=${VALUE}B keys=$KEYS secs=$SECS"
target "1 node sync / redis appendfsync always" "$(ratio lattice_sync redis_always)" ">=" 1.0
target "1 node async / redis no persistence" "$(ratio lattice_async redis_none)" ">=" 0.5
target "1 node group / redis appendfsync everysec" "$(ratio lattice_group redis_everysec)" ">=" 0.5
target "3 nodes group / 1 node group" "$(ratio lattice_group_3nodes lattice_group)" ">=" 0.5
target "1 session group p50 (ms)" "$(ms "${p50[lattice_group_1session]:-}")" "<" 0.3
target "$SESSIONS sessions group p99 (ms)" "$(ms "${p99[lattice_group]:-}")" "<" 5
target "get / redis get" "$(ratio lattice_get redis_get)" ">=" 1.0
echo "baselines: lattice_sync / sled_flush = $(ratio lattice_sync sled_flush)," \
    "lattice_async / sled_noflush = $(ratio lattice_async sled_noflush)"
