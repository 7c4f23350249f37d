"""ALIT training tasks: stage 1 (latent distillation, ``alit_stage1``) and stage 2 (full
fine-tuning, ``alit_stage2``).

**Stage 1.** The VQGAN (``base_tokenizer`` of the Flax tree) is frozen: it is loaded once as the
task's frozen part and merged back into the tree inside the step; everything else trains. Every
iteration of the recurrence adds ``lambda_k * CE + code MSE + VQ loss`` (official weights), with
the official stochastic Bernoulli halting drawn from the step's key.

**Stage 2** (official ``engines/full_finetuning.py``). Groups: ``tokenizer`` is the whole ALIT
tree, VQGAN included; ``discriminators`` holds one taming PatchGAN per rollout iteration
(``{"0": ..., "7": ...}``), their BatchNorm statistics are ``mutable["batch_stats"]``; LPIPS-VGG is
the frozen part. Each step trains one iteration k (:meth:`ALITStage2.schedule`, a pure function
of the global step, so the iteration counter needs no state and a resume is exact): before the
GAN starts every step is a generator step and k cycles 0..7; afterwards each k gets
``discriminator_steps`` discriminator steps (hinge loss on real vs its reconstruction) and then
one generator step (L1 + LPIPS + adaptive-weight GAN loss + VQ), on separate batches. Step kinds
are ``generator_k`` / ``discriminator_k``: each compiles only the k + 1 encoder passes it needs.

Replicated on purpose (stated in the README):

* the main optimizer's parameter groups cover the whole model, discriminators included, so a
  generator step also moves discriminator k along the generator loss's gradient (AdamW with the
  main lr and weight decay 0.05 on its convs, with its own per-parameter state; decay alone while
  the GAN weight is 0). ``alit.generator_steps_discriminators=False`` turns this off;
* the soft code reads ``quantize.embedding.weight.data``, so the VQGAN codebook gets no gradient:
  PyTorch skips it, and here its weight decay is masked, so it never changes;
* LPIPS and the discriminators see the [0, 1] images as they are (taming's LPIPS expects
  [-1, 1]); BatchNorm is in training mode in both kinds of steps (the generator step updates
  the running statistics too); learning rates follow the global step (fractional epoch) for
  both optimizers, not their update counts; the EMA (constant decay 0.9999) restarts from the
  live weights at every epoch start and moves after every step of either kind.

Not replicated: BatchNorm statistics are those of the global batch, not of each device's share
(``jax.jit`` over a sharded batch is synchronized BatchNorm; torch DDP normalises per GPU), so
1 and 8 devices train the same model; no fp16 autocast or loss scaling.
"""
from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from titok_jax.convert.official import name_map_for
from titok_jax.gan.losses import discriminator_accuracy, hinge_d_loss
from titok_jax.gan.patchgan import PatchGAN, init_discriminators, load_official
from titok_jax.inference import predict
from titok_jax.models.alit import ALIT, StageOneLoss, stage1_loss
from titok_jax.models.maskgit_vqgan import VQGANDecoder
from titok_jax.train.state import (
    Optimizer,
    adamw,
    adamw_for,
    apply_updates,
    decay_mask,
    has_scanned_layers,
    learning_rate_schedule,
)
from titok_jax.train.tasks.base import Task, register

log = logging.getLogger(__name__)


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


# -- stage 2 ---------------------------------------------------------------------------------

_DISCRIMINATORS = "discriminators"


def _adamw(opt_cfg, lr, mask, clip: bool, guard_inside: bool = False
           ) -> optax.GradientTransformation:
    """The official AdamW of ``opt_cfg`` at learning rate ``lr`` (a scalar: stage 2 sets it from
    the global step, not from the optimizer's own update count); ``guard_inside``: see
    :func:`titok_jax.train.state.adamw_for`."""
    adam = adamw_for(lr, opt_cfg.b1, opt_cfg.b2, opt_cfg.eps, opt_cfg.weight_decay, mask,
                     guard_inside=guard_inside)
    return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), adam) if clip else adam


