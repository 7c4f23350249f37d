"""TiTok: a ViT that compresses a 256x256 image into N 1D tokens, and its ViT decoder.

Layouts: images NHWC in [0, 1]; latents token-major ``[B, N, C]`` (the official code's fake-2D
``[B, C, 1, N]`` is only a storage convention); proxy logits ``[B, 16, 16, K]``.

Variable length (tail drop, as One-D-Piece / FlexTok): the decoder can see only the first k of
the N latent tokens. Rule: the dropped tokens are *removed*, by attention masking. The decoder
sequence is ``[cls, grid mask tokens, latents]``, so the latents are its tail and the keys after
position ``1 + grid**2 + k`` are masked in every block (``kv_lengths``): the kept positions never
see the dropped ones, exactly as if the sequence ended there. No parameter is added, shapes stay
fixed (per-example k is a traced ``[B]`` array) and any released model decodes k < N by the same
rule; with ``num_tokens`` None nothing is masked (the original computation, bit for bit).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.maskgit_vqgan import VQGANArch, VQGANDecoder
from titok_jax.models.quantizer import DiagonalGaussian, QuantizerOutput, VectorQuantizer
from titok_jax.models.vit import DENSE_INIT, LayerStack, layer_norm, transformer_blocks

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ViTArch:
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


def embedding_param(module: nn.Module, name: str, shape: tuple[int, ...], width: int) -> jax.Array:
    """Learned embeddings/tokens, initialised ``width**-0.5 * N(0, 1)`` as in the official code."""
    return module.param(name, nn.initializers.normal(stddev=width ** -0.5), shape, jnp.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; same parameters as ``Conv2d(k=s=patch)``.

    Written as reshape + matmul because XLA:CPU runs a strided conv much slower than a GEMM.
    """

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch_size
        kernel = self.param("kernel", DENSE_INIT, (p, p, c, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.width,), jnp.float32)
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        kernel = kernel.reshape(p * p * c, self.width).astype(self.dtype)
        return x @ kernel + bias.astype(self.dtype)


class TiTokEncoder(nn.Module):
    """ViT over ``[cls, patches, latent tokens]``; returns the projected latents ``[B, N, out]``.

    ``is_legacy`` reproduces the released L-32/B-64/S-128 quirk: the ``[B, N, W]`` latents are
    *reshaped* (not transposed) to ``[B, W, N]`` before the 1x1 ``conv_out``, so output token p
    mixes features ``p, p+N, p+2N, ...`` of every latent token.
    """

    arch: ViTArch
    num_latent_tokens: int
    out_channels: int
    is_legacy: bool
    patch_size: int = 16
    image_size: int = 256
    dtype: Dtype = jnp.float32
    stack: LayerStack = LayerStack()

    @nn.compact
    def __call__(self, images: jax.Array, latent_tokens: jax.Array) -> jax.Array:
        w, n = self.arch.width, self.num_latent_tokens
        grid = self.image_size // self.patch_size
        x = PatchEmbed(w, self.patch_size, self.dtype, name="patch_embed")(images)
        b = x.shape[0]
        cls = embedding_param(self, "class_embedding", (1, w), w)
        pos = embedding_param(self, "positional_embedding", (grid * grid + 1, w), w)
        latent_pos = embedding_param(self, "latent_token_positional_embedding", (n, w), w)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1)
        x = x + pos.astype(x.dtype)
        latents = jnp.broadcast_to((latent_tokens + latent_pos).astype(x.dtype), (b, n, w))
        x = jnp.concatenate([x, latents], axis=1)
        x = layer_norm("ln_pre", self.dtype)(x)
        x = transformer_blocks(x, self.arch.depth, self.arch.num_heads,
                               mlp_ratio=self.arch.mlp_ratio, dtype=self.dtype, stack=self.stack)
        x = layer_norm("ln_post", self.dtype)(x[:, 1 + grid * grid:])
        if self.is_legacy:
            x = x.reshape(b, w, n).swapaxes(1, 2)
        conv_out = nn.Dense(self.out_channels, dtype=self.dtype, kernel_init=DENSE_INIT,
                            name="conv_out")
        return conv_out(x).astype(jnp.float32)


