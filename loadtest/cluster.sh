#!/usr/bin/env bash
# Cluster benchmark (BENCHMARKS.md, "Cluster"): on loopback, three nats-servers clustered
# with JetStream (deploy/cluster/nats-server.conf as shipped: R3, sync_interval always; n1
# also serves NATS over WebSocket for wsbench), three sensorgate nodes in cluster mode behind
# haproxy (deploy/haproxy.cfg as shipped), and one embedded node (strict). Then, in
# alternating rounds, the same loads against:
#   js        JetStream itself: wsbench --js (publish with acks, push consumers), one R3
#             stream for the four producers
#   jsdev     the same with one R3 stream per producer, as sensorgate has one per developer
#   cluster   sensorgate through haproxy, wsbench --broker sg (the same client)
#   embedded  one embedded sensorgate node, wsbench --broker sg
# each as fast as possible and at 10,000 readings/s (4 producers x 2,500/s; RATE below), plus
# sensorgate-load relay through haproxy and against the embedded node. At the end it prints,
# per round and as medians, the cluster's throughput and its p99 at 10,000/s as ratios to
# JetStream's in the same round (issue 12's targets: >= 0.8 and <= 1.5), what JetStream
# alone laid out as sensorgate lays it out scores against the one stream of `js` (the floor a
# gateway starts from: BENCHMARKS.md, "What the p99 target leaves the gateway"), and the CPU the
# nodes (and haproxy) used at 10,000/s over the nats-servers' for the same readings (the
# issue's "at most a fifth of the engine").
# Every run starts on empty streams and leaves none behind: the JetStream runs make theirs
# just before and delete them after, and each sensorgate run takes four developers no run
# used before, whose streams are deleted after it. JetStream's latency depends on how much a
# stream already holds, and its CPU on how many streams it keeps (BENCHMARKS.md, "Where the
# cluster's p99 goes"), so each run meets the engine in the same state.
# Everything is bounded (message counts, --timeout-s) and talks to 127.0.0.1 only.
#
# Needs release builds (cargo build --release --workspace), haproxy, nats-server (default:
# tests/cluster/.venv/bin/nats-server, which the tests install) and wsbench built from
# ../shared/bench/wsbench (WSBENCH=path; see its README) with loadtest/wsbench-stream-per-topic.patch
# applied (`--js 'BENCH{t}'` names a stream per topic; without it the jsdev runs fail):
#   cp -r ../shared/bench/wsbench /tmp/wsbench && patch -d /tmp/wsbench -p1 < loadtest/wsbench-stream-per-topic.patch
# Usage: loadtest/cluster.sh [ROUNDS] [MESSAGES_PER_PRODUCER]   (ONLY=regex picks runs by name;
# SENSORGATE=path measures another build of the server; NODE_WORKERS=n worker threads per
# cluster node (default 1, see below); RATE=n readings/s in the paced runs instead of 10,000
# (named e.g. "cluster 5k/s" then; the issue's targets are at 10,000/s, where JetStream alone
# keeps most of this machine's two cores busy); M10K=n readings per producer in the
# paced runs, default 10 s worth (25000 at 10,000/s); DUMP_DIR=dir keeps every reading's latency per run
# (needs loadtest/wsbench-dump.patch on top of the others) and the nats-servers' GC trace,
# for loadtest/stalls.py; GATEWAY_CPU=1 adds jsdevb, below)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-3}
M=${2:-50000}
RATE=${RATE:-10000}
# Four producers share the rate evenly, so the rate a run is named for is the rate it sends.
if ! [[ "$RATE" =~ ^[1-9][0-9]*$ ]] || [ $((RATE % 4)) != 0 ]; then
  echo "RATE=$RATE: give a positive multiple of 4 (readings/s, four producers)" >&2
  exit 64