def _per_discriminator(keys: list[str], own: optax.GradientTransformation,
                       generator_side: optax.GradientTransformation | None,
                       which: tuple[str, str] | None) -> optax.GradientTransformation:
    """The optimizer of the ``discriminators`` group ``{k: params}``: one AdamW state per
    discriminator and side (``"discriminator"``: their own optimizer; ``"generator"``: the main
    optimizer's, when generator steps also move them), as PyTorch keeps per-parameter states.

    ``which = (side, k)`` selects the one state a step uses; its gradients are ``{k: grads}``
    and every other discriminator gets a zero update."""
    def init(params):
        state = {"discriminator": {k: own.init(params[k]) for k in keys}}
        if generator_side is not None:
            state["generator"] = {k: generator_side.init(params[k]) for k in keys}
        return state

    def update(grads, state, params=None):
        side, k = which
        tx = own if side == "discriminator" else generator_side
        u, s = tx.update(grads[k], state[side][k], params[k])
        updates = {j: u if j == k else jax.tree_util.tree_map(jnp.zeros_like, params[j])
                   for j in keys}
        return updates, {**state, side: {**state[side], k: s}}
    return optax.GradientTransformation(init, update)


def _conv_out_input(module, method_name: str) -> bool:
    """Captures the VQGAN decoder's ``norm_out`` output: ``conv_out`` reads its swish."""
    return (method_name == "__call__" and module.name == "norm_out"
            and isinstance(module.parent, VQGANDecoder))


def _kernel_grad(h: jax.Array, kernel: jax.Array, cotangent: jax.Array) -> jax.Array:
    """d/d kernel of ``<cotangent, conv(h, kernel)>`` for the decoder's 3x3 SAME ``conv_out``."""
    def conv(w):
        return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, kernel)[1](cotangent.astype(h.dtype))[0]


