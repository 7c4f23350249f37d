"""ALIT: adaptive-length image tokenization by recurrent allocation (Duggal et al., ICLR 2025).

The VQGAN variant as the official ``AdaptiveLengthImageTokenizer`` implements it:

* 2D tokens: the continuous VQGAN encoder output (``z``, not quantized) concatenated on channels
  with a learned patch embedding, flattened row-major and l2-normalised per token; the VQGAN code
  ids of ``z`` are the targets.
* Encoder stream at iteration 0: ``ln_pre([cls, grid] + pos, latents + latent_pos + ts[0])``.
* Iteration k: the encoder runs over the whole stream; all ``n (k+1)`` latents so far go through
  ``ln_post`` -> 12-d factorisation -> l2-normalised VQ -> the latent-distillation decoder, which
  predicts logits over the VQGAN codes for every grid cell from ``[cls, mask tokens] + pos`` and
  the latents. Then the well-reconstructed grid tokens of the stream are replaced by
  ``mask_token + pos`` (halting), ``n`` fresh latents + ``ts[k+1]`` are appended and
  ``ln_recursive`` normalises the whole stream.
* Pixels: ``softmax(logits) @ VQGAN codebook`` through the VQGAN decoder (unclamped).

Halting masks are an explicit input of :meth:`ALIT.step`, so the official Bernoulli rule, a
deterministic threshold rule and injected masks are all the same code path.

Layouts: images NHWC in [0, 1]; streams ``[B, 1 + g*g + n (k+1), D]``; logits ``[B, g*g, K]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.maskgit_vqgan import MaskGITVQGAN, VQGANArch
from titok_jax.models.quantizer import VectorQuantizer, l2_normalize
from titok_jax.models.titok import PatchEmbed, ViTArch, embedding_param
from titok_jax.models.vit import DENSE_INIT, LayerStack, layer_norm, transformer_blocks

Dtype = Any

# Halting modes of :meth:`ALIT.rollout` (how the mask of iteration k is drawn from p_gt).
HALTING_MODES = ("bernoulli", "threshold", "inject", "none")


class IterationOutput(NamedTuple):
    """What iteration k produces (n = tokens per iteration, L = n (k+1))."""

    latent_tokens: jax.Array       # [B, L, D] encoder outputs before ln_post (official encode())
    latent_factorized: jax.Array   # [B, L, token_size]
    latent_quantized: jax.Array    # [B, L, token_size] what the decoder reads (straight-through)
    codes: jax.Array | None        # int32 [B, L] (None for continuous models)
    quantizer_loss: jax.Array      # scalar (0 for continuous models)
    logits: jax.Array              # [B, g*g, K] over the VQGAN codes
    p_gt: jax.Array                # [B, g*g] probability of the true VQGAN code


class BaseTokenizer(nn.Module):
    """Holds the VQGAN under the official ``base_tokenizer.vqgan`` prefix."""

    arch: VQGANArch
    dtype: Dtype = jnp.float32

    def setup(self):
        self.vqgan = MaskGITVQGAN(self.arch, self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.vqgan(images)


class LatentDecoder(nn.Module):
    """Latent-distillation decoder: joint self-attention over ``[queries, latents]``, then a
    ``ln_post -> Linear(2D) -> tanh -> Linear(K)`` head on the grid queries.

    ``lengths`` (int32 ``[B]``, optional) decodes right-padded latents: sequence b attends only
    to its first ``lengths[b]`` latents, which equals decoding it alone at that length.
    """

    arch: ViTArch
    output_dim: int
    max_latent_tokens: int = 256
    factorize: bool = True
    dtype: Dtype = jnp.float32
    stack: LayerStack = LayerStack()

    @nn.compact
    def __call__(self, latents: jax.Array, queries: jax.Array,
                 lengths: jax.Array | None = None) -> jax.Array:
        w = self.arch.width
        n = latents.shape[1]
        if n > self.max_latent_tokens:
            raise ValueError(f"{n} latent tokens exceed the decoder's {self.max_latent_tokens}")
        if self.factorize:
            latents = nn.Dense(w, dtype=self.dtype, kernel_init=DENSE_INIT,
                               name="decoder_embed")(latents)
        pos = embedding_param(self, "latent_token_positional_embedding",
                              (self.max_latent_tokens, w), w)
        latents = latents + pos[:n].astype(latents.dtype)
        x = jnp.concatenate([queries.astype(latents.dtype), latents], axis=1)
        x = layer_norm("ln_pre", self.dtype)(x)
        kv_lengths = None if lengths is None else (queries.shape[1] + lengths).astype(jnp.int32)
        x = transformer_blocks(x, self.arch.depth, self.arch.num_heads,
                               mlp_ratio=self.arch.mlp_ratio, dtype=self.dtype, stack=self.stack,
                               kv_lengths=kv_lengths)
        x = layer_norm("ln_post", self.dtype)(x[:, 1:queries.shape[1]])
        x = jnp.tanh(nn.Dense(2 * w, dtype=self.dtype, kernel_init=DENSE_INIT, name="ffn_0")(x))
        return nn.Dense(self.output_dim, dtype=self.dtype, kernel_init=DENSE_INIT,
                        name="ffn_2")(x).astype(jnp.float32)


class ALIT(nn.Module):
    """The ALIT tokenizer (VQGAN base). Parameter names follow the official state dict."""

    encoder_arch: ViTArch
    decoder_arch: ViTArch
    vqgan_arch: VQGANArch = VQGANArch(num_mid_blocks=2)
    tokens_per_iter: int = 32
    max_iters: int = 8
    quantize_latent: bool = True
    codebook_size: int = 4096
    token_size: int = 12
    use_l2_norm: bool = True
    commitment_cost: float = 0.25
    halting_threshold: float = 0.55
    decoder_max_latent_tokens: int = 256
    patch_size: int = 16
    image_size: int = 256
    dtype: Dtype = jnp.float32
    remat: bool = False                    # recompute block activations in the backward
    remat_policy: str = "nothing_saveable"  # what remat keeps (vit.REMAT_POLICIES)
    scan_layers: bool = False              # blocks as one nn.scan over stacked parameters

    def setup(self):
        grid = self.image_size // self.patch_size
        if grid * self.vqgan_arch.downsample_factor != self.image_size:
            raise ValueError(f"the VQGAN grid ({self.image_size}/"
                             f"{self.vqgan_arch.downsample_factor}"
                             f") must equal the patch grid ({self.image_size}/{self.patch_size})")
        if self.encoder_arch.width <= self.vqgan_arch.z_channels:
            raise ValueError(f"encoder width {self.encoder_arch.width} must exceed the VQGAN's "
                             f"z_channels {self.vqgan_arch.z_channels} (the patch embedding gets "
                             "the difference)")
        we, wd, n = self.encoder_arch.width, self.decoder_arch.width, self.tokens_per_iter
        self.encoder_positional_embedding = embedding_param(self, "encoder_positional_embedding",
                                                       (grid * grid + 1, we), we)
        self.encoder_class_embedding = embedding_param(self, "encoder_class_embedding", (1, we), we)
        self.encoder_mask_token = embedding_param(self, "encoder_mask_token", (1, 1, we), we)
        self.decoder_positional_embedding = embedding_param(self, "decoder_positional_embedding",
                                                       (grid * grid + 1, wd), wd)
        self.decoder_class_embedding = embedding_param(self, "decoder_class_embedding", (1, wd), wd)
        self.decoder_mask_token = embedding_param(self, "decoder_mask_token", (1, 1, wd), wd)
        self.latent_tokens = embedding_param(self, "latent_tokens", (n, we), we)
        self.latent_token_positional_embedding = embedding_param(
            self, "latent_token_positional_embedding", (n, we), we)
        self.timestep_embedding = embedding_param(self, "timestep_embedding",
                                                  (self.max_iters, n, we), we)
        self.encoder_ln_pre = layer_norm("encoder_ln_pre", self.dtype)
        self.encoder_ln_post = layer_norm("encoder_ln_post", self.dtype)
        self.encoder_ln_recursive = layer_norm("encoder_ln_recursive", self.dtype)
        self.pre_quantizer_mlp = nn.Dense(self.token_size, dtype=self.dtype,
                                          kernel_init=DENSE_INIT)
        stack = LayerStack(self.remat, self.remat_policy, self.scan_layers)
        self.encoder = _Encoder(self.encoder_arch, self.dtype, stack)
        self.decoder = LatentDecoder(self.decoder_arch, self.vqgan_arch.codebook_size,
                                     self.decoder_max_latent_tokens, True, self.dtype, stack)
        self.patch_embed = PatchEmbed(we - self.vqgan_arch.z_channels, self.patch_size, self.dtype)
        if self.quantize_latent:
            self.quantize = VectorQuantizer(self.codebook_size, self.token_size, self.use_l2_norm,
                                            self.commitment_cost)
        self.base_tokenizer = BaseTokenizer(self.vqgan_arch, self.dtype)

    # -- pieces ------------------------------------------------------------------------------

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vqgan(self) -> MaskGITVQGAN:
        return self.base_tokenizer.vqgan

    def vqgan_targets(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(continuous VQGAN latents ``[B, g, g, z]``, their code ids ``[B, g*g]``); frozen."""
        z = self.vqgan.encode_latents(images)
        ids = self.vqgan.quantize(z).ids.reshape(z.shape[0], -1)
        return z, ids

    def start(self, images: jax.Array, vqgan_z: jax.Array) -> jax.Array:
        """The encoder stream of iteration 0 ``[B, 1 + g*g + n, D]`` (after ``ln_pre``)."""
        b = images.shape[0]
        we = self.encoder_arch.width
        pe = self.patch_embed(images.astype(self.dtype)).astype(jnp.float32)
        tokens = jnp.concatenate([vqgan_z.reshape(b, -1, vqgan_z.shape[-1]), pe], axis=-1)
        tokens = l2_normalize(tokens)
        cls = jnp.broadcast_to(self.encoder_class_embedding, (b, 1, we))
        x = jnp.concatenate([cls, tokens], axis=1) + self.encoder_positional_embedding
        x = jnp.concatenate([x, self._fresh_latents(b, 0)], axis=1)
        return self.encoder_ln_pre(x)

    def _fresh_latents(self, batch: int, k: int) -> jax.Array:
        lat = (self.latent_tokens + self.latent_token_positional_embedding
               + self.timestep_embedding[k])
        return jnp.broadcast_to(lat, (batch,) + lat.shape)

    def decoder_queries(self, batch: int) -> jax.Array:
        """``[cls, g*g mask tokens] + pos``: the image-independent decoder queries."""
        wd, g2 = self.decoder_arch.width, self.grid_tokens
        q = jnp.concatenate([self.decoder_class_embedding,
                             jnp.broadcast_to(self.decoder_mask_token[0], (g2, wd))], axis=0)
        return jnp.broadcast_to(q + self.decoder_positional_embedding, (batch, g2 + 1, wd))

    def bottleneck(self, latent_tokens: jax.Array):
        """ln_post -> factorisation -> VQ: (factorized, quantized, ids, quantizer loss)."""
        f = self.pre_quantizer_mlp(self.encoder_ln_post(latent_tokens)).astype(jnp.float32)
        if not self.quantize_latent:
            return f, f, None, jnp.zeros((), jnp.float32)
        q = self.quantize(f)
        return f, q.z_quantized, q.ids, q.quantizer_loss

    def decode_logits(self, latents: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Quantized latents ``[B, L, token_size]`` -> logits ``[B, g*g, K]``."""
        return self.decoder(latents, self.decoder_queries(latents.shape[0]), lengths)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Decoder input latents for 1D token ids ``[B, L]``."""
        return self.quantize.lookup(ids)

    def soft_code(self, logits: jax.Array) -> jax.Array:
        """``softmax(logits) @ VQGAN codebook``: ``[B, g*g, z]``."""
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("blk,kd->bld", probs, self.vqgan.quantize.embedding)

    def decode_pixels(self, logits: jax.Array) -> jax.Array:
        """Logits -> RGB ``[B, H, W, 3]`` through the VQGAN decoder (unclamped, as official)."""
        code = self.soft_code(logits)
        side = self.image_size // self.patch_size
        return self.vqgan.decode_latents(code.reshape(code.shape[0], side, side, -1))

    def halt(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Replaces the grid tokens where ``mask`` ([B, g*g] bool) by ``mask_token + pos``."""
        g2 = self.grid_tokens
        masked = self.encoder_mask_token + self.encoder_positional_embedding[1:]
        grid = jnp.where(mask[..., None], masked.astype(x.dtype), x[:, 1:1 + g2])
        return jnp.concatenate([x[:, :1], grid, x[:, 1 + g2:]], axis=1)

    def grow(self, x: jax.Array, k: int) -> jax.Array:
        """Appends the latents of iteration ``k`` and applies ``ln_recursive`` to the stream."""
        return self.encoder_ln_recursive(
            jnp.concatenate([x, self._fresh_latents(x.shape[0], k).astype(x.dtype)], axis=1))

    def step(self, x: jax.Array, gt_ids: jax.Array) -> tuple[jax.Array, IterationOutput]:
        """One iteration before halting: (encoder output stream, outputs)."""
        x = self.encoder(x)
        latent_tokens = x[:, 1 + self.grid_tokens:]
        f, zq, ids, qloss = self.bottleneck(latent_tokens)
        logits = self.decode_logits(zq)
        logp = jax.nn.log_softmax(logits, axis=-1)
        p_gt = jnp.exp(jnp.take_along_axis(logp, gt_ids[..., None], axis=-1)[..., 0])
        return x, IterationOutput(latent_tokens.astype(jnp.float32), f, zq, ids, qloss, logits,
                                  p_gt)

    # -- the recurrence ----------------------------------------------------------------------

    def rollout(self, images: jax.Array, *, num_iters: int | None = None,
                halting: str = "bernoulli", rng: jax.Array | None = None,
                masks: jax.Array | None = None, threshold: float | None = None
                ) -> tuple[jax.Array, list[IterationOutput], list[jax.Array]]:
        """Runs ``num_iters`` iterations (default all); returns (target ids, outputs, masks).

        Halting after iteration k (the mask replaces grid tokens of the stream):
          ``bernoulli``: ``Bernoulli(p_gt) & (p_gt >= threshold)`` from ``fold_in(rng, k)``
          (official; stochastic at inference too; ``masks`` replaces the draws to replay a
          recorded run); ``threshold``: ``p_gt >= threshold``
          (deterministic); ``inject``: ``masks[k]`` (bool ``[num_iters, B, g*g]``) as given;
          ``none``: no halting.
        """
        num_iters = self.max_iters if num_iters is None else num_iters
        if not 1 <= num_iters <= self.max_iters:
            raise ValueError(f"num_iters must be in [1, {self.max_iters}], got {num_iters}")
        if halting not in HALTING_MODES:
            raise ValueError(f"halting must be one of {HALTING_MODES}, got {halting!r}")
        if halting == "bernoulli" and rng is None and masks is None:
            raise ValueError("halting='bernoulli' needs an rng key (or recorded draws as masks; "
                             "halting='threshold' is the deterministic rule)")
        if halting == "inject" and masks is None:
            raise ValueError("halting='inject' needs masks [num_iters, B, grid tokens]")
        thr = self.halting_threshold if threshold is None else threshold
        z, gt_ids = self.vqgan_targets(images)
        z, gt_ids = jax.lax.stop_gradient(z), jax.lax.stop_gradient(gt_ids)
        x = self.start(images, z)
        outs, applied = [], []
        for k in range(num_iters):
            x, out = self.step(x, gt_ids)
            outs.append(out)
            mask = halting_mask(out.p_gt, halting, thr,
                                None if rng is None else jax.random.fold_in(rng, k),
                                None if masks is None else masks[k])
            applied.append(mask)
            if mask is not None:
                x = self.halt(x, mask)
            if k + 1 < num_iters:
                x = self.grow(x, k + 1)
        return gt_ids, outs, applied

    def __call__(self, images: jax.Array, *, halting: str = "threshold", **kwargs):
        """:meth:`rollout` (deterministic threshold halting unless told otherwise) plus pixels
        of the last iteration, so that ``init`` creates every parameter (VQGAN decoder too)."""
        gt_ids, outs, applied = self.rollout(images, halting=halting, **kwargs)
        return gt_ids, outs, applied, self.decode_pixels(outs[-1].logits)


class _Encoder(nn.Module):
    arch: ViTArch
    dtype: Dtype = jnp.float32
    stack: LayerStack = LayerStack()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return transformer_blocks(x, self.arch.depth, self.arch.num_heads,
                                  mlp_ratio=self.arch.mlp_ratio, dtype=self.dtype,
                                  stack=self.stack).astype(jnp.float32)


def halting_mask(p_gt: jax.Array, mode: str, threshold: float, key: jax.Array | None,
                 injected: jax.Array | None) -> jax.Array | None:
    """The grid-token halting mask of one iteration (bool ``[B, g*g]``), or None for no halting.
    The mask carries no gradient (as ``torch.bernoulli``)."""
    p_gt = jax.lax.stop_gradient(p_gt)
    if mode == "none":
        return None
    if mode == "inject":
        return injected.astype(bool)
    keep = p_gt >= threshold
    if mode == "threshold":
        return keep
    # Official: Bernoulli(p_gt) draws (or injected draws, to replay a recorded run), then the
    # entries under the threshold are cleared.
    draws = jax.random.bernoulli(key, p_gt) if injected is None else injected.astype(bool)
    return draws & keep


@dataclasses.dataclass(frozen=True)
class StageOneLoss:
    """Official stage-1 (latent distillation) weights: per iteration ``lambda_k * CE +
    code_weight * MSE(soft code, true code) + quantizer_weight * VQ loss``."""

    lambdas: tuple[float, ...] = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)
    code_weight: float = 1.0
    quantizer_weight: float = 1.0


def stage1_loss(model: ALIT, gt_ids: jax.Array, outs: list[IterationOutput],
                codebook: jax.Array, weights: StageOneLoss = StageOneLoss()):
    """Sum over iterations of the official stage-1 terms; returns (loss, per-iteration terms).

    ``codebook`` is the VQGAN codebook ``[K, z]`` (frozen in stage 1)."""
    del model
    total = jnp.zeros((), jnp.float32)
    terms = {}
    true_code = jnp.take(codebook, gt_ids, axis=0)
    for k, out in enumerate(outs):
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, gt_ids[..., None], axis=-1))
        soft = jnp.einsum("blk,kd->bld", jnp.exp(logp), codebook)
        code = jnp.mean(jnp.square(true_code - soft))
        total = total + weights.lambdas[k] * nll + weights.code_weight * code \
            + weights.quantizer_weight * out.quantizer_loss
        terms.update({f"nll_{k}": nll, f"code_loss_{k}": code,
                      f"quantizer_loss_{k}": out.quantizer_loss,
                      f"accuracy_{k}": jnp.mean(jnp.argmax(out.logits, -1) == gt_ids)})
    return total, terms