fi
PER=$((RATE / 4)) # each of the four producers' share
if [ $((RATE % 1000)) = 0 ]; then PACED="$((RATE / 1000))k/s"; else PACED="$RATE/s"; fi
M10K=${M10K:-$((PER * 10))}
NS=${NATS_SERVER:-$ROOT/tests/cluster/.venv/bin/nats-server}
SG=${SENSORGATE:-$ROOT/target/release/sensorgate}
LOAD=$ROOT/target/release/sensorgate-load
W=${WSBENCH:-/tmp/wsbench/target/release/wsbench}
WORK=$(mktemp -d /tmp/sg-cluster-bench.XXXXXX)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() { # URL: until it answers 200
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  exit 2
}

# --- three nats-servers ---
# With DUMP_DIR the servers trace their garbage collections (GODEBUG below), timed from here.
if [ -n "${DUMP_DIR:-}" ]; then mkdir -p "$DUMP_DIR" && date +%s.%N >"$DUMP_DIR/nats-start.txt"; fi
cp "$ROOT/deploy/cluster/nats-server.conf" "$WORK/base.conf"
# NATS_SYNC=default measures JetStream's default flushing instead of the shipped `always`.
if [ "${NATS_SYNC:-always}" = default ]; then sed -i '/sync_interval: always/d' "$WORK/base.conf"; fi
printf 'include ./base.conf\nwebsocket {\n  host: 127.0.0.1\n  port: 17580\n  no_tls: true\n  compression: false\n}\n' >"$WORK/n1.conf"
R='[nats-route://127.0.0.1:16221, nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223]'
for i in 1 2 3; do
  conf="$WORK/base.conf"
  [ "$i" = 1 ] && conf="$WORK/n1.conf"
  GODEBUG=${DUMP_DIR:+gctrace=1} NATS_NAME=n$i NATS_HOST=127.0.0.1 NATS_PORT=1422$i NATS_CLUSTER_PORT=1622$i \
    NATS_HTTP=127.0.0.1:1822$i NATS_STORE="$WORK/nats$i" NATS_ROUTES="$R" \
    "$NS" -c "$conf" 2>"$WORK/nats$i.log" &
  NATS_PIDS="${NATS_PIDS:-} $!"
done
for i in 1 2 3; do wait_http "http://127.0.0.1:1822$i/healthz"; done

# JetStream is measured on streams shaped as a developer's (R3, file storage), laid out two
# ways: `js` runs on one stream BENCH for all four producers' subjects (bench.0 … bench.3),
# `jsdev` on one stream per producer (BENCH0 … BENCH3), as sensorgate lays out one stream per
# developer. The two layouts overlap in subjects, so each run makes its own and deletes them
# after.
js_api() { # SUBJECT JSON: one JetStream API request through n1, waits for its reply
  exec 3<>/dev/tcp/127.0.0.1/14221
  printf 'CONNECT {"verbose":false}\r\nSUB _bench.api 1\r\nPUB %s _bench.api %d\r\n%s\r\nPING\r\n' \
    "$1" "${#2}" "$2" >&3
  timeout 10 grep -m1 -q 'MSG _bench.api' <&3 || { echo "no answer to $1" >&2; exit 2; }
  exec 3>&-
}
stream_json() { # NAME SUBJECT
  printf '{"name":"%s","subjects":["%s"],"storage":"file","num_replicas":3}' "$1" "$2"
}
drop_bench_streams() {
  js_api '$JS.API.STREAM.DELETE.BENCH' ''
  for t in 0 1 2 3; do js_api "\$JS.API.STREAM.DELETE.BENCH$t" ''; done
}
bench_streams() { # one | per-producer: empty streams in that layout (the run before deleted its own)
  if [ "$1" = one ]; then
    js_api '$JS.API.STREAM.CREATE.BENCH' "$(stream_json BENCH 'bench.>')"
  else
    for t in 0 1 2 3; do js_api "\$JS.API.STREAM.CREATE.BENCH$t" "$(stream_json "BENCH$t" "bench.$t")"; done
  fi
}

