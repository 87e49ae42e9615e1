#!/usr/bin/env bash
# Real-browser tests of crosswire-client, against the real server binary:
#   1. the wasm-bindgen-test suite (client/tests/browser.rs) in headless
#      Chromium via chromedriver, through a TCP proxy that can drop connections;
#   2. the end-to-end test (tests/browser/e2e.mjs): the demo built by
#      `trunk build --release --offline`, served by the server with --static,
#      driven by playwright-core in Debian's Chromium (two pages, a server
#      restart, a failover between two nodes on a private redis-server);
#      screenshots go to test-output/.
# Everything listens on 127.0.0.1. Prints "browser: N passed, M failed" last
# and exits non-zero on failure. Needs what scripts/setup.sh --browser installs.
#   3. the README's Yew example, built as a new app outside the repository.
#   scripts/browser-tests.sh [wasm|e2e|readme]   # one part only
#   CROSSWIRE_SERVER_BIN=path/to/crosswire-server scripts/browser-tests.sh   # skip building the server
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/node_modules/.bin:$HOME/.cargo/bin:$PATH"
OUT="$ROOT/test-output"
mkdir -p "$OUT"
ONLY=${1:-all}

say() { printf '\033[1m[browser-tests]\033[0m %s\n' "$*"; }
PASSED=0
FAILED=0
FAILURES=()
pass() { PASSED=$((PASSED + $1)); }
fail() { FAILED=$((FAILED + $1)); FAILURES+=("$2"); }

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null
  done
  sleep 0.2
  for pid in "${PIDS[@]}"; do
    kill -9 "$pid" 2>/dev/null
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$ONLY" != readme ]; then
  for tool in wasm-bindgen-test-runner chromedriver chromium node; do
    command -v "$tool" >/dev/null || { say "missing $tool: run scripts/setup.sh --browser"; echo "browser: 0 passed, 1 failed"; exit 1; }
  done
fi

