"""Input pipeline and the embedded imagenet2012 dataset: offline prepare, determinism and resume,
per-host slices, bad images, padded eval, global arrays."""
import hashlib
import json
import logging
import os
import socket

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from titok_jax.data import embedded
from titok_jax.data.images import BadImageError
from titok_jax.data.pipeline import EvalPipeline, TrainPipeline, decode_rgb, to_global

CROPS, VAL_PER_PHOTO = 6, 3
B = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """The embedded set with the bad files injected, prepared with every network connect
    refused (so "offline" is checked, not assumed)."""
    def refuse(*args, **kwargs):
        raise OSError("network access during the offline prepare")
    d = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        embedded.prepare_embedded_imagenet(d, crops_per_photo=CROPS, val_per_photo=VAL_PER_PHOTO,
                                           bad_examples=True)
    return d


def _train(data_dir: str, **kwargs) -> TrainPipeline:
    kwargs = {"global_batch": B, "seed": 3, "num_threads": 2, **kwargs}
    return TrainPipeline("imagenet2012", data_dir=data_dir, **kwargs)


def _records(data_dir: str, split: str) -> list[dict]:
    source = tfds.builder("imagenet2012", data_dir=data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return list(source.__getitems__(list(range(len(source)))))


def test_embedded_prepares_offline_with_expected_counts(data_dir):
    num_classes = len(embedded.class_names())
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == num_classes * CROPS + len(
        embedded.BAD_EXAMPLES)
    assert builder.info.splits["validation"].num_examples == num_classes * VAL_PER_PHOTO
    shards = [f for f in os.listdir(builder.data_dir) if "-of-" in f]
    assert len(shards) == 2 and all(".array_record-" in f for f in shards)
    labels = {int(r["label"]) for r in _records(data_dir, "train")}
    assert labels == set(range(num_classes))
    with open(os.path.join(data_dir, embedded.MARKER)) as f:
        assert json.load(f)["classes"] == embedded.class_names()
    # Prepared already: returns without writing anything.
    before = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json"))
    assert embedded.prepare_embedded_imagenet(data_dir) == data_dir
    assert os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json")) == before


def test_builder_stores_bad_files_verbatim(data_dir):
    """The imagenet2012 builder neither rejects nor re-encodes the bad files (module docstring)."""
    bad = {r["file_name"].decode(): r["image"] for r in _records(data_dir, "train")
           if b"_bad_" in r["file_name"]}
    by_kind = {kind: next(v for k, v in bad.items() if k.endswith(suffix))
               for kind, suffix in embedded.BAD_EXAMPLES.items()}
    for kind in ("truncated", "garbage"):
        with pytest.raises(BadImageError):
            decode_rgb(by_kind[kind])
    for kind in ("grayscale", "cmyk", "png"):
        img, converted = decode_rgb(by_kind[kind])
        assert converted and img.mode == "RGB", kind
    assert by_kind["png"].startswith(b"\x89PNG")
    img, converted = decode_rgb(by_kind["tiny"])
    assert img.size == (20, 14) and not converted


def test_train_batches_are_deterministic_and_resume_exactly(data_dir):
    with _train(data_dir) as a, _train(data_dir) as b:
        x, y = a.batch(5), b.batch(5)
        assert x["image"].dtype == np.float32 and x["image"].shape == (B, 256, 256, 3)
        assert x["label"].dtype == np.int32 and x["label"].shape == (B,)
        assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
        assert not np.array_equal(x["image"], a.batch(6)["image"])
        # An uninterrupted run vs. a fresh pipeline resumed at step 2 (prefetch thread on both).
        straight = {s: batch for s, batch in a.iterate(0, 5)}
        resumed = list(b.iterate(start_step=2, end_step=5))
        assert [s for s, _ in resumed] == [2, 3, 4]
        for s, batch in resumed:
            np.testing.assert_array_equal(batch["image"], straight[s]["image"])
            np.testing.assert_array_equal(batch["label"], straight[s]["label"])
        # Stopping an endless iteration early must not hang on the prefetch thread.
        it = a.iterate(7)
        assert next(it)[0] == 7
        it.close()
    with _train(data_dir, seed=4) as c:
        assert not np.array_equal(c.batch(5)["image"], x["image"])


def test_two_hosts_split_each_global_batch(data_dir):
    """Host h decodes slots [h*b, (h+1)*b) of the global batch: two hosts together produce
    exactly the global batches of one host, whatever the process count."""
    with _train(data_dir, global_batch=4) as one:
        single = [one.batch(step) for step in (0, 1, 9)]
    hosts = [_train(data_dir, global_batch=4, process_index=i, process_count=2)
             for i in range(2)]
    for k, step in enumerate((0, 1, 9)):
        parts = [h.batch(step) for h in hosts]
        assert all(p["image"].shape == (2, 256, 256, 3) and p["label"].shape == (2,)
                   for p in parts)
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                          single[k][key])
    for h in hosts:
        h.close()
    with pytest.raises(ValueError, match="not divisible"):
        _train(data_dir, global_batch=3, process_index=0, process_count=2)


