#!/usr/bin/env bash
# CityTap environment: paths, ports and connection settings for one local stack.
#
#   source infra/env.sh            # in scripts, the Makefile's recipes, or your shell
#   infra/env.sh --print           # prints `export VAR=value` lines
#   eval "$(infra/env.sh --print)"
#
# Every variable keeps a value it already has in the environment. Defaults depend on the
# stack selector CITYTAP_STACK:
#   dev  (default)  state in $CITYTAP_ROOT/.local/stack,      base ports (Kafka 19092 ...)
#   test            state in $CITYTAP_ROOT/.local/test-stack, every port +1000
# CITYTAP_PORT_OFFSET, when set, replaces the stack's port offset, so several stacks can run
# side by side on one machine (give each its own CITYTAP_STATE_DIR too), for example
#   CITYTAP_STACK=test CITYTAP_PORT_OFFSET=3000 CITYTAP_STATE_DIR=$PWD/.local/stack-3000
#
# Values this file filled in from defaults are remembered in CITYTAP_ENV_DEFAULTS. When it is
# sourced again (for example a shell that sourced the dev stack runs `CITYTAP_STACK=test make
# test`), a variable that still holds the default recorded there is recomputed for the new
# stack instead of being mistaken for an explicit override. A value that you changed by hand
# after sourcing is kept.
#
# This file must work when sourced by a shell running `set -euo pipefail`, and must not
# change the options of the shell that sources it.

