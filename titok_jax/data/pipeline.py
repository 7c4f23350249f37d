"""Deterministic, resumable per-host input pipeline over a TFDS random-access (array_record) split.

Hosts read raw JPEG bytes by index; decoding and transforms run in a thread pool (PIL releases
the GIL), or, with ``workers > 0`` (``config.data.workers``), in Grain worker processes that each
make whole batches with their own thread pool, for hosts where one Python process cannot decode
as fast as the accelerators consume (the batches are identical either way).

Training batches are a pure function of ``(seed, step)`` and do not depend on the number of
hosts:

- slot ``g`` of global batch ``step`` is global position ``p = step * global_batch + g``, i.e.
  example ``perm_e[p % N]`` of the split's ``N`` examples, with ``e = p // N`` and ``perm_e``
  the permutation drawn from ``np.random.default_rng([seed, e])``;
- host ``h`` of ``H`` reads and decodes only its slots ``g in [h*b, (h+1)*b)``, where
  ``b = global_batch / H``;
- the crop and flip of slot ``g`` come from ``np.random.default_rng([seed, step, g])``.

So a 2-host run trains on exactly the global batches of a 1-host run, and resuming at step ``k``
needs nothing but ``k``: no iterator state to checkpoint, and the seek is O(1).

Evaluation instead gives each host its own slice of the split (``tfds.split_for_jax_process``).

Where the data comes from: :func:`resolve_data_dir` prepares the embedded dataset
(:mod:`titok_jax.data.embedded`) when asked to and never writes anywhere else; every other
dataset (``imagenet2012``) is only read, from a data dir prepared beforehand. The data dir may
be local or ``gs://`` (:func:`check_readable_location`).

Transforms are the official ones to the pixel (:mod:`titok_jax.data.images`): torchvision's
``Resize(size, BICUBIC, antialias=True)`` + ``RandomCrop`` + ``RandomHorizontalFlip`` for
training, ``Resize`` + ``CenterCrop`` for evaluation, on images decoded as stored (no EXIF
rotation, like the official PIL decoding).

Bad examples never stop a run. An undecodable one (truncated, not an image) is replaced by the
example at the next position of the permutation, so the batch stays full (that example then shows
up twice); in eval it becomes a masked slot. Grayscale, CMYK, palette, 16-bit and alpha images
are converted to RGB, and images smaller than the target size are upsampled by the resize. All
three are counted in ``pipeline.stats``, and skipped examples are logged by file name.
"""
from __future__ import annotations

import concurrent.futures
import io
import itertools
import logging
import math
import os
import queue
import re
import sys
import threading
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from titok_jax.data import embedded
from titok_jax.data.images import (
    BadImageError,
    center_crop_uint8,
    resize_shorter_side,
    to_rgb,
    to_unit_float,
)
from titok_jax.infra import cache

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
DatasetArg = str | tfds.core.DatasetBuilder
# An image crop: (RGB image, size, rng or None) -> uint8 [size, size, 3]. Batches are made of
# uint8 crops (what Grain workers hand over: a quarter of the bytes) converted to float32 in
# [0, 1] once, by :func:`~titok_jax.data.images.to_unit_float`.
Crop = Callable[[Image.Image, int, np.random.Generator | None], np.ndarray]
# Allocates a batch's uint8 pixel buffer: (shape, dtype) -> array (np.empty, or shared memory).
Allocator = Callable[[tuple[int, ...], Any], np.ndarray]
# URL schemes that TFDS array_record data sources can read. Their reader is array_record's C++
# one, not etils.epath: it opens local files and, since array_record 0.8.6 (pinned), gs:// with
# its own GCS client (checked against a GCS emulator in tests/test_data.py); nothing else.
READABLE_SCHEMES = ("gs",)


def check_readable_location(path: str | os.PathLike) -> None:
    """Raises ValueError, saying what to do, if ``path`` (a TFDS data dir) has a URL scheme that
    the array_record reader cannot open, so a run fails before it builds anything."""
    text = os.fspath(path)
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match and match.group(1).lower() not in READABLE_SCHEMES:
        raise ValueError(
            f"data_dir {text!r}: TFDS array_record data sources are read by array_record's own "
            f"reader, which opens local paths and {', '.join(s + '://' for s in READABLE_SCHEMES)}"
            f" only, not {match.group(1)}://. Copy the prepared dataset to a local disk (or "
            f"mount the bucket, e.g. with a FUSE mount) and pass that directory as data_dir.")


