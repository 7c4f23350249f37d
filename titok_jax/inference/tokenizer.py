"""The public Python API: load a tokenizer, encode images to tokens, decode tokens to images.

    tok = titok_jax.load_tokenizer("titok_l32", "tokenizer_titok_l32.bin")
    ids = tok.encode(images)        # float32 [B, 256, 256, 3] in [0, 1] -> int32 [B, 32]
    out = tok.decode_tokens(ids)    # float32 [B, 256, 256, 3] in [0, 1]
    out = tok.decode_tokens(ids[:, :8])  # the first k tokens only (variable length, k <= N)
    tok.save("my_tokenizer")        # titok-jax folder (config.json + params.safetensors)
    titok_jax.export_pytorch(tok, "model.safetensors")  # official PyTorch key names
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax.convert import native, official
from titok_jax.convert.layout import CheckpointMismatchError
from titok_jax.inference import weights
from titok_jax.models import variants

_IMAGE_HINT = "float32 images [B, {s}, {s}, 3] (NHWC) with values in [0, 1]"



def check_images(images: Any, image_size: int) -> jax.Array:
    """Validates a batch of images and returns it as a float32 array, or raises a ValueError
    that says what was expected."""
    hint = _IMAGE_HINT.format(s=image_size)
    shape = tuple(np.shape(images))
    dtype = np.dtype(getattr(images, "dtype", np.float64))
    if len(shape) == 3 and shape[-1] == 3:
        raise ValueError(f"expected {hint}, got a single image of shape {shape}: add a batch axis")
    if len(shape) != 4:
        raise ValueError(f"expected {hint}, got shape {shape}")
    if shape[1] == 3 and shape[-1] != 3:
        raise ValueError(f"expected {hint}, got NCHW shape {shape}: use x.transpose(0, 2, 3, 1)")
    if shape[1:] != (image_size, image_size, 3):
        raise ValueError(f"expected {hint}, got shape {shape}: resize/crop to "
                         f"{image_size}x{image_size} RGB first")
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"expected {hint}, got dtype {dtype}: for uint8 images use x / 255.0")
    x = jnp.asarray(images, jnp.float32)
    if not isinstance(x, jax.core.Tracer):
        lo, hi = float(jnp.min(x)), float(jnp.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("images contain NaN or inf")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"expected {hint}, got values in [{lo:.3g}, {hi:.3g}]"
                             + (": for 0..255 data divide by 255" if hi > 2 else ""))
    return x


class Tokenizer:
    """A TiTok model bound to its parameters, with jitted encode/decode.

    For a stage-1 model (``finetune_decoder`` False, proxy-code head) ``decode_tokens`` needs a
    MaskGIT-VQGAN (``vqgan``): the argmax proxy codes are decoded by it, as in official training.

    Variable length: ``decode_tokens`` takes the first k of the N tokens (``[B, k]``, 1 <= k <=
    N); the missing tail is removed by attention masking in the decoder (``models/titok.py``),
    the rule tail-drop training (``config.tail_drop``) trains for. Any TiTok decodes that way;
    one trained without tail drop just degrades faster as k shrinks.
    """

    def __init__(self, model_config: ml_collections.ConfigDict, params: dict,
                 vqgan: "VQGAN | None" = None):
        self.config = model_config
        self.module = variants.build_model(model_config)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.vqgan = vqgan
        m = self.module
        self._encode = jax.jit(functools.partial(m.apply, method=m.encode))
        self._decode_tokens = jax.jit(functools.partial(m.apply, method=m.decode_tokens))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def is_vae(self) -> bool:
        return self.config.quantize_mode == "vae"

    def _vars(self):
        return {"params": self.params}

    def encode(self, images: Any, rng: jax.Array | None = None) -> jax.Array:
        """VQ: int32 token ids ``[B, N]``. VAE: latents ``[B, N, C]``: the posterior mean, or a
        sample when ``rng`` is given (use :meth:`encode_posterior` for mean/logvar)."""
        x = check_images(images, self.image_size)
        out = self._encode(self._vars(), x)
        if self.is_vae:
            return out.mean if rng is None else out.sample(rng)
        return out.ids

    def encode_posterior(self, images: Any):
        """VAE only: the :class:`DiagonalGaussian` posterior (mean, logvar, kl())."""
        if not self.is_vae:
            raise ValueError("encode_posterior is for VAE models; this model is VQ")
        return self._encode(self._vars(), check_images(images, self.image_size))

    def _check_tokens(self, tokens: Any) -> jax.Array:
        """Ids ``[B, k]`` (VAE: latents ``[B, k, C]``), 1 <= k <= N, validated."""
        shape = tuple(np.shape(tokens))
        n = self.num_tokens
        fewer = f"(or the first k <= {n} of them)"
        if self.is_vae:
            c = self.config.token_size
            if len(shape) != 3 or shape[2] != c or not 1 <= shape[1] <= n:
                raise ValueError(f"expected VAE latents [B, {n}, {c}] {fewer}, got shape {shape}")
            return jnp.asarray(tokens, jnp.float32)
        if len(shape) == 3 and shape[1] == 1:  # the official [B, 1, N] layout
            tokens = np.asarray(tokens)[:, 0]
            shape = tokens.shape
        if len(shape) != 2 or not 1 <= shape[1] <= n:
            raise ValueError(f"expected token ids [B, {n}] {fewer}, got shape {shape}")
        if not np.issubdtype(np.dtype(getattr(tokens, "dtype", np.float64)), np.integer):
            raise ValueError(f"expected integer token ids, got dtype {tokens.dtype}")
        ids = jnp.asarray(tokens, jnp.int32)
        lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
        if lo < 0 or hi >= self.config.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size}), "
                             f"got [{lo}, {hi}]")
        return ids

    def decode_raw(self, tokens: Any) -> jax.Array:
        """The model's decoder output, unclamped: RGB, or proxy logits for a stage-1 model."""
        tokens = self._check_tokens(tokens)
        b, k = tokens.shape[:2]
        if k == self.num_tokens:
            return self._decode_tokens(self._vars(), tokens)
        # Padded to N (one compiled shape for every k) and masked from k on.
        pad = [(0, 0), (0, self.num_tokens - k)] + [(0, 0)] * (tokens.ndim - 2)
        return self._decode_tokens(self._vars(), jnp.pad(tokens, pad),
                                   jnp.full((b,), k, jnp.int32))

    def decode_tokens(self, tokens: Any) -> jax.Array:
        """float32 images ``[B, H, W, 3]`` clipped to [0, 1], from ids ``[B, k]`` (VAE: latents
        ``[B, k, C]``), the first k <= N tokens of :meth:`encode`."""
        out = self.decode_raw(tokens)
        if self.module.outputs_proxy_codes:
            if self.vqgan is None:
                raise ValueError("this is a stage-1 tokenizer (it predicts MaskGIT-VQGAN codes); "
                                 "pass vqgan_path= to load_tokenizer to decode them to pixels")
            return self.vqgan.decode(jnp.argmax(out, axis=-1).reshape(out.shape[0], -1))
        return jnp.clip(out, 0.0, 1.0)

    def reconstruct(self, images: Any, num_tokens: int | None = None) -> jax.Array:
        """Encode + decode; ``num_tokens``: decode only the first k tokens."""
        tokens = self.encode(images)
        return self.decode_tokens(tokens if num_tokens is None else tokens[:, :num_tokens])

    def save(self, directory: str | os.PathLike) -> None:
        """Writes a titok-jax checkpoint folder that :func:`load_tokenizer` reads back exactly."""
        native.save_native(directory, self.config, jax.device_get(self.params))


