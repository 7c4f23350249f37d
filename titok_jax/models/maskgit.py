"""The MaskGIT generators that TiTok pairs with: ``ImageBert`` (L-32, B-64) and ``UViTBert``
(S-128), bidirectional transformers over ``[class token, N image token ids]``.

Token space (vocabulary ``K + num_classes + 2`` for a tokenizer codebook of size K): ids
``0..K-1`` are image tokens, ``K`` is the mask token, ``K + 1 + c`` is class ``c`` and
``K + 1 + num_classes`` is the "no class" label that classifier-free guidance conditions on.
Both models return logits ``[B, N, K]`` over the image tokens for the N image positions (the
class position's output is dropped).

Submodule names follow the official state-dict keys: ImageBert wraps a HuggingFace ``BertModel``
(``model.embeddings.*``, ``model.encoder.layer.{i}.*``, ``model.lm_head``); UViTBert holds
``embeddings``, ``pos_embed``, ``in_blocks.{i}``, ``mid_block``, ``out_blocks.{i}``, ``norm``
and ``lm_head``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.vit import LayerStack, layer_norm

Dtype = Any

# BertModel.post_init and UViTBert._init_weights: N(0, 0.02) weights (truncated at +-2 absolute
# in UViT, which is effectively untruncated), zero biases.
_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class GeneratorArch:
    """The transformer of a generator and its token space.

    ``kind`` is ``"bert"`` (ImageBert; ``dropout`` on hidden states and ``attn_dropout`` on
    attention probabilities in train mode) or ``"uvit"`` (UViTBert, no dropout;
    ``num_layers // 2`` blocks on each side of its middle block). ``codebook_size`` is the
    tokenizer's K and ``num_tokens`` its N.
    """

    kind: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    codebook_size: int
    num_tokens: int
    num_classes: int = 1000
    dropout: float = 0.1
    attn_dropout: float = 0.1

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 2


def class_tokens(labels: jax.Array, drop: jax.Array | bool, codebook_size: int,
                 num_classes: int) -> jax.Array:
    """The class-token ids of ``labels`` [B]; where ``drop`` holds, the "no class" id."""
    return jnp.where(drop, codebook_size + 1 + num_classes, labels + codebook_size + 1)


def _attention(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
               dropout: float, train: bool) -> jax.Array:
    """Softmax attention over ``[B, L, H*D]`` projections whose heads are contiguous D-slices;
    dropout on the attention probabilities in train mode (draws from ``module``'s rng)."""
    b, n, width = q.shape
    q, k, v = (t.reshape(b, n, num_heads, width // num_heads) for t in (q, k, v))
    if train and dropout > 0:
        out = nn.dot_product_attention(q, k, v, dropout_rate=dropout, deterministic=False,
                                       dropout_rng=module.make_rng("dropout"))
    else:
        out = nn.dot_product_attention(q, k, v)
    return out.reshape(b, n, width)


def _with_class_token(ids: jax.Array, cond: jax.Array) -> jax.Array:
    return jnp.concatenate([cond[:, None], ids], axis=1).astype(jnp.int32)


_Dense = functools.partial(nn.Dense, kernel_init=_INIT)


class _Part(nn.Module):
    """A piece of a generator: the architecture, the compute dtype and how block stacks run."""

    arch: GeneratorArch
    dtype: Dtype = jnp.float32
    stack: LayerStack = LayerStack()


class _Generator(_Part):
    """Top level: ``remat`` / ``remat_policy`` / ``scan_layers`` as model-config fields (scanned,
    the blocks' parameters are stacked under ``layer``, ``in_blocks`` and ``out_blocks``)."""

    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False

    @property
    def layers(self) -> LayerStack:
        return LayerStack(self.remat, self.remat_policy, self.scan_layers)


class BertOutput(_Part):
    """``dense``, dropout, ``LayerNorm(. + residual)``: HF ``BertSelfOutput`` / ``BertOutput``."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, train: bool) -> jax.Array:
        x = _Dense(self.arch.hidden_size, dtype=self.dtype, name="dense")(x)
        x = nn.Dropout(self.arch.dropout, deterministic=not train)(x)
        return layer_norm("LayerNorm", self.dtype, eps=1e-12)(x + residual)


class BertSelfAttention(_Part):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        q, k, v = (_Dense(self.arch.hidden_size, dtype=self.dtype, name=n)(x)
                   for n in ("query", "key", "value"))
        return _attention(self, q, k, v, self.arch.num_heads, self.arch.attn_dropout, train)


class BertAttention(_Part):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        a = BertSelfAttention(self.arch, self.dtype, name="self")(x, train)
        return BertOutput(self.arch, self.dtype, name="output")(a, x, train)


class BertIntermediate(_Part):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _Dense(self.arch.intermediate_size, dtype=self.dtype, name="dense")(x)
        return nn.gelu(x, approximate=False)


class BertLayer(_Part):
    """HF ``BertLayer``: post-LN attention and MLP sub-blocks, exact-erf GELU."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = BertAttention(self.arch, self.dtype, name="attention")(x, train)
        h = BertIntermediate(self.arch, self.dtype, name="intermediate")(x)
        return BertOutput(self.arch, self.dtype, name="output")(h, x, train)


class BertEmbeddings(_Part):
    """Word + absolute position + token-type-0 embeddings, LayerNorm (eps 1e-12), dropout."""

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
        def table(name: str, rows: int) -> nn.Embed:
            return nn.Embed(rows, self.arch.hidden_size, embedding_init=_INIT, dtype=self.dtype,
                            name=name)
        # BERT keeps two token-type rows; every position here is type 0.
        x = (table("word_embeddings", self.arch.vocab_size)(tokens)
             + table("position_embeddings", self.arch.num_tokens + 1)(
                 jnp.arange(tokens.shape[1]))
             + table("token_type_embeddings", 2)(jnp.zeros((), jnp.int32)))
        x = layer_norm("LayerNorm", self.dtype, eps=1e-12)(x)
        return nn.Dropout(self.arch.dropout, deterministic=not train)(x)


class _BertBlock(BertLayer):
    """A ``BertLayer`` whose train flag is an attribute (static under remat and scan)."""

    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x, self.train)


class _BertScanStep(_BertBlock):
    @nn.compact
    def __call__(self, x: jax.Array):
        return super().__call__(x), None


class BertEncoder(_Part):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        n, st = self.arch.num_layers, self.stack
        if st.scan:
            scanned = nn.scan(st.wrap(_BertScanStep), variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True}, length=n)
            return scanned(self.arch, self.dtype, train=train, name="layer")(x)[0]
        for i in range(n):
            x = st.wrap(_BertBlock)(self.arch, self.dtype, train=train, name=f"layer_{i}")(x)
        return x


class BertModel(_Part):
    """HF ``BertModel`` without pooler, with the generator's ``lm_head`` attached to it."""

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool) -> jax.Array:
        x = BertEmbeddings(self.arch, self.dtype, name="embeddings")(tokens, train)
        x = BertEncoder(self.arch, self.dtype, self.stack, name="encoder")(x, train)
        return _Dense(self.arch.codebook_size, dtype=self.dtype, name="lm_head")(x[:, 1:])


class ImageBert(_Generator):
    """The ImageBert generator (``arch.kind == "bert"``)."""

    @nn.compact
    def __call__(self, ids: jax.Array, cond: jax.Array, train: bool = False) -> jax.Array:
        """``ids`` int [B, N] (``K`` = mask), ``cond`` class-token ids [B] -> logits [B, N, K];
        dropout only when ``train`` (rng collection ``dropout``)."""
        return BertModel(self.arch, self.dtype, self.layers, name="model")(
            _with_class_token(ids, cond), train)


class UViTAttention(_Part):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.arch.hidden_size
        qkv = _Dense(3 * width, use_bias=False, dtype=self.dtype, name="qkv")(x)
        out = _attention(self, *jnp.split(qkv, 3, axis=-1), self.arch.num_heads, 0.0, False)
        return _Dense(width, dtype=self.dtype, name="proj")(out)


class UViTMlp(_Part):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _Dense(self.arch.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return _Dense(x.shape[-1], dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))


class UViTBlock(_Part):
    """Pre-LN block (eps 1e-5); with ``skip``, ``skip_linear(concat(x, skip))`` first."""

    skip: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
        dt = self.dtype
        if self.skip:
            x = _Dense(x.shape[-1], dtype=dt, name="skip_linear")(
                jnp.concatenate([x, skip], axis=-1))
        x = x + UViTAttention(self.arch, dt, name="attn")(layer_norm("norm1", dt)(x))
        return x + UViTMlp(self.arch, dt, name="mlp")(layer_norm("norm2", dt)(x))


class _UViTInStep(UViTBlock):
    @nn.compact
    def __call__(self, x: jax.Array):
        y = super().__call__(x)
        return y, y                                   # the output is also the kept skip


class _UViTOutStep(UViTBlock):
    skip: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array):
        return super().__call__(x, skip), None


