"""What the training tests share: the tiny config with dotted overrides, and random batches."""
import numpy as np

from configs import ppd


def tiny_config(**overrides):
  """configs/ppd.py:tiny with overrides given as dotted names: tiny_config(**{"optim.lr": 1e-3})."""
  c = ppd.get_config("tiny")
  for dotted, value in overrides.items():
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def random_batch(c, seed: int = 0) -> dict:
  """A batch of c.batch_size random pairs in the shapes the step reads."""
  rng = np.random.default_rng(seed)
  s, b = c.model.sample_size, c.batch_size
  img = lambda: rng.uniform(-1, 1, size=(b, s, s, c.model.in_channels)).astype(np.float32)
  return {"preferred": img(), "dispreferred": img(),
          "text_embedding": rng.normal(size=(b, c.data.text_length, c.model.cross_attention_dim))
          .astype(np.float32),
          "user_embedding": rng.normal(size=(b, c.model.user_tokens, c.model.user_embed_dim))
          .astype(np.float32)}


def train_step_for(c, mesh):
  """(initial state, base params, jitted train step) of config c on mesh."""
  from ppd_jax import state as state_lib
  from ppd_jax import step as step_lib
  from ppd_jax.diffusion import schedules
  from ppd_jax.models import build_model
  model = build_model(c.model)
  tx, lr = step_lib.make_optimizer(c)
  state, base, st_sh, base_sh = state_lib.create_train_state(model, tx, mesh, c.seed)
  fn = step_lib.make_train_step(model, schedules.schedule_from_config(c.diffusion), c, tx, lr,
                                mesh, st_sh, base_sh)
  return state, base, fn