def test_bad_examples_are_skipped_converted_and_counted(data_dir, caplog):
    """One batch covering a whole epoch decodes every example, the bad ones included."""
    with caplog.at_level(logging.WARNING, logger="titok_jax.data.pipeline"):
        with _train(data_dir, global_batch=1) as probe:
            n = probe.num_examples
        with _train(data_dir, global_batch=n) as pipe:
            batch = pipe.batch(0)
            stats = dict(pipe.stats)
    assert batch["image"].shape == (n, 256, 256, 3) and np.isfinite(batch["image"]).all()
    assert stats["skipped_corrupt"] >= 2      # truncated, garbage (more if a replacement is bad)
    assert stats["converted_mode"] >= 3       # grayscale, CMYK, RGBA PNG
    assert stats["upsampled_small"] >= 1      # the 20x14 image, and crops under 256
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert embedded.BAD_EXAMPLES["truncated"] in warned
    assert embedded.BAD_EXAMPLES["garbage"] in warned
    assert embedded.BAD_EXAMPLES["grayscale"] not in warned


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_eval_is_padded_and_covers_every_example_once(data_dir):
    with EvalPipeline("imagenet2012", data_dir=data_dir, per_host_batch=B, num_threads=2,
                      process_index=0, process_count=1) as single:
        reference = sorted(_digest(img) for batch in single
                           for img, m in zip(batch["image"], batch["mask"]) if m)
    n = VAL_PER_PHOTO * len(embedded.class_names())
    assert len(reference) == n == len(set(reference))
    seen, lengths = [], []
    for host in range(2):
        with EvalPipeline("imagenet2012", data_dir=data_dir, per_host_batch=B, num_threads=2,
                          process_index=host, process_count=2) as pipe:
            batches = list(pipe)
        lengths.append(len(batches))
        assert len(batches) == pipe.num_batches
        assert pipe.host_counts == [(n + 1) // 2, n // 2]
        masks = np.concatenate([b["mask"] for b in batches])
        assert masks.sum() == pipe.host_counts[host]
        # Real examples first, then padding; padded slots are zero images.
        assert masks[: masks.sum()].all() and not masks[masks.sum():].any()
        for b in batches:
            assert b["image"].shape == (B, 256, 256, 3) and b["mask"].dtype == bool
            assert not b["image"][~b["mask"]].any()
            seen += [_digest(img) for img, m in zip(b["image"], b["mask"]) if m]
    assert lengths[0] == lengths[1] == -(-((n + 1) // 2) // B)
    assert sorted(seen) == reference
    # More hosts than examples: the last host has none and still runs the same batches, masked.
    with EvalPipeline("imagenet2012", data_dir=data_dir, per_host_batch=B, num_threads=2,
                      process_index=n + 1, process_count=n + 2) as empty:
        batches = list(empty)
    assert len(batches) == 1 and not batches[0]["mask"].any()


def test_to_global_assembles_a_sharded_batch(data_dir):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    b = len(jax.devices())
    with _train(data_dir, global_batch=b) as pipe:
        batch = pipe.batch(0)
    arrays = to_global(batch, NamedSharding(mesh, P("data")))
    assert arrays["image"].shape == (b, 256, 256, 3)
    assert len(arrays["image"].addressable_shards) == b
    np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])
