#!/usr/bin/env bash
# The backing components of one CityTap stack, as native processes:
#   Kafka (KRaft, single node), PostgreSQL 15, Redis, stripe-mock.
#
#   infra/components.sh up       provision, start what is not running, wait until ready
#   infra/components.sh down     stop everything this stack started
#   infra/components.sh status   one line per component (always exits 0)
#   infra/components.sh reset    down, then delete $CITYTAP_STATE_DIR (keeps the cache)
#
# Which stack (ports, state dir) comes from infra/env.sh: CITYTAP_STACK=test selects the
# test stack, which can run next to the dev stack.
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=env.sh
source "$INFRA_DIR/env.sh"
# shellcheck source=lib.sh
source "$INFRA_DIR/lib.sh"

STATE="$CITYTAP_STATE_DIR"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/logs"

KAFKA_TIMEOUT_S=90
PG_TIMEOUT_S=60
REDIS_TIMEOUT_S=30
STRIPE_TIMEOUT_S=30
STOP_TIMEOUT_S=20

KAFKA_LIBS="$CITYTAP_CACHE_DIR/kafka/libs"
KAFKA_DIR="$STATE/kafka"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_LOG="$LOG_DIR/kafka.log"
KAFKA_PID="$RUN_DIR/kafka.pid"
KAFKA_SIG="kafka.Kafka $KAFKA_PROPS "

PGDATA="$STATE/postgres"
PG_LOG="$LOG_DIR/postgres.log"
PG_PID="$RUN_DIR/postgres.pid"
PG_SIG="-D $PGDATA "

REDIS_DIR="$STATE/redis"
REDIS_LOG="$LOG_DIR/redis.log"
REDIS_PID="$RUN_DIR/redis.pid"
# Redis rewrites its process title to "<argv0> <bind>:<port>".
REDIS_SIG="redis-server 127.0.0.1:$CITYTAP_REDIS_PORT"

STRIPE_BIN="$CITYTAP_CACHE_DIR/bin/stripe-mock"
STRIPE_LOG="$LOG_DIR/stripe-mock.log"
STRIPE_PID="$RUN_DIR/stripe-mock.pid"
STRIPE_SIG="stripe-mock -http-addr 127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT "

SYS_PYTHON="$(command -v /usr/bin/python3 || command -v python3 || true)"

is_root() { [[ "$(id -u)" == 0 ]]; }

