"""ALIT stage 2 (full fine-tuning, ``alit_stage2``): the official step schedule, a few steps of
the runlocal config (generator steps before and after the GAN starts, discriminator steps), the
codebook that never changes, BatchNorm statistics, the per-epoch EMA reset, a bitwise resume
through the Checkpointer, the official ``gan_losses.*`` keys, and 8 devices (FSDP) == 1."""
import jax
import numpy as np
import pytest

from titok_jax.convert.official import export_official, write_safetensors
from titok_jax.data import pipeline as data_lib
from titok_jax.gan import patchgan
from titok_jax.infra import checkpointing, sharding
from titok_jax.train import loop
from titok_jax.train import tasks as tasks_lib

from helpers import load_config, runlocal

STAGE2 = "alit.py:runlocal,stage=2"
# One rollout iteration keeps compile time down (two step kinds); 3 steps per epoch and 2
# discriminator steps per generator step: steps 0-2 are generator steps without the GAN (epoch
# 0), 3-4 discriminator steps and 5 a generator step with the GAN on (epoch 1).
SMALL = ("model.max_iters=1", "alit.discriminator_steps=2", "alit.steps_per_epoch=3",
         "optimizer.warmup_steps=0")
KINDS = ["generator_0"] * 3 + ["discriminator_0"] * 2 + ["generator_0"]
CODEBOOK = ("base_tokenizer", "vqgan", "quantize", "embedding")
CONV_OUT = ("base_tokenizer", "vqgan", "decoder", "conv_out", "kernel")


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


def _official_schedule(steps_per_epoch, epochs, gan_start_epoch, max_iters):
    """The official ``train_one_epoch`` counter logic, step by step: (kind, iteration)."""
    out = []
    for epoch in range(epochs):
        current = 0
        for data_iter_step in range(steps_per_epoch):
            gan_on = epoch >= gan_start_epoch
            idx = 1 - ((data_iter_step + 1) % (8 + 1) == 0) * 1 if gan_on else 0
            out.append(("discriminator" if idx else "generator", current % max_iters))
            if idx == 0:
                current += 1
    return out


def test_schedule_matches_the_official_counter():
    """Official numbers (8 iterations, 8 D-steps per G-step), GAN from epoch 1 of 23 steps."""
    config = load_config(STAGE2, "alit.steps_per_epoch=23", "alit.gan_start_epochs=[1, 2]")
    task = tasks_lib.get(config)
    got = [task.schedule(s) for s in range(3 * 23)]
    assert got == _official_schedule(23, 3, 1, 8)
    assert [k for _, k in got[:10]] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert got[23:23 + 10] == [("discriminator", 0)] * 8 + [("generator", 0), ("discriminator", 1)]
    assert task.step_kind(23 + 17) == "generator_1" and task.step_kind(46) == "discriminator_0"


def test_needs_a_stage1_checkpoint(data_dir):
    config = runlocal(data_dir, "alit.allow_random_init=False", arg=STAGE2)
    with pytest.raises(ValueError, match="set config.init_from"):
        tasks_lib.get(config)


@pytest.fixture(scope="module")
def run(data_dir):
    """Six steps of the small runlocal stage-2 config on one device: the trainer, the host
    states before and after every step, and the metrics."""
    config = runlocal(data_dir, *SMALL, arg=STAGE2)
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    pipe = loop.input_pipeline(t.task.input_kind, config, data_dir)
    state = t.init_state(jax.random.PRNGKey(0))
    states, metrics = [jax.device_get(state)], []
    for step in range(len(KINDS)):
        state, m = t.step(state, data_lib.to_global(pipe.batch(step), t.batch_sharding), step)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    yield {"trainer": t, "config": config, "pipe": pipe, "states": states, "metrics": metrics}
    pipe.close()


