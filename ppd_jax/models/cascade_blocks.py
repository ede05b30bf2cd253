"""StableCascadeUNet's blocks on NHWC: SDCascadeResBlock, SDCascadeTimestepBlock,
SDCascadeAttnBlock (with the PPD user branch in its attention) and GlobalResponseNorm.

Submodule names are diffusers' keys with indices joined by "_" (`channelwise.2.gamma` ->
`channelwise_2/gamma`), so weights/convert.py maps them 1:1. Dropout is left out: both the policy
and the DPO reference run deterministically (cascade.py).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import attention
from ppd_jax.models import layers

Dtype = Any
RES, TIMESTEP, ATTN = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"


def channel_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """SDCascadeLayerNorm (and clip_norm): LayerNorm over the last axis without affine params,
  (x - mean) / sqrt(var + eps), statistics in float32."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def conv1x1(features: int, dtype: Dtype, name: str) -> layers.Conv:
  return layers.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2's GRN on [B, H, W, C], in float32 (a sum of H W squares overflows bf16's
  precision):  G = ||x||_2 over (H, W);  N = G / (mean_C G + 1e-6);  out = gamma (x N) + beta + x.
  gamma, beta [1, 1, 1, C] start at zero, so the block starts as the identity."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (1, 1, 1, x.shape[-1])
    gamma = self.param("gamma", nn.initializers.zeros, shape, jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, shape, jnp.float32)
    xf = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(1, 2), keepdims=True))
    n = g / (g.mean(-1, keepdims=True) + 1e-6)
    return (gamma * (xf * n) + beta + xf).astype(x.dtype)


class ResBlock(nn.Module):
  """h = LN(depthwise_conv(x)) [; skip];  out = x + W4 GRN(gelu(W0 h))   (W on channels)."""
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    c, k = x.shape[-1], self.kernel_size
    pad = ((k // 2, k // 2),) * 2
    h = layers.Conv(c, (k, k), padding=pad, feature_group_count=c, dtype=self.dtype,
                    name="depthwise")(x)
    h = channel_norm(h)
    if skip is not None:
      h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
    h = layers.Dense(4 * c, dtype=self.dtype, name="channelwise_0")(h)
    h = GlobalResponseNorm(name="channelwise_2")(nn.gelu(h, approximate=False))
    return x + layers.Dense(c, dtype=self.dtype, name="channelwise_4")(h)


class TimestepBlock(nn.Module):
  """FiLM from the r embedding, one 64-wide chunk per condition (r, then `conds`):
  [a, b] = mapper(t_r) + sum_i mapper_<cond_i>(t_i);  out = x (1 + a) + b."""
  conds: tuple[str, ...] = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, r_embed: jax.Array) -> jax.Array:
    c = x.shape[-1]
    chunks = jnp.split(r_embed, 1 + len(self.conds), axis=-1)
    names = ("mapper",) + tuple(f"mapper_{cond}" for cond in self.conds)
    ab = sum(layers.Dense(2 * c, dtype=self.dtype, name=n)(t) for n, t in zip(names, chunks))
    a, b = jnp.split(ab[:, None, None, :].astype(x.dtype), 2, axis=-1)
    return x * (1 + a) + b


class CascadeAttention(nn.Module):
  """diffusers' Attention(bias=True) on tokens, plus the user branch (shared to_q and to_out_0):

      out = to_out_0( A(q, to_k(kv), to_v(kv)) + s A(q, to_k_user(u), to_v_user(u)) ),  q = to_q(x)

  to_k_user / to_v_user are bias-free and to_v_user starts at zero, so the output equals the base
  at init, and at s = 0 whatever the weights. Without user tokens the branch is not built."""
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, user_tokens: jax.Array | None = None,
               user_scale: attention.Scale = 1.0) -> jax.Array:
    c = x.shape[-1]
    dense = lambda name, **kw: layers.Dense(c, dtype=self.dtype, name=name, **kw)
    q = dense("to_q")(x)
    out = attention.multi_head_attention(q, dense("to_k")(kv), dense("to_v")(kv), self.heads,
                                         self.implementation)
    if user_tokens is not None:
      k_user = dense("to_k_user", use_bias=False)(user_tokens)
      v_user = dense("to_v_user", use_bias=False, kernel_init=nn.initializers.zeros)(user_tokens)
      user_out = attention.multi_head_attention(q, k_user, v_user, self.heads, self.implementation)
      out = out + attention.broadcast_scale(user_scale, out.dtype) * user_out
    return dense("to_out_0")(out)


class AttnBlock(nn.Module):
  """kv = W silu(clip);  nx = LN(x);  self_attn: kv = [tokens(nx); kv] (one softmax over both);
  out = x + attention(nx, kv, user tokens)."""
  heads: int
  self_attn: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, clip: jax.Array, user_tokens: jax.Array | None = None,
               user_scale: attention.Scale = 1.0) -> jax.Array:
    b, h, w, c = x.shape
    kv = layers.Dense(c, dtype=self.dtype, name="kv_mapper_1")(nn.silu(clip))
    nx = channel_norm(x).reshape(b, h * w, c)
    if self.self_attn:
      kv = jnp.concatenate([nx, kv], axis=1)
    out = CascadeAttention(self.heads, self.dtype, self.attention_impl, name="attention")(
        nx, kv, user_tokens, user_scale)
    return x + out.reshape(b, h, w, c)


class UpDownConv(nn.Module):
  """Stage C's UpDownBlock2d(enabled=False): only its 1x1 conv, at `blocks_<index>` (the interp
  identity sits at the other index: 1 when going down, 0 when going up)."""
  features: int
  index: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return conv1x1(self.features, self.dtype, f"blocks_{self.index}")(x)
