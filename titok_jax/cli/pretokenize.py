"""``titok-jax pretokenize``: encode a TFDS split once with a VQ tokenizer, for MaskGIT generator
training (:mod:`titok_jax.data.tokens` describes the views and the output format,
:mod:`titok_jax.jobs.pretokenize` the writing and resuming).

    titok-jax pretokenize --model titok_l32 --weights tokenizer_titok_l32.bin \\
        --data-dir gs://bucket/tensorflow_datasets --split train --out gs://bucket/tokens_l32

Every host of a multi-host run starts the same command; each writes its share of the shards with
all its local devices. ``python -m titok_jax.cli.pretokenize ...`` runs it alone.
"""
from __future__ import annotations

import argparse
import logging
import sys

from titok_jax.cli.args import add_distributed_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``pretokenize`` subcommand (``func=run``) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "pretokenize", help="encode a TFDS split with a VQ tokenizer into ArrayRecord shards "
                            "for generator training (resumable)")
    p.add_argument("--model", default="titok_l32",
                   help="titok_l32 | titok_b64 | titok_s128 | titok_bl64_vq | ... (ignored for a "
                        "titok-jax folder)")
    p.add_argument("--weights", required=True,
                   help="official .bin/.pt/.safetensors state dict, or a titok-jax folder")
    p.add_argument("--dataset", default="imagenet2012", help="TFDS dataset name")
    p.add_argument("--data-dir", default=None, help="TFDS data dir, local or gs://")
    p.add_argument("--embedded", action="store_true",
                   help="use the embedded photo dataset (titok_sample_photos), prepared in "
                        "--data-dir (default: the project cache)")
    p.add_argument("--split", default="train", help="TFDS split, e.g. train or train[:10%%]")
    p.add_argument("--out", required=True, help="output dir, local or gs://")
    p.add_argument("--ten-crop", action="store_true",
                   help="ten views per image (TenCrop of a 1.1x ADM centre crop) instead of the "
                        "ADM centre crop and its horizontal flip")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per encode call on each host (x2 or x10 views)")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="images per output shard (the unit of work and of resuming)")
    add_distributed_args(p)
    p.set_defaults(func=run)
    return p


def _refuse_non_vq(args) -> None:
    """A clear error, before any weights are read, for tokenizers whose output is not one
    fixed-length id sequence."""
    from titok_jax.convert import native
    from titok_jax.models import variants
    if native.is_native_dir(args.weights):
        what, cfg = args.weights, native.load_native_config(args.weights)
    else:
        what, cfg = args.model, variants.model_config_for(args.model)
    if cfg.name == "alit":
        raise ValueError(f"{what} is an ALIT tokenizer (adaptive length): pretokenize stores "
                         f"fixed-length VQ ids for MaskGIT generators and does not support it")
    if cfg.name != "titok" or cfg.get("quantize_mode") == "vae":
        raise ValueError(f"{what} is not a VQ TiTok tokenizer ({cfg.name}, quantize_mode "
                         f"{cfg.get('quantize_mode')}): MaskGIT generators need discrete ids, "
                         f"so pretokenize refuses VAE (continuous) tokenizers")


def run(args) -> int:
    from titok_jax.data import embedded, tokens
    from titok_jax.inference.tokenizer import load_tokenizer
    from titok_jax.infra.distributed import maybe_initialize_distributed
    from titok_jax.jobs.pretokenize import pretokenize
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    _refuse_non_vq(args)
    dataset, data_dir = args.dataset, args.data_dir
    if args.embedded:
        dataset, data_dir = embedded.DATASET_NAME, embedded.prepare_embedded(data_dir or None)
    tok = load_tokenizer(args.model, args.weights)
    out = pretokenize(tok, dataset, data_dir, args.split, args.out,
                             mode="ten_crop" if args.ten_crop else "flip",
                             batch_size=args.batch_size, shard_size=args.shard_size,
                             weights=args.weights, progress=sys.stderr.isatty())
    import jax
    if jax.process_index() == 0:
        meta = tokens.TokenDataset(out).meta
        print(f"wrote {meta['num_records']} entries ({meta['views_per_image']} views of "
              f"{meta['source']['num_examples'] - meta['num_skipped']} images, "
              f"{meta['num_skipped']} undecodable skipped) of {meta['num_tokens']} tokens to "
              f"{out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="titok-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretokenize", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
