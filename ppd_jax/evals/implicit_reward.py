"""DPO metrics of a trained user branch on a fixed set of pairs, without updating anything.

The implicit accuracy is the fraction of pairs for which the trained model ranks the user's
preferred image first: z = -beta/2 [(e_theta+ - e_ref+) - (e_theta- - e_ref-)] > 0. It is averaged
over `draws` fixed (t, eps) draws per pair, so two evaluations of the same params agree exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppd_jax import step as step_lib


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _metrics(loss_fn, user_params, base_params, batch, t, noise):
  return loss_fn(user_params, base_params, batch, t, noise)[1]


def evaluate_pairs(model, schedule, config, base_params, user_params, pairs: dict, *,
                   draws: int = 4, batch_size: int = 64, seed: int = 0) -> dict:
  """Mean DPO metrics over every pair in `pairs` (dict of stacked arrays, as gather returns)."""
  loss_fn = step_lib.make_loss_fn(model, schedule, config)
  n = len(pairs["preferred"])
  keys = step_lib.batch_keys(config.model)
  rng = np.random.default_rng(seed)
  totals, count = {}, 0
  for _ in range(draws):
    for start in range(0, n, batch_size):
      batch = {k: jnp.asarray(pairs[k][start:start + batch_size]) for k in keys}
      b = len(batch["preferred"])
      t = jnp.asarray(rng.integers(0, schedule.num_train_timesteps, size=b), jnp.int32)
      noise = jnp.asarray(rng.standard_normal(batch["preferred"].shape), jnp.float32)
      m = jax.device_get(_metrics(loss_fn, user_params, base_params, batch, t, noise))
      for k, v in m.items():
        if np.ndim(v) == 0:            # batch means; "z" is per pair
          totals[k] = totals.get(k, 0.0) + float(v) * b
      count += b
  return {k: v / count for k, v in totals.items()}
