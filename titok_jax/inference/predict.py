"""Tokenizers as pure prediction functions, built from a config: the model, its frozen parts and
``reconstruct`` / ``features`` functions of the params.

Shared by the training tasks (image grids, periodic evaluation) and by evaluation outside
training (``titok-jax eval``), so neither needs the other.

Params of a :class:`Predictor` are ``{"model": trainable params, "frozen": frozen params}``:

* TiTok with a proxy-code head (stage 1): ``frozen = {"teacher": MaskGIT-VQGAN params}``; the
  argmax proxy codes are decoded by the VQGAN, as in the official stage-1 evaluation.
* ALIT: ``frozen = {"base_tokenizer": VQGAN params}`` (the VQGAN lives inside the ALIT tree;
  stage 1 keeps it frozen).
* Every other TiTok (two-stage releases with their pixel decoder, VQ-8k, VAE): ``frozen = {}``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from titok_jax.models import variants

log = logging.getLogger(__name__)

ALIT_FROZEN = "base_tokenizer"


@dataclasses.dataclass
class Predictor:
    """What image grids and evaluators need from a tokenizer, as pure functions of its params.

    ``reconstruct(params, images)`` -> ``{"recon": [B, H, W, 3] in [0, 1], "ids": int [B, N]}``
    (``ids`` only for discrete tokenizers); ``features(params, images)`` -> ``[B, D]``, the
    mean-pooled pre-quantization latents (linear probe).

    A generator's predictor also has ``generate(params, labels, key)`` -> images ``[B, H, W, 3]``
    in [0, 1]: class-conditional samples of the class labels ``[B]`` drawn with ``key`` (the
    ``gfid`` evaluator), and ``num_classes``.
    """

    reconstruct: Callable[[Any, jax.Array], dict[str, jax.Array]]
    features: Callable[[Any, jax.Array], jax.Array]
    image_size: int
    codebook_size: int  # 0 for continuous (VAE) tokenizers
    generate: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None
    num_classes: int = 0


def abstract_params(module, image_size: int) -> Any:
    """Parameter shapes of a module (no FLOPs, no memory)."""
    return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
                          )["params"]


def needs_teacher(model_config: ml_collections.ConfigDict) -> bool:
    """Whether the tokenizer depends on a frozen VQGAN it does not train: stage-1 TiTok (proxy
    codes) and ALIT."""
    if model_config.name == "alit":
        return True
    return model_config.name == "titok" and bool(model_config.is_legacy) and not bool(
        model_config.finetune_decoder)


def split_frozen(model_config, params: dict) -> tuple[dict, dict]:
    """A full parameter tree (what a titok-jax folder or official file holds) -> (trainable,
    frozen parts it contains). Only ALIT files carry a frozen part (its VQGAN)."""
    if model_config.name == "alit":
        params = dict(params)
        return params, {ALIT_FROZEN: params.pop(ALIT_FROZEN)}
    return params, {}


def merge_frozen(model_config, params: dict, frozen: dict) -> dict:
    """Inverse of :func:`split_frozen`: the tree the model's ``apply`` takes."""
    if model_config.name == "alit":
        return {**params, ALIT_FROZEN: frozen[ALIT_FROZEN]}
    return params


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The VQGAN model config of ``config.teacher`` (TiTok stage 1's proxy-code teacher)."""
    return variants.vqgan_model_config(config.teacher.size)


def predictor(config: ml_collections.ConfigDict, model=None,
              num_tokens: int | None = None) -> Predictor:
    """The :class:`Predictor` of ``config.model`` (ALIT: at ``config.eval.alit_iteration``).

    ``num_tokens``: reconstruct from the first k tokens only (TiTok: the rest removed by masking
    in the decoder; ALIT: the iteration that emits k tokens, a multiple of its tokens per
    iteration)."""
    model_cfg = config.model
    model = model if model is not None else variants.build_model(model_cfg)
    if model_cfg.name == "alit":
        iteration = config.eval.get("alit_iteration", -1) if "eval" in config else -1
        if num_tokens is not None:
            iteration = num_tokens // model_cfg.tokens_per_iter - 1
        return alit_predictor(model, model_cfg, iteration)
    teacher = variants.build_model(teacher_config(config)) if needs_teacher(model_cfg) else None
    return titok_predictor(model, model_cfg, teacher, num_tokens)


def titok_predictor(model, model_config, teacher=None,
                    num_tokens: int | None = None) -> Predictor:
    """A TiTok's :class:`Predictor`; a proxy-code model is decoded by ``teacher``;
    ``num_tokens``: the decoder sees the first k tokens only (``ids`` stay all N)."""
    vae = model_config.quantize_mode == "vae"
    full = num_tokens is None or num_tokens == model_config.num_latent_tokens

    def reconstruct(params, images):
        kept = None if full else jnp.full((images.shape[0],), num_tokens, jnp.int32)
        out = model.apply({"params": params["model"]}, images, num_tokens=kept)
        if model.outputs_proxy_codes:
            codes = jnp.argmax(out.decoded, -1).reshape(images.shape[0], -1)
            recon = teacher.apply({"params": params["frozen"]["teacher"]}, codes,
                                  method=teacher.decode)
        else:
            recon = out.decoded
        result = {"recon": jnp.clip(recon, 0.0, 1.0)}
        if not vae:
            result["ids"] = out.ids
        return result

    def features(params, images):
        z = model.apply({"params": params["model"]}, images, method=model.encoder_out)
        if vae:  # the posterior-mean half of the moments
            z = z[..., :model_config.token_size]
        return jnp.mean(z, axis=1)

    return Predictor(reconstruct, features, model_config.image_size,
                     0 if vae else model_config.codebook_size)


def alit_predictor(model, model_config, iteration: int = -1) -> Predictor:
    """ALIT at one iteration (``-1``: the last). Reconstructions use the soft code (clipped),
    ids are the iteration's 1D tokens, features its latent tokens (the official ``encode()``
    embedding), mean-pooled. Halting is the deterministic threshold rule."""
    k = iteration % model_config.max_iters

    def rollout(m, images):
        _, outs, _ = m.rollout(images, num_iters=k + 1, halting="threshold")
        return outs[-1]

    def variables(params):
        return {"params": merge_frozen(model_config, params["model"], params["frozen"])}

    def reconstruct(params, images):
        out = model.apply(variables(params), images, method=rollout)
        recon = model.apply(variables(params), out.logits, method=model.decode_pixels)
        result = {"recon": jnp.clip(recon, 0.0, 1.0)}
        if out.codes is not None:
            result["ids"] = out.codes
        return result

    def features(params, images):
        return jnp.mean(model.apply(variables(params), images, method=rollout).latent_tokens,
                        axis=1)

    return Predictor(reconstruct, features, model_config.image_size,
                     model_config.codebook_size if model_config.quantize_latent else 0)
