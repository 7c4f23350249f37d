"""Parsing of ``get_config`` argument strings such as ``"variant=L-32,stage=1,runlocal"``."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``key=value`` pairs and bare flags (``runlocal`` -> True) against ``defaults``.

    Values are converted to the type of their default; an unknown key raises ValueError.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: "
                             f"{sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key!r} expects true/false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` of that file."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        "titok_jax_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``a.b.c=value`` overrides; values are Python literals (else strings) and are
    converted to the type of the current value. Unknown keys raise."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}; known here: {sorted(node.keys())}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        current = node[leaf]
        if isinstance(current, bool) and isinstance(value, int):
            value = bool(value)
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(current, str) and not isinstance(value, str):
            value = raw
        elif current is not None and not isinstance(value, type(current)):
            raise ValueError(f"config key {key!r} expects {type(current).__name__}, got {raw!r}")
        node[leaf] = value


def add_run_fields(config, *, runlocal: bool) -> None:
    """The data, mesh, evaluation, logging and checkpoint fields every training config shares,
    with their CPU ``runlocal`` values (embedded photos, global batch 8, frequent logs)."""
    import ml_collections

    from titok_jax.data.embedded import DATASET_NAME
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
    # Resume safety (titok_jax/checkpointing.py): a resumed run refuses a config that differs
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
