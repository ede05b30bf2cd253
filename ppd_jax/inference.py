"""Generation from a trained run: load it, mix users' embeddings, run the jitted DDIM sampler.

Classifier-free guidance pairs the conditional branch (caption + user tokens at `user_scale`) with
an unconditional one (empty caption, user branch off):
    out = out(empty, no user) + g * (out(caption, user) - out(empty, no user)).
"""
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppd_jax import checkpoint as ckpt_lib
from ppd_jax import sharding as shd
from ppd_jax import state as state_lib
from ppd_jax import step as step_lib
from ppd_jax.data import sources
from ppd_jax.diffusion import samplers
from ppd_jax.diffusion import schedules
from ppd_jax.models import build_model, merge_params


@dataclasses.dataclass
class TrainedRun:
  config: ml_collections.ConfigDict
  model: Any
  schedule: schedules.NoiseSchedule
  params: Any           # base + user branch, merged
  source: Any           # the run's data source: users' embeddings and the caption encoder
  step: int


def load_trained(workdir: str, step: int | None = None) -> TrainedRun:
  """Restores the user branch of W/checkpoints (latest or `step`) onto its re-made base."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                       async_save=False)
  config = ml_collections.ConfigDict(checkpointer.restore_config(step))
  mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
  model = build_model(config.model)
  tx, _ = step_lib.make_optimizer(config)
  state, base, state_sh, _ = state_lib.create_train_state(model, tx, mesh, config.seed)
  state = checkpointer.restore(ckpt_lib.abstract_like(state, state_sh), step=step)
  checkpointer.close()
  return TrainedRun(config=config, model=model,
                    schedule=schedules.schedule_from_config(config.diffusion),
                    params=merge_params(base, state.user_params),
                    source=sources.build_source(config), step=int(state.step))


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


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "eta"))
def _generate(model, schedule, params, noise, text, null_text, user, user_scale, guidance_scale,
              rng, *, num_steps, eta):
  def apply(x, t, cond):
    return model.apply({"params": params}, x, t, cond["text"], cond["user"], cond["scale"])

  b = noise.shape[0]
  cond = {"text": text, "user": user, "scale": jnp.broadcast_to(user_scale, (b,))}
  uncond = {"text": null_text, "user": user, "scale": jnp.zeros((b,), jnp.float32)}
  return samplers.sample(apply, schedule, noise, cond, uncond, num_steps=num_steps,
                         guidance_scale=guidance_scale, rng=rng, eta=eta,
                         timestep_spacing="trailing", steps_offset=0)


def generate(run: TrainedRun, prompts: Sequence[str], user_embedding: np.ndarray, *,
             user_scale: float = 1.0, seed: int = 0, num_steps: int | None = None,
             guidance_scale: float | None = None, eta: float | None = None) -> np.ndarray:
  """Images [len(prompts), H, W, C] in [-1, 1] for one user embedding [tokens, dim]."""
  c = run.config
  num_steps = num_steps or c.sample.num_steps
  guidance_scale = c.sample.guidance_scale if guidance_scale is None else guidance_scale
  eta = c.sample.eta if eta is None else eta
  n, size = len(prompts), c.model.sample_size
  key = jax.random.key(seed)
  noise = jax.random.normal(jax.random.fold_in(key, 0), (n, size, size, c.model.in_channels))
  text = run.source.encode_captions(list(prompts))
  null_text = run.source.encode_captions([""] * n)
  user = np.broadcast_to(np.asarray(user_embedding, np.float32), (n,) + user_embedding.shape)
  x0 = _generate(run.model, run.schedule, run.params, noise, text, null_text, user,
                 jnp.float32(user_scale), jnp.float32(guidance_scale), jax.random.fold_in(key, 1),
                 num_steps=int(num_steps), eta=float(eta))
  return np.asarray(jnp.clip(x0, -1.0, 1.0))
