"""CLIP's vision transformer (transformers' CLIPVisionModel / CLIPVisionModelWithProjection) in Flax:
the image tower of every reward model (PickScore, HPS, CLIP score, aesthetic) and of Stable
Cascade's image conditioning.

    patches = conv_PxP/stride P(pixels)                          [B, (S/P)^2, C], no bias
    x_0 = pre_layrnorm([class_embedding; patches] + position_embedding(0..(S/P)^2))
    x_i = x_{i-1} + attn(layer_norm1(x_{i-1}));  x_i += mlp(layer_norm2(x_i))   (not causal)
    pooler_output = post_layernorm(x_N[:, 0])                     the class token only
    image_embeds = visual_projection(pooler_output)               (with projection; no bias)

Pixels are NHWC float32, already normalised (rewards/preprocess.py); transformers takes
NCHW. Param paths are transformers' keys under ppd_jax.weights.convert's rule, with its spelling
(`pre_layrnorm`): vision_model/embeddings/patch_embedding/kernel, vision_model/encoder/layers_0/...
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import clip_text

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Field names and defaults follow transformers' CLIPVisionConfig (ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    clip_text.check_architecture("CLIPVisionConfig", self.hidden_act, self.hidden_size,
                                 self.num_attention_heads)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig.image_size: {self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a transformers config dict (a vision config.json, or CLIPConfig's vision_config);
    fields that do not shape inference are ignored, another model type is refused."""
    return clip_text.config_from_dict(cls, config, "clip_vision_model")


class CLIPVisionEmbeddings(nn.Module):
  """[class token; patch embeddings] + learned absolute positions."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"CLIP vision: pixels of shape {pixels.shape[1:]} (H, W, C), the model "
                       f"takes ({cfg.image_size}, {cfg.image_size}, {cfg.num_channels})")
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixels)
    patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
    positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(cfg.num_positions))
    return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
  """embeddings -> pre_layrnorm -> encoder (bidirectional) -> post_layernorm of the class token."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> dict[str, Any]:
    cfg = self.config
    x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
    x = clip_text.layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
    layers = clip_text.CLIPEncoder(cfg, self.dtype, self.implementation, causal=False,
                                   name="encoder")(x)
    pooled = clip_text.layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(
        layers[-1][:, 0])
    return {"last_hidden_state": layers[-1], "hidden_states": (x,) + layers,
            "pooler_output": pooled}


class CLIPVisionModel(nn.Module):
  """transformers' CLIPVisionModel, or CLIPVisionModelWithProjection when with_projection.

  __call__(pixels [B, S, S, 3] normalised NHWC) -> dict:
    last_hidden_state [B, 1 + (S/P)^2, C]  encoder output (no post-norm, as transformers)
    hidden_states     N + 1 arrays: pre_layrnorm's output, then each layer's
    pooler_output     [B, C]               post_layernorm(class token)
    image_embeds      [B, projection_dim]  visual_projection(pooler_output), with_projection only
  """
  config: CLIPVisionConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> dict[str, Any]:
    out = CLIPVisionTransformer(self.config, self.dtype, self.implementation,
                                name="vision_model")(pixels)
    if self.with_projection:
      out["image_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                     name="visual_projection")(out["pooler_output"])
    return out
