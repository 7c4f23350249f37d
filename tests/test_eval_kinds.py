"""``titok-jax eval`` (in process) on every released kind of tokenizer, from each source it
accepts, on 8 images of the embedded dataset: two-stage (legacy, with its pixel decoder, in the
released file layout), stage 1 (proxy codes decoded by the VQGAN of ``teacher.weights``), VQ with
a pixel head, VAE and ALIT; from official weights files, titok-jax folders and training workdirs.
Results are checked against PSNR and codebook usage computed here from ``load_tokenizer``.
"""
import json
import os

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax.cli.main import main

from helpers import (
    CONFIGS,
    DATA,
    Fixture,
    embedded_data_flags,
    fixture_model_config,
    load_config,
    model_overrides,
    psnr_uint8,
    released_two_stage_weights,
    tfds_images,
)

SPLIT = "validation[:8]"
VQGAN = os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")
STAGE1 = os.path.join(DATA, "titok_stage1_tiny", "weights.safetensors")

# kind -> (fixture whose model config it is, configs/ argument, extra flags)
KINDS = {
    "two_stage": ("titok_legacy_vq_tiny", "titok.py:variant=tiny,stage=2", []),
    "stage1": ("titok_stage1_tiny", "titok.py:variant=tiny,stage=1",
               [f"--config.teacher.weights={VQGAN}"]),
    "vq_pixel": ("titok_vq_pixel_tiny", "titok.py:variant=tiny-pixel", []),
    "vae": ("titok_vae_tiny", "titok.py:variant=tiny-vae", []),
    "alit": ("alit_tiny_fixture", "alit.py:variant=alit_fixture_tiny", []),
}


