"""The PPD model: frozen UNet + trainable user branch, and the param-tree split between the two.

    eps = unet(x_t, t, text, user_tokens = user_projector(user_embedding), user_scale)

The user embedding is [T, E]; the projector makes T tokens of it, or K =
`user_tokens_per_embedding` tokens when T == 1 (one key would get no gradient: user_projector.py).

With user_embedding None the projector is not called and no cross-attention builds its user branch:
that is the frozen base, used as the DPO reference with the same weights. The trainer takes
gradients only over `split_params(params)[1]` (see DESIGN.md, "Frozen vs trainable").

This module is the UNet family (Stable Diffusion); models/family.py picks it or the Cascade one
(models/personalized_cascade.py) from config.model.family.
"""
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ppd_jax.models import attention
from ppd_jax.models.unet import UNet2DConditionModel, UNetConfig
from ppd_jax.models.user_projector import make_user_projector

Params = dict[str, Any]

USER_MODULES = ("user_projector", "to_k_user", "to_v_user")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class PersonalizedUNet(nn.Module):
  """UNet2DConditionModel (`unet`) with an IP-Adapter-style user branch (`user_projector`)."""
  config: UNetConfig

  def setup(self):
    self.unet = UNet2DConditionModel(self.config)
    self.user_projector = make_user_projector(self.config)

  def project_user(self, user_embedding: jax.Array) -> jax.Array:
    """[B, T, user_embed_dim] -> user tokens [B, T', cross_attention_dim], T' = K if T == 1."""
    return self.user_projector(user_embedding)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               user_embedding: jax.Array | None = None,
               user_scale: attention.Scale = 1.0,
               added_cond: dict | None = None) -> jax.Array:
    """[B, H, W, C_in], t [B] (or scalar), text [B, L, D] -> [B, H, W, C_out] float32.

    user_scale: a float or a [B] array (per-example scale; 0 gives the base output exactly).
    added_cond: SDXL's {"text_embeds", "time_ids"} (see backbone.unet_conditioning).
    """
    user_tokens = None if user_embedding is None else self.project_user(user_embedding)
    return self.unet(sample, timesteps, encoder_hidden_states, user_tokens, user_scale, added_cond)


def build_model(fields: dict) -> PersonalizedUNet:
  """`config.model` of a UNet run as a dict (see configs/common.py) -> PersonalizedUNet.

  Lists become tuples, dtype strings become jnp dtypes, `base` (where weights come from) is not an
  architecture field and is skipped; any other unknown field is an error, not silently ignored.
  """
  fields = dict(fields)
  fields.pop("family", None)
  for key in ("base", "pretrained", "variant"):   # where weights come from, not architecture
    fields.pop(key, None)
  fields["addition_embed_type"] = fields.get("addition_embed_type") or None
  fields["attention_impl"] = fields.get("attention_impl") or None
  known = set(UNetConfig.__dataclass_fields__)
  unknown = set(fields) - known
  if unknown:
    raise ValueError(f"build_model: unknown model config fields {sorted(unknown)}")
  for key, value in fields.items():
    if isinstance(value, list):
      fields[key] = tuple(value)
  if isinstance(fields.get("dtype"), str):
    if fields["dtype"] not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {fields['dtype']!r}")
    fields["dtype"] = _DTYPES[fields["dtype"]]
  return PersonalizedUNet(UNetConfig(**fields))


def init_params(model: PersonalizedUNet, rng: jax.Array, batch_size: int = 1) -> Params:
  """All params (base and user branch) as a plain nested dict, float32.

  Params do not depend on the spatial or text length, so the dummy input is the smallest valid one
  (2^(num_blocks-1) pixels, 1 text token): a cheaper init pass, the same tree.
  """
  cfg = model.config
  side = 2 ** (len(cfg.block_out_channels) - 1)
  sample = jnp.zeros((batch_size, side, side, cfg.in_channels), jnp.float32)
  timesteps = jnp.zeros((batch_size,), jnp.int32)
  text = jnp.zeros((batch_size, 1, cfg.cross_attention_dim), jnp.float32)
  user = jnp.zeros((batch_size, cfg.user_tokens, cfg.user_embed_dim), jnp.float32)
  added = None
  if cfg.addition_embed_type == "text_time":
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": jnp.zeros((batch_size, pooled), jnp.float32),
             "time_ids": jnp.zeros((batch_size, 6), jnp.float32)}
  variables = jax.jit(model.init)(rng, sample, timesteps, text, user, 1.0, added)
  return flax.core.unfreeze(variables["params"])


def is_user_param(path) -> bool:
  """True for the user branch: under `user_projector`, or in a `to_k_user` / `to_v_user` layer.

  `path` is a tuple of names (flax.traverse_util) or a jax key path (DictKey entries).
  """
  names = [getattr(k, "key", k) for k in path]
  return any(name in USER_MODULES for name in names)


def split_params(params: Mapping[str, Any]) -> tuple[Params, Params]:
  """params -> (base, user): two nested dicts with full paths and no shared leaf."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  base = {p: v for p, v in flat.items() if not is_user_param(p)}
  user = {p: v for p, v in flat.items() if is_user_param(p)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(user)


def merge_params(base: Mapping[str, Any], user: Mapping[str, Any]) -> Params:
  """Inverse of split_params; overlapping leaves are an error."""
  flat_base = traverse_util.flatten_dict(flax.core.unfreeze(base))
  flat_user = traverse_util.flatten_dict(flax.core.unfreeze(user))
  overlap = set(flat_base) & set(flat_user)
  if overlap:
    raise ValueError(f"merge_params: {len(overlap)} leaves in both trees, e.g. {min(overlap)}")
  return traverse_util.unflatten_dict({**flat_base, **flat_user})
