"""The titok-jax checkpoint folder: ``config.json`` (the ``config.model`` block) plus
``params.safetensors`` keyed by the '/'-joined Flax parameter paths. Round-trips bit-exactly."""
from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np
from flax import traverse_util

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"


def is_native_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_native(directory: str | os.PathLike, model_config: ml_collections.ConfigDict,
                params: Mapping) -> None:
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()},
              os.path.join(directory, PARAMS_FILE), metadata={"format": "titok-jax"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(model_config.to_dict(), f, indent=2, sort_keys=True)


def load_native_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """Only the ``config.model`` block of a titok-jax folder."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_native(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """Returns (model config, params) of a folder written by :func:`save_native`."""
    from safetensors.numpy import load_file
    cfg_path, params_path = (os.path.join(directory, CONFIG_FILE),
                             os.path.join(directory, PARAMS_FILE))
    for p in (cfg_path, params_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"not a titok-jax checkpoint folder, missing {p}")
    with open(cfg_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    params = traverse_util.unflatten_dict(load_file(params_path), sep="/")
    return cfg, params
