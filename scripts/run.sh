#!/usr/bin/env bash
# crosswire's run command: installs what is missing (scripts/setup.sh), builds
# the demo app with trunk (release, offline), and starts the server serving it
# and the WebSocket at one URL: http://127.0.0.1:3000 (ws://127.0.0.1:3000/_ws).
# Extra arguments go to the server, e.g. `scripts/run.sh --port 8080`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PWD/node_modules/.bin:$PATH"
scripts/setup.sh
echo "[run] building the demo app (trunk build --release --offline)"
trunk build --release --offline
echo "[run] starting the server"
exec cargo run --release --locked -p crosswire-server -- --static dist "$@"
