"""ALIT training: ``--config configs/alit.py:variant=alit_small`` (stage 1, latent distillation)
or ``...:variant=alit_small,stage=2`` (stage 2, full fine-tuning).

Arguments:
  variant: alit_tiny | alit_small | alit_base | alit_semilarge (official sizes; 32 tokens per
    iteration, 8 iterations, VQ 4096 x 12) | alit_runlocal (CPU-sized, 64x64).
  stage: 1 (latent distillation, VQGAN frozen) | 2 (full fine-tuning, VQGAN trained, GAN).
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

Stage 2 follows ``run_scripts/full_finetuning.sh`` + ``engines/full_finetuning.py`` (task
``alit_stage2``, see ``titok_jax/train/tasks/alit.py``): everything trains, VQGAN included, from
the stage-1 EMA (``init_from``, required); one rollout iteration per step, L1 + LPIPS + PatchGAN
per iteration; global batch 96, lr 1e-4 x 96 / 256 = 3.75e-5 for the tokenizer and the
discriminators, 20 of 200 epochs of warm-up, EMA 0.9999 reset at every epoch start. The schedule
is in epochs, so ``alit.steps_per_epoch`` must be ``len(train split) // global_batch`` of the
data (ImageNet-1k: 13345; the official ImageNet-100: ~1320); total and warm-up steps follow it.
"""
import ml_collections

from titok_jax.infra.config import parse_arg
from titok_jax.models import variants
from titok_jax.train.defaults import add_run_fields


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="alit_small", stage=1, runlocal=False)
    if a.stage not in (1, 2):
        raise ValueError(f"ALIT has stages 1 (latent distillation) and 2 (full fine-tuning); "
                         f"got stage={a.stage}")
    config = ml_collections.ConfigDict()
    config.model = variants.alit_model_config("alit_runlocal" if a.runlocal else a.variant)
    config.task = "alit_stage1" if a.stage == 1 else "alit_stage2"
    config.seed = 42
    config.total_steps = 1_000_000
    config.quantizer_weight = 1.0
    config.ema_decay = 0.9999
    # Warm start: an official ALIT checkpoint (its ``ema``) or a titok-jax folder; stage 2: the
    # stage-1 result (a finished stage-1 workdir's export/ too), required.
    config.init_from = ""
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1.5e-4, end_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
        warmup_steps=100_000, total_steps=config.get_ref("total_steps"), grad_clip=3.0,
        no_decay=[]))
    if a.stage == 1:
        config.alit = ml_collections.ConfigDict(dict(
            lambdas=[2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0], code_weight=1.0,
            halting="bernoulli"))  # bernoulli (official) | threshold | none
        # The frozen VQGAN; without weights an error unless allow_random (runlocal, tests).
        config.teacher = ml_collections.ConfigDict(dict(size=config.model.vqgan, weights="",
                                                        allow_random=a.runlocal))
    else:
        _stage2(config)
    # Evaluation (config.evals, config.eval): the evaluators of titok-jax eval at the iteration
    # config.eval.alit_iteration; per-iteration curves and token counts: titok-jax alit-eval.
    add_run_fields(config, runlocal=a.runlocal)
    if a.stage == 2:
        config.global_batch = 96  # 8 GPUs x 12
    if a.runlocal:
        config.total_steps = 300
        config.optimizer.lr = 1e-3
        config.optimizer.warmup_steps = 20
        config.ema_decay = 0.99
        config.log_every, config.ckpt_every, config.image_every = 25, 100, 100
        if a.stage == 2:
            _stage2_runlocal(config)
    config.lock()
    return config


def _stage2(config: ml_collections.ConfigDict) -> None:
    config.alit = ml_collections.ConfigDict(dict(
        steps_per_epoch=13_345,  # ImageNet-1k at global batch 96 (drop_last)
        # The GAN weight by epoch (0-based): 0 before gan_start_epochs[0], then gan_weights[i]
        # from gan_start_epochs[i] (official: <= 20 -> 0, <= 100 -> 0.2, else 0.8).
        gan_start_epochs=[21, 101], gan_weights=[0.2, 0.8],
        discriminator_steps=8,  # discriminator steps before each generator step once the GAN is on
        perceptual_weight=1.0,
        discriminator_ndf=64, discriminator_layers=3,
        # Official quirk: the main optimizer covers the discriminators too, so a generator step
        # also moves the current discriminator along the generator loss's gradient (with its
        # own AdamW state, weight decay 0.05). False: generator steps leave it alone.
        generator_steps_discriminators=True,
        allow_random_init=False))  # True: no init_from (runlocal and tests only)
    spe = config.alit.get_ref("steps_per_epoch")
    config.total_steps = spe * 200
    config.optimizer.lr = 1e-4 * 96 / 256
    config.optimizer.warmup_steps = spe * 20
    # The discriminators' own AdamW (torch defaults but betas): weight decay 0.01 on every
    # parameter, the tokenizer's lr schedule, clip 3.0.
    config.discriminator_optimizer = ml_collections.ConfigDict(dict(
        lr=config.optimizer.get_ref("lr"), end_lr=config.optimizer.get_ref("end_lr"),
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
        warmup_steps=config.optimizer.get_ref("warmup_steps"),
        total_steps=config.get_ref("total_steps"), grad_clip=3.0))


def _stage2_runlocal(config: ml_collections.ConfigDict) -> None:
    """9 steps per epoch, GAN weight 0.2 from epoch 1 and 0.8 from epoch 3, 5 epochs."""
    config.global_batch = 8
    config.alit.steps_per_epoch = 9
    config.alit.gan_start_epochs = [1, 3]
    config.alit.allow_random_init = True
    config.total_steps = config.alit.get_ref("steps_per_epoch") * 5
    config.optimizer.lr = 1e-4
    config.optimizer.warmup_steps = config.alit.get_ref("steps_per_epoch")
    # Logs land on the generator step that closes each GAN cycle (9 = 8 + 1).
    config.log_every, config.ckpt_every, config.image_every = 9, 18, 45
