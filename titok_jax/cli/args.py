"""The command line's shared pieces: argument groups that several subcommands take, and what
they turn into (a model loaded from ``--model``/``--weights``, batches of an image folder)."""
from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
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


def add_length_args(p: argparse.ArgumentParser) -> None:
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


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None,
                   help="host:port of process 0 for multi-process runs (else auto-detected on "
                        "TPU pods / SLURM, or single-process)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def is_alit(args) -> bool:
    from titok_jax.convert import native
    if native.is_native_dir(args.weights):
        return native.load_native_config(args.weights).name == "alit"
    return args.model.startswith("alit")


def load_model(args):
    from titok_jax.inference.alit import load_alit
    from titok_jax.inference.tokenizer import load_tokenizer
    if is_alit(args):
        return load_alit(args.model, args.weights, dtype=args.dtype)
    return load_tokenizer(args.model, args.weights, stage=args.stage,
                                    vqgan_path=args.vqgan, dtype=args.dtype)


def image_folder(spec: str, image_size: int | None, batch_size: int):
    """The images of a folder/file/glob in batches (eval transform); exits if there are none."""
    from titok_jax.data.folders import ImageFolder
    folder = ImageFolder(spec, image_size, batch_size)
    if not len(folder):
        raise SystemExit(f"error: no image files found at {spec!r}")
    return folder


def with_progress(folder, desc: str = "images"):
    """Yields the folder's batches while a bar counts its files (undecodable ones included)."""
    from tqdm import tqdm
    with tqdm(total=len(folder), desc=desc, unit="img", file=sys.stderr) as bar:
        decoded = 0
        for batch in folder:
            decoded += len(batch.paths)
            bar.update(decoded + len(folder.skipped) - bar.n)
            yield batch
