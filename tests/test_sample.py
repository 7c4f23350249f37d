"""``titok-jax sample`` (titok_jax.cli.sample, titok_jax.jobs.generate) on a tiny random generator
and tokenizer saved as titok-jax folders: the ADM ``.npz`` layout and labels, images equal to
``Generator.sample`` + ``decode_tokens`` + the official truncating uint8 cast, the same samples on
1 device as on 8 and on 2 hosts (simulated, and 2 real processes) as on 1, resume after an
interruption, refusal of a changed rerun and of bad input before any sampling, gs:// output."""
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax.cli import sample as sample_cli
from titok_jax.evals import fid as fid_lib
from titok_jax.inference.tokenizer import Tokenizer
from titok_jax.jobs import generate as synthesis
from titok_jax.models import variants

from helpers import free_port

SEED, NUM_SAMPLES, NUM_CLASSES, BATCH = 3, 20, 7, 8  # 3 chunks, the last one cut to 4 samples


def _tokenizer_config(variant: str = "tiny-pixel"):
    cfg = variants.titok_model_config(variant)
    cfg.image_size, cfg.patch_size = 64, 8
    return cfg


def _zero_tokenizer(cfg) -> Tokenizer:
    """A tokenizer with zero parameters (for checks that never run it: no init to compile)."""
    module = variants.build_model(cfg)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3),
                                                 np.float32))["params"]
    return Tokenizer(cfg, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def _generator_config(tok_cfg, **overrides):
    return variants.generator_model_config(
        "titok_l32", arch="bert", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        **{"codebook_size": tok_cfg.codebook_size, "num_tokens": tok_cfg.num_latent_tokens,
           **overrides})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(generator, tokenizer, generator folder, tokenizer folder), random."""
    root = tmp_path_factory.mktemp("models")
    cfg = _tokenizer_config()
    module = variants.build_model(cfg)
    params = jax.jit(module.init)(jax.random.PRNGKey(1), np.zeros((1, 64, 64, 3), np.float32))
    tok = Tokenizer(cfg, params["params"])
    tok.save(root / "tok")
    gen = titok_jax.load_generator(_generator_config(cfg), None)
    gen.save(root / "gen")
    return gen, tok, str(root / "gen"), str(root / "tok")


def _cli_args(models, out, *extra):
    _, _, gen_dir, tok_dir = models
    return ["--generator-weights", gen_dir, "--tokenizer-weights", tok_dir,
            "--num-samples", str(NUM_SAMPLES), "--num-classes", str(NUM_CLASSES),
            "--batch-size", str(BATCH), "--seed", str(SEED), "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory):
    """The CLI's samples on the 8 local devices: (the .npz path, its arrays)."""
    root = tmp_path_factory.mktemp("baseline")
    out = root / "samples.npz"
    assert sample_cli.main(_cli_args(models, out, "--grid", str(root / "grid.png"))) == 0
    with np.load(out) as npz:
        return out, {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def one_device(models):
    gen, tok, _, _ = models
    return synthesis.Sampler(gen, tok, devices=jax.local_devices()[:1])


def _write(sampler, out, **kw):
    kw = {**dict(num_samples=NUM_SAMPLES, chunk_size=BATCH, seed=SEED, num_classes=NUM_CLASSES,
                 progress=False), **kw}
    return synthesis.write_samples(sampler, out, **kw)


def test_adm_npz_equals_sample_decode_truncated(models, baseline):
    gen, tok, gen_dir, _ = models
    out, arrays = baseline
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (NUM_SAMPLES, 64, 64, 3)
    np.testing.assert_array_equal(arrays["arr_1"], np.arange(NUM_SAMPLES) % NUM_CLASSES)
    for c in range(3):
        labels = np.arange(c * BATCH, (c + 1) * BATCH) % NUM_CLASSES
        ids = gen.sample(labels, rng=jax.random.fold_in(jax.random.PRNGKey(SEED), c))
        x = np.clip(np.asarray(tok.decode_tokens(ids)), 0, 1) * np.float32(255)
        got = arrays["arr_0"][c * BATCH:(c + 1) * BATCH]
        np.testing.assert_array_equal(got, x.astype(np.uint8)[:len(got)], err_msg=f"chunk {c}")
        # The official cast truncates; rounding would give other values here.
        assert (x.astype(np.uint8) != np.round(x)).any()
    assert len({arrays["arr_0"][i].tobytes() for i in range(NUM_SAMPLES)}) == NUM_SAMPLES
    run = json.loads((synthesis.parts_dir(out) / "run.json").read_text())
    assert run["generator"]["weights"] == gen_dir and run["generator"]["name"] is None
    assert run["settings"]["num_sample_steps"] == gen.sampling_defaults.num_sample_steps == 8
    assert sorted(os.listdir(synthesis.parts_dir(out))) == [
        "chunk_000000.npy", "chunk_000001.npy", "chunk_000002.npy", "run.json"]
    assert os.path.getsize(out.parent / "grid.png") > 0


def test_same_samples_on_one_device_and_on_two_hosts(baseline, one_device, tmp_path):
    _, arrays = baseline
    # Host 0 draws chunks 0 and 2, but cannot assemble before host 1 has drawn chunk 1.
    with pytest.raises(ValueError, match=r"chunks \[1\] of 3 are not in"):
        _write(one_device, tmp_path / "s.npz", process_index=0, process_count=2)
    summary = _write(one_device, tmp_path / "s.npz", process_index=1, process_count=2)
    assert summary["chunks_drawn"] == 1 and not summary["assembled"]
    summary = _write(one_device, tmp_path / "s.npz", process_index=0, process_count=2)
    assert summary["chunks_drawn"] == 0 and summary["assembled"]
    with np.load(tmp_path / "s.npz") as npz:
        for key, value in arrays.items():
            np.testing.assert_array_equal(npz[key], value, err_msg=key)


def test_two_processes_match_one(models, baseline, tmp_path):
    """Two real JAX processes (4 CPU devices each, gloo collectives for the barriers)."""
    _, arrays = baseline
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "titok_jax.cli.sample", *_cli_args(models, tmp_path / "s.npz"),
         "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    with np.load(tmp_path / "s.npz") as npz:
        for key, value in arrays.items():
            np.testing.assert_array_equal(npz[key], value, err_msg=key)


def test_resume_after_interruption(baseline, one_device, tmp_path, monkeypatch):
    _, arrays = baseline
    calls, original = [], synthesis.Sampler.__call__

    def interrupted(self, labels, key):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, labels, key)
    monkeypatch.setattr(synthesis.Sampler, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(one_device, tmp_path / "s.npz")
    parts = synthesis.parts_dir(tmp_path / "s.npz")
    assert sorted(os.listdir(parts)) == ["chunk_000000.npy", "run.json"]
    assert not (tmp_path / "s.npz").exists()

    calls.clear()
    monkeypatch.setattr(synthesis.Sampler, "__call__",
                        lambda self, *a: calls.append(1) or original(self, *a))
    assert _write(one_device, tmp_path / "s.npz")["chunks_drawn"] == 2 and len(calls) == 2
    with np.load(tmp_path / "s.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], arrays["arr_0"])
    # A finished run: nothing drawn, the .npz checked and kept.
    assert _write(one_device, tmp_path / "s.npz") == dict(
        out=str(tmp_path / "s.npz"), parts=str(parts), num_samples=NUM_SAMPLES, chunks_drawn=0,
        assembled=False)
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["s.npz", "s.npz.parts"]
    os.remove(parts / "chunk_000001.npy")
    with pytest.raises(ValueError, match=r"s.npz exists but \['chunk_000001.npy'\] of its run "
                                         r"are missing"):
        _write(one_device, tmp_path / "s.npz")


def test_changed_rerun_and_foreign_outputs_are_refused(models, baseline, tmp_path, capsys):
    out, _ = baseline
    before = {p: os.path.getmtime(p) for p in [out, *synthesis.parts_dir(out).iterdir()]}
    assert sample_cli.main(_cli_args(models, out, "--seed", "4", "--guidance-scale", "2")) == 2
    err = capsys.readouterr().err
    assert "holds samples of a different run" in err
    assert "seed: 3 -> 4" in err and "settings.guidance_scale: 4.5 -> 2.0" in err
    assert {p: os.path.getmtime(p) for p in before} == before

    (tmp_path / "taken.npz").write_bytes(b"not ours")
    (tmp_path / "busy.npz.parts").mkdir()
    (tmp_path / "busy.npz.parts" / "notes.txt").write_text("not ours")
    for name, message in (("taken.npz", "run.json does not: not overwriting"),
                          ("busy.npz", "holds files but no run.json")):
        assert sample_cli.main(_cli_args(models, tmp_path / name)) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "taken.npz").read_bytes() == b"not ours"
    assert sorted(os.listdir(tmp_path)) == ["busy.npz.parts", "taken.npz"]


def test_bad_input_is_refused_before_sampling(models, tmp_path, capsys, monkeypatch):
    gen, tok, gen_dir, tok_dir = models

    def no_sampling(*a):
        raise AssertionError("sampled")
    monkeypatch.setattr(synthesis.Sampler, "__call__", no_sampling)
    cases = [
        (["--num-classes", "1001"], r"num_classes must lie in \[1, 1000\]"),
        (["--num-classes", "0"], "num_classes must lie"),
        (["--num-sample-steps", "0"], "num_sample_steps must be a positive integer"),
        (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
        (["--batch-size", "12"], r"batch size \(12, global\) must be a multiple of the local "
                                 r"device count \(8\)"),
        (["--num-samples", "0"], "must be positive"),
        (["--out", str(tmp_path / "s.npy")], "must be an .npz"),
        (["--tokenizer-weights", str(tmp_path / "missing")], "--tokenizer is needed"),
    ]
    for extra, message in cases:
        assert sample_cli.main(_cli_args(models, tmp_path / "s.npz", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), (extra, err)
    assert os.listdir(tmp_path) == []

    tok_cfg = tok.config
    for overrides, message in ((dict(codebook_size=tok_cfg.codebook_size * 2),
                                f"codebook size {2 * tok_cfg.codebook_size} vs "
                                f"{tok_cfg.codebook_size}"),
                               (dict(num_tokens=16), "token count 16 vs 32")):
        other = titok_jax.load_generator(_generator_config(tok_cfg, **overrides), None)
        with pytest.raises(ValueError, match="the generator .* and the tokenizer .* do not "
                                             "match: " + message):
            synthesis.Sampler(other, tok)
    with pytest.raises(ValueError, match="is a VAE"):
        synthesis.Sampler(gen, _zero_tokenizer(_tokenizer_config("tiny-vae")))
    stage1 = variants.titok_model_config("tiny", stage=1)
    with pytest.raises(ValueError, match="stage-1 model"):
        synthesis.Sampler(titok_jax.load_generator(_generator_config(stage1), None),
                          _zero_tokenizer(stage1))


def test_samples_feed_the_fid_statistics(baseline):
    """The .npz as `titok-jax fid` reads it: its images, and as an ADM reference batch (a
    stand-in for the Inception: the statistics of 4 pixel values per image)."""
    out, arrays = baseline

    class Runner:
        batch_size = 8

        def __call__(self, batch):
            assert batch.dtype == np.float32 and batch.max() <= 255
            return {"pool": batch.reshape(batch.shape[0], -1)[:, :4].astype(np.float64)}
    # `titok-jax fid samples.npz ...` streams arr_0 from the archive, batch by batch.
    batches = list(fid_lib.npz_image_batches(str(out), 5))
    assert [len(b) for b in batches] == [5] * (NUM_SAMPLES // 5) + (
        [NUM_SAMPLES % 5] if NUM_SAMPLES % 5 else [])
    np.testing.assert_array_equal(np.concatenate(batches), arrays["arr_0"])
    stats = fid_lib.image_statistics(str(out), Runner())
    mu, sigma = fid_lib.load_reference(str(out), Runner())
    np.testing.assert_allclose(mu, arrays["arr_0"].reshape(NUM_SAMPLES, -1)[:, :4].mean(0))
    assert stats.count == NUM_SAMPLES and np.allclose(stats.mu, mu) and np.allclose(stats.sigma,
                                                                                    sigma)


def test_gcs_output(baseline, one_device, gcs_emulator):
    _, arrays = baseline
    out = gcs_emulator.new_dir() + "/s.npz"
    summary = _write(one_device, out, num_samples=BATCH)
    assert summary["assembled"]
    assert sorted(gcs_emulator.objects(out)) == [out[len("gs://titok-test/"):] + suffix for suffix
                                                 in ("", ".parts/chunk_000000.npy",
                                                     ".parts/run.json")]
    with np.load(io.BytesIO(gcs_emulator.read(out))) as npz:
        np.testing.assert_array_equal(npz["arr_0"], arrays["arr_0"][:BATCH])
        np.testing.assert_array_equal(npz["arr_1"], np.arange(BATCH) % NUM_CLASSES)
