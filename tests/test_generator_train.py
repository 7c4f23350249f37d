"""MaskGIT generator training (task maskgit_generator, configs/maskgit.py): the official masking
and MLM loss against the fixture's recorded draws, a runlocal run on the ids of a random tiny
tokenizer that resumes bitwise and exports a generator load_generator samples from, 8 devices
equal 1, and the errors of bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import titok_jax
from titok_jax.convert import native
from titok_jax.convert.official import export_official, write_safetensors
from titok_jax.data import pipeline as data_lib
from titok_jax.infra import sharding
from titok_jax.train import loop
from titok_jax.train import tasks as tasks_lib
from titok_jax.train.losses import MaskDraws, mlm_inputs, mlm_loss

from helpers import DATA, load_config, preempt_at, runlocal, scalars

ARG = "maskgit.py:runlocal"
MLM = os.path.join(DATA, "generator_imagebert_tiny")


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_masking_and_mlm_loss_match_the_official_step():
    """The fixture's draws replayed in their recorded order (timesteps, permutation scores,
    label dropout): masks and masked ids identical, class tokens dropped where drawn, and the
    loss of the generator's logits within 1e-5 of the official MLMLoss."""
    rec = np.load(os.path.join(MLM, "mlm_loss.npz"))
    with open(os.path.join(MLM, "replays.json")) as f:
        replay = json.load(f)["mlm_loss.npz"]
    assert replay["draw_order"] == ["uniform_", "rand", "rand_like"]
    draws = MaskDraws(*(jnp.asarray(rec[k]) for k in ("uniform_timesteps", "rand_permutation",
                                                      "rand_label_drop")))
    tokens, labels = jnp.asarray(rec["tokens"], jnp.int32), jnp.asarray(rec["labels"], jnp.int32)
    masked, masks, cond = mlm_inputs(tokens, labels, draws, 32, 1000, 0.1)
    np.testing.assert_array_equal(masks, rec["masks"])
    np.testing.assert_array_equal(masked, rec["masked_ids"])
    # The rank of each position (argsort of the argsort) would mask other positions.
    ranks = np.argsort(np.argsort(rec["rand_permutation"], -1), -1)
    assert not np.array_equal(ranks < rec["masks"].sum(1, keepdims=True), rec["masks"])
    drop = rec["rand_label_drop"] < 0.1
    assert drop.any() and not drop.all()
    np.testing.assert_array_equal(cond, np.where(drop, 1033, rec["labels"] + 33))

    loss, terms = mlm_loss(jnp.asarray(rec["logits"]), tokens, masks)
    assert abs(float(loss) - float(rec["loss"])) <= 1e-5 * float(rec["loss"])
    assert float(rec["loss"]) == pytest.approx(replay["loss"], rel=1e-7)
    assert float(terms["masked_accuracy"]) == float(rec["correct_tokens"])
    # The whole step: the fixture generator's logits of the masked ids (dropout off).
    manifest = json.load(open(os.path.join(MLM, "manifest.json")))["build"]
    cfg = dict(name="maskgit", arch="bert", hidden_size=manifest["hidden_size"],
               num_layers=manifest["num_hidden_layers"],
               num_heads=manifest["num_attention_heads"],
               intermediate_size=manifest["intermediate_size"], codebook_size=32,
               num_tokens=8, num_classes=1000)
    gen = titok_jax.load_generator(cfg, os.path.join(MLM, "weights.safetensors"))
    logits = gen.module.apply({"params": gen.params}, masked, cond)
    loss, _ = mlm_loss(logits, tokens, masks)
    assert abs(float(loss) - float(rec["loss"])) <= 1e-5 * float(rec["loss"])


