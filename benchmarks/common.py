"""Shared pieces of the benchmarks in ``launch/``: timing, FLOPs from XLA's cost analysis, and
the peak used for model FLOP utilisation (MFU)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from titok_jax.infra.config import load_config
from titok_jax.models.variants import TITOK_VARIANTS, titok_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# device_kind substring -> dense (float32, bfloat16) TFLOP/s; first match wins. TPUs run float32
# dots as bfloat16 MXU passes at the default precision, hence one figure for both.
PEAK_TFLOPS = (("H100", 67.0, 989.0), ("H200", 67.0, 989.0), ("A100", 19.5, 312.0),
               ("TPU v4", 275.0, 275.0), ("TPU v5 lite", 197.0, 197.0),
               ("TPU v5e", 197.0, 197.0), ("TPU v5", 459.0, 459.0))


def timings(call: Callable[[], Any], warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(call: Callable[[], Any], warmup: int, iters: int) -> float:
    return statistics.median(timings(call, warmup, iters))


def compiled_flops(compiled: Any) -> float:
    """``flops`` of an executable's cost analysis (a dict, or a list of per-program dicts)."""
    analysis = compiled.cost_analysis() or {}
    entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
    return float(sum(entry.get("flops", 0.0) for entry in entries))


def compiled_timing(fn: Callable[..., Any], args: tuple, warmup: int,
                    iters: int) -> dict[str, float]:
    """Compiles ``jax.jit(fn)`` for ``args`` and times it: ``compile_s``, ``s`` (median per
    call after ``warmup``) and ``flops`` (cost analysis). ``args`` are not donated."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), warmup, iters)
    return {"compile_s": compile_s, "s": seconds, "flops": compiled_flops(compiled)}


def measured_matmul_gflops(n: int = 2048, iters: int = 5) -> float:
    """Best achieved float32 ``n x n`` matmul GFLOP/s on the default device (fastest call)."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    seconds = min(timings(lambda: matmul(a, a).block_until_ready(), 1, iters))
    return 2 * n ** 3 / seconds / 1e9


def peak_gflops(device: Any, override: float | None) -> tuple[dict[str, float], str]:
    """Peak GFLOP/s per compute dtype, and where the figure comes from."""
    if override is not None:
        return {"float32": override, "bfloat16": override}, "--peak-gflops"
    if device.platform != "cpu":
        for kind, f32, bf16 in PEAK_TFLOPS:
            if kind.lower() in device.device_kind.lower():
                return {"float32": f32 * 1e3, "bfloat16": bf16 * 1e3}, f"table entry {kind!r}"
    gflops = measured_matmul_gflops()
    return ({"float32": gflops, "bfloat16": gflops},
            f"best float32 2048x2048 matmul measured now ({gflops:.1f} GFLOP/s), for both dtypes")


def print_header(device: Any, peak_source: str) -> None:
    precision = jax.config.jax_default_matmul_precision or "backend default"
    notes = {"cpu": "full float32", "gpu": "float32 dots may run as TF32",
             "tpu": "float32 dots run as bfloat16 MXU passes"}
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
          f"(x{jax.device_count()}), {os.cpu_count()} CPUs")
    print(f"matmul precision: {precision} ({notes.get(device.platform, 'backend-specific')})")
    print(f"peak for MFU: {peak_source}")
    load = os.getloadavg()[0]
    if device.platform == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: machine is busy (1-min load {load:.2f}), figures are pessimistic")


OFFICIAL_DEPS = ("torch", "einops", "omegaconf", "huggingface_hub", "accelerate")
OFFICIAL_VIT_SIZES = ("small", "base", "large")


