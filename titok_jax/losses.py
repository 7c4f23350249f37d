"""Training losses of the TiTok family."""
from __future__ import annotations

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
