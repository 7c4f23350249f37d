#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv in .venv and installs titok-jax with its pinned
# dependency set. Sourced by the other launch scripts; safe to run repeatedly: it reinstalls only
# when setup.cfg or constraints.txt changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TITOK_JAX_VENV:-$ROOT/.venv}"
EXTRAS="${TITOK_JAX_EXTRAS:-torch,test}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.titok_jax_installed"
want="$(cat "$ROOT/setup.cfg" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing titok-jax[$EXTRAS] and its pinned dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
