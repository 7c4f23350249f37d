"""Input-pipeline benchmark: training images/s of titok-jax's pipeline (decode, torchvision-exact
Resize(256, bicubic, antialias) + RandomCrop + flip, batch) with its decode threads, with Grain
worker processes, and of a PyTorch DataLoader over the same records and the same transform, in
one run on the same machine.

    python -m benchmarks.input [--data-dir DIR] [--dataset NAME] [--batch 32] [--batches 12]
                                 [--max-workers 2]

Without ``--data-dir`` the embedded photo dataset is prepared in the project cache and read
(336 JPEG crops of 192-400 px; ImageNet's average JPEG is larger, so absolute figures there are
lower). Every configuration reads the same examples of the same steps; the first batch (worker
start-up) is not timed. Each line prints images/s and images/s per worker (thread or process).
The PyTorch side applies titok-jax's own transform, so the comparison is of the loaders, not of
the image code.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import cpu_model


class TorchSlots:
    """A map-style torch Dataset over the global positions of a run's batches: position p is
    example ``EpochShuffle(p)`` with the crop/flip rng of slot ``(seed, step, g)``, exactly as
    :class:`titok_jax.data.pipeline.TrainPipeline` (good images only: the benchmark data has no
    bad ones)."""

    def __init__(self, builder_dir: str, split: str, batch: int, size: int, seed: int):
        self.args = (builder_dir, split)
        self.batch, self.size, self.seed = batch, size, seed
        self._source = None
        self._order = None

    def __len__(self) -> int:
        return 10 ** 9

    def __getitem__(self, position: int):
        import tensorflow_datasets as tfds

        from titok_jax.data.pipeline import EpochShuffle, decode_rgb, train_transform
        if self._source is None:
            builder = tfds.builder_from_directory(self.args[0])
            self._source = builder.as_data_source(
                self.args[1], decoders={"image": tfds.decode.SkipDecoding()})
            self._order = EpochShuffle(len(self._source), self.seed)
        record = self._source[self._order(position)]
        step, g = divmod(position, self.batch)
        img, _ = decode_rgb(record["image"])
        image = train_transform(img, self.size, np.random.default_rng([self.seed, step, g]))
        return image, int(record["label"])


def time_batches(batches, n: int) -> float:
    """Seconds for ``n`` batches after the first one."""
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=None, help="TFDS name (default: the embedded photos)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-workers", type=int, default=2)
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    from titok_jax.data import embedded
    from titok_jax.data.pipeline import TrainPipeline, open_builder
    if args.dataset is None:
        dataset, data_dir = embedded.DATASET_NAME, embedded.prepare_embedded(args.data_dir)
    else:
        dataset, data_dir = args.dataset, args.data_dir
    builder = open_builder(dataset, data_dir)
    n, b = args.batches, args.batch
    print(f"{builder.info.full_name} {args.split}: batches of {b} at {args.image_size}px, "
          f"{n} timed batches per line; {cpu_model()}, {os.cpu_count()} cores")
    print(f"{'loader':<34} {'images/s':>9} {'per worker':>11}")

    def report(name: str, workers: int, seconds: float) -> None:
        rate = n * b / seconds
        print(f"{name:<34} {rate:9.1f} {rate / workers:11.1f}", flush=True)

    counts = range(1, args.max_workers + 1)
    for t in counts:
        with TrainPipeline(builder, split=args.split, global_batch=b,
                           image_size=args.image_size, seed=0, num_threads=t,
                           process_index=0, process_count=1) as pipe:
            report(f"titok-jax, {t} decode thread(s)", t,
                   time_batches((x for _, x in pipe.iterate(0)), n))
    for w in counts:
        with TrainPipeline(builder, split=args.split, global_batch=b,
                           image_size=args.image_size, seed=0, num_threads=1, workers=w,
                           process_index=0, process_count=1) as pipe:
            report(f"titok-jax, {w} Grain worker(s)", w,
                   time_batches((x for _, x in pipe.iterate(0)), n))
    if args.skip_torch:
        return
    import torch
    torch.set_num_threads(1)
    slots = TorchSlots(os.fspath(builder.data_dir), args.split, b, args.image_size, 0)
    for w in counts:
        loader = torch.utils.data.DataLoader(slots, batch_size=b, shuffle=False, num_workers=w,
                                             prefetch_factor=2, persistent_workers=False)
        report(f"PyTorch DataLoader, {w} worker(s)", w, time_batches(loader, n))


if __name__ == "__main__":
    main()
