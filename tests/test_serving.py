"""``titok-jax serve-export`` (titok_jax.cli.serve_export, titok_jax.jobs.export): tiny random
TiTok VQ and VAE tokenizers, a MaskGIT generator and an ALIT model exported, then run by the
folder's own ``serve.py`` in a child process where titok_jax cannot be imported (``python -S`` with
only site-packages on the path: the editable install's ``.pth`` hook is not read), at batch 1 and
3, against the Python API.
Also: a multi-platform (cpu, cuda, tpu) export, refusal of a non-empty folder, unknown platforms,
a stage-1 model without its VQGAN, and the command line."""
import json
import os
import site
import subprocess
import sys

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax.cli import serve_export as serve_cli
from titok_jax.inference import sampling as sampling
from titok_jax.inference.generator import Generator
from titok_jax.inference.tokenizer import Tokenizer
from titok_jax.jobs import export as serving
from titok_jax.models import variants

ALIT_COUNTS = (4, 8)  # alit_runlocal: 4 tokens per iteration, up to 32

CHILD = """
import json, runpy, sys
try:
    import titok_jax  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("titok_jax is importable in the child")
jobs = json.loads(sys.argv[1])
main = runpy.run_path(jobs[0][0] + "/serve.py")["main"]
for export_dir, inputs, outputs in jobs:
    main(export_dir, inputs, outputs, 2)
"""


def _random_params(module, *inputs, seed: int = 0) -> dict:
    """Random parameters from the abstract ones, without compiling ``init`` (16 s of this file
    on 2 cores): kernels and embeddings N(0, 1/fan_in), unit norm scales, zero biases."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name in ("scale", "bias"):
            return np.full(s.shape, name == "scale", s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _image_spec():
    return jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)


def _tokenizer(variant: str) -> Tokenizer:
    cfg = variants.titok_model_config(variant)
    return Tokenizer(cfg, _random_params(variants.build_model(cfg), _image_spec()))


def _generator(tok: Tokenizer) -> Generator:
    cfg = variants.generator_model_config(
        "titok_l32", arch="bert", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        codebook_size=tok.config.codebook_size, num_tokens=tok.num_tokens, num_classes=7)
    params = _random_params(variants.build_generator(cfg),
                            jax.ShapeDtypeStruct((1, tok.num_tokens), np.int32),
                            jax.ShapeDtypeStruct((1,), np.int32))
    defaults = sampling.SamplingConfig(**variants.GENERATOR_SAMPLING[cfg.variant])
    return Generator(cfg, params, defaults)


def _alit() -> titok_jax.ALITTokenizer:
    cfg = variants.alit_model_config("alit_runlocal")
    return titok_jax.ALITTokenizer(cfg, _random_params(variants.build_model(cfg), _image_spec()))


@pytest.fixture(scope="module")
def models():
    vq = _tokenizer("tiny-vq")
    return dict(vq=vq, vae=_tokenizer("tiny-vae"), gen=_generator(vq), alit=_alit())


def _images(b: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).rand(b, 64, 64, 3).astype(np.float32)


def _cases(models) -> dict[str, dict[str, np.ndarray]]:
    """Per model, the inputs "<function>/<case>/<input>" (cases b1 and b3)."""
    x1, x3 = _images(1, 1), _images(3, 3)
    vq, vae, alit = models["vq"], models["vae"], models["alit"]
    random_ids = np.random.RandomState(0).randint(0, 256, (3, 32)).astype(np.int32)
    ids = np.full((3, alit.max_tokens), -1, np.int32)
    for i, n in enumerate((4, 8, 32)):
        ids[i, :n] = np.random.RandomState(i).randint(0, 256, n)
    cases = {
        "vq": {"encode/b1/images": x1, "encode/b3/images": x3,
               "decode_tokens/b1/ids": np.asarray(vq.encode(x1)),
               "decode_tokens/b3/ids": random_ids,
               "decode_first_tokens/b1/ids": random_ids[:1],
               "decode_first_tokens/b1/num_tokens": np.array([5], np.int32),
               "decode_first_tokens/b3/ids": random_ids,
               "decode_first_tokens/b3/num_tokens": np.array([8, 8, 8], np.int32),
               "decode_first_tokens/mixed/ids": random_ids,
               "decode_first_tokens/mixed/num_tokens": np.array([3, 8, 32], np.int32)},
        "vae": {"encode/b1/images": x1, "encode/b3/images": x3,
                "decode_tokens/b1/latents": np.asarray(vae.encode(x1)),
                "decode_tokens/b3/latents": np.asarray(vae.encode(x3))},
        "gen": {"sample/b1/labels": np.array([5], np.int32),
                "sample/b1/key": np.asarray(jax.random.PRNGKey(1)),
                "sample/b3/labels": np.array([0, 3, 6], np.int32),
                "sample/b3/key": np.asarray(jax.random.PRNGKey(2))},
        "alit": {"decode_tokens/b1/ids": ids[1:2],
                 "decode_tokens/b1/lengths": np.array([8], np.int32),
                 "decode_tokens/b3/ids": ids,
                 "decode_tokens/b3/lengths": np.array([4, 8, 32], np.int32)},
    }
    for n in ALIT_COUNTS:
        cases["alit"].update({f"encode_{n}/b1/images": x1, f"encode_{n}/b3/images": x3})
    return cases


def _runs(counts: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, k) of the runs of equal ``counts``."""
    cuts = [0, *np.flatnonzero(np.diff(counts)) + 1, len(counts)]
    return [(i, j, int(counts[i])) for i, j in zip(cuts[:-1], cuts[1:])]


