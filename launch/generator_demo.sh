#!/usr/bin/env bash
# The generation pipeline end to end on CPU, on the embedded photo dataset (7 classes):
#   1. train the tiny-vq TiTok tokenizer (64x64, 32 tokens, 256 codes; GAN recipe without the
#      GAN phase: L2 + LPIPS + codebook re-seeding),
#   2. pre-tokenize the train split with it (ADM centre crop + flip, ArrayRecord shards),
#   3. train a tiny MaskGIT generator on those tokens (configs/maskgit.py:runlocal),
#   4. sample 10 images per class and write them as an ADM .npz and a grid PNG.
#   bash launch/generator_demo.sh [WORKDIR]        (about 7 minutes on 2 cores)
# Every step resumes: run it again after an interruption and finished work is kept.
# TOKENIZER_STEPS and GENERATOR_STEPS set the training lengths (default 1000 and 2000).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-$ROOT/workdir/generator_demo}"
source "$ROOT/launch/env.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

titok-jax train --config configs/titok.py:runlocal,variant=tiny-vq,objective=gan \
    --workdir "$WORKDIR/tokenizer" --config.total_steps="${TOKENIZER_STEPS:-1000}" \
    --config.eval_every=0
titok-jax pretokenize --model titok_tiny_vq --weights "$WORKDIR/tokenizer/export" --embedded \
    --split train --out "$WORKDIR/tokens" --batch-size 64 --shard-size 112
titok-jax train --config configs/maskgit.py:runlocal --workdir "$WORKDIR/generator" \
    --config.tokenizer.weights="$WORKDIR/tokenizer/export" --config.tokenizer.allow_random=False \
    --config.data.tokens="$WORKDIR/tokens" --config.total_steps="${GENERATOR_STEPS:-2000}"
titok-jax sample --generator-weights "$WORKDIR/generator/export" \
    --tokenizer-weights "$WORKDIR/tokenizer/export" --num-samples 70 --batch-size 14 \
    --out "$WORKDIR/samples.npz" --grid "$WORKDIR/samples.png"
echo
echo "tokenizer reconstructions: $WORKDIR/tokenizer/reconstructions/grid.png"
echo "generator training grids:  $WORKDIR/generator/images/"
echo "samples (ADM .npz, 10 per class) and their grid: $WORKDIR/samples.npz $WORKDIR/samples.png"
