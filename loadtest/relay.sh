#!/usr/bin/env bash
# Issue 10's throughput figures (BENCHMARKS.md): `relay` as fast as possible against the
# bundled null relay, the same client in the same run. Per round: the null relay, then a fresh
# server for each variant on an empty data directory, in an order that rotates from round to
# round, with `sync` before every run (the kernel writing back the last run's log otherwise
# lands in the next one). Prints each run — readings/s, the server's CPU in 10 ms ticks, lost /
# duplicated / out of order, close codes — then per-round medians: each variant against the
# null relay, strict against fast, and CPU per reading. Every run is bounded by COUNT and talks
# to 127.0.0.1 only. Needs release builds (cargo build --release --workspace).
# Usage: loadtest/relay.sh [ROUNDS] [COUNT] [relay options...]
#   loadtest/relay.sh 10 1000000                         # 4 producers -> 4 developers
#   loadtest/relay.sh 10 1000000 -p 8 --developers 2     # 8 producers -> 2 developers
# VARIANTS="fast strict" (the default) lists the servers: MODE, or BINARY:MODE to measure
# another build beside this one, e.g. VARIANTS="/tmp/old/sensorgate:fast fast strict".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-8}
COUNT=${2:-1000000}
shift $(($# < 2 ? $# : 2))
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(-p 4)
SG=$ROOT/target/release/sensorgate
LOAD=$ROOT/target/release/sensorgate-load
PORT=${PORT:-18200}
NULL_PORT=${NULL_PORT:-18299}
read -r -a VARIANTS <<<"${VARIANTS:-fast strict}"
WORK=$(mktemp -d "${DIR:-/tmp}/sg-relay-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

. "$ROOT/loadtest/common.sh"
write_configs "$WORK" "$PORT"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # LABEL URL PID: one relay run, one line into runs.txt
  local before after
  before=$(ticks "$3")
  "$LOAD" --url "$2" --config "$WORK/fast.toml" -q --json relay -n "$COUNT" "${ARGS[@]}" >"$WORK/run.json"
  after=$(ticks "$3")
  python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
print(sys.argv[2], int(j["delivered_per_sec"]), int(sys.argv[3]), j["delivered"], j["lost"], j["duplicated"],
      j["out_of_order"], json.dumps(j["close_codes"], separators=(",", ":")), flush=True)' \
    "$WORK/run.json" "$1" $((after - before)) | tee -a "$WORK/runs.txt"
}

"$LOAD" null-relay --listen "127.0.0.1:$NULL_PORT" >/dev/null 2>&1 &
NULL=$!
PIDS+=("$NULL")
sleep 1
echo "# run readings/s cpu-ticks delivered lost duplicated out-of-order close-codes; relay -n $COUNT ${ARGS[*]}"
for r in $(seq 1 "$ROUNDS"); do
  echo "# round $r"
  sync
  sleep 0.5
  run null "ws://127.0.0.1:$NULL_PORT" "$NULL"
  n=${#VARIANTS[@]}
  for i in $(seq 0 $((n - 1))); do
    v=${VARIANTS[$(((i + r) % n))]}
    bin=$SG
    mode=$v
    if [[ $v == *:* ]]; then bin=${v%:*} mode=${v##*:}; fi
    rm -rf "$WORK/data"
    sync
    sleep 0.5
    SENSORGATE_LOG=warn "$bin" --config "$WORK/$mode.toml" 2>"$WORK/server.log" &
    server=$!
    wait_ready "$PORT"
    run "$v" "ws://127.0.0.1:$PORT" "$server"
    kill "$server"
    wait "$server" || true
  done
done

python3 - "$WORK/runs.txt" "$COUNT" <<'EOF'
import statistics, sys
rounds, count = [], int(sys.argv[2])
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] == "null":
        rounds.append({})
    rounds[-1][f[0]] = (int(f[1]), int(f[2]), f[4:7], f[7])
names = list(rounds[0])
for k in names:
    rate = statistics.median(r[k][0] for r in rounds)
    cpu = statistics.median(r[k][1] for r in rounds) * 10_000 / count
    clean = sum(r[k][2] == ["0", "0", "0"] and r[k][3] == "{}" for r in rounds)
    print(f"{k:12} median {rate:9.0f} readings/s, CPU {cpu:.2f} µs/reading; {clean} of {len(rounds)} runs with 0 lost, 0 duplicated, 0 out of order, no close")
def ratio(a, b):
    rs = [r[a][0] / r[b][0] for r in rounds]
    print(f"{a} ÷ {b}: median {statistics.median(rs):.3f} over {len(rs)} rounds (" + " / ".join(f"{x:.2f}" for x in rs) + ")")
for k in names[1:]:
    ratio(k, "null")
for k in names:
    if k.endswith("strict") and k[:-6] + "fast" in names:
        ratio(k, k[:-6] + "fast")
EOF