class TiTokDecoder(nn.Module):
    """ViT over ``[cls, grid mask tokens, latents]``; the mask-token outputs go through a head.

    Legacy head (``is_legacy``): 1x1 conv -> tanh -> 1x1 conv to ``proxy_codebook_size`` logits
    per grid cell ``[B, g, g, K]``. Pixel head: 1x1 conv to ``p*p*3``, pixel shuffle with channel
    order (p1, p2, c), 3x3 conv -> RGB ``[B, H, W, 3]``.
    """

    arch: ViTArch
    num_latent_tokens: int
    is_legacy: bool
    proxy_codebook_size: int = 1024
    patch_size: int = 16
    image_size: int = 256
    dtype: Dtype = jnp.float32
    stack: LayerStack = LayerStack()

    @nn.compact
    def __call__(self, z: jax.Array, num_tokens: jax.Array | None = None) -> jax.Array:
        """``z``: latents ``[B, n, C]``, n <= N. ``num_tokens`` (int ``[B]``, optional): decode
        only the first ``num_tokens[b]`` latents of example b (the rest removed by masking)."""
        w, n_max = self.arch.width, self.num_latent_tokens
        grid, p = self.image_size // self.patch_size, self.patch_size
        b, n, _ = z.shape
        x = nn.Dense(w, dtype=self.dtype, kernel_init=DENSE_INIT, name="decoder_embed")(z)
        cls = embedding_param(self, "class_embedding", (1, w), w)
        pos = embedding_param(self, "positional_embedding", (grid * grid + 1, w), w)
        mask_token = embedding_param(self, "mask_token", (1, 1, w), w)
        latent_pos = embedding_param(self, "latent_token_positional_embedding", (n_max, w), w)
        masks = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)),
                                 jnp.broadcast_to(mask_token[0], (b, grid * grid, w))], axis=1)
        masks = (masks + pos).astype(x.dtype)
        x = x + latent_pos[:n].astype(x.dtype)
        x = jnp.concatenate([masks, x], axis=1)
        x = layer_norm("ln_pre", self.dtype)(x)
        kv_lengths = None if num_tokens is None else (
            1 + grid * grid + jnp.asarray(num_tokens, jnp.int32))
        x = transformer_blocks(x, self.arch.depth, self.arch.num_heads,
                               mlp_ratio=self.arch.mlp_ratio, dtype=self.dtype, stack=self.stack,
                               kv_lengths=kv_lengths)
        x = layer_norm("ln_post", self.dtype)(x[:, 1:1 + grid * grid])
        x = x.reshape(b, grid, grid, w)
        if self.is_legacy:
            x = jnp.tanh(nn.Dense(2 * w, dtype=self.dtype, kernel_init=DENSE_INIT, name="ffn_0")(x))
            ffn_2 = nn.Dense(self.proxy_codebook_size, dtype=self.dtype, kernel_init=DENSE_INIT,
                             name="ffn_2")
            return ffn_2(x).astype(jnp.float32)
        x = nn.Dense(p * p * 3, dtype=self.dtype, kernel_init=DENSE_INIT, name="ffn_0")(x)
        x = x.reshape(b, grid, grid, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, grid * p, grid * p, 3)
        x = nn.Conv(3, (3, 3), padding="SAME", dtype=self.dtype, kernel_init=DENSE_INIT,
                    name="conv_out")(x)
        return x.astype(jnp.float32)


class TiTokOutput(NamedTuple):
    decoded: jax.Array          # proxy logits [B, g, g, K] (stage 1) or RGB [B, H, W, 3], unclamped
    encoder_out: jax.Array      # [B, N, C] (VQ) or [B, N, 2C] (VAE moments)
    z_quantized: jax.Array      # the decoder's input, [B, N, C] (tail drop: first k seen)
    ids: jax.Array | None       # int32 [B, N] (VQ) or None
    quantizer: QuantizerOutput | None
    posterior: DiagonalGaussian | None


