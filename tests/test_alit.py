"""ALIT: parity with the official code (alit_tiny_fixture), adaptive selection, weights I/O."""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax.convert import official
from titok_jax.convert.layout import CheckpointMismatchError
from titok_jax.models import variants
from titok_jax.models.alit import stage1_loss

from helpers import DATA

FIX = os.path.join(DATA, "alit_tiny_fixture")
WEIGHTS = os.path.join(FIX, "weights.safetensors")


@pytest.fixture(scope="module")
def manifest():
    with open(os.path.join(FIX, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def forced():
    return dict(np.load(os.path.join(FIX, "ref_forced_mask.npz")))


@pytest.fixture(scope="module")
def evalref():
    return dict(np.load(os.path.join(FIX, "ref_eval.npz")))


@pytest.fixture(scope="module")
def alit():
    return titok_jax.load_alit("alit_fixture_tiny", WEIGHTS)


def _tol(manifest, scenario, key):
    return max(1e-4, 4.0 * manifest["npz"][scenario][key]["fp64_max_abs_err"])


def test_forced_mask_parity_every_iteration(alit, inputs, forced, manifest):
    """Injected masks (the mask-token path fires on ~half the grid every iteration)."""
    m = alit.module
    masks = forced["forced_masks"].astype(bool)
    gt, outs, applied, recon = jax.jit(
        lambda p, x, mk: m.apply({"params": p}, x, halting="inject", masks=mk))(
            alit.params, inputs, masks)
    np.testing.assert_array_equal(np.asarray(gt), forced["gt_indices"])
    scen = "ref_forced_mask.npz"
    for k, out in enumerate(outs):
        np.testing.assert_array_equal(np.asarray(out.codes), forced[f"it{k}_codes"], f"it{k}")
        np.testing.assert_array_equal(np.asarray(applied[k]), forced[f"it{k}_applied_mask"] > 0)
        for name, value in (("latent_tokens", out.latent_tokens),
                            ("latent_factorized", out.latent_factorized),
                            ("latent_quantized", out.latent_quantized), ("p_gt", out.p_gt),
                            ("logits", out.logits)):
            key = f"it{k}_{name}"
            if key in forced:
                err = np.abs(np.asarray(value) - forced[key]).max()
                assert err <= _tol(manifest, scen, key), (key, err)
    soft = m.apply({"params": alit.params}, outs[7].logits, method=m.soft_code)
    assert np.abs(np.asarray(soft) - forced["it7_soft_code"]).max() <= _tol(
        manifest, scen, "it7_soft_code")
    err = np.abs(np.asarray(recon) - forced["it7_recon"].transpose(0, 2, 3, 1)).max()
    assert err <= _tol(manifest, scen, "it7_recon"), err


def test_stream_entering_iterations_0_and_1(alit, inputs, forced, manifest):
    """The iteration-0 stream (patch embed, l2 norm, cls/pos, ln_pre) and iteration 1's (halting
    with the mask token, appended latents + timestep embedding, ln_recursive)."""
    m = alit.module

    def streams(m, x, mask0):
        z, gt = m.vqgan_targets(x)
        x0 = m.start(x, z)
        x1, _ = m.step(x0, gt)
        return x0, m.grow(m.halt(x1, mask0), 1)

    x0, x1 = jax.jit(lambda p, x, mk: m.apply({"params": p}, x, mk, method=streams))(
        alit.params, inputs, forced["forced_masks"][0] > 0)
    for k, got in ((0, x0), (1, x1)):
        key = f"it{k}_encoder_in"
        err = np.abs(np.asarray(got) - forced[key]).max()
        assert err <= _tol(manifest, "ref_forced_mask.npz", key), (key, err)


def test_recorded_bernoulli_draws_replay_the_official_eval(alit, inputs, evalref, manifest):
    """The faithful eval forward: Bernoulli draws + threshold 0.55 (recorded draws injected)."""
    m = alit.module
    draws = np.stack([evalref[f"it{k}_bernoulli_raw"] for k in range(8)]) > 0
    assert draws.any()  # some draws fire; the threshold must clear them all
    _, outs, applied, _ = jax.jit(
        lambda p, x, d: m.apply({"params": p}, x, halting="bernoulli", masks=d))(
            alit.params, inputs, draws)
    for k, out in enumerate(outs):
        np.testing.assert_array_equal(np.asarray(out.codes), evalref[f"it{k}_codes"])
        np.testing.assert_array_equal(np.asarray(applied[k]), evalref[f"it{k}_applied_mask"] > 0)
        err = np.abs(np.asarray(out.p_gt) - evalref[f"it{k}_p_gt"]).max()
        assert err <= _tol(manifest, "ref_eval.npz", f"it{k}_p_gt")
    err = np.abs(np.asarray(outs[7].logits) - evalref["it7_logits"]).max()
    assert err <= _tol(manifest, "ref_eval.npz", "it7_logits")


def test_recorded_draws_and_threshold_both_decide_the_mask(alit, inputs, evalref):
    """In the official eval no p_gt reaches 0.55, so that replay cannot tell the halting modes
    apart. At a threshold inside the range of iteration 0's p_gt (which no earlier mask can
    change), the Bernoulli mode must mask exactly draws & (p_gt >= threshold): neither the
    draws alone nor the threshold rule alone."""
    m = alit.module
    draws = np.stack([evalref[f"it{k}_bernoulli_raw"] for k in range(8)]) > 0
    p0 = evalref["it0_p_gt"]
    thr = float(np.median(p0[draws[0]]))
    want = draws[0] & (p0 >= thr)
    assert want.any() and (want != draws[0]).any() and (want != (p0 >= thr)).any()
    run = jax.jit(lambda p, x, d, mode: m.apply({"params": p}, x, halting=mode, masks=d,
                                                threshold=thr, num_iters=1)[2],
                  static_argnums=3)
    np.testing.assert_array_equal(np.asarray(run(alit.params, inputs, draws, "bernoulli")[0]),
                                  want)
    np.testing.assert_array_equal(np.asarray(run(alit.params, inputs, None, "threshold")[0]),
                                  p0 >= thr)


def test_bernoulli_halting_is_seeded(alit, inputs):
    m = alit.module
    fn = jax.jit(lambda p, x, key: m.apply({"params": p}, x, halting="bernoulli", rng=key,
                                           threshold=0.0, num_iters=2)[2])
    a = fn(alit.params, inputs, jax.random.PRNGKey(1))
    b = fn(alit.params, inputs, jax.random.PRNGKey(1))
    c = fn(alit.params, inputs, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert (np.asarray(a[0]) != np.asarray(c[0])).any()
    with pytest.raises(ValueError, match="rng"):
        m.apply({"params": alit.params}, inputs, halting="bernoulli")


def test_stage1_loss_matches_official(alit, inputs, manifest):
    m = alit.module
    ref = manifest["train_stage1_loss"]

    def loss(mod, x):
        gt, outs, _ = mod.rollout(x, halting="threshold")
        return stage1_loss(mod, gt, outs, mod.vqgan.quantize.embedding)

    total, terms = jax.jit(lambda p, x: m.apply({"params": p}, x, method=loss))(
        alit.params, inputs)
    np.testing.assert_allclose(float(total), ref["total_loss"], rtol=1e-5)
    for k, it in enumerate(ref["per_iter"]):
        np.testing.assert_allclose(float(terms[f"nll_{k}"]), it[f"nll_loss_{k}"], rtol=1e-5)
        np.testing.assert_allclose(float(terms[f"code_loss_{k}"]), it[f"code_loss_{k}"],
                                   rtol=1e-5)
        np.testing.assert_allclose(float(terms[f"quantizer_loss_{k}"]),
                                   it[f"quantization_loss_{k}"], rtol=1e-5)


def test_encode_all_and_adaptive_selection(alit, inputs, forced, manifest):
    out = alit.encode_all(inputs, masks=forced["forced_masks"] > 0)
    assert [o["codes"].shape for o in out] == [(2, 8 * (k + 1)) for k in range(8)]
    for k, o in enumerate(out):
        np.testing.assert_array_equal(np.asarray(o["codes"]), forced[f"it{k}_codes"])
        np.testing.assert_allclose(np.asarray(o["l1"]),
                                   manifest["forced_mask_metrics"][k]["l1_per_image"], atol=2e-5)
    l1 = np.stack([np.asarray(o["l1"], np.float64) for o in out])  # [iters, B]

    # The official batch rule at 0.07 (no iteration qualifies -> best batch-mean L1).
    _, lengths = alit.encode_adaptive(inputs, threshold=0.07, per_image=False)
    want = manifest["encode_min_length"][0]["selected_num_tokens"]
    np.testing.assert_array_equal(lengths, [want, want])

    # Per image, at a threshold between the images' curves: each image stops on its own.
    thr = float(np.sort(l1.min(axis=0))[-1] + 1e-4)
    masks = forced["forced_masks"] > 0
    ids, lengths, info = alit.encode_adaptive(inputs, threshold=thr, per_image=True,
                                              masks=masks, return_info=True)
    first = [int(np.argmax(l1[:, i] < thr)) for i in range(2)]
    np.testing.assert_array_equal(lengths, [8 * (f + 1) for f in first])
    assert info["iters_run"] == max(first) + 1  # early exit
    for i, f in enumerate(first):
        np.testing.assert_array_equal(ids[i, :lengths[i]], np.asarray(out[f]["codes"])[i])
        assert (ids[i, lengths[i]:] == -1).all()
    # Decoding the padded ids with their lengths reproduces each chosen reconstruction.
    dec = np.asarray(alit.decode(ids, lengths))
    for i, f in enumerate(first):
        want_img = np.clip(np.asarray(out[f]["recon"])[i], 0, 1)
        assert np.abs(dec[i] - want_img).max() < 1e-3

    # No threshold met: every image gets its lowest-L1 iteration.
    _, lengths = alit.encode_adaptive(inputs, threshold=0.0, masks=masks)
    np.testing.assert_array_equal(lengths, 8 * (np.argmin(l1, axis=0) + 1))


def test_fixed_length_encode_and_bad_inputs(alit, inputs):
    ids = alit.encode(inputs, 16)
    assert ids.shape == (2, 16) and ids.dtype == jnp.int32
    with pytest.raises(ValueError, match="multiple of 8"):
        alit.encode(inputs, 12)
    with pytest.raises(ValueError, match="256, 256, 3"):
        alit.encode_all(inputs[:, :128])
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        alit.decode(np.full((1, 8), 64), [8])
    with pytest.raises(ValueError, match="lengths must be"):
        alit.decode(np.zeros((1, 16), np.int32), [12])
    with pytest.raises(ValueError, match="masks"):
        alit.encode_all(inputs, masks=np.zeros((8, 2, 10), bool))


def _official_checkpoint(path, state, *, extra_ema=None, args=None):
    import torch
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    ema = dict(tensors, **(extra_ema or {}))
    model = {k: v + 1.0 for k, v in tensors.items()}  # different values: check ema is used
    torch.save({"model": model, "ema": ema, "epoch": 3, "scaler": {"scale": 1024.0},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": args or argparse.Namespace(model="alit_small", lr=1e-4)}, path)


def test_official_checkpoint_layout(tmp_path, alit):
    """An official ``.pth`` (model/ema dicts, an argparse.Namespace, stage-2 gan_losses.*)
    loads from ``ema`` with weights_only; export gives back the official state dict."""
    torch = pytest.importorskip("torch")
    state = official.read_state_dict(WEIGHTS)
    gan = {"gan_losses.0.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
           "gan_losses.7.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}
    path = str(tmp_path / "checkpoint-last.pth")
    _official_checkpoint(path, state, extra_ema=gan)
    loaded = titok_jax.load_alit("alit_fixture_tiny", path)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params),
                    jax.tree_util.tree_leaves(alit.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = titok_jax.load_alit("alit_fixture_tiny", path, which="model")
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(model.params)[0]),
                              np.asarray(jax.tree_util.tree_leaves(alit.params)[0]))
    # Export: the official keys and tensors exactly (the gan_losses copies are not model state).
    out = str(tmp_path / "alit.safetensors")
    titok_jax.export_pytorch(loaded, out)
    exported = official.read_state_dict(out)
    assert set(exported) == set(state)
    for k in state:
        np.testing.assert_array_equal(exported[k], state[k], k)
    # A pickle with any other class is refused, not unpickled.
    bad = str(tmp_path / "bad.pth")
    _official_checkpoint(bad, state, args=_Evil())
    with pytest.raises(ValueError, match="refusing to unpickle"):
        titok_jax.load_alit("alit_fixture_tiny", bad)


class _Evil:
    pass


def test_checkpoint_mismatch_names_keys(tmp_path):
    state = official.read_state_dict(WEIGHTS)
    state.pop("timestep_embedding")
    state["encoder_mask_token"] = state["encoder_mask_token"][..., :8]
    state["extra.weight"] = np.zeros(3, np.float32)
    path = str(tmp_path / "broken.safetensors")
    official.write_safetensors(state, path)
    with pytest.raises(CheckpointMismatchError) as e:
        titok_jax.load_alit("alit_fixture_tiny", path)
    msg = str(e.value)
    assert "timestep_embedding" in msg and "extra.weight" in msg
    assert "encoder_mask_token: checkpoint (1, 1, 8)" in msg


def test_native_round_trip(tmp_path, alit, inputs):
    alit.save(tmp_path / "alit")
    again = titok_jax.load_alit("ignored", tmp_path / "alit")
    np.testing.assert_array_equal(np.asarray(again.encode(inputs, 8)),
                                  np.asarray(alit.encode(inputs, 8)))


def test_official_sizes_parameter_counts():
    """Parameter counts of the official configurations (alit.md §3, excluding the VQGAN)."""
    want = {"alit_tiny": 52.8e6, "alit_small": 207.5e6, "alit_base": 174.2e6,
            "alit_semilarge": 409.1e6}
    for name, count in want.items():
        m = variants.build_model(variants.alit_model_config(name))
        shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                                jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))["params"]
        n = sum(int(np.prod(x.shape)) for k, v in shapes.items() if k != "base_tokenizer"
                for x in jax.tree_util.tree_leaves(v))
        vqgan = sum(int(np.prod(x.shape))
                    for x in jax.tree_util.tree_leaves(shapes["base_tokenizer"]))
        assert abs(n - count) < 0.06e6, (name, n)
        assert abs(vqgan - 54.52e6) < 0.01e6


def test_cli_tokenize_adaptive_and_reconstruct(tmp_path, inputs):
    from titok_jax.cli.main import main
    from titok_jax.data.images import save_png
    photos = tmp_path / "photos"
    for i, img in enumerate(inputs):
        save_png(img, str(photos / f"img{i}.png"))
    common = ["--model", "alit_fixture_tiny", "--weights", WEIGHTS, "--images", str(photos)]
    assert main(["tokenize", *common, "--adaptive", "--threshold", "0.6356",
                 "--out", str(tmp_path / "tok.npz")]) == 0
    z = np.load(tmp_path / "tok.npz")
    assert z["ids"].shape == (2, 64) and z["lengths"].shape == (2,)
    assert len(set(z["lengths"].tolist())) == 2  # the two images get different lengths
    for ids, n in zip(z["ids"], z["lengths"]):
        assert (ids[:n] >= 0).all() and (ids[n:] == -1).all()
    assert main(["reconstruct", *common, "--tokens", "16", "--out", str(tmp_path / "rec")]) == 0
    with open(tmp_path / "rec" / "token_counts.json") as f:
        assert json.load(f) == {"img0.png": 16, "img1.png": 16}
    assert (tmp_path / "rec" / "img1_recon.png").exists()
    assert main(["tokenize", *common, "--tokens", "12", "--out", str(tmp_path / "x.npz")]) == 2


def test_alit_stage1_training_learns_and_exports(data_dir, tmp_path):
    """ALIT stage 1 through the shared loop (its resume, sharding and halting guarantees are
    tested with the loop in test_train.py)."""
    from titok_jax.train import loop

    from helpers import runlocal, scalars
    config = runlocal(data_dir, "model.max_iters=2", "num_grid_images=2", "total_steps=20",
                      "log_every=5", "ckpt_every=10", "image_every=20",
                      "optimizer.warmup_steps=5", arg="alit.py:runlocal")
    loop.train_and_evaluate(config, str(tmp_path))
    loss = scalars(str(tmp_path), "loss")
    # It starts at about (2.5 + 2) ln 64 = 18.7 (uniform logits over the 64 VQGAN codes).
    assert loss[20] < 0.95 * loss[5], loss
    for tag in ("nll_0", "nll_1", "accuracy_1", "code_loss_1", "quantizer_loss_0",
                "codebook_usage_last_iter", "grad_norm"):
        assert sorted(scalars(str(tmp_path), tag)) == [5, 10, 15, 20], tag
    # The export is a complete ALIT (frozen VQGAN included) that the API loads.
    alit = titok_jax.load_alit("ignored", tmp_path / "export")
    assert alit.max_iters == 2
    images = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
    ids, lengths = alit.encode_adaptive(images, threshold=0.5)
    assert ids.shape == (2, 8) and set(lengths.tolist()) <= {4, 8}
    assert os.path.isfile(tmp_path / "reconstructions" / "grid.png")


def test_choose_iterations_rules():
    from titok_jax.evals.alit import choose_iterations
    l1 = np.array([[0.5, 0.4, 0.3], [0.2, 0.3, 0.1], [0.5, 0.5, 0.5], [0.6, 0.45, 0.5]])
    np.testing.assert_array_equal(choose_iterations(l1, 0.35), [2, 0, 0, 1])
    # Official rule on batches of 2: means [0.35, 0.35, 0.2] -> first under 0.3 is k=2;
    # [0.55, 0.475, 0.5] -> none under, best is k=1.
    np.testing.assert_array_equal(choose_iterations(l1, 0.3, per_image=False, batch_size=2),
                                  [2, 2, 1, 1])


def test_alit_eval_report_and_plots(alit, inputs, manifest, tmp_path):
    from titok_jax.evals import alit as alit_eval
    padded = np.concatenate([inputs, np.zeros_like(inputs[:1])])
    batches = [(padded, np.array([True, True, False]))]
    report, curves = alit_eval.evaluate(alit, batches, thresholds=(0.6355, 0.7), batch_size=2)
    assert report["num_images"] == 2 and curves["l1"].shape == (2, 8)
    want = [m["l1_per_image"] for m in manifest["eval_metrics"]]  # threshold mode == eval run
    np.testing.assert_allclose(curves["l1"], np.array(want).T, atol=2e-5)
    t = report["thresholds"]["0.7"]["per_image"]
    assert t["mean_tokens"] == 8 and t["histogram"]["8"] == 2 and t["met_threshold"] == 1.0
    paths = alit_eval.write_report(report, curves, str(tmp_path))
    assert all(os.path.getsize(p) > 0 for p in paths)
    with open(paths[0]) as f:
        assert json.load(f)["per_iteration"][7]["tokens"] == 64


def test_cli_alit_eval_on_embedded_split(data_dir, tmp_path):
    from titok_jax.cli.main import main
    out = tmp_path / "eval"
    assert main(["alit-eval", "--model", "alit_fixture_tiny", "--weights", WEIGHTS,
                 "--split", "validation[:3]", "--data-dir", data_dir, "--batch-size", "2",
                 "--dataset", "titok_sample_photos",
                 "--thresholds", "0.1,0.3", "--out", str(out)]) == 0
    with open(out / "alit_eval.json") as f:
        report = json.load(f)
    assert report["num_images"] == 3 and len(report["per_iteration"]) == 8
    assert (out / "alit_token_counts.png").exists()


def test_fixed_length_encode_equals_encode_all(alit, inputs):
    """encode() skips the last decoder pass; its codes are encode_all's."""
    out = alit.encode_all(inputs, num_iters=3, with_recon=False)
    np.testing.assert_array_equal(np.asarray(alit.encode(inputs, 24)),
                                  np.asarray(out[2]["codes"]))


def test_bernoulli_halting_api_matches_module_and_compaction(alit, inputs):
    """With threshold 0 the Bernoulli draws decide the masks. encode_all(rng) reproduces the
    module's rollout(rng); encode_adaptive drops finished images from the batch and still
    returns what the full-batch curves imply."""
    import ml_collections
    cfg = ml_collections.ConfigDict(alit.config.to_dict())
    cfg.halting_threshold = 0.0
    tok = titok_jax.ALITTokenizer(cfg, alit.params)
    x = np.concatenate([inputs, inputs[::-1], inputs])  # 6 images
    key = jax.random.PRNGKey(7)
    m = tok.module
    _, outs, masks = jax.jit(lambda p, x: m.apply({"params": p}, x, halting="bernoulli",
                                                  rng=key, num_iters=4)[:3])(tok.params, x)
    full = tok.encode_all(x, rng=key, num_iters=4)
    for k in range(4):
        assert np.asarray(masks[k]).sum() > 10  # the draws (p ~ p_gt) really mask tokens
        np.testing.assert_array_equal(np.asarray(full[k]["halting_mask"]), np.asarray(masks[k]))
        np.testing.assert_array_equal(np.asarray(full[k]["codes"]), np.asarray(outs[k].codes))
    l1 = np.stack([np.asarray(o["l1"], np.float64) for o in full])  # [4, 6]
    # A threshold that closes some images at iteration 0 and leaves others open.
    thr = float(np.median(l1[0]))
    ids, lengths, info = tok.encode_adaptive(x, threshold=thr, rng=key, num_iters=4,
                                             return_info=True)
    under = l1 < thr
    want = np.where(under.any(0), np.argmax(under, 0), np.argmin(l1, 0))
    np.testing.assert_array_equal(lengths, 8 * (want + 1))
    for i in range(6):
        np.testing.assert_array_equal(ids[i, :lengths[i]], np.asarray(full[want[i]]["codes"])[i])
    assert np.isnan(info["l1"][1:, want == 0]).all()  # closed images left the batch
    np.testing.assert_allclose(info["l1"][0], l1[0], atol=1e-6)


def test_titok_jax_eval_runs_on_alit(alit, data_dir, tmp_path):
    """The shared evaluators (sharded over the 8 test devices) at a chosen ALIT iteration."""
    from titok_jax.cli.main import main
    folder = tmp_path / "alit"
    alit.save(folder)
    out = tmp_path / "eval.json"
    config = os.path.join(os.path.dirname(DATA), "..", "configs", "alit.py:runlocal")
    assert main(["eval", "--config", config, "--checkpoint", str(folder), "--split",
                 "validation[:4]", "--evals", "psnr,codebook,linear_probe", "--out", str(out),
                 f"--config.data.data_dir={data_dir}", "--config.eval.alit_iteration=1",
                 "--config.eval.probe_train_split=train[:16]",
                 "--config.eval.probe_test_split=train[16:24]",
                 "--config.eval.probe_steps=20"]) == 0
    with open(out) as f:
        results = json.load(f)["results"]
    assert 0 < results["psnr"] < 60 and 0 < results["codebook_usage"] <= 1
    # The probe ran on exactly the requested rows (its accuracy is checked in test_evals.py).
    assert results["linear_probe_num_train"] == 16 and results["num_images"] == 4
