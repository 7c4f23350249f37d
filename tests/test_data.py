"""Input pipeline and the embedded dataset: offline prepare into its own TFDS name, HOME and
ImageNet never touched, torchvision-exact transforms, determinism and resume, per-host slices,
bad images, padded eval, global arrays, gs:// paths."""
import hashlib
import http.server
import io
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from titok_jax.data import embedded, images
from titok_jax.data import pipeline as data_lib
from titok_jax.data.images import BadImageError
from titok_jax.data.pipeline import EvalPipeline, TrainPipeline, decode_rgb, to_global

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(crops_per_photo=6, val_per_photo=3, bad_examples=True)
B = 4


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tfds.core.DatasetBuilder:
    """The embedded set with the bad files injected, prepared with every network connect
    refused (so "offline" is checked, not assumed)."""
    def refuse(*args, **kwargs):
        raise OSError("network access during the offline prepare")
    d = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        assert embedded.prepare_embedded(d, **SETTINGS) == d
    return embedded.builder(d, **SETTINGS)


def _train(builder, **kwargs) -> TrainPipeline:
    kwargs = {"global_batch": B, "seed": 3, "num_threads": 2, **kwargs}
    return TrainPipeline(builder, **kwargs)


def _records(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return list(source.__getitems__(list(range(len(source)))))


def _tree(root) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def test_embedded_prepares_offline_under_its_own_name(photos):
    num_classes = len(embedded.class_names())
    assert photos.is_prepared() and photos.name == embedded.DATASET_NAME
    assert photos.info.splits["train"].num_examples == num_classes * 6 + len(
        embedded.BAD_EXAMPLES)
    assert photos.info.splits["validation"].num_examples == num_classes * 3
    shards = [f for f in os.listdir(photos.data_dir) if "-of-" in f]
    assert len(shards) == 2 and all(".array_record-" in f for f in shards)
    for split in ("train", "validation"):
        assert {int(r["label"]) for r in _records(photos, split)} == set(range(num_classes))
    assert photos.info.features["label"].names == embedded.class_names()
    # Everything lives under <data_dir>/titok_sample_photos, except TFDS's empty download dir.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.fspath(photos.data_dir))))
    assert sorted(os.listdir(root)) == ["downloads", embedded.DATASET_NAME]
    assert not [f for f in _tree(os.path.join(root, "downloads")).values() if f is not None]
    # The settings are in the config name: the default settings are not prepared there, and a
    # second prepare with the same settings writes nothing.
    assert photos.builder_config.name == "crops6_val3_heldout0p4_seed0_bad"
    assert not tfds.builder(embedded.DATASET_NAME, data_dir=root).is_prepared()
    before = _tree(root)
    info = os.path.join(photos.data_dir, "dataset_info.json")
    mtime = os.path.getmtime(info)
    assert embedded.prepare_embedded(root, **SETTINGS) == root
    assert os.path.getmtime(info) == mtime and _tree(root) == before


def test_bad_files_are_stored_verbatim(photos):
    """tfds.features.Image stores bytes as given: every record holds exactly the generated
    file, the bad ones included, and the pipeline's decoder copes with each kind."""
    expected = embedded.examples(photos.builder_config)
    stored = {split: {r["file_name"].decode(): (r["image"], int(r["label"]))
                      for r in _records(photos, split)} for split in expected}
    for split, exs in expected.items():
        assert stored[split] == {e["file_name"]: (e["image"], e["label"]) for e in exs}
    by_kind = {kind: next(v[0] for k, v in stored["train"].items() if k.endswith(suffix))
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


def test_embedded_prepare_leaves_home_and_imagenet_untouched(tmp_path):
    """The runlocal config with an empty data_dir prepares into the project cache only: a HOME
    that holds real-looking ImageNet manual tars stays byte-identical, nothing is added."""
    home, cache = tmp_path / "home", tmp_path / "cache"
    manual = home / "tensorflow_datasets" / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (manual / name).write_bytes(b"real imagenet " + name.encode() * 100)
    before = _tree(home)
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    env.update(HOME=str(home), TITOK_JAX_CACHE=str(cache))
    script = ("import sys; from titok_jax.infra.config import load_config; "
              "from titok_jax.data.pipeline import resolve_data_dir; "
              "data = load_config(sys.argv[1]).data; "
              "print(data.dataset, resolve_data_dir(data))")
    out = subprocess.run([sys.executable, "-c", script,
                          os.path.join(ROOT, "configs", "titok.py") + ":runlocal"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == [embedded.DATASET_NAME, str(cache / "tfds")]
    assert _tree(home) == before
    assert tfds.builder(embedded.DATASET_NAME, data_dir=str(cache / "tfds")).is_prepared()
    assert not tfds.builder("imagenet2012", data_dir=str(cache / "tfds")).is_prepared()


def test_other_datasets_are_only_read(photos, tmp_path):
    """imagenet2012 in an empty data dir: nothing of ours prepares it or writes there, the
    pipeline refuses it with a clear error, and demo data is never read under its name."""
    empty = tmp_path / "tfds"
    empty.mkdir()
    data = ml_collections.ConfigDict(dict(dataset="imagenet2012", data_dir=str(empty),
                                          embedded=False))
    assert data_lib.resolve_data_dir(data) == str(empty)
    with pytest.raises(FileNotFoundError, match="imagenet2012.*not prepared"):
        TrainPipeline("imagenet2012", data_dir=str(empty), global_batch=2)
    with pytest.raises(FileNotFoundError, match="not prepared"):
        EvalPipeline("imagenet2012", data_dir=str(empty), per_host_batch=2)
    data.embedded = True
    with pytest.raises(ValueError, match="data.dataset=titok_sample_photos"):
        data_lib.resolve_data_dir(data)
    assert os.listdir(empty) == []
    root = os.fspath(photos.data_dir).split(f"/{embedded.DATASET_NAME}/")[0]
    with pytest.raises(FileNotFoundError, match="not prepared"):
        TrainPipeline("imagenet2012", data_dir=root, global_batch=2)
    with pytest.raises(FileNotFoundError, match="data.embedded=True"):
        EvalPipeline(embedded.DATASET_NAME, data_dir=str(empty), per_host_batch=2)


def _torchvision_size(w: int, h: int, size: int = 256) -> tuple[int, int]:
    """torchvision Resize(int): short side -> size, long side floor(size * long / short)."""
    return (size, size * h // w) if w <= h else (size * w // h, size)


def _torchvision_offset(extra: int) -> int:
    """int(round(extra / 2.0)) with Python's round (halves to even), in integers."""
    half, odd = divmod(extra, 2)
    return half + (odd and half % 2)


# Awkward (width, height): truncation vs rounding (300x257: 298.8 -> 298), odd crop margins
# whose half rounds up (511x256: 127.5 -> 128, 259x256: 1.5 -> 2) or down (257x256: 0.5 -> 0).
SHAPES = [(300, 257), (257, 300), (257, 1000), (1000, 257), (511, 256), (256, 511), (259, 256),
          (257, 256), (263, 300), (333, 777), (20, 14), (256, 256), (600, 401)]


def _random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_eval_transform_is_torchvision_resize_and_center_crop():
    for w, h in SHAPES:
        nw, nh = _torchvision_size(w, h)
        left, top = _torchvision_offset(nw - 256), _torchvision_offset(nh - 256)
        assert images.resized_size(w, h, 256) == (nw, nh), (w, h)
        assert images.center_crop_offsets(nw, nh, 256) == (left, top), (w, h)
        img = _random_image(w, h)
        expected = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC), np.float32)
        expected = expected[top:top + 256, left:left + 256] / 255.0
        np.testing.assert_array_equal(data_lib.eval_transform(img, 256, None), expected)
    # The shapes tell truncation from rounding, and round() from floor division.
    longs = [max(_torchvision_size(w, h)) for w, h in SHAPES]
    assert any(round(256 * max(s) / min(s)) != n for s, n in zip(SHAPES, longs))
    assert any(_torchvision_offset(n - 256) != (n - 256) // 2 for n in longs)


def test_train_transform_is_a_torchvision_random_crop_and_flip():
    """Every output is exactly a 256-window of the torchvision-sized bicubic resize, flipped or
    not; over seeds both flips and several offsets show up."""
    for w, h in [(300, 257), (257, 300), (511, 256)]:
        img = _random_image(w, h, seed=1)
        nw, nh = _torchvision_size(w, h)
        resized = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC), np.float32) / 255.0
        seen = set()
        for seed in range(12):
            out = data_lib.train_transform(img, 256, np.random.default_rng(seed))
            matches = {(top, left, flip) for top in range(nh - 255) for left in range(nw - 255)
                       for flip in (False, True)
                       if np.array_equal(out[:, ::-1] if flip else out,
                                         resized[top:top + 256, left:left + 256])}
            assert len(matches) == 1, (w, h, seed)
            seen |= matches
        assert {f for _, _, f in seen} == {False, True}
        assert len({(t, sl) for t, sl, _ in seen}) > 3


def _exif_rotated_jpeg(path) -> bytes:
    """A 40x20 JPEG whose EXIF says "rotate 90 degrees to display"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    _random_image(40, 20).save(buf, format="JPEG", exif=exif)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_dataset_decoding_ignores_exif_and_user_files_apply_it(tmp_path):
    data = _exif_rotated_jpeg(tmp_path / "phone.jpg")
    assert decode_rgb(data)[0].size == (40, 20)
    assert images.load_image(str(tmp_path / "phone.jpg")).size == (20, 40)
    assert images.load_image(tmp_path / "phone.jpg", exif_transpose=False).size == (40, 20)


def test_train_batches_are_deterministic_and_resume_exactly(photos):
    with _train(photos) as a, _train(photos) as b:
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
    with _train(photos, seed=4) as c:
        assert not np.array_equal(c.batch(5)["image"], x["image"])


def test_two_hosts_split_each_global_batch(photos):
    """Host h decodes slots [h*b, (h+1)*b) of the global batch: two hosts together produce
    exactly the global batches of one host, whatever the process count."""
    with _train(photos, global_batch=4) as one:
        single = [one.batch(step) for step in (0, 1, 9)]
    hosts = [_train(photos, global_batch=4, process_index=i, process_count=2)
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
        _train(photos, global_batch=3, process_index=0, process_count=2)


def test_bad_examples_are_skipped_converted_and_counted(photos, caplog):
    """One batch covering a whole epoch decodes every example, the bad ones included."""
    n = photos.info.splits["train"].num_examples
    with caplog.at_level(logging.WARNING, logger="titok_jax.data.pipeline"):
        with _train(photos, global_batch=n) as pipe:
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


def test_grain_workers_make_the_threaded_batches(photos):
    """data.workers > 0: Grain worker processes make exactly the threaded pipeline's batches
    (bad examples replaced the same way, their counters summed back), resuming at any step."""
    n = photos.info.splits["train"].num_examples
    steps = -(-n // 16) + 1  # past the end of the first epoch
    with _train(photos, global_batch=16, image_size=64) as threads, \
            _train(photos, global_batch=16, image_size=64, workers=2) as workers:
        expected = dict(threads.iterate(0, steps))
        got = dict(workers.iterate(0, steps))
        assert sorted(got) == list(range(steps))
        for step, batch in expected.items():
            assert got[step]["image"].dtype == np.float32 and got[step]["label"].dtype == np.int32
            np.testing.assert_array_equal(got[step]["image"], batch["image"])
            np.testing.assert_array_equal(got[step]["label"], batch["label"])
        assert workers.stats == threads.stats and workers.stats["skipped_corrupt"] >= 2
        [(step, batch)] = list(workers.iterate(steps - 1, steps))
        assert step == steps - 1
        np.testing.assert_array_equal(batch["image"], expected[step]["image"])
    with pytest.raises(ValueError, match="workers must be >= 0"):
        _train(photos, workers=-1)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def _eval(photos, **kwargs) -> EvalPipeline:
    return EvalPipeline(photos, per_host_batch=B, num_threads=2, **kwargs)


def test_eval_is_padded_and_covers_every_example_once(photos):
    with _eval(photos, process_index=0, process_count=1) as single:
        reference = sorted(_digest(img) for batch in single
                           for img, m in zip(batch["image"], batch["mask"]) if m)
    n = 3 * len(embedded.class_names())
    assert len(reference) == n == len(set(reference))
    seen, lengths = [], []
    for host in range(2):
        with _eval(photos, process_index=host, process_count=2) as pipe:
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
    with _eval(photos, process_index=n + 1, process_count=n + 2) as empty:
        batches = list(empty)
    assert len(batches) == 1 and not batches[0]["mask"].any()


def test_to_global_assembles_a_sharded_batch(photos):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    b = len(jax.devices())
    with _train(photos, global_batch=b) as pipe:
        batch = pipe.batch(0)
    arrays = to_global(batch, NamedSharding(mesh, P("data")))
    assert arrays["image"].shape == (b, 256, 256, 3)
    assert len(arrays["image"].addressable_shards) == b
    np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])


def test_image_files_and_pngs_go_through_epath(gcs_emulator):
    """PNG outputs, folder listings and image loading on gs:// (the emulator on loopback)."""
    from etils import epath

    from titok_jax.data.folders import list_images
    root = gcs_emulator.new_dir()
    images.save_png(np.linspace(0, 1, 8 * 6 * 3).reshape(8, 6, 3), f"{root}/recon/a.png")
    assert [o.rsplit("/", 2)[1:] for o in gcs_emulator.objects(root)] == [["recon", "a.png"]]
    with epath.Path(f"{root}/b.jpg").open("wb") as f:
        _random_image(9, 7).save(f, format="JPEG")
    epath.Path(f"{root}/notes.txt").write_text("not an image")
    expected = [f"{root}/b.jpg", f"{root}/recon/a.png"]
    assert list_images(root) == expected
    assert list_images(f"{root}/*/*.png") == expected[1:]
    assert list_images(f"{root}/b.jpg") == expected[:1]
    assert images.load_image(expected[1]).size == (6, 8)
    with pytest.raises(BadImageError, match="notes.txt"):
        images.load_image(f"{root}/notes.txt")


def test_data_dir_with_an_unreadable_scheme_fails_early():
    for cls, kwargs in ((TrainPipeline, dict(global_batch=2)),
                        (EvalPipeline, dict(per_host_batch=2))):
        with pytest.raises(ValueError, match="s3://.*local disk"):
            cls("imagenet2012", data_dir="s3://bucket/tensorflow_datasets", **kwargs)


class _GcsObjects(http.server.BaseHTTPRequestHandler):
    """The media downloads (with byte ranges) of the GCS JSON API, from a local folder."""
    root = ""

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", url.path)
        path = match and os.path.join(self.root, match[1], urllib.parse.unquote(match[2]))
        if not path or "alt=media" not in url.query or not os.path.isfile(path):
            self.send_response(404)
            self.end_headers()
            return
        with open(path, "rb") as f:
            data = f.read()
        start, end = 0, len(data) - 1
        if rng := self.headers.get("range"):
            first, last = rng.removeprefix("bytes=").split("-")
            start = len(data) - int(last) if not first else int(first)
            end = int(last) if first and last else end
            start, end = max(start, 0), min(end, len(data) - 1)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        self.wfile.write(data[start:end + 1])


def test_array_record_reads_gs_paths(photos, tmp_path, monkeypatch):
    """Why gs:// data dirs are allowed: array_record's reader (0.8.6) opens gs:// through its own
    GCS client; here against a local GCS endpoint serving the prepared train shard."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    shard = next(f for f in os.listdir(photos.data_dir) if "-train.array_record" in f)
    os.makedirs(tmp_path / "bucket")
    os.symlink(os.path.join(photos.data_dir, shard), tmp_path / "bucket" / shard)
    handler = type("Handler", (_GcsObjects,), {"root": str(tmp_path)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT",
                           f"http://127.0.0.1:{server.server_port}")
        remote = ArrayRecordDataSource([f"gs://bucket/{shard}"])
        local = ArrayRecordDataSource([os.path.join(photos.data_dir, shard)])
        indices = [0, len(local) - 1, 7, 3]
        assert len(remote) == len(local) == photos.info.splits["train"].num_examples
        assert remote.__getitems__(indices) == local.__getitems__(indices)
    finally:
        server.shutdown()
        thread.join()
