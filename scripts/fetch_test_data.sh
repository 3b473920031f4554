#!/usr/bin/env bash
# Fetch the face photos the face service's tests and benchmark use, without committing them.
#
# The face_recognition 1.3.0 source distribution on PyPI ships four portraits in
# tests/test_images/ (obama.jpg, obama2.jpg, obama3.jpg: one man; biden.jpg: another). This
# script downloads that sdist once with pip (the ordinary PyPI client) into .local/cache,
# checks its SHA-256, and extracts the four photos into .local/test-data/faces.
# Idempotent: it does nothing when the photos are already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SDIST=face_recognition-1.3.0.tar.gz
SDIST_SHA256=5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec
CACHE=.local/cache
OUT=.local/test-data/faces
PHOTOS=(obama.jpg obama2.jpg obama3.jpg biden.jpg)

have_all() {
  for photo in "${PHOTOS[@]}"; do [[ -s "$OUT/$photo" ]] || return 1; done
}
if have_all; then
  echo "[test-data] face photos present in $OUT"
  exit 0
fi

PY=.venv/bin/python
[[ -x "$PY" ]] || PY=python3
mkdir -p "$CACHE" "$OUT"
if [[ ! -s "$CACHE/$SDIST" ]] || ! echo "$SDIST_SHA256  $CACHE/$SDIST" | sha256sum -c --status; then
  echo "[test-data] downloading $SDIST with pip"
  rm -f "$CACHE/$SDIST"
  # --no-build-isolation: pip only reads the sdist's metadata; nothing is built or installed.
  "$PY" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
    --no-build-isolation -d "$CACHE" "face_recognition==1.3.0"
fi
if ! echo "$SDIST_SHA256  $CACHE/$SDIST" | sha256sum -c --status; then
  echo "[test-data] $CACHE/$SDIST does not have the expected SHA-256 $SDIST_SHA256; refusing it" >&2
  rm -f "$CACHE/$SDIST"
  exit 1
fi
members=()
for photo in "${PHOTOS[@]}"; do members+=("face_recognition-1.3.0/tests/test_images/$photo"); done
tar -xzf "$CACHE/$SDIST" --no-same-owner -C "$OUT" --strip-components=3 "${members[@]}"
have_all || { echo "[test-data] extraction left photos missing in $OUT" >&2; exit 1; }
echo "[test-data] extracted ${PHOTOS[*]} into $OUT"
