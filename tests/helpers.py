"""Helpers shared by the test files (fixtures live in conftest.py; no test file imports
another)."""
from __future__ import annotations

import json
import os
import socket

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DATA = os.path.join(TESTS, "data")
CONFIGS = os.path.join(ROOT, "configs")


class Fixture:
    """One official-code reference: arrays in official layouts plus the manifest."""

    def __init__(self, name: str):
        self.name = name
        self.dir = os.path.join(DATA, name)
        with open(os.path.join(self.dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.arrays = dict(np.load(os.path.join(self.dir, "reference.npz")))

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def tolerance(self, key: str) -> float:
        """max(1e-4, 4 x the reference's own float32-vs-float64 error), per the fixtures README."""
        return max(1e-4, 4.0 * self.manifest["tensors"][key]["fp64_max_abs_err"])

    def weights(self) -> str:
        return os.path.join(self.dir, "weights.safetensors")

    @property
    def state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.manifest["state_dict"].items()}


def fixture_model_config(fx: Fixture):
    """The titok-jax ``config.model`` of a fixture, read from the manifest's build record."""
    from titok_jax import variants
    b = fx.manifest["build"]
    if fx.name.startswith("maskgit_vqgan"):
        return variants.vqgan_model_config("tiny")
    cfg = variants.titok_model_config("tiny")
    cfg.variant = fx.name
    cfg.encoder, cfg.decoder = b["encoder"]["size_key"], b["decoder"]["size_key"]
    cfg.num_latent_tokens, cfg.token_size = b["num_latent_tokens"], b["token_size"]
    cfg.quantize_mode = b["quantize_mode"]
    cfg.codebook_size = b.get("codebook_size", 0)
    cfg.use_l2_norm = b.get("use_l2_norm", False)
    cfg.commitment_cost = b.get("commitment_cost", 0.25)
    cfg.is_legacy, cfg.finetune_decoder = b["is_legacy"], b["finetune_decoder"]
    return cfg


def load_config(arg: str, *overrides: str):
    """``configs/<file>.py:<arg>`` with ``key=value`` overrides, e.g.
    ``load_config("titok.py:runlocal", "total_steps=4")``."""
    from titok_jax.config_arg import apply_overrides
    from titok_jax.config_arg import load_config as load
    config = load(os.path.join(CONFIGS, arg))
    apply_overrides(config, list(overrides))
    return config


def runlocal(data_dir: str, *overrides: str, arg: str = "titok.py:runlocal"):
    """A runlocal training config on the embedded data in ``data_dir``, no progress bar."""
    return load_config(arg, f"data.data_dir={data_dir}", "progress_bar=False", *overrides)


def scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar written by the clu TensorBoard writer."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_overrides(config_arg: str, model_config) -> list[str]:
    """``--config.model.KEY=VALUE`` flags that turn the ``config.model`` of
    ``configs/<config_arg>`` into ``model_config`` (e.g. a fixture's)."""
    base = load_config(config_arg).model
    return [f"--config.model.{k}={v}" for k, v in model_config.items() if base[k] != v]


def embedded_data_flags(data_dir: str) -> list[str]:
    """``--config.data.*`` flags that read the embedded photo dataset prepared in ``data_dir``
    (the ``data_dir`` fixture)."""
    from titok_jax.data.embedded import DATASET_NAME
    return [f"--config.data.dataset={DATASET_NAME}", f"--config.data.data_dir={data_dir}"]


def released_two_stage_weights(path: str) -> str:
    """The tiny two-stage fixture (``titok_legacy_vq_tiny``) in the released layout: the stage-1
    weights plus the MaskGIT-VQGAN's ``decoder.*``/``quantize.*`` as ``pixel_*`` (the official
    stage-2 initialisation), one ``.safetensors``; returns ``path``."""
    from titok_jax.convert import official
    state = official.read_state_dict(os.path.join(DATA, "titok_stage1_tiny",
                                                  "weights.safetensors"))
    vqgan = official.read_state_dict(os.path.join(DATA, "maskgit_vqgan_tiny",
                                                  "weights.safetensors"))
    official.write_safetensors({**state, **official.vqgan_as_pixel_decoder(vqgan)}, path)
    return path


def tfds_images(data_dir: str, split: str, size: int) -> np.ndarray:
    """float32 ``[N, size, size, 3]`` images of a split of the embedded dataset, read without the
    titok-jax pipeline: the stored bytes decoded by PIL, then the official eval transform."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    from titok_jax.data.embedded import DATASET_NAME
    from titok_jax.data.images import resize_center_crop
    source = tfds.builder(DATASET_NAME, data_dir=data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return np.stack([resize_center_crop(Image.open(io.BytesIO(r["image"])).convert("RGB"), size)
                     for r in source])


def psnr_uint8(images: np.ndarray, recon: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8-rounded images, in float64 numpy."""
    a = np.round(np.clip(images, 0, 1).astype(np.float64) * 255)
    b = np.round(np.clip(recon, 0, 1).astype(np.float64) * 255)
    mse = np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return float(np.mean(10 * np.log10(255.0 ** 2 / mse)))
