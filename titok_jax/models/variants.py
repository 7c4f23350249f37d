"""The one table of released model variants and the builders that turn a config into modules.

``configs/*.py`` and :func:`titok_jax.load_tokenizer` both read this table, so a variant is
defined exactly once. Sizes follow the official ``small/base/large`` ViT tables.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from titok_jax.models.alit import ALIT
from titok_jax.models.maskgit import GeneratorArch, ImageBert, UViTBert
from titok_jax.models.maskgit_vqgan import MaskGITVQGAN, VQGANArch
from titok_jax.models.titok import TiTok, ViTArch

VIT_SIZES: dict[str, ViTArch] = {
    "small": ViTArch(width=512, depth=8, num_heads=8),
    "base": ViTArch(width=768, depth=12, num_heads=12),
    "large": ViTArch(width=1024, depth=24, num_heads=16),
    # CPU-sized stand-ins for tests and the quickstart (and the parity fixtures' tiny keys).
    "tiny32": ViTArch(width=32, depth=2, num_heads=2),
    "tiny64": ViTArch(width=64, depth=2, num_heads=2),
    "tiny96": ViTArch(width=96, depth=2, num_heads=3),
    # ALIT's latent-distillation encoder/decoder sizes that are not TiTok sizes.
    "semilarge8": ViTArch(width=1024, depth=8, num_heads=8),
    "semilarge": ViTArch(width=1024, depth=16, num_heads=16),
}

VQGAN_SIZES: dict[str, VQGANArch] = {
    "maskgit": VQGANArch(),
    "tiny": VQGANArch(hidden_channels=32, channel_mult=(1, 2, 1, 1, 1), num_res_blocks=1,
                      z_channels=32, codebook_size=64),
    # The taming-style copy of the same VQGAN inside ALIT checkpoints (its mid stage always has
    # 2 blocks), the ALIT fixture's tiny one, and an f8 one for 64x64 CPU runs.
    "alit": VQGANArch(num_mid_blocks=2),
    "alit_tiny": VQGANArch(hidden_channels=32, channel_mult=(1, 2, 1, 1, 1), num_res_blocks=1,
                           z_channels=32, codebook_size=64, num_mid_blocks=2),
    "alit_f8_tiny": VQGANArch(hidden_channels=32, channel_mult=(1, 2, 1, 1), num_res_blocks=1,
                              z_channels=32, codebook_size=64, num_mid_blocks=2),
}

# name -> model fields. "legacy" models are the two-stage releases (proxy-code decoder head +
# MaskGIT-VQGAN pixel decoder); the rest are single-stage with a pixel head.
_LEGACY = dict(quantize_mode="vq", codebook_size=4096, token_size=12, use_l2_norm=True,
               is_legacy=True, finetune_decoder=True)
_VQ8K = dict(quantize_mode="vq", codebook_size=8192, token_size=64, use_l2_norm=False,
             is_legacy=False, finetune_decoder=False)
_VAE = dict(quantize_mode="vae", codebook_size=0, token_size=16, use_l2_norm=False,
            is_legacy=False, finetune_decoder=False)

TITOK_VARIANTS: dict[str, dict[str, Any]] = {
    "L-32": dict(encoder="large", decoder="large", num_latent_tokens=32, **_LEGACY),
    "B-64": dict(encoder="base", decoder="base", num_latent_tokens=64, **_LEGACY),
    "S-128": dict(encoder="small", decoder="small", num_latent_tokens=128, **_LEGACY),
    "BL-64-VQ": dict(encoder="base", decoder="large", num_latent_tokens=64, **_VQ8K),
    "BL-128-VQ": dict(encoder="base", decoder="large", num_latent_tokens=128, **_VQ8K),
    "SL-256-VQ": dict(encoder="small", decoder="large", num_latent_tokens=256, **_VQ8K),
    "LL-32-VAE": dict(encoder="large", decoder="large", num_latent_tokens=32, **_VAE),
    "BL-64-VAE": dict(encoder="base", decoder="large", num_latent_tokens=64, **_VAE),
    "BL-128-VAE": dict(encoder="base", decoder="large", num_latent_tokens=128, **_VAE),
    # CPU-sized models for tests and the quickstart: a two-stage (proxy-code) one with a tiny
    # VQGAN, and a single-stage pixel-head one.
    "tiny": dict(encoder="tiny64", decoder="tiny64", num_latent_tokens=16, vqgan="tiny",
                 **{**_LEGACY, "codebook_size": 256}),
    "tiny-pixel": dict(encoder="tiny64", decoder="tiny64", num_latent_tokens=32,
                       **{**_VQ8K, "codebook_size": 256, "token_size": 12, "use_l2_norm": True}),
    # tiny-pixel at 64x64 with 8x8 patches: the discrete tokenizer of the CPU generator demo
    # (launch/generator_demo.sh). In a few CPU minutes it learns little beyond each image's
    # colours (see the note on tiny-vae), enough to give a generator tokens to learn.
    "tiny-vq": dict(encoder="tiny64", decoder="tiny64", num_latent_tokens=32, image_size=64,
                    patch_size=8, **{**_VQ8K, "codebook_size": 256, "token_size": 12,
                                     "use_l2_norm": True}),
    # The CPU quickstart model: a VAE at 64x64 with 8x8 patches. (A VQ bottleneck this small
    # does not leave its initial plateau within a laptop-sized run: no code changes with the
    # image until the decoder reads its latents, and it has no reason to until they change.)
    "tiny-vae": dict(encoder="tiny64", decoder="tiny64", num_latent_tokens=32, image_size=64,
                     patch_size=8, **{**_VAE, "token_size": 12}),
}

# ALIT configurations (adaptive_tokenizers/__init__.py): encoder = decoder size; all official
# ones use 32 tokens per iteration, 8 iterations, VQ 4096 x 12 (l2) and halting threshold 0.55.
_ALIT = dict(vqgan="alit", tokens_per_iter=32, max_iters=8, quantize_latent=True,
             codebook_size=4096, token_size=12, use_l2_norm=True, halting_threshold=0.55,
             decoder_max_latent_tokens=256, patch_size=16, image_size=256)
ALIT_VARIANTS: dict[str, dict[str, Any]] = {
    "alit_tiny": dict(size="small", **_ALIT),
    "alit_small": dict(size="semilarge8", **_ALIT),
    "alit_base": dict(size="base", **_ALIT),
    "alit_semilarge": dict(size="semilarge", **_ALIT),
    # The parity fixture's shape (8 tokens per iteration, 64 codes, tiny VQGAN).
    "alit_fixture_tiny": dict(size="tiny64", **{**_ALIT, "vqgan": "alit_tiny",
                                                "tokens_per_iter": 8, "codebook_size": 64}),
    # A CPU-sized model for tests and runlocal training: 64x64 images, 8x8 grid, 4..32 tokens.
    "alit_runlocal": dict(size="tiny64", **{**_ALIT, "vqgan": "alit_f8_tiny", "tokens_per_iter": 4,
                                            "codebook_size": 256, "decoder_max_latent_tokens": 32,
                                            "patch_size": 8, "image_size": 64}),
}

# Names accepted by load_tokenizer / the CLI (short names and the official HF repo names).
MODEL_NAMES: dict[str, str] = {
    "titok_l32": "L-32", "titok_b64": "B-64", "titok_s128": "S-128",
    "titok_bl64_vq": "BL-64-VQ", "titok_bl128_vq": "BL-128-VQ", "titok_sl256_vq": "SL-256-VQ",
    "titok_ll32_vae": "LL-32-VAE", "titok_bl64_vae": "BL-64-VAE", "titok_bl128_vae": "BL-128-VAE",
    "titok_tiny": "tiny", "titok_tiny_pixel": "tiny-pixel", "titok_tiny_vae": "tiny-vae",
    "titok_tiny_vq": "tiny-vq",
    "tokenizer_titok_l32_imagenet": "L-32", "tokenizer_titok_b64_imagenet": "B-64",
    "tokenizer_titok_s128_imagenet": "S-128",
    "tokenizer_titok_bl64_vq8k_imagenet": "BL-64-VQ",
    "tokenizer_titok_bl128_vq8k_imagenet": "BL-128-VQ",
    "tokenizer_titok_sl256_vq8k_imagenet": "SL-256-VQ",
    "tokenizer_titok_ll32_vae_c16_imagenet": "LL-32-VAE",
    "tokenizer_titok_bl64_vae_c16_imagenet": "BL-64-VAE",
    "tokenizer_titok_bl128_vae_c16_imagenet": "BL-128-VAE",
}
VQGAN_NAMES = {"maskgit_vqgan": "maskgit", "maskgit_vqgan_tiny": "tiny"}


# Model config keys that choose how the model runs (memory, compile time), not what it computes
# or which parameters it has: a folder saved with one setting loads under another, and a
# tokenizer's fingerprint ignores them.
EXECUTION_KEYS = ("remat", "remat_policy", "scan_layers")


def model_identity(cfg: Any) -> dict:
    """A ``config.model`` block as a dict without its :data:`EXECUTION_KEYS`."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if k not in EXECUTION_KEYS}