class VQGAN:
    """The MaskGIT-VQGAN bound to its parameters: ``encode`` -> ids [B, 256], ``decode``."""

    def __init__(self, model_config: ml_collections.ConfigDict, params: dict):
        self.config = model_config
        self.module = variants.build_model(model_config)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        m = self.module
        self._encode = jax.jit(functools.partial(m.apply, method=m.encode))
        self._decode = jax.jit(functools.partial(m.apply, method=m.decode))

    def encode(self, images: Any) -> jax.Array:
        return self._encode({"params": self.params}, check_images(images, 256))

    def decode(self, ids: Any) -> jax.Array:
        return self._decode({"params": self.params}, jnp.asarray(ids, jnp.int32))


def load_vqgan(path: str | os.PathLike, name: str = "maskgit_vqgan") -> VQGAN:
    """Loads ``maskgit-vqgan-imagenet-f16-256.bin`` (or its safetensors/titok-jax copy)."""
    cfg = variants.model_config_for(name)
    return VQGAN(cfg, weights.load_params(cfg, path))


def load_tokenizer(name: str, path: str | os.PathLike, *, stage: int | None = None,
                   vqgan_path: str | os.PathLike | None = None,
                   model_config: ml_collections.ConfigDict | None = None,
                   dtype: str | None = None) -> Tokenizer:
    """Loads a TiTok tokenizer.

    Args:
      name: ``titok_l32``, ``titok_b64``, ``titok_s128``, ``titok_bl64_vq``, ``titok_bl128_vq``,
        ``titok_sl256_vq``, ``titok_ll32_vae``, ``titok_bl64_vae``, ``titok_bl128_vae`` (or the
        official ``tokenizer_titok_*`` names); ignored when ``path`` is a titok-jax folder.
      path: an official state dict (``.bin``/``.pt`` via ``torch.load(weights_only=True)``, or
        ``.safetensors``) or a titok-jax checkpoint folder, local or ``gs://``.
      stage: 1 for a stage-1 checkpoint (proxy-code head, no pixel decoder); the default is the
        released two-stage tokenizer.
      vqgan_path: the MaskGIT-VQGAN weights. With ``stage=1`` they decode the predicted proxy
        codes; for a stage-2 model they supply ``pixel_decoder``/``pixel_quantize`` when the
        checkpoint lacks them (the official stage-2 initialisation).
      model_config: overrides ``name`` with an explicit ``config.model`` block.
      dtype: compute dtype (``float32`` default, ``bfloat16``); parameters stay float32.
    """
    source = weights.WeightsSource(path)
    stored = source.model_config()
    if stored is not None:
        cfg = stored if model_config is None else model_config
    elif model_config is not None:
        cfg = ml_collections.ConfigDict(model_config.to_dict())
    else:
        cfg = variants.model_config_for(name)
        if stage is not None:
            cfg = variants.titok_model_config(cfg.variant, stage=stage)
    if cfg.name != "titok":
        raise ValueError(f"{name!r} is not a TiTok tokenizer; use load_vqgan for the VQGAN")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    vqgan, extra = None, {}
    if vqgan_path is not None:
        vqgan = load_vqgan(vqgan_path, "maskgit_vqgan_tiny" if cfg.get("vqgan") == "tiny"
                           else "maskgit_vqgan")
        if cfg.finetune_decoder and source.kind == "weights":
            extra = official.vqgan_as_pixel_decoder(official.export_official(
                jax.device_get(vqgan.params), vqgan.config))
    try:
        params = weights.load_params(cfg, source, extra_state=extra)
    except CheckpointMismatchError as e:
        if cfg.finetune_decoder and e.missing and all(k.startswith("pixel_") for k in e.missing):
            raise CheckpointMismatchError(
                f"{cfg.name} ({path})", e.missing, e.unexpected, e.misshaped,
                hint="this looks like a stage-1 checkpoint: pass stage=1, or vqgan_path= to add "
                     "the MaskGIT-VQGAN pixel decoder") from None
        raise
    if dtype is not None:
        cfg.dtype = dtype
    stage1 = cfg.is_legacy and not cfg.finetune_decoder
    return Tokenizer(cfg, params, vqgan=vqgan if stage1 else None)


def export_pytorch(tok: Tokenizer | VQGAN, path: str | os.PathLike) -> None:
    """Writes the model's weights under the official PyTorch key names as ``.safetensors``
    (``safetensors.torch.load_file`` + ``load_state_dict(strict=True)`` in the official code)."""
    state = official.export_official(jax.device_get(tok.params), tok.config)
    official.write_safetensors(state, path, official.config_metadata(tok.config))
