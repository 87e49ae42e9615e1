#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient (wstest) against crosswire's `echo`
# example and fails unless every case passes (OK, NON-STRICT, INFORMATIONAL and
# UNIMPLEMENTED count as passing; FAILED in `behavior` or `behaviorClose` fails).
#
# Usage: scripts/autobahn.sh
#
# Environment:
#   AUTOBAHN_ECHO_CMD  Command that starts the echo server under test, taking the
#                      port as its LAST argument (it must serve ws://127.0.0.1:<port>/_ws,
#                      echo text and binary messages verbatim, and accept messages
#                      up to 16 MiB). Word-split, not eval'd. Default: build and run
#                      `target/release/examples/echo --port <port>`.
#                      Example: AUTOBAHN_ECHO_CMD=/tmp/ab-echo/target/release/ab-echo
#   AUTOBAHN_TIMEOUT   Upper bound in seconds for the wstest run (default 600; a
#                      full run of every group but 12 and 13 takes a few minutes).
#
# wstest only runs on Python 2.7, which Debian 12 no longer ships. On first use
# this script therefore unpacks Debian 11's python2.7 into a private prefix and
# builds a 2.7 virtualenv with autobahntestsuite in it, all under
# $REPO/.cache/autobahn (about a minute; later runs skip it). The system's apt
# state and Python installations are left untouched.
#
# Output: $REPO/test-output/autobahn (HTML/JSON report, wstest.log, server.log).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$REPO/.cache/autobahn"
OUT="$REPO/test-output/autobahn"

# Bump these to force a rebuild of the cached tool chain (the marker records them).
AUTOBAHNTESTSUITE_VERSION=25.10.1
VIRTUALENV_VERSION=20.21.1 # last virtualenv release that can still create Python 2.7 environments
DEBIAN_PY27_SUITE=bullseye # last Debian release with python2.7
PY27_PACKAGES=(python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib libpython2.7-dev libssl1.1 libffi7)
MARKER_TEXT="autobahntestsuite=$AUTOBAHNTESTSUITE_VERSION virtualenv=$VIRTUALENV_VERSION python2.7=$DEBIAN_PY27_SUITE:${PY27_PACKAGES[*]}"

ROOT="$CACHE/root" # dpkg -x target: the python2.7 debs unpacked here
VENV3="$CACHE/venv3"
VENV27="$CACHE/venv27"
MARKER="$CACHE/installed"
case "$(dpkg --print-architecture)" in # where Debian puts the libraries in the debs
  amd64) ARCH_TRIPLET=x86_64-linux-gnu ;;
  arm64) ARCH_TRIPLET=aarch64-linux-gnu ;;
  *) ARCH_TRIPLET=$(gcc -print-multiarch) ;;
esac

say() { printf '\033[1m[autobahn]\033[0m %s\n' "$*"; }
die() { printf '\033[1m[autobahn]\033[0m error: %s\n' "$*" >&2; exit 1; }

# The unpacked interpreter and its libssl1.1/libffi7 live outside the loader's
# search path. Everything started from here on (virtualenv's interpreter probe,
# pip, wstest) inherits this.
export LD_LIBRARY_PATH="$ROOT/usr/lib/$ARCH_TRIPLET:$ROOT/lib/$ARCH_TRIPLET${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export DEBIAN_FRONTEND=noninteractive
# A python2.7 from pyenv (there may be a broken shim on PATH) or PYTHONHOME/PYTHONPATH
# from the caller must not leak into the private interpreter.
unset PYTHONHOME PYTHONPATH
# Keep pip's download/wheel cache with the rest, so a cold setup here is
# self-contained and deleting .cache/autobahn really starts over.
export PIP_CACHE_DIR="$CACHE/pip-cache"

# Installs Debian 12 packages only when something needed is really missing:
# gcc for the C extensions autobahntestsuite's dependencies build, and
# python3-venv for the Python 3 venv that hosts virtualenv.
ensure_system_packages() {
  local missing=()
  command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3 python3-venv)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

