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


def alit_eval_model(model, model_config, iteration: int = -1):
    """The :class:`~titok_jax.evals.runner.EvalModel` of ALIT at one iteration (``-1``: the
    last), for ``titok-jax eval`` and periodic evaluation. Params are ``{"model": trainable,
    "teacher": VQGAN}`` as in the trainer. Reconstructions use the soft code (clipped), ids are
    the iteration's 1D tokens, and the linear-probe features are its latent tokens (the official
    ``encode()`` embedding), mean-pooled. Halting is the deterministic threshold rule."""
    from titok_jax.evals.runner import EvalModel
    from titok_jax.train.alit import merge
    k = iteration % model_config.max_iters

    def rollout(m, images):
        _, outs, _ = m.rollout(images, num_iters=k + 1, halting="threshold")
        return outs[-1]

    def reconstruct(params, images):
        variables = {"params": merge(params["model"], params["teacher"])}
        out = model.apply(variables, images, method=rollout)
        recon = model.apply(variables, out.logits, method=model.decode_pixels)
        result = {"recon": jnp.clip(recon, 0.0, 1.0)}
        if out.codes is not None:
            result["ids"] = out.codes
        return result

    def features(params, images):
        out = model.apply({"params": merge(params["model"], params["teacher"])}, images,
                          method=rollout)
        return jnp.mean(out.latent_tokens, axis=1)

    return EvalModel(reconstruct, features, model_config.image_size,
                     model_config.codebook_size if model_config.quantize_latent else 0)


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


def write_report(report: dict[str, Any], curves: dict[str, np.ndarray], out_dir: str) -> list[str]:
    """Writes the JSON, the per-image curves and the two plots; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("alit_eval.json", "alit_per_image.npz",
                                                 "alit_tokens_vs_l1.png",
                                                 "alit_token_counts.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
    np.savez(paths[1], **curves)

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
    fig.savefig(paths[2])
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
    fig.savefig(paths[3])
    plt.close(fig)
    return paths


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


def cmd_alit_eval(args) -> int:
    """``titok-jax alit-eval``: per-iteration metrics and token counts over images or a split."""
    import ml_collections
    from tqdm import tqdm

    import titok_jax
    alit = titok_jax.load_alit(args.model, args.weights)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    rng = None if args.seed is None else jax.random.PRNGKey(args.seed)
    if args.images:
        from titok_jax.cli import _files_or_exit, _iter_batches
        files = _files_or_exit(args.images)
        batches = ((imgs, np.ones(len(imgs), bool))
                   for _, imgs in _iter_batches(files, alit.image_size, args.batch_size))
        total = len(files)
    else:
        from titok_jax.data import pipeline as data_lib
        data = ml_collections.ConfigDict(dict(dataset=args.dataset, data_dir=args.data_dir,
                                              embedded=args.embedded, num_threads=4))
        data_dir = data_lib.resolve_data_dir(data)
        batches = dataset_batches(data, data_dir, args.split, args.batch_size, alit.image_size)
        total = None
    with tqdm(total=total, desc="alit-eval", unit="img") as bar:
        report, curves = evaluate(alit, batches, thresholds=thresholds,
                                  batch_size=args.batch_size, rng=rng, progress=bar)
    if not report["num_images"]:
        raise SystemExit("error: no images were evaluated")
    report.update(model=args.model, weights=os.fspath(args.weights),
                  source=args.images or f"{args.dataset}:{args.split}",
                  halting="bernoulli" if rng is not None else "threshold")
    paths = write_report(report, curves, args.out)
    for r in report["per_iteration"]:
        print(f"{r['tokens']:4d} tokens: L1 {r['l1']:.4f}  PSNR {r['psnr']:.2f} dB")
    for thr, e in report["thresholds"].items():
        print(f"L1 < {thr}: mean {e['per_image']['mean_tokens']:.1f} tokens per image "
              f"(per batch: {e['per_batch']['mean_tokens']:.1f})")
    print("wrote " + ", ".join(paths))
    return 0


def register(sub) -> None:
    p = sub.add_parser("alit-eval", help="ALIT: per-iteration L1/MSE/PSNR and per-image token "
                                         "counts at L1 thresholds (JSON + plots)")
    p.add_argument("--model", default="alit_small")
    p.add_argument("--weights", required=True, help="official ALIT .pth, state dict or folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a directory, file or glob of images")
    src.add_argument("--split", help="a TFDS split (e.g. validation) of --dataset")
    p.add_argument("--dataset", default="imagenet2012")
    p.add_argument("--data-dir", default="", help="TFDS data dir")
    p.add_argument("--embedded", action="store_true",
                   help="prepare and use the embedded photo dataset in --data-dir")
    p.add_argument("--thresholds", default="0.03,0.05,0.07,0.09")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None,
                   help="official Bernoulli halting with this seed (default: threshold rule)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_alit_eval)
