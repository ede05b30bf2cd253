"""The one place that picks a model family from config.model.family: "unet" (Stable Diffusion,
models/personalized.py, the default) or "cascade" (Stable Cascade, models/personalized_cascade.py).

Both families share the call shape and the user-branch leaf names (personalized.USER_MODULES), so
everything after build_model / init_params treats them alike.
"""
import jax

from ppd_jax.models import personalized
from ppd_jax.models import personalized_cascade

FAMILIES = ("unet", "cascade")


def build_model(model_cfg):
  """`config.model` (ml_collections or a dict) -> PersonalizedUNet or PersonalizedCascade."""
  fields = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  family = fields.get("family", "unet")
  if family not in FAMILIES:
    raise ValueError(f"config.model.family must be one of {FAMILIES}, got {family!r}")
  if family == "cascade":
    return personalized_cascade.build_model(fields)
  return personalized.build_model(fields)


def init_params(model, rng: jax.Array, batch_size: int = 1) -> dict:
  """All params (base and user branch) of either family's model, a plain nested dict, float32."""
  if isinstance(model, personalized_cascade.PersonalizedCascade):
    return personalized_cascade.init_params(model, rng, batch_size)
  return personalized.init_params(model, rng, batch_size)
