"""Input validation of the public API and the reconstruct/tokenize CLI on messy image folders."""
import os

import numpy as np
import pytest
from PIL import Image

import titok_jax
from titok_jax.cli import main as cli

from helpers import DATA, fixture_model_config

VQGAN_WEIGHTS = os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")


@pytest.fixture(scope="module")
def tok(fixture):
    fx = fixture("titok_vq_pixel_tiny")
    return titok_jax.load_tokenizer("", fx.weights(), model_config=fixture_model_config(fx))


@pytest.fixture(scope="module")
def legacy_dir(fixture, tmp_path_factory):
    """The tiny two-stage model as a titok-jax checkpoint folder (what the CLI loads)."""
    fx = fixture("titok_legacy_vq_tiny")
    tok = titok_jax.load_tokenizer("", fixture("titok_stage1_tiny").weights(),
                                   model_config=fixture_model_config(fx), vqgan_path=VQGAN_WEIGHTS)
    path = tmp_path_factory.mktemp("ckpt") / "legacy"
    tok.save(path)
    return str(path)


@pytest.mark.parametrize("images, message", [
    (np.zeros((256, 256, 3), np.float32), "single image"),
    (np.zeros((2, 3, 256, 256), np.float32), "NCHW"),
    (np.zeros((2, 128, 128, 3), np.float32), "got shape"),
    (np.zeros((2, 256, 256, 4), np.float32), "got shape"),
    (np.zeros((2, 256, 256, 3), np.uint8), "dtype uint8"),
    (np.full((2, 256, 256, 3), 255.0, np.float32), "divide by 255"),
    (np.full((2, 256, 256, 3), np.nan, np.float32), "NaN"),
])
def test_bad_images_are_named(tok, images, message):
    with pytest.raises(ValueError, match=message):
        tok.encode(images)


def test_bad_tokens_are_named(tok, inputs):
    ids = np.asarray(tok.encode(inputs))
    with pytest.raises(ValueError, match=r"token ids \[B, 16\]"):  # k <= N tokens decode
        tok.decode_tokens(np.concatenate([ids, ids], axis=1))
    with pytest.raises(ValueError, match="integer token ids"):
        tok.decode_tokens(ids.astype(np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
        tok.decode_tokens(ids + 64)
    # The official [B, 1, N] layout is accepted.
    np.testing.assert_array_equal(tok.decode_tokens(ids[:, None]), tok.decode_tokens(ids))


def test_reconstruct_api(tok, inputs):
    out = tok.reconstruct(inputs)
    assert out.shape == inputs.shape and out.dtype == np.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def _write_messy_folder(folder):
    rng = np.random.default_rng(0)
    os.makedirs(folder / "sub", exist_ok=True)
    rgb = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "photo.jpg")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")                      # L
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(folder / "alpha.png")  # RGBA
    Image.fromarray(rgb).convert("CMYK").save(folder / "sub" / "cmyk.jpg")
    Image.fromarray(rgb[:40, :30]).save(folder / "tiny.png")                     # upsampled
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("ignored")


def test_cli_reconstruct_and_tokenize_survive_bad_files(legacy_dir, tmp_path, caplog):
    images = tmp_path / "images"
    _write_messy_folder(images)
    out = tmp_path / "out"
    rc = cli.main(["reconstruct", "--weights", legacy_dir, "--images", str(images),
                   "--out", str(out), "--batch-size", "2"])
    assert rc == 0
    written = sorted(os.listdir(out))
    assert written == ["alpha_recon.png", "cmyk_recon.png", "gray_recon.png", "grid.png",
                       "photo_recon.png", "tiny_recon.png"]
    assert "corrupt.jpg" in caplog.text
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (5 * 256 + 4 * 4, 2 * 256 + 4, 3)
    assert np.asarray(Image.open(out / "photo_recon.png")).shape == (256, 256, 3)

    npz = tmp_path / "tokens.npz"
    rc = cli.main(["tokenize", "--weights", legacy_dir, "--images", str(images / "*.png"),
                   "--out", str(npz)])
    assert rc == 0
    data = np.load(npz)
    assert data["ids"].shape == (3, 8) and data["ids"].dtype == np.int32
    assert [os.path.basename(f) for f in data["files"]] == ["alpha.png", "gray.png", "tiny.png"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    rc = cli.main(["reconstruct", "--weights", str(tmp_path / "missing.bin"), "--images",
                   str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "weights file not found" in capsys.readouterr().err
    # The generation commands are wired into the same CLI and report the same way.
    for argv in (["pretokenize", "--weights", str(tmp_path / "missing.bin"), "--embedded",
                  "--out", str(tmp_path / "tokens")],
                 ["sample", "--generator", "titok_l32", "--generator-weights",
                  str(tmp_path / "missing.bin"), "--tokenizer", "titok_l32",
                  "--tokenizer-weights", str(tmp_path / "tok.bin"), "--out",
                  str(tmp_path / "s.npz")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "missing.bin" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "tokens") and not os.path.exists(tmp_path / "s.npz")


def test_cli_export_import_roundtrip(legacy_dir, tmp_path):
    exported = tmp_path / "model.safetensors"
    assert cli.main(["export", "--weights", legacy_dir, "--out", str(exported)]) == 0
    from titok_jax.convert.official import read_state_dict
    keys = read_state_dict(exported)
    assert "encoder.transformer.0.attn.in_proj_weight" in keys
    assert "pixel_decoder.up.4.upsample_conv.weight" in keys