# --- sensorgate: three cluster nodes behind haproxy, one embedded node ---
# Four developers per sensorgate run, each run its own (see the top): d0 … d3 for the first.
devs=""
for d in $(seq 0 $((16 * ROUNDS + 3))); do devs="$devs[[developers]]\nid = \"d$d\"\napi_key = \"k$d\"\n"; done
printf 'token_secret = "bench-secret-0123456789abcdef0123456789"\nmax_connections = 8000\n[cluster]\nnats_urls = ["nats://127.0.0.1:14221", "nats://127.0.0.1:14222", "nats://127.0.0.1:14223"]\nstream_replicas = 3\n'"$devs" >"$WORK/node.toml"
printf "$devs" >"$WORK/embedded.toml"
# Three nodes share the two cores with three nats-servers, so each runs one worker: an idle
# second worker woken for each message costs a context switch (BENCHMARKS.md, "Cluster").
# NODE_WORKERS=0 gives each node one per core, the default.
for i in 1 2 3; do
  SENSORGATE_WORKER_THREADS=${NODE_WORKERS:-1} SENSORGATE_LOG=warn "$SG" --config "$WORK/node.toml" --listen 127.0.0.1:1808$i --data-dir "$WORK/sg$i" 2>"$WORK/sg$i.log" &
  NODE_PIDS="${NODE_PIDS:-} $!"
done
SENSORGATE_LOG=warn "$SG" --config "$WORK/embedded.toml" --listen 127.0.0.1:18090 --data-dir "$WORK/emb" 2>"$WORK/emb.log" &
EMB_PID=$!
for p in 18081 18082 18083 18090; do wait_http "http://127.0.0.1:$p/readyz"; done
SG_LISTEN=127.0.0.1:18080 SG_STATS=127.0.0.1:18404 SG_NODE1=127.0.0.1:18081 \
  SG_NODE2=127.0.0.1:18082 SG_NODE3=127.0.0.1:18083 haproxy -f "$ROOT/deploy/haproxy.cfg" -db >/dev/null 2>&1 &
HAPROXY_PID=$!
sleep 2
wait_http "http://127.0.0.1:18080/readyz"

