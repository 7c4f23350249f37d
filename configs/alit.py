"""ALIT training: ``--config configs/alit.py:variant=alit_small`` (stage 1, latent distillation).

Arguments:
  variant: alit_tiny | alit_small | alit_base | alit_semilarge (official sizes; 32 tokens per
    iteration, 8 iterations, VQ 4096 x 12) | alit_runlocal (CPU-sized, 64x64).
  runlocal: a CPU-sized run on the embedded photo dataset (the alit_runlocal model).

Stage 1 follows the official ``latent_distillation_pretrain`` recipe: the VQGAN is frozen; every
iteration adds lambda_k x CE (lambda = 2.5, 2, 1.5, 1.25, 1, 1, 1, 1) + soft-code MSE + VQ loss;
AdamW betas (0.9, 0.95), weight decay 0.05 on every >= 2-D parameter (timm rule), lr 1.5e-4 at
global batch 256 with 20 of 200 epochs of linear warm-up then cosine to 0 (here in steps:
ImageNet-1k at batch 256 is ~5k steps per epoch), clip 3.0, EMA 0.9999. Not replicated: the
official code re-initialises the EMA from the live weights at the start of every epoch.

``teacher.weights`` is the frozen VQGAN: an ALIT checkpoint (its ``base_tokenizer.vqgan.*``), a
taming-layout VQGAN state dict (MAGE's ``vqgan.ckpt`` converted to tensors) or the MaskGIT-VQGAN
release ``maskgit-vqgan-imagenet-f16-256.bin`` (same architecture).
"""
import ml_collections

from titok_jax import variants
from titok_jax.config_arg import add_run_fields, parse_arg


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="alit_small", stage=1, runlocal=False)
    if a.stage != 1:
        raise ValueError("only stage=1 (latent distillation) is implemented for ALIT; stage 2 "
                         "(full fine-tuning with L1 + LPIPS + PatchGAN) is not yet")
    config = ml_collections.ConfigDict()
    config.model = variants.alit_model_config("alit_runlocal" if a.runlocal else a.variant)
    config.task = "alit_stage1"
    config.seed = 42
    config.total_steps = 1_000_000
    config.quantizer_weight = 1.0
    config.ema_decay = 0.9999
    config.init_from = ""  # optional warm start: an official ALIT checkpoint or titok-jax folder
    config.alit = ml_collections.ConfigDict(dict(
        lambdas=[2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0], code_weight=1.0,
        halting="bernoulli"))  # bernoulli (official) | threshold | none

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1.5e-4, end_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
        warmup_steps=100_000, total_steps=config.get_ref("total_steps"), grad_clip=3.0,
        no_decay=[]))

    # The frozen VQGAN; without weights an error unless allow_random (runlocal, tests).
    config.teacher = ml_collections.ConfigDict(dict(size=config.model.vqgan, weights="",
                                                    allow_random=a.runlocal))
    # Evaluation (config.evals, config.eval): the evaluators of titok-jax eval at the iteration
    # config.eval.alit_iteration; per-iteration curves and token counts: titok-jax alit-eval.
    add_run_fields(config, runlocal=a.runlocal)
    if a.runlocal:
        config.total_steps = 300
        config.optimizer.lr = 1e-3
        config.optimizer.warmup_steps = 20
        config.ema_decay = 0.99
        config.log_every, config.ckpt_every, config.image_every = 25, 100, 100
    config.lock()
    return config
