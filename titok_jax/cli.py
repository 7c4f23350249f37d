"""``titok-jax`` command line: reconstruct, tokenize, export, import, sample-images."""
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
                   help="titok_l32 | titok_b64 | titok_s128 | titok_bl64_vq | ... (ignored for a "
                        "titok-jax checkpoint folder)")
    p.add_argument("--weights", required=True,
                   help="official .bin/.pt/.safetensors state dict, or a titok-jax folder")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="1 for a stage-1 checkpoint (needs --vqgan to decode)")
    p.add_argument("--vqgan", default=None, help="MaskGIT-VQGAN weights (stage 1, or a stage-2 "
                                                 "checkpoint without pixel_* keys)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))


def _load(args):
    import titok_jax
    return titok_jax.load_tokenizer(args.model, args.weights, stage=args.stage,
                                    vqgan_path=args.vqgan, dtype=args.dtype)


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
    files = _files_or_exit(args.images)
    os.makedirs(args.out, exist_ok=True)
    grid_pairs, written = [], 0
    for paths, batch in _iter_batches(files, tok.image_size, args.batch_size):
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
    print(f"wrote {written} reconstructions to {args.out} and the input|reconstruction grid "
          f"{grid_path}")
    return 0


def cmd_tokenize(args) -> int:
    tok = _load(args)
    files = _files_or_exit(args.images)
    names, tokens = [], []
    for paths, batch in _iter_batches(files, tok.image_size, args.batch_size):
        tokens.append(np.asarray(tok.encode(batch)))
        names.extend(paths)
    if not names:
        raise SystemExit("error: none of the images could be read")
    tokens = np.concatenate(tokens)
    key = "latents" if tok.is_vae else "ids"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **{key: tokens}, files=np.array(names),
             model=np.array(json.dumps(tok.config.to_dict())))
    print(f"wrote {key} {tokens.shape} {tokens.dtype} for {len(names)} images to {args.out}")
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
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode images to token ids (.npz)")
    _add_model_args(p)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="output .npz (ids [N_images, N], files)")
    p.add_argument("--batch-size", type=int, default=8)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    overrides = [r[len("--config."):] for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown or (overrides and args.command != "train"):
        build_parser().error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    try:
        if args.command == "train":
            return args.func(args, overrides)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
