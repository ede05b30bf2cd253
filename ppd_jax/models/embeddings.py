"""Time conditioning: diffusers' `Timesteps` (sinusoid, no params) and `TimestepEmbedding` (MLP)."""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import layers

Dtype = Any


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim], always float32.

      half = dim // 2,  f_i = exp(-log(max_period) * i / (half - freq_shift)),  i = 0..half-1
      emb  = [sin(t f), cos(t f)]   (or [cos, sin] when flip_sin_to_cos), zero-padded if dim is odd
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2: the learned part of the time conditioning."""
  time_embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jax.Array) -> jax.Array:
    h = layers.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(t_emb)
    h = nn.silu(h)
    return layers.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(h)