def run_eval(tmp_path, checkpoint, data_dir, *flags, config_arg=None, evals="psnr,codebook",
             name="eval.json") -> dict:
    out = tmp_path / name
    argv = ["eval", "--checkpoint", str(checkpoint), "--split", SPLIT, "--evals", evals,
            "--out", str(out), "--config.eval.batch_size=8", *embedded_data_flags(data_dir),
            *flags]
    if config_arg:
        argv += ["--config", os.path.join(CONFIGS, config_arg)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["results"]["num_images"] == 8 and saved["split"] == SPLIT
    return saved


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """kind -> an official-layout weights file."""
    two_stage = released_two_stage_weights(str(tmp_path_factory.mktemp("w") / "two.safetensors"))
    return {"two_stage": two_stage, "stage1": STAGE1,
            **{k: os.path.join(DATA, KINDS[k][0], "weights.safetensors")
               for k in ("vq_pixel", "vae", "alit")}}


def model_flags(kind: str) -> list[str]:
    fixture, arg, flags = KINDS[kind]
    if kind == "alit":
        return flags
    return model_overrides(arg, fixture_model_config(Fixture(fixture))) + flags


@pytest.fixture(scope="module")
def file_results(weights, data_dir, tmp_path_factory):
    """kind -> the results JSON of ``titok-jax eval`` on its official weights file."""
    tmp = tmp_path_factory.mktemp("eval")
    return {kind: run_eval(tmp, weights[kind], data_dir, *model_flags(kind),
                           config_arg=KINDS[kind][1],
                           evals="psnr" if kind == "vae" else "psnr,codebook", name=f"{kind}.json")
            for kind in KINDS}


@pytest.fixture(scope="module")
def images(data_dir):
    return tfds_images(data_dir, SPLIT, 256)


def test_every_kind_evaluates_from_its_official_file(file_results):
    for kind, saved in file_results.items():
        results = saved["results"]
        assert saved["kind"] == "weights", kind
        assert 3.0 < results["psnr"] < 60.0, (kind, results)
        if kind != "vae":
            assert results["codebook_usage"] > 0, (kind, results)


@pytest.mark.parametrize("kind", ["two_stage", "stage1", "vae"])
def test_results_equal_the_tokenizer_api(kind, file_results, weights, images):
    """PSNR and codebook usage of ``titok-jax eval`` equal those of ``load_tokenizer``'s
    reconstructions of the same images (read and transformed without the eval pipeline)."""
    fixture = Fixture(KINDS[kind][0])
    tok = titok_jax.load_tokenizer("", weights[kind], model_config=fixture_model_config(fixture),
                                   vqgan_path=VQGAN if kind == "stage1" else None)
    recon = np.asarray(tok.reconstruct(images))
    results = file_results[kind]["results"]
    assert results["psnr"] == pytest.approx(psnr_uint8(images, recon), abs=1e-3)
    if kind != "vae":
        ids = np.asarray(tok.encode(images))
        assert results["codebook_usage"] == pytest.approx(
            len(np.unique(ids)) / tok.config.codebook_size)


def test_alit_results_equal_the_alit_api(file_results, weights, images):
    alit = titok_jax.load_alit("alit_fixture_tiny", weights["alit"])
    last = alit.encode_all(images)[-1]
    results = file_results["alit"]["results"]
    assert results["psnr"] == pytest.approx(psnr_uint8(images, np.asarray(last["recon"])),
                                            abs=1e-3)
    assert results["codebook_usage"] == pytest.approx(
        len(np.unique(np.asarray(last["codes"]))) / alit.config.codebook_size)


def test_stage1_without_teacher_weights_is_refused(weights, data_dir, tmp_path, capsys):
    argv = ["eval", "--config", os.path.join(CONFIGS, KINDS["stage1"][1]), "--checkpoint",
            weights["stage1"], "--split", SPLIT, "--evals", "psnr", "--out",
            str(tmp_path / "x.json"), *embedded_data_flags(data_dir),
            *model_overrides(KINDS["stage1"][1], fixture_model_config(Fixture(KINDS["stage1"][0])))]
    assert main(argv) == 2
    assert "config.teacher.weights is empty" in capsys.readouterr().err


def test_folder_with_runlocal_config(file_results, weights, data_dir, tmp_path):
    """README: ``titok-jax eval --config configs/titok.py:runlocal --checkpoint WORKDIR/export``:
    the folder's config.json replaces the runlocal model (here the two-stage and ALIT ones)."""
    fixture = Fixture(KINDS["two_stage"][0])
    tok = titok_jax.load_tokenizer("", weights["two_stage"],
                                   model_config=fixture_model_config(fixture))
    tok.save(tmp_path / "export")
    saved = run_eval(tmp_path, tmp_path / "export", data_dir, config_arg="titok.py:runlocal")
    assert saved["kind"] == "folder" and saved["model"]["num_latent_tokens"] == 8
    assert saved["results"] == pytest.approx(file_results["two_stage"]["results"], rel=1e-6)

    titok_jax.load_alit("alit_fixture_tiny", weights["alit"]).save(tmp_path / "alit")
    saved = run_eval(tmp_path, tmp_path / "alit", data_dir, config_arg="alit.py:runlocal",
                     name="alit.json")
    assert saved["results"] == pytest.approx(file_results["alit"]["results"], rel=1e-6)


@pytest.mark.parametrize("kind", ["stage1", "alit"])
def test_training_workdir_uses_stored_config_and_ema(kind, file_results, weights, data_dir,
                                                     tmp_path):
    """An Orbax workdir evaluated with no --config: the config comes from the checkpoint's meta,
    the EMA params of group "tokenizer" are evaluated, the frozen VQGAN (stage-1 teacher, ALIT
    base tokenizer, neither in the train state) comes from the stored teacher.weights. It equals
    the evaluation of the same weights as an official file."""
    from titok_jax.convert import official
    from titok_jax.inference import predict as predict
    from titok_jax.infra import checkpointing
    from titok_jax.models import variants
    teacher = VQGAN if kind == "stage1" else weights["alit"]
    config = load_config(KINDS[kind][1], f"teacher.weights={teacher}",
                         *[f[len("--config."):] for f in model_flags(kind)
                           if not f.startswith("--config.teacher.")])
    module = variants.build_model(config.model)
    full = official.import_official(official.read_training_checkpoint(weights[kind]),
                                    predict.abstract_params(module, 256), config.model)
    ema = predict.split_frozen(config.model, full)[0]
    live = jax.tree_util.tree_map(np.zeros_like, ema)  # what must NOT be evaluated
    state = {"step": np.int32(3), "params": {"tokenizer": live}, "ema_params": {"tokenizer": ema},
             "opt_state": {"tokenizer": {"count": np.int32(3)}}, "mutable": {"rng": np.int32(0)}}
    meta = {"step": 3, "task": f"{kind}_test",
            "config": json.loads(config.to_json_best_effort())}
    ckpt = checkpointing.Checkpointer(tmp_path / "workdir" / "checkpoints", keep=1, save_every=1,
                                      async_save=False)
    ckpt.save(3, state, meta, force=True)
    ckpt.close()
    argv = ["eval", "--checkpoint", str(tmp_path / "workdir"), "--split", SPLIT, "--evals",
            "psnr,codebook", "--config.eval.batch_size=8", *embedded_data_flags(data_dir)]
    assert main(argv) == 0
    # The default output: next to the checkpoint, named after the split.
    saved = json.loads((tmp_path / "workdir" / "eval_validation_8.json").read_text())
    assert saved["kind"] == "workdir" and saved["step"] == 3
    assert saved["results"] == pytest.approx(file_results[kind]["results"], rel=1e-6)
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "workdir"))
    if kind == "stage1":
        # The one loader: the public API reads the same workdir (stored model config, EMA).
        tok = titok_jax.load_tokenizer("", tmp_path / "workdir")
        assert tok.config.to_dict() == config.model.to_dict()
        got, want = jax.tree_util.tree_leaves(tok.params), jax.tree_util.tree_leaves(ema)
        assert len(got) == len(want)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
