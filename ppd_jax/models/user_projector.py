"""User embedding -> user tokens for the cross-attention user branch (IP-Adapter "Full" projector).

Per token: tokens = LayerNorm(W2 gelu(W1 e + b1) + b2), e in R^user_embed_dim, tokens in
R^cross_attention_dim. Names proj_0 / proj_2 / proj_3 are the original IP-Adapter MLPProjModel's
keys (`proj.0`, `proj.2`, `proj.3`; proj.1 is the GELU); diffusers' IPAdapterFullImageProjection
calls them `ff.net.0.proj`, `ff.net.2`, `norm`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import layers

Dtype = Any


class UserProjector(nn.Module):
  """[B, T, user_embed_dim] -> [B, T, cross_attention_dim]."""
  cross_attention_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, user_embedding: jax.Array) -> jax.Array:
    x = user_embedding.astype(self.dtype)
    x = layers.Dense(x.shape[-1], dtype=self.dtype, name="proj_0")(x)
    x = nn.gelu(x, approximate=False)
    x = layers.Dense(self.cross_attention_dim, dtype=self.dtype, name="proj_2")(x)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name="proj_3")(x)
