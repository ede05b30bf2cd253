"""PPD on Stable Cascade: StableCascadeUNet (`unet`) + a trainable user branch.

    eps = unet(x_t, r, clip..., user_tokens = user_projector(user_embedding), user_scale)

The user tokens have width conditioning_dim, the width of the text tokens the attention blocks
see; every SDCascadeAttnBlock gets to_k_user / to_v_user (cascade_blocks.CascadeAttention). The
leaf names are personalized.USER_MODULES', so personalized.split_params separates the branch.
With user_embedding None no user branch is built: the frozen base, the DPO reference.
"""
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ppd_jax.models import attention
from ppd_jax.models import cascade
from ppd_jax.models import personalized
from ppd_jax.models.user_projector import make_user_projector


class PersonalizedCascade(nn.Module):
  """StableCascadeUNet with the IP-Adapter-style user branch; call shape as PersonalizedUNet's."""
  config: cascade.CascadeConfig

  def setup(self):
    c = self.config
    self.unet = cascade.StableCascadeUNet(c)
    self.user_projector = make_user_projector(types.SimpleNamespace(
        cross_attention_dim=c.conditioning_dim, user_tokens=c.user_tokens,
        user_tokens_per_embedding=c.user_tokens_per_embedding, dtype=c.dtype))

  def project_user(self, user_embedding: jax.Array) -> jax.Array:
    """[B, T, user_embed_dim] -> user tokens [B, T', conditioning_dim] (T' = K when T == 1)."""
    return self.user_projector(user_embedding)

  def __call__(self, sample: jax.Array, timestep_ratio: jax.Array,
               encoder_hidden_states: jax.Array | None = None,
               user_embedding: jax.Array | None = None, user_scale: attention.Scale = 1.0,
               added_cond: dict | None = None) -> jax.Array:
    """PersonalizedUNet's call shape, so the step and the samplers treat both alike.

    sample NHWC; timestep_ratio r [B] (float32); encoder_hidden_states: Stage C's clip_text
    [B, L, T] (None for Stage B); added_cond: {"text_embeds": pooled [B, P] or [B, N, P],
    optional "clip_img" [B, M, I] (zeros by default: text-to-image), "effnet" (Stage B)}.
    user_scale: a float or a [B] array (per-example; 0 gives the base output exactly).
    Returns eps [B, H, W, C_out] float32."""
    c, added = self.config, dict(added_cond or {})
    pooled = added["text_embeds"]
    if pooled.ndim == 2:
      pooled = pooled[:, None]
    clip_img = added.get("clip_img")
    if clip_img is None and c.clip_image_in_channels is not None:
      clip_img = jnp.zeros((sample.shape[0], 1, c.clip_image_in_channels), jnp.float32)
    user = None if user_embedding is None else self.project_user(user_embedding)
    return self.unet(sample, timestep_ratio, pooled, encoder_hidden_states, clip_img,
                     added.get("effnet"), user, user_scale)


# config.model fields of a cascade run that are not architecture (where weights come from, the
# latent grid the samplers draw noise for); `cascade` holds the StableCascadeUNet config.
_NOT_ARCHITECTURE = ("family", "cascade", "base", "pretrained", "variant", "prior_subfolder",
                     "decoder", "decoder_subfolder", "sample_size", "in_channels", "effnet",
                     "decoder_steps", "decoder_guidance_scale")
_OURS = ("user_embed_dim", "user_tokens", "user_tokens_per_embedding", "dtype", "remat",
         "attention_impl")


def build_model(model_cfg: dict) -> PersonalizedCascade:
  """`config.model` of a cascade run (family = "cascade") -> PersonalizedCascade: the diffusers
  StableCascadeUNet fields from model_cfg["cascade"], ours (user branch, dtype, remat, kernel)
  from model_cfg itself; any other field is an error."""
  fields = dict(model_cfg)
  unknown = set(fields) - set(_NOT_ARCHITECTURE) - set(_OURS)
  if unknown:
    raise ValueError(f"build_model: unknown model config fields {sorted(unknown)}")
  arch = fields.get("cascade") or {}
  arch = dict(arch.to_dict() if hasattr(arch, "to_dict") else arch)
  if not arch:
    raise ValueError("config.model.cascade is empty: set the StableCascadeUNet fields "
                     "(configs/ppd.py:cascade_lite) or model.pretrained")
  ours = {k: fields[k] for k in _OURS if k in fields}
  ours["attention_impl"] = ours.get("attention_impl") or None
  return PersonalizedCascade(cascade.config_from_diffusers(arch, **ours))


def call_inputs(unet_inputs: dict) -> dict:
  """StableCascadeUNet's keyword inputs (cascade.example_inputs) -> PersonalizedCascade's."""
  added = {"text_embeds": unet_inputs["clip_text_pooled"]}
  for key in ("clip_img", "effnet"):
    if unet_inputs.get(key) is not None:
      added[key] = unet_inputs[key]
  return dict(sample=unet_inputs["sample"], timestep_ratio=unet_inputs["timestep_ratio"],
              encoder_hidden_states=unet_inputs.get("clip_text"), added_cond=added)


def example_inputs(cfg: cascade.CascadeConfig, batch: int = 1) -> dict:
  """cascade.example_inputs in this module's call shape, plus a zero user embedding [B, user_tokens, user_embed_dim]."""
  out = call_inputs(cascade.example_inputs(cfg, batch))
  out["user_embedding"] = jax.numpy.zeros((batch, cfg.user_tokens, cfg.user_embed_dim))
  return out


def abstract_params(model: nn.Module, with_user: bool = True) -> dict:
  """The param tree as ShapeDtypeStructs, from jax.eval_shape (traced, nothing computed): the
  target for weights/convert.to_flax and for parameter counts."""
  if not isinstance(model, PersonalizedCascade):   # a bare StableCascadeUNet (Stage B)
    inp = cascade.example_inputs(model.config)
  else:
    inp = example_inputs(model.config)
    if not with_user:
      inp.pop("user_embedding")
  return jax.eval_shape(lambda k: model.init(k, **inp), jax.random.key(0))["params"]


def init_params(model: PersonalizedCascade, rng: jax.Array, batch_size: int = 1) -> dict:
  """All params (base and user branch) as a plain nested dict, float32 (personalized.init_params'
  counterpart)."""
  inputs = example_inputs(model.config, batch_size)
  return flax.core.unfreeze(jax.jit(model.init)(rng, **inputs)["params"])


def init_user_params(model: PersonalizedCascade, rng: jax.Array) -> dict:
  """The user branch's initial values (to_v_user zero) from model.init under jit: nothing returns
  the base params or the forward pass, so XLA drops them and this compiles quickly at any size."""
  inp = example_inputs(model.config)
  return jax.jit(lambda k: personalized.split_params(model.init(k, **inp)["params"])[1])(rng)
