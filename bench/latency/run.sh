#!/usr/bin/env bash
# Added latency at a fixed rate: oha sends RATE requests/s (below every proxy's maximum)
# over CONNECTIONS keep-alive connections, latency corrected for coordinated omission
# (each request timed from when it was due, not from when it was sent), to the origin
# directly and through each proxy. Reported per target, medians over ROUNDS interleaved
# rounds: p50/p99/p99.9, the latency added over direct (paired within a round), and the
# proxy's CPU per request at that rate (utime + stime of the whole process, and the two
# apart), and the CPU time the hypervisor took from the machine during the run (steal,
# max over rounds).
#
#   cargo build --release && bash bench/latency/run.sh
#
# TARGETS (default "direct tollgate tollgate-2t nginx nginx-2w envoy"; tollgate-2t is the
# same policy with server.threads: 2, nginx-2w nginx with two workers; also floor, bare
# Pingora, and probe, the raw tokio proxy, from $BIN/examples: `cargo build --release
# --examples`; and tollgate-b, the one-thread tollgate of another build, $BIN_B/tollgate,
# to compare two builds round by round on the same host; and nginx-headers, one nginx
# worker that also does the forwarding and request-id header work of every tollgate
# request, bench/lib.sh), RATE (5000), CONNECTIONS (64), DURATION (seconds measured, 15), WARMUP
# (seconds, 3), ROUNDS (3), BIN (default target/release), ENVOY (the envoy binary; default
# `envoy` on PATH or $PEERS_VENV/bin/envoy, the shared peer harness's environment). Needs
# nginx (origin and the nginx row), oha (`cargo install oha`), python3.
#
# Placement: the origin and oha run on CPU 0, every proxy's one worker on CPU 1. CPUS_2T
# (default 1) places tollgate-2t and nginx-2w, CPUS_1T (default 1) the one-thread tollgate
# and the one-worker nginx: the defaults put both on the same core, so that CPU per request
# compares; CPUS_1T=0,1 CPUS_2T=0,1 gives one and two threads the same two CPUs, the first
# shared with oha and the origin.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
TARGETS=${TARGETS:-"direct tollgate tollgate-2t nginx nginx-2w envoy"}
RATE=${RATE:-5000}
CONNECTIONS=${CONNECTIONS:-64}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-3}
CPUS_2T=${CPUS_2T:-1}
CPUS_1T=${CPUS_1T:-1}
CAPTURE=${CAPTURE:-}
TRACE=${TRACE:-}
ENVOY=${ENVOY:-$(command -v envoy || echo "${PEERS_VENV:-/nonexistent}/bin/envoy")}
ORIGIN_PORT=29180 PROXY_PORT=29181 AUX_PORT=29182
source bench/lib.sh
export TOLLGATE_RUN_DIR=$RUN
find_oha
if [[ " $TARGETS " == *" envoy "* && ! -x $ENVOY ]]; then
  echo "no envoy ($ENVOY): the envoy row is skipped" >&2
  TARGETS=${TARGETS//envoy/}
fi

start_origin

tollgate_policy() { # tollgate_policy THREADS
  gateway_policy bench/gateway.yaml -e "s/threads: 1/threads: $1/"
}

envoy_conf() {
  cat > "$RUN/envoy.yaml" <<EOF
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: $PROXY_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP1
          generate_request_id: false
          route_config:
            virtual_hosts:
            - { name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: origin } }] }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: origin
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: origin
      endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $ORIGIN_PORT } } } }] }]
EOF
  echo "$RUN/envoy.yaml"
}

# start TARGET: the proxy on its CPUs, its PID in $target, the CPUs in $cpus and the port
# to load in $port.
start() {
  target='' port=$PROXY_PORT cpus=1
  case $1 in tollgate | tollgate-b | nginx | nginx-headers) cpus=$CPUS_1T ;; tollgate-2t | nginx-2w) cpus=$CPUS_2T ;; esac
  case $1 in
    direct) port=$ORIGIN_PORT; return ;;
    tollgate) taskset -c "$CPUS_1T" "$BIN/tollgate" run -c "$(tollgate_policy 1)" > "$RUN/$1.log" 2>&1 & ;;
    tollgate-b) taskset -c "$CPUS_1T" "$BIN_B/tollgate" run -c "$(tollgate_policy 1)" > "$RUN/$1.log" 2>&1 & ;;
    tollgate-2t) taskset -c "$CPUS_2T" "$BIN/tollgate" run -c "$(tollgate_policy 2)" > "$RUN/$1.log" 2>&1 & ;;
    nginx) taskset -c "$CPUS_1T" nginx -c "$(nginx_conf proxy)" > "$RUN/$1.log" 2>&1 & ;;
    nginx-headers) taskset -c "$CPUS_1T" nginx -c "$(nginx_conf proxy-headers)" > "$RUN/$1.log" 2>&1 & ;;
    nginx-2w) taskset -c "$CPUS_2T" nginx -c "$(nginx_conf proxy 2)" > "$RUN/$1.log" 2>&1 & ;;
    envoy) taskset -c 1 "$ENVOY" -c "$(envoy_conf)" --concurrency 1 --log-level error > "$RUN/$1.log" 2>&1 & ;;
    floor) taskset -c 1 "$BIN/examples/pingora_floor" "127.0.0.1:$PROXY_PORT" proxy "127.0.0.1:$ORIGIN_PORT" > "$RUN/$1.log" 2>&1 & ;;
    probe) taskset -c 1 "$BIN/examples/tokio_probe" "127.0.0.1:$PROXY_PORT" "127.0.0.1:$ORIGIN_PORT" > "$RUN/$1.log" 2>&1 & ;;
  esac
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT /json
}

