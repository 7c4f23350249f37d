"""Throughput benchmark (not a test) of ALIT tokenization, JAX vs the official PyTorch code.

Modes, on a batch of random [0, 1] images with a random-init model of ``--size``:

* ``tokens@k``: the token ids of iteration k (32 k tokens for the official sizes). JAX:
  ``ALITTokenizer.encode`` (it skips the last decoder pass, which only feeds halting). Official:
  ``forward(reconstruction_iters=[])`` with ``max_rollout_iters = k``.
* ``all+pixels@8``: every length's tokens and pixel reconstruction, what the official adaptive
  ``encode()`` computes before it picks a length. JAX: ``encode_all``. Official:
  ``encode(return_min_length_embedding=False)``.
* ``adaptive@thr``: JAX ``encode_adaptive`` (per image, early exit, pixels only while an image
  is still open). With random weights no image meets a useful threshold, so this runs all 8
  iterations: pass a trained checkpoint with ``--weights`` to measure real early exits. The
  official adaptive call costs the same as ``all+pixels@8`` (its forward always runs 8
  iterations and 8 pixel decodes).

JAX figures: median of ``--repeats`` after a warm-up call (compiles), images/s, GFLOP per batch
from XLA's cost analysis of each compiled piece, GFLOP/s and MFU against the measured float32
matmul peak (or ``--peak-gflops``). Official figures (``--official-src``, a checkout of
ShivamDuggal4/adaptive-length-tokenizer): the same modes timed in this process under
``torch.inference_mode()`` with ``torch.set_num_threads(os.cpu_count())``.

    python -m benchmarks.alit --size alit_small --batch 8 --official-src /path/to/alit
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import compiled_flops, load_official_alit, peak_gflops, print_header, timings
from titok_jax.inference.alit import ALITTokenizer, load_alit
from titok_jax.models import variants

OFFICIAL_SIZES = ("alit_tiny", "alit_small", "alit_base", "alit_semilarge")


def _flops(fn, *args) -> float:
    return compiled_flops(fn.lower(*args).compile())


def piece_flops(alit: ALITTokenizer, batch: int) -> dict:
    """GFLOP of each jitted piece for a batch, from XLA's cost analysis."""
    size, g2 = alit.image_size, alit.module.grid_tokens
    width, n = alit.module.encoder_arch.width, alit.tokens_per_iter
    v = alit.variables()
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    gt = jax.ShapeDtypeStruct((batch, g2), jnp.int32)
    stream = lambda k: jax.ShapeDtypeStruct((batch, 1 + g2 + n * (k + 1), width),  # noqa
                                            jnp.float32)
    logits = jax.ShapeDtypeStruct((batch, g2, alit.module.vqgan_arch.codebook_size),
                                  jnp.float32)
    out = {"start": _flops(alit.start_fn, v, images), "pixels": _flops(alit.pixels_fn, v, logits)}
    for k in range(alit.max_iters):
        out[f"iter{k}"] = _flops(alit.iteration_fn(k, "threshold"), v, stream(k), gt, None)
        out[f"codes{k}"] = _flops(alit.codes_fn, v, stream(k))
    return {k: f / 1e9 for k, f in out.items()}


def jax_modes(alit: ALITTokenizer, x, iters: list[int], thresholds: list[float],
              which: set[str]):
    """(name, call, kind) for every requested JAX mode."""
    modes = []
    for k in iters if "tokens" in which else []:
        modes.append((f"tokens@{k}", lambda k=k: alit.encode(x, alit.tokens_per_iter * k)
                      .block_until_ready(), ("tokens", k)))
    if "all" in which:
        modes.append(("all+pixels@8", lambda: [o["recon"].block_until_ready()
                                               for o in alit.encode_all(x)],
                      ("all", alit.max_iters)))
    if "adaptive" not in which:
        return modes
    for thr in thresholds:
        modes.append((f"adaptive@{thr:g}",
                      lambda thr=thr: alit.encode_adaptive(x, thr, return_info=True)[2],
                      ("adaptive", thr)))
    return modes


def mode_gflop(kind, flops: dict, batch: int, rows: list[int] | None = None) -> float:
    """GFLOP of a mode from the full-batch piece costs; ``rows``: the batch rows each adaptive
    iteration computed (the cost is linear in the rows)."""
    what, arg = kind
    if what == "tokens":
        return flops["start"] + sum(flops[f"iter{j}"] for j in range(arg - 1)) + \
            flops[f"codes{arg - 1}"]
    rows = rows or [batch] * arg
    return flops["start"] + sum((flops[f"iter{j}"] + flops["pixels"]) * r / batch
                                for j, r in enumerate(rows))


