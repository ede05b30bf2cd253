"""Spatial transformer of the UNet: Transformer2DModel > BasicTransformerBlock > Attention.

The PPD user branch lives in Attention: every text cross-attention (attn2) gets IP-Adapter-style
user key/value projections that share its query and output projection,

    A(q, k, v) = softmax(q k^T / sqrt(d)) v                       per head, d = head dim
    out = to_out_0( A(q, k_text, v_text) + user_scale * A(q, k_user, v_user) )

with k_user = to_k_user(user_tokens), v_user = to_v_user(user_tokens), to_v_user zero-initialised,
so the policy equals the frozen base at initialisation (and at user_scale 0, whatever the weights).
Without user tokens the branch is not built, which is the base / DPO reference model.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import attention_kernels
from ppd_jax.models import layers
from ppd_jax.models import resnet

Dtype = Any
Scale = float | jax.Array


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         implementation: str | None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head; [B, T, N*d] x [B, S, N*d] -> [B, T, N*d].

  implementation: attention_kernels' name ("auto" when None or ""): cuDNN's fused kernel where
  it supports the layer, Pallas flash on TPU, else query chunks that never hold the whole
  batch's float32 logits (attention_kernels.py)."""
  split = lambda x: x.reshape(x.shape[:2] + (heads, x.shape[-1] // heads))
  out = attention_kernels.attention_in_mesh(split(q), split(k), split(v),
                                            implementation=implementation or "auto")
  return out.reshape(q.shape)


def broadcast_scale(user_scale: Scale, dtype: Dtype) -> jax.Array:
  """A scalar, or a [B] vector of per-example scales shaped [B, 1, 1] to meet [B, T, C]."""
  s = jnp.asarray(user_scale, dtype)
  return s[:, None, None] if s.ndim == 1 else s


class Attention(nn.Module):
  """diffusers' Attention (bias-free to_q/to_k/to_v, to_out_0 with bias) plus the user branch."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None   # attention_kernels.IMPLEMENTATIONS; None: "auto"

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               user_tokens: jax.Array | None = None, user_scale: Scale = 1.0) -> jax.Array:
    inner = self.heads * self.dim_head
    dense = lambda name, **kw: layers.Dense(inner, use_bias=False, dtype=self.dtype, name=name, **kw)
    context = x if context is None else context
    q = dense("to_q")(x)
    out = multi_head_attention(q, dense("to_k")(context), dense("to_v")(context), self.heads,
                               self.implementation)
    if user_tokens is not None:
      k_user = dense("to_k_user")(user_tokens)
      v_user = dense("to_v_user", kernel_init=nn.initializers.zeros)(user_tokens)
      user_out = multi_head_attention(q, k_user, v_user, self.heads, self.implementation)
      out = out + broadcast_scale(user_scale, out.dtype) * user_out
    return layers.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """proj to 2*inner, split [h, gate]; h * gelu(gate) with the exact (erf) GELU."""
  inner_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, gate = jnp.split(layers.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net_0 = GEGLU(dim -> 4 dim), net_1 = dropout (0, omitted), net_2 = Dense(4 dim -> dim)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return layers.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm block on [B, HW, C] tokens.

      x = x + attn1(norm1(x))                                       self-attention
      x = x + attn2(norm2(x), text, user_tokens, user_scale)        text (+ user) cross-attention
      x = x + ff(norm3(x))                                          GEGLU feed-forward
  """
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, user_tokens: jax.Array | None = None,
               user_scale: Scale = 1.0) -> jax.Array:
    attn = lambda name: Attention(self.heads, self.dim_head, self.dtype, self.attention_impl,
                                  name=name)
    x = x + attn("attn1")(layer_norm(self.dtype, "norm1")(x))
    x = x + attn("attn2")(layer_norm(self.dtype, "norm2")(x), context, user_tokens, user_scale)
    return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(self.dtype, "norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in, `num_layers` BasicTransformerBlocks over the HW tokens, proj_out, residual.

  proj_in/proj_out are 1x1 convs (SD 1.x) or Dense layers on the tokens (use_linear_projection:
  SD 2.x, SDXL); the two compute the same map but store kernels of different shapes.
  """
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, user_tokens: jax.Array | None = None,
               user_scale: Scale = 1.0) -> jax.Array:
    b, hgt, wid, c = x.shape
    residual = x
    x = resnet.group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      x = layers.Dense(c, dtype=self.dtype, name="proj_in")(x.reshape(b, hgt * wid, c))
    else:
      x = layers.Conv(c, (1, 1), dtype=self.dtype, name="proj_in")(x).reshape(b, hgt * wid, c)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      x = block_cls(self.heads, c // self.heads, self.dtype, self.attention_impl,
                    name=f"transformer_blocks_{i}")(x, context, user_tokens, user_scale)
    if self.use_linear_projection:
      x = layers.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, hgt, wid, c)
    else:
      x = layers.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(x.reshape(b, hgt, wid, c))
    return x + residual
