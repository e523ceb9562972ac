#!/usr/bin/env bash
# redis-benchmark against a one-node `latticed dev` RESP port and against redis-server (Debian
# `redis-server`, started here on a free loopback port with persistence off, stopped after), in
# the same run, one after the other, for BENCHMARKS.md "Redis protocol (RESP)".
#   bash scripts/bench-resp.sh target/release            # group durability (the default)
#   bash scripts/bench-resp.sh target/release async 50 100000
# usage: bench-resp.sh BIN_DIR [DURABILITY=group] [CLIENTS=50] [REQUESTS=100000]
set -euo pipefail
BIN=$1 mode=${2:-group} clients=${3:-50} requests=${4:-100000}
for tool in redis-benchmark redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install redis-tools redis-server)" >&2; exit 1; }
done
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
base=$(( 20000 + RANDOM % 20000 ))
"$BIN/latticed" dev --dir "$work/d" --base-port "$base" --durability "$mode" --regions eu >"$work/dev.log" 2>&1 &
dev=$!
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
    --dir "$work" --logfile "$work/redis.log" &
redis=$!
cleanup() {
  kill -INT "$dev" 2>/dev/null || true; wait "$dev" 2>/dev/null || true
  kill "$redis" 2>/dev/null || true; wait "$redis" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
lport=$(( base + 200 ))
for _ in $(seq 150); do [ -f "$work/d/token" ] && redis-cli -p "$lport" --no-auth-warning -a "$(cat "$work/d/token")" ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
for _ in $(seq 50); do redis-cli -p "$rport" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
token=$(cat "$work/d/token")
cmd="redis-benchmark -t set,get,incr,sadd,hset -c $clients -n $requests -q"
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(uname -r), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# lattice: latticed dev, one node, durability $mode, RESP port $lport: $cmd -p $lport -a TOKEN"
$cmd -h 127.0.0.1 -p "$lport" -a "$token" 2>&1 | tr '\r' '\n' | grep 'requests per second'
echo "# redis: $(redis-server --version | cut -d' ' -f1-3), --save '' --appendonly no, port $rport: $cmd -p $rport"
$cmd -h 127.0.0.1 -p "$rport" 2>&1 | tr '\r' '\n' | grep 'requests per second'
