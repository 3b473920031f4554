# Shared helpers for infra/*.sh. Sourced, never executed. Expects env.sh to be sourced.

log() { printf '[infra] %s\n' "$*"; }
warn() { printf '[infra] WARNING: %s\n' "$*" >&2; }
die() {
  printf '[infra] ERROR: %s\n' "$*" >&2
  exit 1
}

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

# cmdline PID: the process's command line with NULs turned into spaces ("" if gone).
cmdline() {
  local f="/proc/$1/cmdline"
  [[ -r "$f" ]] || return 0
  tr '\0' ' ' <"$f" 2>/dev/null || true
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
  local sig="$1" envent="${2:-}" d pid
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
    [[ " $(cmdline "$pid") " == *"$sig"* ]] || continue
    if [[ -n "$envent" ]]; then
      tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF -- "$envent" || continue
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
      local i
      for i in $(seq 1 50); do
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
