#!/usr/bin/env bash
# Which of a proxied request's instructions add latency: callgrind splits the proxy's
# worker thread at every socket syscall (a profile dumped before each call), one
# keep-alive request at a time, and this prints the cycle one request repeats, each
# interval's instructions and clock reads (medians over REQUESTS requests). An interval
# that starts at a wake-up (`epoll_wait`) and ends at a write carries a request or a
# response onward: the client waits for it. One that starts at a write and ends at the
# next sleep runs after the bytes left: it delays a request only when the next one is
# already waiting. Where bench/instruments/run.sh gives a request's whole count, this
# tells where in it the fixed-rate scenario's added latency (bench/latency/run.sh) is.
#
#   cargo build --release && bash bench/instruments/critical-path.sh
#
# TARGETS (default "tollgate nginx"; also nginx-headers, nginx doing the forwarding and
# request-id header work tollgate's requests do, and floor, bare Pingora, and probe, the
# raw tokio proxy, from $BIN/examples), REQUESTS (200), BIN (default target/release),
# GATEWAY_CONF (tollgate's policy template, default bench/gateway.yaml), CALLGRIND_OUT (a
# directory to keep each target's dumps in, TARGET/cg.PART-THREAD, for a closer look at
# one interval). Needs valgrind, python3 and nginx (the origin and the nginx row).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${BIN:-$ROOT/target/release}
TARGETS=${TARGETS:-"tollgate nginx"}
REQUESTS=${REQUESTS:-200}
ORIGIN_PORT=29180 PROXY_PORT=29181 AUX_PORT=29182
source bench/lib.sh
export TOLLGATE_RUN_DIR=$RUN

start_origin

command_of() {
  case $1 in
    tollgate) echo "$BIN/tollgate run -c $(gateway_policy "${GATEWAY_CONF:-bench/gateway.yaml}")" ;;
    floor) echo "$BIN/examples/pingora_floor 127.0.0.1:$PROXY_PORT proxy 127.0.0.1:$ORIGIN_PORT" ;;
    probe) echo "$BIN/examples/tokio_probe 127.0.0.1:$PROXY_PORT 127.0.0.1:$ORIGIN_PORT" ;;
    nginx) echo "nginx -c $(nginx_conf proxy)" ;;
    nginx-headers) echo "nginx -c $(nginx_conf proxy-headers)" ;;
  esac
}

# measure DIR: on one keep-alive connection, 300 requests to warm up, the profiles dumped
# so far dated back (the parser skips them), then $REQUESTS requests one at a time.
measure() {
  python3 - "$PROXY_PORT" "$REQUESTS" "$1" <<'EOF'
import http.client, os, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
def get(n):
    for _ in range(n):
        c.request("GET", "/json"); c.getresponse().read()
get(300)
time.sleep(1)
for f in os.listdir(sys.argv[3]):
    os.utime(os.path.join(sys.argv[3], f), (946684800, 946684800))
get(int(sys.argv[2]))
EOF
}

for name in $TARGETS; do
  out=$RUN/$name-profiles
  mkdir -p "$out"
  # Names written out in full in every dump (callgrind otherwise names a function once,
  # in the first dump that has it); the libc wrappers both Rust's and nginx's socket
  # calls go through.
  # shellcheck disable=SC2046
  GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1000000 taskset -c 1 \
    valgrind --tool=callgrind --callgrind-out-file="$out/cg" --dump-instr=no \
    --compress-strings=no --compress-pos=no --separate-threads=yes \
    --dump-before=send --dump-before=writev --dump-before=recv --dump-before=readv \
    --dump-before=epoll_wait $(command_of "$name") > "$RUN/$name.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT /json
  measure "$out"
  sleep 1
  stop
  if [ -n "${CALLGRIND_OUT:-}" ]; then mkdir -p "$CALLGRIND_OUT" && cp -a "$out" "$CALLGRIND_OUT/$name"; fi
  python3 - "$out" "$name" "$REQUESTS" <<'EOF'
import collections, os, statistics, sys
out, name, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
dumps = collections.defaultdict(list)
for f in os.listdir(out):
    path = os.path.join(out, f)
    if not f.startswith("cg.") or os.path.getmtime(path) < 1e9:
        continue
    head, fn, clock_reads = {}, None, 0
    for line in open(path):
        if line.startswith("thread:"):
            head["thread"] = int(line.split()[1])
        elif line.startswith("desc: Trigger:"):
            head["trigger"] = line.split("=")[-1].strip()
        elif line.startswith("desc: Timerange:"):
            head["start"] = int(line.split()[4])
        elif line.startswith("summary:"):
            head["ir"] = int(line.split()[1])
        elif line.startswith("cfn="):
            fn = line[4:].strip()
        elif line.startswith("calls=") and fn and "clock_gettime" in fn:
            clock_reads += int(line[6:].split()[0])
    head["clock_reads"] = clock_reads
    if "trigger" in head and "ir" in head:
        dumps[head["thread"]].append(head)
# The worker: the thread with the most socket calls.
seq = sorted(max(dumps.values(), key=len), key=lambda d: d["start"])
triggers = [d["trigger"] for d in seq]
# The cycle: one request's socket calls, from the wake-up the first request brings (the
# first dump after the warm-up), matched along the sequence; a call off the cycle (a
# timer's wake-up) is skipped.
best = max(1, round(len(triggers) / requests))
ref = triggers[:best]
cycles, i = [], 0
while i + best <= len(triggers):
    if triggers[i:i + best] == ref:
        cycles.append(seq[i:i + best])
        i += best
    else:
        i += 1
if len(cycles) < 0.9 * requests:
    sys.exit(f"{name}: no cycle of socket calls repeats once a request: "
             f"{len(triggers)} calls, {' '.join(triggers[:3 * best])}")
print(f"\n{name}: {len(cycles)} requests alike of {requests}\n")
print("| from | to | instructions | clock reads | adds latency |")
print("|---|---|---:|---:|---|")
prev = "epoll_wait"
critical = off = 0
waiting = True
for k in range(best):
    ir = statistics.median(c[k]["ir"] for c in cycles)
    clock = statistics.median(c[k]["clock_reads"] for c in cycles)
    trig = triggers[k]
    if waiting:
        critical += ir
    else:
        off += ir
    print(f"| {prev} | {trig} | {ir:,.0f} | {clock:g} | {'yes' if waiting else 'no'} |")
    if trig in ("send", "writev"):
        waiting = False
    elif trig == "epoll_wait":
        waiting = True
    prev = trig
print(f"\n{name}: a request {critical + off:,.0f} instructions: {critical:,.0f} between a "
      f"wake-up and the write it leads to, {off:,.0f} after a write.")
EOF
done
