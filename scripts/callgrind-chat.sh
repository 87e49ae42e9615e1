#!/usr/bin/env bash
# Instruction counts of issue 12's chat room, under valgrind's callgrind
# (helpers and method: scripts/callgrind-lib.sh).
#
#   scripts/callgrind-chat.sh [seed|typed]…    (default: both)
#
# seed: the `seed` example (raw text relayed to the room, a "Hello to you!"
# per message); typed: crosswire-server with the same room in protocol v1
# (`message` frames with seqs and history, an `ack` per message). The load
# generator (`chat`, not instrumented) runs CLIENTS members sending PER_ROUND
# messages each per round, for FEW and then MANY rounds. A delivery is a
# message a member receives (the others' and its own replies), as `chat`
# counts them. Prints one line per server.
set -euo pipefail
# shellcheck source=scripts/callgrind-lib.sh
source "$(dirname "$0")/callgrind-lib.sh"
CLIENTS=${CG_CLIENTS:-32}
PER_ROUND=${CG_PER_ROUND:-50}
FEW=${CG_FEW:-2}
MANY=${CG_MANY:-6}

for server in "${@:-seed typed}"; do
  for s in $server; do
    case $s in
      seed) bin=$TARGET/release/examples/seed typed="" ;;
      typed) bin=$TARGET/release/crosswire-server typed=--typed ;;
      *) echo "unknown server $s (seed or typed)" >&2; exit 2 ;;
    esac
    declare -A TOTAL=()
    for n in $FEW $MANY; do
      RUST_LOG=warn cg_start "$s.$n" "$bin"
      # shellcheck disable=SC2086
      "$TARGET"/release/chat --addr "127.0.0.1:$PORT" --label "callgrind/$s/$n" --clients "$CLIENTS" \
        --per-round "$PER_ROUND" --rounds "$n" --timeout 120 $typed >"$OUT/chat.$s.$n.txt"
      cg_stop "$s.$n"
      TOTAL[$n]=$IR
    done
    deliveries=$(( (MANY - FEW) * CLIENTS * PER_ROUND * CLIENTS ))
    echo "$s: server Ir: rounds=$FEW ${TOTAL[$FEW]}, rounds=$MANY ${TOTAL[$MANY]}; per delivery: $(( (TOTAL[$MANY] - TOTAL[$FEW]) / deliveries )) ($CLIENTS members, $PER_ROUND messages each per round; files in $OUT)"
  done
done
