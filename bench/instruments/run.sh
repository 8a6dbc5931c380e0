#!/usr/bin/env bash
# Per proxied request, for tollgate, bare Pingora (examples/pingora_floor.rs), a raw tokio
# proxy (examples/tokio_probe.rs) and nginx, one worker each, on loopback: user and system
# CPU µs, syscalls, context switches and wakeups (perf stat over a wrk run), and
# instructions (callgrind over a fixed number of keep-alive requests). Deterministic
# counts are the figures to steer by (bench/README.md, "Instruments").
#
#   cargo build --release --workspace --bins --examples && bash bench/instruments/run.sh
#
# TARGETS (default "tollgate floor probe nginx"), REQUESTS (callgrind, 2000), DURATION
# (wrk seconds, 5), BIN (where the binaries are, default target/release: another build
# to compare with), GATEWAY_CONF (tollgate's policy template, default bench/gateway.yaml;
# bench/gateway-cache.yaml for 1 KiB hits, bench/gateway-ratelimit.yaml for the rules),
# ACCESS_LOG (when 1, tollgate's access log is on, to a file: the policy production runs),
# CALLGRIND_OUT (a directory to keep the callgrind profiles in, for callgrind_annotate),
# CACHE_SIM (when 1, callgrind also simulates a 32 KiB L1i, 48 KiB L1d and 2 MiB last
# level, and two columns more give the first-level misses a request: instruction and data
# lines the request's code and data did not find there, its footprint beyond L1),
# FOOTPRINT (when 1, a column more: the 64-byte code lines a request runs, its code
# footprint, bench/instruments/footprint.py; at a fixed rate each request starts with
# cold caches and fetches them all again),
# IN_FLIGHT (when set, e.g. 32, a last column: instructions a request with that many
# keep-alive connections loading the target for DURATION seconds under callgrind, wrk's
# count; the sequential count pays a poll of the event loop, a park and the timer
# wheel's turn on every request, where a loaded proxy pays them once for several).
# Needs perf, valgrind, wrk, python3; nginx for the origin and the
# nginx row (without nginx, tollgate-upstream is the origin and the nginx row is skipped).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
TARGETS=${TARGETS:-"tollgate floor probe nginx"}
REQUESTS=${REQUESTS:-2000}
DURATION=${DURATION:-5}
ORIGIN_PORT=29180 PROXY_PORT=29181 AUX_PORT=29182
source bench/lib.sh
export TOLLGATE_RUN_DIR=$RUN

if command -v nginx >/dev/null; then
  taskset -c 0 nginx -c "$(nginx_conf origin)" &
  pids+=($!)
  ORIGIN_PATH=/json
else
  taskset -c 0 "$BIN/tollgate-upstream" --listen "127.0.0.1:$ORIGIN_PORT" >/dev/null 2>&1 &
  pids+=($!)
  ORIGIN_PATH=/health
  TARGETS=${TARGETS//nginx/}
fi
wait_port $ORIGIN_PORT "$ORIGIN_PATH"

# The command line of each target; VALGRIND is prefixed for the instruction count.
command_of() {
  case $1 in
    tollgate)
      local edits=()
      if [ "${ACCESS_LOG:-0}" = 1 ]; then edits=("${access_log_on[@]}"); fi
      echo "$BIN/tollgate run -c $(gateway_policy "${GATEWAY_CONF:-bench/gateway.yaml}" "${edits[@]}")" ;;
    floor) echo "$BIN/examples/pingora_floor 127.0.0.1:$PROXY_PORT proxy 127.0.0.1:$ORIGIN_PORT" ;;
    probe) echo "$BIN/examples/tokio_probe 127.0.0.1:$PROXY_PORT 127.0.0.1:$ORIGIN_PORT" ;;
    nginx) echo "nginx -c $(nginx_conf proxy)" ;;
  esac
}

start() { # start TARGET [WRAPPER...]: the target on CPU 1, its PID in $target
  local name=$1; shift
  # shellcheck disable=SC2046
  taskset -c 1 "$@" $(command_of "$name") > "$RUN/$name.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT "$ORIGIN_PATH"
}

# utime and stime of the target, in clock ticks (taskset execs it; nginx stays in the
# foreground).
ticks() { awk '{print $14 + $15, $14, $15}' "/proc/$1/stat"; }

cache_sim=()
if [ "${CACHE_SIM:-0}" = 1 ]; then
  cache_sim=(--cache-sim=yes --I1=32768,8,64 --D1=49152,12,64 --LL=2097152,16,64)
  header='| target | CPU µs/req (user + sys) | syscalls/req | context switches/req | wakeups/req | instructions/req | L1i misses/req | L1d misses/req |'
  rule='|---|---:|---:|---:|---:|---:|---:|---:|'
