"""Training losses of the TiTok family and of its MaskGIT generators."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from titok_jax.models.quantizer import QuantizerOutput


def stage1_loss(proxy_logits: jax.Array, proxy_codes: jax.Array, quantizer: QuantizerOutput,
                quantizer_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 loss (official ``ReconstructionLoss_Stage1``): mean cross-entropy of the decoder's
    proxy logits ``[B, g, g, K]`` against the MaskGIT-VQGAN codes ``[B, g*g]``, plus
    ``quantizer_weight`` x the quantizer loss. Returns (total, terms)."""
    b = proxy_logits.shape[0]
    logits = proxy_logits.reshape(b, -1, proxy_logits.shape[-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, proxy_codes).mean()
    q = quantizer_weight * quantizer.quantizer_loss
    return ce + q, {"reconstruction_loss": ce, "quantizer_loss": q,
                    "commitment_loss": quantizer.commitment_loss,
                    "codebook_loss": quantizer.codebook_loss}


class MaskDraws(NamedTuple):
    """The uniforms of one MLM training step, in the official draw order: the masking
    timesteps ``[B]`` (``uniform_``), the permutation scores ``[B, N]`` (``rand``) and the
    class-label dropout ``[B]`` (``rand_like`` in the generator's forward)."""

    timesteps: jax.Array
    permutation: jax.Array
    label_drop: jax.Array

    @classmethod
    def draw(cls, key: jax.Array, batch: int, num_tokens: int) -> "MaskDraws":
        k_t, k_perm, k_drop = jax.random.split(key, 3)
        return cls(jax.random.uniform(k_t, (batch,)),
                   jax.random.uniform(k_perm, (batch, num_tokens)),
                   jax.random.uniform(k_drop, (batch,)))


def mask_tokens(tokens: jax.Array, draws: MaskDraws, mask_id: int
                ) -> tuple[jax.Array, jax.Array]:
    """The official ``masking_input_tokens``: (masked ids, bool masks), both ``[B, N]``.

    ratio = clamp(arccos(t) / (pi/2), 1e-6, 1), n = max(round(N * ratio), 1) (half to even, as
    torch), and ``masks[b, j] = argsort(permutation[b])[j] < n_b``: the official code compares
    the argsort's *output* at position j with the count, not the rank of position j; both mask
    n_b positions uniformly at random, but they pick different ones for the same draws.
    """
    n = tokens.shape[1]
    ratio = jnp.clip(jnp.arccos(draws.timesteps) / (jnp.pi * 0.5), 1e-6, 1.0)
    count = jnp.maximum(jnp.round(n * ratio), 1.0)
    masks = jnp.argsort(draws.permutation, axis=-1) < count[:, None]
    return jnp.where(masks, mask_id, tokens), masks


def mlm_loss(logits: jax.Array, targets: jax.Array, masks: jax.Array,
             label_smoothing: float = 0.1, unmasked_weight: float = 0.1
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official ``MLMLoss``: label-smoothed cross-entropy of ``logits [B, N, K]`` against
    ``targets [B, N]``, weight 1 on masked and ``unmasked_weight`` on unmasked positions,
    normalised by the weight sum; ``masked_accuracy`` (the official ``correct_tokens``) is the
    argmax accuracy on masked positions, per sample, then averaged."""
    logits = logits.astype(jnp.float32)
    k = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, k), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)
    m = masks.astype(jnp.float32)
    weights = m + (1.0 - m) * unmasked_weight
    loss = jnp.sum(ce * weights) / (jnp.sum(weights) + 1e-8)
    hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    accuracy = jnp.mean(jnp.sum(hit * m, 1) / (jnp.sum(m, 1) + 1e-8))
    return loss, {"masked_accuracy": accuracy}


def mlm_inputs(tokens: jax.Array, labels: jax.Array, draws: MaskDraws, codebook_size: int,
               num_classes: int, label_dropout: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A generator's training inputs from token ids ``[B, N]`` and class labels ``[B]``:
    (masked ids, masks, class-token ids), the class dropped to the "no class" id where
    ``draws.label_drop < label_dropout`` (the official ``cond_drop_prob``)."""
    from titok_jax.models.maskgit import class_tokens
    masked, masks = mask_tokens(tokens, draws, codebook_size)
    cond = class_tokens(labels, draws.label_drop < label_dropout, codebook_size, num_classes)
    return masked, masks, cond
