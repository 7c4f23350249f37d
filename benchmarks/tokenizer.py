"""Throughput benchmark (not a test) of the JAX TiTok tokenizer.

For each requested variant, compute dtype and op it measures, on whatever JAX backend is present:

* ``encode``: RGB images ``[B, 256, 256, 3]`` in [0, 1] -> token ids (VAE: posterior mean);
* ``decode``: token ids (random, the values do not change the work) -> RGB;
* ``encode_decode``: both, in one compiled program.

Each op is jitted and compiled ahead of time (the compile time is reported on its own), run
``--warmup`` times, then timed ``--iters`` times with ``block_until_ready``; the median gives
images/s. FLOPs come from XLA's cost analysis of the compiled executable, so GFLOP/s is the
achieved rate and MFU is that rate over the peak of the device (``--peak-gflops`` or a default:
a table of known accelerators, else a float32 matmul measured in this run). Parameters are a
random init, kept in float32; ``bfloat16`` sets the compute dtype only.

The baseline is printed in the same run: the official PyTorch CPU figures recorded on this
machine and, with ``--official-src`` (a checkout of github.com/bytedance/1d-tokenizer), the
official PyTorch model timed in this process on the same batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    OFFICIAL_VIT_SIZES,
    compiled_flops,
    load_official_titok,
    median_seconds,
    official_config,
    peak_gflops,
    print_header,
)
from titok_jax.models.variants import TITOK_VARIANTS, build_model, titok_model_config

OPS = ("encode", "decode", "encode_decode")
IMAGE_SHAPE = (256, 256, 3)
# Official PyTorch TiTok on this machine's CPU: batch 8, float32, encode+decode, quiet machine.
REFERENCE_BATCH = 8
REFERENCE_S_PER_BATCH = {"S-128": 15.0, "B-64": 21.7, "L-32": 37.7}


@dataclasses.dataclass
class Result:
    variant: str
    dtype: str
    op: str
    batch: int
    compile_s: float
    median_s: float
    images_per_s: float
    gflop: float
    gflops_per_s: float
    mfu: float
    official_median_s: float | None = None


def init_variables(variant: str) -> Any:
    module = build_model(titok_model_config(variant))
    return jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))


def to_tokens(encoded: Any) -> jax.Array:
    """What ``decode_tokens`` takes: VQ ids, or the VAE posterior mean."""
    return encoded.ids if hasattr(encoded, "ids") else encoded.mode()


def random_tokens(cfg: Any, batch: int) -> jax.Array:
    key = jax.random.PRNGKey(2)
    if cfg.quantize_mode == "vae":
        return jax.random.normal(key, (batch, cfg.num_latent_tokens, cfg.token_size))
    return jax.random.randint(key, (batch, cfg.num_latent_tokens), 0, cfg.codebook_size)


def op_function(module: Any, op: str) -> Callable[[Any, jax.Array], jax.Array]:
    methods = {"encode": lambda m, x: to_tokens(m.encode(x)),
               "decode": lambda m, t: m.decode_tokens(t),
               "encode_decode": lambda m, x: m.decode_tokens(to_tokens(m.encode(x)))}
    return lambda variables, x: module.apply(variables, x, method=methods[op])


def bench_op(variant: str, dtype: str, op: str, variables: Any, images: jax.Array,
             args: argparse.Namespace, peaks: dict[str, float]) -> Result:
    cfg = titok_model_config(variant)
    cfg.dtype = dtype
    x = random_tokens(cfg, args.batch) if op == "decode" else images
    start = time.perf_counter()
    compiled = jax.jit(op_function(build_model(cfg), op)).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(variables, x)),
                             args.warmup, args.iters)
    flops = compiled_flops(compiled)
    achieved = flops / seconds / 1e9
    return Result(variant, dtype, op, args.batch, compile_s, seconds, args.batch / seconds,
                  flops / 1e9, achieved, achieved / peaks[dtype])


def time_official(titok_cls: type, variant: str, images: jax.Array,
                  args: argparse.Namespace) -> dict[str, float]:
    """Median s/batch of the official float32 PyTorch model per op, on the same images."""
    import torch
    row = TITOK_VARIANTS[variant]
    if row["encoder"] not in OFFICIAL_VIT_SIZES or row["decoder"] not in OFFICIAL_VIT_SIZES:
        print(f"[official] {variant}: not an official architecture, skipped")
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = titok_cls(official_config(variant)).to(device).eval()
    x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()).to(device)

    def tokens(encoded: tuple[Any, Any]) -> Any:
        z, result = encoded
        return result["min_encoding_indices"] if row["quantize_mode"] == "vq" else z

    def synced(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    with torch.inference_mode():
        ids = tokens(model.encode(x))
        calls = {"encode": lambda: model.encode(x), "decode": lambda: model.decode_tokens(ids),
                 "encode_decode": lambda: model.decode_tokens(tokens(model.encode(x)))}
        timings = {op: median_seconds(synced(calls[op]), args.warmup, args.iters)
                   for op in args.ops}
    print(f"[official] {variant} on torch {torch.__version__} {device} "
          f"({torch.get_num_threads()} threads): "
          + ", ".join(f"{op} {s:.3f} s/batch" for op, s in timings.items()))
    return timings


def print_table(results: list[Result]) -> None:
    print(f"\n{'variant':<10}{'dtype':<10}{'op':<15}{'compile s':>10}{'s/batch':>10}"
          f"{'img/s':>10}{'GFLOP/s':>10}{'MFU %':>8}{'vs official':>13}")
    for r in results:
        versus = f"{r.official_median_s / r.median_s:.2f}x" if r.official_median_s else "-"
        print(f"{r.variant:<10}{r.dtype:<10}{r.op:<15}{r.compile_s:>10.2f}{r.median_s:>10.4f}"
              f"{r.images_per_s:>10.2f}{r.gflops_per_s:>10.1f}{100 * r.mfu:>8.2f}{versus:>13}")


def print_reference(results: list[Result]) -> None:
    print(f"\nRecorded reference (official PyTorch, this machine's CPU, batch {REFERENCE_BATCH}, "
          "float32, encode+decode, quiet machine; not measured in this run):")
    measured = {r.variant: r for r in results if r.dtype == "float32" and r.op == "encode_decode"}
    for variant, seconds in REFERENCE_S_PER_BATCH.items():
        line = f"  {variant:<6} {seconds:5.1f} s/batch = {REFERENCE_BATCH / seconds:.2f} img/s"
        if variant in measured:
            ours = measured[variant]
            line += (f"; JAX float32 batch {ours.batch}: {ours.images_per_s:.2f} img/s, "
                     f"speed-up {ours.images_per_s * seconds / REFERENCE_BATCH:.2f}x")
        print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="S-128,B-64,L-32",
                        help=f"comma list of {', '.join(TITOK_VARIANTS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls first; with 0 the one-off first-call cost is timed")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--official-src", help="checkout of github.com/bytedance/1d-tokenizer")
    parser.add_argument("--peak-gflops", type=float,
                        help="device peak GFLOP/s for MFU (default: per backend)")
    args = parser.parse_args()
    for name, allowed in (("variants", TITOK_VARIANTS), ("dtypes", ("float32", "bfloat16")),
                          ("ops", OPS)):
        values = getattr(args, name).split(",")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, name, values)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need --iters >= 1, --warmup >= 0, --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    device = jax.devices()[0]
    peaks, peak_source = peak_gflops(device, args.peak_gflops)
    print_header(device, peak_source)
    titok_cls = load_official_titok(args.official_src) if args.official_src else None
    images = jax.random.uniform(jax.random.PRNGKey(3), (args.batch, *IMAGE_SHAPE))
    results: list[Result] = []
    for variant in args.variants:
        variables = init_variables(variant)
        official = time_official(titok_cls, variant, images, args) if titok_cls else {}
        for dtype in args.dtypes:
            for op in args.ops:
                result = bench_op(variant, dtype, op, variables, images, args, peaks)
                result.official_median_s = official.get(op)
                results.append(result)
                print(f"  done {variant} {dtype} {op}: {result.images_per_s:.2f} img/s", flush=True)
    print_table(results)
    if any(r.official_median_s for r in results):
        print("vs official = official PyTorch float32 s/batch / JAX s/batch, same batch and op")
    print_reference(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax_version": jax.__version__, "backend": jax.default_backend(),
                       "device_kind": device.device_kind, "peak_gflops": peaks,
                       "peak_source": peak_source, "reference_s_per_batch": REFERENCE_S_PER_BATCH,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
