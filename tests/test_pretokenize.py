"""Pre-tokenized generator data: the official views (ADM centre crop + flip, TenCrop), records
equal to ``Tokenizer.encode`` of the views whatever the batch size or device count, resume after
a kill, tokenizer identity, the (seed, step) token pipeline, missing/unfinished dirs, gs://, and
the ``pretokenize`` command."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from titok_jax.cli import pretokenize
from titok_jax.data import tokens
from titok_jax.data.embedded import DATASET_NAME
from titok_jax.data.pipeline import EpochShuffle, decode_rgb
from titok_jax.data.tokens import TokenDataset, TokenTrainPipeline, tokenizer_fingerprint
from titok_jax.inference import tokenizer as api
from titok_jax.jobs import pretokenize as pretokenize_job
from titok_jax.models import variants

center_crop_arr, ten_crop, views = tokens.center_crop_arr, tokens.ten_crop, tokens.views

SPLIT = "validation[:24]"
SHARD = 10  # 3 shards: 10, 10, 4 images


def _tiny_tokenizer(seed: int) -> api.Tokenizer:
    cfg = variants.titok_model_config("tiny-pixel")
    cfg.image_size, cfg.patch_size = 64, 8
    params = variants.build_model(cfg).init(jax.random.PRNGKey(seed),
                                            np.zeros((1, 64, 64, 3), np.float32))["params"]
    # At init scale the ids hardly depend on the image; x4 makes most ids differ between an
    # image and its flip, so the checks below can tell views apart.
    return api.Tokenizer(cfg, jax.tree_util.tree_map(lambda x: x * 4, params))


@pytest.fixture(scope="module")
def tok() -> api.Tokenizer:
    return _tiny_tokenizer(0)


def _run(tok, data_dir, out, **kwargs):
    kwargs = {"split": SPLIT, "batch_size": 4, "shard_size": SHARD, "weights": "tiny.safetensors",
              **kwargs}
    split = kwargs.pop("split")
    return pretokenize_job.pretokenize(tok, DATASET_NAME, data_dir, split, out, **kwargs)


@pytest.fixture(scope="module")
def reference(tok, data_dir, tmp_path_factory) -> str:
    """The split written with batches of 4 images on all 8 devices."""
    return _run(tok, data_dir, str(tmp_path_factory.mktemp("tokens") / "ref"))


def _all(path) -> tuple[np.ndarray, np.ndarray]:
    ds = TokenDataset(path)
    return ds.__getitems__(range(len(ds)))


def _raw(path) -> list[bytes]:
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    meta = TokenDataset(path).meta
    source = ArrayRecordDataSource([os.path.join(path, s["file"]) for s in meta["shards"]])
    return source.__getitems__(list(range(len(source))))


def _adm(img: Image.Image, size: int) -> np.ndarray:
    """ADM's rule, stated step by step."""
    while img.width >= 2 * size and img.height >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.width, img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)),
                     Image.Resampling.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def test_center_crop_arr_is_adm(tmp_path):
    rng = np.random.default_rng(0)
    for w, h in [(40, 30), (64, 64), (64, 99), (131, 97), (128, 128), (300, 517), (1000, 260)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        crop = center_crop_arr(img, 64)
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, _adm(img, 64), err_msg=f"{w}x{h}")
    # Offsets floor: a 64x99 image keeps rows 17..80 (torchvision's CenterCrop would take 18).
    arr = rng.integers(0, 256, (99, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 64), arr[17:81])
    # Exactly 2x: one box halving (2x2 means), then no resize.
    arr = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    halved = arr.reshape(64, 2, 64, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(center_crop_arr(Image.fromarray(arr), 64) - halved).max() <= 1


def test_ten_crop_is_torchvision_order():
    arr = np.arange(7 * 9 * 2).reshape(7, 9, 2)
    crops = ten_crop(arr, 4)
    flipped = arr[:, ::-1]
    # tl, tr, bl, br, centre at int(round((side - 4) / 2)): round(1.5) = 2, round(2.5) = 2.
    expected = [a[y:y + 4, x:x + 4] for a in (arr, flipped)
                for y, x in ((0, 0), (0, 5), (3, 0), (3, 5), (2, 2))]
    np.testing.assert_array_equal(crops, np.stack(expected))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), np.uint8))
    np.testing.assert_array_equal(views(img, 64, "ten_crop"),
                                  ten_crop(center_crop_arr(img, 70), 64))
    v = views(img, 64)
    np.testing.assert_array_equal(v, np.stack([center_crop_arr(img, 64),
                                               center_crop_arr(img, 64)[:, ::-1]]))