def test_generator_and_discriminator_steps(run):
    t, states, metrics = run["trainer"], run["states"], run["metrics"]
    assert [t.task.step_kind(s) for s in range(len(KINDS))] == KINDS
    generator_terms = {"loss", "nll_loss", "l1_loss", "perceptual_loss", "g_loss",
                       "quantizer_loss", "adaptive_weight", "gan_weight", "d_weight",
                       "logits_fake", "code_accuracy", "tokenizer/grad_norm",
                       "tokenizer/learning_rate", "discriminators/grad_norm",
                       "discriminators/learning_rate"}
    discriminator_terms = {"loss", "d_loss", "logits_real", "logits_fake",
                           "discriminator_accuracy", "discriminators/grad_norm",
                           "discriminators/learning_rate"}
    for kind, m in zip(KINDS, metrics):
        assert (generator_terms if kind.startswith("gen") else discriminator_terms) <= set(m)
        assert all(np.isfinite(v) for v in m.values()) and m["nonfinite"] == 0
    assert [m.get("gan_weight", -1) for m in metrics] == pytest.approx([0, 0, 0, -1, -1, 0.2])
    assert metrics[5]["d_weight"] > 0 and metrics[5]["discriminators/grad_norm"] > 0
    # Before the GAN, a generator step moves the discriminator by weight decay alone (the main
    # optimizer covers it); discriminator steps leave the tokenizer alone.
    assert metrics[0]["discriminators/grad_norm"] == 0 < metrics[0]["discriminators/update_norm"]
    for a, b in zip(jax.tree_util.tree_leaves(states[3].params["tokenizer"]),
                    jax.tree_util.tree_leaves(states[5].params["tokenizer"])):
        np.testing.assert_array_equal(a, b)
    # Both learning rates follow the global step (cosine over 15 steps), not update counts.
    lr = [float(m["discriminators/learning_rate"]) for m in metrics]
    assert lr == sorted(lr, reverse=True) and lr[0] > lr[-1]
    # The VQGAN trains, its codebook (no gradient, decay masked) does not change at all.
    tok = [s.params["tokenizer"] for s in states]
    np.testing.assert_array_equal(_get(tok[0], CODEBOOK), _get(tok[-1], CODEBOOK))
    assert np.abs(_get(tok[0], CONV_OUT) - _get(tok[-1], CONV_OUT)).max() > 0
    # BatchNorm: one update per generator step, two per discriminator step (real, fake).
    stats = states[-1].mutable["batch_stats"]["0"]
    assert all(int(s["num_batches_tracked"]) == 4 + 2 * 2 for s in stats.values())
    # The EMA restarts from the live weights at the epoch start (step 3).
    d = run["config"].ema_decay
    for e, p0, p1 in zip(*(jax.tree_util.tree_leaves(x) for x in (
            states[4].ema_params["tokenizer"], states[3].params["tokenizer"],
            states[4].params["tokenizer"]))):
        np.testing.assert_allclose(e, d * p0 + (1 - d) * p1, rtol=1e-6, atol=1e-7)


