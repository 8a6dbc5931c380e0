#!/usr/bin/env bash
# A profile-guided build of tollgate (README, "Profile-guided build"): an instrumented
# build serves the benchmark workloads on loopback (plain proxy, the reference rate-limit
# rules, 1 KiB cache hits: bench/gateway*.yaml), then the release build is optimised
# with the profile those runs wrote.
#
#   bash bench/pgo/build.sh            # -> target/pgo/tollgate
#
# OUT (default target/pgo) holds both builds, the profile (tollgate.profdata) and the
# binary; SECONDS_PER_WORKLOAD (default 5) is each workload's wrk run. Needs
# llvm-profdata from rustc's own LLVM (`rustup component add llvm-tools`), wrk, curl,
# and nginx for the origin (without it, tollgate-upstream is built and serves).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/target/pgo}
SECONDS_PER_WORKLOAD=${SECONDS_PER_WORKLOAD:-5}
ORIGIN_PORT=29280 PROXY_PORT=29281 AUX_PORT=29282
source bench/lib.sh

host=$(rustc -vV | awk '/^host:/ {print $2}')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || { echo "no $profdata: rustup component add llvm-tools" >&2; exit 1; }
rm -rf "$OUT/profraw"
mkdir -p "$OUT"

# --target keeps the flags off build scripts and proc macros: only what runs is profiled.
build() { # build DIR RUSTFLAGS
  RUSTFLAGS="$2" cargo build --release --locked --bin tollgate --target "$host" --target-dir "$OUT/$1"
}
build instrumented "-Cprofile-generate=$OUT/profraw"

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
  # Rate-limit placeholders as the peer harness fills them: evaluated, never denying.
  sed -e "s/{{LISTEN}}/127.0.0.1:$PROXY_PORT/; s/{{AUX_PORT}}/$AUX_PORT/; s/{{ORIGIN}}/127.0.0.1:$ORIGIN_PORT/" \
    -e "s/{{RL_RATE}}/1000000000/g; s/{{RL_BURST}}/1000000000/g" "$policy" > "$RUN/gateway.yaml"
  "$OUT/instrumented/$host/release/tollgate" run -c "$RUN/gateway.yaml" > "$RUN/tollgate.log" 2>&1 &
  target=$!
  pids+=($target)
  wait_port $PROXY_PORT $path
  wrk -t1 -c64 -d"${SECONDS_PER_WORKLOAD}s" "http://127.0.0.1:$PROXY_PORT$path" | grep 'Requests/sec' \
    | sed "s|^|$policy: |"
  # The profile is written when the process exits cleanly.
  stop
done

"$profdata" merge -o "$OUT/tollgate.profdata" "$OUT/profraw"
build optimised "-Cprofile-use=$OUT/tollgate.profdata"
cp "$OUT/optimised/$host/release/tollgate" "$OUT/tollgate"
echo "$OUT/tollgate"
