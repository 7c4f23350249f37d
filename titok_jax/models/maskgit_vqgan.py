"""MaskGIT-VQGAN: the frozen teacher of TiTok stage 1 (proxy codes) and its pixel decoder.

A convolutional VQGAN without attention, as released by google-research/maskgit and ported to
PyTorch by open-muse / TiTok. Quirks kept because the released weights depend on them:

* ResnetBlock convs have no bias, and when the channel count changes the 1x1 ``nin_shortcut`` is
  applied to the block's *output* (``h + nin(h)``), not to its input;
* downsampling is a 2x2 average pool, upsampling is nearest x2 followed by a 3x3 conv;
* GroupNorm has 32 groups and eps 1e-6; the mid stage has ``num_res_blocks`` blocks (the
  taming-style copy in ALIT: always 2);
* the decoder's ``up_{i}`` levels are stored in level order and run from the top level down.

Images are NHWC float in [0, 1]; latents are ``[B, h, w, z_channels]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.quantizer import VectorQuantizer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VQGANArch:
    """Architecture of a MaskGIT-VQGAN. The defaults are the released ImageNet-256 f16 model."""

    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    # Blocks of the mid stage; 0 means ``num_res_blocks`` (MaskGIT). The taming-style copy inside
    # ALIT always has 2 (``mid.block_1``/``mid.block_2``).
    num_mid_blocks: int = 0

    @property
    def mid_blocks(self) -> int:
        return self.num_mid_blocks or self.num_res_blocks

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _group_norm(name: str, dtype: Dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False,
                        name=name)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, bias: bool = True) -> nn.Conv:
    # Conv2dSame with stride 1 == symmetric 'SAME' padding.
    return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=bias, dtype=dtype,
                   name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm("norm1", self.dtype)(x))
        h = _conv(self.out_channels, 3, "conv1", self.dtype, bias=False)(h)
        h = nn.silu(_group_norm("norm2", self.dtype)(h))
        h = _conv(self.out_channels, 3, "conv2", self.dtype, bias=False)(h)
        if x.shape[-1] != self.out_channels:
            return h + _conv(self.out_channels, 1, "nin_shortcut", self.dtype, bias=False)(h)
        return h + x


class _Level(nn.Module):
    """One resolution level: ``num_blocks`` ResnetBlocks named ``block_{j}``, then an optional
    nearest-x2 upsample + ``upsample_conv`` (decoder levels above 0)."""

    out_channels: int
    num_blocks: int
    upsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dtype, name=f"block_{j}")(x)
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.out_channels, 3, "upsample_conv", self.dtype)(x)
        return x


class VQGANEncoder(nn.Module):
    arch: VQGANArch = VQGANArch()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        a = self.arch
        x = _conv(a.hidden_channels, 3, "conv_in", self.dtype, bias=False)(
            images.astype(self.dtype))
        last = len(a.channel_mult) - 1
        for i, mult in enumerate(a.channel_mult):
            x = _Level(a.hidden_channels * mult, a.num_res_blocks, dtype=self.dtype,
                       name=f"down_{i}")(x)
            if i != last:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        for j in range(a.mid_blocks):
            x = ResnetBlock(x.shape[-1], self.dtype, name=f"mid_{j}")(x)
        x = nn.silu(_group_norm("norm_out", self.dtype)(x))
        return _conv(a.z_channels, 1, "conv_out", self.dtype)(x)


class VQGANDecoder(nn.Module):
    arch: VQGANArch = VQGANArch()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        a = self.arch
        top = a.hidden_channels * a.channel_mult[-1]
        x = _conv(top, 3, "conv_in", self.dtype)(z.astype(self.dtype))
        for j in range(a.mid_blocks):
            x = ResnetBlock(top, self.dtype, name=f"mid_{j}")(x)
        for i in reversed(range(len(a.channel_mult))):
            x = _Level(a.hidden_channels * a.channel_mult[i], a.num_res_blocks, upsample=i > 0,
                       dtype=self.dtype, name=f"up_{i}")(x)
        x = nn.silu(_group_norm("norm_out", self.dtype)(x))
        return _conv(3, 3, "conv_out", self.dtype)(x).astype(jnp.float32)


class MaskGITVQGAN(nn.Module):
    """Encoder + plain (not l2-normalised) quantizer + decoder, keys ``encoder``/``quantize``/
    ``decoder`` as in ``maskgit-vqgan-imagenet-f16-256.bin``."""

    arch: VQGANArch = VQGANArch()
    dtype: Dtype = jnp.float32

    def setup(self):
        self.encoder = VQGANEncoder(self.arch, self.dtype)
        self.decoder = VQGANDecoder(self.arch, self.dtype)
        self.quantize = VectorQuantizer(self.arch.codebook_size, self.arch.z_channels)

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """Continuous encoder output ``[B, h, w, z]``."""
        return self.encoder(images).astype(jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        """int32 code ids ``[B, h*w]``, row-major over the latent grid."""
        ids = self.quantize(self.encode_latents(images)).ids
        return ids.reshape(ids.shape[0], -1)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Codebook vectors ``[B, h, w, z]`` for ids ``[B, h*w]`` (a square grid)."""
        side = int(round(ids.shape[-1] ** 0.5))
        if side * side != ids.shape[-1]:
            raise ValueError(f"expected a square number of codes, got {ids.shape[-1]}")
        return self.quantize.lookup(ids).reshape(ids.shape[0], side, side, -1)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """RGB ``[B, H, W, 3]`` from latents, not clamped."""
        return self.decoder(z)

    def decode(self, ids: jax.Array) -> jax.Array:
        """RGB in [0, 1] from code ids ``[B, h*w]``."""
        return jnp.clip(self.decode_latents(self.lookup(ids)), 0.0, 1.0)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images))