@register("alit_stage2")
class ALITStage2(Task):
    """ALIT stage 2 (full fine-tuning), ``task = "alit_stage2"``; see the module docstring."""

    def check(self, config):
        ALITStage1.check(self, config)
        a = config.alit
        if not config.init_from and not a.allow_random_init:
            raise ValueError("task alit_stage2 fine-tunes a stage-1 ALIT: set config.init_from "
                             "to its official checkpoint (its ema is read) or titok-jax folder "
                             "(or a finished stage-1 workdir); alit.allow_random_init=True "
                             "starts from random weights (tests only)")
        if config.init_from and not epath.Path(config.init_from).exists():
            raise FileNotFoundError(f"config.init_from not found: {config.init_from}")
        if a.steps_per_epoch < 1:
            raise ValueError(f"alit.steps_per_epoch must be >= 1, got {a.steps_per_epoch}")
        starts = list(a.gan_start_epochs)
        if not starts or len(starts) != len(a.gan_weights) or starts != sorted(starts):
            raise ValueError("alit.gan_start_epochs must be increasing, one per alit.gan_weights;"
                             f" got {starts} and {list(a.gan_weights)}")

    def __init__(self, config):
        super().__init__(config)
        self.discriminator = PatchGAN(config.alit.discriminator_ndf,
                                      config.alit.discriminator_layers)
        self.num_discriminators = config.model.max_iters

    # -- parameters: everything trains; LPIPS is the frozen part ------------------------------
    @functools.cached_property
    def _lpips(self):
        from titok_jax.models.lpips import lpips_vgg
        return lpips_vgg()

    def frozen(self):
        return {"lpips": self._lpips[1]}

    def trainable(self, full_params):
        return full_params

    def model_params(self, params, frozen):
        return params

    def predict_params(self, state, frozen):
        model, vqgan = predict.split_frozen(self.config.model, state.ema_params[self.group])
        return {"model": model, "frozen": vqgan}

    def init_params(self, rng):
        params = super().init_params(rng)
        params[_DISCRIMINATORS] = init_discriminators(
            self.discriminator, jax.random.fold_in(rng, 1), self.image_size,
            self.num_discriminators)[0]
        return params

    def init_mutable(self):
        stats = init_discriminators(self.discriminator, jax.random.PRNGKey(0), self.image_size,
                                    self.num_discriminators)[1]
        return {"batch_stats": stats}

    def optimizers(self, abstract_params, step=None, which=None):
        """Without ``step``: the state layout (init). In a step: the learning rates of global step
        ``step`` and the side/discriminator ``which`` the step updates; the EMA is the step's."""
        cfg = self.config
        main_lr = 0.0 if step is None else learning_rate_schedule(cfg.optimizer)(step)
        disc_lr = 0.0 if step is None else learning_rate_schedule(
            cfg.discriminator_optimizer)(step)
        codebook = ("base_tokenizer", "vqgan", "quantize", "embedding")

        def tokenizer_mask(params):  # timm rule; the codebook gets no gradient: no decay either
            mask = decay_mask(params, name_map_for(cfg.model), tuple(cfg.optimizer.no_decay))
            return jax.tree_util.tree_map_with_path(
                lambda path, m: m and tuple(getattr(p, "key", p) for p in path) != codebook,
                mask)

        def conv_weights(params):
            return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

        own = _adamw(cfg.discriminator_optimizer, disc_lr, None, clip=True)
        generator_side = (_adamw(cfg.optimizer, main_lr, conv_weights, clip=False)
                          if cfg.alit.generator_steps_discriminators else None)
        disc_tx = _per_discriminator(sorted(abstract_params[_DISCRIMINATORS]), own,
                                     generator_side, which)
        side_lr = main_lr if which is not None and which[0] == "generator" else disc_lr
        scanned = has_scanned_layers(abstract_params[self.group], name_map_for(cfg.model))
        return {self.group: Optimizer(_adamw(cfg.optimizer, main_lr, tokenizer_mask, clip=True,
                                             guard_inside=scanned),
                                      lambda _: main_lr,
                                      cfg.ema_decay if step is None else None, guarded=scanned),
                _DISCRIMINATORS: Optimizer(disc_tx, lambda _: side_lr, None)}

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self, step: int) -> tuple[str, int]:
        """(``"generator"`` | ``"discriminator"``, rollout iteration) of global step ``step``.
        Before the GAN starts every step is a generator step; then each cycle is
        ``discriminator_steps`` discriminator steps and one generator step, all on one
        iteration, which advances after the generator step. Both restart every epoch."""
        a = self.config.alit
        epoch, pos = divmod(step, a.steps_per_epoch)
        if epoch < a.gan_start_epochs[0]:
            return "generator", pos % self.num_discriminators
        cycle = a.discriminator_steps + 1
        side = "generator" if (pos + 1) % cycle == 0 else "discriminator"
        return side, (pos // cycle) % self.num_discriminators

    def step_kind(self, step):
        side, k = self.schedule(step)
        return f"{side}_{k}"

    @property
    def steps(self):
        out = {}
        for k in range(self.num_discriminators):
            out[f"generator_{k}"] = functools.partial(self.generator_step, k)
            out[f"discriminator_{k}"] = functools.partial(self.discriminator_step, k)
        return out

    def gan_weight(self, step: jax.Array) -> jax.Array:
        a = self.config.alit
        epoch = step // a.steps_per_epoch
        weight = jnp.zeros((), jnp.float32)
        for start, value in zip(a.gan_start_epochs, a.gan_weights):
            weight = jnp.where(epoch >= start, value, weight)
        return weight

    # -- steps ---------------------------------------------------------------------------------
    @staticmethod
    def reconstruct(m: ALIT, images: jax.Array, k: int):
        """Pixels of rollout iteration ``k`` as the official training forward makes them:
        iterations before ``k`` run the encoder only (no decoding, so no halting); the soft code
        reads the VQGAN codebook without gradient (``embedding.weight.data``); the VQGAN
        encoder's latents keep theirs. Returns (pixels, VQ loss, code accuracy)."""
        z, gt_ids = m.vqgan_targets(images)
        x = m.start(images, z)
        for i in range(k + 1):
            x = m.encoder(x)
            if i < k:
                x = m.grow(x, i + 1)
        _, zq, _, quantizer_loss = m.bottleneck(x[:, 1 + m.grid_tokens:])
        logits = m.decode_logits(zq)
        code = jnp.einsum("blk,kd->bld", jax.nn.softmax(logits, axis=-1),
                          jax.lax.stop_gradient(m.vqgan.quantize.embedding))
        side = m.image_size // m.patch_size
        pixels = m.vqgan.decode_latents(code.reshape(code.shape[0], side, side, -1))
        return pixels, quantizer_loss, jnp.mean(jnp.argmax(logits, -1) == gt_ids)

    def generator_step(self, k, state, batch, frozen, key):
        """taming's generator loss for iteration ``k``: ``L1 + w_p LPIPS + d_weight x (-mean
        D(recon)) + VQ``, ``d_weight = clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) x GAN
        weight``, both gradients taken at the VQGAN decoder's ``conv_out`` kernel."""
        del key
        cfg, name = self.config, str(k)
        images = batch["image"]
        tokenizer = state.params[self.group]

        def forward(params):
            (pixels, quantizer_loss, accuracy), captured = self.model.apply(
                {"params": params}, images, k, method=self.reconstruct,
                capture_intermediates=_conv_out_input, mutable=["intermediates"])
            h = captured["intermediates"]["base_tokenizer"]["vqgan"]["decoder"]["norm_out"]
            return (pixels, quantizer_loss), (nn.silu(h["__call__"][0]), accuracy)

        (recon, quantizer_loss), pullback, (h, accuracy) = jax.vjp(forward, tokenizer,
                                                                   has_aux=True)
        lpips_module = self._lpips[0]

        def nll_fn(r):  # ALIT feeds LPIPS its [0, 1] images as they are
            l1 = jnp.mean(jnp.abs(images - r))
            p = jnp.mean(lpips_module.apply({"params": frozen["lpips"]}, images, r))
            return l1 + cfg.alit.perceptual_weight * p, (l1, p)

        (nll, (l1, perceptual)), nll_grad = jax.value_and_grad(nll_fn, has_aux=True)(recon)
        stats = state.mutable["batch_stats"]

        def g_fn(r, d_params):  # the discriminator in training mode (batch statistics)
            logits, updated = self.discriminator.apply(
                {"params": d_params, "batch_stats": stats[name]}, r, train=True,
                mutable=["batch_stats"])
            return -jnp.mean(logits), (logits, updated["batch_stats"])

        (g_loss, (logits_fake, new_stats)), (g_grad, d_grads) = jax.value_and_grad(
            g_fn, argnums=(0, 1), has_aux=True)(recon, state.params[_DISCRIMINATORS][name])
        kernel = tokenizer["base_tokenizer"]["vqgan"]["decoder"]["conv_out"]["kernel"]
        adaptive = jnp.clip(optax.tree.norm(_kernel_grad(h, kernel, nll_grad))
                            / (optax.tree.norm(_kernel_grad(h, kernel, g_grad)) + 1e-4),
                            0.0, 1e4)
        gan_weight = self.gan_weight(state.step)
        d_weight = adaptive * gan_weight
        qw = cfg.quantizer_weight
        loss = nll + d_weight * g_loss + qw * quantizer_loss
        grads = {self.group: pullback((nll_grad + d_weight * g_grad,
                                       jnp.asarray(qw, quantizer_loss.dtype)))[0]}
        if cfg.alit.generator_steps_discriminators:
            grads[_DISCRIMINATORS] = {name: jax.tree_util.tree_map(lambda g: d_weight * g,
                                                                   d_grads)}
        new, metrics = apply_updates(
            state, {"loss": loss}, grads,
            self.optimizers(state.params, state.step, ("generator", name)),
            mutable={"batch_stats": {**stats, name: new_stats}})
        return self._update_ema(state, new, metrics), {
            "loss": loss, **metrics, "nll_loss": nll, "l1_loss": l1,
            "perceptual_loss": perceptual, "g_loss": g_loss, "adaptive_weight": adaptive,
            "gan_weight": gan_weight, "d_weight": d_weight, "quantizer_loss": quantizer_loss,
            "logits_fake": jnp.mean(logits_fake), "code_accuracy": accuracy,
            "rollout_iteration": jnp.asarray(k, jnp.float32)}

    def discriminator_step(self, k, state, batch, frozen, key):
        """Hinge loss of discriminator ``k`` on the batch and iteration ``k``'s reconstruction
        (real first, then fake: two BatchNorm updates, as the official two calls)."""
        del frozen, key
        name = str(k)
        images = batch["image"]
        recon = jax.lax.stop_gradient(self.model.apply(
            {"params": state.params[self.group]}, images, k, method=self.reconstruct)[0])
        stats = state.mutable["batch_stats"]

        def d_fn(d_params):
            real, updated = self.discriminator.apply(
                {"params": d_params, "batch_stats": stats[name]}, images, train=True,
                mutable=["batch_stats"])
            fake, updated = self.discriminator.apply(
                {"params": d_params, **updated}, recon, train=True, mutable=["batch_stats"])
            return hinge_d_loss(real, fake), (real, fake, updated["batch_stats"])

        (d_loss, (real, fake, new_stats)), grads = jax.value_and_grad(d_fn, has_aux=True)(
            state.params[_DISCRIMINATORS][name])
        new, metrics = apply_updates(
            state, {"loss": d_loss}, {_DISCRIMINATORS: {name: grads}},
            self.optimizers(state.params, state.step, ("discriminator", name)),
            mutable={"batch_stats": {**stats, name: new_stats}})
        return self._update_ema(state, new, metrics), {
            "loss": d_loss, **metrics, "d_loss": d_loss, "logits_real": jnp.mean(real),
            "logits_fake": jnp.mean(fake),
            "discriminator_accuracy": discriminator_accuracy(real, fake),
            "rollout_iteration": jnp.asarray(k, jnp.float32)}

    def _update_ema(self, state, new, metrics):
        """The official EMA: reset to the live weights at each epoch start, then a constant
        decay after every step of either kind (the tokenizer is unchanged by discriminator
        steps, but its EMA still moves); untouched by a non-finite step."""
        d = self.config.ema_decay
        start = state.step % self.config.alit.steps_per_epoch == 0
        finite = metrics["nonfinite"] == 0
        ema = jax.tree_util.tree_map(
            lambda e, p0, p1: jnp.where(finite, d * jnp.where(start, p0, e) + (1 - d) * p1, e),
            state.ema_params[self.group], state.params[self.group], new.params[self.group])
        return new.replace(ema_params={**new.ema_params, self.group: ema})

    # -- warm start ------------------------------------------------------------------------------
    def warm_start(self, state, path):
        """The tokenizer from the stage-1 EMA (official checkpoint's ``ema``, titok-jax folder,
        or a finished workdir's ``export/``); the discriminators too when the official file has
        ``gan_losses.*`` (a released stage-2 checkpoint), else they keep their init."""
        from titok_jax.convert import native
        source = epath.Path(path)
        if source.is_dir() and not native.is_native_dir(source):
            if not native.is_native_dir(source / "export"):
                raise ValueError(f"config.init_from {path} is a folder but neither a titok-jax "
                                 "tokenizer folder nor a finished workdir (no export/ in it)")
            path = str(source / "export")
        state = super().warm_start(state, path)
        if native.is_native_dir(path):
            return state
        loaded = load_official(path, state.params[_DISCRIMINATORS],
                               state.mutable["batch_stats"])
        if loaded is None:
            log.info("%s has no gan_losses discriminators: they start from their init", path)
            return state
        params, stats = jax.device_put(
            loaded, jax.tree_util.tree_map(lambda a: a.sharding,
                                           (state.params[_DISCRIMINATORS],
                                            state.mutable["batch_stats"])))
        return state.replace(params={**state.params, _DISCRIMINATORS: params},
                             mutable={**state.mutable, "batch_stats": stats})
