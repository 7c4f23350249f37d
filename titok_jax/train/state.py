"""Train state, optimizer and EMA shared by the trainers.

The optimizer follows the official TiTok recipe: AdamW with a linear warm-up from 0 and a cosine
decay to ``end_lr``, global-norm clipping, and no weight decay on norms, biases, embeddings and
learned tokens. Which parameters decay is decided on their *official PyTorch names* with the
official substring rule, so the grouping is the same as in the reference code.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from titok_jax.convert.layout import NameMap

# Official no-decay rule: any of these substrings in the PyTorch parameter name, or ndim < 2.
NO_DECAY_SUBSTRINGS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm",
                       "gamma", "embed")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def learning_rate_schedule(opt_cfg) -> optax.Schedule:
    """Linear warm-up 0 -> lr over ``warmup_steps``, then cosine to ``end_lr`` at
    ``total_steps``."""
    warmup = optax.linear_schedule(0.0, opt_cfg.lr, max(int(opt_cfg.warmup_steps), 1))
    decay_steps = max(int(opt_cfg.total_steps) - int(opt_cfg.warmup_steps), 1)
    cosine = optax.cosine_decay_schedule(opt_cfg.lr, decay_steps, alpha=opt_cfg.end_lr / opt_cfg.lr)
    return optax.join_schedules([warmup, cosine], [int(opt_cfg.warmup_steps)])


def decay_mask(params: Any, name_map: NameMap,
               no_decay: tuple[str, ...] = NO_DECAY_SUBSTRINGS) -> Any:
    """True where weight decay applies: ndim >= 2 and none of ``no_decay`` in the official
    PyTorch name (TiTok's rule; ALIT's timm rule is ``no_decay=()``: only 1-D params skip)."""
    entries = {e.flax_path: e.torch_key for e in name_map.entries(params)}

    def decays(path, leaf):
        key = entries[tuple(getattr(k, "key", k) for k in path)]
        return leaf.ndim >= 2 and not any(s in key for s in no_decay)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, params: Any, name_map: NameMap) -> tuple[
        optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_cfg)
    no_decay = tuple(opt_cfg.get("no_decay", NO_DECAY_SUBSTRINGS))
    tx = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay,
                    mask=decay_mask(params, name_map, no_decay)))
    return tx, schedule


def apply_update(state: TrainState, loss: jax.Array, grads: Any, tx, schedule,
                 ema_max_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer + EMA update of one step, guarded against non-finite values.

    A non-finite loss, gradient or update leaves the state untouched (the host stops on the
    ``nonfinite`` metric). Zeroed updates and a unit EMA decay are elementwise and fuse into the
    update; only the optimizer state needs a select, so the state is never held twice.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, 0.0), updates)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, ema_max_decay, active=finite)
    new = TrainState(step=state.step + finite.astype(state.step.dtype), params=params,
                     ema_params=ema, opt_state=jax.tree_util.tree_map(keep, opt_state,
                                                                      state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "update_norm": update_norm, "learning_rate": schedule(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new, metrics


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """Official EMAModel without warm-up: min(max_decay, (1 + s) / (10 + s)), s = update index."""
    s = step.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + s) / (10.0 + s))


def ema_update(ema: Any, params: Any, step: jax.Array, max_decay: float,
               active: jax.Array | bool = True) -> Any:
    """One EMA update; ``active=False`` (a skipped step) leaves ``ema`` unchanged."""
    d = jnp.where(active, ema_decay(step, max_decay), 1.0)
    return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