# Waits (bounded) for a file to contain a line matching a pattern; prints the match.
wait_line() { # file pattern seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if grep -m1 -E "$2" "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# CROSSWIRE_SERVER_BIN=path uses an already built server instead of building one.
if [ -n "${CROSSWIRE_SERVER_BIN:-}" ]; then
  SERVER_BIN=$CROSSWIRE_SERVER_BIN
else
  SERVER_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/crosswire-server"
  say "building the server"
  cargo build -q -p crosswire-server || { say "the server does not build"; echo "browser: 0 passed, 1 failed"; exit 1; }
fi

# Starts the server; sets SERVER_PID and SERVER_PORT. Extra args are passed on.
start_server() { # log port [args...]
  local log=$1 port=$2
  shift 2
  : >"$log.out"  # truncate here: the child's own redirection may come after wait_line's first look
  "$SERVER_BIN" --host 127.0.0.1 --port "$port" "$@" >"$log.out" 2>"$log.err" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  local line
  line=$(wait_line "$log.out" '^crosswire listening on http://127\.0\.0\.1:[0-9]+' 20) || {
    say "the server did not start; its log:"; tail -20 "$log.err"; return 1; }
  SERVER_PORT=${line##*:}
}

start_proxy() { # target-port log [jwt-secret]
  : >"$2.out"
  node tests/browser/proxy.mjs --target "127.0.0.1:$1" ${3:+--jwt-secret "$3"} >"$2.out" 2>"$2.err" &
  PIDS+=("$!")
  local line
  line=$(wait_line "$2.out" '^\{"proxy"' 10) || { say "the proxy did not start"; cat "$2.err"; return 1; }
  PROXY_PORT=$(sed -E 's/.*"proxy":([0-9]+).*/\1/' <<<"$line")
  CONTROL_PORT=$(sed -E 's/.*"control":([0-9]+).*/\1/' <<<"$line")
}

run_wasm() {
  say "wasm-bindgen-test in headless Chromium"
  start_server "$OUT/wasm-server" 0 || { fail 1 "wasm: server"; return; }
  # The proxy also mints tokens for the auth server below (its /token endpoint
  # plays an app's token endpoint for the refresher tests).
  local secret="crosswire-browser-tests-$RANDOM$RANDOM$RANDOM"
  start_proxy "$SERVER_PORT" "$OUT/wasm-proxy" "$secret" || { fail 1 "wasm: proxy"; return; }
  say "server on :$SERVER_PORT, proxy on :$PROXY_PORT (control :$CONTROL_PORT)"
  local main_pid=$SERVER_PID main_port=$SERVER_PORT auth_ws="" token=""
  # A second server with token auth, when this server build has it.
  if "$SERVER_BIN" --help | grep -q -- --jwt-secret; then
    if start_server "$OUT/wasm-auth-server" 0 --jwt-secret "$secret"; then
      auth_ws="ws://127.0.0.1:$SERVER_PORT/_ws"
      # An HS256 token for user wasm-test, allowed only the test:* topics.
      token=$(node -e '
        const c = require("crypto"), b = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
        const body = b({ alg: "HS256", typ: "JWT" }) + "." + b({ sub: "wasm-test", exp: Math.floor(Date.now() / 1000) + 3600,
          subscribe: ["test:*"], publish: ["test:*"] });
        console.log(body + "." + c.createHmac("sha256", process.argv[1]).update(body).digest("base64url"));' "$secret")
      say "auth server on :$SERVER_PORT"
    else
      fail 1 "wasm: auth server"
    fi
  fi
  SERVER_PID=$main_pid SERVER_PORT=$main_port
  local log="$OUT/wasm-tests.log"
  (
    cd client
    export CHROMEDRIVER=/usr/bin/chromedriver
    export WASM_BINDGEN_TEST_TIMEOUT=180
    export CROSSWIRE_TEST_WS="ws://127.0.0.1:$PROXY_PORT/_ws"
    export CROSSWIRE_TEST_WS_DIRECT="ws://127.0.0.1:$SERVER_PORT/_ws"
    export CROSSWIRE_TEST_CONTROL="http://127.0.0.1:$CONTROL_PORT"
    export CROSSWIRE_TEST_WS_AUTH="$auth_ws" CROSSWIRE_TEST_TOKEN="$token"
    timeout 900 cargo test -p crosswire-client --target wasm32-unknown-unknown --test browser
  ) 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  local ok failed
  ok=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | grep -Eo '[0-9]+ passed' | grep -Eo '[0-9]+' | tail -1)
  failed=$(grep -Eo '[0-9]+ failed' "$log" | grep -Eo '[0-9]+' | tail -1)
  pass "${ok:-0}"
  if [ "$status" -ne 0 ]; then
    fail "${failed:-1}" "wasm-bindgen-test (see $log)"
    [ "${failed:-0}" = 0 ] && [ "${ok:-0}" = 0 ] && true
  fi
  kill "$SERVER_PID" 2>/dev/null
}

run_e2e() {
  local tool
  for tool in trunk wasm-bindgen wasm-opt redis-server; do
    command -v "$tool" >/dev/null || { say "missing $tool: run scripts/setup.sh"; fail 1 "e2e: $tool"; return; }
  done
  [ -d node_modules/playwright-core ] || { say "missing node_modules: run scripts/setup.sh"; fail 1 "e2e: playwright-core"; return; }
  say "building the demo: trunk build --release --offline"
  local start=$SECONDS
  if ! timeout 1200 trunk build --release --offline >"$OUT/trunk.log" 2>&1; then
    tail -30 "$OUT/trunk.log"; fail 1 "e2e: trunk build (see $OUT/trunk.log)"; return
  fi
  local wasm
  wasm=$(ls dist/*_bg.wasm | head -1)
  say "trunk build took $((SECONDS - start)) s; $(basename "$wasm"): $(stat -c %s "$wasm") bytes, $(gzip -9c "$wasm" | wc -c) gzipped"
  say "end-to-end test with playwright-core"
  timeout 420 node tests/browser/e2e.mjs --server "$SERVER_BIN" --static "$ROOT/dist" --out "$OUT" 2>&1 | tee "$OUT/e2e.log"
  local status=${PIPESTATUS[0]}
  local ok bad
  ok=$(grep -Ec '^ok ' "$OUT/e2e.log")
  bad=$(grep -Ec '^not ok ' "$OUT/e2e.log")
  pass "$ok"
  if [ "$status" -ne 0 ]; then
    fail "$((bad > 0 ? bad : 1))" "e2e (see $OUT/e2e.log)"
  fi
}

# The README's Yew example, built as written by a new app outside this
# repository: its Cargo.toml gets the README's [dependencies] block (with the
# path pointing here) and its src/lib.rs the README's Rust block, verbatim.
run_readme() {
  say "the README's Yew example as a new app, for wasm32"
  local app
  app=$(mktemp -d /tmp/crosswire-readme-app.XXXXXX)
  local section
  section=$(sed -n '/^## The browser client in your Yew app/,/^### The calls/p' README.md)
  {
    printf '[package]\nname = "readme-app"\nversion = "0.1.0"\nedition = "2021"\npublish = false\n\n'
    awk '/^```toml$/ { on = 1; next } /^```$/ { if (on) exit } on' <<<"$section" \
      | sed "s#path = \"../crosswire/client\"#path = \"$ROOT/client\"#"
    printf '\n[workspace]\n'
  } >"$app/Cargo.toml"
  mkdir -p "$app/src"
  awk '/^```rust$/ { on = 1; next } /^```$/ { if (on) exit } on' <<<"$section" >"$app/src/lib.rs"
  if ! grep -q 'CrosswireProvider' "$app/src/lib.rs" || ! grep -q 'crosswire-client' "$app/Cargo.toml"; then
    say "could not find the README's example"; fail 1 "readme: example not found"; return
  fi
  # The app's own lock file is resolved from the local registry cache; the
  # shared target directory keeps the build incremental.
  if (cd "$app" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/readme-app" \
      timeout 900 cargo build --offline --target wasm32-unknown-unknown) >"$OUT/readme-app.log" 2>&1; then
    pass 1
    rm -rf "$app"
  else
    tail -30 "$OUT/readme-app.log"
    fail 1 "readme: the README example does not build as a new app (see $OUT/readme-app.log, $app)"
  fi
}

case $ONLY in
  wasm) run_wasm ;;
  e2e) run_e2e ;;
  readme) run_readme ;;
  *) run_readme; run_wasm; run_e2e ;;
esac

for f in "${FAILURES[@]}"; do say "FAILED: $f"; done
echo "browser: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
