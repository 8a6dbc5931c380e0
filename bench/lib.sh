# Sourced by the bench scripts: a scratch directory, the processes a script starts
# (all stopped when it exits, by PID), and waiting for the gateway's admin API.

RUN=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT

# start_gateway BIN POLICY LOG ADMIN_PORT: runs the gateway, remembers its PID in
# $gateway, and returns once its admin API answers PATH (default /healthz).
start_gateway() {
  local bin=$1 policy=$2 log=$3 admin_port=$4 path=${5:-/healthz}
  TOLLGATE_RUN_DIR="$RUN" "$bin/tollgate" run -c "$policy" > "$log" 2>&1 &
  gateway=$!
  pids+=($gateway)
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$admin_port$path" >/dev/null 2>&1 && return
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$admin_port$path" >/dev/null
}
