"""gFID / IS of a class-conditional generator (``--evals gfid``), e.g. periodically while a
MaskGIT generator trains.

``settings.gfid_num_samples`` samples are drawn in chunks of the global eval batch: sample ``i``
has class ``i % num_classes`` (50 per class for 50k samples and 1000 classes, as the official
protocol) and chunk ``c`` draws with ``fold_in(PRNGKey(settings.gfid_seed), c)``, so the
samples depend neither on the number of devices nor on the number of hosts. Labels, sampling,
decoding, the uint8 cast and the Inception all run in one jitted program per chunk, sharded over
the mesh; only the 2048-d pool features (and 1008 logits) come back to the host.

Images are cast to uint8 by truncation, ``floor(clip(x, 0, 1) * 255)``, as the official sampling
script does (``(x * 255).to(torch.uint8)``), not by rounding.

The reference statistics are ``settings.fid_reference`` (an ADM reference batch such as
``VIRTUAL_imagenet256_labeled.npz``: its ``mu``/``sigma``, or pytorch-fid / clean-fid stats),
else those of the eval split's images (computed once and kept for later evaluations). With the
Inception's fc head (``settings.inception_fc``) the Inception Score is reported too, over
``settings.gfid_is_splits`` splits (10 in ADM's evaluator).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.data import pipeline as data_lib
from titok_jax.evals import fid as fid_lib
from titok_jax.evals.evaluators import StandaloneEvaluator, register
from titok_jax.infra import sharding

log = logging.getLogger(__name__)


def truncate_uint8_values(images: jax.Array) -> jax.Array:
    """Images in [0, 1] -> the values 0..255 of the official ``(x * 255).to(uint8)`` cast."""
    return jnp.floor(jnp.clip(images, 0.0, 1.0) * 255.0)


@register("gfid")
class GenerationFID(StandaloneEvaluator):
    """FID (and IS) of ``gfid_num_samples`` class-conditional samples."""

    def __init__(self, settings, predictor):
        from titok_jax.evals.inception_weights import load_inception
        super().__init__(settings, predictor)
        if predictor.generate is None:
            raise ValueError("evaluator gfid measures samples of a class-conditional generator; "
                             "this model has no generate function (for a tokenizer use rfid)")
        if settings.gfid_num_samples < 2:
            raise ValueError(f"eval.gfid_num_samples must be >= 2 (a covariance needs two "
                             f"samples), got {settings.gfid_num_samples}")
        self.module, self.inception = load_inception(settings.inception_weights or None,
                                                     settings.inception_fc or None)
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    def _chunk_fn(self, mesh, batch: int):
        predictor, module, seed = self.predictor, self.module, self.settings.gfid_seed
        spec = sharding.batch_sharding(mesh)

        def chunk(params, inception, c):
            labels = (c * batch + jnp.arange(batch)) % predictor.num_classes
            labels = jax.lax.with_sharding_constraint(labels, spec)
            key = jax.random.fold_in(jax.random.PRNGKey(seed), c)
            images = truncate_uint8_values(predictor.generate(params, labels, key))
            return module.apply({"params": inception}, images)
        return jax.jit(chunk, out_shardings=sharding.replicated(mesh))

    def reference(self, mesh, data, progress) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of ``fid_reference``, else of the eval split (cached)."""
        if self._reference is None:
            if self.settings.fid_reference:
                runner = fid_lib.InceptionRunner(self.module, self.inception, mesh,
                                                 data.batch_size)
                self._reference = fid_lib.load_reference(self.settings.fid_reference, runner)
                return self._reference
            module = self.module
            # Real images: the usual uint8 round trip (they are stored as uint8).
            fn = jax.jit(lambda p, b: (module.apply({"params": p}, fid_lib.uint8_values(
                b["image"]))["pool"], b["mask"]), out_shardings=sharding.replicated(mesh))
            inception = jax.device_put(self.inception, sharding.replicated(mesh))
            stats = fid_lib.FeatureStats(2048)
            with data.pipeline(image_size=self.predictor.image_size) as pipe:
                for host_batch in pipe:
                    pool, mask = jax.device_get(fn(inception, data_lib.to_global(
                        host_batch, sharding.batch_sharding(mesh))))
                    stats.update(pool[mask])
            if stats.count < 2:
                raise ValueError(f"gfid: the eval split {data.split!r} has {stats.count} "
                                 "decodable images, too few for reference statistics; set "
                                 "eval.fid_reference")
            self._reference = stats.mean_cov()
            log.info("gfid reference: Inception statistics of %d images of %s", stats.count,
                     data.split)
        return self._reference

    def run(self, params, mesh, data, progress):
        s = self.settings
        batch = data.batch_size
        if batch % mesh.size:
            raise ValueError(f"eval batch size {batch} is not divisible by the {mesh.size} "
                             "devices")
        mu_ref, sigma_ref = self.reference(mesh, data, progress)
        fn = self._chunk_fn(mesh, batch)
        inception = jax.device_put(self.inception, sharding.replicated(mesh))
        stats, logits = fid_lib.FeatureStats(2048), []
        chunks = range(-(-s.gfid_num_samples // batch))
        if progress and jax.process_index() == 0:
            from tqdm import tqdm
            chunks = tqdm(chunks, desc="gfid samples", unit="batch")
        for c in chunks:
            out = jax.device_get(fn(params, inception, jnp.int32(c)))
            keep = min(batch, s.gfid_num_samples - c * batch)
            stats.update(out["pool"][:keep])
            if "logits" in out:
                logits.append(out["logits"][:keep])
        yield "gfid", fid_lib.frechet_distance(*stats.mean_cov(), mu_ref, sigma_ref,
                                               method=s.fid_sqrt)
        yield "gfid_num_samples", float(stats.count)
        if logits:
            logits = np.concatenate(logits)
            mean, std = fid_lib.inception_score(logits, min(s.gfid_is_splits, len(logits)))
            yield "gen_inception_score", mean
            yield "gen_inception_score_std", std
