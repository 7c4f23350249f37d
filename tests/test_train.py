"""Stage-1 / pixel training: end to end on the embedded photos, sharding, FSDP, multi-process,
kill -9 + resume, non-finite halts and corrupt checkpoints."""
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from titok_jax import sharding
from titok_jax.config_arg import apply_overrides, load_config
from titok_jax.data import pipeline as data_lib
from titok_jax.train import titok as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "titok.py")


def runlocal(data_dir, *overrides, arg="runlocal"):
    config = load_config(f"{CONFIG}:{arg}")
    apply_overrides(config, [f"data.data_dir={data_dir}", "progress_bar=False", *overrides])
    return config


def scalars(workdir, tag):
    """{step: value} of a scalar written by the clu TensorBoard writer."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def test_runlocal_training_learns_and_writes_grids(data_dir, tmp_path):
    config = runlocal(data_dir, "total_steps=60", "log_every=10", "image_every=60",
                      "ckpt_every=30")
    trainer_lib.train_and_evaluate(config, str(tmp_path))
    loss = scalars(str(tmp_path), "loss")
    assert sorted(loss) == [10, 20, 30, 40, 50, 60]
    assert loss[60] < 0.8 * loss[10], loss
    assert os.path.isfile(tmp_path / "images" / "step_0000060.png")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]


def test_stage1_proxy_code_training_end_to_end(data_dir, tmp_path):
    """Stage 1: the (tiny, random) MaskGIT-VQGAN teacher makes proxy codes inside the step; the
    image grid decodes the argmax proxy codes with it."""
    config = runlocal(data_dir, "total_steps=4", "log_every=2", "image_every=4", "ckpt_every=4",
                      "num_grid_images=2", arg="runlocal,stage=1")
    assert config.loss == "proxy_ce" and not config.model.finetune_decoder
    trainer_lib.train_and_evaluate(config, str(tmp_path))
    for tag in ("loss", "reconstruction_loss", "quantizer_loss", "proxy_accuracy",
                "codebook_usage", "codebook_perplexity", "grad_norm", "learning_rate"):
        assert sorted(scalars(str(tmp_path), tag)) == [2, 4], tag
    assert os.path.isfile(tmp_path / "images" / "step_0000004.png")
    assert os.path.isfile(tmp_path / "reconstructions" / "grid.png")


def _two_steps(config, mesh, data_dir):
    t = trainer_lib.build_trainer(config, mesh)
    pipe = data_lib.TrainPipeline(dataset="imagenet2012", data_dir=data_dir, split="train",
                                  global_batch=config.global_batch,
                                  image_size=config.model.image_size,
                                  seed=config.seed, num_threads=2)
    state = t.init_state(jax.random.PRNGKey(0))
    for step in range(2):
        batch = data_lib.to_global(pipe.batch(step), t.batch_sharding)
        state, metrics = t.train_step(state, batch, t.teacher_params,
                                      jax.random.fold_in(jax.random.PRNGKey(0), step))
    pipe.close()
    return jax.device_get(state.params), float(metrics["loss"])


@pytest.mark.parametrize("arg", ["runlocal", "runlocal,stage=1"])
def test_eight_devices_equal_one(data_dir, arg):
    config = runlocal(data_dir, arg=arg)
    one, loss1 = _two_steps(config, sharding.make_mesh(jax.devices()[:1]), data_dir)
    eight, loss8 = _two_steps(config, sharding.make_mesh(jax.devices()), data_dir)
    assert abs(loss1 - loss8) <= 1e-5 * abs(loss1)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_shards_params_and_optimizer_state(data_dir):
    mesh = sharding.make_mesh()
    sizes = {}
    for fsdp in (False, True):
        config = runlocal(data_dir, f"mesh.fsdp={fsdp}", "mesh.fsdp_min_size=512")
        t = trainer_lib.build_trainer(config, mesh)
        state = t.init_state(jax.random.PRNGKey(0))
        sizes[fsdp] = sharding.bytes_per_device(state)
    assert sizes[False] / sizes[True] > 6.0, sizes


def test_nonfinite_loss_halts_and_keeps_last_checkpoint(data_dir, tmp_path):
    config = runlocal(data_dir, "total_steps=10", "ckpt_every=2", "log_every=5",
                      "image_every=0")
    trainer_lib.train_and_evaluate(config, str(tmp_path))  # a good run to step 10
    config = runlocal(data_dir, "total_steps=20", "ckpt_every=2", "log_every=5",
                      "image_every=0", "optimizer.lr=1e6", "optimizer.warmup_steps=1",
                      "optimizer.grad_clip=1e30")
    with pytest.raises(trainer_lib.NonFiniteLossError, match="last good checkpoint"):
        trainer_lib.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps[-1] < 20


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path, caplog):
    config = runlocal(data_dir, "total_steps=4", "ckpt_every=2", "log_every=2", "image_every=0")
    trainer_lib.train_and_evaluate(config, str(tmp_path))
    for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "r+b") as fh:
                fh.truncate(max(os.path.getsize(f) // 3, 1))
    t = trainer_lib.build_trainer(config, sharding.make_mesh())
    from titok_jax.train.checkpoint import Checkpointer
    restored = Checkpointer(str(tmp_path / "checkpoints"), keep=3, save_every=2).restore_latest(
        t.abstract_state)
    assert restored is not None and restored[2] == 2
    assert "step 4" in caplog.text and "cannot be restored" in caplog.text


def _train_cmd(workdir, data_dir, *overrides):
    return [sys.executable, "-m", "titok_jax.cli", "train", "--config", f"{CONFIG}:runlocal",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            "--config.progress_bar=False", "--config.image_every=0", *overrides]


def _final_params(workdir):
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.join(workdir, "checkpoints")
    last = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    state = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(last), "state"))
    return last, jax.device_get(state["params"])


def test_kill_minus_nine_and_resume_is_bitwise(data_dir, tmp_path):
    args = ["--config.total_steps=40", "--config.ckpt_every=4", "--config.log_every=4"]
    subprocess.run(_train_cmd(tmp_path / "straight", data_dir, *args), check=True,
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd(tmp_path / "killed", data_dir, *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (ckpts / "8").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (ckpts / "40").exists()
    subprocess.run(_train_cmd(tmp_path / "killed", data_dir, *args), check=True,
                   capture_output=True)
    step_a, a = _final_params(tmp_path / "straight")
    step_b, b = _final_params(tmp_path / "killed")
    assert step_a == step_b == 40
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(data_dir, tmp_path):
    args = ["--config.total_steps=4", "--config.log_every=1", "--config.ckpt_every=0"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(_train_cmd(tmp_path / "single", data_dir, *args), check=True, env=env,
                   capture_output=True)
    port = _free_port()
    env2 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen(
        _train_cmd(tmp_path / "multi", data_dir, *args) + [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    single, multi = scalars(str(tmp_path / "single"), "loss"), scalars(str(tmp_path / "multi"),
                                                                        "loss")
    assert sorted(single) == sorted(multi) == [1, 2, 3, 4]
    for step in single:
        assert abs(single[step] - multi[step]) <= 1e-5 * abs(single[step]), (single, multi)
