"""``titok-jax`` command line: reconstruct, tokenize, export, import, train, sample-images.

TiTok models (``--model titok_*``) and ALIT models (``--model alit_*``, with ``--adaptive`` or
``--tokens``) share the commands."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

log = logging.getLogger("titok_jax")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="titok_l32",
                   help="titok_l32 | titok_b64 | titok_s128 | titok_bl64_vq | ... | alit_small | "
                        "alit_tiny | alit_base | alit_semilarge (ignored for a titok-jax folder)")
    p.add_argument("--weights", required=True,
                   help="official .bin/.pt/.safetensors state dict, or a titok-jax folder")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="1 for a stage-1 checkpoint (needs --vqgan to decode)")
    p.add_argument("--vqgan", default=None, help="MaskGIT-VQGAN weights (stage 1, or a stage-2 "
                                                 "checkpoint without pixel_* keys)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))


def _add_alit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ALIT (adaptive length)")
    g.add_argument("--adaptive", action="store_true",
                   help="choose each image's token count by reconstruction L1 < --threshold")
    g.add_argument("--threshold", type=float, default=0.07,
                   help="L1 threshold of the token-selection criterion (official default 0.07)")
    g.add_argument("--per-batch", action="store_true",
                   help="the official rule: one token count per batch (default: per image)")
    g.add_argument("--tokens", type=int, default=None,
                   help="fixed token count (a multiple of 32 up to 256; default: the maximum)")
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


def _iter_batches(files: list[str], size: int, batch: int):
    """Yields (paths, float32 images) batches; undecodable files are skipped with a warning."""
    from tqdm import tqdm

    from titok_jax.data.images import BadImageError, load_image, resize_center_crop
    paths, images, skipped = [], [], []
    for path in tqdm(files, desc="images", unit="img", file=sys.stderr):
        try:
            images.append(resize_center_crop(load_image(path), size))
            paths.append(path)
        except BadImageError as e:
            skipped.append(path)
            log.warning("skipping %s", e)
        if len(images) == batch:
            yield paths, np.stack(images)
            paths, images = [], []
    if images:
        yield paths, np.stack(images)
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped), ", ".join(skipped))


def _files_or_exit(spec: str) -> list[str]:
    from titok_jax.data.images import list_images
    files = list_images(spec)
    if not files:
        raise SystemExit(f"error: no image files found at {spec!r}")
    return files


def cmd_reconstruct(args) -> int:
    from titok_jax.data.images import save_png, side_by_side_grid
    tok = _load(args)
    alit = _is_alit(args)
    files = _files_or_exit(args.images)
    os.makedirs(args.out, exist_ok=True)
    grid_pairs, written, counts = [], 0, {}
    for paths, batch in _iter_batches(files, tok.image_size, args.batch_size):
        if alit:
            ids, lengths, recon = _alit_encode(tok, batch, args, with_recon=True)
            counts.update({os.path.basename(p): int(n) for p, n in zip(paths, lengths)})
        else:
            recon = np.asarray(tok.reconstruct(batch))
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
    files = _files_or_exit(args.images)
    names, tokens, lengths = [], [], []
    for paths, batch in _iter_batches(files, tok.image_size, args.batch_size):
        if alit:
            ids, n, _ = _alit_encode(tok, batch, args)
            tokens.append(ids)
            lengths.append(n)
        else:
            tokens.append(np.asarray(tok.encode(batch)))
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
    from titok_jax.train.titok import train_and_evaluate
    train_and_evaluate(config, args.workdir)
    print(f"training done; checkpoints, TensorBoard logs and image grids are in {args.workdir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titok-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reconstruct", help="encode+decode images; write PNGs and a grid")
    _add_model_args(p)
    p.add_argument("--images", required=True, help="a directory, a file or a glob")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-size", type=int, default=8, help="images in grid.png")
    _add_alit_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode images to token ids (.npz)")
    _add_model_args(p)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .npz (ids [N_images, N], files; ALIT: "
                                                "ids padded with -1 and lengths)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_alit_args(p)
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
    p.add_argument("--coordinator", default=None,
                   help="host:port of process 0 for multi-process runs (else auto-detected on "
                        "TPU pods / SLURM, or single-process)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample-images", help="write the sample photos bundled with scikit-image")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample_images)

    from titok_jax.evals.cli import register as register_eval_commands
    register_eval_commands(sub)  # eval, fid, fetch-inception
    from titok_jax.evals.alit import register as register_alit_eval
    register_alit_eval(sub)  # alit-eval
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    overrides = [r[len("--config."):] for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown or (overrides and args.command not in ("train", "eval")):
        build_parser().error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    try:
        if args.command in ("train", "eval"):
            return args.func(args, overrides)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
