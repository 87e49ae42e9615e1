# Helpers of the callgrind scripts (sourced, not run): a server under
# valgrind's callgrind, and its total instruction count. Wall-clock on a
# shared 2-core machine is noise, instruction counts are not.
#
# A script measures one shape of load twice, with N=FEW and N=MANY units of
# work; the difference of the two totals divided by the extra deliveries is
# the server's instructions per delivery, with start-up, connecting and
# shutdown cancelled out. Loopback only; the callgrind files stay in
# test-output/callgrind/<UTC time>/ for callgrind_annotate.
# shellcheck shell=bash

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${CG_OUT:-test-output/callgrind/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
# Limits out of the way: the load, not a rate limit, decides what is measured.
FLAGS="--publish-rate 1000000 --publish-burst 1000000 --connect-rate-per-ip 0 --max-connections 100000 --outbound-queue 65536 --max-queue-bytes 16777216"

SERVER_PID=""
trap '[[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null; true' EXIT

total_ir() { # total_ir <callgrind file>: the Ir of every thread, summed
  awk '/^summary:/ { s += $2 } END { print s }' "$@"
}

# cg_start <name> <server binary> [args…]: starts the server under callgrind
# (writing $OUT/callgrind.<name>.out) on a free port; sets SERVER_PID and PORT.
cg_start() {
  local name=$1 log=$OUT/server.$1
  shift
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --separate-threads=no --callgrind-out-file="$OUT/callgrind.$name.out" \
    "$@" --port 0 $FLAGS >"$log.out" 2>"$log.err" &
  SERVER_PID=$!
  PORT=""
  for _ in $(seq 600); do
    # (The log may not exist yet: the background job may not have opened it.)
    PORT=$(sed -n 's|.*listening on [a-z]*://[^ ]*:\([0-9][0-9]*\).*|\1|p' "$log.out" 2>/dev/null | head -n1 || true)
    [[ -n $PORT ]] && return 0
    sleep 0.1
  done
  echo "server did not start; see $log.err" >&2
  exit 1
}

# cg_stop <name>: stops the server cg_start started (in this shell: only it
# can wait for its child); sets IR to its total.
cg_stop() {
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || true
  SERVER_PID=""
  IR=$(total_ir "$OUT/callgrind.$1.out")
}
