"""Pre-tokenized training data for MaskGIT generators: a TFDS split encoded once by a VQ
tokenizer, stored as ArrayRecord shards that are read by global index.

Views (the official ``scripts/pretokenization.py``):

- ``flip`` (default, ``V = 2``): ADM's :func:`center_crop_arr` to ``image_size``, then the crop
  and its horizontal flip;
- ``ten_crop`` (``V = 10``): :func:`center_crop_arr` to ``int(1.1 * image_size)``, then
  torchvision's ``TenCrop(image_size)`` (:func:`ten_crop`).

Every view is its own training entry with the image's class label.

Layout of an output dir ``OUT`` (local or ``gs://``):

- ``OUT/tokens.json``: the metadata (:func:`pretokenize` writes it first with
  ``"completed": false`` and rewrites it at the end): ``format_version``, ``record_layout``,
  ``tokenizer`` (``fingerprint`` from :func:`tokenizer_fingerprint`, ``model_config``,
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

A shard is written to a temporary local file and moved into place only when complete (a rename
on a local disk; on ``gs://`` an upload, which creates the object atomically), then its ``.json``
is written the same way: a run killed at any point leaves no shard that looks finished, and a
rerun with the same arguments skips finished shards and redoes the others (a killed run may leave
``.tmp-*`` files behind in a local ``OUT``; they are never read).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from titok_jax import sharding
from titok_jax.data.images import BadImageError
from titok_jax.data.pipeline import DatasetArg, EpochShuffle, decode_rgb, open_builder, prefetched

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
    from titok_jax import variants
    from titok_jax.convert.layout import unstack_layers
    config = variants.model_identity(model_config)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = unstack_layers(dict(params), ("transformer",))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for key, leaf in sorted((jax.tree_util.keystr(p), v) for p, v in leaves):
        arr = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{key}|{arr.dtype.name}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _as_path(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _shard_name(s: int, n: int) -> str:
    return f"shard-{s:05d}-of-{n:05d}"


def _place(local_file: str, dest: epath.Path) -> None:
    """Moves a finished local file to ``dest`` in one step: a rename on a local disk, an upload
    (atomic object creation) elsewhere."""
    if _is_local(dest):
        os.replace(local_file, os.fspath(dest))
        return
    with open(local_file, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(local_file)


def _temp_file(out: epath.Path, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".tmp-{name}-",
                                dir=os.fspath(out) if _is_local(out) else None)
    os.close(fd)
    return path


def _write_json(out: epath.Path, name: str, value: dict) -> None:
    tmp = _temp_file(out, name)
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    _place(tmp, out / name)


def _write_shard(out: epath.Path, name: str, records: list[bytes], summary: dict) -> None:
    """Writes one finished shard and then its ``.json`` (the sign that it is done)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    tmp = _temp_file(out, name)
    # group_size:1: every record its own chunk, so a read by index decompresses one record.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    _place(tmp, out / f"{name}.array_record")
    _write_json(out, f"{name}.json", summary)


