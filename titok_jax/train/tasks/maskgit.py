"""MaskGIT generator training on TiTok tokens (official ``train_maskgit.py``, ``MLMLoss``).

One parameter group, ``generator`` (ImageBert or UViTBert, with its EMA). The frozen part is a
TiTok VQ tokenizer. Token ids come from one of two sources:

- images (``config.data.tokens`` empty): the tokenizer encodes each image batch inside the
  jitted step, as the official on-the-fly tokenization does (the usual train transform);
- a pre-tokenized dataset (``config.data.tokens``, written by ``titok-jax pretokenize``: ADM
  center crops and their flips, or ten crops), read with the same ``(seed, step)`` determinism
  (:class:`titok_jax.data.tokens.TokenTrainPipeline`). The dataset records which tokenizer made
  it; a different ``config.tokenizer`` is refused before any step. The tokenizer then only
  decodes the samples of grids and ``gfid``.

Each step:

1. ids = the batch's tokens, or the tokenizer's quantizer ids of its images (no gradient;
   their codebook usage and perplexity are logged);
2. the official masking (``losses.mask_tokens``) and class-label dropout, from the step's key;
3. logits of the masked ids in train mode (dropout on), label-smoothed cross-entropy weighted
   1 on masked and ``unmasked_weight`` on unmasked positions (``losses.mlm_loss``);
4. AdamW + EMA updates.

Predictions: :meth:`MaskGITGenerator.predictor` gives class-conditional *samples* decoded by
the tokenizer, not reconstructions: the loop's image grids show the samples of classes
``0..num_grid_images-1`` drawn with fixed noise (``images/``, and ``samples/`` at the end), and
the only evaluator is ``gfid`` (:mod:`titok_jax.evals.generation`: FID / IS of
``eval.gfid_num_samples`` samples every ``eval_every`` steps). The export is the EMA generator
as a titok-jax folder that :func:`titok_jax.load_generator` reads.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from titok_jax.convert.layout import init_unrolled
from titok_jax.convert.official import name_map_for
from titok_jax.inference import predict, sampling
from titok_jax.models import variants
from titok_jax.train.losses import MaskDraws, mlm_inputs, mlm_loss
from titok_jax.train.state import TrainState, adamw, apply_updates
from titok_jax.train.tasks.base import Task, register
from titok_jax.train.tasks.titok import codebook_stats

log = logging.getLogger(__name__)


@register("maskgit_generator")
class MaskGITGenerator(Task):
    """A MaskGIT generator (``config.model``) on the tokens of ``config.tokenizer``."""

    group = "generator"
    grid_kind = "samples"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.input_kind = "tokens" if config.data.get("tokens") else "images"
        self.model = variants.build_generator(config.model)
        self.tokenizer_config = config.tokenizer.model
        self.tokenizer = variants.build_model(self.tokenizer_config)
        self.image_size = self.tokenizer_config.image_size
        self.check(config)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def check(self, config):
        gen, tok = config.model, config.tokenizer.model
        if tok.name != "titok" or tok.quantize_mode != "vq":
            raise ValueError("task maskgit_generator trains on the ids of a TiTok VQ tokenizer; "
                             f"config.tokenizer.model is {tok.get('variant', tok.name)} "
                             f"({tok.get('quantize_mode')})")
        if (gen.codebook_size, gen.num_tokens) != (tok.codebook_size, tok.num_latent_tokens):
            raise ValueError(
                f"the generator predicts {gen.num_tokens} tokens over a codebook of "
                f"{gen.codebook_size} (config.model), but the tokenizer "
                f"{tok.get('variant')} gives {tok.num_latent_tokens} tokens over "
                f"{tok.codebook_size} codes (config.tokenizer.model)")
        weights = config.tokenizer.weights
        if not weights and not config.tokenizer.allow_random:
            raise ValueError(
                "config.tokenizer.weights is empty: the generator trains on the ids of a "
                "pretrained TiTok tokenizer, e.g. --config.tokenizer.weights="
                "tokenizer_titok_l32.bin (an official file or a titok-jax folder). A random "
                "tokenizer only makes sense for tests: set --config.tokenizer.allow_random=True")
        for path, what in ((weights, "config.tokenizer.weights"),
                           (config.init_from, "config.init_from (generator weights)")):
            if path and not epath.Path(path).exists():
                raise FileNotFoundError(f"{what} not found: {path}")
        from titok_jax.evals.runner import parse_names
        other = [n for n in parse_names(config.evals) if n != "gfid"]
        if config.eval_every and other:
            raise ValueError(f"task maskgit_generator evaluates samples with gfid only; "
                             f"config.evals also names {other}, which measure reconstructions")
        if config.data.get("tokens"):
            self.check_tokens(config.data.tokens, gen)

    def check_tokens(self, path: str, gen) -> None:
        """A pre-tokenized dataset must hold ids of this generator's shape (its tokenizer's
        identity is checked in :meth:`frozen`, once the tokenizer is loaded)."""
        from titok_jax.data.tokens import TokenDataset
        meta = TokenDataset(path).meta
        if (meta["codebook_size"], meta["num_tokens"]) != (gen.codebook_size, gen.num_tokens):
            raise ValueError(
                f"config.data.tokens {path} holds {meta['num_tokens']} tokens over "
                f"{meta['codebook_size']} codes, but the generator predicts {gen.num_tokens} "
                f"tokens over {gen.codebook_size} (config.model)")

    # -- parameters -------------------------------------------------------------------------
    def frozen(self) -> dict:
        """``{"tokenizer": params}``: from ``config.tokenizer.weights``, or a random tokenizer
        drawn from ``seed + 1`` (``allow_random``; the same every time, so a resumed run
        trains on the same tokens)."""
        from titok_jax.inference.tokenizer import load_tokenizer
        weights = self.config.tokenizer.weights
        if weights:
            params = load_tokenizer(self.tokenizer_config.get("variant", ""), weights,
                                    model_config=self.tokenizer_config).params
        else:
            log.warning("using a RANDOM TiTok tokenizer (config.tokenizer.allow_random)")
            dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
            params = jax.jit(self.tokenizer.init)(jax.random.PRNGKey(self.config.seed + 1),
                                                  dummy)["params"]
        if self.input_kind == "tokens":
            from titok_jax.data.tokens import TokenDataset, tokenizer_fingerprint
            TokenDataset(self.config.data.tokens).check_tokenizer(
                tokenizer_fingerprint(self.tokenizer_config, params),
                f"config.tokenizer ({weights or 'random, seed + 1'})")
        return {"tokenizer": params}

    def init_params(self, rng):
        n = self.config.model.num_tokens
        return {self.group: init_unrolled(self.model, rng, jnp.zeros((1, n), jnp.int32),
                                          jnp.zeros((1,), jnp.int32))}

    def optimizers(self, abstract_params):
        return {self.group: adamw(self.config.optimizer, abstract_params[self.group],
                                  name_map_for(self.config.model), self.config.ema_decay)}

    # -- step -------------------------------------------------------------------------------
    def tokens(self, frozen: dict, images: jax.Array) -> jax.Array:
        """The tokenizer's ids ``[B, N]`` of ``images``."""
        out = self.tokenizer.apply({"params": frozen["tokenizer"]}, images,
                                   method=self.tokenizer.encode)
        return jax.lax.stop_gradient(out.ids).reshape(images.shape[0], -1)

    def train_step(self, state: TrainState, batch: dict, frozen: Any,
                   key: jax.Array) -> tuple[TrainState, dict]:
        gen, losses = self.config.model, self.config.losses
        tokens = batch["tokens"] if "tokens" in batch else self.tokens(frozen, batch["image"])
        mask_key, dropout_key = jax.random.split(key)
        draws = MaskDraws.draw(mask_key, tokens.shape[0], tokens.shape[1])
        masked, masks, cond = mlm_inputs(tokens, batch["label"], draws, gen.codebook_size,
                                         gen.num_classes, losses.class_label_dropout)

        def loss_fn(params):
            logits = self.model.apply({"params": params}, masked, cond, train=True,
                                      rngs={"dropout": dropout_key})
            return mlm_loss(logits, tokens, masks, losses.label_smoothing,
                            losses.unmasked_weight)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params[self.group])
        new, metrics = apply_updates(state, {"loss": loss}, {self.group: grads},
                                     self.optimizers(state.params))
        # How many codes the tokenizer's ids use: a generator of few codes has little to learn.
        return new, {"loss": loss, **metrics, **terms,
                     "masked_fraction": jnp.mean(masks.astype(jnp.float32)),
                     **codebook_stats(tokens, gen.codebook_size)}

    # -- predictions, export, warm start ----------------------------------------------------
    def predictor(self) -> predict.Predictor:
        """Class-conditional samples with the settings of ``config.sampling``, decoded by the
        tokenizer: ``generate(params, labels, key)`` (the ``gfid`` evaluator), and as
        ``reconstruct`` the fixed grid of labels ``0..B-1`` drawn with key 0, so the grids of
        successive steps are comparable (``recon``: the images, ``ids``: their tokens);
        ``features`` are the tokenizer's. Params: :meth:`predict_params`."""
        from titok_jax.models.maskgit import class_tokens
        gen, cfg = self.config.model, sampling.SamplingConfig(**self.config.sampling).validate()
        sched = jax.tree_util.tree_map(jnp.asarray, sampling.schedule(cfg, gen.num_tokens))
        tok = predict.titok_predictor(self.tokenizer, self.tokenizer_config)

        def sample(params, labels, key):
            ids = sampling.generate(
                lambda i, c: self.model.apply({"params": params["model"]}, i, c),
                class_tokens(labels, False, gen.codebook_size, gen.num_classes), sched, key,
                num_tokens=gen.num_tokens, mask_id=gen.codebook_size,
                drop_id=gen.codebook_size + 1 + gen.num_classes,
                power_cosine=cfg.guidance_decay == "power-cosine")
            images = self.tokenizer.apply({"params": params["frozen"]["tokenizer"]}, ids,
                                          method=self.tokenizer.decode_tokens)
            return jnp.clip(images, 0.0, 1.0), ids

        def reconstruct(params, images):
            labels = jnp.arange(images.shape[0]) % gen.num_classes
            recon, ids = sample(params, labels, jax.random.PRNGKey(0))
            return {"recon": recon, "ids": ids}

        def features(params, images):
            return tok.features({"model": params["frozen"]["tokenizer"]}, images)

        return predict.Predictor(reconstruct, features, self.image_size, gen.codebook_size,
                                 generate=lambda p, labels, key: sample(p, labels, key)[0],
                                 num_classes=gen.num_classes)

    def export(self, state, frozen, directory) -> None:
        """The EMA generator as a titok-jax folder (``load_generator(dir)``), float32 compute
        whatever the training dtype (the params are float32 either way)."""
        from titok_jax.convert import native
        model = ml_collections.ConfigDict(self.config.model.to_dict())
        model.dtype = "float32"
        native.save_native(directory, model, jax.device_get(state.ema_params[self.group]))

    def warm_start(self, state, path):
        """Params (and EMA) from official generator weights or a titok-jax folder."""
        from titok_jax.inference.generator import load_generator
        params = load_generator(self.config.model, path).params
        params = jax.device_put(params, jax.tree_util.tree_map(lambda a: a.sharding,
                                                               state.params[self.group]))
        return state.replace(params={**state.params, self.group: params},
                             ema_params={**state.ema_params,
                                         self.group: jax.tree_util.tree_map(jnp.copy, params)})
