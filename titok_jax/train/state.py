"""Train state with named parameter groups, their optimizers and EMAs.

A task holds one or more *groups* (``tokenizer``; later ``discriminator``, ``generator``), each
with its own optax optimizer, schedule and optional EMA, plus non-trainable ``mutable`` state
(BatchNorm statistics, LeCam EMAs, counters). Every leaf lives in one pytree, so Orbax saves it
and the sharding rules place it like any other.

The TiTok optimizer is the official recipe: AdamW with a linear warm-up from 0 and a cosine decay
to ``end_lr``, global-norm clipping, and no weight decay on norms, biases, embeddings and learned
tokens. Which parameters decay is decided on their *official PyTorch names* with the official
substring rule, so the grouping is the same as in the reference code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from titok_jax.convert.layout import NameMap, unstack_layers

# Official no-decay rule: any of these substrings in the PyTorch parameter name, or ndim < 2.
NO_DECAY_SUBSTRINGS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm",
                       "gamma", "embed")


@flax.struct.dataclass
class TrainState:
    step: jax.Array                 # updates applied (skipped non-finite steps do not count)
    params: dict[str, Any]          # group -> parameter tree
    ema_params: dict[str, Any]      # group -> EMA tree (groups without an EMA are absent)
    opt_state: dict[str, Any]       # group -> optax state
    mutable: dict[str, Any]         # non-trainable state of the task


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """One group's optimizer: the optax transform, its schedule (for logging) and the EMA's
    maximum decay (None: no EMA). ``guarded``: ``tx.update`` takes the keyword ``finite`` and
    then leaves its state unchanged itself (:func:`guarded`, :func:`scale_by_adam_guarded`);
    otherwise :func:`apply_updates` selects the old state after the update."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    ema_decay: float | None
    guarded: bool = False


