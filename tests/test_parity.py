"""Parity with the official PyTorch code on the shared tiny fixtures (random weights).

Each test loads the official-layout weights through the public API and compares every recorded
intermediate: token ids exactly, floats within max(1e-4, 4 x the reference's own fp64 error),
scalar losses to a relative 1e-5.
"""
import os

import numpy as np
import pytest

import titok_jax
from titok_jax.train.losses import stage1_loss

from helpers import DATA, fixture_model_config


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def tokens_major(a):
    """Official fake-2D latents [B, C, 1, N] -> [B, N, C]."""
    return np.asarray(a)[:, :, 0, :].transpose(0, 2, 1)


def assert_close(got, want, tol, what):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def assert_ids(got, want, margin, what):
    got, want = np.asarray(got), np.asarray(want).reshape(np.shape(got))
    differ = got != want
    # A near-tie (2nd-best minus best distance < 1e-5) may legitimately flip.
    assert not np.any(differ & (np.asarray(margin).reshape(got.shape) >= 1e-5)), what


def assert_scalar(got, want, what):
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)) + 1e-8, (
        f"{what}: {float(got)} vs {float(want)}")


VQGAN_WEIGHTS = os.path.join(DATA, "maskgit_vqgan_tiny", "weights.safetensors")


@pytest.fixture(scope="module")
def vqgan():
    return titok_jax.load_vqgan(VQGAN_WEIGHTS, "maskgit_vqgan_tiny")


def test_maskgit_vqgan(vqgan, inputs, fixture):
    fx = fixture("maskgit_vqgan_tiny")
    m, v = vqgan.module, {"params": vqgan.params}
    z = m.apply(v, inputs, method=m.encode_latents)
    assert_close(z, nhwc(fx["encoder_out"]), fx.tolerance("encoder_out"), "encoder_out")
    codes = vqgan.encode(inputs)
    assert codes.dtype == np.int32 and codes.shape == (2, 256)
    assert_ids(codes, fx["codes"], fx["code_margin"], "codes")
    zq = m.apply(v, fx["codes"], method=m.lookup)
    assert_close(zq, nhwc(fx["z_quantized"]), fx.tolerance("z_quantized"), "z_quantized")
    decoded = m.apply(v, zq, method=m.decode_latents)
    want = nhwc(fx["decoded_unclamped"])
    assert_close(decoded, want, fx.tolerance("decoded_unclamped"), "decoded_unclamped")
    assert_close(vqgan.decode(fx["codes"]), np.clip(want, 0, 1), fx.tolerance("decoded_unclamped"),
                 "decoded (clamped)")


def _check_vq_encode(tok, fx, inputs):
    m, v = tok.module, {"params": tok.params}
    assert_close(m.apply(v, inputs, method=m.encoder_out), tokens_major(fx["encoder_out"]),
                 fx.tolerance("encoder_out"), "encoder_out")
    q = m.apply(v, inputs, method=m.encode)
    assert_close(q.z_quantized, tokens_major(fx["z_quantized"]), fx.tolerance("z_quantized"),
                 "z_quantized")
    for name in ("quantizer_loss", "commitment_loss", "codebook_loss"):
        assert_scalar(getattr(q, name), fx[name], name)
    ids = tok.encode(inputs)
    assert ids.dtype == np.int32 and ids.shape == (2, tok.num_tokens)
    assert_ids(ids, fx["tokens"][:, 0], fx["token_margin"], "tokens")
    return q


def test_titok_legacy_two_stage(fixture, inputs):
    """The released-model path: legacy reshape, l2 VQ, proxy logits -> soft VQGAN lookup ->
    VQGAN decoder. Weights: the stage-1 file + the VQGAN merged in as pixel_* (stage-2 init)."""
    fx = fixture("titok_legacy_vq_tiny")
    tok = titok_jax.load_tokenizer("",
                                   os.path.join(DATA, "titok_stage1_tiny", "weights.safetensors"),
                                   model_config=fixture_model_config(fx), vqgan_path=VQGAN_WEIGHTS)
    _check_vq_encode(tok, fx, inputs)
    m, v = tok.module, {"params": tok.params}
    zq = m.apply(v, fx["tokens"][:, 0], method=m.lookup)
    logits = m.apply(v, zq, method=lambda mod, z: mod.decoder(z))
    assert_close(logits, nhwc(fx["decoder_logits"]), fx.tolerance("decoder_logits"), "logits")
    want = nhwc(fx["decoded_from_tokens"])
    tol = fx.tolerance("decoded_from_tokens")
    assert_close(tok.decode_raw(fx["tokens"]), want, tol, "decoded_from_tokens")
    assert_close(tok.decode_tokens(fx["tokens"][:, 0]), np.clip(want, 0, 1), tol, "clipped")


def test_titok_stage1_and_loss(fixture, inputs):
    fx = fixture("titok_stage1_tiny")
    tok = titok_jax.load_tokenizer("", fx.weights(), model_config=fixture_model_config(fx),
                                   vqgan_path=VQGAN_WEIGHTS)
    q = _check_vq_encode(tok, fx, inputs)
    logits = tok.decode_raw(fx["tokens"][:, 0])
    assert_close(logits, nhwc(fx["decoder_logits"]), fx.tolerance("decoder_logits"), "logits")
    # The stage-1 target: the frozen VQGAN's codes of the same images.
    proxy = tok.vqgan.encode(inputs)
    np.testing.assert_array_equal(proxy, fx["proxy_codes"])
    total, terms = stage1_loss(logits, proxy, q)
    assert_scalar(total, fx["stage1_total_loss"], "stage1 total loss")
    for name, want in fx.manifest["stage1_loss"]["values"].items():
        if name != "total_loss":
            assert_scalar(terms[name], want, name)
    # Stage-1 decode_tokens: argmax proxy codes decoded by the VQGAN, in [0, 1].
    images = tok.decode_tokens(fx["tokens"][:, 0])
    assert images.shape == (2, 256, 256, 3) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_titok_vq_pixel_head(fixture, inputs):
    """Non-legacy per-token projection, plain VQ, encoder 64 / decoder 96, pixel-shuffle head."""
    fx = fixture("titok_vq_pixel_tiny")
    tok = titok_jax.load_tokenizer("", fx.weights(), model_config=fixture_model_config(fx))
    _check_vq_encode(tok, fx, inputs)
    want = nhwc(fx["decoded_from_tokens"])
    assert_close(tok.decode_raw(fx["tokens"]), want, fx.tolerance("decoded_from_tokens"), "decoded")


def test_titok_vae(fixture, inputs):
    fx = fixture("titok_vae_tiny")
    tok = titok_jax.load_tokenizer("", fx.weights(), model_config=fixture_model_config(fx))
    m, v = tok.module, {"params": tok.params}
    assert_close(m.apply(v, inputs, method=m.encoder_out), tokens_major(fx["encoder_out"]),
                 fx.tolerance("encoder_out"), "encoder_out")
    post = tok.encode_posterior(inputs)
    assert_close(post.mean, tokens_major(fx["posterior_mean"]), fx.tolerance("posterior_mean"),
                 "mean")
    assert_close(post.logvar, tokens_major(fx["posterior_logvar"]),
                 fx.tolerance("posterior_logvar"), "logvar")
    assert_close(post.kl(), fx["kl"], fx.tolerance("kl"), "kl")
    latents = tok.encode(inputs)
    np.testing.assert_array_equal(latents, post.mean)
    assert_close(tok.decode_raw(latents), nhwc(fx["decoded"]), fx.tolerance("decoded"), "decoded")
