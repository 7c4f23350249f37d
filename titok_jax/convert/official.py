"""Name maps of the official checkpoints and safe readers/writers for weight files.

Readers never unpickle arbitrary objects: ``.safetensors`` files are read directly, PyTorch
``.bin``/``.pt``/``.pth`` files through ``torch.load(weights_only=True)``. Files are read and
written whole through ``etils.epath``, so any path may be ``gs://``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Mapping

import numpy as np
from etils import epath

from titok_jax.convert.layout import (
    CONV1X1_AS_DENSE,
    IDENTITY,
    LINEAR,
    NameMap,
    export_state_dict,
    import_state_dict,
)

_VQGAN_LISTS = ("down", "up", "block", "mid")

VQGAN_MAP = NameMap("MaskGIT-VQGAN (maskgit-vqgan-imagenet-f16-256.bin layout)",
                    list_names=_VQGAN_LISTS)

TITOK_MAP = NameMap(
    "TiTok (bytedance/1d-tokenizer layout)",
    list_names=("transformer", "ffn") + _VQGAN_LISTS,
    scanned=("transformer",),
    overrides=(
        # nn.MultiheadAttention keeps its fused projection as raw parameters.
        (r"attn/in_proj/kernel$", LINEAR, (r"attn\.in_proj\.weight$", "attn.in_proj_weight")),
        (r"attn/in_proj/bias$", IDENTITY, (r"attn\.in_proj\.bias$", "attn.in_proj_bias")),
        # 1x1 Conv2d layers of the official model that act per token: Dense layers here.
        (r"^(encoder/conv_out|decoder/ffn_\d+)/kernel$", CONV1X1_AS_DENSE, None),
    ),
)


def _taming_mid(match) -> str:
    return f".mid.block_{int(match.group(1)) + 1}."


ALIT_MAP = NameMap(
    "ALIT (ShivamDuggal4/adaptive-length-tokenizer layout)",
    list_names=("transformer", "ffn") + _VQGAN_LISTS,
    scanned=("transformer",),
    overrides=TITOK_MAP.overrides[:2],
    # The VQGAN inside ALIT is the taming-style copy: mid blocks are ``mid.block_1/2`` and the
    # upsampling conv is ``upsample.conv``.
    renames=((r"\.mid\.(\d+)\.", _taming_mid), (r"\.upsample_conv\.", ".upsample.conv.")),
    # Stage-2 checkpoints carry 8 LPIPS + PatchGAN loss modules; they are not part of the model.
    ignored=(r"^gan_losses\.",),
)


# The MaskGIT generators. ImageBert's HF ``nn.Embedding`` tables and UViTBert's ``embeddings``
# are ``<name>.weight`` (not ``<name>.embedding.weight``); checkpoints written by older
# transformers also carry the constant buffer ``model.embeddings.position_ids``.
GENERATOR_MAP = NameMap(
    "MaskGIT generator (bytedance/1d-tokenizer ImageBert / UViTBert layout)",
    list_names=("layer", "in_blocks", "out_blocks"),
    scanned=("layer", "in_blocks", "out_blocks"),
    overrides=((r"embeddings/embedding$", IDENTITY, (r"\.embedding\.weight$", ".weight")),),
    ignored=(r"^model\.embeddings\.position_ids$",),
)


def name_map_for(model_config) -> NameMap:
    maps = {"maskgit_vqgan": VQGAN_MAP, "alit": ALIT_MAP, "maskgit": GENERATOR_MAP}
    return maps.get(model_config.name, TITOK_MAP)


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch  # only reached for tensors that came from torch.load
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.detach().cpu().numpy()


def _existing_file(path: str) -> epath.Path:
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return file


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat ``{key: tensor}`` weights file (.safetensors, or .bin/.pt/.pth via torch)."""
    path = os.fspath(path)
    file = _existing_file(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load
        return dict(load(file.read_bytes()))
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyTorch: pip install 'titok-jax[torch]', "
                              "or convert the file to .safetensors first") from e
        try:
            obj = torch.load(io.BytesIO(file.read_bytes()), map_location="cpu",
                             weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} holds objects other than tensors; refusing to unpickle it "
                             f"(loaded with weights_only=True): {str(e).splitlines()[0]}") from e
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path} is not a flat state dict; non-tensor entries: {bad[:10]}")
        return {k: _to_numpy(v) for k, v in obj.items()}
    raise ValueError(f"unsupported weights file {path!r}: expected .safetensors, .bin, .pt or .pth")


def read_training_checkpoint(path: str | os.PathLike, which: str = "ema") -> dict[str, np.ndarray]:
    """The ``which`` (``ema`` or ``model``) state dict of an official training checkpoint such as
    ALIT's ``{"model", "ema", "optimizer", "epoch", "scaler", "args"}`` files; flat state dicts
    and ``.safetensors`` pass through :func:`read_state_dict`.

    ``args`` is an ``argparse.Namespace``: it is allow-listed for ``torch.load(weights_only=True)``
    (a Namespace only restores attributes); anything else non-tensor is still refused.
    """
    path = os.fspath(path)
    file = epath.Path(path)
    if path.endswith(".safetensors") or not file.is_file():
        return read_state_dict(path)
    import argparse

    import torch
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(file.read_bytes()), map_location="cpu",
                             weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and an argparse.Namespace; "
                         f"refusing to unpickle it: {str(e).splitlines()[0]}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    if which in obj and isinstance(obj[which], Mapping):
        obj = obj[which]
    elif any(isinstance(v, Mapping) for v in obj.values()):
        raise ValueError(f"{path} is a training checkpoint without a {which!r} state dict; "
                         f"its entries: {sorted(obj)}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries in the state dict: {bad[:10]}")
    return {k: _to_numpy(v) for k, v in obj.items()}


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.numpy import save
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                          metadata=dict(metadata or {})))


def vqgan_as_pixel_decoder(vqgan_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The MaskGIT-VQGAN keys a stage-2 TiTok expects, from a ``maskgit-vqgan`` state dict:
    ``decoder.*`` -> ``pixel_decoder.*`` and ``quantize.*`` -> ``pixel_quantize.*`` (the
    official stage-2 initialisation; the VQGAN encoder is not needed)."""
    out = {}
    for k, v in vqgan_state.items():
        if k.startswith(("decoder.", "quantize.")):
            out["pixel_" + k] = v
    return out


def import_official(state_dict: Mapping[str, np.ndarray], abstract_params, model_config) -> dict:
    return import_state_dict(state_dict, abstract_params, name_map_for(model_config))


def export_official(params, model_config) -> dict[str, np.ndarray]:
    return export_state_dict(params, name_map_for(model_config))


def config_metadata(model_config) -> dict[str, str]:
    return {"format": "pt", "titok_jax_model": json.dumps(model_config.to_dict())}