# as_pg CMD...: run as the PostgreSQL server's owner (postgres when we are root).
as_pg() {
  if is_root; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------
# Kafka (KRaft combined broker+controller, single node)
# ---------------------------------------------------------------------------------------
# JVM flags for the broker and its storage tool: a modest heap, everything shares 2 cores.
KAFKA_JVM=(java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError
  -Djava.awt.headless=true "-Dlog4j2.configurationFile=$INFRA_DIR/kafka/log4j2.properties"
  -cp "$KAFKA_LIBS/*")

kafka_write_config() {
  mkdir -p "$KAFKA_DIR/data"
  cat >"$KAFKA_PROPS" <<EOF
# Written by infra/components.sh on every 'up'; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CITYTAP_KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$CITYTAP_KAFKA_PORT,CONTROLLER://127.0.0.1:$CITYTAP_KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$CITYTAP_KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$KAFKA_DIR/data
num.partitions=3
auto.create.topics.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=168
log.segment.bytes=268435456
EOF
}

kafka_start() {
  local pid
  pid="$(running_pid "$KAFKA_PID" "$KAFKA_SIG")"
  if [[ -n "$pid" ]]; then
    log "kafka already running (pid $pid)"
    return 0
  fi
  port_free kafka "$CITYTAP_KAFKA_PORT"
  port_free kafka-controller "$CITYTAP_KAFKA_CONTROLLER_PORT"
  [[ -d "$KAFKA_LIBS" ]] || die "kafka: classpath $KAFKA_LIBS is missing (run infra/provision.sh)"
  kafka_write_config
  if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
    local cid fmt_log="$LOG_DIR/kafka-format.log"
    if [[ -s "$KAFKA_DIR/cluster.id" ]]; then
      cid="$(cat "$KAFKA_DIR/cluster.id")"
    else
      cid="$(timeout 60 "${KAFKA_JVM[@]}" kafka.tools.StorageTool random-uuid 2>"$fmt_log" | tail -n1)"
      [[ "$cid" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: could not generate a cluster id (got '$cid'; log: $fmt_log)"
      printf '%s\n' "$cid" >"$KAFKA_DIR/cluster.id"
    fi
    log "kafka: formatting storage in $KAFKA_DIR/data (cluster id $cid)"
    if ! timeout 60 "${KAFKA_JVM[@]}" kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" >>"$fmt_log" 2>&1; then
      show_log_tail "$fmt_log"
      die "kafka: storage format failed (log: $fmt_log)"
    fi
  fi
  log "kafka: starting on 127.0.0.1:$CITYTAP_KAFKA_PORT (controller $CITYTAP_KAFKA_CONTROLLER_PORT), log $KAFKA_LOG"
  start_bg "$KAFKA_PID" "$KAFKA_LOG" "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_PROPS"
}

kafka_ready() {
  [[ -n "$SYS_PYTHON" ]] || return 1
  "$SYS_PYTHON" "$INFRA_DIR/kafka/probe.py" "$CITYTAP_KAFKA_PORT" 2
}

# First readiness after a start: the broker logged its startup AND answers requests.
kafka_started_and_ready() {
  grep -q "Kafka Server started" "$KAFKA_LOG" 2>/dev/null && kafka_ready
}

kafka_stop() {
  local pid
  pid="$(running_pid "$KAFKA_PID" "$KAFKA_SIG")"
  if [[ -n "$pid" ]]; then
    stop_pid kafka "$pid" "$STOP_TIMEOUT_S" "$KAFKA_LOG"
  fi
  rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------------------------------
# PostgreSQL 15
# ---------------------------------------------------------------------------------------

# The server runs as 'postgres' when we are root: it must be able to reach its data dir
# and its log file, so every directory above them must be traversable by it. Grant o+x
# (search only, no listing) where missing.
pg_ensure_traversable() {
  is_root || return 0
  local target
  for target in "$STATE" "$LOG_DIR"; do
    runuser -u postgres -- test -x "$target" 2>/dev/null && continue
    local d="$target" dirs=()
    while [[ "$d" != "/" && -n "$d" ]]; do
      dirs=("$d" "${dirs[@]}")
      d="$(dirname "$d")"
    done
    for d in "${dirs[@]}"; do
      if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
        log "postgres: granting o+x on $d so the 'postgres' user can reach its files"
        chmod o+x "$d"
      fi
    done
    runuser -u postgres -- test -x "$target" ||
      die "postgres: user 'postgres' still cannot reach $target; set CITYTAP_STATE_DIR to a path it can reach"
  done
}

pg_running_pid() {
  local pid=""
  if [[ -f "$PGDATA/postmaster.pid" ]]; then
    pid="$(head -n1 "$PGDATA/postmaster.pid" 2>/dev/null || true)"
  fi
  if [[ -n "$pid" ]] && alive "$pid" "$PG_SIG"; then
    printf '%s' "$pid"
    return 0
  fi
  pid="$(find_pids "$PG_SIG" | head -n1)"
  printf '%s' "$pid"
}

# After a crash (or SIGKILL) postmaster.pid stays behind. PostgreSQL itself ignores it once
# that pid is gone, but refuses to start while the pid still exists: as an unreaped zombie
# (briefly, after a kill) or recycled by an unrelated process.
pg_clear_stale_lock() {
  local lockf="$PGDATA/postmaster.pid" old _
  [[ -f "$lockf" ]] || return 0
  old="$(head -n1 "$lockf" 2>/dev/null || true)"
  [[ "$old" =~ ^[0-9]+$ ]] || return 0
  for _ in $(seq 1 50); do
    [[ -d "/proc/$old" ]] || return 0
    alive "$old" || { sleep 0.2; continue; } # zombie: wait for it to be reaped
    break
  done
  if [[ -d "/proc/$old" ]]; then
    if alive "$old" "$PG_SIG"; then
      die "postgres: a server (pid $old) is running in $PGDATA but not answering as expected; see $PG_LOG"
    fi
    if alive "$old"; then
      log "postgres: removing stale postmaster.pid (pid $old now belongs to another program)"
      rm -f "$lockf"
    else
      warn "postgres: previous server (pid $old) is still not reaped after 10s; starting anyway"
    fi
  fi
  return 0
}

pg_write_config() {
  # Unix socket inside the data dir, unless its path would exceed the 107-byte limit.
  local sockdir="$PGDATA"
  local sockpath="$PGDATA/.s.PGSQL.$CITYTAP_PG_PORT"
  if ((${#sockpath} > 100)); then
    warn "postgres: data dir path too long for a unix socket; TCP only"
    sockdir=""
  fi
  local conf="$PGDATA/citytap.conf"
  cat >"$conf" <<EOF
# Written by infra/components.sh on every 'up'; edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $CITYTAP_PG_PORT
unix_socket_directories = '$sockdir'
max_connections = 200
shared_buffers = 128MB
fsync = on
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  is_root && chown postgres:postgres "$conf"
  return 0
}

pg_start() {
  local pid
  pid="$(pg_running_pid)"
  if [[ -n "$pid" ]]; then
    log "postgres already running (pid $pid)"
    printf '%s\n' "$pid" >"$PG_PID"
    return 0
  fi
  port_free postgres "$CITYTAP_PG_PORT"
  [[ -x "$CITYTAP_PG_BIN/postgres" ]] || die "postgres: $CITYTAP_PG_BIN/postgres missing (run infra/provision.sh)"
  if is_root && ! getent passwd postgres >/dev/null; then
    die "postgres: running as root needs the 'postgres' user (created by Debian's postgresql package)"
  fi
  pg_ensure_traversable
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    local init_log="$LOG_DIR/postgres-initdb.log"
    log "postgres: initdb in $PGDATA"
    rm -rf "$PGDATA"
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    is_root && chown postgres:postgres "$PGDATA"
    if ! as_pg timeout 120 "$CITYTAP_PG_BIN/initdb" -D "$PGDATA" --auth=trust -U postgres \
      --encoding=UTF8 --locale=C >"$init_log" 2>&1; then
      show_log_tail "$init_log"
      die "postgres: initdb failed (log: $init_log)"
    fi
    printf "\n# CityTap local settings (port, listen address, ...)\ninclude 'citytap.conf'\n" |
      as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
  fi
  pg_clear_stale_lock
  pg_write_config
  rotate_log "$PG_LOG"
  is_root && chown postgres:postgres "$PG_LOG"
  log "postgres: starting on 127.0.0.1:$CITYTAP_PG_PORT, log $PG_LOG"
  # pg_ctl -w returns as soon as the server accepts connections, or at once if it exits.
  # After a crash, the old server's children can hold its shared memory for a moment and
  # the new server refuses to start: retry a few times in that case.
  # 8>&-: the postmaster must not inherit the stack lock's descriptor.
  local attempt
  for attempt in 1 2 3 4 5; do
    if as_pg "$CITYTAP_PG_BIN/pg_ctl" start -w -t "$PG_TIMEOUT_S" -D "$PGDATA" -l "$PG_LOG" -s \
      >/dev/null 2>&1 8>&-; then
      break
    fi
    if ((attempt < 5)) && grep -qE 'already exists|still in use' "$PG_LOG" 2>/dev/null; then
      log "postgres: previous server's resources not yet released; retrying in 1 s"
      sleep 1
      continue
    fi
    show_log_tail "$PG_LOG"
    die "postgres: pg_ctl start failed or timed out after ${PG_TIMEOUT_S}s (log: $PG_LOG)"
  done
  pid="$(pg_running_pid)"
  [[ -n "$pid" ]] || {
    show_log_tail "$PG_LOG"
    die "postgres: server started but its process was not found (log: $PG_LOG)"
  }
  printf '%s\n' "$pid" >"$PG_PID"
}

pg_ready() {
  "$CITYTAP_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$CITYTAP_PG_PORT" -U postgres -d postgres -t 1
}

pg_psql() {
  "$CITYTAP_PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$CITYTAP_PG_PORT" -U postgres -d postgres -tA "$@"
}

pg_bootstrap() {
  if [[ "$(pg_psql -c "SELECT 1 FROM pg_roles WHERE rolname = 'citytap'")" != 1 ]]; then
    log "postgres: creating role citytap"
    pg_psql -c "CREATE ROLE citytap LOGIN SUPERUSER" >/dev/null
  fi
  if [[ "$(pg_psql -c "SELECT 1 FROM pg_database WHERE datname = 'citytap'")" != 1 ]]; then
    log "postgres: creating database citytap"
    pg_psql -c "CREATE DATABASE citytap OWNER citytap" >/dev/null
  fi
}

pg_stop() {
  local pid
  pid="$(pg_running_pid)"
  if [[ -n "$pid" ]]; then
    log "postgres: stopping (pid $pid)"
    # Remember the server's children (each runs in its own session) to check they are gone.
    local children
    children="$(pgrep -P "$pid" 2>/dev/null || true)"
    if ! as_pg "$CITYTAP_PG_BIN/pg_ctl" stop -D "$PGDATA" -m fast -w -t "$STOP_TIMEOUT_S" -s >/dev/null 2>&1; then
      warn "postgres: pg_ctl stop -m fast did not finish in ${STOP_TIMEOUT_S}s; sending SIGKILL (log: $PG_LOG)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    stop_pid postgres "$pid" 5 "$PG_LOG"
    local c
    for c in $children; do
      alive "$c" "postgres" && stop_pid "postgres child" "$c" 5 "$PG_LOG"
    done
  fi
  rm -f "$PG_PID"
}

# ---------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------
redis_start() {
  local pid
  pid="$(running_pid "$REDIS_PID" "$REDIS_SIG")"
  if [[ -n "$pid" ]]; then
    log "redis already running (pid $pid)"
    return 0
  fi
  port_free redis "$CITYTAP_REDIS_PORT"
  mkdir -p "$REDIS_DIR"
  log "redis: starting on 127.0.0.1:$CITYTAP_REDIS_PORT, log $REDIS_LOG"
  start_bg "$REDIS_PID" "$REDIS_LOG" \
    "$(command -v redis-server)" --port "$CITYTAP_REDIS_PORT" --bind 127.0.0.1 \
    --dir "$REDIS_DIR" --daemonize no --save "" --appendonly no
}

redis_ready() {
  [[ "$(redis-cli -h 127.0.0.1 -p "$CITYTAP_REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

redis_stop() {
  local pid
  pid="$(running_pid "$REDIS_PID" "$REDIS_SIG")"
  if [[ -n "$pid" ]]; then
    stop_pid redis "$pid" "$STOP_TIMEOUT_S" "$REDIS_LOG"
  fi
  rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------------------------------
# stripe-mock
# ---------------------------------------------------------------------------------------
stripe_start() {
  local pid
  pid="$(running_pid "$STRIPE_PID" "$STRIPE_SIG")"
  if [[ -n "$pid" ]]; then
    log "stripe-mock already running (pid $pid)"
    return 0
  fi
  port_free stripe-mock "$CITYTAP_STRIPE_MOCK_PORT"
  port_free stripe-mock-https "$CITYTAP_STRIPE_MOCK_HTTPS_PORT"
  [[ -x "$STRIPE_BIN" ]] || die "stripe-mock: $STRIPE_BIN missing (run infra/provision.sh)"
  log "stripe-mock: starting on 127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT (https $CITYTAP_STRIPE_MOCK_HTTPS_PORT), log $STRIPE_LOG"
  start_bg "$STRIPE_PID" "$STRIPE_LOG" \
    "$STRIPE_BIN" -http-addr "127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT" \
    -https-addr "127.0.0.1:$CITYTAP_STRIPE_MOCK_HTTPS_PORT"
}

stripe_ready() {
  [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
    -H "Authorization: Bearer $CITYTAP_STRIPE_API_KEY" \
    "http://127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT/v1/customers")" == 200 ]]
}

stripe_stop() {
  local pid
  pid="$(running_pid "$STRIPE_PID" "$STRIPE_SIG")"
  if [[ -n "$pid" ]]; then
    stop_pid stripe-mock "$pid" "$STOP_TIMEOUT_S" "$STRIPE_LOG"
  fi
  rm -f "$STRIPE_PID"
}

# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------
take_stack_lock() {
  mkdir -p "$STATE"
  exec 8>"$STATE/.lock"
  flock -w 180 8 || die "another infra/components.sh is working on $STATE (lock $STATE/.lock held > 180 s)"
}

cmd_up() {
  local t0
  t0="$(now_ms)"
  bash "$INFRA_DIR/provision.sh"
  take_stack_lock
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  trap 'rc=$?; if ((rc != 0)); then warn "up failed; components that did start keep running: see infra/components.sh status, stop with infra/components.sh down"; fi' EXIT
  log "components up: stack '$CITYTAP_STACK', state $STATE"
  # Start everything first, then wait: the slow starts (JVM, initdb) overlap.
  kafka_start
  pg_start
  redis_start
  stripe_start
  wait_ready postgres "$PG_PID" "$PG_TIMEOUT_S" "$PG_LOG" pg_ready
  pg_bootstrap
  wait_ready redis "$REDIS_PID" "$REDIS_TIMEOUT_S" "$REDIS_LOG" redis_ready
  wait_ready stripe-mock "$STRIPE_PID" "$STRIPE_TIMEOUT_S" "$STRIPE_LOG" stripe_ready
  wait_ready kafka "$KAFKA_PID" "$KAFKA_TIMEOUT_S" "$KAFKA_LOG" kafka_started_and_ready
  log "components up: all ready in $(fmt_secs $(($(now_ms) - t0))) s"
}

cmd_down() {
  if [[ ! -d "$STATE" ]]; then
    log "components down: nothing to stop (no $STATE)"
    return 0
  fi
  take_stack_lock
  log "components down: stack '$CITYTAP_STACK', state $STATE"
  # Ask everything to stop at once (PostgreSQL via pg_ctl below), then wait for each.
  local name pid
  for name in kafka redis stripe-mock; do
    case "$name" in
      kafka) pid="$(running_pid "$KAFKA_PID" "$KAFKA_SIG")" ;;
      redis) pid="$(running_pid "$REDIS_PID" "$REDIS_SIG")" ;;
      stripe-mock) pid="$(running_pid "$STRIPE_PID" "$STRIPE_SIG")" ;;
    esac
    if [[ -n "$pid" ]]; then
      log "$name: stopping (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  pg_stop
  stripe_stop
  redis_stop
  kafka_stop
  log "components down: stopped"
}

# status_line NAME ADDRESS PIDFILE-PID READY-CHECK...
status_line() {
  local name="$1" addr="$2" pid="$3"
  shift 3
  local state=down health="not ready"
  [[ -n "$pid" ]] && state="up (pid $pid)"
  if "$@" >/dev/null 2>&1; then
    health=ready
  fi
  printf '%-12s %-34s %-16s %s\n' "$name" "$addr" "$state" "$health"
}

cmd_status() {
  printf '%-12s %-34s %-16s %s\n' COMPONENT ADDRESS STATE HEALTH
  status_line kafka "127.0.0.1:$CITYTAP_KAFKA_PORT (ctl :$CITYTAP_KAFKA_CONTROLLER_PORT)" \
    "$(running_pid "$KAFKA_PID" "$KAFKA_SIG")" kafka_ready
  status_line postgres "127.0.0.1:$CITYTAP_PG_PORT" "$(pg_running_pid)" pg_ready
  status_line redis "127.0.0.1:$CITYTAP_REDIS_PORT" "$(running_pid "$REDIS_PID" "$REDIS_SIG")" redis_ready
  status_line stripe-mock "127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT (https :$CITYTAP_STRIPE_MOCK_HTTPS_PORT)" \
    "$(running_pid "$STRIPE_PID" "$STRIPE_SIG")" stripe_ready
  return 0
}

cmd_reset() {
  case "$STATE" in
    "" | / | "$HOME" | "$CITYTAP_ROOT" | "$CITYTAP_CACHE_DIR" | "$CITYTAP_CACHE_DIR"/*)
      die "reset: refusing to delete CITYTAP_STATE_DIR='$STATE'" ;;
  esac
  if [[ "$CITYTAP_CACHE_DIR/" == "$STATE/"* ]]; then
    die "reset: CITYTAP_CACHE_DIR ($CITYTAP_CACHE_DIR) lies inside CITYTAP_STATE_DIR ($STATE); refusing to delete it"
  fi
  # Services of this stack keep pid files and logs in the state dir: stop them first.
  if [[ -d "$RUN_DIR" ]]; then
    bash "$INFRA_DIR/services.sh" down || warn "reset: services.sh down failed"
  fi
  cmd_down
  log "reset: deleting $STATE"
  rm -rf "$STATE"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  *)
    echo "usage: $0 up|down|status|reset   (stack from CITYTAP_STACK=dev|test, see infra/env.sh)" >&2
    exit 2
    ;;
esac
