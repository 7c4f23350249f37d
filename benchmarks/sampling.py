"""Class-conditional sampling benchmark (not a test): samples/s of the MaskGIT generators.

Per generator (L-32, B-64, S-128 = ``titok_l32``, ``titok_b64``, ``titok_s128`` with their TiTok
tokenizers), at the official step counts and guidance (``variants.GENERATOR_SAMPLING``), two
parts timed separately on one batch of class labels:

* ``sample``: class labels -> token ids, the jitted sampling loop that ``Generator.sample`` runs
  (one compiled program: every step's guided forward passes, Gumbel sampling and re-masking);
* ``decode``: token ids -> RGB, the TiTok tokenizer's ``decode_tokens``.

Both are compiled ahead of time (compile time reported on its own), run ``--warmup`` times and
timed ``--iters`` times; the median gives s/batch. FLOPs come from XLA's cost analysis of the
compiled programs. XLA's cost analysis counts a while loop's body once, so the sampler's FLOPs are
summed over its steps from the compiled forward pass: ``B`` rows on unguided steps (scale 0),
``2B`` on guided ones (the Gumbel sampling and sort add well under 1%). MFU is the achieved rate
over the peak (``benchmarks/common.py``). Parameters are random (they time the same as the release).

Baseline in the same run, with ``--official-src`` (a checkout of bytedance/1d-tokenizer; it needs
``transformers`` for ImageBert): the official PyTorch ``ImageBert``/``UViTBert.generate`` with the
same settings and ``TiTok.decode_tokens``, float32, in a child process (torch and JAX in one
process need much memory), on the same batch size.

    python -m benchmarks.sampling --generators L-32,S-128 --batch 8 --official-src 1d-tokenizer
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    bench_device,
    compiled_flops,
    compiled_timing,
    load_official_generators,
    load_official_titok,
    median_seconds,
    official_config,
    official_generator_config,
)
from titok_jax.inference import sampling
from titok_jax.inference.generator import load_generator
from titok_jax.models.maskgit import class_tokens
from titok_jax.models.variants import build_model, titok_model_config

# tokenizer variant -> its generator
GENERATORS = {"L-32": "titok_l32", "B-64": "titok_b64", "S-128": "titok_s128"}


def jax_sample(name: str, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """The compiled sampler of ``Generator.sample`` at its default (official) settings."""
    gen = load_generator(name)
    cfg = gen.sampling_defaults
    labels = jnp.arange(batch, dtype=jnp.int32) % gen.num_classes
    cond = class_tokens(labels, False, gen.codebook_size, gen.num_classes)
    sched = jax.tree_util.tree_map(jnp.asarray, sampling.schedule(cfg, gen.num_tokens))
    power_cosine = cfg.guidance_decay == "power-cosine"

    def sample(params, cond, sched, key):
        return gen._generate(params, cond, sched, key, power_cosine=power_cosine)
    r = compiled_timing(sample, (gen.params, cond, sched, jax.random.PRNGKey(0)), warmup, iters)
    r["loop_flops"] = r.pop("flops")
    r["flops"] = 0.0
    for rows, steps in ((batch, int(np.sum(sched.guidance == 0))),
                        (2 * batch, int(np.sum(sched.guidance != 0)))):
        if steps:
            ids = jnp.full((rows, gen.num_tokens), gen.codebook_size, jnp.int32)
            forward = jax.jit(gen.module.apply).lower(
                {"params": gen.params}, ids, jnp.concatenate([cond, cond])[:rows]).compile()
            r["flops"] += steps * compiled_flops(forward)
    return r


def jax_decode(variant: str, batch: int, warmup: int, iters: int) -> dict[str, float]:
    """The compiled ``decode_tokens`` of the TiTok tokenizer ``variant`` (random weights)."""
    cfg = titok_model_config(variant)
    module = build_model(cfg)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
    ids = jax.random.randint(jax.random.PRNGKey(2), (batch, cfg.num_latent_tokens), 0,
                             cfg.codebook_size)

    def decode(v, t):
        return module.apply(v, t, method=module.decode_tokens)
    return compiled_timing(decode, (variables, ids), warmup, iters)


def official_seconds(src: str, variant: str, batch: int, warmup: int,
                     iters: int) -> dict[str, float] | None:
    """Median s/batch of the official ``generate`` and ``decode_tokens`` (float32, CPU/GPU), or
    None with the reason printed. Runs in a child process."""
    titok_cls = load_official_titok(src)
    classes = load_official_generators(src) if titok_cls else None
    if not classes:
        return None
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = load_generator(GENERATORS[variant])  # the config and settings only
    torch.manual_seed(0)
    generator = classes[gen.config.arch](official_generator_config(gen.config)).to(device).eval()
    lm_head = getattr(getattr(generator, "model", None), "lm_head", None)
    if lm_head is not None and lm_head.out_features != gen.codebook_size:
        # transformers >= 4.5x's post_init ties ``model.lm_head`` to the input embeddings
        # (codebook + classes + 2 rows); the official code and checkpoints have an untied
        # ``codebook_size`` head, as with the transformers it was written for.
        generator.model.lm_head = torch.nn.Linear(gen.config.hidden_size,
                                                  gen.codebook_size).to(device).eval()
    tokenizer = titok_cls(official_config(variant)).to(device).eval()
    labels = torch.arange(batch, device=device) % gen.num_classes
    settings = dataclasses.asdict(gen.sampling_defaults)

    def synced(fn):
        def call():
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return call

    with torch.inference_mode():
        # Any ids decode with the same work; random ones spare a generate call.
        ids = torch.randint(0, gen.codebook_size, (batch, gen.num_tokens), device=device)
        result = {
            "generate_s": median_seconds(
                synced(lambda: generator.generate(condition=labels, **settings)), warmup, iters),
            "decode_s": median_seconds(
                synced(lambda: tokenizer.decode_tokens(ids)), warmup, iters)}
    print(f"[official] {variant} on torch {torch.__version__} {device} "
          f"({torch.get_num_threads()} threads): generate {result['generate_s']:.2f} s, "
          f"decode_tokens {result['decode_s']:.2f} s per batch of {batch}", flush=True)
    return result


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'gen':<6}{'part':<8}{'steps':>6}{'batch':>6}{'compile s':>10}{'s/batch':>9}"
          f"{'samples/s':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'MFU %':>7}{'official s':>11}"
          f"{'speed-up':>9}")
    for r in rows:
        off = f"{r['official_s']:.2f}" if "official_s" in r else "-"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['variant']:<6}{r['part']:<8}{r['steps']:>6}{r['batch']:>6}"
              f"{r['compile_s']:>10.1f}{r['s']:>9.2f}{r['samples_per_s']:>10.3f}"
              f"{r['gflop']:>9.1f}{r['gflops_per_s']:>9.1f}{100 * r['mfu']:>7.2f}{off:>11}"
              f"{speed:>9}")


def row(variant: str, part: str, steps: int, batch: int, r: dict[str, float], peak: float,
        official_s: float | None) -> dict[str, Any]:
    out = {"variant": variant, "part": part, "steps": steps, "batch": batch, **r,
           "samples_per_s": batch / r["s"], "gflop": r["flops"] / 1e9,
           "gflops_per_s": r["flops"] / r["s"] / 1e9}
    out["mfu"] = out["gflops_per_s"] / peak
    if official_s is not None:
        out.update(official_s=official_s, speedup=official_s / r["s"])
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generators", default="L-32,B-64,S-128",
                        help=f"comma list of {', '.join(GENERATORS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--official-src", help="checkout of github.com/bytedance/1d-tokenizer")
    parser.add_argument("--peak-gflops", type=float,
                        help="device peak GFLOP/s for MFU (default: per backend)")
    args = parser.parse_args()
    args.generators = args.generators.split(",")
    unknown = sorted(set(args.generators) - set(GENERATORS))
    if unknown:
        parser.error(f"--generators: unknown {unknown}; choose from {list(GENERATORS)}")
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need --iters >= 1, --warmup >= 0, --batch >= 1")
    return args


def main() -> None:
    args = parse_args()
    device, peaks, peak_source = bench_device(args.peak_gflops)
    rows = []
    for variant in args.generators:
        official = None
        if args.official_src:
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                official = pool.submit(official_seconds, args.official_src, variant, args.batch,
                                       args.warmup, args.iters).result()
        official = official or {}
        steps = load_generator(GENERATORS[variant]).sampling_defaults.num_sample_steps
        sample = jax_sample(GENERATORS[variant], args.batch, args.warmup, args.iters)
        rows.append(row(variant, "sample", steps, args.batch, sample, peaks["float32"],
                        official.get("generate_s")))
        print(f"  done {variant} sample: {sample['s']:.2f} s/batch (XLA cost analysis of the "
              f"loop program: {sample['loop_flops'] / 1e9:.1f} GFLOP)", flush=True)
        decode = jax_decode(variant, args.batch, args.warmup, args.iters)
        rows.append(row(variant, "decode", 1, args.batch, decode, peaks["float32"],
                        official.get("decode_s")))
        both = {"compile_s": sample["compile_s"] + decode["compile_s"],
                "s": sample["s"] + decode["s"], "flops": sample["flops"] + decode["flops"]}
        off_both = (official["generate_s"] + official["decode_s"]) if official else None
        rows.append(row(variant, "both", steps, args.batch, both, peaks["float32"], off_both))
        print(f"  done {variant} decode: {decode['s']:.2f} s/batch", flush=True)
    print_table(rows)
    print("float32; part 'both' = sample + decode (timed apart); speed-up = official s / JAX s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax_version": jax.__version__, "backend": jax.default_backend(),
                       "device_kind": device.device_kind, "peak_gflops": peaks,
                       "peak_source": peak_source, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
