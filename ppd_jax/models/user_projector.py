"""User embedding -> user tokens for the cross-attention user branch (IP-Adapter projectors).

Which projector depends on how many tokens the user embedding has (`model.user_tokens`, T):

* T == 1 (the SD and Pick-a-Pic configs: the VLM's final hidden state): `SingleTokenUserProjector`,
  IP-Adapter's ImageProjModel (diffusers' ImageProjection). One Linear makes K tokens of the
  vector, K = `model.user_tokens_per_embedding`:
      tokens = LayerNorm(reshape(W e + b, [K, D])),   W [K*D, E], LayerNorm over D per token.
  Why not project the one token as it is: with a single user key, softmax(q k_user) = 1 for every
  query, so A(q, K_u, V_u) = V_u whatever to_k_user is. Every to_k_user then gets exactly zero
  gradient and each layer sees the user only as a spatially uniform bias. K > 1 distinct tokens
  give the queries something to choose between (K = 1 reproduces the dead branch).
* T > 1 (e.g. several VLM layers): `UserProjector`, IP-Adapter's "Full" projection, per token:
      tokens = LayerNorm(W2 gelu(W1 e + b1) + b2),  e in R^E, tokens in R^D.
  K does not apply: the T tokens are already distinct keys. Names proj_0 / proj_2 / proj_3 are the
  original IP-Adapter MLPProjModel's keys (`proj.0`, `proj.2`, `proj.3`; proj.1 is the GELU);
  diffusers' IPAdapterFullImageProjection calls them `ff.net.0.proj`, `ff.net.2`, `norm`.

E = user_embed_dim, D = cross_attention_dim. The single-token names `proj` and `norm` are the
original IP-Adapter file's `image_proj.proj` and `image_proj.norm` (weights/export.py).
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


class SingleTokenUserProjector(nn.Module):
  """[B, 1, user_embed_dim] -> [B, num_tokens, cross_attention_dim] (ImageProjModel)."""
  cross_attention_dim: int
  num_tokens: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, user_embedding: jax.Array) -> jax.Array:
    if user_embedding.shape[-2] != 1:
      raise ValueError(f"SingleTokenUserProjector takes a one-token user embedding, got shape "
                       f"{user_embedding.shape}; with model.user_tokens > 1 UserProjector is used")
    k, d = self.num_tokens, self.cross_attention_dim
    x = user_embedding[..., 0, :].astype(self.dtype)
    x = layers.Dense(k * d, dtype=self.dtype, name="proj")(x)          # W e + b  [B, K*D]
    x = x.reshape(x.shape[:-1] + (k, d))                               # token i = x[i*D:(i+1)*D]
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name="norm")(x)


def make_user_projector(config) -> nn.Module:
  """The projector for a UNetConfig: single-token (K tokens) when user_tokens == 1, else Full."""
  if config.user_tokens_per_embedding < 1:
    raise ValueError("model.user_tokens_per_embedding must be >= 1, got "
                     f"{config.user_tokens_per_embedding}")
  if config.user_tokens == 1:
    return SingleTokenUserProjector(config.cross_attention_dim,
                                    config.user_tokens_per_embedding, config.dtype)
  return UserProjector(config.cross_attention_dim, config.dtype)
