"""Full-size parameter counts: ours from jax.eval_shape (nothing allocated) equal diffusers' and
transformers' for the same published configs (configs/sd_architectures.py), built on torch's meta
device (nothing allocated either). Counts every component: UNet (frozen part; the user branch is
extra), VAE, each text encoder."""
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


def _count_shapes(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _count_torch(make) -> int:
  with torch.device("meta"):
    module = make()
  return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_count_equals_diffusers(variant):
  model = models.build_model(ppd.get_config(variant).model)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.key(0))
  base, user = models.split_params(shapes)
  unet_cfg = sd_architectures.ARCHITECTURES[variant]["unet"]
  want = _count_torch(lambda: diffusers.UNet2DConditionModel(**unet_cfg))
  assert _count_shapes(base) == want
  assert 0 < _count_shapes(user) < want // 5


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
