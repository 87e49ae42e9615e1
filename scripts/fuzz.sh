#!/usr/bin/env bash
# Bounded fuzzing of the protocol decoder, the handshake validator and the
# WebSocket reader (the bytes a client sends, cut into reads anywhere) with
# cargo fuzz (libFuzzer) on the nightly toolchain. Each target runs for
# FUZZ_SECONDS (default 30); any crash fails the script and leaves the input
# in fuzz/artifacts/<target>/. Installs cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-30}
CARGO_FUZZ_VERSION=0.13.1

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "[fuzz] installing the nightly toolchain (cargo fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION (cold: a few minutes)"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --force
fi

status=0
for target in decode_frame validate_upgrade read_frames; do
  echo "[fuzz] $target for ${SECONDS_PER_TARGET}s"
  # A scratch copy of the seed corpus: libFuzzer adds to it, the repo stays clean.
  work="../test-output/fuzz/$target"
  rm -rf "$work" && mkdir -p "$work" && cp corpus/"$target"/* "$work"/
  if cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 \
    > "../test-output/fuzz/$target.log" 2>&1; then
    echo "[fuzz] $target: no crash ($(grep -oE '#[0-9]+' "../test-output/fuzz/$target.log" | tail -1 | tr -d '#') runs)"
  else
    echo "[fuzz] $target: FAILED"
    tail -40 "../test-output/fuzz/$target.log"
    status=1
  fi
done
exit $status
