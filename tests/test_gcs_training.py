"""A training run whose workdir is ``gs://`` (the fake-gcs-server emulator on loopback): killed
with -9, resumed from the bucket, bitwise equal to an uninterrupted local run; then
``titok-jax eval`` and ``load_tokenizer`` on the exported ``gs://`` folder.

TensorBoard is off for the bucket run: TensorFlow's event writer reaches GCS through its own
client, whose endpoints cannot be pointed at an emulator (on real GCS it writes gs:// itself).
Everything else the loop writes -- Orbax checkpoints (tensorstore), image grids, eval JSON, the
export -- goes to the emulator, which the test checks by listing the bucket independently.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

import titok_jax
from titok_jax.infra import checkpointing

from helpers import ROOT

# Enough steps that the kill, once step 4 is committed, lands well before the end.
ARGS = ["--config.total_steps=24", "--config.ckpt_every=4", "--config.log_every=4",
        "--config.optimizer.warmup_steps=0", "--config.image_every=24",
        "--config.num_grid_images=2", "--config.tensorboard=False"]


def _train_cmd(workdir, data_dir):
    return [sys.executable, "-m", "titok_jax.cli", "train", "--config",
            os.path.join(ROOT, "configs", "titok.py:runlocal"), "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", "--config.progress_bar=False", *ARGS]


def test_gs_workdir_survives_kill_and_matches_local_run(data_dir, tmp_path, gcs_emulator):
    env = {**os.environ, **gcs_emulator.env()}
    local, remote = tmp_path / "local", gcs_emulator.new_dir()
    subprocess.run(_train_cmd(local, data_dir), check=True, capture_output=True, env=env)

    proc = subprocess.Popen(_train_cmd(remote, data_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(
            o.endswith("/checkpoints/4/commit_success.txt")  # committed, not half-written
            for o in gcs_emulator.objects(remote)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not any(o.endswith("/checkpoints/24/commit_success.txt")
                   for o in gcs_emulator.objects(remote))
    done = subprocess.run(_train_cmd(remote, data_dir), capture_output=True, env=env, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stderr

    # Everything landed in the bucket, nothing in a local folder named "gs:".
    objects = gcs_emulator.objects(remote)
    for part in ("/checkpoints/24/commit_success.txt", "/export/params.safetensors",
                 "/export/config.json", "/images/step_0000024.png", "/reconstructions/grid.png"):
        assert any(part in o for o in objects), part
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(ROOT, "gs:"))

    a, _, step_a = checkpointing.read_latest(str(local))
    b, meta, step_b = checkpointing.read_latest(remote)
    assert step_a == step_b == 24 and meta["task"] == "titok_pixel"
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)

    # The exported gs:// folder: the API loads it, titok-jax eval evaluates it into the bucket.
    tok = titok_jax.load_tokenizer("", f"{remote}/export")
    local_tok = titok_jax.load_tokenizer("", str(local / "export"))
    images = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(tok.reconstruct(images)),
                                  np.asarray(local_tok.reconstruct(images)))
    out = f"{remote}/eval/psnr.json"
    ev = subprocess.run(
        [sys.executable, "-m", "titok_jax.cli", "eval", "--config",
         os.path.join(ROOT, "configs", "titok.py:runlocal"), "--checkpoint", f"{remote}/export",
         "--evals", "psnr", "--split", "validation[:8]", "--out", out,
         f"--config.data.data_dir={data_dir}", "--config.eval.batch_size=8",
         "--config.tensorboard=False"],
        capture_output=True, env=env, text=True)
    assert ev.returncode == 0, ev.stderr[-3000:]
    from etils import epath
    results = json.loads(epath.Path(out).read_text())["results"]
    assert results["num_images"] == 8 and 5.0 < results["psnr"] < 60.0
