#!/usr/bin/env bash
# Train on GPU hosts with SLURM: one process per host, all local GPUs per process.
#
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_slurm.sh \
#     WORKDIR=/shared/titok_s128_s1 DATA_DIR=/shared/tfds TEACHER=/shared/maskgit.bin
#
# srun starts the same command on every node; jax.distributed.initialize() reads the SLURM
# environment (coordinator = first node). Without SLURM, start one process per host yourself:
#   titok-jax train ... --coordinator HOST0:12345 --num-processes N --process-id I
#SBATCH --job-name=titok-jax
#SBATCH --output=titok-jax-%j.out
set -euo pipefail
for kv in "$@"; do export "$kv"; done
: "${WORKDIR:?pass WORKDIR=...}"
CONFIG="${CONFIG:-configs/titok.py:variant=S-128,stage=1}"
cd "${REPO:-$SLURM_SUBMIT_DIR}"
source launch/env.sh
# A CUDA jaxlib is needed on GPU hosts: pip install 'jax[cuda12]==0.10.2' in .venv once.
srun --kill-on-bad-exit=1 titok-jax train --config "$CONFIG" --workdir "$WORKDIR" \
  --config.data.data_dir="${DATA_DIR:-}" --config.teacher.weights="${TEACHER:-}" ${EXTRA:-}
