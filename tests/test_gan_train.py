"""TiTok's GAN-phase tasks (titok_stage2, titok_single_stage) in the training loop: the
discriminator switching on at its start step, resume bitwise with the discriminator state and
LeCam EMAs, 8 devices equal 1, stage 2's frozen parts and initialisation, configs of every
released variant, and the errors of bad input."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from titok_jax.convert.official import export_official, read_state_dict, write_safetensors
from titok_jax.data import pipeline as data_lib
from titok_jax.infra import sharding
from titok_jax.train import loop
from titok_jax.train import tasks as tasks_lib

from helpers import DATA, ROOT, load_config, preempt_at, runlocal, scalars

GAN = "titok.py:runlocal,objective=gan"
# Real updates of both groups from the first step, so equivalence tests can fail.
REAL = ("optimizer.warmup_steps=0", "discriminator_optimizer.warmup_steps=0")


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_gan_run_switches_on_the_discriminator_and_resumes_bitwise(data_dir, tmp_path,
                                                                   monkeypatch):
    """Steps 1-2 train the generator only; from the start step (2, 0-based) the discriminator
    and LeCam EMAs train too. A run preempted after step 3 resumes to the same state."""
    config = runlocal(data_dir, "total_steps=4", "losses.discriminator_start=2", *REAL,
                      "ckpt_every=0", "log_every=1", "image_every=0", "eval_every=0", arg=GAN)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    assert int(straight.step) == 4
    logged = {k: scalars(str(tmp_path / "straight"), k)
              for k in ("loss", "discriminator_loss", "discriminator_factor",
                        "discriminator/learning_rate", "logits_real", "lecam_loss")}
    assert sorted(logged["loss"]) == [1, 2, 3, 4]
    assert all(np.isfinite(v) for tag in logged.values() for v in tag.values())
    assert logged["discriminator_factor"] == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}
    assert sorted(logged["discriminator_loss"]) == sorted(logged["logits_real"]) == [3, 4]
    lecam = jax.device_get(straight.mutable["lecam"])
    assert lecam["ema_real"] != 0.0 and lecam["ema_fake"] != 0.0

    preempt_at(monkeypatch, 3)
    stopped = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(stopped.step) == 3  # one discriminator update in the checkpoint
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    # params, EMA, both optimizer states, LeCam EMAs, step
    _leaves_equal(jax.device_get(straight), jax.device_get(resumed))


def _steps(config, mesh, data_dir, n):
    t = loop.build_trainer(config, mesh)
    pipe = loop.input_pipeline(t.task.input_kind, config, data_dir)
    state = t.init_state(jax.random.PRNGKey(0))
    init = jax.device_get(state.params)
    history = []
    for step in range(n):
        batch = data_lib.to_global(pipe.batch(step), t.batch_sharding)
        state, metrics = t.step(state, batch, step)
        history.append([float(metrics[k]) for k in ("loss", "discriminator_loss",
                                                     "tokenizer/grad_norm",
                                                     "discriminator/grad_norm")])
    pipe.close()
    sharded = {g: any(not sh.is_fully_replicated for sh in jax.tree_util.tree_leaves(tree))
               for g, tree in t.state_shardings.params.items()}
    return init, jax.device_get(state), np.array(history), sharded


def test_gan_eight_devices_fsdp_equal_one(data_dir):
    # Adam's eps raised from 1e-8 to 1e-3: with 1e-8 an element whose gradient is round-off
    # moves by +-lr either way (the sign of noise), which no sharding can reproduce; with 1e-3
    # the update is continuous in the gradient, so the comparison stays tight.
    config = runlocal(data_dir, "losses.discriminator_start=0", *REAL, "optimizer.eps=1e-3",
                      "discriminator_optimizer.eps=1e-3", arg=GAN)
    init, one, h1, _ = _steps(config, sharding.make_mesh(jax.devices()[:1]), data_dir, 2)
    # 8 devices with FSDP: the generator's and the discriminator's large parameters and their
    # optimizer states are sharded over the data axis.
    config.unlock()
    config.mesh.fsdp, config.mesh.fsdp_min_size = True, 2 ** 12
    _, eight, h8, sharded = _steps(config, sharding.make_mesh(jax.devices()), data_dir, 2)
    assert sharded == {"tokenizer": True, "discriminator": True}
    # The first step agrees to float round-off; the second inherits the first update's
    # round-off through both networks (lr 1e-3), hence 1e-4.
    np.testing.assert_allclose(h1[0], h8[0], rtol=1e-5)
    np.testing.assert_allclose(h1, h8, rtol=1e-4)
    for group in ("tokenizer", "discriminator"):
        moved = 0.0
        for a, b, c in zip(jax.tree_util.tree_leaves(one.params[group]),
                           jax.tree_util.tree_leaves(eight.params[group]),
                           jax.tree_util.tree_leaves(init[group])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
            moved = max(moved, float(np.max(np.abs(a - c))))
        assert moved > 1e-4, f"{group} did not move: the comparison would prove nothing"
    for k in ("ema_real", "ema_fake"):
        np.testing.assert_allclose(one.mutable["lecam"][k], eight.mutable["lecam"][k],
                                   rtol=1e-4, atol=1e-8)


# -- stage 2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    """A stage-1 tiny TiTok in the official layout (no pixel_* keys) and the tiny MaskGIT-VQGAN
    fixture weights it is paired with."""
    import jax.numpy as jnp

    from titok_jax.models import variants
    cfg = load_config("titok.py:runlocal,stage=1").model
    model = variants.build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(7), jnp.zeros((1, 256, 256, 3)))["params"]
    path = str(tmp_path_factory.mktemp("stage1") / "stage1.safetensors")
    write_safetensors(export_official(jax.device_get(params), cfg), path)
    return path, os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")


def test_stage2_trains_decoder_and_pixel_decoder_only(data_dir, stage1_file):
    stage1, vqgan = stage1_file
    config = runlocal(data_dir, f"init_from={stage1}", f"teacher.weights={vqgan}",
                      "teacher.allow_random=False", "global_batch=1", *REAL,
                      arg="titok.py:runlocal,stage=2")  # a generator step (the start is 1000)
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    state = t.task.warm_start(t.init_state(jax.random.PRNGKey(0)), config.init_from)
    before = jax.device_get(state)
    # Initialisation: stage-1 tensors as they are, the VQGAN's decoder and codebook as pixel_*.
    exported = export_official(before.params["tokenizer"], config.model)
    stage1_sd, vq_sd = read_state_dict(stage1), read_state_dict(vqgan)
    for k, v in stage1_sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    for k, v in vq_sd.items():
        if k.startswith(("decoder.", "quantize.")):
            np.testing.assert_array_equal(exported["pixel_" + k], v, err_msg=k)
    assert set(exported) == set(stage1_sd) | {"pixel_" + k for k in vq_sd
                                              if k.startswith(("decoder.", "quantize."))}

    pipe = loop.input_pipeline("images", config, data_dir)
    batch = data_lib.to_global(pipe.batch(0), t.batch_sharding)
    pipe.close()
    state, metrics = t.step(state, batch, 0)
    after = jax.device_get(state)
    assert float(metrics["nonfinite"]) == 0.0 and t.task.step_kind(0) == "generator"
    for name in before.params["tokenizer"]:
        frozen = name not in ("decoder", "pixel_quantize", "pixel_decoder")
        for tree in ("params", "ema_params"):
            a, b = getattr(before, tree)["tokenizer"][name], getattr(after, tree)["tokenizer"][name]
            diff = max(float(np.max(np.abs(x - y))) for x, y in
                       zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
            assert (diff == 0.0) if frozen else (diff > 0.0), (tree, name, diff)
    # No optimizer moments for the frozen parts (set_to_zero keeps no state).
    moments = sum(x.size for x in jax.tree_util.tree_leaves(after.opt_state["tokenizer"]))
    trained = sum(x.size for n in ("decoder", "pixel_quantize", "pixel_decoder")
                  for x in jax.tree_util.tree_leaves(after.params["tokenizer"][n]))
    assert moments < 2 * trained + 100


def test_stage2_bad_input_fails_before_any_step(data_dir, stage1_file, tmp_path):
    stage1, _ = stage1_file
    base = ("teacher.allow_random=False",)
    arg = "titok.py:runlocal,stage=2"
    with pytest.raises(ValueError, match="starts from a stage-1 checkpoint"):
        tasks_lib.get(runlocal(data_dir, *base, arg=arg))
    with pytest.raises(FileNotFoundError, match="stage-1 checkpoint.*nowhere.bin"):
        tasks_lib.get(runlocal(data_dir, *base, "init_from=/nowhere.bin", arg=arg))
    config = runlocal(data_dir, *base, f"init_from={stage1}", arg=arg)
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    with pytest.raises(ValueError, match="config.teacher.weights"):
        t.task.warm_start(t.init_state(jax.random.PRNGKey(0)), stage1)
    # A truncated discriminator file: the error names the file and the missing key.
    from titok_jax.gan.discriminator import export_discriminator
    state = t.init_state(jax.random.PRNGKey(0))
    sd = export_discriminator(jax.device_get(state.params["discriminator"]))
    missing = sorted(sd)[0]
    del sd[missing]
    bad = str(tmp_path / "disc.safetensors")
    write_safetensors(sd, bad)
    with pytest.raises(ValueError, match=rf"(?s)disc.safetensors.*{missing}"):
        config.unlock()
        config.discriminator.weights = bad
        t.task._load_discriminator(state)
    # Through the CLI: a clear error, exit 2, no workdir.
    proc = subprocess.run(
        [sys.executable, "-m", "titok_jax.cli", "train", "--config",
         os.path.join(ROOT, "configs", arg), "--workdir", str(tmp_path / "wd"),
         f"--config.data.data_dir={data_dir}"], capture_output=True, text=True)
    assert proc.returncode == 2 and "stage-1 checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "wd").exists()


# -- released configs ---------------------------------------------------------------------------

RELEASED = {"L-32": "titok_stage2", "B-64": "titok_stage2", "S-128": "titok_stage2",
            "BL-64-VQ": "titok_single_stage", "BL-128-VQ": "titok_single_stage",
            "SL-256-VQ": "titok_single_stage", "LL-32-VAE": "titok_single_stage",
            "BL-64-VAE": "titok_single_stage", "BL-128-VAE": "titok_single_stage"}


@pytest.mark.parametrize("variant", sorted(RELEASED))
def test_released_variant_gan_configs_build(variant, tmp_path):
    """Each released variant's GAN-phase config builds its task, groups and optimizers (shapes
    only); its loss weights are the official ones; ConvNeXt weights are required."""
    from titok_jax.gan.losses import LossConfig
    init = tmp_path / "stage1.bin"
    init.write_bytes(b"")
    config = load_config(f"titok.py:variant={variant}", f"init_from={init}")
    task = tasks_lib.get(config)
    assert task.name == RELEASED[variant]
    stage2 = task.name == "titok_stage2"
    losses = LossConfig.from_config(config.losses)
    assert (losses.perceptual_loss, losses.perceptual_weight, losses.discriminator_weight,
            losses.discriminator_start, losses.lecam_regularization_weight) == (
        ("convnext_s", 0.1, 0.01, 20_000, 0.001) if stage2 else
        ("lpips-convnext_s-1.0-0.1", 1.1, 0.1, 200_000, 0.001))
    assert config.total_steps == (500_000 if stage2 else 1_000_000)
    assert config.discriminator_optimizer.total_steps == config.total_steps - (
        losses.discriminator_start)
    params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    assert sorted(params) == ["discriminator", "tokenizer"]
    assert ("pixel_decoder" in params["tokenizer"]) == stage2
    optimizers = task.optimizers(params)
    opt_state = jax.eval_shape(lambda p: {g: optimizers[g].tx.init(p[g]) for g in p}, params)
    moments = sum(x.size for x in jax.tree_util.tree_leaves(opt_state["tokenizer"]))
    trained = sum(x.size for k, v in params["tokenizer"].items()
                  if not stage2 or k in ("decoder", "pixel_quantize", "pixel_decoder")
                  for x in jax.tree_util.tree_leaves(v))
    assert 2 * trained <= moments < 2 * trained + 100  # Adam's two moments, trained part only
    with pytest.raises(ValueError, match="ConvNeXt"):
        task.frozen()


# -- clustering_vq --------------------------------------------------------------------------------

def _official_clustering(embedding, z, embed_prob, use_l2_norm, decay=0.99):
    """The official VectorQuantizer's clustering_vq branch, written out in numpy (float64)."""
    def normalize(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
    emb = embedding.astype(np.float64)
    q, e = (normalize(flat), normalize(emb)) if use_l2_norm else (flat, emb)
    d = (q ** 2).sum(1, keepdims=True) + (e ** 2).sum(1) - 2 * q @ e.T
    k = emb.shape[0]
    usage = np.bincount(d.argmin(1), minlength=k) / flat.shape[0]
    prob = embed_prob * decay + usage * (1 - decay)
    feat = flat[d.argmin(0)]
    w = np.exp(-(prob * k * 10) / (1 - decay) - 1e-3)[:, None]
    return emb * (1 - w) + feat * w, prob


@pytest.mark.parametrize("use_l2_norm", [False, True])
def test_clustering_update_matches_the_official_formula(use_l2_norm):
    from titok_jax.models.quantizer import clustering_update
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 4)).astype(np.float32)
    emb[3] += 6.0  # far from every feature: a dead code, re-seeded
    z = rng.normal(size=(3, 10, 4)).astype(np.float32)
    prob = rng.uniform(0, 0.02, size=16).astype(np.float32)
    prob[3] = 0.0  # never used so far
    new, new_prob = jax.device_get(clustering_update(emb, z, prob, use_l2_norm=use_l2_norm))
    ref, ref_prob = _official_clustering(emb, z, prob.astype(np.float64), use_l2_norm)
    np.testing.assert_allclose(new_prob, ref_prob, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)
    if not use_l2_norm:  # (normalised, code 3 is not far from the features)
        assert np.abs(new[3] - emb[3]).max() > 1.0  # the dead code moved to a feature


