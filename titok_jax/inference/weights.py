"""The one loader: every weights source of the project resolved to a config and parameters.

A source (local or ``gs://``) is one of:

* **titok-jax folder** (``config.json`` + ``params.safetensors``, e.g. ``WORKDIR/export``): its
  stored model config, and its parameters checked against the model's shapes;
* **official weights file** (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``; ``.bin``
  and friends through ``torch.load(weights_only=True)``): a flat state dict, or with ``which``
  the ``ema``/``model`` state dict of an official training checkpoint (ALIT's ``.pth``); the
  model config comes from the caller;
* **training workdir** or its ``checkpoints/``: the newest Orbax checkpoint, the EMA params of a
  parameter group (``tokenizer`` by default) and the config stored with it.

:func:`load_params` turns a source into the parameter tree of a model config; every public
loader (``load_tokenizer``, ``load_vqgan``, ``load_alit``, ``load_generator``), ``titok-jax
eval`` (:class:`WeightsSource`), the frozen parts of training and evaluation
(:func:`load_frozen`: the stage-1 teacher VQGAN, ALIT's base VQGAN) and warm starts go through
it. Params handed to a :class:`~titok_jax.inference.predict.Predictor` are ``{"model": trainable
params, "frozen": frozen parts}`` (:meth:`WeightsSource.params`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from titok_jax.convert import native, official
from titok_jax.convert.layout import check_params, import_state_dict
from titok_jax.inference import predict
from titok_jax.infra import paths
from titok_jax.models import variants

log = logging.getLogger(__name__)

TOKENIZER_GROUP = "tokenizer"
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class WeightsSource:
    """A path resolved to its kind (``folder``, ``weights`` or ``workdir``), with its stored config
    (folder: the model block; workdir: the whole training config, if stored) and parameters.

    A path that does not exist is a ``weights`` file when it has a weights suffix (reading it then
    says that the file is missing), else a FileNotFoundError naming the three kinds."""

    def __init__(self, path: str | os.PathLike, group: str = TOKENIZER_GROUP):
        self.path = os.fspath(path)
        self.group = group
        self.step: int | None = None
        self._state = None
        self._stored_model = self._stored_config = None
        # Orbax (and absl's log handler) only when a workdir may be read: not at import time.
        from titok_jax.infra import checkpointing
        if native.is_native_dir(self.path):
            self.kind = "folder"  # its parameters are read when asked for
            self._stored_model = native.load_native_config(self.path)
        elif epath.Path(self.path).is_file():
            self.kind = "weights"
        elif checkpointing.checkpoint_dir(self.path) is not None:
            self.kind = "workdir"
            self._state, meta, self.step = checkpointing.read_latest(self.path)
            self._stored_config = meta.get("config")
            if self._stored_config is None:
                log.warning("the checkpoint at step %d in %s has no stored config; using the "
                            "--config given", self.step, self.path)
        elif self.path.endswith(WEIGHTS_SUFFIXES):
            self.kind = "weights"
        else:
            raise FileNotFoundError(f"no titok-jax folder, weights file or training checkpoint "
                                    f"at {self.path}")

    @property
    def directory(self) -> epath.Path:
        """Where results go by default: the folder or workdir, or the file's directory."""
        path = paths.as_path(self.path)
        return path.parent if self.kind == "weights" else path

    def model_config(self) -> ml_collections.ConfigDict | None:
        """The model config stored with the source (folder or workdir), or None (a file)."""
        if self._stored_model is not None:
            return ml_collections.ConfigDict(self._stored_model.to_dict())
        if self._stored_config is not None:
            return ml_collections.ConfigDict(self._stored_config["model"])
        return None

    def config(self, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
        """The config to evaluate with: the workdir's stored config, else ``config`` (required
        then) with a folder's model block in ``config.model``."""
        if self._stored_config is not None:
            return ml_collections.ConfigDict(self._stored_config)
        if config is None:
            raise ValueError(f"{self.path} is a {self.kind} without a stored training config: "
                             "pass --config")
        if self._stored_model is not None:
            config.model = ml_collections.ConfigDict(self._stored_model.to_dict())
            if "teacher" in config and "vqgan" in config.model:
                config.teacher.size = config.model.vqgan  # the VQGAN its proxy codes index
        return config

    def tokenizer_params(self) -> dict:
        """The stored tree as it is (folder: the full tree; workdir: the EMA of the group),
        without frozen parts or checks."""
        if self.kind == "folder":
            return native.load_native(self.path)[1]
        if self.kind == "workdir":
            groups = self._state.get("ema_params") or self._state["params"]
            if self.group not in groups:
                raise ValueError(f"the checkpoint in {self.path} has no {self.group!r} "
                                 f"parameter group (groups: {sorted(groups)})")
            return groups[self.group]
        raise ValueError(f"{self.path} is a weights file: read it as a state dict")

    def state_dict(self, which: str | None = None) -> dict:
        """A weights file's state dict: flat (``which`` None), or the ``which`` (``ema`` /
        ``model``) state dict of an official training checkpoint."""
        if which is None:
            return official.read_state_dict(self.path)
        return official.read_training_checkpoint(self.path, which)

    def read(self, model_config: ml_collections.ConfigDict, abstract: Any, *,
             which: str | None = None, extra_state: dict | None = None,
             what: str | None = None) -> dict:
        """The full parameter tree of ``model_config`` (shapes ``abstract``), checked: every
        missing, unexpected or misshapen key raises at once. ``extra_state``: official entries
        added to a file's state dict (e.g. the VQGAN as a stage-2 pixel decoder)."""
        what = what or f"{model_config.name} ({self.path})"
        if self.kind == "weights":
            state = self.state_dict(which)
            state.update(extra_state or {})
            return official.import_official(state, abstract, model_config)
        return check_params(self.tokenizer_params(), abstract, what)

    def params(self, config: ml_collections.ConfigDict) -> dict:
        """``{"model": trainable params, "frozen": frozen parts}`` of ``config.model``, as host
        arrays; frozen parts the source lacks come from :func:`load_frozen`."""
        model_cfg = config.model
        _check_teacher(config)
        abstract = abstract_model_params(model_cfg)
        if self.kind == "workdir":
            tree = self.tokenizer_params()
            if predict.ALIT_FROZEN in tree and model_cfg.name == "alit":
                # ALIT stage 2 trains its VQGAN: the workdir holds the whole tree.
                trainable, frozen = predict.split_frozen(model_cfg, self.read(model_cfg, abstract))
                return {"model": trainable, "frozen": frozen}
            trainable = check_params(tree, predict.split_frozen(model_cfg, abstract)[0],
                                     f"{model_cfg.name} ({self.path})")
            return {"model": trainable, "frozen": load_frozen(config)}
        full = self.read(model_cfg, abstract, which=None if self.kind == "folder" else "ema")
        trainable, frozen = predict.split_frozen(model_cfg, full)
        return {"model": trainable, "frozen": frozen or load_frozen(config)}


def abstract_model_params(model_config: ml_collections.ConfigDict) -> Any:
    """Parameter shapes of the model of ``model_config`` (a tokenizer, VQGAN or generator)."""
    if model_config.name == "maskgit":
        module = variants.build_generator(model_config)
        ids = jax.ShapeDtypeStruct((1, model_config.num_tokens), jnp.int32)
        cond = jax.ShapeDtypeStruct((1,), jnp.int32)
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids, cond)["params"]
    return predict.abstract_params(variants.build_model(model_config),
                                   model_config.get("image_size", 256))


