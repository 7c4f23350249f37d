#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker; JAX discovers the pod
# (jax.distributed.initialize() with no arguments) and each host reads its own shard of the data.
#
#   TPU=my-v4-32 ZONE=us-central2-b WORKDIR=gs://bucket/titok_l32_s1 DATA_DIR=gs://bucket/tfds \
#   TEACHER=gs://bucket/maskgit-vqgan-imagenet-f16-256.bin bash launch/tpu_pod.sh [--config.KEY=VALUE ...]
#
# The repository must be checked out at the same path on every worker (e.g. with
# `gcloud compute tpus tpu-vm scp --worker=all`), with `bash launch/env.sh` run once there.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/titok.py:variant=L-32,stage=1}"
REPO="${REPO:-\$HOME/titok-jax}"
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd $REPO && source launch/env.sh && pip install -q 'jax[tpu]==0.10.2' &&
  titok-jax train --config '$CONFIG' --workdir '$WORKDIR' \
    --config.data.data_dir='${DATA_DIR:-}' --config.teacher.weights='${TEACHER:-}' $EXTRA"
