"""MaskGIT sampling as in the official ``ImageBert.generate``, as one jitted loop.

Starting from all-mask ids, every step s = 0..T-1 (ratio = (s+1)/T):

1. logits of the current ids, with classifier-free guidance (conditional and unconditional rows
   batched into one forward pass; a single conditional pass while the scale is 0);
2. optionally divided by the softmax temperature ``0.5 + 0.8 * (1 - ratio)``;
3. ids sampled by Gumbel-max with temperature ``randomize_temperature * (1 - ratio)`` at the
   masked positions (decided positions keep their id);
4. the ``floor(N * arccos(ratio) / (pi/2))`` least confident ids (logit of the sampled id plus
   Gumbel noise; clamped to [1, masked - 1] counted on batch element 0) are masked again,
   except at the last step.

The per-step constants are computed on the host with the PyTorch code's precision (Python floats
rounded once to float32; the power-cosine guidance scale in float32), so that a replay of its
recorded noise gives its ids exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

GUIDANCE_DECAYS = ("constant", "linear", "power-cosine")

# (ids [B', N], class-token ids [B']) -> logits [B', N, K]
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The arguments of the official ``generate`` (its defaults)."""

    num_sample_steps: int = 8
    guidance_scale: float = 3.0
    guidance_decay: str = "constant"
    guidance_scale_pow: float = 3.0
    randomize_temperature: float = 4.5
    softmax_temperature_annealing: bool = False

    def validate(self) -> "SamplingConfig":
        steps = self.num_sample_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"num_sample_steps must be a positive integer, got {steps!r}")
        if self.guidance_decay not in GUIDANCE_DECAYS:
            raise ValueError(f"unknown guidance_decay {self.guidance_decay!r}; expected one of "
                             f"{list(GUIDANCE_DECAYS)}")
        for field in ("guidance_scale", "guidance_scale_pow", "randomize_temperature"):
            value = getattr(self, field)
            if not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
        return self


class Schedule(NamedTuple):
    """Per-step constants ``[T]``: Gumbel temperature, softmax divisor and guidance scale
    (float32), and the nominal number of ids to re-mask (int32)."""

    gumbel_temperature: np.ndarray
    softmax_divisor: np.ndarray
    guidance: np.ndarray
    mask_len: np.ndarray


def schedule(cfg: SamplingConfig, num_tokens: int) -> Schedule:
    t = cfg.num_sample_steps
    ratio = (np.arange(t, dtype=np.float64) + 1) / t
    if cfg.guidance_decay == "constant":
        guidance = np.full(t, cfg.guidance_scale)
    elif cfg.guidance_decay == "linear":
        # Step s uses the scale set after step s - 1: g * s / T, so 0 (no guidance) at step 0.
        guidance = np.concatenate([[0.0], ratio[:-1] * cfg.guidance_scale])
    else:
        # MDT's power-cosine schedule, evaluated in float32 as the official code does.
        base = (np.arange(t, dtype=np.float64) / t).astype(np.float32)
        cosine = np.cos(base ** np.float32(cfg.guidance_scale_pow) * np.float32(math.pi))
        guidance = (np.float32(cfg.guidance_scale - 1) * ((np.float32(1) - cosine) / np.float32(2))
                    + np.float32(1))
    divisor = 0.5 + 0.8 * (1 - ratio) if cfg.softmax_temperature_annealing else np.ones(t)
    return Schedule(
        gumbel_temperature=(cfg.randomize_temperature * (1.0 - ratio)).astype(np.float32),
        softmax_divisor=divisor.astype(np.float32),
        guidance=guidance.astype(np.float32),
        mask_len=np.floor(num_tokens * np.arccos(ratio) / (math.pi * 0.5)).astype(np.int32))


def _gumbel(u: jax.Array) -> jax.Array:
    def log(x):
        return jnp.log(jnp.maximum(x, 1e-20))
    return -log(-log(u))


def generate(logits_fn: LogitsFn, cond: jax.Array, sched: Schedule,
             noise: jax.Array | tuple[jax.Array, jax.Array], *, num_tokens: int,
             mask_id: int, drop_id: int, power_cosine: bool) -> jax.Array:
    """Samples ids ``[B, N]`` (traceable; jit it around ``logits_fn``'s parameters).

    Args:
      logits_fn: (ids [B', N], class-token ids [B']) -> logits [B', N, K].
      cond: the class-token ids [B].
      sched: :func:`schedule` of the sampling settings.
      noise: a PRNG key, or the uniforms to replay, ``(u_ids [T, B, N, K], u_conf [T, B, N])``:
        per step, the draws for the id Gumbel noise and then for the confidence Gumbel noise.
      num_tokens, mask_id, drop_id: N, the mask token id and the "no class" token id.
      power_cosine: guide around the unconditional logits (the power-cosine formula) instead
        of the conditional ones.
    """
    b = cond.shape[0]
    num_steps = sched.guidance.shape[0]
    uncond = jnp.full_like(cond, drop_id)

    def guided_logits(ids, scale):
        both = logits_fn(jnp.concatenate([ids, ids]), jnp.concatenate([cond, uncond]))
        c, u = both[:b].astype(jnp.float32), both[b:].astype(jnp.float32)
        return (u if power_cosine else c) + (c - u) * scale

    def step_noise(step, vocab):
        if isinstance(noise, tuple):
            return noise[0][step], noise[1][step]
        k_ids, k_conf = jax.random.split(jax.random.fold_in(noise, step))
        return (jax.random.uniform(k_ids, (b, num_tokens, vocab)),
                jax.random.uniform(k_conf, (b, num_tokens)))

    def body(step, ids):
        is_mask = ids == mask_id
        scale = sched.guidance[step]
        logits = jax.lax.cond(
            scale != 0, guided_logits,
            lambda i, _: logits_fn(i, cond).astype(jnp.float32), ids, scale)
        logits = logits / sched.softmax_divisor[step]
        u_ids, u_conf = step_noise(step, logits.shape[-1])
        temp = sched.gumbel_temperature[step]
        sampled = jnp.argmax(logits + temp * _gumbel(u_ids), axis=-1).astype(ids.dtype)
        sampled_logit = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
        sampled = jnp.where(is_mask, sampled, ids)
        confidence = jnp.where(is_mask, sampled_logit, jnp.inf) + temp * _gumbel(u_conf)
        # One count for the whole batch, taken from its first element (as officially).
        count = jnp.maximum(1, jnp.minimum(jnp.sum(is_mask[0]) - 1, sched.mask_len[step]))
        cut_off = jnp.take(jnp.sort(confidence, axis=-1), count - 1, axis=1)
        remask = (confidence <= cut_off[:, None]) & (step < num_steps - 1)
        return jnp.where(remask, mask_id, sampled)

    start = jnp.full((b, num_tokens), mask_id, jnp.int32)
    return jax.lax.fori_loop(0, num_steps, body, start)
