# Shared helpers for infra/*.sh. Sourced, never executed. Expects env.sh to be sourced.

log() { printf '[infra] %s\n' "$*"; }
warn() { printf '[infra] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[infra] ERROR: %s\n' "$*" >&2
  exit 1
}

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

# fmt_secs MS: milliseconds as seconds with one decimal.
fmt_secs() {
  local t=$((($1 + 50) / 100))
  printf '%d.%d' $((t / 10)) $((t % 10))
}

# cmdline PID: the process's command line with NULs turned into spaces, plus a trailing
# space ("" if gone). No subprocess: it runs once per process when scanning /proc.
cmdline() {
  local -a args=()
  mapfile -d '' args 2>/dev/null <"/proc/$1/cmdline" || return 0
  ((${#args[@]})) && printf '%s ' "${args[@]}"
  return 0
}

# alive PID [SIGNATURE]: the process exists (not a zombie) and, if given, its command line
# contains SIGNATURE (guards against a recycled pid).
alive() {
  local pid="$1" sig="${2:-}"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -d "/proc/$pid" ]] || return 1
  local st
  st="$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
  [[ -n "$st" && "$st" != Z ]] || return 1
  if [[ -n "$sig" ]]; then
    [[ " $(cmdline "$pid") " == *"$sig"* ]] || return 1
  fi
  return 0
}

# read_pid FILE: prints the pid stored in FILE (first line), or nothing.
read_pid() {
  [[ -f "$1" ]] || return 0
  local p
  p="$(head -n1 "$1" 2>/dev/null || true)"
  [[ "$p" =~ ^[0-9]+$ ]] && printf '%s' "$p"
  return 0
}

# find_pids SIGNATURE [ENVIRON_ENTRY]: pids whose command line contains SIGNATURE (and,
# if given, whose environment contains the exact entry NAME=VALUE). Used to find processes
# of this stack whose pid file was lost.
find_pids() {
  local sig="$1" envent="${2:-}" d pid line
  local -a args
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
    args=()
    mapfile -d '' args 2>/dev/null <"$d/cmdline" || continue
    ((${#args[@]})) || continue
    line=" ${args[*]} "
    [[ "$line" == *"$sig"* ]] || continue
    if [[ -n "$envent" ]]; then
      has_env "$pid" "$envent" || continue
    fi
    alive "$pid" && printf '%s\n' "$pid"
  done
  return 0
}

# stop_pid NAME PID TIMEOUT_S LOGFILE: SIGTERM, wait up to TIMEOUT_S, then SIGKILL.
stop_pid() {
  local name="$1" pid="$2" timeout="$3" logf="${4:-}"
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(($(now_ms) + timeout * 1000))
  while alive "$pid"; do
    if (($(now_ms) >= deadline)); then
      warn "$name (pid $pid) did not stop within ${timeout}s after SIGTERM; sending SIGKILL${logf:+ (log: $logf)}"
      kill -KILL "$pid" 2>/dev/null || true
      local _
      for _ in $(seq 1 50); do
        alive "$pid" || return 0
        sleep 0.1
      done
      die "$name (pid $pid) survived SIGKILL"
    fi
    sleep 0.2
  done
  return 0
}

# rotate_log FILE: keep the previous run's log as FILE.prev and start FILE empty.
rotate_log() {
  if [[ -s "$1" ]]; then
    mv -f "$1" "$1.prev"
  fi
  : >"$1"
}

# tcp_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
tcp_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# show_log_tail FILE [N]: print the last N (20) lines of FILE to stderr.
show_log_tail() {
  local f="$1" n="${2:-20}"
  if [[ -f "$f" ]]; then
    printf '[infra] ---- last %s lines of %s ----\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2 || true
    printf '[infra] ---- end of %s ----\n' "$f" >&2
  fi
}

# has_env PID NAME=VALUE: the process's environment holds exactly that entry.
has_env() {
  tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qxF -- "$2"
}

# running_pid PIDFILE SIGNATURE [ENV_ENTRY]: prints the pid if the pid file names a live
# process whose command line matches (and whose environment holds ENV_ENTRY, if given);
# otherwise scans for a matching process (pid file lost) and repairs the pid file.
running_pid() {
  local pidf="$1" sig="$2" envent="${3:-}" pid
  pid="$(read_pid "$pidf")"
  if [[ -n "$pid" ]] && alive "$pid" "$sig" && { [[ -z "$envent" ]] || has_env "$pid" "$envent"; }; then
    printf '%s' "$pid"
    return 0
  fi
  pid="$(find_pids "$sig" "$envent" | head -n1)"
  if [[ -n "$pid" ]]; then
    mkdir -p "$(dirname "$pidf")"
    printf '%s\n' "$pid" >"$pidf"
    printf '%s' "$pid"
  fi
  return 0
}

# start_bg PIDFILE LOGFILE CMD...: start CMD detached (own session, no stdin, immune to
# hangups), output to LOGFILE (previous run kept as LOGFILE.prev), pid to PIDFILE.
start_bg() {
  local pidf="$1" logf="$2"
  shift 2
  rotate_log "$logf"
  # 8>&-: the stack lock's descriptor must not be inherited by the long-lived process.
  setsid nohup "$@" >>"$logf" 2>&1 </dev/null 8>&- &
  local pid=$!
  printf '%s\n' "$pid" >"$pidf"
}

# port_free NAME PORT: fail clearly when something else already listens on PORT.
port_free() {
  if tcp_open "$2"; then
    die "$1: port 127.0.0.1:$2 is already in use by a process this stack did not start (another stack with the same ports? see 'ss -ltnp | grep :$2'). Pick other ports via infra/env.sh variables."
  fi
}

# reserve_ports PORT...: keep the kernel from handing these ports out as the local end of
# outgoing connections. Linux picks those from net.ipv4.ip_local_port_range (32768-60999 by
# default), which holds the services' gRPC and webhook ports; an outgoing connection that
# happens to take one (a test's, a benchmark's) makes the service's bind fail with "address
# already in use". Reserved ports can still be listened on. Needs root (as on our machines);
# without it the ports stay unreserved and a note says so. Ports outside the range are skipped.
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports range lo hi port current want=()
  [[ -r /proc/sys/net/ipv4/ip_local_port_range && -e "$file" ]] || return 0
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range
  current="$(cat "$file" 2>/dev/null || true)"
  for port in "$@"; do
    ((port >= lo && port <= hi)) || continue
    # The file lists single ports and ranges, comma-separated.
    local listed=0
    for range in ${current//,/ }; do
      if [[ "$range" == *-* ]]; then
        ((port >= ${range%-*} && port <= ${range#*-})) && listed=1
      elif [[ "$range" == "$port" ]]; then
        listed=1
      fi
    done
    ((listed)) || want+=("$port")
  done
  ((${#want[@]})) || return 0
  local joined
  joined="$(IFS=,; printf '%s' "${want[*]}")"
  if [[ -w "$file" ]] && printf '%s\n' "${current:+$current,}$joined" >"$file" 2>/dev/null; then
    log "reserved ports $joined (inside the ephemeral range $lo-$hi) against outgoing connections"
  else
    log "note: could not reserve ports $joined against outgoing connections (needs root); a service's bind may meet one in use"
  fi
}

# wait_ready NAME PIDFILE TIMEOUT_S LOGFILE CHECK...: poll CHECK until it succeeds; fail if
# the process exits or TIMEOUT_S passes (then the process is stopped, the pid file removed
# and the log's tail shown). WAIT_LOG_LINES (default 30) sets how much of the log.
wait_ready() {
  local name="$1" pidf="$2" timeout="$3" logf="$4"
  shift 4
  local start deadline pid
  start="$(now_ms)"
  deadline=$((start + timeout * 1000))
  while true; do
    if "$@" >/dev/null 2>&1; then
      log "$name ready ($(fmt_secs $(($(now_ms) - start))) s)"
      return 0
    fi
    pid="$(read_pid "$pidf")"
    if [[ -z "$pid" ]] || ! alive "$pid"; then
      show_log_tail "$logf" "${WAIT_LOG_LINES:-30}"
      die "$name exited during startup (log: $logf)"
    fi
    if (($(now_ms) >= deadline)); then
      show_log_tail "$logf" "${WAIT_LOG_LINES:-30}"
      warn "$name not ready after ${timeout}s; stopping it"
      stop_pid "$name" "$pid" "${STOP_TIMEOUT_S:-20}" "$logf"
      rm -f "$pidf"
      die "$name did not become ready within ${timeout}s (log: $logf)"
    fi
    sleep 0.25
  done
}