def _spec_differences(stored: dict, current: dict) -> list[str]:
    """What makes an existing output dir another dataset than the one this run would write."""
    keys = [("format_version",), ("tokenizer", "fingerprint"), ("source", "dataset"),
            ("source", "split"), ("source", "num_examples"), ("mode",), ("image_size",),
            ("shard_size",)]
    lines = []
    for key in keys:
        a, b = stored, current
        for k in key:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if a != b:
            name = ".".join(key)
            if key == ("tokenizer", "fingerprint"):
                name += (f" (stored weights {stored.get('tokenizer', {}).get('weights')!r}, "
                         f"this run {current['tokenizer']['weights']!r})")
            lines.append(f"{name}: stored {a!r}, this run {b!r}")
    return lines


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class _Encoder:
    """A VQ tokenizer's ``encode`` jitted over a 1D mesh of ``devices``, on fixed-size batches."""

    def __init__(self, tokenizer, devices: Sequence[jax.Device], rows: int):
        mesh = sharding.make_mesh(devices)
        self.rows = math.ceil(rows / len(devices)) * len(devices)
        module = tokenizer.module
        self.params = jax.device_put(tokenizer.params, sharding.replicated(mesh))
        self._batch = sharding.batch_sharding(mesh)
        self._fn = jax.jit(
            lambda params, x: module.apply({"params": params}, x, method=module.encode).ids,
            in_shardings=(sharding.replicated(mesh), self._batch), out_shardings=self._batch)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[n, S, S, 3]`` (``n <= rows``) -> int32 ids ``[n, N]``."""
        n = len(images)
        x = np.zeros((self.rows,) + images.shape[1:], np.float32)
        x[:n] = images.astype(np.float32) / np.float32(255)
        # Placed explicitly: in a multi-process run jit takes no numpy input with a sharding,
        # even one over this process's devices only.
        ids = self._fn(self.params, jax.device_put(x, self._batch))
        return np.asarray(jax.device_get(ids))[:n].astype(np.int32)


def pretokenize(tokenizer, dataset: DatasetArg, data_dir: str | None, split: str,
                out: str | os.PathLike, *, mode: str = "flip", batch_size: int = 64,
                shard_size: int = 10_000, weights: str | None = None,
                process_index: int | None = None, process_count: int | None = None,
                devices: Sequence[jax.Device] | None = None, num_threads: int | None = None,
                progress: bool = False) -> str:
    """Encodes every example of a TFDS split into ``out`` (see the module docstring); returns
    ``out``.

    Shard ``s`` is written by host ``s % process_count``, which encodes ``batch_size`` images
    (``batch_size * V`` views) per call on all of ``devices`` (default: its local devices). The
    ids do not depend on ``batch_size``, the devices or the hosts. A rerun skips finished shards;
    an ``out`` made by another tokenizer, dataset, split, mode, image size or shard size is
    refused before any work (ValueError naming the differences). ``weights`` (the tokenizer's
    path) is recorded in the metadata."""
    if tokenizer.is_vae:
        raise ValueError("pretokenize needs a VQ tokenizer (discrete ids); this one is a VAE")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODES)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, "
                         f"{shard_size}")
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    out_path = _as_path(out)
    builder = open_builder(dataset, data_dir)
    num_examples = builder.info.splits[split].num_examples
    if not num_examples:
        raise ValueError(f"split {split!r} of {builder.info.full_name} has no examples")
    num_shards = math.ceil(num_examples / shard_size)
    spec = {
        "format_version": FORMAT_VERSION, "record_layout": RECORD_LAYOUT,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer.config, tokenizer.params),
                      "model_config": tokenizer.config.to_dict(),
                      "weights": None if weights is None else os.fspath(weights)},
        "num_tokens": tokenizer.num_tokens, "codebook_size": tokenizer.config.codebook_size,
        "source": {"dataset": builder.info.full_name, "split": split,
                   "num_examples": num_examples},
        "mode": mode, "views_per_image": MODES[mode], "image_size": tokenizer.image_size,
        "shard_size": shard_size, "num_shards": num_shards, "completed": False,
    }
    meta_path = out_path / META_FILE
    if meta_path.exists():
        differences = _spec_differences(json.loads(meta_path.read_text()), spec)
        if differences:
            raise ValueError(f"{out} holds another pre-tokenized dataset; refusing to write into"
                             f" it (choose another --out):\n  " + "\n  ".join(differences))
    else:
        out_path.mkdir(parents=True, exist_ok=True)
        if index == 0:
            _write_json(out_path, META_FILE, spec)
    _sync("titok_pretokenize_start")

    names = [_shard_name(s, num_shards) for s in range(num_shards)]
    mine = [s for s in range(index, num_shards, count)
            if not (out_path / f"{names[s]}.json").exists()]
    if mine:
        devices = jax.local_devices() if devices is None else list(devices)
        _encode_shards(builder, split, out_path, mine, names, tokenizer, mode, batch_size,
                       shard_size, num_examples, devices, num_threads, progress)
    _sync("titok_pretokenize_shards")
    if index == 0:
        _finish(out_path, spec, names)
    _sync("titok_pretokenize_done")
    return os.fspath(out)


def _encode_shards(builder: tfds.core.DatasetBuilder, split: str, out: epath.Path,
                   shards: list[int], names: list[str], tokenizer, mode: str, batch_size: int,
                   shard_size: int, num_examples: int, devices: Sequence[jax.Device],
                   num_threads: int | None, progress: bool) -> None:
    """Encodes and writes ``shards`` (this host's unfinished ones), one after the other."""
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    encoder = _Encoder(tokenizer, devices, batch_size * MODES[mode])
    ranges = {s: (s * shard_size, min(num_examples, (s + 1) * shard_size)) for s in shards}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(b - a for a, b in ranges.values()), unit="img",
                   desc=f"pretokenize {split}")
    with concurrent.futures.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
        reader = _ShardReader(source, pool, tokenizer.image_size, mode, batch_size,
                              builder.name, split)
        for s in shards:
            start, stop = ranges[s]
            records, skipped = [], []
            for batch in reader.batches(start, stop):
                if batch["header"]:
                    rows = np.concatenate([np.asarray(batch["header"], np.int32),
                                           encoder(batch["views"])], axis=1).astype("<i4")
                    records += [row.tobytes() for row in rows]
                skipped += batch["skipped"]
                if bar is not None:
                    bar.update(batch["count"])
            _write_shard(out, names[s], records,
                         {"file": f"{names[s]}.array_record", "examples": [start, stop],
                          "records": len(records), "skipped": skipped})
    if bar is not None:
        bar.close()


