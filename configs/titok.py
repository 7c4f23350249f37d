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
from titok_jax.config_arg import parse_arg


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="L-32", stage=0, runlocal=False)
    config = ml_collections.ConfigDict()
    if a.runlocal:
        variant = "tiny" if a.stage == 1 else "tiny-vae"
        config.model = variants.titok_model_config(variant, stage=1 if a.stage == 1 else None)
    else:
        config.model = variants.titok_model_config(a.variant, stage=a.stage or None)
    two_stage = config.model.is_legacy
    config.loss = "proxy_ce" if two_stage and not config.model.finetune_decoder else "pixel_l2"
    config.seed = 42
    config.total_steps = 1_000_000
    config.global_batch = 256
    config.quantizer_weight = 1.0
    config.kl_weight = 1e-6  # VAE models
    config.ema_decay = 0.999
    config.init_from = ""  # optional warm start: official weights or a titok-jax folder

    config.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, end_lr=1e-5, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, warmup_steps=10_000,
        total_steps=config.get_ref("total_steps"), grad_clip=1.0))

    # The frozen MaskGIT-VQGAN that makes stage-1 proxy codes (maskgit-vqgan-imagenet-f16-256.bin).
    config.teacher = ml_collections.ConfigDict(dict(size=config.model.vqgan, weights=""))

    config.data = ml_collections.ConfigDict(dict(
        dataset="imagenet2012", data_dir="", embedded=False, train_split="train",
        eval_split="validation", num_threads=16))

    # Mesh: one "data" axis over all devices; fsdp shards params + optimizer state over it.
    config.mesh = ml_collections.ConfigDict(dict(fsdp=False, fsdp_min_size=2 ** 14, rules=[]))

    # Periodic evaluation (titok_jax/evals) of the EMA params every eval_every steps (0: never):
    # comma-separated evaluators from rfid, psnr, ssim, lpips, codebook, linear_probe.
    config.evals = "rfid,psnr,ssim,lpips,codebook"
    config.eval_every = 0
    config.eval = ml_collections.ConfigDict(dict(
        batch_size=64,            # global
        inception_weights="",     # converted FID Inception (default: fetched into .cache/)
        inception_fc="",          # pytorch-fid pt_inception-2015-12-05-*.pth: adds the IS head
        fid_reference="",         # .npz with mu/sigma (or ADM arr_0 images): FID against it
        is_splits=10,
        fid_sqrt="scipy",         # scipy.linalg.sqrtm (the protocol) | eigh (faster, same value)
        probe_train_split="train", probe_test_split="validation",
        probe_steps=1000, probe_lr=1e-2, probe_weight_decay=1e-4))

    config.log_every = 100
    config.ckpt_every = 5_000
    config.keep_ckpts = 3
    config.image_every = 5_000
    config.num_grid_images = 8
    config.preemption_check_every = 10
    config.progress_bar = False

    if a.runlocal:
        config.total_steps = 2500
        config.global_batch = 8
        config.optimizer.lr = 1e-3
        config.optimizer.end_lr = 1e-4
        config.optimizer.warmup_steps = 50
        config.data.embedded = True
        config.data.num_threads = 4
        config.log_every = 50
        config.ckpt_every = 500
        config.image_every = 500
        config.num_grid_images = 6
        config.preemption_check_every = 1
        config.progress_bar = True
        config.evals = "psnr,ssim,lpips"
        config.eval_every = 1250
        config.eval.batch_size = 8
        # The embedded validation labels are meaningless: probe on a held-out part of train.
        config.eval.probe_train_split = "train[:75%]"
        config.eval.probe_test_split = "train[75%:]"
        config.eval.probe_steps = 300
    config.lock()  # an override of an unknown key raises instead of adding it
    return config
