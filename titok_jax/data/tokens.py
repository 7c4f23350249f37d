"""Pre-tokenized training data for MaskGIT generators: a TFDS split encoded once by a VQ
tokenizer, stored as ArrayRecord shards that are read by global index.

Views (the official ``scripts/pretokenization.py``):

- ``flip`` (default, ``V = 2``): ADM's :func:`center_crop_arr` to ``image_size``, then the crop
  and its horizontal flip;
- ``ten_crop`` (``V = 10``): :func:`center_crop_arr` to ``int(1.1 * image_size)``, then
  torchvision's ``TenCrop(image_size)`` (:func:`ten_crop`).

Every view is its own training entry with the image's class label.

Layout of an output dir ``OUT`` (local or ``gs://``):

- ``OUT/tokens.json``: the metadata (:func:`titok_jax.jobs.pretokenize.pretokenize` writes it
  first with ``"completed": false`` and rewrites it at the end): ``format_version``,
  ``record_layout``, ``tokenizer`` (``fingerprint`` from :func:`tokenizer_fingerprint`,
  ``model_config``,
  ``weights``), ``num_tokens``, ``codebook_size``, ``source`` (TFDS ``dataset`` full name,
  ``split``, ``num_examples``), ``mode``, ``views_per_image``, ``image_size``, ``shard_size``,
  ``num_shards``, and when completed ``num_records``, ``skipped`` and ``shards``;
- ``OUT/shard-SSSSS-of-NNNNN.array_record``: the records of split examples
  ``[S * shard_size, (S + 1) * shard_size)``; shards do not depend on the number of hosts or
  devices;
- ``OUT/shard-SSSSS-of-NNNNN.json``: written after its shard is in place, and the only sign that
  the shard is finished: ``{"file", "examples": [start, stop], "records", "skipped"}``.

Record ``i`` (global, over the shards in order) is view ``i % V`` of the ``i // V``-th *stored*
example; its bytes are ``3 + num_tokens`` little-endian int32: the class label, the example's
index in the split, the view index, then the token ids. Undecodable images are not stored: each
is logged by file name and listed in ``tokens.json`` ``skipped`` as ``{"example", "file_name"}``
(and per shard), so with no bad image ``i // V`` is the split index, and otherwise the record's
own example index says which image it came from.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from titok_jax.data.pipeline import EpochShuffle, prefetched
from titok_jax.infra.paths import as_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "tokens.json"
MODES = {"flip": 2, "ten_crop": 10}
HEADER = ("label", "example", "view")
RECORD_LAYOUT = ("little-endian int32: label, example index in the split, view index, then "
                 "num_tokens token ids")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``image_datasets.center_crop_arr``): halve with a box
    filter while the shorter side is at least ``2 * size``, resize bicubically so the shorter
    side is ``size`` (each side ``round(side * scale)``), and take the centre ``size`` square at
    offsets ``(side - size) // 2``. -> uint8 ``[size, size, 3]``."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size),
                     resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    # torchvision's five_crop: the four corners, then the centre at int(round((side - size) / 2))
    # (Python's round: halves go to the even integer).
    h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return [arr[y:y + size, x:x + size] for y, x in corners]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``TenCrop(size)`` of an image array ``[H, W, C]``: the five crops (top-left,
    top-right, bottom-left, bottom-right, centre) of the image, then those of its horizontal
    flip. -> ``[10, size, size, C]``."""
    if min(arr.shape[:2]) < size:
        raise ValueError(f"ten_crop({size}) of a {arr.shape[1]}x{arr.shape[0]} image")
    return np.stack(_five_crop(arr, size) + _five_crop(arr[:, ::-1], size))


def views(img: Image.Image, size: int, mode: str = "flip") -> np.ndarray:
    """The stored views of one RGB image, uint8 ``[V, size, size, 3]`` (``V = MODES[mode]``):
    ``flip``: the ADM centre crop and its horizontal flip; ``ten_crop``: ``TenCrop(size)`` of the
    ADM centre crop to ``int(size * 1.1)``."""
    if mode == "flip":
        crop = center_crop_arr(img, size)
        return np.stack([crop, crop[:, ::-1]])
    if mode == "ten_crop":
        return ten_crop(center_crop_arr(img, int(size * 1.1)), size)
    raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODES)}")


