#!/usr/bin/env bash
# Benchmarks crosswire's pub/sub fan-out against Bun's built-in uWebSockets
# pub/sub (bench/bun/server.ts) with the same load generator (bench/, crate
# crosswire-bench), on 127.0.0.1 only. Measures; asserts nothing: see
# docs/BENCHMARKS.md for the method and how to read the numbers.
#
#   scripts/bench.sh                      # every scenario, 3 runs each, both servers
#   BENCH_RUNS=1 scripts/bench.sh         # quicker
#   BENCH_SCENARIOS="fanout latency" scripts/bench.sh
#   BENCH_SERVERS=crosswire scripts/bench.sh
#   BENCH_PIN=1 scripts/bench.sh          # server on CPU 0, load generator on CPU 1
#   BENCH_SCENARIOS=cluster scripts/bench.sh   # only the two-node runs over Redis
#   BENCH_PERF=1 scripts/bench.sh         # also sample each server with `perf record`: where its
#                                         # CPU goes, kernel vs user space (<run>.perf.txt); and
#                                         # count its send system calls (<run>.syscalls.csv)
#
# Raw results (one JSON file per run, the servers' logs, a table) go to
# test-output/bench/<UTC time>/. Nothing system-wide is changed.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${BENCH_RUNS:-3}
# BENCH_REPORT=test-output/bench/<time>: only redo the tables and the plot of an earlier run.
REPORT_ONLY=${BENCH_REPORT:-}
SERVERS=${BENCH_SERVERS:-"crosswire bun"}
PIN=${BENCH_PIN:-0}
PERF=${BENCH_PERF:-0}
BUN_VERSION=1.4.5
BUN=bench/bun/node_modules/@oven/bun-linux-x64/bin/bun
OUT=${REPORT_ONLY:-test-output/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

# The scenarios: name and load generator flags. Every run is bounded by
# --duration (publishing) plus --drain-timeout, and connecting by
# --connect-timeout; each of these takes a few seconds at most.
declare -A SCENARIO=(
  [fanout]="--publishers 1 --subscribers 1000 --topics 1 --messages 10000 --payload-bytes 64"
  [fanin]="--publishers 10 --subscribers 100 --topics 1 --messages 10000 --payload-bytes 64"
  [topics]="--publishers 10 --subscribers 1000 --topics 100 --messages 20000 --payload-bytes 64"
  [large]="--publishers 1 --subscribers 100 --topics 1 --messages 20000 --payload-bytes 4096"
  [latency]="--publishers 10 --subscribers 100 --topics 1 --messages 300 --rate 1000 --payload-bytes 64"
  # Issue 12's fixed-rate fan-out: 1 -> 1,000 subscribers at 500 publishes/s; p99 is the figure.
  [fanout_rate]="--publishers 1 --subscribers 1000 --topics 1 --messages 5000 --rate 500 --payload-bytes 64"
  # Idle connections (crosswire-bench's bin `idle`, not the load generator):
  # server RSS per connection and connects/s.
  [idle]="--connections ${BENCH_IDLE:-10000} --connect-batch 64 --settle 3"
  # Issue 12's chat room: the `seed` example against bench/bun/seed.ts (the same
  # handler), 32 members, 50 messages each per round (crosswire-bench's bin `chat`).
  [chat]="--clients 32 --per-round 50 --rounds ${BENCH_CHAT_ROUNDS:-200} --timeout 120"
)
# idle last: its 20 000 closed sockets linger in TIME_WAIT, and a chat room run
# right after it relayed half as fast (2.1-2.5 M/s, 4.4-4.7 M/s alone).
ORDER=(fanout fanin topics large latency fanout_rate chat idle)
SCENARIOS=${BENCH_SCENARIOS:-${ORDER[*]}}
COMMON="--duration 20 --drain-timeout 5 --connect-timeout 30 --warmup 20 --connect-batch 50"

# crosswire's limits are for production; a benchmark must not trip them:
# the per-peer publish rate limit (default 100/s), the per-address connect
# rate (200/s after a burst of 2000), and the slow-consumer bounds, set here to
# Bun's equivalent, its 16 MiB per-socket backpressure limit (the load
# generator's window keeps each subscriber's backlog far below). Everything
# else is the default.
CROSSWIRE_FLAGS="--publish-rate 1000000 --publish-burst 1000000 --connect-rate-per-ip 0 --max-connections 100000 --outbound-queue 65536 --max-queue-bytes 16777216"

# How busy both CPUs were (percent) over half a second, from /proc/stat:
# unlike the load average, this reflects what is running right now.
cpu_busy() {
  local _c user nice sys idle iowait irq softirq steal t1 i1 t2 i2
  read -r _c user nice sys idle iowait irq softirq steal _ </proc/stat
  t1=$((user + nice + sys + idle + iowait + irq + softirq + steal)) i1=$((idle + iowait))
  sleep 0.5
  read -r _c user nice sys idle iowait irq softirq steal _ </proc/stat
  t2=$((user + nice + sys + idle + iowait + irq + softirq + steal)) i2=$((idle + iowait))
  echo $((100 * ((t2 - t1) - (i2 - i1)) / (t2 - t1 > 0 ? t2 - t1 : 1)))
}

# Before each run, wait (at most BENCH_QUIET_WAIT seconds, default 60) for the
# machine to be at most BENCH_MAX_BUSY percent busy (default 20): the runs
# share two cores with whatever else is running. The busy figure is recorded
# with every run either way.
MAX_BUSY=${BENCH_MAX_BUSY:-20}
QUIET_WAIT=${BENCH_QUIET_WAIT:-60}
wait_quiet() {
  local waited=0
  BUSY=$(cpu_busy)
  while ((BUSY > MAX_BUSY && waited < QUIET_WAIT)); do
    sleep 1.5
    waited=$((waited + 2))
    BUSY=$(cpu_busy)
  done
}

SERVER_PID=""
stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

# With BENCH_PIN=1: the server on CPU 0, the load generator on CPU 1
# (taskset execs the command, so $! stays the server's own pid).
SERVER_CPU=() LOADGEN_CPU=()
if [[ $PIN == 1 ]]; then SERVER_CPU=(taskset -c 0) LOADGEN_CPU=(taskset -c 1); fi
TARGET=${CARGO_TARGET_DIR:-target}

# With BENCH_PERF=1, `perf record` samples the server (software clock: no
# hardware counters needed) for the whole run; <run>.perf.txt gets the share of
# its samples in the kernel and in each binary, and its hottest functions.
# `perf stat` counts the server's system calls that send (write, writev,
# sendto, sendmsg: Bun sends with sendto, crosswire with writev) where the
# kernel lets it (syscall tracepoints); <run>.syscalls.csv has the counts.
# Most of both servers' CPU is the kernel's work per call, so deliveries per
# call says much of who does less work.
PERF_PID="" STAT_PID="" COUNT_SENDS=0
SEND_CALLS=syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg
perf_start() { # <run prefix>
  [[ $PERF == 1 ]] || return 0
  perf record -q -e cpu-clock -F 999 -p "$SERVER_PID" -o "$1.perf.data" 2>/dev/null &
  PERF_PID=$!
  if [[ $COUNT_SENDS == 1 ]]; then
    perf stat -x, -e "$SEND_CALLS" -p "$SERVER_PID" -o "$1.syscalls.csv" 2>/dev/null &
    STAT_PID=$!
  fi
}
perf_stop() { # <run prefix>
  [[ -n $PERF_PID ]] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=""
  if [[ -n $STAT_PID ]]; then
    kill -INT "$STAT_PID" 2>/dev/null || true
    wait "$STAT_PID" 2>/dev/null || true
    STAT_PID=""
    local calls
    calls=$(awk -F, '/syscalls:sys_enter_/ && $1 ~ /^[0-9]+$/ { n += $1 } END { if (NR) print n + 0 }' "$1.syscalls.csv" 2>/dev/null || true)
    if [[ -n $calls && -f $1.json ]]; then
      jq --argjson c "$calls" '.send_calls = $c' "$1.json" >"$1.json.tmp" && mv "$1.json.tmp" "$1.json"
    fi
  fi
  {
    echo "# share of the server's CPU samples by binary ([kernel.kallsyms] is the kernel)"
    perf report -i "$1.perf.data" --sort dso --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 8
    echo "# hottest functions"
    perf report -i "$1.perf.data" --sort dso,sym --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
  } >"$1.perf.txt" || true # (head closes the pipe early)
  rm -f "$1.perf.data"
  # The kernel's share goes into the run's JSON, for the table.
  local kernel
  kernel=$(awk '!/^#/ && /\[kernel.kallsyms\]/ { sub("%", "", $1); print $1; exit }' "$1.perf.txt" || true)
  if [[ -n $kernel && -f $1.json ]]; then
    jq --argjson k "$kernel" '.perf_kernel_pct = $k' "$1.json" >"$1.json.tmp" && mv "$1.json.tmp" "$1.json"
  fi
}

for tool in jq npm; do
  command -v "$tool" >/dev/null || { echo "scripts/bench.sh needs $tool" >&2; exit 2; }
done
if [[ $PERF == 1 ]] && ! command -v perf >/dev/null; then
  echo "BENCH_PERF=1 needs perf (Debian: linux-perf)" >&2
  exit 2
fi
# Whether this kernel lets perf count the send calls (tracepoints), asked once.
if [[ $PERF == 1 ]] && perf stat -x, -e "$SEND_CALLS" true >/dev/null 2>&1; then COUNT_SENDS=1; fi
if [[ $PIN == 1 ]] && ! command -v taskset >/dev/null; then
  echo "BENCH_PIN=1 needs taskset (util-linux)" >&2
  exit 2
fi

if [[ -z $REPORT_ONLY ]]; then
echo "== building (release)"
cargo build --release --quiet -p crosswire-server -p crosswire-bench --bins
cargo build --release --quiet -p crosswire-server --example seed
if [[ ! -x $BUN ]] || [[ $("$BUN" --version) != "$BUN_VERSION" ]]; then
  echo "== installing Bun $BUN_VERSION (npm ci in bench/bun)"
  (cd bench/bun && npm ci --no-audit --no-fund --loglevel=error)
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "bun: $("$BUN" --version)"
  echo "crosswire flags: $CROSSWIRE_FLAGS"
  echo "common flags: $COMMON"
  echo "pinned: $PIN"
  echo "uptime: $(uptime)"
} | tee "$OUT/machine.txt"

