"""TiTok's GAN-phase tasks: stage 2 (decoder fine-tuning) and the single-stage VQ / VAE recipe.

Both train two parameter groups in one jitted step: ``tokenizer`` (the generator, with its EMA)
and ``discriminator`` (the official ``NLayerDiscriminator``, no EMA), each with its own AdamW.

* ``titok_stage2`` (official ``ReconstructionLoss_Stage2``): a two-stage model (L-32, B-64,
  S-128) with ``finetune_decoder``: the encoder, quantizer and latent tokens come from a stage-1
  checkpoint (``config.init_from``) and stay frozen; the decoder, the MaskGIT-VQGAN codebook
  (``pixel_quantize``) and pixel decoder (``pixel_decoder``, from ``config.teacher.weights``
  unless the checkpoint already holds ``pixel_*`` keys) train on L2 + 0.1 x ConvNeXt-S
  perceptual + 0.01 x GAN.
* ``titok_single_stage`` (official ``ReconstructionLoss_Single_Stage``): the pixel-head VQ-8k and
  VAE models trained from scratch on L2 + 1.1 x LPIPS/ConvNeXt + quantizer (VQ) or KL (VAE)
  + 0.1 x GAN.

Step order and start, as the official ``train_one_epoch``: before ``discriminator_start`` the
step is the generator's only (no discriminator forward, its optimizer state and the LeCam EMAs
untouched, compiled as its own step kind ``generator``); from it on, step kind ``gan``: one
forward of the generator; its loss sees ``D(recon)`` with the discriminator held; the
discriminator loss sees ``D(real)`` and ``D(stop_gradient(recon))`` with the pre-step
discriminator and LeCam EMAs; both groups then update under one non-finite guard. The
discriminator's schedule runs over its own updates (warm-up + cosine over
``total_steps - discriminator_start``), as the official scheduler is stepped only on
discriminator steps.

Tail drop (``config.tail_drop``) works here as in ``tasks/titok.py``: the generator's decoder sees
the first k tokens of each example (k from the step key), the quantizer loss or KL covers all N.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from titok_jax.convert.official import name_map_for
from titok_jax.inference import predict
from titok_jax.models import variants
from titok_jax.train.state import adamw, apply_updates
from titok_jax.train.tasks.base import Task, register
from titok_jax.train.tasks.titok import (
    check_pixel_model,
    check_tail_drop,
    codebook_stats,
    tail_drop_lengths,
    tail_drop_terms,
)

DISCRIMINATOR = "discriminator"
# The parts of a finetune_decoder TiTok that stage 2 trains; the rest (encoder, quantize,
# latent_tokens) is frozen.
STAGE2_TRAINED = ("decoder", "pixel_quantize", "pixel_decoder")


class _GanTask(Task):
    """Generator (``tokenizer`` group) + discriminator with the official GAN-phase losses."""

    def __init__(self, config: ml_collections.ConfigDict):
        from titok_jax.gan.losses import LossConfig
        from titok_jax.gan.perceptual import PerceptualLoss
        super().__init__(config)
        self.losses = LossConfig.from_config(config.losses)
        p = config.perceptual
        self.perceptual = PerceptualLoss.from_name(self.losses.perceptual_loss,
                                                   precision=p.precision or None)
        self.discriminator = self._discriminator_module()

    def _discriminator_module(self):
        from titok_jax.gan.discriminator import NLayerDiscriminator
        d = self.config.discriminator
        return NLayerDiscriminator(hidden_channels=d.hidden_channels, num_stages=d.num_stages,
                                   blur_kernel_size=d.blur_kernel_size)

    # -- parameters -------------------------------------------------------------------------
    def frozen(self) -> dict:
        p = self.config.perceptual
        return {"perceptual": self.perceptual.load_params(
            p.convnext_weights, allow_random=p.allow_random, seed=self.config.seed + 2)}

    def init_params(self, rng):
        rng_g, rng_d = jax.random.split(rng)
        params = super().init_params(rng_g)
        dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        params[DISCRIMINATOR] = self.discriminator.init(rng_d, dummy)["params"]
        return params

    def check_clustering(self, config) -> None:
        if config.clustering_vq and config.model.quantize_mode != "vq":
            raise ValueError("config.clustering_vq re-seeds a VQ codebook; this model is a "
                             f"{config.model.quantize_mode}")

    def init_mutable(self):
        # The official loss module's ema_real_logits_mean / ema_fake_logits_mean buffers, and
        # the quantizer's code-usage EMA (embed_prob) under clustering_vq.
        mutable = {"lecam": {"ema_real": jnp.zeros((), jnp.float32),
                             "ema_fake": jnp.zeros((), jnp.float32)}}
        if self.config.clustering_vq:
            mutable["clustering"] = {"embed_prob": jnp.zeros((self.config.model.codebook_size,),
                                                             jnp.float32)}
        return mutable

    def optimizers(self, abstract_params):
        return {
            self.group: adamw(self.config.optimizer, abstract_params[self.group],
                              self._name_map(), self.config.ema_decay),
            DISCRIMINATOR: adamw(self.config.discriminator_optimizer,
                                 abstract_params[DISCRIMINATOR], None, None),
        }

    def _name_map(self):
        return name_map_for(self.config.model)

    # -- steps ------------------------------------------------------------------------------
    @property
    def steps(self):
        return {"generator": functools.partial(self._step, gan=False),
                "gan": functools.partial(self._step, gan=True)}

    def step_kind(self, step: int) -> str:
        return "gan" if step >= self.losses.discriminator_start else "generator"

    def _forward(self, params, frozen, images, key):
        """(reconstruction, quantizer terms or None, per-image KL or None, extra metrics,
        encoder latents)."""
        vae = self.config.model.quantize_mode == "vae"
        num_tokens = tail_drop_lengths(self.config, key, images.shape[0])
        out = self.model.apply({"params": self.model_params(params, frozen)}, images,
                               rng=key if vae else None, num_tokens=num_tokens)
        extra = tail_drop_terms(num_tokens)
        if vae:
            return out.decoded, None, out.posterior.kl(), extra, out.encoder_out
        q = out.quantizer
        terms = {"quantizer_loss": q.quantizer_loss, "commitment_loss": q.commitment_loss,
                 "codebook_loss": q.codebook_loss}
        extra.update(codebook_stats(out.ids, self.config.model.codebook_size))
        return out.decoded, terms, None, extra, out.encoder_out

    def _step(self, state, batch, frozen, key, *, gan: bool):
        from titok_jax.gan.losses import discriminator_loss, generator_loss
        images = batch["image"]
        disc = self.discriminator
        d_params = state.params[DISCRIMINATOR]
        gan_on = jnp.asarray(gan)

        def g_loss(params):
            recon, quant, kl, extra, z = self._forward(params, frozen, images, key)
            perceptual = self.perceptual(frozen["perceptual"], images, recon)
            logits_fake = disc.apply({"params": d_params}, recon) if gan else None
            total, terms = generator_loss(self.losses, images, recon, perceptual=perceptual,
                                          logits_fake=logits_fake, gan_on=gan_on,
                                          quantizer=quant, kl=kl)
            return total, ({**terms, **extra}, recon, z)

        (g_total, (terms, recon, z)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
            state.params[self.group])
        losses, grads, mutable = {"generator": g_total}, {self.group: g_grads}, {}
        metrics = {"loss": g_total, **terms}
        if self.config.clustering_vq:
            state, mutable["clustering"] = self._reseed_codebook(state, z, g_total, g_grads)
        if gan:
            fake = jax.lax.stop_gradient(recon)
            lecam = state.mutable["lecam"]

            def d_loss(params):
                logits_real = disc.apply({"params": params}, images)
                logits_fake = disc.apply({"params": params}, fake)
                total, d_terms, (ema_real, ema_fake) = discriminator_loss(
                    self.losses, logits_real, logits_fake, lecam["ema_real"], lecam["ema_fake"],
                    gan_on)
                return total, (d_terms, {"ema_real": ema_real, "ema_fake": ema_fake})

            (d_total, (d_terms, new_lecam)), d_grads = jax.value_and_grad(
                d_loss, has_aux=True)(d_params)
            losses["discriminator"] = d_total
            grads[DISCRIMINATOR] = d_grads
            mutable["lecam"] = new_lecam
            metrics.update(d_terms)
            metrics.update({"lecam_ema_real": new_lecam["ema_real"],
                            "lecam_ema_fake": new_lecam["ema_fake"]})
        new, update_metrics = apply_updates(state, losses, grads, self.optimizers(state.params),
                                            mutable=mutable or None)
        return new, {**metrics, **update_metrics}

    def _reseed_codebook(self, state, z, loss, grads):
        """The official ``clustering_vq``: the codebook is re-seeded in the forward pass, before
        the optimizer step, which then updates the re-seeded values (as torch replaces
        ``embedding.weight.data`` and then steps). A non-finite step re-seeds nothing."""
        from titok_jax.models.quantizer import clustering_update
        tok = state.params[self.group]
        old = tok["quantize"]["embedding"]
        prob = state.mutable["clustering"]["embed_prob"]
        new, new_prob = clustering_update(old, jax.lax.stop_gradient(z), prob,
                                          use_l2_norm=self.config.model.use_l2_norm)
        ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        tok = {**tok, "quantize": {**tok["quantize"], "embedding": jnp.where(ok, new, old)}}
        state = state.replace(params={**state.params, self.group: tok})
        return state, {"embed_prob": new_prob}

    # -- warm start -------------------------------------------------------------------------
    def warm_start(self, state, path):
        state = super().warm_start(state, path)
        return self._load_discriminator(state)

    def _load_discriminator(self, state):
        """Discriminator weights from ``config.discriminator.weights`` (official layout), if set."""
        weights = self.config.discriminator.weights
        if not weights:
            return state
        from titok_jax.gan.discriminator import load_discriminator
        params = load_discriminator(weights, state.params[DISCRIMINATOR])
        params = jax.device_put(params, jax.tree_util.tree_map(
            lambda a: a.sharding, state.params[DISCRIMINATOR]))
        return state.replace(params={**state.params, DISCRIMINATOR: params})


@register("titok_single_stage")
class TiTokSingleStage(_GanTask):
    def check(self, config):
        check_pixel_model(config, self.name)
        self.check_clustering(config)
        check_tail_drop(config)


@register("titok_stage2")
class TiTokStage2(_GanTask):
    """Decoder fine-tuning of a two-stage TiTok; see the module docstring.

    The ``tokenizer`` group holds the whole model, so a workdir is self-contained (resume,
    ``titok-jax eval`` and export need no stage-1 file); the frozen parts get no gradient
    (``stop_gradient``, so XLA drops their backward), no optimizer state (``set_to_zero``) and
    an EMA equal to themselves, as the official EMA copies parameters without gradients.
    """

    def check(self, config):
        m = config.model
        if m.name != "titok" or not m.is_legacy or not m.finetune_decoder:
            raise ValueError(
                "task titok_stage2 fine-tunes the decoder of a two-stage TiTok with its pixel "
                "decoder (configs/titok.py:variant=L-32|B-64|S-128,stage=2); config.model is "
                f"{m.get('variant')} with is_legacy={m.get('is_legacy')}, "
                f"finetune_decoder={m.get('finetune_decoder')}")
        if not config.init_from:
            raise ValueError(
                "task titok_stage2 starts from a stage-1 checkpoint: set config.init_from to an "
                "official stage-1 file, a titok-jax stage-1 folder or workdir (its encoder, "
                "quantizer and latent tokens are kept frozen)")
        _require_exists(config.init_from, "config.init_from (the stage-1 checkpoint)")
        if config.clustering_vq:
            raise ValueError("config.clustering_vq re-seeds the codebook, which stage 2 keeps "
                             "frozen: set it to False")
        if config.teacher.weights:
            _require_exists(config.teacher.weights,
                            "config.teacher.weights (the MaskGIT-VQGAN of the pixel decoder)")
        check_tail_drop(config)

    def optimizers(self, abstract_params):
        opts = super().optimizers(abstract_params)
        tok = opts[self.group]

        def labels(params):
            return {k: jax.tree_util.tree_map(
                lambda _, k=k: "train" if k in STAGE2_TRAINED else "frozen", v)
                for k, v in params.items()}
        tx = optax.multi_transform({"train": tok.tx, "frozen": optax.set_to_zero()}, labels)
        opts[self.group] = dataclasses.replace(tok, tx=tx)
        return opts

    def model_params(self, params, frozen):
        return {k: v if k in STAGE2_TRAINED else jax.lax.stop_gradient(v)
                for k, v in params.items()}

    def warm_start(self, state, path):
        del path  # config.init_from (+ config.teacher.weights), see load_stage2_init
        full = jax.device_put(load_stage2_init(self.config, self.model),
                              jax.tree_util.tree_map(lambda a: a.sharding,
                                                     state.params[self.group]))
        state = state.replace(
            params={**state.params, self.group: full},
            ema_params={**state.ema_params,
                        self.group: jax.tree_util.tree_map(jnp.copy, full)})
        return self._load_discriminator(state)


def _require_exists(path: str, what: str) -> None:
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{what} not found: {path}")


def load_stage2_init(config: ml_collections.ConfigDict, model) -> dict[str, Any]:
    """The full parameter tree a stage-2 run starts from.

    ``config.init_from``: an official stage-1 (or stage-2) state dict, or a titok-jax folder or
    training workdir (its EMA); without ``pixel_*`` keys the MaskGIT-VQGAN of
    ``config.teacher.weights`` supplies ``pixel_decoder`` and ``pixel_quantize`` (the official
    stage-2 initialisation; with ``teacher.allow_random`` and no weights, the random teacher a
    runlocal stage 1 used). Missing, unexpected or misshapen keys raise, naming the files.
    """
    from titok_jax.convert.layout import check_params
    from titok_jax.convert.official import (
        export_official,
        import_official,
        vqgan_as_pixel_decoder,
    )
    from titok_jax.inference.weights import WeightsSource
    path = config.init_from
    source = WeightsSource(path)
    if source.kind == "weights":
        state_dict = source.state_dict("ema")
    else:  # a titok-jax folder (its model block) or workdir (its stored config, EMA params)
        src_model = source.config(ml_collections.ConfigDict(
            {"model": config.model.to_dict()})).model
        if src_model.get("num_latent_tokens") != config.model.num_latent_tokens or (
                src_model.get("encoder") != config.model.encoder):
            raise ValueError(
                f"{path} holds a {src_model.get('variant')} tokenizer (encoder "
                f"{src_model.get('encoder')}, {src_model.get('num_latent_tokens')} tokens); "
                f"this run fine-tunes {config.model.variant}")
        params = source.tokenizer_params()
        state_dict = export_official(jax.device_get(params), src_model)
    sources = [path]
    if not any(k.startswith("pixel_") for k in state_dict):
        teacher_cfg = predict.teacher_config(config)
        if config.teacher.weights:
            vq_sd = WeightsSource(config.teacher.weights).state_dict()
            sources.append(config.teacher.weights)
        elif config.teacher.get("allow_random", False):
            vqgan = variants.build_model(teacher_cfg)
            vq = jax.jit(vqgan.init)(jax.random.PRNGKey(config.seed + 1),
                                     jnp.zeros((1, 256, 256, 3)))["params"]
            vq_sd = export_official(jax.device_get(vq), teacher_cfg)
        else:
            raise ValueError(
                f"{path} has no pixel decoder (a stage-1 checkpoint): stage 2 needs the "
                "MaskGIT-VQGAN weights (maskgit-vqgan-imagenet-f16-256.bin) in "
                "config.teacher.weights for pixel_decoder and pixel_quantize")
        state_dict = {**state_dict, **vqgan_as_pixel_decoder(vq_sd)}
    abstract = predict.abstract_params(model, config.model.image_size)
    try:
        full = import_official(state_dict, abstract, config.model)
    except ValueError as e:
        raise ValueError(f"stage-2 initialisation from {' + '.join(sources)}: {e}") from e
    return check_params(full, abstract, " + ".join(sources))