def titok_model_config(variant: str, *, stage: int | None = None) -> ml_collections.ConfigDict:
    """The ``config.model`` block of a TiTok variant. ``stage=1`` drops the pixel decoder."""
    if variant not in TITOK_VARIANTS:
        raise ValueError(f"unknown TiTok variant {variant!r}; known: {sorted(TITOK_VARIANTS)}")
    v = dict(TITOK_VARIANTS[variant])
    if stage is not None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if not v["is_legacy"]:
            raise ValueError(f"{variant} is a single-stage model; stage={stage} does not apply")
        v["finetune_decoder"] = stage == 2
    cfg = ml_collections.ConfigDict(dict(
        name="titok", variant=variant, encoder=v["encoder"], decoder=v["decoder"],
        vqgan=v.get("vqgan", "maskgit"), num_latent_tokens=v["num_latent_tokens"],
        token_size=v["token_size"], quantize_mode=v["quantize_mode"],
        codebook_size=v["codebook_size"], use_l2_norm=v["use_l2_norm"], commitment_cost=0.25,
        is_legacy=v["is_legacy"], finetune_decoder=v["finetune_decoder"],
        patch_size=v.get("patch_size", 16), image_size=v.get("image_size", 256), dtype="float32",
        remat=False, remat_policy="nothing_saveable", scan_layers=False))
    return cfg


