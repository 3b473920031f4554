#!/usr/bin/env bash
# Installs what the local stack needs, and nothing that is already there:
#   - Debian packages: PostgreSQL 15, Redis, a Java 17 runtime, Maven, curl, python3
#   - the Kafka broker classpath, from Maven Central, into $CITYTAP_CACHE_DIR/kafka/libs
#   - stripe-mock (pinned), from the Go module proxy, into $CITYTAP_CACHE_DIR/bin
# Idempotent; on a provisioned machine it only checks, and takes well under 2 seconds.
# Safe to run from two stacks at once (a lock serialises the downloads).
set -euo pipefail

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=env.sh
source "$INFRA_DIR/env.sh"
# shellcheck source=lib.sh
source "$INFRA_DIR/lib.sh"

STRIPE_MOCK_VERSION="v0.203.0"
STRIPE_MOCK_MODULE="github.com/stripe/stripe-mock"
KAFKA_POM="$INFRA_DIR/kafka/pom.xml"
KAFKA_DIR="$CITYTAP_CACHE_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_MARKER="$KAFKA_DIR/libs.ok"
BIN_DIR="$CITYTAP_CACHE_DIR/bin"

t0="$(now_ms)"
mkdir -p "$CITYTAP_CACHE_DIR" "$BIN_DIR" "$KAFKA_DIR"

# One provision at a time per cache (two stacks may come up together).
# (Opened read-only: flock needs no write access, so a shared cache owned by another user
# still works when nothing has to be installed.)
lock_file="$CITYTAP_CACHE_DIR/.provision.lock"
[[ -e "$lock_file" ]] || : >"$lock_file"
exec 9<"$lock_file"
if ! flock -w 900 9; then
  die "provision: could not take $CITYTAP_CACHE_DIR/.provision.lock within 900s (another provision.sh is stuck?)"
fi

# ---------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------
missing_pkgs=()
need_pkg() { # need_pkg PACKAGE TEST...
  local pkg="$1"
  shift
  if ! "$@" >/dev/null 2>&1; then
    missing_pkgs+=("$pkg")
  fi
}
java_ok() {
  command -v java >/dev/null || return 1
  local v
  v="$(java -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
  [[ "${v%%.*}" =~ ^[0-9]+$ ]] && ((${v%%.*} >= 17))
}
need_pkg postgresql test -x "$CITYTAP_PG_BIN/postgres" -a -x "$CITYTAP_PG_BIN/initdb" -a -x "$CITYTAP_PG_BIN/pg_ctl"
need_pkg redis-server command -v redis-server
need_pkg redis-tools command -v redis-cli
need_pkg openjdk-17-jre-headless java_ok
need_pkg maven command -v mvn
need_pkg curl command -v curl
need_pkg python3 command -v python3

