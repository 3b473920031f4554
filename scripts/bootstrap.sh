#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install CityTap with its dev tools.
# Idempotent and fast when nothing changed: it reinstalls only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
VENV=.venv
MARKER="$VENV/.citytap-installed"
# face_recognition asks for "dlib" by name, which would compile dlib from source; it is
# installed without dependencies (its real ones are in pyproject.toml, dlib as dlib-bin).
FACE_RECOGNITION_PIN="face_recognition==1.3.0"
WANT="$( { cat pyproject.toml; echo "$FACE_RECOGNITION_PIN"; } | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating virtual environment $VENV with $("$PYTHON_BIN" --version)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]]; then
  echo "[bootstrap] Python packages up to date"
  exit 0
fi
echo "[bootstrap] installing Python packages (pinned in pyproject.toml)"
mkdir -p .local
LOG=.local/pip-install.log
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e ".[dev]" >"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  echo "[bootstrap] pip install failed; full log in $LOG" >&2
  exit 1
fi
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off --no-deps \
    "$FACE_RECOGNITION_PIN" >>"$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  echo "[bootstrap] pip install of $FACE_RECOGNITION_PIN failed; full log in $LOG" >&2
  exit 1
fi
# Put the repo root (services, libs, loadtests) and gen/ (the generated `citytap` package)
# on the venv's path directly, so a package added later needs no reinstall.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n%s\n' "$PWD" "$PWD/gen" > "$SITE/citytap-paths.pth"
echo "$WANT" > "$MARKER"
echo "[bootstrap] Python packages installed"
