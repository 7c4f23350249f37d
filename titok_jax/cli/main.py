"""``titok-jax`` command line: reconstruct, tokenize, export, import, sample-images, train, eval,
fid, fetch-inception, alit-eval, pretokenize, sample, serve-export.

TiTok models (``--model titok_*``) and ALIT models (``--model alit_*``, with ``--adaptive``)
share the commands; ``--tokens k`` decodes the first k tokens of either (TiTok: any k <= N)."""
from __future__ import annotations

import argparse
import logging
import sys

# Subcommands that take ``--config.KEY=VALUE`` overrides (their func takes them as 2nd argument).
WITH_OVERRIDES = ("train", "eval")


def build_parser() -> argparse.ArgumentParser:
    # Imported here, after main() configured logging: the subcommands' modules import JAX,
    # Orbax and absl, which install log handlers of their own.
    from titok_jax.cli import evaluate, pretokenize, sample, serve_export, tokenizer, train
    parser = argparse.ArgumentParser(prog="titok-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tokenizer.add_parsers(sub)
    train.add_parsers(sub)
    evaluate.add_parsers(sub)
    # Generation: pre-tokenized training data, and class-conditional samples (ADM .npz).
    pretokenize.add_parser(sub)
    sample.add_parser(sub)
    serve_export.add_parser(sub)  # jax.export artefacts
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args, rest = build_parser().parse_known_args(argv)
    overrides = [r[len("--config."):] for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown or (overrides and args.command not in WITH_OVERRIDES):
        build_parser().error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    from titok_jax.infra.checkpointing import CheckpointRestoreError
    try:
        if args.command in WITH_OVERRIDES:
            return args.func(args, overrides)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, CheckpointRestoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