NEXT_DEV=0
fresh_devs() { # sets SGDEV to four developers no run has used
  SGDEV=""
  for d in $(seq $NEXT_DEV $((NEXT_DEV + 3))); do SGDEV="$SGDEV${SGDEV:+,}d$d:k$d"; done
  NEXT_DEV=$((NEXT_DEV + 4))
}
drop_dev_streams() { # deletes the streams of the developers in SGDEV, once their tails closed
  local dev
  sleep 3
  for dev in ${SGDEV//,/ }; do js_api "\$JS.API.STREAM.DELETE.SG_${dev%%:*}" ''; done
}
ticks() { # PIDS...: their CPU time so far, in clock ticks
  local t=0 pid
  for pid in "$@"; do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$t"
}
run() { # NAME ARGS...: one wsbench line, tagged, with the CPU seconds each group used; the
  # line is also kept in runs.txt under the calling loop's round, $r, for the summary
  local name=$1
  shift
  [[ "$name" =~ ${ONLY:-.} ]] || return 0
  local layout="" # the JetStream runs' streams, made here and deleted after the run
  case $name in
    "js "*) layout=one ;;
    "jsdev "* | "jsdevu "* | "jsdevb "*) layout=per-producer ;;
  esac
  [ -n "$layout" ] && bench_streams "$layout"
  local burner=""
  if [[ "$name" == "jsdevb "* ]]; then
    "$LOAD" burn --workers 3 --duty 10 --period-us 200 --duration $((M10K / PER + 2)) >/dev/null &
    burner=$!
  fi
  local n0 s0 e0 h0
  n0=$(ticks $NATS_PIDS) s0=$(ticks $NODE_PIDS) e0=$(ticks $EMB_PID) h0=$(ticks $HAPROXY_PID)
  local dump=""
  if [ -n "${DUMP_DIR:-}" ]; then
    dump="${name%% *}-${name#* }-$r"
    dump="$DUMP_DIR/${dump//\//_}.txt"
    rm -f "$dump"
    date +%s.%N >"$dump.start"
  fi
  WSBENCH_DUMP=$dump "$W" --timeout-s 600 --tag "$name" "$@" 2>>"$WORK/wsbench.err" >"$WORK/last.txt" || echo "$name failed (exit $?)"
  [ -n "$burner" ] && wait "$burner"
  cat "$WORK/last.txt"
  sed "s/^/round=$r /" "$WORK/last.txt" >>"$WORK/runs.txt"
  local hz
  hz=$(getconf CLK_TCK)
  local cpu
  cpu="  cpu_s nats=$(( ($(ticks $NATS_PIDS) - n0) * 100 / hz ))e-2 nodes=$(( ($(ticks $NODE_PIDS) - s0) * 100 / hz ))e-2 embedded=$(( ($(ticks $EMB_PID) - e0) * 100 / hz ))e-2 haproxy=$(( ($(ticks $HAPROXY_PID) - h0) * 100 / hz ))e-2"
  echo "$cpu"
  echo "round=$r tag=$name$cpu" >>"$WORK/runs.txt"
  if [ -n "$layout" ]; then
    drop_bench_streams
  elif [[ "$name" == "cluster "* ]]; then
    drop_dev_streams
  fi
}
for r in $(seq 1 "$ROUNDS"); do
  echo "# round $r"
  run "js max" --broker nats-ws --url ws://127.0.0.1:17580 --js BENCH -P 4 -C 4 -M "$M"
  run "jsdev max" --broker nats-ws --url ws://127.0.0.1:17580 --js 'BENCH{t}' -P 4 -C 4 -M "$M"
  fresh_devs
  run "cluster max" --broker sg --url http://127.0.0.1:18080 --sg-dev "$SGDEV" -P 4 -C 4 -M "$M"
  fresh_devs
  run "embedded max" --broker sg --url http://127.0.0.1:18090 --sg-dev "$SGDEV" -P 4 -C 4 -M "$M"
  run "js $PACED" --broker nats-ws --url ws://127.0.0.1:17580 --js BENCH -P 4 -C 4 -M "$M10K" --rate "$PER"
  run "jsdev $PACED" --broker nats-ws --url ws://127.0.0.1:17580 --js 'BENCH{t}' -P 4 -C 4 -M "$M10K" --rate "$PER"
  # UNIQUE_ACK=1: the same again with a fresh reply subject per publish, as a JetStream
  # context's publish has (needs loadtest/wsbench-unique-ack.patch on top of the other).
  # It gets streams of its own, like every run.
  if [ -n "${UNIQUE_ACK:-}" ]; then
    WSBENCH_UNIQUE_ACK=1 run "jsdevu $PACED" --broker nats-ws --url ws://127.0.0.1:17580 --js 'BENCH{t}' -P 4 -C 4 -M "$M10K" --rate "$PER"
  fi
  # GATEWAY_CPU=1: jsdev again beside `sensorgate-load burn` taking about the CPU the nodes
  # and haproxy take at 10,000/s (3 threads x 10 % of every 200 us; the same at any RATE),
  # which separates the gateway's path from the CPU it takes from the engine on a shared machine.
  if [ -n "${GATEWAY_CPU:-}" ]; then
    run "jsdevb $PACED" --broker nats-ws --url ws://127.0.0.1:17580 --js 'BENCH{t}' -P 4 -C 4 -M "$M10K" --rate "$PER"
  fi
  fresh_devs
  run "cluster $PACED" --broker sg --url http://127.0.0.1:18080 --sg-dev "$SGDEV" -P 4 -C 4 -M "$M10K" --rate "$PER"
  fresh_devs
  run "embedded $PACED" --broker sg --url http://127.0.0.1:18090 --sg-dev "$SGDEV" -P 4 -C 4 -M "$M10K" --rate "$PER"