class TiTok(nn.Module):
    """The TiTok tokenizer (``modeling/titok.py: TiTok``).

    ``finetune_decoder`` adds ``pixel_quantize`` (the MaskGIT-VQGAN codebook) and
    ``pixel_decoder``: ``decode`` then maps proxy logits -> softmax -> soft codebook lookup ->
    VQGAN decoder -> RGB. Without it a legacy model outputs the proxy logits (stage 1) and a
    non-legacy model outputs RGB from its pixel head.
    """

    encoder_arch: ViTArch
    decoder_arch: ViTArch
    num_latent_tokens: int
    token_size: int
    quantize_mode: str = "vq"            # "vq" | "vae"
    codebook_size: int = 4096
    use_l2_norm: bool = True
    commitment_cost: float = 0.25
    is_legacy: bool = True
    finetune_decoder: bool = True
    vqgan_arch: VQGANArch = VQGANArch()
    patch_size: int = 16
    image_size: int = 256
    dtype: Dtype = jnp.float32
    remat: bool = False                    # recompute block activations in the backward
    remat_policy: str = "nothing_saveable"  # what remat keeps (vit.REMAT_POLICIES)
    scan_layers: bool = False              # blocks as one nn.scan over stacked parameters

    def setup(self):
        if self.quantize_mode not in ("vq", "vae"):
            raise ValueError(f"quantize_mode must be 'vq' or 'vae', got {self.quantize_mode!r}")
        if self.finetune_decoder and (self.quantize_mode != "vq" or not self.is_legacy):
            raise ValueError("finetune_decoder needs a legacy VQ model (proxy-code decoder head)")
        vae = self.quantize_mode == "vae"
        self.layer_stack = LayerStack(self.remat, self.remat_policy, self.scan_layers)
        self.latent_tokens = embedding_param(self, "latent_tokens",
                                        (self.num_latent_tokens, self.encoder_arch.width),
                                        self.encoder_arch.width)
        self.encoder = TiTokEncoder(
            self.encoder_arch, self.num_latent_tokens,
            2 * self.token_size if vae else self.token_size,
            self.is_legacy, self.patch_size, self.image_size, self.dtype, self.layer_stack)
        self.decoder = TiTokDecoder(
            self.decoder_arch, self.num_latent_tokens, self.is_legacy,
            self.vqgan_arch.codebook_size, self.patch_size, self.image_size, self.dtype,
            self.layer_stack)
        if not vae:
            self.quantize = VectorQuantizer(self.codebook_size, self.token_size, self.use_l2_norm,
                                            self.commitment_cost)
        if self.finetune_decoder:
            self.pixel_quantize = VectorQuantizer(self.vqgan_arch.codebook_size,
                                                  self.vqgan_arch.z_channels)
            self.pixel_decoder = VQGANDecoder(self.vqgan_arch, self.dtype)

    @property
    def outputs_proxy_codes(self) -> bool:
        """True when ``decode`` returns logits over the VQGAN codes rather than pixels."""
        return self.is_legacy and not self.finetune_decoder

    def encoder_out(self, images: jax.Array) -> jax.Array:
        """Pre-bottleneck latents ``[B, N, C]`` (VAE: ``[B, N, 2C]`` mean|logvar)."""
        return self.encoder(images, self.latent_tokens)

    def encode(self, images: jax.Array) -> QuantizerOutput | DiagonalGaussian:
        """VQ: the quantizer output (ids, straight-through latents, losses). VAE: the posterior."""
        z = self.encoder_out(images)
        if self.quantize_mode == "vae":
            return DiagonalGaussian.from_moments(z)
        return self.quantize(z)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Latents ``[B, N, C]`` for int token ids ``[B, N]`` (VQ only)."""
        return self.quantize.lookup(ids)

    def decode(self, z: jax.Array, num_tokens: jax.Array | None = None) -> jax.Array:
        """Latents ``[B, N, C]`` -> RGB ``[B, H, W, 3]`` (unclamped) or proxy logits.

        ``num_tokens`` (int ``[B]``): only the first k tokens of each example are decoded, the
        others removed by attention masking (see the module docstring)."""
        out = self.decoder(z, num_tokens)
        if self.finetune_decoder:
            probs = jax.nn.softmax(out, axis=-1)
            soft = jnp.einsum("bhwk,kd->bhwd", probs, self.pixel_quantize.embedding)
            out = self.pixel_decoder(soft)
        return out

    def decode_tokens(self, tokens: jax.Array, num_tokens: jax.Array | None = None) -> jax.Array:
        """VQ: int ids ``[B, N]``; VAE: continuous latents ``[B, N, C]``; ``num_tokens`` as in
        :meth:`decode`."""
        return self.decode(tokens if self.quantize_mode == "vae" else self.lookup(tokens),
                           num_tokens)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None,
                 num_tokens: jax.Array | None = None) -> TiTokOutput:
        """Training forward. The VAE samples its posterior from ``rng`` (mode when None).

        ``num_tokens`` (int ``[B]``, tail drop): the decoder sees only the first k tokens of each
        example; the encoder, the quantizer and its losses still cover all N."""
        z = self.encoder_out(images)
        if self.quantize_mode == "vae":
            post = DiagonalGaussian.from_moments(z)
            zq = post.mode() if rng is None else post.sample(rng)
            return TiTokOutput(self.decode(zq, num_tokens), z, zq, None, None, post)
        q = self.quantize(z)
        return TiTokOutput(self.decode(q.z_quantized, num_tokens), z, q.z_quantized, q.ids, q,
                           None)
