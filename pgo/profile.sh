#!/usr/bin/env bash
# The profile the release build is optimised with (README, "Profile-guided build"): an
# instrumented build of tollgate serves the benchmark workloads on loopback (plain proxy,
# the reference rate-limit rules, 1 KiB cache hits: bench/gateway*.yaml), and what those
# runs counted is merged into pgo/tollgate.profdata, the profile the Dockerfile and
# .ci/delivery build with (pgo/release.sh), and what it was recorded with into
# pgo/tollgate.stamp. Refresh and commit both when the request path, Cargo.lock or the
# Rust toolchain changes:
#
#   bash pgo/profile.sh
#
# OUT (default target/pgo) holds the instrumented build and the raw profiles;
# SECONDS_PER_WORKLOAD (default 5) is each workload's wrk run. Needs llvm-profdata from
# rustc's own LLVM (`rustup component add llvm-tools`), wrk, curl, and nginx for the
# origin (without it, tollgate-upstream is built and serves).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/pgo}
SECONDS_PER_WORKLOAD=${SECONDS_PER_WORKLOAD:-5}
ORIGIN_PORT=29280 PROXY_PORT=29281 AUX_PORT=29282
source bench/lib.sh
source pgo/stamp.sh

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
  nginx -c "$(nginx_conf origin)" &
  pids+=($!)
  path=/json
else
  cargo build --release --locked -p tollgate-upstreams --bin tollgate-upstream
  target/release/tollgate-upstream --listen "127.0.0.1:$ORIGIN_PORT" >/dev/null 2>&1 &
  pids+=($!)
  path=/health
fi
wait_port $ORIGIN_PORT $path

export TOLLGATE_RUN_DIR=$RUN
for policy in bench/gateway.yaml bench/gateway-ratelimit.yaml bench/gateway-cache.yaml; do
  "$OUT/instrumented/$host/release/tollgate" run -c "$(gateway_policy "$policy")" > "$RUN/tollgate.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT $path
  wrk -t1 -c64 -d"${SECONDS_PER_WORKLOAD}s" "http://127.0.0.1:$PROXY_PORT$path" | grep 'Requests/sec' \
    | sed "s|^|$policy: |"
  # The profile is written when the process exits cleanly.
  stop
done

# Sparse: functions the workloads never ran are left out rather than recorded as never
# run, so they are compiled as without a profile, and the file stays small enough to commit.
"$profdata" merge --sparse -o pgo/tollgate.profdata "$OUT/profraw"
pgo_stamp > pgo/tollgate.stamp
echo "pgo/tollgate.profdata, recorded with:"
cat pgo/tollgate.stamp
