"""taming's PatchGAN (``NLayerDiscriminator`` of taming-transformers, as ALIT's stage-2
``VQLPIPSWithDiscriminator`` builds it) in Flax, and the ``gan_losses.{k}.discriminator.*`` keys of
ALIT's stage-2 checkpoints.

NHWC images -> patch logits ``[B, h, w, 1]`` (30 x 30 at 256 px): Conv4x4/2 + LeakyReLU(0.2),
then ``n_layers - 1`` x (Conv4x4/2 -> BatchNorm -> LeakyReLU), one Conv4x4/1 -> BatchNorm ->
LeakyReLU and Conv4x4/1 -> 1 channel. Every conv pads 1 pixel; the convs followed by BatchNorm
have no bias. Flax names are ``main_<i>``, the index in the official ``nn.Sequential``.

BatchNorm follows ``torch.nn.BatchNorm2d`` exactly: batch statistics with the biased variance in
training mode, running statistics updated with momentum 0.1 and the *unbiased* variance (Flax's
``nn.BatchNorm`` would store the biased one), plus ``num_batches_tracked``; all three live in the
``batch_stats`` collection. Under ``jax.jit`` over a sharded global batch the statistics are those
of the global batch (synchronized BatchNorm), where torch DDP normalises each GPU's share alone.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from titok_jax.convert.layout import CheckpointMismatchError, NameMap, export_state_dict

Dtype = Any

PATCHGAN_MAP = NameMap("PatchGAN (taming NLayerDiscriminator layout)", list_names=("main",))

# Official keys of discriminator k inside ALIT's stage-2 state dict.
GAN_LOSSES_PREFIX = "gan_losses.{}.discriminator."
_STATS = {"mean": "running_mean", "var": "running_var",
          "num_batches_tracked": "num_batches_tracked"}


def _conv_bias_init(fan_in: int):
    """PyTorch's default Conv2d bias init (``weights_init`` leaves biases alone)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` on NHWC (see the module docstring); weight ~ N(1, 0.02), bias 0
    (taming's ``weights_init``)."""

    momentum: float = 0.1   # PyTorch's convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        x = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
                running_var.value = (1 - m) * running_var.value + m * jax.lax.stop_gradient(
                    var) * (n / max(n - 1, 1))
                count.value = count.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class PatchGAN(nn.Module):
    """taming's ``NLayerDiscriminator(input_nc=3, ndf, n_layers, use_actnorm=False)`` with
    ``weights_init`` (conv weights ~ N(0, 0.02))."""

    ndf: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        def conv(features: int, stride: int, bias: bool, index: int, h: jax.Array) -> jax.Array:
            return nn.Conv(features, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                           use_bias=bias, dtype=self.dtype,
                           kernel_init=nn.initializers.normal(0.02),
                           bias_init=_conv_bias_init(h.shape[-1] * 16), name=f"main_{index}")(h)

        act = lambda h: nn.leaky_relu(h, negative_slope=0.2)  # noqa: E731
        h = act(conv(self.ndf, 2, True, 0, x.astype(self.dtype)))
        index = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = conv(self.ndf * min(2 ** n, 8), stride, False, index, h)
            h = act(BatchNorm(name=f"main_{index + 1}")(h, train).astype(self.dtype))
            index += 3
        return conv(1, 1, True, index, h).astype(jnp.float32)


def init_discriminators(module: PatchGAN, rng: jax.Array, image_size: int,
                        count: int) -> tuple[dict, dict]:
    """``count`` independently initialised discriminators: (params, batch_stats), each a dict
    ``{"0": ..., "1": ...}``."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params, stats = {}, {}
    for k in range(count):
        v = module.init(jax.random.fold_in(rng, k), dummy, train=False)
        params[str(k)], stats[str(k)] = v["params"], v["batch_stats"]
    return params, stats


def _stat_keys(stats: Mapping) -> dict[tuple[str, ...], str]:
    """Flax ``batch_stats`` path -> official key (``main_3/mean`` -> ``main.3.running_mean``)."""
    out = {}
    for path in traverse_util.flatten_dict(dict(stats)):
        *modules, leaf = path
        out[path] = ".".join([re.sub(r"^main_(\d+)$", r"main.\1", m) for m in modules]
                             + [_STATS[leaf]])
    return out


def export_official(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Discriminators ``{k: params}``, ``{k: batch_stats}`` -> ``gan_losses.{k}.discriminator.*``
    in PyTorch layouts (``num_batches_tracked`` as int64, as torch stores it)."""
    out = {}
    for k in params:
        prefix = GAN_LOSSES_PREFIX.format(k)
        for key, value in export_state_dict(jax.device_get(params[k]), PATCHGAN_MAP).items():
            out[prefix + key] = value
        flat = traverse_util.flatten_dict(dict(jax.device_get(stats[k])))
        for path, key in _stat_keys(stats[k]).items():
            value = np.asarray(flat[path])
            out[prefix + key] = value.astype(np.int64) if key.endswith("tracked") else value
    return out


def has_discriminators(state_dict: Mapping[str, Any]) -> bool:
    return any(re.match(r"^gan_losses\.\d+\.discriminator\.", k) for k in state_dict)


def import_official(state_dict: Mapping[str, np.ndarray], abstract_params: Mapping[str, Any],
                    abstract_stats: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    """``gan_losses.{k}.discriminator.*`` of an official state dict -> (``{k: params}``,
    ``{k: batch_stats}``) shaped like the abstract trees. Other ``gan_losses`` keys (the LPIPS
    copies) are ignored. Raises ValueError naming ``source`` and every missing, unexpected or
    mis-shaped discriminator key; nothing loads partially."""
    expected: dict[str, tuple[str, tuple[str, ...], Any, Any]] = {}
    for k in abstract_params:
        prefix = GAN_LOSSES_PREFIX.format(k)
        for e in PATCHGAN_MAP.entries(abstract_params[k]):
            leaf = traverse_util.flatten_dict(dict(abstract_params[k]))[e.flax_path]
            expected[prefix + e.torch_key] = ("params", (k,) + e.flax_path, leaf, e.transform)
        flat_stats = traverse_util.flatten_dict(dict(abstract_stats[k]))
        for path, key in _stat_keys(abstract_stats[k]).items():
            expected[prefix + key] = ("stats", (k,) + path, flat_stats[path], None)
    present = {key for key in state_dict if re.match(r"^gan_losses\.\d+\.discriminator\.", key)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshaped, trees = [], {"params": {}, "stats": {}}
    for key in sorted(present & set(expected)):
        kind, path, leaf, transform = expected[key]
        value = np.asarray(state_dict[key])
        want = tuple(leaf.shape) if transform is None else tuple(
            transform.to_torch(np.empty(leaf.shape, np.uint8)).shape)
        if tuple(value.shape) != want:
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)}, model expects {want}")
            continue
        value = value if transform is None else transform.to_flax(value)
        trees[kind][path] = np.array(value, dtype=leaf.dtype, order="C")  # keeps 0-d arrays 0-d
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(
            f"the {len(abstract_params)} ALIT stage-2 discriminators (gan_losses.*) of {source}",
            missing, unexpected, misshaped)
    return (traverse_util.unflatten_dict(trees["params"]),
            traverse_util.unflatten_dict(trees["stats"]))


def load_official(path: str | os.PathLike, abstract_params: Mapping[str, Any],
                  abstract_stats: Mapping[str, Any]) -> tuple[dict, dict] | None:
    """The discriminators of an official ALIT stage-2 file, from its ``model`` state dict (the
    live discriminators: the ``ema`` copy never updates its BatchNorm buffers); None when the file
    holds no ``gan_losses.*.discriminator`` key (a stage-1 checkpoint)."""
    from titok_jax.convert.official import read_training_checkpoint
    state_dict = read_training_checkpoint(path, which="model")
    if not has_discriminators(state_dict):
        return None
    return import_official(state_dict, abstract_params, abstract_stats, os.fspath(path))