def alit_model_config(variant: str) -> ml_collections.ConfigDict:
    """The ``config.model`` block of an ALIT variant (``alit_small``, ...)."""
    v = dict(_lookup(ALIT_VARIANTS, variant, "ALIT variant"))
    size = v.pop("size")
    return ml_collections.ConfigDict(dict(name="alit", variant=variant, encoder=size,
                                          decoder=size, commitment_cost=0.25, dtype="float32",
                                          remat=False, remat_policy="nothing_saveable",
                                          scan_layers=False, **v))


def vqgan_model_config(size: str = "maskgit") -> ml_collections.ConfigDict:
    if size not in VQGAN_SIZES:
        raise ValueError(f"unknown VQGAN size {size!r}; known: {sorted(VQGAN_SIZES)}")
    return ml_collections.ConfigDict(dict(name="maskgit_vqgan", size=size, dtype="float32"))


def _lookup(table: dict[str, Any], key: str, what: str) -> Any:
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; known: {sorted(table)}")
    return table[key]


def _check_remat_policy(cfg: ml_collections.ConfigDict) -> None:
    from titok_jax.models.vit import REMAT_POLICIES
    policy = cfg.get("remat_policy", "nothing_saveable")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown config.model.remat_policy {policy!r}; known: "
                         f"{sorted(REMAT_POLICIES)}")