def _finish(out: epath.Path, spec: dict, names: list[str]) -> None:
    """Process 0: collects every shard's summary into ``tokens.json``, marked completed."""
    missing = [n for n in names if not (out / f"{n}.json").exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"are not finished (did another host fail?); rerun with the same "
                           f"arguments to finish them")
    shards = [json.loads((out / f"{n}.json").read_text()) for n in names]
    skipped = [s for shard in shards for s in shard["skipped"]]
    meta = {**spec, "completed": True, "num_records": sum(s["records"] for s in shards),
            "num_skipped": len(skipped), "skipped": skipped, "shards": shards}
    _write_json(out, META_FILE, meta)


class _ShardReader:
    """Reads examples by index and turns them into views in a thread pool, batch by batch."""

    def __init__(self, source, pool: concurrent.futures.Executor, size: int, mode: str,
                 batch_size: int, dataset_name: str, split: str):
        self.source, self.pool = source, pool
        self.size, self.mode, self.batch_size = size, mode, batch_size
        self.dataset_name, self.split = dataset_name, split

    def _views(self, data: bytes) -> np.ndarray:
        return views(decode_rgb(data)[0], self.size, self.mode)

    def _batch(self, start: int, stop: int) -> dict[str, Any]:
        indices = list(range(start, stop))
        records = list(self.source.__getitems__(indices))
        futures = [self.pool.submit(self._views, r["image"]) for r in records]
        stacks, header, skipped = [], [], []
        for example, record, future in zip(indices, records, futures):
            try:
                stack = future.result()
            except BadImageError as e:
                name = record.get("file_name", "?")
                name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
                log.warning("skipping undecodable example %s (index %d of %s split %r): %s",
                            name, example, self.dataset_name, self.split, e)
                skipped.append({"example": example, "file_name": name})
                continue
            stacks.append(stack)
            header += [(int(record["label"]), example, v) for v in range(len(stack))]
        empty = np.zeros((0, self.size, self.size, 3), np.uint8)
        return {"views": np.concatenate(stacks) if stacks else empty, "header": header,
                "skipped": skipped, "count": len(indices)}

    def batches(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """The batches of examples ``[start, stop)``, read one batch ahead of the consumer."""
        starts = range(start, stop, self.batch_size)
        produce = lambda b: self._batch(b, min(stop, b + self.batch_size))  # noqa: E731
        for _, batch in prefetched(produce, starts, 1):
            yield batch


class TokenDataset:
    """A finished :func:`pretokenize` output dir, read by global record index."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        self.path = _as_path(path)
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
