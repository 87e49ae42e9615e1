#!/usr/bin/env bash
# Instruction counts of crosswire's fan-out path, under valgrind's callgrind:
# wall-clock on a shared 2-core machine is noise, instruction counts are not.
#
#   scripts/callgrind-fanout.sh [SERVER_BIN] [BENCH_BIN]
#
# The server (default target/release/crosswire-server) runs under callgrind;
# the load generator (crosswire-bench, not instrumented) connects SUBS
# subscribers to one topic and one publisher, and publishes N messages of
# 64 bytes, once with N=FEW and once with N=MANY. The difference of the two
# totals divided by the extra deliveries is the server's instructions per
# delivery, with start-up, connecting and shutdown cancelled out.
# Loopback only; prints one line, and keeps the callgrind files in
# test-output/callgrind/<UTC time>/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
SERVER=${1:-$TARGET/release/crosswire-server}
BENCH=${2:-$TARGET/release/crosswire-bench}
SUBS=${CG_SUBS:-100}
FEW=${CG_FEW:-200}
MANY=${CG_MANY:-1000}
OUT=test-output/callgrind/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
FLAGS="--publish-rate 1000000 --publish-burst 1000000 --connect-rate-per-ip 0 --max-connections 100000 --outbound-queue 65536 --max-queue-bytes 16777216"

SERVER_PID=""
trap '[[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null; true' EXIT

total_ir() { # total_ir <callgrind file>: the Ir of every thread, summed
  awk '/^summary:/ { s += $2 } END { print s }' "$@"
}

declare -A IR
for n in $FEW $MANY; do
  log=$OUT/server.$n
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --separate-threads=no --callgrind-out-file="$OUT/callgrind.$n.out" \
    "$SERVER" --port 0 $FLAGS >"$log.out" 2>"$log.err" &
  SERVER_PID=$!
  PORT=""
  for _ in $(seq 600); do
    PORT=$(sed -n 's|.*listening on http://[^ ]*:\([0-9][0-9]*\).*|\1|p' "$log.out" | head -n1)
    [[ -n $PORT ]] && break
    sleep 0.1
  done
  [[ -n $PORT ]] || { echo "server did not start; see $log.err" >&2; exit 1; }
  "$BENCH" --url "ws://127.0.0.1:$PORT/_ws" --label "callgrind/$n" --publishers 1 --subscribers "$SUBS" --topics 1 \
    --messages "$n" --payload-bytes 64 --warmup 0 --window 64 --duration 600 --drain-timeout 60 \
    --connect-timeout 300 --connect-batch 20 --json "$OUT/bench.$n.json" >"$OUT/bench.$n.txt"
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=""
  IR[$n]=$(total_ir "$OUT/callgrind.$n.out")
done
deliveries=$(( (MANY - FEW) * SUBS ))
echo "server Ir: N=$FEW ${IR[$FEW]}, N=$MANY ${IR[$MANY]}; per delivery: $(( (IR[$MANY] - IR[$FEW]) / deliveries )) ($SUBS subscribers, 64-byte payloads; files in $OUT)"