def _expected(tok, data_dir, split, mode="flip"):
    """(ids, labels, header) of every view, computed without pretokenize."""
    source = tfds.builder(DATASET_NAME, data_dir=data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    stacks, labels, header = [], [], []
    for e, r in enumerate(source):
        stack = views(decode_rgb(r["image"])[0], tok.image_size, mode)
        stacks.append(stack)
        labels += [int(r["label"])] * len(stack)
        header += [(int(r["label"]), e, v) for v in range(len(stack))]
    ids = tok.encode(np.concatenate(stacks).astype(np.float32) / 255)
    return np.asarray(ids), np.asarray(labels), np.asarray(header)


def test_records_are_encode_of_the_views(tok, data_dir, reference):
    ids, labels, header = _expected(tok, data_dir, SPLIT)
    got_ids, got_labels = _all(reference)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_labels, labels)
    rows = np.stack([np.frombuffer(r, "<i4") for r in _raw(reference)])
    np.testing.assert_array_equal(rows[:, :3], header)
    assert (ids[0::2] != ids[1::2]).mean() > 0.3  # the flip view is its own entry
    meta = TokenDataset(reference).meta
    assert meta["completed"] and meta["num_records"] == 48 and meta["views_per_image"] == 2
    assert [s["examples"] for s in meta["shards"]] == [[0, 10], [10, 20], [20, 24]]
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok.config, tok.params)
    assert meta["source"]["dataset"].startswith(DATASET_NAME) and meta["num_skipped"] == 0


def test_ten_crop_batch_size_and_devices_do_not_change_ids(tok, data_dir, reference, tmp_path):
    one = _run(tok, data_dir, str(tmp_path / "one"), batch_size=7, devices=jax.devices()[:1])
    assert _raw(one) == _raw(reference)
    ten = _run(tok, data_dir, str(tmp_path / "ten"), split="validation[:3]", mode="ten_crop",
               batch_size=2)
    ids, labels, _ = _expected(tok, data_dir, "validation[:3]", "ten_crop")
    got_ids, got_labels = _all(ten)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_labels, labels)


def test_undecodable_images_are_skipped_logged_and_counted(tok, tmp_path, caplog):
    from titok_jax.data import embedded
    settings = dict(crops_per_photo=1, val_per_photo=1, bad_examples=True)
    builder = embedded.builder(embedded.prepare_embedded(str(tmp_path / "tfds"), **settings),
                               **settings)
    names = [r["file_name"].decode() for r in builder.as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})]
    bad = [i for i, n in enumerate(names) if n.endswith(("_bad_truncated.JPEG",
                                                          "_bad_garbage.JPEG"))]
    assert len(bad) == 2
    with caplog.at_level("WARNING", logger="titok_jax.data.tokens"):
        out = pretokenize_job.pretokenize(tok, builder, None, "train", str(tmp_path / "out"),
                                 batch_size=4, shard_size=5)
    meta = TokenDataset(out).meta
    assert meta["num_skipped"] == 2 and meta["num_records"] == 2 * (len(names) - 2)
    assert meta["skipped"] == [{"example": i, "file_name": names[i]} for i in bad]
    assert sum(len(s["skipped"]) for s in meta["shards"]) == 2
    rows = np.stack([np.frombuffer(r, "<i4") for r in _raw(out)])
    assert rows[0::2, 1].tolist() == [i for i in range(len(names)) if i not in bad]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(names[i] in warned for i in bad)


def test_two_hosts_write_the_same_shards(tok, data_dir, reference, tmp_path):
    out = str(tmp_path / "hosts")
    _run(tok, data_dir, out, process_index=1, process_count=2)
    assert sorted(f for f in os.listdir(out) if f.endswith(".array_record")) == [
        "shard-00001-of-00003.array_record"]
    _run(tok, data_dir, out, process_index=0, process_count=2)
    assert _raw(out) == _raw(reference)