# CPU ticks of the target and its children (nginx's workers) so far, user and system:
# "USER SYSTEM".
ticks() {
  [ -n "$target" ] || { echo 0 0; return; }
  local pid user=0 system=0 u s
  for pid in $target $(pgrep -P "$target"); do
    read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat" 2>/dev/null || echo 0 0)
    user=$((user + u)) system=$((system + s))
  done
  echo $user $system
}

# Ticks the hypervisor took from this machine's CPUs so far (the steal column of
# /proc/stat): a run that had much was run on a busy host.
steal() { awk '/^cpu / {print $9}' /proc/stat; }

load() { # load SECONDS OUT
  local url=("http://127.0.0.1:$port/json")
  [ -z "$CAPTURE" ] || url=(--rand-regex-url "http://127.0.0.1:$port/json\\?r=[0-9]{12}")
  # One runtime thread: oha is pinned to one CPU, and two threads there preempt each
  # other for milliseconds, which showed as the tail of every target, direct included.
  taskset -c 0 "$OHA" -z "$1s" -q "$RATE" -c "$CONNECTIONS" --latency-correction --no-tui \
    --worker-threads 1 --output-format json "${url[@]}" > "$2"
}

trace_warmup() { # trace_warmup OUT: during the warm-up, its last WARMUP-1 seconds
  # This shell and what it runs stay off the proxy's CPUs.
  taskset -cp 0 "$BASHPID" > /dev/null
  sleep 1
  # nginx-2w's workers are the master's children; every target's threads are listed.
  local pid procs
  # pgrep fails when the target has no children: not an error here.
  procs="$target $(pgrep -P "$target" || true)"
  for pid in $procs; do ls "/proc/$pid/task"; done > "${1%.trace}.tids"
  taskset -c 0 perf record -q -e raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch \
    -C "$cpus" -o "$1.data" -- sleep $((WARMUP - 1)) 2> "$1.log"
  # Upstream connections stay open (keep-alive), so those there now were the trace's.
  ss -tnpH state established "( dport = :$ORIGIN_PORT )" \
    | grep -oE "pid=($(echo $procs | tr ' ' '|')),fd=[0-9]+" \
    | cut -d= -f3 | sort -u > "${1%.trace}.upstream"
  perf script -i "$1.data" --ns -F comm,tid,cpu,time,event,trace > "$1" 2>> "$1.log"
  rm -f "$1.data"
}

capture_start() { # capture_start OUT: tcpdump's PID in $capture
  capture=''
  [ -n "$CAPTURE" ] || return 0
  taskset -c 0 tcpdump -i lo -n -s 200 -B 65536 --time-stamp-precision=nano -w "$1" \
    "tcp and (port $ORIGIN_PORT or port $PROXY_PORT) and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)" \
    2> "$1.log" &
  capture=$!
  pids+=($capture)
  for _ in $(seq 100); do grep -q listening "$1.log" && return; sleep 0.05; done
}

