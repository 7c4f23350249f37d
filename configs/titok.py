"""TiTok tokenizers and their training: ``--config configs/titok.py:variant=L-32,stage=1``.

Arguments:
  variant: L-32 | B-64 | S-128 (two-stage, legacy) | BL-64-VQ | BL-128-VQ | SL-256-VQ |
    LL-32-VAE | BL-64-VAE | BL-128-VAE (single-stage) | tiny | tiny-pixel (CPU-sized).
  stage: 1 (proxy-code training, no pixel decoder) or 2 (decoder fine-tuning / the released
    tokenizer); only for the two-stage variants. Default: the released configuration.
  runlocal: a CPU-sized run on the embedded photo dataset: the ``tiny-vae`` model (64x64) trained
    on pixels (or, with stage=1, the ``tiny`` VQ model on proxy codes of a tiny VQGAN).

Training follows the official stage-1 recipe (``configs/training/TiTok/stage1/*.yaml``): AdamW
lr 1e-4, betas (0.9, 0.99), wd 1e-4 (not on norms/biases/embeddings/tokens), 10k warm-up steps,
cosine to 1e-5 at 1M steps, global batch 256, clip 1.0, EMA 0.999, quantizer weight 1.0.
"""
import ml_collections

from titok_jax import variants
from titok_jax.config_arg import add_run_fields, parse_arg


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="L-32", stage=0, runlocal=False)
    config = ml_collections.ConfigDict()
    if a.runlocal:
        variant = "tiny" if a.stage == 1 else "tiny-vae"
        config.model = variants.titok_model_config(variant, stage=1 if a.stage == 1 else None)
    else:
        config.model = variants.titok_model_config(a.variant, stage=a.stage or None)
    two_stage = config.model.is_legacy
    # titok_stage1: proxy codes of the frozen teacher; titok_pixel: single-stage pixel terms.
    config.task = ("titok_stage1" if two_stage and not config.model.finetune_decoder
                   else "titok_pixel")
    config.seed = 42
    config.total_steps = 1_000_000
    config.quantizer_weight = 1.0
    config.kl_weight = 1e-6  # VAE models
    config.ema_decay = 0.999
    config.init_from = ""  # optional warm start: official weights or a titok-jax folder

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, end_lr=1e-5, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, warmup_steps=10_000,
        total_steps=config.get_ref("total_steps"), grad_clip=1.0))

    # The frozen MaskGIT-VQGAN that makes stage-1 proxy codes (maskgit-vqgan-imagenet-f16-256.bin).
    # Training or evaluating a stage-1 model without teacher weights is an error, unless
    # allow_random (runlocal configs and tests): then a random VQGAN drawn from seed + 1.
    config.teacher = ml_collections.ConfigDict(dict(size=config.model.vqgan, weights="",
                                                    allow_random=a.runlocal))

    add_run_fields(config, runlocal=a.runlocal)
    if a.runlocal:
        config.total_steps = 2500
        config.optimizer.lr = 1e-3
        config.optimizer.end_lr = 1e-4
        config.optimizer.warmup_steps = 50
        config.log_every, config.ckpt_every, config.image_every = 50, 500, 500
        config.evals = "psnr,ssim,lpips"
        config.eval_every = 1250
    config.lock()  # an override of an unknown key raises instead of adding it
    return config