if ((${#missing_pkgs[@]})); then
  apt_cmd="apt-get install -y --no-install-recommends ${missing_pkgs[*]}"
  if [[ "$(id -u)" != 0 ]]; then
    die "missing Debian packages: ${missing_pkgs[*]}. As root, run: apt-get update && DEBIAN_FRONTEND=noninteractive $apt_cmd"
  fi
  log "installing Debian packages: ${missing_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || die "apt-get update failed"
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}" || die "apt-get install ${missing_pkgs[*]} failed"
  # Debian's postgresql package creates a default cluster on port 5432 and may start it;
  # our stack runs its own cluster, so do not leave that one running.
  if [[ " ${missing_pkgs[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
    if pg_lsclusters --no-header 2>/dev/null | awk '$2=="main" && $4=="online"' | grep -q .; then
      log "stopping the default 'main' cluster that installing postgresql started"
      pg_ctlcluster "$(pg_lsclusters --no-header | awk '$2=="main" {print $1; exit}')" main stop || true
    fi
  fi
  # Re-check.
  missing_pkgs=()
  need_pkg postgresql test -x "$CITYTAP_PG_BIN/postgres"
  need_pkg openjdk-17-jre-headless java_ok
  ((${#missing_pkgs[@]} == 0)) || die "still missing after apt-get install: ${missing_pkgs[*]} (is CITYTAP_PG_BIN=$CITYTAP_PG_BIN right? is 'java' Java >= 17?)"
fi

# ---------------------------------------------------------------------------------------
# 2. Kafka broker classpath (Maven Central -> $CITYTAP_CACHE_DIR/kafka/libs)
# ---------------------------------------------------------------------------------------
pom_sum="$(sha256sum "$KAFKA_POM" | awk '{print $1}')"
if [[ -f "$KAFKA_MARKER" && "$(cat "$KAFKA_MARKER")" == "$pom_sum" && -d "$KAFKA_LIBS" ]]; then
  : # cached
else
  log "fetching the Kafka broker classpath with Maven (pom: infra/kafka/pom.xml) into $KAFKA_LIBS"
  tmp_libs="$KAFKA_DIR/libs.tmp"
  rm -rf "$tmp_libs"
  mvn_log="$KAFKA_DIR/mvn.log"
  if ! mvn -q -B -Dstyle.color=never \
    -f "$KAFKA_POM" \
    -Dmaven.repo.local="$CITYTAP_CACHE_DIR/m2" \
    dependency:copy-dependencies \
    -DincludeScope=runtime \
    -DoutputDirectory="$tmp_libs" >"$mvn_log" 2>&1; then
    show_log_tail "$mvn_log" 30
    die "Maven could not fetch the Kafka classpath (log: $mvn_log)"
  fi
  ls "$tmp_libs"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Maven ran but no kafka_2.13 jar landed in $tmp_libs (log: $mvn_log)"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp_libs" "$KAFKA_LIBS"
  printf '%s\n' "$pom_sum" >"$KAFKA_MARKER"
  log "Kafka classpath ready: $(ls "$KAFKA_LIBS" | wc -l) jars, $(basename "$(ls "$KAFKA_LIBS"/kafka_2.13-*.jar)")"
fi

# ---------------------------------------------------------------------------------------
# 3. stripe-mock (Go module proxy -> $CITYTAP_CACHE_DIR/bin/stripe-mock)
# ---------------------------------------------------------------------------------------
sm_marker="$BIN_DIR/.stripe-mock.version"
if [[ -x "$BIN_DIR/stripe-mock" && -f "$sm_marker" && "$(cat "$sm_marker")" == "$STRIPE_MOCK_VERSION" ]]; then
  : # cached
else
  go_bin="$(command -v go || true)"
  for cand in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [[ -n "$go_bin" ]] && break
    [[ -x "$cand" ]] && go_bin="$cand"
  done
  [[ -n "$go_bin" ]] || die "stripe-mock is missing and no Go toolchain was found (need Go >= 1.22 on PATH or in /usr/local/go/bin) to run: go install $STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION"
  log "installing stripe-mock $STRIPE_MOCK_VERSION with $go_bin install into $BIN_DIR"
  go_log="$CITYTAP_CACHE_DIR/go-install.log"
  # GOTOOLCHAIN=local: never download another Go toolchain; use the installed one.
  if ! GOBIN="$BIN_DIR" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
    "$go_bin" install "$STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION" >"$go_log" 2>&1; then
    show_log_tail "$go_log" 30
    die "go install $STRIPE_MOCK_MODULE@$STRIPE_MOCK_VERSION failed (log: $go_log)"
  fi
  [[ -x "$BIN_DIR/stripe-mock" ]] || die "go install succeeded but $BIN_DIR/stripe-mock is missing (log: $go_log)"
  printf '%s\n' "$STRIPE_MOCK_VERSION" >"$sm_marker"
  log "stripe-mock installed: $BIN_DIR/stripe-mock"
fi

log "provision: all present ($(fmt_secs $(($(now_ms) - t0))) s)"