def test_runlocal_trains_resumes_bitwise_and_exports(data_dir, tmp_path, monkeypatch):
    config = runlocal(data_dir, "total_steps=3", "optimizer.warmup_steps=0", "ckpt_every=0",
                      "log_every=1", arg=ARG)
    straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
    assert int(straight.step) == 3
    for tag in ("loss", "masked_accuracy", "learning_rate", "grad_norm"):
        logged = scalars(str(tmp_path / "straight"), tag)
        assert sorted(logged) == [1, 2, 3] and all(np.isfinite(list(logged.values()))), tag

    preempt_at(monkeypatch, 2)
    stopped = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(stopped.step) == 2
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    _leaves_equal(jax.device_get(straight), jax.device_get(resumed))
    # Grids of 16 samples (classes i % 7, fixed noise) at the last step, and samples/ at the end..
    grid = np.asarray(Image.open(tmp_path / "straight" / "images" / "step_0000003.png"))
    assert grid.shape[0] > 128 and grid.shape[1] > 4 * grid.shape[0] / 2 - 1
    final = tmp_path / "straight" / "samples"
    assert (final / "grid.png").exists() and (final / "sample_15_class_0001.png").exists()

    # The export is the EMA generator; it samples valid ids, the ids of the task's predictor
    # (labels 0..B-1, key 0, config.sampling), which the tokenizer decodes to images.
    export = tmp_path / "straight" / "export"
    gen = titok_jax.load_generator(config.model, export)
    _leaves_equal(gen.params, jax.device_get(straight.ema_params["generator"]))
    assert native.load_native_config(export).to_dict() == config.model.to_dict()
    ids = gen.sample(np.array([0, 1]), rng=jax.random.PRNGKey(0), **config.sampling)
    assert ids.shape == (2, 32) and 0 <= int(ids.min()) and int(ids.max()) < 256
    task = tasks_lib.get(config)
    out = jax.jit(task.predictor().reconstruct)(task.predict_params(straight, task.frozen()),
                                                jnp.zeros((2, 64, 64, 3)))
    np.testing.assert_array_equal(out["ids"], ids)
    assert out["recon"].shape == (2, 64, 64, 3)
    # A warm start (config.init_from) from the export: params and EMA both.
    t = loop.build_trainer(config, sharding.make_mesh(jax.devices()[:1]))
    warm = jax.device_get(t.task.warm_start(t.init_state(jax.random.PRNGKey(0)), str(export)))
    _leaves_equal(warm.params["generator"], gen.params)
    _leaves_equal(warm.ema_params["generator"], gen.params)


def _steps(config, mesh, data_dir, n):
    t = loop.build_trainer(config, mesh)
    pipe = loop.input_pipeline(t.task.input_kind, config, data_dir, t.task.image_size)
    state = t.init_state(jax.random.PRNGKey(0))
    init = jax.device_get(state.params["generator"])
    history = []
    for step in range(n):
        batch = data_lib.to_global(pipe.batch(step), t.batch_sharding)
        state, metrics = t.step(state, batch, step)
        history.append([float(metrics[k]) for k in ("loss", "grad_norm", "masked_fraction")])
    pipe.close()
    return init, jax.device_get(state.params["generator"]), np.array(history)


def test_eight_devices_equal_one(data_dir):
    # Adam's eps raised to 1e-3 so the update is continuous in the gradient (see
    # test_gan_train.py); real updates from the first step.
    config = runlocal(data_dir, "optimizer.warmup_steps=0", "optimizer.eps=1e-3", arg=ARG)
    init, one, h1 = _steps(config, sharding.make_mesh(jax.devices()[:1]), data_dir, 2)
    _, eight, h8 = _steps(config, sharding.make_mesh(jax.devices()), data_dir, 2)
    assert np.all(np.isfinite(h1))
    np.testing.assert_allclose(h1, h8, rtol=1e-5)
    moved = 0.0
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (one, eight, init))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(a - c))))
    assert moved > 1e-4


