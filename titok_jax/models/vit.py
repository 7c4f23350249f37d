"""Transformer blocks shared by the TiTok encoder and decoder.

The block is the pre-LayerNorm residual block of the official TiTok code (an open_clip-style
``ResidualAttentionBlock``): LayerNorm eps 1e-5, ``torch.nn.MultiheadAttention`` with one fused
q/k/v projection, and an exact-erf GELU MLP. Submodule names follow the PyTorch state-dict keys
(``ln_1``, ``attn/in_proj``, ``attn/out_proj``, ``ln_2``, ``mlp/c_fc``, ``mlp/c_proj``) so that
weight conversion is a table, not a translation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

# The official init (TiTok._init_weights): Linear/Conv weights N(0, 0.02) (PyTorch's trunc_normal_
# with absolute bounds +-2, i.e. effectively untruncated), zero biases; the fused attention
# projection is a raw nn.MultiheadAttention parameter and keeps its xavier-uniform init.
DENSE_INIT = nn.initializers.normal(stddev=0.02)


def layer_norm(name: str, dtype: Dtype = jnp.float32, eps: float = 1e-5) -> nn.LayerNorm:
    # PyTorch computes the variance as mean((x - mean)^2); flax's fast path (E[x^2] - E[x]^2)
    # loses ~1e-5 on wide activations, which is visible in parity tests.
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused q/k/v projection.

    ``in_proj`` holds q, k and v side by side on its output axis, the same order as the rows of
    PyTorch's ``in_proj_weight``; heads are contiguous ``head_dim`` slices of each.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        """``kv_lengths`` (int32 ``[B]``, optional): only the first ``kv_lengths[b]`` positions of
        sequence b are attended to (right padding)."""
        batch, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                       name="in_proj")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths)
        out = checkpoint_name(out, "attention")
        out = out.reshape(batch, length, width)
        return nn.Dense(width, dtype=self.dtype, kernel_init=DENSE_INIT, name="out_proj")(out)


class MLP(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=DENSE_INIT, name="c_fc")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(width, dtype=self.dtype, kernel_init=DENSE_INIT, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            layer_norm("ln_1", self.dtype)(x), kv_lengths)
        x = x + MLP(int(width * self.mlp_ratio), dtype=self.dtype, name="mlp")(
            layer_norm("ln_2", self.dtype)(x))
        return x


# Remat policies by name (``config.model.remat_policy``): what a rematerialised block keeps from
# its forward pass; everything else is recomputed in the backward pass.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    # Keep each block's attention output [B, T, W]: the backward recomputes the projections and
    # the MLP but not the softmax(QK^T)V part.
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention"),
}


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """How a stack of blocks is run.

    remat: recompute each block's activations in the backward pass (activation memory no longer
      grows with depth, ~30% more compute), keeping what ``remat_policy`` names.
    scan: run the blocks as one ``nn.scan`` over parameters stacked on a leading ``depth`` axis
      (module ``transformer`` instead of ``transformer_{i}``): one block is traced and compiled
      instead of ``depth``. The converter maps the stacked layout to the official keys both ways
      (``convert.layout.to_layout``).
    """

    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan: bool = False

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: "
                             f"{sorted(REMAT_POLICIES)}")

    def wrap(self, block_cls: type[nn.Module]) -> type[nn.Module]:
        if not self.remat:
            return block_cls
        return nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy],
                        prevent_cse=not self.scan)


class _ScanStep(ResidualAttentionBlock):
    """One scan iteration: the block as a ``carry -> (carry, None)`` function whose parameters
    sit directly under the scanned module, as they do in a ``transformer_{i}`` block."""

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None):
        return super().__call__(x, kv_lengths), None


def transformer_blocks(x: jax.Array, depth: int, num_heads: int, *, mlp_ratio: float = 4.0,
                       dtype: Dtype = jnp.float32, stack: LayerStack = LayerStack(),
                       kv_lengths: jax.Array | None = None) -> jax.Array:
    """Runs ``depth`` blocks created in the calling module.

    Call it from a compact method: unrolled, the blocks become direct children of the caller
    named ``transformer_{i}``, matching the PyTorch keys ``transformer.{i}.*``; scanned
    (``stack.scan``), one child ``transformer`` holds every parameter with a leading ``depth``
    axis. ``kv_lengths`` masks right-padded keys per sequence (see :class:`MultiHeadAttention`).
    """
    if stack.scan:
        step = stack.wrap(_ScanStep)
        scanned = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=nn.broadcast, length=depth)
        return scanned(num_heads, mlp_ratio, dtype, name="transformer")(x, kv_lengths)[0]
    block_cls = stack.wrap(ResidualAttentionBlock)
    for i in range(depth):
        x = block_cls(num_heads, mlp_ratio, dtype, name=f"transformer_{i}")(x, kv_lengths)
    return x
