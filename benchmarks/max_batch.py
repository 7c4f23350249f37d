"""Largest per-device batch of a train step, found by compiling only (not a test).

For a model configuration (TiTok variant, stage 1 by default; dtype; remat and policy; scanned
layers), the jitted, donated train step is lowered and compiled for one device at a batch size,
and XLA's ``memory_analysis()`` gives its peak (arguments + outputs - aliases + temporaries).
A doubling then bisection search finds the largest batch whose peak fits ``--memory-gib`` (or,
on a GPU/TPU, the device's ``bytes_limit`` less ``--headroom-gib``). Nothing runs until the
search ends; ``--time`` then times ``--iters`` steps at the batch found and prints images/s and
MFU, so a short device budget is spent on one compile per probe and one timed run.

    python -m benchmarks.max_batch --variant L-32 --dtype bfloat16 --scan --remat --time
    python -m benchmarks.max_batch --variant L-32 --dtype float32 --scan --remat --memory-gib 24
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def make_config(args, batch: int):
    from titok_jax.infra.config import load_config
    stage = f",stage={args.stage}" if args.stage else ""
    config = load_config(os.path.join(ROOT, "configs", "titok.py")
                         + f":variant={args.variant}{stage}")
    config.global_batch = batch
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.model.remat_policy = args.remat_policy
    config.model.scan_layers = args.scan
    config.mesh.fsdp = False
    if "teacher" in config:
        config.teacher.allow_random = True   # random weights cost the same memory
    return config


def compiled_step(args, batch: int, device):
    """(trainer, compiled step, peak bytes) of the one-device step at ``batch``."""
    from titok_jax.infra import sharding
    from titok_jax.train import loop
    config = make_config(args, batch)
    t = loop.build_trainer(config, sharding.make_mesh([device]))
    size = t.task.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=t.batch_sharding)
    kind = "gan" if "gan" in t.steps else "train"
    compiled = t.steps[kind].lower(t.abstract_state, {"image": images}, t.frozen,
                                   jax.random.PRNGKey(0)).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return t, compiled, peak, kind


def memory_limit(args, device) -> tuple[int, str]:
    if args.memory_gib:
        return int(args.memory_gib * GIB), "--memory-gib"
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - args.headroom_gib * GIB), (
            f"device bytes_limit {stats['bytes_limit'] / GIB:.1f} GiB - "
            f"{args.headroom_gib} GiB headroom")
    raise SystemExit("this device reports no memory limit: pass --memory-gib")


def search(args, device, limit: int) -> tuple[int, dict[int, int]]:
    """Largest batch (a multiple of ``--step``) with peak <= limit; the peaks probed."""
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        start = time.perf_counter()
        peaks[batch] = compiled_step(args, batch, device)[2]
        print(f"  batch {batch:>5}: peak {peaks[batch] / GIB:7.2f} GiB "
              f"({'fits' if peaks[batch] <= limit else 'too large'}, compiled in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
        return peaks[batch] <= limit

    lo, hi = 0, args.step
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > args.max_batch:
            return lo, peaks
    while hi - lo > args.step:
        mid = (lo + hi) // 2 // args.step * args.step
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, peaks


def time_batch(args, batch: int, device) -> dict:
    from benchmarks.common import compiled_flops, peak_gflops
    t, compiled, peak, kind = compiled_step(args, batch, device)
    state = t.init_state(jax.random.PRNGKey(0))
    size = t.task.image_size
    images = jax.device_put(np.random.default_rng(0).random((batch, size, size, 3), np.float32),
                            t.batch_sharding)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], {"image": images}, t.frozen,
                                            jax.random.PRNGKey(0))
        jax.block_until_ready(metrics)
    call()
    seconds = []
    for _ in range(args.iters):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    s = float(np.median(seconds))
    peaks, source = peak_gflops(device, args.peak_gflops)
    if args.scan:
        # XLA's cost analysis counts a loop body once: take the FLOPs of the same step unrolled
        # (compiled only, never run).
        flops = compiled_flops(compiled_step(argparse.Namespace(**{**vars(args), "scan": False}),
                                             batch, device)[1])
    else:
        flops = compiled_flops(compiled)
    gflops = flops / s / 1e9
    return {"batch": batch, "s_per_step": s, "images_per_s": batch / s,
            "gflops_per_s": gflops, "mfu": gflops / peaks[args.dtype], "peak_source": source,
            "kind": kind, "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="L-32")
    p.add_argument("--stage", default="1", help="1 or 2 for two-stage variants; '' otherwise")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true")
    p.add_argument("--remat-policy", default="nothing_saveable")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory budget (default: the device's bytes_limit)")
    p.add_argument("--headroom-gib", type=float, default=1.0)
    p.add_argument("--step", type=int, default=1, help="batch granularity")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--time", action="store_true", help="time the step at the batch found")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--peak-gflops", type=float, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = jax.devices()[0]
    limit, source = memory_limit(args, device)
    print(f"jax {jax.__version__}, {device.platform} ({device.device_kind}); {args.variant} "
          f"stage {args.stage or '-'} {args.dtype}, remat "
          f"{args.remat_policy if args.remat else 'off'}, scan {'on' if args.scan else 'off'}; "
          f"budget {limit / GIB:.1f} GiB ({source})", flush=True)
    best, peaks = search(args, device, limit)
    result = {"variant": args.variant, "dtype": args.dtype, "remat": args.remat,
              "remat_policy": args.remat_policy, "scan": args.scan, "budget_bytes": limit,
              "max_batch": best, "peaks": {str(k): v for k, v in sorted(peaks.items())}}
    print(f"largest batch per device: {best}"
          + (f" (peak {peaks[best] / GIB:.2f} GiB)" if best in peaks else ""), flush=True)
    if args.time and best:
        result["timing"] = time_batch(args, best, device)
        r = result["timing"]
        print(f"batch {best}: {r['s_per_step']:.3f} s/step, {r['images_per_s']:.1f} img/s, "
              f"{r['gflops_per_s']:.0f} GFLOP/s, MFU {100 * r['mfu']:.1f}% ({r['peak_source']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
