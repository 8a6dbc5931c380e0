#!/usr/bin/env bash
# Soak (README "Soak"): 10,000,000 distinct client addresses, then 1,000,000 distinct
# cacheable URLs, through one gateway worker, sampling its resident memory every
# second. The per-IP buckets are bounded by rate_limiting.max_keys and the cache by
# cache.max_size / max_entries: RSS must level off at those bounds plus a fixed
# overhead, and stay there. Loopback only; everything it starts is stopped when it
# ends. Needs a release build (`cargo build --release`) and wrk (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BIN:-target/release}
IPS=${IPS:-10000000}
URLS=${URLS:-1000000}
MAX_KEYS=${MAX_KEYS:-100000}
CACHE_SIZE=${CACHE_SIZE:-64MiB}
CACHE_ENTRIES=${CACHE_ENTRIES:-100000}
CHUNK=${CHUNK:-20}               # seconds per wrk run; addresses continue across runs
THREADS=2 CONNECTIONS=64
RESULTS=${RESULTS:-bench/soak/results.tsv}
PORT=29380 ADMIN_PORT=29381 UPSTREAM=29390

source bench/lib.sh

sed -e "s/{{PORT}}/$PORT/; s/{{ADMIN_PORT}}/$ADMIN_PORT/; s/{{UPSTREAM}}/$UPSTREAM/" \
    -e "s/{{MAX_KEYS}}/$MAX_KEYS/; s/{{CACHE_SIZE}}/$CACHE_SIZE/" \
    -e "s/{{CACHE_ENTRIES}}/$CACHE_ENTRIES/" bench/soak/gateway.yaml > "$RUN/gateway.yaml"
"$BIN/tollgate-upstream" --listen "127.0.0.1:$UPSTREAM" > "$RUN/upstream.log" 2>&1 &
pids+=($!)
start_gateway "$BIN" "$RUN/gateway.yaml" "$RUN/gateway.log" "$ADMIN_PORT"

echo -e "seconds\tphase\trss_kib\tratelimit_keys\tcache_entries\tcache_bytes" > "$RESULTS"
cat > "$RUN/sample.py" <<'PY'
import json, sys
seconds, phase, rss, status = sys.argv[1:5]
s = json.loads(status or "{}")
keys = s.get("rate_limits", {}).get("per-ip", {}).get("keys", "")
cache = s.get("cache", {})
print("\t".join(str(v) for v in (seconds, phase, rss, keys, cache.get("entries", ""), cache.get("bytes", ""))))
PY
sample() {
  local rss status
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$gateway/status")
  status=$(curl -sf "http://127.0.0.1:$ADMIN_PORT/status" || echo '{}')
  python3 "$RUN/sample.py" "$SECONDS" "$(cat "$RUN/phase")" "$rss" "$status" >> "$RESULTS"
}
echo start > "$RUN/phase"
SECONDS=0
( while kill -0 "$gateway" 2>/dev/null; do sample; sleep 1; done ) &
pids+=($!)

# drive MODE TOTAL: wrk runs of CHUNK seconds until TOTAL distinct requests were sent.
drive() {
  local mode=$1 total=$2 sent=0 done_now
  while [ "$sent" -lt "$total" ]; do
    wrk -t$THREADS -c$CONNECTIONS -d${CHUNK}s -s bench/soak/distinct.lua \
      "http://127.0.0.1:$PORT" -- "$mode" $THREADS "$sent" > "$RUN/wrk.out" 2>&1
    done_now=$(awk '/requests in/ { print $1 }' "$RUN/wrk.out")
    # Requests still in flight when wrk stopped were generated too: skip past them.
    sent=$(( sent + done_now + CONNECTIONS ))
    echo "$mode: $sent of $total" >&2
  done
}

echo distinct-ips > "$RUN/phase"
drive ips "$IPS"
echo distinct-urls > "$RUN/phase"
drive urls "$URLS"
echo idle > "$RUN/phase"
sleep 30
echo "samples in $RESULTS" >&2
