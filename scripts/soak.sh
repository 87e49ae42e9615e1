#!/usr/bin/env bash
# A bounded abuse run against crosswire's release binary with its DEFAULT
# configuration, on 127.0.0.1 only: topic churn, publish floods to fresh and
# to retained topics, stalled readers with a tiny receive buffer, presence
# churn, all while several thousand idle connections stay open. Reports the
# server's RSS per phase (a markdown table, the figures of docs/RELIABILITY.md).
# Not part of the test command: it measures, it asserts nothing.
#
#   scripts/soak.sh                      # 15 s per phase, 3000 idle connections
#   SOAK_SECONDS=5 SOAK_IDLE=500 scripts/soak.sh
#   SOAK_FLAGS="--publish-rate 10000 --publish-burst 10000 --subscribe-rate 10000 --subscribe-burst 10000" \
#     scripts/soak.sh                    # the per-peer rate limits lifted: the memory bounds must hold alone
#   SOAK_REDIS=1 scripts/soak.sh         # the same against the Redis engine: a private redis-server on a
#                                        # free loopback port (its own data directory, stopped after); the
#                                        # report ends with Redis's key count and memory
#
# Output: test-output/soak/<UTC time>/{report.md,server.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_PHASE=${SOAK_SECONDS:-15}
IDLE=${SOAK_IDLE:-3000}
OUT=test-output/soak/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"

echo "[soak] building the release server and the soak client"
cargo build --release --locked -p crosswire-server --bin crosswire-server -p crosswire-bench --bin soak
# Both ends hold thousands of sockets.
ulimit -n "$(ulimit -Hn)"

FLAGS=${SOAK_FLAGS:-}
REDIS=
if [ -n "${SOAK_REDIS:-}" ]; then
  command -v redis-server >/dev/null || { echo "[soak] SOAK_REDIS needs redis-server (scripts/setup.sh installs it)"; exit 1; }
  REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$OUT/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$OUT/redis" --save '' --appendonly no \
    --daemonize no >"$OUT/redis.log" 2>&1 &
  REDIS=$!
  for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  FLAGS="$FLAGS --redis redis://127.0.0.1:$REDIS_PORT"
fi

# shellcheck disable=SC2086 # FLAGS is a list of flags
target/release/crosswire-server --port 0 $FLAGS >"$OUT/addr" 2>"$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; [ -z "$REDIS" ] || { kill $REDIS 2>/dev/null; wait $REDIS 2>/dev/null || true; }' EXIT
for _ in $(seq 100); do
  grep -q listening "$OUT/addr" 2>/dev/null && break
  sleep 0.1
done
ADDR=$(sed -n 's#^crosswire listening on http://##p' "$OUT/addr")
[ -n "$ADDR" ] || { echo "[soak] the server did not start"; cat "$OUT/server.log"; exit 1; }
echo "[soak] server pid $SERVER on $ADDR (flags: ${FLAGS:-none}); $SECONDS_PER_PHASE s per phase, $IDLE idle connections"
target/release/soak --addr "$ADDR" --pid "$SERVER" --seconds "$SECONDS_PER_PHASE" --idle "$IDLE" | tee "$OUT/report.md"
if [ -n "$REDIS" ]; then
  {
    echo
    echo "Redis after the run: $(redis-cli -p "$REDIS_PORT" dbsize) keys, $(redis-cli -p "$REDIS_PORT" info memory | sed -n 's/^used_memory_human://p' | tr -d '\r') used (peak $(redis-cli -p "$REDIS_PORT" info memory | sed -n 's/^used_memory_peak_human://p' | tr -d '\r'))."
  } | tee -a "$OUT/report.md"
fi
echo "[soak] report: $OUT/report.md"
