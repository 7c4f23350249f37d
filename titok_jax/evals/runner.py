"""Runs evaluators over a TFDS split, sharded over every device of every host.

Each host reads its slice of the split with the eval transform (:class:`EvalPipeline`: shorter
side to the model's size, bicubic, center crop), padded to whole batches with a mask, so every
host runs the same number of steps. One jitted step reconstructs the global batch and computes
every pass evaluator's per-example outputs; they come back replicated, the padding rows are
dropped and the evaluators accumulate on the host (float64 where it matters). The results do not
depend on the number of devices or hosts.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from titok_jax.data import pipeline as data_lib
from titok_jax.evals import (
    generation,  # noqa: F401  (registers "gfid")
    linear_probe,  # noqa: F401  (registers "linear_probe")
)
from titok_jax.evals.evaluators import EVALUATORS, DataSpec, PassEvaluator, StandaloneEvaluator
from titok_jax.inference import predict
from titok_jax.infra import sharding
from titok_jax.infra.paths import as_path

log = logging.getLogger(__name__)


def parse_names(evals: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (evals.split(",") if isinstance(evals, str) else evals)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluator(s) {unknown}; known: {sorted(EVALUATORS)}")
    return names


class Evaluation:
    """Evaluators built once (weights loaded once); call it with the model params to evaluate.

    Args:
      predictor: the tokenizer's :class:`~titok_jax.inference.predict.Predictor`; the params
        passed to the evaluation are its ``{"model": ..., "frozen": ...}``.
      names: evaluator names (or a comma-separated string).
      settings: the ``config.eval`` block (batch size, Inception weights, reference, probe).
      data: the eval data.
      mesh: the device mesh; the global batch must be divisible by its size.
    """

    def __init__(self, predictor: predict.Predictor, names: str | Sequence[str],
                 settings: ml_collections.ConfigDict, data: DataSpec,
                 mesh: jax.sharding.Mesh, progress: bool = False):
        if data.batch_size % mesh.size:
            raise ValueError(f"eval batch size {data.batch_size} is not divisible by the "
                             f"{mesh.size} devices")
        self.predictor, self.data, self.mesh, self.progress = predictor, data, mesh, progress
        self.evaluators = [EVALUATORS[n](settings, predictor) for n in parse_names(names)]
        self.passes = [e for e in self.evaluators if isinstance(e, PassEvaluator)]
        replicated = sharding.replicated(mesh)
        self._eval_params = jax.device_put({e.name: e.params for e in self.passes}, replicated)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._step = jax.jit(self._step_fn, out_shardings=replicated)

    def with_predictor(self, predictor: predict.Predictor) -> "Evaluation":
        """The same evaluators (weights loaded once) over another predictor of the same
        tokenizer, e.g. decoding fewer tokens (:mod:`titok_jax.evals.curves`). Standalone
        evaluators keep the original predictor."""
        other = copy.copy(self)
        other.predictor = predictor
        other._step = jax.jit(other._step_fn, out_shardings=sharding.replicated(self.mesh))
        return other

    def _step_fn(self, params, eval_params, batch):
        out = self.predictor.reconstruct(params, batch["image"])
        inputs = {"image": batch["image"], **out}
        result = {"mask": batch["mask"]}
        for e in self.passes:
            result[e.name] = e.outputs(eval_params[e.name], inputs)
        return result

    def _run_pass(self, params) -> int:
        for e in self.passes:
            e.reset()
        count = 0
        with self.data.pipeline(image_size=self.predictor.image_size) as pipe:
            batches = iter(pipe)
            if self.progress and jax.process_index() == 0:
                from tqdm import tqdm
                batches = tqdm(batches, total=len(pipe), desc=f"eval {self.data.split}",
                               unit="batch")
            for host_batch in batches:
                batch = data_lib.to_global(host_batch, self._batch_sharding)
                out = jax.device_get(self._step(params, self._eval_params, batch))
                mask = out.pop("mask")
                count += int(mask.sum())
                for e in self.passes:
                    e.update({k: v[mask] for k, v in out[e.name].items()})
        return count

    def __call__(self, params: Any) -> dict[str, float]:
        """Runs every evaluator; returns ``{name: value}`` (the same on every host)."""
        results: dict[str, float] = {}
        if self.passes:
            results["num_images"] = self._run_pass(params)
            for e in self.passes:
                results.update((k, float(v)) for k, v in e.results())
        for e in self.evaluators:
            if isinstance(e, StandaloneEvaluator):
                results.update((k, float(v)) for k, v in e.run(params, self.mesh, self.data,
                                                                 self.progress))
        return results


def write_results(results: dict[str, float], path: str | os.PathLike,
                  meta: dict | None = None) -> None:
    """Writes ``{"results": ..., **meta}`` as JSON to a local or ``gs://`` path (process 0)."""
    if jax.process_index() != 0:
        return
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, **(meta or {})}, indent=2, sort_keys=True))


def write_scalars(results: dict[str, float], logdir: str | os.PathLike, step: int = 0) -> None:
    """``eval/<name>`` TensorBoard scalars in ``logdir`` (local or ``gs://``), process 0."""
    from clu import metric_writers
    writer = metric_writers.create_default_writer(
        os.fspath(as_path(logdir)), just_logging=jax.process_index() != 0, asynchronous=False)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    writer.flush()
    writer.close()


def from_config(config: ml_collections.ConfigDict, data_dir: str, mesh: jax.sharding.Mesh, *,
                predictor: predict.Predictor | None = None,
                evals: str | Sequence[str] | None = None, split: str | None = None,
                progress: bool = False) -> Evaluation:
    """The :class:`Evaluation` of a config (``config.evals``, ``config.eval``, ``config.data``).

    ``predictor`` defaults to :func:`titok_jax.inference.predict.predictor` of the config (ALIT: at
    ``config.eval.alit_iteration``); the evaluation's params are ``{"model": trainable params,
    "frozen": frozen parts}`` (:func:`titok_jax.inference.predict.load_frozen`).
    """
    data = DataSpec(config.data.dataset, data_dir, split or config.data.eval_split,
                    config.eval.batch_size, config.data.num_threads)
    return Evaluation(predictor or predict.predictor(config),
                      config.evals if evals is None else evals, config.eval, data, mesh,
                      progress)
