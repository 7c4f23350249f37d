"""Quality vs number of tokens: the pass evaluators (psnr, ssim, lpips, rfid, ...) at several
token counts of one tokenizer, on one split and protocol, as JSON and one plot.

* **TiTok**: the first k of the N latent tokens are decoded, the rest removed by attention
  masking in the decoder (``models/titok.py``), for every tokenizer, trained with tail drop
  (``config.tail_drop``) or not. k lies in [1, N].
* **ALIT**: fixed lengths are its iterations (k a multiple of its tokens per iteration, up to
  the maximum). Its adaptive rule adds one point per L1 threshold, placed at the mean token count
  per image, from the ``alit-eval`` computation (:mod:`titok_jax.evals.alit`): L1 and PSNR only
  (uint8-rounded, as the ``psnr`` evaluator).

``titok-jax eval --token-counts 8,16,32`` writes ``{"results": {count: {metric: value}},
"alit_adaptive": {threshold: {...}}, ...meta}`` and the plot; ``--compare`` overlays the curves of
earlier result files (other tokenizers, same data and protocol).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from titok_jax.evals import alit as alit_eval
from titok_jax.evals import runner
from titok_jax.inference import predict
from titok_jax.infra.paths import as_path

log = logging.getLogger(__name__)

# Panels of the plot, in this order, when the results hold them, with their axis labels.
PLOT_METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS (lower is better)",
                "rfid": "rFID (lower is better)"}


def parse_counts(spec: str) -> list[int]:
    try:
        counts = sorted({int(c) for c in spec.split(",") if c.strip()})
    except ValueError:
        raise ValueError(f"--token-counts takes comma-separated integers, got {spec!r}") from None
    if not counts:
        raise ValueError("--token-counts is empty")
    return counts


def check_counts(model_config: ml_collections.ConfigDict, counts: Sequence[int]) -> None:
    """Raises unless every count is one the tokenizer can decode."""
    if model_config.name == "alit":
        step, iters = model_config.tokens_per_iter, model_config.max_iters
        bad = [c for c in counts if c % step or not 1 <= c // step <= iters]
        if bad:
            raise ValueError(f"ALIT emits {step} tokens per iteration, up to {step * iters}: "
                             f"token counts {bad} are not among {step}, {2 * step}, ..., "
                             f"{step * iters}")
        return
    n = model_config.num_latent_tokens
    bad = [c for c in counts if not 1 <= c <= n]
    if bad:
        raise ValueError(f"this TiTok has {n} latent tokens: token counts must lie in [1, {n}], "
                         f"got {bad}")


def evaluate(config: ml_collections.ConfigDict, params: Any, data_dir: str,
             mesh: jax.sharding.Mesh, counts: Sequence[int], *,
             evals: str | Sequence[str] | None = None, split: str | None = None,
             thresholds: Sequence[float] = (0.03, 0.05, 0.07, 0.09),
             progress: bool = False) -> dict[str, Any]:
    """``{"results": {str(k): {metric: value}}}`` (ALIT: plus ``alit_adaptive``) for the
    tokenizer of ``config`` with ``params`` (``{"model", "frozen"}``, placed on ``mesh``)."""
    check_counts(config.model, counts)
    base = runner.from_config(config, data_dir, mesh, evals=evals, split=split,
                              predictor=predict.predictor(config, num_tokens=counts[0]),
                              progress=progress)
    results = {}
    for k in counts:
        evaluation = base.with_predictor(predict.predictor(config, num_tokens=k))
        results[str(k)] = evaluation(params)
    report: dict[str, Any] = {"results": results}
    if config.model.name == "alit" and thresholds:
        report["alit_adaptive"] = _alit_adaptive(config, params, data_dir,
                                                 split or config.data.eval_split, thresholds)
    return report


def _alit_adaptive(config, params, data_dir: str, split: str,
                   thresholds: Sequence[float]) -> dict[str, dict[str, float]]:
    """Per threshold, the per-image adaptive rule's mean token count, L1 and PSNR."""
    from titok_jax.inference.alit import ALITTokenizer
    full = predict.merge_frozen(config.model, jax.device_get(params["model"]),
                                jax.device_get(params["frozen"]))
    alit = ALITTokenizer(config.model, full)
    batch = max(config.eval.batch_size // jax.process_count(), 1)
    batches = alit_eval.dataset_batches(config.data, data_dir, split, batch, alit.image_size)
    report, _ = alit_eval.evaluate(alit, batches, thresholds=thresholds, batch_size=batch)
    return {thr: {"mean_tokens": e["per_image"]["mean_tokens"], "l1": e["per_image"]["l1"],
                  "psnr": e["per_image"]["psnr"]}
            for thr, e in report["thresholds"].items()}


def write(report: dict[str, Any], path: str | os.PathLike, meta: dict | None = None,
          compare: Sequence[str | os.PathLike] = ()) -> list[str]:
    """Writes the JSON at ``path`` and the plot next to it (``.png``), with the curves of the
    ``compare`` result files overlaid; returns the paths (process 0 writes)."""
    out = as_path(path)
    png = out.parent / (out.stem + ".png")
    if jax.process_index() != 0:
        return [os.fspath(out), os.fspath(png)]
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {**report, **(meta or {})}
    out.write_text(json.dumps(document, indent=2, sort_keys=True))
    curves = {label(document): document}
    for other in compare:
        doc = json.loads(as_path(other).read_text())
        if "results" not in doc or not all(k.isdigit() for k in doc["results"]):
            raise ValueError(f"{other} is not a --token-counts result file")
        name = label(doc)
        if doc.get("split") != document.get("split"):
            log.warning("%s was evaluated on %r, this tokenizer on %r: the curves are not on "
                        "the same data", other, doc.get("split"), document.get("split"))
            name += f" [{doc.get('split')}]"
        if name in curves:  # e.g. two workdirs of the same name
            name += f" ({os.fspath(other)})"
        curves[name] = doc
    plot(curves, png)
    return [os.fspath(out), os.fspath(png)]


def label(document: dict[str, Any]) -> str:
    """A curve's name: the checkpoint's folder name (``.../export`` -> its workdir's)."""
    path = os.path.normpath(document.get("checkpoint", "tokenizer"))
    name = os.path.basename(path)
    if name in ("export", "checkpoints"):
        name = os.path.basename(os.path.dirname(path))
    family = document.get("model", {}).get("name", "")
    return f"{name} ({family})" if family else name


def plot(curves: dict[str, dict[str, Any]], path) -> None:
    """One figure, a panel per metric, a line per tokenizer; ALIT's adaptive points as stars on
    the PSNR panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOT_METRICS
               if any(m in r for doc in curves.values() for r in doc["results"].values())]
    if not metrics:
        metrics = sorted({m for doc in curves.values() for r in doc["results"].values()
                          for m in r if m != "num_images"})[:4]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.4),
                             dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, (name, doc) in enumerate(curves.items()):
            pts = sorted((int(k), r[metric]) for k, r in doc["results"].items() if metric in r)
            color = f"C{i}"
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=name)
            adaptive = doc.get("alit_adaptive", {})
            if metric == "psnr" and adaptive:
                ax.plot([a["mean_tokens"] for a in adaptive.values()],
                        [a["psnr"] for a in adaptive.values()], "*", color=color, ms=10,
                        label=f"{name} adaptive (L1 thresholds)")
        ax.set_xlabel("tokens")
        ax.set_ylabel(PLOT_METRICS.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    split = next(iter(curves.values())).get("split", "")
    fig.suptitle(f"quality vs tokens{f' ({split})' if split else ''}", fontsize=10)
    fig.tight_layout()
    with as_path(path).open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
