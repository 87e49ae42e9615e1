#!/usr/bin/env bash
# Instruction counts of crosswire's fan-out path, under valgrind's callgrind
# (helpers and method: scripts/callgrind-lib.sh).
#
#   scripts/callgrind-fanout.sh [SERVER_BIN] [BENCH_BIN]
#
# The server (default target/release/crosswire-server) runs under callgrind;
# the load generator (crosswire-bench, not instrumented) connects SUBS
# subscribers to one topic and one publisher, and publishes N messages of
# 64 bytes, once with N=FEW and once with N=MANY, at most WINDOW in flight
# (CG_WINDOW=1: one publish at a time, so every delivery is a subscriber's
# wake-up, as at a moderate fixed rate). Prints one line.
set -euo pipefail
# shellcheck source=scripts/callgrind-lib.sh
source "$(dirname "$0")/callgrind-lib.sh"
SERVER=${1:-$TARGET/release/crosswire-server}
BENCH=${2:-$TARGET/release/crosswire-bench}
SUBS=${CG_SUBS:-100}
FEW=${CG_FEW:-200}
MANY=${CG_MANY:-1000}
WINDOW=${CG_WINDOW:-64}

declare -A TOTAL
for n in $FEW $MANY; do
  cg_start "$n" "$SERVER"
  "$BENCH" --url "ws://127.0.0.1:$PORT/_ws" --label "callgrind/$n" --publishers 1 --subscribers "$SUBS" --topics 1 \
    --messages "$n" --payload-bytes 64 --warmup 0 --window "$WINDOW" --duration 600 --drain-timeout 60 \
    --connect-timeout 300 --connect-batch 20 --json "$OUT/bench.$n.json" >"$OUT/bench.$n.txt"
  cg_stop "$n"
  TOTAL[$n]=$IR
done
deliveries=$(( (MANY - FEW) * SUBS ))
echo "server Ir: N=$FEW ${TOTAL[$FEW]}, N=$MANY ${TOTAL[$MANY]}; per delivery: $(( (TOTAL[$MANY] - TOTAL[$FEW]) / deliveries )) ($SUBS subscribers, 64-byte payloads, window $WINDOW; files in $OUT)"
