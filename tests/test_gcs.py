"""gs:// paths end to end against a real GCS emulator (fake-gcs-server on 127.0.0.1, the
``gcs_emulator`` fixture): etils.epath, Orbax/tensorstore checkpoints, the titok-jax checkpoint
folder and the official weight readers. Every test checks what the emulator holds through its
own JSON API, so nothing can pass by writing a local folder called ``gs:``."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

import titok_jax
from titok_jax.convert import native, official

from helpers import ROOT, fixture_model_config


@pytest.fixture(autouse=True)
def no_local_gs_folder():
    yield
    assert not os.path.exists("gs:"), "a gs:// path was written to a local folder"


def test_epath_write_read_list(gcs_emulator):
    d = epath.Path(gcs_emulator.new_dir())
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "sub" / "a.txt").write_text("hello")
    (d / "b.bin").write_bytes(b"\x00\x01")
    assert (d / "sub" / "a.txt").read_text() == "hello"
    assert sorted(p.name for p in d.iterdir()) == ["b.bin", "sub"]
    assert (d / "sub").is_dir() and (d / "b.bin").is_file() and not (d / "c").exists()
    assert gcs_emulator.objects(os.fspath(d)) == [f"{d.name}/b.bin", f"{d.name}/sub/a.txt"]
    assert gcs_emulator.read(os.fspath(d / "b.bin")) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        (d / "missing.txt").read_text()


def test_orbax_checkpoint_manager(gcs_emulator):
    import orbax.checkpoint as ocp
    d = gcs_emulator.new_dir()
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": {"ids": np.arange(5, dtype=np.int32)}}
    with ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(max_to_keep=1)) as mgr:
        for step in (1, 2):
            mgr.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, tree)))
        mgr.wait_until_finished()
    with ocp.CheckpointManager(d) as mgr:
        assert mgr.all_steps() == [2]
        restored = mgr.restore(2, args=ocp.args.StandardRestore(tree))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 2 * b), restored, tree)
    names = gcs_emulator.objects(d)
    prefix = d.removeprefix(gcs_emulator.path(""))
    assert f"{prefix}/2/_CHECKPOINT_METADATA" in names
    # The array data went through tensorstore's gcs kvstore, not only epath.
    assert any(n.startswith(f"{prefix}/2/default/") and "/d/" in n for n in names), names
    assert not any(n.startswith(f"{prefix}/1/") for n in names), "max_to_keep=1 kept step 1"


def test_native_folder_round_trip(gcs_emulator, fixture):
    cfg = fixture_model_config(fixture("titok_vq_pixel_tiny"))
    params = {"encoder": {"kernel": np.random.default_rng(0).normal(size=(3, 4)).astype(
        np.float32)}, "bias": np.arange(4, dtype=np.int32)}
    d = gcs_emulator.new_dir()
    assert not native.is_native_dir(d)
    native.save_native(d, cfg, params)
    assert native.is_native_dir(d)
    assert gcs_emulator.objects(d) == [f"{epath.Path(d).name}/{native.CONFIG_FILE}",
                                       f"{epath.Path(d).name}/{native.PARAMS_FILE}"]
    loaded_cfg, loaded = native.load_native(d)
    assert loaded_cfg.to_dict() == cfg.to_dict() == native.load_native_config(d).to_dict()
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert loaded["bias"].dtype == np.int32


def test_load_tokenizer_from_gcs(gcs_emulator, fixture, inputs):
    fx = fixture("titok_vq_pixel_tiny")
    cfg = fixture_model_config(fx)
    d = gcs_emulator.new_dir()
    remote = f"{d}/weights.safetensors"
    epath.Path(remote).write_bytes(epath.Path(fx.weights()).read_bytes())
    assert gcs_emulator.read(remote) == open(fx.weights(), "rb").read()

    local = titok_jax.load_tokenizer("", fx.weights(), model_config=cfg)
    tok = titok_jax.load_tokenizer("", remote, model_config=cfg)
    jax.tree.map(np.testing.assert_array_equal, tok.params, local.params)
    ids = tok.encode(inputs)
    np.testing.assert_array_equal(ids, local.encode(inputs))

    folder = f"{d}/saved"
    tok.save(folder)
    again = titok_jax.load_tokenizer("", folder)
    jax.tree.map(np.testing.assert_array_equal, again.params, local.params)
    exported = f"{d}/export/model.safetensors"
    titok_jax.export_pytorch(tok, exported)
    original = official.read_state_dict(fx.weights())
    back = official.read_state_dict(exported)
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], err_msg=k)


def test_missing_gcs_files_are_named(gcs_emulator):
    missing = gcs_emulator.path("no-such-dir", "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=missing):
        titok_jax.load_tokenizer("titok_l32", missing)
    with pytest.raises(FileNotFoundError, match=gcs_emulator.path("nope.bin")):
        official.read_training_checkpoint(gcs_emulator.path("nope.bin"))
    half = gcs_emulator.new_dir()
    epath.Path(half, native.CONFIG_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{half}/{native.PARAMS_FILE}"):
        native.load_native(half)


def test_subprocess_reaches_emulator_with_env(gcs_emulator):
    """The recipe for CLI/training subprocesses: ``env={**os.environ, **emulator.env()}``."""
    d = gcs_emulator.new_dir()
    src, dst = f"{d}/in.safetensors", f"{d}/out.safetensors"
    official.write_safetensors({"x": np.arange(6, dtype=np.float32)}, src)
    key = f"{epath.Path(d).name}/tensorstore-key"
    code = ("import sys; import tensorstore as ts; from titok_jax.convert import official as o; "
            "s = o.read_state_dict(sys.argv[1]); "
            "o.write_safetensors({'y': 2 * s['x']}, sys.argv[2]); "
            "kv = ts.KvStore.open({'driver': 'gcs', 'bucket': sys.argv[3]}).result(); "
            "kv.write(sys.argv[4], b'from tensorstore').result()")
    # Only what env() gives: nothing inherited from this process's own emulator settings.
    env = {k: v for k, v in os.environ.items() if k not in gcs_emulator.env()}
    subprocess.run([sys.executable, "-c", code, src, dst, gcs_emulator.bucket, key],
                   check=True, cwd=ROOT, env={**env, **gcs_emulator.env()}, timeout=120)
    np.testing.assert_array_equal(official.read_state_dict(dst)["y"], 2 * np.arange(6))
    assert gcs_emulator.read(key) == b"from tensorstore"


def test_tfds_dataset_on_gcs(gcs_emulator, data_dir):
    """A prepared TFDS dataset copied to gs:// reads the same: its dataset_info through epath,
    its array_record records through array_record's own GCS client."""
    import tensorflow_datasets as tfds
    local = epath.Path(next(pathlib.Path(data_dir).rglob("dataset_info.json")).parent)
    remote = epath.Path(gcs_emulator.new_dir())
    for f in local.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    assert any(".array_record-" in n for n in gcs_emulator.objects(os.fspath(remote)))
    want, got = tfds.builder_from_directory(local), tfds.builder_from_directory(remote)
    assert got.info.splits["validation"].num_examples == want.info.splits["validation"].num_examples
    want_src, got_src = want.as_data_source("validation"), got.as_data_source("validation")
    assert len(got_src) == len(want_src)
    for i in (0, len(want_src) - 1):
        jax.tree.map(np.testing.assert_array_equal, got_src[i], want_src[i])
