"""The LAION improved aesthetic predictor v2 (the paper's "Aesthetic" reward, Table 1).

    v = visual_projection(ViT-L/14 image tower(CLIP-preprocessed image))     OpenAI weights
    score = head(v / |v|)          sac+logos+ava1-l14-linearMSE.pth, an affine map; about 1..10

The prompt is not used (an image-only reward). Both stages run in one jitted function.
"""
from typing import Sequence

import numpy as np

from ppd_jax.rewards import base
from ppd_jax.rewards import preprocess
from ppd_jax.models import aesthetic_head
from ppd_jax.models import clip
from ppd_jax.models import clip_vision


class AestheticReward:
  name = "aesthetic"

  def __init__(self, vision: clip_vision.CLIPVisionModel, vision_params: dict, head_params: dict,
               batch_size: int = 32, workers: int | None = None):
    self.vision, self.workers = vision, workers
    head = aesthetic_head.AestheticHead(input_dim=vision.config.projection_dim)

    def fn(p, pixels):
      v = vision.apply({"params": p["vision"]}, pixels)["image_embeds"]
      return head.apply({"params": p["head"]}, clip.normalize(v))

    self._fn = fn
    self.runner = base.ShardedBatches({"vision": vision_params, "head": head_params}, batch_size)

  def score(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
    pixels = preprocess.clip_pixels(images, self.vision.config.image_size, workers=self.workers)
    if prompts is not None:
      base.check_prompts(len(pixels), prompts)
    if not len(pixels):
      return np.zeros((0,), np.float32)
    return self.runner(self._fn, pixels).astype(np.float32)
