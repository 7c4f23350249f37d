"""The MaskGIT generators (ImageBert, UViTBert) against the official code on tiny fixtures:
logits within max(1e-4, 4 x fp64 error), sampled ids identical when the recorded noise of the
official ``generate`` is replayed, weights round-tripped under the official key names."""
import json
import os

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax.convert import official
from titok_jax.convert.layout import CheckpointMismatchError
from titok_jax.models import variants

from helpers import DATA

FIXTURES = {"generator_imagebert_tiny": "bert", "generator_uvit_tiny": "uvit"}


def fixture_generator_config(fx) -> dict:
    b = fx.manifest["build"]
    return dict(name="maskgit", variant=fx.name, arch=FIXTURES[fx.name],
                hidden_size=b["hidden_size"], num_layers=b["num_hidden_layers"],
                num_heads=b["num_attention_heads"], intermediate_size=b["intermediate_size"],
                codebook_size=b["codebook_size"], num_tokens=b["num_latent_tokens"],
                num_classes=b["condition_num_classes"])


@pytest.fixture(scope="module")
def generators(fixture):
    return {name: titok_jax.load_generator(fixture_generator_config(fixture(name)),
                                           fixture(name).weights())
            for name in FIXTURES}


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_parity(generators, fixture, name):
    fx, gen = fixture(name), generators[name]
    for drop, key in ((False, "logits_cond"), (True, "logits_uncond")):
        got = gen.logits(fx["input_ids"], fx["labels"], drop_labels=drop)
        assert got.shape == fx[key].shape
        err = float(np.max(np.abs(np.asarray(got, np.float64) - fx[key])))
        assert err <= fx.tolerance(key), f"{name} {key}: max abs error {err:.3g}"


@pytest.mark.parametrize("name", FIXTURES)
def test_sampling_replays_official_ids(generators, name):
    directory = os.path.join(DATA, name)
    recorded = np.load(os.path.join(directory, "sampling.npz"))
    with open(os.path.join(directory, "replays.json")) as f:
        replays = json.load(f)["sampling.npz"]
    assert set(replays) == {"linear", "constant", "power_cosine"}
    for setting, replay in replays.items():
        ids = generators[name].sample(
            recorded["labels"], uniforms=(recorded[f"{setting}/uniform_ids"],
                                          recorded[f"{setting}/uniform_confidence"]),
            **replay["generate_kwargs"])
        np.testing.assert_array_equal(ids, recorded[f"{setting}/ids"], err_msg=setting)


@pytest.mark.parametrize("name", FIXTURES)
def test_official_weights_round_trip(generators, fixture, name, tmp_path):
    gen, weights = generators[name], official.read_state_dict(fixture(name).weights())
    exported = gen.state_dict()
    assert sorted(exported) == sorted(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # Through the public export, then back in (the folder format too).
    titok_jax.export_pytorch(gen, tmp_path / "gen.safetensors")
    again = titok_jax.load_generator(gen.config, tmp_path / "gen.safetensors")
    gen.save(tmp_path / "native")
    native = titok_jax.load_generator(gen.config, tmp_path / "native")
    for other in (again, native):
        for a, b in zip(jax.tree_util.tree_leaves(gen.params),
                        jax.tree_util.tree_leaves(other.params)):
            np.testing.assert_array_equal(a, b)


def test_import_ignores_position_ids_and_reports_missing(fixture, tmp_path):
    fx = fixture("generator_imagebert_tiny")
    state = official.read_state_dict(fx.weights())
    state["model.embeddings.position_ids"] = np.arange(9)[None]
    official.write_safetensors(state, tmp_path / "old_transformers.safetensors")
    cfg = fixture_generator_config(fx)
    titok_jax.load_generator(cfg, tmp_path / "old_transformers.safetensors")
    del state["model.lm_head.bias"]
    official.write_safetensors(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointMismatchError, match="model.lm_head.bias"):
        titok_jax.load_generator(cfg, tmp_path / "broken.safetensors")


def test_rng_sampling_is_reproducible(generators):
    gen = generators["generator_uvit_tiny"]
    labels = np.array([3, 999])
    a = gen.sample(labels, rng=jax.random.PRNGKey(7), num_sample_steps=4)
    b = gen.sample(labels, rng=jax.random.PRNGKey(7), num_sample_steps=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 8) and a.dtype == np.int32
    assert int(a.min()) >= 0 and int(a.max()) < gen.codebook_size


def test_bad_inputs_raise(generators):
    gen = generators["generator_imagebert_tiny"]
    key, ids = jax.random.PRNGKey(0), np.full((1, 8), 32)
    cases = [
        (lambda: gen.sample([1000], rng=key), r"labels must lie in \[0, 1000\)"),
        (lambda: gen.sample([-1], rng=key), "labels must lie"),
        (lambda: gen.sample([1], rng=key, num_sample_steps=0), "num_sample_steps"),
        (lambda: gen.sample([1], rng=key, num_sample_steps=-2), "num_sample_steps"),
        (lambda: gen.sample([1], rng=key, guidance_decay="cosine"), "guidance_decay"),
        (lambda: gen.sample([1]), "exactly one of rng"),
        (lambda: gen.sample([1], uniforms=(np.zeros((8, 1, 8, 32)), np.zeros((8, 1, 7)))),
         "uniforms must have shapes"),
        (lambda: gen.logits(ids + 1, [1]), r"ids must lie in \[0, 32\]"),
        (lambda: gen.logits(ids - 33, [1]), "ids must lie"),
        (lambda: gen.logits(ids[:, :4], [1]), "ids must be"),
        (lambda: gen.logits(ids, [1.5]), "labels must be integers"),
        (lambda: gen.logits(ids, [1], drop_labels=[True, False]), "drop_labels"),
        (lambda: gen.sample([1], rng=key, guidance_scale="high"), "guidance_scale"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("name, arch, num_params, num_tensors", [
    ("titok_l32", "bert", 177.2e6, 391), ("titok_b64", "bert", 177.2e6, 391),
    ("titok_s128", "uvit", 295.0e6, 257)])
def test_released_generator_shapes(name, arch, num_params, num_tensors):
    """The named configs have the released sizes (abstract shapes only; nothing is computed)."""
    cfg = variants.generator_model_config(name)
    module = variants.build_generator(cfg)
    ids = jax.ShapeDtypeStruct((1, cfg.num_tokens), np.int32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids,
                            jax.ShapeDtypeStruct((1,), np.int32))["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert cfg.arch == arch and abs(count - num_params) < 0.05e6
    assert len(official.GENERATOR_MAP.entries(params)) == num_tensors
