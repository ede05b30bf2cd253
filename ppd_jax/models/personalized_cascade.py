"""PPD on Stable Cascade: StableCascadeUNet (`unet`) + a trainable user branch.

    eps = unet(x_t, r, clip..., user_tokens = user_projector(user_embedding), user_scale)

The user tokens have width conditioning_dim, the width of the text tokens the attention blocks
see; every SDCascadeAttnBlock gets to_k_user / to_v_user (cascade_blocks.CascadeAttention). The
leaf names are personalized.USER_MODULES', so personalized.split_params separates the branch.
With user_embedding None no user branch is built: the frozen base, the DPO reference.
"""
import types

import flax.linen as nn
import jax

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

  def __call__(self, sample: jax.Array, timestep_ratio: jax.Array, clip_text_pooled: jax.Array,
               clip_text: jax.Array | None = None, clip_img: jax.Array | None = None,
               effnet: jax.Array | None = None, user_embedding: jax.Array | None = None,
               user_scale: attention.Scale = 1.0) -> jax.Array:
    """NHWC sample, r [B] (float32) and the stage's conditioning -> [B, H, W, C_out] float32.

    user_scale: a float or a [B] array (per-example; 0 gives the base output exactly)."""
    user = None if user_embedding is None else self.project_user(user_embedding)
    return self.unet(sample, timestep_ratio, clip_text_pooled, clip_text, clip_img, effnet,
                     user, user_scale)


def example_inputs(cfg: cascade.CascadeConfig, batch: int = 1) -> dict:
  """cascade.example_inputs plus a zero user embedding [B, user_tokens, user_embed_dim]."""
  out = cascade.example_inputs(cfg, batch)
  out["user_embedding"] = jax.numpy.zeros((batch, cfg.user_tokens, cfg.user_embed_dim))
  return out


def abstract_params(model: nn.Module, with_user: bool = True) -> dict:
  """The param tree as ShapeDtypeStructs, from jax.eval_shape (traced, nothing computed): the
  target for weights/convert.to_flax and for parameter counts."""
  inp = example_inputs(model.config)
  if not with_user or not isinstance(model, PersonalizedCascade):
    inp.pop("user_embedding")
  return jax.eval_shape(lambda k: model.init(k, **inp), jax.random.key(0))["params"]


def init_user_params(model: PersonalizedCascade, rng: jax.Array) -> dict:
  """The user branch's initial values (to_v_user zero) from model.init under jit: nothing returns
  the base params or the forward pass, so XLA drops them and this compiles quickly at any size."""
  inp = example_inputs(model.config)
  return jax.jit(lambda k: personalized.split_params(model.init(k, **inp)["params"])[1])(rng)
