#!/usr/bin/env bash
# The main job: train a tiny TiTok on the embedded photo dataset (CPU, a few minutes), then write
# reconstructions of held-out crops and an input|reconstruction grid.
#   bash launch/quickstart.sh [WORKDIR] [--config.KEY=VALUE ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-$ROOT/workdir/quickstart}"
shift || true
source "$ROOT/launch/env.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# The runlocal config prepares the embedded dataset (titok_sample_photos) offline in the project
# cache, .cache/tfds (or $TITOK_JAX_CACHE/tfds); it never writes into ~/tensorflow_datasets.
titok-jax train --config configs/titok.py:runlocal --workdir "$WORKDIR" "$@"
echo
echo "held-out reconstructions and grid: $WORKDIR/reconstructions/grid.png"
echo "training image grids:              $WORKDIR/images/"
echo "trained tokenizer (titok-jax):     $WORKDIR/export/"
echo "TensorBoard logs:                  tensorboard --logdir $WORKDIR"
