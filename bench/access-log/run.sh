#!/usr/bin/env bash
# Access log cost (README "Access log cost"): the same gateway build with the access
# log off and on, ROUNDS rounds interleaved, one worker pinned to CPU 1, wrk and the
# demo application on CPU 0 (as the peer harness does). Prints each run's req/s and
# the median ratio on ÷ off. Loopback only; everything it starts is stopped when it
# ends. Needs a release build of both binaries (`cargo build --release --workspace`)
# and wrk. BIN (default target/release) is where tollgate is; UPSTREAM_BIN, the demo
# application (default: BIN's tollgate-upstream, else target/release's), for a BIN from
# pgo/release.sh, which builds tollgate alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:-target/release}
UPSTREAM_BIN=${UPSTREAM_BIN:-$BIN/tollgate-upstream}
[ -x "$UPSTREAM_BIN" ] || UPSTREAM_BIN=target/release/tollgate-upstream
[ -x "$UPSTREAM_BIN" ] || { echo "no tollgate-upstream: cargo build --release -p tollgate-upstreams" >&2; exit 1; }
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
PORT=29580 ADMIN_PORT=29581 UPSTREAM=29590

source bench/lib.sh

taskset -c 0 "$UPSTREAM_BIN" --listen "127.0.0.1:$UPSTREAM" > "$RUN/upstream.log" 2>&1 &
pids+=($!)

# measure ENABLED: req/s of one wrk run against a fresh gateway.
measure() {
  sed -e "s/{{PORT}}/$PORT/; s/{{ADMIN_PORT}}/$ADMIN_PORT/; s/{{UPSTREAM}}/$UPSTREAM/" \
      -e "s/{{ENABLED}}/$1/; s|{{LOG}}|$RUN/access.log|" \
      bench/access-log/gateway.yaml > "$RUN/gateway.yaml"
  TOLLGATE_RUN_DIR="$RUN" taskset -c 1 "$BIN/tollgate" run -c "$RUN/gateway.yaml" \
    > "$RUN/gateway.log" 2>&1 &
  local gw=$!
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$ADMIN_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  taskset -c 0 wrk -t1 -c64 -d1s "http://127.0.0.1:$PORT/api/predict" > /dev/null
  local before after
  before=$(cpu_ticks "$gw")
  taskset -c 0 wrk -t1 -c64 -d${DURATION}s "http://127.0.0.1:$PORT/api/predict" > "$RUN/wrk.out"
  after=$(cpu_ticks "$gw")
  kill -TERM "$gw"
  wait "$gw" || true
  rm -f "$RUN/access.log"
  if grep -q "Non-2xx" "$RUN/wrk.out"; then
    echo "the gateway answered errors:" >&2
    cat "$RUN/wrk.out" >&2
    exit 1
  fi
  local rps requests
  rps=$(awk '/Requests\/sec/ { print $2 }' "$RUN/wrk.out")
  requests=$(awk '/requests in/ { print $1 }' "$RUN/wrk.out")
  # CPU µs of the whole gateway process (every thread) per request.
  echo "$rps $(( (after - before) * 10000 * 1000 / requests ))"
}

# User + system CPU of a process, in clock ticks (1/100 s).
cpu_ticks() {
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}

offs=() ons=() off_cpu=() on_cpu=()
for round in $(seq "$ROUNDS"); do
  read -r off off_us < <(measure false)
  read -r on on_us < <(measure true)
  offs+=("$off") ons+=("$on") off_cpu+=("$off_us") on_cpu+=("$on_us")
  echo "round $round: off $off req/s ($((off_us / 1000)).$((off_us % 1000 / 100)) µs CPU/request), on $on req/s ($((on_us / 1000)).$((on_us % 1000 / 100)) µs)"
done
python3 - "${offs[*]}" "${ons[*]}" "${off_cpu[*]}" "${on_cpu[*]}" <<'PY'
import statistics, sys
off, on, off_cpu, on_cpu = ([float(x) for x in a.split()] for a in sys.argv[1:5])
ratio = statistics.median(b / a for a, b in zip(off, on))
cpu = statistics.median(b / a for a, b in zip(off_cpu, on_cpu))
print(f"median: off {statistics.median(off):,.0f} req/s, on {statistics.median(on):,.0f} req/s; "
      f"on / off: {ratio:.3f} in req/s, {cpu:.3f} in CPU per request (paired per round)")
PY
