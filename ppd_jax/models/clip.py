"""The two-tower CLIP model (transformers' CLIPModel) in Flax, and the published layouts.

    t = text_projection(text_model(ids).pooler_output)          [B, P]   (no bias)
    v = visual_projection(vision_model(pixels).pooler_output)  [B, P]   (no bias)
    logits_per_image = exp(logit_scale) * (v / |v|) (t / |t|)^T

Every reward model of the paper (PickScore, HPSv2, CLIP score, the aesthetic predictor's image
tower) is one of these with other weights. Params follow transformers' CLIPModel keys under the
rule of ppd_jax.weights.convert (text_model/..., vision_model/..., text_projection/kernel,
visual_projection/kernel, and the scalar logit_scale), so a transformers folder and a converted
open_clip checkpoint (weights/convert_open_clip.py) load with the same code.
"""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import clip_text
from ppd_jax.models import clip_vision

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' CLIPConfig: the two towers, the shared projection width and logit_scale's init."""
  text: clip_text.CLIPTextConfig
  vision: clip_vision.CLIPVisionConfig
  projection_dim: int = 512
  logit_scale_init_value: float = math.log(1 / 0.07)

  def __post_init__(self):
    # Both projections are projection_dim wide (a sub-config's own projection_dim is not used).
    object.__setattr__(self, "text", dataclasses.replace(self.text,
                                                         projection_dim=self.projection_dim))
    object.__setattr__(self, "vision", dataclasses.replace(self.vision,
                                                           projection_dim=self.projection_dim))

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPConfig":
    """From a CLIPModel config.json dict; another model type is refused."""
    if config.get("model_type") != "clip":
      raise ValueError(f"CLIPConfig.model_type: unsupported value {config.get('model_type')!r} "
                       "(expected 'clip', a transformers CLIPModel config)")
    return cls(text=clip_text.CLIPTextConfig.from_transformers(config.get("text_config") or {}),
               vision=clip_vision.CLIPVisionConfig.from_transformers(
                   config.get("vision_config") or {}),
               projection_dim=config.get("projection_dim", 512),
               logit_scale_init_value=config.get("logit_scale_init_value", math.log(1 / 0.07)))

  def to_transformers(self) -> dict:
    """The config.json dict transformers' CLIPConfig reads (what a converted folder holds)."""
    return {"model_type": "clip", "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {"model_type": "clip_text_model", **dataclasses.asdict(self.text)},
            "vision_config": {"model_type": "clip_vision_model",
                              **dataclasses.asdict(self.vision)}}


def _preset(text: dict, vision: dict, projection_dim: int) -> CLIPConfig:
  return CLIPConfig(clip_text.CLIPTextConfig(**text),
                    clip_vision.CLIPVisionConfig(patch_size=14, **vision), projection_dim)


# The published layouts (transformers' config.json of each hub model): OpenAI ViT-L/14 uses
# quick_gelu (also the aesthetic predictor's and torchmetrics' CLIP score tower); LAION's
# ViT-H/14 (PickScore, HPSv2, Diffusion-DPO's CLIP reward) and ViT-bigG/14 the exact erf gelu.
PRESETS = {
    "ViT-L-14": lambda: _preset(
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, hidden_act="quick_gelu"), 768),
    "ViT-H-14": lambda: _preset(
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
             num_attention_heads=16, hidden_act="gelu", bos_token_id=0, eos_token_id=2),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, hidden_act="gelu"), 1024),
    "ViT-bigG-14": lambda: _preset(
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=2),
        dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
             num_attention_heads=16, hidden_act="gelu"), 1280),
}


def normalize(x: jax.Array) -> jax.Array:
  """x / |x| along the last axis, in float32 (transformers' CLIPModel has no epsilon either)."""
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
  """transformers' CLIPModel. Use `get_text_features` / `get_image_features` (through
  `module.apply(..., method=...)`) to run one tower; `__call__` runs both.

  Params are float32; `dtype` is the compute dtype.
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  def setup(self):
    cfg = self.config
    self.text_model = clip_text.CLIPTextTransformer(cfg.text, self.dtype, self.implementation)
    self.vision_model = clip_vision.CLIPVisionTransformer(cfg.vision, self.dtype,
                                                          self.implementation)
    dense = lambda: nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
    self.text_projection = dense()
    self.visual_projection = dense()
    self.logit_scale = self.param("logit_scale",
                                  nn.initializers.constant(cfg.logit_scale_init_value), ())

  def get_text_features(self, input_ids: jax.Array,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, L] ids -> [B, P] projected, unnormalised text embeddings."""
    return self.text_projection(self.text_model(input_ids, attention_mask)["pooler_output"])

  def get_image_features(self, pixels: jax.Array) -> jax.Array:
    """[B, S, S, 3] normalised NHWC pixels -> [B, P] projected, unnormalised image embeddings."""
    return self.visual_projection(self.vision_model(pixels)["pooler_output"])

  def get_logit_scale(self) -> jax.Array:
    return self.logit_scale

  def __call__(self, input_ids: jax.Array, pixels: jax.Array,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """-> text_embeds [B_t, P], image_embeds [B_i, P] (both L2-normalised, as transformers
    returns them), logits_per_image [B_i, B_t], logits_per_text [B_t, B_i]."""
    t = normalize(self.get_text_features(input_ids, attention_mask))
    v = normalize(self.get_image_features(pixels))
    logits = jnp.exp(self.logit_scale) * v @ t.T
    return {"text_embeds": t, "image_embeds": v, "logits_per_image": logits,
            "logits_per_text": logits.T}


def init_shapes(module: CLIPModel) -> dict:
  """The param tree's shapes (jax.eval_shape: nothing is allocated), for loading and counting."""
  cfg = module.config
  ids = jax.ShapeDtypeStruct((1, cfg.text.max_position_embeddings), jnp.int32)
  size = cfg.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, cfg.vision.num_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), ids, pixels)["params"]