else
  header='| target | CPU µs/req (user + sys) | syscalls/req | context switches/req | wakeups/req | instructions/req |'
  rule='|---|---:|---:|---:|---:|---:|'
fi
dump_instr=no
if [ "${FOOTPRINT:-0}" = 1 ]; then
  dump_instr=yes
  header="$header code lines/req |"
  rule="$rule---:|"
fi
if [ -n "${IN_FLIGHT:-}" ]; then
  header="$header instructions/req, $IN_FLIGHT in flight |"
  rule="$rule---:|"
fi
printf '%s\n%s\n' "$header" "$rule"
for name in $TARGETS; do
  start "$name"
  taskset -c 0 wrk -t1 -c64 -d1s "http://127.0.0.1:$PROXY_PORT$ORIGIN_PATH" >/dev/null
  read -r _ user0 sys0 < <(ticks "$target")
  perf stat -x, -o "$RUN/$name.perf" -e task-clock,context-switches,raw_syscalls:sys_enter,sched:sched_wakeup \
    -p "$target" -- taskset -c 0 wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$PROXY_PORT$ORIGIN_PATH" \
    > "$RUN/$name.wrk"
  read -r _ user1 sys1 < <(ticks "$target")
  stop
  requests=$(awk '/requests in/ {print $1}' "$RUN/$name.wrk")
  count() { awk -F, -v e="$1" '$3 == e {print $1}' "$RUN/$name.perf"; }
  hz=$(getconf CLK_TCK)

  GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1000000 start "$name" \
    valgrind --tool=callgrind --callgrind-out-file="$RUN/$name.cg" --dump-instr=$dump_instr "${cache_sim[@]}"
  python3 - "$PROXY_PORT" "$ORIGIN_PATH" 300 <<'EOF'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(int(sys.argv[3])):
    c.request("GET", sys.argv[2]); c.getresponse().read()
EOF
  callgrind_control -z "$target" >/dev/null 2>&1
  python3 - "$PROXY_PORT" "$ORIGIN_PATH" "$REQUESTS" <<'EOF'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(int(sys.argv[3])):
    c.request("GET", sys.argv[2]); c.getresponse().read()
EOF
  callgrind_control -d "$target" >/dev/null 2>&1
  # totals: Ir, and with the cache simulation Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  read -r instructions i1_misses d1_misses < <(awk '/^totals:/ {print $2, $5, $6 + $7}' "$RUN/$name".cg.1)
  footprint=
  if [ "$dump_instr" = yes ]; then
    footprint=" $(python3 bench/instruments/footprint.py "$RUN/$name".cg.1 "$REQUESTS") |"
  fi
  in_flight=
  if [ -n "${IN_FLIGHT:-}" ]; then
    callgrind_control -z "$target" >/dev/null 2>&1
    taskset -c 0 wrk -t1 -c"$IN_FLIGHT" -d"${DURATION}s" "http://127.0.0.1:$PROXY_PORT$ORIGIN_PATH" \
      > "$RUN/$name.wrk-in-flight"
    callgrind_control -d "$target" >/dev/null 2>&1
    in_flight=$(awk -v r="$(awk '/requests in/ {print $1}' "$RUN/$name.wrk-in-flight")" \
      '/^totals:/ {printf " %d |", $2 / r}' "$RUN/$name".cg.2)
  fi
  if [ -n "${CALLGRIND_OUT:-}" ]; then mkdir -p "$CALLGRIND_OUT" && cp "$RUN/$name".cg.* "$CALLGRIND_OUT/"; fi
  stop

  awk -v n="$name" -v r="$requests" -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$hz" \
    -v sc="$(count raw_syscalls:sys_enter)" -v cs="$(count context-switches)" \
    -v wk="$(count sched:sched_wakeup)" -v ins="$instructions" -v q="$REQUESTS" \
    -v sim="${#cache_sim[@]}" -v i1="$i1_misses" -v d1="$d1_misses" -v footprint="$footprint" -v in_flight="$in_flight" 'BEGIN {
      us = 1e6 / hz / r
      printf "| %s | %.1f (%.1f + %.1f) | %.2f | %.3f | %.3f | %d |", n, (u + s) * us, u * us, s * us,
        sc / r, cs / r, wk / r, ins / q
      if (sim > 0) printf " %d | %d |", i1 / q, d1 / q
      printf "%s%s\n", footprint, in_flight }'
done
