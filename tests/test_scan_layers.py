"""Scanned transformer stacks (``config.model.scan_layers``) and remat policies.

A scanned model stores block i at index i of one ``transformer`` module; everything else must be
unchanged: official weights import into it and export back byte-identical, outputs match the
unrolled model, native folders load in either layout, and training starts from the same weights.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax.convert import official
from titok_jax.convert.layout import to_layout, unstack_layers
from titok_jax.infra.sharding import make_mesh, tree_specs
from titok_jax.models import variants
from titok_jax.models.vit import LayerStack
from titok_jax.train.state import decay_mask, has_scanned_layers

from helpers import DATA, fixture_model_config

ALIT_WEIGHTS = os.path.join(DATA, "alit_tiny_fixture", "weights.safetensors")
VQGAN_WEIGHTS = os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")


def _scanned(cfg, **extra):
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers = True
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_titok_scanned_matches_unrolled_and_exports_official_keys(fixture, inputs, tmp_path):
    fx = fixture("titok_legacy_vq_tiny")
    weights = os.path.join(DATA, "titok_stage1_tiny", "weights.safetensors")
    cfg = fixture_model_config(fx)
    plain = titok_jax.load_tokenizer("", weights, model_config=cfg, vqgan_path=VQGAN_WEIGHTS)
    scan = titok_jax.load_tokenizer("", weights, model_config=_scanned(cfg, remat=True),
                                    vqgan_path=VQGAN_WEIGHTS)
    enc = scan.params["encoder"]
    assert "transformer" in enc and "transformer_0" not in enc
    depth = len([k for k in plain.params["encoder"] if k.startswith("transformer_")])
    assert depth > 1 and enc["transformer"]["ln_1"]["scale"].shape[0] == depth
    # Same ids, same pixels (one compiled block instead of depth: float order may differ).
    ids = plain.encode(inputs)
    np.testing.assert_array_equal(scan.encode(inputs), ids)
    np.testing.assert_allclose(scan.decode_raw(ids), plain.decode_raw(ids), atol=2e-5)
    # Export from the scanned layout: the official keys and tensors exactly.
    state = official.read_state_dict(weights)
    out = str(tmp_path / "scan.safetensors")
    titok_jax.export_pytorch(scan, out)
    exported = official.read_state_dict(out)
    for k in state:
        np.testing.assert_array_equal(exported[k], state[k], k)
    # A native folder saved scanned loads unrolled and the other way round.
    scan.save(tmp_path / "scan_native")
    back = titok_jax.load_tokenizer("", tmp_path / "scan_native", model_config=cfg,
                                    vqgan_path=VQGAN_WEIGHTS)
    _leaves_equal(back.params, plain.params)
    plain.save(tmp_path / "plain_native")
    again = titok_jax.load_tokenizer("", tmp_path / "plain_native",
                                     model_config=_scanned(cfg), vqgan_path=VQGAN_WEIGHTS)
    _leaves_equal(again.params, scan.params)


def test_alit_scanned_matches_unrolled_and_exports_official_keys(inputs, tmp_path):
    plain = titok_jax.load_alit("alit_fixture_tiny", ALIT_WEIGHTS)
    cfg = _scanned(variants.alit_model_config("alit_fixture_tiny"))
    scan = titok_jax.load_alit("alit_fixture_tiny", ALIT_WEIGHTS, model_config=cfg)
    assert "transformer" in scan.params["encoder"]
    ids = plain.encode(inputs, num_tokens=64)      # two iterations of the recurrent encoder
    np.testing.assert_array_equal(scan.encode(inputs, num_tokens=64), ids)
    np.testing.assert_allclose(scan.decode(ids), plain.decode(ids), atol=2e-5)
    out = str(tmp_path / "alit.safetensors")
    titok_jax.export_pytorch(scan, out)
    state, exported = official.read_state_dict(ALIT_WEIGHTS), official.read_state_dict(out)
    assert set(exported) == set(state)
    for k in state:
        np.testing.assert_array_equal(exported[k], state[k], k)


def test_layout_conversion_decay_mask_and_fsdp_specs():
    cfg = variants.titok_model_config("tiny-vq")
    unrolled = variants.build_model(cfg)
    scanned = variants.build_model(_scanned(cfg))
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    rng = jax.random.PRNGKey(0)
    p_unrolled = jax.jit(unrolled.init)(rng, x)["params"]
    abstract = jax.eval_shape(scanned.init, rng, x)["params"]
    stacked = to_layout(p_unrolled, abstract)
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(abstract)
    _leaves_equal(unstack_layers(stacked, ("transformer",)), p_unrolled)
    _leaves_equal(to_layout(stacked, p_unrolled), p_unrolled)
    # The trainer's init draws the unrolled values whatever the layout.
    from titok_jax.convert.layout import init_unrolled
    _leaves_equal(jax.jit(lambda r: init_unrolled(scanned, r, x))(rng), stacked)
    # Weight decay: the same decision for each block as for its unrolled twin.
    name_map = official.name_map_for(cfg)
    m_unrolled = decay_mask(p_unrolled, name_map)
    m_stacked = decay_mask(stacked, name_map)
    for i in range(2):
        block = m_unrolled["encoder"][f"transformer_{i}"]
        assert block == m_stacked["encoder"]["transformer"]
    assert m_stacked["encoder"]["transformer"]["attn"]["in_proj"]["kernel"] is True
    assert m_stacked["encoder"]["transformer"]["ln_1"]["scale"] is False
    # AdamW guards inside the optimizer for stacks (state.adamw_for).
    assert has_scanned_layers(stacked, name_map) and not has_scanned_layers(p_unrolled, name_map)
    # FSDP never shards the layer axis of a stack.
    specs = tree_specs(stacked, make_mesh(), fsdp=True, fsdp_min_size=1)
    for path, spec in jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)):
        if any(getattr(k, "key", None) == "transformer" for k in path):
            assert len(spec) == 0 or spec[0] is None, (path, spec)


def test_remat_policies_by_name():
    """Every named policy (scanned and unrolled in turn) gives the plain stack's gradients;
    a typo is named."""
    import flax.linen as nn

    from titok_jax.models.vit import REMAT_POLICIES, transformer_blocks

    class Stack(nn.Module):
        stack: LayerStack

        @nn.compact
        def __call__(self, x):
            return transformer_blocks(x, 3, 2, stack=self.stack)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    params = Stack(LayerStack()).init(jax.random.PRNGKey(1), x)["params"]

    @functools.partial(jax.jit, static_argnums=0)
    def grads(stack, p):
        return jax.grad(lambda p: jnp.sum(Stack(stack).apply({"params": p}, x) ** 2))(p)
    want = grads(LayerStack(), params)
    stacked = to_layout(params, jax.eval_shape(Stack(LayerStack(scan=True)).init,
                                               jax.random.PRNGKey(1), x)["params"])
    for i, name in enumerate(REMAT_POLICIES):
        for scan in (i % 2 == 0,):   # each policy once, scanned and unrolled in turn
            got = grads(LayerStack(True, name, scan), stacked if scan else params)
            got = to_layout(got, want)
            for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="unknown remat_policy 'dots'.*save_attention"):
        LayerStack(remat=True, remat_policy="dots")
    cfg = variants.titok_model_config("tiny")
    cfg.remat, cfg.remat_policy = True, "everything_saveabel"
    with pytest.raises(ValueError, match="remat_policy 'everything_saveabel'; known"):
        variants.build_model(cfg)
    gen = variants.generator_model_config("titok_l32", remat_policy="dot")
    with pytest.raises(ValueError, match="remat_policy 'dot'; known"):
        variants.build_generator(gen)


@pytest.mark.parametrize("task,extra", [
    ("titok_pixel", ("model.remat=True", "model.remat_policy=save_attention",
                     "mesh.fsdp=True", "mesh.fsdp_min_size=512")),
    pytest.param("alit_stage1", ("model.remat=True",), marks=pytest.mark.slow),
])
def test_scanned_training_equals_unrolled(data_dir, task, extra):
    """Two real updates: a scanned run (with remat, and for TiTok FSDP over 8 devices) starts
    from the unrolled run's weights and follows it (loss, gradient norms, params)."""
    from test_train import REAL_UPDATES, _steps, task_config
    plain = task_config(task, data_dir, *REAL_UPDATES)
    scan = task_config(task, data_dir, *REAL_UPDATES, "model.scan_layers=True", *extra)
    devices = jax.devices() if "mesh.fsdp=True" in extra else jax.devices()[:1]
    p1, g1, loss1 = _steps(plain, make_mesh(jax.devices()[:1]), data_dir)
    p2, g2, loss2 = _steps(scan, make_mesh(devices), data_dir)
    assert abs(loss1 - loss2) <= 1e-5 * abs(loss1), (loss1, loss2)
    np.testing.assert_allclose(g1, g2, rtol=1e-5)
    stacked = jax.tree_util.tree_leaves_with_path(p2)
    assert any("transformer" == getattr(k, "key", None) for path, _ in stacked for k in path)
    p2 = to_layout(p2, p1)
    assert jax.tree_util.tree_structure(p2) == jax.tree_util.tree_structure(p1)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["generator_imagebert_tiny", "generator_uvit_tiny"])
