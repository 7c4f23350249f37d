"""Variable-length TiTok: decoding the first k tokens (the tail removed by attention masking),
tail-drop training (k drawn from the step key) and the quality-vs-tokens evaluation."""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from titok_jax.convert import native
from titok_jax.data import pipeline as data_lib
from titok_jax.inference import tokenizer as api
from titok_jax.infra import sharding
from titok_jax.models import variants
from titok_jax.train import loop
from titok_jax.train.tasks.titok import tail_drop_choices, tail_drop_lengths

from helpers import CONFIGS, embedded_data_flags, runlocal

SIZE = 64  # tiny-vq / tiny-vae: 64x64 images, an 8x8 grid, 32 latent tokens


def _tokenizer(variant: str, seed: int = 0) -> api.Tokenizer:
    cfg = variants.titok_model_config(variant)
    module = variants.build_model(cfg)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed),
                                  jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    return api.Tokenizer(cfg, params)


@pytest.fixture(scope="module")
def vq():
    return _tokenizer("tiny-vq")


@pytest.fixture(scope="module")
def images():
    return np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3)))


def test_full_length_is_unchanged_and_masking_equals_removal(vq, images):
    """k = N: the API decodes exactly as before (no mask); with every key kept the masked path
    gives the same numbers. k < N: masking the tail equals decoding a sequence that ends after
    the k-th latent (the tokens removed), per example, with different k in one batch."""
    m, v = vq.module, {"params": vq.params}
    decode = jax.jit(functools.partial(m.apply, method=m.decode_tokens))
    ids = vq.encode(images)
    unmasked = decode(v, ids)
    np.testing.assert_array_equal(vq.decode_raw(ids), unmasked)
    np.testing.assert_array_equal(decode(v, ids, jnp.full((2,), vq.num_tokens)), unmasked)

    ks = jnp.array([3, 20])
    masked = decode(v, ids, ks)
    for b, k in enumerate(map(int, ks)):
        removed = decode(v, ids[b:b + 1, :k])  # a sequence of literally grid + 1 + k tokens
        np.testing.assert_allclose(masked[b], removed[0], atol=2e-5)
        np.testing.assert_allclose(vq.decode_raw(ids[b:b + 1, :k]), removed, atol=2e-5)
    assert float(jnp.abs(masked[0] - unmasked[0]).max()) > 1e-3  # the tail did matter


def test_decode_tokens_takes_1_to_n_tokens(vq, images):
    ids = np.asarray(vq.encode(images))
    assert vq.decode_tokens(ids[:, :1]).shape == (2, SIZE, SIZE, 3)
    for bad in (ids[:, :0], np.concatenate([ids, ids[:, :1]], axis=1)):
        with pytest.raises(ValueError, match=r"token ids \[B, 32\] \(or the first k <= 32"):
            vq.decode_tokens(bad)
    vae = _tokenizer("tiny-vae")
    lat = np.asarray(vae.encode(images))
    np.testing.assert_allclose(vae.decode_raw(lat[:, :5]),
                               vae.module.apply({"params": vae.params}, jnp.asarray(lat[:, :5]),
                                                method=vae.module.decode), atol=2e-5)
    with pytest.raises(ValueError, match=r"VAE latents \[B, 32, 12\]"):
        vae.decode_tokens(lat[:, :0])


def _config(**td):
    cfg = ml_collections.ConfigDict({"model": {"num_latent_tokens": 32},
                                     "tail_drop": {"enabled": True, "min_tokens": 1,
                                                   "distribution": "uniform", **td}})
    return cfg


