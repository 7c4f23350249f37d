"""MaskGIT generators on TiTok tokens: ``--config configs/maskgit.py:variant=L-32``.

Arguments:
  variant: L-32 | B-64 (ImageBert 768x24) | S-128 (UViT 1024x20), each on the tokens of its
    released two-stage TiTok tokenizer (``config.tokenizer.weights``, e.g.
    ``tokenizer_titok_l32.bin``, or a titok-jax folder).
  runlocal: a CPU-sized run on the embedded photo dataset (7 classes): a tiny ImageBert (64
    wide, 2 layers) over the 32 tokens of a ``tiny-vq`` tokenizer (64x64, 256 codes), 300
    steps. The tokenizer is random unless ``tokenizer.weights`` names one; a random one uses few
    codes (see the logged ``codebook_usage``), so for tokens worth learning train one first:
    ``launch/generator_demo.sh`` trains the tokenizer, pre-tokenizes the photos, trains this
    generator on them and samples a grid.

Recipe (``configs/training/generator/maskgit.yaml``, ``MLMLoss``, ``train_maskgit.py``): the
tokenizer encodes each batch on the fly; masking with the arccos schedule; cross-entropy with
label smoothing 0.1, weight 1 on masked and 0.1 on unmasked tokens; class-label dropout 0.1;
AdamW lr 2e-4, betas (0.9, 0.96), wd 0.03 (not on norms, biases, embeddings), 10k warm-up,
cosine to 1e-5 at 500k steps, clip 1.0, batch 2048, EMA 0.999 (the official ``EMAModel``),
bf16 compute, FSDP.

The task's predictions are samples, not reconstructions: the image grids show samples of
classes 0, 1, ... with fixed noise, and the one evaluator is ``gfid`` (FID / IS of
``eval.gfid_num_samples`` samples, 50 per class at 50k, against ``eval.fid_reference``, e.g.
ADM's ``VIRTUAL_imagenet256_labeled.npz``, or else the eval split). ``config.sampling`` sets how
they are sampled (the official settings of the variant).
"""
import ml_collections

from titok_jax.data import embedded
from titok_jax.infra.config import parse_arg
from titok_jax.models import variants
from titok_jax.train.defaults import add_run_fields

GENERATORS = {"L-32": "titok_l32", "B-64": "titok_b64", "S-128": "titok_s128"}


def get_config(arg: str | None = None):
    a = parse_arg(arg, variant="L-32", runlocal=False)
    if a.variant not in GENERATORS:
        raise ValueError(f"variant must be one of {sorted(GENERATORS)}, got {a.variant!r}")
    config = ml_collections.ConfigDict()
    config.task = "maskgit_generator"
    name = GENERATORS[a.variant]
    if a.runlocal:
        tokenizer = variants.titok_model_config("tiny-vq")
        config.model = variants.generator_model_config(
            name, arch="bert", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
            codebook_size=tokenizer.codebook_size, num_tokens=tokenizer.num_latent_tokens,
            num_classes=len(embedded.class_names()))
        config.model.variant = "runlocal"
    else:
        tokenizer = variants.titok_model_config(a.variant)
        config.model = variants.generator_model_config(name)
    # The frozen tokenizer whose ids the generator learns. Without weights this is an error,
    # unless allow_random (runlocal configs and tests): a random tokenizer drawn from seed + 1.
    config.tokenizer = ml_collections.ConfigDict(dict(model=tokenizer, weights="",
                                                      allow_random=a.runlocal))

    config.seed = 42
    config.total_steps = 500_000
    config.ema_decay = 0.999
    config.init_from = ""  # official generator weights or a titok-jax folder
    config.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-4, end_lr=1e-5, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.03, warmup_steps=10_000,
        total_steps=config.get_ref("total_steps"), grad_clip=1.0))
    config.losses = ml_collections.ConfigDict(dict(
        label_smoothing=0.1, unmasked_weight=0.1, class_label_dropout=0.1))
    config.sampling = ml_collections.ConfigDict(
        variants.GENERATOR_SAMPLING.get(name, variants.GENERATE_DEFAULTS))

    add_run_fields(config, runlocal=a.runlocal)
    # Pre-tokenized training data (titok-jax pretokenize --out DIR) instead of images encoded
    # on the fly; config.data's dataset is then only the eval split (grids, gfid reference).
    config.data.tokens = ""
    config.evals = "gfid"
    config.eval.gfid_num_samples = 10_000  # a 50k run (the protocol) is titok-jax sample + fid
    config.eval.gfid_seed = 42
    config.eval.gfid_is_splits = 10          # ADM's evaluator
    config.eval_every = 50_000
    config.num_grid_images = 32               # classes 0..31
    if a.runlocal:
        config.total_steps = 300
        config.optimizer.lr = 1e-3
        config.optimizer.end_lr = 1e-4
        config.optimizer.warmup_steps = 20
        config.log_every, config.ckpt_every, config.image_every = 50, 100, 100
        config.eval_every = 0  # gfid needs the FID Inception (titok-jax fetch-inception)
        config.eval.gfid_num_samples = 64
        config.num_grid_images = 16
    else:
        config.global_batch = 2048
        # The official recipe trains in bf16 (accelerate mixed precision): bf16 compute, float32
        # params, optimizer state and loss; the export is float32. FSDP shards the params and
        # AdamW state over the data axis (a 768x24 ImageBert fits replicated too; 2048 x 33
        # tokens' activations are what bf16 halves).
        config.model.dtype = "bfloat16"
        config.mesh.fsdp = True
    config.lock()  # an override of an unknown key raises instead of adding it
    return config
