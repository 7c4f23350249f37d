"""The MaskGIT generators on TiTok tokens: load, score masked ids, sample class-conditional ids.

    gen = titok_jax.load_generator("titok_l32", "generator_titok_l32.bin")
    ids = gen.sample(labels, rng=jax.random.PRNGKey(0))   # int32 [B, 32], official settings
    images = tok.decode_tokens(ids)                         # with the matching TiTok tokenizer
    logits = gen.logits(masked_ids, labels)                 # float32 [B, 32, 4096]
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax.convert import native, official
from titok_jax.inference import sampling, weights
from titok_jax.models import variants
from titok_jax.models.maskgit import class_tokens


def _int_array(x: Any, what: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} axes, got shape {a.shape}")
    return a


class Generator:
    """A MaskGIT generator bound to its parameters and default sampling settings.

    ``config`` is its ``config.model`` block (:func:`variants.generator_model_config`);
    ``sampling_defaults`` are the settings :meth:`sample` uses unless told otherwise.
    """

    def __init__(self, model_config: ml_collections.ConfigDict, params: dict,
                 sampling_defaults: sampling.SamplingConfig | None = None):
        self.config = model_config
        self.module = variants.build_generator(model_config)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.sampling_defaults = (sampling_defaults or sampling.SamplingConfig()).validate()
        self._logits = jax.jit(self.module.apply)
        self._generate = jax.jit(self._generate_fn, static_argnames=("power_cosine",))

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        """K; also the mask token id."""
        return self.config.codebook_size

    @property
    def num_classes(self) -> int:
        return self.config.get("num_classes", 1000)

    def _class_tokens(self, labels: Any, drop: Any) -> jax.Array:
        return class_tokens(jnp.asarray(labels, jnp.int32), drop, self.codebook_size,
                            self.num_classes)

    def _check_labels(self, labels: Any) -> np.ndarray:
        labels = _int_array(labels, "labels", 1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                             f"[{labels.min()}, {labels.max()}]")
        return labels

    def logits(self, ids: Any, labels: Any, drop_labels: Any = False) -> jax.Array:
        """Logits ``[B, N, K]`` of token ids ``[B, N]`` (``K`` = mask) given class labels ``[B]``;
        ``drop_labels`` (bool or bool ``[B]``) conditions on the "no class" label instead."""
        ids = _int_array(ids, "ids", 2)
        labels = self._check_labels(labels)
        if ids.shape != (labels.shape[0], self.num_tokens):
            raise ValueError(f"ids must be [B, {self.num_tokens}] with B = len(labels) = "
                             f"{labels.shape[0]}, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > self.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.codebook_size}] ({self.codebook_size} "
                             f"= mask), got [{ids.min()}, {ids.max()}]")
        drop = np.asarray(drop_labels)
        if drop.dtype != bool or drop.shape not in ((), labels.shape):
            raise ValueError(f"drop_labels must be a bool or bools [{labels.shape[0]}], got "
                             f"{drop.dtype} {drop.shape}")
        cond = self._class_tokens(labels, drop)
        return self._logits({"params": self.params}, jnp.asarray(ids, jnp.int32), cond)

    def _generate_fn(self, params, cond, sched, noise, *, power_cosine: bool) -> jax.Array:
        def logits_fn(ids, tokens):
            return self.module.apply({"params": params}, ids, tokens)
        return sampling.generate(logits_fn, cond, sched, noise, num_tokens=self.num_tokens,
                                 mask_id=self.codebook_size,
                                 drop_id=self.codebook_size + 1 + self.num_classes,
                                 power_cosine=power_cosine)

    def sampling_config(self, **settings: Any) -> sampling.SamplingConfig:
        """:attr:`sampling_defaults` with ``settings`` replaced, validated (unknown keys raise)."""
        unknown = sorted(set(settings) - {f.name for f in
                                          dataclasses.fields(sampling.SamplingConfig)})
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}")
        return dataclasses.replace(self.sampling_defaults, **settings).validate()

    def sample_fn(self, cfg: sampling.SamplingConfig
                  ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """The traceable ``(params, labels [B], key) -> ids [B, N]`` of :meth:`sample` with
        settings ``cfg``, to jit inside a larger program (e.g. sampling + decoding)."""
        sched = jax.tree_util.tree_map(jnp.asarray, sampling.schedule(cfg, self.num_tokens))
        power_cosine = cfg.guidance_decay == "power-cosine"

        def fn(params, labels, key):
            return self._generate_fn(params, self._class_tokens(labels, False), sched, key,
                                     power_cosine=power_cosine)
        return fn

    def sample(self, labels: Any, *, rng: jax.Array | None = None,
               uniforms: tuple[Any, Any] | None = None, **settings: Any) -> jax.Array:
        """Samples token ids ``[B, N]`` (int32, in [0, K)) for class labels ``[B]``.

        Randomness comes from ``rng`` (a PRNG key) or is replayed from ``uniforms`` =
        ``(u_ids [T, B, N, K], u_conf [T, B, N])``, the official code's draws in order. Keyword
        settings override :attr:`sampling_defaults`: ``num_sample_steps``, ``guidance_scale``,
        ``guidance_decay`` (``constant``, ``linear``, ``power-cosine``), ``guidance_scale_pow``,
        ``randomize_temperature``, ``softmax_temperature_annealing``.
        """
        cfg = self.sampling_config(**settings)
        labels = self._check_labels(labels)
        if (rng is None) == (uniforms is None):
            raise ValueError("pass exactly one of rng= (a PRNG key) or uniforms=(u_ids, u_conf)")
        if uniforms is not None:
            b, t = labels.shape[0], cfg.num_sample_steps
            want = ((t, b, self.num_tokens, self.codebook_size), (t, b, self.num_tokens))
            got = tuple(tuple(np.shape(u)) for u in uniforms)
            if got != want:
                raise ValueError(f"uniforms must have shapes {want} for {t} steps and batch "
                                 f"{b}, got {got}")
            noise = tuple(jnp.asarray(u, jnp.float32) for u in uniforms)
        else:
            noise = rng
        sched = sampling.schedule(cfg, self.num_tokens)
        return self._generate(self.params, self._class_tokens(labels, False),
                              jax.tree_util.tree_map(jnp.asarray, sched), noise,
                              power_cosine=cfg.guidance_decay == "power-cosine")

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters under the official PyTorch key names and layouts."""
        return official.export_official(jax.device_get(self.params), self.config)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes a titok-jax folder that :func:`load_generator` reads back exactly."""
        native.save_native(directory, self.config, jax.device_get(self.params))


def load_generator(name_or_config: str | ml_collections.ConfigDict | dict | None,
                   path: str | os.PathLike | None = None, *,
                   sampling_defaults: sampling.SamplingConfig | None = None) -> Generator:
    """Loads a MaskGIT generator.

    Args:
      name_or_config: ``titok_l32``, ``titok_b64`` (ImageBert 768x24), ``titok_s128`` (UViT
        1024x20) or an official ``generator_titok_*_imagenet`` name; or an explicit generator
        ``config.model`` block (``name="maskgit"``, ``arch`` ``bert``/``uvit``, ...); or None
        when ``path`` is a titok-jax folder: the config saved in it.
      path: the official weights (``.bin`` via ``torch.load(weights_only=True)`` or
        ``.safetensors``) or a titok-jax folder written by :meth:`Generator.save`, local or
        ``gs://``; None initialises random weights (seed 0).
      sampling_defaults: the settings of :meth:`Generator.sample`; by default the official
        ones of a named generator, else those of the official ``generate``.
    """
    if name_or_config is None:
        if path is None or not native.is_native_dir(path):
            raise ValueError(f"without a generator name or config, path must be a titok-jax "
                             f"folder (config.json + params.safetensors), got {path!r}")
        cfg = weights.WeightsSource(path).model_config()
    elif isinstance(name_or_config, str):
        cfg = variants.generator_model_config(name_or_config)
    else:
        cfg = ml_collections.ConfigDict(dict(name_or_config))
    if sampling_defaults is None and cfg.get("variant") in variants.GENERATOR_SAMPLING:
        sampling_defaults = sampling.SamplingConfig(**variants.GENERATOR_SAMPLING[cfg.variant])
    module = variants.build_generator(cfg)
    if path is None:
        ids = jnp.zeros((1, cfg.num_tokens), jnp.int32)
        from titok_jax.convert.layout import init_unrolled
        params = init_unrolled(module, jax.random.PRNGKey(0), ids, jnp.zeros((1,), jnp.int32))
        return Generator(cfg, params, sampling_defaults)
    params = weights.load_params(cfg, path, what=f"generator ({path})", same_model="generator")
    return Generator(cfg, params, sampling_defaults)

