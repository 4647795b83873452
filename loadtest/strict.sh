#!/usr/bin/env bash
# Strict mode's tail against the disk's own floor (BENCHMARKS.md, issue 10 sections): in
# alternating rounds, on the same disk,
#   floor   sensorgate-load disk-floor: one commit thread, pwrite + fdatasync, no server
#   strict  a fresh server with durability = "strict", relay -p 4 -r RATE -d SECONDS
#   fast    the same with durability = "fast"
# then the median p99 of each, and strict's median p99 divided by the floor's and by fast's.
# Each server starts on an empty data directory; every run is bounded by SECONDS and talks to
# 127.0.0.1 only. Needs release builds (cargo build --release --workspace).
# Usage: loadtest/strict.sh [ROUNDS] [SECONDS] [RATE]   (DIR=path puts the data directories
# and the floor's file on another disk; SENSORGATE=path measures another build;
# PORT=n listens elsewhere than 18201)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-5}
SECS=${2:-10}
RATE=${3:-10000}
SG=${SENSORGATE:-$ROOT/target/release/sensorgate}
LOAD=$ROOT/target/release/sensorgate-load
PORT=${PORT:-18201}
WORK=$(mktemp -d "${DIR:-/tmp}/sg-strict-bench.XXXXXX")
SERVER=
cleanup() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

. "$ROOT/loadtest/common.sh"
write_configs "$WORK" "$PORT"

p99() { # LABEL: reads a --json report on stdin, prints "LABEL p50 p99 p999" in ms (and keeps it)
  python3 -c 'import json,sys; l=json.load(sys.stdin)["latency"]; print(sys.argv[1], *("%.2f" % (l[k] / 1000) for k in ("p50_us", "p99_us", "p999_us")), flush=True)' "$1" |
    tee -a "$WORK/runs.txt"
}
server_run() { # MODE: one relay run against a fresh server
  rm -rf "$WORK/data"
  SENSORGATE_LOG=warn "$SG" --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
  SERVER=$!
  wait_ready "$PORT"
  sync
  sleep 1
  "$LOAD" --url "ws://127.0.0.1:$PORT" --config "$WORK/$1.toml" -q --json relay -p 4 -r "$RATE" -d "$SECS" | p99 "$1"
  kill "$SERVER"
  wait "$SERVER" || true
  SERVER=
}

echo "# run p50 p99 p99.9 (ms); rate $RATE/s, $SECS s a run, data in $WORK"
for r in $(seq 1 "$ROUNDS"); do
  echo "# round $r"
  "$LOAD" disk-floor --dir "$WORK" -r "$RATE" -d "$SECS" --json | p99 floor
  server_run strict
  server_run fast
done

python3 - "$WORK/runs.txt" <<'EOF'
import statistics, sys
p99 = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 4 and not line.startswith("#"):
        p99.setdefault(f[0], []).append(float(f[2]))
med = {k: statistics.median(v) for k, v in p99.items()}
for k, v in p99.items():
    print(f"{k:6} p99 median {med[k]:.2f} ms over {len(v)} runs: " + " / ".join(f"{x:.2f}" for x in v))
print(f"strict ÷ floor {med['strict'] / med['floor']:.2f}, strict ÷ fast {med['strict'] / med['fast']:.2f}, "
      f"strict runs at or under 3 ms: {sum(x <= 3 for x in p99['strict'])} of {len(p99['strict'])}")
EOF