def test_kept_lengths_come_from_the_step_key():
    key = jax.random.PRNGKey(3)
    k = np.asarray(tail_drop_lengths(_config(min_tokens=4), key, 4096))
    np.testing.assert_array_equal(k, tail_drop_lengths(_config(min_tokens=4), key, 4096))
    assert k.dtype == np.int32 and k.min() == 4 and k.max() == 32
    assert abs(k.mean() - 18.0) < 0.5  # uniform over 4..32
    other = np.asarray(tail_drop_lengths(_config(min_tokens=4), jax.random.PRNGKey(4), 4096))
    assert (other != k).any()
    np.testing.assert_array_equal(tail_drop_choices(_config(distribution="pow2", min_tokens=3)),
                                  [4, 8, 16, 32])
    assert set(np.asarray(tail_drop_lengths(_config(distribution="pow2"), key, 512))) == {
        1, 2, 4, 8, 16, 32}
    assert tail_drop_lengths(_config(enabled=False), key, 4) is None
    for bad, match in (({"min_tokens": 0}, "min_tokens"), ({"min_tokens": 33}, "min_tokens"),
                       ({"distribution": "zipf"}, "distribution")):
        with pytest.raises(ValueError, match=match):
            tail_drop_choices(_config(**bad))


@pytest.mark.parametrize("arg", ["titok.py:runlocal,tail_drop",
                                 "titok.py:runlocal,tail_drop,objective=gan"])
def test_training_step_with_tail_drop(data_dir, arg):
    """One step of the pixel task and of the single-stage GAN task (its generator step): finite
    loss, and the logged mean kept length is that of the lengths drawn from the step's key."""
    config = runlocal(data_dir, "global_batch=2", "tail_drop.min_tokens=2", arg=arg)
    assert config.tail_drop.enabled
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    state = t.init_state(jax.random.PRNGKey(0))
    pipe = loop.input_pipeline("images", config, data_dir)
    batch = data_lib.to_global(pipe.batch(0), t.batch_sharding)
    pipe.close()
    _, metrics = t.step(state, batch, 0)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    want = tail_drop_lengths(config, key, 2)
    assert float(metrics["tail_drop_tokens"]) == pytest.approx(float(jnp.mean(want)))
    assert 2 <= int(want.min()) and int(want.max()) <= 32


def test_cli_tokens_and_eval_token_counts(vq, data_dir, tmp_path):
    """``tokenize``/``reconstruct --tokens k`` on a TiTok; ``eval --token-counts`` writes the
    per-count JSON and the plot, and a second result file overlays."""
    from titok_jax.cli.main import main
    from titok_jax.evals import curves
    folder = str(tmp_path / "tok")
    native.save_native(folder, vq.config, jax.device_get(vq.params))
    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(tmp_path / "img" /
                                                                           f"{i}.png")
    out = tmp_path / "ids.npz"
    assert main(["tokenize", "--weights", folder, "--images", str(tmp_path / "img"),
                 "--out", str(out), "--tokens", "8"]) == 0
    assert np.load(out)["ids"].shape == (2, 8)
    assert main(["reconstruct", "--weights", folder, "--images", str(tmp_path / "img"),
                 "--out", str(tmp_path / "rec"), "--tokens", "8"]) == 0
    assert main(["tokenize", "--weights", folder, "--images", str(tmp_path / "img"),
                 "--out", str(out), "--tokens", "33"]) == 2

    res = tmp_path / "curve.json"
    assert main(["eval", "--config", f"{CONFIGS}/titok.py:runlocal,variant=tiny-vq",
                 "--checkpoint", folder, "--evals", "psnr", "--split", "validation[:8]",
                 "--token-counts", "4,32", "--out", str(res), *embedded_data_flags(data_dir),
                 "--config.eval.batch_size=8"]) == 0
    doc = json.loads(res.read_text())
    assert sorted(doc["results"], key=int) == ["4", "32"]
    assert doc["results"]["4"]["num_images"] == 8
    assert all(np.isfinite(r["psnr"]) for r in doc["results"].values())
    assert doc["results"]["4"]["psnr"] != doc["results"]["32"]["psnr"]
    assert (tmp_path / "curve.png").stat().st_size > 0
    paths = curves.write({"results": {"8": {"psnr": 20.0}}},
                         tmp_path / "other" / "export" / "c.json",
                         {"checkpoint": str(tmp_path / "other" / "export")}, compare=[res])
    assert paths[1].endswith("c.png")
    with pytest.raises(ValueError, match="token counts must lie in"):
        curves.check_counts(vq.config, [0, 8])