def open_builder(dataset: DatasetArg, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared TFDS dataset (a name read from ``data_dir``, or a builder);
    raises, saying what to do, if its location is unreadable or it is not prepared."""
    if isinstance(dataset, str):
        if data_dir is not None:
            check_readable_location(data_dir)
        builder = tfds.builder(dataset, data_dir=data_dir)
    else:
        builder = dataset
        check_readable_location(dataset.data_dir)
    if not builder.is_prepared():
        hint = ("set data.embedded=True to prepare it" if builder.name == embedded.DATASET_NAME
                else "prepare it with TFDS first (titok-jax only reads it and never writes there)")
        raise FileNotFoundError(f"TFDS dataset {builder.info.full_name} is not prepared "
                                f"in {builder.data_dir}: {hint}")
    return builder


def decode_rgb(data: bytes) -> tuple[Image.Image, bool]:
    """Fully decodes encoded image bytes to RGB; returns the image and whether its mode had to be
    converted. Raises :class:`BadImageError` for bytes that do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # load() forces the whole decode, so a truncated file fails here, not later.
            img.load()
            return to_rgb(img), img.mode != "RGB"
    # Broad on purpose: on malformed data PIL's plugins raise many types (OSError, SyntaxError,
    # struct.error, IndexError, DecompressionBombError, ...), and any of them means a bad file.
    except Exception as e:
        raise BadImageError(f"cannot decode image ({e})") from e


def train_crop(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """The official TiTok train recipe on uint8 pixels: torchvision's ``Resize(size, BICUBIC,
    antialias=True)`` (:func:`~titok_jax.data.images.resize_shorter_side`), ``RandomCrop(size)``
    (offsets uniform in ``[0, side - size]``) and ``RandomHorizontalFlip()``."""
    arr = np.asarray(resize_shorter_side(img, size))
    top = rng.integers(0, arr.shape[0] - size + 1)
    left = rng.integers(0, arr.shape[1] - size + 1)
    arr = arr[top:top + size, left:left + size]
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def eval_crop(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """torchvision's ``Resize(size, BICUBIC, antialias=True)`` + ``CenterCrop(size)``
    (:func:`~titok_jax.data.images.center_crop_uint8`) on uint8 pixels."""
    return center_crop_uint8(img, size)


def train_transform(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """:func:`train_crop` as float32 [size, size, 3] in [0, 1] (what a training batch holds)."""
    return to_unit_float(train_crop(img, size, rng))


def eval_transform(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """:func:`eval_crop` as float32 [size, size, 3] in [0, 1] (what an eval batch holds)."""
    return to_unit_float(eval_crop(img, size, rng))


def _process(data: bytes, size: int, crop: Crop,
             rng_seed: list[int] | None) -> tuple[np.ndarray, bool, bool]:
    """Decode + crop of one example (runs in the pool); -> (uint8 crop, converted, upsampled)."""
    img, converted = decode_rgb(data)
    upsampled = min(img.size) < size
    rng = None if rng_seed is None else np.random.default_rng(rng_seed)
    return crop(img, size, rng), converted, upsampled


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def prefetched(produce: Callable[[int], Any], keys: Iterable[int],
               depth: int) -> Iterator[tuple[int, Any]]:
    """Yields ``(k, produce(k))`` for ``keys``, computed by a background thread that runs up to
    ``depth`` items ahead; stops the thread when the consumer stops."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for k in keys:
                if not put((k, produce(k))):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)
            return
        put(done)

    thread = threading.Thread(target=work, name="titok-data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class EpochShuffle:
    """The endless sequence of shuffled epochs over ``num_examples`` examples: position ``p`` is
    example ``perm_e[p % num_examples]`` with ``e = p // num_examples`` and ``perm_e`` drawn from
    ``np.random.default_rng([seed, e])``. Thread-safe; caches the last two epochs' orders."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, position: int) -> int:
        """Example index at global position ``position``."""
        epoch, offset = divmod(position, self.num_examples)
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                # A batch touches at most two consecutive epochs; keep those.
                self._permutations = {e: p for e, p in self._permutations.items()
                                      if e == epoch - 1}
                self._permutations[epoch] = perm
        return int(perm[offset])


class _HostPipeline:
    """This host's slice of a split, read by index with a decode pool and bad-example counters."""

    def __init__(self, dataset: DatasetArg, *, data_dir: str | None, split: str,
                 per_host_batch: int, image_size: int, process_index: int | None,
                 process_count: int | None, num_threads: int | None, prefetch: int,
                 host_slice: bool):
        if per_host_batch < 1:
            raise ValueError(f"per_host_batch must be >= 1, got {per_host_batch}")
        self.builder = open_builder(dataset, data_dir)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.split = split
        self.host_split = tfds.split_for_jax_process(
            split, process_index=self.process_index, process_count=self.process_count
        ) if host_slice else split
        self.num_examples = self.builder.info.splits[self.host_split].num_examples
        # SkipDecoding: we get the stored bytes and decode ourselves, so that bad images can be
        # converted or skipped instead of raising inside TFDS. array_record refuses an empty
        # slice (more hosts than examples); such a host reads nothing.
        self.source = self.builder.as_data_source(
            self.host_split, decoders={"image": tfds.decode.SkipDecoding()}
        ) if self.num_examples else None
        self.per_host_batch = per_host_batch
        self.image_size = image_size
        self.prefetch = prefetch
        # Events over every batch produced so far (prefetched ones included), not unique files.
        self.stats = {"skipped_corrupt": 0, "converted_mode": 0, "upsampled_small": 0}
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                           thread_name_prefix="titok-data")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, indices: list[int]) -> list[dict[str, Any]]:
        # One bulk read keeps all array_record access on the calling thread.
        return list(self.source.__getitems__(indices)) if indices else []

    def _decode(self, records: list[dict[str, Any]], crop: Crop,
                rng_seeds: list[list[int] | None]) -> list[np.ndarray | BadImageError]:
        """Decodes and crops records in the pool (uint8 crops); counts conversions/upsamplings
        of the good ones and returns the error in place of an image for the bad ones."""
        futures = [self._pool.submit(_process, r["image"], self.image_size, crop, s)
                   for r, s in zip(records, rng_seeds)]
        out: list[np.ndarray | BadImageError] = []
        for future in futures:
            try:
                image, converted, upsampled = future.result()
            except BadImageError as e:
                out.append(e)
                continue
            with self._lock:
                self.stats["converted_mode"] += converted
                self.stats["upsampled_small"] += upsampled
            out.append(image)
        return out

    def _skip(self, index: int, record: dict[str, Any] | None, error: Exception | None) -> None:
        """Counts a skipped example; warns the first time an index turns out bad."""
        with self._lock:
            self.stats["skipped_corrupt"] += 1
            first = index not in self._bad
            self._bad.add(index)
        if first:
            name = _as_str(record.get("file_name", "?")) if record else "?"
            log.warning("skipping undecodable example %s (index %d of %s split %r, host %d of "
                        "%d): %s", name, index, self.builder.name, self.split,
                        self.process_index, self.process_count, error)

    def _is_known_bad(self, index: int) -> bool:
        with self._lock:
            return index in self._bad


class TrainPipeline(_HostPipeline):
    """Endless shuffled training batches; ``batch(step)`` is this host's share of global batch
    ``step``, a pure function of ``(seed, step)``, so a resumed run (or one with another number
    of hosts) sees exactly the same global batches.

    Batches: ``{"image": float32 [b, S, S, 3] in [0, 1], "label": int32 [b]}`` with
    ``b = global_batch / process_count``.
    """

    def __init__(self, dataset: DatasetArg, *, data_dir: str | None = None,
                 split: str = "train", global_batch: int, image_size: int = 256, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2, workers: int = 0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        count = jax.process_count() if process_count is None else process_count
        if global_batch % count:
            raise ValueError(f"global_batch {global_batch} is not divisible by the {count} hosts")
        super().__init__(dataset, data_dir=data_dir, split=split,
                         per_host_batch=global_batch // count, image_size=image_size,
                         process_index=process_index, process_count=count,
                         num_threads=num_threads, prefetch=prefetch, host_slice=False)
        if self.num_examples == 0:
            raise ValueError(f"split {split!r} of {self.builder.name} has no examples")
        self.global_batch = global_batch
        self.seed = seed
        self._index_at = EpochShuffle(self.num_examples, seed)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per pass over the split."""
        return self.num_examples // self.global_batch

    def batch(self, step: int) -> Batch:
        """This host's batch for global step ``step``."""
        pixels, labels = self.pixels(step)
        return {"image": to_unit_float(pixels), "label": labels}

    def pixels(self, step: int, allocate: Allocator = np.empty) -> tuple[np.ndarray, np.ndarray]:
        """This host's batch for global step ``step`` before the float conversion: uint8
        ``[b, S, S, 3]`` pixels written into ``allocate(shape, np.uint8)``, and int32 labels."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.per_host_batch
        slots = [self.process_index * b + i for i in range(b)]
        positions = [step * self.global_batch + g for g in slots]
        seeds = [[self.seed, step, g] for g in slots]
        indices = [self._index_at(p) for p in positions]
        records = self._read(indices)
        crops = self._decode(records, train_crop, seeds)
        labels = [int(r["label"]) for r in records]
        for i, crop in enumerate(crops):
            if isinstance(crop, BadImageError):
                crops[i], labels[i] = self._replacement(positions[i], records[i], crop, seeds[i])
        size = self.image_size
        pixels = allocate((b, size, size, 3), np.uint8)
        for i, crop in enumerate(crops):
            pixels[i] = crop
        return pixels, np.asarray(labels, np.int32)

    def _replacement(self, position: int, record: dict[str, Any], error: Exception,
                     seed: list[int]) -> tuple[np.ndarray, int]:
        """The first decodable example after ``position`` in the permutation order, cropped
        with the failed slot's rng (so the result does not depend on how often we retried)."""
        self._skip(self._index_at(position), record, error)
        for p in range(position + 1, position + 1 + self.num_examples):
            index = self._index_at(p)
            if self._is_known_bad(index):
                self._skip(index, None, None)
                continue
            [record] = self._read([index])
            [image] = self._decode([record], train_crop, [seed])
            if not isinstance(image, BadImageError):
                return image, int(record["label"])
            self._skip(index, record, image)
        raise RuntimeError(f"no decodable example in split {self.host_split} of "
                           f"{self.builder.name}")

    def iterate(self, start_step: int = 0,
                end_step: int | None = None) -> Iterator[tuple[int, Batch]]:
        """``(step, batch)`` from ``start_step`` up to ``end_step`` (exclusive; endless if None),
        prepared ``prefetch`` batches ahead: by a background thread whose pool decodes the
        batch's images (``workers == 0``), or by ``workers`` Grain worker processes, each
        making whole batches (:class:`_GrainBatches`), ``prefetch`` per worker."""
        if not self.workers:
            steps = (itertools.count(start_step) if end_step is None
                     else range(start_step, end_step))
            return prefetched(self.batch, steps, self.prefetch)
        return self._grain_iterate(start_step, end_step)

    def _grain_iterate(self, start_step: int, end_step: int | None
                       ) -> Iterator[tuple[int, Batch]]:
        import grain
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain reads absl flags; use their defaults
            flags.FLAGS.mark_as_parsed()
        stop = sys.maxsize if end_step is None else end_step
        maker = _GrainBatches(self.builder.data_dir, self.split, self.global_batch,
                              self.image_size, self.seed, self.process_index,
                              self.process_count, self.num_threads)
        # One batch at a time per worker (its counters are per call), decoded by the worker's
        # own thread pool; workers run ahead by ``prefetch`` batches each.
        dataset = grain.MapDataset.range(start_step, stop).map(maker).to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self.workers, per_worker_buffer_size=max(1, self.prefetch)))
        iterator = iter(dataset)

        def produce(step: int) -> Batch:
            pixels, labels, stats = next(iterator)
            with self._lock:  # the workers' counters, summed here
                for k, v in stats.items():
                    self.stats[k] += v
            # The pixels arrive in shared memory (unlinked once ``pixels`` dies, right after
            # this conversion); the float32 batch is made in private memory by the prefetch
            # thread, off the training loop's thread.
            return {"image": to_unit_float(pixels), "label": np.array(labels)}

        try:
            yield from prefetched(produce, range(start_step, stop), self.prefetch)
        finally:
            iterator.close()  # stops the workers and frees their shared memory


class _GrainBatches:
    """``step -> (this host's uint8 pixels, labels, bad-example counters)``, picklable for Grain
    workers: each worker process opens the prepared dataset from its directory
    (``tfds.builder_from_directory``, so no builder class has to be importable there) and makes
    whole batches with :meth:`TrainPipeline.pixels`, one at a time, decoding its images with
    ``num_threads`` threads. Grain hands the arrays over through shared memory; uint8 is a
    quarter of the float32 batch's bytes, and the float conversion is one vectorised pass in the
    main process. The batches are the same as the threaded pipeline's: they depend only on
    ``(seed, step)``."""

    def __init__(self, builder_dir: str, split: str, global_batch: int, image_size: int,
                 seed: int, process_index: int, process_count: int, num_threads: int):
        self.args = (os.fspath(builder_dir), split, global_batch, image_size, seed,
                     process_index, process_count, num_threads)
        self._pipe: TrainPipeline | None = None

    def __getstate__(self):
        return {"args": self.args, "_pipe": None}

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        if self._pipe is None:
            builder_dir, split, global_batch, image_size, seed, index, count, threads = self.args
            self._pipe = TrainPipeline(
                tfds.builder_from_directory(builder_dir), split=split,
                global_batch=global_batch, image_size=image_size, seed=seed,
                process_index=index, process_count=count, num_threads=threads, prefetch=0)
        before = dict(self._pipe.stats)
        pixels, labels = self._pipe.pixels(int(step))
        return pixels, labels, {k: v - before[k] for k, v in self._pipe.stats.items()}


class EvalPipeline(_HostPipeline):
    """One ordered pass over this host's slice of a split, with the eval transform, padded to
    whole batches: ``{"image", "label", "mask": bool [b]}`` (mask False on padding and on
    undecodable examples). Every host yields the same number of batches, :attr:`num_batches`,
    so collective ops in the eval step line up; hosts with fewer examples add fully masked ones.
    """

    def __init__(self, dataset: DatasetArg, *, data_dir: str | None = None,
                 split: str = "validation", per_host_batch: int, image_size: int = 256,
                 process_index: int | None = None, process_count: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2):
        super().__init__(dataset, data_dir=data_dir, split=split, per_host_batch=per_host_batch,
                         image_size=image_size, process_index=process_index,
                         process_count=process_count, num_threads=num_threads,
                         prefetch=prefetch, host_slice=True)
        # The sizes of every host's slice, from the split metadata (the same on all hosts).
        self.host_counts = [self.builder.info.splits[s].num_examples
                            for s in tfds.even_splits(split, n=self.process_count)]
        self.num_batches = math.ceil(max(self.host_counts) / per_host_batch)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> Batch:
        """Batch ``k`` of ``num_batches``: host examples ``k * b ...`` in split order."""
        b, size = self.per_host_batch, self.image_size
        indices = [i for i in range(k * b, (k + 1) * b) if i < self.num_examples]
        records = self._read(indices)
        images = np.zeros((b, size, size, 3), np.float32)
        labels = np.zeros((b,), np.int32)
        mask = np.zeros((b,), bool)
        decoded = self._decode(records, eval_crop, [None] * len(records))
        for i, (index, record, image) in enumerate(zip(indices, records, decoded)):
            labels[i] = int(record["label"])
            if isinstance(image, BadImageError):
                self._skip(index, record, image)
                continue
            to_unit_float(image, out=images[i])
            mask[i] = True
        return {"image": images, "label": labels, "mask": mask}

    def __iter__(self) -> Iterator[Batch]:
        for _, batch in prefetched(self.batch, range(self.num_batches), self.prefetch):
            yield batch


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles every host's batch into global arrays (batch axis split over hosts), e.g. with
    ``NamedSharding(mesh, P("data"))``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def resolve_data_dir(data_config) -> str:
    """The TFDS data dir of a ``config.data`` block.

    With ``data_config.embedded`` the dataset must be the embedded one
    (:data:`~titok_jax.data.embedded.DATASET_NAME`): it is prepared (idempotent, offline) in
    ``data_dir``, by default the project cache (:func:`titok_jax.infra.cache.tfds_dir`). Any other
    dataset is only read, never written: from ``data_dir``, by default ``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets`` (the project cache for the embedded dataset)."""
    dataset, data_dir = data_config.dataset, data_config.data_dir
    if data_config.embedded:
        if dataset != embedded.DATASET_NAME:
            raise ValueError(
                f"data.embedded prepares the embedded dataset {embedded.DATASET_NAME!r}, but "
                f"data.dataset is {dataset!r}: set data.dataset={embedded.DATASET_NAME} to use "
                f"the embedded photos, or data.embedded=False to read {dataset!r} as prepared")
        return embedded.prepare_embedded(data_dir or None)
    if data_dir:
        return data_dir
    if dataset == embedded.DATASET_NAME:
        return cache.tfds_dir()
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                           "tensorflow_datasets")


def first_eval_images(data_config, data_dir: str, n: int, image_size: int) -> np.ndarray:
    """The first ``n`` decodable images of the eval split (eval transform), for image grids."""
    with EvalPipeline(data_config.dataset, data_dir=data_dir, split=data_config.eval_split,
                      per_host_batch=n, image_size=image_size, process_index=0,
                      process_count=1) as pipe:
        batch = pipe.batch(0)
    return batch["image"][batch["mask"]]
