"""Weight conversion: official layout in and out, the native folder, and loud failures."""
import argparse
import os

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax.convert import official
from titok_jax.convert.layout import CheckpointMismatchError

from helpers import DATA, fixture_model_config

VQGAN_WEIGHTS = os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")
PIXEL = "titok_vq_pixel_tiny"


@pytest.fixture(scope="module")
def pixel_tok(fixture):
    fx = fixture(PIXEL)
    return titok_jax.load_tokenizer("", fx.weights(), model_config=fixture_model_config(fx))


@pytest.fixture(scope="module")
def legacy_tok(fixture):
    fx = fixture("titok_legacy_vq_tiny")
    return titok_jax.load_tokenizer(
        "", fixture("titok_stage1_tiny").weights(), model_config=fixture_model_config(fx),
        vqgan_path=VQGAN_WEIGHTS)


@pytest.mark.parametrize("name", ["titok_vq_pixel_tiny", "titok_vae_tiny", "titok_stage1_tiny",
                                  "titok_legacy_vq_tiny"])
def test_export_is_exactly_the_official_state_dict(name, fixture, tmp_path):
    """Export -> official keys and shapes (the official strict load set) -> import is bit-exact,
    and for stored files the exported tensors equal the original file."""
    fx = fixture(name)
    weights = fixture("titok_stage1_tiny").weights() if name == "titok_legacy_vq_tiny" \
        else fx.weights()
    tok = titok_jax.load_tokenizer("", weights, model_config=fixture_model_config(fx),
                                   vqgan_path=VQGAN_WEIGHTS if fx.manifest["build"][
                                       "finetune_decoder"] else None)
    out = tmp_path / "model.safetensors"
    titok_jax.export_pytorch(tok, out)
    exported = official.read_state_dict(out)
    assert {k: v.shape for k, v in exported.items()} == fx.state_dict_shapes
    if name != "titok_legacy_vq_tiny":
        original = official.read_state_dict(weights)
        for k, v in original.items():
            np.testing.assert_array_equal(exported[k], v, err_msg=k)
    back = titok_jax.load_tokenizer("", out, model_config=tok.config)
    for a, b in zip(jax.tree_util.tree_leaves(tok.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vqgan_export_roundtrip(fixture, tmp_path):
    fx = fixture("maskgit_vqgan_tiny")
    vq = titok_jax.load_vqgan(VQGAN_WEIGHTS, "maskgit_vqgan_tiny")
    titok_jax.export_pytorch(vq, tmp_path / "vq.safetensors")
    exported = official.read_state_dict(tmp_path / "vq.safetensors")
    assert {k: v.shape for k, v in exported.items()} == fx.state_dict_shapes
    for k, v in official.read_state_dict(VQGAN_WEIGHTS).items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_torch_bin_is_read_with_weights_only(pixel_tok, tmp_path):
    torch = pytest.importorskip("torch")
    state = official.export_official(jax.device_get(pixel_tok.params), pixel_tok.config)
    path = tmp_path / "pytorch_model.bin"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, path)
    back = titok_jax.load_tokenizer("", path, model_config=pixel_tok.config)
    for a, b in zip(jax.tree_util.tree_leaves(pixel_tok.params),
                    jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A pickle holding arbitrary objects is refused, not executed.
    evil = tmp_path / "evil.bin"
    torch.save({"opts": argparse.Namespace(cmd="rm -rf /")}, evil)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        titok_jax.load_tokenizer("", evil, model_config=pixel_tok.config)


def test_mismatched_checkpoint_lists_every_problem(pixel_tok, tmp_path):
    state = official.export_official(jax.device_get(pixel_tok.params), pixel_tok.config)
    state.pop("decoder.conv_out.bias")
    state.pop("encoder.ln_post.weight")
    state["encoder.extra_thing"] = np.zeros(3, np.float32)
    state["quantize.embedding.weight"] = np.zeros((65, 16), np.float32)
    path = tmp_path / "bad.safetensors"
    official.write_safetensors(state, path)
    with pytest.raises(CheckpointMismatchError) as e:
        titok_jax.load_tokenizer("", path, model_config=pixel_tok.config)
    err = e.value
    assert err.missing == ["decoder.conv_out.bias", "encoder.ln_post.weight"]
    assert err.unexpected == ["encoder.extra_thing"]
    assert len(err.misshaped) == 1 and "quantize.embedding.weight" in err.misshaped[0]
    assert "(65, 16)" in str(err) and "(64, 16)" in str(err)


def test_stage1_checkpoint_into_stage2_model_explains(fixture):
    fx = fixture("titok_legacy_vq_tiny")
    with pytest.raises(CheckpointMismatchError, match="stage-1 checkpoint") as e:
        titok_jax.load_tokenizer("", fixture("titok_stage1_tiny").weights(),
                                 model_config=fixture_model_config(fx))
    assert all(k.startswith("pixel_") for k in e.value.missing)


def test_native_folder_roundtrip(legacy_tok, inputs, tmp_path):
    legacy_tok.save(tmp_path / "tok")
    back = titok_jax.load_tokenizer("ignored", tmp_path / "tok")
    assert back.config.to_dict() == legacy_tok.config.to_dict()
    for a, b in zip(jax.tree_util.tree_leaves(legacy_tok.params),
                    jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(back.encode(inputs), legacy_tok.encode(inputs))


def test_native_folder_with_wrong_shapes_fails(pixel_tok, tmp_path):
    from safetensors.numpy import load_file, save_file
    pixel_tok.save(tmp_path / "tok")
    params = load_file(str(tmp_path / "tok" / "params.safetensors"))
    params["decoder/ln_pre/scale"] = np.ones(5, np.float32)
    del params["latent_tokens"]
    save_file(params, str(tmp_path / "tok" / "params.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        titok_jax.load_tokenizer("", tmp_path / "tok")
    assert e.value.missing == ["latent_tokens"]
    assert "decoder/ln_pre/scale" in e.value.misshaped[0]


def test_missing_or_unsupported_files(pixel_tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        titok_jax.load_tokenizer("", tmp_path / "nope.bin", model_config=pixel_tok.config)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights file"):
        titok_jax.load_tokenizer("", tmp_path / "w.npz", model_config=pixel_tok.config)