def _check_keys(cfg: ml_collections.ConfigDict, allowed: set[str]) -> None:
    unknown = sorted(set(cfg.keys()) - allowed)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown} for {cfg.get('name')!r}; "
                         f"allowed: {sorted(allowed)}")


def build_model(cfg: ml_collections.ConfigDict | dict):
    """Builds the Flax module described by a ``config.model`` block."""
    import jax.numpy as jnp
    cfg = ml_collections.ConfigDict(dict(cfg))
    dtype = jnp.dtype(cfg.get("dtype", "float32"))
    _check_remat_policy(cfg)
    if cfg.name == "maskgit_vqgan":
        _check_keys(cfg, {"name", "size", "dtype"})
        return MaskGITVQGAN(_lookup(VQGAN_SIZES, cfg.size, "VQGAN size"), dtype)
    if cfg.name == "alit":
        fields = {f.name for f in dataclasses.fields(ALIT) if f.init} - {
            "parent", "name", "encoder_arch", "decoder_arch", "vqgan_arch", "dtype"}
        _check_keys(cfg, fields | {"name", "variant", "encoder", "decoder", "vqgan", "dtype"})
        return ALIT(encoder_arch=_lookup(VIT_SIZES, cfg.encoder, "ViT size"),
                    decoder_arch=_lookup(VIT_SIZES, cfg.decoder, "ViT size"),
                    vqgan_arch=_lookup(VQGAN_SIZES, cfg.vqgan, "VQGAN size"), dtype=dtype,
                    **{k: cfg[k] for k in fields if k in cfg})
    if cfg.name != "titok":
        raise ValueError(f"unknown model name {cfg.name!r}; expected 'titok', 'alit' or "
                         "'maskgit_vqgan'")
    fields = {f.name for f in dataclasses.fields(TiTok) if f.init} - {
        "parent", "name", "encoder_arch", "decoder_arch", "vqgan_arch", "dtype"}
    _check_keys(cfg, fields | {"name", "variant", "encoder", "decoder", "vqgan", "dtype"})
    kwargs = {k: cfg[k] for k in fields if k in cfg}
    return TiTok(encoder_arch=_lookup(VIT_SIZES, cfg.encoder, "ViT size"),
                 decoder_arch=_lookup(VIT_SIZES, cfg.decoder, "ViT size"),
                 vqgan_arch=_lookup(VQGAN_SIZES, cfg.get("vqgan", "maskgit"), "VQGAN size"),
                 dtype=dtype, **kwargs)


def model_config_for(name: str) -> ml_collections.ConfigDict:
    """``config.model`` for a model name (``titok_l32``, ``maskgit_vqgan``, a variant, ...)."""
    if name in VQGAN_NAMES:
        return vqgan_model_config(VQGAN_NAMES[name])
    if name in MODEL_NAMES:
        return titok_model_config(MODEL_NAMES[name])
    if name in TITOK_VARIANTS:
        return titok_model_config(name)
    if name in ALIT_VARIANTS:
        return alit_model_config(name)
    raise ValueError(f"unknown model {name!r}; known: "
                     f"{sorted(MODEL_NAMES) + sorted(ALIT_VARIANTS) + sorted(VQGAN_NAMES)}")


# MaskGIT generators over TiTok tokens (configs/infer/TiTok/*.yaml): the model and the official
# sampling settings (``sample_imagenet_titok.py`` turns softmax-temperature annealing on).
_BERT_768 = dict(arch="bert", hidden_size=768, num_layers=24, num_heads=16,
                 intermediate_size=3072)
