"""ALIT stage 1 (latent distillation), ``task = "alit_stage1"``.

The VQGAN (``base_tokenizer`` of the Flax tree) is frozen: it is loaded once as the task's
frozen part and merged back into the tree inside the step; everything else trains. Every
iteration of the recurrence adds ``lambda_k * CE + code MSE + VQ loss`` (official weights), with
the official stochastic Bernoulli halting drawn from the step's key.

Stage 2 (full fine-tuning with L1 + LPIPS + PatchGAN per iteration and the VQGAN trainable)
would hold ``base_tokenizer`` as a second group and add a discriminator group; not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from titok_jax.convert.official import name_map_for
from titok_jax.models.alit import StageOneLoss, stage1_loss
from titok_jax.train.state import adamw, apply_updates
from titok_jax.train.tasks import register
from titok_jax.train.tasks.base import Task


@register("alit_stage1")
class ALITStage1(Task):
    def check(self, config):
        if config.model.name != "alit":
            raise ValueError(f"task alit_stage1 trains ALIT models; config.model.name is "
                             f"{config.model.name!r} (use configs/alit.py)")

    def optimizers(self, abstract_params):
        return {self.group: adamw(self.config.optimizer, abstract_params[self.group],
                                  name_map_for(self.config.model), self.config.ema_decay)}

    def train_step(self, state, batch, frozen, key):
        cfg = self.config
        weights = StageOneLoss(lambdas=tuple(cfg.alit.lambdas), code_weight=cfg.alit.code_weight,
                               quantizer_weight=cfg.quantizer_weight)
        codebook_size = cfg.model.codebook_size

        def forward(m, x):
            gt, outs, _ = m.rollout(x, halting=cfg.alit.halting, rng=key)
            loss, terms = stage1_loss(m, gt, outs, m.vqgan.quantize.embedding, weights)
            return loss, terms, outs[-1].codes

        def loss_fn(params):
            loss, terms, codes = self.model.apply(
                {"params": self.model_params(params, frozen)}, batch["image"], method=forward)
            if codes is not None:
                counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
                terms["codebook_usage_last_iter"] = jnp.mean(counts > 0)
            return loss, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params[self.group])
        new, metrics = apply_updates(state, {"loss": loss}, {self.group: grads},
                                     self.optimizers(state.params))
        return new, {"loss": loss, **metrics, **terms}
