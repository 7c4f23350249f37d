"""The task base class: what every objective shares (one ``tokenizer`` group, EMA predictions,
export as a titok-jax folder, warm start)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from titok_jax.convert.layout import init_unrolled
from titok_jax.inference import predict, weights
from titok_jax.models import variants
from titok_jax.train.state import Optimizer, TrainState

StepFn = Callable[[TrainState, dict, Any, jax.Array], tuple[TrainState, dict]]

# config.task name -> Task class; the task modules fill it with @register.
TASKS: dict[str, type["Task"]] = {}


def register(name: str):
    """Class decorator: the task class of ``config.task == name``."""
    def wrap(cls):
        TASKS[name] = cls
        cls.name = name
        return cls
    return wrap


class Task:
    """Base of the tokenizer tasks: the model of ``config.model`` trained as one group,
    ``tokenizer``, on image batches."""

    name = "task"
    input_kind = "images"
    group = "tokenizer"
    # What the predictor's ``recon`` of the grid images is: "reconstructions" (grids of input |
    # reconstruction pairs) or "samples" (a generator's: grids of the samples alone).
    grid_kind = "reconstructions"

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = variants.build_model(config.model)
        self.image_size = config.model.image_size
        self.check(config)

    def check(self, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError if ``config`` does not fit the task."""

    # -- parameters -------------------------------------------------------------------------
    def frozen(self) -> dict:
        return weights.load_frozen(self.config)

    def trainable(self, full_params: dict) -> dict:
        """The trained part of the model's full parameter tree."""
        return predict.split_frozen(self.config.model, full_params)[0]

    def model_params(self, params: dict, frozen: dict) -> dict:
        return predict.merge_frozen(self.config.model, params, frozen)

    def optimizers(self, abstract_params: dict) -> dict[str, Optimizer]:
        raise NotImplementedError

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        dummy = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return {self.group: self.trainable(init_unrolled(self.model, rng, dummy))}

    def init_mutable(self) -> dict[str, Any]:
        """Non-trainable state (BatchNorm statistics, LeCam EMAs, counters)."""
        return {}

    # -- steps ------------------------------------------------------------------------------
    @property
    def steps(self) -> dict[str, StepFn]:
        return {"train": self.train_step}

    def step_kind(self, step: int) -> str:
        return "train"

    def train_step(self, state: TrainState, batch: dict, frozen: Any,
                   key: jax.Array) -> tuple[TrainState, dict]:
        raise NotImplementedError

    # -- predictions, export, warm start ----------------------------------------------------
    def predictor(self) -> predict.Predictor:
        return predict.predictor(self.config, self.model)

    def predict_params(self, state: TrainState, frozen: dict) -> dict:
        return {"model": state.ema_params[self.group], "frozen": frozen}

    def export(self, state: TrainState, frozen: dict, directory) -> None:
        """The EMA tokenizer as a titok-jax folder (``load_tokenizer`` / ``load_alit`` / the CLI
        read it); ALIT's includes its VQGAN."""
        from titok_jax.convert import native
        ema = jax.device_get(state.ema_params[self.group])
        native.save_native(directory, self.config.model,
                           self.model_params(ema, jax.device_get(frozen)))

    def warm_start(self, state: TrainState, path: str) -> TrainState:
        """Params (and EMA) from an official checkpoint, titok-jax folder or training workdir
        (its EMA)."""
        full = weights.load_params(self.config.model, path, which="ema", what=path,
                                   same_model=None)
        params = jax.device_put(self.trainable(full),
                                jax.tree_util.tree_map(lambda a: a.sharding,
                                                       state.params[self.group]))
        return state.replace(params={**state.params, self.group: params},
                             ema_params={**state.ema_params,
                                         self.group: jax.tree_util.tree_map(jnp.copy, params)})