GENERATOR_VARIANTS: dict[str, dict[str, Any]] = {
    "titok_l32": dict(codebook_size=4096, num_tokens=32, **_BERT_768),
    "titok_b64": dict(codebook_size=4096, num_tokens=64, **_BERT_768),
    "titok_s128": dict(codebook_size=4096, num_tokens=128, arch="uvit", hidden_size=1024,
                       num_layers=20, num_heads=16, intermediate_size=4096),
}
GENERATOR_SAMPLING: dict[str, dict[str, Any]] = {
    "titok_l32": dict(num_sample_steps=8, randomize_temperature=9.5, guidance_scale=4.5,
                      guidance_decay="linear", guidance_scale_pow=3.0,
                      softmax_temperature_annealing=True),
    "titok_b64": dict(num_sample_steps=8, randomize_temperature=11.0, guidance_scale=3.0,
                      guidance_decay="linear", guidance_scale_pow=3.0,
                      softmax_temperature_annealing=True),
    "titok_s128": dict(num_sample_steps=64, randomize_temperature=2.8, guidance_scale=6.9,
                       guidance_decay="power-cosine", guidance_scale_pow=3.0,
                       softmax_temperature_annealing=True),
}
# The defaults of the official ``ImageBert.generate``, for models without a sampling entry.
GENERATE_DEFAULTS: dict[str, Any] = dict(
    num_sample_steps=8, randomize_temperature=4.5, guidance_scale=3.0, guidance_decay="constant",
    guidance_scale_pow=3.0, softmax_temperature_annealing=False)
GENERATOR_NAMES: dict[str, str] = {
    **{k: k for k in GENERATOR_VARIANTS},
    **{f"generator_{k}_imagenet": k for k in GENERATOR_VARIANTS},  # the official HF repo names
}
_GENERATOR_KEYS = {"name", "variant", "arch", "hidden_size", "num_layers", "num_heads",
                   "intermediate_size", "codebook_size", "num_tokens", "num_classes", "dropout",
                   "attn_dropout", "dtype", "remat", "remat_policy", "scan_layers"}


def generator_model_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The ``config.model`` block of a generator (``titok_l32``, ``titok_b64``, ``titok_s128``
    or an official ``generator_titok_*_imagenet`` name); ``overrides`` replace fields."""
    variant = _lookup(GENERATOR_NAMES, name, "generator")
    cfg = ml_collections.ConfigDict(dict(
        name="maskgit", variant=variant, num_classes=1000, dropout=0.1, attn_dropout=0.1,
        dtype="float32", remat=False, remat_policy="nothing_saveable", scan_layers=False,
        **GENERATOR_VARIANTS[variant]))
    _check_keys(ml_collections.ConfigDict(overrides), _GENERATOR_KEYS)
    cfg.update(overrides)
    return cfg


def build_generator(cfg: ml_collections.ConfigDict | dict):
    """The Flax module (``ImageBert`` or ``UViTBert``) of a generator ``config.model`` block."""
    import jax.numpy as jnp
    cfg = ml_collections.ConfigDict(dict(cfg))
    _check_keys(cfg, _GENERATOR_KEYS)
    _check_remat_policy(cfg)
    arch = GeneratorArch(
        cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size,
        cfg.codebook_size, cfg.num_tokens, num_classes=cfg.get("num_classes", 1000),
        dropout=cfg.get("dropout", 0.1), attn_dropout=cfg.get("attn_dropout", 0.1))
    models = {"bert": ImageBert, "uvit": UViTBert}
    if cfg.arch not in models:
        raise ValueError(f"unknown generator arch {cfg.arch!r}; expected 'bert' or 'uvit'")
    return models[cfg.arch](arch, jnp.dtype(cfg.get("dtype", "float32")),
                            remat=cfg.get("remat", False),
                            remat_policy=cfg.get("remat_policy", "nothing_saveable"),
                            scan_layers=cfg.get("scan_layers", False))