# The port a server printed in <log>.out ("listening on http://HOST:PORT"),
# waiting at most 10 s; fails when the server <pid> exits first.
wait_port() { # <log prefix> <pid>
  local port
  for _ in $(seq 100); do
    port=$(sed -n 's|.*listening on [a-z]*://[^ /]*:\([0-9][0-9]*\).*|\1|p' "$1.out" | head -n1)
    [[ -n $port ]] && { echo "$port"; return 0; }
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

start_server() { # start_server <name> <log prefix> [seed]; sets SERVER_PID and PORT
  local name=$1 log=$2
  [[ ${3:-} == seed ]] && name=$name-seed
  case $name in
    crosswire-seed) RUST_LOG=warn "${SERVER_CPU[@]}" "$TARGET"/release/examples/seed --port 0 $CROSSWIRE_FLAGS >"$log.out" 2>"$log.err" & ;;
    bun-seed) "${SERVER_CPU[@]}" "$BUN" bench/bun/seed.ts --port 0 >"$log.out" 2>"$log.err" & ;;
    crosswire) "${SERVER_CPU[@]}" "$TARGET"/release/crosswire-server --port 0 $CROSSWIRE_FLAGS >"$log.out" 2>"$log.err" & ;;
    bun) "${SERVER_CPU[@]}" "$BUN" bench/bun/server.ts --port 0 >"$log.out" 2>"$log.err" & ;;
    *)
      echo "unknown server $name" >&2
      exit 2
      ;;
  esac
  SERVER_PID=$!
  PORT=$(wait_port "$log" "$SERVER_PID") && return 0
  echo "$name did not start; see $log.err" >&2
  cat "$log.err" >&2
  exit 1
}