def _expected(models, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Python API's outputs for the same inputs."""
    m = models[name]
    out = {}
    for key in {k.rsplit("/", 1)[0] for k in inputs}:
        fn, case = key.split("/")
        arg = {k.rsplit("/", 1)[1]: v for k, v in inputs.items() if k.startswith(key + "/")}
        if fn == "encode":
            out[key] = m.encode(arg["images"])
        elif fn == "decode_tokens" and name == "alit":
            out[key] = m.decode(arg["ids"], arg["lengths"])
        elif fn == "decode_tokens":
            out[key] = m.decode_tokens(arg["ids"] if "ids" in arg else arg["latents"])
        elif fn == "decode_first_tokens":  # the API takes [B, k] ids: one k per call
            out[key] = np.concatenate([m.decode_tokens(arg["ids"][i:j, :k]) for i, j, k in
                                       _runs(arg["num_tokens"])])
        elif fn == "sample":
            out[key] = m.sample(arg["labels"], rng=arg["key"])
        else:
            out[key] = m.encode(arg["images"], int(fn.split("_")[1]))
    return {k: np.asarray(v) for k, v in out.items()}


def _run_child(jobs: list[tuple[str, str, str]], cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(site.getsitepackages()), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-S", "-c", CHILD, json.dumps(jobs)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """(the folder of the exports, per model: (signature, served outputs, timings, the API's
    outputs))."""
    root = tmp_path_factory.mktemp("served")
    exports = dict(
        vq=lambda d: serving.export_tokenizer(models["vq"], d),
        vae=lambda d: serving.export_tokenizer(models["vae"], d),
        gen=lambda d: serving.export_generator(models["gen"], d),
        alit=lambda d: serving.export_alit(models["alit"], d, token_counts=ALIT_COUNTS))
    cases, signatures, jobs = _cases(models), {}, []
    for name, export in exports.items():
        signatures[name] = export(str(root / name))
        np.savez(root / f"{name}_in.npz", **cases[name])
        jobs.append((str(root / name), str(root / f"{name}_in.npz"), str(root / f"{name}_out.npz")))
    _run_child(jobs, cwd=tmp_path_factory.mktemp("cwd"))
    result = {}
    for name in exports:
        with np.load(root / f"{name}_out.npz") as npz:
            outs = {k: npz[k] for k in npz.files if k != "timings"}
            timings = json.loads(str(npz["timings"]))
        result[name] = (signatures[name], outs, timings, _expected(models, name, cases[name]))
    return root, result


# Served floats against the API's (images in [0, 1], VAE latents): see the test below.
FLOAT_ATOL = 1e-4


@pytest.mark.parametrize("name", ["vq", "vae", "gen", "alit"])
def test_served_artefacts_match_the_python_api(served, name):
    """Token ids identical at batch 1 and 3; floats within FLOAT_ATOL of the API, also
    ``decode_first_tokens`` with a token count per row against the API's one-k calls, and ALIT
    decode at batch 1 (ids cut to the length by the API, padded to 32 in the artefact).

    The artefact is a deserialised program with a symbolic batch, the API a jit of the module:
    two programs (ALIT decode at batch 1 even has other shapes), whose floats are equal bit for
    bit only where XLA happens to emit the same code. On an AVX-512 host (AMD EPYC Zen 4) every
    float here was bitwise equal; on a Zen 3 host without AVX-512, ALIT ``decode_tokens/b1``
    differed in 6,045 of 12,288 elements by at most 1.7e-5. FLOAT_ATOL keeps a 6x margin."""
    sig, outs, _, expected = served[1][name]
    assert sorted(outs) == sorted(expected) and len(outs) >= 2
    varying = {"vq": "encode/b3", "gen": "sample/b3", "alit": "encode_8/b3"}
    if name in varying:  # ids that vary with the input, so that equal ids mean something
        ids = outs[varying[name]]
        assert len(np.unique(ids[0])) > 3 and (ids[0] != ids[1]).any()
    for key, want in expected.items():
        got = outs[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT_ATOL, err_msg=key)
    fn = sig["functions"]
    batch_first = [t["shape"][0] == "b" for f in fn.values() for t in f["inputs"]
                   if t["name"] != "key"]
    assert all(batch_first) and all(f["output"]["shape"][0] == "b" for f in fn.values())


def test_signature(served):
    vq, _, timings, _ = served[1]["vq"]
    assert vq["model"]["kind"] == "titok" and vq["model"]["num_tokens"] == 32
    assert vq["model"]["codebook_size"] == 256 and vq["platforms"] == ["cpu"]
    enc = vq["functions"]["encode"]
    assert enc["inputs"] == [{"name": "images", "shape": ["b", 64, 64, 3], "dtype": "float32",
                              "range": [0.0, 1.0]}]
    assert enc["output"] == {"name": "ids", "shape": ["b", 32], "dtype": "int32",
                             "range": [0, 255]}
    assert vq["weights"]["file"] == "params.npz" and vq["weights"]["keys"][0].startswith("params/")
    assert vq["functions"]["decode_tokens"]["output"]["range"] == [0.0, 1.0]
    assert [t["name"] for t in vq["functions"]["decode_first_tokens"]["inputs"]] == [
        "ids", "num_tokens"]
    assert served[1]["vae"][0]["functions"]["encode"]["output"]["shape"] == ["b", 32, 12]
    gen = served[1]["gen"][0]["model"]
    assert gen["sampling"] == {"num_sample_steps": 8, "randomize_temperature": 9.5,
                               "guidance_scale": 4.5, "guidance_decay": "linear",
                               "guidance_scale_pow": 3.0, "softmax_temperature_annealing": True}
    alit = served[1]["alit"][0]
    assert sorted(alit["functions"]) == ["decode_tokens", "encode_4", "encode_8"]
    assert alit["model"]["token_counts"] == [4, 8]
    assert set(timings["functions"]["encode"]["b3"]) == {"first_call_s", "call_s"}


def test_wrong_image_size_fails_at_call(served):
    """jax's own shape check of Exported.call names the argument and the expected shape."""
    folder = served[0] / "vq"
    exp = jax.export.deserialize(bytearray((folder / "encode.jaxexport").read_bytes()))
    params = dict(np.load(folder / "params.npz"))
    with pytest.raises(ValueError, match=r"Shape mismatch for args\[1\]\.shape\[1\]"):
        exp.call(params, np.zeros((2, 32, 32, 3), np.float32))


def test_multi_platform_export_and_refusals(models, tmp_path):
    out = tmp_path / "multi"
    sig = serving.export_tokenizer(models["vq"], out, platforms=("cpu", "cuda", "tpu"))
    assert sig["platforms"] == ["cpu", "cuda", "tpu"]
    exp = jax.export.deserialize(bytearray((out / "encode.jaxexport").read_bytes()))
    assert exp.platforms == ("cpu", "cuda", "tpu")
    with pytest.raises(ValueError, match="not an empty folder; not overwriting"):
        serving.export_tokenizer(models["vq"], out)
    with pytest.raises(ValueError, match="unknown platform"):
        serving.export_tokenizer(models["vq"], tmp_path / "x", platforms=("gpu",))
    cfg = variants.titok_model_config("tiny", stage=1)
    stage1 = Tokenizer(cfg, {})
    with pytest.raises(ValueError, match="stage-1 TiTok.*--vqgan"):
        serving.export_tokenizer(stage1, tmp_path / "s1")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s1").exists()


def test_saved_model(models, served, tmp_path):
    """The optional TF SavedModel (jax2tf) of the VQ tokenizer: the same ids; images within
    3e-4 (1.2e-4 measured), as TensorFlow compiles the same StableHLO with its own XLA build and
    CPU settings."""
    tf = pytest.importorskip("tensorflow")
    sig = serving.export_tokenizer(models["vq"], tmp_path / "tf", saved_model=True)
    assert sig["saved_model"]["signatures"] == ["decode_first_tokens", "decode_tokens", "encode"]
    loaded = tf.saved_model.load(str(tmp_path / "tf" / "saved_model"))
    x, ids = _images(3, 3), np.asarray(served[1]["vq"][3]["encode/b3"])
    np.testing.assert_array_equal(loaded.encode(x).numpy(), ids)
    images = loaded.signatures["decode_tokens"](ids=ids)["output_0"].numpy()
    np.testing.assert_allclose(images, np.asarray(models["vq"].decode_tokens(ids)), rtol=0,
                               atol=3e-4)


def test_cli(models, tmp_path, capsys):
    models["vq"].save(tmp_path / "tok")
    out = tmp_path / "served"
    assert serve_cli.main(["--weights", str(tmp_path / "tok"), "--out", str(out),
                         "--platforms", "cpu,tpu"]) == 0
    sig = json.loads((out / "signature.json").read_text())
    assert sig["platforms"] == ["cpu", "tpu"] and sorted(sig["functions"]) == [
        "decode_first_tokens", "decode_tokens", "encode"]
    for args, error in ([("--weights", str(tmp_path / "tok")), "not overwriting"],
                        [(), "exactly one of --weights"]):
        with pytest.raises(SystemExit, match="2"):
            serve_cli.main([*args, "--out", str(out)])
        assert error in capsys.readouterr().err
