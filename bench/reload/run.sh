#!/usr/bin/env bash
# Reload under load (README "Reload under load"): wrk keeps one gateway worker busy
# while the policy is rewritten and reloaded RELOADS times through POST /reload, with
# the access log on. Reports the reloads that succeeded, the generation reached, and
# every request that failed (wrk's socket errors and non-2xx answers). Loopback only;
# everything it starts is stopped when it ends. Needs a release build and wrk.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:-target/release}
RELOADS=${RELOADS:-100}
PORT=29480 ADMIN_PORT=29481 UPSTREAM=29490

source bench/lib.sh

write_policy() {
  sed -e "s/{{PORT}}/$PORT/; s/{{ADMIN_PORT}}/$ADMIN_PORT/; s/{{UPSTREAM}}/$UPSTREAM/" \
      -e "s/{{REVISION}}/$1/" bench/reload/gateway.yaml > "$RUN/next.yaml"
  mv "$RUN/next.yaml" "$RUN/gateway.yaml"
}

write_policy 0
"$BIN/tollgate-upstream" --listen "127.0.0.1:$UPSTREAM" > "$RUN/upstream.log" 2>&1 &
pids+=($!)
start_gateway "$BIN" "$RUN/gateway.yaml" "$RUN/access.log" "$ADMIN_PORT"

duration=$(( RELOADS / 2 + 10 ))
wrk -t1 -c64 -d${duration}s "http://127.0.0.1:$PORT/api/predict" > "$RUN/wrk.out" 2>&1 &
load=$!
sleep 3
ok=0
for revision in $(seq 1 "$RELOADS"); do
  write_policy "$revision"
  if curl -sf -X POST "http://127.0.0.1:$ADMIN_PORT/reload" > /dev/null; then
    ok=$(( ok + 1 ))
  fi
  sleep 0.4
done
wait "$load"
status=$(curl -sf "http://127.0.0.1:$ADMIN_PORT/status")
generation=$(echo "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
dropped=$(echo "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_log"]["dropped"])')
# A clean stop writes the last lines; then every request must have one.
kill -TERM "$gateway"
wait "$gateway" || true
cat "$RUN/wrk.out"
requests=$(awk '/requests in/ { print $1 }' "$RUN/wrk.out")
non2xx=$(awk '/Non-2xx/ { print $NF }' "$RUN/wrk.out")
socket=$(awk -F'[ ,]+' '/Socket errors/ { print $4 + $6 + $8 + $10 }' "$RUN/wrk.out")
lines=$(grep -c '"type":"access"' "$RUN/access.log" || true)
echo "reloads: $ok of $RELOADS accepted, generation $generation"
echo "requests: $requests, non-2xx: ${non2xx:-0}, socket errors: ${socket:-0}"
echo "access log: $lines lines, $dropped dropped"
