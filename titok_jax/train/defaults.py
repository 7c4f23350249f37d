"""The run fields every training config shares (data, mesh, evaluation, logging, checkpoints),
with their CPU ``runlocal`` values; the files in ``configs/`` call :func:`add_run_fields`."""
from __future__ import annotations

import ml_collections

from titok_jax.data.embedded import DATASET_NAME


def add_run_fields(config, *, runlocal: bool) -> None:
    """The data, mesh, evaluation, logging and checkpoint fields every training config shares,
    with their CPU ``runlocal`` values (embedded photos, global batch 8, frequent logs)."""
    # embedded: prepare the embedded photo dataset (DATASET_NAME) in data_dir, by default the
    # project cache; any other dataset is only read from data_dir (default: TFDS's).
    # workers: 0 decodes training images with num_threads threads in this process; N > 0 with
    # N Grain worker processes (whole batches each, the same batches), for hosts whose image
    # decoding one Python process cannot keep up with.
    config.data = ml_collections.ConfigDict(dict(
        dataset=DATASET_NAME if runlocal else "imagenet2012", data_dir="", embedded=runlocal,
        train_split="train", eval_split="validation", num_threads=4 if runlocal else 16,
        workers=0))
    # Mesh: one "data" axis over all devices; fsdp shards params + optimizer state over it.
    config.mesh = ml_collections.ConfigDict(dict(fsdp=False, fsdp_min_size=2 ** 14, rules=[]))
    config.keep_ckpts = 3
    # Resume safety (titok_jax/infra/checkpointing.py): a resumed run refuses a config that differs
    # from the stored one unless allow_config_changes (changes that keep the state shapes, e.g.
    # a longer schedule); an unrestorable newest checkpoint stops the run unless
    # checkpoint_fallback (then the newest older one that restores is used).
    config.allow_config_changes = False
    config.checkpoint_fallback = False
    # TensorBoard event files in the workdir (TensorFlow's writer, tf.io.gfile: local or gs://);
    # False logs metrics to the console only.
    config.tensorboard = True
    # Periodic evaluation (titok_jax/evals) of the EMA params every eval_every steps (0: never):
    # comma-separated evaluators from rfid, psnr, ssim, lpips, codebook, linear_probe.
    config.evals = "rfid,psnr,ssim,lpips,codebook"
    config.eval_every = 0
    config.eval = ml_collections.ConfigDict(dict(
        batch_size=64,            # global
        inception_weights="",     # converted FID Inception (default: fetched into .cache/)
        inception_fc="",          # pytorch-fid pt_inception-2015-12-05-*.pth: adds the IS head
        fid_reference="",         # .npz with mu/sigma (or ADM arr_0 images): FID against it
        # Inception Score splits: 1, as the official VQGANEvaluator computes the IS of
        # reconstructions (generation metrics, titok-jax fid, keep ADM's 10).
        is_splits=1,
        fid_sqrt="scipy",         # scipy.linalg.sqrtm (the protocol) | eigh (faster, same value)
        probe_train_split="train", probe_test_split="validation",
        probe_steps=1000, probe_lr=1e-2, probe_weight_decay=1e-4,
        alit_iteration=-1))       # ALIT: evaluate the tokens of this iteration (-1: the last)
    if runlocal:
        config.eval.batch_size = 8
        # 56 validation images are too few to test a probe: hold out a quarter of train.
        config.eval.probe_train_split = "train[:75%]"
        config.eval.probe_test_split = "train[75%:]"
        config.eval.probe_steps = 300
    if runlocal:
        config.global_batch = 8
        config.num_grid_images = 6
        config.preemption_check_every = 1
        config.progress_bar = True
    else:
        config.global_batch = 256
        config.log_every, config.ckpt_every, config.image_every = 100, 5_000, 5_000
        config.num_grid_images = 8
        config.preemption_check_every = 10
        config.progress_bar = False
