#!/usr/bin/env bash
# crosswire's one test command: installs whatever is missing (scripts/setup.sh
# --browser), then runs every check and test, stopping at the first failure:
#   1. rustfmt and clippy (warnings are errors), native and wasm32
#   2. cargo test: shared, server (real sockets on 127.0.0.1:0), client logic
#   3. Autobahn|Testsuite against the echo example (scripts/autobahn.sh)
#   4. browser tests in headless Chromium (scripts/browser-tests.sh)
#   5. bounded fuzzing of the protocol decoder and handshake (scripts/fuzz.sh)
# Logs and artifacts (reports, screenshots) land in test-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PWD/node_modules/.bin:$PATH"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
mkdir -p test-output
: > test-output/counts

step() {
  local name=$1
  shift
  printf '\n\033[1m==> %s\033[0m\n' "$name"
  local start=$SECONDS
  "$@"
  printf '\033[1m<== %s: ok (%ss)\033[0m\n' "$name" "$((SECONDS - start))"
}

# Runs a test command, keeps its output, and adds its pass/fail counts to the
# total: from every "test result: ok. N passed; M failed" line of cargo, or from
# the one closing "name: N passed, M failed" line of the other runners (whose
# logs may quote nested runners' lines, which must not count twice).
counted() {
  local name=$1
  local log="test-output/$name.log"
  shift
  "$@" 2>&1 | tee "$log"
  if [ "$name" = cargo-test ]; then
    grep -hoE '^test result: .* ([0-9]+) passed; ([0-9]+) failed' "$log" | grep -oE '[0-9]+ passed; [0-9]+ failed'
  else
    grep -E "^$name: [0-9]+ passed, [0-9]+ failed" "$log" | tail -n 1 | grep -oE '[0-9]+ passed, [0-9]+ failed'
  fi >> test-output/counts || true
}

step "setup" scripts/setup.sh --browser
step "rustfmt" cargo fmt --all --check
step "clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
step "clippy (wasm32 client and demo)" cargo clippy -p crosswire-client -p crosswire-demo --target wasm32-unknown-unknown --all-targets --locked -- -D warnings
step "cargo test" counted cargo-test cargo test --workspace --locked
step "autobahn" counted autobahn scripts/autobahn.sh
if [ -x scripts/browser-tests.sh ]; then
  step "browser tests" counted browser scripts/browser-tests.sh
fi
if [ -x scripts/fuzz.sh ]; then
  step "fuzz" scripts/fuzz.sh
fi

read -r passed failed < <(awk '{p += $1; f += $3} END {print p + 0, f + 0}' test-output/counts)
printf '\nall: %s passed, %s failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