capture_stop() {
  [ -n "$capture" ] || return 0
  kill -INT "$capture"
  wait "$capture" || true
  grep -h "dropped by kernel" "$RUN"/*.pcap.log | grep -v "^0 " >&2 || true
}

: > "$RUN/rows"
for round in $(seq "$ROUNDS"); do
  # Rotated by one each round, so slow drifts of the machine spread over every target.
  read -r -a order <<< "$TARGETS"
  shift_by=$(( (round - 1) % ${#order[@]} ))
  order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
  for name in "${order[@]}"; do
    start "$name"
    tracer=''
    if [ -n "$TRACE" ] && [ -n "$target" ]; then
      trace_warmup "$RUN/$name-$round.trace" &
      tracer=$!
    fi
    load "$WARMUP" "$RUN/warmup.json"
    [ -z "$tracer" ] || wait "$tracer"
    capture_start "$RUN/$name-$round.pcap"
    read -r user_before system_before < <(ticks)
    steal_before=$(steal)
    load "$DURATION" "$RUN/$name-$round.json"
    read -r user_after system_after < <(ticks)
    steal_after=$(steal)
    capture_stop
    stop
    echo "$round $name $((user_after - user_before)) $((system_after - system_before))" \
      "$((steal_after - steal_before)) $RUN/$name-$round.json" \
      >> "$RUN/rows"
    echo "round $round: $name done" >&2
  done
done

python3 - "$RUN/rows" "$(getconf CLK_TCK)" "$RATE" "$CONNECTIONS" "$DURATION" "$ROUNDS" <<'EOF'
import json, statistics, sys
rows, hz, rate, conns, duration, rounds = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
runs = {}
for line in open(rows):
    rnd, name, user, system, steal, path = line.split()
    report = json.load(open(path))
    codes = report.get("statusCodeDistribution", {})
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    # Requests still in flight when the run's time is up are cut by oha itself.
    errors = {e: n for e, n in report.get("errorDistribution", {}).items() if "deadline" not in e}
    total = sum(codes.values()) + sum(errors.values())
    p = report["latencyPercentiles"]
    runs.setdefault(name, {})[rnd] = {
        "p50": p["p50"] * 1e3, "p99": p["p99"] * 1e3, "p99.9": p["p99.9"] * 1e3,
        "rps": report["summary"]["requestsPerSec"], "ok": ok, "total": total,
        "cpu": (int(user) + int(system)) * 1e6 / hz / max(ok, 1),
        "user": int(user) * 1e6 / hz / max(ok, 1),
        "system": int(system) * 1e6 / hz / max(ok, 1),
        "steal": int(steal) / hz / float(duration),
    }
med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"Fixed rate {rate} req/s, {conns} connections, {duration} s per run, {rounds} rounds; "
      "latency corrected for coordinated omission (oha --latency-correction); medians over rounds.\n")
print("| target | req/s | non-2xx or errors (all rounds) | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | CPU µs/req (user + system) | steal (cores, max) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
direct = runs.get("direct", {})
for name, by_round in runs.items():
    col = lambda k: med([r[k] for r in by_round.values()])
    added = lambda k: med([r[k] - direct[n][k] for n, r in by_round.items() if n in direct])
    failed = sum(r["total"] - r["ok"] for r in by_round.values())
    # Each a median of its own: user and system need not add up to the total.
    cpu = "—" if name == "direct" else \
        f"{col('cpu'):.1f} ({col('user'):.1f} + {col('system'):.1f})"
    extra = ("—", "—") if name == "direct" else (f"{added('p50'):.3f}", f"{added('p99'):.3f}")
    print(f"| {name} | {col('rps'):,.0f} | {failed} | {col('p50'):.3f} | {col('p99'):.3f} | "
          f"{col('p99.9'):.3f} | {extra[0]} | {extra[1]} | {cpu} | "
          f"{max(r['steal'] for r in by_round.values()):.2f} |")
pairs = [(one, two) for one, two in (("tollgate", "tollgate-2t"), ("nginx", "nginx-2w"))
         if one in runs and two in runs]
if pairs:
    ratio = lambda one, two: med([runs[two][n]["cpu"] / r["cpu"]
                                  for n, r in runs[one].items() if n in runs[two]])
    print("\nCPU per request, two threads or workers ÷ one, paired by round: "
          + "; ".join(f"{one} {ratio(one, two):.2f}×" for one, two in pairs) + ".")
# Two builds of tollgate side by side: how often, round by round, the one beats the other
# (their medians move more between runs than such a difference).
if "tollgate" in runs and "tollgate-b" in runs:
    a, b = runs["tollgate"], runs["tollgate-b"]
    both = [n for n in a if n in b and n in direct]
    lower = lambda k: sum(a[n][k] < b[n][k] for n in both)
    print(f"\ntollgate against tollgate-b, paired by round: added p99 lower in "
          f"{lower('p99')} of {len(both)} rounds, added p50 lower in {lower('p50')}, "
          f"CPU a request {med([a[n]['cpu'] / b[n]['cpu'] for n in both]):.3f}× (median ratio).")
by_number = lambda by_round: sorted(by_round.items(), key=lambda item: int(item[0]))
# Each round's CPU per request, so that a paired ratio and the ratio of medians can be
# told apart.
print("\nCPU µs per request by round: " + "; ".join(
    f"{name} " + ", ".join(f"{r['cpu']:.1f}" for _, r in by_number(by_round))
    for name, by_round in runs.items() if name != "direct") + ".")
# The same for the added p99: its median over five rounds moves by tens of µs from one
# run to the next, so the rounds behind it are shown.
if direct:
    print("\nAdded p99 ms by round: " + "; ".join(
        f"{name} " + ", ".join(f"{r['p99'] - direct[n]['p99']:.3f}"
                               for n, r in by_number(by_round) if n in direct)
        for name, by_round in runs.items() if name != "direct") + ".")
EOF
if [ -n "$CAPTURE" ]; then
  echo
  echo "Where each proxy's added latency goes (loopback capture, bench/latency/legs.py):"
  echo
  python3 bench/latency/legs.py "$PROXY_PORT" "$ORIGIN_PORT" "$RUN"/*.pcap
fi
if [ -n "$TRACE" ]; then
  echo
  echo "What each proxy does on its CPUs (perf trace of the warm-ups, bench/latency/oncpu.py):"
  echo
  python3 bench/latency/oncpu.py "$RUN"/*.trace
fi