setup() {
  # Warm path: same versions recorded, and the installed interpreter still works
  # (e.g. the checkout was not moved, which would break the venvs' absolute paths).
  if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$MARKER_TEXT" ] && [ -x "$VENV27/bin/wstest" ] \
    && "$VENV27/bin/python" -c 'import autobahntestsuite' >/dev/null 2>&1; then
    return
  fi
  local t0=$SECONDS
  say "setting up Python 2.7 + autobahntestsuite $AUTOBAHNTESTSUITE_VERSION in ${CACHE#"$REPO"/} (cold: under a minute)"
  ensure_system_packages
  # Start from scratch so a half-finished earlier attempt cannot linger.
  rm -rf "$ROOT" "$VENV3" "$VENV27" "$MARKER" "$CACHE/apt" "$CACHE/debs" # (not pip-cache)
  mkdir -p "$CACHE/apt/state/lists/partial" "$CACHE/apt/cache/archives/partial" \
    "$CACHE/apt/sources.list.d" "$CACHE/apt/preferences.d" "$CACHE/debs" "$ROOT"
  : >"$CACHE/apt/state/status" # an empty dpkg status: apt resolves nothing against the host's packages

  # A private apt configuration: own sources, lists, caches and status, so
  # `apt-get update` here neither sees nor changes the system's apt state. The
  # host's apt.conf.d snippets (proxies, mirrors) still apply.
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg # covers bullseye too
  cat >"$CACHE/apt/sources.list" <<EOF
deb [signed-by=$keyring] http://deb.debian.org/debian $DEBIAN_PY27_SUITE main
deb [signed-by=$keyring] http://deb.debian.org/debian-security $DEBIAN_PY27_SUITE-security main
EOF
  cat >"$CACHE/apt/apt.conf" <<EOF
Dir::State "$CACHE/apt/state";
Dir::State::status "$CACHE/apt/state/status";
Dir::Cache "$CACHE/apt/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Etc::SourceList "$CACHE/apt/sources.list";
Dir::Etc::SourceParts "$CACHE/apt/sources.list.d";
Dir::Etc::Preferences "$CACHE/apt/preferences";
Dir::Etc::PreferencesParts "$CACHE/apt/preferences.d";
APT::Sandbox::User "root";
Acquire::Languages "none";
// Old suites' Release files may be past their Valid-Until date.
Acquire::Check-Valid-Until "false";
EOF
  say "downloading ${PY27_PACKAGES[*]} from Debian $DEBIAN_PY27_SUITE"
  (
    export APT_CONFIG="$CACHE/apt/apt.conf"
    apt-get update -qq >"$CACHE/apt-update.log" 2>&1 || { cat "$CACHE/apt-update.log" >&2; exit 1; }
    cd "$CACHE/debs"
    apt-get download -qq "${PY27_PACKAGES[@]}" >"$CACHE/apt-download.log" 2>&1 || { cat "$CACHE/apt-download.log" >&2; exit 1; }
  )
  local deb
  for deb in "$CACHE/debs"/*.deb; do dpkg -x "$deb" "$ROOT"; done
  rm -rf "$CACHE/apt/state/lists" # 24 MB of package lists, no longer needed
  local py27="$ROOT/usr/bin/python2.7"
  "$py27" -c 'import ssl, ctypes, zlib, hashlib' || die "the unpacked python2.7 does not work"

  say "creating the Python 2.7 virtualenv (virtualenv $VIRTUALENV_VERSION)"
  # Debian's own python3 rather than whatever `python3` is on PATH (pyenv shims).
  /usr/bin/python3 -m venv "$VENV3"
  "$VENV3/bin/pip" install -q --disable-pip-version-check "virtualenv==$VIRTUALENV_VERSION"
  "$VENV3/bin/virtualenv" -q --no-periodic-update -p "$py27" "$VENV27"

  say "installing autobahntestsuite $AUTOBAHNTESTSUITE_VERSION (pip, Python 2.7)"
  # Some dependencies compile C extensions; their headers come from the unpacked
  # libpython2.7-dev, not from the (absent) system Python 2.7.
  CFLAGS="-I$ROOT/usr/include/python2.7 -I$ROOT/usr/include" \
    "$VENV27/bin/pip" install -q --disable-pip-version-check --no-python-version-warning \
    "autobahntestsuite==$AUTOBAHNTESTSUITE_VERSION" >"$CACHE/pip.log" 2>&1 \
    || { tail -n 40 "$CACHE/pip.log" >&2; die "pip install autobahntestsuite failed (log: $CACHE/pip.log)"; }
  "$VENV27/bin/wstest" --help >/dev/null 2>&1 || die "wstest does not start"

  printf '%s' "$MARKER_TEXT" >"$MARKER"
  say "setup done in $((SECONDS - t0))s"
}

free_port() {
  "$VENV3/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SERVER_PID=
WSTEST_PID=
# Stops the echo server: SIGTERM for a graceful shutdown, SIGKILL if it is
# still there after 5s, so a hung shutdown cannot hang the test command.
cleanup() {
  # `timeout` passes the TERM on to wstest.
  if [ -n "$WSTEST_PID" ]; then kill "$WSTEST_PID" 2>/dev/null || true; fi
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setup

# Build before picking the port, so the port is free for as short a time as possible.
if [ -n "${AUTOBAHN_ECHO_CMD:-}" ]; then
  read -r -a ECHO_CMD <<<"$AUTOBAHN_ECHO_CMD"
  say "echo server: $AUTOBAHN_ECHO_CMD <port> (AUTOBAHN_ECHO_CMD)"
else
  say "building the echo example (cargo build --release -p crosswire-server --example echo)"
  (cd "$REPO" && cargo build --release -q -p crosswire-server --example echo)
  ECHO_CMD=("$REPO/target/release/examples/echo" --port)
fi

rm -rf "$OUT"
mkdir -p "$OUT"
PORT=$(free_port)
"${ECHO_CMD[@]}" "$PORT" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

# Wait (bounded) until the server accepts TCP connections on loopback.
for _ in $(seq 1 100); do
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 20 "$OUT/server.log" >&2; die "the echo server exited early"; }
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || die "the echo server did not listen on 127.0.0.1:$PORT within 10s"
say "echo server up at ws://127.0.0.1:$PORT/_ws (pid $SERVER_PID)"

# The config is a template: the port and the output directory are only known now.
# Groups 12 and 13 (permessage-deflate) are excluded there: crosswire does not
# negotiate compression.
sed -e "s|@PORT@|$PORT|g" -e "s|@OUTDIR@|$OUT/report|g" \
  "$REPO/scripts/autobahn/fuzzingclient.json" >"$OUT/fuzzingclient.json"

TIMEOUT=${AUTOBAHN_TIMEOUT:-600}
say "running wstest fuzzingclient (all cases but 12.*, 13.*; timeout ${TIMEOUT}s; log: ${OUT#"$REPO"/}/wstest.log)"
t0=$SECONDS
rc=0
# wstest prints a line per case; keep that out of the console. Run it from $OUT
# so any stray relative paths land there, with stdin closed (CI has none). In
# the background plus `wait`, so that a TERM/INT to this script is handled at
# once (the trap stops wstest and the server) rather than after the run.
cd "$OUT"
timeout --kill-after=10 "$TIMEOUT" "$VENV27/bin/wstest" -m fuzzingclient -s "$OUT/fuzzingclient.json" \
  </dev/null >"$OUT/wstest.log" 2>&1 &
WSTEST_PID=$!
wait "$WSTEST_PID" || rc=$?
WSTEST_PID=
say "wstest finished in $((SECONDS - t0))s (exit $rc)"

show_logs() {
  # wstest logs one "Running test case ID ..." line per case: show only the last
  # of those (where it was when it stopped) plus the last other lines.
  echo "---- last lines of ${OUT#"$REPO"/}/wstest.log ----" >&2
  grep '^Running test case ID' "$OUT/wstest.log" | tail -n 1 >&2 || true
  grep -v -e '^Running test case ID' -e '^Cases = ' -e '^[[:space:]]*$' "$OUT/wstest.log" | tail -n 20 >&2 || true
  echo "---- last lines of ${OUT#"$REPO"/}/server.log ----" >&2
  tail -n 10 "$OUT/server.log" >&2 || true
}

INDEX="$OUT/report/index.json"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  show_logs
  die "wstest did not finish within ${TIMEOUT}s"
fi
if [ ! -s "$INDEX" ]; then
  show_logs
  die "no report at ${INDEX#"$REPO"/} (wstest exit $rc)"
fi

# index.json: {agent: {case id: {behavior, behaviorClose, duration, reportfile, ...}}}.
# A case fails when either verdict is FAILED; every other verdict is a pass.
status=0
"$VENV3/bin/python" - "$INDEX" "$OUT/report" "$OUT/summary.txt" <<'EOF' || status=$?
import json, os, sys
from collections import Counter

index_path, report_dir, summary_path = sys.argv[1:4]
with open(index_path) as f:
    index = json.load(f)

def short(text, limit=160):
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

def case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))

counts, failed, total = Counter(), [], 0
for agent, cases in sorted(index.items()):
    for case_id in sorted(cases, key=case_key):
        r = cases[case_id]
        total += 1
        counts[r.get("behavior", "?")] += 1
        if "FAILED" in (r.get("behavior"), r.get("behaviorClose")):
            failed.append((agent, case_id, r))

order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
order += sorted(k for k in counts if k not in order)
print("\033[1m[autobahn]\033[0m behaviors: " + ", ".join("%s %d" % (k, counts[k]) for k in order))
for agent, case_id, r in failed:
    detail = ""
    report_file = r.get("reportfile")
    if report_file:
        try:
            with open(os.path.join(report_dir, report_file)) as f:
                rep = json.load(f)
            detail = " | %s | %s" % (short(rep.get("result")), short(rep.get("resultClose")))
        except (OSError, ValueError):
            pass
    print("\033[1m[autobahn]\033[0m FAILED %s: behavior=%s behaviorClose=%s%s"
          % (case_id, r.get("behavior"), r.get("behaviorClose"), detail))
with open(summary_path, "w") as f:
    f.write("autobahn: %d passed, %d failed\n" % (total - len(failed), len(failed)))
if total == 0:
    print("\033[1m[autobahn]\033[0m the report lists no cases")
    sys.exit(1)
sys.exit(1 if failed else 0)
EOF

if [ "$status" -ne 0 ]; then
  show_logs
  say "report: ${OUT#"$REPO"/}/report/index.html"
fi
[ -s "$OUT/summary.txt" ] || die "could not read ${INDEX#"$REPO"/}"
# The last line, in a fixed format for whoever calls this.
cat "$OUT/summary.txt"
exit "$status"
