"""TiTok tasks: stage 1 (proxy codes of a frozen MaskGIT-VQGAN) and the pixel objective.

* ``titok_stage1`` (stage 1 of the paper): the frozen teacher encodes the batch inside the step
  to proxy codes; loss = cross-entropy of the decoder's proxy logits + quantizer loss (official
  ``ReconstructionLoss_Stage1``).
* ``titok_pixel``: mean squared error of the pixel-head reconstruction + quantizer loss (VQ) or
  ``kl_weight`` x KL (VAE): the reconstruction terms of the single-stage recipe, without its
  perceptual and GAN losses (those are ``titok_single_stage``, ``tasks/titok_gan.py``). The CPU
  quickstart uses it.

Tail drop (``config.tail_drop``, every TiTok task, :func:`tail_drop_lengths`): each example's
decoder sees only its first k latent tokens, k drawn per example from the step key; the dropped
tokens are removed by attention masking (``models/titok.py``), so the trained model decodes
k < N at inference by the same rule, with no extra parameter. The encoder and the quantizer run
on all N tokens and the quantizer loss (or KL) stays over all N: every token must stay a good
codebook match for the decodes that keep it, and the codebook statistics (and clustering_vq
re-seeding) keep their meaning.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax.convert.official import name_map_for
from titok_jax.inference import predict
from titok_jax.models import variants
from titok_jax.train.losses import stage1_loss
from titok_jax.train.state import TrainState, adamw, apply_updates
from titok_jax.train.tasks.base import Task, register


def codebook_stats(ids: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Fraction of codes used in the batch and the perplexity of their distribution."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


# fold_in constant of the tail-drop stream: k does not reuse the randomness the step key already
# drives (the VAE posterior sample), so a run with tail drop off is unchanged.
_TAIL_DROP_STREAM = 0x7A11D


def tail_drop_choices(config: ml_collections.ConfigDict) -> np.ndarray:
    """The kept lengths ``config.tail_drop`` draws from, uniformly: ``uniform``: every k in
    [min_tokens, N]; ``pow2``: the powers of two in [min_tokens, N] and N. Raises on a bad
    block."""
    td, n = config.tail_drop, config.model.num_latent_tokens
    if not 1 <= td.min_tokens <= n:
        raise ValueError(f"config.tail_drop.min_tokens must lie in [1, {n}] (the model has {n} "
                         f"latent tokens), got {td.min_tokens}")
    if td.distribution == "uniform":
        return np.arange(td.min_tokens, n + 1)
    if td.distribution == "pow2":
        pow2 = [1 << i for i in range(n.bit_length()) if td.min_tokens <= 1 << i < n]
        return np.array([*pow2, n])
    raise ValueError(f"config.tail_drop.distribution must be 'uniform' or 'pow2', got "
                     f"{td.distribution!r}")


def tail_drop_lengths(config: ml_collections.ConfigDict, key: jax.Array,
                      batch_size: int) -> jax.Array | None:
    """Per-example kept token counts (int32 ``[B]``) for the decoder, from the step key; None
    when ``config.tail_drop`` is off (or absent)."""
    td = config.get("tail_drop")
    if td is None or not td.enabled:
        return None
    choices = jnp.asarray(tail_drop_choices(config), jnp.int32)
    pick = jax.random.randint(jax.random.fold_in(key, _TAIL_DROP_STREAM), (batch_size,), 0,
                              len(choices))
    return choices[pick]


def check_tail_drop(config: ml_collections.ConfigDict) -> None:
    if config.get("tail_drop") is not None and config.tail_drop.enabled:
        tail_drop_choices(config)


def tail_drop_terms(num_tokens: jax.Array | None) -> dict[str, jax.Array]:
    """The logged mean kept length (tail drop on)."""
    return {} if num_tokens is None else {"tail_drop_tokens": jnp.mean(num_tokens)}


class _TiTokTask(Task):
    def optimizers(self, abstract_params):
        return {self.group: adamw(self.config.optimizer, abstract_params[self.group],
                                  name_map_for(self.config.model), self.config.ema_decay)}

    def _update(self, state: TrainState, loss_fn, *args):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params[self.group], *args)
        new, metrics = apply_updates(state, {"loss": loss}, {self.group: grads},
                                     self.optimizers(state.params))
        return new, {"loss": loss, **metrics, **terms}


@register("titok_stage1")
class TiTokStage1(_TiTokTask):
    def check(self, config):
        if not predict.needs_teacher(config.model) or config.model.name != "titok":
            raise ValueError("task titok_stage1 trains the proxy-code head of a two-stage TiTok "
                             "(configs/titok.py:variant=L-32|B-64|S-128,stage=1); this "
                             f"config.model is {config.model.get('variant', config.model.name)}"
                             f" with is_legacy={config.model.get('is_legacy')}, "
                             f"finetune_decoder={config.model.get('finetune_decoder')}")
        check_tail_drop(config)

    def train_step(self, state, batch, frozen, key):
        teacher = variants.build_model(predict.teacher_config(self.config))
        images = batch["image"]
        targets = jax.lax.stop_gradient(teacher.apply({"params": frozen["teacher"]}, images,
                                                      method=teacher.encode))
        codebook_size = self.config.model.codebook_size
        num_tokens = tail_drop_lengths(self.config, key, images.shape[0])

        def loss_fn(params):
            out = self.model.apply({"params": params}, images, num_tokens=num_tokens)
            loss, terms = stage1_loss(out.decoded, targets, out.quantizer,
                                      self.config.quantizer_weight)
            terms.update(tail_drop_terms(num_tokens))
            terms["proxy_accuracy"] = jnp.mean(
                jnp.argmax(out.decoded, -1).reshape(targets.shape) == targets)
            terms.update(codebook_stats(out.ids, codebook_size))
            return loss, terms
        return self._update(state, loss_fn)


def check_pixel_model(config, task: str) -> None:
    """Raises unless ``config.model`` is a single-stage (pixel-head) TiTok."""
    if config.model.name != "titok" or config.model.is_legacy:
        raise ValueError(
            f"task {task} trains the single-stage pixel-head TiTok models (VQ-8k, VAE, "
            "tiny-pixel, tiny-vae); the two-stage ones (L-32, B-64, S-128) train with "
            f"titok_stage1, then titok_stage2; config.model is {config.model.get('variant')}")


@register("titok_pixel")
class TiTokPixel(_TiTokTask):
    def check(self, config):
        check_pixel_model(config, self.name)
        check_tail_drop(config)

    def train_step(self, state, batch, frozen, key):
        del frozen
        images = batch["image"]
        vae = self.config.model.quantize_mode == "vae"
        num_tokens = tail_drop_lengths(self.config, key, images.shape[0])

        def loss_fn(params: Any):
            out = self.model.apply({"params": params}, images, rng=key if vae else None,
                                   num_tokens=num_tokens)
            mse = jnp.mean(jnp.square(out.decoded - images))
            if vae:  # official: kl_weight x sum(KL) / batch
                kl = self.config.kl_weight * jnp.sum(out.posterior.kl()) / images.shape[0]
                return mse + kl, {"reconstruction_loss": mse, "kl_loss": kl,
                                  **tail_drop_terms(num_tokens)}
            q = self.config.quantizer_weight * out.quantizer.quantizer_loss
            terms = {"reconstruction_loss": mse, "quantizer_loss": q,
                     **tail_drop_terms(num_tokens)}
            terms.update(codebook_stats(out.ids, self.config.model.codebook_size))
            return mse + q, terms
        return self._update(state, loss_fn)
