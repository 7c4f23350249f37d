"""The titok-jax checkpoint folder: ``config.json`` (the ``config.model`` block) plus
``params.safetensors`` keyed by the '/'-joined Flax parameter paths. Round-trips bit-exactly.

Paths go through ``etils.epath``, so the folder may be local or ``gs://``; the parameters are
(de)serialised in memory because safetensors only memory-maps local files."""
from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def is_native_dir(path: str | os.PathLike) -> bool:
    directory = epath.Path(path)
    return directory.is_dir() and (directory / CONFIG_FILE).exists()


def save_native(directory: str | os.PathLike, model_config: ml_collections.ConfigDict,
                params: Mapping) -> None:
    from safetensors.numpy import save
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    (directory / PARAMS_FILE).write_bytes(
        save({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()},
             metadata={"format": "titok-jax"}))
    (directory / CONFIG_FILE).write_text(
        json.dumps(model_config.to_dict(), indent=2, sort_keys=True))


def load_native_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """Only the ``config.model`` block of a titok-jax folder."""
    return ml_collections.ConfigDict(json.loads((epath.Path(directory) / CONFIG_FILE).read_text()))


def load_native(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """Returns (model config, params) of a folder written by :func:`save_native`."""
    from safetensors.numpy import load
    cfg_path, params_path = epath.Path(directory) / CONFIG_FILE, epath.Path(directory) / PARAMS_FILE
    for p in (cfg_path, params_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a titok-jax checkpoint folder, missing {p}")
    cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    params = traverse_util.unflatten_dict(load(params_path.read_bytes()), sep="/")
    return cfg, params
