"""What an evaluation outside training evaluates: a tokenizer's config and params from a
titok-jax folder, an official weights file or a training workdir, with no trainer.

* **titok-jax folder** (``config.json`` + ``params.safetensors``, e.g. ``WORKDIR/export``): its
  ``config.json`` replaces ``config.model``.
* **official weights file** (``.safetensors``, ``.bin``, ``.pt``, ``.pth``; ALIT training
  checkpoints give their ``ema`` state dict): ``config.model`` comes from the config.
* **training workdir** or its ``checkpoints/``: the newest Orbax checkpoint. The config stored
  with it (``meta["config"]``) is used when present, else the given one; the EMA params of the
  parameter group ``tokenizer`` are evaluated.

Params are ``{"model": trainable params, "frozen": frozen parts}``, as
:class:`titok_jax.inference.predict.Predictor` takes them. The frozen parts are the ALIT VQGAN
stored in the folder or file, else :func:`titok_jax.inference.predict.load_frozen` of the config
(the stage-1 TiTok proxy-code teacher from ``config.teacher.weights``; ALIT workdirs, whose state
holds no VQGAN).
"""
from __future__ import annotations

import logging
import os

import ml_collections
from etils import epath

from titok_jax.convert import native, official
from titok_jax.convert.layout import check_params
from titok_jax.inference import predict
from titok_jax.infra import checkpointing, paths
from titok_jax.models import variants

log = logging.getLogger(__name__)

TOKENIZER_GROUP = "tokenizer"


class Checkpoint:
    """A ``--checkpoint`` argument: its kind (``folder``, ``weights`` or ``workdir``), its
    stored config (folder: the model block; workdir: the whole config, if stored) and params."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.step: int | None = None
        self._folder_params = self._state = None
        self._stored_model = self._stored_config = None
        if native.is_native_dir(self.path):
            self.kind = "folder"
            self._stored_model, self._folder_params = native.load_native(self.path)
        elif epath.Path(self.path).is_file():
            self.kind = "weights"
        elif checkpointing.checkpoint_dir(self.path) is not None:
            self.kind = "workdir"
            self._state, meta, self.step = checkpointing.read_latest(self.path)
            self._stored_config = meta.get("config")
            if self._stored_config is None:
                log.warning("the checkpoint at step %d in %s has no stored config; using the "
                            "--config given", self.step, self.path)
        else:
            raise FileNotFoundError(f"no titok-jax folder, weights file or training checkpoint "
                                    f"at {self.path}")

    @property
    def directory(self) -> epath.Path:
        """Where results go by default: the folder or workdir, or the file's directory."""
        path = paths.as_path(self.path)
        return path.parent if self.kind == "weights" else path

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
        """The stored tokenizer tree as it is (folder: the full tree; workdir: the EMA of the
        ``tokenizer`` group), without frozen parts or checks."""
        if self.kind == "folder":
            return self._folder_params
        if self.kind == "workdir":
            groups = self._state.get("ema_params") or self._state["params"]
            if TOKENIZER_GROUP not in groups:
                raise ValueError(f"the checkpoint in {self.path} has no {TOKENIZER_GROUP!r} "
                                 f"parameter group (groups: {sorted(groups)})")
            return groups[TOKENIZER_GROUP]
        raise ValueError(f"{self.path} is a weights file: read it as a state dict")

    def params(self, config: ml_collections.ConfigDict) -> dict:
        """``{"model": trainable params, "frozen": frozen parts}`` as host arrays."""
        model_cfg = config.model
        _check_teacher(config)
        module = variants.build_model(model_cfg)
        abstract = predict.abstract_params(module, model_cfg.get("image_size", 256))
        what = f"{model_cfg.name} ({self.path})"
        if self.kind == "workdir":
            tree = self.tokenizer_params()
            if predict.ALIT_FROZEN in tree and model_cfg.name == "alit":
                # ALIT stage 2 trains its VQGAN: the workdir holds the whole tree.
                full = check_params(tree, abstract, what)
                trainable, frozen = predict.split_frozen(model_cfg, full)
                return {"model": trainable, "frozen": frozen}
            trainable = check_params(tree,
                                     predict.split_frozen(model_cfg, abstract)[0], what)
            return {"model": trainable, "frozen": predict.load_frozen(config)}
        if self.kind == "folder":
            full = check_params(self._folder_params, abstract, what)
        else:
            state = official.read_training_checkpoint(self.path)
            full = official.import_official(state, abstract, model_cfg)
        trainable, frozen = predict.split_frozen(model_cfg, full)
        return {"model": trainable, "frozen": frozen or predict.load_frozen(config)}


def _check_teacher(config: ml_collections.ConfigDict) -> None:
    """A stage-1 TiTok's proxy codes index the VQGAN of ``config.model.vqgan``: the teacher
    that decodes them must be that one."""
    model_cfg = config.model
    if model_cfg.name != "titok" or not predict.needs_teacher(model_cfg):
        return
    if config.teacher.size != model_cfg.get("vqgan", "maskgit"):
        raise ValueError(f"the model predicts codes of the {model_cfg.vqgan!r} VQGAN but "
                         f"config.teacher.size is {config.teacher.size!r}")