def test_tokenizer_weights(data_dir, tmp_path):
    """config.tokenizer.weights: a titok-jax folder or an official file of the configured
    tokenizer gives its params as the frozen part."""
    task = tasks_lib.get(runlocal(data_dir, arg=ARG))
    params = jax.device_get(task.frozen()["tokenizer"])
    native.save_native(tmp_path / "tok", task.tokenizer_config, params)
    write_safetensors(export_official(params, task.tokenizer_config), tmp_path / "tok.safetensors")
    for weights in (tmp_path / "tok", tmp_path / "tok.safetensors"):
        other = tasks_lib.get(runlocal(data_dir, f"tokenizer.weights={weights}",
                                       "tokenizer.allow_random=False", arg=ARG))
        _leaves_equal(other.frozen()["tokenizer"], params)


def test_bad_input_fails_before_any_step(data_dir, tmp_path):
    cases = [
        ("model.codebook_size=512", ValueError, "codebook of 512.*256 codes"),
        ("model.num_tokens=16", ValueError, "16 tokens.*32 tokens"),
        ("tokenizer.allow_random=False", ValueError, "config.tokenizer.weights is empty"),
        ("tokenizer.weights=/nowhere.bin", FileNotFoundError,
         "tokenizer.weights not found.*nowhere.bin"),
        ("init_from=/nowhere.bin", FileNotFoundError, "init_from.*not found.*nowhere.bin"),
        ("eval_every=10 evals=gfid,rfid", ValueError, "gfid only.*'rfid'"),
        ("tokenizer.model.quantize_mode=vae", ValueError, "TiTok VQ tokenizer"),
    ]
    for override, error, message in cases:
        with pytest.raises(error, match=message):
            tasks_lib.get(runlocal(data_dir, *override.split(), arg=ARG))
    with pytest.raises(ValueError, match="variant must be one of"):
        load_config("maskgit.py:variant=BL-64-VQ")
    # A titok-jax tokenizer folder of another shape: the loader names the folder.
    frozen = tasks_lib.get(runlocal(data_dir, arg=ARG)).frozen()
    other = load_config("titok.py:runlocal,variant=tiny-pixel").model
    native.save_native(tmp_path / "tok", other, frozen["tokenizer"])
    with pytest.raises(ValueError, match="tok holds a different model config"):
        tasks_lib.get(runlocal(data_dir, f"tokenizer.weights={tmp_path / 'tok'}",
                               "tokenizer.allow_random=False", arg=ARG)).frozen()


@pytest.mark.parametrize("variant, arch, tokens", [("L-32", "bert", 32), ("B-64", "bert", 64),
                                                    ("S-128", "uvit", 128)])
def test_released_configs(variant, arch, tokens):
    config = load_config(f"maskgit.py:variant={variant}")
    assert config.task == "maskgit_generator" and config.model.arch == arch
    assert config.model.num_tokens == config.tokenizer.model.num_latent_tokens == tokens
    assert config.model.codebook_size == config.tokenizer.model.codebook_size == 4096
    o = config.optimizer
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.warmup_steps, o.end_lr, o.grad_clip) == (
        2e-4, 0.9, 0.96, 0.03, 10_000, 1e-5, 1.0)
    assert (config.total_steps, config.global_batch, config.ema_decay) == (500_000, 2048, 0.999)
    assert config.losses.to_dict() == dict(label_smoothing=0.1, unmasked_weight=0.1,
                                           class_label_dropout=0.1)
    assert config.model.dtype == "bfloat16" and config.mesh.fsdp
    assert config.evals == "gfid" and config.eval_every and config.eval.gfid_num_samples


