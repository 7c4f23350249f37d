"""Fréchet Inception Distance and Inception Score from FID-Inception outputs.

Statistics are accumulated on the host in float64 (the sum of features and of their outer
products), as pytorch-fid and torch-fidelity do. The distance uses scipy's matrix square root;
when the product of the covariances is singular (few images, or a set against itself) the
square root is retried with ``eps`` added to both diagonals, and a complex result whose
imaginary part is numerical noise is reduced to its real part. ``method="eigh"`` is a faster
symmetric formulation of the same trace.

:func:`image_statistics` runs the same network on a directory or an array of images (generated
samples), and :func:`load_reference` reads reference statistics (``.npz`` with ``mu``/``sigma``,
or an ADM-style reference batch whose images are in ``arr_0``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from titok_jax.infra.paths import as_path

log = logging.getLogger(__name__)

IS_EPS = 1e-16


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``mu`` and the unbiased covariance ``sigma`` (as ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a (numerically) positive semi-definite matrix."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str,
                        eps: float) -> float:
    """``tr((S1 S2)^(1/2))``."""
    if method == "eigh":  # = tr((A S2 A)^(1/2)) with A = S1^(1/2): symmetric, fast, real
        a = _sqrt_psd(sigma1)
        return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(a @ sigma2 @ a), 0.0, None))))
    if method != "scipy":
        raise ValueError(f"unknown matrix square root method {method!r} (scipy | eigh)")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"FID: the matrix square root has an imaginary part of {imag}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "scipy") -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``method="scipy"`` (the protocol of pytorch-fid and the TiTok evaluator) takes
    ``scipy.linalg.sqrtm`` of the product; ``"eigh"`` computes the same trace from symmetric
    eigendecompositions, which is several times faster for 2048-d statistics and agrees to
    rounding (for periodic evals and tests).
    """
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different shapes: {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2.0 * _trace_sqrt_product(sigma1, sigma2, method, eps))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` consecutive chunks of
    ``exp(E_x KL(p(y|x) || p(y)))``, from the 1008-way logits (softmax in float64, eps 1e-16)."""
    logits = np.asarray(logits, np.float64)
    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score with {splits} splits needs at least {splits} "
                         f"images, got {logits.shape[0]}")
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part + IS_EPS) - np.log(py + IS_EPS)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def uint8_values(images: jax.Array) -> jax.Array:
    """Images in [0, 1] -> float values 0..255 rounded to integers (the uint8 round trip)."""
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0)


@dataclasses.dataclass
class InceptionRunner:
    """The FID Inception bound to its params, applied in fixed-size sharded batches."""

    module: Any
    params: Any
    mesh: jax.sharding.Mesh
    batch_size: int = 32

    def __post_init__(self):
        from titok_jax.infra import sharding
        self._batch = sharding.batch_sharding(self.mesh)
        self._fn = jax.jit(lambda p, x: self.module.apply({"params": p}, x),
                           out_shardings=sharding.replicated(self.mesh))
        self.params = jax.device_put(self.params, sharding.replicated(self.mesh))

    def __call__(self, images_0_255: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for a host array of images with values 0..255 (padded to the batch size)."""
        n = images_0_255.shape[0]
        size = -(-max(n, 1) // self.batch_size) * self.batch_size
        size = -(-size // self.mesh.size) * self.mesh.size
        x = np.zeros((size,) + images_0_255.shape[1:], np.float32)
        x[:n] = images_0_255
        out = self._fn(self.params, jax.device_put(x, self._batch))
        return {k: np.asarray(v)[:n] for k, v in out.items()}


def npz_image_batches(path: str | os.PathLike, batch_size: int,
                      key: str = "arr_0") -> Iterator[np.ndarray]:
    """The images ``key`` (uint8 ``[N, H, W, 3]``) of an ``.npz`` (local or ``gs://``), read
    ``batch_size`` at a time from the archive member, so that 50k samples (~10 GB at 256^2, as
    ``titok-jax sample`` and ADM write them) never sit in memory at once."""
    import zipfile
    with as_path(path).open("rb") as f, zipfile.ZipFile(f) as archive:
        if f"{key}.npy" not in archive.namelist():
            raise ValueError(f"{os.fspath(path)} has no {key} (it holds "
                             f"{sorted(n[:-4] for n in archive.namelist())})")
        with archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(member)
            if fortran or len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"{os.fspath(path)}: {key} must be C-ordered images [N, H, W, "
                                 f"3], got shape {shape}{' (Fortran order)' if fortran else ''}")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = member.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{os.fspath(path)}: {key} is truncated at image {start}")
                yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


def _image_batches(images: np.ndarray | str, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of 0..255 float32 images from an array (uint8, or float in [0, 1]), an ``.npz``
    holding ``arr_0`` (streamed, :func:`npz_image_batches`) or a folder (every decodable image
    at its own size, see :class:`titok_jax.data.folders.ImageFolder`)."""
    if isinstance(images, (str, os.PathLike)) and os.fspath(images).endswith(".npz"):
        for chunk in npz_image_batches(images, batch_size):
            yield (chunk.astype(np.float32) if chunk.dtype == np.uint8
                   else np.asarray(uint8_values(jnp.asarray(chunk, jnp.float32))))
        return
    if isinstance(images, (str, os.PathLike)):
        from titok_jax.data.folders import ImageFolder
        folder = ImageFolder(images, None, batch_size)
        if not len(folder):
            raise ValueError(f"no image files found at {os.fspath(images)!r}")
        for batch in folder:
            yield np.asarray(uint8_values(jnp.asarray(batch.images)))
        return
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {array.shape}")
    for start in range(0, array.shape[0], batch_size):
        chunk = array[start:start + batch_size]
        if chunk.dtype == np.uint8:
            yield chunk.astype(np.float32)
        else:
            yield np.asarray(uint8_values(jnp.asarray(chunk, jnp.float32)))


@dataclasses.dataclass
class ImageStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    logits: np.ndarray | None = None

    def save(self, path: str | os.PathLike) -> None:
        """``mu``, ``sigma`` and ``count`` as ``.npz`` at a local or ``gs://`` path."""
        path = as_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count)


def image_statistics(images: np.ndarray | str, runner: InceptionRunner,
                     progress: Callable[[Iterable], Iterable] | None = None) -> ImageStatistics:
    """Pool3 statistics (and logits, if the runner has the fc head) of a directory or an array
    of images: uint8, or floats in [0, 1] (rounded to uint8 values first)."""
    stats, logits = None, []
    batches = _image_batches(images, runner.batch_size)
    for batch in (progress(batches) if progress else batches):
        out = runner(batch)
        stats = stats or FeatureStats(out["pool"].shape[1])
        stats.update(out["pool"])
        if "logits" in out:
            logits.append(out["logits"])
    if stats is None:
        raise ValueError("no images to compute statistics of")
    mu, sigma = stats.mean_cov()
    return ImageStatistics(mu, sigma, stats.count, np.concatenate(logits) if logits else None)


def load_reference(path: str | os.PathLike,
                   runner: InceptionRunner | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a reference ``.npz``: its ``mu``/``sigma`` arrays (pytorch-fid,
    clean-fid and ADM reference batches carry them), else the statistics of its images
    (``arr_0``, uint8 [N, H, W, 3], as in ADM reference batches), computed with ``runner``."""
    with as_path(path).open("rb") as f, np.load(f) as ref:
        if "mu" in ref and "sigma" in ref:
            return np.asarray(ref["mu"], np.float64), np.asarray(ref["sigma"], np.float64)
        if "arr_0" in ref:
            if runner is None:
                raise ValueError(f"{path} holds images but no mu/sigma: an Inception is needed")
            stats = image_statistics(ref["arr_0"], runner)
            return stats.mu, stats.sigma
    raise ValueError(f"{path} has neither mu/sigma nor images (arr_0)")


def fid_between(a: np.ndarray | str, b: np.ndarray | str, runner: InceptionRunner,
                method: str = "scipy") -> float:
    """FID between two image sets, each a directory, an image array, or a reference ``.npz``."""
    def stats(x):
        if isinstance(x, (str, os.PathLike)) and os.fspath(x).endswith(".npz"):
            return load_reference(os.fspath(x), runner)
        s = image_statistics(x, runner)
        return s.mu, s.sigma
    return frechet_distance(*stats(a), *stats(b), method=method)
