"""ALIT evaluation: per-iteration reconstruction metrics and per-image token counts.

For every image and every iteration k (``n (k+1)`` tokens) it records the L1 of the
reconstruction against the image (the token-selection criterion: unclamped reconstruction, as
the official ``encode()``), the MSE and the PSNR (of the clipped, uint8-rounded reconstruction).
From the per-image L1 curves it derives, for each threshold, the token count each image gets
under the per-image rule (first iteration under the threshold, else the best) and under the
official per-batch rule, without re-running the model.

Outputs (:func:`write_report`): ``alit_eval.json``, ``alit_per_image.npz`` and two plots,
``alit_tokens_vs_l1.png`` and ``alit_token_counts.png``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.infra.paths import as_path


def _psnr_uint8(recon: jax.Array, images: jax.Array) -> jax.Array:
    a = jnp.round(jnp.clip(recon, 0.0, 1.0) * 255.0)
    b = jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0)
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10))


def per_image_curves(alit, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
                     rng: jax.Array | None = None, progress=None) -> dict[str, np.ndarray]:
    """Runs every iteration on every (images, mask) batch; returns ``l1``/``mse``/``psnr`` of
    shape ``[num_images, iterations]`` (float64, padding rows dropped)."""
    rows: dict[str, list[np.ndarray]] = {"l1": [], "mse": [], "psnr": []}
    for b, (images, mask) in enumerate(batches):
        key = None if rng is None else jax.random.fold_in(rng, b)
        x = jnp.asarray(images, jnp.float32)
        per_iter = {name: [] for name in rows}
        for out in alit.encode_all(x, rng=key):
            recon = out["recon"]
            per_iter["l1"].append(out["l1"])
            per_iter["mse"].append(jnp.mean(jnp.square(jnp.clip(recon, 0, 1) - x), (1, 2, 3)))
            per_iter["psnr"].append(_psnr_uint8(recon, x))
        keep = np.asarray(mask, bool)
        for name in rows:
            rows[name].append(np.stack([np.asarray(v, np.float64) for v in per_iter[name]],
                                       axis=1)[keep])
        if progress is not None:
            progress.update(int(keep.sum()))
    return {name: np.concatenate(v) if v else np.zeros((0, alit.max_iters))
            for name, v in rows.items()}


def choose_iterations(l1: np.ndarray, threshold: float, per_image: bool = True,
                      batch_size: int | None = None) -> np.ndarray:
    """The iteration each image gets from its L1 curve ``[N, iters]``: the first under
    ``threshold``, else the lowest (earliest on ties). ``per_image=False`` applies the official
    rule to the batch-mean curve of consecutive batches of ``batch_size`` images."""
    if not per_image:
        out = np.empty(len(l1), np.int64)
        for s in range(0, len(l1), batch_size or len(l1)):
            curve = l1[s:s + (batch_size or len(l1))].mean(axis=0, keepdims=True)
            out[s:s + (batch_size or len(l1))] = choose_iterations(curve, threshold)[0]
        return out
    under = l1 < threshold
    first = np.argmax(under, axis=1)
    return np.where(under.any(axis=1), first, np.argmin(l1, axis=1))


def summarize(curves: dict[str, np.ndarray], tokens_per_iter: int,
              thresholds: Sequence[float], batch_size: int) -> dict[str, Any]:
    n_img, iters = curves["l1"].shape
    tokens = [tokens_per_iter * (k + 1) for k in range(iters)]
    report: dict[str, Any] = {
        "num_images": int(n_img),
        "per_iteration": [{"tokens": tokens[k], **{m: float(curves[m][:, k].mean())
                                                   for m in ("l1", "mse", "psnr")}}
                          for k in range(iters)],
        "thresholds": {}}
    rows = np.arange(n_img)
    for thr in thresholds:
        entry = {}
        for rule, per_image in (("per_image", True), ("per_batch", False)):
            k = choose_iterations(curves["l1"], thr, per_image, batch_size)
            counts = tokens_per_iter * (k + 1)
            entry[rule] = {
                "mean_tokens": float(counts.mean()) if n_img else 0.0,
                "l1": float(curves["l1"][rows, k].mean()) if n_img else 0.0,
                "psnr": float(curves["psnr"][rows, k].mean()) if n_img else 0.0,
                "met_threshold": float((curves["l1"][rows, k] < thr).mean()) if n_img else 0.0,
                # Iterations an early-exiting encoder runs (per image: until its choice).
                "mean_iterations_run": float((k + 1).mean()) if n_img else 0.0,
                "histogram": {str(t): int((counts == t).sum()) for t in tokens}}
        report["thresholds"][f"{thr:g}"] = entry
    return report


def write_report(report: dict[str, Any], curves: dict[str, np.ndarray],
                 out_dir: str | os.PathLike) -> list[str]:
    """Writes the JSON, the per-image curves and the two plots into a local or ``gs://``
    directory; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = as_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / n for n in ("alit_eval.json", "alit_per_image.npz", "alit_tokens_vs_l1.png",
                               "alit_token_counts.png")]
    paths[0].write_text(json.dumps(report, indent=1))
    with paths[1].open("wb") as f:
        np.savez(f, **curves)

    tokens = [r["tokens"] for r in report["per_iteration"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(tokens, [r["l1"] for r in report["per_iteration"]], "o-", label="L1")
    ax.set_xlabel("tokens")
    ax.set_ylabel("reconstruction L1")
    ax.set_xticks(tokens)
    ax2 = ax.twinx()
    ax2.plot(tokens, [r["psnr"] for r in report["per_iteration"]], "s--", color="tab:orange",
             label="PSNR")
    ax2.set_ylabel("PSNR (dB)")
    ax.set_title(f"ALIT: quality vs tokens ({report['num_images']} images)")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.9), ncols=2, fontsize=8)
    fig.tight_layout()
    with paths[2].open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)

    thresholds = list(report["thresholds"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    width = 0.8 / max(len(thresholds), 1)
    for i, thr in enumerate(thresholds):
        hist = report["thresholds"][thr]["per_image"]["histogram"]
        xs = np.arange(len(tokens)) + (i - (len(thresholds) - 1) / 2) * width
        mean = report["thresholds"][thr]["per_image"]["mean_tokens"]
        ax.bar(xs, [hist[str(t)] for t in tokens], width,
               label=f"L1 < {thr} (mean {mean:.0f})")
    ax.set_xticks(np.arange(len(tokens)), [str(t) for t in tokens])
    ax.set_xlabel("tokens chosen per image")
    ax.set_ylabel("images")
    ax.set_title("ALIT: per-image token counts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with paths[3].open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return [os.fspath(p) for p in paths]


def dataset_batches(data_config, data_dir: str, split: str, batch_size: int, image_size: int):
    """(images, mask) batches of this host's slice of a TFDS split (eval transform)."""
    from titok_jax.data.pipeline import EvalPipeline
    with EvalPipeline(data_config.dataset, data_dir=data_dir, split=split,
                      per_host_batch=batch_size, image_size=image_size,
                      num_threads=data_config.num_threads) as pipe:
        for batch in pipe:
            yield batch["image"], batch["mask"]


def evaluate(alit, batches, *, thresholds: Sequence[float] = (0.03, 0.05, 0.07, 0.09),
             batch_size: int, rng: jax.Array | None = None, progress=None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(report, per-image curves) over ``batches``; all hosts' images are gathered."""
    curves = per_image_curves(alit, batches, rng=rng, progress=progress)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(np.array([len(curves["l1"])]))
        width = int(counts.max())
        gathered = {}
        for name, v in curves.items():
            padded = np.zeros((width, v.shape[1]))
            padded[:len(v)] = v
            g = multihost_utils.process_allgather(padded)
            gathered[name] = np.concatenate([g[h][:int(c)] for h, c in
                                             enumerate(counts.reshape(-1))])
        curves = gathered
    return summarize(curves, alit.tokens_per_iter, thresholds, batch_size), curves
