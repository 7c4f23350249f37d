"""The official TiTok patch discriminator (``NLayerDiscriminator`` of bytedance/1d-tokenizer,
the MaskBit-style one) in Flax, with its checkpoint name map.

NHWC images in [0, 1] -> patch logits ``[B, pool_size, pool_size, 1]``. Every convolution is the
official ``Conv2dSame`` (TF "SAME" padding, bias); for the stride-1 convolutions and for the
stride-2 blur that is exactly XLA's ``"SAME"`` (total pad ``max((ceil(i/s)-1)*s + k - i, 0)``,
the smaller half first).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.convert.layout import NameMap, export_state_dict, import_state_dict
from titok_jax.convert.official import read_state_dict

Dtype = Any

# Binomial blur filters by size (the official ``BLUR_KERNEL_MAP``).
_BLUR_TAPS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}

DISCRIMINATOR_MAP = NameMap(
    "NLayerDiscriminator (bytedance/1d-tokenizer discriminator.py layout)",
    list_names=("block_in", "to_logits"),
    # ``blocks_<stage>_<index in the stage's Sequential>`` -> ``blocks.<stage>.<index>``.
    renames=((r"^blocks_(\d+)_(\d+)\.", r"blocks.\1.\2."),),
    # The blur filter is a fixed buffer, rebuilt here from the kernel size.
    ignored=(r"^blocks\.\d+\.1\.kernel$",),
)


def blur_downsample(x: jax.Array, kernel_size: int = 4) -> jax.Array:
    """Depthwise normalised binomial blur with stride 2 and TF-SAME padding (``BlurBlock``).

    The filter is the outer product of the normalised taps, so it runs as two 1-D passes, each
    a weighted sum of strided slices: XLA:CPU's grouped convolution took 0.55 s forward and
    4.5 s forward + backward on [8, 256, 256, 128], the slices 0.13 s and 0.27 s (the
    discriminator's forward + backward at batch 8: 14.6 -> 7.5 s). Same filter, rounding of a
    separable sum (|diff| <= 5e-7 on unit-normal input)."""
    taps = np.asarray(_BLUR_TAPS[kernel_size], np.float32)
    taps = taps / taps.sum()
    return _strided_taps(_strided_taps(x, taps, axis=1), taps, axis=2)


def _strided_taps(x: jax.Array, taps: np.ndarray, axis: int, stride: int = 2) -> jax.Array:
    """``sum_j taps[j] * x_pad[stride * i + j]`` along ``axis`` with TF-SAME padding."""
    n, k = x.shape[axis], len(taps)
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (total // 2, total - total // 2)
    padded = jnp.pad(x, pad)
    acc = None
    for j, t in enumerate(taps):
        term = jax.lax.slice_in_dim(padded, j, j + stride * (out - 1) + 1, stride=stride,
                                    axis=axis) * jnp.asarray(t, x.dtype)
        acc = term if acc is None else acc + term
    return acc


def _bin_indices(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, widest bin]`` input indices of PyTorch's adaptive pooling bins
    (``[floor(i*in/out), ceil((i+1)*in/out))``), short bins padded by repeating their last index
    (a repeat does not change a maximum)."""
    bins = [range(math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out))
            for i in range(size_out)]
    width = max(len(b) for b in bins)
    return np.asarray([list(b) + [b[-1]] * (width - len(b)) for b in bins], np.int32)


def adaptive_max_pool(x: jax.Array, size: int) -> jax.Array:
    """``torch.nn.AdaptiveMaxPool2d((size, size))`` on NHWC: each output cell is the maximum of
    its PyTorch bin, so a smaller map is enlarged by repetition exactly as torch does."""
    rows = _bin_indices(x.shape[1], size)
    x = jnp.max(x[:, rows], axis=2)
    cols = _bin_indices(x.shape[2], size)
    return jnp.max(x[:, :, cols], axis=3)


class NLayerDiscriminator(nn.Module):
    """Conv5x5 + LeakyReLU(0.1); ``num_stages`` x (Conv3x3 -> blur/2 -> GroupNorm(32) ->
    LeakyReLU); adaptive max pool to ``pool_size``; Conv1x1 + LeakyReLU + Conv5x5 -> 1 logit."""

    num_channels: int = 3
    hidden_channels: int = 128
    num_stages: int = 3
    blur_kernel_size: int = 4
    pool_size: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got images {x.shape}")
        act = lambda h: nn.leaky_relu(h, negative_slope=0.1)  # noqa: E731

        def conv(h: jax.Array, features: int, kernel: int, name: str) -> jax.Array:
            # PyTorch's default Conv2d init (the official loss module leaves it as is):
            # weight and bias ~ U(+-1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(kernel * kernel * h.shape[-1])
            return nn.Conv(
                features, (kernel, kernel), padding="SAME", dtype=self.dtype, name=name,
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                    key, shape, dtype, -bound, bound))(h)

        h = act(conv(x.astype(self.dtype), self.hidden_channels, 5, "block_in_0"))
        for i in range(self.num_stages):
            h = conv(h, self.hidden_channels * 2 ** i, 3, f"blocks_{i}_0")
            h = blur_downsample(h, self.blur_kernel_size)
            h = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False,
                             dtype=self.dtype, name=f"blocks_{i}_2")(h)
            h = act(h)
        h = adaptive_max_pool(h, self.pool_size)
        h = act(conv(h, h.shape[-1], 1, "to_logits_0"))
        return conv(h, 1, 5, "to_logits_2").astype(jnp.float32)


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys under ``[<anything>.]discriminator.`` (e.g. the official loss module's state dict)
    lose that prefix and everything else is dropped; a bare state dict passes through."""
    nested = {k.split("discriminator.", 1)[1]: v for k, v in state_dict.items()
              if k.startswith("discriminator.") or ".discriminator." in k}
    return nested if nested else dict(state_dict)


def import_discriminator(state_dict: Mapping[str, np.ndarray], abstract_params) -> dict:
    """Official discriminator state dict (bare or under ``discriminator.``) -> Flax params shaped
    like ``abstract_params``. Raises ValueError listing missing/unexpected/mis-shaped keys."""
    return import_state_dict(_strip_prefix(state_dict), abstract_params, DISCRIMINATOR_MAP)


def export_discriminator(params) -> dict[str, np.ndarray]:
    """Flax params -> the official key names and layouts (without the fixed blur buffers)."""
    return export_state_dict(params, DISCRIMINATOR_MAP)


def load_discriminator(path: str | os.PathLike, abstract_params) -> dict:
    """Reads an official discriminator (``.safetensors``, or a torch state dict loaded with
    ``weights_only=True``); errors name the file."""
    state_dict = read_state_dict(path)
    try:
        return import_discriminator(state_dict, abstract_params)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from e