done
# The issue's two ratios per round (cluster against JetStream, same run, same client) and
# their medians: throughput as fast as possible (target >= 0.8) and p99 at RATE (the
# target, <= 1.5, is at 10,000/s), against one stream (js), a stream per producer (jsdev), and with
# GATEWAY_CPU=1 a stream per producer beside the gateway's CPU share taken by busy-loops (jsdevb).
touch "$WORK/runs.txt"
python3 - "$WORK/runs.txt" "$PACED" "$RATE" <<'EOF'
import re, statistics, sys
paced, rate = sys.argv[2], f"{int(sys.argv[3]):,}/s"
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) .*delivered_per_s=(\d+).* p99_us=(\d+).* tag=(\S+) (\S+)", line)
    if m and "status=ok" in line:
        r, per_s, p99, who, load = m.groups()
        runs[(int(r), who, load)] = (int(per_s), int(p99))
def report(label, v, digits, target, ok):
    """One summary line: the per-round values, their median, and how many meet the target."""
    each = " / ".join(f"{x:.{digits}f}" for x in v)
    print(f"{label}: median {statistics.median(v):.{digits}f} over {len(v)} rounds ({each}); "
          f"{target} in {sum(map(ok, v))} of {len(v)}")
def ratios(load, idx, base, who="cluster"):
    return [runs[(r, who, load)][idx] / runs[(r, base, load)][idx]
            for r in sorted({k[0] for k in runs})
            if (r, who, load) in runs and (r, base, load) in runs]
# What the gateway costs against the engine it runs on, in CPU for the same readings at
# RATE: the nodes, and the nodes with haproxy, over the nats-servers (issue 12's "at most
# a fifth of the engine").
cpu = {}
for line in open(sys.argv[1]):
    m = re.match(r"round=(\d+) tag=cluster " + re.escape(paced) + r"\s+cpu_s nats=(\d+)e-2 nodes=(\d+)e-2 .*haproxy=(\d+)e-2", line)
    if m:
        r, nats, nodes, haproxy = map(int, m.groups())
        if nats:
            cpu[r] = (nodes / nats, (nodes + haproxy) / nats)
for load, idx, what, target, ok in (("max", 0, "throughput as fast as possible", ">= 0.8", lambda x: x >= 0.8),
                                    (paced, 1, f"p99 at {rate}", "<= 1.5", lambda x: x <= 1.5)):
    for base in ("js", "jsdev", "jsdevb"):
        v = ratios(load, idx, base)
        if v:
            report(f"{what}, cluster / {base}", v, 2, target, ok)
# The floor the p99 target leaves the gateway: JetStream alone laid out as sensorgate lays it
# out (a stream per developer) against the one stream of `js`, which a gateway costing
# nothing at all would score, and that beside the gateway's CPU share, which a gateway whose
# hops cost nothing but whose CPU is what it is would score.
for who, what in (("jsdev", "a gateway costing nothing"), ("jsdevb", "a gateway costing only its CPU")):
    v = ratios(paced, 1, "js", who)
    if v:
        report(f"p99 at {rate}, {who} / js ({what})", v, 2, "<= 1.5", lambda x: x <= 1.5)
if cpu:
    for i, who in ((0, "nodes"), (1, "nodes and haproxy")):
        v = [c[i] for _, c in sorted(cpu.items())]
        report(f"CPU at {rate}, {who} / nats-servers", v, 3, "<= 0.2", lambda x: x <= 0.2)
EOF
if [ -n "${DUMP_DIR:-}" ]; then
  for i in 1 2 3; do grep '^gc ' "$WORK/nats$i.log" >"$DUMP_DIR/gc-n$i.txt" || true; done
fi
[ -n "${ONLY:-}" ] && exit 0
echo "# sensorgate-load relay, 4 producers -> 4 developers"
fresh_devs
for target in 18080 18090; do
  # shellcheck disable=SC2086 # one --dev per developer
  "$LOAD" --url ws://127.0.0.1:$target --dev ${SGDEV//,/ --dev } -q \
    relay --producers 4 --developers 4 --count "$M" 2>&1 | sed "s/^/[$target] /" | grep -E 'readings/s|p50|p99|lost|dup|order' || true
done
