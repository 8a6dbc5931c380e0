#!/usr/bin/env bash
# The profile the release build is optimised with (README, "Profile-guided build"): an
# instrumented build of tollgate serves the benchmark workloads on loopback (plain proxy,
# the reference rate-limit rules, 1 KiB cache hits: bench/gateway*.yaml; and the plain
# proxy again with the access log on, to a file, as production runs it), and what those
# runs counted is merged into pgo/tollgate.profdata, the profile the Dockerfile and
# .ci/delivery build with (pgo/release.sh), and what it was recorded with into
# pgo/tollgate.stamp. Refresh and commit both when the request path, Cargo.lock or the
# Rust toolchain changes:
#
#   bash pgo/profile.sh
#
# OUT (default target/pgo) holds the instrumented build and the raw profiles;
# REQUESTS_PER_WORKLOAD (default 50000) is how many responses each workload's wrk run
# waits for (pgo/requests.lua), within SECONDS_PER_WORKLOAD (default 10). A count, not a
# duration: what a profile weighs is the request path against start-up (loading the CA
# roots, compiling the policy), and a run of fixed length on a host twice as fast
# recorded twice the requests, which moved the inliner's choices. With two CPUs or more
# the processes are placed as bench/instruments places them (origin and wrk on CPU 0,
# tollgate alone on CPU 1). Needs llvm-profdata from
# rustc's own LLVM (`rustup component add llvm-tools`), wrk, curl, and nginx for the
# origin (without it, tollgate-upstream is built and serves).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/pgo}
REQUESTS_PER_WORKLOAD=${REQUESTS_PER_WORKLOAD:-50000}
SECONDS_PER_WORKLOAD=${SECONDS_PER_WORKLOAD:-10}
ORIGIN_PORT=29280 PROXY_PORT=29281 AUX_PORT=29282
source bench/lib.sh
source pgo/stamp.sh

# Prefixes, not a function: a function run in the background would be a subshell, and
# the PID `stop` signals must be tollgate's own (its profile is written on a clean exit).
cpu0=() cpu1=()
if [ "$(nproc)" -ge 2 ]; then cpu0=(taskset -c 0) cpu1=(taskset -c 1); fi

host=$(pgo_host)
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "no $profdata: rustup component add llvm-tools" >&2; exit 1; }
rm -rf "$OUT/profraw"
mkdir -p "$OUT"

# --target keeps the flags off build scripts and proc macros, as in the release build
# that reads the profile (Dockerfile): only what runs is profiled, and under the same
# crate hashes.
RUSTFLAGS="-Cprofile-generate=$OUT/profraw" cargo build --release --locked --bin tollgate \
  --target "$host" --target-dir "$OUT/instrumented"

if command -v nginx >/dev/null; then
  "${cpu0[@]}" nginx -c "$(nginx_conf origin)" &
  pids+=($!)
  path=/json
else
  cargo build --release --locked -p tollgate-upstreams --bin tollgate-upstream
  "${cpu0[@]}" target/release/tollgate-upstream --listen "127.0.0.1:$ORIGIN_PORT" >/dev/null 2>&1 &
  pids+=($!)
  path=/health
fi
wait_port $ORIGIN_PORT $path

export TOLLGATE_RUN_DIR=$RUN
for workload in gateway gateway-ratelimit gateway-cache gateway+log; do
  policy=bench/${workload%+log}.yaml
  edits=()
  if [ "$workload" != "${workload%+log}" ]; then edits=("${access_log_on[@]}"); fi
  "${cpu1[@]}" "$OUT/instrumented/$host/release/tollgate" run -c "$(gateway_policy "$policy" "${edits[@]}")" > "$RUN/tollgate.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT $path
  REQUESTS=$REQUESTS_PER_WORKLOAD "${cpu0[@]}" wrk -t1 -c64 -d"${SECONDS_PER_WORKLOAD}s" \
    -s pgo/requests.lua "http://127.0.0.1:$PROXY_PORT$path" > "$RUN/wrk.out"
  served=$(awk '/requests in/ {print $1}' "$RUN/wrk.out")
  echo "$workload: $served requests"
  if [ "$served" -lt "$REQUESTS_PER_WORKLOAD" ]; then
    echo "only $served of $REQUESTS_PER_WORKLOAD requests in ${SECONDS_PER_WORKLOAD}s: raise SECONDS_PER_WORKLOAD" >&2
    exit 1
  fi
  # The profile is written when the process exits cleanly.
  stop
done

# Sparse: functions the workloads never ran are left out rather than recorded as never
# run, so they are compiled as without a profile, and the file stays small enough to commit.
"$profdata" merge --sparse -o pgo/tollgate.profdata "$OUT/profraw"
pgo_stamp > pgo/tollgate.stamp
echo "pgo/tollgate.profdata, recorded with:"
cat pgo/tollgate.stamp
