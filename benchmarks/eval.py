"""Evaluation throughput (not a test), on whatever JAX backend is present.

* ``inception``: the FID InceptionV3 on ``[B, S, S, 3]`` images (resize to 299 included);
* ``lpips``: LPIPS-VGG on pairs of ``[B, S, S, 3]`` images;
* ``eval``: a whole ``Evaluation`` pass (data pipeline, reconstruction, every pass evaluator,
  host accumulation and the FID square root) of a random-init TiTok variant on the embedded
  validation split; the second call is timed, so compilation is excluded.

    python -m benchmarks.eval --batch 16 --size 256 --variant tiny-pixel
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds, print_header
from titok_jax.evals import inception_weights, metrics
from titok_jax.infra import sharding
from titok_jax.models import variants
from titok_jax.models.lpips import lpips_vgg


def bench_ops(batch: int, size: int, iters: int) -> None:
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)), jnp.float32)
    module, params = inception_weights.load_inception()
    fn = jax.jit(lambda p, v: module.apply({"params": p}, v)["pool"]).lower(params, x).compile()
    sec = median_seconds(lambda: fn(params, x * 255.0).block_until_ready(), 1, iters)
    print(f"inception  batch {batch} {size}px: {batch / sec:8.1f} images/s")
    lp_module, lp_params = lpips_vgg()
    fn = jax.jit(lambda p, a, b: metrics.lpips_distance(lp_module, p, a, b))
    fn = fn.lower(lp_params, x, x).compile()
    sec = median_seconds(lambda: fn(lp_params, x, 1.0 - x).block_until_ready(), 1, iters)
    print(f"lpips-vgg  batch {batch} {size}px: {batch / sec:8.1f} image pairs/s")


def bench_eval(variant: str, evals: str, batch: int) -> None:
    from titok_jax.data.embedded import DATASET_NAME, prepare_embedded
    from titok_jax.evals import runner
    from titok_jax.infra.config import apply_overrides, load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "titok.py") + f":variant={variant}")
    apply_overrides(config, [f"eval.batch_size={batch}", "eval.fid_sqrt=eigh",
                             f"data.dataset={DATASET_NAME}"])
    data_dir = prepare_embedded(os.path.join(tempfile.gettempdir(), "titok_bench_tfds"))
    model = variants.build_model(config.model)
    size = config.model.image_size
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    evaluation = runner.from_config(config, data_dir, sharding.make_mesh(), evals=evals)
    evaluation({"model": params, "frozen": {}})  # compile
    start = time.perf_counter()
    results = evaluation({"model": params, "frozen": {}})
    sec = time.perf_counter() - start
    n = results["num_images"]
    print(f"eval {variant} ({size}px) [{evals}] on {n} images, batch {batch}: {sec:.1f} s, "
          f"{n / sec:.1f} images/s (FID square root: eigh)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variant", default="tiny-pixel")
    p.add_argument("--evals", default="rfid,psnr,ssim,lpips,codebook")
    args = p.parse_args()
    print_header(jax.devices()[0], "n/a")
    bench_ops(args.batch, args.size, args.iters)
    bench_eval(args.variant, args.evals, args.batch)


if __name__ == "__main__":
    main()
