"""Runs evaluators over a TFDS split, sharded over every device of every host.

Each host reads its slice of the split with the eval transform (:class:`EvalPipeline`: shorter
side to the model's size, bicubic, center crop), padded to whole batches with a mask, so every
host runs the same number of steps. One jitted step reconstructs the global batch and computes
every pass evaluator's per-example outputs; they come back replicated, the padding rows are
dropped and the evaluators accumulate on the host (float64 where it matters). The results do not
depend on the number of devices or hosts.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from titok_jax import sharding
from titok_jax.data import pipeline as data_lib
from titok_jax.evals import linear_probe  # noqa: F401  (registers "linear_probe")
from titok_jax.evals.evaluators import EVALUATORS, PassEvaluator, StandaloneEvaluator

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalModel:
    """What the evaluators need from a tokenizer, as pure functions of its params.

    ``reconstruct(params, images)`` -> ``{"recon": [B, H, W, 3] in [0, 1], "ids": int [B, N]}``
    (``ids`` only for VQ models); ``features(params, images)`` -> ``[B, D]``, the mean-pooled
    pre-quantization latents (for the linear probe).
    """

    reconstruct: Callable[[Any, jax.Array], dict[str, jax.Array]]
    features: Callable[[Any, jax.Array], jax.Array]
    image_size: int
    codebook_size: int  # 0 for continuous (VAE) tokenizers


def titok_eval_model(model, model_config: ml_collections.ConfigDict, teacher=None) -> EvalModel:
    """The :class:`EvalModel` of a TiTok. Its params are ``{"model": ..., "teacher": ...}``;
    a stage-1 model (proxy-code head) is decoded by the MaskGIT-VQGAN ``teacher``, as in the
    official stage-1 evaluation."""
    vae = model_config.quantize_mode == "vae"

    def reconstruct(params, images):
        out = model.apply({"params": params["model"]}, images)
        if model.outputs_proxy_codes:
            codes = jnp.argmax(out.decoded, -1).reshape(images.shape[0], -1)
            recon = teacher.apply({"params": params["teacher"]}, codes, method=teacher.decode)
        else:
            recon = out.decoded
        result = {"recon": jnp.clip(recon, 0.0, 1.0)}
        if not vae:
            result["ids"] = out.ids
        return result

    def features(params, images):
        z = model.apply({"params": params["model"]}, images, method=model.encoder_out)
        if vae:  # the posterior mean half of the moments
            z = z[..., :model_config.token_size]
        return jnp.mean(z, axis=1)

    return EvalModel(reconstruct, features, model_config.image_size,
                     0 if vae else model_config.codebook_size)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the eval data comes from: a TFDS dataset in ``data_dir``."""

    dataset: str
    data_dir: str
    split: str
    batch_size: int  # global
    num_threads: int = 8

    def pipeline(self, split: str | None = None, image_size: int = 256) -> data_lib.EvalPipeline:
        count = jax.process_count()
        if self.batch_size % count:
            raise ValueError(f"eval batch size {self.batch_size} is not divisible by the "
                             f"{count} hosts")
        return data_lib.EvalPipeline(self.dataset, data_dir=self.data_dir,
                                     split=split or self.split,
                                     per_host_batch=self.batch_size // count,
                                     image_size=image_size, num_threads=self.num_threads)


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
      eval_model: the tokenizer's :class:`EvalModel`.
      names: evaluator names (or a comma-separated string).
      settings: the ``config.eval`` block (batch size, Inception weights, reference, probe).
      data: the eval data.
      mesh: the device mesh; the global batch must be divisible by its size.
    """

    def __init__(self, eval_model: EvalModel, names: str | Sequence[str],
                 settings: ml_collections.ConfigDict, data: DataSpec,
                 mesh: jax.sharding.Mesh, progress: bool = False):
        if data.batch_size % mesh.size:
            raise ValueError(f"eval batch size {data.batch_size} is not divisible by the "
                             f"{mesh.size} devices")
        self.eval_model, self.data, self.mesh, self.progress = eval_model, data, mesh, progress
        self.evaluators = [EVALUATORS[n](settings, eval_model) for n in parse_names(names)]
        self.passes = [e for e in self.evaluators if isinstance(e, PassEvaluator)]
        replicated = sharding.replicated(mesh)
        self._eval_params = jax.device_put({e.name: e.params for e in self.passes}, replicated)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._step = jax.jit(self._step_fn, out_shardings=replicated)

    def _step_fn(self, params, eval_params, batch):
        out = self.eval_model.reconstruct(params, batch["image"])
        inputs = {"image": batch["image"], **out}
        result = {"mask": batch["mask"]}
        for e in self.passes:
            result[e.name] = e.outputs(eval_params[e.name], inputs)
        return result

    def _run_pass(self, params) -> int:
        for e in self.passes:
            e.reset()
        count = 0
        with self.data.pipeline(image_size=self.eval_model.image_size) as pipe:
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


def write_results(results: dict[str, float], path: str, meta: dict | None = None) -> None:
    """Writes ``{"results": ..., **meta}`` as JSON (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"results": results, **(meta or {})}, f, indent=2, sort_keys=True)


def from_config(config: ml_collections.ConfigDict, model, teacher, data_dir: str,
                mesh: jax.sharding.Mesh, *, evals: str | Sequence[str] | None = None,
                split: str | None = None, progress: bool = False) -> Evaluation:
    """The :class:`Evaluation` of a training config (``config.evals``, ``config.eval``,
    ``config.data``) for the trainer's model; params are ``{"model": ..., "teacher": ...}``
    (ALIT: the trainable params and the frozen VQGAN)."""
    data = DataSpec(config.data.dataset, data_dir, split or config.data.eval_split,
                    config.eval.batch_size, config.data.num_threads)
    if config.model.name == "alit":
        from titok_jax.evals.alit import alit_eval_model
        eval_model = alit_eval_model(model, config.model, config.eval.alit_iteration)
    else:
        eval_model = titok_eval_model(model, config.model, teacher)
    return Evaluation(eval_model, config.evals if evals is None else evals, config.eval, data,
                      mesh, progress)
