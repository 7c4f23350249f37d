#!/usr/bin/env bash
# Variable-length TiTok, measured: the CPU quickstart tokenizer (configs/titok.py:runlocal,
# tiny-vae 64x64, 32 tokens) trained twice with the same steps, seed and data, without and with
# tail drop (config.tail_drop: uniform k in [1, 32] per example), then held-out PSNR/LPIPS
# (validation split of the embedded photos) when only the first k tokens are decoded, and one
# plot of both curves. A few minutes per training on a laptop CPU.
#   bash launch/tail_drop_curves.sh [OUTDIR] [--config.KEY=VALUE ...]   (overrides: both runs)
# TOKEN_COUNTS (default 4,8,16,24,32) and EVALS (default psnr,lpips) change the evaluation.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath -m "${1:-$ROOT/workdir/tail_drop}")"  # before the cd: relative to the caller
shift || true
COUNTS="${TOKEN_COUNTS:-4,8,16,24,32}"
EVALS="${EVALS:-psnr,lpips}"
source "$ROOT/launch/env.sh"
cd "$ROOT"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# A finished workdir resumes at its last step and stops at once.
titok-jax train --config configs/titok.py:runlocal --workdir "$OUT/plain" "$@"
titok-jax train --config configs/titok.py:runlocal,tail_drop --workdir "$OUT/tail_drop" "$@"

# The workdirs' stored configs and EMA params; the second plot overlays the first curve.
titok-jax eval --checkpoint "$OUT/plain" --token-counts "$COUNTS" --evals "$EVALS" \
  --out "$OUT/plain_curve.json"
titok-jax eval --checkpoint "$OUT/tail_drop" --token-counts "$COUNTS" --evals "$EVALS" \
  --out "$OUT/tail_drop_curve.json" --compare "$OUT/plain_curve.json"

python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
runs = {n: json.load(open(f"{out}/{n}_curve.json"))["results"] for n in ("plain", "tail_drop")}
metrics = sorted(m for m in runs["plain"][next(iter(runs["plain"]))] if m != "num_images")
print("tokens  " + "  ".join(f"{r}:{m:>6}" for m in metrics for r in runs))
for k in sorted(runs["plain"], key=int):
    print(f"{k:>6}  " + "  ".join(f"{runs[r][k][m]:>{len(r) + 7}.4f}" for m in metrics
                                    for r in runs))
EOF
echo "curves: $OUT/tail_drop_curve.png (both runs), JSON: $OUT/{plain,tail_drop}_curve.json"
