"""Stage-1 train-step benchmark (not a test): images/s and model FLOP utilisation.

One step = the frozen MaskGIT-VQGAN encodes the batch to proxy codes, TiTok forward, cross-entropy
+ quantizer loss, backward, clip, AdamW, EMA — the jitted, donated step of
``titok_jax/train/loop.py`` (task ``titok_stage1``) on a ``data`` mesh over all devices. FLOPs
come from XLA's cost analysis of the compiled step; MFU is achieved / peak (see
``titok_jax/bench.py``).

Baseline in the same run: with ``--official-src`` (a checkout of bytedance/1d-tokenizer) the
official PyTorch stage-1 step (train mode, forward, CE + quantizer loss, backward, clip 1.0,
AdamW) plus the official VQGAN proxy-code encode it runs every step, on the same batch.

    python launch/bench_train.py --variants S-128,B-64,L-32 --batch 8 --dtypes float32,bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import jax
import numpy as np

from titok_jax import sharding
from titok_jax.bench import (
    OFFICIAL_VIT_SIZES,
    compiled_flops,
    load_official_titok,
    median_seconds,
    official_config,
    peak_gflops,
    print_header,
)
from titok_jax.config_arg import load_config
from titok_jax.train import loop
from titok_jax.variants import TITOK_VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jax_step(variant: str, dtype: str, batch: int, warmup: int, iters: int,
             remat: bool = False) -> dict[str, Any]:
    config = load_config(os.path.join(ROOT, "configs", "titok.py") + f":variant={variant},stage=1")
    config.global_batch = batch
    config.model.dtype = dtype
    config.model.remat = remat
    config.teacher.allow_random = True  # random weights time the same as the release
    t = loop.build_trainer(config, sharding.make_mesh())
    state = t.init_state(jax.random.PRNGKey(0))
    images = jax.device_put(np.random.default_rng(0).random((batch, 256, 256, 3), np.float32),
                            t.batch_sharding)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    compiled = t.steps["train"].lower(state, {"image": images}, t.frozen, key).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], {"image": images}, t.frozen, key)
        jax.block_until_ready(metrics)
    seconds = median_seconds(call, warmup, iters)
    return {"compile_s": compile_s, "s_per_step": seconds, "flops": compiled_flops(compiled)}


def official_step(titok_cls, variant: str, batch: int, warmup: int,
                  iters: int) -> dict[str, float]:
    """Official stage-1 step and proxy-code encode, seconds (median), float32 on CPU/GPU."""
    import torch
    import torch.nn.functional as F
    from modeling.modules.maskgit_vqgan import Encoder, VectorQuantizer
    from omegaconf import OmegaConf
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = official_config(variant)
    cfg.model.vq_model.finetune_decoder = False
    model = titok_cls(cfg).train()
    vq_cfg = OmegaConf.create({"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5,
                               "dropout": 0.0, "hidden_channels": 128, "num_channels": 3,
                               "num_res_blocks": 2, "resolution": 256, "z_channels": 256})
    encoder, quantize = Encoder(vq_cfg).eval(), VectorQuantizer(1024, 256, 0.25)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        words = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma",
                 "embed")
        (no_decay if p.ndim < 2 or any(w in name for w in words) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-4,
                            betas=(0.9, 0.99))
    x = torch.from_numpy(np.random.default_rng(0).random((batch, 3, 256, 256), np.float32))

    def proxy():
        with torch.no_grad():
            return quantize(encoder(x))[1]

    codes = proxy()

    def step():
        logits, result = model(x)
        loss = F.cross_entropy(logits.reshape(batch, 1024, -1), codes) + result["quantizer_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"step_s": median_seconds(step, warmup, iters),
            "proxy_s": median_seconds(proxy, warmup, iters)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="S-128,B-64,L-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--official-src", default=None)
    p.add_argument("--peak-gflops", type=float, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--remat", action="store_true", help="recompute block activations (memory)")
    args = p.parse_args()
    device = jax.devices()[0]
    peaks, source = peak_gflops(device, args.peak_gflops)
    print_header(device, source)
    titok_cls = load_official_titok(args.official_src) if args.official_src else None
    rows = []
    for variant in args.variants.split(","):
        row = TITOK_VARIANTS[variant]
        official_arch = (row["encoder"] in OFFICIAL_VIT_SIZES
                         and row["decoder"] in OFFICIAL_VIT_SIZES)
        official = (official_step(titok_cls, variant, args.batch, args.warmup, args.iters)
                    if titok_cls and official_arch else None)
        if official:
            print(f"[official] {variant}: step {official['step_s']:.2f} s + proxy-code encode "
                  f"{official['proxy_s']:.2f} s per batch of {args.batch}")
        for dtype in args.dtypes.split(","):
            r = jax_step(variant, dtype, args.batch, args.warmup, args.iters, args.remat)
            gflops = r["flops"] / r["s_per_step"] / 1e9
            row = dict(variant=variant, dtype=dtype, batch=args.batch, **r,
                       images_per_s=args.batch / r["s_per_step"], gflops_per_s=gflops,
                       mfu=gflops / peaks[dtype])
            if official:
                row["official_s"] = official["step_s"] + official["proxy_s"]
                row["speedup"] = row["official_s"] / r["s_per_step"]
            rows.append(row)
            print(f"  {variant} {dtype}: {r['s_per_step']:.2f} s/step, "
                  f"{row['images_per_s']:.2f} img/s", flush=True)
    print(f"\n{'variant':<8}{'dtype':<10}{'compile s':>10}{'s/step':>9}{'img/s':>8}"
          f"{'GFLOP/s':>9}{'MFU %':>7}{'official s':>11}{'speed-up':>9}")
    for r in rows:
        off = f"{r['official_s']:.2f}" if "official_s" in r else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['variant']:<8}{r['dtype']:<10}{r['compile_s']:>10.1f}{r['s_per_step']:>9.2f}"
              f"{r['images_per_s']:>8.2f}{r['gflops_per_s']:>9.1f}{100 * r['mfu']:>7.1f}"
              f"{off:>11}{sp:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