def official_modes(build, size: str, x_np: np.ndarray, iters: list[int], repeats: int):
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(size)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    results = {}

    def run(name, call):
        # No untimed call: the official code has no compile step (the reference figures of
        # alit.md were taken the same way).
        with torch.inference_mode():
            ts = timings(call, 0, repeats)
        results[name] = statistics.median(ts)
        print(f"[official] {name:>14s}: {results[name]:8.2f} s/batch  "
              f"{x.shape[0] / results[name]:7.3f} img/s  "
              f"(runs {', '.join(f'{t:.1f}' for t in ts)})")

    for k in iters:
        def tokens(k=k):
            model.max_rollout_iters = k
            model(x, reconstruction_iters=[])
        run(f"tokens@{k}", tokens)
    model.max_rollout_iters = 8

    def encode_all():
        model.encode(x, return_min_length_embedding=False)
    run("all+pixels@8", encode_all)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="alit_small",
                   help="alit_tiny | alit_small | alit_base | alit_semilarge | test sizes")
    p.add_argument("--weights", default=None, help="optional checkpoint (else random init)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", default="1,4,8", help="token-only iteration counts to time")
    p.add_argument("--thresholds", default="0.07,q0.5",
                   help="adaptive L1 thresholds to time; qF = the F-quantile of the batch's "
                        "first-iteration L1")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="tokens,all,adaptive",
                   help="which of tokens,all,adaptive to time")
    p.add_argument("--official-src", default=None)
    p.add_argument("--official-iters", default=None,
                   help="iteration counts for the official tokens mode (default: --iters)")
    p.add_argument("--peak-gflops", type=float, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    device = jax.devices()[0]
    peak, source = peak_gflops(device, args.peak_gflops)
    print_header(device, source)
    if args.weights:
        alit = load_alit(args.size, args.weights)
    else:
        cfg = variants.alit_model_config(args.size)
        module = variants.build_model(cfg)
        size = cfg.image_size
        params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
        alit = ALITTokenizer(cfg, params["params"])
    iters = [int(i) for i in args.iters.split(",")]
    thresholds = [t.strip() for t in args.thresholds.split(",") if t.strip()]
    x_np = np.random.default_rng(0).random((args.batch, alit.image_size, alit.image_size, 3),
                                           dtype=np.float32)
    x = jnp.asarray(x_np)
    print(f"model {args.size}: {alit.max_iters} iterations x {alit.tokens_per_iter} tokens, "
          f"batch {args.batch}, {'weights ' + args.weights if args.weights else 'random init'}")
    if any(t.startswith("q") for t in thresholds):
        # "qF": the F-quantile of the images' first-iteration L1, so that a fraction F of the
        # batch stops after one iteration (with random weights later iterations do not improve,
        # so the rest runs all of them): exercises the per-image early exit and compaction.
        first_l1 = np.asarray(alit.encode_all(x, num_iters=1)[0]["l1"])
        thresholds = [float(np.quantile(first_l1, float(t[1:])) + 1e-6) if t.startswith("q")
                      else float(t) for t in thresholds]
        print(f"first-iteration L1 per image: {np.round(first_l1, 4).tolist()}")
    thresholds = [float(t) for t in thresholds]
    t0 = time.perf_counter()
    flops = piece_flops(alit, args.batch)
    print(f"cost analysis of the pieces: {time.perf_counter() - t0:.1f} s")

    results = {}
    which = set(args.modes.split(","))
    for name, call, kind in jax_modes(alit, x, iters, thresholds, which):
        first = None
        # Adaptive calls run pieces that all+pixels compiled (a warm-up only without it).
        if kind[0] != "adaptive" or "all" not in which:
            t0 = time.perf_counter()
            call()  # compile + warm-up
            first = time.perf_counter() - t0
        ts, info = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            info = call()
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        run = info["iters_run"] if kind[0] == "adaptive" else None
        rows = info["batch_rows"] if kind[0] == "adaptive" else None
        gflop = mode_gflop(kind, flops, args.batch, rows)
        results[name] = dict(s_per_batch=med, images_per_s=args.batch / med, gflop=gflop,
                             gflops_per_s=gflop / med, mfu=gflop / med / peak["float32"],
                             first_call_s=first, iterations_run=run, batch_rows=rows)
        print(f"[jax] {name:>14s}: {med:8.2f} s/batch  {args.batch / med:7.3f} img/s  "
              f"{gflop:8.1f} GFLOP  {gflop / med:6.1f} GFLOP/s  MFU {results[name]['mfu']:.1%}"
              + (f"  (first call {first:.1f} s)" if first is not None else "")
              + (f"  ({run} iterations run, batch rows {rows})" if run else ""))

    official = {}
    if args.official_src and args.size not in OFFICIAL_SIZES:
        print(f"[official] skipped: {args.size} is not an official ALIT size")
    elif args.official_src:
        build = load_official_alit(args.official_src)
        if build is not None:
            o_iters = [int(i) for i in (args.official_iters or args.iters).split(",")]
            official = official_modes(build, args.size, x_np,
                                      o_iters if "tokens" in which else [], args.repeats)
    if official:
        print("\nspeed-up (official s/batch / JAX s/batch):")
        for name, sec in official.items():
            if name in results:
                print(f"  {name:>14s}: {sec / results[name]['s_per_batch']:.2f}x")
        for thr in thresholds:
            name = f"adaptive@{thr:g}"
            print(f"  {name:>14s}: {official['all+pixels@8'] / results[name]['s_per_batch']:.2f}x"
                  " (vs the official adaptive encode(), which always costs all+pixels@8)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": results, "official": official, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