def test_single_stage_vq_step_reseeds_the_codebook(data_dir):
    """A titok_single_stage VQ step with clustering_vq: the usage EMA is updated and the new
    codebook is the re-seeded one plus the optimizer's update."""
    config = runlocal(data_dir, "global_batch=1", "model.image_size=64", "model.patch_size=8",
                      arg="titok.py:runlocal,objective=gan,variant=tiny-pixel")
    assert config.clustering_vq and config.task == "titok_single_stage"
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    state = t.init_state(jax.random.PRNGKey(0))
    before = jax.device_get(state)
    pipe = loop.input_pipeline("images", config, data_dir)
    batch = data_lib.to_global(pipe.batch(0), t.batch_sharding)
    pipe.close()
    state, metrics = t.step(state, batch, 0)
    after = jax.device_get(state)
    prob = after.mutable["clustering"]["embed_prob"]
    assert prob.sum() == pytest.approx(0.01, rel=1e-5)  # (1 - 0.99) x one full assignment
    moved = np.abs(after.params["tokenizer"]["quantize"]["embedding"]
                   - before.params["tokenizer"]["quantize"]["embedding"]).max()
    lr = float(metrics["tokenizer/learning_rate"])
    assert moved > 10 * lr  # far more than one Adam step: the codes were re-seeded
