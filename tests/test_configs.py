"""Every config file and every released variant builds; sizes match the official models."""
import dataclasses
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.convert.official import TITOK_MAP, VQGAN_MAP
from titok_jax.infra.config import parse_arg
from titok_jax.models import variants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def abstract_params(cfg):
    module = variants.build_model(cfg)
    size = cfg.get("image_size", 256)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# Official parameter counts and state-dict sizes (reference run of the official code).
OFFICIAL = {"L-32": (641.05e6, 692), "B-64": (204.81e6, 404), "S-128": (83.67e6, 308),
            "BL-64-VQ": (390.0e6, None), "LL-32-VAE": (606.9e6, None)}


def test_config_files_exist():
    assert {os.path.basename(p) for p in CONFIG_FILES} >= {"titok.py", "maskgit_vqgan.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_builds(path):
    mod = load_config_module(path)
    args = [None, "runlocal"]
    if path.endswith("titok.py"):
        args += [f"variant={v}" for v in variants.TITOK_VARIANTS]
        args += ["variant=L-32,stage=1", "variant=S-128,stage=2"]
    for arg in args:
        cfg = mod.get_config(arg)
        if cfg.model.name == "maskgit":  # a generator (configs/maskgit.py)
            module = variants.build_generator(cfg.model)
            assert type(module).__name__ == {"bert": "ImageBert",
                                             "uvit": "UViTBert"}[cfg.model.arch]
            assert module.arch.codebook_size == cfg.tokenizer.model.codebook_size
        else:
            module = variants.build_model(cfg.model)
            # The module is the configured model, built with the config's field values.
            assert type(module).__name__ == {"titok": "TiTok", "alit": "ALIT",
                                             "maskgit_vqgan": "MaskGITVQGAN"}[cfg.model.name]
            fields = ({f.name for f in dataclasses.fields(module)} & set(cfg.model)
                      - {"name", "dtype"})
            assert {k: getattr(module, k) for k in fields} == {k: cfg.model[k] for k in fields}
        with pytest.raises(AttributeError):
            cfg.model.not_a_key = 1  # configs are locked: unknown keys raise


def test_unknown_config_arguments_raise():
    mod = load_config_module(os.path.join(ROOT, "configs", "titok.py"))
    with pytest.raises(ValueError, match="unknown config argument 'varaint'"):
        mod.get_config("varaint=L-32")
    with pytest.raises(ValueError, match="unknown TiTok variant"):
        mod.get_config("variant=XL-16")
    with pytest.raises(ValueError, match="single-stage"):
        mod.get_config("variant=BL-64-VQ,stage=1")
    with pytest.raises(ValueError, match="needs a value"):
        parse_arg("variant", variant="L-32")


def test_unknown_model_keys_raise():
    cfg = variants.titok_model_config("S-128").to_dict()
    cfg["num_layers"] = 3
    with pytest.raises(ValueError, match=r"unknown model config keys \['num_layers'\]"):
        variants.build_model(cfg)
    with pytest.raises(ValueError, match="unknown model"):
        variants.model_config_for("titok_xl16")


@pytest.mark.parametrize("variant", sorted(variants.TITOK_VARIANTS))
def test_released_variants_match_official_sizes(variant):
    cfg = variants.titok_model_config(variant)
    params = abstract_params(cfg)
    entries = TITOK_MAP.entries(params)  # the converter map covers every parameter
    if variant in OFFICIAL:
        n_params, n_tensors = OFFICIAL[variant]
        assert abs(count(params) - n_params) / n_params < 5e-4, count(params)
        if n_tensors is not None:
            assert len(entries) == n_tensors


def test_maskgit_vqgan_size():
    params = abstract_params(variants.vqgan_model_config("maskgit"))
    assert len(VQGAN_MAP.entries(params)) == 168
    assert abs(count(params) - 54.52e6) / 54.52e6 < 5e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant",
                         [v for v in variants.TITOK_VARIANTS if not v.startswith("tiny")])
def test_full_size_converter_roundtrip(variant):
    """Random-init official-layout state dict of the right shapes -> import -> export equals."""
    from titok_jax.convert.layout import export_state_dict, import_state_dict
    cfg = variants.titok_model_config(variant)
    params = abstract_params(cfg)
    rng = np.random.default_rng(0)
    state = {e.torch_key: rng.standard_normal(
        e.transform.to_torch(np.empty(_shape(params, e.flax_path), np.uint8)).shape,
        dtype=np.float32) for e in TITOK_MAP.entries(params)}
    imported = import_state_dict(state, params, TITOK_MAP)
    exported = export_state_dict(imported, TITOK_MAP)
    assert exported.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def _shape(tree, path):
    for p in path:
        tree = tree[p]
    return tree.shape
