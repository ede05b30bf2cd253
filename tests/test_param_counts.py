"""Full-size parameter counts: ours from jax.eval_shape (nothing allocated) equal diffusers' and
transformers' for the same published configs (configs/sd_architectures.py), built on torch's meta
device (nothing allocated either). Counts every component: UNet (frozen part), the user branch
(as the IP-Adapter diffusers would load: ImageProjection + to_k_ip/to_v_ip per cross-attention),
VAE, each text encoder."""
import math

import jax
import pytest

from configs import ppd
from configs import sd_architectures
from ppd_jax import models
from ppd_jax.models import clip_text
from ppd_jax.models import vae as vae_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VARIANTS = ("sd15", "sd21", "sdxl")
# The user branch at full size: one-token embeddings of the VLM's 3584 dims made into K = 4 tokens
# (model.user_tokens = 1, model.user_tokens_per_embedding = 4). Equal to the IP-Adapter count below.
USER_BRANCH = {"sd15": 30_183_936, "sd21": 40_245_248, "sdxl": 370_159_616}


def _count_shapes(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _count_torch(make) -> int:
  with torch.device("meta"):
    module = make()
  return sum(p.numel() for p in module.parameters())


def _count_ip_adapter(unet, embed_dim: int, tokens: int) -> int:
  """diffusers' IP-Adapter modules for `unet` (on the meta device): ImageProjection (what
  load_ip_adapter builds for an image_proj.proj.weight) and one IPAdapterAttnProcessor2_0
  (to_k_ip, to_v_ip) per cross-attention, sized by that attention's query width."""
  from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
  from diffusers.models.embeddings import ImageProjection
  d = unet.config.cross_attention_dim
  with torch.device("meta"):
    modules = [ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=d,
                               num_image_text_embeds=tokens)]
    for name in unet.attn_processors:
      if not name.endswith("attn1.processor"):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        modules.append(IPAdapterAttnProcessor2_0(attn.to_q.out_features, d, num_tokens=(tokens,)))
  return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_count_equals_diffusers(variant):
  c = ppd.get_config(variant).model
  assert (c.user_tokens, c.user_tokens_per_embedding, c.user_embed_dim) == (1, 4, 3584)
  model = models.build_model(c)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.key(0))
  base, user = models.split_params(shapes)
  unet_cfg = sd_architectures.ARCHITECTURES[variant]["unet"]
  with torch.device("meta"):
    ref = diffusers.UNet2DConditionModel(**unet_cfg)
  assert _count_shapes(base) == sum(p.numel() for p in ref.parameters())
  assert _count_shapes(user) == _count_ip_adapter(ref, 3584, 4) == USER_BRANCH[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_vae_and_text_encoder_counts_equal_the_references(variant):
  arch = sd_architectures.ARCHITECTURES[variant]
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_diffusers(arch["vae"]))
  ours = _count_shapes(jax.eval_shape(lambda k: vae_lib.init_params(vae, k), jax.random.key(0)))
  assert ours == _count_torch(lambda: diffusers.AutoencoderKL(**arch["vae"]))
  for cls_name, cfg in arch["text_encoders"]:
    module = clip_text.CLIPTextModel(clip_text.CLIPTextConfig.from_transformers(cfg),
                                     with_projection=cls_name == "CLIPTextModelWithProjection")
    ids = jax.ShapeDtypeStruct((1, 77), jax.numpy.int32)
    ours = _count_shapes(jax.eval_shape(module.init, jax.random.key(0), ids))
    ref_cls = getattr(transformers, cls_name)
    assert ours == _count_torch(lambda: ref_cls(transformers.CLIPTextConfig(**cfg)))