def check_same_model(saved: ml_collections.ConfigDict, asked: ml_collections.ConfigDict,
                     path: str | os.PathLike, what: str = "model") -> None:
    """A folder's stored config must be the model asked for (execution keys aside)."""
    if variants.model_identity(saved) != variants.model_identity(asked):
        raise ValueError(f"{path} holds a different {what} config than requested:\n"
                         f"  saved: {variants.model_identity(saved)}\n"
                         f"  asked: {variants.model_identity(asked)}")


def load_params(model_config: ml_collections.ConfigDict,
                path: str | os.PathLike | WeightsSource, *,
                which: str | None = None, extra_state: dict | None = None,
                what: str | None = None, same_model: str | None = "model") -> dict:
    """The full parameter tree of ``model_config`` from any source (folder, official file,
    workdir; or a :class:`WeightsSource` already resolved, so a workdir is read once).
    ``which``: read a file as an official training checkpoint (``ema``/``model``);
    ``same_model``: refuse a folder or workdir whose stored model differs (the word used in the
    error), None to skip."""
    source = path if isinstance(path, WeightsSource) else WeightsSource(path)
    path = source.path
    stored = source.model_config()
    if same_model and stored is not None:
        check_same_model(stored, model_config, path, same_model)
    return source.read(model_config, abstract_model_params(model_config), which=which,
                       extra_state=extra_state, what=what)


