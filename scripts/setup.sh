#!/usr/bin/env bash
# Installs what crosswire's run and test commands need, only where it is missing:
#   - the wasm32-unknown-unknown Rust target
#   - wasm-bindgen-cli at exactly the version the workspace pins (trunk would
#     otherwise try to download it, and this machine reaches only package registries)
#   - trunk 0.21.14 (0.22 needs a newer rustc)
#   - Node packages from package.json (binaryen's wasm-opt, playwright-core)
#   - Debian's redis-server (and redis-cli): the Redis engine's tests, browser
#     test and benchmark each start a private one on a free loopback port
# With --browser it also installs Debian's chromium and chromium-driver.
# Cold installs take minutes each (trunk ~10-15, wasm-bindgen-cli ~5-8); warm runs are instant.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# The version Cargo.lock resolved (the manifest only asks for 0.2, so apps using
# the library are free; this workspace's lock file is the pin).
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
TRUNK_VERSION=0.21.14

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
  say "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (cold: ~5-8 minutes)"
  # Not --locked: its lock file names a crate version the registry here lacks.
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
fi

if [ "$(trunk --version 2>/dev/null | awk '{print $2}')" != "$TRUNK_VERSION" ]; then
  say "installing trunk $TRUNK_VERSION (cold: ~10-15 minutes)"
  cargo install --locked trunk --version "$TRUNK_VERSION" --force
fi

if [ ! -x node_modules/.bin/wasm-opt ] || [ ! -d node_modules/playwright-core ]; then
  say "installing Node packages (binaryen's wasm-opt, playwright-core) with npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

if ! command -v redis-server >/dev/null 2>&1; then
  say "installing Debian's redis-server (the Redis engine's tests start private ones)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Only the binaries: the tests start their own servers, none runs as a service.
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  # The package starts a system-wide instance on port 6379; nothing here uses it.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
fi

if [ "${1:-}" = "--browser" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  say "installing Debian's chromium and chromium-driver"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