_citytap_env_main() {
  local src="${BASH_SOURCE[0]}"
  local infra_dir
  infra_dir="$(cd "$(dirname "$src")" && pwd -P)"

  # Forget the values a previous sourcing defaulted, unless they were changed since.
  local entry name value
  local -a entries=()
  read -r -a entries <<<"${CITYTAP_ENV_DEFAULTS:-}"
  for entry in "${entries[@]}"; do
    name="${entry%%=*}"
    value="${entry#*=}"
    [[ "$name" =~ ^[A-Z_][A-Z0-9_]*$ ]] || continue
    if [[ "${!name-}" == "$value" ]]; then
      unset "$name"
    fi
  done

  local defaulted=()
  # _d NAME DEFAULT: export NAME, keeping an existing value; remember it if defaulted.
  _d() {
    if [[ -z "${!1+x}" ]]; then
      printf -v "$1" '%s' "$2"
      # Values with whitespace are not recorded (they would split the list); such a value
      # is then simply treated as an explicit override next time.
      [[ "$2" =~ [[:space:]] ]] || defaulted+=("$1=$2")
    fi
    export "${1?}"
  }

  _d CITYTAP_STACK dev
  local off state_name
  case "$CITYTAP_STACK" in
    dev) off=0; state_name=stack ;;
    test) off=1000; state_name=test-stack ;;
    *)
      echo "[infra] env.sh: CITYTAP_STACK must be 'dev' or 'test', got '$CITYTAP_STACK'" >&2
      return 1 ;;
  esac
  if [[ -n "${CITYTAP_PORT_OFFSET:-}" ]]; then
    if [[ ! "$CITYTAP_PORT_OFFSET" =~ ^[0-9]{1,5}$ ]] || (( CITYTAP_PORT_OFFSET > 40000 )); then
      echo "[infra] env.sh: CITYTAP_PORT_OFFSET must be a whole number from 0 to 40000, got '$CITYTAP_PORT_OFFSET'" >&2
      return 1
    fi
    off=$CITYTAP_PORT_OFFSET
  fi

  _d CITYTAP_ROOT "$(dirname "$infra_dir")"
  _d CITYTAP_CACHE_DIR "$CITYTAP_ROOT/.local/cache"
  _d CITYTAP_STATE_DIR "$CITYTAP_ROOT/.local/$state_name"
  _d CITYTAP_PYTHON "$CITYTAP_ROOT/.venv/bin/python"
  _d CITYTAP_PG_BIN /usr/lib/postgresql/15/bin

  # Components.
  _d CITYTAP_KAFKA_PORT $((19092 + off))
  _d CITYTAP_KAFKA_CONTROLLER_PORT $((19093 + off))
  _d CITYTAP_PG_PORT $((15432 + off))
  _d CITYTAP_REDIS_PORT $((16379 + off))
  _d CITYTAP_STRIPE_MOCK_PORT $((12111 + off))
  _d CITYTAP_STRIPE_MOCK_HTTPS_PORT $((12112 + off))

  # Services (gRPC).
  _d CITYTAP_FARE_GATE_PORT $((50051 + off))
  _d CITYTAP_WALLET_PORT $((50052 + off))
  _d CITYTAP_FACE_PORT $((50053 + off))
  _d CITYTAP_MERCHANT_PORT $((50054 + off))
  _d CITYTAP_SETTLEMENT_PORT $((50055 + off))

  # Connection settings read by the Python code.
  _d CITYTAP_KAFKA_BOOTSTRAP "127.0.0.1:$CITYTAP_KAFKA_PORT"
  _d CITYTAP_POSTGRES_DSN "postgresql://citytap@127.0.0.1:$CITYTAP_PG_PORT/citytap"
  _d CITYTAP_REDIS_URL "redis://127.0.0.1:$CITYTAP_REDIS_PORT/0"
  _d CITYTAP_STRIPE_API_BASE "http://127.0.0.1:$CITYTAP_STRIPE_MOCK_PORT"
  _d CITYTAP_STRIPE_API_KEY sk_test_citytap
  # Secrets for local stacks only: fixed, public, and worthless outside a dev or test stack.
  # A real deployment sets its own from its secret store.
  _d CITYTAP_WALLET_CARD_HASH_KEY 636974797461702d6465762d636172642d686173682d6b65792d6e6f742d736563726574
  _d CITYTAP_STRIPE_WEBHOOK_SECRET whsec_citytap_dev_not_a_secret_0123456789
  _d CITYTAP_FACE_TEMPLATE_KEY 636974797461702d6465762d666163652d74656d706c6174652d6b65792d3031
  _d CITYTAP_WALLET_DEVICE_ISSUER_SEED 636974797461702d6465762d6465766963652d6973737565722d736565643031
  _d CITYTAP_WALLET_WEBHOOK_PORT $((50062 + off))
  _d CITYTAP_WALLET_WEBHOOK_LISTEN "127.0.0.1:$CITYTAP_WALLET_WEBHOOK_PORT"
  _d CITYTAP_MERCHANT_WEBHOOK_SECRET whsec_citytap_merchant_dev_not_a_secret_0123
  _d CITYTAP_MERCHANT_WEBHOOK_PORT $((50063 + off))
  _d CITYTAP_MERCHANT_WEBHOOK_LISTEN "127.0.0.1:$CITYTAP_MERCHANT_WEBHOOK_PORT"
  # Split contracts take effect 20 s after they are made on local stacks (production keeps the
  # settlement default of an hour), so the demo city can make its contracts and go on; the
  # services' contract caches live for less than that lead time, as they must.
  _d CITYTAP_SETTLEMENT_CONTRACT_LEAD_TIME_S 20
  # The demo city's initial contracts (go-live terms), recorded when settlement first starts.
  _d CITYTAP_SETTLEMENT_INITIAL_CONTRACTS "$CITYTAP_ROOT/infra/demo_city/contracts.json"
  _d CITYTAP_FARE_GATE_CONTRACT_CACHE_TTL_S 10
  _d CITYTAP_MERCHANT_CONTRACT_CACHE_TTL_S 10
  _d CITYTAP_FARE_GATE_ADDRESS "127.0.0.1:$CITYTAP_FARE_GATE_PORT"
  _d CITYTAP_WALLET_ADDRESS "127.0.0.1:$CITYTAP_WALLET_PORT"
  _d CITYTAP_FACE_ADDRESS "127.0.0.1:$CITYTAP_FACE_PORT"
  _d CITYTAP_MERCHANT_ADDRESS "127.0.0.1:$CITYTAP_MERCHANT_PORT"
  _d CITYTAP_SETTLEMENT_ADDRESS "127.0.0.1:$CITYTAP_SETTLEMENT_PORT"

  unset -f _d
  CITYTAP_ENV_DEFAULTS="${defaulted[*]}"
  export CITYTAP_ENV_DEFAULTS

  case ":$PATH:" in
    *":$CITYTAP_CACHE_DIR/bin:"*) ;;
    *) PATH="$CITYTAP_CACHE_DIR/bin:$PATH" ;;
  esac
  export PATH
}

_citytap_env_quote() {
  # Plain words print bare (readable, and valid for both sh and make); anything else is
  # single-quoted for the shell.
  if [[ "$1" =~ ^[A-Za-z0-9_./:@%+,=-]*$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  # Sourced.
  _citytap_env_main || return 1
  unset -f _citytap_env_main _citytap_env_quote
else
  # Executed.
  set -euo pipefail
  _citytap_env_main
  case "${1:-}" in
    --print)
      for _v in $(compgen -e | grep '^CITYTAP_' | sort) PATH; do
        printf 'export %s=%s\n' "$_v" "$(_citytap_env_quote "${!_v}")"
      done
      ;;
    *)
      echo "usage: source infra/env.sh | infra/env.sh --print" >&2
      exit 2
      ;;
  esac
fi