def tokenizer_fingerprint(model_config: Any, params: Any) -> str:
    """sha256 (hex) of a tokenizer's model config (JSON, sorted keys) and of every parameter
    (in sorted tree-path order: path, dtype, shape and bytes): which tokenizer made a dataset.
    How the tokenizer runs does not count: execution keys (remat, scan) are left out and a
    scanned stack is hashed as its unrolled blocks."""
    from titok_jax.convert.layout import unstack_layers
    from titok_jax.models import variants
    config = variants.model_identity(model_config)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = unstack_layers(dict(params), ("transformer",))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for key, leaf in sorted((jax.tree_util.keystr(p), v) for p, v in leaves):
        arr = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{key}|{arr.dtype.name}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class TokenDataset:
    """A finished :func:`pretokenize` output dir, read by global record index."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        self.path = as_path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{path}: no {META_FILE}, so not a pre-tokenized dataset "
                                    f"(write one with `titok-jax pretokenize --out {path}`)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {self.meta.get('format_version')}, this "
                             f"titok-jax reads version {FORMAT_VERSION}")
        if not self.meta.get("completed"):
            raise ValueError(f"{path} is unfinished (its pretokenize run stopped before the end)"
                             f": rerun `titok-jax pretokenize` with the same arguments to finish "
                             f"it")
        files = [self.path / s["file"] for s in self.meta["shards"] if s["records"]]
        missing = [os.fspath(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shard files missing: {missing}")
        self.num_tokens = self.meta["num_tokens"]
        self._width = len(HEADER) + self.num_tokens
        self._len = sum(s["records"] for s in self.meta["shards"])
        self._source = ArrayRecordDataSource([os.fspath(f) for f in files]) if files else None

    def __len__(self) -> int:
        return self._len

    def close(self) -> None:
        """Closes the shard readers (they reopen on the next read)."""
        if self._source is not None:
            self._source.__exit__(None, None, None)

    def __getitems__(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids int32 ``[n, num_tokens]``, labels int32 ``[n]``)."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self._len]
        if bad:
            raise IndexError(f"record indices {bad[:5]} out of range [0, {self._len})")
        data = b"".join(self._source.__getitems__(indices)) if indices else b""
        rows = np.frombuffer(data, "<i4").reshape(len(indices), self._width).astype(np.int32)
        return rows[:, len(HEADER):], rows[:, 0]

    def check_tokenizer(self, fingerprint: str, what: str) -> None:
        """Raises ValueError unless the dataset was made by the tokenizer with ``fingerprint``
        (:func:`tokenizer_fingerprint`); ``what`` names that tokenizer in the message."""
        stored = self.meta["tokenizer"]
        if stored["fingerprint"] != fingerprint:
            raise ValueError(
                f"{self.path} was tokenized by another tokenizer than {what}: the dataset's "
                f"tokenizer has fingerprint {stored['fingerprint']} (weights "
                f"{stored.get('weights')!r}), {what} has {fingerprint}. Use the tokenizer that "
                f"made the dataset, or pretokenize again with this one")


class TokenTrainPipeline:
    """Endless shuffled batches of a :class:`TokenDataset` with the determinism of
    :class:`~titok_jax.data.pipeline.TrainPipeline`: slot ``g`` of global batch ``step`` is
    global position ``p = step * global_batch + g``, i.e. record ``perm_e[p % N]`` with
    ``e = p // N`` (:class:`~titok_jax.data.pipeline.EpochShuffle`), and host ``h`` reads only
    its slots ``[h*b, (h+1)*b)``, ``b = global_batch / hosts``.

    Batches: ``{"tokens": int32 [b, num_tokens], "label": int32 [b]}``."""

    def __init__(self, path: str | os.PathLike | TokenDataset, *, global_batch: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 prefetch: int = 2):
        self.dataset = path if isinstance(path, TokenDataset) else TokenDataset(path)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch < 1 or global_batch % self.process_count:
            raise ValueError(f"global_batch {global_batch} is not a positive multiple of the "
                             f"{self.process_count} hosts")
        if not len(self.dataset):
            raise ValueError(f"{self.dataset.path} holds no records")
        self.global_batch = global_batch
        self.per_host_batch = global_batch // self.process_count
        self.seed = seed
        self.prefetch = prefetch
        # The image pipeline's bad-example counters; records never fail to decode.
        self.stats: dict[str, int] = {}
        self._index_at = EpochShuffle(len(self.dataset), seed)

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per pass over the records."""
        return len(self.dataset) // self.global_batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch for global step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b = self.per_host_batch
        first = step * self.global_batch + self.process_index * b
        ids, labels = self.dataset.__getitems__([self._index_at(p)
                                                 for p in range(first, first + b)])
        return {"tokens": ids, "label": labels}

    def iterate(self, start_step: int = 0,
                end_step: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(step, batch)`` from ``start_step`` up to ``end_step`` (exclusive; endless if None),
        prepared ``prefetch`` batches ahead by a background thread."""
        steps = itertools.count(start_step) if end_step is None else range(start_step, end_step)
        return prefetched(self.batch, steps, self.prefetch)