def test_generators_scanned_match_official_fixture(fixture, name, tmp_path):
    """ImageBert (``layer``) and UViT (``in_blocks`` / ``out_blocks``, skips passed last-in
    first-out between two scans) in the scanned layout: the fixture's logits, the official keys
    on export, and the trainer's init equal to the unrolled one."""
    from test_generator import fixture_generator_config
    fx = fixture(name)
    cfg = dict(fixture_generator_config(fx), scan_layers=True, remat=True)
    gen = titok_jax.load_generator(cfg, fx.weights())
    stacked = {"bert": ("model", "encoder", "layer"), "uvit": ("in_blocks",)}[cfg["arch"]]
    node = gen.params
    for k in stacked:
        node = node[k]
    assert node  # a stacked module exists
    for drop, key in ((False, "logits_cond"), (True, "logits_uncond")):
        got = gen.logits(fx["input_ids"], fx["labels"], drop_labels=drop)
        err = float(np.max(np.abs(np.asarray(got, np.float64) - fx[key])))
        assert err <= fx.tolerance(key), f"{name} {key}: max abs error {err:.3g}"
    out = str(tmp_path / "gen.safetensors")
    titok_jax.export_pytorch(gen, out)
    state, exported = official.read_state_dict(fx.weights()), official.read_state_dict(out)
    for k in exported:
        np.testing.assert_array_equal(exported[k], state[k], k)
    from titok_jax.convert.layout import init_unrolled
    module = variants.build_generator(cfg)
    ids = jnp.zeros((1, cfg["num_tokens"]), jnp.int32)
    rng, cond = jax.random.PRNGKey(3), jnp.zeros((1,), jnp.int32)
    plain = variants.build_generator(dict(cfg, scan_layers=False)).init(rng, ids, cond)
    _leaves_equal(to_layout(init_unrolled(module, rng, ids, cond), plain["params"]),
                  plain["params"])
