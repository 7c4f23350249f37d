"""``titok-jax serve-export``: a model's functions as ``jax.export`` artefacts (the library and
the artefact format are :mod:`titok_jax.jobs.export`). ``python -m titok_jax.cli.serve_export``
runs the command alone."""
from __future__ import annotations

import argparse
import sys
import time

from etils import epath

from titok_jax.cli.args import add_model_args, is_alit, load_model
from titok_jax.jobs import export
from titok_jax.jobs.export import (
    PLATFORMS,
    check_out_dir,
    check_platforms,
    export_alit,
    export_generator,
    export_tokenizer,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``serve-export`` subcommand (``func=run``) to a subparsers object."""
    p = subparsers.add_parser(
        "serve-export", help="write encode/decode_tokens (generators: sample) as jax.export "
                             "artefacts with a symbolic batch, weights as .npz, signature.json",
        description=export.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="output folder (new or empty): *.jaxexport, params.npz, signature.json")
    p.add_argument("--platforms", default="cpu",
                   help=f"comma-separated platforms to lower for, of {','.join(PLATFORMS)}")
    p.add_argument("--saved-model", action="store_true",
                   help="also a TF SavedModel (jax2tf; needs tensorflow) in OUT/saved_model, "
                        "with its own copy of the weights")
    tokenizer = p.add_argument_group("a tokenizer (TiTok or ALIT)")
    add_model_args(tokenizer, weights_required=False)  # not needed with --generator-weights
    tokenizer.add_argument("--alit-tokens", help="ALIT: comma-separated token counts to export "
                           "an encoder for (default: every multiple of the tokens per iteration)")
    generator = p.add_argument_group("or a MaskGIT generator (its default sampling settings are "
                                     "baked into `sample`)")
    generator.add_argument("--generator", help="titok_l32 | titok_b64 | titok_s128 (omit when "
                           "--generator-weights is a titok-jax folder)")
    generator.add_argument("--generator-weights",
                           help="official generator .bin/.safetensors, or a titok-jax folder")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if (args.weights is None) == (args.generator_weights is None):
        raise ValueError("pass exactly one of --weights (a tokenizer) and --generator-weights "
                         "(a generator)")
    platforms = check_platforms(args.platforms.split(","))
    check_out_dir(epath.Path(args.out))
    started = time.perf_counter()
    if args.generator_weights is not None:
        from titok_jax.inference.generator import load_generator
        sig = export_generator(load_generator(args.generator, args.generator_weights),
                               args.out, platforms, args.saved_model)
    else:
        model = load_model(args)
        if is_alit(args):
            counts = None if args.alit_tokens is None else [
                int(c) for c in args.alit_tokens.split(",") if c.strip()]
            sig = export_alit(model, args.out, platforms, args.saved_model, counts)
        else:
            if args.alit_tokens is not None:
                raise ValueError("--alit-tokens applies to ALIT models only")
            sig = export_tokenizer(model, args.out, platforms, args.saved_model)
    sizes = ", ".join(f"{n} {f['bytes'] / 1e3:.0f} kB" for n, f in sig["functions"].items())
    print(f"wrote {sizes} and {sig['weights']['file']} "
          f"{sig['weights']['bytes'] / 1e6:.1f} MB for {','.join(platforms)} to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m titok_jax.cli.serve_export ...``: ``titok-jax serve-export`` alone."""
    parser = argparse.ArgumentParser(prog="titok-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        return run(parser.parse_args(["serve-export", *(sys.argv[1:] if argv is None else argv)]))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
