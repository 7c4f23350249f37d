#!/usr/bin/env bash
# Runs the test suite (creating/reusing .venv first) in $TITOK_TEST_WORKERS pytest-xdist worker
# processes (default 2: most tests are bound by single-threaded XLA compilation, so two workers
# fill two cores; 0 runs in this process). Extra arguments go to pytest, e.g.
#   bash launch/test.sh -m slow        # the full-size checks
#   bash launch/test.sh tests/test_parity.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m pytest -q -n "${TITOK_TEST_WORKERS:-2}" --durations=15 "$@"