def load_official_titok(src: str) -> type | None:
    """The official ``TiTok`` class, or None (with the reason printed) if it cannot be imported."""
    missing = [name for name in OFFICIAL_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"[official] skipped: missing packages; pip install {' '.join(missing)}")
        return None
    if not os.path.isfile(os.path.join(src, "modeling", "titok.py")):
        print(f"[official] skipped: {src} has no modeling/titok.py")
        return None
    # The packages' __init__ files import training-only code (losses, torchvision, diffusion);
    # registering them as bare packages imports just the modules TiTok needs.
    for package in ("modeling", "modeling.modules", "modeling.quantizer"):
        stub = types.ModuleType(package)
        stub.__path__ = [os.path.join(src, *package.split("."))]
        sys.modules.setdefault(package, stub)
    sys.path.insert(0, src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from modeling.titok import TiTok
    except ImportError as err:
        print(f"[official] skipped: {err}; pip install the missing package")
        return None
    return TiTok


def official_config(variant: str) -> Any:
    from omegaconf import OmegaConf
    cfg, row = titok_model_config(variant), TITOK_VARIANTS[variant]
    vq_model = {key: cfg[key] for key in ("codebook_size", "token_size", "use_l2_norm",
                                          "commitment_cost", "num_latent_tokens",
                                          "finetune_decoder", "is_legacy", "quantize_mode")}
    vq_model.update(vit_enc_model_size=row["encoder"], vit_dec_model_size=row["decoder"],
                    vit_enc_patch_size=cfg.patch_size, vit_dec_patch_size=cfg.patch_size)
    return OmegaConf.create({"model": {"vq_model": vq_model},
                             "dataset": {"preprocessing": {"crop_size": cfg.image_size}}})


def load_official_alit(src: str) -> Callable[..., Any] | None:
    """A factory ``size -> official AdaptiveLengthImageTokenizer`` (random init, VQGAN base,
    CPU) from a checkout of ShivamDuggal4/adaptive-length-tokenizer, or None with the reason
    printed.

    Training-only imports are stubbed (``pytorch_lightning``, ``utils.misc`` which imports
    torchvision), and ``Tensor.get_device`` answers ``"cpu"`` for CPU tensors: the official
    code calls ``.to(x.get_device())``, which fails on CPU (-1). Nothing else is changed."""
    missing = [n for n in ("torch", "einops", "omegaconf") if importlib.util.find_spec(n) is None]
    if missing:
        print(f"[official] skipped: missing packages; pip install {' '.join(missing)}")
        return None
    if not os.path.isfile(os.path.join(src, "adaptive_tokenizers", "adaptive_vqgan.py")):
        print(f"[official] skipped: {src} has no adaptive_tokenizers/adaptive_vqgan.py")
        return None
    import torch
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = torch.nn.Module
    sys.modules.setdefault("pytorch_lightning", lightning)
    utils, misc = types.ModuleType("utils"), types.ModuleType("utils.misc")
    utils.__path__ = [os.path.join(src, "utils")]
    misc.all_reduce_mean = lambda x: x
    sys.modules.setdefault("utils", utils)
    sys.modules.setdefault("utils.misc", misc)
    sys.path[:0] = [src, os.path.join(src, "base_tokenizers")]
    original_get_device = torch.Tensor.get_device
    torch.Tensor.get_device = lambda t: "cpu" if t.device.type == "cpu" else original_get_device(t)

    def build(size: str):
        cwd = os.getcwd()
        os.chdir(src)  # the official code reads its YAML configs by relative path
        try:
            import adaptive_tokenizers as at
            args = {"id": "vqgan", "embed_dim": 256, "pretrained_ckpt_path": None}
            model = getattr(at, size)(args, train_stage="latent_distillation_pretrain")
        finally:
            os.chdir(cwd)
        model.train_stage = "full_finetuning"  # pixels from the soft code (the eval path)
        return model.eval()
    return build


def load_official_gan_losses(src: str) -> dict[str, Any] | None:
    """The official GAN-phase pieces, ``{"stage2": ReconstructionLoss_Stage2, "single_stage":
    ReconstructionLoss_Single_Stage, "ema": EMAModel}``, or None with the reason printed.

    Call after ``load_official_titok`` (its bare ``modeling`` packages). ``losses.py`` also
    imports the official diffusion head and torchvision (for ConvNeXt-S and LPIPS's VGG16)."""
    if importlib.util.find_spec("torchvision") is None:
        print("[official] GAN step skipped: missing packages; pip install torchvision")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from modeling.modules.ema_model import EMAModel
            from modeling.modules.losses import (
                ReconstructionLoss_Single_Stage,
                ReconstructionLoss_Stage2,
            )
    except (ImportError, RuntimeError, OSError) as err:  # torchvision's C++ ops raise RuntimeError
        print(f"[official] GAN step skipped: {type(err).__name__}: {err}")
        return None
    return {"stage2": ReconstructionLoss_Stage2, "single_stage": ReconstructionLoss_Single_Stage,
            "ema": EMAModel}


@contextlib.contextmanager
def official_random_perceptual() -> Iterator[None]:
    """While open, the official ``PerceptualLoss`` builds with random networks: torchvision's
    ``convnext_small`` and ``vgg16`` get ``weights=None`` and LPIPS skips loading its linear
    heads. Both would otherwise download ImageNet/LPIPS weights; random ones time the same."""
    from modeling.modules import lpips
    from torchvision import models
    saved = models.convnext_small, models.vgg16, lpips.LPIPS.load_pretrained
    models.convnext_small = lambda weights=None, **kw: saved[0](weights=None, **kw)
    models.vgg16 = lambda weights=None, **kw: saved[1](weights=None, **kw)
    lpips.LPIPS.load_pretrained = lambda self: None
    try:
        yield
    finally:
        models.convnext_small, models.vgg16, lpips.LPIPS.load_pretrained = saved


def load_official_generators(src: str) -> dict[str, type] | None:
    """The official MaskGIT generator classes ``{"bert": ImageBert, "uvit": UViTBert}``, or None
    with the reason printed. Call after ``load_official_titok`` (its bare ``modeling``
    packages); ``modeling/maskgit.py`` also needs ``transformers`` (HF ``BertModel``)."""
    if importlib.util.find_spec("transformers") is None:
        print("[official] generators skipped: missing packages; pip install transformers")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from modeling.maskgit import ImageBert, UViTBert
    except ImportError as err:
        print(f"[official] generators skipped: {err}; pip install the missing package")
        return None
    return {"bert": ImageBert, "uvit": UViTBert}


def official_generator_config(cfg: Any) -> Any:
    """The official OmegaConf config of a generator ``config.model`` block (dropout as trained;
    ``generate`` runs the model in eval mode)."""
    from omegaconf import OmegaConf
    generator = {"condition_num_classes": cfg.get("num_classes", 1000),
                 "image_seq_len": cfg.num_tokens, "hidden_size": cfg.hidden_size,
                 "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
                 "intermediate_size": cfg.intermediate_size, "dropout": cfg.get("dropout", 0.1),
                 "attn_drop": cfg.get("attn_dropout", 0.1)}
    return OmegaConf.create({"model": {"vq_model": {"codebook_size": cfg.codebook_size},
                                       "generator": generator}})


def bench_device(override: float | None) -> tuple[Any, dict[str, float], str]:
    """The default device, its peak GFLOP/s per dtype and their source, with the header
    printed."""
    device = jax.devices()[0]
    peaks, peak_source = peak_gflops(device, override)
    print_header(device, peak_source)
    return device, peaks, peak_source


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), for the benchmark headers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def stage1_config(variant: str, dtype: str, batch: int, remat: bool, scan: bool = False,
                  policy: str = "nothing_saveable", ema: bool = True):
    """The stage-1 config the training benchmarks time: random teacher, ``batch``, ``dtype``,
    remat (with ``policy``), scanned layers and the EMA copy (on in every released recipe) as
    asked."""
    config = load_config(os.path.join(ROOT, "configs", "titok.py") + f":variant={variant},stage=1")
    config.global_batch = batch
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.remat_policy = policy
    config.model.scan_layers = scan
    if not ema:
        config.ema_decay = None
    config.teacher.allow_random = True
    return config
