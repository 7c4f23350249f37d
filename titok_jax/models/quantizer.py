"""Bottlenecks of the TiTok family: a vector quantizer and a diagonal-Gaussian (VAE) posterior.

Both work on token-major latents ``[..., C]`` (TiTok: ``[B, N, C]``; VQGAN: ``[B, H, W, C]``) and
always compute in float32, as the official quantizer does under ``autocast(enabled=False)``.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize`` semantics: ``x / max(||x||, eps)`` on the last axis."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_code(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (int32 ids of the nearest codebook rows, squared distances ``[..., K]``).

    Uses ``||z||^2 + ||e||^2 - 2 z.e`` like the official code; the matmul runs at the highest
    precision so that accelerators (TF32/bf16 defaults) pick the same ids as float32 PyTorch.
    """
    dots = jnp.einsum("...c,kc->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
    dist = (jnp.sum(jnp.square(z), axis=-1, keepdims=True) + jnp.sum(jnp.square(codebook), axis=-1)
            - 2.0 * dots)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32), dist


def _uniform_pm(scale: float):
    """U(-scale, scale), the official codebook init."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class QuantizerOutput(NamedTuple):
    z_quantized: jax.Array      # straight-through: value of the code, gradient of z
    ids: jax.Array              # int32 [...]
    quantizer_loss: jax.Array   # commitment_loss + codebook_loss
    commitment_loss: jax.Array  # includes commitment_cost
    codebook_loss: jax.Array


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ with optional l2-normalised codes (TiTok ``VectorQuantizer``)."""

    codebook_size: int
    token_size: int
    use_l2_norm: bool = False
    commitment_cost: float = 0.25

    def setup(self):
        k = self.codebook_size
        self.embedding = self.param(
"embedding", _uniform_pm(1.0 / k), (k, self.token_size), jnp.float32)

    def codebook(self) -> jax.Array:
        """The codebook as used for lookups (l2-normalised rows when ``use_l2_norm``)."""
        return l2_normalize(self.embedding) if self.use_l2_norm else self.embedding

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Code vectors ``[..., C]`` for int ids ``[...]``."""
        return jnp.take(self.codebook(), ids, axis=0)

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        z = z.astype(jnp.float32)
        if self.use_l2_norm:
            z = l2_normalize(z)
        codebook = self.codebook()
        ids, _ = nearest_code(z, codebook)
        zq = jnp.take(codebook, ids, axis=0)
        sg = jax.lax.stop_gradient
        commitment = self.commitment_cost * jnp.mean(jnp.square(sg(zq) - z))
        codebook_loss = jnp.mean(jnp.square(zq - sg(z)))
        return QuantizerOutput(z + sg(zq - z), ids, commitment + codebook_loss, commitment,
                               codebook_loss)


class DiagonalGaussian(NamedTuple):
    """Posterior of the TiTok VAE: the first half of the channels is the mean, the rest logvar."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL to N(0, I) summed over channels: ``[B, N]`` for ``[B, N, C]`` latents."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                             axis=-1)


def clustering_update(embedding: jax.Array, z: jax.Array, embed_prob: jax.Array, *,
                      use_l2_norm: bool, decay: float = 0.99) -> tuple[jax.Array, jax.Array]:
    """One step of the official ``clustering_vq`` (CVQ-VAE) codebook re-seeding, outside the
    gradient: returns (new codebook, new usage EMA).

    The usage EMA of each code (decay 0.99) over the batch's assignments; each code is pulled
    towards the batch feature nearest to it (un-normalised ``z``) with weight
    ``exp(-usage * K * 10 / (1 - decay) - 1e-3)``, so unused codes are replaced by a feature and
    well-used ones stay. ``z``: the encoder's latents ``[..., C]`` of the whole global batch
    (under ``jit`` the batch is global, as the official all-gather makes it).
    """
    k, c = embedding.shape
    flat = z.reshape(-1, c).astype(jnp.float32)
    query = l2_normalize(flat) if use_l2_norm else flat
    codes = l2_normalize(embedding) if use_l2_norm else embedding
    ids, dist = nearest_code(query, codes)
    usage = jnp.mean(jax.nn.one_hot(ids, k, dtype=jnp.float32), axis=0)
    embed_prob = embed_prob * decay + usage * (1.0 - decay)
    nearest_feature = flat[jnp.argmin(dist, axis=0)]
    weight = jnp.exp(-(embed_prob * k * 10.0) / (1.0 - decay) - 1e-3)[:, None]
    return embedding * (1.0 - weight) + nearest_feature * weight, embed_prob
