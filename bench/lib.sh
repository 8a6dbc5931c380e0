# Sourced by the bench scripts: a scratch directory, the processes a script starts
# (all stopped when it exits, by PID), waiting for a port or the gateway's admin API,
# and the policies and nginx configurations they run.

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

# wait_port PORT PATH: returns once 127.0.0.1:PORT answers PATH with a 2xx.
wait_port() {
  for _ in $(seq 300); do
    curl -fs -o /dev/null "http://127.0.0.1:$1$2" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  return 1
}

# gateway_policy TEMPLATE [SED_ARGS...]: tollgate's peer-harness template (bench/gateway*.yaml)
# filled for this script's ports, the rate-limit rules at the harness's never-denying rate
# (evaluated on every request, never denying), SED_ARGS applied too; prints its path.
gateway_policy() {
  local template=$1 out
  shift
  out=$(mktemp "$RUN/gateway-XXXX.yaml")
  sed -e "s/{{LISTEN}}/127.0.0.1:$PROXY_PORT/; s/{{AUX_PORT}}/$AUX_PORT/; s/{{ORIGIN}}/127.0.0.1:$ORIGIN_PORT/" \
    -e "s/{{RL_RATE}}/1000000000/g; s/{{RL_BURST}}/1000000000/g" "$@" "$template" > "$out"
  echo "$out"
}

# SED_ARGS for gateway_policy that turn a template's access log on, to a file in $RUN:
# the configuration production runs.
access_log_on=(-e "s#^  enabled: false#  enabled: true\n  path: $RUN/access.log#")

# nginx_conf ROLE [WORKERS]: an nginx configuration (one worker unless WORKERS, access log
# off, keep-alive without end) for the origin on $ORIGIN_PORT (100-byte JSON) or a proxy to
# it on $PROXY_PORT: `proxy`, as the peer harness runs it, or `proxy-headers`, which also
# does the header work every tollgate request does (X-Forwarded-For/-Proto/-Host and a
# request id, sent upstream and back; tollgate's trace context has no counterpart in
# stock nginx). More than one worker takes a master process, which stays in the
# foreground.
nginx_conf() {
  local role=$1 workers=${2:-1}
  local dir=$RUN/nginx-$role-$workers
  local master=off
  if [ "$workers" -gt 1 ]; then master=on; fi
  mkdir -p "$dir/logs"
  local server
  if [ "$role" = origin ]; then
    server="listen 127.0.0.1:$ORIGIN_PORT; keepalive_requests 1000000000;
      location / { default_type application/json;
        return 200 '{\"id\":1,\"name\":\"bench\",\"tags\":[\"a\",\"b\"],\"ok\":true,\"padding\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}'; }"
  else
    local headers=
    if [ "$role" = proxy-headers ]; then
      headers="proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme; proxy_set_header X-Forwarded-Host \$http_host;
        proxy_set_header X-Request-Id \$request_id; add_header X-Request-Id \$request_id;"
    fi
    server="listen 127.0.0.1:$PROXY_PORT; keepalive_requests 1000000000;
      location / { proxy_pass http://origin; proxy_http_version 1.1;
        proxy_set_header Connection \"\"; $headers }"
  fi
  cat > "$dir/nginx.conf" <<EOF
daemon off; master_process $master; worker_processes $workers; error_log $dir/logs/error.log; pid $dir/nginx.pid;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir;
  uwsgi_temp_path $dir; scgi_temp_path $dir;
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 128; }
  server { $server } }
EOF
  echo "$dir/nginx.conf"
}

# start_origin: the nginx origin on CPU 0 ($ORIGIN_PORT, 100-byte JSON at /json), stopped
# with the script; returns once it answers.
start_origin() {
  taskset -c 0 nginx -c "$(nginx_conf origin)" &
  pids+=($!)
  wait_port "$ORIGIN_PORT" /json
}

# stop: stops the process in $target (if any) with SIGTERM, SIGKILL after 30 s.
stop() {
  [ -n "$target" ] || return 0
  kill -TERM "$target" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$target" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$target" 2>/dev/null || true
  { wait "$target"; } 2>/dev/null || true
}

# find_oha: sets OHA (unless set: oha on PATH, else cargo's bin directory) and exits if
# there is none.
find_oha() {
  OHA=${OHA:-$(command -v oha || echo "$HOME/.cargo/bin/oha")}
  [ -x "$OHA" ] || { echo "needs oha: cargo install oha" >&2; exit 1; }
}
