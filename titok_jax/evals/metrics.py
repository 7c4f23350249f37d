"""Per-image reconstruction metrics in JAX (PSNR, SSIM, LPIPS-VGG) and codebook statistics.

PSNR and SSIM compare the uint8-rounded images (values 0..255), as users compare saved PNGs.
LPIPS runs on the same rounded images mapped to [-1, 1].
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
# PSNR of identical images is infinite; the MSE floor caps it (at ~148 dB for 0..255 images).
MSE_FLOOR = 1e-10


def psnr(a: jax.Array, b: jax.Array, data_range: float = 255.0) -> jax.Array:
    """Per-image PSNR in dB of ``[B, H, W, C]`` images."""
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, MSE_FLOOR))


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 255.0) -> jax.Array:
    """Per-image SSIM (Wang et al. 2004) of ``[B, H, W, C]`` images: Gaussian window (sigma 1.5,
    11 taps), K1 = 0.01, K2 = 0.03, population statistics, mean over the valid region and the
    channels. Equals ``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, channel_axis=-1)``."""
    w = jnp.asarray(_gaussian_window())

    def blur(x):  # separable valid filtering over H and W
        k = w.shape[0]
        h_out, w_out = x.shape[1] - k + 1, x.shape[2] - k + 1
        rows = sum(w[i] * x[:, i:i + h_out] for i in range(k))
        return sum(w[i] * rows[:, :, i:i + w_out] for i in range(k))

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                      * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def lpips_distance(module: nn.Module, params, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image LPIPS of ``[B, H, W, 3]`` images in [-1, 1]."""
    with jax.default_matmul_precision("highest"):
        d = module.apply({"params": params}, a, b)
    return d.reshape(d.shape[0])


def codebook_statistics(counts: np.ndarray) -> dict[str, float]:
    """From per-code counts: fraction of codes used, entropy of the code distribution in bits,
    and its perplexity (``2 ** entropy``)."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    entropy = float(-np.sum(nz * np.log2(nz)))
    return {"codebook_usage": float(np.mean(counts > 0)), "codebook_entropy_bits": entropy,
            "codebook_perplexity": float(2.0 ** entropy)}
