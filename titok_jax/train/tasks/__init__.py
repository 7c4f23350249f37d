"""Training objectives as tasks, chosen by ``config.task``; the loop (``train/loop.py``) names
no model and asks its task for everything model-specific.

A task supplies:

* ``frozen()``: parts it uses but does not train (a teacher VQGAN, later LPIPS/ConvNeXt), loaded
  once on the host;
* ``init(rng)``: the pure initial :class:`~titok_jax.train.state.TrainState` (named parameter
  groups, each with its optimizer and EMA in ``optimizers``, plus mutable state);
* ``steps``: pure step functions ``(state, batch, frozen, key) -> (state, metrics)`` by kind,
  and ``step_kind(step)`` choosing the kind of each step (a task may alternate kinds);
* ``input_kind``: the batches it reads (``"images"``: ``{"image", "label"}``);
* ``predictor()`` and ``predict_params(state, frozen)``: the prediction functions used by image
  grids and evaluators, and their params (the EMA);
* ``export(state, frozen, directory)`` and ``warm_start(state, path)``.
"""
from __future__ import annotations

import ml_collections

from titok_jax.train.tasks.base import TASKS, Task


def names() -> list[str]:
    _load()
    return sorted(TASKS)


def get(config: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.task``."""
    _load()
    if config.task not in TASKS:
        raise ValueError(f"unknown config.task {config.task!r}; known: {sorted(TASKS)}")
    return TASKS[config.task](config)


def _load() -> None:
    # Each task module registers its class (base.register) when imported.
    from titok_jax.train.tasks import alit, maskgit, titok, titok_gan  # noqa: F401  (register themselves)