def test_resume_through_the_checkpointer_is_bitwise(run, tmp_path):
    """Save after step 3, restore onto the trainer's abstract state, run steps 3-5: params, EMA,
    both optimizers, BatchNorm statistics and step equal the straight run bit for bit."""
    t, config = run["trainer"], run["config"]
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", keep=2, save_every=0)
    try:
        ckpt.save(3, jax.device_put(run["states"][3], t.state_shardings), {"step": 3},
                  force=True)
        ckpt.wait()
        state, _, step = ckpt.restore_for_resume(t.abstract_state, config)
    finally:
        ckpt.close()
    assert step == 3
    # titok-jax eval reads the workdir: the whole EMA tree, the trained VQGAN included.
    from titok_jax.inference.weights import WeightsSource as Checkpoint
    source = Checkpoint(str(tmp_path))
    params = source.params(source.config(config.copy_and_resolve_references()))
    read = {**params["model"], **params["frozen"]}
    want = run["states"][3].ema_params["tokenizer"]
    assert jax.tree_util.tree_structure(read) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(read), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    for s in range(3, len(KINDS)):
        state, _ = t.step(state, data_lib.to_global(run["pipe"].batch(s), t.batch_sharding), s)
    straight, resumed = run["states"][-1], jax.device_get(state)
    assert (jax.tree_util.tree_structure(straight) == jax.tree_util.tree_structure(resumed))
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_gan_losses_keys_round_trip_and_missing_keys(run, tmp_path):
    """An official-layout stage-2 checkpoint made by exporting: the tokenizer loads from its
    ``ema``, the discriminators and their BatchNorm buffers from ``model``; LPIPS copies are
    ignored; a missing discriminator key is an error naming the file and the key."""
    import torch

    t, config = run["trainer"], run["config"]
    final = run["states"][-1]
    gan = patchgan.export_official(final.params["discriminators"],
                                   final.mutable["batch_stats"])
    main = ["main.0.weight", "main.0.bias", "main.2.weight", "main.5.weight", "main.8.weight",
            "main.11.weight", "main.11.bias"]
    bn = [f"main.{i}.{n}" for i in (3, 6, 9)
          for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert sorted(gan) == sorted(f"gan_losses.0.discriminator.{k}" for k in main + bn)
    assert gan["gan_losses.0.discriminator.main.8.weight"].shape == (512, 256, 4, 4)
    assert gan["gan_losses.0.discriminator.main.3.num_batches_tracked"].dtype == np.int64
    lpips = {"gan_losses.0.perceptual_loss.lin0.model.1.weight": np.ones((1, 64, 1, 1))}
    model = {**export_official(final.params["tokenizer"], config.model), **gan, **lpips}
    ema = {**export_official(final.ema_params["tokenizer"], config.model), **lpips,
           **{k: v + 1 if v.dtype.kind == "f" else v for k, v in gan.items()}}
    path = str(tmp_path / "checkpoint-last.pth")
    torch.save({k: {n: torch.from_numpy(np.array(v)) for n, v in sd.items()}
                for k, sd in (("model", model), ("ema", ema))}, path)
    state = t.task.warm_start(t.init_state(jax.random.PRNGKey(1)), path)
    for got, want in ((state.params["tokenizer"], final.ema_params["tokenizer"]),
                      (state.ema_params["tokenizer"], final.ema_params["tokenizer"]),
                      (state.params["discriminators"], final.params["discriminators"]),
                      (state.mutable["batch_stats"], final.mutable["batch_stats"])):
        got = jax.device_get(got)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(a, b)
    # A flat file with one discriminator buffer missing: refused before any step.
    del gan["gan_losses.0.discriminator.main.6.running_var"]
    bad = str(tmp_path / "bad.safetensors")
    write_safetensors({**export_official(final.ema_params["tokenizer"], config.model), **gan},
                      bad)
    with pytest.raises(ValueError) as e:
        t.task.warm_start(t.init_state(jax.random.PRNGKey(1)), bad)
    assert bad in str(e.value) and "gan_losses.0.discriminator.main.6.running_var" in str(e.value)
    assert "1 missing keys" in str(e.value)


def test_warm_start_from_a_stage1_folder_or_workdir(run, tmp_path):
    """A titok-jax folder (a stage-1 export holds the whole ALIT tree, VQGAN included) or a
    finished workdir's export/: the tokenizer and its EMA load, the discriminators keep their
    init; a folder that is neither is refused."""
    from titok_jax.convert import native
    t, config = run["trainer"], run["config"]
    final = run["states"][-1]
    native.save_native(tmp_path / "stage1" / "export", config.model,
                       final.ema_params["tokenizer"])
    fresh = t.init_state(jax.random.PRNGKey(1))
    discriminators = jax.device_get(fresh.params["discriminators"])
    for path in (tmp_path / "stage1", tmp_path / "stage1" / "export"):
        state = jax.device_get(t.task.warm_start(fresh, str(path)))
        for got in (state.params["tokenizer"], state.ema_params["tokenizer"]):
            for a, b in zip(jax.tree_util.tree_leaves(got),
                            jax.tree_util.tree_leaves(final.ema_params["tokenizer"])):
                np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(state.params["discriminators"]),
                        jax.tree_util.tree_leaves(discriminators)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="neither a titok-jax tokenizer folder nor a finished"):
        t.task.warm_start(fresh, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.init_from not found"):
        tasks_lib.get(runlocal("", "init_from=/no/such/checkpoint.pth", arg=STAGE2))


@pytest.mark.slow
def test_eight_devices_fsdp_equal_one(data_dir):
    """Discriminator, discriminator and generator step (GAN on from epoch 0, real updates) on 8
    forced host devices with FSDP equal one device: losses, gradient norms, params, BatchNorm
    statistics (synchronized over the global batch)."""
    args = (*SMALL, "alit.gan_start_epochs=[0, 3]")
    results = {}
    for n, fsdp in ((1, False), (8, True)):
        config = runlocal(data_dir, *args, f"mesh.fsdp={fsdp}", "mesh.fsdp_min_size=256",
                          arg=STAGE2)
        t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:n]))
        pipe = loop.input_pipeline(t.task.input_kind, config, data_dir)
        state = t.init_state(jax.random.PRNGKey(0))
        metrics = []
        for step in range(3):
            state, m = t.step(state, data_lib.to_global(pipe.batch(step), t.batch_sharding),
                              step)
            metrics.append(jax.device_get(m))
        pipe.close()
        assert [t.task.step_kind(s) for s in range(3)] == ["discriminator_0"] * 2 + [
            "generator_0"]
        results[n] = (jax.device_get(state), metrics)
    (one, m1), (eight, m8) = results[1], results[8]
    for a, b in zip(m1, m8):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Params: Adam's first updates are ~lr x sign(grad), so a gradient entry near zero (many
    # are, in convs feeding BatchNorm) turns reduction-order noise into up to lr-sized
    # differences. So: 99.9 % of the entries within the tight tolerance, all within 3 updates.
    lr = load_config(STAGE2).optimizer.lr
    close, total = 0, 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params),
                            jax.tree_util.tree_leaves(eight.params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        close += int(np.sum(np.abs(a - b) <= 1e-6 + 1e-4 * np.abs(b)))
        total += a.size
        np.testing.assert_allclose(a, b, rtol=0, atol=3 * lr, err_msg=jax.tree_util.keystr(path))
    assert close >= 0.999 * total, (close, total)
    for a, b in zip(jax.tree_util.tree_leaves(one.mutable),
                    jax.tree_util.tree_leaves(eight.mutable)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
