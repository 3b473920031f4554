#!/usr/bin/env bash
# What `make test` and CI run: install everything, start a separate test stack (its own
# ports and data, so a developer's running dev stack is untouched), run every test tier,
# and stop the test stack again whether the tests passed or not.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

export CITYTAP_STACK=test
# A fresh state dir per run: tests start from empty databases and topics.
export CITYTAP_STATE_DIR="${CITYTAP_TEST_STATE_DIR:-$PWD/.local/test-stack}"
source infra/env.sh

bash scripts/bootstrap.sh
bash scripts/fetch_test_data.sh
echo "[test] checking generated code is fresh"
bash scripts/check_proto.sh

stop_stack() {
  echo "[test] stopping the test stack"
  bash infra/services.sh down || true
  bash infra/components.sh reset || true
}
trap stop_stack EXIT
# Leftovers from an interrupted earlier run would hold the ports and old data.
bash infra/services.sh down >/dev/null 2>&1 || true
bash infra/components.sh reset >/dev/null 2>&1 || true

echo "[test] starting the test stack"
bash infra/components.sh up
bash infra/services.sh up

echo "[test] running the tests"
set +e
.venv/bin/python -m pytest tests/unit tests/grpc tests/integration tests/e2e "$@"
status=$?
set -e
echo "[test] finished in $(( $(date +%s) - started ))s with exit status $status"
exit $status