def test_resume_after_a_kill(tok, data_dir, reference, tmp_path, monkeypatch):
    out = str(tmp_path / "killed")
    write = pretokenize_job._write_shard
    calls = []

    def killed_after_one(out_path, name, *args):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(name)
        write(out_path, name, *args)
    monkeypatch.setattr(pretokenize_job, "_write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        _run(tok, data_dir, out)
    with pytest.raises(ValueError, match="unfinished.*same arguments"):
        TokenDataset(out)
    first = os.path.join(out, "shard-00000-of-00003.array_record")
    mtime = os.stat(first).st_mtime_ns

    def counted(out_path, name, *args):
        calls.append(name)
        write(out_path, name, *args)
    calls.clear()
    monkeypatch.setattr(pretokenize_job, "_write_shard", counted)
    _run(tok, data_dir, out, batch_size=3)
    assert calls == ["shard-00001-of-00003", "shard-00002-of-00003"]
    assert os.stat(first).st_mtime_ns == mtime
    assert _raw(out) == _raw(reference)
    calls.clear()
    _run(tok, data_dir, out)  # finished: nothing is redone
    assert calls == []


def test_another_tokenizer_or_mode_is_refused_before_any_work(tok, data_dir, reference,
                                                              monkeypatch):
    monkeypatch.setattr(pretokenize_job, "_write_shard", None)  # any shard write would fail
    before = {f: os.stat(os.path.join(reference, f)).st_mtime_ns for f in os.listdir(reference)}
    other = _tiny_tokenizer(1)
    with pytest.raises(ValueError, match="another pre-tokenized dataset.*\n.*tokenizer."
                                         "fingerprint.*tiny.safetensors"):
        _run(other, data_dir, reference)
    with pytest.raises(ValueError, match=r"mode: stored 'flip', this run 'ten_crop'"):
        _run(tok, data_dir, reference, mode="ten_crop")
    with pytest.raises(ValueError, match=r"source.split"):
        _run(tok, data_dir, reference, split="validation[:12]")
    assert before == {f: os.stat(os.path.join(reference, f)).st_mtime_ns
                      for f in os.listdir(reference)}
    ds = TokenDataset(reference)
    ds.check_tokenizer(tokenizer_fingerprint(tok.config, tok.params), "the generator's")
    theirs = tokenizer_fingerprint(other.config, other.params)
    with pytest.raises(ValueError, match=f"tiny.safetensors.*the generator's has {theirs}"):
        ds.check_tokenizer(theirs, "the generator's")


def test_token_pipeline_is_a_function_of_seed_and_step(reference):
    ds = TokenDataset(reference)
    ids, labels = _all(reference)
    pipe = TokenTrainPipeline(reference, global_batch=8, seed=3, process_index=0,
                              process_count=1)
    assert pipe.steps_per_epoch == 6
    order = EpochShuffle(len(ds), 3)
    for step in (0, 5, 13):  # 13 is in the third epoch
        batch = pipe.batch(step)
        index = [order(step * 8 + g) for g in range(8)]
        np.testing.assert_array_equal(batch["tokens"], ids[index])
        np.testing.assert_array_equal(batch["label"], labels[index])
        assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (8, 32)
        again = TokenTrainPipeline(ds, global_batch=8, seed=3, process_index=0,
                                   process_count=1).batch(step)
        np.testing.assert_array_equal(again["tokens"], batch["tokens"])
        halves = [TokenTrainPipeline(ds, global_batch=8, seed=3, process_index=h,
                                     process_count=2).batch(step) for h in (0, 1)]
        for key in ("tokens", "label"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])
    resumed = dict(pipe.iterate(4, 7))
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_array_equal(resumed[5]["tokens"], pipe.batch(5)["tokens"])
    with TokenTrainPipeline(ds, global_batch=8, seed=4, process_index=0,
                            process_count=1) as other:
        assert not np.array_equal(other.batch(0)["tokens"], pipe.batch(0)["tokens"])
    np.testing.assert_array_equal(pipe.batch(13)["tokens"], batch["tokens"])  # reopens
    assert pipe.stats == {}


def test_missing_and_unfinished_dirs(reference, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nowhere: no tokens.json"):
        TokenDataset(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads(open(os.path.join(reference, "tokens.json")).read())
    (broken / "tokens.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="shard files missing.*shard-00000-of-00003"):
        TokenDataset(str(broken))
    (broken / "tokens.json").write_text(json.dumps({**meta, "completed": False}))
    with pytest.raises(ValueError, match=f"{broken} is unfinished"):
        TokenDataset(str(broken))


def test_gcs_round_trip(tok, data_dir, reference, gcs_emulator):
    out = gcs_emulator.new_dir()
    _run(tok, data_dir, out, split="validation[:10]")
    names = sorted(o.rsplit("/", 1)[1] for o in gcs_emulator.objects(out))
    assert names == ["shard-00000-of-00001.array_record", "shard-00000-of-00001.json",
                     "tokens.json"]
    ids, labels = _all(out)
    ref_ids, ref_labels = TokenDataset(reference).__getitems__(range(20))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(labels, ref_labels)


def test_command(tok, data_dir, tmp_path, capsys):
    folder = str(tmp_path / "tok")
    tok.save(folder)
    out = str(tmp_path / "cmd")
    args = ["--weights", folder, "--embedded", "--data-dir", data_dir, "--split",
            "validation[:4]", "--out", out, "--batch-size", "4", "--ten-crop"]
    assert pretokenize.main(args) == 0
    assert f"wrote 40 entries (10 views of 4 images, 0 undecodable skipped) of 32 tokens to " \
           f"{out}" in capsys.readouterr().out
    ds = TokenDataset(out)
    assert ds.meta["mode"] == "ten_crop" and ds.meta["tokenizer"]["weights"] == folder
    ds.check_tokenizer(tokenizer_fingerprint(tok.config, tok.params), "the tokenizer")
    for model, message in (("alit_small", "ALIT tokenizer"), ("titok_ll32_vae", "VAE")):
        assert pretokenize.main(["--model", model, "--weights", "missing.bin", "--out",
                                 out]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(tok, data_dir, reference, tmp_path):
    """Two JAX processes (``--coordinator``), 2 CPU devices each, write the reference's records
    (3 s with a warm compile cache, ~20 s cold, on 2 cores)."""
    import subprocess
    import sys

    from helpers import free_port
    folder, out = str(tmp_path / "tok"), str(tmp_path / "multi")
    tok.save(folder)
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    cmd = [sys.executable, "-m", "titok_jax.cli.pretokenize", "--weights", folder, "--dataset",
           DATASET_NAME, "--data-dir", data_dir, "--split", SPLIT, "--out", out,
           "--batch-size", "3", "--shard-size", str(SHARD), "--coordinator",
           f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    procs = [subprocess.Popen(cmd + [str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "wrote 48 entries" in outs[0]
    assert _raw(out) == _raw(reference)
