#!/usr/bin/env bash
# Instruction counts of one connection's life in crosswire-server, under
# valgrind's callgrind (helpers and method: scripts/callgrind-lib.sh): what
# issue 12's connects/s figure costs the server, without wall-clock noise.
#
#   scripts/callgrind-idle.sh [SERVER_BIN] [IDLE_BIN]
#
# The server (default target/release/crosswire-server) runs under callgrind;
# crosswire-bench's `idle` (not instrumented) opens FEW and then MANY
# WebSocket connections, 64 at a time, and leaves them idle; the server's
# shutdown closes them. The difference between the two runs, per
# connection, is the accept, the HTTP upgrade, the `open` hook, an idle
# second and the close. Prints one line.
set -euo pipefail
# shellcheck source=scripts/callgrind-lib.sh
source "$(dirname "$0")/callgrind-lib.sh"
SERVER=${1:-$TARGET/release/crosswire-server}
IDLE=${2:-$TARGET/release/idle}
FEW=${CG_FEW:-500}
MANY=${CG_MANY:-2500}

declare -A TOTAL
for n in $FEW $MANY; do
  RUST_LOG=warn cg_start "idle.$n" "$SERVER"
  "$IDLE" --addr "127.0.0.1:$PORT" --pid "$SERVER_PID" --label "callgrind/idle/$n" --connections "$n" \
    --connect-batch 64 --settle 1 >"$OUT/idle.$n.txt"
  cg_stop "idle.$n"
  TOTAL[$n]=$IR
done
echo "server Ir: connections=$FEW ${TOTAL[$FEW]}, connections=$MANY ${TOTAL[$MANY]}; per connection: $(( (TOTAL[$MANY] - TOTAL[$FEW]) / (MANY - FEW) )) (files in $OUT)"