for scenario in $SCENARIOS; do
  [[ $scenario == cluster ]] && continue # run_cluster below
  [[ -n ${SCENARIO[$scenario]:-} ]] || { echo "unknown scenario $scenario" >&2; exit 2; }
  for run in $(seq "$RUNS"); do
    # Alternate the servers run by run, so drifting background load hits both alike.
    for server in $SERVERS; do
      base="$OUT/$scenario.$server.$run"
      wait_quiet
      start_server "$server" "$base.server" "$([[ $scenario == chat ]] && echo seed)"
      echo "== $scenario run $run: $server (port $PORT; CPUs ${BUSY}% busy before; $(uptime | sed 's/.*load/load/'))"
      perf_start "$base"
      if [[ $scenario == chat ]]; then
        # shellcheck disable=SC2086
        "${LOADGEN_CPU[@]}" "$TARGET"/release/chat --addr "127.0.0.1:$PORT" --pid "$SERVER_PID" --label "$scenario/$server" \
          --json "$base.json" ${SCENARIO[$scenario]} || echo "   (run failed; recorded as missing)"
        perf_stop "$base"
        stop_server
        continue
      fi
      if [[ $scenario == idle ]]; then
        # shellcheck disable=SC2086
        "${LOADGEN_CPU[@]}" "$TARGET"/release/idle --addr "127.0.0.1:$PORT" --pid "$SERVER_PID" --label "$scenario/$server" \
          --json "$base.json" ${SCENARIO[$scenario]} || echo "   (run failed; recorded as missing)"
        perf_stop "$base"
        stop_server
        continue
      fi
      # shellcheck disable=SC2086
      if ! "${LOADGEN_CPU[@]}" "$TARGET"/release/crosswire-bench --url "ws://127.0.0.1:$PORT/_ws" --label "$scenario/$server" \
        --server-pid "$SERVER_PID" --json "$base.json" --meta "cpu_busy_before=$BUSY" $COMMON ${SCENARIO[$scenario]}; then
        echo "   (run failed; recorded as missing)"
      fi
      perf_stop "$base"
      stop_server
    done
  done
