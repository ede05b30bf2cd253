"""Generation from a trained run: load it, mix users' embeddings, sample (diffusion/generation.py).
"""
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppd_jax import backbones
from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import run_users
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax import storage
from ppd_jax import sources
from ppd_jax.diffusion import generation
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model, merge_params


@dataclasses.dataclass
class TrainedRun:
  """A restored run. `source` (users, caption encoder, VAE; it may sample the base pool) is built
  on first use: exporting the user branch needs only the params."""
  config: ml_collections.ConfigDict
  model: Any
  schedule: schedules.NoiseSchedule
  params: Any           # base + user branch, merged
  step: int
  workdir: str = ""     # where it was restored from (evaluation manifests record it)

  @functools.cached_property
  def source(self) -> Any:
    """The run's data source: users' embeddings, the caption encoder and the backbone."""
    source = sources.build_source(self.config)
    if self._pickapic and "backbone" in self.__dict__:
      source._backbone = self.backbone    # pylint: disable=protected-access  # one copy loaded
    return source

  @property
  def _pickapic(self) -> bool:
    return self.config.data.source == "pickapic"

  @functools.cached_property
  def users(self) -> Any:
    """Whom the run generates for: a Pick-a-Pic run's users kept in its workdir (run_users.py;
    no shards needed), else its source (the demo worlds re-make their users)."""
    if self._pickapic:
      return run_users.RunUsers(self.workdir, self.config, lambda: self.backbone)
    return self.source

  @functools.cached_property
  def backbone(self) -> Any:
    """The caption encoder and decoder; a Pick-a-Pic run builds it without its shards."""
    if self._pickapic and "source" not in self.__dict__:
      return backbones.build_backbone(self.config)
    return self.source.backbone


def load_trained(workdir: str, step: int | None = None) -> TrainedRun:
  """Restores the user branch of W/checkpoints (latest or `step`) onto its re-made base."""
  checkpointer = ckpt_lib.Checkpointer(storage.path(workdir) / "checkpoints", async_save=False)
  config = ml_collections.ConfigDict(checkpointer.restore_config(step))
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  model = build_model(config.model)
  tx, _ = step_lib.make_optimizer(config)
  state, base, state_sh, _ = state_lib.create_train_state(
      model, tx, mesh, config.seed, config.model.base, config.model.get("pretrained", ""),
      config.model.get("variant", ""), frozen_dtype=jnp.float32,   # the weights as loaded
      prior_subfolder=config.model.get("prior_subfolder", "prior_lite"))
  state = checkpointer.restore(ckpt_lib.abstract_like(state, state_sh), step=step)
  checkpointer.close()
  return TrainedRun(config=config, model=model,
                    schedule=schedules.schedule_from_config(config.diffusion),
                    params=merge_params(base, state.user_params),
                    step=int(state.step), workdir=os.fspath(storage.path(workdir)))


def run_users_only(workdir: str, step: int | None = None) -> Any:
  """A run's users (TrainedRun.users) from its config alone: no weights are loaded."""
  checkpointer = ckpt_lib.Checkpointer(storage.path(workdir) / "checkpoints", async_save=False)
  try:
    config = ml_collections.ConfigDict(checkpointer.restore_config(step))
  finally:
    checkpointer.close()
  if config.data.source == "pickapic":
    return run_users.RunUsers(workdir, config, backbone_fn=None)
  return sources.build_source(config)   # the demo worlds re-make their users


def mix_users(embeddings: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
  """sum_i w_i e_i / sum_i w_i: the paper's interpolation between users' embeddings."""
  w = np.asarray(weights, np.float64)
  if len(w) != len(embeddings) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"user weights {list(weights)} must be non-negative, one per user, and not "
                     "all zero")
  w = w / w.sum()
  out = np.zeros_like(embeddings[0], dtype=np.float32)
  for wi, e in zip(w, embeddings):
    if wi:
      out = out + np.float32(wi) * np.asarray(e, np.float32)
  return out


def generate(run: TrainedRun, prompts: Sequence[str], user_embedding: np.ndarray, *,
             user_scale: float = 1.0, seed: int = 0, num_steps: int | None = None,
             guidance_scale: float | None = None, eta: float | None = None,
             sampler: str | None = None) -> np.ndarray:
  """Images [len(prompts), H, W, C] in [-1, 1] for one user embedding [tokens, dim]."""
  c = run.config
  num_steps = num_steps or c.sample.num_steps
  guidance_scale = c.sample.guidance_scale if guidance_scale is None else guidance_scale
  eta = c.sample.eta if eta is None else eta
  noise = generation.initial_noise(seed, len(prompts), c.model)
  user = np.broadcast_to(np.asarray(user_embedding, np.float32),
                         (len(prompts),) + user_embedding.shape)
  return generation.sample_images(
      run.model, run.schedule, run.params, run.backbone.encode_captions(list(prompts)),
      run.backbone.encode_captions([""]), noise, user, user_scale=user_scale,
      guidance_scale=guidance_scale, num_steps=num_steps, eta=eta,
      clip_sample=c.sample.clip_sample, sampler=sampler or c.sample.get("sampler", "ddim"),
      seed=seed, decode=run.backbone.to_images)



def generate_mixes(run: TrainedRun, prompt: str, user_embeddings: np.ndarray, *,
                   seed: int = 0) -> np.ndarray:
  """Images [M, H, W, C] of one prompt for M user embeddings [M, tokens, dim], all from the same
  x_T (image 0's noise of `seed`): an interpolation figure shows the embedding's effect alone."""
  c = run.config
  user = np.asarray(user_embeddings, np.float32)
  noise = np.repeat(generation.initial_noise(seed, 1, c.model), len(user), axis=0)
  return generation.sample_images(
      run.model, run.schedule, run.params, run.backbone.encode_captions([prompt] * len(user)),
      run.backbone.encode_captions([""]), noise, user, user_scale=1.0,
      guidance_scale=c.sample.guidance_scale, num_steps=c.sample.num_steps, eta=c.sample.eta,
      clip_sample=c.sample.clip_sample, sampler=c.sample.get("sampler", "ddim"), seed=seed,
      decode=run.backbone.to_images)
