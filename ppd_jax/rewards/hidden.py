"""The demo's synthetic users as rewards: user u's hidden weights over measured image properties.

    score_u(x) = w_u . standardise(properties(x))          (demo_world/synthetic_users.py)

The same interface as the reward models, so the demo's protocol (evals/personalization.py) and
any other evaluation take either. The prompt is not used: the demo's users rate the image alone.
"""
from typing import Sequence

import numpy as np

from ppd_jax.rewards import base
from ppd_jax.rewards import preprocess


class HiddenPropertyReward:
  """Synthetic user `user_id` of a demo source (demo_world/synthetic.py's SyntheticSource)."""

  def __init__(self, source, user_id: int):
    source.check_user(user_id)
    self.source, self.user_id = source, user_id
    self.name = f"hidden_user_{user_id}"

  def score(self, images, prompts: Sequence[str] | None = None) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
      arrays = images                       # the sampler's [-1, 1] floats, measured as they are
    else:
      u8 = preprocess.to_uint8_images(images)
      arrays = np.stack(u8).astype(np.float32) / 127.5 - 1.0 if u8 else np.zeros((0, 1, 1, 3))
    if prompts is not None:
      base.check_prompts(len(arrays), prompts)
    if not len(arrays):
      return np.zeros((0,), np.float32)
    return np.asarray(self.source.user_reward(self.user_id, arrays), np.float32)