def test_gfid_evaluates_the_samples_of_the_generator(data_dir):
    """The gfid evaluator: sample i of class i % classes from fold_in(key(gfid_seed), chunk),
    decoded, cast to uint8 by truncation, against the eval split's statistics -- checked
    against the same FID computed through the public Generator / Tokenizer API."""
    from titok_jax.evals import fid as fid_lib
    from titok_jax.evals import runner as eval_lib
    from titok_jax.inference.generator import Generator
    from titok_jax.inference.tokenizer import Tokenizer
    config = runlocal(data_dir, "eval.gfid_num_samples=10", "eval.batch_size=8",
                      "data.eval_split=validation[:12]", arg=ARG)
    task = tasks_lib.get(config)
    mesh = sharding.make_mesh()
    params = task.init_params(jax.random.PRNGKey(3))["generator"]
    frozen = task.frozen()
    evaluation = eval_lib.from_config(config, data_dir, mesh, predictor=task.predictor(),
                                      evals="gfid")
    results = evaluation({"model": params, "frozen": frozen})
    assert results["gfid_num_samples"] == 10 and np.isfinite(results["gfid"])

    gen = Generator(config.model, params)
    tok = Tokenizer(config.tokenizer.model, frozen["tokenizer"])
    images = []
    for c, n in ((0, 8), (1, 2)):
        labels = (np.arange(8) + 8 * c) % config.model.num_classes
        ids = gen.sample(labels, rng=jax.random.fold_in(jax.random.PRNGKey(42), c),
                         **config.sampling)
        x = np.clip(np.asarray(tok.decode_tokens(ids)), 0.0, 1.0)
        images.append((x * 255.0).astype(np.uint8)[:n])  # truncation, as torch's .to(uint8)
    gfid = evaluation.evaluators[0]
    runner = fid_lib.InceptionRunner(gfid.module, gfid.inception, mesh, 8)
    stats = fid_lib.image_statistics(np.concatenate(images), runner)
    real = fid_lib.image_statistics(data_lib.first_eval_images(config.data, data_dir, 12, 64),
                                    runner)
    expected = fid_lib.frechet_distance(stats.mu, stats.sigma, real.mu, real.sigma)
    assert results["gfid"] == pytest.approx(expected, rel=1e-3)


def test_trains_on_pretokenized_data(data_dir, tmp_path):
    """config.data.tokens: batches of a pretokenize output with the (seed, step) order, the
    step trains on them, and a dataset made by another tokenizer is refused."""
    from titok_jax.data import tokens as tokens_lib
    from titok_jax.data.embedded import DATASET_NAME
    from titok_jax.data.pipeline import EpochShuffle
    from titok_jax.inference.tokenizer import Tokenizer
    from titok_jax.jobs import pretokenize as pretokenize_job
    config = runlocal(data_dir, arg=ARG)
    params = tasks_lib.get(config).frozen()["tokenizer"]
    out = str(tmp_path / "tokens")
    pretokenize_job.pretokenize(Tokenizer(config.tokenizer.model, params), DATASET_NAME, data_dir,
                           "validation[:12]", out, batch_size=12, shard_size=12)
    config = runlocal(data_dir, f"data.tokens={out}", "optimizer.warmup_steps=0", arg=ARG)
    t = loop.build_trainer(config, sharding.make_mesh())
    assert t.task.input_kind == "tokens"
    with loop.input_pipeline(t.task.input_kind, config, data_dir) as pipe:
        batch = pipe.batch(1)
    dataset = tokens_lib.TokenDataset(out)
    order = EpochShuffle(len(dataset), config.seed)
    ids, labels = dataset.__getitems__([order(p) for p in range(8, 16)])
    np.testing.assert_array_equal(batch["tokens"], ids)
    np.testing.assert_array_equal(batch["label"], labels)
    state = t.init_state(jax.random.PRNGKey(0))
    state, metrics = t.step(state, data_lib.to_global(batch, t.batch_sharding), 1)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1

    # Tokens of another tokenizer (other weights, same shapes): refused when it loads.
    other = jax.tree_util.tree_map(lambda a: a * 2, params)
    native.save_native(tmp_path / "other_tok", config.tokenizer.model, other)
    with pytest.raises(ValueError, match="tokenized by another tokenizer"):
        tasks_lib.get(runlocal(data_dir, f"data.tokens={out}", "tokenizer.allow_random=False",
                               f"tokenizer.weights={tmp_path / 'other_tok'}", arg=ARG)).frozen()
    with pytest.raises(FileNotFoundError, match="no tokens.json"):
        tasks_lib.get(runlocal(data_dir, f"data.tokens={tmp_path}", arg=ARG))