class UViTBert(_Generator):
    """U-ViT over the generator tokens (``arch.kind == "uvit"``): in-blocks whose outputs are
    kept, a middle block, and out-blocks that consume them last-in first-out through
    ``skip_linear``."""

    @nn.compact
    def __call__(self, ids: jax.Array, cond: jax.Array, train: bool = False) -> jax.Array:
        """Same contract as :meth:`ImageBert.__call__` (``train`` changes nothing: no dropout)."""
        del train
        arch, dt = self.arch, self.dtype
        tokens = _with_class_token(ids, cond)
        x = nn.Embed(arch.vocab_size, arch.hidden_size, embedding_init=_INIT, dtype=dt,
                     name="embeddings")(tokens)
        pos = self.param("pos_embed", _INIT, (1, arch.num_tokens + 1, arch.hidden_size),
                         jnp.float32)
        x = x + pos[:, :tokens.shape[1]].astype(dt)
        half, st = arch.num_layers // 2, self.layers
        if st.scan:
            def scan(step, **kw):
                return nn.scan(st.wrap(step), variable_axes={"params": 0},
                               split_rngs={"params": True}, length=half, **kw)
            x, skips = scan(_UViTInStep)(arch, dt, name="in_blocks")(x)
            x = st.wrap(UViTBlock)(arch, dt, name="mid_block")(x)
            x = scan(_UViTOutStep, in_axes=0)(arch, dt, name="out_blocks")(x, skips[::-1])[0]
        else:
            skips = []
            for i in range(half):
                x = st.wrap(UViTBlock)(arch, dt, name=f"in_blocks_{i}")(x)
                skips.append(x)
            x = st.wrap(UViTBlock)(arch, dt, name="mid_block")(x)
            for i in range(half):
                x = st.wrap(UViTBlock)(arch, dt, skip=True, name=f"out_blocks_{i}")(
                    x, skips.pop())
        x = layer_norm("norm", dt)(x)
        return _Dense(arch.codebook_size, dtype=dt, name="lm_head")(x[:, 1:])
