"""The official TiTok GAN-phase losses (``ReconstructionLoss_Stage2`` and
``ReconstructionLoss_Single_Stage`` of bytedance/1d-tokenizer) as pure functions.

The networks run outside: the caller passes the perceptual loss value and the discriminator
logits, so one jitted step can run the generator and the discriminator (magvit's layout). Whether
the GAN is on (``step >= discriminator_start``) is a traced boolean, so both phases share one
compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                  + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)


def lecam_loss(real_mean: jax.Array, fake_mean: jax.Array, ema_real: jax.Array,
               ema_fake: jax.Array) -> jax.Array:
    """LeCam regulariser: relu(real - ema_fake)^2 + relu(ema_real - fake)^2 of the mean logits."""
    return (jnp.mean(jax.nn.relu(real_mean - ema_fake) ** 2)
            + jnp.mean(jax.nn.relu(ema_real - fake_mean) ** 2))


def lecam_ema_update(ema: jax.Array, value: jax.Array, decay: float) -> jax.Array:
    return ema * decay + jax.lax.stop_gradient(value) * (1.0 - decay)


def discriminator_accuracy(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """Fraction of patches where the real logit is positive and the fake one negative."""
    return jnp.mean(((logits_real > 0) & (logits_fake < 0)).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The official ``losses`` config block; field names are the official keys. Defaults are the
    single-stage recipe (TA-TiTok configs) except ``discriminator_start``."""

    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    quantizer_weight: float = 1.0
    perceptual_loss: str = "lpips-convnext_s-1.0-0.1"
    perceptual_weight: float = 1.1
    discriminator_start: int = 20_000
    discriminator_factor: float = 1.0
    discriminator_weight: float = 0.1
    lecam_regularization_weight: float = 0.001
    lecam_ema_decay: float = 0.999
    kl_weight: float = 1e-6
    logvar_init: float = 0.0

    def __post_init__(self):
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got "
                             f"{self.reconstruction_loss!r}")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict | Mapping) -> "LossConfig":
        """From a ``losses`` config block; unknown keys raise ValueError naming them."""
        values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown losses config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def gan_enabled(self) -> bool:
        """Whether the discriminator enters the generator loss at all (static)."""
        return self.discriminator_factor > 0 and self.discriminator_weight > 0


def generator_loss(cfg: LossConfig, inputs: jax.Array, reconstructions: jax.Array, *,
                   perceptual: jax.Array, logits_fake: jax.Array | None, gan_on: jax.Array,
                   quantizer: Mapping[str, jax.Array] | None = None,
                   kl: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official ``_forward_generator``: returns (total, terms with the official names).

    perceptual: the perceptual module's mean over the batch. logits_fake: the discriminator on
    ``reconstructions`` (may be None when the GAN term is off: disabled by config, or a step
    compiled for before ``discriminator_start``). quantizer: VQ terms
    (``quantizer_loss``, ``commitment_loss``, ``codebook_loss``); kl: per-image-and-token KL
    ``[B, N]`` of a VAE, whose reconstruction term is divided by ``exp(logvar_init)``.
    """
    if (quantizer is None) == (kl is None):
        raise ValueError("generator_loss needs exactly one of quantizer (VQ) or kl (VAE)")
    inputs, reconstructions = inputs.astype(jnp.float32), reconstructions.astype(jnp.float32)
    diff = inputs - reconstructions
    per_pixel = jnp.abs(diff) if cfg.reconstruction_loss == "l1" else diff ** 2
    reconstruction = cfg.reconstruction_weight * jnp.mean(per_pixel)

    factor = jnp.where(gan_on, jnp.float32(cfg.discriminator_factor), jnp.float32(0.0))
    if cfg.gan_enabled and logits_fake is not None:
        gan = jnp.where(gan_on, generator_adversarial_loss(logits_fake.astype(jnp.float32)), 0.0)
    else:
        gan = jnp.zeros((), jnp.float32)
    d_weight = jnp.float32(cfg.discriminator_weight)
    weighted_gan = d_weight * factor * gan
    weighted_perceptual = cfg.perceptual_weight * perceptual

    terms = {}
    if quantizer is not None:
        regulariser = cfg.quantizer_weight * quantizer["quantizer_loss"]
        terms.update(quantizer_loss=regulariser, commitment_loss=quantizer["commitment_loss"],
                     codebook_loss=quantizer["codebook_loss"])
    else:
        reconstruction = reconstruction / jnp.exp(jnp.float32(cfg.logvar_init))
        regulariser = cfg.kl_weight * jnp.sum(kl) / kl.shape[0]
        terms["kl_loss"] = regulariser
    total = reconstruction + weighted_perceptual + regulariser + weighted_gan
    terms.update(total_loss=total, reconstruction_loss=reconstruction,
                 perceptual_loss=weighted_perceptual, weighted_gan_loss=weighted_gan,
                 discriminator_factor=factor, d_weight=d_weight, gan_loss=gan)
    return total, {k: jax.lax.stop_gradient(v) for k, v in terms.items()}


def discriminator_loss(cfg: LossConfig, logits_real: jax.Array, logits_fake: jax.Array,
                       ema_real: jax.Array, ema_fake: jax.Array, gan_on: jax.Array
                       ) -> tuple[jax.Array, dict[str, jax.Array], tuple[jax.Array, jax.Array]]:
    """The official ``_forward_discriminator``: factor x hinge + LeCam weight x LeCam, and the
    LeCam EMAs of the mean logits. Returns (total, terms, (new_ema_real, new_ema_fake)).

    The official loop runs this only from ``discriminator_start`` on, so before it the total is
    0 and the EMAs keep their values (``gan_on`` False).
    """
    logits_real = logits_real.astype(jnp.float32)
    logits_fake = logits_fake.astype(jnp.float32)
    real_mean, fake_mean = jnp.mean(logits_real), jnp.mean(logits_fake)
    total = cfg.discriminator_factor * hinge_d_loss(logits_real, logits_fake)
    new_real, new_fake = ema_real, ema_fake
    if cfg.lecam_regularization_weight > 0:
        lecam = cfg.lecam_regularization_weight * lecam_loss(real_mean, fake_mean,
                                                             ema_real, ema_fake)
        new_real = jnp.where(gan_on, lecam_ema_update(ema_real, real_mean, cfg.lecam_ema_decay),
                             ema_real)
        new_fake = jnp.where(gan_on, lecam_ema_update(ema_fake, fake_mean, cfg.lecam_ema_decay),
                             ema_fake)
    else:
        lecam = jnp.zeros((), jnp.float32)
    total = jnp.where(gan_on, total + lecam, 0.0)
    terms = {"discriminator_loss": total, "logits_real": real_mean, "logits_fake": fake_mean,
             "lecam_loss": lecam,
             "discriminator_accuracy": discriminator_accuracy(logits_real, logits_fake)}
    return total, jax.tree_util.tree_map(jax.lax.stop_gradient, terms), (new_real, new_fake)
