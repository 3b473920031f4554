#!/usr/bin/env bash
# The five CityTap gRPC services of one stack, as local processes.
#
#   infra/services.sh up       start the services that are not running, wait until SERVING
#   infra/services.sh down     stop them (SIGTERM, then SIGKILL after 15 s)
#   infra/services.sh status   one line per service with its health (always exits 0)
#
# Each service runs as `$CITYTAP_PYTHON -m services.<name>` from the repo root, with the
# environment of infra/env.sh plus CITYTAP_LISTEN_ADDRESS=127.0.0.1:<its port>. Health is
# `$CITYTAP_PYTHON -m libs.grpc_health_probe --address ADDR --timeout-s 1` (exit 0 = SERVING).
# The backing components (infra/components.sh up) are not started here.
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=env.sh
source "$INFRA_DIR/env.sh"
# shellcheck source=lib.sh
source "$INFRA_DIR/lib.sh"

SERVICES=(fare_gate wallet face merchant settlement)
STATE="$CITYTAP_STATE_DIR"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/logs"
START_TIMEOUT_S="${CITYTAP_SERVICE_START_TIMEOUT_S:-30}"
STOP_TIMEOUT_S=15

svc_port() {
  local var="CITYTAP_${1^^}_PORT"
  printf '%s' "${!var}"
}
svc_addr() { printf '127.0.0.1:%s' "$(svc_port "$1")"; }
svc_pidfile() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }
svc_log() { printf '%s/%s.log' "$LOG_DIR" "$1"; }
svc_sig() { printf -- '-m services.%s ' "$1"; }
svc_env() { printf 'CITYTAP_LISTEN_ADDRESS=%s' "$(svc_addr "$1")"; }

svc_pid() {
  running_pid "$(svc_pidfile "$1")" "$(svc_sig "$1")" "$(svc_env "$1")"
}

svc_healthy() {
  (cd "$CITYTAP_ROOT" && "$CITYTAP_PYTHON" -m libs.grpc_health_probe \
    --address "$(svc_addr "$1")" --timeout-s 1) >/dev/null 2>&1
}

need_python() {
  [[ -x "$CITYTAP_PYTHON" ]] ||
    die "CITYTAP_PYTHON=$CITYTAP_PYTHON is not an executable Python; create the project's virtualenv first (or set CITYTAP_PYTHON)"
}

take_lock() {
  mkdir -p "$STATE"
  exec 8>"$STATE/.services.lock"
  flock -w 120 8 || die "another infra/services.sh is working on $STATE (lock $STATE/.services.lock)"
}

cmd_up() {
  need_python
  take_lock
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  local t0 name pid started=()
  t0="$(now_ms)"
  log "services up: stack '$CITYTAP_STACK', python $CITYTAP_PYTHON"
  local ports=()
  for name in "${SERVICES[@]}"; do ports+=("$(svc_port "$name")"); done
  reserve_ports "${ports[@]}" "$CITYTAP_WALLET_WEBHOOK_PORT" "$CITYTAP_MERCHANT_WEBHOOK_PORT"
  for name in "${SERVICES[@]}"; do
    pid="$(svc_pid "$name")"
    if [[ -n "$pid" ]]; then
      log "$name already running (pid $pid) on $(svc_addr "$name")"
      continue
    fi
    port_free "$name" "$(svc_port "$name")"
    log "$name: starting on $(svc_addr "$name"), log $(svc_log "$name")"
    (
      cd "$CITYTAP_ROOT"
      export CITYTAP_LISTEN_ADDRESS
      CITYTAP_LISTEN_ADDRESS="$(svc_addr "$name")"
      export PYTHONUNBUFFERED=1
      start_bg "$(svc_pidfile "$name")" "$(svc_log "$name")" "$CITYTAP_PYTHON" -m "services.$name"
    )
    started+=("$name")
  done
  for name in "${SERVICES[@]}"; do
    WAIT_LOG_LINES=20 wait_ready "$name" "$(svc_pidfile "$name")" "$START_TIMEOUT_S" "$(svc_log "$name")" \
      svc_healthy "$name"
  done
  log "services up: all SERVING in $(fmt_secs $(($(now_ms) - t0))) s"
}

cmd_down() {
  if [[ ! -d "$STATE" ]]; then
    log "services down: nothing to stop (no $STATE)"
    return 0
  fi
  take_lock
  local name pid pids=()
  for name in "${SERVICES[@]}"; do
    pid="$(svc_pid "$name")"
    pids+=("$pid")
    if [[ -n "$pid" ]]; then
      log "$name: stopping (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  local i
  for i in "${!SERVICES[@]}"; do
    name="${SERVICES[$i]}"
    pid="${pids[$i]}"
    [[ -n "$pid" ]] && stop_pid "$name" "$pid" "$STOP_TIMEOUT_S" "$(svc_log "$name")"
    rm -f "$(svc_pidfile "$name")"
  done
  log "services down: stopped"
}

cmd_status() {
  local name pid state health
  printf '%-12s %-18s %-16s %s\n' SERVICE ADDRESS STATE HEALTH
  for name in "${SERVICES[@]}"; do
    pid="$(svc_pid "$name")"
    state=down
    [[ -n "$pid" ]] && state="up (pid $pid)"
    if [[ ! -x "$CITYTAP_PYTHON" ]]; then
      health="unknown (no $CITYTAP_PYTHON)"
    elif svc_healthy "$name"; then
      health=SERVING
    else
      health="not serving"
    fi
    printf '%-12s %-18s %-16s %s\n' "$name" "$(svc_addr "$name")" "$state" "$health"
  done
  return 0
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down|status   (stack from CITYTAP_STACK=dev|test, see infra/env.sh)" >&2
    exit 2
    ;;
esac