done
fi

# The two-node runs over Redis (issue 11): a private redis-server and two
# crosswire nodes on it, publishers on node A and subscribers on node B, so
# that every delivery crosses Redis. The loads are the fanin and latency
# scenarios', whose single-node numbers stand next to them in the table. Bun
# has no counterpart. They run by default, and with BENCH_SCENARIOS naming
# "cluster". The server CPU column is node B's (the fan-out); node A's and
# Redis's are not counted.
CLUSTER_PIDS=()
stop_cluster() {
  local pid
  for pid in "${CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${CLUSTER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  CLUSTER_PIDS=()
}
trap 'stop_server; stop_cluster' EXIT
trap 'stop_server; stop_cluster; exit 130' INT TERM

# A private redis-server without persistence, in a directory of its own; sets
# REDIS_PORT. Its port 0 would turn TCP off, so: a port nothing answers on,
# and another try if something took it first.
start_redis() { # <dir>
  local dir=$1 try
  mkdir -p "$dir"
  for try in 1 2 3 4 5; do
    REDIS_PORT=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && continue
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$dir" --logfile redis.log \
      --save "" --appendonly no --daemonize no >/dev/null 2>&1 &
    CLUSTER_PIDS+=("$!")
    for _ in $(seq 100); do
      [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && return 0
      kill -0 "${CLUSTER_PIDS[-1]}" 2>/dev/null || break
      sleep 0.1
    done
  done
  echo "redis-server did not start; see $dir/redis.log" >&2
  exit 1
}

# A crosswire node on Redis; sets NODE_PID and NODE_PORT.
start_node() { # <log prefix> <redis url>
  local log=$1
  "${SERVER_CPU[@]}" "$TARGET"/release/crosswire-server --port 0 --redis "$2" $CROSSWIRE_FLAGS >"$log.out" 2>"$log.err" &
  NODE_PID=$!
  CLUSTER_PIDS+=("$NODE_PID")
  NODE_PORT=$(wait_port "$log" "$NODE_PID") && return 0
  echo "node did not start; see $log.err" >&2
  cat "$log.err" >&2
  exit 1
}

run_cluster() { # <name> <the single-node scenario whose load it runs>
  local name=$1 load=$2 run base
  for run in $(seq "$RUNS"); do
    base="$OUT/$name.crosswire.$run"
    wait_quiet
    # A fresh Redis and fresh nodes per run: no topic, history or backlog carried over.
    start_redis "$base.redis"
    start_node "$base.node-a" "redis://127.0.0.1:$REDIS_PORT"
    local port_a=$NODE_PORT
    start_node "$base.node-b" "redis://127.0.0.1:$REDIS_PORT"
    echo "== $name run $run: crosswire, publishers on :$port_a, subscribers on :$NODE_PORT, redis :$REDIS_PORT (CPUs ${BUSY}% busy before)"
    # shellcheck disable=SC2086
    if ! "${LOADGEN_CPU[@]}" "$TARGET"/release/crosswire-bench --url "ws://127.0.0.1:$NODE_PORT/_ws" \
      --publish-url "ws://127.0.0.1:$port_a/_ws" --label "$name/crosswire-2-nodes-redis" \
      --server-pid "$NODE_PID" --json "$base.json" --meta "cpu_busy_before=$BUSY" $COMMON ${SCENARIO[$load]}; then
      echo "   (run failed; recorded as missing)"
    fi
    stop_cluster
  done
}
if [[ -z $REPORT_ONLY ]] && [[ -z ${BENCH_SCENARIOS:-} || " $SCENARIOS " == *" cluster "* ]]; then
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    || { echo "the cluster runs need redis-server and redis-cli: run scripts/setup.sh" >&2; exit 2; }
  redis-server --version | sed 's/^/redis: /' | tee -a "$OUT/machine.txt"
  # Throughput as fast as the window allows (fanin's load), and latency at a
  # moderate fixed rate (the latency scenario's), both across the two nodes.
  run_cluster cluster fanin
  run_cluster cluster-latency latency
fi

# One line per scenario and server: the median of the runs of each column.
# (summary.json is made from the runs' JSON below; an earlier one must not count as a run.)
rm -f "$OUT/summary.json"
jq -s -r '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  def r(n): if . == null then "-" else (. * pow(10; n) | round / pow(10; n) | tostring) end;
  def k: if . == null then "-" else (. / 1000 | round | tostring) + "k" end;
  def m: if . == null then "-" else (. / 1e6 | r(2)) + "M" end;
  def ms: if . == null then null else . / 1000 end;
  map(select(.deliveries_per_s != null))
  | group_by(.label)
  | map({
      label: .[0].label,
      runs: length,
      dps: (map(.deliveries_per_s) | median),
      pps: (map(.publishes_per_s) | median),
      p50: (map(.latency_us.p50) | median),
      p99: (map(.latency_us.p99) | median),
      max: (map(.latency_us.max) | median),
      scpu: (map(.cpu_percent.server) | median),
      lcpu: (map(.cpu_percent.loadgen) | median),
      per_cpu: (map(if (.cpu_percent.server // 0) > 0 then .deliveries_per_s / (.cpu_percent.server / 100) else null end) | median),
      errors: (map(if .errors == null then 0 else .errors.lost + .errors.seq_out_of_order + .errors.unparsed
                   + ([.errors.subscriber_error_frames[], .errors.publisher_error_frames[], .errors.closed_connections[]] | add // 0) end) | add),
      load: (map(.loadavg_at_start[0]) | median),
      kernel: (map(.perf_kernel_pct) | map(select(. != null)) | median),
      per_call: (map(if (.send_calls // 0) > 0
                     then (.delivered // ((.deliveries_per_s // 0) * (.seconds // 0))) / .send_calls else null end)
                 | map(select(. != null)) | median),
      busy: (map(.meta.cpu_busy_before // "0" | tonumber) | max)
    })
  | (["scenario/server", "runs", "deliveries/s", "publishes/s", "p50 ms", "p99 ms", "max ms",
      "server CPU %", "loadgen CPU %", "deliveries per server CPU-s", "errors", "load (1 min)", "max busy before %", "server CPU in kernel %",
      "deliveries per send call"] | join(" | ")),
    ([range(15) | "---"] | join(" | ")),
    (.[] | [.label, (.runs | tostring), (.dps | m), (.pps | if . == null then "-" else round | tostring end),
            (.p50 | ms | r(2)), (.p99 | ms | r(2)), (.max | ms | r(2)), (.scpu | r(0)), (.lcpu | r(0)), (.per_cpu | m),
            (.errors | tostring), (.load | r(2)), (.busy | tostring), (.kernel | r(0)), (.per_call | r(2))]
          | join(" | "))
' "$OUT"/*.json | sed 's/^/| /; s/$/ |/' | tee "$OUT/table.md"

# Per scenario and server, the medians the ratio table and the plot use.
jq -s '
  def median: map(select(. != null)) | sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  group_by(.label)
  | map({
      scenario: (.[0].label | split("/")[0]),
      server: (.[0].label | split("/")[1]),
      dps: (map(.deliveries_per_s) | median),
      per_cpu: (map(if .deliveries_per_s != null and (.cpu_percent.server // 0) > 0
                    then .deliveries_per_s / (.cpu_percent.server / 100) else null end) | median),
      p99_ms: (map(.latency_us.p99) | median | if . == null then null else . / 1000 end),
      bytes_per_conn: (map(.rss_bytes_per_connection) | median),
      connects_per_s: (map(.connects_per_s) | median)
    })
' "$OUT"/*.json >"$OUT/summary.json"

# crosswire over Bun, per scenario: above 1 is crosswire ahead for the
# rates, below 1 for p99 and bytes per connection.
jq -r '
  def r: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  (["scenario", "deliveries/s (x Bun)", "deliveries per server CPU-s (x Bun)", "p99 ms crosswire / Bun",
    "bytes per idle connection crosswire / Bun", "connects/s (x Bun)"] | join(" | ")),
  ([range(6) | "---"] | join(" | ")),
  (group_by(.scenario)[]
   | select(any(.[]; .server == "crosswire" or .server == "bun"))
   | (map(select(.server == "crosswire"))[0] // {}) as $c
   | (map(select(.server == "bun"))[0] // {}) as $b
   | [$c.scenario // $b.scenario, (ratio($c.dps; $b.dps) | r), (ratio($c.per_cpu; $b.per_cpu) | r),
      "\($c.p99_ms | r) / \($b.p99_ms | r)", "\($c.bytes_per_conn | if . == null then null else round end | r) / \($b.bytes_per_conn | if . == null then null else round end | r)",
      (ratio($c.connects_per_s; $b.connects_per_s) | r)]
   | join(" | "))
' "$OUT/summary.json" | sed 's/^/| /; s/$/ |/' | tee "$OUT/ratios.md"

"$TARGET"/release/plot --summary "$OUT/summary.json" --out "$OUT/bench.svg" \
  --caption "$(nproc) CPUs, $(git rev-parse --short HEAD), $(date -u +%F)"
echo "raw results: $OUT (plot: $OUT/bench.svg; copy it to docs/bench.svg with the tables)"
