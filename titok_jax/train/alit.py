"""ALIT training pieces plugged into the shared trainer (``titok_jax/train/titok.py``).

Stage 1 (latent distillation, ``config.loss = "alit_stage1"``): the VQGAN is frozen, so its
parameters (``base_tokenizer`` of the Flax tree) live outside the train state and are passed to
the step like TiTok's teacher; everything else trains. Every iteration of the recurrence adds
``lambda_k * CE + code MSE + VQ loss`` (official weights), with the official stochastic
Bernoulli halting drawn from the step's key.

Stage 2 (full fine-tuning: one iteration per step with L1 + LPIPS + PatchGAN per iteration and
the VQGAN trainable) would move ``base_tokenizer`` into the train state and add a discriminator
state; it is not implemented yet.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from titok_jax.convert import official
from titok_jax.convert.layout import import_state_dict
from titok_jax.models.alit import StageOneLoss, stage1_loss
from titok_jax.train.state import TrainState, apply_update

log = logging.getLogger(__name__)

FROZEN = "base_tokenizer"


def split_frozen(params: dict) -> tuple[dict, dict]:
    """(trainable params, frozen VQGAN params)."""
    params = dict(params)
    return params, params.pop(FROZEN)


def merge(params: dict, frozen: dict) -> dict:
    return {**params, FROZEN: frozen}


def load_vqgan(config, model) -> dict:
    """The frozen VQGAN params (the ``base_tokenizer`` subtree) from ``config.teacher.weights``:
    an ALIT checkpoint (its ``base_tokenizer.vqgan.*``), a taming-layout VQGAN state dict, or the
    MaskGIT-VQGAN release (``maskgit-vqgan-imagenet-f16-256.bin``, same architecture). Without
    weights: a random VQGAN (tests only)."""
    size = config.model.image_size
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
    sub = abstract[FROZEN]
    if not config.teacher.weights:
        log.warning("config.teacher.weights is empty: using a RANDOM VQGAN as ALIT's base "
                    "tokenizer (only meaningful for tests)")
        params = jax.jit(model.init)(jax.random.PRNGKey(config.seed + 1),
                                     jnp.zeros((1, size, size, 3)))["params"]
        return params[FROZEN]
    state = official.read_training_checkpoint(config.teacher.weights)
    prefix = "base_tokenizer.vqgan."
    if any(k.startswith(prefix) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    elif any(".mid.block_" in k for k in state):
        state = {prefix + k: v for k, v in state.items()}
    else:  # MaskGIT-VQGAN release layout
        return {"vqgan": import_state_dict(state, sub["vqgan"], official.VQGAN_MAP)}
    return import_state_dict(state, {FROZEN: sub}, official.ALIT_MAP)[FROZEN]


def make_train_step(model, config, tx, schedule):
    """``(state, batch, vqgan_params, key) -> (state, metrics)`` for stage 1."""
    weights = StageOneLoss(lambdas=tuple(config.alit.lambdas),
                           code_weight=config.alit.code_weight,
                           quantizer_weight=config.quantizer_weight)
    codebook_size = config.model.codebook_size

    def loss_fn(params, vqgan_params, images, key):
        def forward(m, x):
            gt, outs, _ = m.rollout(x, halting=config.alit.halting, rng=key)
            loss, terms = stage1_loss(m, gt, outs, m.vqgan.quantize.embedding, weights)
            return loss, terms, outs[-1].codes
        loss, terms, codes = model.apply({"params": merge(params, vqgan_params)}, images,
                                         method=forward)
        if codes is not None:
            counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
            terms["codebook_usage_last_iter"] = jnp.mean(counts > 0)
        return loss, terms

    def step(state: TrainState, batch: dict, vqgan_params: Any, key: jax.Array):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, vqgan_params, batch["image"], key)
        new, metrics = apply_update(state, loss, grads, tx, schedule, config.ema_decay)
        return new, {**metrics, **terms}

    return step


def reconstruct_for_grid(model, config):
    """Jitted (params, vqgan_params, images) -> [B, H, W, 3]: the reconstruction at the last
    iteration (soft code through the VQGAN decoder), deterministic halting, clipped."""
    def fn(params, vqgan_params, images):
        def forward(m, x):
            _, outs, _ = m.rollout(x, halting="threshold")
            return m.decode_pixels(outs[-1].logits)
        out = model.apply({"params": merge(params, vqgan_params)}, images, method=forward)
        return jnp.clip(out, 0.0, 1.0)
    return jax.jit(fn)


def full_params(params, vqgan_params) -> dict:
    """The complete ALIT tree (what ``load_alit`` reads) from the train state's params."""
    return merge(jax.device_get(params), jax.device_get(vqgan_params))