def load_frozen(config: ml_collections.ConfigDict) -> dict:
    """The frozen parts a training/eval config needs, loaded from ``config.teacher.weights``.

    Without weights this is an error, unless ``config.teacher.allow_random`` (runlocal configs
    and tests): then a random VQGAN drawn from ``config.seed + 1`` (the same every time, so a
    workdir evaluated later sees the teacher it was trained with).
    """
    model_cfg = config.model
    if not predict.needs_teacher(model_cfg):
        return {}
    weights = config.teacher.get("weights", "")
    if not weights and not config.teacher.get("allow_random", False):
        what = ("ALIT's frozen VQGAN (base tokenizer)" if model_cfg.name == "alit"
                else "the stage-1 proxy-code teacher (MaskGIT-VQGAN)")
        raise ValueError(
            f"config.teacher.weights is empty: {what} needs pretrained weights, e.g. "
            "--config.teacher.weights=maskgit-vqgan-imagenet-f16-256.bin. A random teacher "
            "only makes sense for tests: set --config.teacher.allow_random=True to use one")
    if model_cfg.name == "alit":
        return {predict.ALIT_FROZEN: _alit_vqgan(config, weights)}
    teacher_cfg = predict.teacher_config(config)
    if weights:
        params = load_params(teacher_cfg, weights, same_model=None)
    else:
        log.warning("using a RANDOM MaskGIT-VQGAN teacher (config.teacher.allow_random)")
        teacher = variants.build_model(teacher_cfg)
        params = jax.jit(teacher.init)(jax.random.PRNGKey(config.seed + 1),
                                       jnp.zeros((1, 256, 256, 3)))["params"]
    return {"teacher": params}


def _alit_vqgan(config, weights: str) -> dict:
    """ALIT's ``base_tokenizer`` subtree: from an ALIT checkpoint (its
    ``base_tokenizer.vqgan.*``), a taming-layout VQGAN state dict, or the MaskGIT-VQGAN release
    (same architecture); random (seeded) without weights."""
    model = variants.build_model(config.model)
    size = config.model.image_size
    frozen = predict.ALIT_FROZEN
    if not weights:
        log.warning("using a RANDOM VQGAN as ALIT's base tokenizer (config.teacher.allow_random)")
        params = jax.jit(model.init)(jax.random.PRNGKey(config.seed + 1),
                                     jnp.zeros((1, size, size, 3)))["params"]
        return params[frozen]
    sub = predict.abstract_params(model, size)[frozen]
    state = WeightsSource(weights).state_dict("ema")
    prefix = "base_tokenizer.vqgan."
    if any(k.startswith(prefix) for k in state):
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    elif any(".mid.block_" in k for k in state):
        state = {prefix + k: v for k, v in state.items()}
    else:  # MaskGIT-VQGAN release layout
        return {"vqgan": import_state_dict(state, sub["vqgan"], official.VQGAN_MAP)}
    return import_state_dict(state, {frozen: sub}, official.ALIT_MAP)[frozen]


def _check_teacher(config: ml_collections.ConfigDict) -> None:
    """A stage-1 TiTok's proxy codes index the VQGAN of ``config.model.vqgan``: the teacher
    that decodes them must be that one."""
    model_cfg = config.model
    if model_cfg.name != "titok" or not predict.needs_teacher(model_cfg):
        return
    if config.teacher.size != model_cfg.get("vqgan", "maskgit"):
        raise ValueError(f"the model predicts codes of the {model_cfg.vqgan!r} VQGAN but "
                         f"config.teacher.size is {config.teacher.size!r}")
