"""Pre-tokenization: a TFDS split encoded once by a VQ tokenizer into the ArrayRecord shards that
:mod:`titok_jax.data.tokens` reads (its docstring describes the views and the layout).

Every host of a multi-host run calls :func:`pretokenize` with the same arguments; shard ``s`` is
written by host ``s % process_count`` with all its local devices.

A shard is written to a temporary local file and moved into place only when complete (a rename
on a local disk; on ``gs://`` an upload, which creates the object atomically), then its ``.json``
is written the same way: a run killed at any point leaves no shard that looks finished, and a
rerun with the same arguments skips finished shards and redoes the others (a killed run may leave
``.tmp-*`` files behind in a local ``OUT``; they are never read).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import tempfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from titok_jax.data.images import BadImageError
from titok_jax.data.pipeline import DatasetArg, decode_rgb, open_builder, prefetched
from titok_jax.data.tokens import (
    FORMAT_VERSION,
    META_FILE,
    MODES,
    RECORD_LAYOUT,
    tokenizer_fingerprint,
    views,
)
from titok_jax.infra import sharding
from titok_jax.infra.distributed import barrier
from titok_jax.infra.paths import as_path, is_remote, place

log = logging.getLogger(__name__)


def _shard_name(s: int, n: int) -> str:
    return f"shard-{s:05d}-of-{n:05d}"


def _temp_file(out: epath.Path, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".tmp-{name}-",
                                dir=os.fspath(out) if not is_remote(out) else None)
    os.close(fd)
    return path


def _write_json(out: epath.Path, name: str, value: dict) -> None:
    tmp = _temp_file(out, name)
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    place(tmp, out / name)


def _write_shard(out: epath.Path, name: str, records: list[bytes], summary: dict) -> None:
    """Writes one finished shard and then its ``.json`` (the sign that it is done)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    tmp = _temp_file(out, name)
    # group_size:1: every record its own chunk, so a read by index decompresses one record.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    place(tmp, out / f"{name}.array_record")
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
    out_path = as_path(out)
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
    barrier("titok_pretokenize_start")

    names = [_shard_name(s, num_shards) for s in range(num_shards)]
    mine = [s for s in range(index, num_shards, count)
            if not (out_path / f"{names[s]}.json").exists()]
    if mine:
        devices = jax.local_devices() if devices is None else list(devices)
        _encode_shards(builder, split, out_path, mine, names, tokenizer, mode, batch_size,
                       shard_size, num_examples, devices, num_threads, progress)
    barrier("titok_pretokenize_shards")
    if index == 0:
        _finish(out_path, spec, names)
    barrier("titok_pretokenize_done")
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
