"""``titok-jax sample``: class-conditional samples of a MaskGIT generator as an ADM ``.npz``
(the library is :mod:`titok_jax.jobs.generate`, whose docstring describes the protocol,
determinism and resuming). ``python -m titok_jax.cli.sample ...`` runs the command alone."""
from __future__ import annotations

import argparse
import os
import sys

import jax

from titok_jax.cli.args import add_distributed_args
from titok_jax.inference import sampling
from titok_jax.infra.distributed import maybe_initialize_distributed
from titok_jax.infra.paths import as_path
from titok_jax.jobs import generate
from titok_jax.jobs.generate import Sampler, write_samples

_SETTINGS = ("num_sample_steps", "guidance_scale", "guidance_decay", "guidance_scale_pow",
             "randomize_temperature", "softmax_temperature_annealing")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", default=None,
                   help="titok_l32 | titok_b64 | titok_s128 (omit when --generator-weights is a "
                        "titok-jax folder: its saved config)")
    p.add_argument("--generator-weights", required=True,
                   help="official generator .bin/.safetensors, or a titok-jax folder")
    p.add_argument("--tokenizer", default=None,
                   help="the TiTok tokenizer the generator was trained on: titok_l32 | "
                        "titok_b64 | titok_s128 | ... (omit for a titok-jax folder)")
    p.add_argument("--tokenizer-weights", required=True,
                   help="official tokenizer .bin/.safetensors, or a titok-jax folder")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--num-classes", type=int, default=None,
                   help="sample i has class i %% num-classes (default: the generator's, 1000)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="samples per chunk, global; a multiple of the local device count. "
                        "With the seed it fixes the samples: keep it to resume or reproduce")
    p.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("sampling (default: the generator's official settings)")
    g.add_argument("--num-sample-steps", type=int, default=None)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--guidance-decay", default=None, choices=sampling.GUIDANCE_DECAYS)
    g.add_argument("--guidance-scale-pow", type=float, default=None)
    g.add_argument("--randomize-temperature", type=float, default=None)
    g.add_argument("--softmax-temperature-annealing", default=None,
                   action=argparse.BooleanOptionalAction)
    p.add_argument("--out", required=True,
                   help="output .npz, local or gs:// (ADM layout: arr_0 uint8 [N, H, W, 3], "
                        "arr_1 labels); finished chunks are kept in <out>.parts/ to resume")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the first 64 samples")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_distributed_args(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``sample`` subcommand to a ``titok-jax`` subparsers object."""
    p = subparsers.add_parser(
        "sample", help="class-conditional samples of a MaskGIT generator as an ADM .npz (gFID "
                       "with `titok-jax fid`); resumable, sharded over devices and hosts")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _weights(path: str) -> str:
    return os.fspath(as_path(path))


def run(args: argparse.Namespace) -> int:
    maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from titok_jax.convert import native
    from titok_jax.inference.generator import load_generator
    from titok_jax.inference.tokenizer import load_tokenizer
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must be an .npz file (ADM layout), got {args.out!r}")
    if args.tokenizer is None and not native.is_native_dir(args.tokenizer_weights):
        raise ValueError("--tokenizer is needed unless --tokenizer-weights is a titok-jax folder")
    generator = load_generator(args.generator, args.generator_weights)
    tokenizer = load_tokenizer(args.tokenizer or "", args.tokenizer_weights)
    overrides = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    sampler = Sampler(generator, tokenizer, generator.sampling_config(**overrides))
    sources = dict(generator=dict(name=args.generator, weights=_weights(args.generator_weights)),
                   tokenizer=dict(name=args.tokenizer, weights=_weights(args.tokenizer_weights)))
    summary = write_samples(sampler, args.out, num_samples=args.num_samples,
                            chunk_size=args.batch_size, seed=args.seed,
                            num_classes=args.num_classes, sources=sources, grid=args.grid,
                            progress=args.progress)
    if jax.process_index() == 0:
        print(f"wrote {args.num_samples} samples to {summary['out']} (chunks kept in "
              f"{summary['parts']})" + (f" and the grid {args.grid}" if args.grid else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m titok_jax.cli.sample ...``: the ``titok-jax sample`` arguments."""
    parser = argparse.ArgumentParser(prog="titok-jax sample", description=generate.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
