#!/usr/bin/env bash
# What else runs on the proxy's CPU at a fixed rate, and how long the proxy waits for it:
# tollgate and nginx in turn, each alone on CPU 1 (origin and oha on CPU 0, as
# bench/latency/run.sh places them), `perf sched record` on CPU 1 for DURATION seconds of
# oha at RATE, then per task on that CPU: how many times it ran, its run time, and its
# scheduling delay (runnable, not running) at the 99th percentile and the maximum. A
# proxy whose own delays stay in microseconds loses no tail latency to its neighbours
# (its other threads included); the oha line gives the run's p50/p99/p99.9.
#
#   bash pgo/release.sh target/bench && BIN=target/bench bash bench/latency/sched.sh
#
# BIN (default target/release), TARGETS (default "tollgate nginx"), RATE (5000),
# CONNECTIONS (64), DURATION (10), WARMUP (3). Needs perf, oha, nginx, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
TARGETS=${TARGETS:-"tollgate nginx"}
RATE=${RATE:-5000}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
ORIGIN_PORT=29180 PROXY_PORT=29181 AUX_PORT=29182
source bench/lib.sh
export TOLLGATE_RUN_DIR=$RUN
find_oha

start_origin

load() { # load SECONDS [OUT]
  taskset -c 0 "$OHA" -z "$1s" -q "$RATE" -c "$CONNECTIONS" --latency-correction --no-tui \
    --worker-threads 1 --output-format json "http://127.0.0.1:$PROXY_PORT/json" > "${2:-/dev/null}"
}

for name in $TARGETS; do
  case $name in
    tollgate) command=("$BIN/tollgate" run -c "$(gateway_policy bench/gateway.yaml)") ;;
    nginx) command=(nginx -c "$(nginx_conf proxy)") ;;
    *) echo "unknown target $name" >&2; exit 1 ;;
  esac
  taskset -c 1 "${command[@]}" > "$RUN/$name.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT /json
  load "$WARMUP"
  taskset -c 0 perf sched record -C 1 -o "$RUN/$name.sched" -- sleep "$DURATION" \
    2> "$RUN/$name.perf.log" &
  recorder=$!
  load "$DURATION" "$RUN/$name.oha"
  wait $recorder
  kill "$target"
  wait "$target" 2>/dev/null || true
  perf sched timehist -i "$RUN/$name.sched" 2> /dev/null > "$RUN/$name.timehist"
  python3 - "$name" "$RUN/$name.oha" "$RUN/$name.timehist" <<'EOF'
import collections, json, re, sys
name, oha, timehist = sys.argv[1:]
p = json.load(open(oha))["latencyPercentiles"]
print(f"{name}: p50 {p['p50'] * 1e3:.3f} ms, p99 {p['p99'] * 1e3:.3f}, p99.9 {p['p99.9'] * 1e3:.3f}")
runs, run_ms, delays = collections.Counter(), collections.Counter(), collections.defaultdict(list)
# time, [cpu], task (its name may hold spaces) [tid/pid], wait, scheduling delay, run time (ms)
line = re.compile(r"\s*[\d.]+\s+\[\d+\]\s+(.*?)\[\d+(?:/\d+)?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
for row in open(timehist):
    m = line.match(row)
    if not m or m.group(1).strip() == "<idle>":
        continue
    task = m.group(1).strip()
    runs[task] += 1
    run_ms[task] += float(m.group(4))
    delays[task].append(float(m.group(3)))
print(f"  {'task on CPU 1':<24} {'runs':>7} {'run ms':>9} {'delay p99 ms':>13} {'delay max ms':>13}")
for task, n in runs.most_common(12):
    d = sorted(delays[task])
    print(f"  {task:<24} {n:>7} {run_ms[task]:>9.3f} {d[min(len(d) - 1, int(len(d) * 0.99))]:>13.3f} {d[-1]:>13.3f}")
EOF
  sleep 1
done
