"""Compile-time benchmark (not a test): unrolled vs scanned transformer stacks.

For each model, the jitted, donated train step of ``titok_jax/train/loop.py`` is built twice,
``config.model.scan_layers`` off and on (the same remat setting), each in its own process:
trace + lower seconds, compile seconds, the size of the lowered StableHLO and of the optimised
HLO, XLA's peak-memory estimate (args + outputs - aliases + temps), and the step's median
seconds on one random batch after a warm-up step.

Models: ``L-32`` (TiTok-L-32 stage 1: 24 + 24 blocks; random VQGAN teacher), ``alit_small``
(ALIT stage 1: 8 iterations of 8 encoder + 8 decoder blocks each, traced once per iteration
unrolled), ``gen-L-32`` (the ImageBert generator of TiTok-L-32 on pre-drawn tokens: 24 BERT
layers) and any other TiTok variant name.

    python -m benchmarks.compile --models L-32,alit_small --batch 8
    python -m benchmarks.compile --models alit_small --batch 4 --iters 2
"""
from __future__ import annotations

import argparse
import concurrent.futures
import concurrent.futures.process
import json
import multiprocessing
import os
import time
from typing import Any

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


def model_config(model: str, batch: int, remat: bool, scan: bool):
    from titok_jax.infra.config import load_config
    if model.startswith("alit"):
        config = load_config(os.path.join(ROOT, "configs", "alit.py") + f":variant={model}")
        config.teacher.allow_random = True
    elif model.startswith("gen-"):
        config = load_config(os.path.join(ROOT, "configs", "maskgit.py")
                             + f":variant={model[4:]}")
        config.tokenizer.allow_random = True
    else:
        config = load_config(os.path.join(ROOT, "configs", "titok.py")
                             + f":variant={model},stage=1")
        config.teacher.allow_random = True
    config.global_batch = batch
    config.model.dtype = "float32"
    config.model.remat = remat
    config.model.scan_layers = scan
    if "fsdp" in config.get("mesh", {}):
        config.mesh.fsdp = False
    return config


def measure(model: str, batch: int, remat: bool, scan: bool, warmup: int,
            iters: int) -> dict[str, Any]:
    """One configuration, in a fresh process."""
    from titok_jax.infra import sharding
    from titok_jax.train import loop
    config = model_config(model, batch, remat, scan)
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    kind = "train"
    state = t.init_state(jax.random.PRNGKey(0))
    batch_arrays = example_batch(t, config, batch)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    lowered = t.steps[kind].lower(state, batch_arrays, t.frozen, key)
    lower_s = time.perf_counter() - start
    stablehlo = len(lowered.as_text())
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    hlo = len(compiled.as_text())
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch_arrays, t.frozen, key)
        jax.block_until_ready(metrics)
        return metrics
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        metrics = call()
        seconds.append(time.perf_counter() - start)
    return {"model": model, "batch": batch, "remat": remat, "scan": scan, "lower_s": lower_s,
            "compile_s": compile_s, "stablehlo_chars": stablehlo, "hlo_chars": hlo,
            "peak_estimate": peak, "s_per_step": float(np.median(seconds)),
            "loss": float(metrics["loss"])}


def example_batch(t, config, batch: int) -> dict:
    """A random batch of the task's input kind (images, or tokens + labels)."""
    rng = np.random.default_rng(0)
    if t.task.input_kind == "tokens":
        n, k = config.model.num_tokens, config.model.codebook_size
        arrays = {"tokens": rng.integers(0, k, (batch, n)).astype(np.int32),
                  "label": rng.integers(0, config.model.num_classes, (batch,)).astype(np.int32)}
    else:
        size = t.task.image_size
        arrays = {"image": rng.random((batch, size, size, 3), np.float32),
                  "label": np.zeros((batch,), np.int32)}
    return {k: jax.device_put(v, t.batch_sharding) for k, v in arrays.items()}


def in_child(fn, *args):
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="L-32,alit_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", choices=("off", "on"), default="on",
                   help="the same in both rows (L-32 stage 1 without remat does not fit 24 GB)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, one device, "
          f"{os.cpu_count()} CPUs, batch {args.batch}, float32, remat {args.remat}", flush=True)
    rows = []
    for model in args.models.split(","):
        for scan in (False, True):
            try:
                r = in_child(measure, model, args.batch, args.remat == "on", scan, args.warmup,
                             args.iters)
            except concurrent.futures.process.BrokenProcessPool:
                print(f"  {model} scan {'on' if scan else 'off'}: the process died (out of "
                      "memory?); try a smaller --batch", flush=True)
                continue
            rows.append(r)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
            print(f"  {model} scan {'on' if scan else 'off'}: lower {r['lower_s']:.1f} s, "
                  f"compile {r['compile_s']:.1f} s, step {r['s_per_step']:.2f} s", flush=True)
    print(f"\n{'model':<12}{'scan':<6}{'lower s':>8}{'compile s':>10}{'StableHLO MB':>13}"
          f"{'HLO MB':>8}{'peak GiB':>9}{'step s':>8}{'loss':>10}")
    for r in rows:
        print(f"{r['model']:<12}{'on' if r['scan'] else 'off':<6}{r['lower_s']:>8.1f}"
              f"{r['compile_s']:>10.1f}{r['stablehlo_chars'] / 1e6:>13.2f}"
              f"{r['hlo_chars'] / 1e6:>8.2f}{r['peak_estimate'] / GIB:>9.2f}"
              f"{r['s_per_step']:>8.2f}{r['loss']:>10.4f}")


if __name__ == "__main__":
    main()