def guarded(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` takes the keyword ``finite`` (a scalar bool): where it is False
    the returned state is the old one. Other extra arguments pass through."""
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, *, finite=True, **extra):
        updates, new_state = tx.update(updates, state, params, **extra)
        return updates, jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                               new_state, state)
    return optax.GradientTransformationExtraArgs(tx.init, update)


def scale_by_adam_guarded(b1: float, b2: float, eps: float
                          ) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam(b1, b2, eps)`` (the same state, the same arithmetic, so the same
    bits) whose ``update`` takes the keyword ``finite``: where it is False the moments and
    the count stay as they were.

    The select comes *before* the moments are used: the update direction is computed from the
    selected moments, which are the ones written over the donated old moments. Selecting after
    optax's update instead leaves two unordered readers of every old moment (the fusion that
    writes the new one in place and the update's fusion, which recomputes it), so XLA copies
    every moment first: 4.8 GiB of copies live at the start of the L-32 stage-1 step."""
    init = optax.scale_by_adam(b1, b2, eps).init

    def update(updates, state, params=None, *, finite=True, **extra):
        del params, extra

        def keep(new, old):
            return jnp.where(finite, new, old)
        mu = jax.tree_util.tree_map(keep, optax.tree.update_moment(updates, state.mu, b1, 1),
                                    state.mu)
        nu = jax.tree_util.tree_map(
            keep, optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps),
                                         mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=keep(count, state.count),
                                               mu=optax.tree.cast_like(mu, state.mu),
                                               nu=optax.tree.cast_like(nu, state.nu))
    return optax.GradientTransformationExtraArgs(init, update)


def learning_rate_schedule(opt_cfg) -> optax.Schedule:
    """Linear warm-up 0 -> lr over ``warmup_steps``, then cosine to ``end_lr`` at
    ``total_steps`` (the official ``lr_schedulers.py``)."""
    warmup = optax.linear_schedule(0.0, opt_cfg.lr, max(int(opt_cfg.warmup_steps), 1))
    decay_steps = max(int(opt_cfg.total_steps) - int(opt_cfg.warmup_steps), 1)
    cosine = optax.cosine_decay_schedule(opt_cfg.lr, decay_steps,
                                         alpha=opt_cfg.end_lr / opt_cfg.lr)
    return optax.join_schedules([warmup, cosine], [int(opt_cfg.warmup_steps)])


def decay_mask(params: Any, name_map: NameMap,
               no_decay: tuple[str, ...] = NO_DECAY_SUBSTRINGS) -> Any:
    """True where weight decay applies: ndim >= 2 and none of ``no_decay`` in the official
    PyTorch name (TiTok's rule; ALIT's timm rule is ``no_decay=()``: only 1-D params skip).
    A scanned stack is judged by its first block's name and per-block rank."""
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    entries = {e.flax_path: e.torch_key
               for e in name_map.entries(unstack_layers(shapes, name_map.scanned))}

    def decays(path, leaf):
        names = tuple(getattr(k, "key", k) for k in path)
        stacked = any(n in name_map.scanned for n in names[:-1])
        key = entries[tuple(f"{n}_0" if n in name_map.scanned else n for n in names)]
        return leaf.ndim - stacked >= 2 and not any(s in key for s in no_decay)
    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(opt_cfg, params: Any, name_map: NameMap | None,
          ema_decay: float | None) -> Optimizer:
    """The official AdamW of a ``config.optimizer`` block for ``params``. Without a name map
    (a network whose only undecayed parameters are its biases and norms, such as the
    discriminator), decay applies to every parameter of two or more dimensions. The guard sits
    inside the optimizer where ``params`` hold scanned layer stacks (:func:`adamw_for`)."""
    schedule = learning_rate_schedule(opt_cfg)
    no_decay = tuple(opt_cfg.get("no_decay", NO_DECAY_SUBSTRINGS))
    mask = (jax.tree_util.tree_map(lambda p: p.ndim >= 2, params) if name_map is None
            else decay_mask(params, name_map, no_decay))
    inside = has_scanned_layers(params, name_map)
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                     adamw_for(schedule, opt_cfg.b1, opt_cfg.b2, opt_cfg.eps,
                               opt_cfg.weight_decay, mask, guard_inside=inside))
    return Optimizer(tx, schedule, ema_decay, guarded=inside)


def has_scanned_layers(params: Any, name_map: NameMap | None) -> bool:
    """Whether ``params`` hold a scanned layer stack (a module named in ``name_map.scanned``)."""
    if name_map is None or not name_map.scanned:
        return False
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return any(getattr(k, "key", None) in name_map.scanned for path, _ in paths for k in path)


def adamw_for(learning_rate: optax.ScalarOrSchedule, b1: float, b2: float, eps: float,
              weight_decay: float, mask: Any = None, *, guard_inside: bool
              ) -> optax.GradientTransformation:
    """``optax.adamw``; with ``guard_inside``, the same chain, state and bits with the non-finite
    guard inside each stateful part (``update(..., finite=False)`` leaves the state as it was;
    the optimizer's :class:`Optimizer` must then say ``guarded=True``).

    Both give the same numbers; which one XLA:CPU runs better depends on the layout. With
    scanned stacks the guard inside saves every copy of the moments (8.15 GiB at the L-32
    stage-1 step) and 7-10% of the step; with unrolled blocks optax's order is faster (S-128
    stage 1: 9.6 s against 12.4 s per step; benchmarks/train.py, benchmarks/memory.py)."""
    if not guard_inside:
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=mask)
    return optax.chain(scale_by_adam_guarded(b1, b2, eps),
                       optax.add_decayed_weights(weight_decay, mask),
                       guarded(optax.scale_by_learning_rate(learning_rate)))


def init_state(params: Mapping[str, Any], optimizers: Mapping[str, Optimizer],
               mutable: Mapping[str, Any] | None = None) -> TrainState:
    """Step 0: every group's optimizer state, EMAs equal to the params."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=dict(params),
        ema_params={g: jax.tree_util.tree_map(jnp.copy, p) for g, p in params.items()
                    if optimizers[g].ema_decay is not None},
        opt_state={g: optimizers[g].tx.init(p) for g, p in params.items()},
        mutable=dict(mutable or {}))


def apply_updates(state: TrainState, losses: Mapping[str, jax.Array],
                  grads: Mapping[str, Any], optimizers: Mapping[str, Optimizer],
                  mutable: Mapping[str, Any] | None = None
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer + EMA updates of the groups in ``grads``, guarded against non-finite values.

    A non-finite loss or gradient in any group leaves the whole state untouched (the host stops
    on the ``nonfinite`` metric); with finite gradients AdamW's updates are finite. The guard is
    known before the optimizer runs, so each select fuses into its leaf's elementwise update and
    the new params, moments and EMA overwrite their donated buffers (a guarded optimizer selects
    its moments before using them, :func:`scale_by_adam_guarded`). (Deciding on the update
    norm as well, which exists only once every update is computed, kept the old and the new
    state alive together: 2.7 GiB more at the L-32 stage-1 step, benchmarks/memory.py.)
    Metrics of a single-group task are unprefixed, otherwise ``<group>/...``: ``grad_norm``
    (before clipping), ``update_norm`` (0 on a skipped step), ``param_norm`` (of the params the
    step started from, the ones its loss and gradients were computed at) and ``learning_rate``.
    """
    finite = jnp.array(True)
    for loss in losses.values():
        finite &= jnp.isfinite(loss)
    prefix = (lambda g: "") if len(state.params) == 1 else (lambda g: f"{g}/")  # noqa: E731
    metrics = {}
    for group, g in grads.items():
        grad_norm = optax.tree.norm(g)
        finite &= jnp.isfinite(grad_norm)
        metrics[f"{prefix(group)}grad_norm"] = grad_norm
    params, ema, opt_states = dict(state.params), dict(state.ema_params), dict(state.opt_state)
    for group, g in grads.items():
        opt = optimizers[group]
        if opt.guarded:
            updates, opt_states[group] = opt.tx.update(g, state.opt_state[group],
                                                       state.params[group], finite=finite)
        else:
            updates, opt_state = opt.tx.update(g, state.opt_state[group], state.params[group])
            opt_states[group] = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o),
                                                       opt_state, state.opt_state[group])
        # Each leaf's squared norms read its old parameter (the update is recomputed from it),
        # which is then overwritten in place. ``finite & ~(sq < 0)`` equals ``finite`` for any
        # value of ``sq`` (a sum of squares is never below 0, and NaN < 0 is False) but makes
        # the overwrite depend on these reads, so XLA needs no copy of the old parameter to
        # serve them (2.3 GiB at the L-32 stage-1 step). Per leaf: a global sum in every
        # overwrite would be fused into each of them (compile time grows with leaves squared).
        old = state.params[group]
        update_sq = jax.tree_util.tree_map(lambda u: jnp.sum(jnp.square(u)), updates)
        param_sq = jax.tree_util.tree_map(lambda p: jnp.sum(jnp.square(p)), old)

        def step_leaf(p, u, u_sq, p_sq):
            return (p + jnp.where(finite & ~(u_sq + p_sq < 0), u, 0.0)).astype(p.dtype)
        params[group] = jax.tree_util.tree_map(step_leaf, old, updates, update_sq, param_sq)
        update_sq, param_sq = (sum(jax.tree_util.tree_leaves(t), jnp.zeros((), jnp.float32))
                               for t in (update_sq, param_sq))
        if opt.ema_decay is not None:
            ema[group] = ema_update(state.ema_params[group], params[group], state.step,
                                    opt.ema_decay, active=finite)
        metrics.update({f"{prefix(group)}update_norm": jnp.where(finite, jnp.sqrt(update_sq),
                                                                 0.0),
                        f"{prefix(group)}param_norm": jnp.sqrt(param_sq),
                        f"{prefix(group)}learning_rate": opt.schedule(
                            update_count(state.opt_state[group], state.step))})
    new_mutable = dict(state.mutable)
    for key, value in (mutable or {}).items():
        new_mutable[key] = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), value,
                                                  state.mutable[key])
    new = TrainState(step=state.step + finite.astype(state.step.dtype), params=params,
                     ema_params=ema, opt_state=opt_states, mutable=new_mutable)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new, metrics


def update_count(opt_state: Any, default: jax.Array) -> jax.Array:
    """How many updates a group's optimizer has applied (optax's ``count``): its schedule's
    position. A discriminator stepped only after its start step has its own count; ``default``
    when the optimizer keeps none."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else default


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """The official ``EMAModel`` without warm-up at update index ``s`` (0-based): 0 at the first
    update (the EMA becomes the params), then ``min(max_decay, (1 + s) / (10 + s))``."""
    s = step.astype(jnp.float32)
    return jnp.where(s == 0, 0.0, jnp.minimum(max_decay, (1.0 + s) / (10.0 + s)))


def ema_update(ema: Any, params: Any, step: jax.Array, max_decay: float,
               active: jax.Array | bool = True) -> Any:
    """One EMA update; ``active=False`` (a skipped step) leaves ``ema`` unchanged."""
    d = jnp.where(active, ema_decay(step, max_decay), 1.0)
    return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
