"""Convolutional pieces of the UNet and VAE (NHWC): ResnetBlock2D, Downsample2D, Upsample2D.

Submodule names follow diffusers' state-dict keys (norm1, conv1, time_emb_proj, ...) so weights map
1:1. Norms use the two-pass variance (use_fast_variance=False) as PyTorch does: E[x^2] - E[x]^2
loses precision on activations with a large mean, which pretrained SD activations have.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import layers

Dtype = Any

_PAD1 = ((1, 1), (1, 1))


def conv3x3(features: int, dtype: Dtype, name: str, strides: int = 1) -> layers.Conv:
  """3x3 conv with PyTorch's symmetric padding of 1 (Flax "SAME" pads (0, 1) at stride 2)."""
  return layers.Conv(features, (3, 3), strides=(strides, strides), padding=_PAD1, dtype=dtype,
                 name=name)


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False,
                      name=name)


class ResnetBlock2D(nn.Module):
  """Pre-norm residual block conditioned on the time embedding by an additive channel bias.

      h   = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, None, None, :]
      h   = conv2(silu(norm2(h)))                      (dropout 0: omitted)
      out = (shortcut(x) + h) / output_scale_factor     shortcut: 1x1 conv when channels change

  temb=None (the VAE's blocks, diffusers' temb_channels=None) drops the time term and its
  time_emb_proj params.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
    if temb is not None:
      t = layers.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = layers.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Halves H and W with a stride-2 3x3 conv, padded as diffusers' `padding` argument says.

  padding=1 (UNet): 1 on every side. padding=0 (VAE, downsample_padding=0): diffusers pads
  (0, 1) at the bottom/right only (F.pad (0, 1, 0, 1)), then convolves unpadded; the same map as
  a conv with padding ((0, 1), (0, 1)).
  """
  out_channels: int
  dtype: Dtype = jnp.float32
  padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding == 1:
      return conv3x3(self.out_channels, self.dtype, "conv", strides=2)(x)
    if self.padding == 0:
      return layers.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                     dtype=self.dtype, name="conv")(x)
    raise ValueError(f"Downsample2D padding must be 0 or 1, got {self.padding}")


class Upsample2D(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return conv3x3(self.out_channels, self.dtype, "conv")(x)
