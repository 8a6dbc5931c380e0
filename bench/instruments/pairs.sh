#!/usr/bin/env bash
# Saturated runs of tollgate and nginx in turn, one worker each on CPU 1, the nginx origin
# and wrk on CPU 0: per run req/s, user and system CPU µs per request, and per request the
# syscalls (by name), context switches, wake-ups and page faults of the proxy (perf stat
# over `wrk -t1 -c64`). Where bench/instruments/run.sh counts once per target, this
# alternates them ROUNDS times, so that what moves between runs shows beside what does
# not.
#
#   BIN=<dir with tollgate> bash bench/instruments/pairs.sh
#
# TARGETS (default "tollgate nginx"; also floor, bare Pingora, and probe, the raw tokio
# proxy, from $BIN/examples: `cargo build --release --examples`; tollgate-2t, the policy
# with server.threads: 2, and nginx-2w, two workers, both on the CPUs in CPUS_2T, default
# 1; CPUS_1T, default 1, the CPUs of tollgate and nginx with one thread or worker),
# ROUNDS (5), DURATION
# (seconds measured, 8), GATEWAY_CONF (tollgate's policy template, default
# bench/gateway.yaml), URL_PATH (/json), RATE (when set, oha sends that many
# requests a second over 64 connections instead of wrk saturating them: the counts of
# the fixed-rate latency scenario, bench/latency/run.sh). Needs perf, wrk (or oha) and
# nginx.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-$PWD/target/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
URL_PATH=${URL_PATH:-/json}
ORIGIN_PORT=29180 PROXY_PORT=29181 AUX_PORT=29182
source bench/lib.sh
export TOLLGATE_RUN_DIR=$RUN

start_origin
policy=$(gateway_policy "${GATEWAY_CONF:-bench/gateway.yaml}")
policy_2t=$(gateway_policy "${GATEWAY_CONF:-bench/gateway.yaml}" -e "s/threads: 1/threads: 2/")
CPUS_2T=${CPUS_2T:-1}
CPUS_1T=${CPUS_1T:-1}
[ -z "${RATE:-}" ] || find_oha

load() { # load SECONDS: prints the number of requests answered
  if [ -n "${RATE:-}" ]; then
    taskset -c 0 "$OHA" -z "$1s" -q "$RATE" -c 64 --no-tui --worker-threads 1 \
      --output-format json "http://127.0.0.1:$PROXY_PORT$URL_PATH" > "$RUN/load"
    python3 -c 'import json, sys; print(sum(json.load(open(sys.argv[1]))["statusCodeDistribution"].values()))' "$RUN/load"
  else
    taskset -c 0 wrk -t1 -c64 -d"$1s" "http://127.0.0.1:$PROXY_PORT$URL_PATH" > "$RUN/load"
    awk '/requests in/ {print $1}' "$RUN/load"
  fi
}

cpu_ticks() { # cpu_ticks PID,PID…: user and system ticks summed over the processes
  for pid in ${1//,/ }; do cat "/proc/$pid/stat"; done | awk '{u += $14; s += $15} END {print u, s}'
}

# perf stat runs the load as its command, in a shell of its own.
export -f load
export RUN OHA PROXY_PORT URL_PATH RATE

events=page-faults,context-switches,sched:sched_wakeup,raw_syscalls:sys_enter
for call in read write writev readv recvfrom sendto recvmsg sendmsg epoll_wait; do
  events+=",syscalls:sys_enter_$call"
done

for round in $(seq "$ROUNDS"); do
  for name in ${TARGETS:-tollgate nginx}; do
    cpus=1
    case $name in
      tollgate) command="$BIN/tollgate run -c $policy" cpus=$CPUS_1T ;;
      tollgate-2t) command="$BIN/tollgate run -c $policy_2t" cpus=$CPUS_2T ;;
      nginx) command="nginx -c $(nginx_conf proxy)" cpus=$CPUS_1T ;;
      nginx-2w) command="nginx -c $(nginx_conf proxy 2)" cpus=$CPUS_2T ;;
      floor) command="$BIN/examples/pingora_floor 127.0.0.1:$PROXY_PORT proxy 127.0.0.1:$ORIGIN_PORT" ;;
      probe) command="$BIN/examples/tokio_probe 127.0.0.1:$PROXY_PORT 127.0.0.1:$ORIGIN_PORT" ;;
    esac
    # shellcheck disable=SC2086
    taskset -c "$cpus" $command > "$RUN/$name.log" 2>&1 &
    target=$!
    pids+=($target)
    wait_port $PROXY_PORT "$URL_PATH"
    load 2 >/dev/null
    # The process and its children: nginx-2w's master forks its workers.
    procs=$( (pgrep -P "$target" || true) | paste -sd, -)
    procs=$target${procs:+,$procs}
    read -r user0 sys0 < <(cpu_ticks "$procs")
    perf stat -x, -o "$RUN/perf" -e "$events" -p "$procs" -- bash -c "load $DURATION" > "$RUN/requests"
    read -r user1 sys1 < <(cpu_ticks "$procs")
    kill "$target"
    wait "$target" 2>/dev/null || true
    requests=$(cat "$RUN/requests")
    awk -F, -v name="$name" -v round="$round" -v r="$requests" -v d="$DURATION" \
      -v u=$((user1 - user0)) -v s=$((sys1 - sys0)) -v hz="$(getconf CLK_TCK)" '
      { count[$3] = $1 }
      END {
        us = 1e6 / hz / r
        printf "round %d %-8s %7.0f req/s  CPU %5.1f µs (%4.1f user + %4.1f sys)  syscalls %.2f", round, name,
          r / d, (u + s) * us, u * us, s * us, count["raw_syscalls:sys_enter"] / r
        listed = 0
        for (e in count) if (e ~ /sys_enter_/ && count[e] > 0) {
          listed += count[e]
          sub(/syscalls:sys_enter_/, "", e); printf " %s %.3f", e, count["syscalls:sys_enter_" e] / r
        }
        printf " other %.3f", (count["raw_syscalls:sys_enter"] - listed) / r
        printf "  cs %.3f  wakeups %.3f  faults %.4f\n", count["context-switches"] / r,
          count["sched:sched_wakeup"] / r, count["page-faults"] / r
      }' "$RUN/perf"
  done
done
