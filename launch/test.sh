#!/usr/bin/env bash
# Runs the test suite (creating/reusing .venv first). Extra arguments go to pytest, e.g.
#   bash launch/test.sh -m slow        # the full-size checks
#   bash launch/test.sh tests/test_parity.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
